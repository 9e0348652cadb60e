"""What a user would run instead of merging_kernels: re-implementations of the peers' algorithms.

These are our own code, written from the peers' documented semantics (see
/work/shared/notes/ANCHORS.md), in the way the peers structure the work, so
that their speed and their output can be measured side by side with ours:

- :func:`ties_mergekit_style` — mergekit's TIES: one tensor at a time in a
  Python loop, per task a magnitude trim that sorts (``argsort``) the whole
  tensor, then the K task vectors stacked for sign election and the disjoint
  mean.
- :func:`ties_fusionbench_style` — FusionBench's TIES: every task vector
  flattened into one model-sized vector (keys sorted), a threshold per task by
  ``kthvalue`` over the whole model, sign election and disjoint mean on the
  (K, N) matrix.
- :func:`task_arithmetic_naive` — plain torch task arithmetic per tensor.
- :func:`dare_linear_naive` — mergekit-style DARE (``torch.bernoulli`` mask
  per task vector) followed by task arithmetic.

All take a base state dict and a list of expert state dicts and return a new
state dict; non-floating entries are copied from the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- mergekit-style TIES


def _trim_by_argsort(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = ⌊density·n⌋ entries of largest |δ| (found by a full descending argsort), zero the rest.

    Semantics vs ours: exactly k entries are kept; when several entries tie at
    the k-th magnitude, the sort order picks which survive (arbitrarily),
    whereas merging_kernels keeps every entry with |δ| ≥ t (all ties). mergekit
    asserts k > 0; here k is raised to 1 instead, like merging_kernels'
    max(1, ⌊ρn⌋), so tiny tensors (biases at low density) do not abort.
    """
    if density >= 1.0:
        return delta
    n = delta.numel()
    k = max(1, int(density * n))
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()  # (mergekit sorts in fp32 on CPU: half sorts are slow or missing)
    order = torch.argsort(magnitudes, descending=True)
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[:k]] = 1
    return delta * mask.view(delta.shape)


def ties_mergekit_style(base: StateDict, experts: Sequence[StateDict], *, density: float,
                        weights: Sequence[float] | None = None, lam: float = 1.0, normalize: bool = True) -> StateDict:
    """mergekit-style TIES, tensor by tensor.

    Per tensor: δ_k = θk − θ0 in the tensor's dtype; per task trim by argsort
    (:func:`_trim_by_argsort`); stack the K trimmed deltas and multiply them by
    the weights; elected sign = sign of the weighted sum with 0 counted as +;
    an entry takes part where sign(w_k δ_k) equals the elected sign (zeros
    never do); the weighted sum over those entries is divided by the sum of
    their weights (``normalize``, 0/0 → divisor 1, so 0), multiplied by λ and
    added to θ0.

    Semantics vs ours: the agreement test uses the sign of the *weighted* delta
    (ours: of δ_k itself) — the same for positive weights; arithmetic happens
    in the tensor's dtype (ours accumulates in fp32 for fp16/bf16 inputs);
    magnitude ties at the threshold, see :func:`_trim_by_argsort`.
    """
    num_tasks = len(experts)
    weights = [1.0] * num_tasks if weights is None else list(weights)
    merged: StateDict = {}
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            merged[name] = theta0.clone()
            continue
        deltas = torch.stack([_trim_by_argsort(expert[name] - theta0, density) for expert in experts])
        w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * theta0.dim()))
        weighted = deltas * w
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
        agree = (weighted.sign() == elected).to(deltas.dtype)
        mixed = (weighted * agree).sum(dim=0)
        if normalize:
            divisor = (w * agree).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed = mixed / divisor
        if lam != 1.0:
            mixed = mixed * lam
        merged[name] = (theta0 + mixed).to(theta0.dtype)
    return merged


# --------------------------------------------------------------------------- FusionBench-style TIES


def _float_keys(base: StateDict) -> list[str]:
    return sorted(name for name, t in base.items() if t.is_floating_point())


def _flatten(state_dict: StateDict, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state_dict[k].reshape(-1) for k in keys])


def _unflatten(flat: torch.Tensor, base: StateDict, keys: Sequence[str]) -> StateDict:
    pieces, offset = {}, 0
    for k in keys:
        n = base[k].numel()
        pieces[k] = flat[offset:offset + n].view(base[k].shape)
        offset += n
    return {name: pieces[name] if name in pieces else t.clone() for name, t in base.items()}


def ties_fusionbench_style(base: StateDict, experts: Sequence[StateDict], *, density: float,
                           scaling_factor: float = 0.3, merge_func: str = "mean",
                           return_kth: bool = False):
    """FusionBench-style TIES over the whole model.

    Flatten θ0 and every θk (keys sorted) into vectors of N entries; task
    vectors τ = θk − θ0 form a (K, N) matrix. Per task, the threshold is the
    k-th smallest |τ| with k = N − ⌊density·N⌋ (``kthvalue``) and entries with
    |τ| ≥ it are kept (ties all kept). Elected sign = sign of the column sum;
    columns whose sum is exactly 0 take the majority sign (the sign of the sum
    of all elected signs). Entries whose sign agrees are combined: ``"mean"``
    divides their sum by their count (the disjoint mean), ``"sum"`` does not.
    θ = θ0 + scaling_factor · merged.

    Semantics vs ours: the threshold is the (N − ⌊ρN⌋)-th smallest, i.e. the
    (⌊ρN⌋ + 1)-th largest, so it keeps ⌊ρN⌋ + 1 entries per task where
    merging_kernels keeps max(1, ⌊ρN⌋) — up to one extra entry per task, so at
    most K elements of the result differ. A zero column sum takes the model's
    majority sign here and + in ours: where nothing is kept both give 0, but
    kept entries do cancel exactly now and then (fp32 deltas live on the grid
    of θ0, so δ and −δ from two tasks happen: 2 columns in 16.8M with 4 tasks),
    and there the results differ when the majority sign is −. No per-task weights
    (the mean counts entries; ours with weights 1 is the same).
    ``density`` = 1 would ask ``kthvalue`` for rank 0, which FusionBench does
    not guard; it is not supported here either.

    With ``return_kth``, also returns the (K,) thresholds (for checks).
    """
    keys = _float_keys(base)
    flat_base = _flatten(base, keys)
    task_vectors = torch.stack([_flatten(expert, keys) for expert in experts]) - flat_base  # (K, N)
    n = task_vectors.shape[1]
    rank = n - int(density * n)
    if rank < 1:
        raise ValueError("density must leave at least one entry out (kthvalue rank >= 1)")
    kth = task_vectors.abs().kthvalue(rank, dim=1, keepdim=True).values  # (K, 1)
    trimmed = task_vectors * (task_vectors.abs() >= kth)
    del task_vectors
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    del trimmed
    if merge_func == "mean":
        count = (selected != 0).sum(dim=0).to(selected.dtype)
        merged_tv = selected.sum(dim=0) / count.clamp(min=1)
    elif merge_func == "sum":
        merged_tv = selected.sum(dim=0)
    else:
        raise ValueError(f"merge_func must be 'mean' or 'sum', got {merge_func!r}")
    merged = _unflatten(flat_base + scaling_factor * merged_tv, base, keys)
    return (merged, kth[:, 0]) if return_kth else merged


# --------------------------------------------------------------------------- task arithmetic and DARE


def task_arithmetic_naive(base: StateDict, experts: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """θ = θ0 + Σ_k λ_k (θk − θ0), written the obvious way, one tensor at a time.

    Semantics vs ours: identical formula; arithmetic in the tensor's dtype
    (ours accumulates fp16/bf16 in fp32, rounding once).
    """
    merged: StateDict = {}
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            merged[name] = theta0.clone()
            continue
        merged[name] = theta0 + sum(lam * (expert[name] - theta0) for lam, expert in zip(weights, experts))
    return merged


def dare_linear_naive(base: StateDict, experts: Sequence[StateDict], weights: Sequence[float], *, drop_rate: float,
                      generator: torch.Generator | None = None) -> StateDict:
    """mergekit-style DARE + task arithmetic: per tensor and task, a ``torch.bernoulli`` keep mask with
    probability 1 − p, kept entries rescaled by 1/(1 − p), then θ0 + Σ λ_k δ_k.

    Semantics vs ours: same distribution, different random numbers (torch's
    generator, consumed in call order, vs our counter-based Philox keyed on
    (seed, tensor name, element, task)), so outputs agree only in distribution.
    """
    keep = 1.0 - drop_rate
    merged: StateDict = {}
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            merged[name] = theta0.clone()
            continue
        total = torch.zeros_like(theta0)
        for lam, expert in zip(weights, experts):
            delta = expert[name] - theta0
            mask = torch.bernoulli(torch.full_like(delta, keep), generator=generator)
            total += lam * (delta * mask / keep)
        merged[name] = theta0 + total
    return merged


def group_similarity_scipy_loop(s_cross, group_size: int):
    """Best within-group matching score for every pair of groups, one scipy solve per pair (what
    group matching of attention heads costs in a Python loop). ``s_cross`` (n, n) numpy or torch."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    c = np.asarray(s_cross.cpu().numpy() if hasattr(s_cross, "cpu") else s_cross, dtype=np.float64)
    s = group_size
    g = c.shape[0] // s
    scores = np.empty((g, g))
    for a in range(g):
        for b in range(g):
            block = c[a * s:(a + 1) * s, b * s:(b + 1) * s]
            rows, cols = linear_sum_assignment(block, maximize=True)
            scores[a, b] = block[rows, cols].sum()
    return scores
