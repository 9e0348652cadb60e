"""MuDSC: merging models trained from different initializations under dual-space constraints.

Xu et al., "Training-Free Pretrained Model Merging", CVPR 2024. Two models A
and B of one architecture, described by a :class:`~merging_kernels.permutation_spec.PermutationSpec`,
are merged unit by unit:

1. **Statistics.** One pass of a calibration set through both models with
   forward hooks at every group's activation points accumulates the
   correlation of the concatenated features [f_A, f_B] (2n x 2n per group;
   averaged over a group's points).
2. **Similarity.** For a group, S = w * S_weight + (1 - w) * S_act, where
   S_weight is the Pearson correlation of the units' concatenated weight
   vectors (every weight the unit's permutation touches; BN running
   statistics excluded), with B's neighbouring groups already put in the
   current alignment.
3. **Matching.** ``mode="permute"``: an exact linear assignment on the
   cross block (A x B). Groups with heads (``group_size``): the g x g scores of
   the best within-head matchings (one batched assignment), one assignment of
   heads (summed over groups tied by ``heads_with``), then the units within
   each matched pair of heads. ``mode="zip"`` (ZipIt-style): after the
   permutation alignment, every *zippable* group is re-matched by the greedy
   zip on its full 2n x 2n similarity (-inf diagonal; repeatedly merge the
   most similar remaining pair, within or across models; a merged unit's
   similarity to the rest is the minimum of its members' times
   ``zip_factor``) into n merged units: a merge matrix M (n x 2n) for every
   parameter that produces, normalizes or is added to the units, and an
   unmerge matrix U (2n x n) for every parameter that consumes them.
   Zippable: every group without heads; residual-tied groups unless
   ``zip_residual=False`` (ZipIt's full treatment: one M and U for every layer
   that writes or reads the stream -- exact for a model zipped with a
   permuted copy of itself, an approximation otherwise, notably under a
   LayerNorm, whose statistics run across the merged units). Head groups stay
   permuted: a zipped query/key unit would change the heads' dot products.
4. **Refinement** (``refine``; w > 0). Start from the activation-only
   matching (w = 0; or from the identity for ``w = 1``, which is then Git
   Re-Basin's weight matching, data-free); sweep over the groups in a random
   order, recompute each one's dual similarity with its neighbours' current
   permutations and re-solve; keep a change only when the total objective
   (sum over groups of the matched similarities) increases; stop at a fixed
   point (a sweep that changes nothing), after ``patience`` sweeps whose total
   gain is below the tolerance (rare: an accepted change always gains), or
   after ``max_sweeps``. A unit none of whose B tensors
   changed since its last solve is not solved again (it would give the same answer); nor, after a kept
   change, is a unit whose own permutation only reorders B's units in its similarity (re-solving gives the
   identity). A unit with two axes of one parameter -- a residual block ``h + f(W h)`` whose stream group
   holds both W's rows and its columns -- moves entries within its own unit vectors too: it is solved again
   in the next sweep.
5. **Rewrite.** θ = α θ_A + (1 - α) P θ_B for permuted parameters, and
   Σ_m M_m θ_m U_m for zipped ones (m over the two models).
6. **BatchNorm reset** (``reset_bn``): running statistics re-estimated on the
   calibration set (REPAIR/ZipIt do this; merged CNNs need it).
7. **REPAIR** (``repair``; by default for models without BatchNorm): every
   Linear/Conv that produces a group's units is rescaled and shifted so that
   each merged channel's mean and std on the calibration set are the merge
   matrix's interpolation of the endpoints' (:mod:`merging_kernels.methods.repair`).
   On digits (zip, w = 0.5) it added 1.7-2.0 points to the MLP merges and
   lifted the small ViT from 0.22 to 0.36 (0.21 to 0.32 joint on split
   tasks; still far below the endpoints' 0.96).

The heavy parts run on the ops: :mod:`merging_kernels.ops.similarity`
(activation statistics and correlations, within-model weight correlations,
dual combination, group similarity) and :func:`merging_kernels.linear_sum_assignment`;
this module holds the algorithm. One piece of bookkeeping is done here with
plain torch: in the sweeps the cross-model weight correlation is kept as a sum
of per-parameter products of normalized unit vectors (the Pearson correlation
of a concatenation is that sum), so that only the products next to a group
that moved are recomputed (a matmul each) -- about half the GEMM work of
recomputing ``correlation_matrix`` for every candidate. The baselines use the same machinery: plain averaging
(:func:`average_merge`), weight matching (``w=1``), activation matching
(``w=0``) and ZipIt (``mode="zip", w=0``).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .._modes import evaluating
from .._progress import tqdm_disable
from .._validation import check_bool, check_has_data, check_int, check_real
from ..ops.linear_assignment import LINEAR_ASSIGNMENT, linear_sum_assignment
from ..ops.zip_matching import ZIP_MATCHING, greedy_zip
from ..permutation_spec import Axis, PermutationSpec, permute_units, spec_for

from ..ops.similarity import (SIMILARITY, ActivationStats, activation_stats_hooks, correlation_matrix,
                              dual_similarity, group_similarity)

__all__ = ["MuDSCResult", "activation_matching_merge", "average_merge", "mudsc_merge", "reset_batchnorm",
           "weight_matching_merge", "zipit_merge"]

_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_EPS = 1e-8
STAGES = ("statistics", "similarity", "assignment", "rewrite", "bn_reset", "repair")


@dataclass
class MuDSCResult:
    """What :func:`mudsc_merge` did: the merged model, the matchings, the objective per sweep, timings (s)."""

    model: nn.Module
    perms: dict[str, torch.Tensor]  # group -> B's unit matched to each of A's units (after refinement)
    zips: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # group -> (M, U)
    objective_history: list[float] = field(default_factory=list)
    sweeps: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    spec: PermutationSpec | None = None
    alpha: float = 0.5
    exclude: tuple[str, ...] = ()  # parameters left out of the merge (per-task heads; may differ in shape)
    _states: tuple = ()  # (A's state, B's state) as given, for project()

    @property
    def total_time(self) -> float:
        return sum(self.timings.values())

    def merge_matrix(self, group: str) -> torch.Tensor:
        """(n, 2n) float32: merged unit c of ``group`` = Σ_u M[c, u] · unit u of [A's units; B's units as given].

        A permuted group has α at (c, c) and 1 − α at (c, n + perms[c]); a zipped group has its
        greedy-zip merge matrix with the columns of B put back in B's own unit order. The weights that
        turn the two models' per-unit statistics into the merged unit's (REPAIR-style corrections).
        """
        if self.spec is None or group not in self.spec.groups:
            raise ValueError(f"no group {group!r} in this merge")
        perm = self.perms[group]
        n = perm.numel()
        if group in self.zips:
            aligned = self.zips[group][0].float()
            out = torch.empty_like(aligned)
            out[:, :n] = aligned[:, :n]
            out[:, n + perm] = aligned[:, n:]
            return out
        out = torch.zeros(n, 2 * n, device=perm.device)
        rows = torch.arange(n, device=perm.device)
        out[rows, rows] = self.alpha
        out[rows, n + perm] = 1.0 - self.alpha
        return out

    def project(self, which: str, names) -> dict[str, torch.Tensor]:
        """Parameters of model ``"a"`` or ``"b"`` expressed in the merged model's units.

        For parameters whose output side no group touches -- per-task classifier
        heads kept beside a merged body (ZipIt's disjoint-task setting), e.g. the
        ``exclude``-d ones: B's input columns are permuted to the alignment, and
        zipped groups' columns go through that model's block of the unmerge matrix.
        """
        if which not in ("a", "b"):
            raise ValueError(f"which must be 'a' or 'b', got {which!r}")
        if isinstance(names, str):
            raise TypeError(f"names must be a collection of parameter names, not one string (got {names!r}; "
                            f"pass [{names!r}])")
        if not self._states:
            raise ValueError("this result keeps no weights to project (mudsc_merge(..., return_result=True) "
                             "makes one that does)")
        state = self._states[0 if which == "a" else 1]
        for name in names:
            if name not in state:
                raise ValueError(f"parameter {name!r} is not in the models")
        return {name: _project(state[name], name, 0 if which == "a" else 1, self.spec, self.perms, self.zips)
                for name in names}


class _Timer:
    """Wall seconds per stage. On a GPU it synchronizes at each stage's ends, so that kernels queued in one
    stage are not billed to the next (a merge is not a hot path: the syncs cost nothing that matters)."""

    def __init__(self, device: torch.device | None = None):
        self.t = dict.fromkeys(STAGES, 0.0)
        self.device = device if device is not None and device.type == "cuda" else None

    def _sync(self):
        if self.device is not None:
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, stage):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.t[stage] += time.perf_counter() - start


# --------------------------------------------------------------------------- inputs


def _batch_input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"calibration batches must be tensors or (input, ...) tuples, got {type(batch).__name__}")


def _op_backends(backend) -> dict:
    """{op family name: backend or None} of the ops a merge calls, from one name or a mapping of them."""
    families = (SIMILARITY.name, LINEAR_ASSIGNMENT.name, ZIP_MATCHING.name)
    if backend is None or isinstance(backend, str):
        return dict.fromkeys(families, backend)
    if not isinstance(backend, Mapping):
        raise TypeError(f"backend must be a name, a mapping op family -> name, or None; got {type(backend).__name__}")
    unknown = [k for k in backend if k not in families]
    if unknown:
        raise ValueError(f"backend: unknown op famil{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                         f"the merge calls {list(families)}")
    return {f: backend.get(f) for f in families}


def _batches(calibration):
    """The calibration batches as an iterable: a tensor is one batch; None stays None."""
    if calibration is None:
        return None
    if isinstance(calibration, torch.Tensor):
        return [calibration]
    if not isinstance(calibration, Iterable):
        raise TypeError(f"calibration must be a tensor or an iterable of input batches (e.g. a DataLoader), got "
                        f"{type(calibration).__name__}")
    return calibration


def _reiterable(calibration):
    calibration = _batches(calibration)
    if calibration is not None and iter(calibration) is calibration:  # one-shot: keep its batches for a 2nd pass
        return list(calibration)
    return calibration


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating tensor (for the hint on a batch of another dtype)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


# --------------------------------------------------------------------------- small helpers (plain torch)


def _weight_axes(group):
    """The axes whose entries enter the weight-space similarity (BN running statistics excluded)."""
    axes = [a for a in group.axes if not a.param.endswith(_STAT_SUFFIXES)]
    if not axes:
        raise ValueError(f"group {group.name!r} permutes no weights (only running statistics): weight-space "
                         f"similarity is undefined for it; use w=0")
    return axes


def _part(state, a: Axis, n: int) -> torch.Tensor:
    """(n, d): each unit's entries of one parameter along one axis."""
    t = state[a.param]
    t = t.movedim(a.dim % t.dim(), 0)
    t = t.reshape(a.outer, n, a.inner, t.shape[1:].numel())  # not -1: ambiguous for a tensor of 0 entries
    return t.permute(1, 0, 2, 3).reshape(n, a.outer * a.inner * t.shape[3]).float()


def _unit_vectors(state, group, n: int) -> torch.Tensor:
    """(n, D): for each unit, every weight its permutation touches (running statistics excluded)."""
    return torch.cat([_part(state, a, n) for a in _weight_axes(group)], 1)


def _scatter_units(t: torch.Tensor, axis: Axis, index: torch.Tensor, scale: torch.Tensor | None,
                   n_new: int) -> torch.Tensor:
    """Along ``axis``: new unit c = Σ over old units u with index[u] = c of scale[u] · unit u.

    A merge or unmerge matrix block of the greedy zip has one non-zero per old unit, so applying it is
    this scatter-add (O(size) instead of a dense matmul).
    """
    dim = axis.dim % t.dim()
    shape = t.shape
    n_old = shape[dim] // (axis.outer * axis.inner)
    v = t.reshape(*shape[:dim], axis.outer, n_old, axis.inner, *shape[dim + 1:])
    if scale is not None:
        v = v * scale.to(v.dtype).view([n_old if d == dim + 1 else 1 for d in range(v.dim())])
    out_shape = list(v.shape)
    out_shape[dim + 1] = n_new
    y = v.new_zeros(out_shape).index_add_(dim + 1, index.to(v.device), v)
    return y.reshape(*shape[:dim], axis.outer * n_new * axis.inner, *shape[dim + 1:])


def _project(t: torch.Tensor, name: str, model: int, spec: PermutationSpec, perms, zips) -> torch.Tensor:
    """A consumer parameter of model 0 (A) or 1 (B), as given, expressed in the merged units."""
    x = t.float()
    for g, a in spec.param_axes().get(name, []):
        if a.role == "out":
            raise ValueError(f"parameter {name!r} is on the output side of group {g!r}; only parameters whose "
                             f"outputs are not merged (e.g. heads) can be projected")
        if model == 1:
            x = permute_units(x, a, perms[g])
        if g in zips:
            n = spec[g].size
            cluster = zips[g][1].argmax(1)[model * n:(model + 1) * n]
            x = _scatter_units(x, a, cluster, None, n)
    return x.to(t.dtype)


def _zip_maps(zips):
    """group -> (cluster of each of the 2n units, its weight in the merge matrix)."""
    maps = {}
    for g, (merge, unmerge) in zips.items():
        cluster = unmerge.argmax(1)
        maps[g] = (cluster, merge[cluster, torch.arange(cluster.numel(), device=cluster.device)])
    return maps


def reset_batchnorm(model: nn.Module, calibration: Iterable) -> bool:
    """Re-estimate every BatchNorm's running statistics on the calibration batches (cumulative average).

    Mutates ``model`` (as its name does not say: it is the point); returns whether
    it had any BatchNorm. ``calibration``: an iterable of input batches (tensors, or tuples
    whose first entry is the input), e.g. a DataLoader; a single tensor is one batch (as in
    :func:`mudsc_merge`, :func:`average_merge` and ``repair``). Only the BatchNorm layers run in
    train mode (Dropout and the like stay in eval mode, so they do not skew the statistics); every
    module's mode is restored. On an error the model is left as it was: every BatchNorm buffer
    (running statistics and ``num_batches_tracked``) and momentum are put back.

    Raises:
        TypeError: ``model`` not an ``nn.Module``; ``calibration`` neither a tensor nor an iterable, or a
            batch that is neither a tensor nor an (input, ...) tuple.
        ValueError: ``calibration`` None or yielding no batch (the statistics would be wiped); a batch that
            holds NaN/Inf or does not run through the model (naming it); statistics that come out non-finite.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if calibration is None:
        raise ValueError("calibration is None: re-estimating the BatchNorm statistics needs input batches")
    calibration = _batches(calibration)
    bns = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return False
    # every buffer (num_batches_tracked too: reset_running_stats zeroes it, each batch counts) and the momentum
    saved = [({k: v.clone() for k, v in bn.named_buffers(recurse=False)}, bn.momentum) for _, bn in bns]
    device, dtype = _device(model), _float_dtype(model)
    count = 0
    try:
        with evaluating(model), torch.no_grad():  # evaluating gives every module its mode back
            for _, bn in bns:
                bn.reset_running_stats()
                bn.momentum = None  # a cumulative average over the calibration batches
                bn.train()
            for index, batch in enumerate(calibration):
                x = _batch_input(batch).to(device)
                if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
                    raise ValueError(f"calibration batch {index} holds NaN or Inf values: the BatchNorm statistics "
                                     f"would not be finite")
                with _forward_errors(index, x, "the model", dtype=dtype):
                    model(x)
                count += 1
        if count == 0:
            raise ValueError("calibration yielded no batch: cannot re-estimate the BatchNorm statistics")
        for name, bn in bns:
            stats = [t for t in (bn.running_mean, bn.running_var) if t is not None]
            if stats and not all(bool(torch.isfinite(t).all()) for t in stats):
                raise ValueError(f"BatchNorm {name!r}: its statistics on the calibration data are not finite "
                                 f"(the model overflows on it)")
    except BaseException:
        with torch.no_grad():
            for (_, bn), (buffers, _) in zip(bns, saved):  # leave the model as it was
                for key, value in buffers.items():
                    getattr(bn, key).copy_(value)
        raise
    finally:
        for (_, bn), (_, momentum) in zip(bns, saved):
            bn.momentum = momentum
    return True


# --------------------------------------------------------------------------- the algorithm


class _Alignment:
    """Current alignment of B to A: per-group permutations, B's state in that order, objective terms."""

    def __init__(self, spec: PermutationSpec, sd_a, sd_b, s_act, w: float, backends: dict, cross_only: bool = False):
        """``s_act``: per group the activation correlation, (2n, 2n), or its (n, n) cross block with ``cross_only``
        (then no within-model similarity can be asked for: zip needs it, permute does not); None: w = 1."""
        self.spec, self.w = spec, w
        self.sim_backend, self.lsa_backend = backends[SIMILARITY.name], backends[LINEAR_ASSIGNMENT.name]
        self.sd_b = dict(sd_b)  # aligned B (entries replaced, never mutated in place)
        self.s_act_full = None if cross_only else s_act
        if cross_only or not s_act:
            self.s_act = dict(s_act or {})
        else:
            self.s_act = {g: s[: spec[g].size, spec[g].size:] for g, s in s_act.items()}
        self.perms = {g.name: torch.arange(g.size, device=_first(sd_a).device) for g in spec}
        self.sd_a = sd_a
        self.sd_b0 = dict(sd_b)  # B as given
        self._within: dict = {}
        self.vec_a = {g.name: _unit_vectors(sd_a, g, g.size) for g in spec} if w > 0 else {}
        self.row_stats = {}
        for g in spec if w > 0 else ():
            vb = _unit_vectors(sd_b, g, g.size)
            va = self.vec_a[g.name]
            self.row_stats[g.name] = (va.mean(1), (va - va.mean(1, keepdim=True)).norm(dim=1), vb.mean(1),
                                      (vb - vb.mean(1, keepdim=True)).norm(dim=1), va.shape[1])
        # Pearson correlation of concatenated vectors = Σ over parameters of products of the normalized parts;
        # a part changes only when a group permuting its parameter's other axes moves, so the sweeps keep
        # each part's product and recompute only those whose neighbours moved
        self.pax = spec.param_axes()
        self.a_hat = {}
        for g in spec if w > 0 else ():
            mean_a, norm_a = self.row_stats[g.name][:2]
            self.a_hat[g.name] = [(a, (_part(sd_a, a, g.size) - mean_a[:, None]) / (norm_a[:, None] + _EPS))
                                  for a in _weight_axes(g)]
        self.perm_version = {g.name: 0 for g in spec}
        self._part_cache: dict = {}
        self.neigh = {g.name: spec.neighbours(g.name) for g in spec}
        # units with two axes of one parameter (a residual block's fc.weight, rows and columns in the stream):
        # their own permutation also moves entries within their unit vectors, so after a kept change their
        # similarity is not just the old one with B's units reordered, and a re-solve may find more
        self.self_coupled = set()
        for unit in spec.matching_units():
            params = [a.param for n in unit for a in spec[n].axes]
            if len(params) != len(set(params)):
                self.self_coupled.add(unit)
        self._duals: dict[str, torch.Tensor] = {}  # group -> column potentials of its last assignment solve
        self.obj: dict[str, float] = {}
        self.version: dict[str, int] = {}  # param -> stamp of its last change (restored on a revert)
        self._clock = 0

    # similarity of one group, in aligned coordinates (rows: A's units, columns: B's aligned units)
    def similarity(self, name: str, w: float, full: bool = False) -> torch.Tensor:
        """The cross block, or with ``full`` the whole (2n, 2n) matrix of both models' units."""
        if not full:
            return self.similarity_given(name, w)[:, self.perms[name]]
        g = self.spec[name]
        perm = self.perms[name]
        s_w = s_a = None
        if w > 0:
            s_w = self._weight_cross_given(name)[:, perm]
            # the within-model blocks do not depend on the alignment (neighbours permute the entries of every
            # unit vector alike; the group's own permutation only reorders B's units)
            if name not in self._within:
                vb0 = _unit_vectors(self.sd_b0, g, g.size)
                self._within[name] = (correlation_matrix(self.vec_a[name], None, backend=self.sim_backend),
                                      correlation_matrix(vb0, None, backend=self.sim_backend))
            s_aa, s_bb0 = self._within[name]
            s_w = torch.cat([torch.cat([s_aa, s_w], 1), torch.cat([s_w.T, s_bb0[perm][:, perm]], 1)], 0)
        if w < 1:
            idx = torch.cat([torch.arange(g.size, device=perm.device), g.size + perm])
            s_a = self.s_act_full[name][idx][:, idx]
        if s_w is None:
            return s_a
        if s_a is None:
            return s_w
        return dual_similarity(s_w, s_a, w)

    def similarity_given(self, name: str, w: float) -> torch.Tensor:
        """(n, n) cross similarity with B's units (columns) in B's given order, the neighbours' alignment applied
        (the aligned similarity is its columns gathered by the group's permutation)."""
        if w == 0:
            return self.s_act[name]
        s_w = self._weight_cross_given(name)
        return s_w if w == 1 else dual_similarity(s_w, self.s_act[name], w)

    def _weight_cross_given(self, name: str) -> torch.Tensor:
        """(n, n) Pearson correlation of A's unit vectors (rows) with B's (columns, in B's given unit order, with
        the neighbours' current alignment applied), from cached per-part products.

        The parts are kept in B's given order, so that a move of the group's own permutation changes none of
        them; a part changes when a group permuting its parameter's other axes moves.
        """
        g = self.spec[name]
        n = g.size
        mean_b, norm_b = self.row_stats[name][2:4]
        perm = self.perms[name]
        total = None
        for a, a_hat in self.a_hat[name]:
            key = tuple(self.perm_version[h] for h, other in self.pax[a.param] if other is not a)
            hit = self._part_cache.get((name, a))
            if hit is None or hit[0] != key:
                # _part of aligned B has B's unit perm[k] in row k: back to the given order
                b_hat = _part(self.sd_b, a, n).index_select(0, _inverse(perm))
                b_hat = (b_hat - mean_b[:, None]) / (norm_b[:, None] + _EPS)
                gram, updates = _updated_product(hit, a_hat, b_hat) if hit is not None else (None, 0)
                if gram is None:
                    gram, updates = a_hat @ b_hat.T, 0
                hit = (key, gram, b_hat, updates)
                self._part_cache[(name, a)] = hit
            total = hit[1].clone() if total is None else total.add_(hit[1])
        return total

    def objective(self, name: str) -> float:
        g = self.spec[name]
        val = 0.0
        if self.w > 0:
            # Pearson of A's unit i with B's aligned unit i, without gathering B's vectors: a row's mean and
            # centered norm do not change when neighbours permute entries within it, only its position does
            mean_a, norm_a, mean_b, norm_b, length = self.row_stats[name]
            perm = self.perms[name]
            dot = self._row_dots(g)
            corr = (dot - length * mean_a * mean_b[perm]) / ((norm_a + _EPS) * (norm_b[perm] + _EPS))
            val += self.w * float(corr.sum())
        if self.w < 1:
            perm = self.perms[name]
            val += (1 - self.w) * float(self.s_act[name].gather(1, perm[:, None]).sum())
        return val

    def _row_dots(self, g) -> torch.Tensor:
        """(n,): Σ over every weight of the group of A's entry times aligned B's entry, per unit."""
        dot = None
        for a in g.axes:
            if a.param.endswith(_STAT_SUFFIXES):
                continue
            ta, tb = self.sd_a[a.param], self.sd_b[a.param]
            dim = a.dim % ta.dim()
            prod = ta.float() * tb.float()
            others = [d for d in range(prod.dim()) if d != dim]
            part = (prod.sum(others) if others else prod).reshape(a.outer, g.size, a.inner).sum((0, 2))
            dot = part if dot is None else dot + part
        return dot

    def apply(self, name: str, sigma: torch.Tensor):
        """New aligned unit k = old aligned unit sigma[k] (B's parameters and the permutation)."""
        for a in self.spec[name].axes:
            self.sd_b[a.param] = permute_units(self.sd_b[a.param], a, sigma)
            self._clock += 1
            self.version[a.param] = self._clock
        self.perms[name] = self.perms[name][sigma]
        self._clock += 1
        self.perm_version[name] = self._clock

    def snapshot(self, unit: tuple[str, ...]):
        params = {a.param for n in unit for a in self.spec[n].axes}
        return ({p: self.sd_b[p] for p in params}, {p: self.version.get(p, 0) for p in params},
                {n: self.perms[n] for n in unit}, {n: self.perm_version[n] for n in unit})

    def restore(self, snap):
        sd, versions, perms, perm_versions = snap
        self.sd_b.update(sd)
        self.version.update(versions)
        self.perms.update(perms)
        self.perm_version.update(perm_versions)

    def signature(self, unit: tuple[str, ...]) -> tuple:
        """Identity of every B tensor a unit's similarity reads: unchanged since its last solve means the same
        answer (a kept change is then the identity, a rejected one is rejected again)."""
        return tuple(self.version.get(a.param, 0) for n in unit for a in self.spec[n].axes)

    def solve(self, unit: tuple[str, ...], w: float, timer: _Timer) -> dict[str, torch.Tensor]:
        """The best relative permutation(s) sigma for a matching unit given the neighbours' alignment."""
        group = self.spec[unit[0]]
        if group.group_size is None:
            # solved in B's given order (no gather of the n x n matrix): B's unit j_i matches A's unit i, and the
            # relative permutation is the aligned position of j_i
            (name,) = unit
            with timer("similarity"):
                sim = self.similarity_given(name, w)
            with timer("assignment"):
                # each sweep re-solves a problem close to the last one: its duals (indexed by B's given units,
                # like the columns) are a warm start that leaves few rows to augment (CPU; ignored on CUDA)
                if sim.device.type == "cpu":
                    _, matched, _, self._duals[name] = linear_sum_assignment(
                        sim, maximize=True, return_duals=True, backend=self.lsa_backend,
                        warm_start=self._duals.get(name))
                else:
                    matched = linear_sum_assignment(sim, maximize=True, backend=self.lsa_backend)[1]
                return {name: _inverse(self.perms[name])[matched]}
        with timer("similarity"):
            sims = {name: self.similarity(name, w) for name in unit}
        with timer("assignment"):
            s = group.group_size
            total, within = None, {}
            for name in unit:
                scores, perms = group_similarity(sims[name], s, backend=self.lsa_backend)
                within[name] = perms
                total = scores if total is None else total + scores
            heads = linear_sum_assignment(total, maximize=True, backend=self.lsa_backend)[1]
            g = heads.numel()
            out = {}
            for name in unit:
                inner = within[name][torch.arange(g, device=heads.device), heads]  # (g, s)
                out[name] = (heads[:, None] * s + inner).reshape(-1)
            return out


# A part's product is updated (not recomputed) when a neighbour moved few of its entries: late sweeps move a
# few units, and each moved entry costs n·n multiply-adds instead of the n·n·d of the whole product. CPU only:
# finding the moved entries reads a count back to the host, which costs a GPU more than the product.
_MAX_INCREMENTAL_UPDATES = 8  # then the product is recomputed, so that rounding cannot drift
_INCREMENTAL_FRACTION = 0.25  # moved fraction of a part's entries above which the whole product is cheaper


def _updated_product(hit, a_hat: torch.Tensor, b_hat: torch.Tensor):
    """(Â·B̂ᵀ, updates) from a cached (key, Â·B̂oldᵀ, B̂old, updates) whose B̂old differs from ``b_hat`` in few
    entry columns (a neighbour's permutation moved them), or (None, 0) where recomputing is cheaper or due."""
    _, gram, b_old, updates = hit
    if b_hat.device.type != "cpu" or updates >= _MAX_INCREMENTAL_UPDATES:
        return None, 0
    diff = b_hat - b_old
    moved = (diff != 0).any(0).nonzero().squeeze(1)
    if moved.numel() > _INCREMENTAL_FRACTION * b_hat.shape[1]:
        return None, 0
    if moved.numel():
        gram = torch.addmm(gram, a_hat[:, moved], diff[:, moved].T)
    return gram, updates + 1


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _first(sd):
    return next(iter(sd.values()))


def _calibration_error(exc: Exception, index: int, spec: PermutationSpec | None = None, *, batch=None,
                       what: str = "the models", dtype: torch.dtype | None = None) -> ValueError:
    """A model's complaint about calibration batch ``index``, said in terms of the merge (``what``: who ran it;
    ``batch``, ``dtype``: the input and the models' dtype, for a hint; ``spec``: to name the hooked modules)."""
    if spec is None or "fired twice" not in str(exc):
        hint = ""
        if isinstance(batch, torch.Tensor) and batch.dim() == 1 and not (batch.is_floating_point()
                                                                        or batch.is_complex()):  # labels, likely
            hint = (f" (the batch is a {batch.dtype} tensor: if it holds labels, the calibration given was one "
                    f"(inputs, labels) pair; pass an iterable of batches, e.g. [(x, y)])")
        elif isinstance(batch, torch.Tensor) and dtype is not None and batch.dtype != dtype:
            hint = f" (the batch is {batch.dtype}, the weights {dtype}: cast the calibration data)"
        return ValueError(f"calibration batch {index} does not run through {what}: {exc}{hint}")
    hooked = sorted({p.module for g in spec for p in g.activations})
    return ValueError(f"an activation point runs more than once per forward pass (one of {hooked[:8]}): "
                      "a module shared between layers, such as one nn.ReLU used twice, cannot tell its "
                      "calls apart; hook the consuming layer instead (ActivationPoint(..., input=True)) "
                      "or give each use its own module")


@contextlib.contextmanager
def _forward_errors(index: int, batch, what: str = "the models", spec: PermutationSpec | None = None,
                    dtype: torch.dtype | None = None):
    """A model's forward pass on calibration batch ``index``: its errors as :func:`_calibration_error` says them."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise  # callers retry with smaller batches; keep its type
    except (RuntimeError, IndexError) as exc:  # IndexError: a 1-d batch (labels) where the model flattens dim 1
        raise _calibration_error(exc, index, spec, batch=batch, what=what, dtype=dtype) from exc


class _PointStats(ActivationStats):
    """The statistics of one activation point, whose errors say which point and which model they are about."""

    def __init__(self, label: str, sizes, **options):
        super().__init__(sizes, **options)
        self.label = label

    def update(self, *features):
        try:
            super().update(*features)
        except (ValueError, TypeError) as exc:  # "features[0] (model 0) ..." -> the merge's names
            message = str(exc).replace("features[0] (model 0)", "model_a's feature tensor")
            message = message.replace("features[1] (model 1)", "model_b's feature tensor")
            message = message.replace("features[0]", "model_a's").replace("features[1]", "model_b's")
            raise type(exc)(f"{self.label}: {message}") from exc


def _collect_statistics(model_a, model_b, spec, batches, backend, timer, progress, cross_only=False):
    """Per group, the activation correlation averaged over its points: the full (2n, 2n) matrix of [A, B]'s units,
    or with ``cross_only`` (permute mode: a one-to-one matching reads no within-model pair) the (n, n) block of
    A's units against B's, for a third to a half of the products."""
    from tqdm.auto import tqdm

    mods_a, mods_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    device, dtype = _device(model_a), _float_dtype(model_a)
    stats: dict[str, list[_PointStats]] = {}
    nonempty_batches = 0  # batches with any entries (numel, not the first dim: inputs may be sequence-first)
    with timer("statistics"), contextlib.ExitStack() as stack:
        for g in spec:
            if not g.activations:
                raise ValueError(f"group {g.name!r} has no activation points (needed unless w=1 with init='identity')")
            stats[g.name] = []
            for p in g.activations:
                st = _PointStats(f"group {g.name!r}, activation point {p.module!r}"
                                 f"{' (input)' if p.input else ''}", [g.size, g.size], device=device, backend=backend,
                                 blocks="cross" if cross_only else "all")
                stack.enter_context(activation_stats_hooks((mods_a[p.module], mods_b[p.module]), st, input=p.input,
                                                           channel_dim=p.channel_dim, label=st.label))
                stats[g.name].append(st)
        with evaluating(model_a, model_b), torch.no_grad():
            for index, batch in enumerate(tqdm(batches, desc="MuDSC statistics", disable=tqdm_disable(progress),
                                               leave=False)):
                x = _batch_input(batch).to(device)
                nonempty_batches += x.numel() > 0
                with _forward_errors(index, x, spec=spec, dtype=dtype):
                    try:
                        model_a(x)
                        model_b(x)
                    except (ValueError, TypeError) as exc:  # the statistics' own checks (they name the point)
                        if isinstance(exc, RuntimeError):
                            raise  # also a RuntimeError (a model's input check): _forward_errors names the batch
                        raise type(exc)(f"calibration batch {index}: {exc}") from exc
    with timer("similarity"):
        out = {}
        some_recorded = any(st.count for sts in stats.values() for st in sts)
        for name, sts in stats.items():
            for st in sts:
                if st.count == 0 and (some_recorded or nonempty_batches):
                    raise ValueError(f"{st.label} recorded nothing while the models ran {nonempty_batches} "
                                     f"non-empty calibration batch(es): the module is never called in the forward "
                                     f"pass (a container such as an nn.ModuleList, or an unused branch); hook one "
                                     f"that runs")
                if st.count == 0:
                    raise ValueError(f"group {name!r}: no activations were recorded (the calibration data is empty "
                                     f"or holds batches of 0 samples)")
            corr = sts[0].correlation()
            for st in sts[1:]:
                corr = corr + st.correlation()
            out[name] = corr / len(sts)
    return out


def _rewrite(sd_a, sd_b, spec, zips, alpha, skip=()):
    out = {}
    maps = _zip_maps(zips)
    pax = spec.param_axes()
    for name, ta in sd_a.items():
        if name in skip:
            continue
        tb = sd_b[name]
        if not ta.is_floating_point():
            out[name] = ta.clone()
            continue
        zaxes = [(g, a) for g, a in pax.get(name, []) if g in zips]
        if not zaxes:
            out[name] = torch.lerp(tb.float(), ta.float(), alpha).to(ta.dtype)
            continue
        zipped_out = any(a.role == "out" for _, a in zaxes)
        acc = None
        for m, (t, wm) in enumerate(((ta, alpha), (tb, 1.0 - alpha))):
            x = t.float()
            for g, a in zaxes:
                cluster, weight = maps[g]
                n = spec[g].size
                block = slice(m * n, (m + 1) * n)
                x = _scatter_units(x, a, cluster[block], weight[block] if a.role == "out" else None, n)
            if not zipped_out:
                x = x * wm
            acc = x if acc is None else acc + x
        out[name] = acc.to(ta.dtype)
    return out


def mudsc_merge(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None = None, calibration=None, *,
                mode: str = "permute", w: float = 0.5, alpha: float = 0.5, refine: bool = True,
                max_sweeps: int = 100, patience: int = 5, init: str = "auto", zip_factor: float = 0.5,
                zip_residual: bool = True, exclude: Iterable[str] = (), reset_bn: bool = True,
                repair: bool | None = None, progress: bool | None = None, backend: str | Mapping[str, str] | None = None, seed: int = 0,
                return_result: bool = False):
    """Merge two models of one architecture trained from different initializations (MuDSC).

    Args:
        model_a, model_b: the two models (not modified).
        spec: their :class:`PermutationSpec` (default: :func:`spec_for` of a reference model). A group of
            0 units has nothing to match: its permutation is empty and its (empty) parameters are averaged.
        calibration: an iterable of input batches, e.g. a DataLoader: each batch a tensor, or a tuple /
            list whose first entry is the input tensor (``(x, y)``: the labels are ignored); a single
            tensor counts as one batch, and a one-shot iterator is read once and kept. Each input is
            what ``model_a(x)`` takes, batch first: (B, in_features) or (B, ...) for :class:`MLP`
            (flattened), (B, C, H, W) for the ResNet-20 and the ViT; it is moved to the models'
            device but not cast, so it must already have the dtype the models take (e.g. float32
            images for float32 models). Used for activation statistics, the BatchNorm reset and
            REPAIR. None only where no data is needed: w = 1 (init ``"identity"``) on a model
            without BatchNorm (or ``reset_bn=False``), which then skips REPAIR.
        mode: ``"permute"`` (align and average) or ``"zip"`` (ZipIt-style merge of zippable groups).
        w: the balance between weight space (w = 1) and activation space (w = 0).
        alpha: weight of model A in the average (B gets 1 − alpha).
        refine: run the iterative refinement (only meaningful for w > 0).
        max_sweeps, patience: refinement limits (see the module docstring).
        init: ``"activation"`` (activation-only matching), ``"identity"``, or ``"auto"`` (identity when
            w = 1, else activation).
        zip_factor: the ZipIt factor applied to a merged unit's similarities.
        zip_residual: in zip mode, zip residual-tied groups too (ZipIt's full treatment; else they are
            permuted). In benchmarks/results/cpu-mudsc-2026-11-23.txt (zip, w = 0.5, 5 seed pairs) zipping
            them instead of permuting changed test accuracy by +2.9 points (ResNet-20, 0.544 vs 0.515),
            +5.4 (ResNet-20 split tasks, joint), -0.8 and +2.9 (small ViT): all within the seed spread.
        exclude: names of parameters that are not merged: per-task classifier heads, which may differ in
            shape between the two models (class counts). They take no part in the similarity; the merged
            model keeps model A's, expressed in the merged units, and ``result.project("b", exclude)``
            gives B's. Parameters that produce a group's units (output side) cannot be excluded; any other
            (a head's weight, which consumes them, and its bias, in no group) can.
        reset_bn: re-estimate BatchNorm running statistics on ``calibration`` after merging.
        repair: REPAIR the merged model's producers on ``calibration`` (see
            :func:`merging_kernels.methods.repair.repair`); None: when the model has no BatchNorm. With
            BatchNorm (``repair=True``), and ``reset_bn``, its statistics are re-estimated after each stage.
        progress: tqdm bars for the statistics pass, the sweeps and REPAIR's stages; None (default): only
            when stderr is a terminal.
        backend: the ops' backend: one name for every op family (``"torch"``, or one that all have), or a
            mapping ``{"similarity": ..., "linear_assignment": ..., "zip_matching": ...}`` (e.g.
            ``{"linear_assignment": "native"}`` on CPU, where similarity's fast path is torch); a family left
            out, or None: its default. The zip always runs on the CPU (``"native"`` or ``"torch"``).
        seed: order of the groups in the sweeps.
        return_result: return a :class:`MuDSCResult` (model, matchings, objective history, timings).

    Returns:
        The merged model (a deep copy of ``model_a`` with merged parameters, in ``model_a``'s train/eval
        mode), or a :class:`MuDSCResult`.

    Raises:
        ValueError: models that do not match the spec (naming the parameter), bad arguments, missing
            calibration data where it is needed, NaN/Inf values (a tensor may hold Inf where both models
            hold the same values and no group permutes it, e.g. a -inf attention mask: it is copied as is).
        TypeError: a model that is not an ``nn.Module``, a flag that is not a bool.
    """
    from tqdm.auto import tqdm

    if mode not in ("permute", "zip"):
        raise ValueError(f"mode must be 'permute' or 'zip', got {mode!r}")
    w = check_real(w, "w", low=0.0, high=1.0)
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    zip_factor = check_real(zip_factor, "zip_factor", low=0.0, high=1.0)  # scales a merged unit's similarities
    max_sweeps = check_int(max_sweeps, "max_sweeps", low=0)
    patience = check_int(patience, "patience", low=1)
    seed = check_int(seed, "seed", low=-(2**63), high=2**64 - 1)  # torch.Generator's seed range
    backends = _op_backends(backend)
    refine, zip_residual, reset_bn, return_result = (check_bool(v, n) for v, n in (
        (refine, "refine"), (zip_residual, "zip_residual"), (reset_bn, "reset_bn"), (return_result, "return_result")))
    if repair is not None:
        try:
            repair = check_bool(repair, "repair")
        except TypeError:
            raise TypeError(f"repair must be True, False or None, got {type(repair).__name__}") from None
    tqdm_disable(progress)  # checks it
    constants = _check_models(model_a, model_b)
    if mode == "zip" and not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1) with mode='zip' (units merged within one model would get "
                         f"weight 0), got {alpha}")
    if init == "auto":
        init = "identity" if w == 1 else "activation"
    if init not in ("activation", "identity"):
        raise ValueError(f"init must be 'auto', 'activation' or 'identity', got {init!r}")
    if spec is None:
        spec = spec_for(model_a)
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec (or None for a reference model), got "
                        f"{type(spec).__name__}; calibration is the fourth argument")
    if init == "identity" and not (refine and w > 0 and max_sweeps > 0):
        raise ValueError("init='identity' only starts the refinement, which does not run here (refine=False, "
                         "w=0 or max_sweeps=0): nothing would be matched. Use init='activation', or refine with w > 0")
    if isinstance(exclude, str):
        raise TypeError("exclude must be a collection of parameter names, not one string")
    exclude = () if exclude is None else tuple(exclude)
    sd_a = {k: v.detach() for k, v in model_a.state_dict().items()}
    sd_b = {k: v.detach() for k, v in model_b.state_dict().items()}
    for k in exclude:
        if k not in sd_a or k not in sd_b:
            raise ValueError(f"exclude: parameter {k!r} is not in both models")
    if len(spec) == 0:
        raise ValueError("spec has no permutation groups: there is nothing to align (average_merge averages "
                         "without alignment)")
    spec.check(model_a)
    full_spec, spec = spec, spec.without_params(exclude) if exclude else spec
    spec.check(model_a, model_b)
    for name in constants:
        if name in spec.param_axes():
            raise ValueError(f"{name!r} holds Inf values and is permuted by group "
                             f"{spec.param_axes()[name][0][0]!r}: only finite tensors can be aligned")
    constants = tuple(name for name in constants if name not in exclude)
    batches = _reiterable(calibration)
    needs_acts = w < 1 or init == "activation"
    if needs_acts and batches is None:
        raise ValueError("calibration data is needed for activation similarity (w < 1 or init='activation')")
    if batches is None and repair:
        raise ValueError("repair needs calibration data (or pass repair=False)")

    timer = _Timer(_device(model_a))
    for k in sd_a:
        if k not in exclude and (k not in sd_b or sd_a[k].shape != sd_b[k].shape):
            raise ValueError(f"parameter {k!r} is missing from model_b or has another shape (pass it in exclude= "
                             f"if it is a per-task head)")
    s_act = (_collect_statistics(model_a, model_b, spec, batches, backends[SIMILARITY.name], timer, progress,
                                 cross_only=mode == "permute") if needs_acts else None)

    state = _Alignment(spec, sd_a, sd_b, s_act, float(w), backends, cross_only=mode == "permute")
    units = [u for u in spec.matching_units() if spec[u[0]].size]  # a group of 0 units has nothing to match
    if init == "activation":
        for unit in units:
            sigma = state.solve(unit, 0.0, timer)
            for name, sg in sigma.items():
                with timer("rewrite"):
                    state.apply(name, sg)
    with timer("similarity"):
        state.obj = {g.name: state.objective(g.name) for g in spec}
    history = [sum(state.obj.values())]
    sweeps = 0
    if refine and w > 0 and max_sweeps > 0:
        gen = torch.Generator().manual_seed(seed)
        stall = 0
        last_solved: dict = {}
        bar = tqdm(total=max_sweeps, desc="MuDSC sweeps", disable=tqdm_disable(progress), leave=False)
        for sweep in range(max_sweeps):
            changed = False
            before = history[-1]
            for ui in torch.randperm(len(units), generator=gen).tolist():
                unit = units[ui]
                sig = state.signature(unit)
                if last_solved.get(unit) == sig:
                    continue  # nothing it reads changed since its last solve
                sigma = state.solve(unit, float(w), timer)
                last_solved[unit] = sig
                if all(bool((sg == torch.arange(sg.numel(), device=sg.device)).all()) for sg in sigma.values()):
                    continue
                affected = set(unit).union(*(state.neigh[n] for n in unit))
                old_terms = {h: state.obj[h] for h in affected}
                snap = state.snapshot(unit)
                with timer("rewrite"):
                    for name, sg in sigma.items():
                        state.apply(name, sg)
                with timer("similarity"):
                    new_terms = {h: state.objective(h) for h in affected}
                gain = sum(new_terms.values()) - sum(old_terms.values())
                if gain > 1e-7 * max(1.0, abs(before)):
                    state.obj.update(new_terms)
                    changed = True
                    if unit not in state.self_coupled:  # re-solving now gives the identity
                        last_solved[unit] = state.signature(unit)
                    # else the signature kept is the one before the change: solved again next sweep
                else:  # revert
                    state.restore(snap)
            total = sum(state.obj.values())
            history.append(total)
            sweeps = sweep + 1
            bar.update(1)
            bar.set_postfix(objective=f"{total:.4f}")
            stall = 0 if total - before > 1e-7 * max(1.0, abs(before)) else stall + 1
            if not changed or stall >= patience:
                break
        bar.close()

    zips = {}
    if mode == "zip":
        for g in spec:
            if (g.residual and not zip_residual) or g.group_size is not None or not g.size:
                continue  # (0 units: nothing to zip; its empty parameters are averaged)
            with timer("similarity"):
                sim = state.similarity(g.name, float(w), full=True)
            with timer("assignment"):
                zips[g.name] = greedy_zip(sim, alpha, zip_factor, backend=backends[ZIP_MATCHING.name])
    with timer("rewrite"):
        merged_sd = _rewrite(sd_a, state.sd_b, spec, zips, float(alpha), skip=exclude + constants)
        for name in exclude:  # A's head reads the merged units
            merged_sd[name] = _project(sd_a[name], name, 0, full_spec, state.perms, zips)
        for name in constants:  # equal in both models (checked); an average would turn -inf into NaN
            merged_sd[name] = sd_a[name].clone()
        merged = copy.deepcopy(model_a)
        merged.load_state_dict(merged_sd)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in merged.modules())
    if reset_bn and has_bn:
        with timer("bn_reset"):
            if batches is None:
                raise ValueError("reset_bn needs calibration data (or pass reset_bn=False)")
            reset_batchnorm(merged, batches)
    # copies: project() must not change if model_a or model_b is trained afterwards (only for a returned result:
    # two more copies of the models' weights that merge_matrix, all the REPAIR below needs, does not read)
    states = ({k: v.clone() for k, v in sd_a.items()}, {k: v.clone() for k, v in sd_b.items()}) \
        if return_result else ()
    result = MuDSCResult(merged, dict(state.perms), zips, history, sweeps, {}, full_spec, float(alpha),
                         tuple(dict.fromkeys(exclude)), states)
    if (repair if repair is not None else not has_bn) and batches is not None:  # repair=True without data: refused
        from .repair import repair as repair_producers_of

        with timer("repair"):
            # BatchNorm statistics re-estimated after each stage: a BN fed by a corrected producer would
            # otherwise normalize with the statistics of its uncorrected outputs
            repair_producers_of(merged, model_a, model_b, result, batches, inplace=True,
                                reset_bn=reset_bn and has_bn, progress=progress)
    result.timings = dict(timer.t)
    return result if return_result else merged


# --------------------------------------------------------------------------- baselines on the same machinery


def average_merge(model_a: nn.Module, model_b: nn.Module, calibration=None, *, alpha: float = 0.5,
                  reset_bn: bool = True) -> nn.Module:
    """Plain averaging α θ_A + (1 − α) θ_B (no alignment), with the BatchNorm reset (like ``mudsc_merge``).

    Args:
        model_a, model_b: two models of one architecture (same parameter names and shapes; not modified).
        calibration: input batches for the BatchNorm reset (None: keep the averaged statistics).
        alpha: weight of model A, in [0, 1].
        reset_bn: re-estimate BatchNorm running statistics on ``calibration``.

    Returns:
        A deep copy of ``model_a`` holding the average (floating tensors averaged in float32 and cast back
        to their dtype; integer buffers such as ``num_batches_tracked``, and buffers with Inf entries that
        both models hold alike, such as a -inf attention mask, copied from A).
    """
    alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    reset_bn = check_bool(reset_bn, "reset_bn")
    constants = _check_models(model_a, model_b)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    for k in sd_a:
        if k not in sd_b or sd_a[k].shape != sd_b[k].shape:
            raise ValueError(f"parameter {k!r} is missing from model_b or has another shape")
    merged = copy.deepcopy(model_a)
    merged.load_state_dict({k: torch.lerp(sd_b[k].float(), v.float(), alpha).to(v.dtype)
                            if v.is_floating_point() and k not in constants else v.clone() for k, v in sd_a.items()})
    if reset_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in merged.modules()):
        if calibration is None:
            raise ValueError("reset_bn needs calibration data (or pass reset_bn=False)")
        reset_batchnorm(merged, _reiterable(calibration))
    return merged


def _check_models(model_a: nn.Module, model_b: nn.Module) -> set[str]:
    """Two nn.Modules whose floating tensors are on one real device and of one dtype, and finite (errors name
    the first offender: a NaN weight would otherwise surface as a NaN similarity deep in the assignment).
    An entry may hold Inf (a -inf attention mask, as a buffer or a frozen parameter) when both models hold
    the same values: the names of such constants are returned, to be copied as is (an average turns -inf
    into NaN)."""
    for label, model in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{label} must be a torch.nn.Module, got {type(model).__name__}")
    # what a merge reads and writes: the state dict's floating entries (every name of a shared tensor; no
    # non-persistent buffer, which the merged copy of model_a keeps as it is)
    entries = {label: _floating_entries(model) for label, model in (("model_a", model_a), ("model_b", model_b))}
    named = [(label, name, t, kind) for label, items in entries.items() for name, (t, kind) in items.items()]
    ref = None
    for label, name, t, _ in named:
        if ref is None:
            ref = (t.device, t.dtype, f"{label}.{name}")
        elif (t.device, t.dtype) != ref[:2]:
            raise ValueError(f"{label}.{name} is {t.dtype} on {t.device} but {ref[2]} is {ref[1]} on "
                             f"{ref[0]}: move/cast both models to one device and dtype first")
        check_has_data(t, f"{label}.{name}")
    constants: set[str] = set()
    if named:
        finite = torch.stack([torch.isfinite(t).all() for *_, t, _ in named]).cpu().tolist()  # one sync on a GPU
        entries_b = entries["model_b"]
        for (label, name, t, kind), ok in zip(named, finite):
            if ok or name in constants:
                continue
            other = entries_b.get(name)
            if label == "model_a" and other is not None and torch.equal(t, other[0]):
                constants.add(name)  # equal NaNs compare unequal: a NaN (a broken checkpoint) is refused below
                continue
            raise ValueError(f"{label}.{name} ({kind}) holds NaN or Inf values: only finite tensors are merged, "
                             f"and an Inf constant (a -inf attention mask) only where both models hold the same "
                             f"values, which is then copied as is")
    return constants


def _floating_entries(model: nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
    """state-dict name -> (tensor, "parameter" or "buffer") for the model's floating entries."""
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return {name: (t, "parameter" if name in params else "buffer") for name, t in model.state_dict().items()
            if t.is_floating_point()}


def weight_matching_merge(model_a, model_b, spec=None, calibration=None, **options):
    """Git Re-Basin weight matching: ``mudsc_merge`` with w = 1 from the identity (data only for the BN reset).

    ``calibration`` may be None for models without BatchNorm. ``options`` are ``mudsc_merge``'s keyword
    arguments (``mode``, ``alpha``, ``max_sweeps``, ``exclude``, ``return_result``, ...); returns what it
    returns.
    """
    options.setdefault("init", "identity")
    return mudsc_merge(model_a, model_b, spec, calibration, w=1.0, **options)


def activation_matching_merge(model_a, model_b, spec, calibration, **options):
    """Activation matching: ``mudsc_merge`` with w = 0 (correlation of activations only).

    ``calibration`` (input batches) is required; ``options`` are ``mudsc_merge``'s keyword arguments;
    returns what it returns.
    """
    return mudsc_merge(model_a, model_b, spec, calibration, w=0.0, **options)


def zipit_merge(model_a, model_b, spec, calibration, **options):
    """ZipIt (activation-space zip): ``mudsc_merge(mode="zip", w=0)``.

    ``calibration`` (input batches) is required; ``options`` are ``mudsc_merge``'s keyword arguments
    (``alpha``, ``zip_factor``, ``zip_residual``, ``exclude``, ``repair``, ...); returns what it returns.
    """
    return mudsc_merge(model_a, model_b, spec, calibration, mode="zip", w=0.0, **options)
