"""A stage that runs in a second process beside the stages after it, when nothing after it reads its output.

The detector in mode `evaluate` is such a stage: it trains on some patients' boxes and scores AP@0.5 on the
others', while the classifier, the bags, the comparison and the report go on with the annotated cells. On two
cores the two lines of work overlap instead of queueing (the demo's detector is a third of its CPU time).

The side process (`mil.pipeline.beside.main(JOB.json)` in a new interpreter) rebuilds the run's context from the
job file, runs the one stage with its share of the threads and writes the stage's result to RESULT.json. Its output
reaches the user line by line, each line prefixed with the stage's name (`[detect] ...`), and is kept in
OUT/pipeline/<stage>.log. It dies with the run (Linux parent-death signal; the run also stops it on any error), and
the run writes the stage's record only after the side process finished well, so a killed run reruns the stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mil import threads
from mil.atomic import atomic_write_text
from mil.errors import MilError
from mil.progress import echo


class SideStageError(MilError):
    """The stage that ran beside the others failed; its output is in the log the message names."""


def _parent_death_signal():
    """A function for Popen's preexec_fn that asks Linux to send the child SIGTERM when this process dies
    (PR_SET_PDEATHSIG), or None off Linux (the run's own clean-up stops the child there). libc is looked up here,
    in the parent: between fork and exec the child must not import or load anything (other threads may hold the
    locks that needs)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _pump(stream, sink, prefix: str, log, lock: threading.Lock) -> None:
    """Copy the child's lines to `sink` (our stdout or stderr) with `prefix`, and to the log, as they arrive."""
    for line in iter(stream.readline, ""):
        text = line.rstrip("\n")
        with lock:
            log.write(text + "\n")
            log.flush()
            # above the main line's progress bar, if one is open; if our output closed (a pipe reader quit), the
            # log goes on
            with contextlib.suppress(OSError, ValueError):
                echo(f"{prefix}{text}", file=sink)
    stream.close()


@dataclass
class SideStage:
    """A stage running in its own process; `finished()` polls, `join()` waits and returns its StageResult data."""

    stage: str
    proc: subprocess.Popen
    result_path: Path
    log_path: Path
    artifacts: dict  # what the run had handed on when the stage started (its record keeps them)
    started: float = field(default_factory=time.perf_counter)
    pumps: list[threading.Thread] = field(default_factory=list)
    log: object = None

    @classmethod
    def start(cls, stage: str, *, config, out: Path, seed: int, artifacts: dict, n_threads: int) -> SideStage:
        folder = out / "pipeline"
        folder.mkdir(parents=True, exist_ok=True)
        job, result_path, log_path = (folder / f"{stage}.{name}" for name in ("job.json", "result.json", "log"))
        result_path.unlink(missing_ok=True)
        artifacts = {k: str(v) for k, v in artifacts.items()}
        atomic_write_text(
            job,
            json.dumps(
                {
                    "stage": stage,
                    "pipeline": str(config.path),
                    "raw": config.raw,
                    "out": str(out),
                    "seed": seed,
                    "artifacts": artifacts,
                    "result": str(result_path),
                },
                indent=1,
            ),
        )
        env = {**os.environ, "MIL_THREADS": str(n_threads), "PYTHONUNBUFFERED": "1"}
        if os.environ.get("MIL_PROGRESS", "").strip().lower() not in ("0", "off", "false", "no"):
            env["MIL_PROGRESS"] = "plain"  # a pipe, not a terminal: timed lines, no bars
        root = str(Path(__file__).resolve().parents[2])  # the checkout, for runs from a source tree
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from mil.pipeline.beside import main; sys.exit(main(sys.argv[1:]))"]
            + [str(job)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            preexec_fn=_parent_death_signal(),
        )
        side = cls(stage=stage, proc=proc, result_path=result_path, log_path=log_path, artifacts=artifacts)
        side.log = log_path.open("w")
        lock = threading.Lock()
        prefix = f"[{stage}] "
        for stream, sink in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            pump = threading.Thread(target=_pump, args=(stream, sink, prefix, side.log, lock), daemon=True)
            pump.start()
            side.pumps.append(pump)
        return side

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def join(self) -> dict:
        """Wait for the side process; its result ({"figures", "artifacts", "files", "cpu_seconds"}) or
        SideStageError naming the log."""
        code = self.proc.wait()
        for pump in self.pumps:
            pump.join()
        self.log.close()
        if code != 0 or not self.result_path.exists():
            raise SideStageError(
                f"stage {self.stage}, run in a second process beside the others, failed (exit code {code}); its "
                f"output is above, each line starting with [{self.stage}], and in {self.log_path}. The stages "
                "after it are recorded: a rerun runs only this one (or set `beside: false` in its section to run "
                "it first, alone)"
            )
        result = json.loads(self.result_path.read_text())
        result["seconds"] = time.perf_counter() - self.started
        return result

    def stop(self) -> None:
        """End the side process (the run failed or was interrupted)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pump in self.pumps:
            pump.join(timeout=5)
        if self.log and not self.log.closed:
            self.log.close()


def _child(job_path: Path) -> int:
    """The side process: rebuild the context, run the one stage, write its result."""
    import resource

    from mil.pipeline.config import parse_pipeline
    from mil.pipeline.stages import STAGE_FUNCTIONS, Context

    job = json.loads(job_path.read_text())
    threads.apply(None)  # MIL_THREADS, set by the run
    config = parse_pipeline(job["raw"], Path(job["pipeline"]))
    ctx = Context(config=config, out=Path(job["out"]), seed=int(job["seed"]), artifacts=dict(job["artifacts"]))
    result = STAGE_FUNCTIONS[job["stage"]](ctx)
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    atomic_write_text(
        Path(job["result"]),
        json.dumps(
            {
                "figures": result.figures,
                "artifacts": {k: str(v) for k, v in result.artifacts.items()},
                "files": [str(f) for f in result.files],
                "cpu_seconds": cpu,
            },
            indent=1,
        ),
    )
    return 0


def main(argv: list[str]) -> int:
    """Entry of the side process: errors as `mil` prints them (no traceback for a MilError), signals as `mil`."""
    from mil.cli import Stopped, _quiet_defaults, _stop_on_signals

    _quiet_defaults()
    try:
        with _stop_on_signals():
            return _child(Path(argv[0]))
    except MilError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        return e.exit_code
