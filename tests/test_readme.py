"""The README runs as written: every ```bash and ```python block of README.md is executed, in order, in one
temporary working directory, and the test fails naming the first block (by its README line) that fails.

Convention (also stated in a comment at the top of README.md):
- every fence names its language; ```bash (or sh, shell) and ```python blocks run, ```text (or yaml, json, ...)
  blocks are shown only, and a fence without a language is an error (say which it is);
- a block that must not run has, on the line before its fence, an HTML comment `<!-- not-run: REASON -->` with a
  reason (too slow, needs a dataset, weights or a GPU); `make demo` and `experiments/*` are marked so.

How the blocks run: shell blocks with `bash -e -o pipefail`, the venv's bin folder first on PATH (its `mil`, or a
shim calling `python -m mil.cli` when the environment has no script), PYTHONPATH at this checkout, MIL_PROGRESS
plain; Python blocks with this test's own interpreter, from a file. The README's commands are its own text; only
the work is smaller: a `mil` shell function, defined before every shell block, appends the options of SHRINK to
the subcommands named there (argparse takes the last value of an option, so `--patients 120` in the README
becomes 24 patients here). Nothing else is replaced.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

# Options appended to each `mil SUBCOMMAND` of the README, so its how-tos run in minutes on a small cohort.
SHRINK: dict[str, list[str]] = {
    # 24 patients of one 256 x 256 field with 12 cells (the README's cohorts have 30 to 120 patients of 4 fields)
    "synth": ["--patients", "24", "--fields-per-patient", "1", "--cells-per-field", "12", "--field-width", "256"]
    + ["--field-height", "256"],
    # 2 outer folds x 1 seed, 2 epochs, the fewest bootstrap replicates a 95% interval accepts
    "compare": ["--folds", "2", "--seeds", "1", "--max-epochs", "2", "--n-boot", "100"],
    "predict": ["--n-boot", "100"],
    "attention": ["--max-patients", "4"],
}
SHELL = ("bash", "sh", "shell")
PYTHON = ("python", "py", "python3")
SHOWN = ("text", "yaml", "json", "csv", "console", "toml", "html", "markdown")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")
BLOCK_TIMEOUT_S = 3600  # a bound for a hung block, far above what a loaded 2-core machine needs


@dataclass
class Block:
    line: int  # 1-based line of the opening fence in the README
    language: str
    code: str
    skip_reason: str | None  # None: runs


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block with its language, code (fence indentation removed) and not-run reason."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, info = opening["indent"], opening["info"].strip()
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before)
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"README line {i + 1}: the fence opened here is never closed")
        language = info.split()[0].lower() if info else ""
        blocks.append(Block(i + 1, language, "\n".join(body) + "\n", marker["reason"] if marker else None))
        i = j + 1
    return blocks


def runnable(block: Block) -> bool:
    return block.skip_reason is None and block.language in SHELL + PYTHON


def _mil_function() -> str:
    cases = "".join(f'    {name}) command mil "$@" {" ".join(opts)} ;;\n' for name, opts in SHRINK.items())
    return f'mil() {{\n  case "$1" in\n{cases}    *) command mil "$@" ;;\n  esac\n}}\n'


def _environment(bin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", MIL_PROGRESS="plain", MIL_PROGRESS_SECONDS="30")
    return env


def _bin_dir(scratch: Path) -> Path:
    """The venv's bin folder when it holds `mil` (the README's promise), else a folder with a `mil` shim."""
    venv_bin = Path(sys.executable).parent
    if (venv_bin / "mil").exists():
        return venv_bin
    shim = scratch / "bin"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "mil").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mil.cli "$@"\n')
    (shim / "mil").chmod(0o755)
    (shim / "python").symlink_to(sys.executable)
    return shim


def run_blocks(blocks: list[Block], workdir: Path, where: str = "README.md") -> list[str]:
    """Run the runnable blocks in order in `workdir`; stop at the first failure and return what was run.

    Raises AssertionError naming the block's line, its code and the end of its output."""
    bin_dir = _bin_dir(workdir / ".readme-test")
    env = _environment(bin_dir)
    ran = []
    for k, block in enumerate(b for b in blocks if runnable(b)):
        if block.language in SHELL:
            script = workdir / f".block{k}.sh"
            script.write_text(_mil_function() + block.code)
            command = ["bash", "-e", "-o", "pipefail", str(script)]
        else:
            script = workdir / f".block{k}.py"
            script.write_text(block.code)
            command = [sys.executable, str(script)]
        start = time.perf_counter()
        done = subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False
        )
        print(f"{where}:{block.line} {block.language}: {time.perf_counter() - start:.0f} s")  # shown with -s
        ran.append(f"{where}:{block.line}")
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-4000:]
            raise AssertionError(
                f"{where} line {block.line}: the {block.language} block failed (exit {done.returncode}):\n"
                f"{block.code}\n--- output (end) ---\n{output}"
            )
    return ran


def test_every_fence_names_its_language_and_every_skip_a_reason():
    blocks = parse_blocks(README.read_text(encoding="utf-8"))
    unnamed = [b.line for b in blocks if not b.language]
    unknown = [(b.line, b.language) for b in blocks if b.language and b.language not in SHELL + PYTHON + SHOWN]
    no_reason = [b.line for b in blocks if b.skip_reason is not None and not b.skip_reason]
    assert not unnamed, f"README fences without a language (bash, python or text) at lines {unnamed}"
    assert not unknown, f"README fences of a language the test does not know: {unknown}"
    assert not no_reason, f"README not-run markers without a reason at lines {no_reason}"
    # the how-tos themselves run: if this drops, a parser change or a marker hides them
    assert sum(runnable(b) for b in blocks) >= 7
    assert all(b.skip_reason for b in blocks if "make demo" in b.code or "experiments/" in b.code)


def test_a_broken_block_is_reported_with_its_line(tmp_path):
    text = (
        "# t\n\n```bash\necho one > one.txt\n```\n\n<!-- not-run: would fail -->\n```bash\nexit 3\n```\n\n"
        "```text\nnot code\n```\n\n  ```python\n  print(open('one.txt').read())\n  ```\n\n"
        "```python\nundefined_name\n```\n\n```bash\necho never > never.txt\n```\n"
    )
    blocks = parse_blocks(text)
    assert [(b.language, b.skip_reason) for b in blocks] == [
        ("bash", None),
        ("bash", "would fail"),
        ("text", None),
        ("python", None),
        ("python", None),
        ("bash", None),
    ]
    with pytest.raises(AssertionError, match=r"(?s)doc.md line 20: the python block failed .*NameError"):
        run_blocks(blocks, tmp_path, where="doc.md")
    assert (tmp_path / "one.txt").exists() and not (tmp_path / "never.txt").exists()  # in order, stopped at 20


def test_a_failing_command_inside_a_shell_block_fails_it(tmp_path):
    blocks = parse_blocks("```bash\nfalse | cat\necho after\n```\n")
    with pytest.raises(AssertionError, match="line 1: the bash block failed"):
        run_blocks(blocks, tmp_path)


def test_shrink_options_reach_the_command(tmp_path):
    """The `mil` function appends SHRINK's options and passes every other command through unchanged."""
    blocks = parse_blocks(
        "```bash\ntype mil >/dev/null\nmil synth --help | grep -q -- --patients\nmil --version\n```\n"
    )
    assert run_blocks(blocks, tmp_path) == ["README.md:1"]
    assert "--patients 24" in _mil_function() and 'command mil "$@" ;;' in _mil_function()


@pytest.mark.slow
def test_readme_blocks_run(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash is needed to run the README's shell blocks")
    blocks = parse_blocks(README.read_text(encoding="utf-8"))
    ran = run_blocks(blocks, tmp_path)
    assert len(ran) == sum(runnable(b) for b in blocks)
    assert (tmp_path / "report" / "index.html").exists() and (tmp_path / "results" / "summary.md").exists()
