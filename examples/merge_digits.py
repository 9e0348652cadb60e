"""Model merging, end to end, in under a minute on a laptop CPU (offline).

A small MLP learns the 8x8 handwritten digits of scikit-learn (bundled with
it, nothing is downloaded). We "pretrain" it briefly on all of them, then
fine-tune one expert per input domain from that base -- upright, rotated
90 degrees, colour-inverted, mirrored -- all with the same 10-class head.
Base and experts are saved as .safetensors files and merged with the command
line tool (task arithmetic, TIES and DARE + task arithmetic), exactly as you
would merge real checkpoints:

    python -m merging_kernels merge --base base.safetensors \\
        --experts original.safetensors rotated.safetensors ... \\
        --method ties --density 0.2 --scale 0.5 --out ties.safetensors

The coefficient lambda of each method is chosen on a validation split (the
test split is only used for the final table). The table shows each model's
test accuracy per domain: every expert is good on its own domain (marked *)
and has forgotten the others, while each merged model, one network with no
extra parameters, is better than the base on average and better than any
single expert across domains.

Run:  python examples/merge_digits.py [--workdir DIR] [--seed N] [--backend torch] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import shlex
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

try:
    import merging_kernels  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from merging_kernels import cli
from merging_kernels.safetensors_io import load_file, save_file

# The settings, checked to show merging working on 2 CPU cores in well under a minute.
HIDDEN = 256
PRETRAIN = dict(epochs=1, lr=1e-3)  # Adam, on all domains: a deliberately brief pretraining
FINETUNE = dict(epochs=8, lr=0.01)  # SGD with momentum, one domain per expert: gentle fine-tuning
BATCH = 32
TA_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)  # lambda for task arithmetic and DARE + TA
TIES_GRID = (0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5)  # lambda (--scale) for TIES
TIES_DENSITY = 0.2
DARE_DROP = 0.5

DOMAINS = {
    "original": lambda x: x,
    "rotated": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "inverted": lambda x: 1.0 - x,
    "mirrored": lambda x: x[:, :, ::-1],
}


def make_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, 10))


class Digits:
    """load_digits in [0, 1], split once (stratified) into train / validation / test, shown in each domain."""

    def __init__(self, seed: int):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        images, labels = load_digits(return_X_y=True)
        self.images = images.reshape(-1, 8, 8).astype(np.float32) / 16.0
        self.labels = labels
        index = np.arange(len(labels))
        rest, test = train_test_split(index, test_size=0.3, stratify=labels, random_state=seed)
        train, val = train_test_split(rest, test_size=0.2, stratify=labels[rest], random_state=seed)
        self.splits = {"train": train, "val": val, "test": test}
        self._cache: dict = {}

    def get(self, domain: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (domain, split)
        if key not in self._cache:
            ids = self.splits[split]
            x = np.ascontiguousarray(DOMAINS[domain](self.images[ids])).reshape(len(ids), 64)
            self._cache[key] = (torch.from_numpy(x), torch.from_numpy(self.labels[ids]))
        return self._cache[key]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, optimizer: str,
          seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), BATCH):
            batch = order[start:start + BATCH]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def accuracies(state: dict[str, torch.Tensor], data: Digits, split: str) -> np.ndarray:
    """Accuracy of a state dict on each domain (in DOMAINS order)."""
    model = make_mlp()
    model.load_state_dict(state)
    model.eval()
    result = []
    with torch.no_grad():
        for domain in DOMAINS:
            x, y = data.get(domain, split)
            result.append((model(x).argmax(1) == y).float().mean().item())
    return np.array(result)


def merge_with_cli(workdir: str, method: str, options: list[str], out_name: str, backend: str | None,
                   show: bool) -> dict[str, torch.Tensor]:
    """Run ``python -m merging_kernels merge`` (in this process) and load the merged checkpoint."""
    out = os.path.join(workdir, out_name)
    argv = ["merge", "--base", os.path.join(workdir, "base.safetensors"),
            "--experts", *[os.path.join(workdir, f"{d}.safetensors") for d in DOMAINS],
            "--method", method, *options, "--out", out, "--no-progress"]
    if backend:
        argv += ["--backend", backend]
    if show:
        shown = [os.path.relpath(a, workdir) if a.startswith(workdir) else a for a in argv]
        print("$ python -m merging_kernels " + " ".join(shlex.quote(a) for a in shown))
        status = cli.main(argv)
    else:
        with contextlib.redirect_stdout(io.StringIO()):
            status = cli.main(argv)
    if status != 0:
        raise SystemExit(f"the merge failed with exit status {status}")
    return load_file(out)


def choose_lambda(workdir, data, method, grid, make_options, backend) -> float:
    """The lambda of ``grid`` with the best mean validation accuracy over the domains."""
    scores = []
    for lam in grid:
        merged = merge_with_cli(workdir, method, make_options(lam), f"{method}-search.safetensors", backend,
                                show=False)
        scores.append(accuracies(merged, data, "val").mean())
    os.remove(os.path.join(workdir, f"{method}-search.safetensors"))
    return grid[int(np.argmax(scores))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="keep the checkpoints here (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=("torch", "native", "triton"), help="merge kernels (default: fastest)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2; on a busy machine 1 "
                                                                 "is faster for a model this small)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    data = Digits(args.seed)
    print(f"digits: {len(data.splits['train'])} train / {len(data.splits['val'])} validation / "
          f"{len(data.splits['test'])} test images, each shown in {len(DOMAINS)} domains: {', '.join(DOMAINS)}")

    # 1. pretrain the base briefly on every domain, then fine-tune one expert per domain from it
    base_model = make_mlp()
    x_all = torch.cat([data.get(d, "train")[0] for d in DOMAINS])
    y_all = torch.cat([data.get(d, "train")[1] for d in DOMAINS])
    train(base_model, x_all, y_all, optimizer="adam", seed=args.seed, **PRETRAIN)
    base = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    experts = {}
    for i, domain in enumerate(DOMAINS):
        model = train(copy.deepcopy(base_model), *data.get(domain, "train"), optimizer="sgd",
                      seed=args.seed + 1 + i, **FINETUNE)
        experts[domain] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = time.perf_counter()
    print(f"pretrained the base ({sum(v.numel() for v in base.values()):,} parameters) and fine-tuned "
          f"{len(experts)} experts in {trained - start:.1f} s")

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="merge_digits_"))
        os.makedirs(workdir, exist_ok=True)
        save_file(base, os.path.join(workdir, "base.safetensors"), metadata={"format": "pt"})
        for domain, state in experts.items():
            save_file(state, os.path.join(workdir, f"{domain}.safetensors"), metadata={"format": "pt"})

        # 2. choose each method's lambda on the validation split, then merge with it
        methods = [
            ("task arithmetic", "ta", TA_GRID, lambda lam: ["--weights", str(lam)]),
            (f"TIES (density {TIES_DENSITY})", "ties", TIES_GRID,
             lambda lam: ["--density", str(TIES_DENSITY), "--scale", str(lam)]),
            (f"DARE (p={DARE_DROP}) + TA", "dare", TA_GRID,
             lambda lam: ["--drop-rate", str(DARE_DROP), "--weights", str(lam), "--seed", str(args.seed)]),
        ]
        merged = {}
        print(f"\nmerging in {workdir if args.workdir else 'a temporary directory'} "
              "(lambda chosen on the validation split):")
        for label, method, grid, make_options in methods:
            lam = choose_lambda(workdir, data, method, grid, make_options, args.backend)
            state = merge_with_cli(workdir, method, make_options(lam), f"{method}.safetensors", args.backend,
                                   show=True)
            merged[f"{label}, λ={lam:g}"] = state
        merged_time = time.perf_counter()

    # 3. the table: test accuracy per domain
    rows = [("base (pretrained)", accuracies(base, data, "test"), None)]
    for i, (domain, state) in enumerate(experts.items()):
        rows.append((f"expert: {domain}", accuracies(state, data, "test"), i))
    merged_rows = [(f"merged: {label}", accuracies(state, data, "test"), None) for label, state in merged.items()]
    width = max(len(name) for name, _, _ in rows + merged_rows)
    header = f"{'test accuracy':<{width}}  " + "  ".join(f"{d:>9}" for d in DOMAINS) + f"  {'mean':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for name, accs, own in rows + [("", None, None)] + merged_rows:
        if accs is None:
            print()
            continue
        cells = [f"{a:.3f}" + ("*" if own == j else " ") for j, a in enumerate(accs)]
        print(f"{name:<{width}}  " + "  ".join(f"{c:>9}" for c in cells) + f"  {accs.mean():6.3f}")
    print("(* the expert's own domain)")

    base_mean = rows[0][1].mean()
    best_expert = max(rows[1:], key=lambda r: r[1].mean())
    own_mean = np.mean([accs[own] for _, accs, own in rows[1:]])
    print(f"\nbase mean {base_mean:.3f}; experts: {own_mean:.3f} on their own domain on average, best mean over "
          f"all domains {best_expert[1].mean():.3f} ({best_expert[0]})")
    for name, accs, _ in merged_rows:
        print(f"{name}: mean {accs.mean():.3f} ({accs.mean() - base_mean:+.3f} vs the base, "
              f"{accs.mean() - best_expert[1].mean():+.3f} vs the best expert)")
    print(f"\ntotal {time.perf_counter() - start:.1f} s (training {trained - start:.1f} s, "
          f"lambda search and merges {merged_time - trained:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
