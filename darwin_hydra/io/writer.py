"""The child checkpoint, written as sharded safetensors, atomically.

``CheckpointWriter.reserve`` places each tensor in the shard layout up front and returns its
``WriteSlot``; any thread or (forked) process then writes the bytes there (``write_slot``, or a
piece at a time with ``SlotWriter``) and reports the sha256 with ``fill``. ``commit`` finishes the
shards, writes the index, ``checksums.json``, config and support files, and renames the directory
into place (``atomic.AtomicDirectory``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from darwin_hydra.io.atomic import AtomicDirectory
from darwin_hydra.io.format import (
    CODES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    entry_json_len,
    header_bytes,
    pwrite_all,
    tensor_bytes,
)
from darwin_hydra.io.support_files import support_files

__all__ = ["CheckpointWriter", "SlotWriter", "WriteSlot", "storable", "write_slot"]

log = logging.getLogger(__name__)


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


class CheckpointWriter:
    """Write a child checkpoint as sharded safetensors, atomically.

    Use as a context manager::

        with CheckpointWriter(run_dir / "child", max_shard_bytes=2e9, source_dir=father.path) as w:
            slots = {name: w.reserve(name, dtype, shape) for name, dtype, shape in layout}
            for name, t in tensors:  # in any order, from any thread or forked process
                w.fill(name, write_slot(slots[name], storable(name, t, w.dtype)))
            w.write_text("README.md", card)
        # out_dir now holds model-0000i-of-0000N.safetensors (or model.safetensors), the index,
        # checksums.json, config.json, generation_config.json and the tokenizer files of source_dir

    The layout follows ``reserve`` order: a shard is full as soon as the next tensor would take it
    past ``max_shard_bytes`` (a tensor larger than that gets a shard of its own) or its header past
    ``HEADER_RESERVE``. Bytes go straight into the shard files, each tensor at its place, so memory
    stays at the tensors in flight, never a whole shard; shards get their headers at ``commit``.

    ``dtype``: floating-point tensors are stored as it (and config.json's ``dtype`` says so);
    integer and bool tensors as they are. ``config``: a dict written as config.json instead of
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
        self.fsync = fsync
        self.tmp_dir: Path | None = None
        self.checksums: dict[str, str] = {}
        self._dir = AtomicDirectory(self.out_dir, overwrite=overwrite, fsync=fsync)
        self._names: set[str] = set()
        self._shards: list[_Shard] = []
        self._total_bytes = 0
        self._written_files: set[str] = set()
        self._state = "new"  # new -> open -> committed | aborted
        self._lock = threading.Lock()
        self._reserved: set[str] = set()  # reserved and not yet filled
        self._t0 = 0.0

    # ---- lifecycle ------------------------------------------------------------------------------
    def open(self) -> CheckpointWriter:
        """Create the temporary directory (done by ``with`` and by the first ``reserve``)."""
        if self._state != "new":
            return self
        self.tmp_dir = self._dir.create()
        self._state = "open"
        self._t0 = time.perf_counter()
        log.debug("writing %s via %s", self.out_dir, self.tmp_dir)
        return self

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
        for s in self._shards:
            if s.fd >= 0:
                os.close(s.fd)
                s.fd = -1
        self._dir.discard()
        self._state = "aborted"

    def __del__(self) -> None:
        # A writer dropped without commit is abandoned: leave nothing behind.
        try:
            if self._state == "open":
                self.abort()
        except Exception:
            pass

    # ---- tensors --------------------------------------------------------------------------------
    def reserve(self, name: str, dtype: torch.dtype, shape) -> WriteSlot:
        """Place tensor ``name`` (as stored: ``dtype``, ``shape``) in the layout now, and return where
        its bytes go; then write them with ``write_slot`` (from any process) and report the returned
        sha256 with ``fill``. The layout depends only on the order of ``reserve`` calls; tensors may
        then be written in any order, at once. ``commit`` refuses a tensor reserved and never filled."""
        if dtype not in CODES:
            raise TypeError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        if self.dtype is not None and dtype.is_floating_point and dtype != self.dtype:
            raise ValueError(f"{name}: reserved as {dtype}, but this writer stores floating tensors as {self.dtype}")
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor name must be a non-empty str, got {name!r}")
        shape = tuple(int(d) for d in shape)
        with self._lock:
            if self._state == "new":
                self.open()
            if self._state != "open":
                raise RuntimeError(f"{self.out_dir}: writer is {self._state}; cannot add {name!r}")
            if name in self._names:
                raise ValueError(f"{self.out_dir}: tensor {name!r} added twice")
            self._names.add(name)
            nbytes = math.prod(shape) * dtype.itemsize
            shard, begin = self._place(name, CODES[dtype], shape, nbytes)
            self._reserved.add(name)
            return WriteSlot(name, str(shard.path), 8 + self.HEADER_RESERVE + begin, nbytes, dtype, shape)

    def fill(self, name: str, sha256: str) -> None:
        """Record that reserved tensor ``name`` was written (``write_slot`` returned ``sha256``)."""
        with self._lock:
            if name not in self._reserved:
                raise KeyError(f"{self.out_dir}: tensor {name!r} was not reserved (or was filled already)")
            self._reserved.discard(name)
            self.checksums[name] = sha256

    def _new_shard(self) -> _Shard:
        assert self.tmp_dir is not None
        index = len(self._shards) + 1
        path = self.tmp_dir / f"model-{index:05d}.safetensors.partial"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        shard = _Shard(index, path, fd)
        self._shards.append(shard)
        return shard

    def _place(self, name: str, code: str, shape: tuple[int, ...], nbytes: int) -> tuple[_Shard, int]:
        """The shard and data offset of the next tensor; a shard is full when the tensor would take it
        past ``max_shard_bytes`` or its header past ``HEADER_RESERVE`` (it gets its header at commit)."""
        shard = self._shards[-1] if self._shards and not self._shards[-1].full else None
        if shard is not None:
            entry_len = entry_json_len(name, code, shape, shard.data_bytes, shard.data_bytes + nbytes)
            if (shard.data_bytes + nbytes > self.max_shard_bytes and shard.entries) or (
                shard.header_estimate + entry_len > self.HEADER_RESERVE
            ):
                shard.full = True
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
            if not self._names:
                raise ValueError(f"{self.out_dir}: no tensors were added; refusing to write an empty checkpoint")
            if self._reserved:
                missing = sorted(self._reserved)
                raise RuntimeError(
                    f"{self.out_dir}: {len(missing)} reserved tensor(s) were never filled, e.g. {missing[:5]}"
                )
            self._finish_files()
            self._dir.commit()
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
        for src in support_files(self.source_dir):
            if src.name != "config.json" and src.name not in self._written_files:
                shutil.copyfile(src, self.tmp_dir / src.name)
