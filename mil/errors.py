"""Errors that name what was wrong, where, and how to fix it."""


class MilError(Exception):
    """Base class of the framework's user-facing errors (the CLI prints them without a traceback)."""


class InputError(MilError):
    """Bad input data: a file, row or patient that cannot be used as it is."""


class ConfigError(MilError):
    """A config file or option that does not exist or does not fit."""


def listing(problems: list[str], limit: int = 50) -> str:
    """Format many problems as one message; past `limit` it says how many more there are."""
    shown = [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        shown.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(shown)


def refuse_unknown_keys(values, known, what: str) -> None:
    """Strict configs: keys of `values` not in `known` are a ConfigError naming them, the valid keys of `what`
    (e.g. "compare config runs/c.yaml") and the closest valid key of each typo."""
    import difflib

    known = sorted(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = [f"{k!r} -> did you mean {m[0]!r}?" for k in unknown if (m := difflib.get_close_matches(k, known, 1))]
        raise ConfigError(
            f"{what}: unknown key(s) {unknown}; valid keys: {known}" + (f" ({'; '.join(hints)})" if hints else "")
        )
