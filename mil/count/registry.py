"""String-keyed registry of count-based diagnosis heads (`count.logreg`, ...), filled by a decorator."""

from __future__ import annotations

from collections.abc import Callable

from mil.errors import ConfigError

_COUNT_HEADS: dict[str, Callable] = {}


def register_count_head(name: str) -> Callable:
    """Class decorator: `@register_count_head("count.logreg")`. A name registered twice is an error."""

    def add(cls: Callable) -> Callable:
        if name in _COUNT_HEADS:
            raise ValueError(f"count head {name!r} is registered twice ({_COUNT_HEADS[name]} and {cls})")
        _COUNT_HEADS[name] = cls
        cls.head_name = name
        return cls

    return add


def _ensure_builtin() -> None:
    import mil.count.heads  # noqa: F401  (registers the built-in heads; no I/O)


def list_count_heads() -> list[str]:
    _ensure_builtin()
    return sorted(_COUNT_HEADS)


def is_count_head(name: str) -> bool:
    _ensure_builtin()
    return name in _COUNT_HEADS


def count_head_class(name: str) -> Callable:
    """The registered class of count head `name`; an unknown name lists the valid ones."""
    _ensure_builtin()
    if name not in _COUNT_HEADS:
        raise ConfigError(f"unknown count head {name!r}; registered: {', '.join(sorted(_COUNT_HEADS))}")
    return _COUNT_HEADS[name]


def create_count_head(name: str, **kwargs):
    """A fresh, unfitted head; unknown names list the valid ones, unknown kwargs name the head's options."""
    cls = count_head_class(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"count head {name!r}: {e}; see {cls.__module__}.{cls.__name__} for its options") from e
