"""mergelab: fuse fine-tuned expert models that share a pretrained base.

Streaming, memory-bounded merging of Hugging Face checkpoints with faithful implementations of
the merging literature, from the command line (``mergelab merge recipe.yaml OUT``) or Python.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mergelab")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

from mergelab.api import MergeResult, merge, merge_stages, merge_state_dicts, merge_tensors, plan_merge
from mergelab.errors import MergelabError
from mergelab.recipe import Recipe, load_recipe

__all__ = [
    "MergeResult",
    "MergelabError",
    "Recipe",
    "__version__",
    "load_recipe",
    "merge",
    "merge_stages",
    "merge_state_dicts",
    "merge_tensors",
    "plan_merge",
]
