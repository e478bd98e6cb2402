"""Run a pipeline file: the plan line, each stage (or its cached record), seconds per stage, the closing tables.

`mil run FILE` and `mil demo` both call `run_pipeline`, so the demo is exactly configs/demo.yaml run as any
other pipeline file.
"""

from __future__ import annotations

import csv
import json
import resource
import time
from pathlib import Path

from mil.atomic import atomic_write_text
from mil.pipeline.config import STAGES, PipelineConfig
from mil.pipeline.records import Records, digest, input_fingerprint
from mil.pipeline.stages import HEADERS, STAGE_FUNCTIONS, Context, StageResult, has_diagnoses
from mil.progress import duration

SUMMARY = "pipeline_summary"
# Stages that need a diagnosis per patient: skipped, with a note, on data without any (BCCD, PBC crops).
NEED_DIAGNOSES = ("compare", "predict", "attention")
# What each stage reads besides its own section (a change there reruns it).
DEPENDS = {
    "cells": (),
    "detect": ("cells",),
    "classify": ("cells", "detect", "compare"),
    "extract": ("cells", "detect", "classify"),
    "compare": ("extract", "classify"),
    "predict": ("compare", "extract"),
    "attention": ("compare", "predict", "cells"),
}


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (data-loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _stage_digests(config: PipelineConfig, seed: int) -> dict[str, str]:
    digests: dict[str, str] = {}
    for stage in config.planned():
        section = config.section(stage)
        payload = {"stage": stage, "section": section, "seed": seed}
        if stage == "cells" and section.get("input"):
            payload["input"] = input_fingerprint(section["input"])
        if stage in ("cells", "predict"):
            payload["inputs"] = {
                k: input_fingerprint(section[k]) for k in ("patients_csv", "cells", "patients") if section.get(k)
            }
        if stage == "classify":  # the comparison's folds decide the cross-fitting; nothing else of compare does
            payload["folds"] = {k: (config.compare or {}).get(k) for k in ("folds", "seeds", "val_fraction", "config")}
        for upstream in DEPENDS[stage]:
            if upstream in digests and not (stage == "classify" and upstream == "compare"):
                payload[f"after_{upstream}"] = digests[upstream]
        digests[stage] = digest(payload)
    return digests


def plan_line(config: PipelineConfig, cached: list[str]) -> str:
    text = "stages: " + " -> ".join(config.planned())
    skipped = [s for s in STAGES if s not in config.planned()]
    text += f"; cached: {', '.join(cached) if cached else 'none'}"
    if skipped:
        text += f"; skipped: {', '.join(skipped)}"
    return text


def run_pipeline(config: PipelineConfig, out: Path, *, seed: int | None = None, title: str | None = None) -> dict:
    """Every planned stage in order; returns {"seconds", "cpu_seconds", "figures", "tables"}."""
    seed = config.seed if seed is None else int(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = Records(out)
    digests = _stage_digests(config, seed)
    # A stage is reused only when it and every stage before it are: a rerun upstream may change its inputs.
    cached: list[str] = []
    for stage in config.planned():
        if records.cached(stage, digests[stage]) is None:
            break
        cached.append(stage)
    print(plan_line(config, cached), flush=True)
    ctx = Context(config=config, out=out, seed=seed)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    figures: dict = {}
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    for stage in config.planned():
        if stage in NEED_DIAGNOSES and not has_diagnoses(ctx.path("patients_csv")):
            print(
                f"\n== {HEADERS[stage]}: skipped: no patient of {ctx.path('patients_csv')} has a diagnosis "
                "(give cells a patients_csv with a diagnosis column to run it) ==",
                flush=True,
            )
            continue
        record = records.cached(stage, digests[stage]) if stage in cached else None
        if record is not None:
            ctx.artifacts.update(record["artifacts"])
            figures.update(record["figures"])
            print(f"\n== {HEADERS[stage]}: cached ({records.path(stage)}) ==", flush=True)
            continue
        records.forget(stage)
        start, start_cpu = time.perf_counter(), cpu_seconds()
        print(f"\n== {HEADERS[stage]} ==", flush=True)
        result: StageResult = STAGE_FUNCTIONS[stage](ctx)
        ctx.artifacts.update({k: str(v) for k, v in result.artifacts.items()})
        figures.update(result.figures)
        seconds[stage] = round(time.perf_counter() - start, 1)
        cpu[stage] = round(cpu_seconds() - start_cpu, 1)
        records.write(stage, digests[stage], figures=result.figures, artifacts=dict(ctx.artifacts), files=result.files)
        print(f"[{stage}: {duration(seconds[stage])} wall, {cpu[stage]:.1f} s CPU]", flush=True)
    seconds["total"] = round(time.perf_counter() - wall0, 1)
    cpu["total"] = round(cpu_seconds() - cpu0, 1)
    tables = _tables(ctx)
    text = final_table(tables, figures, seconds, cpu, ctx.artifacts.get("report"), title=title)
    atomic_write_text(out / f"{SUMMARY}.md", text)
    summary = {"seconds": seconds, "cpu_seconds": cpu, "figures": figures, "artifacts": ctx.artifacts}
    atomic_write_text(out / f"{SUMMARY}.json", json.dumps(summary, indent=2, sort_keys=True))
    print("\n" + text)
    print(f"total: {duration(seconds['total'])} wall, {cpu['total']:.1f} s CPU ({len(seconds) - 1} stages run)")
    if ctx.artifacts.get("report"):
        print(f"attention report: {Path(ctx.artifacts['report']) / 'index.html'}")
    return {**summary, "tables": tables}


def _tables(ctx: Context) -> dict[str, list[dict]]:
    tables = {}
    for source, key in (("ground-truth counts", "results"), ("predicted counts", "results_predicted")):
        path = ctx.artifacts.get(key)
        if path and (Path(path) / "summary.csv").exists():
            with (Path(path) / "summary.csv").open(newline="") as f:
                tables[source] = list(csv.DictReader(f))
    return tables


def final_table(tables, figures: dict, seconds: dict, cpu: dict, report, *, title: str | None = None) -> str:
    lines = [f"# {title or 'mil run'}", ""]
    if tables:
        lines += [
            "| counts from | head | macro-F1 [95% CI] | balanced accuracy | AUROC |",
            "|---|---|---|---|---|",
        ]
        for source, rows in tables.items():
            for r in rows:
                kind = source if r["head"].startswith("count.") else "cells (attention-MIL / pooling)"
                lines.append(
                    f"| {kind} | {r['head']} | {_ci(r, 'macro_f1')} | {_ci(r, 'balanced_accuracy')} | "
                    f"{_ci(r, 'auroc')} |"
                )
            # attention heads appear once, under the ground-truth run that trained them
            tables = {k: [r for r in v if r["head"].startswith("count.")] for k, v in tables.items()}
        lines.append("")
    lines += ["| stage figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(figures.items())]
    lines += ["", "| stage | seconds | CPU seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v} | {cpu.get(k, '')} |" for k, v in seconds.items()]
    if report:
        lines += ["", f"Attention report: {Path(report) / 'index.html'}"]
    return "\n".join(lines) + "\n"


def _ci(row: dict, metric: str) -> str:
    value = row.get(metric, "")
    lo, hi = row.get(f"{metric}_lo", ""), row.get(f"{metric}_hi", "")
    return f"{value} [{lo}, {hi}]" if lo else str(value)
