"""Lazy safetensors reading (memory-mapped, one tensor at a time) for sharded release folders.

Parses the format directly (8-byte little-endian header size, JSON header, raw bytes), so bf16
and every other dtype come back as numpy arrays (bf16 via ``ml_dtypes``) without torch.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not match the model (message names it)."""


def read_header(path: str) -> tuple[dict, int]:
    """Returns ``(header without __metadata__, byte offset of the data section)``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > os.path.getsize(path) - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (size {n} exceeds the file)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object "
                              "of tensor names)")
    header.pop("__metadata__", None)
    for key, info in header.items():
        _check_entry(path, key, info)
    return header, 8 + n


def _check_entry(path: str, key: str, info) -> None:
    """One header entry: ``{"dtype": str, "shape": [ints >= 0], "data_offsets": [begin <= end]}``."""
    def bad(what):
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} {what}")
    if not isinstance(info, dict):
        raise bad(f"is a JSON {type(info).__name__}, not an object")
    if not isinstance(info.get("dtype"), str):
        raise bad(f"has no dtype string (dtype {info.get('dtype')!r})")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r} (a list of integers >= 0)")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r} (two integers, 0 <= begin <= end)")


class SafetensorsReader:
    """All tensors of a folder: ``model.safetensors.index.json`` + shards, or ``model.safetensors``.

    ``shape(key)``/``dtype(key)`` read headers only; ``get(key)`` returns a numpy array backed by a
    memory map of the shard (copy it before mutating)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            self.source = index
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:  # TypeError: the JSON is not an object
                raise CheckpointError(f"{index}: cannot read weight_map: {type(e).__name__}: {e}") from e
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names, got "
                                      f"{type(weight_map).__name__}")
        elif os.path.exists(single):
            self.source = single
            weight_map = {k: "model.safetensors" for k in read_header(single)[0]}
        else:
            raise CheckpointError(f"{directory}: neither model.safetensors.index.json nor model.safetensors found")
        self._where = dict(weight_map)
        self._headers: dict[str, tuple[dict, int]] = {}
        self._maps: dict[str, np.memmap] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def _entry(self, key: str) -> tuple[str, dict, int]:
        if key not in self._where:
            raise CheckpointError(f"tensor {key!r} is missing from {self.source}")
        fname = self._where[key]
        path = os.path.join(self.directory, fname)
        if fname not in self._headers:
            if not os.path.exists(path):
                raise CheckpointError(f"tensor {key!r}: shard {path} named in {self.source} does not exist")
            self._headers[fname] = read_header(path)
        header, offset = self._headers[fname]
        if key not in header:
            raise CheckpointError(f"tensor {key!r}: {self.source} maps it to {path}, which does not hold it")
        return path, header[key], offset

    def shape(self, key: str) -> tuple:
        return tuple(self._entry(key)[1]["shape"])

    def dtype(self, key: str) -> np.dtype:
        path, info, _ = self._entry(key)
        if info.get("dtype") not in DTYPES:
            raise CheckpointError(f"tensor {key!r} in {path}: unsupported dtype {info.get('dtype')}")
        return np.dtype(DTYPES[info["dtype"]])

    def file(self, key: str) -> str:
        """The shard that holds ``key``."""
        return self._entry(key)[0]

    def get(self, key: str) -> np.ndarray:
        path, info, offset = self._entry(key)
        dtype = self.dtype(key)
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise CheckpointError(f"tensor {key!r} in {path}: {end - start} bytes for shape {info['shape']} "
                                  f"{info['dtype']}")
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        buf = self._maps[path]
        if offset + end > buf.shape[0]:
            raise CheckpointError(f"tensor {key!r} in {path}: file is truncated")
        return buf[offset + start: offset + end].view(dtype).reshape(info["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Writes a safetensors file (any numpy / ml_dtypes dtype in :data:`DTYPES`) atomically."""
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    header, offset, arrays = {}, 0, []
    for key, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in names:
            raise CheckpointError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
