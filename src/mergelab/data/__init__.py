"""Calibration data for data-informed merging: sources named in recipes, tokenized batches."""

from mergelab.data.config import CalibrationSettings, CalibrationSource
from mergelab.data.sources import (
    Examples,
    load_examples,
    load_tokenizer,
    read_text_file,
    take_examples,
    tokenize_batches,
)

__all__ = [
    "CalibrationSettings",
    "CalibrationSource",
    "Examples",
    "load_examples",
    "load_tokenizer",
    "read_text_file",
    "take_examples",
    "tokenize_batches",
]
