"""The streaming safetensors reader/writer: roundtrips, validation, atomic writes, compatibility."""

from __future__ import annotations

import json
import os
import struct
import warnings

import pytest
import torch

from merging_kernels.safetensors_io import (
    SUPPORTED_DTYPES,
    SafetensorsReader,
    SafetensorsWriter,
    code_from_dtype,
    dtype_from_code,
    load_file,
    read_metadata,
    save_file,
)

REQUIRED = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def sample(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a, b.view(torch.uint8)
                       if b.dtype == torch.bool else b)


def header_of(path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), n


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, (code, dtype) in enumerate(REQUIRED.items()):
        tensors[f"t.{code.lower()}"] = sample(dtype, (3, 5), seed + i)
    tensors["scalar"] = sample(torch.float32, (), seed)
    tensors["scalar_bf16"] = sample(torch.bfloat16, (), seed + 1)
    tensors["empty"] = torch.zeros((0, 4))
    tensors["empty_i64"] = torch.zeros((2, 0, 3), dtype=torch.int64)
    tensors["odd"] = sample(torch.int8, (7,), seed)  # breaks 8-byte alignment of what follows
    tensors["after_odd"] = sample(torch.float64, (2, 2), seed)
    return tensors


def test_dtype_codes():
    for code, dtype in REQUIRED.items():
        assert code in SUPPORTED_DTYPES
        assert dtype_from_code(code) == dtype and code_from_dtype(dtype) == code
    with pytest.raises(ValueError, match="unknown safetensors dtype"):
        dtype_from_code("F128")
    with pytest.raises(TypeError):
        code_from_dtype(torch.complex64)


@pytest.mark.parametrize("code", sorted(REQUIRED))
@pytest.mark.parametrize("shape", [(), (0,), (4, 0), (1,), (3, 7), (2, 3, 5)])
def test_roundtrip_every_dtype_and_shape(tmp_path, code, shape):
    tensor = sample(REQUIRED[code], shape, seed=len(shape))
    path = tmp_path / "x.safetensors"
    save_file({"x": tensor}, path)
    with SafetensorsReader(path) as reader:
        assert reader.names == ["x"]
        assert reader.shape("x") == shape and reader.dtype("x") == tensor.dtype
        out = reader.get_tensor("x")
    assert_same(out, tensor)
    assert out.is_contiguous()
    out.add_(1) if out.dtype != torch.bool else None  # writable, owns its memory


def test_roundtrip_state_dict_with_metadata(tmp_path):
    tensors = state()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "ünïcode ✓"})
    with SafetensorsReader(path) as reader:
        assert reader.names == list(tensors)  # data order = write order
        assert len(reader) == len(tensors) and "scalar" in reader and "nope" not in reader
        assert reader.metadata == {"format": "pt", "note": "ünïcode ✓"}
        # one tensor at a time, in any order
        for name in reversed(reader.names):
            assert_same(reader.get_tensor(name), tensors[name])
        with pytest.raises(KeyError, match="nope"):
            reader.get_tensor("nope")
    loaded = load_file(path)
    assert list(loaded) == list(tensors)
    for name in tensors:
        assert_same(loaded[name], tensors[name])
    assert read_metadata(path)["format"] == "pt"
    header, n = header_of(path)
    assert n % 8 == 0 and list(header)[0] == "__metadata__"


def test_no_metadata_and_noncontiguous_inputs(tmp_path):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"transposed": t.t(), "strided": t[:, ::2], "grad": t.clone().requires_grad_()}
    save_file(tensors, tmp_path / "x.safetensors")
    assert read_metadata(tmp_path / "x.safetensors") is None
    loaded = load_file(tmp_path / "x.safetensors")
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value.detach())


def test_writer_streams_in_declared_order(tmp_path):
    path = tmp_path / "out.safetensors"
    specs = [("a", torch.float32, (2, 3)), ("b", torch.bfloat16, [4]), ("c", torch.int64, ())]
    a, b, c = torch.randn(2, 3), torch.randn(4).bfloat16(), torch.tensor(7)
    with SafetensorsWriter(path, specs, metadata={"k": "v"}) as writer:
        assert writer.remaining == ["a", "b", "c"]
        writer.write("a", a)
        assert not path.exists()  # nothing at the destination until the end
        writer.write("b", b)
        writer.write("c", c)
        assert writer.remaining == []
    loaded = load_file(path)
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b) and torch.equal(loaded["c"], c)
    assert os.listdir(tmp_path) == ["out.safetensors"]


def leftovers(directory) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("mistake", ["name", "order", "shape", "dtype", "extra", "missing", "exception", "type"])
def test_writer_failure_leaves_no_file(tmp_path, mistake):
    path = tmp_path / "out.safetensors"
    specs = [("a", torch.float32, (2,)), ("b", torch.float16, (3,))]
    good_a, good_b = torch.zeros(2), torch.zeros(3, dtype=torch.float16)
    expected = {
        "name": (ValueError, "expected tensor 'a'"), "order": (ValueError, "expected tensor 'a'"),
        "shape": (ValueError, "shape"), "dtype": (TypeError, "dtype"), "extra": (ValueError, "extra"),
        "missing": (ValueError, "not written"), "exception": (RuntimeError, "boom"), "type": (TypeError, "Tensor"),
    }[mistake]
    with pytest.raises(expected[0], match=expected[1]):
        with SafetensorsWriter(path, specs) as writer:
            if mistake == "name":
                writer.write("z", good_a)
            elif mistake == "order":
                writer.write("b", good_b)
            elif mistake == "shape":
                writer.write("a", torch.zeros(3))
            elif mistake == "dtype":
                writer.write("a", torch.zeros(2, dtype=torch.float64))
            elif mistake == "type":
                writer.write("a", [0.0, 0.0])
            else:
                writer.write("a", good_a)
                if mistake == "extra":
                    writer.write("b", good_b)
                    writer.write("c", good_b)
                elif mistake == "exception":
                    raise RuntimeError("boom")
                # "missing": leave the block with b unwritten
    assert leftovers(tmp_path) == []


def test_writer_failure_keeps_existing_destination(tmp_path):
    path = tmp_path / "out.safetensors"
    save_file({"old": torch.ones(2)}, path)
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(path, [("new", torch.float32, (2,))]) as writer:
            writer.write("new", torch.zeros(2))
            raise RuntimeError("interrupted")
    assert list(load_file(path)) == ["old"] and leftovers(tmp_path) == ["out.safetensors"]


def test_abandoned_writer_cleans_up(tmp_path):
    writer = SafetensorsWriter(tmp_path / "out.safetensors", [("a", torch.float32, (2,))])
    writer.write("a", torch.zeros(2))
    assert len(leftovers(tmp_path)) == 1  # the temporary file
    writer.abort()
    assert leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        writer.write("a", torch.zeros(2))


def test_writer_rejects_bad_specs(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match="twice"):
        SafetensorsWriter(path, [("a", torch.float32, (1,)), ("a", torch.float32, (1,))])
    with pytest.raises(ValueError, match="reserved"):
        SafetensorsWriter(path, [("__metadata__", torch.float32, (1,))])
    with pytest.raises(TypeError):
        SafetensorsWriter(path, [("a", torch.complex64, (1,))])
    with pytest.raises(ValueError, match="shape"):
        SafetensorsWriter(path, [("a", torch.float32, (-1,))])
    with pytest.raises(TypeError, match="metadata"):
        SafetensorsWriter(path, [("a", torch.float32, (1,))], metadata={"k": 1})
    with pytest.raises(FileNotFoundError):
        SafetensorsWriter(tmp_path / "missing_dir" / "out.safetensors", [])
    assert leftovers(tmp_path) == []


def test_empty_file_roundtrip(tmp_path):
    save_file({}, tmp_path / "e.safetensors")
    with SafetensorsReader(tmp_path / "e.safetensors") as reader:
        assert reader.names == [] and reader.metadata is None


# --------------------------------------------------------------------------- corrupt files


def write_raw(path, header, data: bytes = b"", *, header_len: int | None = None) -> None:
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded) if header_len is None else header_len))
        f.write(encoded)
        f.write(data)


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize("case, match", [
    ("empty", "fewer than the 8"),
    ("short_prefix", "fewer than the 8"),
    ("huge_header", "exceeds the limit"),
    ("header_past_end", "runs past the end"),
    ("not_json", "not UTF-8 JSON"),
    ("not_utf8", "not UTF-8 JSON"),
    ("json_list", "not an object"),
    ("bad_metadata", "__metadata__"),
    ("unknown_dtype", "unknown dtype 'F128'"),
    ("bad_shape", "invalid shape"),
    ("bad_offsets", "invalid data_offsets"),
    ("reversed_offsets", "end before begin"),
    ("offsets_past_end", "past the end of the data"),
    ("size_mismatch", "needs 12 bytes"),
    ("overlap", "overlaps"),
    ("gap", "gap"),
    ("trailing", "trailing bytes"),
    ("extra_key", "exactly dtype, shape and data_offsets"),
    ("duplicate", "twice"),
    ("truncated", "past the end of the data"),
    ("deeply_nested", "nested too deeply"),  # used to be a RecursionError
    ("deeply_nested_entry", "nested too deeply"),
    ("dimension_beyond_int64", "invalid shape"),  # opened, then failed in torch's reshape
    ("bool_dimension", "invalid shape"),
    ("numel_beyond_int64", "too large for torch"),
    ("nbytes_beyond_int64", "too large for torch"),
    ("surrogate_name", "not valid Unicode"),
    ("surrogate_metadata", "not valid Unicode"),
])
def test_corrupt_files_raise_value_error_naming_the_file(tmp_path, case, match):
    path = tmp_path / f"{case}.safetensors"
    data8 = bytes(8)
    if case == "empty":
        path.write_bytes(b"")
    elif case == "short_prefix":
        path.write_bytes(b"\x01\x02\x03")
    elif case == "huge_header":
        write_raw(path, {}, header_len=2**40)
    elif case == "header_past_end":
        write_raw(path, {}, header_len=1000)
    elif case == "not_json":
        write_raw(path, b"{not json}")
    elif case == "not_utf8":
        write_raw(path, b"\xff\xfe{}")
    elif case == "json_list":
        write_raw(path, [1, 2])
    elif case == "bad_metadata":
        write_raw(path, {"__metadata__": {"k": 1}})
    elif case == "unknown_dtype":
        write_raw(path, {"x": entry(dtype="F128")}, data8)
    elif case == "bad_shape":
        write_raw(path, {"x": entry(shape=(-2,))}, data8)
    elif case == "bad_offsets":
        write_raw(path, {"x": entry(offsets=(0,))}, data8)
    elif case == "reversed_offsets":
        write_raw(path, {"x": entry(offsets=(8, 0))}, data8)
    elif case == "offsets_past_end":
        write_raw(path, {"x": entry(offsets=(0, 8))}, bytes(4))
    elif case == "size_mismatch":
        write_raw(path, {"x": entry(shape=(3,), offsets=(0, 8))}, data8)
    elif case == "overlap":
        write_raw(path, {"x": entry(offsets=(0, 8)), "y": entry(offsets=(4, 12))}, bytes(12))
    elif case == "gap":
        write_raw(path, {"x": entry(offsets=(0, 8)), "y": entry(offsets=(12, 20))}, bytes(20))
    elif case == "trailing":
        write_raw(path, {"x": entry()}, bytes(12))
    elif case == "extra_key":
        write_raw(path, {"x": {**entry(), "extra": 1}}, data8)
    elif case == "duplicate":
        write_raw(path, b'{"x":' + json.dumps(entry()).encode() + b',"x":' + json.dumps(entry()).encode() + b"}",
                  data8)
    elif case == "deeply_nested":
        write_raw(path, b"[" * 100_000 + b"]" * 100_000)
    elif case == "deeply_nested_entry":
        write_raw(path, b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    elif case == "dimension_beyond_int64":
        write_raw(path, {"x": entry(shape=(0, 99999999999999999999), offsets=(0, 0))})
    elif case == "bool_dimension":
        write_raw(path, {"x": entry(shape=(True,), offsets=(0, 4))}, bytes(4))
    elif case == "numel_beyond_int64":
        write_raw(path, {"x": entry(dtype="U8", shape=(0, 2**62, 4), offsets=(0, 0))})
    elif case == "nbytes_beyond_int64":
        write_raw(path, {"x": entry(dtype="F64", shape=(2**61, 0), offsets=(0, 0))})
    elif case == "surrogate_name":
        write_raw(path, b'{"\\ud800":' + json.dumps(entry()).encode() + b"}", data8)
    elif case == "surrogate_metadata":
        write_raw(path, {"__metadata__": {"k": "\udc00"}})
    elif case == "truncated":
        save_file(state(), path)
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size - 5)
    with pytest.raises(ValueError, match=match) as info:
        SafetensorsReader(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=match):
        load_file(path)


def test_truncated_at_every_point_is_detected(tmp_path):
    path = tmp_path / "full.safetensors"
    save_file({"a": torch.randn(3), "b": torch.randn(2, 2).bfloat16()}, path, metadata={"format": "pt"})
    blob = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for size in range(len(blob)):
        cut.write_bytes(blob[:size])
        with pytest.raises(ValueError, match="cut.safetensors"):
            SafetensorsReader(cut)


def test_file_truncated_after_open(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(100)}, path)
    with SafetensorsReader(path) as reader:
        with open(path, "r+b") as f:
            f.truncate(100)
        with pytest.raises(ValueError, match="truncated"):
            reader.get_tensor("a")


def test_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        SafetensorsReader(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("path", [3, None, 1.5])
@pytest.mark.parametrize("function", ["SafetensorsReader", "load_file", "read_metadata", "save_file",
                                      "SafetensorsWriter"])
def test_non_path_arguments_raise_type_error(tmp_path, path, function):
    calls = {
        "SafetensorsReader": lambda: SafetensorsReader(path), "load_file": lambda: load_file(path),
        "read_metadata": lambda: read_metadata(path), "save_file": lambda: save_file({"a": torch.ones(2)}, path),
        "SafetensorsWriter": lambda: SafetensorsWriter(path, []),
    }
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got " + type(path).__name__):
        calls[function]()


def test_bytes_paths(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(2)}, os.fsencode(path), metadata={"k": "v"})  # used to fail joining str and bytes
    assert torch.equal(load_file(os.fsencode(path))["a"], torch.ones(2))
    assert read_metadata(os.fsencode(path)) == {"k": "v"}
    with SafetensorsReader(os.fsencode(path)) as reader:
        assert reader.path == str(path)  # messages name the file, not b'...'


def test_save_file_refuses_paths_that_name_no_file(tmp_path):
    tensors = {"a": torch.ones(2)}
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_file(tensors, tmp_path)
    # these used to fail only at the final rename, naming the temporary file
    with pytest.raises(IsADirectoryError, match="names a directory"):
        save_file(tensors, str(tmp_path / "new_dir") + os.sep)
    with pytest.raises(FileNotFoundError, match="empty"):
        save_file(tensors, "")
    with pytest.raises(FileNotFoundError) as info:
        save_file(tensors, tmp_path / "missing_dir" / "x.safetensors")
    assert info.value.filename == str(tmp_path / "missing_dir")
    assert leftovers(tmp_path) == []


def test_reader_tensor_names_must_be_strings(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    with SafetensorsReader(tmp_path / "x.safetensors") as reader:
        with pytest.raises(TypeError, match="tensor names are strings, got list"):
            reader.get_tensor(["a"])
        assert ["a"] not in reader and 0 not in reader and "a" in reader


@pytest.mark.parametrize("case", ["list", "none_value", "list_value", "numpy_value", "sparse_coo", "sparse_csr",
                                  "nested", "meta", "int_key", "surrogate_name", "surrogate_metadata",
                                  "metadata_list", "metadata_int_value"])
def test_save_file_refuses_bad_arguments(tmp_path, case):
    np = pytest.importorskip("numpy")
    good = torch.ones(2)
    tensors, metadata = {"a": good}, None
    expected = {
        "list": (TypeError, "tensors must be a mapping of names to torch.Tensor, got list"),
        "none_value": (TypeError, r"tensors\['a'\] must be a torch.Tensor, got NoneType"),
        "list_value": (TypeError, r"tensors\['a'\] must be a torch.Tensor, got list"),
        "numpy_value": (TypeError, r"tensors\['a'\] must be a torch.Tensor, got ndarray"),
        "sparse_coo": (TypeError, r"tensors\['a'\] has layout torch.sparse_coo"),
        "sparse_csr": (TypeError, r"tensors\['a'\] has layout torch.sparse_csr"),
        "nested": (TypeError, r"tensors\['a'\] is a nested tensor"),
        "meta": (ValueError, r"tensors\['a'\] is a meta tensor"),
        "int_key": (TypeError, "tensor names must be non-empty strings, got 1"),
        "surrogate_name": (ValueError, "tensor name .* not valid Unicode"),
        "surrogate_metadata": (ValueError, r"metadata\['k'\] is not valid Unicode"),
        "metadata_list": (TypeError, "metadata must map strings to strings"),
        "metadata_int_value": (TypeError, "metadata must map strings to strings"),
    }[case]
    if case == "list":
        tensors = [good]
    elif case == "none_value":
        tensors["a"] = None
    elif case == "list_value":
        tensors["a"] = [1.0]
    elif case == "numpy_value":
        tensors["a"] = np.zeros(2)  # float64 is storable: the message must not say the dtype is the problem
    elif case == "sparse_coo":
        tensors["a"] = torch.eye(2).to_sparse()
    elif case == "sparse_csr":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            tensors["a"] = torch.eye(2).to_sparse_csr()
    elif case == "nested":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "nested tensors are a prototype"
            tensors["a"] = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    elif case == "meta":
        tensors["a"] = torch.ones(2, device="meta")
    elif case == "int_key":
        tensors = {1: good}
    elif case == "surrogate_name":
        tensors = {"\ud800": good}
    elif case == "surrogate_metadata":
        metadata = {"k": "\udc00"}
    elif case == "metadata_list":
        metadata = [("k", "v")]
    elif case == "metadata_int_value":
        metadata = {"k": 1}
    with pytest.raises(expected[0], match=expected[1]):
        save_file(tensors, tmp_path / "x.safetensors", metadata=metadata)
    assert leftovers(tmp_path) == []


def test_writer_refuses_tensors_without_dense_data(tmp_path):
    for tensor, error in ((torch.eye(2).to_sparse(), TypeError), (torch.ones(2, 2, device="meta"), ValueError)):
        with pytest.raises(error, match="tensor 'a'"):
            with SafetensorsWriter(tmp_path / "x.safetensors", [("a", torch.float32, (2, 2))]) as writer:
                writer.write("a", tensor)
    assert leftovers(tmp_path) == []


def test_writer_rejects_bad_spec_types(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(TypeError, match="specs must be an iterable of \\(name, dtype, shape\\), got NoneType"):
        SafetensorsWriter(path, None)
    with pytest.raises(TypeError, match="tensor 'a': shape must be a sequence of ints, got int"):
        SafetensorsWriter(path, [("a", torch.float32, 5)])
    with pytest.raises(TypeError, match="tensor 'a': dtype must be a torch.dtype, got str"):
        SafetensorsWriter(path, [("a", "float32", (2,))])
    with pytest.raises(ValueError, match="invalid shape"):
        SafetensorsWriter(path, [("a", torch.float32, (0, 2**64))])
    with pytest.raises(ValueError, match="too large for torch"):
        SafetensorsWriter(path, [("a", torch.float64, (0, 2**61))])
    with pytest.raises(TypeError, match="dtype must be a torch.dtype, got str"):
        code_from_dtype("float32")
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the safetensors package


def test_bytes_identical_to_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = state(seed=3)
    theirs = tmp_path / "theirs.safetensors"
    st.save_file(tensors, theirs, metadata={"format": "pt"})
    header, _ = header_of(theirs)
    order = [name for name in header if name != "__metadata__"]  # their data order
    ours = tmp_path / "ours.safetensors"
    save_file({name: tensors[name] for name in order}, ours, metadata={"format": "pt"})
    assert ours.read_bytes() == theirs.read_bytes()


def test_we_read_safetensors_package_files(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = state(seed=4)
    path = tmp_path / "theirs.safetensors"
    st.save_file(tensors, path, metadata={"format": "pt", "x": "y"})
    loaded = load_file(path)
    assert set(loaded) == set(tensors)
    for name in tensors:
        assert_same(loaded[name], tensors[name])
    assert read_metadata(path) == {"format": "pt", "x": "y"}


def test_safetensors_package_reads_our_files(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = state(seed=5)
    path = tmp_path / "ours.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    loaded = st.load_file(path)
    assert set(loaded) == set(tensors)
    for name in tensors:
        assert_same(loaded[name], tensors[name])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
