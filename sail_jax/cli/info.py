"""`sail-jax info`: devices, package versions and the model presets; or, with --checkpoint, what a checkpoint holds."""

from __future__ import annotations

import argparse
import importlib.metadata as md

from sail_jax.cli._common import checkpoint_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print devices, versions and model presets")
    p.add_argument("--counts", action="store_true", help="also count each preset's parameters (abstract init)")
    p.add_argument("--checkpoint", default=None, type=checkpoint_arg,
                   help="describe this checkpoint (ours or upstream; a training workdir: its newest step): model, "
                        "layout, dtype, tokenizer")
    p.set_defaults(func=run)


def describe_checkpoint(directory: str) -> None:
    """The model and what travels with it, read from the checkpoint alone (configs and metadata, no weights)."""
    from converters.hf_config import from_hf_config
    from converters.orbax_io import checkpoint_tokenizer, is_our_checkpoint, load_model_config
    from sail_jax.files import as_path

    d = as_path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: checkpoint directory not found")
    ours = is_our_checkpoint(d)
    if not ours and not (d / "config.json").is_file():
        raise ValueError(f"{d}: no config.json and no params/ + model_config/ (not a checkpoint)")
    cfg = load_model_config(d) if ours else from_hf_config(d)
    print(f"checkpoint {d}: {'sail-jax (Orbax)' if ours else 'upstream (safetensors)'}")
    if ours:
        print(f"  layout {'scanned' if cfg.runtime.scan_layers else 'unscanned'}, params {cfg.runtime.param_dtype}")
    print("  " + _model_line(cfg))
    tok = checkpoint_tokenizer(d)
    print(f"  tokenizer: {tok if tok is not None else 'none (commands need --tokenizer)'}")


def _model_line(cfg) -> str:
    llm, vit = cfg.llm, cfg.vision
    moe = (f", MoE {llm.moe.num_experts}x top-{llm.moe.num_experts_per_tok} (I={llm.moe.moe_intermediate_size})"
           if llm.moe else "")
    return (f"ViT {vit.num_layers}L/{vit.hidden_size}d/{vit.num_heads}h  "
            f"LLM {llm.num_layers}L/{llm.hidden_size}d/{llm.num_heads}q{llm.num_kv_heads}kv/"
            f"I={llm.intermediate_size}{moe}")


def run(args: argparse.Namespace) -> int:
    if args.checkpoint is not None:
        describe_checkpoint(args.checkpoint)
        return 0
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
        line = f"  {name:12s} {_model_line(cfg)}"
        if args.counts:
            from sail_jax.params import parameter_counts

            counts = parameter_counts(cfg)
            line += "  params: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        print(line)
    return 0
