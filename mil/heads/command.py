"""`mil heads`: list the registered attention-MIL heads, their attention shape and what it means."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--names", action="store_true", help="print only the names, one per line")


def run(args: argparse.Namespace) -> int:
    from mil.heads import head_class, list_heads

    names = list_heads()
    if args.names:
        print("\n".join(names))
        return 0
    print(f"{'head':<10} {'attention':<10} meaning")
    for name in names:
        cls = head_class(name)
        shape = "(C, N)" if cls.multi_branch else "(N,)"
        print(f"{name:<10} {shape:<10} {cls.attention_meaning}")
    print("\ncount-based heads (count.*) are listed by `mil compare --help`.")
    return 0
