"""`mil compare`: count-based and attention-MIL heads on the same patients, splits and metrics."""

from mil.compare.config import CompareConfig, load_compare_config
from mil.compare.runner import CompareResult, run_compare

__all__ = ["CompareConfig", "CompareResult", "load_compare_config", "run_compare"]
