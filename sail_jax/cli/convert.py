"""`sail-jax convert`: weight conversion between upstream SAIL-VL2 / PyTorch / transformers and our Orbax layout."""

from __future__ import annotations

import argparse

from sail_jax.cli._common import checkpoint_arg

DIRECTIONS = {
    "hf-to-orbax": "upstream SAIL-VL2 directory (config.json + safetensors) -> our Orbax checkpoint",
    "orbax-to-hf": "our Orbax checkpoint -> upstream SAIL-VL2 directory (loadable by the original code)",
    "torch-to-orbax": "PyTorch .bin/.pt state dict with upstream keys (+ --config) -> our Orbax checkpoint",
    "export-llm": "the language model alone -> transformers Qwen3ForCausalLM / Qwen3MoeForCausalLM directory",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert weights (streaming, one tensor at a time)")
    directions = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    for name, help_text in DIRECTIONS.items():
        d = directions.add_parser(name, help=help_text, description=help_text)
        d.add_argument("--src", required=True, type=checkpoint_arg,
                       help="source directory (or .bin/.pt file for torch-to-orbax; a training workdir: its newest "
                            "step)")
        d.add_argument("--dst", required=True, help="destination directory (written atomically)")
        d.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                       help="store tensors in this dtype (default: as stored in the source)")
        d.add_argument("--overwrite", action="store_true", help="replace an existing destination")
        d.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name.endswith("to-orbax"):
            d.add_argument("--scan-layers", action="store_true", help="stack layers (scanned layout)")
            d.add_argument("--mesh", default=None,
                           help="lay arrays out for a mesh, e.g. data=1,fsdp=4,tensor=2,expert=1")
            d.add_argument("--tokenizer", default=None,
                           help="tokenizer/processor directory the checkpoint carries (default: the source's own "
                                "tokenizer files, beside config.json for torch-to-orbax)")
        else:
            d.add_argument("--tokenizer", default=None,
                           help="copy tokenizer/processor files from this directory (default: the checkpoint's)")
            d.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 200MB)")
        if name == "orbax-to-hf":
            d.add_argument("--remote-code-from", default=None, metavar="ORIGINAL_DIR",
                           help="the original model's directory: copy its *.py, processor config and chat template "
                                "so transformers loads the export with trust_remote_code=True")
        if name == "torch-to-orbax":
            d.add_argument("--config", required=True, help="upstream SAIL-VL2 config.json for the architecture")
    assemble = ("a new SAIL-VL2 directory from a transformers Qwen3 / Qwen3-MoE LLM, an AIMv2 or SAIL-ViT vision "
                "tower and a freshly initialised adapter (stage I's starting point)")
    a = directions.add_parser("assemble", help=assemble, description=assemble)
    a.add_argument("--llm", required=True, help="transformers Qwen3 / Qwen3-MoE directory (config.json, safetensors, "
                   "tokenizer)")
    a.add_argument("--vision", required=True, help="transformers Aimv2VisionModel directory (native or not), SAIL-ViT "
                   "directory, or SAIL-VL2 directory (its ViT)")
    a.add_argument("--dst", required=True, help="destination directory (written atomically)")
    a.add_argument("--adapter-seed", type=int, default=0, help="seed of the adapter's initialisation")
    a.add_argument("--preset", default=None, help="model preset giving the adapter, select_layer, template and tiling "
                   "settings; the parts must then match its architecture (default: ModelConfig's defaults)")
    a.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="store tensors in this dtype (default: as the LLM and ViT store them)")
    a.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (e.g. 5GB, 200MB)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p.set_defaults(func=run)


def parse_mesh(text: str):
    """'data=1,fsdp=2' -> an AbstractMesh over our axes (no devices needed to lay a checkpoint out)."""
    from jax.sharding import AbstractMesh, AxisType

    from sail_jax.sharding import MESH_AXES

    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: expected AXIS=N,... with AXIS in {MESH_AXES} and N >= 1")
        sizes[name.strip()] = int(value)
    return AbstractMesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def run(args: argparse.Namespace) -> int:
    from converters import convert
    from converters.hf_writer import parse_size

    if args.direction == "assemble":
        from converters.assemble import assemble

        _, notes = assemble(args.llm, args.vision, args.dst, adapter_seed=args.adapter_seed, preset=args.preset,
                            dtype=args.dtype, max_shard_size=parse_size(args.max_shard_size),
                            overwrite=args.overwrite)
        for note in notes:
            print(f"note: {note}")
        print(f"wrote {args.dst}")
        return 0

    common = dict(dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    if args.direction.endswith("to-orbax"):
        common.update(scan_layers=args.scan_layers, mesh=parse_mesh(args.mesh) if args.mesh else None,
                      tokenizer=args.tokenizer)
        if args.direction == "hf-to-orbax":
            cfg = convert.hf_to_orbax(args.src, args.dst, **common)
        else:
            cfg = convert.torch_to_orbax(args.src, args.config, args.dst, **common)
        layout = "scanned" if cfg.runtime.scan_layers else "unscanned"
        print(f"wrote {args.dst}: {layout} layout, params {cfg.runtime.param_dtype}{_tokenizer_note(args.dst)}")
        return 0
    if args.direction == "orbax-to-hf":
        common["remote_code_from"] = args.remote_code_from
    fn = convert.orbax_to_hf if args.direction == "orbax-to-hf" else convert.export_llm
    fn(args.src, args.dst, tokenizer=args.tokenizer, max_shard_size=parse_size(args.max_shard_size), **common)
    print(f"wrote {args.dst}{_tokenizer_note(args.dst)}")
    return 0


def _tokenizer_note(dst: str) -> str:
    from converters.orbax_io import checkpoint_tokenizer

    if checkpoint_tokenizer(dst) is None:
        return " (without a tokenizer: the source carries none; pass --tokenizer DIR)"
    return ""
