"""`sail-jax generate`: one prompt (text + images or a video) or a JSONL batch through the KV-cache engine.

One prompt: the answer streams to stdout as it is generated; what the command is doing (loading, compiling, speed)
goes to stderr, so stdout is the answer alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sail_jax.cli._common import (
    AnswerPrinter,
    add_model_args,
    add_sampling_args,
    add_video_args,
    load_engine,
    load_video_arg,
    sampling_from_args,
    status,
)
from sail_jax.files import write_text_atomic
from sail_jax.jsonl import iter_jsonl


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate answers with the KV-cache engine (one prompt or a JSONL batch)")
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=1024)
    p.add_argument("--image", action="append", default=[], help="image file, repeatable (attached in order)")
    add_video_args(p)
    p.add_argument("--prompt", help="the user text (one-prompt mode)")
    p.add_argument("--thinking", action="store_true", help="append the thinking-mode instruction to the prompt")
    p.add_argument("--print-ids", action="store_true", help="also print the new token ids as a JSON list")
    p.add_argument("--batch", metavar="REQUESTS.jsonl",
                   help='batch mode: lines {"id", "prompt", "images": [paths] or "video": path}, paths relative to '
                        'the file')
    p.add_argument("--out", metavar="ANSWERS.jsonl",
                   help='batch mode output: lines {"id", "text", "token_ids"}, or {"id", "error"} for a failed request')
    p.add_argument("--allow-absolute-image-paths", action="store_true",
                   help="batch mode: let requests name images outside the requests file's directory")
    p.add_argument("--batch-size", type=int, default=8, help="requests generated together in batch mode")
    p.set_defaults(func=run)


def read_requests(path: Path, allow_absolute: bool = False) -> list[dict]:
    """Validated request lines; errors name the file, line and key. Image paths stay under the file's directory
    unless `allow_absolute`."""
    from sail_jax.data.sources import resolve_image_path

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such requests file")
    requests = []
    for n, r in iter_jsonl(path):
        if not isinstance(r, dict):
            raise ValueError(f"{path} line {n}: expected a JSON object")
        for key in ("id", "prompt"):
            if key not in r:
                raise ValueError(f"{path} line {n}: missing key {key!r}")
        images = r.get("images") or []
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise ValueError(f"{path} line {n}: 'images' must be a list of file paths")
        video = r.get("video")
        if video is not None and (not isinstance(video, str) or images):
            raise ValueError(f"{path} line {n}: 'video' must be one file path, without 'images'")
        try:
            resolved = [str(resolve_image_path(path.parent, i, allow_absolute)) for i in images]
            video = None if video is None else str(resolve_image_path(path.parent, video, allow_absolute))
        except ValueError as e:
            raise ValueError(f"{path} line {n}: {e}") from None
        requests.append({"id": r["id"], "prompt": str(r["prompt"]), "line": n, "images": resolved, "video": video})
    return requests


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sail_jax.data.chat import with_thinking
    from sail_jax.inference.engine import Request
    from sail_jax.inference.text import decode_response

    if (args.prompt is None) == (args.batch is None):
        raise ValueError("give exactly one of --prompt and --batch")
    if args.batch and not args.out:
        raise ValueError("--batch needs --out")
    if args.batch and (args.image or args.video):
        raise ValueError("--image and --video are for --prompt; batch requests list their own")
    if args.image and args.video:
        raise ValueError("give --image or --video, not both")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    sampling = sampling_from_args(args)
    todo = read_requests(Path(args.batch), args.allow_absolute_image_paths) if args.batch else None
    engine, processor = load_engine(args)

    def encode(prompt: str, images: list[str], video: str | None = None) -> Request:
        if video is not None:
            text = with_thinking(prompt) if args.thinking else prompt
            enc = processor.encode_video([{"role": "user", "content": text}], load_video_arg(args, video),
                                         add_generation_prompt=True)
            return Request.from_encoding(enc)
        return Request.from_encoding(processor(images=images, prompt=prompt, thinking=args.thinking))

    if todo is None:
        return generate_one(engine, processor, encode(args.prompt, args.image, args.video), sampling,
                            args.print_ids)

    from sail_jax.evaluation.runner import describe, generate_each

    # One bad request does not end the batch: it gets {"id", "error"} in place of an answer, the others go on, and
    # the exit status is 1 (the requests file itself is checked before the model loads).
    status(f"generating {len(todo)} answers (the first batch compiles) ...")
    lines, failed = [], 0
    with tqdm(total=len(todo), desc="generate", unit="req", file=sys.stderr) as bar:
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start:start + args.batch_size]
            ready, requests, answers = [], [], {}
            for r in chunk:
                try:
                    requests.append(encode(r["prompt"], r["images"], r["video"]))
                    ready.append(r)
                except Exception as e:  # this request's failure only
                    answers[r["line"]] = {"id": r["id"], "error": describe(e)}
            for r, out in zip(ready, generate_each(engine, requests, sampling) if requests else []):
                if isinstance(out, Exception):
                    answers[r["line"]] = {"id": r["id"], "error": describe(out)}
                else:
                    text = decode_response(processor.tokenizer, out.token_ids)
                    answers[r["line"]] = {"id": r["id"], "text": text, "token_ids": out.token_ids}
            for r in chunk:
                if "error" in answers[r["line"]]:
                    failed += 1
                    print(f"sail-jax generate: {args.batch} line {r['line']}: {answers[r['line']]['error']}",
                          file=sys.stderr)
                lines.append(json.dumps(answers[r["line"]], ensure_ascii=False))
            bar.update(len(chunk))
    write_text_atomic(args.out, "".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} answers to {args.out}", file=sys.stderr)
    if failed:
        print(f"sail-jax generate: {failed} of {len(lines)} requests failed (see 'error' in {args.out})",
              file=sys.stderr)
        return 1
    return 0


def generate_one(engine, processor, request, sampling, print_ids: bool) -> int:
    """Stream one answer to stdout (the text `decode_response` gives), timing on stderr."""
    import time

    from sail_jax.inference.text import TextStream

    stream, printer = TextStream(processor.tokenizer), AnswerPrinter(sys.stdout)
    t0 = time.perf_counter()
    first: list[float] = []

    def on_tokens(_row: int, ids: list[int]) -> None:
        if not first:
            first.append(time.perf_counter() - t0)
        printer(stream.push(ids))

    status(f"prompt of {len(request.input_ids)} tokens: compiling (first use) and generating ...")
    [out] = engine.generate([request], sampling, on_tokens)
    printer(stream.flush())
    printer.end()
    if print_ids:
        print(json.dumps(out.token_ids))
    rest = time.perf_counter() - t0 - first[0]
    n = len(out.token_ids)
    speed = f", then {(n - 1) / rest:.1f} tokens/s" if n > 1 and rest > 0 else ""
    status(f"{n} tokens ({out.finish_reason}); first after {first[0]:.1f}s (prefill, compile included){speed}")
    return 0
