"""REPAIR: corrected statistics equal the targets, exact no-op on a permuted copy, inputs, dead units, convs."""

import copy
import warnings

import pytest
import torch
from torch import nn

from merging_kernels.methods.mudsc import mudsc_merge
from merging_kernels.methods.repair import Producer, repair, repair_producers
from merging_kernels.models import MLP, ResNet20, ViT
from merging_kernels.permutation_spec import (ActivationPoint, PermutationGroup, PermutationSpec, apply_permutations,
                                              in_axis, out_axis, random_permutations, spec_for)


class ConvNet(nn.Module):
    """Two biased convs (channel dim 1) and a head: a conv model REPAIR corrects without add_bias."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x.unsqueeze(1)))))
        return self.fc(x.mean((2, 3)))

    @staticmethod
    def spec():
        return PermutationSpec([
            PermutationGroup("c1", [out_axis("conv1.weight"), out_axis("conv1.bias"), in_axis("conv2.weight")],
                             [ActivationPoint("act1")]),
            PermutationGroup("c2", [out_axis("conv2.weight"), out_axis("conv2.bias"), in_axis("fc.weight")],
                             [ActivationPoint("act2")]),
        ])


MAKERS = {
    "mlp": lambda: MLP(64, [24, 16], 10),
    "vit": lambda: ViT(image_size=8, patch_size=2, dim=16, depth=2, heads=4, mlp_dim=24),
    "conv": ConvNet,
}


def _spec(name, model):
    return ConvNet.spec().check(model) if name == "conv" else spec_for(model)


def _calib(sizes=(32, 17, 32, 5), seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 8, 8, generator=g) for n in sizes]


def _pair(name):
    torch.manual_seed(1)
    a = MAKERS[name]().eval()
    torch.manual_seed(2)
    b = MAKERS[name]().eval()
    return a, b


def _permuted_pair(name, seed=1):
    torch.manual_seed(seed)
    a = MAKERS[name]().eval()
    spec = _spec(name, a)
    perms = random_permutations(spec, torch.Generator().manual_seed(seed + 100))
    b = MAKERS[name]().eval()
    b.load_state_dict(apply_permutations(a.state_dict(), spec, perms))
    return a, b, spec


@torch.no_grad()
def _output_stats(model, modules, calib):
    """Per-channel mean/std (population, float64) of each module's output over all calibration rows."""
    outs = {m: [] for m in modules}
    named = dict(model.named_modules())
    handles = []
    for m in modules:
        cdim = -1 if isinstance(named[m], nn.Linear) else 1
        handles.append(named[m].register_forward_hook(
            lambda mod, args, y, m=m, cdim=cdim: outs[m].append(y.movedim(cdim, -1).reshape(-1, y.shape[cdim]))))
    was = model.training
    model.eval()
    for x in calib:
        model(x)
    model.train(was)
    for h in handles:
        h.remove()
    res = {}
    for m, ys in outs.items():
        y = torch.cat(ys).double()
        res[m] = (y.mean(0), y.std(0, unbiased=False))
    return res


def _targets(a, b, merge_matrix, producers, calib):
    names = [p.module for p in producers]
    sa, sb = _output_stats(a, names, calib), _output_stats(b, names, calib)
    out = {}
    for p in producers:
        m = merge_matrix(p.group).double()
        out[p.module] = (m @ torch.cat([sa[p.module][0], sb[p.module][0]]),
                         m @ torch.cat([sa[p.module][1], sb[p.module][1]]))
    return out


def _max_errors(stats, targets):
    """Max over producers and channels of |mean - target| and |std - target| / target (scale-free)."""
    mean_err = max(float(((stats[k][0] - t[0]).abs() / t[1].clamp_min(1e-3)).max()) for k, t in targets.items())
    std_err = max(float(((stats[k][1] - t[1]).abs() / t[1].clamp_min(1e-3)).max()) for k, t in targets.items())
    return mean_err, std_err


@pytest.mark.parametrize("name,residual", [("mlp", False), ("vit", False), ("vit", True), ("conv", False)])
@pytest.mark.parametrize("mode", ["permute", "zip"])
def test_repaired_statistics_equal_targets(name, residual, mode):
    a, b = _pair(name)
    calib = _calib()
    spec = _spec(name, a)
    result = mudsc_merge(a, b, spec, calib, mode=mode, w=0.5, progress=False, return_result=True, repair=False)
    if mode == "zip":
        assert result.zips
    producers = repair_producers(a, spec, residual=residual)
    targets = _targets(a, b, result.merge_matrix, producers, calib)
    before = _max_errors(_output_stats(result.model, list(targets), calib), targets)
    repaired = repair(result.model, a, b, result, calib, residual=residual, eps=1e-9)
    after = _max_errors(_output_stats(repaired, list(targets), calib), targets)
    # layer by layer: exact up to float rounding and eps (std off by ~eps / (2 var) relative: a tiny eps here,
    # as random-init ViT channels with var ~1e-3 would be 0.5% off with eps = 1e-5), unequal batch sizes.
    # Measured: at most 3e-7 (mean) and 8e-7 (std, the ViT with residual producers, where eps / (2 var) is
    # ~5e-7). An unbiased variance on one side only (std off by 1/(2N)) gives 9e-5 for the conv (N = 5504
    # rows) and 3.4e-4 for the ViT (N = 1462): both would pass 1e-3.
    assert after[0] < 1e-5 and after[1] < 1e-5, after
    assert max(before) > 0.05, before  # the check would fail without the correction


def test_producers_of_the_reference_models():
    mlp = MAKERS["mlp"]()
    assert repair_producers(mlp, spec_for(mlp)) == [Producer("layers.0", "hidden0"), Producer("layers.1", "hidden1")]
    vit = MAKERS["vit"]()
    spec = spec_for(vit)
    inner = {p.module for p in repair_producers(vit, spec, residual=False)}
    assert inner == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.q", "attn.k", "attn.v", "fc1")}
    full = {p.module for p in repair_producers(vit, spec)}  # default: residual producers included
    assert full - inner == {"patch_embed"} | {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.out", "fc2")}
    # named groups are taken as given (residual or not)
    assert {p.module for p in repair_producers(vit, spec, ["residual"])} == full - inner


@pytest.mark.parametrize("name", ["mlp", "vit", "conv"])
@pytest.mark.parametrize("mode", ["permute", "zip"])
def test_merge_with_permuted_copy_then_repair_keeps_function(name, mode):
    a, b, spec = _permuted_pair(name)
    calib = _calib()
    result = mudsc_merge(a, b, spec, calib, mode=mode, w=0.5, progress=False, return_result=True, repair=False)
    x = torch.randn(40, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), a(x), rtol=1e-5, atol=1e-5)
        # the targets are the merged model's own statistics: only eps moves anything (a tiny eps: random-init
        # ViT channels with var ~1e-3 would move by ~eps / (2 var) = 0.5% with the default)
        repaired = repair(None, a, b, result, calib, residual=True, eps=1e-10)
        torch.testing.assert_close(repaired(x), a(x), rtol=1e-4, atol=1e-4)


def test_model_merged_with_itself():
    a, _ = _pair("vit")
    calib = _calib()
    result = mudsc_merge(a, a, None, calib, progress=False, return_result=True, repair=False)  # model_b is model_a
    x = torch.randn(16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(repair(None, a, a, result, calib, eps=1e-10)(x), a(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(repair(a, a, a, result, calib, eps=1e-10)(x), a(x), rtol=1e-4, atol=1e-4)


def test_endpoints_untouched_copy_by_default_and_modes_kept():
    a, b = _pair("vit")
    calib = _calib()
    result = mudsc_merge(a, b, None, calib, progress=False, return_result=True, repair=False)
    merged = result.model
    a.train()
    merged.train()
    merged.blocks[0].train(False)  # a mixed mode is kept too
    before = [copy.deepcopy(m.state_dict()) for m in (a, b, merged)]
    out = repair(merged, a, b, result, calib, residual=True)
    assert out is not merged
    for m, sd in zip((a, b, merged), before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
    assert a.training and not b.training
    assert out.training and not out.blocks[0].training and out.blocks[1].training
    assert merged.training and not merged.blocks[0].training
    assert not torch.equal(out.blocks[0].attn.q.weight, merged.blocks[0].attn.q.weight)
    same = repair(merged, a, b, result, calib, residual=True, inplace=True)
    assert same is merged
    torch.testing.assert_close(same.blocks[0].attn.q.weight, out.blocks[0].attn.q.weight)


def test_spec_and_matrices_pair_and_one_shot_iterator_give_the_same_result():
    a, b = _pair("mlp")
    calib = _calib()
    result = mudsc_merge(a, b, None, calib, mode="zip", progress=False, return_result=True, repair=False)
    ref = repair(None, a, b, result, calib)
    matrices = {g.name: result.merge_matrix(g.name) for g in result.spec}
    other = repair(result.model, a, b, (result.spec, matrices), iter(calib))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)
    # only the named group is corrected
    only = repair(result.model, a, b, result, calib, groups=["hidden1"])
    assert torch.equal(only.layers[0].weight, result.model.layers[0].weight)
    assert not torch.equal(only.layers[1].weight, result.model.layers[1].weight)


def test_bad_inputs_raise_named_errors():
    a, b = _pair("mlp")
    calib = _calib()
    result = mudsc_merge(a, b, None, calib, progress=False, return_result=True, repair=False)
    m = result.model
    with pytest.raises(ValueError, match="calibration"):
        repair(m, a, b, result, [])
    with pytest.raises(ValueError, match="calibration"):
        repair(m, a, b, result, iter([]))
    with pytest.raises(ValueError, match="calibration"):
        repair(m, a, b, result, None)
    with pytest.raises(ValueError, match="calibration"):
        repair(m, a, b, result, [torch.randn(0, 8, 8)])
    with pytest.raises(TypeError, match="calibration"):
        repair(m, a, b, result, ["not a tensor"])
    with pytest.raises(ValueError, match="'hidden7'"):
        repair(m, a, b, result, calib, groups=["hidden7"])
    with pytest.raises(ValueError, match="groups"):
        repair(m, a, b, result, calib, groups=[])
    with pytest.raises(TypeError, match="merge"):
        repair(m, a, b, {"hidden0": torch.eye(24)}, calib)
    with pytest.raises(ValueError, match="merge.*'hidden0'.*\\(24, 48\\)"):
        repair(m, a, b, (result.spec, {"hidden0": torch.ones(24, 24)}), calib, groups=["hidden0"])
    with pytest.raises(ValueError, match="merge.*no merge matrix.*'hidden1'"):
        repair(m, a, b, (result.spec, {"hidden0": result.merge_matrix("hidden0")}), calib)
    with pytest.raises(ValueError, match="eps"):
        repair(m, a, b, result, calib, eps=0.0)
    with pytest.raises(TypeError, match="model_b"):
        repair(m, a, "b", result, calib)
    with pytest.raises(TypeError, match="model_a"):
        repair(m, None, b, result, calib)
    with pytest.raises(ValueError, match="model_b"):  # another width: does not match the spec
        repair(m, a, MLP(64, [24, 12], 10), result, calib)
    with pytest.raises(ValueError, match="merged"):
        repair(MLP(64, [20, 16], 10), a, b, result, calib)
    with pytest.raises(ValueError, match="inplace"):
        repair(a, a, b, result, calib, inplace=True)
    with pytest.raises(ValueError, match="merged is None"):
        repair(None, a, b, (result.spec, {}), calib)


def test_shared_producer_is_rejected():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.fc(torch.relu(self.fc(x))))

    spec = PermutationSpec([PermutationGroup("h", [out_axis("fc.weight"), out_axis("fc.bias"),
                                                   in_axis("head.weight")])]).check(Shared())
    a, b, m = Shared(), Shared(), Shared()
    with pytest.raises(ValueError, match="'fc' runs more than once"):
        repair(m, a, b, (spec, {"h": torch.cat([torch.eye(8), torch.eye(8)], 1) / 2}), [torch.randn(4, 8)])


def test_dead_units_give_finite_weights():
    a, b = _pair("mlp")
    calib = _calib()
    result = mudsc_merge(a, b, None, calib, progress=False, return_result=True, repair=False)
    merged = copy.deepcopy(result.model)
    with torch.no_grad():
        merged.layers[0].weight[3] = 0.0  # merged unit 3 constant (dead): only its mean moves
        merged.layers[0].bias[3] = 0.0
        merged.layers[1].weight[5] = 0.0  # merged unit 5 of hidden1 constant at 0.7
        merged.layers[1].bias[5] = 0.7
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    with torch.no_grad():  # every endpoint unit of hidden0 feeding merged unit 7 dead: target std 0
        mm = result.merge_matrix("hidden0")
        for u in mm[7].nonzero().flatten().tolist():
            model, unit = (a2, u) if u < 24 else (b2, u - 24)
            model.layers[0].weight[unit] = 0.0
    producers = repair_producers(a2, result.spec)
    targets = _targets(a2, b2, result.merge_matrix, producers, calib)
    for eps in (1e-5, 1e-30):
        out = repair(merged, a2, b2, result, calib, eps=eps)
        for p in out.parameters():
            assert torch.isfinite(p).all()
        assert torch.equal(out.layers[0].weight[3], torch.zeros(64))  # scale 1 on a dead merged channel
        torch.testing.assert_close(out.layers[0].bias[3].double(), targets["layers.0"][0][3], rtol=1e-5, atol=1e-5)
        assert torch.equal(out.layers[0].weight[7], torch.zeros(64))  # target std 0: scale 0
        stats = _output_stats(out, ["layers.0", "layers.1"], calib)
        assert bool(torch.isfinite(out(torch.randn(8, 8, 8))).all())
        torch.testing.assert_close(stats["layers.1"][0][5], targets["layers.1"][0][5], rtol=1e-4, atol=1e-4)


def test_bias_free_producers_warn_or_get_a_bias():
    torch.manual_seed(0)
    a, b = ResNet20(0.25, 10, 1).eval(), ResNet20(0.25, 10, 1).eval()
    calib = _calib(sizes=(16, 16))
    result = mudsc_merge(a, b, None, calib, w=0.0, progress=False, return_result=True, repair=False)
    with pytest.warns(UserWarning, match="without a bias"):
        out = repair(None, a, b, result, calib, residual=True)
    for k, v in out.state_dict().items():
        assert torch.equal(v, result.model.state_dict()[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = repair(None, a, b, result, calib, groups=["stage0.block0", "stage1.block1"], add_bias=True)
    assert out.stages[0][0].conv1.bias is not None and result.model.stages[0][0].conv1.bias is None
    producers = repair_producers(a, result.spec, ["stage0.block0", "stage1.block1"])
    targets = _targets(a, b, result.merge_matrix, producers, calib)
    errors = _max_errors(_output_stats(out, list(targets), calib), targets)
    assert max(errors) < 1e-5, errors  # measured 3e-8; an unbiased variance on one side gives 9.8e-4 (N = 512)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    a, b = _pair("vit")
    calib = _calib()
    result = mudsc_merge(a, b, None, calib, progress=False, return_result=True, repair=False)
    ref = repair(None, a, b, result, calib, residual=True)
    ac, bc = copy.deepcopy(a).cuda(), copy.deepcopy(b).cuda()
    mc = copy.deepcopy(result.model).cuda()
    matrices = {g.name: result.merge_matrix(g.name).cuda() for g in result.spec}
    out = repair(mc, ac, bc, (result.spec, matrices), [x.cuda() for x in calib], residual=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(out.state_dict()[k].cpu(), v, rtol=1e-3, atol=1e-4)


def test_mudsc_merge_repairs_models_without_batchnorm_by_default():
    """mudsc_merge(repair=None) corrects an MLP's producers (same result as calling repair), and leaves BN nets alone."""
    torch.manual_seed(0)
    a, b = MLP(64, [24, 16], 10).eval(), MLP(64, [24, 16], 10).eval()
    calib = [torch.randn(32, 8, 8) for _ in range(3)]
    plain = mudsc_merge(a, b, None, calib, progress=False, return_result=True, repair=False)
    auto = mudsc_merge(a, b, None, calib, progress=False, return_result=True)
    assert auto.timings["repair"] > 0 and plain.timings["repair"] == 0
    expected = repair(None, a, b, plain, calib)
    x = torch.randn(16, 8, 8)
    torch.testing.assert_close(auto.model(x), expected(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain.model(x), expected(x), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="repair needs calibration"):
        mudsc_merge(a, b, None, None, w=1.0, progress=False, repair=True)


class _InPlaceResidual(nn.Module):
    """Residual blocks that add in place (x += f(x)): both blocks' fc1 read the same tensor object, the second
    one after the first block has written to it, so they cannot be corrected in one stage."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 6)
        self.fc1a, self.fc2a = nn.Linear(6, 5), nn.Linear(5, 6)
        self.fc1b, self.fc2b = nn.Linear(6, 5), nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.inp(x)
        x += self.fc2a(torch.relu(self.fc1a(x)))
        x += self.fc2b(torch.relu(self.fc1b(x)))
        return self.head(x)


def test_producers_reading_a_tensor_written_in_place_between_are_separate_stages():
    torch.manual_seed(0)
    a, b, merged = _InPlaceResidual(), _InPlaceResidual(), _InPlaceResidual()
    spec = PermutationSpec([
        PermutationGroup("ha", [out_axis("fc1a.weight"), out_axis("fc1a.bias"), in_axis("fc2a.weight")]),
        PermutationGroup("hb", [out_axis("fc1b.weight"), out_axis("fc1b.bias"), in_axis("fc2b.weight")]),
    ]).check(a)
    calib = [torch.randn(64, 8) for _ in range(2)]
    halves = torch.cat([torch.eye(5), torch.eye(5)], 1) / 2
    out = repair(merged, a, b, (spec, {"ha": halves, "hb": halves}), calib)
    targets = _targets(a, b, lambda g: halves, repair_producers(a, spec), calib)
    errors = _max_errors(_output_stats(out, list(targets), calib), targets)
    assert max(errors) < 1e-5, errors  # measured <= 1e-7


def test_repair_of_a_merge_with_excluded_heads_of_other_class_counts():
    """A MuDSCResult whose heads were left out (exclude=) with 10 and 7 classes: repair() takes it as
    mudsc_merge's own REPAIR does (the heads are neither checked against each other nor producers)."""
    torch.manual_seed(0)
    a, b = MLP(64, [24, 16], 10).eval(), MLP(64, [24, 16], 7).eval()
    calib = _calib()
    head = ["layers.2.weight", "layers.2.bias"]
    plain = mudsc_merge(a, b, None, calib, exclude=head, progress=False, return_result=True, repair=False)
    auto = mudsc_merge(a, b, None, calib, exclude=head, progress=False, return_result=True)
    assert plain.exclude == tuple(head)
    out = repair(None, a, b, plain, calib)
    for k, v in auto.model.state_dict().items():
        torch.testing.assert_close(out.state_dict()[k], v, rtol=0, atol=0)


class _LinearBN(nn.Module):
    """fc1 -> BatchNorm -> fc2 (no BatchNorm after it) -> head: one producer feeds a BN, one reads its output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2, self.head = nn.Linear(64, 24), nn.BatchNorm1d(24), nn.Linear(24, 16), \
            nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))))

    @staticmethod
    def spec():
        bn = [out_axis(f"bn.{k}") for k in ("weight", "bias", "running_mean", "running_var")]
        return PermutationSpec([
            PermutationGroup("h1", [out_axis("fc1.weight"), out_axis("fc1.bias")] + bn + [in_axis("fc2.weight")],
                             [ActivationPoint("fc2", input=True)]),
            PermutationGroup("h2", [out_axis("fc2.weight"), out_axis("fc2.bias"), in_axis("head.weight")],
                             [ActivationPoint("head", input=True)]),
        ])


def test_repair_of_a_batchnorm_model_reestimates_its_statistics_stage_by_stage():
    """mudsc_merge(repair=True) on a BN model: the BN statistics are those of the corrected fc1 (as a fresh
    reset gives), and fc2, downstream of the BN, meets its targets exactly."""
    from merging_kernels.methods.mudsc import reset_batchnorm

    torch.manual_seed(0)
    calib = _calib(sizes=(64, 64, 32))
    a, b = _LinearBN(), _LinearBN()
    for m in (a, b):
        reset_batchnorm(m, calib)
        m.eval()
    spec = _LinearBN.spec().check(a)
    result = mudsc_merge(a, b, spec, calib, w=0.5, progress=False, return_result=True, repair=True)
    fresh = copy.deepcopy(result.model)
    reset_batchnorm(fresh, calib)
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(result.model.bn, k), getattr(fresh.bn, k))
    targets = _targets(a, b, result.merge_matrix, repair_producers(a, spec), calib)
    errors = _max_errors(_output_stats(result.model, list(targets), calib), targets)
    assert max(errors) < 1e-5, errors  # measured <= 1e-7
    # the default (repair=None) leaves BatchNorm models to the BN reset alone
    assert mudsc_merge(a, b, spec, calib, w=0.5, progress=False, return_result=True).timings["repair"] == 0


def test_bias_free_warning_from_mudsc_merge_names_a_route_that_exists():
    """mudsc_merge REPAIRs by default but has no add_bias: the warning must not send the user to an argument
    mudsc_merge rejects; the route it names gives every producer its targets."""

    class NoBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(64, 24, bias=False), nn.ReLU(), nn.Linear(24, 10)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x.flatten(1))))

    torch.manual_seed(0)
    a, b = NoBias(), NoBias()
    spec = PermutationSpec([PermutationGroup("h", [out_axis("fc1.weight"), in_axis("fc2.weight")], ["act"])])
    calib = _calib()
    with pytest.warns(UserWarning, match=r"repair=False, return_result=True and call repair\(None, .*add_bias=True"):
        mudsc_merge(a, b, spec, calib, progress=False)
    with pytest.raises(TypeError, match="add_bias"):
        mudsc_merge(a, b, spec, calib, progress=False, add_bias=True)
    result = mudsc_merge(a, b, spec, calib, progress=False, repair=False, return_result=True)
    out = repair(None, a, b, result, calib, add_bias=True)
    targets = _targets(a, b, result.merge_matrix, repair_producers(a, spec), calib)
    assert max(_max_errors(_output_stats(out, list(targets), calib), targets)) < 1e-5  # measured 1e-7


def test_calibration_and_dtype_errors_are_named_like_mudsc_merge():
    a, b = _pair("mlp")
    calib = _calib()
    result = mudsc_merge(a, b, None, calib, progress=False, return_result=True, repair=False)
    m = result.model
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = calib[0], torch.randint(0, 10, (calib[0].shape[0],))
    for calibration, error, match in [
            ([torch.randn(8, 5)], ValueError, "calibration batch 0 does not run through model_a"),
            ([calib[0], calib[1].double()], ValueError, "calibration batch 1 does not run through model_a.*cast"),
            ([calib[0].long()], ValueError, "calibration batch 0 does not run through model_a.*int64"),
            ((x, y), ValueError, "calibration batch 1 does not run through model_a.*labels"),
            (5, TypeError, "calibration must be a tensor or an iterable")]:
        with pytest.raises(error, match=match):
            repair(m, a, b, result, calibration, inplace=True)
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[k]), k  # left as it was
    with pytest.raises(ValueError, match=r"model_b\.layers\.0\.weight is torch.float32 but model_a.* torch.float64"):
        repair(None, copy.deepcopy(a).double(), b, result, calib)
    with pytest.raises(ValueError, match=r"merged\.layers\.0\.weight is torch.float64 but model_a.* torch.float32"):
        repair(copy.deepcopy(m).double(), a, b, result, calib)
    repair(m, a, b, result, [(x, y)])  # one (input, label) batch: fine


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_group_of_zero_units_has_no_producer_to_correct():
    def make():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 0), nn.ReLU(), nn.Linear(0, 2))

    spec = PermutationSpec([
        PermutationGroup("h0", [out_axis("0.weight"), out_axis("0.bias"), in_axis("2.weight")], activations=["1"]),
        PermutationGroup("h1", [out_axis("2.weight"), out_axis("2.bias"), in_axis("4.weight")], activations=["3"])])
    torch.manual_seed(0)
    a, b = make(), make()
    calib = [torch.randn(32, 4), torch.randn(16, 4)]
    result = mudsc_merge(a, b, spec, calib, progress=False, return_result=True, repair=False)
    out = repair(None, a, b, result, calib)
    assert repair_producers(a, spec) == [Producer("0", "h0"), Producer("2", "h1")]
    # h0's producer corrected to its targets; the 0-channel one left alone
    h = torch.cat([out[0](x) for x in calib])
    ends = torch.cat([torch.cat([m[0](x) for x in calib]) for m in (a, b)], 1)
    mm = result.merge_matrix("h0")
    torch.testing.assert_close(h.mean(0), mm @ ends.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h.std(0, unbiased=False), mm @ ends.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
    assert torch.equal(out[2].weight, result.model[2].weight) and out[2].weight.shape == (0, 8)
