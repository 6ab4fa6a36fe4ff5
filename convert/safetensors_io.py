"""A minimal, streaming safetensors reader and writer (numpy only).

Why not the `safetensors` package: its numpy API cannot hand out bfloat16 without torch, and `load_file`
materialises a whole file. Here a header is parsed on its own (8-byte little-endian length + JSON), every
entry is checked against the file size before any data is touched, and tensors are read as zero-copy views
of a read-only memory map, so a caller can copy them one at a time into preallocated arrays.

File layout (https://github.com/huggingface/safetensors):
    u64 little-endian N | N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}
    | data (offsets relative to the byte after the header)
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import pathlib
import reprlib
import struct
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from convert.errors import CheckpointError

# safetensors dtype codes we can read and write. Integer and float8 tensors do not occur in this model:
# they are rejected by name rather than misread.
CODE_TO_DTYPE: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
DTYPE_TO_CODE: dict[np.dtype, str] = {dtype: code for code, dtype in CODE_TO_DTYPE.items()}

# The reference implementation refuses headers above 100 MiB; a larger value means a corrupt length field.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Byte alignment the writer gives every tensor it can (a cache line; enough for any SIMD load).
ALIGN = 64

if sys.byteorder != "little":  # bfloat16 has no explicit byte order in numpy: views would be misread
    raise ImportError("convert.safetensors_io assumes a little-endian host")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    name: str
    path: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of one safetensors file.

    Returns (tensors by name, `__metadata__`). Raises `CheckpointError` naming the file when it is
    truncated or corrupt: header length past the end of the file, bad JSON, `__metadata__` that is not a
    mapping of strings to strings, an unknown dtype, a shape that disagrees with its byte range, data offsets
    beyond the end of the file, or tensors that do not tile the data section exactly (see `_check_layout`).
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no 8-byte header length)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file: header size {header_len} is larger than the "
                f"file ({size} bytes)"
            )
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt safetensors file: header size {header_len} exceeds 100 MiB")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file: bad JSON header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file: bad JSON header (not an object)")

    metadata = _metadata(path, header.pop("__metadata__", None))
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            # JSON integers only, as the format says: int() would also read 1.9, true or "4".
            if not all(type(v) is int and v >= 0 for v in (*shape, begin, end)):
                raise ValueError
            shape = tuple(shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: corrupt safetensors file: bad header entry for tensor {name!r}: {entry!r}"
            ) from None
        if code not in CODE_TO_DTYPE:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unknown or unsupported dtype {code!r} "
                f"(supported: {', '.join(CODE_TO_DTYPE)})"
            )
        dtype = CODE_TO_DTYPE[code]
        expected = math.prod(shape) * dtype.itemsize
        if any(d < 0 for d in shape) or begin < 0 or end - begin != expected:
            raise CheckpointError(
                f"{path}: corrupt safetensors file: tensor {name!r} data_offsets [{begin}, {end}] do not hold "
                f"{code} {list(shape)} ({expected} bytes)"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} data_offsets end at byte "
                f"{data_start + end}, beyond the end of the file ({size} bytes)"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
    _check_layout(path, tensors, data_start, size)
    return tensors, metadata


def _metadata(path: pathlib.Path, metadata: Any) -> dict[str, str]:
    """`__metadata__` as the format defines it: absent, null, or an object of string values."""
    if metadata is None:
        return {}
    bad = metadata if not isinstance(metadata, dict) else next(
        ({key: value} for key, value in metadata.items() if not isinstance(value, str)), None
    )
    if bad is not None:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: __metadata__ must map strings to strings, got {reprlib.repr(bad)}"
        )
    return metadata


def _check_layout(path: pathlib.Path, tensors: Mapping[str, TensorInfo], data_start: int, size: int) -> None:
    """Tensors, in offset order, must cover the data section exactly: no overlap (two names reading the same
    bytes), no gap and nothing after the last one (bytes no tensor accounts for). The safetensors library
    refuses all three (`InvalidOffset`, `MetadataIncompleteBuffer`); so do we rather than load such a file."""
    position, last = data_start, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        offsets = f"data_offsets [{info.begin - data_start}, {info.end - data_start}]"
        if info.begin < position:
            raise CheckpointError(
                f"{path}: corrupt safetensors file: tensor {info.name!r} {offsets} overlap tensor {last!r}, "
                f"which ends at {position - data_start}"
            )
        if info.begin > position:
            raise CheckpointError(
                f"{path}: corrupt safetensors file: gap of {info.begin - position} bytes before tensor "
                f"{info.name!r} ({offsets}): tensors must be contiguous from offset 0"
            )
        position, last = info.end, info.name
    if position != size:
        after = "the header" if last is None else f"the last tensor {last!r}"
        raise CheckpointError(
            f"{path}: corrupt safetensors file: {size - position} unexpected bytes after {after} (the data "
            "section must end where the last tensor does)"
        )


class MappedFile:
    """A read-only memory map of one safetensors file handing out zero-copy tensor views.

    `release(info)` drops a tensor's pages from this process once it has been copied: they stay in the
    page cache but stop counting as our resident memory, so streaming a 50 GB checkpoint does not look
    (to a container's memory limit) like holding it twice. Views keep the map alive by reference.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        with open(self.path, "rb") as f:
            # mmap refuses empty files; such a file can only hold empty tensors anyway.
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None

    def view(self, info: TensorInfo) -> np.ndarray:
        count = math.prod(info.shape)
        if self._map is None or count == 0:
            return np.zeros(info.shape, info.dtype)
        return np.frombuffer(self._map, dtype=info.dtype, count=count, offset=info.begin).reshape(info.shape)

    def release(self, info: TensorInfo) -> None:
        if self._map is None or not hasattr(self._map, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.begin - info.begin % mmap.PAGESIZE
        end = min(len(self._map), -(-info.end // mmap.PAGESIZE) * mmap.PAGESIZE)
        if end > start:
            # A read-only file mapping re-reads dropped pages from the file if touched again: always safe.
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> int:
    """Write `tensors` (name -> array-like with .shape/.dtype) to `path`, one tensor in host memory at a time.

    Values may be numpy arrays, jax arrays (fetched to the host one by one) or `LazyTensor`s (built only
    when their turn comes, so a transposed copy exists for one tensor at a time). The file is fsynced before returning.
    Returns the number of data bytes written; `on_tensor(nbytes)` is called after each tensor.
    """
    entries: list[tuple[str, np.dtype, tuple[int, ...]]] = []
    header: dict[str, Any] = {}
    offset = 0
    # The format allows no gaps between tensors, so alignment comes from order: tensors whose size is a
    # multiple of ALIGN go first and all start ALIGN-aligned (the header is padded to match). Loaders that
    # memory-map (transformers does) then hand aligned buffers to the matmul kernels.
    order = sorted(tensors, key=lambda n: math.prod(tensors[n].shape) * np.dtype(tensors[n].dtype).itemsize % ALIGN != 0)
    for name in order:
        value = tensors[name]
        shape, dtype = _shape_dtype(value)
        if dtype not in DTYPE_TO_CODE:
            raise CheckpointError(f"cannot write tensor {name!r}: unsupported dtype {dtype}")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_TO_CODE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        entries.append((name, dtype, shape))
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGN)  # JSON may end in spaces: data starts ALIGN-aligned

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dtype, shape in entries:
            value = tensors[name]
            array = np.ascontiguousarray(np.asarray(value() if callable(value) else value))
            if array.dtype != dtype or array.shape != shape:
                raise CheckpointError(
                    f"tensor {name!r} changed between planning and writing: {dtype}{list(shape)} -> "
                    f"{array.dtype}{list(array.shape)}"
                )
            f.write(array.reshape(-1).view(np.uint8).data)
            if on_tensor is not None:
                on_tensor(array.nbytes)
            del array
        f.flush()
        os.fsync(f.fileno())
    return offset


def _shape_dtype(value: Any) -> tuple[tuple[int, ...], np.dtype]:
    return tuple(int(d) for d in value.shape), np.dtype(value.dtype)


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor known by shape and dtype now and produced by `make()` only when written."""

    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    def __call__(self) -> np.ndarray:
        return self.make()

