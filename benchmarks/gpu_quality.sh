#!/usr/bin/env bash
# Quality on the validation split, run on a GPU (the 2 CPU cores of the dev machines take ~200 s per method
# and segment). Usage: bash benchmarks/gpu_quality.sh OUTDIR [ppl|niah|kvpress]...
# Needs the embedded model (benchmarks/gpu_setup.sh rebuilds it from the carried halves).
set -u
out=${1:?outdir}; shift
mkdir -p "$out"
run() { echo "+ spectral-kv eval $*"; python3 -m spectral_kv.cli eval --device cuda --out "$out" "$@" 2>&1 | grep -v "Loading weights\|it/s\]" ; }
for part in "$@"; do
  case $part in
    ppl) run --split both --segments 3 --context 3584 --continuation 512 --chunk 64 --no-niah --tag validation-ppl \
           --methods 'exact;spectral:preset=balanced;spectral:preset=max-compression;spectral:preset=fast;spectral:preset=original;spectral:preset=spectral-5x;spectral:preset=spectral-8x;kivi4;kivi2' ;;
    baselines)  # kvpress 0.5.5 needs transformers < 5.3: carried wheels of transformers 5.2 and tokenizers 0.22.2 (.whl52/)
      # go first on the path; kvpress also imports fire (.whl/)
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site52 .whl52/*.whl
      PYTHONPATH=/tmp/site52:$PYTHONPATH:.whl/stubs run --split validation --segments 3 --context 3584 --continuation 512 --chunk 64 \
           --no-niah --tag validation-baselines --methods 'exact;hqq:bits=4;hqq:bits=2;streaming:ratio=0.655;snapkv:ratio=0.655;knorm:ratio=0.655;expected:ratio=0.655;snapkv:ratio=0.5;snapkv:ratio=0.5+spectral:preset=balanced;expected:ratio=0.5;expected:ratio=0.5+spectral:preset=balanced'
      PYTHONPATH=/tmp/site52:$PYTHONPATH:.whl/stubs run --split validation --no-quality --niah-lengths 2048,4096,8000 \
           --niah-depths 0.1,0.3,0.5,0.7,0.9 --tag validation-niah-compose \
           --methods 'exact;snapkv:ratio=0.5;snapkv:ratio=0.5+spectral:preset=balanced' ;;
    candidates) run --split validation --segments 3 --context 3584 --continuation 512 --chunk 64 --no-niah --tag validation-candidates \
           --methods 'exact;spectral:preset=max-compression,bits=2,vbits=3;spectral:preset=max-compression,bits=4,vbits=2' ;;
    niah) run --split validation --no-quality --niah-lengths 2048,4096,8000 --niah-depths 0.1,0.3,0.5,0.7,0.9 --tag validation-niah \
           --methods 'exact;spectral:preset=balanced;spectral:preset=max-compression;spectral:preset=spectral-5x;spectral:preset=spectral-8x' ;;
  esac
done
