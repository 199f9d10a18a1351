#!/usr/bin/env bash
# The GPU speed runs in one device call: `bash benchmarks/gpu_speed.sh OUTDIR PART...`, parts:
#   sweep    benchmarks/quant_decode_sweep.py (knob variants of the quantized kernel, balanced)
#   kernel   benchmarks/quant_decode_bench.py --quick (correctness first, then the kernel table)
#   kernel-full  the same at every size (adds 4 x 128K and 64 x 32K)
#   profile  benchmarks/step_profile.py (per-kernel time of graphed Mistral-7B-shape steps)
#   e2e-smol benchmarks/e2e_decode.py --shapes smollm2 (1 x 4K and 8 x 4K)
#   e2e-mistral  1/8/16 x 32K and the largest batch (benchmarks/e2e_decode.py)
#   gluon    benchmarks/gluon_decode.py --quick (the Gluon cold kernel: checks, then timing vs tl and SDPA)
# A Triton cache carried in .tcache/triton.tgz (a previous call's OUTDIR/triton.tgz) is unpacked
# first, and the cache is packed into OUTDIR/triton.tgz at the end: the kernels here take
# ~15-20 s each to compile and a fresh machine starts with an empty cache.
set -u
out=${1:?outdir}; shift
mkdir -p "$out"
export TRITON_CACHE_DIR=/tmp/triton_cache
mkdir -p $TRITON_CACHE_DIR
[ -f .tcache/triton.tgz ] && tar -xzf .tcache/triton.tgz -C $TRITON_CACHE_DIR && echo "triton cache: $(ls $TRITON_CACHE_DIR | wc -l) entries carried"
for part in "$@"; do
  echo "+ part $part at $(date +%T)"
  case $part in
    kernel) timeout 300 python3 benchmarks/quant_decode_bench.py --quick --out "$out" ;;
    kernel-full) timeout 400 python3 benchmarks/quant_decode_bench.py --out "$out" ;;
    sweep) timeout 330 python3 benchmarks/quant_decode_sweep.py --budget-s 280 --out "$out" ;;
    profile) timeout 240 python3 benchmarks/step_profile.py --out "$out" ;;
    e2e-smol) timeout 430 python3 benchmarks/e2e_decode.py --shapes smollm2 --out "$out/smol" ;;
    gluon) timeout 200 python3 benchmarks/gluon_decode.py --quick 2>&1 | tee "$out/gluon_decode_H200.txt" ;;
    e2e-mistral) timeout 540 python3 benchmarks/e2e_decode.py --shapes mistral7b --out "$out/mistral" ;;
  esac
  echo "+ part $part rc=$? at $(date +%T)"
done
tar -czf "$out/triton.tgz" -C $TRITON_CACHE_DIR . && ls -la "$out/triton.tgz"
