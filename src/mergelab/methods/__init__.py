"""Merging methods: one module per method, each registered with ``@method``."""

from mergelab.methods.base import Fold, MergeMethod, MethodCard, MethodOutput, MethodParams, NoParams, TensorContext
from mergelab.methods.registry import all_methods, get_method, method

__all__ = [
    "Fold",
    "MergeMethod",
    "MethodCard",
    "MethodOutput",
    "MethodParams",
    "NoParams",
    "TensorContext",
    "all_methods",
    "get_method",
    "method",
]
