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
import reprlib
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

# A checkpoint directory's weights (transformers' names): one file, or shards listed by an index.
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

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

    Validates what a truncated download or a corrupt file would break, as safetensors itself does:
    header size, strict UTF-8 JSON (no duplicate keys), entry types, dtype codes, shapes torch can
    hold, ``end - begin = prod(shape) * itemsize``, tensors covering the data section with no hole
    or overlap, and a data section exactly as long as the header says. So a lying header raises
    ``ValueError`` naming the file (and tensor) before any tensor memory is allocated: every byte
    range is inside the file.
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
        text = fh.read(n)
    try:
        # bytes would let json guess UTF-16/32; safetensors headers are UTF-8
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise ValueError(f"{path}: corrupt safetensors header ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(_utf8(k) and _utf8(v) for k, v in metadata.items()):
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, base, name, info)
    # The data section is the tensors back to back: sorted by offset, each begins where the one
    # before ends (zero-size tensors included), the last ends at the end of the file.
    pos = base
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != pos:
            raise ValueError(
                f"{path}: tensor {e.name!r} has data_offsets [{e.start - base}, {e.end - base}], but the data "
                f"before it ends at {pos - base}: {'overlapping tensors' if e.start < pos else 'a hole in the data'}; "
                "the file is corrupt (re-download or re-export it)"
            )
        pos = e.end
    if pos != size:
        raise ValueError(
            f"{path}: file is {size} bytes but its header describes {pos}: "
            "truncated or corrupt (an interrupted download or export?); re-download or re-export it"
        )
    return entries, metadata


# Dimensions of a shape, and the product of its nonzero ones, must fit torch's int64 sizes and strides.
_MAX_DIM = 2**63 - 1


def _entry(path: Path, base: int, name: str, info: object) -> TensorEntry:
    """One header entry checked: ``{"dtype": code, "shape": [ints >= 0], "data_offsets": [begin, end]}``."""

    def nat(x: object) -> bool:
        return type(x) is int and 0 <= x <= _MAX_DIM  # not bool, not float

    if not _utf8(name):
        raise ValueError(f"{path}: corrupt safetensors header (tensor name {_short(name)} is not valid UTF-8)")
    try:
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]  # type: ignore[index]
    except (KeyError, TypeError, IndexError):
        code = shape = offsets = None
    if not (
        isinstance(code, str)
        and isinstance(shape, list)
        and all(nat(d) for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(nat(o) for o in offsets)
    ):
        raise ValueError(
            f"{path}: corrupt header entry for tensor {_short(name)}: {_short(info)} (expected "
            '{"dtype": str, "shape": [ints >= 0], "data_offsets": [begin, end]})'
        )
    if code not in DTYPES:
        raise ValueError(f"{path}: tensor {_short(name)} has dtype {_short(code)}, which this torch build cannot represent")
    dtype = DTYPES[code]
    begin, end = offsets
    numel, extent = 1, 1
    for d in shape:
        numel *= d
        extent *= max(d, 1)
        if extent > _MAX_DIM:
            raise ValueError(f"{path}: tensor {_short(name)} has shape {_short(shape)}, too large for any tensor")
    if end < begin or end - begin != numel * dtype.itemsize:
        raise ValueError(
            f"{path}: tensor {_short(name)} header is inconsistent: shape {_short(shape)} x {code} needs "
            f"{numel * dtype.itemsize} bytes, data_offsets [{begin}, {end}] give {end - begin}"
        )
    return TensorEntry(name, path, dtype, tuple(shape), base + begin, base + end)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different (``json`` would keep the last of a duplicate)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {_short(dup)}")
    return obj


def _utf8(s: object) -> bool:
    """``s`` is a str that encodes to UTF-8 (JSON escapes can make lone surrogates)."""
    if not isinstance(s, str):
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120


def _short(x: object) -> str:
    """``repr(x)`` for an error message, shortened: a corrupt header can hold anything, nested deep."""
    return _REPR.repr(x)


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
