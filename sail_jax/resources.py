"""Where the shipped data lives: `configs/` (gin files) and `assets/` (the bundled tokenizer, LLM-judge prompts).

In a source checkout (or its editable install) they are top-level folders beside the `sail_jax` package; a built
wheel ships them inside it as `sail_jax/configs` and `sail_jax/assets`. Lookups go through `DATA_ROOT`, so a path
like `configs/stage/sft.gin` or `assets/tokenizer` means the same files in both.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_ROOT = PACKAGE_DIR if (PACKAGE_DIR / "configs").is_dir() else PACKAGE_DIR.parent
CONFIGS_DIR = DATA_ROOT / "configs"
TOKENIZER_DIR = DATA_ROOT / "assets" / "tokenizer"
JUDGE_PROMPTS_DIR = DATA_ROOT / "assets" / "judge_prompts"  # one LLM-judge prompt per benchmark

# The files of a tokenizer / processor directory (what checkpoints carry and what is fetched from a URL).
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
