"""A minimal, streaming reader and writer of the safetensors format.

Merging a large model must never hold whole checkpoints in memory, so this
module reads and writes one tensor at a time, and depends on nothing but
torch (the ``safetensors`` package is not needed; the files are
interchangeable with it).

The format (https://github.com/huggingface/safetensors):

* 8 bytes: N, the header length, unsigned little-endian;
* N bytes: a UTF-8 JSON object ``{name: {"dtype": "F32", "shape": [2, 3],
  "data_offsets": [begin, end]}, ...}`` with an optional ``"__metadata__"``
  entry (a string -> string map), padded with spaces;
* the data: each tensor's elements, row-major and little-endian, at
  ``[begin, end)`` relative to the end of the header. The tensors cover
  the data exactly, without holes or overlaps.

:class:`SafetensorsReader` validates all of that on open (a ``ValueError``
naming the file otherwise) and loads tensors one at a time;
:class:`SafetensorsWriter` is told the names, dtypes and shapes up front,
takes the tensors one by one in that order and writes them into a temporary
file next to the destination, renamed over it only when every tensor has
been written, and deleted on any failure: no partial output is ever left.
It writes the same bytes as ``safetensors.torch.save_file`` does for the
same tensors in the same order (compact JSON, ``__metadata__`` first,
header padded to a multiple of 8 bytes).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors package enforces
INT64_MAX = 2**63 - 1  # torch counts sizes, element counts and bytes in int64
METADATA_KEY = "__metadata__"

# safetensors dtype code -> torch dtype; codes whose torch dtype this torch lacks are left out.
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_code] = getattr(torch, _attr)
_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in _DTYPES.items()}

SUPPORTED_DTYPES: tuple[str, ...] = tuple(_DTYPES)


def dtype_from_code(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code such as ``"BF16"``."""
    try:
        return _DTYPES[code]
    except (KeyError, TypeError):
        raise ValueError(f"unknown safetensors dtype {code!r}; supported: {', '.join(SUPPORTED_DTYPES)}") from None


def code_from_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    try:
        return _CODES[dtype]
    except (KeyError, TypeError):
        raise TypeError(f"dtype {dtype} cannot be stored in safetensors by this module; "
                        f"supported: {', '.join(str(d) for d in _CODES)}") from None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fits_int64(shape: Sequence[int], itemsize: int) -> bool:
    """Whether torch can hold ``shape``: its byte size (hence its element count) fits int64, zeros aside.

    A 0 in the shape makes the true size 0 but torch still multiplies the other dimensions out.
    """
    return math.prod(d for d in shape if d) * itemsize <= INT64_MAX


def _path_arg(path) -> str:
    # os.fspath's own error does not say which argument; open(3) would even open file descriptor 3.
    try:
        return os.fsdecode(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None


def _check_storable(what: str, tensor) -> None:
    """Refuse, before anything touches its data, a value that has no dense bytes to write."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_nested:
        raise TypeError(f"{what} is a nested tensor; only dense tensors can be stored")
    if tensor.layout != torch.strided:
        raise TypeError(f"{what} has layout {tensor.layout}; only dense (torch.strided) tensors can be stored")
    if tensor.is_meta:
        raise ValueError(f"{what} is a meta tensor, which has no data to store")


def _is_utf8(text: str) -> bool:
    """False for a string with a lone surrogate: JSON's "\\ud800" decodes to one, but UTF-8 cannot hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class TensorInfo(NamedTuple):
    """One header entry: the tensor's name, torch dtype, shape and byte range in the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


# --------------------------------------------------------------------------- reading


class SafetensorsReader:
    """An open safetensors file: its header, validated, and tensors loaded one at a time.

    >>> with SafetensorsReader("model.safetensors") as f:   # doctest: +SKIP
    ...     for name in f.names:
    ...         tensor = f.get_tensor(name)

    ``names`` lists the tensors in the order of their data in the file (the
    cheapest order to read them in). Each :meth:`get_tensor` reads that
    tensor's bytes from the file into a new CPU tensor; nothing else is kept.
    Raises ``OSError`` when the file cannot be opened and ``ValueError``
    (naming the file) when it is not a valid safetensors file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _path_arg(path)
        self._file = open(self.path, "rb", buffering=0)  # tensors are read straight into their memory
        try:
            self._parse_header()
        except BaseException:
            self._file.close()
            raise

    # -- header

    def _fail(self, reason: str) -> ValueError:
        return ValueError(f"{self.path}: not a valid safetensors file: {reason}")

    def _parse_header(self) -> None:
        f = self._file
        file_size = os.fstat(f.fileno()).st_size
        prefix = _read_exact(f, 8)
        if len(prefix) < 8:
            raise self._fail(f"the file has {file_size} bytes, fewer than the 8 of the header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise self._fail(f"header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if 8 + header_len > file_size:
            raise self._fail(f"header length {header_len} runs past the end of the file ({file_size} bytes; "
                             "truncated?)")
        raw = _read_exact(f, header_len)
        if len(raw) != header_len:
            raise self._fail("the header could not be read completely (truncated?)")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"the header is not UTF-8 JSON ({exc})") from None
        except _DuplicateKey as exc:
            raise self._fail(f"the header names {exc.args[0]!r} twice") from None
        except RecursionError:  # e.g. "[[[[...": no valid header nests beyond an entry's lists
            raise self._fail("the header's JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise self._fail(f"the header is a JSON {type(header).__name__}, not an object")

        metadata = header.pop(METADATA_KEY, None)
        if metadata is not None:
            if not isinstance(metadata, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise self._fail(f"{METADATA_KEY} must be an object mapping strings to strings")
            if not all(_is_utf8(k) and _is_utf8(v) for k, v in metadata.items()):
                raise self._fail(f"{METADATA_KEY} holds a string that is not valid Unicode (a lone surrogate)")
        self.metadata: dict[str, str] | None = metadata
        self._data_start = 8 + header_len
        data_size = file_size - self._data_start

        infos = []
        for name, entry in header.items():
            infos.append(self._parse_entry(name, entry, data_size))
        infos.sort(key=lambda info: (info.begin, info.end))
        position = 0
        for info in infos:
            if info.begin != position:
                what = "overlaps the previous tensor" if info.begin < position else "leaves a gap before it"
                raise self._fail(f"tensor {info.name!r} starts at byte {info.begin}, which {what} (expected "
                                 f"{position})")
            position = info.end
        if position != data_size:
            raise self._fail(f"the tensors cover {position} bytes of data but the file holds {data_size} "
                             "(trailing bytes)")
        self._infos: dict[str, TensorInfo] = {info.name: info for info in infos}

    def _parse_entry(self, name: str, entry, data_size: int) -> TensorInfo:
        if not _is_utf8(name):
            raise self._fail(f"tensor name {name!r} is not valid Unicode (it holds a lone surrogate)")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise self._fail(f"entry {name!r} must be an object with exactly dtype, shape and data_offsets")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in _DTYPES:
            raise self._fail(f"tensor {name!r} has unknown dtype {code!r} (supported: {', '.join(SUPPORTED_DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= INT64_MAX for d in shape):
            raise self._fail(f"tensor {name!r} has invalid shape {shape!r}")
        dtype = _DTYPES[code]
        if not _fits_int64(shape, _itemsize(dtype)):
            raise self._fail(f"tensor {name!r} of dtype {code} and shape {shape} is too large for torch "
                             "(its size overflows int64)")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)):
            raise self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if end < begin:
            raise self._fail(f"tensor {name!r} has data_offsets {offsets} with end before begin")
        if end > data_size:
            raise self._fail(f"tensor {name!r} has data_offsets {offsets} past the end of the data "
                             f"({data_size} bytes; truncated?)")
        expected = math.prod(shape) * _itemsize(dtype)
        if end - begin != expected:
            raise self._fail(f"tensor {name!r} of dtype {code} and shape {shape} needs {expected} bytes, "
                             f"its data_offsets {offsets} span {end - begin}")
        return TensorInfo(name, dtype, tuple(shape), begin, end)

    # -- queries

    @property
    def names(self) -> list[str]:
        """Tensor names, in the order of their data in the file."""
        return list(self._infos)

    def keys(self) -> list[str]:
        return self.names

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def info(self, name: str) -> TensorInfo:
        if not isinstance(name, str):
            raise TypeError(f"tensor names are strings, got {type(name).__name__}")
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    # -- loading

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor into a new (writable, contiguous) CPU tensor."""
        info = self.info(name)
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            if self._file.closed:
                raise ValueError(f"{self.path}: the reader is closed")
            self._file.seek(self._data_start + info.begin)
            view = memoryview(raw.numpy())
            done = 0
            while done < info.nbytes:
                got = self._file.readinto(view[done:])
                if not got:
                    raise self._fail(f"tensor {name!r} ends early: the file was truncated after it was opened")
                done += got
        return _from_little_endian(raw, info.dtype).reshape(info.shape)

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, by name (the whole file in memory: for small files and tests)."""
        return {name: self.get_tensor(name) for name in self.names}

    # -- lifetime

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsReader({self.path!r}, {len(self)} tensors)"


def _read_exact(f, size: int) -> bytes:
    """Up to ``size`` bytes (fewer only at the end of the file): raw reads may return short."""
    chunks, remaining = [], size
    while remaining > 0:
        chunk = f.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _from_little_endian(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret a flat uint8 tensor as ``dtype`` (bfloat16 and bool included)."""
    size = _itemsize(dtype)
    if size > 1 and sys.byteorder != "little":
        raw = torch.from_numpy(raw.numpy().view(f"<u{size}").astype(f"=u{size}").view("u1").copy())
    return raw.view(dtype)


def _to_little_endian_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    array = flat.numpy()
    size = tensor.element_size()
    if size > 1 and sys.byteorder != "little":
        array = array.view(f"=u{size}").astype(f"<u{size}").view("u1")
    return memoryview(array)


def load_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (in memory; prefer :class:`SafetensorsReader` for large files)."""
    with SafetensorsReader(path) as reader:
        return reader.load_all()


def read_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    with SafetensorsReader(path) as reader:
        return reader.metadata


# --------------------------------------------------------------------------- writing


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time, atomically.

    ``specs`` declares every tensor up front as ``(name, dtype, shape)``, in
    the order the data will be written. The header goes out first, then
    :meth:`write` takes each tensor in that order (its name, dtype and shape
    are checked against the declaration). All of it goes into a temporary
    file in the destination's directory; :meth:`close` (or leaving the
    ``with`` block normally) checks that every tensor was written and renames
    it over ``path``; :meth:`abort` (or an exception inside the ``with``
    block, or any error while writing) deletes it. ``path`` is never left
    partially written.

    >>> specs = [("w", torch.float32, (2, 3)), ("b", torch.float32, (3,))]
    >>> with SafetensorsWriter("out.safetensors", specs) as w:   # doctest: +SKIP
    ...     w.write("w", torch.zeros(2, 3))
    ...     w.write("b", torch.zeros(3))
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = _path_arg(path)
        self._specs = self._check_specs(specs)
        header: dict[str, object] = {}
        if metadata is not None:
            if not isinstance(metadata, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise TypeError("metadata must map strings to strings")
            for key, value in metadata.items():
                if not (_is_utf8(key) and _is_utf8(value)):
                    raise ValueError(f"metadata[{key!r}] is not valid Unicode (it holds a lone surrogate)")
            header[METADATA_KEY] = dict(metadata)
        offset = 0
        for name, dtype, shape in self._specs:
            nbytes = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self._total_bytes = offset
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self._file = None
        self._tmp_path: str | None = None
        self._next = 0
        self._done = False
        directory = os.path.dirname(os.path.abspath(self.path))
        if not self.path:
            raise FileNotFoundError("path is empty; give a file name")
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path} is a directory")
        if not os.path.basename(self.path):  # "new_dir/": the rename would fail only after all the writing
            raise IsADirectoryError(f"{self.path} names a directory, not a file")
        self._file, self._tmp_path = _create_temp(directory, os.path.basename(self.path))
        try:
            self._file.write(struct.pack("<Q", len(encoded)))
            self._file.write(encoded)
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _check_specs(specs) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        checked, seen = [], set()
        if isinstance(specs, (str, bytes)) or not isinstance(specs, Iterable):
            raise TypeError(f"specs must be an iterable of (name, dtype, shape), got {type(specs).__name__}")
        for entry in specs:
            try:
                name, dtype, shape = entry
            except (TypeError, ValueError):
                raise TypeError(f"each spec must be (name, dtype, shape), got {entry!r}") from None
            if not isinstance(name, str) or not name:
                raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
            if not _is_utf8(name):
                raise ValueError(f"tensor name {name!r} is not valid Unicode (it holds a lone surrogate)")
            if name == METADATA_KEY:
                raise ValueError(f"{METADATA_KEY!r} is reserved and cannot name a tensor")
            if name in seen:
                raise ValueError(f"tensor {name!r} is declared twice")
            seen.add(name)
            try:
                code_from_dtype(dtype)
            except TypeError as exc:
                raise TypeError(f"tensor {name!r}: {exc}") from None
            if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
                raise TypeError(f"tensor {name!r}: shape must be a sequence of ints, got {type(shape).__name__}")
            shape = tuple(shape)
            if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= INT64_MAX for d in shape):
                raise ValueError(f"tensor {name!r} has invalid shape {shape!r}")
            if not _fits_int64(shape, _itemsize(dtype)):
                raise ValueError(f"tensor {name!r} of dtype {dtype} and shape {shape} is too large for torch "
                                 "(its size overflows int64)")
            checked.append((name, dtype, shape))
        return checked

    @property
    def remaining(self) -> list[str]:
        """Names still to be written, in order."""
        return [name for name, _, _ in self._specs[self._next:]]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next declared tensor (any device; it is copied to CPU as needed)."""
        if self._file is None:
            raise ValueError(f"{self.path}: the writer is closed")
        try:
            if self._next >= len(self._specs):
                raise ValueError(f"{self.path}: all {len(self._specs)} declared tensors are written; got extra "
                                 f"tensor {name!r}")
            want_name, want_dtype, want_shape = self._specs[self._next]
            if name != want_name:
                raise ValueError(f"{self.path}: expected tensor {want_name!r} next (in declaration order), "
                                 f"got {name!r}")
            _check_storable(f"{self.path}: tensor {name!r}", tensor)
            if tensor.dtype != want_dtype:
                raise TypeError(f"{self.path}: tensor {name!r} has dtype {tensor.dtype}, declared {want_dtype}")
            if tuple(tensor.shape) != want_shape:
                raise ValueError(f"{self.path}: tensor {name!r} has shape {tuple(tensor.shape)}, declared "
                                 f"{want_shape}")
            if tensor.numel():
                self._file.write(_to_little_endian_bytes(tensor))
            self._next += 1
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        """Finish: check every tensor was written, flush to disk and rename into place."""
        if self._done:
            return
        if self._file is None:
            raise ValueError(f"{self.path}: the writer was aborted")
        try:
            if self._next != len(self._specs):
                missing = self.remaining
                raise ValueError(f"{self.path}: {len(missing)} declared tensor(s) were not written "
                                 f"({', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''})")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._file = None
        self._done = True

    def abort(self) -> None:
        """Discard everything written (the destination is left as it was)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._tmp_path is not None and not self._done:
            try:
                os.unlink(self._tmp_path)
            except FileNotFoundError:
                pass
            self._tmp_path = None

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        # An abandoned writer never leaves its temporary file behind.
        try:
            if not self._done:
                self.abort()
        except Exception:
            pass


def _create_temp(directory: str, base: str):
    """A new file ``.<base>.<random>.tmp`` in ``directory``, created with the usual permissions (umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp_path = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp_path, flags, 0o666)
        except FileExistsError:
            continue
        except (FileNotFoundError, NotADirectoryError) as exc:  # name the directory, not our temporary file
            raise type(exc)(exc.errno, exc.strerror, directory) from None
        return os.fdopen(fd, "wb"), tmp_path
    raise FileExistsError(f"could not create a temporary file in {directory}")


def save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
              metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict to ``path`` atomically (tensors in the mapping's order)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to torch.Tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        _check_storable(f"tensors[{name!r}]", t)
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with SafetensorsWriter(path, specs, metadata=metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


__all__ = [
    "SUPPORTED_DTYPES",
    "SafetensorsReader",
    "SafetensorsWriter",
    "TensorInfo",
    "code_from_dtype",
    "dtype_from_code",
    "load_file",
    "read_metadata",
    "save_file",
]
