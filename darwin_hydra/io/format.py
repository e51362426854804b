"""The safetensors file format, read and written at the byte level.

A safetensors file is ``<u64 little-endian N><N bytes of JSON header><data>``; the header maps each
tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the start of
the data), plus an optional ``"__metadata__"`` dict of strings. The data must be covered by the
tensors with no holes; the header may be padded with trailing spaces. See
https://github.com/huggingface/safetensors#format.

Reading the header ourselves (instead of through ``safe_open``) gives names, shapes, dtypes and byte
ranges without touching tensor data, and lets a tensor be read with one ``pread`` into memory the
caller owns: thread-safe on one shared file descriptor, no memory map that would count every byte
touched in the process's RSS.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype codes <-> torch dtypes (the ones torch has).
DTYPES: dict[str, torch.dtype] = {
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
    "C64": torch.complex64,
}
for _code, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is refused as corrupt (safetensors itself refuses above 100 MB).
MAX_HEADER_BYTES = 100_000_000
# One read(2)/write(2) call moves at most 0x7ffff000 bytes on Linux: larger tensors need a loop.
_IO_CHUNK = 1 << 30


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors and ``__metadata__`` of one safetensors file, from its header only.

    Validates what a truncated download or a corrupt file would break: header size, dtype codes,
    byte ranges inside the file, and a data section exactly as long as the header says.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ValueError(
                f"{path}: not a safetensors file or truncated (header length {n}, file size {size}); "
                "re-download or re-export it"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from e
        if code not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code}, which this torch build cannot represent")
        dtype = DTYPES[code]
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise ValueError(
                f"{path}: tensor {name!r} header is inconsistent: shape {list(shape)} x {code} needs "
                f"{numel * dtype.itemsize} bytes, data_offsets give {end - begin}"
            )
        data_end = max(data_end, end)
        entries[name] = TensorEntry(name, path, dtype, shape, base + begin, base + end)
    if base + data_end != size:
        raise ValueError(
            f"{path}: file is {size} bytes but its header describes {base + data_end}: "
            "truncated or corrupt (an interrupted download or export?); re-download or re-export it"
        )
    return entries, metadata


def pread_into(fd: int, buf: memoryview, offset: int, path: Path, what: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset`` (loops over short reads; thread-safe, no shared file position)."""
    done, total = 0, len(buf)
    while done < total:
        n = os.preadv(fd, [buf[done : done + _IO_CHUNK]], offset + done)
        if n <= 0:
            raise OSError(f"{path}: unexpected end of file while reading {what} ({done} of {total} bytes)")
        done += n


def pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    """Write all of ``buf`` at byte ``offset`` of ``fd`` (loops over short writes; no shared file position,
    so threads and processes may write different ranges of one file at once)."""
    done, total = 0, len(buf)
    while done < total:
        done += os.pwrite(fd, buf[done : done + _IO_CHUNK], offset + done)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (native order: little-endian here)."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def empty_for(entry: TensorEntry) -> tuple[torch.Tensor, memoryview]:
    """A fresh tensor for ``entry`` and a writable byte view of its storage."""
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    t = raw.view(entry.dtype).view(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=entry.dtype)
    return t, memoryview(raw.numpy()) if entry.nbytes else memoryview(bytearray())


def header_bytes(entries: dict[str, dict], metadata: dict[str, str] | None, reserve: int = 0) -> bytes:
    """A safetensors header (JSON), space-padded to a multiple of 8 bytes and at least ``reserve`` bytes,
    so that the data after ``8 + len(header)`` is 8-byte aligned."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = metadata
    obj.update(entries)
    raw = json.dumps(obj, separators=(",", ":")).encode()
    size = max(len(raw), reserve)
    size += -size % 8
    return raw + b" " * (size - len(raw))


def entry_json_len(name: str, code: str, shape: tuple[int, ...], begin: int, end: int) -> int:
    """Bytes one tensor's entry adds to a compact header (with its separating comma)."""
    body = json.dumps({name: {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}}, separators=(",", ":"))
    return len(body) - 2 + 1
