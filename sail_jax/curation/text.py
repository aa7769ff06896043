"""Word tokens for the curation verbs (n-gram counts, question keys, thought/answer overlap).

Lower-cased (NFKC, casefold) runs of letters and digits; each CJK ideograph, kana or hangul syllable is a token of
its own, since those scripts do not separate words with spaces (SAIL-Caption2 is half Chinese). `<image>` markers
are placement tags, not text, and are removed first.
"""

from __future__ import annotations

import re
import unicodedata

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")
IMAGE_MARKER = "<image>"


def words(text: str) -> list[str]:
    """Normalised word tokens of `text` (punctuation and whitespace dropped)."""
    text = unicodedata.normalize("NFKC", text.replace(IMAGE_MARKER, " ")).casefold()
    return _TOKEN.findall(text)


def ngrams(tokens: list[str], n: int) -> list[str]:
    """The n-grams of a token list, each joined by single spaces (none when there are fewer than n tokens)."""
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
