"""Token ids -> text, as upstream decodes responses, and an incremental decoder for streaming."""

from __future__ import annotations

from collections.abc import Iterable

from sail_jax.data.tokenizer import SailTokenizer

IM_END = "<|im_end|>"
_INCOMPLETE = "\ufffd"  # what byte-level BPE decodes a partial UTF-8 sequence to


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
