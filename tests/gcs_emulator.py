"""A local Google Cloud Storage: the `gcp-storage-emulator` server on 127.0.0.1 (a free port, in memory), and the
environment that points each client at it: TensorStore's gcs driver (Orbax's arrays), gcsfs (etils `epath`:
every other file) and google-cloud-storage (tensorboardX's gs:// event writer).

The emulator lacks two behaviours of GCS that TensorStore's OCDBT driver relies on when it re-reads a manifest it
has cached: a media download carries no `x-goog-generation` header, and the `ifGenerationMatch` /
`ifGenerationNotMatch` preconditions are ignored (TensorStore then fails with "Malformed StorageGeneration").
Run as a script (`python tests/gcs_emulator.py PORT BUCKET`), this module starts the emulator with both added to
its object download and media upload handlers, as GCS documents them (304 / 412).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

BUCKET = "sail-test"  # the bucket the tests' `gcs` fixture (tests/conftest.py) creates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(port: int) -> dict[str, str]:
    url = f"http://127.0.0.1:{port}"
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "GOOGLE_CLOUD_PROJECT": "test",
            # gcsfs asks the storage-control API (which the emulator lacks) whether a bucket is hierarchical
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def gcs_emulator(bucket: str, log: Path) -> Iterator[dict[str, str]]:
    """Run the emulator with `bucket` created; yields the client environment; stops the server after."""
    port = free_port()
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, __file__, str(port), bucket], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the GCS emulator did not start: {log.read_text()}")
            time.sleep(0.1)
        yield client_env(port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ for the block (restored after)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _with_generations() -> None:
    """Add the generation header and the two preconditions to the emulator's object handlers."""
    from http import HTTPStatus

    from gcp_storage_emulator.handlers import objects

    def precondition_failed(request, response, current: str | None) -> bool:
        match = request.query.get("ifGenerationMatch", [None])[0]
        if match is not None and match != (current or "0"):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return True
        return False

    def generation(request, storage) -> str | None:
        try:
            return str(storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])["generation"])
        except objects.NotFound:
            return None

    download, media_upload = objects.download, objects._media_upload

    def download_with_generation(request, response, storage, *args, **kwargs):
        current = generation(request, storage)
        if current is not None:
            response["x-goog-generation"] = current
            if request.query.get("ifGenerationNotMatch", [None])[0] == current:
                response.status = HTTPStatus.NOT_MODIFIED
                return
            if precondition_failed(request, response, current):
                return
        return download(request, response, storage)

    def media_upload_with_precondition(request, response, storage):
        name = request.query["name"][0]
        try:
            current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
        except objects.NotFound:
            current = None
        if not precondition_failed(request, response, current):
            media_upload(request, response, storage)

    objects.download, objects._media_upload = download_with_generation, media_upload_with_precondition


if __name__ == "__main__":
    _with_generations()  # before the server module builds its routing table from the handlers
    from gcp_storage_emulator.server import create_server

    create_server("127.0.0.1", int(sys.argv[1]), True, sys.argv[2]).run()
