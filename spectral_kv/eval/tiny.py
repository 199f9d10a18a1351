"""A tiny random Llama and a byte tokenizer, so the harness runs end-to-end in CI."""

from __future__ import annotations

__all__ = ["ByteTokenizer", "tiny_random_model"]


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256), with the HF calling convention used here."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("no chat template")


def tiny_random_model(seed: int = 0, head_dim: int = 32, layers: int = 2):
    """(model, tokenizer): random Llama, 4 query heads, 2 KV heads, vocabulary 256."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=4096,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model, ByteTokenizer()
