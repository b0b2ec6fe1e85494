"""Resumable Laplace fits: ``Laplace.fit(train_loader, checkpoint=PATH, checkpoint_every=n)``.

Every curvature a Laplace fit builds in a data pass is a sum over examples, so the pass can be cut into
segments of ``checkpoint_every`` batches: each segment's curvature is computed by the structure's own code
(``full``/``diag``: the structure's fit on the segment, whose state dicts add up; ``kron``/``ekfac``: the KFAC
factors of the segment, combined as :func:`posthoc.laplace.continual.combined_factors` does; ekfac's second pass:
the corrected eigenvalues of the segment, added), and after each segment the running sums, the batch position,
N, the log-likelihood statistic log p(D | theta*) and the state of the label sampler (``curvature="ggn_mc"``) are
written to ``checkpoint`` (a :mod:`posthoc.utils.checkpoint` file, atomic). A fit interrupted anywhere
(KeyboardInterrupt, a killed process) and called again with the same arguments resumes after the last
checkpointed batch and gives the same posterior as an uninterrupted checkpointed fit, bitwise; against a fit
without a checkpoint it differs only by the summation order (round-off). A finished fit leaves its checkpoint in
place, so a rerun costs one pass that reads and hashes the batches, no curvature work. ekfac's factor pass ends
with its eigenbases, which the checkpoint keeps for the eigenvalue pass.

Which run a checkpoint belongs to (its fingerprint, :func:`fit_fingerprint`): the settings (likelihood, structure
and its options, curvature type, MC samples, seed, covered parameters, dict keys, ignore index, dtype, number of
ranks, ``checkpoint_every``, which fixes the summation order), a digest of the network's weights and buffers (:func:`posthoc.utils.checkpoint.module_digest`), and the data: the checkpoint keeps a digest of the
batches of every segment it summed (:func:`posthoc.utils.checkpoint.tensor_digest` of each batch as the fit reads
it), and the resume recomputes them while skipping those batches. Another run's checkpoint, or a loader that
yields other batches before the checkpointed position (other data, a changed order, random augmentation), is a
:class:`posthoc.utils.checkpoint.CheckpointError` naming the fix, never resumed. Batches after the position need no
such check: whatever the loader yields there is summed, as in an uninterrupted fit on that loader. A
``DataLoader`` with ``shuffle=True`` is refused up front: each pass draws a new order (also with a seeded
``generator=``, whose state every pass advances), and the curvature does not depend on the order. ekfac's
eigenvalue pass must read the batches of its factor pass (their digests are compared segment by segment).

Not supported (NotImplementedError before any data pass): ``lowrank`` (its Lanczos iteration is not a sum over
batches; its products read at most ``subsample`` examples) and structures registered by users.

Under torch.distributed every rank reads its shard and the segment sums are all-reduced as in a plain fit, so all
ranks hold the same running sums; rank 0 reads and writes the checkpoint and sends it to the others, and each rank
checks its own batches' digests (gathered into the checkpoint). The ranks must yield equal numbers of batches
(a ``DistributedSampler`` does); a checkpoint resumes on the same number of ranks only.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, NamedTuple, cast

import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm

from posthoc.curvature.ekfac_eigenvalues import ekfac_eigenvalues
from posthoc.curvature.kfac import KFACFactors, kfac_factors, layers_by_name
from posthoc.curvature.output_factors import OutputFactors, RecordingFactors
from posthoc.distributed import (
    broadcast_object,
    gather_rows,
    is_main_process,
    rank,
    sum_count,
    sum_over_ranks,
    world_size,
)
from posthoc.laplace.continual import combined_factors, kron_structure
from posthoc.laplace.structures import CurvatureStructure
from posthoc.laplace.structures.base import HessianStructure, check_curvature_finite
from posthoc.laplace.structures.diag import DiagCurvature
from posthoc.laplace.structures.ekfac import EKFACCurvature
from posthoc.laplace.structures.full import FullCurvature
from posthoc.laplace.structures.kron import KronCurvature
from posthoc.network.inputs import batch_size, tensor_leaves
from posthoc.network.positions import observations
from posthoc.utils.checkpoint import (
    CheckpointError,
    check_writable,
    load_checkpoint,
    module_digest,
    save_checkpoint,
    tensor_digest,
)
from posthoc.utils.checks import check_positive_int

if TYPE_CHECKING:  # only for annotations: laplace.py imports this module
    from posthoc.laplace.laplace import Laplace

__all__ = ["CHECKPOINT_WHAT", "DEFAULT_CHECKPOINT_EVERY", "CheckpointPlan", "FilePath", "checkpoint_plan",
           "fit_fingerprint", "resumable_fit"]

CHECKPOINT_WHAT = "Laplace fit"
CHECKPOINT_FORMAT = 1
DEFAULT_CHECKPOINT_EVERY = 100  # batches per checkpoint
_SUPPORTED = {HessianStructure.FULL.value: FullCurvature, HessianStructure.DIAG.value: DiagCurvature,
              HessianStructure.KRON.value: KronCurvature, HessianStructure.EKFAC.value: EKFACCurvature}
_DIGEST_BYTES = 16
FilePath = str | os.PathLike


class CheckpointPlan(NamedTuple):
    """Where a resumable fit saves its state, and every how many batches."""

    path: Path
    every: int


def checkpoint_plan(la: "Laplace", train_loader: Iterable, checkpoint: FilePath | None,
                    checkpoint_every: int) -> CheckpointPlan | None:
    """None without ``checkpoint``; else the plan, after refusing what a checkpointed fit cannot resume exactly.

    Called by ``Laplace.fit`` before any data pass. Cost O(1).

    Raises:
        ValueError: ``checkpoint_every`` not an int >= 1; a ``DataLoader`` with ``shuffle=True`` (a
            ``RandomSampler``), whose order changes on every pass.
        NotImplementedError: a structure other than full, diag, kron, ekfac.
    """
    if checkpoint is None:
        return None
    every = check_positive_int(checkpoint_every, "checkpoint_every", "(batches per checkpoint)")
    if _SUPPORTED.get(la.structure_name) is not la.structure_cls:
        raise NotImplementedError(
            f"fit(..., checkpoint=) supports hessian_structure 'full', 'diag', 'kron' and 'ekfac', not "
            f"{la.structure_name!r}: " + ("lowrank's Lanczos iteration is not a sum over batches (its products "
                                          "read at most `subsample` examples; lower it for a shorter fit)"
                                          if la.structure_name == HessianStructure.LOWRANK.value else
                                          "a registered structure's fit is not known to be a sum over batches")
            + "; fit without checkpoint=")
    if isinstance(train_loader, DataLoader):
        samplers = (train_loader.sampler, getattr(train_loader.batch_sampler, "sampler", None))
        if any(isinstance(s, RandomSampler) for s in samplers):
            raise ValueError("fit(..., checkpoint=) needs a loader that yields the same batches on every pass, and "
                             "a DataLoader with shuffle=True draws a new order each time (also with a seeded "
                             "generator=, which every pass advances); pass shuffle=False: the curvature does "
                             "not depend on the order")
    return CheckpointPlan(Path(checkpoint), every)


def fit_fingerprint(la: "Laplace", checkpoint_every: int) -> dict[str, Any]:
    """What a checkpointed fit's result depends on besides its data (whose batches are checked one by one).

    The settings, the covered parameters, the number of ranks, ``checkpoint_every`` (the segments fix the
    summation order, so a resume is bitwise the uninterrupted fit) and a digest of the network's weights and
    buffers (one pass over them).
    """
    indices = la.subset.indices
    return {
        "format": CHECKPOINT_FORMAT,
        "likelihood": la.likelihood.value,
        "hessian_structure": la.structure_name,
        "structure_options": json.loads(json.dumps(la.structure_options, sort_keys=True, default=repr)),
        "curvature": la.factors.curvature.value,
        "mc_samples": la.factors.mc_samples,
        "seed": la.seed,
        "subset_of_weights": la.subset.kind.value,
        "covered": [[block.name, list(block.shape)] for block in la.subset.blocks],
        "subnetwork_indices": None if indices is None else tensor_digest([indices]),
        "dict_keys": [la.dict_key_x, la.dict_key_y],
        "ignore_index": la.ignore_index,
        "dtype": str(la.subset.dtype),
        "world_size": world_size(),
        "checkpoint_every": checkpoint_every,
        "network_weights": module_digest(la.model),
    }


# ----------------------------------------------------------------------------------------- running state
def _fresh_state(la: "Laplace") -> dict[str, Any]:
    """The state before any batch: phase 0 (ekfac: 1 is the eigenvalue pass), nothing summed."""
    return {"phase": 0, "position": 0, "segments": [], "factor_segments": None, "sums": None, "basis": None,
            "n_data": 0,
            "loglik_stat": torch.zeros((), dtype=la.subset.dtype, device=la.subset.device),
            "generator": la.factors.generator.get_state()}


def _on_device(la: "Laplace", state: dict[str, Any]) -> dict[str, Any]:
    """A loaded state with its running sums and statistic on ``la``'s device (the generator state stays on CPU)."""
    def move(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            return node.to(device=la.subset.device, dtype=la.subset.dtype) if node.is_floating_point() else node
        if isinstance(node, dict):
            return {k: move(v) for k, v in node.items()}
        return [move(v) for v in node] if isinstance(node, list) else node

    return {**state, "sums": move(state["sums"]), "basis": move(state["basis"]),
            "loglik_stat": move(state["loglik_stat"])}


def _factors_payload(result: KFACFactors) -> dict[str, Any]:
    """KFACFactors as tensors and plain data (its layers by name)."""
    return {"layers": [layer.name for layer in result.layers], "embeddings": [e.name for e in result.embeddings],
            "norms": [norm.name for norm in result.norms],
            "input_factors": result.input_factors, "output_factors": result.output_factors,
            "fallback": list(result.fallback), "fallback_diag": result.fallback_diag,
            "positions": dict(result.positions), "n_data": result.n_data, "n_outputs": result.n_outputs}


def _factors_from_payload(la: "Laplace", payload: dict[str, Any]) -> KFACFactors:
    """Inverse of :func:`_factors_payload` on ``la``'s covered parameters."""
    def conv(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=la.subset.device, dtype=la.subset.dtype)

    return KFACFactors(layers_by_name(la.subset, payload["layers"]),
                       {k: conv(v) for k, v in payload["input_factors"].items()},
                       {k: conv(v) for k, v in payload["output_factors"].items()},
                       [int(i) for i in payload["fallback"]], conv(payload["fallback_diag"]),
                       dict(payload["positions"]), int(payload["n_data"]), int(payload["n_outputs"]),
                       layers_by_name(la.subset, payload["embeddings"], embeddings=True),
                       layers_by_name(la.subset, payload.get("norms", []), norms=True))


def _added(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Entry-wise sum of two dicts of tensors (other entries, e.g. diag's chunk_bytes, taken from ``part``)."""
    if total is None:
        return part
    return {k: total[k] + v if isinstance(v, torch.Tensor) else v for k, v in part.items()}


def _ekfac_basis(la: "Laplace", state: dict[str, Any]) -> EKFACCurvature:
    """The eigenbases of ekfac's factor pass, restored from the state (the same tensors, bitwise)."""
    return cast(EKFACCurvature, EKFACCurvature.from_state_dict(la.subset, state["basis"]))


def _segment_sums(la: "Laplace", state: dict[str, Any], batches: Any, factors: OutputFactors) -> dict[str, Any]:
    """The running sums after adding one segment's curvature (``batches()`` gives the segment, once)."""
    phase, total = state["phase"], state["sums"]
    if phase == 1:  # ekfac's eigenvalues in the factor pass's bases
        basis = _ekfac_basis(la, state)
        part = ekfac_eigenvalues(la.subset, basis.layers, basis.positions, basis.bases(), batches(), factors,
                                 progress=False)
        return _added(total, {str(index): values for index, values in part.items()})
    if la.structure_cls in (KronCurvature, EKFACCurvature):
        approximation = KronCurvature._parse_options(dict(la.structure_options))
        fresh = kfac_factors(la.subset, batches(), factors, approximation, progress=False,
                             item_rows=KronCurvature.item_rows(dict(la.structure_options)))
        return _factors_payload(fresh if total is None else combined_factors(_factors_from_payload(la, total), fresh))
    structure = la.structure_cls.fit(la.subset, batches, factors, progress=False, **la.structure_options)
    return _added(total, structure.state_dict())


def _end_of_pass(la: "Laplace", state: dict[str, Any]) -> None:
    """After the factor pass of ekfac: its eigenbases go into the state and the eigenvalue pass starts."""
    approximation = KronCurvature._parse_options(dict(la.structure_options))
    basis = EKFACCurvature._from_factors(la.subset, _factors_from_payload(la, state["sums"]), approximation)
    state.update(phase=1, position=0, segments=[], factor_segments=state["segments"], sums=None,
                 basis=basis.state_dict())


def _structure(la: "Laplace", state: dict[str, Any]) -> CurvatureStructure:
    """The fitted structure from the finished running sums."""
    if la.structure_cls is EKFACCurvature:
        corrected = {int(k): v.to(device=la.subset.device, dtype=la.subset.dtype) for k, v in state["sums"].items()}
        return _ekfac_basis(la, state).corrected(corrected)
    if la.structure_cls is KronCurvature:
        return kron_structure(la.subset, _factors_from_payload(la, state["sums"]),
                              KronCurvature._parse_options(dict(la.structure_options)))
    structure = la.structure_cls.from_state_dict(la.subset, state["sums"])
    check_curvature_finite(next(v for v in state["sums"].values() if isinstance(v, torch.Tensor)), la.structure_name)
    return structure


# ----------------------------------------------------------------------------------------- batches and digests
def _batch_digest(x: Any, y: torch.Tensor) -> str:
    """Digest of one batch as the fit reads it (inputs and targets)."""
    return tensor_digest(tensor_leaves((x, y)))


def _segment_row(count: int, digests: list[str]) -> torch.Tensor:
    """(1, 1 + 16) int64: this rank's batch count and the digest of its batches' digests, for gathering."""
    digest = hashlib.blake2b("".join(digests).encode(), digest_size=_DIGEST_BYTES).digest()
    return torch.tensor([[count, *digest]], dtype=torch.int64)


def _row_entry(row: torch.Tensor) -> list[Any]:
    """[count, hex digest] of one rank's gathered row (JSON-like, for the checkpoint)."""
    values = [int(v) for v in row.tolist()]
    return [values[0], bytes(values[1:]).hex()]


class _Segment:
    """Up to ``size`` batches of a stream starting with ``first``: counts them, digests them, hands them out once."""

    def __init__(self, la: "Laplace", first: tuple[Any, torch.Tensor], stream: Iterator, size: int,
                 bar: Any) -> None:
        self.la, self.first, self.stream, self.size, self.bar = la, first, stream, size, bar
        self.count, self.n_data, self.used = 0, 0, False
        self.digests: list[str] = []

    def __call__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        """The segment's (covered-module inputs, targets), once (a structure that asks twice is a bug: raise)."""
        if self.used:
            raise RuntimeError("a checkpointed fit reads each segment once; this structure asked for a second pass")
        self.used = True
        for x, y in itertools.chain([self.first], itertools.islice(self.stream, self.size - 1)):
            self.count += 1
            self.n_data += observations(batch_size(x, self.la.dict_key_x), y, self.la.likelihood,
                                        self.la.ignore_index, self.la.position_dims)
            self.digests.append(_batch_digest(x, y))
            self.bar.update(1)
            yield self.la.subset.inputs(x), y


def _skip_checked(stream: Iterator, segments: list[list[list[Any]]], where: Path) -> None:
    """Skip the batches the checkpoint summed, checking on every rank that they are the batches it summed.

    Raises:
        CheckpointError: on every rank, when any rank's loader yields other (or fewer) batches there.
    """
    me, bad = rank(), None
    for index, per_rank in enumerate(segments):
        count, expected = per_rank[me]
        digests = [_batch_digest(x, y) for x, y in itertools.islice(stream, count)]
        if len(digests) < count or _row_entry(_segment_row(count, digests)[0])[1] != expected:
            bad = index
            break
    if sum_count(int(bad is not None), "the checkpoint's batch check") > 0:
        raise CheckpointError(
            f"the Laplace fit checkpoint {where} was written from other batches than this loader yields"
            + ("" if bad is None else f" (segment {bad} on rank {me})") + ": other data, another order "
            "(shuffle, a sampler), random augmentation, or another batch size; a checkpointed fit needs a loader "
            "that yields the same batches on every pass. Delete the checkpoint to start over, or pass another path")


def _check_same_pass(state: dict[str, Any], where: Path) -> None:
    """Ekfac's eigenvalue pass must read the batches of its factor pass (the same segments, gathered over ranks).

    Raises:
        CheckpointError: on every rank (the rows are gathered), when a segment differs.
    """
    factor_pass, index = state["factor_segments"], len(state["segments"]) - 1
    if factor_pass is None:
        return
    if index >= len(factor_pass) or state["segments"][index] != factor_pass[index]:
        raise CheckpointError(
            f"the loader yielded other batches in ekfac's eigenvalue pass than in its factor pass (segment {index}; "
            f"checkpoint {where}): a checkpointed fit needs a loader that yields the same batches on every pass "
            "(no shuffle, no random augmentation). Delete the checkpoint to start over")


def _any_rank_has(has: bool, every: int) -> bool:
    """Whether the ranks have another segment (all or none of them; else ValueError on every rank)."""
    count = sum_count(int(has), "the number of ranks with batches left")
    if 0 < count < world_size():
        raise ValueError("a checkpointed distributed fit needs the same number of batches on every rank (a "
                         f"DistributedSampler gives that); here {count} of {world_size()} ranks have batches left "
                         f"after a multiple of checkpoint_every={every}")
    return count > 0


# ----------------------------------------------------------------------------------------- the fit
def _load_state(la: "Laplace", path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """Rank 0 checks the folder and reads the checkpoint, if any; every rank gets it (or raises the same error)."""
    state, error = None, None
    if is_main_process():
        try:
            check_writable(path.parent, "Laplace fit checkpoint")
            if path.exists():
                state = load_checkpoint(path, fingerprint, CHECKPOINT_WHAT)
        except (ValueError, PermissionError) as err:  # raised on every rank below, not only here
            error = (type(err).__name__, str(err))
    state, error = broadcast_object((state, error), "the Laplace fit checkpoint")
    if error is not None:
        kind = {"PermissionError": PermissionError, "CheckpointError": CheckpointError}.get(error[0], ValueError)
        raise kind(error[1])
    return state


def resumable_fit(la: "Laplace", train_loader: Iterable, plan: CheckpointPlan, recorder: RecordingFactors,
                  factors: OutputFactors) -> "Laplace":
    """Fit ``la``'s structure on ``train_loader`` in checkpointed segments (module docstring); resume if possible.

    Call after ``la`` located its covered parameters (``Laplace._fit`` does), with the recorder that sums
    log p(y | f) and the factors the structure sees (the recorder, or a per-position wrapper of it). Cost: the
    structure's fit, plus per segment one hash of its batches, a few all-reduces under torch.distributed, and
    writing the running sums (full: P^2 numbers; diag: P; kron/ekfac: the factors) to disk; a resume hashes the
    batches it skips.

    Returns:
        ``la``, with its structure, N and log-likelihood statistic (over all ranks) set.

    Raises:
        CheckpointError: the checkpoint belongs to another run or was written from other batches (fix named).
        PermissionError: the checkpoint's folder is not writable. ValueError: an empty loader; ranks with
            different numbers of batches.
    """
    path, checkpoint_every = plan
    fingerprint = fit_fingerprint(la, checkpoint_every)
    state = _load_state(la, path, fingerprint)
    resumed = state is not None
    state = _fresh_state(la) if state is None else _on_device(la, state)
    if resumed:
        la.factors.generator.set_state(state["generator"])
    passes = 2 if la.structure_cls is EKFACCurvature else 1
    bar = tqdm(desc=f"Laplace fit ({la.structure_name}, checkpointed)", unit="batch", disable=not la.progress,
               leave=False)
    while state["phase"] < passes:
        stream = iter(la._batches(train_loader))
        _skip_checked(stream, state["segments"], path)
        while True:
            first = next(stream, None)
            if not _any_rank_has(first is not None, checkpoint_every):
                break
            assert first is not None  # all ranks have one
            segment = _Segment(la, first, stream, checkpoint_every, bar)
            recorder.active, recorder.n_seen, recorder.stat = state["phase"] == 0, 0, torch.zeros(())
            state["sums"] = _segment_sums(la, state, segment, factors)
            if state["phase"] == 0:
                if recorder.n_seen != segment.n_data:
                    raise RuntimeError(f"the {la.structure_name} fit evaluated {recorder.n_seen} of the segment's "
                                       f"{segment.n_data} examples; the log-likelihood needs each exactly once")
                (stat,) = sum_over_ranks([recorder.stat.to(la.subset.dtype).reshape(())], "log p(D | theta*)")
                state["loglik_stat"] = state["loglik_stat"] + stat
                state["n_data"] += sum_count(segment.n_data, "the number of training examples")
            rows = gather_rows(_segment_row(segment.count, segment.digests), "the batch digests")
            state["segments"].append([_row_entry(row) for row in rows])
            _check_same_pass(state, path)
            state["position"] += segment.count
            state["generator"] = la.factors.generator.get_state()
            if is_main_process():
                save_checkpoint(path, state, fingerprint, CHECKPOINT_WHAT)
        if state["sums"] is None:
            raise ValueError("cannot fit the curvature on an empty data loader")
        if state["phase"] == 0 and passes == 2:
            _end_of_pass(la, state)
            if is_main_process():
                save_checkpoint(path, state, fingerprint, CHECKPOINT_WHAT)
        else:
            if state["factor_segments"] is not None and len(state["segments"]) != len(state["factor_segments"]):
                raise CheckpointError(f"the loader yielded {len(state['segments'])} segments in ekfac's eigenvalue "
                                      f"pass, {len(state['factor_segments'])} in its factor pass (checkpoint "
                                      f"{path}): it must yield the same batches on every pass")
            state["phase"] += 1
    bar.close()
    la.structure, la.n_data, la._loglik_stat = _structure(la, state), int(state["n_data"]), state["loglik_stat"]
    return la
