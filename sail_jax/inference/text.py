"""Token ids -> text, as upstream decodes responses, an incremental decoder for streaming, and the context-length
check every generation request passes (generate, chat, eval all reach it through `Engine.generate`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sail_jax.config import LLMConfig
from sail_jax.data.tokenizer import SailTokenizer

IM_END = "<|im_end|>"
_INCOMPLETE = "\ufffd"  # what byte-level BPE decodes a partial UTF-8 sequence to


def check_context_length(prompt_lengths: Sequence[int], max_new_tokens: int, llm: LLMConfig) -> None:
    """Refuse a request whose prompt plus `max_new_tokens` passes the model's `max_position_embeddings`: positions
    beyond it were never trained (RoPE would run on silently)."""
    max_positions = llm.max_position_embeddings
    for i, n in enumerate(prompt_lengths):
        if n + max_new_tokens > max_positions:
            raise ValueError(f"request {i}: prompt of {n} tokens + max_new_tokens {max_new_tokens} = "
                             f"{n + max_new_tokens} positions, more than the model's max_position_embeddings "
                             f"{max_positions}; shorten the prompt (fewer images or tiles) or lower --max-new-tokens")


def decode_response(tokenizer: SailTokenizer, token_ids: Iterable[int]) -> str:
    """Upstream's rule: decode skipping special tokens, cut at `<|im_end|>`, strip."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=True).split(IM_END)[0].strip()


class TextStream:
    """Turns token ids arriving in pieces into text pieces. Ids are decoded from the last emitted boundary (byte-level
    BPE decodes a token suffix independently); a piece that ends inside a multi-byte character is held back until
    the character is complete, so a printed stream never shows replacement characters mid-way."""

    def __init__(self, tokenizer: SailTokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token_ids: Iterable[int]) -> str:
        self.pending += [int(t) for t in token_ids]
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if text.endswith(_INCOMPLETE):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is held back (a dangling partial character included)."""
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        self.pending = []
        return text
