"""One rank of the tensor-parallel CPU test (`tests/test_tensor_parallel.py` launches two).

Run as ``python -m torch.distributed.run --nproc-per-node 2 tests/tp/worker.py MODEL_DIR OUT_DIR``:
loads the tiny model with ``tp_plan="auto"`` (gloo), generates with `DynamicCache`, a lossless and
a lossy `SpectralCache`, the static decoder, saves and reloads a per-rank cache file, and writes
what it saw to ``OUT_DIR/rank{r}.json`` for the test to compare with a single-process run.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tp_common import LOSSLESS, LOSSY, prompt  # noqa: E402

import spectral_kv as sk  # noqa: E402
from spectral_kv.integrations.transformers.tensor_parallel import rank_path  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402


def main(model_dir: str, out_dir: str, mode: str = "run") -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
    model.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "bad-split":  # heads that do not split evenly: refused by name before any forward
        try:
            sk.patch_unsloth_attention(model, config=LOSSY)
            error = None
        except ValueError as exc:
            error = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "error": error}, f)
        dist.barrier()
        dist.destroy_process_group()
        return
    ids = prompt()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    out = {"rank": rank, "world": world, "tp_size": model.tp_size}
    with torch.no_grad():
        out["dynamic"] = model.generate(ids, past_key_values=DynamicCache(), **kw).tolist()
        patch = sk.patch_unsloth_attention(model, config=LOSSLESS)
        out["lossless"] = model.generate(ids, **kw).tolist()
        cache = patch.last_cache
        out["local_kv_heads"] = cache.spectral_layers[0].tiers.exact_k.shape[1]
        out["cold_blocks"] = [sum(layer.tiers.n_cold) for layer in cache.spectral_layers]
        patch.unpatch()
        patch = sk.patch_unsloth_attention(model, config=LOSSY)
        out["lossy"] = model.generate(ids, **kw).tolist()
        cache = patch.last_cache
        rep = cache.memory_report()
        out["memory"] = {k: rep[k] for k in ("total_bytes", "dense_bytes", "tokens")}
        path = os.path.join(out_dir, "cache.safetensors")
        cache.save(path)
        out["saved_to"] = rank_path(path, rank, world)
        out["saved_exists"] = os.path.exists(out["saved_to"]) and not os.path.exists(path)
        loaded = sk.SpectralCache.load(path, model)
        out["reload_equal"] = all(
            torch.equal(a.tiers.exact_k, b.tiers.exact_k) and a.tiers.n_cold == b.tiers.n_cold
            for a, b in zip(cache.spectral_layers, loaded.spectral_layers)
        )
        decoder = sk.StaticDecoder(model, sk.SpectralCache(LOSSY, model.config))
        out["static"] = decoder.generate(ids, max_new_tokens=24).tolist()
        patch.unpatch()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
