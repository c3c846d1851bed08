"""The benchmark's objectives for ``mergelab search``: ``zoo:``, ``lm:`` and ``lm-eval:``.

The core finds them through the ``mergelab.objectives`` entry point (:func:`register`), the way it
finds the ``zoo:`` calibration sources; it never imports this package.

* ``zoo:SPLIT`` (``validation``, ``train``; ``test`` is refused without the test flag): every task
  of a classification zoo scored on SPLIT with its own head, as the leaderboard scores it. The
  score is the average normalized accuracy (merged / expert: the bench's selection rule); the
  per-task objectives are the normalized accuracies, the raw metrics the accuracies. Options:
  ``zoo`` (preset or folder, default ``zeroshot-full``), ``limit`` (rows per task, default 300,
  0 = all), ``tasks`` (``a+b``), ``cache``, ``proxy_limit`` (rows per task of the Frank–Wolfe
  gradient, default 100). Its gradient is the cross-entropy summed over the proxy rows of every task,
  each through its task's head (FW-Merging's loss).
* ``lm:SPLIT``: the LM zoo's domains (``zoo`` default ``default``, ``limit`` default the zoo's,
  ``tasks``, ``cache``, ``proxy_limit``: rows per domain of the Frank–Wolfe gradient, default 100,
  0 = all); the score is the average normalized score; raw metrics are exact match (an accuracy) or
  the log perplexity (a loss). Its gradient is the sum over domains of the token-level cross-entropy
  (mean NLL per predicted token) on the domain's first ``proxy_limit`` rows of SPLIT, so each domain
  weighs the same whatever its token count. A perplexity domain (code windows, German and Italian
  fortunes) scores every text token as the harness's perplexity does (its term is the log
  perplexity of those rows); an exact-match domain (arithmetic) scores only the reference
  continuation given the prompt (`` <answer>`` and the newline that ends it), teacher-forced: exact
  match itself has no gradient, and this cross-entropy is its differentiable surrogate (FW-Merging's
  official code also uses the task's cross-entropy). Tied names (``lm_head.weight`` beside
  ``model.embed_tokens.weight``) each get the shared matrix's gradient.
* ``lm-eval:TASK,TASK``: lm-eval-harness on local tasks (``include`` a folder of task YAMLs,
  ``limit``, ``fewshot``, ``batch_size``); each trial's merge is written to a temporary Hugging Face
  folder (config and tokenizer from the recipe's base). Tasks named like public benchmarks' test
  sets are refused without the test flag (mergekit-evolve's prefix list).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mergelab.errors import OptionError
from mergelab.search.objective import ObjectiveContext, Scores, lm_eval_reads_test, register_objective_kind

if TYPE_CHECKING:
    from mergelab_bench.zoo.lm.scoring import LMBatch


def _int(options: Mapping[str, str], key: str, default: int | None) -> int | None:
    if key not in options:
        return default
    try:
        v = int(options[key])
    except ValueError:
        raise OptionError(f"--objective-option {key}={options[key]!r}: expected a whole number") from None
    return None if v <= 0 else v


def _tasks(options: Mapping[str, str]) -> list[str] | None:
    text = options.get("tasks")
    if not text:
        return None
    return [t.strip() for t in text.replace(",", "+").split("+") if t.strip()]


def _check_options(options: Mapping[str, str], allowed: frozenset[str], kind: str) -> None:
    bad = sorted(set(options) - allowed)
    if bad:
        raise OptionError(
            f"--objective-option {bad[0]}: not an option of {kind}: objectives (allowed: {', '.join(sorted(allowed))})"
        )


def _split(arg: str, kind: str) -> str:
    split = arg or "validation"
    if split not in ("train", "validation", "test"):
        raise OptionError(f"--objective {kind}:{arg}: the split is train, validation or test")
    return split


class ZooObjective:
    """``zoo:SPLIT`` (see the module docstring)."""

    OPTIONS: ClassVar[frozenset[str]] = frozenset({"zoo", "limit", "tasks", "cache", "proxy_limit", "head"})

    def __init__(self, arg: str, context: ObjectiveContext) -> None:
        from mergelab_bench.eval.harness import DEFAULT_VALIDATION_LIMIT, Evaluator
        from mergelab_bench.zoo.build import load_zoo

        opts = dict(context.options)
        _check_options(opts, self.OPTIONS, "zoo")
        self.split = _split(arg, "zoo")
        self.zoo = load_zoo(opts.get("zoo", "zeroshot-full"), cache=opts.get("cache"))
        self.limit = _int(opts, "limit", DEFAULT_VALIDATION_LIMIT)
        self.proxy_limit = _int(opts, "proxy_limit", 100)
        self.head = opts.get("head", "expert")
        self.evaluator = Evaluator(self.zoo, tasks=_tasks(opts), split=self.split, limit=self.limit)
        self.tasks = list(self.evaluator.tasks)
        self.name = f"zoo:{self.split}"
        self._grad_module: torch.nn.Module | None = None

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> Scores:
        report = self.evaluator.evaluate(state, head=self.head)
        tasks = {}
        for s in report.scores:
            tasks[s.task] = s.normalized if s.normalized is not None else s.value
        avg = report.average_normalized
        return Scores(
            score=float(avg if avg is not None else report.average or 0.0),
            tasks=tasks,
            metrics={s.task: s.value for s in report.scores},
            kinds=dict.fromkeys(tasks, "accuracy"),
        )

    def gradient(self, state: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        """Σ over tasks and proxy rows of the cross-entropy through the task's head, and its gradient."""
        from mergelab_bench.zoo.backbone import encoder_from_state_dict, load_weights, pooled

        if self._grad_module is None:
            self._grad_module = encoder_from_state_dict(self.zoo.base_dir, state)
        else:
            load_weights(self._grad_module, state)
        module = self._grad_module
        module.eval()  # no dropout: the gradient of the model that is scored
        for p in module.parameters():
            p.requires_grad_(True)
            p.grad = None
        total = 0.0
        with torch.enable_grad():
            for task in self.tasks:
                linear = self.zoo.head(task, self.head).linear  # the head is fixed: no gradient to it
                weight, bias = linear.weight.detach(), linear.bias.detach()
                labels = torch.tensor(self.zoo.examples(task, self.split, self.proxy_limit)[1])
                for b in self.zoo.batches(task, self.split, self.proxy_limit):
                    logits = torch.nn.functional.linear(pooled(module, b.input_ids, b.attention_mask), weight, bias)
                    loss = torch.nn.functional.cross_entropy(logits, labels[b.index], reduction="sum")
                    loss.backward()
                    total += float(loss.detach())
        grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
        for p in module.parameters():
            p.grad = None
        return total, grads


GRAD_BATCH_ROWS = 8
"""Rows per forward/backward pass of the LM gradient (the default experts' training batch)."""


class LMObjective:
    """``lm:SPLIT`` (see the module docstring)."""

    OPTIONS: ClassVar[frozenset[str]] = frozenset({"zoo", "limit", "tasks", "cache", "proxy_limit"})

    def __init__(self, arg: str, context: ObjectiveContext) -> None:
        from mergelab_bench.eval.lm_harness import LMEvaluator
        from mergelab_bench.zoo.lm.build import load_lm_zoo

        opts = dict(context.options)
        _check_options(opts, self.OPTIONS, "lm")
        self.split = _split(arg, "lm")
        if self.split == "train":
            raise OptionError("--objective lm:train: the LM suite scores validation or test")
        zoo = load_lm_zoo(opts.get("zoo", "default"), cache=opts.get("cache"), device=context.device)
        limit: Any = "zoo" if "limit" not in opts else _int(opts, "limit", None)
        self.evaluator = LMEvaluator(zoo, tasks=_tasks(opts), split=self.split, limit=limit)
        self.tasks = list(self.evaluator.tasks)
        self.proxy_limit = _int(opts, "proxy_limit", 100)
        self.name = f"lm:{self.split}"
        self._proxy: dict[str, list[tuple[LMBatch, torch.Tensor]]] = {}

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> Scores:
        report = self.evaluator.evaluate(state)
        tasks, metrics, kinds = {}, {}, {}
        for s in report.scores:
            tasks[s.task] = s.normalized if s.normalized is not None else 0.0
            if s.metric == "perplexity":
                metrics[s.task] = math.log(s.value) if s.value > 0 else math.inf
                kinds[s.task] = "loss"
            else:
                metrics[s.task] = s.value
                kinds[s.task] = "accuracy"
        avg = report.average_normalized
        return Scores(float(avg if avg is not None else 0.0), tasks, metrics, kinds)  # type: ignore[arg-type]

    def proxy_batches(self, task: str) -> list[tuple[LMBatch, torch.Tensor]]:
        """The gradient's batches of a domain with their labels (``-100``: not scored), made once.

        The domain's headline metric decides what is scored: perplexity, every text token (the
        harness's sequences, :meth:`DomainScorer.sequences`); exact match, the answer tokens after the
        prompt (:meth:`DomainScorer.answer_sequences`).
        """
        from mergelab_bench.zoo.lm.scoring import make_lm_batches

        if task not in self._proxy:
            scorer = self.evaluator.zoo.scorer
            data = self.evaluator.zoo.data(task)
            if data.metrics[0] == "perplexity":
                seqs = scorer.sequences(data, self.split, self.proxy_limit)
                starts = [0] * len(seqs)
            else:
                pairs = scorer.answer_sequences(data, self.split, self.proxy_limit)
                seqs, starts = [ids for ids, _ in pairs], [start for _, start in pairs]
            batches = make_lm_batches(seqs, batch_size=GRAD_BATCH_ROWS, pad_id=scorer.pad_id)
            out = []
            for b in batches:
                first = torch.tensor([starts[i] for i in b.index.tolist()])[:, None]
                before = torch.arange(b.input_ids.shape[1])[None, :] < first  # the prompt: context only
                out.append((b, b.labels.masked_fill(before, -100)))
            self._proxy[task] = out
        return self._proxy[task]

    def gradient(self, state: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        """Σ over domains of the mean token NLL on the proxy rows (see the module docstring), and its
        gradient with respect to every tensor of ``state`` (float32, on the zoo's device).

        The state is loaded into the evaluator's scratch module (one module for scores and
        gradients), in eval mode. Names that share one parameter (tied embeddings: ``lm_head.weight``
        and ``model.embed_tokens.weight``) each get that parameter's whole gradient; a state that
        leaves the tied head out gets it under the embedding's name alone.
        """
        from mergelab_bench.zoo.lm.scoring import token_nll

        module = self.evaluator.module(state)  # eval mode: no dropout, the model that is scored
        params = dict(module.named_parameters(remove_duplicate=False))
        for p in module.parameters():
            p.requires_grad_(True)
            p.grad = None
        device = self.evaluator.zoo.device
        total = 0.0
        with torch.enable_grad():
            for task in self.tasks:
                batches = self.proxy_batches(task)
                tokens = sum(int((labels[:, 1:] != -100).sum()) for _, labels in batches)
                if not tokens:
                    raise OptionError(f"--objective {self.name}: domain {task} has no proxy tokens to score")
                for b, labels in batches:
                    logits = module(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)).logits
                    loss = token_nll(logits, labels.to(device)).sum() / tokens
                    loss.backward()
                    total += float(loss.detach())
        grads: dict[str, torch.Tensor] = {}
        for n in state:  # the state's names (a tied alias included), not the module's
            param = params.get(n)
            if param is not None and param.grad is not None:
                grads[n] = param.grad.detach().float().clone()
        for p in module.parameters():
            p.grad = None
        return total, grads


class LMEvalObjective:
    """``lm-eval:TASK,TASK`` (see the module docstring)."""

    OPTIONS: ClassVar[frozenset[str]] = frozenset({"include", "limit", "fewshot", "batch_size", "metric"})

    def __init__(self, arg: str, context: ObjectiveContext) -> None:
        from mergelab_bench.eval.lm_eval_adapter import require_lm_eval

        require_lm_eval()
        opts = dict(context.options)
        _check_options(opts, self.OPTIONS, "lm-eval")
        self.tasks = [t.strip() for t in arg.split(",") if t.strip()]
        if not self.tasks:
            raise OptionError("--objective lm-eval:TASKS: name at least one lm-eval task")
        self.options = opts
        self.device = context.device
        base = context.recipe.get("base_model")
        if not base or not Path(str(base)).is_dir():
            raise OptionError(
                "--objective lm-eval: needs the recipe's base_model as a local folder (config, tokenizer)"
            )
        self.base = Path(str(base))
        self.name = f"lm-eval:{arg}"

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> Scores:
        from safetensors.torch import save_file

        from mergelab_bench.eval.lm_eval_adapter import run_lm_eval

        tmp = Path(tempfile.mkdtemp(prefix="mergelab-search-lmeval-"))
        try:
            for f in self.base.iterdir():
                wanted = f.suffix in (".json", ".txt", ".model") or f.name.startswith("tokenizer")
                if f.is_file() and wanted and f.name != "model.safetensors.index.json":
                    shutil.copy2(f, tmp / f.name)
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
            )
            limit = _int(self.options, "limit", None)
            result = run_lm_eval(
                tmp,
                self.tasks,
                include_path=self.options.get("include"),
                limit=limit,
                num_fewshot=_int(self.options, "fewshot", None),
                batch_size=int(self.options.get("batch_size", 8)),
                device=self.device,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        metric = self.options.get("metric", "acc")
        tasks = {}
        for task in self.tasks:
            m = result["tasks"].get(task, {}).get("metrics", {})
            value = m.get(metric, m.get(f"{metric},none"))
            if value is None:
                raise OptionError(f"--objective {self.name}: task {task} reports no metric {metric!r} (metric=...)")
            tasks[task] = float(value)
        return Scores(sum(tasks.values()) / len(tasks), tasks, dict(tasks), dict.fromkeys(tasks, "accuracy"))


def _zoo_reads_test(arg: str, options: Mapping[str, str]) -> str | None:
    return "the zoo's test split" if (arg or "validation") == "test" else None


def _lm_reads_test(arg: str, options: Mapping[str, str]) -> str | None:
    return "the LM zoo's test split" if (arg or "validation") == "test" else None


def _check_zoo(arg: str, options: Mapping[str, str]) -> None:
    _check_options(options, ZooObjective.OPTIONS, "zoo")
    _split(arg, "zoo")
    for key in ("limit", "proxy_limit"):
        _int(options, key, None)
    from mergelab_bench.zoo.build import load_zoo

    load_zoo(options.get("zoo", "zeroshot-full"), cache=options.get("cache"))


def _check_lm(arg: str, options: Mapping[str, str]) -> None:
    _check_options(options, LMObjective.OPTIONS, "lm")
    if _split(arg, "lm") == "train":
        raise OptionError("--objective lm:train: the LM suite scores validation or test")
    for key in ("limit", "proxy_limit"):
        _int(options, key, None)


def _check_lm_eval(arg: str, options: Mapping[str, str]) -> None:
    _check_options(options, LMEvalObjective.OPTIONS, "lm-eval")
    if not [t for t in arg.split(",") if t.strip()]:
        raise OptionError("--objective lm-eval:TASKS: name at least one lm-eval task")


def register() -> None:
    """Register ``zoo:``, ``lm:`` and ``lm-eval:`` with the core (the ``mergelab.objectives`` entry point)."""
    register_objective_kind(
        "zoo",
        ZooObjective,
        reads_test=_zoo_reads_test,
        check=_check_zoo,
        description="zoo:SPLIT - the classification zoo's tasks",
    )
    register_objective_kind(
        "lm", LMObjective, reads_test=_lm_reads_test, check=_check_lm, description="lm:SPLIT - the LM zoo's domains"
    )
    register_objective_kind(
        "lm-eval",
        LMEvalObjective,
        reads_test=lambda arg, options: lm_eval_reads_test(arg, options),
        check=_check_lm_eval,
        description="lm-eval:TASK,TASK - lm-eval-harness on local tasks",
    )
