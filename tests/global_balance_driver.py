"""One process of tests/test_global_balance.py's 2-process run: `coordinator process_id out options_json model`.

Builds the first 3 global batches of the Grain factory with data shards balanced globally (saved as
out/p{process_id}-{step}.npz), then trains 1 step on the same factory (out/train). `model`: "tiles" (the tiny
preset) or "anyres" (tiny-anyres), each with one layer per tower as the test's configs."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import numpy as np


def main(address: str, process_id: int, out: Path, options: dict, model: str) -> None:
    jax.distributed.initialize(address, 2, process_id)
    from sail_jax.config import get_preset
    from sail_jax.data.pipeline import grain_data
    from sail_jax.training.trainer import train

    tiny = get_preset("tiny" if model == "tiles" else "tiny-anyres")
    vision = dict(image_size=56) if model == "tiles" else dict(max_anyres_patches=256)
    cfg = dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, num_layers=1),
                              vision=dataclasses.replace(tiny.vision, num_layers=1, **vision))
    it = grain_data(cfg=cfg, global_batch_size=16, seq_len=96, process_index=process_id, process_count=2, seed=0,
                    **options)
    out.mkdir(parents=True, exist_ok=True)
    for step in range(3):
        np.savez(out / f"p{process_id}-{step}.npz", **next(it))
    train(model=cfg, data=functools.partial(grain_data, **options), workdir=str(out / "train"), steps=1,
          batch_size=16, seq_len=96, trainable=("adapter",), mesh={"data": 2, "fsdp": 4}, log_every=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5])
