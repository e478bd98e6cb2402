"""`mil heads`: every diagnosis head `mil compare --heads` accepts, one line each, from the two head registries."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--names", action="store_true", help="print only the names, one per line")


def describe(cls: type) -> str:
    """A head's one-line description: the first line of its class docstring (a contract test keeps it there)."""
    lines = (cls.__doc__ or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def run(args: argparse.Namespace) -> int:
    from mil.count.registry import count_head_class, list_count_heads
    from mil.heads import head_class, list_heads

    attention, count = list_heads(), list_count_heads()
    if args.names:
        print("\n".join(attention + count))
        return 0
    width = max(len(n) for n in attention + count) + 2
    print("attention heads (on the cell embeddings; `mil attention` shows which cells they weighted):")
    print(f"  {'head':<{width}} {'attention':<10} what it is; what its attention weight means")
    for name in attention:
        cls = head_class(name)
        shape = "(C, N)" if cls.multi_branch else "(N,)"
        print(f"  {name:<{width}} {shape:<10} {describe(cls)} Weight: {cls.attention_meaning}.")
    print("\ncount heads (on each patient's cell differential; `mil compare --counts truth|hard|soft`):")
    for name in count:
        print(f"  {name:<{width}} {describe(count_head_class(name))}")
    print("\nUse any of these names in `mil compare --heads NAME,NAME,...` (or the config key `heads`).")
    return 0
