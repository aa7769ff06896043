"""Training throughput: the sail-jax jitted train step vs PyTorch train steps of the same model and batch.

PyTorch model: transformers `Aimv2VisionModel` (hidden_act silu, no head, `is_native=False`) as the ViT, the
adapter as torch ops (pixel shuffle -> LayerNorm -> Linear -> GELU -> Linear), image features scattered into the
`<IMG_CONTEXT>` positions of `Qwen3ForCausalLM`'s input embeddings, then AdamW with gradient clipping. Two PyTorch
losses: `hf` is the reference step as transformers users write it (`labels=` with -100 off the targets: logits at
every position, transformers' own cross-entropy); `torch` is a hand-tuned step that applies lm_head only to the
target positions, as our static budget does (like for like). Ours: the trainer's jitted step (AdamW + clipping +
decay mask + non-finite guard), state donated. All float32, all parts trained, each side with its own random weights
(throughput does not depend on the values). Each side is timed with stock glibc malloc and with the malloc tunables
`sail-jax` applies to itself on CPU (sail_jax/host_malloc.py).

    python benchmarks/train_step.py [--vocab 151936] [--batch 4] [--seq 256] [--steps 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from sail_jax import host_malloc  # noqa: E402
from sail_jax.config import AdapterConfig, LLMConfig, ModelConfig, VisionConfig  # noqa: E402
from sail_jax.data.batch import to_global  # noqa: E402
from sail_jax.sharding import use_mesh  # noqa: E402
from sail_jax.training.optim import OptimizerConfig  # noqa: E402
from sail_jax.training.program import build_program  # noqa: E402
from sail_jax.training.step import TrainState  # noqa: E402

TRAINABLE = ("vision", "adapter", "llm")
SIDES = {"hf": "pytorch, transformers loss", "torch": "pytorch, lm_head at targets", "jax": "sail-jax"}


def model_config(vocab: int) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, image_size=112),
        adapter=AdapterConfig(),
        llm=LLMConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                      num_kv_heads=2, head_dim=64),
        img_context_token_id=vocab - 1,
    )


def make_batch(cfg: ModelConfig, rows: int, seq: int, tiles: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One sample per row: `tiles` images, then text; the second half of the text is the answer (targets)."""
    rng = np.random.default_rng(seed)
    n_img = tiles * cfg.tokens_per_tile
    ids = rng.integers(1, cfg.llm.vocab_size - 1, (rows, seq)).astype(np.int32)
    ids[:, :n_img] = cfg.img_context_token_id
    loss_mask = np.zeros((rows, seq), np.int32)
    loss_mask[:, n_img + (seq - n_img) // 2:] = 1
    v = cfg.vision
    return {
        "input_ids": ids, "segment_ids": np.ones((rows, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(), "loss_mask": loss_mask,
        "pixel_values": rng.standard_normal((rows, tiles, 3, v.image_size, v.image_size), dtype=np.float32),
        "tile_mask": np.ones((rows, tiles), bool),
    }


class TorchVLM(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v, llm = cfg.vision, cfg.llm
        self.vit = transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, hidden_act="silu",
            use_head=False, is_native=False, rms_norm_eps=v.rms_norm_eps))
        d4 = 4 * v.hidden_size
        self.adapter = torch.nn.Sequential(torch.nn.LayerNorm(d4, eps=1e-5), torch.nn.Linear(d4, llm.hidden_size),
                                           torch.nn.GELU(), torch.nn.Linear(llm.hidden_size, llm.hidden_size))
        self.llm = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
            num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
            head_dim=llm.head_dim, tie_word_embeddings=False, attn_implementation="sdpa"))
        self.grid, self.ctx = v.grid_size, cfg.img_context_token_id

    def forward(self, ids, pixels, targets, weights, labels=None):
        """Mean cross-entropy over the targets: from transformers' `labels=` loss when `labels` is given (logits
        at every position), else lm_head applied to the target positions only."""
        x = self.vit(pixel_values=pixels.flatten(0, 1)).last_hidden_state  # [T, g*g, C]
        t, g, c = x.shape[0], self.grid, x.shape[-1]
        x = x.reshape(t, g // 2, 2, g // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(t, (g // 2) ** 2, 4 * c)
        feats = self.adapter(x).reshape(-1, self.llm.config.hidden_size)
        emb = self.llm.model.embed_tokens(ids)
        emb = emb.masked_scatter((ids == self.ctx)[..., None], feats)
        if labels is not None:
            return self.llm(inputs_embeds=emb, labels=labels).loss
        hidden = self.llm.model(inputs_embeds=emb).last_hidden_state
        keep = weights > 0
        logits = self.llm.lm_head(hidden[keep])
        return torch.nn.functional.cross_entropy(logits, targets[keep])


def _best_ms(fn, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def lm_head_matmuls_ms(side: str, n: int, d: int, v: int) -> float:
    """The three lm_head matmuls of a step (logits, d hidden, d kernel) for n targets, on random data: the part
    of the step both sides must spend, in each side's own layout ([V, D] weight in PyTorch, [D, V] kernel here)."""
    rng = np.random.default_rng(0)
    h, g = rng.standard_normal((n, d), np.float32), rng.standard_normal((n, v), np.float32)
    if side != "jax":
        th, tg, tw = torch.from_numpy(h), torch.from_numpy(g), torch.from_numpy(rng.standard_normal((v, d), np.float32))
        return _best_ms(lambda: (th @ tw.T, tg @ tw, tg.T @ th))
    jh, jg, jw = jax.numpy.asarray(h), jax.numpy.asarray(g), jax.numpy.asarray(rng.standard_normal((d, v), np.float32))
    f = jax.jit(lambda h, g, w: (h @ w, jax.lax.dot_general(g, w, (((1,), (1,)), ((), ()))),
                                 jax.lax.dot_general(h, g, (((0,), (0,)), ((), ())))))
    return _best_ms(lambda: jax.block_until_ready(f(jh, jg, jw)))


def _timed(step, steps: int) -> tuple[list[float], float]:
    """Seconds of each of `steps` calls after a first (warm-up / compile) call, and page faults per call."""
    step()
    faults0, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / steps


def time_torch(cfg, batch, steps: int, hf_loss: bool) -> tuple[list[float], float]:
    torch.manual_seed(0)
    model = TorchVLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    ids = torch.from_numpy(batch["input_ids"]).long()
    pixels = torch.from_numpy(batch["pixel_values"])
    targets = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    weights = torch.cat([torch.from_numpy(batch["loss_mask"])[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    # transformers shifts labels itself: label i is token i, -100 where the loss mask is off
    labels = torch.where(torch.from_numpy(batch["loss_mask"]) > 0, ids, -100) if hf_loss else None

    def step() -> None:
        loss = model(ids, pixels, targets, weights, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())

    return _timed(step, steps)


def time_jax(cfg, batch, steps: int) -> tuple[list[float], float]:
    rows, seq = batch["input_ids"].shape
    per_row = int(batch["loss_mask"][:, 1:].sum(1).max())  # the static lm_head budget = the targets per row
    program = build_program(model=cfg, batch_size=rows, seq_len=seq, steps=1000, trainable=TRAINABLE,
                            optimizer=OptimizerConfig(learning_rate=1e-4), target_fraction=(per_row - 0.5) / seq,
                            devices=jax.devices()[:1])
    assert program.targets_per_row == per_row
    mesh = program.mesh
    with use_mesh(mesh):
        params = program.init_params(jax.random.PRNGKey(0))
        state = [TrainState(params, program.init_opt_state(params))]
        gbatch = to_global(batch, mesh, rows)

        def step() -> None:
            state[0], m = program.step(state[0], gbatch, np.int32(1), np.float32(1.0))
            float(m["loss"])

        return _timed(step, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--tiles", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    cfg = model_config(args.vocab)
    batch = make_batch(cfg, args.batch, args.seq, args.tiles)
    if args.side:  # one measurement in a process of its own
        torch.set_num_threads(os.cpu_count() or 1)
        if args.side == "jax":
            times, faults = time_jax(cfg, batch, args.steps)
        else:
            times, faults = time_torch(cfg, batch, args.steps, hf_loss=args.side == "hf")
        # `hf` applies lm_head at every position, the others at the targets only
        n = batch["input_ids"].size if args.side == "hf" else int(batch["loss_mask"][:, 1:].sum())
        matmuls = lm_head_matmuls_ms(args.side, n, cfg.llm.hidden_size, cfg.llm.vocab_size)
        print(json.dumps({"steps": times, "faults_per_step": faults, "lm_head_matmuls_ms": matmuls}))
        return
    tokens = args.batch * args.seq
    print(f"device {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; ViT {cfg.vision.num_layers}x"
          f"{cfg.vision.hidden_size} on {args.batch * args.tiles} tiles of {cfg.vision.image_size}px, Qwen3 "
          f"{cfg.llm.num_layers}x{cfg.llm.hidden_size}, vocab {cfg.llm.vocab_size}; batch {args.batch}x{args.seq} "
          f"tokens, {int(batch['loss_mask'][:, 1:].sum())} targets; float32, all parts trained")
    # Each run is a process of its own (two runtimes' thread pools in one process slow each other down), in
    # alternation, so all see the same machine load on average. Each side runs with stock glibc malloc and with
    # the tunables `sail-jax` sets for itself on CPU (sail_jax/host_malloc.py); they help PyTorch just as much.
    envs = {"stock malloc": {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}}
    envs["tuned malloc"] = host_malloc.tuned_env(envs["stock malloc"])
    runs = [(side, env) for env in envs for side in SIDES]
    times: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
    matmuls: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
    faults: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
    for _ in range(args.rounds):
        for side, env in runs:
            cmd = [sys.executable, __file__, f"--side={side}", f"--vocab={args.vocab}", f"--batch={args.batch}",
                   f"--seq={args.seq}", f"--tiles={args.tiles}", f"--steps={args.steps}"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=envs[env]).stdout
            result = json.loads(out.strip().splitlines()[-1])
            times[side, env] += result["steps"]
            matmuls[side, env].append(result["lm_head_matmuls_ms"])
            faults[side, env].append(result["faults_per_step"])
    ms = {r: statistics.median(v) * 1e3 for r, v in times.items()}
    page = os.sysconf("SC_PAGE_SIZE")
    for side, env in runs:
        mm = min(matmuls[side, env])
        print(f"{SIDES[side]:27s} {env}: {ms[side, env]:7.0f} ms/step "
              f"{tokens / ms[side, env] * 1e3:7.0f} tokens/s  (3 lm_head matmuls alone {mm:.0f} ms, "
              f"rest {ms[side, env] - mm:.0f} ms; {statistics.median(faults[side, env]) * page / 1e6:.0f} MB "
              f"page-faulted per step)")
    for env in envs:
        print(f"ratio vs the transformers reference step (labels=), both {env}: "
              f"{ms['hf', env] / ms['jax', env]:.2f}x")
    print(f"ratio sail-jax as `sail-jax train` runs it (tuned malloc) / transformers reference step, stock malloc: "
          f"{ms['hf', 'stock malloc'] / ms['jax', 'tuned malloc']:.2f}x")
    for env in envs:
        print(f"ratio vs hand-tuned PyTorch (lm_head at targets only, like for like), both {env}: "
              f"{ms['torch', env] / ms['jax', env]:.2f}x")


if __name__ == "__main__":
    main()
