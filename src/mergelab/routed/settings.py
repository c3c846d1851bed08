"""The recipe's ``router:`` block: how a sequence router is trained (no torch here).

A routed recipe names each expert's router examples with the expert's ``calibration`` source
(train rows) and, optionally, a ``validation`` source (the rows the best epoch is chosen on)::

    merge_method: twin_merging
    base_model: ./base
    models:
      - model: ./expert-sentiment
        calibration: zoo:sentiment:train
        validation: zoo:sentiment:validation
      - model: ./expert-topics
        calibration: ./topics-train.jsonl
    router:
      train_examples: 5500         # per expert, at most (the reference's cap; fewer when the source has fewer)
      validation_examples: 1000    # per expert (without a validation source: 10 % of the rows read are held out)
      epochs: 50
      batch_size: 1024             # the reference's; with few rows that is few Adam steps per epoch

The defaults are the reference code's (LZY-the-boys/Twin-Merging ``discriminative/router.py``): up to
5,500 training rows per task after a 10 % hold-out, batch 1024, 50 epochs, Adam lr 5e-4 (it selects
the epoch on 1,000 rows per task of the *test* split; mergelab on ``validation_examples`` rows of a
validation source). The number of Adam steps is ⌈rows / batch_size⌉ per epoch (a last batch of one
row is skipped: BatchNorm needs two), recorded in ``router_config.json``: with 300 rows for each of
3 experts and batch 1024 that is one step per epoch, so lower ``batch_size`` with few rows.

Router rows never come from a ``test`` split: such a source is refused (``RecipeError``). WEMoE's
gates are not trained with labels: they minimise entropy on unlabeled inputs, as in its paper, so
its ``calibration`` sources may be any split (the benchmark gives it the test inputs, as for
AdaMerging); its settings are the method's parameters.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RouterSettings(BaseModel):
    """Training settings of a sequence router (Twin-Merging's defaults, :mod:`mergelab.routed.router`)."""

    model_config = ConfigDict(extra="forbid")

    train_examples: int = Field(
        5500,
        ge=1,
        description="router training rows per expert, at most (from its calibration source; the reference's 5,500)",
    )
    validation_examples: int = Field(
        1000, ge=1, description="model-selection rows per expert, at most (validation source; the reference's 1,000)"
    )
    validation_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description="without a validation source: up to train_examples / (1 - fraction) rows are read and this "
        "fraction of them (the last ones) is held out",
    )
    epochs: int = Field(50, ge=1, description="training epochs (the best epoch on validation is kept)")
    batch_size: int = Field(1024, ge=2, description="router training batch (rows)")
    lr: float = Field(5e-4, gt=0.0, description="Adam learning rate")
    hidden: int | None = Field(None, ge=1, description="hidden width of the router MLP (default 2 × hidden size)")
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    max_length: int = Field(128, ge=2, description="tokens per example for the router's features")
    feature_batch_size: int = Field(16, ge=1, description="rows per forward pass when computing features")
    mixing: Literal["softmax", "top1", "topk"] | None = Field(
        None,
        description="routing weights from the logits, the one place they are set (default: the method's: "
        "twin_merging softmax, split_merge / tall_masks / emr top1)",
    )
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature of the routing weights")
    top_k: int | None = Field(None, ge=1, description="mixing: topk: experts kept per input (required there)")
    seed: int | None = Field(None, description="router initialisation and shuffling (default: the recipe's seed)")

    @model_validator(mode="after")
    def _top_k_with_topk(self) -> RouterSettings:
        if self.mixing == "topk" and self.top_k is None:
            raise ValueError(
                "mixing: topk needs top_k (the experts kept per input), e.g. router: {mixing: topk, top_k: 2}"
            )
        if self.top_k is not None and self.mixing != "topk":
            raise ValueError(f"top_k is read only with mixing: topk (mixing is {self.mixing or 'the method default'})")
        return self
