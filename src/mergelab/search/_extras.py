"""The optional packages of ``mergelab search``, imported on use with a one-line error when missing."""

from __future__ import annotations

import importlib
from typing import Any

from mergelab.errors import OptionError


def require(module: str) -> Any:
    """``importlib.import_module(module)``, or an OptionError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise OptionError(f"mergelab search needs {top}: pip install 'mergelab[search]' ({exc})") from exc
