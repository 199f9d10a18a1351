"""benchmarks/gpu_decode_bench.py --cpu-smoke: the GPU script's compression and end-to-end code
paths at tiny sizes on the CPU, so a change that breaks the script fails CI, not the GPU run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_cpu_smoke_passes():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # the fused strategy takes its torch fallback on CPU
    proc = subprocess.run([sys.executable, "benchmarks/gpu_decode_bench.py", "--cpu-smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "lossless SpectralCache(fused) == DynamicCache" in out and "OK" in out
    assert "correctness: PASS" in out
    assert "e2e spectral+fused B=4 ctx=200" in out and "err/exact" in out
