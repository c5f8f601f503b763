"""`rlaifv bench service`: throughput and latency of best-of-N over HTTP, micro-batching off vs on.

The benchmark starts one `python -m rlaifv.service.serve_cli` per mode on free ports
(off: RLAIFV_MAX_BATCH=1; on: RLAIFV_MAX_BATCH=--max-batch with a --window-ms
window), then at each concurrency level runs closed-loop clients against each
server in turn (every client sends its next request as soon as the previous
one is answered), so changes in machine load affect both modes alike.
With `--engine transformers,vllm` the modes are engines instead (both batching on) over one text-only bundle
(vLLM's multimodal models do not run on this CPU): the vllm mode starts two `vllm serve` processes (policy,
reference; the venv of scripts/vllm-env) behind `RLAIFV_ENGINE=vllm`, and the report splits each request's
model time into sampling and reference scoring (docs/vllm.md).
Reported per level: requests/s, answers/s (= requests/s * n), p50/p99 latency,
and at concurrency 1 the HTTP + scheduler overhead: client latency minus the
model time the server reports, over the model time. With `--url` it measures
an already running server instead (one mode, as configured there).

Heavy imports stay inside functions so `rlaifv --help` is instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from rlaifv.testing.server import free_port

ROOT = Path(__file__).resolve().parents[2]  # the checkout: its `rlaifv` is importable there uninstalled too
ENGINES = ("transformers", "vllm")
# The benchmark's requests are a few dozen tokens; a longer context than this only asks vLLM for KV cache to hold one
# such sequence (`VLLM_CPU_KVCACHE_SPACE`, 1 GiB on the CPU: a real model's 32k positions would not start).
VLLM_MAX_MODEL_LEN = 2048


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    model_s: list[float]
    n: int
    mean_batch: float | None = None
    generate_s: list[float] | None = None
    score_s: list[float] | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def answers_ps(self) -> float:
        return self.rps * self.n

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def overhead(self) -> float:
        """(client latency - server-reported model time) / model time, medians."""
        model = statistics.median(self.model_s)
        return (statistics.median(self.latencies) - model) / model


def benchmark_bundle(folder: Path | None = None) -> Path:
    """A random-weight LLaVA big enough for timings to mean something: hidden 256, 4 layers, 64 px / patch 8."""
    from rlaifv.trainer.shapes.tiny_vlm import TinyVLMSpec, build_tiny_bundle

    folder = folder or Path.home() / ".cache" / "rlaifv" / "bench-256x4"
    if not (folder / "rlaifv.json").is_file():
        spec = TinyVLMSpec(
            image_size=64,
            patch_size=8,
            text_hidden=256,
            text_layers=4,
            vision_hidden=64,
            vision_layers=2,
            text_heads=4,
            text_kv_heads=4,
            intermediate=1024,
        )
        build_tiny_bundle(folder, spec=spec)
    return folder


def _image_url() -> str:
    import base64
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((10, 10, 40, 40), fill=(220, 20, 20))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _run_level(
    url: str,
    mode: str,
    concurrency: int,
    total: int,
    n: int,
    max_tokens: int,
    headers: dict[str, str],
    text_only: bool = False,
) -> LevelResult:
    import httpx

    images = [] if text_only else [_image_url()]
    latencies: list[float] = []
    model_s: list[float] = []
    generate_s: list[float] = []
    score_s: list[float] = []
    counter = iter(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in counter:
            body = {
                "images": images,
                "question": "Describe the image." if images else TEXT_QUESTION,
                "n": n,
                "sampling": {"temperature": 1.0, "max_tokens": max_tokens, "seed": i},
            }
            start = time.perf_counter()
            r = await client.post("/v1/best-of-n", json=body)
            latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                raise RuntimeError(f"{mode}: HTTP {r.status_code} {r.text[:500]}")
            timings = r.json()["timings"]
            model_s.append(timings["generate_s"] + timings["score_s"])
            generate_s.append(timings["generate_s"])
            score_s.append(timings["score_s"])

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return LevelResult(mode, concurrency, total, seconds, latencies, model_s, n, None, generate_s, score_s)


TEXT_QUESTION = "Describe a red circle left of a blue square, and what is above the green triangle on the right."


async def _warm(url: str, n: int, max_tokens: int, headers: dict[str, str], text_only: bool = False) -> None:
    await _run_level(url, "warm", 2, 4, n, max_tokens, headers, text_only)


def _batch_totals(url: str, headers: dict[str, str]) -> tuple[float, float] | None:
    """(sum, count) of the server's `rlaifv_batch_size` histogram for generate batches."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    totals = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "rlaifv_batch_size"
        for sample in family.samples
        if sample.labels.get("kind") == "generate"
    }
    if "rlaifv_batch_size_sum" not in totals:
        return None
    return totals["rlaifv_batch_size_sum"], totals["rlaifv_batch_size_count"]


def _start_server(bundle: Path, port: int, env_overrides: dict[str, str]) -> subprocess.Popen[bytes]:
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")} | env_overrides
    cmd = [
        sys.executable,
        "-m",
        "rlaifv.service.serve_cli",
        "--bundle",
        str(bundle),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready in time")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def _positions(folder: Path) -> int | None:
    """A model folder's max_position_embeddings (a vision-language config's text_config's); None without a config
    (a LoRA adapter)."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    value = config.get("text_config", config).get("max_position_embeddings") or config.get("max_position_embeddings")
    return value if isinstance(value, int) else None


def vllm_max_model_len(bundle: Path) -> int:
    """The --max-model-len of the bundle's `vllm serve`s: its models' own position limit (vLLM refuses a longer one:
    the tiny text bundle has 1024), at most VLLM_MAX_MODEL_LEN."""
    from rlaifv.reward.bundle import read_manifest, resolve

    manifest = read_manifest(bundle)
    limits = [p for entry in (manifest.policy, manifest.reference) if (p := _positions(resolve(bundle, entry)))]
    return min([*limits, VLLM_MAX_MODEL_LEN])


def _start_vllm_pair(bundle: Path, threads: int, running: contextlib.ExitStack) -> dict[str, str]:
    """`vllm serve` of the bundle's policy and reference (loading side by side), as RLAIFV_* settings. Each server's
    stop is on `running` before it is launched: they run in their own session, so a Ctrl-C here never reaches them,
    and a start-up that fails or is interrupted must stop them itself."""
    from rlaifv.reward.bundle import read_manifest, resolve
    from rlaifv.testing.vllm_server import VllmServer

    manifest = read_manifest(bundle)
    length = vllm_max_model_len(bundle)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    servers = []
    for role, entry in (("policy", manifest.policy), ("reference", manifest.reference)):
        log = logs / f"rlaifv-bench-vllm-{role}.log"
        server = VllmServer(resolve(bundle, entry), name=role, max_model_len=length, threads=threads, log=log)
        running.callback(server.stop)
        server.launch()
        servers.append(server)
    for server in servers:
        server.wait_healthy(600)
    policy, reference = servers
    return {"RLAIFV_ENGINE": "vllm", "RLAIFV_VLLM_POLICY_URL": policy.url, "RLAIFV_VLLM_REFERENCE_URL": reference.url}


def run_benchmark(
    *,
    bundle: Path,
    concurrency: list[int],
    n: int,
    max_tokens: int,
    requests_per_client: int,
    max_batch: int,
    window_ms: float,
    torch_threads: int | None,
    url: str | None = None,
    api_key: str | None = None,
    engines: list[str] | None = None,
) -> list[LevelResult]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    unknown = [e for e in engines or [] if e not in ENGINES]
    if unknown:
        raise typer.BadParameter(f"unknown engine {unknown[0]!r}: {' or '.join(ENGINES)}", param_hint="--engine")
    results: list[LevelResult] = []
    with contextlib.ExitStack() as running:  # every server started is stopped on any way out: an error, Ctrl-C
        modes: list[tuple[str, dict[str, str]]]
        if url:
            modes = [("server", {})]
        elif engines:
            common = {
                "RLAIFV_MAX_N": str(max(n, 16)),
                "RLAIFV_MAX_TOKENS": str(max(max_tokens, 64)),
                "RLAIFV_MAX_QUEUE": "1024",
                "RLAIFV_MAX_BATCH": str(max_batch),
                "RLAIFV_BATCH_WINDOW_MS": str(window_ms),
            }
            if torch_threads:
                common["RLAIFV_TORCH_THREADS"] = str(torch_threads)
            modes = []
            for engine in engines:
                vllm = _start_vllm_pair(bundle, torch_threads or 1, running) if engine == "vllm" else {}
                modes.append((engine, common | vllm))
        else:
            common = {
                "RLAIFV_MAX_N": str(max(n, 16)),
                "RLAIFV_MAX_TOKENS": str(max(max_tokens, 64)),
                "RLAIFV_MAX_QUEUE": "1024",
            }
            if torch_threads:
                common["RLAIFV_TORCH_THREADS"] = str(torch_threads)
            modes = [
                ("batching off", common | {"RLAIFV_MAX_BATCH": "1", "RLAIFV_BATCH_WINDOW_MS": "0"}),
                (
                    "batching on",
                    common | {"RLAIFV_MAX_BATCH": str(max_batch), "RLAIFV_BATCH_WINDOW_MS": str(window_ms)},
                ),
            ]
        targets: list[str] = []
        for _, env in modes:  # all servers up front; idle ones cost memory, not CPU
            if url is not None:
                targets.append(url)
                continue
            port = free_port()
            targets.append(f"http://127.0.0.1:{port}")
            proc = _start_server(bundle, port, env)
            running.callback(_stop, proc)
            _wait_ready(proc, targets[-1])
        text_only = bool(engines)
        for target in targets:
            asyncio.run(_warm(target, n, max_tokens, headers, text_only))
        # modes alternate at each level, so drift in machine load hits both alike
        for c in concurrency:
            total = max(16, requests_per_client * c)
            for (mode, _), target in zip(modes, targets, strict=True):
                before = _batch_totals(target, headers)
                r = asyncio.run(_run_level(target, mode, c, total, n, max_tokens, headers, text_only))
                after = _batch_totals(target, headers)
                if before and after and after[1] > before[1]:
                    r.mean_batch = (after[0] - before[0]) / (after[1] - before[1])
                results.append(r)
                p50, p99 = r.pct(0.5) * 1000, r.pct(0.99) * 1000
                typer.echo(
                    f"{mode:>13} c={c:<3} {r.rps:7.2f} req/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms"
                    f"  mean batch {r.mean_batch or 0:.1f}"
                )
    return sorted(results, key=lambda r: (r.mode, r.concurrency))


def report(results: list[LevelResult], *, n: int, max_tokens: int) -> str:
    lines = [
        f"best-of-{n}, max_tokens {max_tokens}, closed-loop clients",
        "",
        "| mode | concurrency | requests | requests/s | answers/s | p50 ms | p99 ms | mean batch "
        "| overhead vs model time | sampling p50 ms | scoring p50 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        overhead = f"{r.overhead * 100:.1f} %" if r.concurrency == 1 else ""
        batch = f"{r.mean_batch:.1f}" if r.mean_batch is not None else ""
        sampling = f"{statistics.median(r.generate_s) * 1000:.1f}" if r.generate_s else ""
        scoring = f"{statistics.median(r.score_s) * 1000:.1f}" if r.score_s else ""
        lines.append(
            f"| {r.mode} | {r.concurrency} | {r.requests} | {r.rps:.2f} | {r.answers_ps:.1f} | "
            f"{r.pct(0.5) * 1000:.1f} | {r.pct(0.99) * 1000:.1f} | {batch} | {overhead} | {sampling} | {scoring} |"
        )
    by_mode: dict[str, dict[int, LevelResult]] = {}
    for r in results:
        by_mode.setdefault(r.mode, {})[r.concurrency] = r
    if "batching off" in by_mode and "batching on" in by_mode:
        lines += ["", "| concurrency | throughput on/off |", "|---:|---:|"]
        for c, off in by_mode["batching off"].items():
            on = by_mode["batching on"].get(c)
            if on is not None:
                lines.append(f"| {c} | {on.rps / off.rps:.2f}x |")
    return "\n".join(lines) + "\n"


def _levels(value: str) -> str:
    """--concurrency checked before any server starts (a typo failed with a traceback, a 0 ran no client)."""
    try:
        levels = [int(c) for c in value.split(",") if c.strip()]
    except ValueError:
        raise typer.BadParameter(f"comma-separated counts, got {value!r}") from None
    if not levels or min(levels) < 1:
        raise typer.BadParameter(f"counts of at least 1, got {value!r}")
    return value


def _engines(value: str | None) -> str | None:
    """--engine checked before a server starts (an unknown name once failed after vLLM's had)."""
    if value is not None:
        names = [e.strip() for e in value.split(",") if e.strip()]
        if not names or any(e not in ENGINES for e in names):
            raise typer.BadParameter(f"{', '.join(ENGINES)}, comma-separated; got {value!r}")
    return value


def output_paths(output: Path) -> tuple[Path, Path]:
    """Where --output puts the Markdown table and the raw JSON beside it: with a .json --output the JSON goes there
    and the table beside it as .md (the table was written there, then the JSON over it)."""
    raw = output.with_suffix(".json")
    return (output.with_suffix(".md") if raw == output else output), raw


def bench_service(
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle to serve; a 256-hidden 4-layer random LLaVA when absent.")
    ] = None,
    url: Annotated[str | None, typer.Option(help="Measure this running server instead of starting two.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="RLAIFV_API_KEY", help="API key for --url servers.")] = None,
    concurrency: Annotated[str, typer.Option(callback=_levels, help="Comma-separated concurrency levels.")] = "1,4,16",
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Candidates per request (best-of-n).")] = 8,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens per answer.")] = 32,
    requests_per_client: Annotated[
        int, typer.Option(min=1, help="Requests per concurrent client (at least 16 per level).")
    ] = 4,
    max_batch: Annotated[int, typer.Option(min=1, help="RLAIFV_MAX_BATCH of the batching-on server.")] = 16,
    window_ms: Annotated[float, typer.Option(min=0, help="RLAIFV_BATCH_WINDOW_MS of the batching-on server.")] = 5.0,
    torch_threads: Annotated[int | None, typer.Option(min=1, help="RLAIFV_TORCH_THREADS of the servers.")] = 1,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Also write the markdown table here and the raw JSON beside it (.json; a .json path: the "
            "table beside it as .md)."
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(
            callback=_engines,
            help="Compare engines instead of batching off/on, e.g. transformers,vllm (a text-only bundle; vllm "
            "needs scripts/vllm-env).",
        ),
    ] = None,
) -> None:
    """Throughput (requests/s, answers/s) and p50/p99 latency of best-of-N, micro-batching off vs on (or engines)."""
    levels = [int(c) for c in concurrency.split(",") if c.strip()]
    engines = [e.strip() for e in engine.split(",") if e.strip()] if engine else None
    if engines and url:
        raise typer.BadParameter("starts its own servers: leave out --url", param_hint="--engine")
    if output is not None:  # before the run: a folder that cannot be made fails now, not after it
        output.parent.mkdir(parents=True, exist_ok=True)
    if engines and bundle is None:
        from rlaifv.bench.vllm_scoring import bench_bundle

        bundle = bench_bundle()
    bundle = bundle or (None if url else benchmark_bundle())
    results = run_benchmark(
        bundle=bundle or Path("."),
        concurrency=levels,
        n=n,
        max_tokens=max_tokens,
        requests_per_client=requests_per_client,
        max_batch=max_batch,
        window_ms=window_ms,
        torch_threads=torch_threads,
        url=url,
        api_key=api_key,
        engines=engines,
    )
    table = report(results, n=n, max_tokens=max_tokens)
    typer.echo(table)
    if output is not None:
        table_path, raw_path = output_paths(output)
        table_path.write_text(table)
        raw: list[dict[str, Any]] = [
            {
                "mode": r.mode,
                "concurrency": r.concurrency,
                "requests": r.requests,
                "seconds": r.seconds,
                "latencies": r.latencies,
            }
            for r in results
        ]
        raw_path.write_text(json.dumps(raw, indent=1))
        typer.echo(f"wrote {table_path} and {raw_path}")


if __name__ == "__main__":
    typer.run(bench_service)
