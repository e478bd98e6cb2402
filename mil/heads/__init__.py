"""Attention-MIL diagnosis heads: a registry (``list_heads``, ``create_head``) and one module per head.

Importing this package registers every head (pure class definitions: no I/O, no heavy imports).
"""

from mil.heads import abmil, clam_mb, dsmil, pooling, transmil  # noqa: F401  (registration side effect)
from mil.heads.common import EmptyBagError, MilHead
from mil.heads.registry import create_head, head_class, list_heads, register_head

__all__ = ["EmptyBagError", "MilHead", "create_head", "head_class", "list_heads", "register_head"]
