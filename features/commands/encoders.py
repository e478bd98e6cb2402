"""`mil encoders`: the registered encoders with embedding width, input size and weights source."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--show",
        metavar="NAME",
        help="build one encoder (e.g. resnet18.random) and print its full config record as JSON",
    )
    parser.add_argument("--weights", metavar="PATH", help="weights file for --show of an entry that needs one")
    parser.add_argument("--input-size", type=int, help="crop side for --show (default: the entry's own)")


def _format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from features.registry import create_encoder, get_entry, list_encoders

    if args.show:
        encoder = create_encoder(args.show, weights=args.weights, input_size=args.input_size)
        print(json.dumps(encoder.config.to_dict(), indent=2, sort_keys=True))
        return 0
    rows = [("name", "dim", "input", "weights", "description")]
    for name in list_encoders():
        entry = get_entry(name)
        rows.append(
            (
                name,
                str(entry.embed_dim) if entry.embed_dim else "per arch",
                f"{entry.input_size} px" if entry.input_size else "per arch",
                entry.weights_source,
                entry.description,
            )
        )
    print(_format_table(rows))
    print("\nARCH is any timm architecture (e.g. resnet18.random); `--input-size` overrides the crop side.")
    return 0
