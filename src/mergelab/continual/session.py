"""``ContinualMerge``: merge experts one at a time into a running state, on disk or in memory.

On disk (the ``mergelab continual`` commands)::

    cm = ContinualMerge.init("base/", "state/", method="opcm", params={"alpha": 0.5})
    cm.add("expert-1/")                      # each step streams the tensors and publishes a new state
    cm = ContinualMerge.open("state/")       # later, in another process
    cm.add("expert-2/")
    cm.status()                              # experts, norms, λ history, storage
    cm.export("merged/")                     # a plain Hugging Face checkpoint, at any time

In memory (no folder; models may be state dicts), e.g. for a benchmark that replays task orders::

    cm = ContinualMerge.init(base_state_dict, method="opcm")
    for name, sd in experts:
        cm.add(sd, name=name)
    merged = cm.state_dict()

Both go through the same step (:mod:`mergelab.continual.step`), so they give the same tensors.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from mergelab import __version__
from mergelab.api import copy_side_files
from mergelab.checkpoint.reader import CheckpointReader, StateDictReader, open_checkpoint
from mergelab.checkpoint.writer import DEFAULT_MAX_SHARD, AtomicOutputDir, ShardedSafetensorsWriter, parse_size
from mergelab.continual import state as st
from mergelab.continual.base import ContinualMethod
from mergelab.continual.methods import get_method
from mergelab.continual.step import (
    BASE,
    EXPERT,
    STATE_DTYPE,
    PeakEstimate,
    check_expert,
    check_state,
    expected_peak,
    export_graph,
    float_tensors,
    run_graph,
    step_graph,
)
from mergelab.errors import OptionError, ParameterError, PlanError
from mergelab.executors.base import Progress, check_threads, resolve_device
from mergelab.executors.sinks import MemorySink
from mergelab.ir import MODEL
from mergelab.methods.base import MethodParams
from mergelab.recipe import parse_dtype

ModelRef = str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass
class StepReport:
    """What adding one expert did: its record, the expected and measured peak memory, the I/O."""

    expert: st.ExpertRecord
    expected_peak_bytes: int
    peak_rss_bytes: int
    bytes_read: int
    bytes_written: int


@dataclass
class Status:
    """A state at a glance (``mergelab continual status``; ``to_dict`` for JSON)."""

    method: str
    params: dict[str, Any]
    folder: str | None
    base: dict[str, Any]
    experts: list[dict[str, Any]]
    scale: float
    stats: dict[str, Any]
    state_bytes: int
    task_vector_bytes: int
    expected_peak: dict[str, Any]
    history: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _params(method: ContinualMethod, given: Mapping[str, Any] | MethodParams | None) -> MethodParams:
    """The method's validated parameter model (a one-line ParameterError naming the bad key)."""
    if isinstance(given, MethodParams):
        if not isinstance(given, method.params):
            raise ParameterError(f"continual {method.name}: parameters of type {type(given).__name__}")
        return given
    try:
        return method.params.model_validate(dict(given or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "parameters"
        known = ", ".join(f.alias or n for n, f in method.params.model_fields.items()) or "none"
        raise ParameterError(f"continual {method.name}: {key}: {first['msg']} (parameters: {known})") from None


def _open_model(ref: ModelRef, label: str | None, role: str) -> CheckpointReader:
    if _in_memory(ref):
        assert isinstance(ref, (Mapping, torch.nn.Module))
        return StateDictReader(ref, label or f"<{role} state dict>")
    if not isinstance(ref, (str, os.PathLike)):
        raise OptionError(f"{role}: expected a path, a Hub id or a state dict, got {type(ref).__name__}")
    reader = open_checkpoint(ref)
    if label is not None:
        reader.label = label
    return reader


def _in_memory(ref: ModelRef) -> bool:
    return isinstance(ref, (Mapping, torch.nn.Module))


def _check_run(device: str, threads: int | None) -> None:
    resolve_device(device)
    check_threads(threads)


class ContinualMerge:
    """A continual merge: a base, a method, and the experts added so far (see the module docstring).

    Create one with :meth:`init` (a new state, in a folder or in memory) or :meth:`open` (an existing
    state folder). The state never holds the earlier experts: each :meth:`add` streams the base, the
    running task vector and the new expert tensor by tensor (peak memory set by the largest tensor,
    :meth:`expected_peak`) and replaces the state atomically.
    """

    def __init__(
        self,
        record: st.StateRecord,
        *,
        folder: Path | None,
        base: ModelRef | None = None,
        raw: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.record = record
        self.folder = folder
        self._base_ref: ModelRef | None = base
        self._raw = raw  # in memory: the running task vector R by tensor name (None before the first expert)
        self.method = get_method(record.method)
        self.params = _params(self.method, record.params)

    # ------------------------------------------------------------------------------- creating

    @classmethod
    def init(
        cls,
        base: ModelRef,
        state: str | os.PathLike[str] | None = None,
        *,
        method: str = "opcm",
        params: Mapping[str, Any] | MethodParams | None = None,
        base_name: str | None = None,
        force: bool = False,
        force_any: bool = False,
    ) -> ContinualMerge:
        """A new continual merge of ``base`` (folder, file, Hub id, or state dict) with ``method``.

        With ``state`` a folder, the state is written there (headers of the base are read, nothing
        else); it must not exist unless ``force`` (a previous mergelab output) or ``force_any``.
        Without, the merge lives in memory.
        """
        cm = get_method(method)
        p = _params(cm, params)
        reader = _open_model(base, base_name, "base")
        try:
            metas = reader.tensors()
            if not any(m.dtype.is_floating_point for m in metas.values()):
                raise PlanError(f"{reader.label}: has no floating-point tensors to merge")
            record = st.StateRecord(
                method=cm.name,
                params=p.model_dump(mode="json", by_alias=True),
                base=st.BaseRecord(
                    label=reader.label,
                    path=st.local_path(base),
                    layout=st.layout_digest(metas),
                    tensors=len(metas),
                    parameters=sum(m.numel for m in metas.values()),
                ),
                created=st.now(),
                mergelab_version=__version__,
            )
        finally:
            reader.close()
        if state is None:
            return cls(record, folder=None, base=base)
        dest = AtomicOutputDir(
            state, force=force, force_any=force_any, inputs=st.describe_inputs(("base", base)), kind=st.KIND
        )
        try:
            st.write_record(dest.tmp, record)
            folder = dest.commit()
        except BaseException:
            dest.abort()
            raise
        return cls(record, folder=folder)

    @classmethod
    def open(cls, state: str | os.PathLike[str], *, base: ModelRef | None = None) -> ContinualMerge:
        """An existing state folder; ``base`` overrides the recorded base (moved, or a state dict),
        which must hold the same tensors (and, once checked by a step, the same content)."""
        folder = Path(os.path.abspath(os.path.expanduser(os.fspath(state))))
        st.recover(folder)
        record = st.read_record(folder)
        return cls(record, folder=folder, base=base)

    # --------------------------------------------------------------------------------- reading

    @property
    def experts(self) -> list[st.ExpertRecord]:
        return list(self.record.experts)

    @property
    def scale(self) -> float:
        return self.record.scale

    def _open_base(self) -> CheckpointReader:
        rec = self.record.base
        ref: ModelRef
        if self._base_ref is not None:
            ref = self._base_ref
        elif rec.path is not None and os.path.lexists(rec.path):
            ref = rec.path
        else:
            ref = rec.label
        reader = _open_model(ref, rec.label if not isinstance(ref, (str, os.PathLike)) else None, "base")
        if st.layout_digest(reader.tensors()) != rec.layout:
            reader.close()
            raise PlanError(
                f"{reader.label}: its tensors (names, shapes, dtypes) are not those of the base this state was "
                f"created with ({rec.label}); give the original base (open(..., base=...) / --base)"
            )
        return reader

    def _open_state(self, base: CheckpointReader) -> CheckpointReader | None:
        if not self.record.experts:
            return None
        if self.folder is None:
            assert self._raw is not None
            return StateDictReader(self._raw, "<running task vector>")
        reader = st.open_delta(self.folder)
        try:
            check_state(base, reader, str(self.folder))
        except BaseException:
            reader.close()
            raise
        return reader

    def expected_peak(self) -> PeakEstimate:
        """The expected peak working memory of the next :meth:`add` (headers only)."""
        base = self._open_base()
        try:
            inputs = 3 if self.record.experts else 2
            return expected_peak(float_tensors(base), self.method, self.params, inputs)
        finally:
            base.close()

    def status(self) -> Status:
        """The experts so far (hashes, norms, λ history), the method's statistics and the storage."""
        rec = self.record
        state_bytes = st.folder_bytes(self.folder) if self.folder is not None else 0
        tv_bytes = (
            st.folder_bytes(self.folder / st.DELTA_DIR)
            if self.folder is not None
            else sum(t.numel() * t.element_size() for t in (self._raw or {}).values())
        )
        try:
            peak = asdict(self.expected_peak())
        except Exception as exc:  # the base may be gone: status still reports the state
            peak = {"error": str(exc)}
        return Status(
            method=rec.method,
            params=dict(rec.params),
            folder=str(self.folder) if self.folder is not None else None,
            base=rec.base.model_dump(mode="json"),
            experts=[e.model_dump(mode="json", exclude={"files"}) for e in rec.experts],
            scale=rec.scale,
            stats=dict(rec.stats),
            state_bytes=state_bytes,
            task_vector_bytes=tv_bytes,
            expected_peak=peak,
            history=list(self.method.history),
        )

    # ---------------------------------------------------------------------------------- a step

    def add(
        self,
        expert: ModelRef,
        *,
        name: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
        check_finite: bool = True,
        max_shard_size: str | int = DEFAULT_MAX_SHARD,
        progress: Progress | None = None,
    ) -> StepReport:
        """Merge ``expert`` (folder, file, Hub id or state dict; ``name`` labels it) into the state.

        One streamed pass over the base, the running task vector and the expert. Refused (nothing
        changes) when the expert was added before (same content hash) or is the base itself, when
        its tensors do not match the base's, or when the base's content changed since the first
        step. On disk the new state replaces the old one with one publish (see
        :mod:`mergelab.continual.state`); a failure or interrupt leaves the previous state.
        """
        _check_run(device, threads)
        shard_bytes = parse_size(max_shard_size)
        if self.folder is None:
            return self._step(expert, name, device, threads, check_finite, progress, None, shard_bytes)
        st.recover(self.folder)
        with st.state_lock(self.folder):
            self.record = st.read_record(self.folder)  # another process may have stepped meanwhile
            self.method = get_method(self.record.method)
            self.params = _params(self.method, self.record.params)
            st.check_replaceable(self.folder)
            return self._step(expert, name, device, threads, check_finite, progress, self.folder, shard_bytes)

    def _step(
        self,
        expert_ref: ModelRef,
        name: str | None,
        device: str,
        threads: int | None,
        check_finite: bool,
        progress: Progress | None,
        folder: Path | None,
        shard_bytes: int,
    ) -> StepReport:
        t0 = time.perf_counter()
        rec = self.record
        t = rec.steps + 1
        base = self._open_base()
        readers: list[CheckpointReader] = [base]
        try:
            label = name or (f"<expert {t}>" if _in_memory(expert_ref) else None)
            expert = _open_model(expert_ref, label, "expert")
            readers.append(expert)
            check_expert(base, expert)
            files = st.file_signature(expert)
            for e in rec.experts:
                if files is not None and e.files == files:
                    raise PlanError(
                        f"{expert.label}: already added as expert #{e.index} ({e.label}; same files, unchanged); "
                        "each expert is merged once"
                    )
            state = self._open_state(base)
            if state is not None:
                readers.append(state)
            metas = float_tensors(base)
            peak = expected_peak(metas, self.method, self.params, 3 if state is not None else 2)
            sums: dict[str, tuple[float, float]] = {}
            graph = step_graph(base, state, expert, self.method, self.params, t, rec.scale, rec.stats, sums)
            items = [(m.name, STATE_DTYPE, tuple(m.shape)) for m in metas]
            dest: AtomicOutputDir | None = None
            writer: ShardedSafetensorsWriter | None = None
            try:
                if folder is not None:
                    dest = AtomicOutputDir(
                        folder,
                        force=True,
                        inputs=st.describe_inputs(("base", rec.base.path), ("expert", expert_ref)),
                        kind=st.KIND,
                    )
                    (dest.tmp / st.DELTA_DIR).mkdir()
                    writer = ShardedSafetensorsWriter(dest.tmp / st.DELTA_DIR, items, shard_bytes)
                    sink: Any = writer
                else:
                    sink = MemorySink()
                run = run_graph(
                    graph,
                    {MODEL: sink},
                    device=device,
                    threads=threads,
                    check_finite=check_finite,
                    progress=progress,
                    phase=f"add #{t} ({self.method.name})",
                    sums=sums,
                )
                if writer is not None:
                    writer.finish()
                record = self._next_record(rec, expert, expert_ref, files, run.hashes, run.sums, t, t0)
                if dest is not None:
                    for r in readers:  # the state's files are about to move
                        r.close()
                    st.write_record(dest.tmp, record)
                    dest.commit()
                else:
                    self._raw = sink.tensors
            except BaseException:
                if writer is not None:
                    writer.abort()
                if dest is not None:
                    dest.abort()
                raise
        finally:
            for r in readers:
                r.close()
        self.record = record
        return StepReport(
            expert=record.experts[-1],
            expected_peak_bytes=peak.bytes,
            peak_rss_bytes=run.stats.peak_rss_bytes,
            bytes_read=run.stats.bytes_read,
            bytes_written=run.stats.bytes_written,
        )

    def _next_record(
        self,
        rec: st.StateRecord,
        expert: CheckpointReader,
        expert_ref: ModelRef,
        files: list[tuple[str, int, int]] | None,
        hashes: Mapping[str, str],
        sums: Any,
        t: int,
        t0: float,
    ) -> st.StateRecord:
        """The state after step ``t``, once the content hashes are known (refusals raise here, before
        anything is published)."""
        base_hash, expert_hash = hashes[BASE], hashes[EXPERT]
        if rec.base.content_hash is not None and rec.base.content_hash != base_hash:
            raise PlanError(
                f"{rec.base.label}: the base's content changed since this state's first step (content hash "
                f"{base_hash[:16]}…, recorded {rec.base.content_hash[:16]}…); give the original base"
            )
        if expert_hash == base_hash:
            raise PlanError(f"{expert.label}: is the base itself (same content hash); add a fine-tuned expert")
        for e in rec.experts:
            if e.content_hash == expert_hash:
                raise PlanError(
                    f"{expert.label}: already added as expert #{e.index} ({e.label}; same content hash "
                    f"{expert_hash[:16]}…); each expert is merged once"
                )
        stats, scale = self.method.finish(rec.stats, self.params, t, sums)
        history = {k: float(stats[k]) for k in self.method.history if k in stats}
        entry = st.ExpertRecord(
            index=t,
            label=expert.label,
            path=st.local_path(expert_ref),
            content_hash=expert_hash,
            files=files,
            task_vector_norm=math.sqrt(sums.tau_sq),
            merged_norm=abs(scale) * math.sqrt(sums.raw_sq),
            scale=scale,
            history=history,
            seconds=round(time.perf_counter() - t0, 3),
            added=st.now(),
        )
        base = (
            rec.base if rec.base.content_hash is not None else rec.base.model_copy(update={"content_hash": base_hash})
        )
        return rec.model_copy(update={"base": base, "scale": scale, "stats": stats, "experts": [*rec.experts, entry]})

    # ------------------------------------------------------------------------------- exporting

    def state_dict(self, *, out_dtype: str | torch.dtype | None = None, device: str = "cpu") -> dict[str, torch.Tensor]:
        """The merged model θ0 + s·R in memory (float tensors in ``out_dtype``, default the base's)."""
        _check_run(device, None)
        dtype = out_dtype if isinstance(out_dtype, torch.dtype) else parse_dtype(out_dtype, "out_dtype")
        base = self._open_base()
        readers: list[CheckpointReader] = [base]
        try:
            state = self._open_state(base)
            if state is not None:
                readers.append(state)
            sink = MemorySink()
            run_graph(
                export_graph(base, state, self.record.scale, dtype), {MODEL: sink}, device=device, hash_inputs=False
            )
            return sink.tensors
        finally:
            for r in readers:
                r.close()

    def export(
        self,
        out: str | os.PathLike[str],
        *,
        force: bool = False,
        force_any: bool = False,
        out_dtype: str | None = None,
        max_shard_size: str | int = DEFAULT_MAX_SHARD,
        device: str = "cpu",
        threads: int | None = None,
        progress: Progress | None = None,
    ) -> Path:
        """Write the merged model to ``out`` as a plain Hugging Face checkpoint (sharded safetensors, the
        base's config and tokenizer files, a model card), atomically; the state is unchanged."""
        _check_run(device, threads)
        dtype = parse_dtype(out_dtype, "out_dtype")
        shard_bytes = parse_size(max_shard_size)
        inputs = list(st.describe_inputs(("base", self.record.base.path)))
        if self.folder is not None:
            inputs.append(("continual state", str(self.folder)))
        dest = AtomicOutputDir(out, force=force, force_any=force_any, inputs=inputs, kind="merge")
        base = self._open_base()
        readers: list[CheckpointReader] = [base]
        writer: ShardedSafetensorsWriter | None = None
        try:
            state = self._open_state(base)
            if state is not None:
                readers.append(state)
            graph = export_graph(base, state, self.record.scale, dtype)
            writer = ShardedSafetensorsWriter(
                dest.tmp, [(o.name, o.dtype, o.shape) for o in graph.outputs_of(MODEL)], shard_bytes
            )
            run_graph(
                graph,
                {MODEL: writer},
                device=device,
                threads=threads,
                hash_inputs=False,
                progress=progress,
                phase="export",
            )
            writer.finish()
            copy_side_files(base, dest.tmp, dtype, {})
            (dest.tmp / "README.md").write_text(continual_card(self.record, self.method))
            return dest.commit()
        except BaseException as exc:
            if writer is not None:
                writer.abort()
            dest.fail(exc)
            raise
        finally:
            for r in readers:
                r.close()


def continual_card(record: st.StateRecord, method: ContinualMethod) -> str:
    """The model card of an exported continual merge: method, base, experts in order, with hashes."""
    import yaml

    front = {"library_name": "transformers", "tags": ["merge", "mergelab", "continual", method.name]}
    front["base_model"] = [record.base.label]
    params = ", ".join(f"{k}={v}" for k, v in record.params.items()) or "none"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        "# Continually merged model",
        "",
        f"Made with mergelab {__version__} (`mergelab continual`) on {st.now()}.",
        "",
        "## Method",
        "",
        f"**{method.name}**: {method.summary}.",
        "",
        f"Reference: {method.paper}.",
        "",
        f"Parameters: {params}. Merged model = base + {record.scale:.6g} × the running task vector.",
        "",
        "## Inputs, in the order they were merged",
        "",
        "| step | model | content hash (BLAKE3 of tensors) | ‖τ‖ | ‖merged − base‖ | added |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| base | `{record.base.label}` | `{record.base.content_hash or 'not computed'}` | | | |",
    ]
    for e in record.experts:
        lines.append(
            f"| {e.index} | `{e.label}` | `{e.content_hash}` | {e.task_vector_norm:.6g} | {e.merged_norm:.6g} "
            f"| {e.added} |"
        )
    lines += [
        "",
        "The content hash is the BLAKE3 over the sorted (tensor name, dtype, shape, BLAKE3 of the tensor's bytes) "
        "of every tensor, so it does not depend on how a model is sharded.",
        "",
    ]
    return "\n".join(lines)
