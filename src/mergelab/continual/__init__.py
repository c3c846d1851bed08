"""Continual merging: experts arrive one at a time and are merged into a running state.

The state holds the base reference, the running merged task vector and the method's small
statistics, never the earlier experts; each step streams the tensors (peak memory set by the
largest tensor) and replaces the state atomically. Methods: ``opcm`` (Tang et al. 2025), ``dop``
(NeurIPS 2025) and the sequential baselines ``average``, ``task_arithmetic``, ``ties``, ``magmax``
(:data:`mergelab.continual.methods.METHODS`). Entry point: :class:`ContinualMerge`; on the command
line, ``mergelab continual init|add|status|export``.
"""

from mergelab.continual.methods import METHODS, get_method
from mergelab.continual.session import ContinualMerge, Status, StepReport

__all__ = ["METHODS", "ContinualMerge", "Status", "StepReport", "get_method"]
