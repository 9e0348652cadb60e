"""Small reference models for merging experiments, built from standard torch layers only.

Their permutation specs are in :mod:`merging_kernels.permutation_spec`
(:func:`~merging_kernels.permutation_spec.spec_for`). Sized for 8x8 inputs
(scikit-learn's digits) so that a model trains on a CPU in seconds.

* :class:`MLP` -- Linear/ReLU stack;
* :class:`ResNet20` -- CIFAR-style ResNet-20 (3 stages x 3 basic blocks, BatchNorm,
  1x1-conv shortcut where a stage changes width/stride), width-scalable;
* :class:`ViT` -- pre-LayerNorm vision transformer with explicit q/k/v/out
  ``nn.Linear`` projections (not ``nn.MultiheadAttention``, so that heads can be permuted).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "ResNet20", "ViT"]


class MLP(nn.Module):
    """``in_features -> hidden[0] -> ... -> out_features`` with ReLU between; inputs are flattened."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int):
        super().__init__()
        sizes = [in_features, *hidden, out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.acts = nn.ModuleList(nn.ReLU() for _ in hidden)

    def forward(self, x):
        x = x.flatten(1)
        for layer, act in zip(self.layers[:-1], self.acts):
            x = act(layer(x))
        return self.layers[-1](x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20: a 3x3 stem, 3 stages of 3 basic blocks with widths
    (16, 32, 64) x ``width_multiplier``, strides 1/2/2, global average pooling, a Linear classifier.
    On 8x8 digits the stages see 8x8, 4x4 and 2x2 maps."""

    def __init__(self, width_multiplier: float = 1.0, num_classes: int = 10, in_channels: int = 1,
                 blocks_per_stage: int = 3):
        super().__init__()
        widths = [max(1, int(round(w * width_multiplier))) for w in (16, 32, 64)]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for s, cout in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(cin, cout, 2 if (s > 0 and b == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        if x.dim() == 2:
            side = int(math.isqrt(x.shape[1]))
            x = x.reshape(-1, 1, side, side)
        elif x.dim() == 3:
            x = x.unsqueeze(1)
        x = F.relu(self.stem_bn(self.stem(x)))
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.pool(x).flatten(1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads

        def split(z):
            return z.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """Pre-LN ViT: linear patch embedding, class token, learned position embedding, ``depth`` blocks,
    final LayerNorm, Linear head on the class token."""

    def __init__(self, image_size: int = 8, patch_size: int = 2, dim: int = 32, depth: int = 2, heads: int = 4,
                 mlp_dim: int = 64, num_classes: int = 10, channels: int = 1):
        super().__init__()
        if image_size % patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.dim, self.heads = dim, heads
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(channels * patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        p, s, c = self.patch_size, self.image_size, self.channels
        x = x.reshape(-1, c, s // p, p, s // p, p).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], -1, c * p * p)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])
