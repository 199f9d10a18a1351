"""What the integration reads from a transformers model config: ONE definition of each."""

from __future__ import annotations

__all__ = ["text_config", "head_dim", "kv_heads"]


def text_config(model_config):
    """The decoder's text config (multimodal configs nest it; plain ones are their own)."""
    return model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config


def head_dim(text) -> int:
    """Channels per attention head of a text config (``head_dim``, else hidden / heads)."""
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def kv_heads(text) -> int:
    """Key/value heads of a text config (``num_key_value_heads``, else the attention heads)."""
    return getattr(text, "num_key_value_heads", None) or text.num_attention_heads
