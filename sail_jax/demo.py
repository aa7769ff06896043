"""The end-to-end demo behind `make demo`: data -> eval -> train -> eval -> plot -> export, all on CPU.

1. `make_demo_data`: deterministic coloured-shape images with captions and VQA (train, held-out, eval questions).
2. Answer accuracy of the untrained model on the held-out questions (the baseline).
3. Training from `configs/demo.gin` (the gin trainer, Grain pipeline with stream + visual packing, Orbax
   checkpoints) — the same code path as a pod run, at toy scale.
4. Answer accuracy of the trained model on the same held-out questions.
5. The loss curve (PNG) and the trained model exported to the upstream Hugging Face layout.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from sail_jax.resources import CONFIGS_DIR, TOKENIZER_DIR

DEMO_GIN = CONFIGS_DIR / "demo.gin"
TOKENIZER = TOKENIZER_DIR


def _evaluate(cfg: Any, params: Any, processor: Any, rows: list[dict], label: str) -> dict[str, Any]:
    from sail_jax.evaluation.qa_jsonl import evaluate_qa
    from sail_jax.inference.engine import Engine
    from sail_jax.models.sail_vl import SailVL

    t0 = time.time()
    result = evaluate_qa(Engine(SailVL(cfg), params), processor, rows)
    per = ", ".join(f"{k} {v['accuracy']:.0%}" for k, v in result["per_category"].items())
    print(f"[demo] {label}: answer accuracy {result['accuracy']:.1%} ({result['correct']}/{result['n']}) "
          f"[{per}] in {time.time() - t0:.0f}s", flush=True)
    return result


def run_demo(out: str | Path = "demo_out", n: int = 3000, seed: int = 0, steps: int | None = None,
             export: bool = True, n_heldout: int = 1500) -> dict[str, Any]:
    """Run every stage into `out/` (data/, run/, loss.png, hf/, demo_results.json); returns the results."""
    import gin
    import jax

    from sail_jax.cli.plot import plot_loss
    from sail_jax.data.demo_data import make_demo_data
    from sail_jax.data.processor import SailProcessor
    from sail_jax.evaluation.qa_jsonl import read_qa_jsonl
    from sail_jax.models.sail_vl import SailVL
    from sail_jax.params import dummy_inputs
    from sail_jax.training import gin_setup

    out = Path(out).resolve()
    data, workdir = out / "data", out / "run"
    t_start = time.time()
    print(f"[demo] writing {n} synthetic samples to {data}", flush=True)
    counts = make_demo_data(data, n=n, seed=seed, n_heldout=n_heldout)
    print(f"[demo] {counts}", flush=True)

    bindings = [f"WORKDIR = '{workdir}'", f"grain_data.datasets = [{{'path': '{data / 'train.jsonl'}'}}]",
                f"grain_data.tokenizer_dir = '{TOKENIZER}'", f"train.seed = {seed}"]
    if steps is not None:
        bindings.append(f"train.steps = {steps}")
    gin_setup.parse([str(DEMO_GIN)], bindings)
    cfg = gin_setup.model_config(**gin.get_bindings("model_config"))
    data_opts = gin.get_bindings("grain_data")
    processor = SailProcessor.from_dir(TOKENIZER, max_num=data_opts.get("max_num", 12),
                                       image_size=cfg.vision.image_size)
    rows = read_qa_jsonl(data / "heldout_eval.jsonl")

    ids, pix = dummy_inputs(cfg)
    untrained = jax.jit(SailVL(cfg).init)(jax.random.PRNGKey(seed), ids, pix)
    before = _evaluate(cfg, untrained, processor, rows, "before training")
    del untrained

    if workdir.exists():  # a demo run always starts from scratch
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "config.gin").write_text(gin.config_str())
    t0 = time.time()
    last = gin_setup.train_using_gin()
    train_seconds = time.time() - t0
    print(f"[demo] trained in {train_seconds:.0f}s: last metrics loss {last.get('loss', float('nan')):.4f}",
          flush=True)

    from converters.load import load_checkpoint

    step_dir = max((workdir / "checkpoints").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    trained_cfg, params = load_checkpoint(step_dir)
    after = _evaluate(trained_cfg, params, processor, rows, "after training")

    plot, _ = plot_loss(workdir, out / "loss.png")
    print(f"[demo] loss curve: {plot}", flush=True)
    hf_dir = None
    if export:
        from converters.convert import orbax_to_hf

        hf_dir = out / "hf"
        orbax_to_hf(step_dir, hf_dir, tokenizer=TOKENIZER, overwrite=True, progress=False)
        print(f"[demo] exported the trained model to the upstream layout: {hf_dir}", flush=True)

    results = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "per_type_after": {k: v["accuracy"] for k, v in after["per_category"].items()},
        "n_eval": after["n"], "train_seconds": round(train_seconds, 1), "train_steps": int(step_dir.name),
        "final_loss": last.get("loss"), "checkpoint": str(step_dir), "hf_export": str(hf_dir) if hf_dir else None,
        "total_seconds": round(time.time() - t_start, 1),
    }
    (out / "demo_results.json").write_text(json.dumps({**results, "predictions_after": after["items"]}, indent=1))
    print(f"[demo] answer accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%} on {after['n']} held-out "
          f"questions; total {results['total_seconds']:.0f}s; results in {out / 'demo_results.json'}", flush=True)
    return results
