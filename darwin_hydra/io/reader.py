"""Streaming checkpoint reads: one tensor at a time, from the headers alone.

``CheckpointReader`` opens a checkpoint directory (one ``model.safetensors``, a sharded
``model.safetensors.index.json``, or, only when allowed, pickled ``pytorch_model*.bin``) from its
headers alone; ``get(name)`` then reads that one tensor with a single ``pread`` into fresh memory,
``stored(name)`` leaves it in its file to be read a range at a time (``StoredTensor``).
"""

from __future__ import annotations

import difflib
import json
import logging
import mmap
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from darwin_hydra.io.fingerprint import fingerprint
from darwin_hydra.io.format import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TensorEntry,
    empty_for,
    pread_into,
    read_header,
    tensor_bytes,
)
from darwin_hydra.io.stored import StoredTensor

__all__ = ["CheckpointReader", "PickleRefusedError", "StoredTensor"]

log = logging.getLogger(__name__)

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


class PickleRefusedError(ValueError):
    """A checkpoint holds only pickled weights and ``allow_pickle`` is off."""


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

    def __init__(self, path: str | Path, allow_pickle: bool = False, rename=None):
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
        # the name mapping of a mixed layout (io/layouts.py): every name as the father's layout calls it
        self.renamed_from: dict[str, str] = {}
        if rename is not None:
            self._rename(rename)

    def _rename(self, rename) -> None:
        """Name every tensor ``rename(name)`` (None: leave it out), e.g. a text-only checkpoint's
        ``model.layers.*`` as a multimodal father's ``model.language_model.layers.*``."""
        import dataclasses

        names, entries, pickled = [], {}, {}
        for old in self.names:
            new = rename(old)
            if new is None:
                continue
            if new in self.renamed_from or (new in entries or new in pickled):
                raise ValueError(f"{self.path}: two tensors take the name {new!r} under the layout mapping")
            names.append(new)
            if new != old:
                self.renamed_from[new] = old
            if self.format == "safetensors":
                entries[new] = dataclasses.replace(self._entries[old], name=new)
            else:
                pickled[new] = self._pickled[old]
                if old in self._pickle_file:
                    self._pickle_file[new] = self._pickle_file[old]
        self.names = names
        if self.format == "safetensors":
            self._entries = entries
        else:
            self._pickled = pickled

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

    def byte_ranges(self, name: str, spans: Iterable[tuple[int, int]]) -> Iterator[memoryview]:
        """The raw bytes of ``name`` at each ``(offset, size)`` of ``spans`` (offsets within the
        tensor's bytes), one fresh buffer a span (what ``fingerprint`` hashes)."""
        n = self.nbytes(name)
        if self.format == "pickle":
            raw = tensor_bytes(self._pickled_tensor(name).contiguous())
        else:
            e = self.entry(name)
        for off, size in spans:
            if not 0 <= off <= off + size <= n:
                raise IndexError(f"tensor {name!r}: bytes [{off}, {off + size}) outside 0..{n}")
            if self.format == "pickle":
                yield raw[off : off + size]
                continue
            buf = memoryview(bytearray(size))
            pread_into(self._fd(e.file), buf, e.start + off, e.file, f"tensor {name!r}")
            yield buf

    def fingerprint(self, full: bool | None = None) -> str:
        """A stable 16-hex-digit identity of the weights, not of the file layout (``io.fingerprint``:
        all bytes of a model up to 64 MiB or with ``full=True``, else 4 windows of 4 KiB a tensor).
        Cached per reader."""
        if full is None and self._fingerprint is not None:
            return self._fingerprint
        digest = fingerprint(self, full)
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
