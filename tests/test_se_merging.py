"""SE-Merging: the wrapped model against static merges, the experts themselves and plain forward passes."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from merging_kernels import task_arithmetic, ties_merging
from merging_kernels.methods.se_merging import coefficients_from_scores, expert_scores, se_merge
from merging_kernels.models import MLP, ResNet20, ViT


class TinyNet(nn.Module):
    """Linear, LayerNorm, Conv2d and token inputs (B, T, D), all batch-first."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.embed = nn.Linear(12, 16)
        self.norm = nn.LayerNorm(16)
        self.hidden = nn.Linear(16, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):  # x: (B, T, 12)
        b, t, _ = x.shape
        c = self.conv(x.reshape(b * t, 1, 3, 4)).reshape(b, t, 24)[..., :16]
        h = torch.relu(self.hidden(self.norm(self.embed(x) + c)))
        return self.out(h.mean(1))


def _family(k=3, seed=0, scale=0.1):
    torch.manual_seed(seed)
    base = TinyNet().eval()
    return base, _perturbed_copies(base, k, scale)


def _perturbed_copies(base, k=2, scale=0.1):
    """k experts: copies of ``base`` with Gaussian noise of std ``scale`` on every parameter."""
    experts = []
    for _ in range(k):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(scale * torch.randn_like(p))
        experts.append(e)
    return experts


def _load(base, state):
    m = copy.deepcopy(base)
    m.load_state_dict(state)
    return m


@pytest.mark.parametrize("strategy", [None, "stacked", "materialize"])
def test_constant_alpha_equals_static_task_arithmetic(strategy):
    base, experts = _family()
    x = torch.randn(6, 4, 12)
    model = se_merge(base, experts, base_method="ta", lam=[0.2, 0.5, 0.3], strategy=strategy)
    static = _load(base, task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], [0.2, 0.5, 0.3]))
    torch.testing.assert_close(model(x, alpha=model.static_alpha(6)), static(x), rtol=1e-5, atol=1e-5)


def test_constant_alpha_equals_static_ties():
    base, experts = _family(k=4)
    x = torch.randn(5, 3, 12)
    model = se_merge(base, experts, base_method="ties", lam=0.7, density=0.3)
    static = _load(base, ties_merging(base.state_dict(), [e.state_dict() for e in experts], density=0.3, scale=0.7))
    torch.testing.assert_close(model(x, alpha=model.static_alpha(5)), static(x), rtol=1e-5, atol=1e-5)


def test_one_hot_alpha_reproduces_each_expert_and_zero_the_base():
    base, experts = _family()
    x = torch.randn(4, 2, 12)
    model = se_merge(base, experts)
    torch.testing.assert_close(model(x, alpha=torch.zeros(4, 3)), base(x), rtol=1e-5, atol=1e-5)
    for k, expert in enumerate(experts):
        alpha = torch.zeros(4, 3)
        alpha[:, k] = 1
        torch.testing.assert_close(model(x, alpha=alpha), expert(x), rtol=1e-5, atol=1e-5)


def test_mixed_alpha_rows_equal_separate_static_merges():
    """Each sample runs through its own θ0 + Σ α_k τ_k: compare with one static model per sample."""
    base, experts = _family()
    x = torch.randn(3, 2, 12)
    alpha = torch.tensor([[0.9, 0.05, 0.05], [0.0, 1.2, -0.2], [0.3, 0.3, 0.3]])
    y = se_merge(base, experts)(x, alpha=alpha)
    for i in range(3):
        static = _load(base, task_arithmetic(base.state_dict(), [e.state_dict() for e in experts],
                                             alpha[i].tolist()))
        torch.testing.assert_close(y[i:i + 1], static(x[i:i + 1]), rtol=1e-5, atol=1e-5)


def test_probe_features_equal_separate_forward_passes():
    base, experts = _family()
    x = torch.randn(5, 2, 12)
    model = se_merge(base, experts, lam=0.3, probe="norm")
    feats = model.probe_features(x)
    assert feats.shape == (5, 5, 2 * 16)
    static = _load(base, task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], 0.3))
    for i, m in enumerate([base, *experts, static]):
        captured = []
        handle = m.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
        m(x)
        handle.remove()
        torch.testing.assert_close(feats[i], captured[0].reshape(5, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("score", ["shift", "closest", "cosine_shift", "cosine_closest"])
def test_route_gives_a_softmax_scaled_by_total(score):
    base, experts = _family()
    x = torch.randn(7, 2, 12)
    for total, expected in (("one", 1.0), ("lambda", 0.9), (2.5, 2.5)):
        model = se_merge(base, experts, lam=0.3, score=score, total=total)
        alpha = model.route(x)
        assert alpha.shape == (7, 3) and (alpha >= 0).all()
        torch.testing.assert_close(alpha.sum(1), torch.full((7,), expected), rtol=1e-5, atol=1e-6)
        assert model(x).shape == (7, 5)


def test_routing_finds_the_expert_that_moves_the_sample():
    """Scores by hand: expert 1 moves sample 0 most, expert 0 sample 1; the merge sits nearest expert 1 for 0."""
    f0 = torch.zeros(2, 2)
    fk = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[2.0, 0.0], [0.0, 1.0]]])  # (K=2, B=2, F=2)
    fm = torch.tensor([[1.9, 0.0], [2.5, 0.0]])
    feats = torch.cat([f0[None], fk, fm[None]])
    shift = expert_scores(feats, "shift")
    assert shift.argmax(1).tolist() == [1, 0]
    assert expert_scores(feats, "closest").argmax(1).tolist() == [1, 0]
    alpha = coefficients_from_scores(shift, temperature=0.01, total=1.0)
    torch.testing.assert_close(alpha, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), rtol=0, atol=1e-6)
    one = coefficients_from_scores(torch.randn(4, 1), temperature=0.5, total=0.7)  # K = 1: all to the one expert
    torch.testing.assert_close(one, torch.full((4, 1), 0.7))


def test_routing_is_one_batched_pass_not_k_passes():
    base, experts = _family(k=4)
    model = se_merge(base, experts, probe="hidden")
    calls = []
    handle = model.module.embed.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    model.route(torch.randn(3, 2, 12))
    handle.remove()
    assert calls == [3 * (4 + 2)]  # θ0, 4 experts and the merge, replicated in one batch


def test_untouched_unsupported_layers_are_shared_and_changed_ones_are_refused():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 3)

        def forward(self, idx):
            return self.lin(self.emb(idx))

    torch.manual_seed(0)
    base = WithEmbedding()
    experts = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        for e in experts:
            e.lin.weight.add_(torch.randn_like(e.lin.weight))
    model = se_merge(base, experts)  # the embedding is identical everywhere: shared
    idx = torch.randint(0, 10, (5, 3))
    assert model(idx).shape == (5, 3, 3)
    with torch.no_grad():
        experts[1].emb.weight.add_(1.0)
    with pytest.raises(TypeError, match="layer emb .*Embedding"):
        se_merge(base, experts)


def test_batchnorm_with_different_running_statistics_is_refused():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    experts = [copy.deepcopy(base) for _ in range(2)]
    for e in experts:
        with torch.no_grad():
            e[0].weight.add_(0.1)
    se_merge(base, experts)  # BatchNorm untouched: shared
    experts[0].train()
    experts[0](torch.randn(8, 4))  # updates its running statistics only
    with pytest.raises(TypeError, match="layer 1 .*BatchNorm1d.*running_mean"):
        se_merge(base, experts)


def test_errors_on_mismatched_experts_and_bad_arguments():
    base, experts = _family()
    other = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="experts\\[1\\] does not match"):
        se_merge(base, [experts[0], other])
    wide = copy.deepcopy(experts[0])
    wide.out = nn.Linear(16, 6)
    with pytest.raises(ValueError, match="experts\\[0\\].out.weight has shape"):
        se_merge(base, [wide])
    with pytest.raises(TypeError, match="experts"):
        se_merge(base, experts[0])
    with pytest.raises(ValueError, match="score"):
        se_merge(base, experts, score="nearest")
    with pytest.raises(ValueError, match="temperature"):
        se_merge(base, experts, temperature=0)
    with pytest.raises(ValueError, match="one value per expert"):
        se_merge(base, experts, lam=[0.1, 0.2])
    with pytest.raises(ValueError, match="probe"):
        se_merge(base, experts, probe="nope")
    with pytest.raises(ValueError, match="total"):
        se_merge(base, experts, total="all")
    model = se_merge(base, experts)
    with pytest.raises(ValueError, match="alpha must be"):
        model(torch.randn(2, 2, 12), alpha=torch.ones(2, 2))


def test_non_finite_experts_and_calibration_inputs_are_refused():
    base, experts = _family(k=2)
    broken = copy.deepcopy(experts[0])
    with torch.no_grad():
        broken.hidden.weight[0, 0] = float("nan")
    for method in ("ta", "ties"):  # as task_arithmetic / ties_merging refuse the same state dicts
        with pytest.raises(ValueError, match=r"non-finite task vectors .* 'hidden.weight'"):
            se_merge(base, [broken, experts[1]], base_method=method)
    unchecked = se_merge(base, [broken, experts[1]], check_finite=False)  # the static merges' opt-out too
    assert torch.isnan(unchecked(torch.randn(2, 3, 12), alpha=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))[0]).all()
    model = se_merge(base, experts)
    scales = model.score_scale.clone()
    with pytest.raises(ValueError, match="^calibrate: the inputs gave non-finite expert scores"):
        model.calibrate(torch.full((4, 3, 12), float("nan")))
    assert torch.equal(model.score_scale, scales)  # left as it was: routing still works
    assert torch.isfinite(model(torch.randn(2, 3, 12))).all()
    for inputs in (None, 5):
        with pytest.raises(TypeError, match="^inputs must be a tensor"):
            model.calibrate(inputs)


@pytest.mark.parametrize("lam,error,match", [
    ([None, 1, 2], TypeError, "^lam must be a real number"),
    (["0.1", "0.2", "0.3"], TypeError, "^lam must be a real number"),
    ([True, False, True], TypeError, "^lam must be a real number"),
    ("0.3", TypeError, "^lam must be a real number"),
    (torch.tensor([[0.1, 0.2, 0.3]]), ValueError, r"^lam must be a number or K numbers, got shape \(1, 3\)"),
    ([0.1, float("inf"), 0.3], ValueError, "^lam must be finite"),
    (1e39, ValueError, "^lam must lie within float32's range"),
])
def test_lam_is_validated_alike_in_every_form(lam, error, match):
    base, experts = _family()
    with pytest.raises(error, match=match):
        se_merge(base, experts, lam=lam)


def test_lam_accepts_arrays_and_tensors_of_k_numbers():
    base, experts = _family()
    for lam in (np.array([0.1, 0.2, 0.3]), torch.tensor([0.1, 0.2, 0.3]), (0.1, 0.2, 0.3)):
        torch.testing.assert_close(se_merge(base, experts, lam=lam).static_alpha(1)[0], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(se_merge(base, experts, lam=torch.tensor(0.4)).static_alpha(1), torch.full((1, 3), 0.4))


def test_static_alpha_and_layer_inputs_are_checked_by_name():
    base, experts = _family()
    model = se_merge(base, experts)
    with pytest.raises(ValueError, match="^batch must be >= 0"):
        model.static_alpha(-1)
    for batch in ("3", 2.5):
        with pytest.raises(TypeError, match="^batch must be an integer"):
            model.static_alpha(batch)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)).eval()
    others = _perturbed_copies(mlp, 2)
    model = se_merge(mlp, others)
    for x in (torch.randn(3, 5), torch.randn(4)):  # wrong features; no batch dim (replicated 4x by routing)
        with pytest.raises(ValueError, match=r"^0: x must be \(N, \.\.\., 4\) with N samples"):
            model(x)
    model.module[0] = others[0][0]  # a plain Linear(4, 8): the per-sample LayerNorm checks its own input
    with pytest.raises(ValueError, match=r"^1: x must be \(N, \.\.\., 8\) with N samples"):
        model(torch.randn(4), alpha=torch.ones(4, 2))  # the Linear makes (8,): no batch dim


def test_compiles_to_one_graph_with_routing_inside():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4))
    experts = [copy.deepcopy(base) for _ in range(3)]
    with torch.no_grad():
        for e in experts:
            for p in e.parameters():
                p.add_(0.1 * torch.randn_like(p))
    model = se_merge(base, experts, probe="2")
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch in (5, 7):
        x = torch.randn(batch, 12)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_calibration_removes_an_experts_overall_scale():
    """An expert fine-tuned 10x harder wins every sample on raw shift scores; calibrated, it does not."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    experts = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        for e, scale in zip(experts, (1.0, 0.1)):
            for p in e.parameters():
                p.add_(scale * torch.randn_like(p))
    model = se_merge(base, experts, probe="0")
    x = torch.randn(400, 8)
    assert (model.route(x).argmax(1) == 1).float().mean() == 0  # the big expert always wins
    raw = expert_scores(model.probe_features(x), "shift")
    model.calibrate([x[:150], x[150:]])  # batches or one tensor: the same scales
    torch.testing.assert_close(model.score_scale, raw.abs().mean(0), rtol=1e-5, atol=0)
    share = (model.route(x).argmax(1) == 1).float().mean().item()
    assert 0.2 < share < 0.8
    with pytest.raises(ValueError, match="at least one"):
        model.calibrate([])


def test_unchanged_layers_stay_plain_and_the_default_probe_is_the_first_changed_one():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    experts = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        for e in experts:
            e[2].weight.add_(torch.randn_like(e[2].weight))
    model = se_merge(base, experts)
    kinds = [type(m).__name__ for m in model.module]
    assert kinds == ["Linear", "LayerNorm", "PerSampleLinear"] and model.probe == "2"
    alpha = model.route(torch.randn(64, 6))
    assert alpha.std(0).max() > 1e-3  # routing reacts to the samples (not λ for everyone)


def test_forward_requires_one_alpha_row_per_sample():
    base, experts = _family()
    model = se_merge(base, experts)
    with pytest.raises(ValueError, match=r"alpha must be \(B, K\) = \(4, 3\)"):
        model(torch.randn(4, 2, 12), alpha=torch.ones(2, 3))


def test_empty_batches_and_inputs_without_a_batch_dimension():
    base, experts = _family()
    model = se_merge(base, experts)
    empty = torch.randn(0, 2, 12)
    alpha = model.route(empty)
    assert alpha.shape == (0, 3) and alpha.dtype == torch.float32
    out = model(empty)
    assert out.shape == (0, 5)
    ref = model(torch.randn(4, 2, 12))  # an empty batch changes nothing for the next call
    model.calibrate([empty, torch.randn(4, 2, 12)])  # empty batches are skipped
    assert bool(torch.isfinite(model.score_scale).all()) and bool((model.score_scale != 1).any())
    with pytest.raises(ValueError, match="at least one input sample"):
        model.calibrate(empty)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model([[0.0] * 12] * 2)
    with pytest.raises(ValueError, match="batch dimension"):
        model.route(torch.tensor(1.0))
    assert ref.shape == (4, 5)


def test_an_input_whose_batch_is_not_dim_0_is_named():
    class Rows(nn.Module):  # reads any input as rows of 8 features, so a missing batch dim goes unnoticed
        def __init__(self):
            super().__init__()
            self.hidden, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(x.reshape(-1, 8))))

    torch.manual_seed(0)
    base = Rows().eval()
    experts = _perturbed_copies(base)
    model = se_merge(base, experts)
    assert model(torch.randn(5, 8)).shape == (5, 3)
    with pytest.raises(ValueError, match="x must have its batch in dim 0"):
        model.route(torch.randn(8))  # one sample without its batch dimension: 4 probe rows, not 4 replicas of 8


def test_threads_keep_their_own_coefficients():
    import threading

    base, experts = _family()
    model = se_merge(base, experts)
    x = torch.randn(8, 2, 12)
    alphas = [torch.rand(8, 3) for _ in range(4)]
    expected = [model(x, alpha=a) for a in alphas]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                results[i] = model(x, alpha=alphas[i])
                assert torch.equal(results[i], expected[i])
        except Exception as exc:  # collected: an assert in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:1]


def test_float64_models_merge_in_float64():
    base, experts = _family()
    base, experts = base.double(), [e.double() for e in experts]
    x = torch.randn(3, 2, 12, dtype=torch.float64)
    model = se_merge(base, experts, lam=0.3)
    assert model.static_alpha(3).dtype == model.probe_table.dtype == torch.float64
    static = _load(base, task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], 0.3))
    assert (model(x, alpha=model.static_alpha(3)) - static(x)).abs().max() < 1e-12
    ties = se_merge(base, experts, base_method="ties", lam=0.7, density=0.3)  # float64 thresholds (kthvalue)
    static = _load(base, ties_merging(base.state_dict(), [e.state_dict() for e in experts], density=0.3, scale=0.7))
    assert (ties(x, alpha=ties.static_alpha(3)) - static(x)).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_and_routing_coefficients_are_float32_below_float64(dtype):
    # the layers mix in float32 for these models: coefficients already in it are used without a cast per layer
    base, experts = _family()
    model = se_merge(base.to(dtype), [e.to(dtype) for e in experts], lam=[0.1, 0.2, 0.3])
    assert model.static_alpha(2).dtype == model.probe_table.dtype == torch.float32
    torch.testing.assert_close(model.static_alpha(2)[1], torch.tensor([0.1, 0.2, 0.3]))
    assert model.route(torch.randn(2, 3, 12).to(dtype)).dtype == torch.float32


@pytest.mark.parametrize("make", [lambda: MLP(64, [32, 32], 10), lambda: ResNet20(0.5, 10, 1),
                                  lambda: ViT(8, 2, 16, 1, 2, 32, 10)], ids=["mlp", "resnet20", "vit"])
def test_the_shipped_models_merge_per_sample(make):
    # their forward reads layer attributes (in_features, in_channels) of the layers se_merge replaces
    torch.manual_seed(0)
    base = make().eval()
    experts = []
    for _ in range(2):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for m in expert.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):  # BatchNorm statistics stay the base's
                    for p in m.parameters():
                        p.add_(0.05 * torch.randn_like(p))
        experts.append(expert)
    model = se_merge(base, experts, lam=0.5)
    x = torch.randn(3, 8, 8)
    static = _load(base, task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], 0.5))
    torch.testing.assert_close(model(x, alpha=model.static_alpha(3)), static(x), rtol=1e-4, atol=1e-4)
    assert model(x).shape == (3, 10)


def test_runs_under_autocast():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    experts = _perturbed_copies(base)
    model = se_merge(base, experts)
    x = torch.randn(5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, alpha=model.static_alpha(5))
    torch.testing.assert_close(y.float(), model(x, alpha=model.static_alpha(5)), rtol=2e-2, atol=2e-2)


def test_low_rank_option_matches_exact_at_full_rank():
    base, experts = _family()
    x = torch.randn(4, 2, 12)
    exact, low = se_merge(base, experts), se_merge(base, experts, rank=16)
    alpha = torch.rand(4, 3)
    torch.testing.assert_close(low(x, alpha=alpha), exact(x, alpha=alpha), rtol=1e-4, atol=1e-4)


def test_subclasses_of_supported_layers_are_refused_when_changed():
    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    torch.manual_seed(0)
    base = WithAttention()
    experts = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        experts[0].attn.out_proj.weight.add_(0.1)
    with pytest.raises(TypeError, match="layer attn.out_proj .*NonDynamicallyQuantizableLinear"):
        se_merge(base, experts)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", [None, "stacked", "materialize"])
def test_cuda_model_matches_cpu(strategy):
    base, experts = _family()
    x, unlabeled = torch.randn(6, 3, 12), torch.randn(32, 3, 12)
    cpu = se_merge(base, experts, strategy=strategy).calibrate(unlabeled)
    gpu = se_merge(copy.deepcopy(base).cuda(), [copy.deepcopy(e).cuda() for e in experts], strategy=strategy)
    gpu.calibrate(unlabeled.cuda())
    torch.testing.assert_close(gpu.score_scale.cpu(), cpu.score_scale, rtol=1e-3, atol=1e-5)
    alpha = torch.rand(6, 3)
    torch.testing.assert_close(gpu(x.cuda(), alpha=alpha.cuda()).cpu(), cpu(x, alpha=alpha), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.route(x.cuda()).cpu(), cpu.route(x), rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", [None, "stacked", "materialize"])
def test_cuda_forward_makes_no_host_sync(strategy):
    # the inference-loop contract: routing and the per-sample layers stay on the device, batch after batch
    base, experts = _family()
    model = se_merge(copy.deepcopy(base).cuda(), [copy.deepcopy(e).cuda() for e in experts], strategy=strategy)
    model.calibrate(torch.randn(32, 3, 12, device="cuda"))
    batches = [torch.randn(b, 3, 12, device="cuda") for b in (6, 6, 9)]
    with torch.no_grad():
        for x in batches[1:]:  # warm-up: Triton compiles for each batch size outside the checked region
            model(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            outputs = [model(x) for x in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [tuple(y.shape) for y in outputs] == [(6, 5), (6, 5), (9, 5)]
