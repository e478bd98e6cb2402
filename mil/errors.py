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


def refuse_unknown_keys(values: dict, known, what: str) -> None:
    """Strict configs: a key that is not a field is an error naming it and the valid ones."""
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown {what} key(s) {sorted(unknown)}; known: {sorted(known)}")
