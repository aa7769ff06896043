"""`sail-jax chat`: multi-turn conversation in the terminal with streamed answers (univl-chat history).

On a terminal, lines are read with prompt_toolkit (line editing, history with the arrow keys); otherwise (a pipe, a
file) plain lines are read, so scripts work. Lines starting with `/` are commands (`COMMANDS`, listed by /help);
Ctrl-C while an answer streams stops that answer and keeps the conversation.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sail_jax.cli._common import (
    AnswerPrinter,
    add_model_args,
    add_sampling_args,
    add_video_args,
    load_engine,
    load_video_arg,
    sampling_from_args,
)
from sail_jax.data.video import VideoFrames

HELP = ("Type a message and press Enter; Ctrl-C stops an answer, Ctrl-D (or /exit) quits, /help lists the commands "
        "(a line starting with // sends one starting with /).")


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


class StopAnswer(Exception):
    """Raised from the token callback to end an answer early (Ctrl-C)."""


class ChatSession:
    """A conversation: every turn re-encodes the whole history (univl-chat). Images wait in `pending` until the next
    user turn, which gets their `<image>` markers; `--image` files are pending at the start of each conversation. A
    video (`--video`, `/video`) instead puts its frames on the first user turn of the conversation. The decoded
    answer (upstream's decode rule) joins the history."""

    def __init__(self, engine, processor, images: Sequence[str], thinking: bool, sampling, system: str | None = None,
                 video: VideoFrames | None = None):
        if images and video is not None:
            raise ValueError("give images or a video, not both")
        self.engine, self.processor, self.start_images, self.video = engine, processor, list(images), video
        self.thinking, self.sampling, self.system = thinking, sampling, system
        self.reset()

    def set_video(self, video: VideoFrames) -> None:
        """A new conversation about `video` (it replaces the images or video of the last one)."""
        self.start_images, self.video = [], video
        self.reset()

    def reset(self) -> None:
        """A new conversation with the start images pending again."""
        self.history: list[dict[str, str]] = []
        self.images: list[str] = []
        self.pending: list[str] = list(self.start_images)

    def attach_image(self, path: str) -> None:
        if self.video is not None:
            raise ValueError("this conversation is about a video; images go in a conversation without one")
        path = str(Path(path).expanduser())
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such image file")
        self.pending.append(path)

    def ask(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer `text`; `on_text` gets the answer's text as it streams. A `StopAnswer` raised by `on_text` ends the
        answer there: the part so far joins the history as the answer."""
        from sail_jax.data.chat import add_image_placeholders
        from sail_jax.inference.engine import Request
        from sail_jax.inference.text import TextStream
        from sail_jax.inference.thinking import with_thinking

        content = with_thinking(text) if self.thinking else text
        images = self.images + self.pending
        if self.video is not None:
            turn = {"role": "user", "content": content}
            enc = self.processor.encode_video(self.history + [turn], self.video, system=self.system,
                                              add_generation_prompt=True)
        else:
            turn = {"role": "user", "content": add_image_placeholders(content, len(self.pending))}
            try:
                enc = self.processor.encode_conversation(self.history + [turn], images, system=self.system,
                                                         add_generation_prompt=True)
            except (ValueError, FileNotFoundError):
                self.pending = []  # a bad image must not fail every later turn
                raise
        stream = TextStream(self.processor.tokenizer)
        ids: list[int] = []

        def on_tokens(_row: int, new: list[int]) -> None:
            ids.extend(new)
            if on_text is not None:
                on_text(stream.push(new))

        request = Request.from_encoding(enc)
        try:
            self.engine.generate([request], self.sampling, on_tokens)
            if on_text is not None:
                on_text(stream.flush())
        except (StopAnswer, KeyboardInterrupt):  # a stopped answer is kept as far as it went
            self._record(turn, images, ids)
            raise
        return self._record(turn, images, ids)

    def _record(self, turn: dict[str, str], images: list[str], ids: list[int]) -> str:
        from sail_jax.inference.text import decode_response

        answer = decode_response(self.processor.tokenizer, ids)
        self.images, self.pending = images, []
        self.history += [turn, {"role": "assistant", "content": answer}]
        return answer


class LineReader:
    """Lines typed by the user; None at end of input. A line that is not valid UTF-8 comes back as `BAD_LINE`."""

    def __init__(self, stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool):
        self.stderr, self.interactive = stderr, interactive
        self.session = None
        if interactive and stdin.isatty() and stdout.isatty():
            from prompt_toolkit import PromptSession

            self.session = PromptSession()  # line editing; in-memory history (arrow keys)
            self.lines = None
        else:  # bytes are decoded here, undecodable ones as surrogates, which `read` catches
            buffer = getattr(stdin, "buffer", None)
            readline = (lambda: buffer.readline().decode("utf-8", "surrogateescape")) if buffer else stdin.readline
            self.lines = iter(readline, "")

    def read(self, prompt: str) -> str | None:
        if self.session is not None:
            while True:
                try:
                    line = self.session.prompt(prompt)
                    break
                except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
                    continue
                except EOFError:
                    return None
        else:
            if self.interactive:
                self.stderr.write(prompt)
                self.stderr.flush()
            line = next(self.lines, None)
            if line is None:
                return None
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            return BAD_LINE
        return line.strip()


BAD_LINE = "\udcff"  # what `LineReader.read` returns for a line that is not valid UTF-8


@dataclass
class Chat:
    """What the commands act on: the session, the input (for confirmations) and where messages go."""

    session: ChatSession
    reader: LineReader
    stdout: TextIO
    stderr: TextIO
    interactive: bool
    load_video: Callable[[str], VideoFrames] | None = None

    def say(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)


@dataclass(frozen=True)
class Command:
    """A chat command: `run(chat, argument)` returns False to end the chat."""

    usage: str
    help: str
    run: Callable[[Chat, str], bool]


def _help(chat: Chat, arg: str) -> bool:
    chat.say("\n".join(f"  {c.usage:16s} {c.help}" for c in COMMANDS.values()))
    return True


def _reset(chat: Chat, arg: str) -> bool:
    if chat.interactive:
        n = len(chat.session.history) // 2
        answer = chat.reader.read(f"Start a new conversation, dropping {n} exchange(s)? [y/N] ")
        if answer is None or answer.lower() not in ("y", "yes"):
            chat.say("kept the conversation")
            return True
    chat.session.reset()
    if chat.interactive:
        chat.say("new conversation")
    return True


def _image(chat: Chat, arg: str) -> bool:
    if not arg:
        raise ValueError("usage: /image PATH")
    chat.session.attach_image(arg)
    chat.say(f"{arg}: attached to your next message")
    return True


def _video(chat: Chat, arg: str) -> bool:
    if not arg:
        raise ValueError("usage: /video PATH")
    if chat.load_video is None:
        raise ValueError("videos are not available in this chat")
    chat.session.set_video(chat.load_video(str(Path(arg).expanduser())))
    chat.say(f"{arg}: a new conversation about this video")
    return True


def _exit(chat: Chat, arg: str) -> bool:
    return False


COMMANDS: dict[str, Command] = {
    "/help": Command("/help", "list the commands", _help),
    "/image": Command("/image PATH", "attach an image to the next message", _image),
    "/video": Command("/video PATH", "start a new conversation about a video", _video),
    "/reset": Command("/reset", "start a new conversation (asks first; --image files or the video again)", _reset),
    "/exit": Command("/exit", "quit (also /quit, Ctrl-D)", _exit),
    "/quit": Command("/quit", "quit", _exit),
}


@contextlib.contextmanager
def stop_on_ctrl_c() -> Iterator[Callable[[], bool]]:
    """While an answer streams: the first Ctrl-C asks it to stop at the next piece of text (the engine's call ends
    cleanly), a second one interrupts at once. Yields whether a stop was asked for."""
    asked: list[bool] = []

    def handler(signum, frame) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(True)

    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield lambda: False
        return
    old = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, old)


def answer(chat: Chat, text: str) -> None:
    """Stream the answer to `text`; Ctrl-C stops it and keeps the conversation, a bad input is reported."""
    printer = AnswerPrinter(chat.stdout)
    if chat.interactive:
        chat.stderr.write("assistant> ")
        chat.stderr.flush()
    with stop_on_ctrl_c() as stop_asked:
        def on_text(piece: str) -> None:
            printer(piece)
            if stop_asked():
                raise StopAnswer

        try:
            chat.session.ask(text, on_text)
        except (StopAnswer, KeyboardInterrupt):
            printer.end()
            chat.say("[answer stopped; the conversation goes on]")
            return
        except (ValueError, FileNotFoundError) as e:
            printer.end()
            chat.say(f"error: {e}")
            return
    printer.end()


def converse(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, interactive: bool,
             load_video: Callable[[str], VideoFrames] | None = None) -> int:
    """Read user lines until end of input or /exit; run commands, stream each answer to stdout (prompts and
    messages go to stderr)."""
    reader = LineReader(stdin, stdout, stderr, interactive)
    chat = Chat(session, reader, stdout, stderr, interactive, load_video)
    if interactive:
        chat.say(HELP)
    while True:
        text = reader.read("user> ")
        if text is None:
            break
        if text == BAD_LINE:
            chat.say("that line is not valid UTF-8: not sent (the conversation goes on)")
            continue
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            name, _, arg = text.partition(" ")
            command = COMMANDS.get(name)
            if command is None:
                chat.say(f"unknown command {name}: not sent to the model (/help lists the commands)")
                continue
            try:
                if not command.run(chat, arg.strip()):
                    break
            except (ValueError, FileNotFoundError) as e:
                chat.say(f"{name}: {e}")
            continue
        answer(chat, text.removeprefix("/"))
    return 0


def run(args: argparse.Namespace) -> int:
    sampling = sampling_from_args(args)
    engine, processor = load_engine(args)
    video = load_video_arg(args) if args.video is not None else None
    session = ChatSession(engine, processor, args.image, args.thinking, sampling, args.system, video)
    if args.prompt is not None:
        printer = AnswerPrinter(sys.stdout)
        session.ask(args.prompt, on_text=printer)
        printer.end()
        return 0
    return converse(session, sys.stdin, sys.stdout, sys.stderr, sys.stdin.isatty(),
                    load_video=lambda path: load_video_arg(args, path))
