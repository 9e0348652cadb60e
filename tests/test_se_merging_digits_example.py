"""Smoke test of the SE-Merging digits harness: examples/se_merging_digits.py --quick on the MLP (~10 s, one core)."""

import copy
import importlib.util
import os
import re
import sys

import pytest
import torch

pytest.importorskip("sklearn")

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "se_merging_digits.py")


def load_example():
    spec = importlib.util.spec_from_file_location("se_merging_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("se_merging_digits", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_every_table(tmp_path):
    example = load_example()
    out = tmp_path / "report.txt"
    argv = ["--quick", "--backbones", "mlp", "--workdir", str(tmp_path / "ckpt"), "--out", str(out)]
    if example.load_se_merge() is None:
        argv += ["--impl", "reference"]
    assert example.main(argv) == 0
    text = out.read_text()
    assert text.startswith("$ python examples/se_merging_digits.py --quick")
    for k in (4, 8):
        assert f"MLP, K={k}: test accuracy" in text
    lines = text.splitlines()
    for row in ("pretrained + each task's head", "experts, own task (upper bound)", "TA static", "TIES static",
                "SE-Merging on TA ", "SE-Merging on TIES ", "SE-Merging on TA, calibrated shift",
                "SE-Merging on TIES, calibrated shift", "oracle task id on TA", "oracle task id on TIES"):
        assert sum(line.startswith(row) for line in lines) == 2, row  # K = 4 and 8 of this backbone
    assert text.count("<- default") == 1 and text.count("<- best calibrated") == 1
    # the reference at α = λ is the static merge, and se_merge (when present) agrees with the reference
    checks = [line for line in lines if line.startswith("check K=")]
    assert len(checks) == 4
    for line in checks:
        diffs = [float(v) for v in re.findall(r"(?:\|diff\||α=λ|random α) ([0-9.e+-]+)", line)]
        assert diffs and max(diffs) < 1e-4, line


def test_vit_backbone_runs_under_se_merge():
    """The ViT is built from layers se_merge supports; se_merge equals the plain-torch reference per sample."""
    example = load_example()
    if example.load_se_merge() is None:
        pytest.skip("merging_kernels.methods.se_merging is not there yet")
    torch.manual_seed(0)
    base = example.make_backbone("vit").eval()
    experts = []
    for _ in range(3):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn_like(p))
        experts.append(expert)
    model = example.load_se_merge()(base, experts, base_method="ta", lam=0.3, probe="blocks.0")
    base_params = example.float_state(base)
    vectors = [{n: example.float_state(e)[n] - base_params[n] for n in base_params} for e in experts]
    reference = example.ReferenceSE(example.make_backbone("vit").eval(), base_params, vectors)
    x = torch.rand(10, 64)
    alpha = torch.rand(10, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, alpha=alpha), reference(x, alpha), atol=1e-5, rtol=1e-4)
        # routing with the reference's probe features and scores reproduces se_merge's route
        rows = torch.cat([torch.zeros(1, 3), torch.eye(3), torch.full((1, 3), 0.3)])
        feats = reference.probe_features(x, rows, ("blocks.0",))["blocks.0"]
        for score in example.SCORES:
            model.score = score
            mine = example.alpha_from_scores(example.route_scores(feats, score), model.temperature, model.total)
            torch.testing.assert_close(model.route(x), mine, atol=1e-5, rtol=1e-4)


def test_domains_are_distinct_and_splits_disjoint():
    example = load_example()
    data = example.DigitsDomains(0)
    splits = [set(map(int, ids)) for ids in data.splits.values()]
    assert sum(len(s) for s in splits) == len(data.labels) == len(set().union(*splits))
    x0 = data.get("original", "val")[0]
    for domain in example.DOMAIN_NAMES[1:]:
        x, y = data.get(domain, "val")
        assert x.shape == x0.shape and not (x == x0).all(), domain
        assert (y == data.get("original", "val")[1]).all()
