"""`python -m merging_kernels merge`: streamed merges equal the in-memory methods; bad input is refused."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch

from merging_kernels import dare_merging, task_arithmetic, ties_merging
from merging_kernels import cli
from merging_kernels.safetensors_io import SafetensorsReader, load_file, save_file

REPO = Path(__file__).resolve().parents[1]
NUM_EXPERTS = 3


def make_base(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(12, 8, generator=g),
        "layers.0.weight": torch.randn(8, 8, generator=g),
        "layers.0.bias": torch.randn(8, generator=g),
        "norm.weight": torch.randn(8, generator=g).bfloat16(),
        "head.weight": torch.randn(5, 8, generator=g).half(),
        "temperature": torch.tensor(0.7),
        "empty": torch.zeros(0, 3),
        "num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        # a constant float buffer, the same in every checkpoint: its -inf entries must come back as they are
        "attn_mask": torch.full((4, 4), float("-inf")).triu(1),
    }


def make_expert(base: dict[str, torch.Tensor], seed: int, spread: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    expert = {}
    for name, value in base.items():
        if name == "attn_mask":
            expert[name] = value.clone()
        elif value.is_floating_point():
            noise = torch.randn(value.shape, generator=g) * spread * torch.rand(value.shape, generator=g)
            expert[name] = (value.float() + noise).to(value.dtype)
        else:
            expert[name] = value + seed if value.dtype == torch.int64 else value.clone()  # the base's is kept
    return expert


@pytest.fixture
def checkpoints(tmp_path):
    """Base and experts as state dicts and as files: (base, experts, base_path, expert_paths)."""
    base = make_base()
    experts = [make_expert(base, k, spread=0.05 * (k + 1)) for k in range(NUM_EXPERTS)]
    base_path = tmp_path / "base.safetensors"
    save_file(base, base_path, metadata={"format": "pt"})
    expert_paths = []
    for k, expert in enumerate(experts):
        path = tmp_path / f"expert{k}.safetensors"
        # experts in another key order than the base: the merge must go by name
        save_file(dict(reversed(list(expert.items()))), path)
        expert_paths.append(path)
    return base, experts, base_path, expert_paths


def run_cli(base_path, expert_paths, out, *options) -> int:
    argv = ["merge", "--base", str(base_path), "--experts", *map(str, expert_paths), "--out", str(out),
            "--no-progress", *map(str, options)]
    return cli.main(argv)


def in_memory(method: str, base, experts, options: dict, backend):
    if method == "ta":
        return task_arithmetic(base, experts, backend=backend, **options)
    if method == "ties":
        return ties_merging(base, experts, backend=backend, **options)
    return dare_merging(base, experts, backend=backend, **options)


# (CLI method, CLI options, in-memory options)
CASES = {
    "ta": ("ta", [], {}),
    "ta_weights": ("ta", ["--weights", 0.3, -0.2, 0.9], {"weights": [0.3, -0.2, 0.9]}),
    "ta_one_weight": ("ta", ["--weights", 0.4], {"weights": 0.4}),
    "ta_dare": ("ta", ["--weights", 0.5, "--drop-rate", 0.3, "--seed", 11], {"weights": 0.5, "drop_rate": 0.3,
                                                                          "seed": 11}),
    "ties_tensor": ("ties", ["--density", 0.3, "--scale", 0.8], {"density": 0.3, "scale": 0.8}),
    "ties_default": ("ties", [], {}),
    "ties_model": ("ties", ["--density", 0.25, "--trim-scope", "model", "--weights", 1.0, 0.5, 2.0],
                   {"density": 0.25, "trim_scope": "model", "weights": [1.0, 0.5, 2.0]}),
    "ties_model_dare": ("ties", ["--density", 0.4, "--trim-scope", "model", "--drop-rate", 0.2, "--seed", 5],
                        {"density": 0.4, "trim_scope": "model", "drop_rate": 0.2, "seed": 5}),
    "ties_density_one": ("ties", ["--density", 1.0, "--trim-scope", "model"], {"density": 1.0, "trim_scope": "model"}),
    "dare": ("dare", ["--drop-rate", 0.5, "--seed", 3], {"drop_rate": 0.5, "seed": 3}),
    "dare_weights": ("dare", ["--drop-rate", 0.9, "--weights", 0.2, 0.3, 0.4], {"drop_rate": 0.9,
                                                                                "weights": [0.2, 0.3, 0.4]}),
    "ties_bf16_out": ("ties", ["--density", 0.5, "--dtype", "bfloat16"], {"density": 0.5, "out_dtype": torch.bfloat16}),
    "ta_f32_out": ("ta", ["--dtype", "float32", "--weights", 0.7], {"weights": 0.7, "out_dtype": torch.float32}),
}


def check_equal(merged: dict, expected: dict, *, exact: bool) -> None:
    assert list(merged) == list(expected)  # the base's order
    for name in expected:
        if exact:
            torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0, msg=name)
        else:
            torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_merge_equals_in_memory(checkpoints, tmp_path, case, capsys):
    base, experts, base_path, expert_paths = checkpoints
    method, cli_options, options = CASES[case]
    out = tmp_path / "merged.safetensors"
    assert run_cli(base_path, expert_paths, out, "--method", method, "--backend", "torch", *cli_options) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert str(out) in captured.out and "parameters" in captured.out
    merged = load_file(out)
    check_equal(merged, in_memory(method, base, experts, options, "torch"), exact=True)
    assert merged["num_batches_tracked"].item() == 17 and torch.equal(merged["mask"], base["mask"])
    assert torch.equal(merged["attn_mask"], base["attn_mask"])
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in [base_path, *expert_paths]] + [out.name])


@pytest.mark.parametrize("case", ["ta_dare", "ties_tensor", "ties_model", "dare"])
def test_streamed_merge_equals_in_memory_default_backend(checkpoints, tmp_path, case):
    base, experts, base_path, expert_paths = checkpoints
    method, cli_options, options = CASES[case]
    out = tmp_path / "merged.safetensors"
    assert run_cli(base_path, expert_paths, out, "--method", method, "--device", "cpu", *cli_options) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no fast backend" when the native build is missing
        expected = in_memory(method, base, experts, options, None)
    check_equal(load_file(out), expected, exact=False)


def test_output_metadata(checkpoints, tmp_path):
    _, _, base_path, expert_paths = checkpoints
    out = tmp_path / "m.safetensors"
    assert run_cli(base_path, expert_paths, out, "--method", "ties", "--density", "0.5", "--backend", "torch") == 0
    with SafetensorsReader(out) as reader:
        assert reader.metadata["format"] == "pt"  # the base's metadata is kept
        config = json.loads(reader.metadata["merging_kernels"])
    assert config["method"] == "ties" and config["density"] == 0.5
    assert config["experts"] == [p.name for p in expert_paths]


@pytest.mark.parametrize("case", ["ties_tensor", "ties_model"])
def test_streams_one_tensor_per_model(checkpoints, tmp_path, monkeypatch, case):
    """Reads go tensor by tensor, and at most about one tensor per model is alive at any time."""
    _, _, base_path, expert_paths = checkpoints
    alive: list[weakref.ref] = []
    reads: list[tuple[str, str]] = []
    peak = [0]
    original = SafetensorsReader.get_tensor

    def tracking_get_tensor(self, name):
        tensor = original(self, name)
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(tensor))
        peak[0] = max(peak[0], len(alive))
        reads.append((Path(self.path).name, name))
        return tensor

    monkeypatch.setattr(SafetensorsReader, "get_tensor", tracking_get_tensor)
    method, options, _ = CASES[case]
    assert run_cli(base_path, expert_paths, tmp_path / "m.safetensors", "--method", method, "--backend", "torch",
                   *options) == 0
    models = 1 + NUM_EXPERTS
    num_tensors = len(make_base())
    assert peak[0] <= 2 * models < num_tensors * models
    names = SafetensorsReader(base_path).names
    floats = [n for n in names if make_base()[n].is_floating_point()]
    expected = []
    for name in names:
        expected.append(("base.safetensors", name))
        if name in floats:
            expected += [(f"expert{k}.safetensors", name) for k in range(NUM_EXPERTS)]
    assert reads[-len(expected):] == expected
    selection_passes = 3 if case == "ties_model" else 0  # model scope: three radix-select passes first
    assert len(reads) == len(expected) + selection_passes * len(floats) * models


# --------------------------------------------------------------------------- refusals


def assert_refused(capsys, tmp_path, code: int, out: Path, *needles: str, keep: set[str] | None = None) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("merging-kernels: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists() or (keep is not None and out.name in keep)
    leftovers = {p for p in os.listdir(tmp_path) if p.endswith(".tmp")}
    assert not leftovers, leftovers
    return lines[0]


def rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("problem", ["missing", "extra", "shape", "dtype", "nan", "inf"])
def test_refuses_mismatched_experts(checkpoints, tmp_path, capsys, problem):
    _, _, base_path, expert_paths = checkpoints
    bad = expert_paths[1]
    if problem == "missing":
        rewrite(bad, lambda t: t.pop("layers.0.bias"))
        needles = [str(bad), "'layers.0.bias'"]
    elif problem == "extra":
        rewrite(bad, lambda t: t.update({"lm_head.weight": torch.zeros(2)}))
        needles = [str(bad), "'lm_head.weight'"]
    elif problem == "shape":
        rewrite(bad, lambda t: t.update({"layers.0.weight": torch.zeros(4, 16)}))
        needles = [str(bad), "'layers.0.weight'", "[4, 16]", "[8, 8]"]
    elif problem == "dtype":
        rewrite(bad, lambda t: t.update({"head.weight": t["head.weight"].float()}))
        needles = [str(bad), "'head.weight'", "float32", "float16"]
    else:
        def poison(t):
            t["layers.0.weight"][3, 4] = float("nan") if problem == "nan" else float("inf")
        rewrite(bad, poison)
        needles = [str(bad), "'layers.0.weight'", "NaN or inf"]
    for method in (["--method", "ta"], ["--method", "ties", "--trim-scope", "model"]):
        out = tmp_path / "merged.safetensors"
        code = run_cli(base_path, expert_paths, out, *method, "--backend", "torch")
        assert_refused(capsys, tmp_path, code, out, *needles)


def add_huge_empty_tensor(path: Path) -> None:
    """Add ``huge: shape [0, 10**20]`` (0 bytes, so the offsets still add up; the dimension overflows int64)."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["huge"] = {"dtype": "F32", "shape": [0, 10**20], "data_offsets": [0, 0]}
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + blob[8 + n:])


def write_deeply_nested_header(path: Path) -> None:
    encoded = b"[" * 100_000 + b"]" * 100_000  # used to end in a RecursionError from the JSON decoder
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded)


@pytest.mark.parametrize("problem", ["corrupt", "truncated", "nonexistent", "directory", "empty", "text",
                                     "deeply_nested"])
@pytest.mark.parametrize("role", ["base", "expert"])
def test_refuses_unreadable_files(checkpoints, tmp_path, capsys, problem, role):
    _, _, base_path, expert_paths = checkpoints
    target = base_path if role == "base" else expert_paths[2]
    if problem == "deeply_nested":
        write_deeply_nested_header(target)
    elif problem == "corrupt":
        blob = bytearray(target.read_bytes())
        blob[10:20] = b"\x00garbage\xff\xfe"
        target.write_bytes(bytes(blob))
    elif problem == "truncated":
        target.write_bytes(target.read_bytes()[:-3])
    elif problem == "nonexistent":
        target.unlink()
    elif problem == "directory":
        target.unlink()
        target.mkdir()
    elif problem == "empty":
        target.write_bytes(b"")
    elif problem == "text":
        target.write_text("this is not a checkpoint\n")
    out = tmp_path / "merged.safetensors"
    code = run_cli(base_path, expert_paths, out, "--method", "ta")
    assert_refused(capsys, tmp_path, code, out, str(target), role)


def test_refuses_dimension_beyond_int64(checkpoints, tmp_path, capsys):
    _, _, base_path, expert_paths = checkpoints
    for path in [base_path, *expert_paths]:  # in every input, so that the architectures still match
        add_huge_empty_tensor(path)
    out = tmp_path / "merged.safetensors"
    code = run_cli(base_path, expert_paths, out, "--method", "ta", "--backend", "torch")  # was a C++ stack trace
    assert_refused(capsys, tmp_path, code, out, str(base_path), "'huge' has invalid shape")


@pytest.mark.parametrize("options, needle", [
    (["--method", "ties", "--density", "0"], "--density"),
    (["--method", "ties", "--density", "1.5"], "--density"),
    (["--method", "ties", "--density", "-0.1"], "--density"),
    (["--method", "ties", "--density", "nan"], "--density"),
    (["--method", "ties", "--density", "abc"], "--density"),
    (["--method", "dare", "--drop-rate", "1"], "--drop-rate"),
    (["--method", "dare", "--drop-rate", "-0.1"], "--drop-rate"),
    (["--method", "ta", "--drop-rate", "inf"], "--drop-rate"),
    (["--method", "dare"], "--drop-rate"),
    (["--method", "ta", "--weights", "1", "2"], "--weights"),
    (["--method", "ta", "--weights", "1", "2", "3", "4"], "--weights"),
    (["--method", "ta", "--weights", "nan"], "--weights"),
    (["--method", "ta", "--density", "0.5"], "--density"),
    (["--method", "dare", "--drop-rate", "0.5", "--scale", "2"], "--scale"),
    (["--method", "ta", "--trim-scope", "model"], "--trim-scope"),
    (["--method", "ties", "--scale", "inf"], "--scale"),
    (["--method", "ta", "--seed", "-1"], "--seed"),
    (["--method", "ta", "--seed", str(2**64)], "--seed"),
    (["--method", "avg"], "--method"),
    (["--method", "ta", "--dtype", "int8"], "--dtype"),
    (["--method", "ta", "--backend", "cuda"], "--backend"),
    (["--method", "ta", "--device", "cuda:0"] if not torch.cuda.is_available() else ["--method", "ta", "--device",
                                                                                     "nonsense"], "device"),
    (["--method", "ta", "--device", "meta"], "--device"),  # used to end in a traceback
    (["--method", "ta", "--device", "xla"], "device xla is not available here"),  # torch builds the device object
    (["--method", "ta", "--device", "privateuseone"], "is not available here"),  # ... and then cannot allocate
    (["--method", "ta", "--weights", "1e39"], "float32's range"),
])
def test_refuses_bad_options(checkpoints, tmp_path, capsys, options, needle):
    _, _, base_path, expert_paths = checkpoints
    out = tmp_path / "merged.safetensors"
    code = run_cli(base_path, expert_paths, out, *options)
    assert_refused(capsys, tmp_path, code, out, needle)


def test_refuses_bad_output_paths(checkpoints, tmp_path, capsys):
    _, _, base_path, expert_paths = checkpoints
    out = tmp_path / "no_such_dir" / "merged.safetensors"
    assert_refused(capsys, tmp_path, run_cli(base_path, expert_paths, out, "--method", "ta"), out, "no_such_dir")
    before = expert_paths[0].read_bytes()
    code = run_cli(base_path, expert_paths, expert_paths[0], "--method", "ta")
    assert_refused(capsys, tmp_path, code, expert_paths[0], str(expert_paths[0]), keep={expert_paths[0].name})
    assert expert_paths[0].read_bytes() == before
    out_dir = tmp_path / "a_directory"
    out_dir.mkdir()
    assert_refused(capsys, tmp_path, run_cli(base_path, expert_paths, out_dir, "--method", "ta"), out_dir,
                   "directory", keep={out_dir.name})


def test_refuses_paths_that_name_no_file_and_merges_that_overflow_the_output_dtype(checkpoints, tmp_path, capsys):
    _, _, base_path, expert_paths = checkpoints
    for out in ("", str(tmp_path / "sub") + os.sep):
        assert run_cli(base_path, expert_paths, out, "--method", "ta") == cli.EXIT_REFUSED
        assert "names no file" in capsys.readouterr().err
    out = tmp_path / "merged.safetensors"
    code = run_cli(base_path, expert_paths, out, "--method", "ta", "--dtype", "float16", "--weights", "1e9")
    assert_refused(capsys, tmp_path, code, out, "overflows float16")  # was written as inf, exit 0
    half_base, half_expert = tmp_path / "b16.safetensors", tmp_path / "e16.safetensors"
    save_file({"w": torch.full((3,), 60000.0).half(), "mask": torch.tensor([0.0, -math.inf]).half()}, half_base)
    save_file({"w": torch.full((3,), 65000.0).half(), "mask": torch.tensor([0.0, -math.inf]).half()}, half_expert)
    code = run_cli(half_base, [half_expert], out, "--method", "ta", "--weights", "2")
    assert_refused(capsys, tmp_path, code, out, "'w': the merge overflows float16",
                   keep={half_base.name, half_expert.name})
    assert run_cli(half_base, [half_expert], out, "--method", "ta", "--weights", "0.5") == cli.EXIT_OK
    merged = load_file(out)  # the mask's -inf is the base's own: kept
    assert torch.equal(merged["mask"], torch.tensor([0.0, -math.inf]).half())
    # a float32 -1e9 mask no expert changed: --dtype float16 makes it -inf, which is the conversion, not the merge
    wide_base, wide_expert = tmp_path / "b32.safetensors", tmp_path / "e32.safetensors"
    save_file({"w": torch.ones(3), "mask": torch.tensor([0.0, -1e9])}, wide_base)
    save_file({"w": torch.full((3,), 2.0), "mask": torch.tensor([0.0, -1e9])}, wide_expert)
    assert run_cli(wide_base, [wide_expert], out, "--method", "ta", "--dtype", "float16") == cli.EXIT_OK
    assert torch.equal(load_file(out)["mask"], torch.tensor([0.0, -math.inf]).half())
    # the same mask merged to +1e9: +inf is the merge's, not the conversion of the base's -inf (was exit 0)
    out.unlink()
    save_file({"w": torch.full((3,), 2.0), "mask": torch.tensor([0.0, 1e9])}, wide_expert)
    code = run_cli(wide_base, [wide_expert], out, "--method", "ta", "--dtype", "float16")
    assert_refused(capsys, tmp_path, code, out, "'mask': the merge overflows float16",
                   keep={wide_base.name, wide_expert.name, half_base.name, half_expert.name})


def test_refusal_keeps_existing_output(checkpoints, tmp_path, capsys):
    _, _, base_path, expert_paths = checkpoints
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"previous result")

    def poison(t):
        t["head.weight"][-1, -1] = float("nan")  # the last merged tensor: fails after the others were written
    rewrite(expert_paths[0], poison)
    code = run_cli(base_path, expert_paths, out, "--method", "ta", "--backend", "torch")
    assert_refused(capsys, tmp_path, code, out, "'head.weight'", str(expert_paths[0]), keep={out.name})
    assert out.read_bytes() == b"previous result"


def test_refuses_model_scope_on_float64(tmp_path, capsys):
    base = {"w": torch.randn(4, 4, dtype=torch.float64)}
    save_file(base, tmp_path / "b.safetensors")
    save_file({"w": base["w"] + 0.1}, tmp_path / "e.safetensors")
    out = tmp_path / "m.safetensors"
    code = run_cli(tmp_path / "b.safetensors", [tmp_path / "e.safetensors"], out, "--method", "ties",
                   "--trim-scope", "model")
    assert_refused(capsys, tmp_path, code, out, "'w'", "float64")
    # per-tensor trim works on float64 and equals the in-memory method
    code = run_cli(tmp_path / "b.safetensors", [tmp_path / "e.safetensors"], out, "--method", "ties", "--backend",
                   "torch")
    assert code == 0
    torch.testing.assert_close(load_file(out)["w"], ties_merging(base, [{"w": base["w"] + 0.1}],
                                                                 backend="torch")["w"], rtol=0, atol=0)


def test_refuses_unavailable_backend(checkpoints, tmp_path, capsys, monkeypatch):
    # triton runs CPU tensors only under TRITON_INTERPRET=1, so it is unavailable here whatever is installed
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, _, base_path, expert_paths = checkpoints
    out = tmp_path / "m.safetensors"
    code = run_cli(base_path, expert_paths, out, "--method", "ta", "--backend", "triton", "--device", "cpu")
    assert_refused(capsys, tmp_path, code, out, "triton")


# --------------------------------------------------------------------------- progress, help, entry points


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("no_progress", [False, True])
def test_progress_bar_can_be_disabled(checkpoints, tmp_path, monkeypatch, no_progress):
    pytest.importorskip("tqdm")
    _, _, base_path, expert_paths = checkpoints
    err = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["merge", "--base", str(base_path), "--experts", *map(str, expert_paths), "--out",
            str(tmp_path / "m.safetensors"), "--method", "ties", "--trim-scope", "model", "--backend", "torch"]
    assert cli.main(argv + (["--no-progress"] if no_progress else [])) == 0
    if no_progress:
        assert err.getvalue() == ""
    else:
        assert "merging" in err.getvalue() and "thresholds" in err.getvalue()


def test_no_progress_bar_when_not_a_terminal(checkpoints, tmp_path, capsys):
    _, _, base_path, expert_paths = checkpoints
    argv = ["merge", "--base", str(base_path), "--experts", *map(str, expert_paths), "--out",
            str(tmp_path / "m.safetensors"), "--method", "ta", "--backend", "torch"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""


def test_help_version_and_usage_errors(capsys):
    assert cli.main(["--help"]) == 0
    assert "merge" in capsys.readouterr().out
    assert cli.main(["merge", "--help"]) == 0
    assert "--trim-scope" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert cli.main([]) == 2
    assert cli.main(["merge", "--base", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("merging-kernels: error:") for line in err)


def test_info_command(checkpoints, capsys):
    _, _, base_path, _ = checkpoints
    assert cli.main(["info", str(base_path)]) == 0
    out = capsys.readouterr().out
    assert "layers.0.weight" in out and "bfloat16" in out and "format: pt" in out
    assert cli.main(["info", str(base_path) + ".missing"]) == 2


@pytest.mark.parametrize("problem, needle", [("deeply_nested", "nested too deeply"),
                                             ("huge_dimension", "'huge' has invalid shape")])
def test_info_refuses_malformed_headers(checkpoints, capsys, problem, needle):
    _, _, base_path, _ = checkpoints
    (write_deeply_nested_header if problem == "deeply_nested" else add_huge_empty_tensor)(base_path)
    assert cli.main(["info", str(base_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(base_path) in err[0] and needle in err[0], err


def test_python_dash_m_entry_point(checkpoints, tmp_path):
    base, experts, base_path, expert_paths = checkpoints
    out = tmp_path / "m.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "merging_kernels", "merge", "--base", str(base_path), "--experts",
         *map(str, expert_paths), "--method", "dare", "--drop-rate", "0.5", "--backend", "torch", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "DARE" in result.stdout and str(out) in result.stdout
    check_equal(load_file(out), dare_merging(base, experts, drop_rate=0.5, backend="torch"), exact=True)


def test_total_parameters_in_summary(checkpoints, tmp_path, capsys):
    base, _, base_path, expert_paths = checkpoints
    assert run_cli(base_path, expert_paths, tmp_path / "m.safetensors", "--method", "ta", "--backend", "torch") == 0
    total = sum(math.prod(t.shape) for t in base.values())
    assert f"({total:,} parameters)" in capsys.readouterr().out
