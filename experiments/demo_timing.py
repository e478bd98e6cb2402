"""Time `mil demo` (or `mil run FILE`) the way issue 13 measures it: CPU seconds of the whole process tree and of each
stage, wall seconds, and the longest silence of its merged output.

    python experiments/demo_timing.py --out runs/demo_timing            # mil demo --out runs/demo_timing
    python experiments/demo_timing.py --pipeline configs/demo.yaml --out runs/x

On a shared machine wall time says little; CPU time (user + system of the process and its children) does: on the
idle 2-core build machine the demo's wall time was about CPU time / 1.5. The run's output is timestamped line by
line (MIL_PROGRESS=plain, stderr merged into stdout), and the largest gap between two lines is reported with the
line that ended it, so a stage that goes silent shows. Prints one JSON object at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def run_timestamped(command: list[str], env: dict[str, str], echo: bool = True) -> tuple[int, list[tuple[float, str]]]:
    """Run `command` with stderr merged into stdout; every output line with the seconds since start it arrived."""
    start = time.monotonic()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip("\n")))
            if echo:
                print(f"{lines[-1][0]:8.1f}  {lines[-1][1]}", flush=True)
        code = proc.wait()
    return code, lines


def largest_gap(lines: list[tuple[float, str]]) -> tuple[float, str]:
    """The longest time without output (from the start to the first line, and between lines) and the line ending it."""
    gap, after, previous = 0.0, "", 0.0
    for t, text in lines:
        if t - previous > gap:
            gap, after = t - previous, text
        previous = t
    return gap, after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder of the run")
    parser.add_argument("--pipeline", type=Path, help="a pipeline file for `mil run` (default: `mil demo`)")
    parser.add_argument("--threads", type=int, help="--threads of the run (default: the command's)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the run's output")
    args = parser.parse_args()
    command = [sys.executable, "-m", "mil.cli"]
    command += ["run", str(args.pipeline)] if args.pipeline else ["demo"]
    command += ["--out", str(args.out)]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "MIL_PROGRESS": "plain", "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    code, lines = run_timestamped(command, env, echo=not args.quiet)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    gap, gap_line = largest_gap(lines)
    summary_path = args.out / "pipeline_summary.json"
    stages = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    result = {
        "command": " ".join(command),
        "exit": code,
        "wall_seconds": round(wall, 1),
        "cpu_seconds_process_tree": round(cpu, 1),
        "stage_cpu_seconds": stages.get("cpu_seconds", {}),
        "stage_wall_seconds": stages.get("seconds", {}),
        "figures": stages.get("figures", {}),
        "largest_silence_seconds": round(gap, 1),
        "largest_silence_ended_by": gap_line[:200],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
