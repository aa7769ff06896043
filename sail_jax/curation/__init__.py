"""Data curation of the paper (`sail-jax curate`): judge-score filtering, n-gram resampling, deduplication and
LongCoT cleaning, each streaming LLaVA JSONL in and out with a report of what was dropped and why."""
