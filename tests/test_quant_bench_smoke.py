"""benchmarks/quant_decode_bench.py --cpu-smoke: the GPU script's correctness, table and
compression code paths at tiny sizes under TRITON_INTERPRET=1, so a change that breaks the script
fails CI, not the lead's GPU run (it must run first time there). ~15 s on an idle 2-core box."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quant_bench_cpu_smoke_passes():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/quant_decode_bench.py", "--cpu-smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for line in ("quant_decode balanced        G=1", "quant_decode mixed", "quant_fused_decode max-compression",
                 "fused_decode (SVD int8 rank 16/32) G=1", "balanced        values: codes off by one",
                 "balanced step", "fast (SVD)", "amortized over 16 decode steps", "correctness: PASS"):
        assert line in out, (line, out[-3000:])
    assert "FAIL" not in out, out[-3000:]
