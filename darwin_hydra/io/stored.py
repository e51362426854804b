"""A safetensors tensor left in its file (``StoredTensor``), read a flat element range at a time:
what ``CheckpointReader.stored(name)`` returns."""

from __future__ import annotations

import mmap
import os
import threading
from typing import TYPE_CHECKING

import torch

from darwin_hydra.io.format import TensorEntry, pread_into

if TYPE_CHECKING:
    from darwin_hydra.io.reader import CheckpointReader

_read_tls = threading.local()  # StoredTensor.read's per-thread buffer


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
