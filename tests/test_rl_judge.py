"""The judge reward against a real local HTTP judge on 127.0.0.1, and by import path."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sail_jax.rl import Judge, load_callable, make_judge


def length_judge(question: str, response: str, answer: str) -> float:
    """A judge for the import-path test: 1 when the response mentions the answer."""
    return float(answer in response)


class _JudgeServer:
    """A judge server whose reply is scripted per request: ("json", obj), ("sleep", seconds), ("status", code) or
    ("raw", bytes); the last script entry repeats. It records the requests it got."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append(json.loads(body))
                kind, value = server.script[min(len(server.requests), len(server.script)) - 1]
                if kind == "sleep":
                    time.sleep(value)
                    kind, value = "json", {"score": 1.0}
                if kind == "status":
                    self.send_error(value)
                    return
                payload = json.dumps(value).encode() if kind == "json" else value
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up before this slow reply: what the timeout test wants

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _judge(url, **kw):
    return make_judge(url, **{"timeout_s": 2.0, "max_retries": 1, "backoff_s": 0.0, **kw})


def test_good_replies_are_scored():
    with _JudgeServer([("json", {"score": 0.25}), ("json", {"score": 1})]) as server:
        judge = _judge(server.url)
        assert judge("q?", "resp", "ans") == 0.25
        assert judge("q2", "r2", "a2") == 1.0
    assert server.requests[0] == {"question": "q?", "response": "resp", "answer": "ans"}
    assert (judge.calls, judge.failures) == (2, 0)


def test_concurrent_calls_are_all_counted():
    with _JudgeServer([("json", {"score": 0.5})]) as server:
        judge = _judge(server.url)
        threads = [threading.Thread(target=judge, args=("q", f"r{i}", "a")) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert (judge.calls, judge.failures) == (8, 0)
    assert sorted(r["response"] for r in server.requests) == [f"r{i}" for i in range(8)]


def test_http_500_then_success_is_retried():
    with _JudgeServer([("status", 500), ("json", {"score": 0.5})]) as server:
        judge = _judge(server.url)
        assert judge("q", "r", "a") == 0.5
    assert len(server.requests) == 2 and judge.failures == 0


def test_timeout_scores_zero_and_is_counted():
    with _JudgeServer([("sleep", 3.0)]) as server:
        judge = _judge(server.url, timeout_s=0.2, max_retries=1)
        start = time.monotonic()
        assert judge("q", "r", "a") == 0.0
        assert time.monotonic() - start < 2.0  # two tries of 0.2 s, not the server's 3 s each
    assert (judge.calls, judge.failures) == (1, 1)
    assert len(server.requests) == 2  # the retry happened


@pytest.mark.parametrize("reply", [
    ("raw", b"<html>not json</html>"),
    ("json", {"verdict": "good"}),
    ("json", {"score": "high"}),
    ("json", {"score": 7}),  # outside [0, 1]
    ("json", [0.5]),
    ("status", 503),
])
def test_garbage_replies_score_zero_and_are_counted(reply):
    with _JudgeServer([reply]) as server:
        judge = _judge(server.url, max_retries=2)
        assert judge("q", "r", "a") == 0.0
        assert judge("q", "r", "a") == 0.0
    assert (judge.calls, judge.failures) == (2, 2)
    assert len(server.requests) == 6  # 1 + 2 retries per call, bounded


def test_unreachable_server_scores_zero():
    with _JudgeServer([("json", {"score": 1.0})]) as server:
        url = server.url
    judge = _judge(url, max_retries=0)  # the server is shut: connection refused
    assert judge("q", "r", "a") == 0.0 and judge.failures == 1


def test_callable_judge_by_import_path():
    judge = make_judge("tests.test_rl_judge:length_judge")
    assert judge("q", "it is 42", "42") == 1.0 and judge("q", "it is 41", "42") == 0.0
    broken = Judge(lambda q, r, a: 1 / 0, "broken")
    assert broken("q", "r", "a") == 0.0 and broken.failures == 1
    with pytest.raises(ValueError, match="cannot import"):
        load_callable("tests.test_rl_judge:no_such_judge")
    with pytest.raises(ValueError, match="expected 'pkg.module:function'"):
        make_judge("tests.test_rl_judge.length_judge")
