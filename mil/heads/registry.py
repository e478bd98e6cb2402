"""String-keyed registry of attention-MIL heads, filled by ``@register_head`` where each head is defined."""

from __future__ import annotations

from collections.abc import Callable

from mil.errors import ConfigError
from mil.heads.common import MilHead

_HEADS: dict[str, type[MilHead]] = {}


def register_head(name: str) -> Callable[[type[MilHead]], type[MilHead]]:
    """Class decorator: register a head under ``name``; a second head with the same name is an error."""

    def decorate(cls: type[MilHead]) -> type[MilHead]:
        if name in _HEADS:
            raise ConfigError(
                f"head name {name!r} is already registered by {_HEADS[name].__module__}.{_HEADS[name].__name__}; "
                "choose another name"
            )
        cls.head_name = name
        _HEADS[name] = cls
        return cls

    return decorate


def list_heads() -> list[str]:
    """Names of the registered attention-MIL heads, sorted."""
    return sorted(_HEADS)


def head_class(name: str) -> type[MilHead]:
    if name not in _HEADS:
        raise ConfigError(f"unknown attention head {name!r}; registered heads: {', '.join(list_heads())}")
    return _HEADS[name]


def create_head(name: str, *, in_dim: int, num_classes: int, **kwargs) -> MilHead:
    """Build head ``name`` for bags of width ``in_dim`` and ``num_classes`` diagnoses.

    Extra keyword arguments (hidden_dim, dropout, ...) go to the head's constructor; one it does not
    take is a ConfigError naming the head.
    """
    cls = head_class(name)
    try:
        return cls(in_dim=in_dim, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ConfigError(f"head {name!r} cannot be built with {sorted(kwargs)}: {e}") from e
