"""`rlaifv bench soak`: sustained mixed load on one server over loopback, to catch leaks and error drift.

It starts `python -m rlaifv.service.serve_cli` on a free port (the shipped shapes-world bundle unless
--bundle), with a private redis-server on a free port when one is installed (so the jobs path, the Redis
cache and rate limiter are on), then runs `--concurrency` closed-loop clients cycling through
best-of-n, rewards, chat completions and small jobs (submit, poll, read results) until `--duration-s`
or `--max-requests`. Reported: requests and p50/p99 latency per kind, errors by status code (or exception
name), and the server's RSS when ready, after one warm-up round of every kind, and at the end.
Heavy imports stay inside functions so `rlaifv --help` is instant.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from rlaifv.testing.server import free_port, wait_until_ready

KINDS = ("best_of_n", "rewards", "chat", "job")
QUESTION = "What is in the image?"


@dataclass
class SoakResult:
    seconds: float
    concurrency: int
    requests: int
    latencies_ms: dict[str, dict[str, float]]
    errors: dict[str, int]
    rss_mb: dict[str, float]
    jobs_enabled: bool
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def server_errors(self) -> int:
        """5xx answers and what has no status code: transport errors, job time-outs, jobs that failed (an item of
        the soak's valid jobs failing is the server's fault)."""
        return sum(n for code, n in self.errors.items() if code.startswith("5") or not code[:1].isdigit())


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _image_url() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Load:
    """The request mix: op `i` is KINDS[i % 4]; rewards answers repeat every 40 ops (cache hits and misses)."""

    def __init__(self, client: Any, model: str, jobs: bool) -> None:
        self.client = client
        self.model = model
        self.jobs = jobs
        self.image = _image_url()
        self.codes: Counter[str] = Counter()
        self.latencies: dict[str, list[float]] = defaultdict(list)

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.client.request(method, path, **kwargs)
        except Exception as exc:  # a transport error is a result of the soak, not a crash of it
            self.codes[type(exc).__name__] += 1
            return None
        self.codes[str(response.status_code)] += 1
        return response if response.is_success else None

    async def op(self, i: int) -> None:
        kind = KINDS[i % len(KINDS)]
        if kind == "job" and not self.jobs:
            kind = "rewards"
        started = time.perf_counter()
        ok = await getattr(self, kind)(i)
        if ok:
            self.latencies[kind].append((time.perf_counter() - started) * 1000)

    async def best_of_n(self, i: int) -> bool:
        body = {"images": [self.image], "question": QUESTION, "n": 2, "sampling": {"max_tokens": 8, "seed": i}}
        return await self.call("POST", "/v1/best-of-n", json=body) is not None

    async def rewards(self, i: int) -> bool:
        body = {"images": [self.image], "question": QUESTION, "answers": ["a red square.", f"shape {i % 40}."]}
        return await self.call("POST", "/v1/rewards", json=body) is not None

    async def chat(self, i: int) -> bool:
        content = [{"type": "image_url", "image_url": {"url": self.image}}, {"type": "text", "text": QUESTION}]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "seed": i}
        return await self.call("POST", "/v1/chat/completions", json=body) is not None

    async def job(self, i: int) -> bool:
        items = [{"images": [self.image], "question": QUESTION, "answers": [f"job {i} item {k}."]} for k in range(4)]
        created = await self.call("POST", "/v1/jobs", json={"kind": "rewards", "items": items})
        if created is None:
            return False
        job_id = created.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = await self.call("GET", f"/v1/jobs/{job_id}")
            if status is None:
                return False
            if status.json()["status"] in ("succeeded", "failed", "cancelled"):
                return await self.job_results(job_id, status.json()["status"], len(items))
            await asyncio.sleep(0.05)
        self.codes["job_timeout"] += 1
        return False

    async def job_results(self, job_id: str, status: str, total: int) -> bool:
        """Whether a finished job answered every item; if not, an error named by its first reason. Failed items
        have result lines too, so a count of lines alone took a failed job for a success."""
        results = await self.call("GET", f"/v1/jobs/{job_id}/results", params={"format": "jsonl"})
        if results is None:
            return False
        lines = [json.loads(line) for line in results.text.splitlines() if line.strip()]
        failed = [line for line in lines if line.get("status") != "succeeded"]
        if status == "succeeded" and not failed and len(lines) == total:
            return True
        if failed:
            error = failed[0].get("error") or {}
            reason = str(error.get("code") or error.get("type") or "no error given")
            if error.get("message"):
                reason += f" ({str(error['message'])[:80]})"
            what = f"job {'item failed' if status == 'succeeded' else status}: {reason}"
        elif status != "succeeded":
            what = f"job {status}"
        else:
            what = f"job results: {len(lines)} of {total} lines"
        self.codes[what] += 1
        return False


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def soak(url: str, pid: int, *, duration_s: float, max_requests: int, concurrency: int, jobs: bool) -> SoakResult:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        rss = {"ready": rss_mb(pid)}
        load = Load(client, model, jobs)
        await asyncio.gather(*(load.op(i) for i in range(len(KINDS))))  # warm-up: every path allocates once
        rss["after_warmup"] = rss_mb(pid)
        load.codes.clear()
        load.latencies.clear()
        counter = iter(range(max_requests))
        deadline = time.monotonic() + duration_s
        started = time.perf_counter()

        async def client_loop() -> None:
            for i in counter:
                if time.monotonic() >= deadline:
                    return
                await load.op(i)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        rss["end"] = rss_mb(pid)
    all_ms = [v for values in load.latencies.values() for v in values]
    latencies = {
        kind: {"p50": _pct(values, 0.5), "p99": _pct(values, 0.99), "mean": statistics.fmean(values)}
        for kind, values in sorted(load.latencies.items())
    }
    if all_ms:
        latencies["all"] = {"p50": _pct(all_ms, 0.5), "p99": _pct(all_ms, 0.99), "mean": statistics.fmean(all_ms)}
    errors = {code: n for code, n in sorted(load.codes.items()) if not code.startswith("2")}
    counts = {kind: len(values) for kind, values in sorted(load.latencies.items())}
    return SoakResult(seconds, concurrency, sum(load.codes.values()), latencies, errors, rss, jobs, counts)


def run_soak(
    *,
    duration_s: float = 120,
    max_requests: int = 100_000,
    concurrency: int = 8,
    bundle: Path | None = None,
    redis: bool = True,
    extra_env: dict[str, str] | None = None,
) -> SoakResult:
    """Start a private server (and redis-server) on free ports, soak it, stop everything."""
    from rlaifv.service.default_model import default_bundle

    port = free_port()
    env = os.environ | {
        "RLAIFV_BUNDLE": str(bundle or default_bundle()),
        "RLAIFV_PORT": str(port),
        "RLAIFV_TORCH_THREADS": "1",
        "RLAIFV_LOG_LEVEL": "warning",
        "RLAIFV_RATE_LIMIT_PER_MINUTE": "1000000",
        "RLAIFV_MAX_QUEUE": str(max(64, 4 * concurrency)),
    }
    stack: list[subprocess.Popen[bytes]] = []
    folder = tempfile.mkdtemp(prefix="rlaifv-soak-")
    try:
        jobs = redis and shutil.which("redis-server") is not None
        if jobs:
            redis_port = free_port()
            args = ["--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            stack.append(subprocess.Popen(["redis-server", *args, "--dir", folder], stdout=subprocess.DEVNULL))
            env["RLAIFV_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        env |= extra_env or {}
        server = subprocess.Popen([sys.executable, "-m", "rlaifv.service.serve_cli"], env=env)
        stack.append(server)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, server)
        return asyncio.run(
            soak(url, server.pid, duration_s=duration_s, max_requests=max_requests, concurrency=concurrency, jobs=jobs)
        )
    finally:
        for proc in reversed(stack):
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def report(result: SoakResult) -> str:
    lines = [
        f"{result.requests} HTTP requests in {result.seconds:.1f} s at concurrency {result.concurrency} "
        f"({result.requests / result.seconds:.1f}/s); jobs {'on' if result.jobs_enabled else 'off (no redis-server)'}",
        "",
        "| kind | ops | p50 ms | p99 ms | mean ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, stats in result.latencies_ms.items():
        ops = result.counts.get(kind, sum(result.counts.values()))
        lines.append(f"| {kind} | {ops} | {stats['p50']:.1f} | {stats['p99']:.1f} | {stats['mean']:.1f} |")
    errors = ", ".join(f"{code}: {n}" for code, n in result.errors.items()) or "none"
    rss = result.rss_mb
    lines += [
        "",
        f"errors by code: {errors}",
        f"server RSS MiB: ready {rss['ready']:.1f}, after warm-up {rss['after_warmup']:.1f}, end {rss['end']:.1f} "
        f"(growth under load {rss['end'] - rss['after_warmup']:+.1f})",
    ]
    return "\n".join(lines)


def _above_zero(value: float) -> float:
    """--duration-s checked before the server starts (0 soaked nothing and reported success)."""
    if value <= 0:
        raise typer.BadParameter(f"must be above 0, got {value:g}")
    return value


def bench_soak(
    duration_s: Annotated[float, typer.Option(callback=_above_zero, help="Stop after this many seconds.")] = 120,
    max_requests: Annotated[int, typer.Option(min=1, help="Stop after this many operations.")] = 100_000,
    concurrency: Annotated[int, typer.Option(min=1, help="Closed-loop clients.")] = 8,
    bundle: Annotated[Path | None, typer.Option(help="Bundle; the shipped shapes-world bundle when absent.")] = None,
    output: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
) -> None:
    """Mixed best-of-n / rewards / chat / jobs load on a private server: p50/p99, errors by code, RSS drift."""
    if output is not None:  # before the soak: a folder that cannot be made fails now, not after minutes of load
        output.parent.mkdir(parents=True, exist_ok=True)
    result = run_soak(duration_s=duration_s, max_requests=max_requests, concurrency=concurrency, bundle=bundle)
    typer.echo(report(result))
    if output is not None:
        output.write_text(json.dumps(asdict(result), indent=2) + "\n")
    if result.server_errors:
        raise typer.Exit(1)
