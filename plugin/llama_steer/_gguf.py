"""Read the key/value metadata of a GGUF file (header only; tensors are not touched).

    read_metadata(path) -> dict[str, value]     scalars, strings and arrays of scalars
    fingerprint(path) -> str                     sha256 of the header (metadata + tensor table):
                                                 identifies a model without reading its weights
    check_gguf(path) -> dict                     a whole, readable GGUF (magic, version, header,
                                                 tensor data present) or GGUFError; its metadata

GGUF v2/v3 little-endian, as written by llama.cpp's gguf-py. Used for mmproj geometry and
model identity without loading weights.
"""

from __future__ import annotations

import struct
from pathlib import Path

__all__ = ["GGUFError", "check_gguf", "fingerprint", "read_metadata"]

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
VERSIONS = (2, 3)  # what llama.cpp reads (v1 files are refused there too)

# bytes per block and elements per block of common ggml tensor types (ggml-common.h), to tell
# how far the last tensor's data must reach; a type not listed counts as one byte (a lower bound)
_TYPE_SIZE = {
    0: (4, 1),  # F32
    1: (2, 1),  # F16
    2: (18, 32),  # Q4_0
    3: (20, 32),  # Q4_1
    6: (22, 32),  # Q5_0
    7: (24, 32),  # Q5_1
    8: (34, 32),  # Q8_0
    10: (84, 256),  # Q2_K
    11: (110, 256),  # Q3_K
    12: (144, 256),  # Q4_K
    13: (176, 256),  # Q5_K
    14: (210, 256),  # Q6_K
    30: (2, 1),  # BF16
}


class GGUFError(ValueError):
    """A file that is not a whole GGUF; the message says what is wrong with it."""


class _Reader:
    def __init__(self, f):
        self.f = f

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFError("truncated GGUF header")
        return struct.unpack(fmt, b)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > 1 << 26:
            raise GGUFError("GGUF string too long (a corrupt header)")
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFError("truncated GGUF header")
        return b.decode("utf-8", "replace")

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
        raise GGUFError(f"unknown GGUF value type {t} (a corrupt header)")


def read_metadata(path: str | Path, max_array: int = 4096) -> dict:
    """Key/value metadata of a GGUF file; arrays longer than ``max_array`` become None."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        r = _Reader(f)
        version = r.take("<I")
        if version not in VERSIONS:
            raise GGUFError(f"{path}: unsupported GGUF version {version}")
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
            raise GGUFError(f"{path} is not a GGUF file")
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


def check_gguf(path: str | Path) -> dict:
    """Check that ``path`` is a whole GGUF file before llama.cpp sees it: it exists, starts
    with b"GGUF" and a version llama.cpp reads, its header (metadata, tensor table) parses and
    the file reaches as far as its tensor data must. Returns the metadata (arrays over 64 items
    as None). Raises GGUFError saying what is wrong; the caller adds the fix for its flag."""
    p = Path(path)
    if not p.exists():
        raise GGUFError(f"{path}: no such file")
    if p.is_dir():
        raise GGUFError(f"{path} is a directory, not a GGUF file")
    try:
        f = open(p, "rb")
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror}") from None
    with f:
        head = f.read(8)
        if not head:
            raise GGUFError(f"{path} is empty (0 bytes), not a GGUF file")
        if head[:4] != b"GGUF":
            raise GGUFError(
                f"{path} is not a GGUF file (it starts with {head[:4]!r}; a GGUF file starts "
                "with b'GGUF')"
            )
        if len(head) < 8:
            raise GGUFError(f"{path} is truncated: it ends inside the GGUF header")
        version = struct.unpack("<I", head[4:8])[0]
        if version not in VERSIONS:
            raise GGUFError(
                f"{path}: GGUF version {version} is not one llama.cpp reads "
                f"({' or '.join(map(str, VERSIONS))}); a corrupt file, or one for another tool"
            )
        r = _Reader(f)
        try:
            n_tensors, n_kv = r.take("<Q"), r.take("<Q")
            if n_tensors > 1 << 24 or n_kv > 1 << 24:
                raise GGUFError("implausible tensor or key count (a corrupt header)")
            meta = {}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.take("<I"), 64)
            end = 0  # how far past the data start the tensors reach
            for _ in range(n_tensors):
                r.string()
                dims = [r.take("<Q") for _ in range(r.take("<I"))]
                t, offset = r.take("<I"), r.take("<Q")
                n = 1
                for d in dims:
                    n *= d
                size, block = _TYPE_SIZE.get(t, (1, n or 1))
                end = max(end, offset + size * -(-n // block))
        except GGUFError as e:
            if "truncated" in str(e):
                raise GGUFError(f"{path} is truncated: it ends inside the GGUF header") from None
            raise GGUFError(f"{path}: {e}") from None
        align = meta.get("general.alignment") or 32
        start = -(-f.tell() // align) * align
    size = p.stat().st_size
    if n_tensors and size < start + end:
        raise GGUFError(
            f"{path} is truncated: it is {size} bytes but its tensors reach byte {start + end}"
        )
    return meta
