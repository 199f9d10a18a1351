"""What the tensor-parallel test and its worker ranks share: configs, the prompt, the tiny models."""

import torch

import spectral_kv as sk

LOSSLESS = sk.SpectralConfig(block_size=16, k_rank_keys=16, k_rank_values=16, hot_buffer_size=4, sink_tokens=2,
                             compressor="exact_svd", coeff_bits=None, value_bits="same", basis_dtype="float32",
                             verbose=False)
LOSSY = sk.SpectralConfig(block_size=16, hot_buffer_size=4, sink_tokens=2, quant_group=16, verbose=False)
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=0)


def prompt() -> torch.Tensor:
    return torch.randint(1, 96, (2, 70), generator=torch.Generator().manual_seed(1))


def save_tiny(arch: str, path: str, **extra) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg_cls, model_cls, kw = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"use_sliding_window": False}),
    }[arch]
    torch.manual_seed(0)
    model_cls(cfg_cls(**{**COMMON, **kw, **extra})).save_pretrained(path)
