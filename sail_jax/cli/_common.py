"""Options and loading shared by the commands (not a command itself): gin flags (`train`, `compile`), model and
sampling options (`generate`, `chat`, `eval`), video options (`preprocess`, `generate`, `chat`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TextIO

from sail_jax.data.video import DEFAULT_NUM_FRAMES, VideoFrames, load_video
from sail_jax.inference.sampling import SamplingParams


def add_gin_args(p: argparse.ArgumentParser) -> None:
    """gin flags; the t5x spellings (`--gin_file`, `--gin_bindings`, `--gin_search_path`) are accepted too, and so
    are `--gin.NAME=VALUE` flags (`accepts_gin_flags`)."""
    p.add_argument("--gin-file", "--gin_file", dest="gin_file", action="append", default=[], metavar="FILE",
                   help="gin file; repeat to stack (later wins)")
    p.add_argument("--gin-bindings", "--gin_bindings", dest="gin_bindings", action="append", default=[],
                   metavar="BINDINGS", help="gin binding(s), e.g. 'train.steps = 10'; applied after the files")
    p.add_argument("--gin-search-path", "--gin_search_path", dest="gin_search_path", action="append", default=[],
                   metavar="DIR", help="extra directory where gin files and includes are looked up")
    p.set_defaults(accepts_gin_flags=True)


def checkpoint_arg(text: str) -> str:
    """argparse `type` of every `--checkpoint` / converter `--src`: a training workdir stands for its newest
    complete step, and local paths become absolute (`converters.orbax_io.resolve_checkpoint`)."""
    from converters.orbax_io import resolve_checkpoint

    try:
        return resolve_checkpoint(text)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


CHECKPOINT_HELP = "SAIL-VL2 checkpoint directory (upstream layout or ours), or a training workdir (its newest step)"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=checkpoint_arg, help=CHECKPOINT_HELP)
    p.add_argument("--tokenizer", default=None,
                   help="directory with vocab.json/merges.txt/preprocessor_config.json (default: the one the "
                        "checkpoint carries)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="parameter/compute dtype")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard parameters and the KV cache over N devices (mesh axis 'tensor')")
    p.add_argument("--decode-steps", type=int, default=8, metavar="K",
                   help="tokens per device call (streaming granularity)")
    p.add_argument("--anyres", action="store_true",
                   help="native-resolution images (SAIL-ViT-AnyRes: aspect kept, up to 1792x1792, one packed patch "
                        "sequence) even if the checkpoint's config does not say so; AnyRes checkpoints use it anyway")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int | None) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="most tokens generated per answer")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default unless --temperature > 0)")
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """Greedy unless a positive --temperature is given; filters without sampling are an error, not a no-op."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.greedy and args.temperature:
        raise ValueError("--greedy and --temperature are exclusive")
    temperature = 0.0 if args.greedy or args.temperature is None else args.temperature
    if temperature == 0 and (args.top_k or args.top_p < 1):
        raise ValueError("--top-k / --top-p only apply when sampling: give --temperature > 0")
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def tokenizer_dir(checkpoint: str, tokenizer: str | None) -> Path:
    """--tokenizer if given, else the tokenizer the checkpoint carries (our `tokenizer/` item or an upstream
    directory's own files); on a URL, its local copy (`find_tokenizer_dir`)."""
    from converters.orbax_io import checkpoint_tokenizer
    from sail_jax.data.tokenizer import find_tokenizer_dir
    from sail_jax.files import as_path, is_url

    if tokenizer is not None:
        return find_tokenizer_dir(tokenizer) if is_url(tokenizer) else Path(tokenizer)
    if not as_path(checkpoint).is_dir():
        raise FileNotFoundError(f"{checkpoint}: checkpoint directory not found")
    found = checkpoint_tokenizer(checkpoint)
    if found is None:
        raise ValueError(f"{checkpoint}: the checkpoint carries no tokenizer; pass --tokenizer DIR")
    return find_tokenizer_dir(found) if is_url(found) else Path(found)


def status(text: str) -> None:
    """What a command is doing (loading, compiling), on stderr: stdout stays the answer."""
    print(text, file=sys.stderr, flush=True)


def load_engine(args: argparse.Namespace):
    """(Engine, SailProcessor) for the checkpoint and tokenizer options."""
    from converters.load import load_checkpoint
    from sail_jax.config import RuntimeConfig
    from sail_jax.data.processor import SailProcessor
    from sail_jax.inference.engine import Engine
    from sail_jax.models.sail_vl import SailVL
    from sail_jax.sharding import make_mesh

    processor = SailProcessor.from_dir(tokenizer_dir(args.checkpoint, args.tokenizer))
    t0 = time.perf_counter()
    status(f"loading {args.checkpoint} ({args.dtype}) ...")
    cfg, params = load_checkpoint(args.checkpoint, RuntimeConfig(dtype=args.dtype, param_dtype=args.dtype))
    if getattr(args, "anyres", False):
        cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, anyres=True))
    if cfg.vision.anyres:  # the processor produces what the model takes
        processor = dataclasses.replace(processor, anyres=cfg.vision)
    mesh = make_mesh(tensor=args.tensor_parallel) if args.tensor_parallel > 1 else None
    engine = Engine(SailVL(cfg), params, mesh=mesh, decode_steps=args.decode_steps)
    status(f"loaded in {time.perf_counter() - t0:.1f}s")
    return engine, processor



class AnswerPrinter:
    """Streams an answer's text pieces to `out` as `decode_response` would print the whole answer: leading
    whitespace dropped, trailing whitespace held back until more text follows (and dropped at the end)."""

    def __init__(self, out: TextIO):
        self.out, self.started, self.held = out, False, ""

    def __call__(self, piece: str) -> None:
        text = self.held + (piece if self.started else piece.lstrip())
        body = text.rstrip()
        self.held = text[len(body):]
        if body:
            self.started = True
            self.out.write(body)
            self.out.flush()

    def end(self) -> None:
        """Close the answer with a newline."""
        self.held = ""
        self.out.write("\n")
        self.out.flush()



def add_video_args(p: argparse.ArgumentParser) -> None:
    """`--video` with VLMEvalKit's two frame-sampling modes (`preprocess`, `generate`, `chat`)."""
    p.add_argument("--video", default=None,
                   help="video file: its frames (one tile each) go before the prompt as 'Frame-k: <image>' lines, or "
                        "at a <video> marker in the prompt")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--num-frames", type=int, default=DEFAULT_NUM_FRAMES,
                      help="frames sampled uniformly from the video, at int(i * n / (N + 1)) for i = 1..N")
    mode.add_argument("--fps", type=float, default=None,
                      help="instead of --num-frames: frames at this rate (one every video_fps / FPS frames)")


def load_video_arg(args: argparse.Namespace, path: str | None = None) -> VideoFrames:
    """The frames of `path` (default: --video) sampled as --num-frames / --fps say."""
    return load_video(path or args.video, args.num_frames, args.fps)
