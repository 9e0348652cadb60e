"""A straightforward MuDSC, written the way the public reference code works, for the speed comparison only.

Not part of the package. Same algorithm as
:func:`merging_kernels.methods.mudsc.mudsc_merge` (same similarity, same
activation-only start, same sweep order for a seed, same acceptance rule,
same greedy zip), implemented plainly; its similarities are float64 (numpy)
where the fast path's are float32, so near-ties may break differently and the
sweeps may take a slightly different path (the runner prints both accuracies):

* statistics: forward hooks keep each batch's features; per batch and group,
  z = [f_A, f_B] (rows x 2n, fp32) and E[z zᵀ], E[z] accumulated in fp32 torch
  on the models' device (outer products of the whole 2n block); the rest runs
  on the CPU (numpy, scipy), the merge matrices are applied on the device;
* weight similarity: ``numpy.corrcoef`` of the 2n unit vectors (the full
  2n x 2n matrix, float64), the cross block taken from it;
* assignment: ``scipy.optimize.linear_sum_assignment`` per group, heads by a
  Python loop over the g x g pairs;
* refinement objective: recomputed over every group after every candidate;
* zip: a Python loop that takes the argmax of the whole 2n x 2n matrix at every
  step (O(n³));
* rewrite: dense merge/unmerge matrices for every group (a permutation too),
  applied by matmuls.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa
from torch import nn

from merging_kernels.permutation_spec import permute_axis

STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _rows(f):
    if f.dim() == 4:
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    return f.reshape(-1, f.shape[-1])


def reference_statistics(model_a, model_b, spec, batches):
    """Per group: the 2n x 2n activation correlation, averaged over the group's hook points."""
    feats: dict = {}
    handles = []
    mods = (dict(model_a.named_modules()), dict(model_b.named_modules()))
    for g in spec:
        for pi, p in enumerate(g.activations):
            for m in range(2):
                def hook(module, inp, out, key=(g.name, pi, m), use_input=p.input):
                    feats[key] = (inp[0] if use_input else out).detach()
                handles.append(mods[m][p.module].register_forward_hook(hook))
    device = next(model_a.parameters()).device  # accumulated where the models run, as the reference code does
    sums = {(g.name, pi): [torch.zeros(2 * g.size, device=device),
                           torch.zeros(2 * g.size, 2 * g.size, device=device), 0]
            for g in spec for pi in range(len(g.activations))}
    model_a.eval()
    model_b.eval()
    with torch.no_grad():
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            feats.clear()
            model_a(x)
            model_b(x)
            for (name, pi), acc in sums.items():
                z = torch.cat([_rows(feats[(name, pi, 0)]), _rows(feats[(name, pi, 1)])], dim=1).float()
                acc[0] += z.sum(0)
                acc[1] += z.T @ z
                acc[2] += z.shape[0]
    for h in handles:
        h.remove()
    out = {}
    for g in spec:
        corr = 0
        for pi in range(len(g.activations)):
            s, o, c = sums[(g.name, pi)]
            mean = s / c
            cov = o / c - torch.outer(mean, mean)
            std = torch.sqrt(torch.clamp(torch.diagonal(cov), min=0))
            corr = corr + cov / (torch.outer(std, std) + 1e-8)
        out[g.name] = (corr / len(g.activations)).cpu().numpy()
    return out


def _unit_vectors(state, g):
    parts = []
    for a in g.axes:
        if a.param.endswith(STAT_SUFFIXES):
            continue
        t = state[a.param]
        t = t.movedim(a.dim % t.dim(), 0).reshape(a.outer, g.size, a.inner, -1)
        parts.append(t.permute(1, 0, 2, 3).reshape(g.size, -1))
    return torch.cat(parts, 1).double().cpu().numpy()


class _Ref:
    def __init__(self, spec, sd_a, sd_b, act, w):
        self.spec, self.sd_a, self.sd_b, self.act, self.w = spec, sd_a, dict(sd_b), act, w
        self.perms = {g.name: np.arange(g.size) for g in spec}
        self.sim_time = 0.0

    def sim(self, name, w, full=False):
        start = time.perf_counter()
        try:
            return self._sim(name, w, full)
        finally:
            self.sim_time += time.perf_counter() - start

    def _sim(self, name, w, full=False):
        g = self.spec[name]
        n = g.size
        s = 0.0
        if w > 0:
            corr = np.corrcoef(np.concatenate([_unit_vectors(self.sd_a, g), _unit_vectors(self.sd_b, g)]))
            s = s + w * (corr if full else corr[:n, n:])
        if w < 1:
            p = self.perms[name]
            idx = np.concatenate([np.arange(n), n + p])
            a = self.act[name][np.ix_(idx, idx)]
            s = s + (1 - w) * (a if full else a[:n, n:])
        return s

    def objective(self):
        return sum(float(np.trace(self.sim(g.name, self.w))) for g in self.spec)

    def apply(self, name, sigma):
        sig = torch.as_tensor(sigma)
        for a in self.spec[name].axes:
            self.sd_b[a.param] = permute_axis(self.sd_b[a.param], a, sig)
        self.perms[name] = self.perms[name][sigma]

    def solve(self, unit, w):
        g = self.spec[unit[0]]
        sims = {n: self.sim(n, w) for n in unit}
        if g.group_size is None:
            return {unit[0]: scipy_lsa(sims[unit[0]], maximize=True)[1]}
        s = g.group_size
        heads = g.size // s
        scores = np.zeros((heads, heads))
        inner = {n: np.zeros((heads, heads, s), dtype=np.int64) for n in unit}
        for n in unit:
            for a in range(heads):
                for b in range(heads):
                    block = sims[n][a * s:(a + 1) * s, b * s:(b + 1) * s]
                    _, cols = scipy_lsa(block, maximize=True)
                    inner[n][a, b] = cols
                    scores[a, b] += block[np.arange(s), cols].sum()
        hcols = scipy_lsa(scores, maximize=True)[1]
        return {n: (hcols[:, None] * s + inner[n][np.arange(heads), hcols]).reshape(-1) for n in unit}


def reference_greedy_zip(sim, alpha=0.5, factor=0.5):
    """O(n³): a full argmax of the 2n x 2n matrix per merge."""
    s = torch.as_tensor(sim, dtype=torch.float32).clone()
    m = s.shape[0]
    n = m // 2
    s.fill_diagonal_(-torch.inf)
    owner = list(range(m))
    for _ in range(n):
        flat = int(torch.argmax(s))
        i, j = divmod(flat, m)  # the first maximum in row-major order, as the fast path picks it
        new = torch.minimum(s[i], s[j]) * factor
        s[i], s[:, i] = new, new
        s[j], s[:, j] = -torch.inf, -torch.inf
        s[i, i] = -torch.inf
        owner = [i if o == j else o for o in owner]
    reps = sorted(set(owner))
    pos = {r: c for c, r in enumerate(reps)}
    unmerge = torch.zeros(m, n)
    for u, o in enumerate(owner):
        unmerge[u, pos[o]] = 1.0
    weight = torch.tensor([alpha] * n + [1 - alpha] * n)
    merge = unmerge.T * weight
    merge = merge / merge.sum(1, keepdim=True)
    return merge, unmerge


def _apply_matrix(t, a, mat):
    dim = a.dim % t.dim()
    shape = t.shape
    n_old = shape[dim] // (a.outer * a.inner)
    v = t.reshape(*shape[:dim], a.outer, n_old, a.inner, *shape[dim + 1:]).movedim(dim + 1, -1)
    v = (v @ mat.T).movedim(-1, dim + 1)
    return v.reshape(*shape[:dim], a.outer * mat.shape[0] * a.inner, *shape[dim + 1:])


def reference_mudsc_merge(model_a, model_b, spec, calibration, *, mode="permute", w=0.5, alpha=0.5,
                          max_sweeps=100, patience=5, zip_factor=0.5, zip_residual=True, seed=0, reset_bn=True):
    """Returns (merged model, per-stage seconds, sweeps)."""
    t = {"statistics": 0.0, "similarity": 0.0, "assignment": 0.0, "rewrite": 0.0, "bn_reset": 0.0}
    spec.check(model_a, model_b)
    sd_a = {k: v.detach().clone() for k, v in model_a.state_dict().items()}
    sd_b = {k: v.detach().clone() for k, v in model_b.state_dict().items()}
    start = time.perf_counter()
    act = reference_statistics(model_a, model_b, spec, calibration)
    t["statistics"] += time.perf_counter() - start
    ref = _Ref(spec, sd_a, sd_b, act, w)
    units = spec.matching_units()
    start = time.perf_counter()
    for unit in units:  # activation-only start
        for name, sigma in ref.solve(unit, 0.0).items():
            ref.apply(name, sigma)
    t["assignment"] += time.perf_counter() - start
    sweeps = 0
    if w > 0:
        start = time.perf_counter()
        obj = ref.objective()
        gen = torch.Generator().manual_seed(seed)
        stall = 0
        for sweep in range(max_sweeps):
            before, changed = obj, False
            for ui in torch.randperm(len(units), generator=gen).tolist():
                sigma = ref.solve(units[ui], w)
                if all((sg == np.arange(len(sg))).all() for sg in sigma.values()):
                    continue
                saved = (dict(ref.sd_b), dict(ref.perms))
                for name, sg in sigma.items():
                    ref.apply(name, sg)
                new = ref.objective()
                if new - obj > 1e-7 * max(1.0, abs(before)):
                    obj, changed = new, True
                else:
                    ref.sd_b, ref.perms = saved
            sweeps = sweep + 1
            stall = 0 if obj - before > 1e-7 * max(1.0, abs(before)) else stall + 1
            if not changed or stall >= patience:
                break
        t["assignment"] += time.perf_counter() - start  # similarity time is taken out below
    start = time.perf_counter()
    mats = {}
    for g in spec:
        n = g.size
        if mode == "zip" and (zip_residual or not g.residual) and g.group_size is None:
            mats[g.name] = reference_greedy_zip(ref.sim(g.name, w, full=True), alpha, zip_factor)
        else:
            eye = torch.eye(n)
            mats[g.name] = (torch.cat([alpha * eye, (1 - alpha) * eye], 1), torch.cat([eye, eye], 0))
    device = next(iter(sd_a.values())).device  # the merge matrices are applied where the weights are
    mats = {g: (merge.to(device), unmerge.to(device)) for g, (merge, unmerge) in mats.items()}
    t["assignment"] += time.perf_counter() - start
    t["similarity"] = ref.sim_time  # spent inside the sweeps and the zip: moved out of "assignment"
    t["assignment"] -= ref.sim_time
    start = time.perf_counter()
    pax = spec.param_axes()
    merged_sd = {}
    for name, ta in sd_a.items():
        if not ta.is_floating_point():
            merged_sd[name] = ta.clone()
            continue
        axes = pax.get(name, [])
        has_out = any(a.role == "out" for _, a in axes)
        acc = 0
        for m, (x, wm) in enumerate(((ta.float(), alpha), (ref.sd_b[name].float(), 1 - alpha))):
            for g, a in axes:
                merge, unmerge = mats[g]
                n = spec[g].size
                mat = merge[:, m * n:(m + 1) * n] if a.role == "out" else unmerge[m * n:(m + 1) * n].T
                x = _apply_matrix(x, a, mat)
            acc = acc + (x if has_out else wm * x)
        merged_sd[name] = acc
    merged = copy.deepcopy(model_a)
    merged.load_state_dict(merged_sd)
    t["rewrite"] += time.perf_counter() - start
    if reset_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in merged.modules()):
        start = time.perf_counter()
        for m in merged.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None
        merged.train()
        with torch.no_grad():
            for batch in calibration:
                merged(batch[0] if isinstance(batch, (tuple, list)) else batch)
        merged.eval()
        t["bn_reset"] += time.perf_counter() - start
    return merged.eval(), t, sweeps
