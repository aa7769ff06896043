"""`sail-jax chat`: multi-turn conversation in the terminal with streamed answers (univl-chat history)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from sail_jax.cli._common import (
    add_model_args,
    add_sampling_args,
    add_video_args,
    load_engine,
    load_video_arg,
    sampling_from_args,
)
from sail_jax.data.video import VideoFrames

HELP = ("Type a message and press Enter. /reset starts a new conversation (same images or video), /video PATH starts "
        "one about a video, /exit or Ctrl-D quits.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat with streamed output")
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=1024)
    p.add_argument("--image", action="append", default=[], help="image file, repeatable (attached to the first turn)")
    p.add_argument("--thinking", action="store_true", help="append the thinking-mode instruction to every user turn")
    p.add_argument("--system", default=None, help="system prompt (default: SAIL-VL2's own; '' for none)")
    add_video_args(p)
    p.add_argument("--prompt", help="ask this one question, print the answer and exit")
    p.set_defaults(func=run)


class ChatSession:
    """A conversation: every turn re-encodes the whole history (univl-chat), with the images or the video's frames on
    the first user turn, and appends the decoded answer (upstream's decode rule) to the history."""

    def __init__(self, engine, processor, images: Sequence[str], thinking: bool, sampling, system: str | None = None,
                 video: VideoFrames | None = None):
        if images and video is not None:
            raise ValueError("give images or a video, not both")
        self.engine, self.processor, self.images, self.video = engine, processor, list(images), video
        self.thinking, self.sampling, self.system = thinking, sampling, system
        self.history: list[dict[str, str]] = []

    def set_video(self, video: VideoFrames) -> None:
        """A new conversation about `video` (it replaces the images or video of the last one)."""
        self.images, self.video, self.history = [], video, []

    def reset(self) -> None:
        self.history = []

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        from sail_jax.inference.engine import Request
        from sail_jax.inference.text import TextStream, decode_response
        from sail_jax.inference.thinking import with_thinking

        turn = {"role": "user", "content": with_thinking(text) if self.thinking else text}
        if self.video is not None:
            enc = self.processor.encode_video(self.history + [turn], self.video, system=self.system,
                                              add_generation_prompt=True)
        else:
            enc = self.processor.encode_conversation(self.history + [turn], self.images, system=self.system,
                                                     add_generation_prompt=True)
        stream = TextStream(self.processor.tokenizer)
        callback = None if on_text is None else (lambda _row, ids: on_text(stream.push(ids)))
        request = Request(enc["input_ids"], enc["pixel_values"] if len(enc["pixel_values"]) else None)
        [out] = self.engine.generate([request], self.sampling, callback)
        if on_text is not None:
            on_text(stream.flush())
        answer = decode_response(self.processor.tokenizer, out.token_ids)
        self.history += [turn, {"role": "assistant", "content": answer}]
        return answer


def converse(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool,
             load_video: Callable[[str], VideoFrames] | None = None) -> int:
    """Read user lines until EOF or /exit; stream each answer to stdout (prompts go to stderr when interactive).
    `/video PATH` loads a video with `load_video` (an unusable file is reported on stderr and the chat goes on)."""

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    if interactive:
        print(HELP, file=stderr)
    while True:
        if interactive:
            stderr.write("user> ")
            stderr.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            continue
        if text.startswith("/video ") and load_video is not None:
            path = text.removeprefix("/video ").strip()
            try:
                session.set_video(load_video(path))
            except (FileNotFoundError, ValueError) as e:
                print(f"error: {e}", file=stderr)
            continue
        if interactive:
            stderr.write("assistant> ")
        session.ask(text, on_text=write)
        write("\n")
    return 0


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    engine, processor = load_engine(args)
    video = load_video_arg(args) if args.video is not None else None
    session = ChatSession(engine, processor, args.image, args.thinking, sampling, args.system, video)
    if args.prompt is not None:
        session.ask(args.prompt, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        return 0
    return converse(session, sys.stdin, sys.stdout, sys.stderr, sys.stdin.isatty(),
                    load_video=lambda path: load_video_arg(args, path))
