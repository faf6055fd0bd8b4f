"""Bounded load test of ``ldm serve``: N concurrent clients x M requests of A1111 txt2img on loopback.

    python scripts/bench_serve.py                     # 20 clients x 5 requests, the shipped default model

Starts its own ``ldm serve`` on 127.0.0.1 (a free port, a temporary --data folder), sends every request, stops
the server and prints throughput, p50/p95 latency, and whether every request was answered and every job is in
the queue's record (nothing lost). It stops by itself: each request has a timeout and the run has a deadline.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data: Path, port: int, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "ldm", "serve", "--port", str(port), "--data", str(data),
                                *extra], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ldm/v1/info", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("bench_serve: the server did not start within 120 s")


def client(url: str, index: int, requests: int, body: dict, timeout: float) -> list[tuple[float, int, int]]:
    """One client's requests, one after another: (latency s, status, images) each."""
    results = []
    with httpx.Client(base_url=url, timeout=timeout) as http:
        for k in range(requests):
            began = time.perf_counter()
            try:
                r = http.post("/sdapi/v1/txt2img", json={**body, "prompt": f"{body['prompt']} {index}-{k}"})
                images = [base64.b64decode(b) for b in r.json().get("images", [])] if r.status_code == 200 else []
                results.append((time.perf_counter() - began, r.status_code, len(images)))
            except httpx.HTTPError:
                results.append((time.perf_counter() - began, 0, 0))
    return results


def cpu_name() -> str:
    """The CPU's model name (what ``lscpu | grep 'Model name'`` prints), for the figures' context."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=5, help="per client")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's own")
    parser.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args()
    port = free_port()
    body = {"prompt": "red apple", "seed": 1, **({"steps": args.steps} if args.steps else {})}
    with tempfile.TemporaryDirectory() as folder:
        server = start(Path(folder) / "data", port, ["--max-queue", str(args.clients * 2)])
        url = f"http://127.0.0.1:{port}"
        try:
            began = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                runs = list(pool.map(lambda i: client(url, i, args.requests, body, args.timeout), range(args.clients)))
            wall = time.perf_counter() - began
            jobs = httpx.get(f"{url}/ldm/v1/jobs", params={"limit": 1000}, timeout=30).json()["jobs"]
        finally:
            server.terminate()
            server.wait(30)
    results = [r for run in runs for r in run]
    latencies = [r[0] for r in results]
    answered = sum(r[1] == 200 and r[2] == 1 for r in results)
    figures = {
        "cpu": cpu_name(), "cores": os.cpu_count(),
        "clients": args.clients, "requests_per_client": args.requests, "requests": len(results),
        "answered_ok": answered, "jobs_recorded": len(jobs), "jobs_done": sum(j["status"] == "done" for j in jobs),
        "wall_s": round(wall, 1), "throughput_img_per_s": round(answered / wall, 3),
        "p50_s": round(percentile(latencies, 50), 2), "p95_s": round(percentile(latencies, 95), 2),
        "max_s": round(max(latencies), 2),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    ok = answered == len(results) == figures["jobs_done"] == figures["jobs_recorded"]
    print("bench_serve: every request answered, nothing lost" if ok else "bench_serve: FAILED: requests lost",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
