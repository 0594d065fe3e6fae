"""Read the key/value metadata of a GGUF file (header only; tensors are not touched).

    read_metadata(path) -> dict[str, value]     scalars, strings and arrays of scalars
    fingerprint(path) -> str                     sha256 of the header (metadata + tensor table):
                                                 identifies a model without reading its weights

GGUF v2/v3 little-endian, as written by llama.cpp's gguf-py. Used for mmproj geometry and
model identity without loading weights.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["fingerprint", "read_metadata"]

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f):
        self.f = f

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        b = self.f.read(n)
        if len(b) != n:
            raise ValueError("truncated GGUF header")
        return struct.unpack(fmt, b)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > 1 << 26:
            raise ValueError("GGUF string too long")
        return self.f.read(n).decode("utf-8", "replace")

    def value(self, t: int, max_array: int):
        if t in _SCALARS:
            return self.take(_SCALARS[t])
        if t == _STRING:
            return self.string()
        if t == _ARRAY:
            et, n = self.take("<I"), self.take("<Q")
            if et in _SCALARS and n > max_array:  # skip big arrays (token tables)
                self.f.seek(n * struct.calcsize(_SCALARS[et]), 1)
                return None
            items = [self.value(et, max_array) for _ in range(n)]
            return None if n > max_array else items
        raise ValueError(f"unknown GGUF value type {t}")


def read_metadata(path: str | Path, max_array: int = 4096) -> dict:
    """Key/value metadata of a GGUF file; arrays longer than ``max_array`` become None."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        r = _Reader(f)
        version = r.take("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version}")
        r.take("<Q")  # tensor count
        n_kv = r.take("<Q")
        out = {}
        for _ in range(n_kv):
            key = r.string()
            out[key] = r.value(r.take("<I"), max_array)
        return out


def fingerprint(path: str | Path) -> str:
    """sha256 (hex) of the GGUF header: metadata and tensor table, not the tensor data."""
    import hashlib

    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        r = _Reader(f)
        r.take("<I")
        n_tensors = r.take("<Q")
        n_kv = r.take("<Q")
        for _ in range(n_kv):
            r.string()
            r.value(r.take("<I"), 0)
        for _ in range(n_tensors):
            r.string()
            n_dims = r.take("<I")
            for _ in range(n_dims):
                r.take("<Q")
            r.take("<I")  # type
            r.take("<Q")  # offset
        end = f.tell()
        f.seek(0)
        return hashlib.sha256(f.read(end)).hexdigest()
