"""Tensor parallelism (transformers' ``tp_plan="auto"``) on the CPU: two gloo ranks.

Each rank holds half the KV heads; its `SpectralCache` compresses and attends over those. At
lossless settings the tokens equal the single-process `DynamicCache` run, and at lossy
settings the single-process `SpectralCache` run (the compression of a KV head does not depend
on the other heads, and float32 on a tiny model leaves no near-ties).
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "tp"))
from tp_common import LOSSLESS, LOSSY, prompt, save_tiny  # noqa: E402

import spectral_kv as sk  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(model_dir, out_dir, *extra, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", os.path.join(HERE, "tp", "worker.py"), str(model_dir), str(out_dir), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tp_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"tp_{request.param}")
    save_tiny(request.param, root / "model")
    proc = _launch(root / "model", root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.load(open(root / f"rank{r}.json")) for r in range(2)]
    model = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    return model, ranks, root


def _single(model, cache_or_config):
    ids = prompt()
    with torch.no_grad():
        if isinstance(cache_or_config, sk.SpectralConfig):
            patch = sk.patch_unsloth_attention(model, config=cache_or_config)
            try:
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False).tolist()
            finally:
                patch.unpatch()
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              past_key_values=cache_or_config).tolist()


def test_each_rank_holds_half_the_kv_heads_and_compresses(tp_run):
    model, ranks, _ = tp_run
    for r in ranks:
        assert r["world"] == 2 and r["tp_size"] == 2
        assert r["local_kv_heads"] == model.config.num_key_value_heads // 2
        assert all(n >= 2 * 4 for n in r["cold_blocks"])  # 94 tokens, blocks of 16, batch 2


def test_lossless_tp_equals_single_process_dynamic_cache(tp_run):
    model, ranks, _ = tp_run
    expected = _single(model, DynamicCache())
    for r in ranks:
        assert r["dynamic"] == expected  # the TP engine itself is exact here
        assert r["lossless"] == expected


def test_lossy_tp_equals_single_process_spectral_cache(tp_run):
    model, ranks, _ = tp_run
    expected = _single(model, LOSSY)
    for r in ranks:
        assert r["lossy"] == expected
        assert r["static"] == expected  # StaticDecoder (eager on the CPU) on each rank


def test_memory_reports_are_per_rank_and_sum_to_the_whole(tp_run):
    model, ranks, _ = tp_run
    ids = prompt()
    patch = sk.patch_unsloth_attention(model, config=LOSSY)
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        whole = patch.memory_report()
    finally:
        patch.unpatch()
    for key in ("total_bytes", "dense_bytes"):
        assert sum(r["memory"][key] for r in ranks) == whole[key]


def test_save_writes_one_file_per_rank(tp_run):
    _, ranks, root = tp_run
    names = sorted(os.path.basename(r["saved_to"]) for r in ranks)
    assert names == ["cache.rank0-of-2.safetensors", "cache.rank1-of-2.safetensors"]
    assert all(r["reload_equal"] and r["saved_exists"] for r in ranks)


def test_a_split_that_breaks_kv_heads_or_gqa_groups_is_refused_by_name(tmp_path):
    # 6 query heads over 3 KV heads: 2 ranks would each get 1.5 KV heads.
    save_tiny("llama", tmp_path / "model", num_attention_heads=6, num_key_value_heads=3, hidden_size=96)
    proc = _launch(tmp_path / "model", tmp_path, "bad-split")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for r in range(2):
        error = json.load(open(tmp_path / f"rank{r}.json"))["error"]
        assert error is not None and "num_key_value_heads=3 unevenly" in error and "2 ranks" in error


def test_check_split_names_the_bad_head_count():
    from transformers import LlamaConfig

    from spectral_kv.integrations.transformers.tensor_parallel import check_split, local_split, rank_path

    cfg = LlamaConfig(num_attention_heads=8, num_key_value_heads=4, hidden_size=64)
    check_split(cfg, 2, "here")  # 2 KV heads and 4 query heads per rank: fine
    check_split(cfg, 4, "here")
    with pytest.raises(ValueError, match="num_key_value_heads=4 unevenly"):
        check_split(cfg, 8, "here")
    with pytest.raises(ValueError, match="2 of the model's num_key_value_heads=4 KV heads"):
        local_split(2, 4, "here")  # one process holding half the heads: not a shard
    assert local_split(4, 4, "here") is None
    assert rank_path("/x/cache.safetensors", 1, 4) == "/x/cache.rank1-of-4.safetensors"
