"""A strict reader and writer for the safetensors format, with bfloat16 and clear errors.

Our own rather than the safetensors package's numpy API: that one has no bfloat16 (common in
half-precision checkpoints) and reports a truncated file without naming the tensor.
Format: 8-byte little-endian header length, JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import struct

import ml_dtypes
import numpy as np
from numpy.lib.array_utils import byte_bounds

from sdjax import storage

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, corrupt or does not fit the model."""


class _ReadOnlyMapping(mmap.mmap):
    """A file mapped by read_safetensors (read-only, shared): the only mappings release_pages touches."""


def _read_header(path: str) -> tuple[dict, int, int]:
    """(header without __metadata__ checked to be a JSON object, its length, the file's size) of a
    .safetensors file, local or remote (only the header's bytes are read)."""
    try:
        size = storage.size(path)
    except OSError as e:  # FileNotFoundError, PermissionError, a store's own errors
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (header_len,) = struct.unpack("<Q", storage.read_range(path, 0, 8))
    if 8 + header_len > size:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of {header_len} bytes "
                              f"in a file of {size})")
    try:
        header = json.loads(storage.read_range(path, 8, 8 + header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, header_len, size


def _tensors(path: str, header: dict, buffer, data_start: int, available: int) -> dict[str, np.ndarray]:
    """The tensors `header` describes as views of `buffer` (whose data section starts at `data_start` and
    holds `available` bytes), every entry checked."""
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for tensor {name!r}: {info!r}") from None
        if end - start != math.prod(shape) * dtype.itemsize or start < 0:
            raise CheckpointError(f"{path}: corrupt safetensors entry for tensor {name!r}: "
                                  f"offsets {start}..{end} do not fit shape {shape} of {info['dtype']}")
        if end > available:
            raise CheckpointError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte {end} "
                                  f"of the data but the file holds {available}")
        raw = (np.frombuffer(buffer, np.uint8, count=end - start, offset=data_start + start) if end > start
               else np.zeros(0, np.uint8))
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as read-only numpy arrays: of a local file memory-mapped, not
    copied (see `release_pages`); of a remote one (gs://...) views into the whole file, read once into
    memory in large concurrent requests (sdjax.storage.read_bytes)."""
    header, header_len, size = _read_header(path)
    data_start = 8 + header_len
    if storage.is_remote(path):
        try:
            data = storage.read_bytes(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        buffer = memoryview(data).toreadonly()  # read-only views, as the mapping's are
        return _tensors(path, header, buffer, data_start, len(buffer) - data_start)
    with open(path, "rb") as f:
        mapped = _ReadOnlyMapping(f.fileno(), 0, access=mmap.ACCESS_READ) if size > data_start else None
    return _tensors(path, header, mapped, data_start, size - data_start)


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` strings of a .safetensors file's header ({} where it has none); reads only the
    header, also of a remote file."""
    metadata = _read_header(path)[0].get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors metadata (not a JSON object)")
    return {str(k): str(v) for k, v in metadata.items()}


def mapping_of(array: np.ndarray) -> mmap.mmap | None:
    """The file mapping of read_safetensors that `array` views, or None for any other array."""
    owner = array
    while isinstance(owner, (np.ndarray, memoryview)):
        owner = owner.obj if isinstance(owner, memoryview) else owner.base
    return owner if isinstance(owner, _ReadOnlyMapping) else None


def release_pages(array: np.ndarray) -> None:
    """Gives back the memory pages that `array`, a view of a tensor from `read_safetensors`, has read in.
    Its values stay readable (the kernel maps them in again from the file on access); for any other array
    this does nothing. A loader that moves tensors onto a device one by one calls it after each, so the
    process does not hold the whole file's pages beside the placed copy until the last tensor is done."""
    owner = mapping_of(array)
    if owner is None or array.size == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return
    low, high = byte_bounds(array)
    origin = np.frombuffer(owner, np.uint8, count=1).ctypes.data
    # Only whole pages inside the tensor: the ones at its ends may hold a neighbour's bytes.
    start = -(-(low - origin) // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (high - origin) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        try:
            owner.madvise(mmap.MADV_DONTNEED, start, end - start)
        except OSError:  # e.g. locked pages: they stay resident, and loading goes on
            pass


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors (any of DTYPES) to `path` in key order, with `{"format": "pt"}` metadata by default."""
    header: dict = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    arrays, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        array = array if array.flags.c_contiguous else array.copy()  # (ascontiguousarray makes 0-d arrays 1-d)
        if array.dtype not in _NAMES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        arrays.append(array)
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for array in arrays:
            f.write(array.tobytes())
