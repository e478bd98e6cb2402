"""How long does `mil attention` take on a cohort of the size the issue names (50 patients x 300 cells)?

Builds the cohort once (mil synth -> mil cells -> mil extract -> mil compare with abmil), then times the report
alone, several times, and prints a table. Steps already done under --out are reused.

    .venv/bin/python experiments/bench_attention.py --out runs/bench_attention
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mil.attention import figures  # noqa: E402
from mil.cli import main as mil  # noqa: E402


def build(out: Path, patients: int, cells: int) -> Path:
    fields = 4
    if not (out / "cohort" / "cells.csv").exists():
        args = ["synth", "--out", str(out / "cohort"), "--seed", "0", "--patients", str(patients), "--quiet"]
        assert mil([*args, "--fields-per-patient", str(fields), "--cells-per-field", str(cells // fields)]) == 0
    if not (out / "cells" / "cells.csv").exists():
        assert mil(["cells", "--format", "zenodo", "--input", str(out / "cohort"), "--out", str(out / "cells")]) == 0
    cells_csv = out / "cells" / "cells.csv"
    assert (
        mil(["extract", "--cells", str(cells_csv), "--encoder", "morphology.handcrafted", "--out", str(out / "bags")])
        == 0
    )
    if not (out / "results" / "summary.csv").exists():
        assert (
            mil(
                [
                    "compare",
                    "--bags",
                    str(out / "bags"),
                    "--patients",
                    str(out / "cells" / "patients.csv"),
                    "--heads",
                    "abmil",
                    "--folds",
                    "3",
                    "--seeds",
                    "1",
                    "--n-boot",
                    "200",
                    "--out",
                    str(out / "results"),
                ]
            )
            == 0
        )
    return cells_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_attention"))
    parser.add_argument("--patients", type=int, default=50)
    parser.add_argument("--cells", type=int, default=300, help="nucleated cells per patient")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--png-levels",
        type=int,
        nargs="+",
        default=[figures.PNG_LEVEL],
        help="zlib levels of the report's PNGs to compare, interleaved run by run; the first is the baseline of "
        "the ratio column (e.g. 1 6: the default against Pillow's)",
    )
    args = parser.parse_args()
    cells_csv = build(args.out, args.patients, args.cells)
    times: dict[int, list[float]] = {level: [] for level in args.png_levels}
    sizes: dict[int, int] = {}
    for k in range(args.repeats):
        for level in args.png_levels:
            figures.PNG_LEVEL = level
            report = args.out / f"report_{k}_png{level}"
            start = time.perf_counter()
            command = ["attention", "--results", str(args.out / "results"), "--head", "abmil"]
            assert mil([*command, "--cells", str(cells_csv), "--out", str(report)]) == 0
            times[level].append(time.perf_counter() - start)
            sizes[level] = sum(p.stat().st_size for p in report.rglob("*.png"))
    base = statistics.median(times[args.png_levels[0]])
    print(f"\n| report | patients | cells per patient | PNG level | seconds (median of {args.repeats}) | ratio | runs "
          "| PNG MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for level, ts in times.items():
        runs = ", ".join(f"{t:.1f}" for t in ts)
        print(
            f"| mil attention (abmil, galleries, overlays, deletion curves) | {args.patients} | {args.cells} | "
            f"{level} | {statistics.median(ts):.1f} | {statistics.median(ts) / base:.2f}x | {runs} | "
            f"{sizes[level] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
