"""Count-based diagnosis heads: the cell differential (from labels or a classifier) -> scikit-learn models."""

from mil.count.differential import CountData, build_count_data, load_groups
from mil.count.registry import (
    count_head_class,
    create_count_head,
    is_count_head,
    list_count_heads,
    register_count_head,
)

__all__ = [
    "CountData",
    "build_count_data",
    "count_head_class",
    "create_count_head",
    "is_count_head",
    "list_count_heads",
    "load_groups",
    "register_count_head",
]
