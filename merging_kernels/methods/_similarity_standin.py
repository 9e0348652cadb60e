"""TEMPORARY private stand-in for merging_kernels.ops.similarity (plain torch, the agreed contract).
Deleted once the op module lands."""

from __future__ import annotations

import contextlib

import torch

from ..ops.linear_assignment import linear_sum_assignment


def _rows(f):
    if f.dim() == 2:
        return f
    if f.dim() == 3:
        return f.reshape(-1, f.shape[-1])
    if f.dim() == 4:
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    raise ValueError("features must be (N,C), (N,T,C) or (N,C,H,W)")


class ActivationStats:
    def __init__(self, num_features, *, device=None, backend=None):
        self.sizes = [num_features] if isinstance(num_features, int) else list(num_features)
        d = sum(self.sizes)
        self.count = 0
        self._sum = torch.zeros(d, dtype=torch.float64, device=device)
        self._outer = torch.zeros(d, d, dtype=torch.float64, device=device)

    def update(self, *features):
        z = torch.cat([_rows(f.detach()).float() for f in features], dim=1)
        self.count += z.shape[0]
        self._sum += z.sum(0).double()
        self._outer += (z.T @ z).double()

    def mean(self):
        return (self._sum / self.count).float()

    def covariance(self):
        mu = self._sum / self.count
        return (self._outer / self.count - torch.outer(mu, mu)).float()

    def correlation(self, eps=1e-8):
        mu = self._sum / self.count
        cov = self._outer / self.count - torch.outer(mu, mu)
        std = cov.diagonal().clamp_min(0).sqrt()
        return (cov / (torch.outer(std, std) + eps)).float()


@contextlib.contextmanager
def activation_stats_hooks(modules_per_model, stats, *, input=False):
    pending = {}
    handles = []

    def make(i):
        def hook(mod, inp, out):
            pending[i] = inp[0] if input else out
            if len(pending) == len(modules_per_model):
                stats.update(*[pending[j] for j in range(len(modules_per_model))])
                pending.clear()
        return hook

    for i, m in enumerate(modules_per_model):
        handles.append(m.register_forward_hook(make(i)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def correlation_matrix(x, y=None, *, eps=1e-8, backend=None):
    def norm(a):
        a = a.float() - a.float().mean(1, keepdim=True)
        return a / (a.norm(dim=1, keepdim=True) + eps)
    xn = norm(x)
    yn = xn if y is None else norm(y)
    return xn @ yn.T


def dual_similarity(s_weight, s_act, w=0.5):
    return w * s_weight + (1 - w) * s_act


def group_similarity(s_cross, group_size, *, backend=None):
    n = s_cross.shape[0]
    g = n // group_size
    blocks = s_cross.reshape(g, group_size, g, group_size).permute(0, 2, 1, 3).reshape(g * g, group_size, group_size)
    rows, cols = linear_sum_assignment(blocks, maximize=True, backend=backend)
    scores = blocks.gather(2, cols[:, :, None]).squeeze(2).sum(1).reshape(g, g)
    return scores, cols.reshape(g, g, group_size)
