"""The offline evaluation zoo: tasks from named packages, experts fine-tuned from one backbone.

``build_zoo(ZooConfig.quick())`` builds (or reuses from ``$MERGELAB_CACHE``) the task data,
the pretrained base and one expert + head per task; ``load_zoo("quick")`` opens a built one.
See :mod:`mergelab_bench.zoo.sources` for the packages and how to install them on a clean machine.
"""

from mergelab_bench.zoo.build import (
    FULL_TASKS,
    QUICK_TASKS,
    Zoo,
    ZooConfig,
    ZooError,
    build_zoo,
    load_zoo,
    zoo_summary,
)
from mergelab_bench.zoo.cache import cache_root, zoo_root
from mergelab_bench.zoo.sources import SourceError, SystemSources, install_script, install_sources
from mergelab_bench.zoo.tasks import ALL_TASKS, TASKS, SplitConfig, TaskData, ensure_task
from mergelab_bench.zoo.train import TrainConfig

__all__ = [
    "ALL_TASKS",
    "FULL_TASKS",
    "QUICK_TASKS",
    "TASKS",
    "SourceError",
    "SplitConfig",
    "SystemSources",
    "TaskData",
    "TrainConfig",
    "Zoo",
    "ZooConfig",
    "ZooError",
    "build_zoo",
    "cache_root",
    "ensure_task",
    "install_script",
    "install_sources",
    "load_zoo",
    "zoo_root",
    "zoo_summary",
]
