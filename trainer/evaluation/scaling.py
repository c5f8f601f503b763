"""Inference-time scaling: metrics vs N for best-of-N by each reward and for a random pick.

max(N) candidates are sampled once per prompt; best-of-N for every smaller N looks at the first N of them
(prefixes of the same list), so every point of the curve is computed on the same samples and the whole
curve costs one sampling pass. World-agnostic: the caller gives the prompts and a metric over the picked
answers (CHAIR on COCO for Object HalBench, CHAIR over colour-shape objects in the shapes world, a judge).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlaifv.trainer.evaluation.candidates import (
    CandidateCache,
    Generator,
    Prompt,
    Rule,
    Sampled,
    Sampling,
    picked_texts,
    sample_all,
)
from rlaifv.trainer.evaluation.report import fmt, markdown_table

Metric = Callable[[Sequence[str]], dict[str, Any]]
LABELS = {
    "dpo": "best-of-N by the implicit reward (dpo)",
    "claims": "best-of-N by claim verification (claims)",
    "random": "random pick (mean of draws)",
}


def parse_ns(text: str) -> list[int]:
    """ "1,2,4,8" -> [1, 2, 4, 8] (sorted, unique, positive)."""
    try:
        ns = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not ns or ns[0] < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return ns


def _mean(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Key-wise mean of metric dicts (nested dicts averaged recursively; other values from the first run).

    A metric a run could not compute (None, or missing: a question type no judged item had) is left out of its
    mean; None if no run has it."""
    out: dict[str, Any] = {}
    keys = list(dict.fromkeys(key for run in runs for key in run))
    for key in keys:
        values = [run[key] for run in runs if run.get(key) is not None]
        if not values:
            out[key] = None
            continue
        first = values[0]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if isinstance(first, dict):
            out[key] = _mean([v for v in values if isinstance(v, dict)])
        elif numbers and len(numbers) == len(values):
            out[key] = sum(numbers) / len(numbers)
        else:
            out[key] = first
    return out


def curve(
    prompts: Sequence[Prompt],
    sampled: Sequence[Sampled],
    ns: Sequence[int],
    rules: Sequence[Rule],
    metric: Metric,
    *,
    seed: int = 0,
    random_draws: int = 1,
) -> dict[str, dict[str, dict[str, Any]]]:
    """rule -> str(N) -> metrics of the answers the rule picks among the first N candidates.

    The random pick's value at N is the mean over `random_draws` independent picks: one draw is a single
    sample of the model and scatters around its mean, which a plot would show as a trend.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for rule in rules:
        draws = random_draws if rule == "random" else 1
        out[rule] = {
            str(n): _mean([metric(picked_texts(prompts, sampled, rule, n, seed=seed + d)) for d in range(draws)])
            for n in ns
        }
    return out


def run_scaling(
    generator: Generator,
    prompts: Sequence[Prompt],
    ns: Sequence[int],
    metric: Metric,
    sampling: Sampling,
    *,
    modes: Sequence[str] = ("dpo", "claims"),
    cache: CandidateCache | None = None,
    batch: int = 8,
    random_draws: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample max(ns) candidates per prompt once (or take them from the cache), then the curve of every rule."""
    rules: list[Rule] = [m for m in ("dpo", "claims") if m in modes] + ["random"]
    sampled, fresh = sample_all(
        generator, prompts, max(ns), sampling, claims="claims" in modes, cache=cache, batch=batch, progress=progress
    )
    return {
        "curve": curve(prompts, sampled, ns, rules, metric, seed=sampling.seed, random_draws=random_draws),
        "ns": list(ns),
        "random_draws": random_draws,
        "rules": list(rules),
        "prompts": len(prompts),
        "sampled_now": fresh,
    }


def curve_table(result: dict[str, Any], metrics: Sequence[str], *, percent: Sequence[str] = ()) -> str:
    """Markdown: one row per (metric, rule), one column per N; metrics in `percent` shown x100."""
    ns = result["ns"]
    rows = []
    for m in metrics:
        for rule in result["rules"]:
            values = [result["curve"][rule][str(n)][m] for n in ns]
            cells = [fmt(v) if v is None or m not in percent else f"{100 * v:.1f}" for v in values]
            rows.append([f"{m}{' %' if m in percent else ''}", rule, *cells])
    return markdown_table(["metric", "selection", *(f"N={n}" for n in ns)], rows)


def plot_curve(
    result: dict[str, Any], metrics: Sequence[str], path: str | Path, *, title: str = "", percent: Sequence[str] = ()
) -> Path:
    """One panel per metric: metric vs N (log2 axis), a line per rule, the random pick dashed."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'rlaifv[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), dpi=110, squeeze=False)
    ns = result["ns"]
    for ax, metric in zip(axes[0], metrics, strict=True):
        scale = 100 if metric in percent else 1
        for rule in result["rules"]:
            points = [result["curve"][rule][str(n)][metric] for n in ns]
            values = [float("nan") if v is None else scale * v for v in points]  # a gap where nothing was judged
            style = "--" if rule == "random" else "-"
            ax.plot(ns, values, style, marker="o", label=LABELS.get(rule, rule))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N (candidates sampled)")
        ax.set_ylabel(f"{metric}{' (%)' if scale == 100 else ''}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or f"{result['prompts']} prompts")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
