"""Read a (possibly sharded) safetensors checkpoint one tensor at a time.

Data flow: `SafetensorsCheckpoint(dir)` finds the shard files (from
model.safetensors.index.json when present, else every *.safetensors), parses each file's
JSON header once (name -> dtype, shape, byte range) and checks that the file really holds
the bytes its header promises, so a truncated download fails up front with the file named.
`get(name)` then reads exactly that tensor's bytes with a plain positioned read.

Why not `safetensors.safe_open`: it memory-maps the shard, and every page a conversion
touches stays mapped (and counted in the process's RSS) until the handle closes, so reading
a whole model through open handles costs a model's worth of RSS on top of the output. A
positioned read allocates only the tensor itself. The format is simple enough (8-byte
little-endian header length, JSON header, raw row-major data) that the reader is short.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read: truncated, corrupt or missing."""


@dataclass(frozen=True)
class TensorInfo:
    path: str
    """Shard file holding the tensor."""
    dtype: str
    """safetensors dtype tag, e.g. 'BF16'."""
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parse one file's header; raise SafetensorsError naming the file if it is cut short."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes).")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise SafetensorsError(
                f"{path}: truncated safetensors file (header of {header_len} bytes, "
                f"file has {size})."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: corrupt safetensors header ({e}).") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    infos, data_end = {}, 0
    for name, meta in header.items():
        begin, end = meta["data_offsets"]
        infos[name] = TensorInfo(
            path, meta["dtype"], tuple(meta["shape"]), data_start + begin, end - begin
        )
        data_end = max(data_end, end)
    if data_start + data_end > size:
        raise SafetensorsError(
            f"{path}: truncated safetensors file (header promises "
            f"{data_start + data_end} bytes, file has {size})."
        )
    return infos


def _shard_files(model_dir: str) -> list[str]:
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, n) for n in names]
        for path in files:
            if not os.path.isfile(path):
                raise SafetensorsError(f"{path}: listed in {index_path} but missing.")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise SafetensorsError(f"{model_dir}: no *.safetensors files.")
    return files


class SafetensorsCheckpoint:
    """Tensor names and shapes of a checkpoint dir, and tensor-at-a-time reads."""

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = os.fspath(model_dir)
        self.files = _shard_files(self.model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            self.tensors.update(read_header(path))

    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.tensors.get(name)
        return info.shape if info else None

    def get(self, name: str) -> np.ndarray:
        """Read one tensor into a fresh host array (its own dtype, no conversion)."""
        info = self.tensors[name]
        if info.dtype not in SAFETENSORS_DTYPES:
            raise SafetensorsError(f"{info.path}: tensor {name} has unsupported dtype {info.dtype}")
        dtype = np.dtype(SAFETENSORS_DTYPES[info.dtype])
        out = np.empty(info.shape, dtype)
        if out.nbytes != info.nbytes:
            raise SafetensorsError(
                f"{info.path}: tensor {name} spans {info.nbytes} bytes, but its shape "
                f"{info.shape} and dtype {info.dtype} need {out.nbytes}."
            )
        with open(info.path, "rb") as f:
            f.seek(info.offset)
            if f.readinto(out.reshape(-1).view(np.uint8)) != info.nbytes:
                raise SafetensorsError(f"{info.path}: short read of tensor {name}.")
        return out


_DTYPE_TAGS = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


def write_safetensors(
    path: str,
    specs: dict[str, tuple[tuple[int, ...], np.dtype]],
    make: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time by `make(name)`.

    `specs` (name -> shape, dtype) fixes the header before any data exists, so a file of
    any size is written holding only one tensor in memory. Handles bfloat16 (ml_dtypes),
    which safetensors' own numpy writer does not.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _DTYPE_TAGS[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format recommends 8-byte aligned data
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, dtype) in specs.items():
            array = np.ascontiguousarray(make(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{name}: made shape {array.shape}, declared {tuple(shape)}")
            f.write(array.reshape(-1).view(np.uint8).data)


def save_file(tensors: dict[str, np.ndarray], path: str) -> None:
    """safetensors.numpy.save_file for in-memory arrays, bfloat16 included."""
    specs = {k: (v.shape, v.dtype) for k, v in tensors.items()}
    write_safetensors(path, specs, tensors.__getitem__)
