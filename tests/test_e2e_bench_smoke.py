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


def test_step_profile_cpu_smoke_runs(tmp_path):
    # benchmarks/step_profile.py (the per-kernel table of a graphed step) on a tiny model: the
    # StaticDecoder + profiler path runs and the report is written (kernel classes need CUDA)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "step_profile.py"), "--cpu-smoke",
                           "--presets", "balanced", "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "step_profile_cpu.txt").read_text()
    assert "## balanced StaticDecoder, B=2 ctx=600" in report, report
    from importlib import util

    spec = util.spec_from_file_location("step_profile", os.path.join(ROOT, "benchmarks", "step_profile.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.kernel_class("qd_partial_kernel") == "attention"
    assert mod.kernel_class("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT") == "gemm"
    assert mod.kernel_class("void at::native::vectorized_elementwise_kernel<4, ...>") == "other"
