"""Pluggable judge reward (think quality, non-verifiable answers): a Python callable or an HTTP endpoint.

A judge maps (question, response, answer) to a score in [0, 1]. A call that fails (exception, timeout, HTTP error,
garbage reply, a score that is not a finite number in [0, 1]) scores 0 and is counted in `failures`: one bad judge
reply must never end an RL run, but the count belongs in the metrics.

HTTP protocol: POST `{"question", "response", "answer"}` as JSON, reply `{"score": float}`. Failed calls are retried
up to `max_retries` more times (with a short linear backoff); each try has `timeout_s`.
"""

from __future__ import annotations

import http.client
import importlib
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

log = logging.getLogger(__name__)


class JudgeError(Exception):
    """A judge call that produced no usable score."""


def load_callable(spec: str) -> Callable[..., float]:
    """The function named by an import path "pkg.module:function"."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"judge {spec!r}: expected 'pkg.module:function' or an http(s):// URL")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"judge {spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"judge {spec!r} is not callable")
    return fn


def _score(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise JudgeError(f"score {value!r} is not a finite number")
    if not 0 <= value <= 1:
        raise JudgeError(f"score {value} is outside [0, 1]")
    return float(value)


class Judge:
    """Scores through `fn(question, response, answer)`, turning failures into 0 and counting them. Safe to call
    from several threads (HTTP judges are slow, so rollouts are usually scored concurrently)."""

    def __init__(self, fn: Callable[[str, str, str], float], name: str):
        self._fn, self.name = fn, name
        self.calls = 0
        self.failures = 0
        self._lock = threading.Lock()

    def __call__(self, question: str, response: str, answer: str) -> float:
        with self._lock:
            self.calls += 1
        try:
            return _score(self._fn(question, response, answer))
        except Exception as e:  # any failure of a judge scores 0 (counted), see the module docstring
            with self._lock:
                self.failures += 1
            log.warning("judge %s failed (%d of %d calls): %s", self.name, self.failures, self.calls, e)
            return 0.0


class HttpJudge:
    """POSTs JSON to `url`; the raw transport with timeout and bounded retries (wrap in `Judge` for scoring)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, max_retries: int = 2, backoff_s: float = 0.5):
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(f"judge {url}: need timeout_s > 0, max_retries >= 0, backoff_s >= 0")
        self.url, self.timeout_s, self.max_retries, self.backoff_s = url, timeout_s, max_retries, backoff_s
        self.retries = 0
        self._lock = threading.Lock()

    def _once(self, body: bytes) -> float:
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                payload = reply.read()
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise JudgeError(f"{self.url}: {e}") from None
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            raise JudgeError(f"{self.url}: reply is not JSON: {payload[:80]!r}") from None
        if not isinstance(obj, dict) or "score" not in obj:
            raise JudgeError(f"{self.url}: reply has no 'score': {payload[:80]!r}")
        return _score(obj["score"])

    def __call__(self, question: str, response: str, answer: str) -> float:
        body = json.dumps({"question": question, "response": response, "answer": answer}).encode("utf-8")
        attempt = 0
        while True:
            try:
                return self._once(body)
            except JudgeError:
                if attempt == self.max_retries:
                    raise
                attempt += 1
                with self._lock:
                    self.retries += 1
                time.sleep(self.backoff_s * attempt)


def make_judge(spec: str, *, timeout_s: float = 30.0, max_retries: int = 2, backoff_s: float = 0.5) -> Judge:
    """A judge from config: an http(s):// URL, or a callable's import path "pkg.module:function"."""
    if spec.startswith(("http://", "https://")):
        return Judge(HttpJudge(spec, timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s), spec)
    return Judge(load_callable(spec), spec)
