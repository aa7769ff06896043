"""Run length in epochs (`train.epochs`): how many packed rows one pass over the data makes.

The count runs the real pipeline once (transform, skip accounting, packing with the configured packer, seed and
limits; no batching) on one process view of all the data, so it is exact for the first pass; later passes are
shuffled differently and pack to nearly the same number. A mixture's pass ends when its first dataset runs out (as
`DataConfig.num_epochs` says): give the datasets weights proportional to their sizes to read each once.

Counting means preprocessing every sample, so it is cached: a JSON file named by a fingerprint of the data files
(path, size, modification time or an object's generation) and of every option that changes packing, beside the
first data file or, where that directory is not writable or is a URL, in the run's workdir. Changed data or
options give another fingerprint, hence a recount. Images are not fingerprinted: replacing an image in place
keeps the cached count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any

from sail_jax.config import ModelConfig
from sail_jax.data.pipeline import DataConfig, row_dataset
from sail_jax.files import as_path, file_identity, is_url, write_text_atomic

# DataConfig fields that change speed or batching, never which rows the packer makes.
NOT_PACKING = ("batch_size", "num_devices", "num_epochs", "num_workers", "worker_buffer_size", "read_threads",
               "read_buffer_size", "prefetch_batches", "max_skip_fraction", "min_samples_for_skip_check",
               "tile_budget", "tile_budget_quantile")


@dataclasses.dataclass(frozen=True)
class RowCount:
    """Packed rows of one pass; `cache` is the file that holds the count (None: nowhere writable), `counted`
    whether this call counted (False: read from `cache`)."""

    rows: int
    cache: Path | None
    counted: bool


def fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """What the count depends on: each data file's identity and the packing options (`NOT_PACKING` left out)."""
    files = []
    for spec in cfg.datasets:
        files.append({**dataclasses.asdict(spec), "path": str(as_path(spec.path)), **file_identity(spec.path)})
    options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in ("datasets", *NOT_PACKING)}
    options["tokenizer_dir"] = str(as_path(cfg.tokenizer_dir))
    return {"datasets": files, "options": options}


def packed_rows(cfg: DataConfig, workdir: str | Path | None = None) -> RowCount:
    """The packed rows of one pass over `cfg`'s data: from the cache, else counted and cached (module docstring)."""
    key = json.loads(json.dumps(fingerprint(cfg), default=str))  # as it reads back from the file
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"packed_rows-{digest}.json"
    first = cfg.datasets[0].path  # a bucket of data is not written to: only a local data directory holds a count
    places = ([] if is_url(first) else [Path(first).absolute().parent / name]) + (
        [as_path(workdir) / name] if workdir else [])
    for path in places:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if saved.get("fingerprint") == key and isinstance(saved.get("rows"), int):
            return RowCount(saved["rows"], path, counted=False)
    one_pass = dataclasses.replace(cfg, num_epochs=1, prefetch_batches=0)
    rows = sum(1 for _ in row_dataset(one_pass, 0, 1))
    text = json.dumps({"rows": rows, "fingerprint": key}, indent=1) + "\n"
    for path in places:
        try:
            write_text_atomic(path, text)
        except OSError:
            continue
        return RowCount(rows, path, counted=True)
    return RowCount(rows, None, counted=True)


def epoch_steps(epochs: int, count: RowCount, global_batch_size: int) -> tuple[int, str]:
    """(steps, the line that explains them): `epochs` passes of `count.rows` rows in batches, the last one partial."""
    if epochs < 1:
        raise ValueError(f"train.epochs={epochs} must be >= 1")
    steps = max(1, math.ceil(epochs * count.rows / global_batch_size))
    rows = f"{count.rows} packed rows" if epochs == 1 else f"{epochs} x {count.rows} packed rows"
    where = ("not cached: no writable place" if count.cache is None
             else f"{'counted, cached in' if count.counted else 'cached count from'} {count.cache}")
    return steps, f"train.epochs={epochs}: {rows} / batch {global_batch_size} = {steps} steps ({where})"


def grain_packed_rows(*, cfg: ModelConfig, seq_len: int, seed: int, datasets: Any, tokenizer_dir: str,
                      workdir: str | Path | None = None, data_shards: int | None = None, **options: Any) -> RowCount:
    """`packed_rows` for the options of the trainer's data factory `pipeline.grain_data` (same keywords; the rows
    of one pass are counted on one view of the data, whatever its `data_shards`)."""
    del data_shards
    data_cfg = DataConfig(datasets=tuple(datasets), tokenizer_dir=str(tokenizer_dir), seq_len=seq_len,
                          image_size=cfg.vision.image_size, seed=seed, **options)
    return packed_rows(data_cfg, workdir)
