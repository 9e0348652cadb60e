"""The reference models: constructor arguments and forward inputs are checked by name; the layouts in use run."""

import math

import numpy as np
import pytest
import torch

from merging_kernels.methods.mudsc import mudsc_merge
from merging_kernels.models import MLP, ResNet20, ViT
from merging_kernels.permutation_spec import spec_for


def test_the_input_layouts_in_use_run():
    mlp, resnet, vit = MLP(64, [8], 10).eval(), ResNet20(0.25, blocks_per_stage=1).eval(), \
        ViT(dim=8, heads=2, mlp_dim=8, depth=1).eval()
    for x in (torch.randn(2, 8, 8), torch.randn(2, 1, 8, 8), torch.randn(2, 64)):
        for model in (mlp, resnet, vit):
            assert model(x).shape == (2, 10)
    assert resnet(torch.randn(2, 1, 2, 2)).shape == (2, 10)  # any image size: global average pooling
    rgb = ResNet20(0.25, in_channels=3, blocks_per_stage=1).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(rgb(x.flatten(1)), rgb(x))  # flattened (B, C*S*S) means (B, C, S, S)
    assert ViT(channels=3, dim=8, heads=2, depth=1)(torch.randn(2, 3, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("make, x, match", [
    # one 8x8 image would be read as 16 images of 2x2
    (lambda: ResNet20(0.25, blocks_per_stage=1), torch.randn(8, 8), r"^x must be \(B, 1, H, W\), \(B, H, W\) or "
                                                                    r"\(B, S\*S\).*got shape \(8, 8\)"),
    (lambda: ResNet20(0.25, blocks_per_stage=1), torch.randn(2, 65), r"got shape \(2, 65\)"),
    (lambda: ResNet20(0.25, blocks_per_stage=1), torch.randn(64), r"got shape \(64,\)"),
    (lambda: ResNet20(0.25, blocks_per_stage=1), torch.randn(1, 1, 1, 8, 8), r"got shape \(1, 1, 1, 8, 8\)"),
    (lambda: ResNet20(0.25, blocks_per_stage=1), torch.randn(2, 3, 8, 8), r"^x must be \(B, 1, H, W\)"),
    (lambda: ResNet20(0.25, in_channels=3, blocks_per_stage=1), torch.randn(2, 8, 8),
     r"^x must be \(B, 3, H, W\) or \(B, 3\*S\*S\)"),
    # 64 entries per sample, but not an 8x8 image: would be cut into wrong patches
    (lambda: ViT(dim=8, heads=2, depth=1), torch.randn(2, 1, 4, 16),
     r"^x must be \(B, 1, 8, 8\), \(B, 8, 8\) or \(B, 64\), got shape \(2, 1, 4, 16\)"),
    (lambda: ViT(dim=8, heads=2, depth=1), torch.randn(8, 8), r"got shape \(8, 8\)"),
    (lambda: ViT(dim=8, heads=2, depth=1), torch.randn(2, 1, 16, 16), r"got shape \(2, 1, 16, 16\)"),
    (lambda: ViT(dim=8, heads=2, depth=1), torch.randn(2, 3, 8, 8), r"got shape \(2, 3, 8, 8\)"),
    (lambda: MLP(4, [8], 2), torch.randn(3, 5), r"^x must be \(B, 4\) or \(B, \.\.\.\) with 4 features per sample"),
    (lambda: MLP(4, [8], 2), torch.randn(4), r"got shape \(4,\)"),
])
def test_a_wrong_input_shape_is_refused_by_name(make, x, match):
    model = make().eval()
    with pytest.raises(ValueError, match=match):
        model(x)


def test_a_wrong_input_is_still_named_by_the_merge_as_a_calibration_batch():
    # the shape error is also a RuntimeError, which mudsc_merge turns into a message naming the batch
    a, b = ResNet20(0.25, blocks_per_stage=1), ResNet20(0.25, blocks_per_stage=1)
    with pytest.raises(ValueError, match=r"calibration batch 1 does not run through the models: x must be"):
        mudsc_merge(a, b, None, [torch.randn(4, 8, 8), torch.randn(4, 8)], progress=False)
    with pytest.raises(TypeError, match="^x must be a torch.Tensor, got list"):
        a([[0.0] * 64])


@pytest.mark.parametrize("make, error, match", [
    (lambda: MLP(-1, [4], 2), ValueError, "^in_features must be >= 1, got -1"),
    (lambda: MLP(0, [4], 2), ValueError, "^in_features must be >= 1, got 0"),
    (lambda: MLP(4, [8, -3], 2), ValueError, r"^hidden\[1\] must be >= 1, got -3"),
    (lambda: MLP(4, [0], 2), ValueError, r"^hidden\[0\] must be >= 1, got 0"),
    (lambda: MLP(4, [8.5], 2), TypeError, r"^hidden\[0\] must be an integer, got float"),
    (lambda: MLP(4, 8, 2), TypeError, "^hidden must be a sequence of layer widths"),
    (lambda: MLP(4, "8", 2), TypeError, "^hidden must be a sequence of layer widths"),
    (lambda: MLP(4, [8], 0), ValueError, "^out_features must be >= 1, got 0"),
    (lambda: ResNet20(width_multiplier=0), ValueError, "^width_multiplier must be > 0"),
    (lambda: ResNet20(width_multiplier=-1), ValueError, "^width_multiplier must be > 0"),
    (lambda: ResNet20(width_multiplier=math.nan), ValueError, "^width_multiplier must be finite"),
    (lambda: ResNet20(width_multiplier="1"), TypeError, "^width_multiplier must be a real number"),
    (lambda: ResNet20(num_classes=0), ValueError, "^num_classes must be >= 1"),
    (lambda: ResNet20(in_channels=0), ValueError, "^in_channels must be >= 1"),
    (lambda: ResNet20(blocks_per_stage=0), ValueError, "^blocks_per_stage must be >= 1, got 0"),
    (lambda: ResNet20(blocks_per_stage=-1), ValueError, "^blocks_per_stage must be >= 1, got -1"),
    (lambda: ResNet20(blocks_per_stage=1.0), TypeError, "^blocks_per_stage must be an integer"),
    (lambda: ViT(heads=0), ValueError, "^heads must be >= 1, got 0"),
    (lambda: ViT(heads=-4), ValueError, "^heads must be >= 1, got -4"),
    (lambda: ViT(heads=3), ValueError, r"^dim \(32\) must be a multiple of heads \(3\)"),
    (lambda: ViT(patch_size=0), ValueError, "^patch_size must be >= 1, got 0"),
    (lambda: ViT(patch_size=-2), ValueError, "^patch_size must be >= 1, got -2"),
    (lambda: ViT(patch_size=3), ValueError, r"^image_size \(8\) must be a multiple of patch_size \(3\)"),
    (lambda: ViT(image_size=0), ValueError, "^image_size must be >= 1, got 0"),
    (lambda: ViT(image_size=-8), ValueError, "^image_size must be >= 1, got -8"),
    (lambda: ViT(image_size=8.0), TypeError, "^image_size must be an integer"),
    (lambda: ViT(dim=0), ValueError, "^dim must be >= 1"),
    (lambda: ViT(depth=-1), ValueError, "^depth must be >= 0"),
    (lambda: ViT(mlp_dim=0), ValueError, "^mlp_dim must be >= 1"),
    (lambda: ViT(num_classes=0), ValueError, "^num_classes must be >= 1"),
    (lambda: ViT(channels=0), ValueError, "^channels must be >= 1"),
])
def test_constructor_arguments_are_checked_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_edge_arguments_that_make_sense_still_build():
    assert len(spec_for(MLP(4, [], 2))) == 0  # a linear model: nothing to permute
    assert len(spec_for(ViT(dim=8, heads=2, depth=0))) == 1  # the residual stream only
    assert len(spec_for(ResNet20(0.25, blocks_per_stage=1))) == 6
    tiny = ResNet20(0.01)  # widths are at least 1
    assert tiny.stem.out_channels == 1
    assert MLP(np.int64(4), np.array([8, 8]), 2)(torch.randn(3, 4)).shape == (3, 2)  # numpy ints are ints
