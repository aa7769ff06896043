"""The loss curve of a training workdir (its `metrics.jsonl`) as a PNG, for `sail-jax plot` and the demo."""

from __future__ import annotations

from pathlib import Path

from sail_jax.jsonl import iter_jsonl


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records (the last record wins when a step appears twice)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics log (has this workdir been trained?)")
    by_step = {rec["step"]: rec for _, rec in iter_jsonl(path)}
    return [by_step[s] for s in sorted(by_step)]


def plot_loss(workdir: Path, out: Path | None = None) -> tuple[Path, int]:
    """Loss (and learning-rate) curve of a workdir as a PNG; returns (path, number of steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir / "metrics.jsonl")
    num = lambda v: v if isinstance(v, float | int) else float(v)
    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax_loss.plot(steps, [num(r["loss"]) for r in records], label="loss")
    if any(num(r.get("aux_loss", 0.0)) for r in records):
        ax_loss.plot(steps, [num(r["ce_loss"]) for r in records], label="cross-entropy", alpha=0.7)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"training loss: {workdir.name}")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(steps, [num(r["lr"]) for r in records], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    out = out or workdir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, len(records)
