"""`rlaifv eval objhal|amber|mmhal|shapes|compare`: the trustworthiness numbers the RLAIF-V paper reports.

Each benchmark scores answers already written (`--answers`), or generates them from a bundle in this
process (`--bundle PATH`, `default`: the shipped shapes world) or from a running `rlaifv serve`
(`--service URL`): plain (`-n 1`), best-of-N by the self-reward (`-n 8 --select dpo|claims`) or a random
pick of N (`--select random`). `--best-of 1,2,4,8,16,32` is the inference-time scaling mode: the
largest N is sampled once per prompt and every smaller N reuses its first candidates; each reward mode
and a random pick get a curve (`--plot FILE.png`, a table in the report). Every run writes a JSON report
and a Markdown table; generations, LLM extractions and judgements are cached beside the report, so a
rerun only redoes what changed. docs/evaluation.md has the formats and the differences from the originals.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from rlaifv.cli.eval_run import (
    USER_ERRORS,
    Source,
    above_zero,
    bad_option,
    best_of_list,
    check_block,
    default_cache,
    fail,
    http_url,
    one_authorization,
    reward_modes,
    set_threads,
    user_error,
    warn,
    write_scaling,
)
from rlaifv.trainer.evaluation.candidates import Rule, Sampling

if TYPE_CHECKING:
    from rlaifv.trainer.evaluation.report import Report

eval_app = typer.Typer(
    help="Object HalBench, AMBER, MMHal-Bench and best-of-N scaling curves, on local benchmark files.",
    no_args_is_help=True,
    add_completion=False,
)

Output = Annotated[Path, typer.Option("--output", "-o", help="JSON report (a .md table is written beside it).")]
Name = Annotated[str, typer.Option(help="What is evaluated (the report's column name in `compare`).")]
Bundle = Annotated[
    str | None, typer.Option(help="Generate answers with this bundle in process ('default': the shipped shapes world).")
]
Service = Annotated[
    str | None, typer.Option(callback=http_url, help="Generate answers with a running `rlaifv serve` at this URL.")
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        envvar=["RLAIFV_EVAL_API_KEY", "RLAIFV_API_KEY"],
        help="The service's API key (else the Python client's RLAIFV_API_KEY).",
    ),
]
ServiceMaxN = Annotated[int, typer.Option(min=1, help="Candidates per service request at most (its RLAIFV_MAX_N).")]
N = Annotated[int, typer.Option("-n", min=1, help="Candidates sampled per prompt.")]
Select = Annotated[Rule, typer.Option(help="Which candidate is the answer: first, random, dpo or claims.")]
BestOf = Annotated[
    str | None,
    typer.Option(
        callback=best_of_list, help="Scaling mode: comma-separated N, e.g. 1,2,4,8,16,32 (replaces -n/--select)."
    ),
]
Modes = Annotated[
    str,
    typer.Option(
        callback=reward_modes, help="Scaling mode: reward modes to select by (a random pick is always added)."
    ),
]
Plot = Annotated[Path | None, typer.Option(help="Scaling mode: write the curve here (PNG).")]
RandomDraws = Annotated[
    int, typer.Option(min=1, help="Scaling mode: random picks averaged per point (each costs a metric evaluation).")
]
Doc = Annotated[
    Path | None,
    typer.Option(help="Scaling mode: put the table and figure in this Markdown file's '<!-- begin: NAME -->' block."),
]
Temperature = Annotated[
    float | None,
    typer.Option(min=0, max=5, help="Sampling temperature (default: 0 for one plain answer, else 0.7 as RLAIF-V)."),
]
# Only in process: sent to a service, 512 was a 400 from a default `rlaifv serve` (RLAIFV_MAX_TOKENS 256, and the
# shipped model's 256 positions), so without --max-tokens a service answers with its own default.
IN_PROCESS_MAX_TOKENS = 512
MaxTokens = Annotated[
    int | None,
    typer.Option(
        min=1,
        help=f"Most new tokens per answer (default: {IN_PROCESS_MAX_TOKENS} with --bundle; with --service, the"
        " service's own default, RLAIFV_DEFAULT_MAX_TOKENS; either way fitted to the model's context).",
    ),
]
Seed = Annotated[
    int, typer.Option(min=0, help="Sampling seed (each prompt's own seed is made of it and the prompt id).")
]
Cache = Annotated[Path | None, typer.Option(help="Candidate cache (JSONL; default: <output>.candidates.jsonl).")]
Batch = Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")]
Threads = Annotated[
    int | None, typer.Option(min=1, help="torch threads (default: RLAIFV_TORCH_THREADS, else torch's).")
]
Images = Annotated[Path | None, typer.Option(help="Folder of the benchmark's images (for generating answers).")]


SOURCE_OPTIONS = (
    "bundle", "service", "api_key", "service_max_n", "n", "select", "best_of", "modes", "temperature", "max_tokens",
    "seed", "cache", "batch", "threads", "random_draws",
)  # fmt: skip


def _sampling(o: dict[str, Any]) -> Sampling:
    """Decoding settings; no --max-tokens leaves the answer length to the service (None: its default, fitted),
    or is `IN_PROCESS_MAX_TOKENS` in process."""
    temperature = o["temperature"]
    if temperature is None:
        temperature = 0.0 if o["n"] == 1 and not o["best_of"] else 0.7
    if o["max_tokens"] is None and o.get("service") is not None:
        return Sampling(temperature=temperature, max_tokens=None, seed=o["seed"])
    return Sampling(temperature=temperature, max_tokens=o["max_tokens"] or IN_PROCESS_MAX_TOKENS, seed=o["seed"])


def _source(output: Path, options: dict[str, Any]) -> Source:
    """The generation options a command received (its `locals()`) as a `Source`, checked before any work."""
    o: dict[str, Any] = {"n": 1, "select": "first", "service_max_n": 16} | {
        key: options[key] for key in SOURCE_OPTIONS if key in options
    }
    one_authorization(o.get("service"), o.get("api_key"), "--service", "--api-key", "RLAIFV_EVAL_API_KEY")
    src = Source(
        bundle=o.get("bundle"),
        service=o.get("service"),
        api_key=o.get("api_key"),
        service_max_n=o["service_max_n"],
        n=o["n"],
        select=o["select"],
        best_of=o["best_of"],
        modes=o["modes"],
        sampling=_sampling(o),
        cache=o["cache"] or default_cache(output),
        batch=o["batch"],
        random_draws=o.get("random_draws") or 1,
    )
    src.check(answers=options.get("answers") is not None)
    if options.get("doc") is not None:
        from rlaifv.trainer.evaluation.report import report_name

        check_block(options["doc"], options.get("name") or report_name(output))
    set_threads(o["threads"])
    return src


def _print(markdown: str) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(markdown))


def _cause(causes: list[str]) -> str:
    """The first failure's error, so an unreachable judge or a bad key is named on the console."""
    return f"; first error: {causes[0]}" if causes else ""


def _finish(report: Report, output: Path, *, incomplete: int = 0) -> None:
    from rlaifv.trainer.evaluation.report import report_markdown, write_report

    json_path, md_path = write_report(report, output)
    _print(report_markdown(report))
    typer.echo(f"wrote {json_path} and {md_path}")
    if incomplete:
        raise _incomplete(report, incomplete)


def _incomplete(report: Report, failed: int) -> typer.Exit:
    from rlaifv.trainer.evaluation.report import failure_causes

    return fail(
        f"incomplete: {failed} item(s) failed (recorded in the report); rerun to retry them"
        + _cause(failure_causes(report.items)),
        code=2,
    )


def _fail_if_incomplete(result: dict[str, Any], causes: list[str] | None = None) -> None:
    """A scaling run whose judge or extractor failed on some items: its points average fewer answers than they
    say, so the run exits 2 as a single evaluation would (the report records the failures per point)."""
    failed = max(
        (
            float(point.get("failed", 0) or 0) + float(point.get("extraction_failed", 0) or 0)
            for per_n in result.get("curve", {}).values()
            for point in per_n.values()
        ),
        default=0.0,
    )
    if failed:
        raise fail(
            f"incomplete: up to {failed:g} item(s) per point failed (recorded in the report); rerun"
            + _cause(causes or []),
            code=2,
        )


def _points(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """A report's metrics flattened (`overall.unparsed`), or each point of its curve (already flat)."""
    from rlaifv.trainer.evaluation.report import flatten

    curve = metrics.get("curve")
    return [p for per_n in curve.values() for p in per_n.values()] if curve else [flatten(metrics)]


def _check_unread(counts: Sequence[tuple[float, float]], what: str, says: str) -> None:
    """Answers (AMBER) or judge replies (MMHal) that the parser cannot read count as wrong or as 0: warn about any,
    and fail (exit 1, after the report is written) when more than half are at any point of a curve: then the
    number measures the parser, not the model (the wrong --match, a judge that writes its rating another way).
    `counts` holds (unread, out of) per point; the message is "<n> of <m> <what> (<share>) <says>"."""
    share, unread, total = max((u / t if t else 0.0, u, t) for u, t in counts)
    if not unread:
        return
    message = f"{unread:g} of {total:g} {what} ({share:.0%}) {says}"
    if share > 0.5:
        raise fail(message)
    warn(message)


def _check_unparsed(metrics: dict[str, Any], match: str, items: list[dict[str, Any]]) -> None:
    """AMBER answers that are neither yes nor no count as wrong (the wrong --match for the answers' wording, or a
    model that does not answer yes/no)."""
    counts = [(p["overall.unparsed"], p["overall.questions"]) for p in _points(metrics)]
    example = next((f" (e.g. {i['response'][:60]!r})" for i in items if i.get("answer") is None), "")
    hint = "try --match first-word" if match == "exact" else "the answers do not start with yes or no"
    _check_unread(counts, "answers", f"are neither yes nor no by --match {match}{example} and count as wrong; {hint}")


def _check_unrated(metrics: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """MMHal judgements without a rating count as 0, as in the original (a judge that writes it another way, or
    a --template that does not ask for "Rating: N")."""
    counts = [(p["unparsed"], p["rated"] + p["unparsed"]) for p in _points(metrics)]
    example = next((f" (e.g. {str(i['review'])[:60]!r})" for i in items if i.get("status") == "unparsed"), "")
    _check_unread(
        counts,
        "judgements",
        f"have no rating{example} and count as 0 (they are asked again on the next run); the judge must answer"
        " 'Rating: N' (0-6) as the prompt asks: check --judge-model and --template",
    )


def _say_reused(count: int, path: Path) -> None:
    """Judgements taken from an earlier run's store: said, so a score that does not move is not a mystery."""
    if count:
        typer.secho(
            f"{count} judgement(s) taken from {path} (an earlier run, same judge and prompt); delete it or give"
            " another --results to judge them again",
            err=True,
        )


@eval_app.command("objhal")
def objhal(
    output: Output,
    coco: Annotated[
        Path | None, typer.Option(help="COCO annotations folder (instances_*2014.json, captions_*2014.json).")
    ] = None,
    instances: Annotated[list[Path] | None, typer.Option(help="COCO instances JSON (instead of --coco).")] = None,
    captions: Annotated[list[Path] | None, typer.Option(help="COCO captions JSON (instead of --coco).")] = None,
    answers: Annotated[Path | None, typer.Option(help="Answers JSONL: image_id, question, answer (or text).")] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts JSONL to generate for (e.g. obj_halbench_300_with_image.jsonl).")
    ] = None,
    images: Images = None,
    extractor: Annotated[
        Literal["rules", "llm"], typer.Option(help="Object extraction: rules (spaCy + table) or llm.")
    ] = "rules",
    synonyms: Annotated[Path | None, typer.Option(help="Another synonym table (our format).")] = None,
    llm_url: Annotated[
        str | None, typer.Option(callback=http_url, help="--extractor llm: OpenAI-compatible base URL.")
    ] = None,
    llm_model: Annotated[str | None, typer.Option(help="--extractor llm: model name.")] = None,
    llm_key: Annotated[str | None, typer.Option(envvar="RLAIFV_EVAL_LLM_KEY", help="--extractor llm: key.")] = None,
    llm_concurrency: Annotated[int, typer.Option(min=1, help="--extractor llm: requests in flight.")] = 8,
    llm_timeout: Annotated[
        float, typer.Option(callback=above_zero, help="--extractor llm: seconds per attempt.")
    ] = 60.0,
    llm_retries: Annotated[int, typer.Option(min=0, help="--extractor llm: retries per answer.")] = 3,
    llm_backoff: Annotated[float, typer.Option(min=0, help="--extractor llm: seconds before the first retry.")] = 1.0,
    name: Name = "",
    bundle: Bundle = None,
    service: Service = None,
    api_key: ApiKey = None,
    service_max_n: ServiceMaxN = 16,
    n: N = 1,
    select: Select = "first",
    best_of: BestOf = None,
    modes: Modes = "dpo,claims",
    plot: Plot = None,
    random_draws: RandomDraws = 1,
    doc: Doc = None,
    temperature: Temperature = None,
    max_tokens: MaxTokens = None,
    seed: Seed = 0,
    cache: Cache = None,
    batch: Batch = 8,
    threads: Threads = None,
) -> None:
    """Object HalBench: CHAIRi, CHAIRs and RLAIF-V's response-level CHAIRs from COCO 2014 annotations."""
    from rlaifv.trainer.evaluation.coco_objects import CocoObjects
    from rlaifv.trainer.evaluation.coco_truth import find_annotation_files, ground_truth
    from rlaifv.trainer.evaluation.llm import ChatSettings
    from rlaifv.trainer.evaluation.llm_objects import LLMObjectExtractor
    from rlaifv.trainer.evaluation.objhal import (
        Answer,
        evaluate_objhal,
        objhal_metric,
        read_answers,
        read_prompts,
    )
    from rlaifv.trainer.evaluation.report import Report, report_name, sibling

    src = _source(output, locals())
    if coco is None and not (instances and captions):
        raise bad_option("--coco", "give --coco DIR, or --instances and --captions files")
    if extractor == "llm":
        if not (llm_url and llm_model):
            raise bad_option("--extractor", "llm needs --llm-url and --llm-model")
        one_authorization(llm_url, llm_key, "--llm-url", "--llm-key", "RLAIFV_EVAL_LLM_KEY")
    if answers is None and (prompts is None or not src.generates):
        raise bad_option("--answers", "give --answers FILE, or --prompts FILE with --bundle or --service")
    causes: list[str] = []
    try:
        objects = CocoObjects(synonyms)
        if coco is not None:
            instances, captions = find_annotation_files(coco)
        assert instances is not None and captions is not None  # --coco, else both files: checked above
        llm = None
        if extractor == "llm":
            assert llm_url is not None and llm_model is not None  # checked above
            settings = ChatSettings(
                url=llm_url,
                model=llm_model,
                api_key=llm_key,
                concurrency=llm_concurrency,
                timeout_s=llm_timeout,
                retries=llm_retries,
                backoff_s=llm_backoff,
            )
            llm = LLMObjectExtractor(settings, objects, store=sibling(output, ".objects.jsonl"))
        if answers is not None:
            rows = read_answers(answers)
            truth = ground_truth({a.image_id for a in rows}, instances, captions, objects)
            result = evaluate_objhal(rows, truth, objects=objects, llm=llm)
            settings_out: dict[str, Any] = {"answers": str(answers)}
        else:
            assert prompts is not None  # checked above
            pairs = read_prompts(prompts, images)
            truth = ground_truth({i for _, i in pairs}, instances, captions, objects)
            settings_out = {"prompts": str(prompts), **src.settings()}
            if best_of:
                metric = objhal_metric(pairs, truth, objects=objects, llm=llm, errors=causes)
                result = {"metrics": src.scaling([p for p, _ in pairs], metric)}
            else:
                texts = src.answers([p for p, _ in pairs])
                rows = [
                    Answer(image_id=i, question=p.question, answer=t) for (p, i), t in zip(pairs, texts, strict=True)
                ]
                result = evaluate_objhal(rows, truth, objects=objects, llm=llm)
    except USER_ERRORS as exc:
        raise user_error(exc) from None
    settings_out["extractor"] = extractor
    report = Report(benchmark="objhal", name=name or report_name(output), settings=settings_out, **result)
    if best_of:
        metrics = ["chair_i", "chair_s_object_answers", "recall"]
        title = f"Object HalBench vs N ({report.name})"
        _print(write_scaling(report, output, metrics=metrics, percent=metrics[:2], plot=plot, doc=doc, title=title))
        _fail_if_incomplete(report.metrics, causes)
        return
    if report.metrics["chair_i"] is None and report.metrics["answers"] and not report.metrics.get("extraction_failed"):
        warn("no answer names a COCO object (answers of three words or fewer name none): CHAIR is n/a")
    _finish(report, output, incomplete=int(result["metrics"].get("extraction_failed", 0)))


@eval_app.command("amber")
def amber(
    output: Output,
    annotations: Annotated[Path, typer.Option(help="AMBER data/annotations.json.")],
    answers: Annotated[Path | None, typer.Option(help="Answers: JSON list (or JSONL) of {id, response}.")] = None,
    queries: Annotated[
        Path | None, typer.Option(help="Queries to generate for (data/query/query_discriminative.json).")
    ] = None,
    images: Images = None,
    match: Annotated[
        Literal["exact", "first-word"] | None,
        typer.Option(
            help='\'exact\' (the official "Yes"/"No") or \'first-word\' ("Yes, there is" is yes); default: exact'
            " for --answers, first-word for answers generated here."
        ),
    ] = None,
    name: Name = "",
    bundle: Bundle = None,
    service: Service = None,
    api_key: ApiKey = None,
    service_max_n: ServiceMaxN = 16,
    n: N = 1,
    select: Select = "first",
    best_of: BestOf = None,
    modes: Modes = "dpo,claims",
    plot: Plot = None,
    random_draws: RandomDraws = 1,
    doc: Doc = None,
    temperature: Temperature = None,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Most new tokens per answer (a yes or no; sent to a --service too).")
    ] = 16,
    seed: Seed = 0,
    cache: Cache = None,
    batch: Batch = 8,
    threads: Threads = None,
) -> None:
    """AMBER discriminative accuracy, precision, recall and F1 ("no" positive), overall and per dimension."""
    from rlaifv.trainer.evaluation.amber import (
        Response,
        amber_metric,
        check_scorable,
        evaluate_amber,
        read_annotations,
        read_queries,
        read_responses,
    )
    from rlaifv.trainer.evaluation.report import Report, flatten, report_name

    src = _source(output, locals())
    if answers is None and (queries is None or images is None or not src.generates):
        raise bad_option(
            "--answers", "give --answers FILE, or --queries FILE and --images DIR with --bundle or --service"
        )
    match = match or ("exact" if answers is not None else "first-word")
    try:
        truth = read_annotations(annotations)
        if answers is not None:
            result = evaluate_amber(read_responses(answers), truth, match=match)
            settings: dict[str, Any] = {"answers": str(answers)}
        else:
            assert queries is not None and images is not None  # checked above
            prompts = read_queries(queries, images)
            check_scorable([int(p.id) for p in prompts], truth)
            settings = {"queries": str(queries), **src.settings()}
            if best_of:
                metric = amber_metric(prompts, truth, match)
                result = {"metrics": src.scaling(prompts, lambda texts: flatten(metric(texts)))}
            else:
                texts = src.answers(prompts)
                rows = [Response(id=int(p.id), response=t) for p, t in zip(prompts, texts, strict=True)]
                result = evaluate_amber(rows, truth, match=match)
    except USER_ERRORS as exc:
        raise user_error(exc) from None
    report = Report(
        benchmark="amber", name=name or report_name(output), settings={**settings, "match": match}, **result
    )
    if best_of:
        metrics = ["overall.accuracy", "overall.f1"]
        title = f"AMBER vs N ({report.name})"
        _print(write_scaling(report, output, metrics=metrics, percent=metrics, plot=plot, doc=doc, title=title))
    else:
        _finish(report, output)
    _check_unparsed(report.metrics, match, report.items)


@eval_app.command("mmhal")
def mmhal(
    output: Output,
    records: Annotated[Path, typer.Option(help="MMHal-Bench response file (JSON list of the 96 records).")],
    judge_url: Annotated[
        str, typer.Option(callback=http_url, help="Judge: OpenAI-compatible base URL, e.g. http://host:8001/v1.")
    ],
    judge_model: Annotated[str, typer.Option(help="Judge: model name.")],
    judge_key: Annotated[str | None, typer.Option(envvar="RLAIFV_EVAL_JUDGE_KEY", help="Judge: API key.")] = None,
    answers: Annotated[
        Path | None, typer.Option(help="Answers JSONL in record order (else the records' model_answer).")
    ] = None,
    images: Images = None,
    template: Annotated[
        Path | None, typer.Option(help="Judge prompt with {contents} {question} {reference} {answer}.")
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="Judgement store (JSONL; default <output>.judged.jsonl): makes reruns resume.")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Judge requests in flight.")] = 4,
    timeout: Annotated[float, typer.Option(callback=above_zero, help="Seconds per judge attempt.")] = 120.0,
    retries: Annotated[int, typer.Option(min=0, help="Retries per item (timeouts, errors, no rating).")] = 3,
    backoff: Annotated[float, typer.Option(min=0, help="Seconds before the first retry (doubles per retry).")] = 1.0,
    name: Name = "",
    bundle: Bundle = None,
    service: Service = None,
    api_key: ApiKey = None,
    service_max_n: ServiceMaxN = 16,
    n: N = 1,
    select: Select = "first",
    best_of: BestOf = None,
    modes: Modes = "dpo,claims",
    plot: Plot = None,
    random_draws: RandomDraws = 1,
    doc: Doc = None,
    temperature: Temperature = None,
    max_tokens: MaxTokens = None,
    seed: Seed = 0,
    cache: Cache = None,
    batch: Batch = 8,
    threads: Threads = None,
) -> None:
    """MMHal-Bench: judge ratings 0-6, score, hallucination rate (< 3) and per question type."""
    from rlaifv.service.urls import without_credentials
    from rlaifv.trainer.evaluation.llm import ChatSettings
    from rlaifv.trainer.evaluation.mmhal import (
        RUBRIC,
        evaluate_mmhal,
        mmhal_metric,
        mmhal_prompts,
        read_records,
        read_template,
        require_answers,
    )
    from rlaifv.trainer.evaluation.report import Report, report_name, sibling
    from rlaifv.trainer.evaluation.store import JsonlStore

    src = _source(output, locals())
    if src.generates and images is None:
        raise bad_option("--images", "generating MMHal answers needs --images DIR (MMHal-Bench's images folder)")
    one_authorization(judge_url, judge_key, "--judge-url", "--judge-key", "RLAIFV_EVAL_JUDGE_KEY")
    store_path = results or sibling(output, ".judged.jsonl")
    store = JsonlStore(store_path)
    causes: list[str] = []
    try:
        judge = ChatSettings(
            url=judge_url, model=judge_model, api_key=judge_key, concurrency=concurrency, timeout_s=timeout,
            retries=retries, backoff_s=backoff,
        )  # fmt: skip
        prompt = read_template(template) if template else RUBRIC
        items = read_records(records, answers)
        shown_url = without_credentials(judge_url)[1]  # reports are shared: no user, password or query key in them
        settings: dict[str, Any] = {"records": str(records), "judge": judge_model, "judge_url": shown_url}
        settings["template"] = str(template or "ours")
        if src.generates:
            assert images is not None  # checked above
            prompts = mmhal_prompts(items, images)
            settings |= src.settings()
            if best_of:
                metric = mmhal_metric(items, judge, store, template=prompt, errors=causes)
                result = {"metrics": src.scaling(prompts, metric)}
            else:
                texts = src.answers(prompts)
                items = [r.model_copy(update={"model_answer": t}) for r, t in zip(items, texts, strict=True)]
                result = evaluate_mmhal(items, judge, store, template=prompt)
        else:
            require_answers(items, answers or records)
            result = evaluate_mmhal(items, judge, store, template=prompt)
    except USER_ERRORS as exc:
        raise user_error(exc) from None
    report = Report(benchmark="mmhal", name=name or report_name(output), settings=settings, **result)
    _say_reused(len(store.reused), store_path)
    if best_of:
        metrics = ["score", "hallucination_rate"]
        title = f"MMHal-Bench vs N ({report.name})"
        _print(write_scaling(report, output, metrics=metrics, percent=metrics[1:], plot=plot, doc=doc, title=title))
        _check_unrated(report.metrics, report.items)
        _fail_if_incomplete(report.metrics, causes)
        return
    if report.metrics["empty_answers"]:
        warn(f"{report.metrics['empty_answers']} answer(s) are empty: judged as they are (usually rated 0)")
    _finish(report, output)
    _check_unrated(report.metrics, report.items)
    if report.metrics["failed"]:
        raise _incomplete(report, int(report.metrics["failed"]))


@eval_app.command("shapes")
def shapes(
    output: Output,
    bundle: Annotated[str, typer.Option(help="A shapes-world bundle ('default': the shipped one).")] = "default",
    images: Annotated[int, typer.Option(min=1, help="Held-out images (prompts).")] = 200,
    scene_seed: Annotated[int, typer.Option(help="Seed of the held-out scenes.")] = 0,
    best_of: Annotated[str, typer.Option(callback=best_of_list, help="Comma-separated N.")] = "1,2,4,8,16,32",
    modes: Modes = "dpo,claims",
    plot: Plot = None,
    random_draws: RandomDraws = 16,
    doc: Doc = None,
    name: Name = "shapes-scaling",
    temperature: Annotated[
        float, typer.Option(min=0, max=5, help="Sampling temperature (the shapes-world reports use 1).")
    ] = 1.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens per caption.")] = 32,
    seed: Seed = 0,
    cache: Cache = None,
    batch: Batch = 8,
    threads: Threads = None,
) -> None:
    """The inference-time scaling curve in the shapes world: CHAIR and recall vs N on held-out scenes."""
    from rlaifv.cli.eval_shapes import shapes_prompts
    from rlaifv.trainer.evaluation.report import Report

    src = _source(output, locals())
    prompts, metric = shapes_prompts(images, scene_seed)
    try:
        result = src.scaling(prompts, metric)
    except USER_ERRORS as exc:
        raise user_error(exc) from None
    settings = {"images": images, "scene_seed": scene_seed, **src.settings()}
    report = Report(benchmark="shapes", name=name, settings=settings, metrics=result)
    metrics = ["chair_i", "chair_s", "recall"]
    title = f"Shapes world: best-of-N vs N ({images} held-out images, T={temperature:g})"
    _print(write_scaling(report, output, metrics=metrics, percent=metrics[:2], plot=plot, doc=doc, title=title))
    _fail_if_incomplete(report.metrics)


@eval_app.command("compare")
def compare(
    reports: Annotated[list[Path], typer.Argument(help="Reports to put side by side.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the table here.")] = None,
) -> None:
    """Several reports in one Markdown table (e.g. reference vs aligned vs best-of-N)."""
    from rlaifv.trainer.evaluation.report import compare as render

    try:
        table = render(reports)
    except USER_ERRORS as exc:
        raise user_error(exc) from None
    typer.echo(table)
    if output is not None:
        output.write_text(table)
