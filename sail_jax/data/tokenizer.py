"""SAIL-VL2 tokenizer (Qwen3 byte-level BPE) on the `tokenizers` library, built from the released data files.

The release ships no usable `tokenizer.json`, so the fast tokenizer is assembled the way transformers' Qwen2
tokenizer is: BPE over vocab.json + merges.txt, NFC, the Qwen2 split regex, byte-level mapping and decoder, no
BOS; then the added tokens with their own `special` flags (`<think>`/`</think>` are not special and so survive
`skip_special_tokens`). A `tokenizer.json` in the directory is used as is.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sail_jax.files import as_path, is_url, local_copy
from sail_jax.resources import DATA_ROOT, TOKENIZER_FILES

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)



def find_tokenizer_dir(directory: str | Path) -> Path:
    """`directory` as given; but a relative one that does not exist from the working directory and does exist in the
    shipped data (`assets/tokenizer`, the bundled tokenizer) is the shipped copy, so such a path works outside a
    checkout, as gin's `configs/...` paths do. A URL (`gs://...`) gives a local copy of its `TOKENIZER_FILES` (the
    tokenizers library reads local files; `local_copy` makes it once per host)."""
    if is_url(directory):
        if not as_path(directory).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        return local_copy(directory, TOKENIZER_FILES)
    directory = Path(directory)
    shipped = DATA_ROOT / directory
    if not directory.is_absolute() and not directory.exists() and shipped.is_dir():
        return shipped
    return directory


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _added_tokens(directory: Path) -> list[tuple[int, AddedToken]]:
    """Added tokens from tokenizer_config.json's `added_tokens_decoder` (with flags) or else added_tokens.json.

    added_tokens.json carries no flags; there, a token is special when special_tokens_map.json names it (the slow
    tokenizer's rule)."""
    config_path = directory / "tokenizer_config.json"
    decoder = _read_json(config_path).get("added_tokens_decoder") if config_path.is_file() else None
    if decoder:
        return [
            (
                int(idx),
                AddedToken(
                    t["content"],
                    single_word=t.get("single_word", False),
                    lstrip=t.get("lstrip", False),
                    rstrip=t.get("rstrip", False),
                    normalized=t.get("normalized", False),
                    special=t.get("special", False),
                ),
            )
            for idx, t in decoder.items()
        ]
    added_path = directory / "added_tokens.json"
    if not added_path.is_file():
        return []
    special: set[str] = set()
    map_path = directory / "special_tokens_map.json"
    if map_path.is_file():
        for value in _read_json(map_path).values():
            for item in value if isinstance(value, list) else [value]:
                special.add(item["content"] if isinstance(item, dict) else item)
    return [
        (int(idx), AddedToken(content, normalized=False, special=content in special))
        for content, idx in _read_json(added_path).items()
    ]


def _build_from_vocab(directory: Path) -> Tokenizer:
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer directory {directory} lacks {' and '.join(missing)} (and tokenizer.json)")
    vocab = _read_json(vocab_path)
    merges = []
    for line in merges_path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            left, sep, right = line.partition(" ")
            if not sep:
                raise ValueError(f"bad merge line in {merges_path}: {line!r}")
            merges.append((left, right))
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = sorted(_added_tokens(directory), key=lambda x: x[0])
    for idx, token in added:
        # Added ids follow the vocabulary contiguously, so adding in id order must reproduce each id.
        tok.add_tokens([token])
        if tok.token_to_id(token.content) != idx:
            raise ValueError(f"added token {token.content!r} got id {tok.token_to_id(token.content)}, expected {idx}")
    return tok


class SailTokenizer:
    """Thin wrapper: encode without BOS, decode skipping special tokens, offsets for loss masks."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._special_ids = frozenset(
            idx for idx, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
        )

    @classmethod
    def from_dir(cls, directory: str | Path) -> SailTokenizer:
        directory = find_tokenizer_dir(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        if (directory / "tokenizer.json").is_file():
            try:
                return cls(Tokenizer.from_file(str(directory / "tokenizer.json")))
            except Exception as e:  # tokenizers raises a bare Exception on a bad or LFS-pointer file
                raise ValueError(f"cannot read {directory / 'tokenizer.json'}: {e}") from e
        return cls(_build_from_vocab(directory))

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def token_to_id(self, token: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return idx

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's (start, end) character span in `text`."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
