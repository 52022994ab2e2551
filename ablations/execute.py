"""Running a ``RunPlan``: the evaluation, the uncompressed baseline and the oracle, each looked up
in the results store first and stored after."""

from __future__ import annotations

import inspect
import time
from typing import Any

from ablations.output import short_label
from ablations.plan import VANILLA, RunPlan
from ablations.store import Claims, ResultStore, run_key
from ustc.config import CompressionConfig
from ustc.evaluation import (
    Benchmark,
    BenchmarkResult,
)


def _merge_results(benches: list[Benchmark], results: list[BenchmarkResult]) -> dict[str, Any]:
    scores: dict[str, float] = {}
    tokens: dict[str, float] = {}
    timings: dict[str, float] = {}
    details: dict[str, Any] = {}
    several = len(benches) > 1
    for bench, res in zip(benches, results, strict=True):
        prefix = f"{bench.registered_name}/" if several else ""
        for column, value in res.scores.items():
            scores[f"{bench.registered_name}/{column}" if column in scores else column] = value
        tokens.update({prefix + k: v for k, v in res.tokens.items()})
        timings.update({prefix + k: v for k, v in res.timings.items()})
        details[bench.registered_name] = res.details
    return {
        "scores": scores,
        "tokens": tokens,
        "timings": timings,
        "n": sum(r.n for r in results),
        "details": details,
    }


def flops_of(config: CompressionConfig, bench: Benchmark) -> dict[str, Any] | None:
    """Eq. S3 FLOPs (``ustc.flops``) of the evaluated LLM, and the planned token counts."""
    spec = bench.flops_spec()
    if spec is None:
        return None
    from ustc import flops

    # ustc.flops' default merge_at is the convention the model adapters follow
    try:
        ours = flops.count(config, spec, counter="eq-s3")
        vanilla = flops.count(VANILLA, spec, counter="eq-s3")
    except ValueError as exc:
        return {"model": spec.name, "error": str(exc)}
    entering = config.budget(spec.frames, spec.tokens_per_frame)
    return {
        "model": spec.name,
        "counter": "eq-s3",
        "merge_at": inspect.signature(flops.count).parameters["merge_at"].default,
        "tflops": ours.tera,
        "ratio": ours.ratio(vanilla),
        "vanilla_tflops": vanilla.tera,
        "visual_tokens": spec.visual_tokens,
        "llm_visual_tokens": entering,
        "after_merge_tokens": config.kept_after_merge(entering),
    }


def _evaluate(plan: RunPlan, config: CompressionConfig, progress: bool) -> dict[str, Any]:
    start = time.perf_counter()
    label = plan.baseline_label if config == VANILLA else plan.label or short_label(config)
    results = [b.evaluate(config, progress=progress and label) for b in plan.benchmarks]
    merged = _merge_results(plan.benchmarks, results)
    avg = sum(merged["scores"].values()) / len(merged["scores"])
    merged["timings"]["wall"] = time.perf_counter() - start
    return {
        "key": run_key(config.to_dict(), [b.spec() for b in plan.benchmarks]),
        "config": config.to_dict(),
        "benchmarks": [b.spec() for b in plan.benchmarks],
        "avg": avg,
        "columns": list(merged["scores"]),  # table order (the store sorts dict keys)
        "flops": flops_of(config, plan.benchmarks[0]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **merged,
    }


def run_plan(
    plan: RunPlan,
    store: ResultStore | None = None,
    claims: Claims | None = None,
    baseline: str = "run",
) -> dict[str, Any]:
    """Baseline (stored once) + this run; returns the run's record with ``pct_of_uncompressed``.

    claims: when given, each run that has to be evaluated is claimed first
    (:class:`ablations.store.Claims`); a key another live process holds raises
    :class:`ablations.store.ClaimedElsewhere` before anything is evaluated for it.
    baseline: ``run`` (the uncompressed run, from the store or evaluated) or ``if-stored`` (only
    from the store: a sweep runs it as a grid point of its own).
    """
    args = plan.args
    progress = not args.quiet

    def stored_or_run(
        config: CompressionConfig, key: str, force: bool
    ) -> tuple[dict[str, Any], bool]:
        if store is not None and not force:
            hit = store.get(key)
            if hit is not None:
                return hit, True
        if claims is None:
            record = _evaluate(plan, config, progress)
            if store is not None:
                store.append(record, replace=force)
            return record, False
        claims.acquire(key)
        try:
            if store is not None and not force:  # finished by another process meanwhile
                hit = store.get(key)
                if hit is not None:
                    return hit, True
            record = _evaluate(plan, config, progress)
            if store is not None:
                store.append(record, replace=force)
        finally:
            claims.release(key)
        return record, False

    reference = None
    if not args.no_baseline:
        if baseline == "run":
            reference, _ = stored_or_run(VANILLA, plan.baseline_key(), force=False)
        elif store is not None:
            reference = store.get(plan.baseline_key())
    record, cached = stored_or_run(plan.config, plan.key, force=args.force)
    record = dict(record)
    record["cached"] = cached
    if reference is not None and reference["avg"] > 0:
        record["baseline"] = {
            "key": reference["key"],
            "avg": reference["avg"],
            "scores": reference["scores"],
            "timings": reference.get("timings", {}),
        }
        record["pct_of_uncompressed"] = 100.0 * record["avg"] / reference["avg"]
    else:
        record["pct_of_uncompressed"] = None
    return record


def run_baseline(plan: RunPlan, store: ResultStore, claims: Claims | None = None) -> dict[str, Any]:
    """The uncompressed run of ``plan``'s benchmarks, from the store or evaluated and stored
    (claimed first when ``claims`` is given).  Returns its record with ``cached``."""
    key = plan.baseline_key()
    hit = store.get(key)
    if hit is not None:
        return {**hit, "cached": True}
    if claims is not None:
        claims.acquire(key)
    try:
        hit = store.get(key)
        if hit is not None:
            return {**hit, "cached": True}
        record = _evaluate(plan, VANILLA, not plan.args.quiet)
        store.append(record)
    finally:
        if claims is not None:
            claims.release(key)
    return {**record, "cached": False}


def oracle_of(plan: RunPlan, store: ResultStore | None) -> dict[str, Any] | None:
    """The benchmarks' evidence-keeping selection at the run's retention
    (:meth:`ustc.evaluation.Benchmark.oracle`), from the store or evaluated and stored; None
    when a benchmark does not know where its evidence is."""
    retention = plan.config.retention
    config = {"selector": "oracle", "retention": retention}
    specs = [b.spec() for b in plan.benchmarks]
    key = run_key(config, specs)
    hit = store.get(key) if store is not None else None
    if hit is not None:
        return hit
    start = time.perf_counter()
    label = f"oracle r={retention:g}"
    results = [b.oracle(retention, progress=not plan.args.quiet and label) for b in plan.benchmarks]
    if any(r is None for r in results):
        return None
    merged = _merge_results(plan.benchmarks, [r for r in results if r is not None])
    merged["timings"]["wall"] = time.perf_counter() - start
    record = {
        "key": key,
        "config": config,
        "benchmarks": specs,
        "avg": sum(merged["scores"].values()) / len(merged["scores"]),
        "columns": list(merged["scores"]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **merged,
    }
    if store is not None:
        store.append(record)
    return record
