"""Recipe-level description of calibration data: where each expert's examples come from and how
many, in which batches, at which length. Plain pydantic models (no torch), used by recipe.py.

A recipe names a source per expert (``models[i].calibration``) and the shared settings under a
top-level ``calibration:`` block::

    merge_method: regmean
    models:
      - model: ./expert-sentiment
        calibration: ./sentiment.jsonl            # JSONL ({"text": ...}) or .txt (one example a line)
      - model: ./expert-topics
        calibration: {zoo_task: fortune_topic, split: train, head: zoo}
    calibration:
      num_examples: 256        # per expert (default: the method's, see mergelab.informed.phase)
      batch_size: 16
      max_length: 128
      statistics_dir: ./stats  # keep the statistics and reuse them when nothing changed

From Python, any iterable of tokenized batches can be given instead (``mergelab.merge(...,
calibration=[...])``, see :class:`mergelab.informed.Calibration`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelType = Literal["auto", "causal_lm", "sequence_classification", "encoder"]


class CalibrationSource(BaseModel):
    """One expert's calibration examples: a local file or a zoo task's split.

    The string shorthand ``"zoo:<task>"`` (or ``"zoo:<task>:<split>"``) names a zoo task; any
    other string is a file path. ``head`` (encoders without a task head, e.g. the zoo's experts)
    is a ``.safetensors`` file with a linear layer's ``weight`` and ``bias`` (label names in its
    metadata ``labels``), applied to pooled encoder outputs; ``zoo`` takes the zoo task's expert
    head. Labels (``label_field``) are only used by the empirical Fisher.
    """

    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    text_field: str = "text"
    label_field: str | None = "label"
    zoo_task: str | None = None
    zoo: str = "quick"
    split: str = "train"
    head: str | None = None
    num_examples: int | None = Field(None, ge=1, description="overrides calibration.num_examples for this expert")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v.startswith("zoo:"):
                parts = v.split(":")
                out: dict[str, Any] = {"zoo_task": parts[1]}
                if len(parts) > 2 and parts[2]:
                    out["split"] = parts[2]
                return out
            return {"path": v}
        return v

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationSource:
        if (self.path is None) == (self.zoo_task is None):
            raise ValueError("a calibration source names either `path` (JSONL/text file) or `zoo_task`")
        if self.head == "zoo" and self.zoo_task is None:
            raise ValueError("head: zoo needs a zoo_task")
        return self

    def describe(self) -> str:
        if self.path is not None:
            return self.path
        return f"zoo:{self.zoo_task}:{self.split}"


class CalibrationSettings(BaseModel):
    """The recipe's ``calibration:`` block: settings shared by every expert's data pass."""

    model_config = ConfigDict(extra="forbid")

    num_examples: int | None = Field(
        None, ge=1, description="examples per expert (default: the method's; Fisher and RegMean 256)"
    )
    batch_size: int | None = Field(None, ge=1, description="batch size of the data passes (default: the method's)")
    max_length: int = Field(128, ge=2, description="tokens per example (longer ones are truncated)")
    model_type: ModelType = Field(
        "auto",
        description="how to load the experts: auto (from config.json architectures), causal_lm, "
        "sequence_classification, encoder (AutoModel; needs a head for Fisher/AdaMerging)",
    )
    pooling: Literal["mean", "cls", "last"] = Field("mean", description="encoder + head: how token states are pooled")
    dtype: str = Field("float32", description="dtype of the models during the data passes")
    memory_budget: str | int = Field(
        "4GB", description="statistics held in memory before they are written to disk in groups (extra passes)"
    )
    statistics_dir: str | None = Field(
        None, description="keep statistics here and reuse them when models, data and settings are unchanged"
    )
    source: CalibrationSource | None = Field(None, description="default source for models without their own")
