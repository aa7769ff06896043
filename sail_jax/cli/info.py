"""`sail-jax info`: devices, package versions and the model presets."""

from __future__ import annotations

import argparse
import importlib.metadata as md


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print devices, versions and model presets")
    p.add_argument("--counts", action="store_true", help="also count each preset's parameters (abstract init)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from sail_jax.config import PRESETS

    print("devices:")
    for d in jax.devices():
        print(f"  {d.platform}:{d.id} {d.device_kind}")
    print(f"process {jax.process_index()} of {jax.process_count()}")
    print("versions:")
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "gin-config",
                "safetensors", "tokenizers", "numpy"):
        try:
            print(f"  {pkg:18s} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"  {pkg:18s} (not installed)")
    print("presets:")
    for name, cfg in PRESETS.items():
        llm, vit = cfg.llm, cfg.vision
        moe = (f", MoE {llm.moe.num_experts}x top-{llm.moe.num_experts_per_tok} (I={llm.moe.moe_intermediate_size})"
               if llm.moe else "")
        line = (f"  {name:12s} ViT {vit.num_layers}L/{vit.hidden_size}d/{vit.num_heads}h  "
                f"LLM {llm.num_layers}L/{llm.hidden_size}d/{llm.num_heads}q{llm.num_kv_heads}kv/"
                f"I={llm.intermediate_size}{moe}")
        if args.counts:
            from sail_jax.params import parameter_counts

            counts = parameter_counts(cfg)
            line += "  params: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        print(line)
    return 0
