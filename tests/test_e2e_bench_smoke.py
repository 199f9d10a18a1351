"""benchmarks/e2e_decode.py's code paths at tiny sizes on the CPU, so CI catches breakage of the
script the README's end-to-end GPU numbers come from (its checks must pass; no timing is asserted)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_e2e_bench_cpu_smoke_checks_pass():
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "e2e_decode.py"), "--cpu-smoke", "--check-only"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ALL PASSED" in proc.stdout
    assert proc.stdout.count(": OK") >= 5  # lossless + one line per timed preset
