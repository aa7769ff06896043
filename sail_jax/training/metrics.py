"""Throughput accounting (model FLOPs, MFU) and the metric sinks: tqdm, TensorBoard, `metrics.jsonl`.

Model FLOPs of one step, counted from the config and the batch (multiply-add = 2 FLOPs):
- LLM, per non-padding token: 2 * (per-layer matmul weights: attention D*(Hq+2Hkv)*hd + Hq*hd*D, plus
  3*D*I dense or D*E + k*3*D*I_moe MoE) * L, plus causal attention 2 * 2*L*Hq*hd * T/2 (T = row length);
- lm_head: 2*D*V per target position;
- ViT, per real tile of P patches: 2*P*(p*p*C*Dv + L_v*(4*Dv^2 + 3*Dv*I_v)) + 2*2*L_v*Dv*P^2;
- adapter, per real tile: 2*(P/s^2)*(s^2*Dv*D + D*D).
Training multiplies a part by 3 (forward + activation and weight gradients) when it is trainable, by 2 when it
is frozen but a trainable part sits before it (activation gradients only), by 1 otherwise (forward only).
MFU = FLOPs / step time / (devices * peak FLOP/s per device); the peak comes from `PEAK_FLOPS` (dense bf16) by
device kind or an explicit override. On CPU it is only indicative.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from sail_jax.config import ModelConfig
from sail_jax.files import as_path, open_append, write_text_atomic

# Dense bf16 peak FLOP/s per device, matched as substrings of `device.device_kind.lower()` in order.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12),
    ("v4", 275e12), ("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("b200", 2250e12), ("l4", 121e12),
)
CPU_NOMINAL_FLOPS = 1e11  # per device; an order of magnitude for one modern core with AVX, not a measurement
PARTS = ("vision", "adapter", "llm")


def peak_flops_per_device(override: float | None = None, device_kind: str | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for `device_kind` (default: this process's devices)."""
    if override:
        return float(override), "override"
    kind = (device_kind or jax.devices()[0].device_kind).lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value, kind
    return CPU_NOMINAL_FLOPS, f"{kind} (nominal, indicative only)"


def part_multipliers(trainable: Sequence[str]) -> dict[str, int]:
    out, upstream = {}, False
    for part in PARTS:
        out[part] = 3 if part in trainable else (2 if upstream else 1)
        upstream = upstream or part in trainable
    return out


def step_flops(cfg: ModelConfig, *, tokens: float, targets: float, tiles: float, seq_len: int,
               trainable: Sequence[str]) -> float:
    """Model FLOPs of one training step (formula in the module docstring)."""
    llm, vit = cfg.llm, cfg.vision
    attn_w = llm.hidden_size * (llm.num_heads + 2 * llm.num_kv_heads) * llm.head_dim
    attn_w += llm.num_heads * llm.head_dim * llm.hidden_size
    layer_w = 0
    for i in range(llm.num_layers):
        if llm.is_moe_layer(i):
            m = llm.moe
            mlp = llm.hidden_size * (m.num_experts + m.num_experts_per_tok * 3 * m.moe_intermediate_size)
        else:
            mlp = 3 * llm.hidden_size * llm.intermediate_size
        layer_w += attn_w + mlp
    llm_fwd = tokens * (2 * layer_w + 2 * 2 * llm.num_layers * llm.num_heads * llm.head_dim * seq_len / 2)
    llm_fwd += targets * 2 * llm.hidden_size * llm.vocab_size
    p, dv = vit.num_patches, vit.hidden_size
    vit_w = vit.patch_size**2 * vit.num_channels * dv + vit.num_layers * (4 * dv * dv + 3 * dv * vit.intermediate_size)
    vit_fwd = tiles * (2 * p * vit_w + 2 * 2 * vit.num_layers * dv * p * p)
    s2 = round(1 / cfg.adapter.downsample_ratio) ** 2
    adapter_fwd = tiles * 2 * cfg.tokens_per_tile * (s2 * dv * llm.hidden_size + llm.hidden_size**2)
    mult = part_multipliers(trainable)
    return mult["vision"] * vit_fwd + mult["adapter"] * adapter_fwd + mult["llm"] * llm_fwd


class MetricsWriter:
    """Process 0 writes metrics.jsonl (one JSON object per step), TensorBoard events and a tqdm bar."""

    def __init__(self, workdir: str | Path, total_steps: int, start_step: int, enabled: bool, log_every: int = 100):
        self.enabled = enabled
        self.log_every = log_every
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm import tqdm

        workdir = as_path(workdir)
        self.jsonl_path = workdir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.jsonl = open_append(self.jsonl_path)
        self.tb = SummaryWriter(os.fspath(workdir / "tensorboard"))  # tensorboardX writes gs:// URLs itself
        # The bar only draws on a terminal; logs get a plain line every `log_every` steps instead (`log_line`).
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, disable=None)
        self.total_steps = total_steps
        self._t0 = self._last_time = time.monotonic()
        self._last_step = start_step

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps the restored checkpoint does not contain (they will be redone)."""
        if not self.jsonl_path.exists():
            return
        lines = self.jsonl_path.read_bytes().decode(errors="replace").splitlines()
        kept, torn = [], 0
        for ln in lines:
            try:
                record_step = json.loads(ln)["step"] if ln.strip() else None
            except (ValueError, KeyError, TypeError):  # a line torn by a kill: logs never block a resume
                torn += 1
                continue
            if record_step is not None and record_step <= step:
                kept.append(ln)
        if torn:
            print(f"warning: {self.jsonl_path}: dropped {torn} unparsable line(s) (torn by an interrupted write)",
                  file=sys.stderr, flush=True)
        if len(kept) != len(lines):
            write_text_atomic(self.jsonl_path, "".join(ln + "\n" for ln in kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """`step` counts completed steps (1 = after the first update)."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _finite_or_str(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            if math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        if step % self.log_every == 0:
            self.flush()
        if self.bar.disable and (step % self.log_every == 0 or step == 1):
            print(self.log_line(step, metrics), flush=True)

    def log_line(self, step: int, metrics: dict[str, float]) -> str:
        """What the tqdm bar shows on a terminal, for logs: UTC time, elapsed, steps/s since the last line and the
        ETA at that rate, then the step's metrics."""
        now = time.monotonic()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = _duration((self.total_steps - step) / rate) if rate > 0 else "?"
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = (f"{stamp}  step {step}/{self.total_steps}  elapsed {_duration(now - self._t0)}  "
                f"{rate:.3g} steps/s  eta {eta}  loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  "
                f"tokens/s {metrics['tokens_per_s']:.0f}  mfu {metrics['mfu']:.2%}")
        if "eval_loss" in metrics:
            line += f"  eval_loss {metrics['eval_loss']:.4f}"
        return line

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def flush(self) -> None:
        if self.enabled:
            self.jsonl.flush()
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            self.bar.close()


def _duration(seconds: float) -> str:
    """H:MM:SS, as tqdm shows times."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _finite_or_str(v: float) -> float | str:
    """JSON has no NaN/inf; keep them readable as strings."""
    return v if math.isfinite(v) else str(v)
