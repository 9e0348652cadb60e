"""Permutation-spec helpers at the public boundary: bad arguments are named, never silently wrong."""

import numpy as np
import pytest
import torch
from torch import nn

from merging_kernels.models import MLP, ResNet20, ViT
from merging_kernels.permutation_spec import (PermutationGroup, PermutationSpec, apply_permutations, in_axis,
                                              mlp_spec, out_axis, permute_axis, random_permutations, resnet_spec,
                                              spec_for, verify_spec, vit_spec)


def _small():
    state = {"w": torch.randn(4, 3), "b": torch.randn(4), "v": torch.randn(2, 4)}
    spec = PermutationSpec([PermutationGroup("g", [out_axis("w"), out_axis("b"), in_axis("v")])]).check(state)
    return state, spec


def test_permute_axis_reorders_the_units_of_its_axis():
    t = torch.arange(24.0).reshape(4, 6)
    idx = torch.tensor([2, 0, 1])
    assert torch.equal(permute_axis(t, in_axis("w", inner=2), idx), t.reshape(4, 3, 2)[:, idx].reshape(4, 6))
    assert torch.equal(permute_axis(t, out_axis("w", -2), [3, 2, 1, 0]), t.flip(0))  # a list, a negative dim
    assert torch.equal(permute_axis(t, out_axis("w"), np.arange(4)[::-1]), t.flip(0))


@pytest.mark.parametrize("t, axis, index, error, match", [
    # dim 5 of a 2-D tensor used to wrap around to dim 1 (5 % 2)
    (torch.randn(4, 3), out_axis("w", 5), torch.arange(3), ValueError,
     r"^axis: t \(parameter 'w'\) of shape \(4, 3\) has no dim 5"),
    (torch.randn(4, 3), out_axis("w", -3), torch.arange(4), ValueError, "has no dim -3"),
    (torch.tensor(1.0), out_axis("w"), torch.arange(1), ValueError, r"of shape \(\) has no dim 0"),
    (torch.randn(4, 3), out_axis("w", outer=3), torch.arange(1), ValueError,
     "dim 0 has 4 entries, not a multiple of outer\\*inner = 3"),
    # a repeated index duplicated a unit; an out-of-range one failed inside index_select
    (torch.randn(4, 3), out_axis("w"), torch.tensor([0, 0, 1, 2]), ValueError, r"^index is not a permutation of 0..3"),
    (torch.randn(4, 3), out_axis("w"), torch.tensor([9, 2, 1, 0]), ValueError, r"^index is not a permutation"),
    (torch.randn(4, 3), out_axis("w"), torch.tensor([-1, 2, 1, 0]), ValueError, r"^index is not a permutation"),
    (torch.randn(4, 3), out_axis("w"), torch.tensor([1, 0]), ValueError, r"^index must be a permutation of .* 4 units"),
    (torch.randn(4, 3), out_axis("w"), torch.arange(4.0), TypeError, "^index must hold integer unit indices"),
    (torch.randn(4, 3), out_axis("w"), None, TypeError, "^index must be a 1-D integer tensor"),
    (torch.randn(4, 3), "w", torch.arange(4), TypeError, "^axis must be an Axis"),
    ([[1.0]], out_axis("w"), torch.arange(1), TypeError, "^t must be a torch.Tensor, got list"),
])
def test_permute_axis_refuses_what_it_cannot_permute(t, axis, index, error, match):
    with pytest.raises(error, match=match):
        permute_axis(t, axis, index)


def test_check_names_a_state_dict_value_that_is_not_a_tensor():
    spec = PermutationSpec([PermutationGroup("g", [out_axis("w")])])
    for value, kind in (([1, 2, 3], "list"), (np.zeros((3, 3)), "ndarray")):
        with pytest.raises(TypeError, match=f"^group 'g': parameter 'w' of model_a must be a torch.Tensor, got {kind}"):
            spec.check({"w": value})
    with pytest.raises(TypeError, match="parameter 'w' of model_b must be a torch.Tensor"):
        spec.check({"w": torch.zeros(3)}, {"w": [0, 0, 0]})
    with pytest.raises(TypeError, match="^model_a must be an nn.Module or a state dict, got list"):
        spec.check([1])


def test_apply_and_random_permutations_name_bad_arguments():
    state, spec = _small()
    for call, error, match in [
        (lambda: apply_permutations(state, "x", {}), TypeError, "^spec must be a PermutationSpec, got str"),
        (lambda: random_permutations("x"), TypeError, "^spec must be a PermutationSpec, got str"),
        (lambda: random_permutations(spec, generator=5), TypeError, "^generator must be a torch.Generator or None"),
        (lambda: apply_permutations(state, spec, {"g": None}), TypeError,
         r"^perms\['g'\] must be a 1-D integer tensor or a sequence of ints, got NoneType"),
        (lambda: apply_permutations(state, spec, {"g": "0123"}), TypeError,
         r"^perms\['g'\] must be a 1-D integer tensor or a sequence of ints, got str"),
        (lambda: apply_permutations(state, spec, {"g": [0, [1], 2, 3]}), TypeError,
         r"^perms\['g'\] must be a 1-D integer tensor or a sequence of ints, got list"),
        (lambda: apply_permutations(nn.Linear(3, 4), spec, {}), TypeError, "^state must be a state dict"),
        (lambda: apply_permutations([1], spec, {}), TypeError, "^state must be a state dict"),
    ]:
        with pytest.raises(error, match=match):
            call()
    perm = random_permutations(spec, torch.Generator().manual_seed(0))["g"]
    out = apply_permutations(state, spec, {"g": perm})
    assert torch.equal(out["w"], state["w"][perm]) and torch.equal(out["v"], state["v"][:, perm])


def test_without_params_refuses_a_bare_string():
    spec = spec_for(MLP(4, [8, 8], 3))
    # a string became a set of its characters and dropped nothing
    with pytest.raises(TypeError, match="^params must be a list of parameter names, got str 'layers.1.weight'"):
        spec.without_params("layers.1.weight")
    with pytest.raises(TypeError, match="^params must be a list of parameter names, got int"):
        spec.without_params(5)
    with pytest.raises(TypeError, match="^params must hold parameter names"):
        spec.without_params([None])
    dropped = spec.without_params(["layers.2.weight"])
    assert "layers.2.weight" not in {a.param for g in dropped for a in g.axes}
    assert "layers.2.weight" in {a.param for g in spec for a in g.axes}


def test_verify_spec_names_bad_arguments():
    model = MLP(4, [8], 3)
    spec = spec_for(model)
    x = torch.randn(5, 4)
    for call, error, match in [
        (lambda: verify_spec(spec, model.state_dict(), x), TypeError,
         r"^model must be an nn.Module \(verify_spec runs it\), got OrderedDict"),
        (lambda: verify_spec("spec", model, x), TypeError, "^spec must be a PermutationSpec"),
        (lambda: verify_spec(spec, model, x, rtol=-1), ValueError, "^rtol must be >= 0"),
        (lambda: verify_spec(spec, model, x, atol=float("nan")), ValueError, "^atol must be finite"),
        (lambda: verify_spec(spec, model, x, seed="x"), TypeError, "^seed must be an integer, got str"),
        (lambda: verify_spec(spec, model, x, seed=2 ** 64), ValueError, "^seed must be <="),
        (lambda: verify_spec(spec, model, torch.randn(2, 5)), ValueError,
         r"^example_input does not run through model: x must be \(B, 4\)"),
    ]:
        with pytest.raises(error, match=match):
            call()


class _Pair(nn.Module):
    """Returns a tuple (a tensor, a dict of a tensor, a plain value); only the dict's tensor depends on the input."""

    def __init__(self):
        super().__init__()
        self.m = MLP(4, [8], 3)

    def forward(self, x):
        return torch.zeros(1), {"logits": self.m(x)}, 1


def test_verify_spec_compares_every_tensor_of_a_tuple_output():
    model = _Pair()
    axes = [out_axis("m.layers.0.weight"), out_axis("m.layers.0.bias"), in_axis("m.layers.1.weight")]
    good = PermutationSpec([PermutationGroup("h", axes)])
    assert verify_spec(good, model, torch.randn(5, 4)) is good
    bad = PermutationSpec([PermutationGroup("h", axes[:2])])  # the consumer's columns left out
    with pytest.raises(ValueError, match="^permuting group 'h' changes the model's output"):
        verify_spec(bad, model, torch.randn(5, 4))

    class Nothing(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = MLP(4, [8], 3)

        def forward(self, x):
            return None

    with pytest.raises(TypeError, match="^model's output holds no tensor to compare"):
        verify_spec(PermutationSpec([PermutationGroup("h", axes)]), Nothing(), torch.randn(5, 4))


def test_spec_builders_refuse_other_models():
    for builder, name in ((mlp_spec, "MLP"), (resnet_spec, "ResNet20"), (vit_spec, "ViT")):
        with pytest.raises(TypeError, match=f"^{builder.__name__} takes a merging_kernels.models.{name}, got Linear"):
            builder(nn.Linear(2, 2))
    for model in (MLP(4, [8], 3), ResNet20(0.25, blocks_per_stage=1), ViT(dim=8, heads=2, depth=1)):
        verify_spec(spec_for(model), model, torch.randn(3, 8, 8) if not isinstance(model, MLP) else torch.randn(3, 4))
