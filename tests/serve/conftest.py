"""Real ``ldm serve`` processes on 127.0.0.1 (a free port each), driven over HTTP with httpx.

``server`` is one shared server (the shipped default model, a fresh --data folder) for the tests that do not
need flags of their own; ``start_server(*flags, data=...)`` starts others and stops them at the end of the test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (pip install -e '.[test]')")
pytest.importorskip("fastapi", reason="ldm serve needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="ldm serve needs the serve extra (pip install -e '.[serve]')")

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """One ``python -m ldm serve`` child process; ``client`` talks to it."""

    def __init__(self, data: Path, *flags: str, api_key: str | None = None):
        self.data, self.flags, self.port = Path(data), flags, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, timeout=120, headers=headers)
        self.log = self.data.parent / f"{self.data.name}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> ServeProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ldm", "serve", "--port", str(self.port), "--data", str(self.data),
                 *self.flags], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data.parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ldm serve exited with {self.process.returncode}: {self.log.read_text()}")
            try:
                if self.client.get("/ldm/v1/info").status_code in (200, 401):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"ldm serve did not answer within {START_TIMEOUT_S} s: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as after a power cut or the OOM killer."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.client.close()

    def wait_job(self, job_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/ldm/v1/jobs/{job_id}").json()
            if job["status"] in ("done", "failed", "cancelled"):
                return job
            time.sleep(0.1)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    process = ServeProcess(tmp_path_factory.mktemp("serve") / "data").start()
    yield process
    process.stop()


@pytest.fixture
def start_server(tmp_path):
    started: list[ServeProcess] = []

    def start(*flags: str, data: Path | None = None, api_key: str | None = None) -> ServeProcess:
        process = ServeProcess(data or tmp_path / f"data{len(started)}", *flags, api_key=api_key)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()
