"""Checkpoints that run on their own (tokenizer carried), `generate` streaming, training logs off a terminal, and
`sail-jax chat` driven through a pseudo-terminal as a person would (line editing, Ctrl-C, commands)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
import warnings

import pytest

from converters.convert import hf_to_orbax
from converters.orbax_io import checkpoint_tokenizer
from sail_jax.cli import main
from sail_jax.data.processor import SailProcessor
from sail_jax.inference.text import decode_response
from sail_jax.training import gin_setup
from tests.conftest import DATA
from tests.trainer_utils import REPO, TINY_GIN, event_tags, metrics

CKPT = DATA / "sailvl2-tiny" / "checkpoint"


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """The tiny fixture converted to our layout: it carries the fixture's tokenizer."""
    d = tmp_path_factory.mktemp("ours") / "ckpt"
    hf_to_orbax(CKPT, d, progress=False)
    return d


def test_converted_checkpoint_runs_without_tokenizer_option(ours, tmp_path, capsys):
    assert sorted(p.name for p in (ours / "tokenizer").iterdir()) == sorted(
        n for n in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja", "preprocessor_config.json"))
    assert main(["generate", "--checkpoint", str(ours), "--prompt", "Hello there", "--max-new-tokens", "12",
                 "--print-ids"]) == 0
    out, err = capsys.readouterr()
    text, ids = out.rstrip("\n").split("\n")
    tok = SailProcessor.from_dir(CKPT).tokenizer
    assert text == decode_response(tok, json.loads(ids))  # the streamed pieces add up to the decoded answer
    assert "loading" in err and "compiling" in err and re.search(r"12 tokens \(length\); first after", err)

    assert main(["info", "--checkpoint", str(ours)]) == 0
    assert f"tokenizer: {ours / 'tokenizer'}" in capsys.readouterr().out
    back = tmp_path / "hf"
    assert main(["convert", "orbax-to-hf", "--src", str(ours), "--dst", str(back), "--no-progress"]) == 0
    assert (back / "vocab.json").read_bytes() == (CKPT / "vocab.json").read_bytes()
    # a checkpoint without a tokenizer says so, in one line
    (ours / "tokenizer").rename(tmp_path / "moved")
    try:
        assert main(["generate", "--checkpoint", str(ours), "--prompt", "hi"]) == 2
        assert "the checkpoint carries no tokenizer; pass --tokenizer DIR" in capsys.readouterr().err
    finally:
        (tmp_path / "moved").rename(ours / "tokenizer")


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  step (\d+)/6  elapsed \d+:\d\d:\d\d  [\d.e+-]+ steps/s  "
                      r"eta (\d+:\d\d:\d\d|\?)  loss [\d.]+  lr [\d.e+-]+  tokens/s \d+  mfu [\d.]+%"
                      r"(  eval_loss [\d.]+)?$")


def test_training_logs_eval_loss_and_carries_the_tokenizer(tmp_path, capsys):
    workdir = tmp_path / "run"
    # the tiny trainer run (6 steps, its compiled step shared with test_trainer's) with a held-out loss
    bindings = [f"WORKDIR = '{workdir}'", "train.log_every = 3", "train.eval_every = 3", "train.eval_batches = 2",
                "train.eval_data = @synthetic_data", "CheckpointConfig.every_steps = 6",
                "train.tokenizer_dir = 'assets/tokenizer'"]
    gin_setup.parse([TINY_GIN], bindings)
    gin_setup.train_using_gin()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if re.search(r" step \d+/", ln)]
    matches = [LOG_LINE.match(ln) for ln in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == [1, 3, 6]  # the first step, then every log_every
    assert [bool(m.group(3)) for m in matches] == [False, True, True]
    recs = metrics(workdir)
    assert [r["step"] for r in recs if "eval_loss" in r] == [3, 6]
    assert all(0 < r["eval_loss"] < 20 for r in recs if "eval_loss" in r)
    assert event_tags(workdir)["train/eval_loss"] == 2
    step_dir = workdir / "checkpoints" / "6"
    assert checkpoint_tokenizer(step_dir) == step_dir / "tokenizer"
    assert (step_dir / "tokenizer" / "vocab.json").read_bytes() == (REPO / "assets/tokenizer/vocab.json").read_bytes()
    # a resume restores next to the tokenizer item (nothing left to run: the restore alone is checked)
    gin_setup.parse([TINY_GIN], bindings)
    gin_setup.train_using_gin(resume=True)
    with pytest.raises(ValueError, match="train.eval_every=2 needs train.eval_data"):
        gin_setup.parse([TINY_GIN], [f"WORKDIR = '{tmp_path / 'x'}'", "train.eval_every = 2"])
        gin_setup.train_using_gin()


class Terminal:
    """A child process on a pseudo-terminal: type into it, wait for text on its screen."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        with warnings.catch_warnings():  # the child execs at once: JAX's fork warning does not apply
            warnings.simplefilter("ignore")
            self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execvpe(argv[0], argv, env)
        import fcntl

        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        self.screen = ""

    def read_until(self, pattern: str, timeout: float, start: int = 0) -> int:
        """Position after the first `pattern` (a regex) found in the output from `start` on."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.screen[start:])
            if m:
                return start + m.end()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout}s; screen ends with:\n{self.screen[-2000:]}")
            if select.select([self.fd], [], [], min(left, 0.5))[0]:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"child ended before {pattern!r}; screen:\n{self.screen[-2000:]}")
                self.screen += data.decode("utf-8", "replace")

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float) -> int | None:
        """The child's exit code once it ends (reading what it still prints), None if it is still running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = None
                return os.waitstatus_to_exitcode(status)
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.screen += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:
                    time.sleep(0.1)
        return None

    def close(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_chat_under_a_terminal(ours):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    term = Terminal([sys.executable, "-m", "sail_jax", "chat", "--checkpoint", str(ours), "--max-new-tokens",
                     "2000", "--decode-steps", "4"], env)
    try:
        at = term.read_until(r"user>", timeout=120)
        term.type(b"/help\r")
        at = term.read_until(r"/image PATH\s+attach an image", 20, at)
        at = term.read_until(r"user>", 20, at)
        term.type(b"/bogus\r")
        at = term.read_until(r"unknown command /bogus: not sent to the model", 20, at)
        term.type(b"\xff\xfe oops\r")
        at = term.read_until(r"not valid UTF-8: not sent", 20, at)
        term.type(b"Tell me a very long story\r")
        at = term.read_until(r"assistant> \S{10}", 120, at)  # the answer is streaming
        term.type(b"\x03")
        at = term.read_until(r"\[answer stopped; the conversation goes on\]", 30, at)
        at = term.read_until(r"user>", 20, at)
        term.type(b"/reset\r")
        at = term.read_until(r"dropping 1 exchange\(s\)\? \[y/N\]", 20, at)  # the stopped exchange was kept
        term.type(b"y\r")
        at = term.read_until(r"new conversation", 20, at)
        at = term.read_until(r"user>", 20, at)
        term.type(b"\x04")  # Ctrl-D at the prompt ends the chat
        assert term.wait(30) == 0
        assert "Traceback" not in term.screen
    finally:
        term.close()
