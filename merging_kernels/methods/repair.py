"""REPAIR: give a merged model's channels the statistics the two endpoint models' channels had.

Jordan et al. 2022, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair". Merging two
models trained from different initializations (MuDSC permute or zip, weight or activation matching)
shrinks the variance of the merged model's hidden activations layer after layer ("variance collapse").
BatchNorm networks recover by re-estimating their BN statistics
(:func:`~merging_kernels.methods.mudsc.reset_batchnorm`); networks without BatchNorm (MLPs, LayerNorm
transformers) need the correction REPAIR makes:

1. **Producers.** For every permutation group, the ``nn.Linear`` / ``nn.Conv{1,2,3}d`` modules whose
   ``weight`` is an output-side axis of the group with ``dim=0, outer=1, inner=1``: their output
   channels *are* the group's units. Other output axes are not producers and are left alone: norm
   parameters, biases (corrected with their weight), parameters added to the units (a ViT's
   ``cls_token``/``pos_embed``), fused projections (``outer > 1``: a qkv weight), flattened layouts
   (``inner > 1``). See :func:`repair_producers`.
2. **Targets.** One calibration pass through ``model_a`` and ``model_b`` with forward hooks on every
   producer gives each endpoint unit's mean μ_u and standard deviation σ_u over the calibration data
   (population moments; channels: the last dim of a Linear's (N, C) / (N, T, C) output, dim 1 of a
   conv's (N, C, ...), everything else pooled). With the group's merge matrix M (n, 2n) -- merged unit
   c = Σ_u M[c, u] · unit u over [A's units; B's units in B's own order], e.g.
   :meth:`MuDSCResult.merge_matrix <merging_kernels.methods.mudsc.MuDSCResult.merge_matrix>` -- merged
   channel c should have mean μ*_c = Σ_u M[c, u] μ_u and std σ*_c = Σ_u M[c, u] σ_u.
3. **Correction, layer by layer in forward order.** For each producer: measure its output mean m_c and
   variance v_c in the merged model (already corrected upstream) over the calibration data, and fold
   the affine map y ↦ (y − m_c) · s_c + μ*_c with s_c = σ*_c / sqrt(v_c + eps) into it:
   W'_c = s_c · W_c, b'_c = s_c · (b_c − m_c) + μ*_c. A *dead* merged channel -- constant on the
   calibration data to float precision, or nearly so next to its target (std ≤ 1e-5 · max(|mean|, σ*_c))
   -- only gets its mean moved (s_c = 1): its variance cannot be restored by scaling, and a large
   scale would amplify whatever it does on other data. So every s_c is finite and below 1e5, and no
   NaN/Inf is produced. ``eps`` (default 1e-12) only keeps the division defined; it is small so that a
   merge whose statistics are already right (a model merged with a permuted copy of itself) is left
   exactly as it is: a BatchNorm-sized eps (1e-5) would move a channel of variance 1e-3 by 0.5%.

Why layer by layer rather than REPAIR's single pass. REPAIR inserts a BatchNorm-like normalizer
after every producer that outputs (x − batch mean)/batch std · σ* + μ*, runs the calibration data
once in train mode, and folds the accumulated statistics. During that pass every layer downstream
sees inputs normalized with *per-batch* statistics, while the folded model applies the *whole-set*
statistics; and BatchNorm's cumulative average of per-batch variances misses the variance of the
batch means. The folded corrections are therefore measured on inputs the repaired model never
produces, an error that grows with depth and with small calibration batches. Layer by layer is exact:
after :func:`repair` every corrected producer's mean and std over the calibration set equal the
targets (up to float rounding and ``eps``), whatever the batch size -- which is also what the tests
check. The cost is one calibration pass per *stage* instead of one in all: producers that read the
very same input tensor (a block's q, k and v; a ResNet block's conv1 and shortcut) cannot depend on
each other and are corrected in one pass, and each pass stops as soon as its stage has run (the rest
of the forward is skipped), so the total is about (stages / 2 + 2) full forward passes over the
calibration data (2: the endpoint models). On the reference ViT (depth 2) that is 9 stages for 13
producers; the whole repair of the digits ViT (512 calibration images) takes ~0.1 s on one CPU thread.
In accuracy the two are indistinguishable on the digits MLP and ViT (within 0.005, also with
calibration batches of 16): exactness is what the choice buys, not accuracy there.

Residual producers (``residual``, default True). In a residual network the producers of a
residual-tied group (a ViT's patch embedding, attention out-projections and fc2; ResNet shortcuts and
last convs) do not own their units alone: the stream's channel is the *sum* of every producer's output
(plus position embedding and class token), so correcting each summand does not set the stream's
statistics, and a LayerNorm ahead of every consumer rescales the stream per token anyway. REPAIR itself
corrects every conv, and the measurement agrees: on scikit-learn digits (ViT dim 32, depth 2, both
models on all 10 digits, 3 seed pairs, MuDSC permute and zip at w = 0.5 and 0), correcting the
residual producers too gave +0.05 to +0.085 test accuracy over correcting only the block-internal
groups (q/k, v, MLP hidden), better in 12 of 12 merges; ``residual=False`` corrects the block-internal groups only.
REPAIR does not rescue that ViT, though: 0.20-0.24 merged without it, 0.35-0.43 with it, 0.96 for
either endpoint. On the MLP (no residual group) it adds +0.013 to +0.030 (12 of 12 merges better).

Statistics are plain per-channel moments kept here (float64 sums of x − k with k the first batch's
mean, so constant channels have exactly zero variance): :class:`~merging_kernels.ops.similarity.ActivationStats`
accumulates a full (D, D) covariance per point, O(D²) work per row where REPAIR needs the O(D) diagonal.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from .._modes import evaluating
from .._progress import tqdm_disable
from .._validation import check_bool, check_real
from ..permutation_spec import PermutationSpec
from .mudsc import MuDSCResult, _batch_input, _float_dtype, _forward_errors, _reiterable, reset_batchnorm

__all__ = ["Producer", "repair", "repair_producers"]

_PRODUCER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_DEAD_RELATIVE_STD = 1e-5


@dataclass(frozen=True)
class Producer:
    """A module whose output channels are the units of ``group`` (its name in the model, e.g. ``"layers.0"``)."""

    module: str
    group: str


# --------------------------------------------------------------------------- producers


def repair_producers(model: nn.Module, spec: PermutationSpec, groups: Iterable[str] | None = None, *,
                     residual: bool = True) -> list[Producer]:
    """The producers :func:`repair` corrects, in the spec's group order (see the module docstring, step 1).

    Args:
        model: a model the spec describes.
        spec: its :class:`PermutationSpec`.
        groups: the groups to consider (default: every group of the spec, residual-tied ones only if
            ``residual``); named groups are taken as given.
        residual: with ``groups=None``, include the producers of residual-tied groups.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``spec`` not a ``PermutationSpec``.
        ValueError: a name in ``groups`` that is not a group of ``spec``; ``groups`` empty.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    names = _group_names(spec, groups, residual)
    modules = dict(model.named_modules())
    out = []
    for g in names:
        for a in spec[g].axes:
            if a.role != "out" or a.outer != 1 or a.inner != 1 or not a.param.endswith(".weight"):
                continue
            mod_name = a.param[: -len(".weight")]
            mod = modules.get(mod_name)
            if not isinstance(mod, _PRODUCER_TYPES) or a.dim % mod.weight.dim() != 0:
                continue
            out.append(Producer(mod_name, g))
    return out


def _group_names(spec, groups, residual) -> list[str]:
    residual = check_bool(residual, "residual")
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}")
    if groups is None:
        return [g.name for g in spec if residual or not g.residual]
    if isinstance(groups, str):
        groups = [groups]
    names = list(groups)
    if not names:
        raise ValueError("groups is empty: name at least one group (or pass None for all)")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"groups must hold group names (str), got {type(name).__name__}")
        if name not in spec.groups:
            raise ValueError(f"groups: {name!r} is not a group of the spec (groups: {list(spec.groups)[:8]})")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- statistics


class _Moments:
    """Per-channel streaming mean and population variance (float64 sums of x − k, k = first batch's mean)."""

    def __init__(self, name: str):
        self.name = name
        self.count = 0
        self.shift = self.sum = self.sumsq = None

    def update(self, y: torch.Tensor, channel_dim: int) -> None:
        y = y.detach()
        c = y.movedim(channel_dim, -1).reshape(-1, y.shape[channel_dim])
        if c.shape[0] == 0:
            return
        work = torch.promote_types(c.dtype, torch.float32)
        c = c.to(work)
        if self.shift is None:
            self.shift = c.mean(0)
            self.sum = torch.zeros(c.shape[1], dtype=torch.float64, device=c.device)
            self.sumsq = torch.zeros_like(self.sum)
        d = c - self.shift
        s = d.sum(0, dtype=torch.float64)
        ss = (d * d).sum(0, dtype=torch.float64)
        if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(ss).all())):
            raise ValueError(f"the output of {self.name} contains NaN or Inf on the calibration data")
        self.sum += s
        self.sumsq += ss
        self.count += c.shape[0]

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.sum / self.count
        return self.shift.to(torch.float64) + m, (self.sumsq / self.count - m * m).clamp_min(0.0)


def _channel_dim(mod: nn.Module) -> int:
    return -1 if isinstance(mod, nn.Linear) else 1


class _StageDone(Exception):
    """Raised from a hook to skip the rest of a forward pass once the producers it measures have run."""


def _version(t) -> int | None:
    """A tensor's version counter (bumped by every in-place write); None where there is none to read."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t._version
    except RuntimeError:  # inference tensors (torch.inference_mode) track no version
        return None


def _endpoint_statistics(model_a, model_b, producers, batches, device):
    """Each producer's per-channel mean/std in both models, and the producers grouped into stages.

    A stage is a set of producers that read the identical input tensor in model A's forward pass, not written
    in place in between (so none depends on another); stages are listed in the order their first member runs.
    """
    moments = [{p.module: _Moments(f"{label}.{p.module}") for p in producers} for label in ("model_a", "model_b")]
    fired: dict[tuple[int, str], int] = {}
    # (producer, its input, the input's version) in model A's first forward pass
    order: list[tuple[str, object, int | None]] = []
    record = [True]

    def make_hook(m: int, name: str, channel_dim: int):
        def hook(module, args, output):
            fired[m, name] = fired.get((m, name), 0) + 1
            if fired[m, name] > 1:
                raise ValueError(f"producer {name!r} runs more than once per forward pass (a module shared "
                                 f"between layers): one correction cannot fit both of its uses; leave its group "
                                 f"out (groups=...)")
            if m == 0 and record[0]:
                inp = args[0] if args else None
                order.append((name, inp, _version(inp)))
            moments[m][name].update(output, channel_dim)
        return hook

    mods = (dict(model_a.named_modules()), dict(model_b.named_modules()))
    with contextlib.ExitStack() as stack:
        for m in (0, 1):
            for p in producers:
                mod = mods[m][p.module]
                stack.callback(mod.register_forward_hook(make_hook(m, p.module, _channel_dim(mod))).remove)
        # model_b may be model_a itself (then one forward feeds both models' hooks)
        models = (model_a,) if model_b is model_a else (model_a, model_b)
        dtype = _float_dtype(model_a)
        count = 0
        for index, batch in enumerate(batches):
            x = _batch_input(batch).to(device)
            for m, model in enumerate(models):
                fired.clear()
                with _forward_errors(index, x, ("model_a", "model_b")[m], dtype=dtype):
                    model(x)
                record[0] = False
                missing = [p.module for p in producers if (m, p.module) not in fired]
                if missing:
                    raise ValueError(f"producers {missing[:8]} did not run in {('model_a', 'model_b')[m]}'s "
                                     f"forward pass: their outputs cannot be measured")
            count += 1
    if count == 0:
        raise ValueError("calibration yielded no batch: REPAIR needs calibration data")
    if moments[0][producers[0].module].count == 0:
        raise ValueError("calibration batches are empty (0 rows): REPAIR needs calibration data")
    stages: list[list[str]] = []
    by_input: list[tuple[object, int | None, list[str]]] = []
    for name, inp, version in order:
        # the same tensor object is not enough: an in-place residual add (x += f(x)) between two reads makes
        # the later producer depend on the earlier one; its version counter tells
        for seen, seen_version, stage in by_input:
            if inp is not None and version is not None and seen is inp and seen_version == version:
                stage.append(name)
                break
        else:
            stage = [name]
            by_input.append((inp, version, stage))
            stages.append(stage)
    stats = {}
    for p in producers:
        ma, va = moments[0][p.module].mean_var()
        mb, vb = moments[1][p.module].mean_var()
        stats[p.module] = (torch.cat([ma, mb]), torch.cat([va, vb]).sqrt())
    return stats, stages


def _merged_statistics(merged, stage: list[str], batches, device) -> dict[str, _Moments]:
    """The stage's producers' output moments in ``merged``; each forward pass stops once they have run."""
    mods = dict(merged.named_modules())
    moments = {name: _Moments(f"merged.{name}") for name in stage}
    fired: set[str] = set()

    def make_hook(name: str, channel_dim: int):
        def hook(module, args, output):
            moments[name].update(output, channel_dim)
            fired.add(name)
            if len(fired) == len(stage):
                raise _StageDone
        return hook

    dtype = _float_dtype(merged)
    with contextlib.ExitStack() as stack:
        for name in stage:
            stack.callback(mods[name].register_forward_hook(make_hook(name, _channel_dim(mods[name]))).remove)
        for index, batch in enumerate(batches):
            fired.clear()
            x = _batch_input(batch).to(device)
            try:
                with _forward_errors(index, x, "merged", dtype=dtype):
                    merged(x)
            except _StageDone:
                pass
            else:
                raise ValueError(f"producers {sorted(set(stage) - fired)} did not run in merged's forward pass")
    return moments


@torch.no_grad()
def _fold(mod: nn.Module, mean, var, target_mean, target_std, eps: float) -> None:
    """y ↦ (y − mean) · s + target_mean folded into the module's weight and bias (s = 1 for dead channels)."""
    std = var.sqrt()
    dead = std <= _DEAD_RELATIVE_STD * torch.maximum(mean.abs(), target_std)
    scale = torch.where(dead, torch.ones_like(std), target_std / (var + eps).sqrt())
    w = mod.weight
    w.copy_((w.double() * scale.view([-1] + [1] * (w.dim() - 1))).to(w.dtype))
    mod.bias.copy_(((mod.bias.double() - mean) * scale + target_mean).to(mod.bias.dtype))


# --------------------------------------------------------------------------- inputs


def _merge_matrices(merge, names: list[str], spec: PermutationSpec, device) -> dict[str, torch.Tensor]:
    if isinstance(merge, MuDSCResult):
        get = merge.merge_matrix
    else:
        matrices = merge[1]

        def get(g):
            if g not in matrices:
                raise ValueError(f"merge: no merge matrix for group {g!r}")
            return matrices[g]
    out = {}
    for g in names:
        m = get(g)
        if not isinstance(m, torch.Tensor) or not m.is_floating_point():
            raise TypeError(f"merge: the merge matrix of group {g!r} must be a floating torch.Tensor, "
                            f"got {type(m).__name__}")
        n = spec[g].size
        if tuple(m.shape) != (n, 2 * n):
            raise ValueError(f"merge: the merge matrix of group {g!r} must be (n, 2n) = ({n}, {2 * n}), "
                             f"got {tuple(m.shape)}")
        if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
            raise ValueError(f"merge: the merge matrix of group {g!r} must be finite and non-negative")
        out[g] = m.to(device=device, dtype=torch.float64)
    return out


def _unpack(merge):
    if isinstance(merge, MuDSCResult):
        if merge.spec is None:
            raise ValueError("merge: this MuDSCResult carries no spec")
        # heads left out of the merge (exclude=) may differ in shape between the models: not checked, not producers
        return merge.spec.without_params(merge.exclude) if merge.exclude else merge.spec
    if isinstance(merge, (tuple, list)) and len(merge) == 2 and isinstance(merge[0], PermutationSpec) \
            and isinstance(merge[1], Mapping):
        return merge[0]
    raise TypeError(f"merge must be a MuDSCResult or a (PermutationSpec, {{group: merge matrix}}) pair, "
                    f"got {type(merge).__name__}")


def _check_models(merged, model_a, model_b, spec, producers) -> torch.device:
    spec.check(model_a, model_b)
    sd_a, sd_m = model_a.state_dict(), merged.state_dict()
    for g in spec:
        for a in g.axes:
            if a.param not in sd_m:
                raise ValueError(f"parameter {a.param!r} (group {g.name!r}) is missing from merged")
            if sd_m[a.param].shape != sd_a[a.param].shape:
                raise ValueError(f"parameter {a.param!r} has shape {tuple(sd_a[a.param].shape)} in model_a but "
                                 f"{tuple(sd_m[a.param].shape)} in merged")
    mods = [dict(m.named_modules()) for m in (merged, model_a, model_b)]
    for p in producers:
        types = [type(m.get(p.module)) for m in mods]
        if len(set(types)) != 1:
            raise ValueError(f"module {p.module!r} is {types[1].__name__} in model_a but {types[0].__name__} in "
                             f"merged and {types[2].__name__} in model_b")
    device = None
    dtypes: dict[str, tuple] = {}  # name -> (dtype, where first seen): the three models run the same batches
    for label, model in (("model_a", model_a), ("model_b", model_b), ("merged", merged)):
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            if device is None:
                device, first = t.device, f"{label}.{name}"
            elif t.device != device:
                raise ValueError(f"{label}.{name} is on {t.device} but {first} on {device}: move the three "
                                 f"models to one device")
            ref, where = dtypes.setdefault(name, (t.dtype, f"{label}.{name}"))
            if t.dtype != ref:
                raise ValueError(f"{label}.{name} is {t.dtype} but {where} is {ref}: cast the three models to one "
                                 f"dtype")
    return device or torch.device("cpu")


# --------------------------------------------------------------------------- the method


def repair(merged: nn.Module | None, model_a: nn.Module, model_b: nn.Module, merge, calibration, *,
           groups: Iterable[str] | None = None, residual: bool = True, eps: float = 1e-12,
           add_bias: bool = False, reset_bn: bool = False, inplace: bool = False,
           progress: bool | None = False) -> nn.Module:
    """REPAIR a merged model: each producer's output channels get the endpoints' interpolated mean and std.

    Args:
        merged: the merged model (None: ``merge.model`` of a :class:`MuDSCResult`). Copied unless ``inplace``.
        model_a, model_b: the two models that were merged (not modified).
        merge: how the units were merged: a :class:`~merging_kernels.methods.mudsc.MuDSCResult`
            (``mudsc_merge(..., return_result=True)``), or a pair ``(spec, {group: M})`` with M the
            (n, 2n) non-negative merge matrix of each group (merged unit c = Σ_u M[c, u] · unit u over
            [A's units; B's units in B's own order]).
        calibration: an iterable of input batches (tensors, or tuples whose first entry is the input),
            e.g. a DataLoader or a list; iterated once per stage plus once for the endpoints (a one-shot
            iterator is kept as a list).
        groups: the groups whose producers are corrected (default: every group, residual-tied groups
            only if ``residual``); named groups are taken as given.
        residual: with ``groups=None``, also correct the producers of residual-tied groups (a ViT's patch
            embedding, attention out-projections, fc2). Default True: on the digits ViT it beat correcting
            the block-internal groups only in every merge measured (see the module docstring). Models
            without residual groups (the MLP) are unaffected.
        eps: added to the merged channel's variance in the scale σ* / sqrt(var + eps) (> 0).
        add_bias: give a bias-free producer a zero bias (a new parameter: the state dict gains
            ``<module>.bias``) so that it can be corrected; by default such producers are skipped with a
            warning -- in BatchNorm networks (ResNet) they feed a BatchNorm, whose statistics reset
            (:func:`~merging_kernels.methods.mudsc.reset_batchnorm`, done by ``mudsc_merge``) already
            renormalizes them.
        reset_bn: re-estimate ``merged``'s BatchNorm running statistics on ``calibration``
            (:func:`~merging_kernels.methods.mudsc.reset_batchnorm`) before the first stage and after each
            stage's correction, so that every later stage is measured -- and the result runs -- with
            statistics of the corrected producers (a BatchNorm fed by a corrected producer would otherwise
            normalize with its uncorrected outputs' statistics). ``mudsc_merge(repair=True)`` sets it for
            models with BatchNorm unless ``reset_bn=False``.
        inplace: correct ``merged`` itself (and return it) instead of a copy. On an error its producers
            (and, with ``reset_bn``, its BatchNorm statistics) are restored.
        progress: a tqdm bar over the stages (None: only when stderr is a terminal).

    Returns:
        The repaired model, in ``merged``'s train/eval mode (every module's mode is kept; the calibration
        passes run in eval mode, under ``torch.no_grad``).

    Raises:
        TypeError: ``merge`` of the wrong kind, models that are not modules, ``calibration`` that is not an
            iterable, calibration batches that are not tensors.
        ValueError: a group not in the spec, models that do not match the spec or each other (naming the
            parameter or module), models on different devices or of different dtypes, missing/empty
            calibration, a calibration batch that does not run through a model (naming the batch and the
            model, like ``mudsc_merge``), a merge matrix of the wrong shape, a producer that runs twice per
            forward pass or not at all, NaN/Inf activations.
    """
    from tqdm.auto import tqdm

    spec = _unpack(merge)
    if merged is None:
        if not isinstance(merge, MuDSCResult):
            raise ValueError("merged is None: pass the merged model (only a MuDSCResult carries one)")
        merged = merge.model
    for label, model in (("merged", merged), ("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{label} must be an nn.Module, got {type(model).__name__}")
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    add_bias, reset_bn, inplace = (check_bool(v, n) for v, n in (
        (add_bias, "add_bias"), (reset_bn, "reset_bn"), (inplace, "inplace")))  # residual: _group_names
    tqdm_disable(progress)  # checks it
    if calibration is None:
        raise ValueError("calibration is None: REPAIR needs calibration data (an iterable of input batches)")
    calibration = _reiterable(calibration)  # a tensor is one batch; a one-shot iterator is kept for later passes
    if inplace and (merged is model_a or merged is model_b):
        raise ValueError("inplace=True with merged being model_a or model_b would modify an endpoint")
    names = _group_names(spec, groups, residual)
    producers = repair_producers(model_a, spec, names)
    device = _check_models(merged, model_a, model_b, spec, producers)
    producers = [p for p in producers if spec[p.group].size]  # 0 output channels: nothing to correct
    matrices = _merge_matrices(merge, names, spec, device)

    mods_m = dict(merged.named_modules())
    skipped = [p.module for p in producers if mods_m[p.module].bias is None]
    if skipped and not add_bias:
        warnings.warn(f"REPAIR skips producers without a bias {skipped[:8]}{' ...' if len(skipped) > 8 else ''}: "
                      f"a correction needs one (repair(..., add_bias=True) adds it; for a mudsc_merge, merge with "
                      f"repair=False, return_result=True and call repair(None, model_a, model_b, result, "
                      f"calibration, add_bias=True)). In BatchNorm networks these feed a BatchNorm, whose "
                      f"statistics reset already renormalizes them.", stacklevel=2)
        producers = [p for p in producers if p.module not in skipped]
    if not producers:
        return merged if inplace else copy.deepcopy(merged)

    target = merged if inplace else copy.deepcopy(merged)
    mods = dict(target.named_modules())
    saved = {p.module: (mods[p.module].weight.detach().clone(),
                        None if mods[p.module].bias is None else mods[p.module].bias.detach().clone())
             for p in producers} if inplace else {}
    bns = [m for m in target.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if reset_bn else []
    saved_bn = [copy.deepcopy(dict(m.named_buffers(recurse=False))) for m in bns] if inplace else []
    try:
        with evaluating(target, model_a, model_b), torch.no_grad():
            stats, stages = _endpoint_statistics(model_a, model_b, producers, calibration, device)
            targets = {}
            for p in producers:
                mu, sigma = stats[p.module]
                m = matrices[p.group]
                targets[p.module] = (m @ mu, m @ sigma)
            if add_bias:
                for name in skipped:
                    w = mods[name].weight
                    mods[name].bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                                   requires_grad=w.requires_grad)
            if bns:
                reset_batchnorm(target, calibration)
            for stage in tqdm(stages, desc="REPAIR", disable=tqdm_disable(progress), leave=False):
                moments = _merged_statistics(target, stage, calibration, device)
                for name in stage:
                    mean, var = moments[name].mean_var()
                    _fold(mods[name], mean, var, *targets[name], eps)
                if bns:
                    reset_batchnorm(target, calibration)
    except BaseException:
        for name, (w, b) in saved.items():  # inplace: leave the model as it was
            with torch.no_grad():
                mods[name].weight.copy_(w)
                if b is None:
                    mods[name].bias = None
                else:
                    mods[name].bias.copy_(b)
        for bn, buffers in zip(bns, saved_bn):
            for key, value in buffers.items():
                if value is not None:
                    getattr(bn, key).copy_(value)
        raise
    return target
