"""Streaming checkpoint I/O: read one tensor at a time, write a sharded child atomically.

``CheckpointReader`` opens a checkpoint directory (one ``model.safetensors``, a sharded
``model.safetensors.index.json``, or, only when allowed, pickled ``pytorch_model*.bin``) from its
headers alone; ``get(name)`` then reads that one tensor with a single ``pread`` into fresh memory.

``CheckpointWriter`` streams tensors straight into shard files as they arrive (memory stays at about
the tensors in flight, never a whole shard), then writes the index, ``checksums.json``, config and
tokenizer inside ``<out_dir>.tmp-<host>-<pid>-<id>``, renamed to ``out_dir`` only when complete.

``check_compatible`` (in :mod:`darwin_hydra.io.compat`, re-exported here) is the pre-merge check.
"""

from __future__ import annotations

import ctypes
import difflib
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

from darwin_hydra.io.compat import IncompatibleParentsError, check_compatible
from darwin_hydra.io.format import (
    CODES,
    TensorEntry,
    empty_for,
    entry_json_len,
    header_bytes,
    pread_into,
    pwrite_all,
    read_header,
    tensor_bytes,
)

__all__ = [
    "CheckpointReader",
    "CheckpointWriter",
    "IncompatibleParentsError",
    "PickleRefusedError",
    "SlotWriter",
    "StoredTensor",
    "WriteSlot",
    "check_compatible",
    "tensor_sha256",
    "SUPPORT_FILES",
    "storable",
    "write_slot",
]

log = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# Files besides the weights that make a checkpoint directory usable: copied from the source parent
# into the child (fnmatch patterns, matched against names in the top level of the directory).
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "*.jinja",
    "*.model",
    "*.tiktoken",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)

def remote_code_files(model_dir: Path) -> set[str]:
    """The Python modules a checkpoint's ``auto_map`` points at (``configuration_x.XConfig`` ->
    ``configuration_x.py``, in config.json and tokenizer_config.json), which a child must carry so
    that its config keeps loading with ``trust_remote_code``. Entries naming code in another repo
    (``other/repo--module.Class``) need no file. A module the map names and the directory lacks is an
    error naming it: a child whose config points at missing code would not load."""
    names: set[str] = set()
    for cfg_name in ("config.json", "tokenizer_config.json"):
        path = Path(model_dir) / cfg_name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") or {}
        except (json.JSONDecodeError, AttributeError):
            continue
        refs = []
        for v in auto_map.values():
            refs += v if isinstance(v, list) else [v]
        for ref in refs:
            if not isinstance(ref, str) or "--" in ref or "." not in ref:
                continue
            names.add(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    missing = sorted(n for n in names if not (Path(model_dir) / n).is_file())
    if missing:
        raise FileNotFoundError(
            f"{model_dir}: its auto_map names code the directory lacks: {missing}; the child's config would point "
            "at code that is not there (copy those files next to config.json, or remove auto_map)"
        )
    return names


# Fingerprint (see CheckpointReader.fingerprint): models up to this many bytes are hashed in full,
# larger ones through a strided sample of each tensor.
FINGERPRINT_FULL_BYTES = 64 * 2**20
FINGERPRINT_WINDOW = 4096
FINGERPRINT_WINDOWS = 4


class PickleRefusedError(ValueError):
    """A checkpoint holds only pickled weights and ``allow_pickle`` is off."""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes as safetensors stores them (C order, little-endian).

    Dtype and shape are not part of the digest; ``checksums.json`` records one per tensor name.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return hashlib.sha256(tensor_bytes(t.contiguous())).hexdigest()


# --------------------------------------------------------------------------------------------------
# reading


_read_tls = threading.local()


class StoredTensor:
    """One safetensors tensor left in its file, read a flat element range at a time.

    For the export merge (``merge.methods.streams``: every method, not a transplant): each chunk of each
    parent is read straight into a small per-thread buffer and converted there, instead of the
    whole tensor being read into fresh memory first. That halves the merge's peak RSS and spares
    the page faults and copy of every parent's bytes (scripts/bench_merge.py; docs/merge.md).
    Duck-types the few ``torch.Tensor`` attributes the merge reads: ``shape``, ``dtype``,
    ``numel()``, ``is_floating_point()``.
    """

    __slots__ = ("reader", "entry", "shape", "dtype", "itemsize", "_n")

    def __init__(self, reader: CheckpointReader, entry: TensorEntry):
        self.reader, self.entry = reader, entry
        self.shape = torch.Size(entry.shape)
        self.dtype = entry.dtype
        self.itemsize = entry.dtype.itemsize
        self._n = self.shape.numel()

    def numel(self) -> int:
        return self._n

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Flat elements [start, stop), in this thread's read buffer: valid until the thread's next
        ``read``, so copy (convert) it before reading again. (From a reader that ``map_files``: a view
        of the mapped file, no copy.)"""
        if not 0 <= start <= stop <= self._n:
            raise IndexError(f"tensor {self.entry.name!r}: elements [{start}, {stop}) outside 0..{self._n}")
        nbytes = (stop - start) * self.itemsize
        if self.reader._mapped and nbytes:
            e = self.entry
            mm = self.reader._map(e.file)
            if e.end > len(mm):  # only if the file shrank after its header was read
                raise OSError(f"{e.file}: cannot read tensor {e.name!r}: the file is now {len(mm)} bytes, "
                              f"the tensor ends at byte {e.end} (truncated while open?)")
            return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=e.start + start * self.itemsize).view(
                self.dtype
            )
        buf = getattr(_read_tls, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes <= 64 << 20:  # a chunk's worth is kept; a one-off whole large tensor is not
                _read_tls.buf = buf
        raw = buf[:nbytes]
        e = self.entry
        try:
            pread_into(self.reader._fd(e.file), memoryview(raw.numpy()), e.start + start * self.itemsize, e.file,
                       f"tensor {e.name!r}")
        except OSError as err:
            raise OSError(f"{e.file}: cannot read tensor {e.name!r}: {err}") from err
        return raw.view(self.dtype)

    def release(self) -> None:
        """Drop this tensor's pages from a mapping reader's address space (they stay in the page
        cache): the pages of the parents a merge has read do not pile up in its RSS."""
        if not self.reader._mapped or not self.entry.nbytes:
            return
        e = self.entry
        mm = self.reader._map(e.file)
        lo = e.start - e.start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, lo, min(len(mm), e.start + e.nbytes) - lo)

    def load(self) -> torch.Tensor:
        """The whole tensor, in fresh memory (``CheckpointReader.get``)."""
        return self.reader.get(self.entry.name)

    def prefetch(self) -> None:
        """Ask the kernel to read the tensor's bytes ahead (chunked reads are small)."""
        e = self.entry
        if e.nbytes == 0:  # a length of 0 would mean "to the end of the file"
            return
        try:
            os.posix_fadvise(self.reader._fd(e.file), e.start, e.nbytes, os.POSIX_FADV_WILLNEED)
        except (AttributeError, OSError):
            pass

    def __repr__(self) -> str:
        return f"StoredTensor({self.entry.name!r}, {tuple(self.shape)}, {self.dtype}, {self.entry.file})"


class CheckpointReader:
    """Read-only, streaming view of a checkpoint directory (or a single ``.safetensors`` file).

    Attributes: ``path`` (the directory), ``config`` (its ``config.json``, ``{}`` when absent),
    ``names`` (canonical on-disk tensor names), ``format`` (``"safetensors"`` or ``"pickle"``).

    ``names`` order: by file (shard file names sorted, so ``model-00001-of-…`` first), then by byte
    offset inside the file, i.e. the order the bytes lie on disk; iterating in this order reads each
    file sequentially. For pickled weights: by file, then the order of the file's state dict.

    ``get(name)`` reads that tensor only and returns a tensor the caller owns (writable, not
    memory-mapped). Safe to call from several threads at once (``os.preadv`` on one descriptor per
    file, no shared position).

    Pickled weights (``pytorch_model*.bin``) are refused unless ``allow_pickle=True``, then loaded
    with ``torch.load(weights_only=True, mmap=True)``.
    """

    def __init__(self, path: str | Path, allow_pickle: bool = False):
        path = Path(path).expanduser()
        if path.is_file() and path.suffix == ".safetensors":
            self.path, files = path.parent, [path]
        elif path.is_dir():
            self.path, files = path, None
        elif path.exists():
            raise ValueError(f"{path}: not a checkpoint: give its directory (with config.json and *.safetensors)")
        else:
            raise FileNotFoundError(f"{path}: no such checkpoint directory")
        self.allow_pickle = allow_pickle
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._mapped = False
        self._entries: dict[str, TensorEntry] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        self._pickle_file: dict[str, Path] = {}
        self._fingerprint: str | None = None
        self._weight_map: dict[str, str] | None = None
        self.config: dict = _read_config(self.path / "config.json")
        if files is None:
            files = self._safetensors_files()
        if files:
            self.format = "safetensors"
            self._open_safetensors(files)
        else:
            self.format = "pickle"
            self._open_pickle(self._pickle_files())
        self.names: list[str] = list(self._entries) if self.format == "safetensors" else list(self._pickled)

    # ---- discovery ------------------------------------------------------------------------------
    def _safetensors_files(self) -> list[Path]:
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            self._weight_map = _weight_map(index)
            if not self._weight_map:
                raise ValueError(f"{index}: its weight_map lists no tensors; the download or export is incomplete")
            files = sorted({self.path / f for f in self._weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index} lists shard(s) that are not there: {', '.join(missing[:5])}; "
                    "the download or export is incomplete"
                )
            return files
        self._weight_map = None
        if (self.path / SAFETENSORS_SINGLE).is_file():
            return [self.path / SAFETENSORS_SINGLE]
        return sorted(f for f in self.path.glob("*.safetensors") if f.is_file())

    def _pickle_files(self) -> list[Path]:
        index = self.path / PICKLE_INDEX
        if index.is_file():
            files = sorted({self.path / f for f in _weight_map(index).values()})
        elif (self.path / PICKLE_SINGLE).is_file():
            files = [self.path / PICKLE_SINGLE]
        else:
            files = sorted(f for f in self.path.glob("pytorch_model*.bin") if f.is_file())
        if not files:
            raise FileNotFoundError(
                f"{self.path}: no weights found (expected model.safetensors, a {SAFETENSORS_INDEX} with its "
                "shards, or pytorch_model*.bin)"
            )
        if not self.allow_pickle:
            raise PickleRefusedError(
                f"{files[0]}: this checkpoint has only pickled weights (.bin), and unpickling can run arbitrary "
                "code, so it is refused. Convert it to safetensors, or set parents.allow_pickle=true "
                "(CheckpointReader(..., allow_pickle=True)) to load it with torch.load(weights_only=True)."
            )
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{self.path}: pickled shard(s) missing: {', '.join(missing[:5])}")
        return files

    def _open_safetensors(self, files: list[Path]) -> None:
        where: dict[str, Path] = {}
        for f in files:
            entries, _ = read_header(f)
            for e in sorted(entries.values(), key=lambda e: e.start):
                if e.name in where:
                    raise ValueError(f"{self.path}: tensor {e.name!r} is in two files: {where[e.name].name} and {f.name}")
                where[e.name] = f
                self._entries[e.name] = e
        if self._weight_map is not None:
            for name, fname in self._weight_map.items():
                if where.get(name) is None or where[name].name != fname:
                    raise ValueError(
                        f"{self.path / SAFETENSORS_INDEX}: says {name!r} is in {fname}, but "
                        + (f"it is in {where[name].name}" if name in where else "no shard has it")
                        + "; the index does not match the shards (re-download or re-export)"
                    )

    def _open_pickle(self, files: list[Path]) -> None:
        import pickle

        for f in files:
            log.warning("%s: loading pickled weights with torch.load(weights_only=True) (allow_pickle=true)", f)
            try:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e) and "zipfile" not in str(e):
                        raise
                    # Legacy (pre-zipfile) torch.save format: cannot be memory-mapped, load it whole.
                    sd = torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"{f}: torch.load(weights_only=True) refused this file: it holds objects other than plain "
                    f"tensors, which darwin-hydra never unpickles ({str(e).splitlines()[0]}). Use a safetensors "
                    "copy of the model."
                ) from e
            if not isinstance(sd, dict):
                raise ValueError(f"{f}: expected a state dict (name -> tensor), got {type(sd).__name__}")
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    log.warning("%s: skipping %r, not a tensor (%s)", f, name, type(t).__name__)
                    continue
                if name in self._pickled:
                    raise ValueError(f"{self.path}: tensor {name!r} is in two files: {self._pickle_file[name].name} and {f.name}")
                self._pickled[name] = t
                self._pickle_file[name] = f

    # ---- metadata -------------------------------------------------------------------------------
    def _missing(self, name: str) -> KeyError:
        close = difflib.get_close_matches(name, self.names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return KeyError(f"{self.path}: no tensor {name!r} in this checkpoint ({len(self.names)} tensors){hint}")

    def entry(self, name: str) -> TensorEntry:
        """File, byte range, dtype and shape of a safetensors tensor (headers only)."""
        try:
            return self._entries[name]
        except KeyError:
            raise self._missing(name) from None

    def _pickled_tensor(self, name: str) -> torch.Tensor:
        try:
            return self._pickled[name]
        except KeyError:
            raise self._missing(name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        if self.format == "pickle":
            return tuple(self._pickled_tensor(name).shape)
        return self.entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        if self.format == "pickle":
            return self._pickled_tensor(name).dtype
        return self.entry(name).dtype

    def nbytes(self, name: str) -> int:
        if self.format == "pickle":
            t = self._pickled_tensor(name)
            return t.numel() * t.element_size()
        return self.entry(name).nbytes

    def file_of(self, name: str) -> Path:
        """The file holding ``name``."""
        return self._pickle_file[name] if self.format == "pickle" and name in self._pickle_file else self.entry(name).file

    @property
    def total_bytes(self) -> int:
        """Bytes of all tensors (what an index's ``metadata.total_size`` records)."""
        return sum(self.nbytes(n) for n in self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._pickled

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self.names)} tensors, {self.format})"

    # ---- data -----------------------------------------------------------------------------------
    def map_files(self) -> None:
        """From now on, ``StoredTensor.read`` returns views of the memory-mapped files instead of
        ``pread`` copies: one copy less per chunk read (forked export workers: ties 0.89x, dare_ties
        0.96x the time, docs/merge.md). A file truncated while mapped then kills the process with
        SIGBUS instead of raising OSError, so only processes whose death is handled should call this
        (the export's forked workers: the merge stops with an error)."""
        self._mapped = True

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            fd = self._fd(file)  # takes the lock itself
            with self._lock:
                mm = self._maps.get(file)
                if mm is None:
                    # private and writable: no copy unless written (never), and torch.frombuffer warns
                    # about read-only buffers
                    try:
                        mm = self._maps[file] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                    except (OSError, ValueError) as e:  # e.g. emptied since its header was read
                        raise OSError(f"{file}: cannot memory-map it: {e}") from e
        return mm

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (and nothing else) into fresh, writable memory."""
        if self.format == "pickle":
            return self._pickled_tensor(name).clone()
        e = self.entry(name)
        t, buf = empty_for(e)
        try:
            pread_into(self._fd(e.file), buf, e.start, e.file, f"tensor {name!r}")
        except OSError as err:
            raise OSError(f"{e.file}: cannot read tensor {name!r}: {err}") from err
        return t

    def stored(self, name: str) -> StoredTensor:
        """``name`` left in its safetensors file, to be read a range at a time (``StoredTensor``)."""
        if self.format != "safetensors":
            raise ValueError(f"{self.path}: tensors of pickled checkpoints cannot be read by range; use get()")
        return StoredTensor(self, self.entry(name))

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, in ``names`` order (default: ``self.names``, disk order)."""
        order = list(self.names if names is None else names)
        for i, name in enumerate(order):
            nxt = self._entries.get(order[i + 1]) if self.format == "safetensors" and i + 1 < len(order) else None
            if nxt is not None and nxt.nbytes:  # (length 0 would mean "to the end of the file")
                try:  # let the kernel read ahead the next tensor while the caller works on this one
                    os.posix_fadvise(self._fd(nxt.file), nxt.start, nxt.nbytes, os.POSIX_FADV_WILLNEED)
                except (AttributeError, OSError):
                    pass
            yield name, self.get(name)

    def _sample(self, name: str, full: bool) -> Iterator[memoryview]:
        """The bytes of ``name`` that the fingerprint hashes: all of them, or strided windows."""
        n, w, k = self.nbytes(name), FINGERPRINT_WINDOW, FINGERPRINT_WINDOWS
        if self.format == "pickle":
            raw = tensor_bytes(self._pickled_tensor(name).contiguous())
            if full or n <= w * k:
                yield raw
            else:
                for i in range(k):
                    off = (n - w) * i // (k - 1)
                    yield raw[off : off + w]
            return
        e = self.entry(name)
        chunk = 16 * 2**20  # full hashes read big tensors piecewise
        spans = (
            [(off, min(chunk, n - off)) for off in range(0, n, chunk)]
            if full or n <= w * k
            else [((n - w) * i // (k - 1), w) for i in range(k)]
        )
        for off, size in spans:
            buf = memoryview(bytearray(size))
            pread_into(self._fd(e.file), buf, e.start + off, e.file, f"tensor {name!r}")
            yield buf

    def fingerprint(self, full: bool | None = None) -> str:
        """A stable 16-hex-digit identity of the weights (not of the file layout).

        sha256 over, for each tensor in sorted name order: its name, dtype, shape, and its bytes —
        all of them when the model is at most 64 MiB (or ``full=True``), else 4 windows of 4 KiB
        strided evenly over the tensor (first and last included; tensors up to 16 KiB whole). So
        resharding or a safetensors/pickle conversion keeps the fingerprint, any change of name,
        shape, dtype or of a small model's values changes it, and so does any change touching the
        sampled bytes of a large model (a fine-tune or merge changes nearly every element); a
        60 GB model costs ~4 small reads per tensor instead of a full read. Cached per reader.
        """
        if full is None and self._fingerprint is not None:
            return self._fingerprint
        whole = bool(full) if full is not None else self.total_bytes <= FINGERPRINT_FULL_BYTES
        h = hashlib.sha256(b"darwin-hydra fingerprint v1\n")
        for name in sorted(self.names):
            h.update(f"{name}\0{CODES.get(self.dtype(name), str(self.dtype(name)))}\0{list(self.shape(name))}\0".encode())
            for chunk in self._sample(name, whole):
                h.update(chunk)
        digest = h.hexdigest()[:16]
        if full is None:
            self._fingerprint = digest
        return digest

    def close(self) -> None:
        """Release the open file descriptors and mappings (a later ``get`` reopens what it needs)."""
        with self._lock:
            fds, self._fds = self._fds, {}
            maps, self._maps = self._maps, {}
        for mm in maps.values():
            try:
                mm.close()
            except BufferError:  # a tensor still views it: the mapping goes when that tensor does
                pass
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor name -> shard file name in the index's directory), checked."""
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
    except (ValueError, RecursionError, KeyError, TypeError) as e:  # JSON, UTF-8, no weight_map, not an object
        raise ValueError(
            f"{index}: not a valid index (needs a 'weight_map' of tensor name -> file): {type(e).__name__}: {str(e)[:200]}"
        ) from e
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: not a valid index: 'weight_map' is a {type(weight_map).__name__}, not an object")
    for name, fname in weight_map.items():
        # a plain file name: the shard is looked up by name, and an index must not point outside its directory
        if not isinstance(fname, str) or fname in ("", ".", "..") or "/" in fname or "\\" in fname or "\0" in fname:
            raise ValueError(
                f"{index}: weight_map says tensor {name!r} is in {fname!r}, which is not a file name in "
                f"{index.parent}; the index is corrupt (re-download or re-export)"
            )
    return weight_map


def _read_config(cfg: Path) -> dict:
    """A checkpoint's ``config.json`` (``{}`` when it has none)."""
    if not cfg.is_file():
        return {}
    try:
        config = json.loads(cfg.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{cfg}: not valid JSON ({type(e).__name__}: {str(e)[:200]}); fix or re-download it") from e
    if not isinstance(config, dict):
        raise ValueError(f"{cfg}: expected a JSON object, got a {type(config).__name__}")
    return config


# --------------------------------------------------------------------------------------------------
# writing


class _Shard:
    __slots__ = ("index", "path", "fd", "entries", "data_bytes", "header_estimate", "full")

    def __init__(self, index: int, path: Path, fd: int):
        self.index, self.path, self.fd = index, path, fd
        self.full = False  # no further tensor goes here
        self.entries: dict[str, dict] = {}
        self.data_bytes = 0
        self.header_estimate = 64  # braces and {"__metadata__":{"format":"pt"}},


class WriteSlot(NamedTuple):
    """Where a tensor reserved with ``CheckpointWriter.reserve`` goes: ``nbytes`` bytes at byte
    ``offset`` of the shard file ``path``, as ``dtype`` and ``shape``."""

    name: str
    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def storable(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` as a checkpoint stores it: detached, floating point cast to ``dtype`` (when given),
    on the CPU, contiguous; a dtype safetensors cannot hold raises ``TypeError`` naming ``name``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    t = tensor.detach()
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous()
    if t.dtype not in CODES:
        raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
    return t


class SlotWriter:
    """Fills a reserved ``WriteSlot`` front to back, a piece (flat tensor) at a time, hashing as it
    goes; ``finish()`` returns the sha256 (hex) for ``CheckpointWriter.fill``. It opens the shard by
    path, so any thread or (forked) process may fill its slots while others fill theirs."""

    def __init__(self, slot: WriteSlot):
        self.slot = slot
        self._fd = os.open(slot.path, os.O_WRONLY)
        self._sha = hashlib.sha256()
        self._done = 0

    def write(self, piece: torch.Tensor) -> None:
        if piece.dtype != self.slot.dtype:
            raise ValueError(f"tensor {self.slot.name!r}: got {piece.dtype}, but its slot was reserved for {self.slot.dtype}")
        raw = tensor_bytes(piece)
        if self._done + len(raw) > self.slot.nbytes:
            raise ValueError(f"tensor {self.slot.name!r}: more than the {self.slot.nbytes} bytes reserved")
        pwrite_all(self._fd, raw, self.slot.offset + self._done)
        self._sha.update(raw)
        self._done += len(raw)

    def finish(self) -> str:
        self.close()
        if self._done != self.slot.nbytes:
            raise ValueError(f"tensor {self.slot.name!r}: {self._done} of its {self.slot.nbytes} bytes written")
        return self._sha.hexdigest()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SlotWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_slot(slot: WriteSlot, tensor: torch.Tensor) -> str:
    """Write ``tensor`` (as ``storable`` returns it) into its reserved ``slot``; returns its sha256 (hex),
    for ``CheckpointWriter.fill`` (see ``SlotWriter``)."""
    if tensor.dtype != slot.dtype or tuple(tensor.shape) != tuple(slot.shape):
        raise ValueError(
            f"tensor {slot.name!r}: got {tensor.dtype} {tuple(tensor.shape)}, but its slot was reserved for "
            f"{slot.dtype} {tuple(slot.shape)}"
        )
    with SlotWriter(slot) as w:
        w.write(tensor.reshape(-1))
        return w.finish()


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


class CheckpointWriter:
    """Write a child checkpoint as sharded safetensors, atomically.

    Use as a context manager::

        with CheckpointWriter(run_dir / "child", max_shard_bytes=2e9, source_dir=father.path) as w:
            for name, t in tensors:
                w.add(name, t)
            w.write_text("README.md", card)
        # out_dir now holds model-0000i-of-0000N.safetensors (or model.safetensors), the index,
        # checksums.json, config.json, generation_config.json and the tokenizer files of source_dir

    Tensors go straight to disk in ``add`` order: a shard is closed as soon as the next tensor would
    take it past ``max_shard_bytes`` (a tensor larger than that gets a shard of its own), so memory
    stays at the tensors in flight, never a whole shard. By default ``add`` writes and hashes
    (sha256 for ``checksums.json``) before it returns; both release the GIL, so merge threads keep
    computing meanwhile. With ``background=True`` a writer thread does that instead and at most
    ``max_pending_bytes`` wait in its queue (``add`` blocks beyond); then **the writer keeps a
    reference to each added tensor until it is written: do not modify it in place after adding**.
    ``add`` may be called from one thread at a time (it takes a lock).

    ``dtype``: floating-point tensors are cast to it (and config.json's ``dtype`` says so); integer
    and bool tensors are written as they are. ``config``: a dict written as config.json instead of
    ``source_dir``'s.

    Everything is written inside ``<out_dir>.tmp-<host>-<pid>-<id>`` and renamed to ``out_dir`` only
    when complete, so a killed export never leaves a directory named ``out_dir``; on an exception
    the temporary directory is removed, after a kill a later writer for the same ``out_dir`` removes
    it (when its process is gone). An existing ``out_dir`` is refused unless ``overwrite=True``;
    then it is swapped atomically where the OS allows (Linux), else renamed away first.
    """

    HEADER_RESERVE = 256 * 1024  # bytes reserved in each shard for its header (a shard closes when full)
    COMPACT_BELOW = 4 * 2**20  # shards with less data are rewritten with a compact header

    def __init__(
        self,
        out_dir: str | Path,
        max_shard_bytes: int = 2_000_000_000,
        source_dir: str | Path | None = None,
        dtype: torch.dtype | None = None,
        *,
        overwrite: bool = False,
        config: dict | None = None,
        background: bool = False,
        max_pending_bytes: int = 64 * 2**20,
        fsync: bool = False,
    ):
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.max_shard_bytes = int(max_shard_bytes)
        if self.max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.source_dir = Path(source_dir).expanduser() if source_dir is not None else None
        if self.source_dir is not None and not self.source_dir.is_dir():
            raise FileNotFoundError(f"source_dir {self.source_dir}: no such directory (config/tokenizer come from it)")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
        self.dtype = dtype
        self.overwrite = overwrite
        self.config = config
        self.background = background
        self.max_pending_bytes = int(max_pending_bytes)
        self.fsync = fsync
        self.tmp_dir: Path | None = None
        self.checksums: dict[str, str] = {}
        self._names: set[str] = set()
        self._shards: list[_Shard] = []
        self._total_bytes = 0
        self._written_files: set[str] = set()
        self._state = "new"  # new -> open -> committed | aborted
        self._add_lock = threading.Lock()
        self._planned = False  # tensors were reserved: shards stay open until commit
        self._reserved: set[str] = set()  # reserved and not yet filled
        self._cv = threading.Condition()
        self._pending: deque[tuple[str, torch.Tensor, int]] = deque()
        self._pending_bytes = 0
        self._closing = False
        self._error: BaseException | None = None
        self._worker: threading.Thread | None = None
        self._t0 = 0.0

    # ---- lifecycle ------------------------------------------------------------------------------
    def open(self) -> CheckpointWriter:
        """Create the temporary directory (done by ``with`` and by the first ``add``)."""
        if self._state != "new":
            return self
        if self.out_dir.exists() and not self.overwrite:
            raise FileExistsError(
                f"{self.out_dir} already exists; choose another output directory or pass overwrite=True"
            )
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._clean_stale()
        tag = f"{self.out_dir.name}.tmp-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp_dir = self.out_dir.parent / tag
        self.tmp_dir.mkdir()
        self._state = "open"
        self._t0 = time.perf_counter()
        if self.background:
            self._worker = threading.Thread(target=self._run_worker, name=f"CheckpointWriter({self.out_dir.name})", daemon=True)
            self._worker.start()
        log.debug("writing %s via %s", self.out_dir, self.tmp_dir)
        return self

    def _clean_stale(self) -> None:
        """Remove temporary directories of earlier writers to ``out_dir`` on this host whose process is gone."""
        prefix = f"{self.out_dir.name}.tmp-"
        host = _host_tag()
        for p in self.out_dir.parent.glob(f"{glob_escape(prefix)}*"):
            parts = p.name[len(prefix):].rsplit("-", 2)
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid != os.getpid() and not _pid_alive(pid) and p.is_dir():
                log.info("removing %s, left by an export that did not finish (process %d is gone)", p, pid)
                shutil.rmtree(p, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if self._state == "open":
                self.commit()
        else:
            self.abort()

    def abort(self) -> None:
        """Stop, and remove the temporary directory (nothing appears at ``out_dir``)."""
        if self._state in ("committed", "aborted"):
            return
        with self._cv:
            self._closing = True
            self._pending.clear()
            self._pending_bytes = 0
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join()
        for s in self._shards:
            if s.fd >= 0:
                os.close(s.fd)
                s.fd = -1
        if self.tmp_dir is not None:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._state = "aborted"

    def __del__(self) -> None:
        # A writer dropped without commit is abandoned: leave nothing behind.
        try:
            if self._state == "open":
                self.abort()
        except Exception:
            pass

    # ---- adding tensors -------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor for writing under its canonical on-disk ``name``."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        with self._add_lock:
            self._check_new(name)
            t = storable(name, tensor, self.dtype)
            self._names.add(name)
            nbytes = t.numel() * t.element_size()
            if self._worker is None:
                self._write(name, t)
                return
            with self._cv:
                while self._pending_bytes and self._pending_bytes + nbytes > self.max_pending_bytes and self._error is None:
                    self._cv.wait()
                self._raise_worker_error()
                self._pending.append((name, t, nbytes))
                self._pending_bytes += nbytes
                self._cv.notify_all()

    def _check_new(self, name: str) -> None:
        """A tensor ``name`` may be added or reserved now (opens the writer on first use)."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor name must be a non-empty str, got {name!r}")
        if self._state == "new":
            self.open()
        if self._state != "open":
            raise RuntimeError(f"{self.out_dir}: writer is {self._state}; cannot add {name!r}")
        self._raise_worker_error()
        if name in self._names:
            raise ValueError(f"{self.out_dir}: tensor {name!r} added twice")

    def reserve(self, name: str, dtype: torch.dtype, shape) -> WriteSlot:
        """Place tensor ``name`` (as stored: ``dtype``, ``shape``) in the layout now, and return where
        its bytes go; then write them with ``write_slot`` (from any process) and report the returned
        sha256 with ``fill``. Reserving every tensor in order gives the layout ``add`` would, so the
        files come out the same bytes; tensors may then be written in any order, at once. Shards
        close at ``commit``, which refuses a tensor reserved and never filled."""
        if dtype not in CODES:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        if self.dtype is not None and dtype.is_floating_point and dtype != self.dtype:
            raise ValueError(f"{name}: reserved as {dtype}, but this writer stores floating tensors as {self.dtype}")
        shape = tuple(int(d) for d in shape)
        with self._add_lock:
            self._check_new(name)
            if self._worker is not None:
                raise RuntimeError(f"{self.out_dir}: reserve() does not combine with background=True")
            self._planned = True
            self._names.add(name)
            nbytes = math.prod(shape) * dtype.itemsize
            shard, begin = self._place(name, CODES[dtype], shape, nbytes)
            self._reserved.add(name)
            return WriteSlot(name, str(shard.path), 8 + self.HEADER_RESERVE + begin, nbytes, dtype, shape)

    def fill(self, name: str, sha256: str) -> None:
        """Record that reserved tensor ``name`` was written (``write_slot`` returned ``sha256``)."""
        with self._add_lock:
            if name not in self._reserved:
                raise KeyError(f"{self.out_dir}: tensor {name!r} was not reserved (or was filled already)")
            self._reserved.discard(name)
            self.checksums[name] = sha256

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self.out_dir}: writing failed: {self._error}") from self._error

    def _run_worker(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closing:
                    self._cv.wait()
                if not self._pending:
                    return
                name, t, nbytes = self._pending[0]
            try:
                self._write(name, t)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                with self._cv:
                    self._error = e
                    self._pending.clear()
                    self._pending_bytes = 0
                    self._cv.notify_all()
                return
            with self._cv:
                if self._pending and self._pending[0][0] == name:
                    self._pending.popleft()
                    self._pending_bytes -= nbytes
                self._cv.notify_all()

    def _new_shard(self) -> _Shard:
        assert self.tmp_dir is not None
        index = len(self._shards) + 1
        path = self.tmp_dir / f"model-{index:05d}.safetensors.partial"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        shard = _Shard(index, path, fd)
        self._shards.append(shard)
        return shard

    def _write(self, name: str, t: torch.Tensor) -> None:
        """Append one tensor to the current shard (worker thread, or caller thread without one)."""
        shard, begin = self._place(name, CODES[t.dtype], tuple(t.shape), t.numel() * t.element_size())
        raw = tensor_bytes(t)
        pwrite_all(shard.fd, raw, 8 + self.HEADER_RESERVE + begin)
        self.checksums[name] = hashlib.sha256(raw).hexdigest()

    def _place(self, name: str, code: str, shape: tuple[int, ...], nbytes: int) -> tuple[_Shard, int]:
        """The shard and data offset of the next tensor; a shard is full when the tensor would take it
        past ``max_shard_bytes`` or its header past ``HEADER_RESERVE`` (closed now, or at commit when
        tensors are reserved and written later)."""
        shard = self._shards[-1] if self._shards and not self._shards[-1].full else None
        if shard is not None:
            entry_len = entry_json_len(name, code, shape, shard.data_bytes, shard.data_bytes + nbytes)
            if (shard.data_bytes + nbytes > self.max_shard_bytes and shard.entries) or (
                shard.header_estimate + entry_len > self.HEADER_RESERVE
            ):
                shard.full = True
                if not self._planned:
                    self._close_shard(shard)
                shard = None
        if shard is None:
            shard = self._new_shard()
        begin = shard.data_bytes
        shard.entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
        shard.header_estimate += entry_json_len(name, code, shape, begin, begin + nbytes)
        shard.data_bytes += nbytes
        self._total_bytes += nbytes
        return shard, begin

    def _close_shard(self, shard: _Shard) -> None:
        header = header_bytes(shard.entries, {"format": "pt"}, reserve=self.HEADER_RESERVE)
        if len(header) == self.HEADER_RESERVE and shard.data_bytes >= self.COMPACT_BELOW:
            os.pwrite(shard.fd, struct.pack("<Q", len(header)) + header, 0)
            if self.fsync:
                os.fsync(shard.fd)
            os.close(shard.fd)
        else:
            # Small shard (or a header that outgrew its reservation): rewrite with a compact header.
            os.close(shard.fd)
            header = header_bytes(shard.entries, {"format": "pt"})
            compact = shard.path.with_suffix(".compact")
            with open(shard.path, "rb") as src, open(compact, "wb") as dst:
                dst.write(struct.pack("<Q", len(header)) + header)
                src.seek(8 + self.HEADER_RESERVE)
                shutil.copyfileobj(src, dst, 16 * 2**20)
                if self.fsync:
                    dst.flush()
                    os.fsync(dst.fileno())
            compact.replace(shard.path)
        shard.fd = -1

    # ---- extra files ----------------------------------------------------------------------------
    def _extra_path(self, relpath: str | Path) -> Path:
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"{relpath}: extra files must be relative paths inside the child directory")
        if self._state == "new":
            self.open()
        if self._state != "open":
            raise RuntimeError(f"{self.out_dir}: writer is {self._state}; cannot write {relpath}")
        assert self.tmp_dir is not None
        path = self.tmp_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self._written_files.add(rel.as_posix())
        return path

    def write_text(self, relpath: str | Path, text: str) -> Path:
        """Write a text file (README.md, genome.json, ...) into the child, committed with it.
        A file written here is not overwritten by the copy from ``source_dir`` (e.g. config.json)."""
        path = self._extra_path(relpath)
        path.write_text(text)
        return path

    def write_json(self, relpath: str | Path, obj) -> Path:
        """``write_text`` of ``obj`` as indented JSON."""
        return self.write_text(relpath, json.dumps(obj, indent=2) + "\n")

    def add_file(self, relpath: str | Path, src: str | Path) -> Path:
        """Copy an existing file into the child, committed with it."""
        path = self._extra_path(relpath)
        shutil.copyfile(src, path)
        return path

    # ---- commit ---------------------------------------------------------------------------------
    def commit(self) -> Path:
        """Finish the shards, write index/checksums/config/tokenizer and move the child into place."""
        if self._state == "committed":
            return self.out_dir
        if self._state == "new":
            self.open()
        if self._state != "open":
            raise RuntimeError(f"{self.out_dir}: writer is {self._state}; cannot commit")
        try:
            self._drain()
            if not self._names:
                raise ValueError(f"{self.out_dir}: no tensors were added; refusing to write an empty checkpoint")
            if self._reserved:
                missing = sorted(self._reserved)
                raise RuntimeError(
                    f"{self.out_dir}: {len(missing)} reserved tensor(s) were never filled, e.g. {missing[:5]}"
                )
            self._finish_files()
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        secs = time.perf_counter() - self._t0
        log.info(
            "wrote %s: %d tensors, %.2f GB in %d shard(s), %.1f s (%.0f MB/s)",
            self.out_dir, len(self._names), self._total_bytes / 1e9, len(self._shards), secs,
            self._total_bytes / 1e6 / max(secs, 1e-9),
        )
        return self.out_dir

    def _drain(self) -> None:
        if self._worker is not None:
            with self._cv:
                self._closing = True
                self._cv.notify_all()
            self._worker.join()
            self._worker = None
        self._raise_worker_error()

    def _finish_files(self) -> None:
        assert self.tmp_dir is not None
        for shard in self._shards:
            if shard.fd >= 0:
                self._close_shard(shard)
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for s in self._shards:
            final = SAFETENSORS_SINGLE if n == 1 else f"model-{s.index:05d}-of-{n:05d}.safetensors"
            s.path.rename(self.tmp_dir / final)
            s.path = self.tmp_dir / final
            weight_map.update(dict.fromkeys(s.entries, final))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.tmp_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        sums = {
            "algorithm": "sha256",
            "of": "each tensor's raw bytes as stored (C order, little-endian); see darwin_hydra.io.tensor_sha256",
            "tensors": dict(sorted(self.checksums.items())),
        }
        (self.tmp_dir / "checksums.json").write_text(json.dumps(sums, indent=2) + "\n")
        self._write_config()
        self._copy_support_files()
        if self.fsync:
            for p in [*self.tmp_dir.rglob("*"), self.tmp_dir]:
                _fsync_path(p)

    def _write_config(self) -> None:
        assert self.tmp_dir is not None
        if "config.json" in self._written_files:
            return
        config = self.config
        if config is None and self.source_dir is not None:
            src = self.source_dir / "config.json"
            if not src.is_file():
                raise FileNotFoundError(
                    f"{src}: source_dir has no config.json, so the child would not be loadable; "
                    "pass config=... or a source_dir with config.json"
                )
            config = json.loads(src.read_text())
        if config is None:
            log.warning("%s: no source_dir or config given: the child has no config.json", self.out_dir)
            return
        config = dict(config)
        if self.dtype is not None:
            name = str(self.dtype).removeprefix("torch.")
            config["dtype"] = name
            config.pop("torch_dtype", None)
            for key, sub in list(config.items()):
                if isinstance(sub, dict) and ("dtype" in sub or "torch_dtype" in sub):
                    sub = dict(sub)
                    sub.pop("torch_dtype", None)
                    sub["dtype"] = name
                    config[key] = sub
        (self.tmp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _copy_support_files(self) -> None:
        assert self.tmp_dir is not None
        if self.source_dir is None:
            return
        import fnmatch

        code = remote_code_files(self.source_dir)
        for src in sorted(self.source_dir.iterdir()):
            if not src.is_file() or src.name == "config.json" or src.name in self._written_files:
                continue
            if src.name in code or any(fnmatch.fnmatch(src.name, pat) for pat in SUPPORT_FILES):
                shutil.copyfile(src, self.tmp_dir / src.name)

    def _move_into_place(self) -> None:
        assert self.tmp_dir is not None
        try:
            self._rename_into_place()
        finally:
            if self.fsync:
                _fsync_path(self.out_dir.parent)

    def _rename_into_place(self) -> None:
        assert self.tmp_dir is not None
        if not self.out_dir.exists():
            os.rename(self.tmp_dir, self.out_dir)
            return
        if not self.overwrite:
            raise FileExistsError(f"{self.out_dir} appeared while writing; pass overwrite=True to replace it")
        if _exchange(self.tmp_dir, self.out_dir):
            shutil.rmtree(self.tmp_dir, ignore_errors=True)  # now holds the previous out_dir
        else:
            old = self.out_dir.parent / f"{self.out_dir.name}.old-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.out_dir, old)
            os.rename(self.tmp_dir, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        log.info("replaced the previous %s", self.out_dir)


def _fsync_path(p: Path) -> None:
    """fsync a file or directory (durability across power loss; a kill alone loses nothing)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def glob_escape(s: str) -> str:
    """``s`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", s)
