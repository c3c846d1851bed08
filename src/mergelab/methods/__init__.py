"""Merging methods: one module per method, each registered with ``@method``."""

from mergelab.methods.base import GatherPass, MergeMethod, MethodOutput, MethodParams, NoParams, TensorContext
from mergelab.methods.registry import all_methods, get_method, method

__all__ = [
    "GatherPass",
    "MergeMethod",
    "MethodOutput",
    "MethodParams",
    "NoParams",
    "TensorContext",
    "all_methods",
    "get_method",
    "method",
]
