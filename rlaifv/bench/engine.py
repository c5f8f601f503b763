"""`rlaifv bench engine`: best-of-N against one answer and against the naive way, all in one run.

Paths, on one model pair and one image + question (the issue's CPU model by default, `engine_models`):

- naive: N x HF `generate` (one answer each), then a full forward of prefix ++ answer per answer
  through the policy and again through the reference (2N prefix encodings);
- HF generate: one `generate` call, one answer, no scoring;
- single: our engine, one answer (`ModelPair.sample`, n=1), no scoring;
- best-of-N (N in --n): our engine end to end (`ModelPair.generate_batch`: sample N, reference scoring,
  ranking), with its split: policy prefill, decode, reference prefill, reference answer pass (from timers
  put around the engine's prefill calls) and, once, the 'claims' reward.

End of sequence is blocked (every answer has exactly --answer-tokens tokens), so all paths do the same
work. Repeats run in rounds (every path once per round) and medians are reported, so a drift in machine
load hits every path alike. Peak memory: on CPU the resident-set growth during a path (sampled every
2 ms), on CUDA `max_memory_allocated`. The LoRA pair (rank 16 over the reference) runs best-of-N at the
headline N after the full pair. `--dtype bfloat16` also scores the headline answers in float32 and reports
the reward difference.

Heavy imports stay inside functions so `rlaifv --help` is instant.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from rlaifv.bench.engine_models import SHAPES, Shape
from rlaifv.reward.cpu_info import cpu_name

if TYPE_CHECKING:
    from PIL import Image

    from rlaifv.reward.model_pair import ModelPair
    from rlaifv.reward.packed_weights import PackMode
    from rlaifv.reward.prompt import EncodedPrompt
    from rlaifv.reward.results import Ranking
    from rlaifv.reward.sampling import Sample, SamplingParams
    from rlaifv.reward.scoring import RewardMode

T = TypeVar("T")


@dataclass
class PathResult:
    """One path's runs (seconds), the answer tokens one run produces, and its extras (split, memory)."""

    name: str
    runs: list[float] = field(default_factory=list)
    cpu_runs: list[float] = field(default_factory=list)  # process CPU seconds (CPU device only)
    tokens: int = 0
    peak_mb: list[float] = field(default_factory=list)
    split: dict[str, list[float]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return statistics.median(self.runs)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def part(self, key: str) -> float:
        return statistics.median(self.split[key]) if self.split.get(key) else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": self.seconds,
            "runs": self.runs,
            "cpu_seconds": statistics.median(self.cpu_runs) if self.cpu_runs else None,
            "cpu_runs": self.cpu_runs,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens_per_s,
            "peak_mb": max(self.peak_mb) if self.peak_mb else None,
            "split": {k: statistics.median(v) for k, v in self.split.items() if v},
        }


class _Memory:
    """Peak memory of the block: CUDA allocator peak, or CPU resident-set growth sampled every 2 ms."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_mb = 0.0

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            yield
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            return
        base = _rss()
        peak = [base]
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.002):
                peak[0] = max(peak[0], _rss())

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peak_mb = (max(peak[0], _rss()) - base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PhaseTimer:
    """Seconds in the engine's prefill calls: the sampler's (policy) and the scorer's (reference).

    `sampling` imports `prefill` by name and `answer_logprobs` looks it up in `logprobs`, so a wrapper
    in each module tells the two apart without touching the engine.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[_PhaseTimer]:
        from rlaifv.reward import logprobs, sampling

        original = logprobs.prefill

        def timed(label: str) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                self.sync()
                start = time.perf_counter()
                out = original(*args, **kwargs)
                self.sync()
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                return out

            return wrapper

        # sampling's own name for logprobs.prefill (imported, not re-exported), which is what it calls
        sampling.prefill = timed("policy")  # type: ignore[attr-defined]
        logprobs.prefill = timed("reference")
        try:
            yield self
        finally:
            sampling.prefill = original  # type: ignore[attr-defined]
            logprobs.prefill = original


@dataclass
class EngineBench:
    """Everything one shape's run needs; `run` returns the report as a dict."""

    shape: Shape
    device: str = "cpu"
    dtype: str = "float32"
    ns: tuple[int, ...] = (1, 4, 8, 16)
    headline: int = 8
    answer_tokens: int = 64
    repeats: int = 3
    naive_repeats: int = 3
    lora: bool = True
    claims: bool = True
    concurrency: int = 0
    compare_fp32: bool = True
    pack_weights: PackMode = "auto"
    log: Callable[[str], None] = print

    def sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    # -- set-up ---------------------------------------------------------------------------------------

    def load(self, *, lora: bool, dtype: str | None = None, pack: PackMode | None = None) -> ModelPair:
        """The pair as the service would serve it (weights packed per `pack_weights`), end of sequence blocked."""
        dtype = dtype or self.dtype
        if self.device == "cpu" and self.shape.name == "cpu":
            from rlaifv.bench.engine_models import saved_bundles
            from rlaifv.reward.bundle import load_bundle

            full, lora_folder = saved_bundles(self.shape)
            pair = load_bundle(lora_folder if lora else full, device=self.device, dtype=dtype)
        else:
            import torch

            from rlaifv.bench.engine_models import built_pair

            pair = built_pair(self.shape, self.device, getattr(torch, dtype), lora=lora)
        # Block end of sequence: every answer runs to answer_tokens, in every path.
        pair.stop_ids = [-1]
        pair.blocked_ids = sorted(set(pair.tokenizer.all_special_ids))
        pair.pack_weights(pack or self.pack_weights)
        return pair

    def image(self) -> Image.Image:
        from PIL import Image

        return Image.new("RGB", (self.shape.image_size, self.shape.image_size), (120, 60, 200))

    def prompt(self, pair: ModelPair) -> EncodedPrompt:
        return pair.encode([self.image()], self.shape.question)

    def params(self, seed: int = 0) -> SamplingParams:
        from rlaifv.reward.sampling import SamplingParams

        return SamplingParams(temperature=1.0, max_tokens=self.answer_tokens, seed=seed)

    # -- the paths ------------------------------------------------------------------------------------

    def _timed(self, result: PathResult, fn: Callable[[], T], timer: _PhaseTimer | None = None) -> T:
        memory = _Memory(self.device)
        if timer is not None:
            timer.seconds.clear()
        with memory.measure():
            self.sync()
            start, cpu = time.perf_counter(), time.process_time()
            out = fn()
            self.sync()
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        result.runs.append(seconds)
        self.log(f"  {result.name}: {seconds:.3f} s")  # a run cut short still leaves what it measured
        if not self.device.startswith("cuda"):
            result.cpu_runs.append(cpu)
        result.peak_mb.append(memory.peak_mb)
        return out

    def single(self, pair: ModelPair, prompt: EncodedPrompt, seed: int) -> list[list[Sample]]:
        """Our engine, one answer, no scoring."""
        return pair.sample([prompt], [1], [self.params(seed)])

    def hf_generate(self, pair: ModelPair, prompt: EncodedPrompt, seed: int) -> list[int]:
        """`generate` as a caller without this engine runs it: on the plain weights."""
        with pair.plain_weights():
            return self._hf_generate(pair, prompt, seed)

    def _hf_generate(self, pair: ModelPair, prompt: EncodedPrompt, seed: int) -> list[int]:
        import torch

        from rlaifv.reward.families import stack_vision

        model = pair.policy
        device = pair.device
        dtype = next(model.parameters()).dtype
        ids = prompt.input_ids.to(device).unsqueeze(0)
        vision = stack_vision([prompt], len(prompt), device, dtype)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **vision,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=self.answer_tokens,
                min_new_tokens=self.answer_tokens,
                suppress_tokens=pair.blocked_ids,
                pad_token_id=pair.pad_id,
            )
        return [int(t) for t in out[0, ids.shape[1] :]]

    def naive(self, pair: ModelPair, prompt: EncodedPrompt, n: int, *, packed: bool = False) -> list[float]:
        """N generate calls, then 2N full forwards: the reward as one would write it without this engine.

        On the plain weights unless `packed` (the packed weights' share of the speed-up, apart from the engine's).
        """
        with contextlib.nullcontext() if packed else pair.plain_weights():
            return self._naive(pair, prompt, n)

    def _naive(self, pair: ModelPair, prompt: EncodedPrompt, n: int) -> list[float]:
        import torch

        from rlaifv.reward.logprobs import full_forward_logprobs

        rewards = []
        for i in range(n):
            answer = self._hf_generate(pair, prompt, seed=i)
            with torch.no_grad(), pair.reference_model() as reference:
                ref = float(full_forward_logprobs(reference, prompt, answer).double().sum())
            with torch.no_grad():
                pol = float(full_forward_logprobs(pair.policy, prompt, answer).double().sum())
            rewards.append(pair.reward.beta * (pol - ref) / len(answer))
        return rewards

    def best_of_n(
        self, pair: ModelPair, prompt: EncodedPrompt, n: int, concurrency: int = 1, mode: RewardMode = "dpo"
    ) -> list[Ranking]:
        from rlaifv.reward.model_pair import GenerateTask
        from rlaifv.reward.scoring import RewardConfig

        reward = RewardConfig(mode=mode)
        tasks = [
            GenerateTask(prompt, n, self.params(seed=c), reward, images=[self.image()]) for c in range(concurrency)
        ]
        return pair.generate_batch(tasks)

    # -- the run --------------------------------------------------------------------------------------

    def run(self, checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """All paths; `checkpoint` gets the report as it stands after the full pair (then whole), so a run cut
        short (a time limit on a lent GPU) keeps the full pair's results."""
        import gc

        import torch

        report = self._full_pair()
        report["ratios"] = ratios(report)
        if checkpoint is not None:
            checkpoint(report)
        gc.collect()  # the full pair is gone: on CUDA the LoRA pair's memory is measured alone
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if self.lora:
            try:
                report["lora"] = self._lora()
            except Exception as exc:  # reported, not fatal: the full pair's results stand
                report["lora_error"] = f"{type(exc).__name__}: {exc}"
                self.log(f"LoRA pair failed on {self.shape.name}: {report['lora_error']}")
        report["ratios"] = ratios(report)
        return report

    def _paths(self) -> dict[str, PathResult]:
        t, h = self.answer_tokens, self.headline
        paths = {
            "hf_generate": PathResult("HF generate, one answer, no scoring", tokens=t),
            "single": PathResult("our engine, one answer (sample, n=1)", tokens=t),
        }
        for n in self.ns:
            paths[f"best_of_{n}"] = PathResult(f"our engine, best-of-{n} (generate_batch)", tokens=n * t)
        paths["naive"] = PathResult(f"naive, {h} x generate + 2 full forwards each", tokens=h * t)
        paths["naive_packed"] = PathResult("naive as above, on the packed weights (not the baseline)", tokens=h * t)
        if self.concurrency > 1:
            name = f"{self.concurrency} requests x best-of-{h} in one batch"
            paths["concurrent"] = PathResult(name, tokens=self.concurrency * h * t)
        return paths

    def _full_pair(self) -> dict[str, Any]:
        import torch

        pair = self.load(lora=False)
        prompt = self.prompt(pair)
        params_m = sum(p.numel() for p in pair.policy.parameters()) / 1e6
        self.log(f"{self.shape.name}: {params_m:.1f}M parameters per model, prompt {len(prompt)} tokens")
        timer = _PhaseTimer(self.sync)
        paths = self._paths()
        # Warm-up: first calls pay one-time costs (allocator growth, kernel selection, lazy imports); the largest
        # batches too, or their first round (half a median of two) would carry their allocations.
        self.best_of_n(pair, prompt, self.headline)
        if max(self.ns) > self.headline:
            self.best_of_n(pair, prompt, max(self.ns))
        if self.concurrency > 1:
            self.best_of_n(pair, prompt, self.headline, self.concurrency)
        pair.sample([prompt], [1], [self.params()])
        self.hf_generate(pair, prompt, seed=0)
        headline: Any = None
        with timer.installed():
            for round_ in range(self.repeats):
                self.log(f"round {round_ + 1}/{self.repeats}")
                seed = round_
                self._timed(paths["hf_generate"], partial(self.hf_generate, pair, prompt, seed=seed))
                self._timed(paths["single"], partial(self.single, pair, prompt, seed))
                for n in self.ns:
                    result = paths[f"best_of_{n}"]
                    ranking = self._timed(result, partial(self.best_of_n, pair, prompt, n), timer)[0]
                    for key, value in self._split(ranking.timings, timer.seconds).items():
                        result.split.setdefault(key, []).append(value)
                    if n == self.headline:
                        headline = ranking
                if round_ < self.naive_repeats:
                    self._timed(paths["naive"], lambda: self.naive(pair, prompt, self.headline))
                    if pair.packed:
                        naive_packed = lambda: self.naive(pair, prompt, self.headline, packed=True)  # noqa: E731
                        self._timed(paths["naive_packed"], naive_packed)
                if self.concurrency > 1:
                    self._timed(
                        paths["concurrent"], lambda: self.best_of_n(pair, prompt, self.headline, self.concurrency)
                    )
        report: dict[str, Any] = {
            "shape": self.shape.name,
            "device": self.device,
            "dtype": self.dtype,
            "threads": torch.get_num_threads(),
            "params_m": params_m,
            "prompt_tokens": len(prompt),
            "answer_tokens": self.answer_tokens,
            "headline_n": self.headline,
            "exactness": self._exactness(pair, prompt, headline),
            "model_mb": _param_mb(pair),
            "packed_layers": sum(h.count for h in pair.packed),
            "packed_mb": sum(h.extra_bytes for h in pair.packed) / 2**20,
        }
        if self.claims:
            claims = PathResult(f"best-of-{self.headline}, 'claims' reward", tokens=self.headline * self.answer_tokens)
            try:
                ranking = self._timed(claims, lambda: self.best_of_n(pair, prompt, self.headline, mode="claims")[0])
            except Exception as exc:  # reported, not fatal: the other paths are measured
                report["claims_error"] = f"{type(exc).__name__}: {exc}"
                self.log(f"'claims' reward failed on {self.shape.name}: {report['claims_error']}")
            else:
                claims.split = {k: [v] for k, v in ranking.timings.items()}
                paths["claims"] = claims
        report["paths"] = {k: v.as_dict() for k, v in paths.items() if v.runs}
        if self.dtype != "float32" and self.compare_fp32:
            report["vs_float32"] = self._compare_fp32(prompt, headline)
        return report

    @staticmethod
    def _split(timings: dict[str, float], prefill: dict[str, float]) -> dict[str, float]:
        """The request's time by phase: the engine's own timings, its prefill calls timed apart."""
        generate, score = timings.get("generate_s", 0.0), timings.get("score_s", 0.0)
        policy, reference = prefill.get("policy", 0.0), prefill.get("reference", 0.0)
        return {
            "policy_prefill_s": policy,
            "decode_s": generate - policy,
            "reference_prefill_s": reference,
            "reference_answers_s": score - reference,
            "scoring_s": score,
            "request_s": generate + score,
        }

    def _exactness(self, pair: ModelPair, prompt: EncodedPrompt, ranking: Ranking) -> dict[str, float]:
        """Our engine's log-prob sums against plain full forwards over prefix ++ answer (both models)."""
        import torch

        from rlaifv.reward.logprobs import full_forward_logprobs

        worst_pol = worst_ref = 0.0
        for c in ranking.candidates[:4]:
            with torch.no_grad(), pair.plain_weights(), pair.reference_model() as reference:
                ref = float(full_forward_logprobs(reference, prompt, c.token_ids).double().sum())
            with torch.no_grad(), pair.plain_weights():
                pol = float(full_forward_logprobs(pair.policy, prompt, c.token_ids).double().sum())
            worst_pol = max(worst_pol, abs(pol - c.policy_logprob) / len(c.token_ids))
            worst_ref = max(worst_ref, abs(ref - c.reference_logprob) / len(c.token_ids))
        return {"policy_per_token": worst_pol, "reference_per_token": worst_ref}

    def _compare_fp32(self, prompt: EncodedPrompt, ranking: Ranking) -> dict[str, Any]:
        """Score the headline answers with the float32 pair: how far the reduced-precision reward moves."""
        pair = self.load(lora=False, dtype="float32", pack="off")
        answers = [c.token_ids for c in ranking.candidates]
        pol = pair.sequence_logprobs([prompt], [answers], reference=False)[0]
        ref = pair.sequence_logprobs([prompt], [answers], reference=True)[0]
        exact = [pair.reward.beta * (p - r) / len(a) for p, r, a in zip(pol, ref, answers, strict=True)]
        got = ranking.rewards
        best = max(range(len(exact)), key=lambda i: (exact[i], -i))
        per_token = [
            max(abs(p - c.policy_logprob), abs(r - c.reference_logprob)) / len(a)
            for p, r, a, c in zip(pol, ref, answers, ranking.candidates, strict=True)
        ]
        return {
            "max_abs_logprob_diff_per_token": max(per_token),
            "max_abs_reward_diff": max(abs(a - b) for a, b in zip(exact, got, strict=True)),
            "reward_spread_fp32": max(exact) - min(exact),
            "same_best": best == ranking.best_index,
            "rank_of_chosen_in_fp32": sorted(range(len(exact)), key=lambda i: -exact[i]).index(ranking.best_index) + 1,
        }

    def _lora(self) -> dict[str, Any]:
        pair = self.load(lora=True)
        prompt = self.prompt(pair)
        result = PathResult(f"LoRA pair, best-of-{self.headline}", tokens=self.headline * self.answer_tokens)
        self.best_of_n(pair, prompt, self.headline)
        for _ in range(self.repeats):
            ranking = self._timed(result, lambda: self.best_of_n(pair, prompt, self.headline)[0])
            for key, value in ranking.timings.items():
                result.split.setdefault(key, []).append(value)
        return {"path": result.as_dict(), "model_mb": _param_mb(pair)}


def _param_mb(pair: ModelPair) -> float:
    """Bytes of the pair's weights (a LoRA pair's base counted once)."""
    seen: set[int] = set()
    total = 0
    models = [pair.policy] + ([pair.reference] if pair.reference is not None else [])
    for model in models:
        for p in model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total / 2**20


def ratios(report: dict[str, Any]) -> dict[str, float]:
    """The issue's ratios from a report: speed-up over naive, cost over one answer, scoring share."""
    paths = report["paths"]
    h = report["headline_n"]
    best = paths[f"best_of_{h}"]
    out = {
        "naive_over_best": paths["naive"]["seconds"] / best["seconds"] if "naive" in paths else float("nan"),
        **(
            {"naive_packed_over_best": paths["naive_packed"]["seconds"] / best["seconds"]}
            if "naive_packed" in paths
            else {}
        ),
        "best_over_single": best["seconds"] / paths["single"]["seconds"],
        "best_over_best_of_1": best["seconds"] / paths["best_of_1"]["seconds"]
        if "best_of_1" in paths
        else float("nan"),
        "single_over_hf_generate": paths["single"]["seconds"] / paths["hf_generate"]["seconds"],
        "scoring_share": best["split"]["scoring_s"] / best["split"]["request_s"],
        "reference_answers_share": best["split"]["reference_answers_s"] / best["split"]["request_s"],
    }
    cpu = {k: p.get("cpu_seconds") for k, p in paths.items()}
    if cpu.get(f"best_of_{h}") and cpu.get("single") and cpu.get("naive"):
        # With one thread, process CPU time is what a busy shared machine cannot inflate (time off the CPU).
        out["cpu_naive_over_best"] = cpu["naive"] / cpu[f"best_of_{h}"]
        out["cpu_best_over_single"] = cpu[f"best_of_{h}"] / cpu["single"]
    if "lora" in report:
        out["lora_memory_share"] = report["lora"]["model_mb"] / report["model_mb"]
    if "concurrent" in paths and "naive" in paths:
        many = paths["concurrent"]["tokens"] // best["tokens"]  # requests in the batch
        out["concurrent_requests_per_s"] = many / paths["concurrent"]["seconds"]
        out["throughput_vs_naive"] = out["concurrent_requests_per_s"] * paths["naive"]["seconds"]
    return out


# -- the command ------------------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """Markdown tables of one report (what docs/performance.md quotes)."""
    h, r = report["headline_n"], report["ratios"]
    lines = [
        f"{report['shape']} on {report['device']}, {report['dtype']}, {report['threads']} threads: "
        f"{report['params_m']:.1f}M parameters per model, prompt {report['prompt_tokens']} tokens, "
        f"{report['answer_tokens']}-token answers (end of sequence blocked)",
        "",
        "| path | s (median) | each run, s | CPU s (median) | answer tokens/s | peak MB |",
        "|---|---:|---|---:|---:|---:|",
    ]
    rows = list(report["paths"].values()) + ([report["lora"]["path"]] if "lora" in report else [])
    for p in rows:
        runs = ", ".join(f"{x:.2f}" for x in p["runs"])
        peak = f"{p['peak_mb']:.0f}" if p["peak_mb"] is not None else ""
        cpu = f"{p['cpu_seconds']:.3f}" if p.get("cpu_seconds") else ""
        lines.append(f"| {p['name']} | {p['seconds']:.3f} | {runs} | {cpu} | {p['tokens_per_s']:.0f} | {peak} |")
    lines += [
        "",
        "| split, medians (s) | policy prefill | decode | reference prefill | reference answers | scoring share |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, p in report["paths"].items():
        s = p["split"]
        if key.startswith("best_of_") and s:
            parts = " | ".join(f"{s[k]:.3f}" for k in ("policy_prefill_s", "decode_s", "reference_prefill_s"))
            share = s["scoring_s"] / s["request_s"]
            lines.append(f"| {p['name']} | {parts} | {s['reference_answers_s']:.3f} | {share:.1%} |")
    if "claims" in report["paths"]:
        s = report["paths"]["claims"]["split"]
        lines.append(
            f"\n'claims' reward, best-of-{h}: claims {s.get('claims_s', 0):.3f} s "
            f"after generate {s.get('generate_s', 0):.3f} s + score {s.get('score_s', 0):.3f} s"
        )
    for what in ("claims", "lora"):
        if f"{what}_error" in report:
            lines.append(f"\n{what} failed: {report[f'{what}_error']}")
    exact = report["exactness"]
    lines += [
        "",
        f"- best-of-{h} vs naive: **{r['naive_over_best']:.2f}x** faster (target >= 8x)",
        f"- best-of-{h} / our single answer: **{r['best_over_single']:.2f}x** (target <= 1.6x); "
        f"/ our best-of-1 with scoring: {r['best_over_best_of_1']:.2f}x",
        f"- reward scoring (reference prefill + answer pass) share of the request: **{r['scoring_share']:.1%}** "
        f"(target <= 15 %); the answer pass alone: {r['reference_answers_share']:.1%}",
        f"- our single answer / HF generate: {r['single_over_hf_generate']:.2f}x",
        *(
            [
                f"- weights packed for oneDNN: {report['packed_layers']} linear layers, "
                f"{report['packed_mb']:.0f} MB more memory; the naive way on them too: "
                f"{r['naive_packed_over_best']:.2f}x slower than best-of-{h}"
            ]
            if report.get("packed_layers") and "naive_packed_over_best" in r
            else []
        ),
        *(
            [
                f"- in process CPU time: best-of-{h} vs naive {r['cpu_naive_over_best']:.2f}x, "
                f"best-of-{h} / single answer {r['cpu_best_over_single']:.2f}x"
            ]
            if "cpu_naive_over_best" in r
            else []
        ),
        f"- max |log-prob - plain forward| per token: policy {exact['policy_per_token']:.1e}, "
        f"reference {exact['reference_per_token']:.1e}",
    ]
    if "throughput_vs_naive" in r:
        lines.append(
            f"- batched requests: {r['concurrent_requests_per_s']:.2f} best-of-{h} requests/s, "
            f"{r['throughput_vs_naive']:.1f}x the naive way's throughput"
        )
    if "lora_memory_share" in r:
        lines.append(
            f"- weights: full pair {report['model_mb']:.0f} MB, LoRA pair {report['lora']['model_mb']:.0f} MB "
            f"({r['lora_memory_share']:.0%})"
        )
    if "vs_float32" in report:
        v = report["vs_float32"]
        lines.append(
            f"- {report['dtype']} vs float32 on the same {h} answers: max |reward diff| {v['max_abs_reward_diff']:.2e} "
            f"(log-prob sums: {v.get('max_abs_logprob_diff_per_token', float('nan')):.1e} per token) "
            f"(float32 reward spread {v['reward_spread_fp32']:.2e}), same best: {v['same_best']}, "
            f"float32 rank of the chosen answer: {v['rank_of_chosen_in_fp32']}"
        )
    return "\n".join(lines)


def _batch_size(value: int) -> int:
    """--concurrency: a batch of requests is 2 or more (1 or a negative count measured nothing, silently)."""
    if value == 1 or value < 0:
        raise typer.BadParameter(f"0 (skip) or at least 2, got {value}")
    return value


def bench_engine(
    shape: Annotated[str, typer.Option(help=f"Model shape(s), comma-separated: {', '.join(SHAPES)}.")] = "cpu",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 (default: float32 on CPU, bfloat16 on CUDA).")] = "",
    threads: Annotated[int, typer.Option(min=1, help="torch threads (CPU).")] = 2,
    n: Annotated[str, typer.Option("--n", "-n", help="Best-of-N sizes, comma-separated.")] = "1,4,8,16",
    headline: Annotated[int, typer.Option(help="The N of the ratios, naive path and LoRA pair.")] = 8,
    answer_tokens: Annotated[int, typer.Option(min=0, help="Tokens per answer (0: 64 on CPU, 128 on CUDA).")] = 0,
    repeats: Annotated[int, typer.Option(help="Rounds of every path (medians reported).")] = 3,
    naive_repeats: Annotated[
        int, typer.Option(min=0, help="Rounds that also run the naive path (0: skip it; at most --repeats run).")
    ] = 3,
    lora: Annotated[bool, typer.Option(help="Also measure the LoRA pair.")] = True,
    claims: Annotated[bool, typer.Option(help="Also time the 'claims' reward once.")] = True,
    concurrency: Annotated[
        int,
        typer.Option(
            callback=_batch_size, help="Also time this many (2 or more) best-of-N requests in one batch (0: skip)."
        ),
    ] = 0,
    pack_weights: Annotated[
        str, typer.Option(help="auto, on, off: our engine's CPU linears on packed weights (RLAIFV_PACK_WEIGHTS).")
    ] = "auto",
    output: Annotated[
        Path | None, typer.Option(help="Write the reports as JSON here (and Markdown beside it).")
    ] = None,
) -> None:
    """Naive vs HF generate vs our single answer vs our best-of-N, with the split, tokens/s and memory."""
    import torch

    on_cuda = device.startswith("cuda")
    if not dtype:
        dtype = "bfloat16" if on_cuda else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter("float32 or bfloat16", param_hint="--dtype")
    pack_modes: dict[str, PackMode] = {"auto": "auto", "on": "on", "off": "off"}  # the option, checked and typed
    pack = pack_modes.get(pack_weights)
    if pack is None:
        raise typer.BadParameter("auto, on or off", param_hint="--pack-weights")
    try:
        ns = tuple(int(x) for x in n.split(","))
    except ValueError:
        raise typer.BadParameter(f"comma-separated counts, got {n!r}", param_hint="--n") from None
    if min(ns) < 1 or headline < 1 or repeats < 1:
        raise typer.BadParameter("--n, --headline and --repeats must be at least 1", param_hint="--n")
    if headline not in ns:  # its run is the one the ratios, the exactness and the fp32 comparison read
        raise typer.BadParameter(f"--headline {headline} must be one of --n {n}", param_hint="--headline")
    unknown = [name for name in shape.split(",") if name not in SHAPES]
    if unknown:  # before the first shape's run, not after it
        raise typer.BadParameter(f"unknown shape {unknown[0]!r}; known: {', '.join(SHAPES)}", param_hint="--shape")
    torch.set_num_threads(threads)
    reports: list[dict[str, Any]] = []
    for name in shape.split(","):
        bench = EngineBench(
            SHAPES[name],
            device=device,
            dtype=dtype,
            ns=ns,
            headline=headline,
            answer_tokens=answer_tokens or (128 if on_cuda else 64),
            repeats=repeats,
            naive_repeats=naive_repeats,
            lora=lora,
            claims=claims,
            concurrency=concurrency,
            pack_weights=pack,
            compare_fp32=not on_cuda,  # a float32 copy of a 7B pair costs more device time than it tells
            log=lambda s: print(s, flush=True),
        )
        report = bench.run(checkpoint=lambda partial: _write(output, [*reports, _stamp(partial, on_cuda)]))
        text = render(_stamp(report, on_cuda))
        print(f"\n{report['date']}, {report['machine']}\n{text}\n", flush=True)
        reports.append(report)
        _write(output, reports)


def _stamp(report: dict[str, Any], on_cuda: bool) -> dict[str, Any]:
    """The report with when, where and with which versions it was measured."""
    import torch
    import transformers

    report["date"] = datetime.date.today().isoformat()
    report["machine"] = torch.cuda.get_device_name() if on_cuda else cpu_name()
    report["torch"] = torch.__version__
    report["transformers"] = transformers.__version__
    return report


def _write(output: Path | None, reports: list[dict[str, Any]]) -> None:
    """The reports as JSON, and as Markdown beside it (rewritten whole after every checkpoint)."""
    if output is None:
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(reports, indent=1) + "\n")
    output.with_suffix(".md").write_text("\n\n".join(render(r) for r in reports) + "\n")


if __name__ == "__main__":
    typer.run(bench_engine)
