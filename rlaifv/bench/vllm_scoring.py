"""Reference scoring paths for the vllm engine, timed on one machine in one run (docs/vllm.md).

    python -m rlaifv.bench.vllm_scoring [--prompt-tokens 32,600] [--n 8] [--answer-tokens 64]

Scoring N answers of T tokens after one prompt of P tokens under the reference model:

- `vllm batched`: one /v1/completions request, the N prompt+answer sequences as token-id prompts, max_tokens 1,
  prompt_logprobs 0, the answers' log-probs sliced from the end (what the engine does);
- `vllm one per answer`: the same as N concurrent requests;
- `in process`: this project's shared-prefix scoring (`ModelPair.sequence_logprobs`: the prompt once, the N
  answers continued from its KV cache), transformers on this CPU.

Both sides get one thread. The model is a random text-only Llama (hidden 256, 4 layers, vocabulary 258): a real
vocabulary (32k-150k) makes vLLM's full-vocabulary log-softmax at every prompt position costlier still.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rlaifv.service.engines.vllm import VllmServer as Client

BENCH_SIZES = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 2048,
}


def bench_bundle(folder: Path | None = None) -> Path:
    from rlaifv.testing.tiny_text import build_tiny_text_bundle

    folder = folder or Path.home() / ".cache" / "rlaifv" / "bench-text-256x4"
    if not (folder / "rlaifv.json").is_file():
        build_tiny_text_bundle(folder, sizes=BENCH_SIZES, name="bench-text")
    return folder


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _median_async(fn: Callable[[], Awaitable[object]], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def _time_vllm(
    client: Client, prompt: list[int], answers: list[list[int]], repeats: int
) -> tuple[list[float], float, float]:
    """The answers' log-prob sums from the server, and the median seconds of one batched request and of N requests.

    One started client on one event loop, its connections opened by a warm-up: the timings hold the requests alone
    (a client made and started per run timed its /health and /v1/models checks too)."""
    try:
        theirs = [sum(v) for v in await client.answer_logprobs(prompt, answers)]

        def one_each() -> Awaitable[object]:
            return asyncio.gather(*(client.answer_logprobs(prompt, [a]) for a in answers))

        await one_each()  # warm: the N connections the concurrent requests use
        batched_s = await _median_async(lambda: client.answer_logprobs(prompt, answers), repeats)
        one_each_s = await _median_async(one_each, repeats)
    finally:
        await client.aclose()  # its httpx client belongs to this loop; the next prompt's loop makes its own
    return theirs, batched_s, one_each_s


def run(prompt_tokens: list[int], n: int, answer_tokens: int, repeats: int) -> list[dict[str, float]]:
    import torch

    from rlaifv.reward.bundle import load_bundle
    from rlaifv.reward.prompt import EncodedPrompt
    from rlaifv.service.engines.vllm import VllmServer as Client
    from rlaifv.service.settings import Settings
    from rlaifv.testing.vllm_server import VllmServer

    torch.set_num_threads(1)
    bundle = bench_bundle()
    pair = load_bundle(bundle)
    vocab = [t for t in range(len(pair.tokenizer)) if t not in pair.stop_ids and t not in pair.blocked_ids]
    rng = random.Random(0)
    rows = []
    with VllmServer(bundle / "reference", name="reference", max_model_len=2048) as server:
        settings = Settings(engine="vllm", vllm_policy_url=server.url, vllm_reference_url=server.url)
        client = Client("reference", server.url, None, settings, None)
        client.start(0)  # its synchronous /health and /v1/models checks: once, before any timing
        for p in prompt_tokens:
            prompt = [rng.choice(vocab) for _ in range(p)]
            answers = [[rng.choice(vocab) for _ in range(answer_tokens)] for _ in range(n)]
            encoded = EncodedPrompt(torch.tensor(prompt))
            ours = pair.sequence_logprobs([encoded], [answers], reference=True)[0]
            theirs, batched_s, one_each_s = asyncio.run(_time_vllm(client, prompt, answers, repeats))
            gap = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
            row = {
                "prompt_tokens": p,
                "vllm batched": batched_s,
                "vllm one per answer": one_each_s,
                "in process": _median_s(partial(pair.sequence_logprobs, [encoded], [answers], reference=True), repeats),
                "max |sum diff|": gap,
            }
            rows.append(row)
            typer.echo(row)
    return rows


def main(
    prompt_tokens: Annotated[str, typer.Option(help="Comma-separated prompt lengths.")] = "32,600",
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="Answers scored.")] = 8,
    answer_tokens: Annotated[int, typer.Option(min=1, help="Tokens per answer.")] = 64,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (median).")] = 5,
) -> None:
    rows = run([int(p) for p in prompt_tokens.split(",")], n, answer_tokens, repeats)
    typer.echo("| prompt tokens | vllm batched s | vllm one per answer s | in process s | max abs diff of sums |")
    typer.echo("|---:|---:|---:|---:|---:|")
    for r in rows:
        typer.echo(
            f"| {r['prompt_tokens']} | {r['vllm batched']:.3f} | {r['vllm one per answer']:.3f} | "
            f"{r['in process']:.3f} | {r['max |sum diff|']:.1e} |"
        )


if __name__ == "__main__":
    typer.run(main)
