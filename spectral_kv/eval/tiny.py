"""A tiny random Llama and a byte tokenizer, so the harness runs end-to-end in CI."""

from __future__ import annotations

__all__ = ["ByteTokenizer", "tiny_random_model", "tiny_hf_tokenizer", "save_tiny_model"]


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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_hf_tokenizer():
    """A real ``PreTrainedTokenizerFast`` over UTF-8 bytes (ids 0..255: byte-level BPE without
    merges; EOS and pad = byte 0, BOS = byte 1), built without any download, so clients that
    need a transformers tokenizer (kvpress' pipeline, ``save_pretrained``, the CLI) run in CI."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=b2u[1], eos_token=b2u[0], pad_token=b2u[0])


def save_tiny_model(path, seed: int = 0, **kwargs) -> str:
    """Write the tiny random model and `tiny_hf_tokenizer` as a ``save_pretrained`` directory
    (what a user's ``--model PATH`` looks like); returns the path."""
    model, _ = tiny_random_model(seed, **kwargs)
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    tiny_hf_tokenizer().save_pretrained(path)
    return str(path)
