"""Task-vector analysis: how experts relate before merging them.

:func:`analyze` streams the base and the experts once and returns per-pair cosines and
sign-conflict rates, per-layer norms, TALL-mask overlap and the density each sparsifier
would leave (see :mod:`mergelab.analysis.stats`); :func:`write_report` renders a static HTML
page with figures and writes the numbers as JSON beside it.
"""

from mergelab.analysis.report import render_html, write_report
from mergelab.analysis.run import analysis_recipe, analyze
from mergelab.analysis.stats import AnalysisOptions, TaskVectorStats

__all__ = ["AnalysisOptions", "TaskVectorStats", "analysis_recipe", "analyze", "render_html", "write_report"]
