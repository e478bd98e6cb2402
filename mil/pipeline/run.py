"""Run a pipeline file: the plan line, each stage (or its cached record), seconds per stage, the closing tables.

`mil run FILE` and `mil demo` both call `run_pipeline`, so the demo is exactly configs/demo.yaml run as any
other pipeline file. A stage whose output no later stage reads (the detector in mode evaluate) runs in a second
process beside the others when the run has 2 or more threads (mil.pipeline.beside); its record is written when it
ends, and the run waits for it before the closing tables.
"""

from __future__ import annotations

import csv
import json
import resource
import time
from pathlib import Path

from mil import threads
from mil.atomic import atomic_write_text
from mil.pipeline.beside import SideStage, SideStageError
from mil.pipeline.config import NOT_DIGESTED, STAGES, PipelineConfig
from mil.pipeline.records import Records, digest, input_fingerprint
from mil.pipeline.stages import (
    HEADERS,
    STAGE_FUNCTIONS,
    Context,
    StageResult,
    hands_nothing_on,
    has_diagnoses,
    runs_beside,
)
from mil.progress import duration, say

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


def reads(config: PipelineConfig, stage: str) -> list[str]:
    """The planned stages before `stage` whose output it reads. The detector in mode evaluate hands nothing on
    (the later stages go on with the annotated cells), so no stage reads it and a change there reruns it alone."""
    planned = config.planned()
    before = planned[: planned.index(stage)]
    return [s for s in DEPENDS[stage] if s in before and not hands_nothing_on(s, config)]


def _stage_digests(config: PipelineConfig, seed: int) -> dict[str, str]:
    digests: dict[str, str] = {}
    for stage in config.planned():
        section = {k: v for k, v in config.section(stage).items() if k not in NOT_DIGESTED.get(stage, ())}
        payload = {"stage": stage, "section": section, "seed": seed}
        if stage == "cells" and section.get("input"):
            payload["input"] = input_fingerprint(section["input"])
        if stage in ("cells", "predict"):
            payload["inputs"] = {
                k: input_fingerprint(section[k]) for k in ("patients_csv", "cells", "patients") if section.get(k)
            }
        if stage == "classify":  # the comparison's folds decide the cross-fitting; nothing else of compare does
            payload["folds"] = {k: (config.compare or {}).get(k) for k in ("folds", "seeds", "val_fraction", "config")}
        for upstream in reads(config, stage):
            payload[f"after_{upstream}"] = digests[upstream]
        digests[stage] = digest(payload)
    return digests


def _work_after(stage: str, config: PipelineConfig, cached: list[str]) -> bool:
    """Whether stages after `stage` will run (not cached), for a side process to overlap with."""
    planned = config.planned()
    return any(s not in cached for s in planned[planned.index(stage) + 1 :])


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
    # A stage is reused only when its record matches and every stage it reads is reused too: a stage that reruns
    # may change what the stages after it read.
    cached: list[str] = []
    for stage in config.planned():
        if records.cached(stage, digests[stage]) is not None and set(reads(config, stage)) <= set(cached):
            cached.append(stage)
    print(plan_line(config, cached), flush=True)
    ctx = Context(config=config, out=out, seed=seed)
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    figures: dict = {}
    side: SideStage | None = None  # a stage running in a second process beside the main line
    side_error: SideStageError | None = None  # raised once the main line has finished and been recorded

    def finish_side() -> None:
        nonlocal side, side_error
        done, side = side, None
        try:
            result = done.join()
        except SideStageError as e:
            side_error = e
            return
        finally:
            threads.give_back()
        figures.update(result["figures"])
        seconds[done.stage] = round(result["seconds"], 1)
        cpu[done.stage] = round(result["cpu_seconds"], 1)
        records.write(
            done.stage,
            digests[done.stage],
            figures=result["figures"],
            artifacts={**done.artifacts, **result["artifacts"]},
            files=[Path(f) for f in result["files"]],
        )
        print(f"[{done.stage}: {duration(seconds[done.stage])} wall, {cpu[done.stage]:.1f} s CPU, beside]", flush=True)

    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    try:
        for stage in config.planned():
            if side is not None and side.finished():
                finish_side()
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
            print(f"\n== {HEADERS[stage]} ==", flush=True)
            if (
                side is None
                and runs_beside(stage, config)
                and threads.chosen() >= 2
                and _work_after(stage, config, cached)
            ):
                lent = threads.chosen() // 2  # the side gets the smaller half
                side = SideStage.start(
                    stage, config=config, out=out, seed=seed, artifacts=dict(ctx.artifacts), n_threads=lent
                )
                keep = threads.lend(lent)
                print(
                    f"{stage}: runs in a second process with {lent} thread(s) beside the next stages (which keep "
                    f"{keep}); its lines start with [{stage}], its log is {side.log_path}",
                    flush=True,
                )
                continue
            start, start_cpu = time.perf_counter(), cpu_seconds()
            result: StageResult = STAGE_FUNCTIONS[stage](ctx)
            ctx.artifacts.update({k: str(v) for k, v in result.artifacts.items()})
            figures.update(result.figures)
            seconds[stage] = round(time.perf_counter() - start, 1)
            cpu[stage] = round(cpu_seconds() - start_cpu, 1)
            records.write(
                stage, digests[stage], figures=result.figures, artifacts=dict(ctx.artifacts), files=result.files
            )
            print(f"[{stage}: {duration(seconds[stage])} wall, {cpu[stage]:.1f} s CPU]", flush=True)
        if side is not None:
            if not side.finished():
                say(f"waiting for the {side.stage} stage, which runs beside the others")
            finish_side()
        if side_error is not None:
            raise side_error
    finally:
        if side is not None:  # the run failed or was stopped: so is the side process
            side.stop()
            threads.give_back()
    seconds = {stage: seconds[stage] for stage in config.planned() if stage in seconds}  # pipeline order
    cpu = {stage: cpu[stage] for stage in config.planned() if stage in cpu}
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
