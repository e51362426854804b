"""One tensor of each parent, a chunk at a time: what every merge kernel reads and writes.

``Parents`` holds the father's, mother's (and base's) tensor flat on the merge device, or left in
their files (``io.reader.StoredTensor``, read a range at a time); ``load(s, e)`` gives a ``Chunk``
of float32 copies in per-thread buffers. Every chunk op writes into a few such buffers (no
allocation, and the working set stays a few MiB, in cache): measured ~2x faster than allocating
results on a CPU. The NaN/Inf check of a merge sums the chunks it produces (``add_to_check``) and
counts exactly only when that sum is not finite.
"""

from __future__ import annotations

import threading

import torch

from darwin_hydra.merge.select import sample_positions

__all__ = [
    "CHUNK_CPU",
    "CHUNK_CUDA",
    "Chunk",
    "NonFiniteTensorError",
    "Parents",
    "check_finite",
    "check_finite_chunked",
    "is_stored",
    "thread_buffer",
]

CHUNK_CPU = 1 << 18  # 1 MiB of float32 per operand: a chunk's working set stays in L2/L3
CHUNK_CUDA = 1 << 22


class NonFiniteTensorError(ValueError):
    """A parent tensor holds NaN or Inf."""


# per-thread buffers, reused chunk after chunk (``thread_buffer``); a chunk's scratch buffers by index
_tls = threading.local()
_SCRATCH = tuple(f"s{i}" for i in range(10))


def thread_buffer(tag: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable buffer ``tag`` with at least ``n`` elements (a view of n)."""
    try:
        bufs = _tls.bufs
    except AttributeError:
        bufs = _tls.bufs = {}
    key = (tag, dtype, device)
    t = bufs.get(key)
    if t is None or t.numel() < n:
        t = torch.empty(n, dtype=dtype, device=device)
        if n <= 4 * CHUNK_CUDA:  # keep ordinary sizes; a huge one-off (a 1-D DELLA row) is freed after use
            bufs[key] = t
    # most chunks are full: the buffer itself, without a fresh view (~2 us a call, ~12 calls a chunk)
    return t if t.numel() == n else t[:n]


class Chunk:
    """One chunk [s, e) of father (a), mother (b), base (c; None = the father), as float32 scratch
    buffers. ``da()``/``db()`` turn a/b into deltas in place (a is then no longer the father)."""

    __slots__ = ("s", "e", "a", "b", "c", "bits", "tag", "_da", "_db")

    def __init__(self, s, e, a, b, c, tag):
        self.s, self.e, self.a, self.b, self.c, self.tag = s, e, a, b, c, tag
        self.bits = None  # 32 random bits per element (masks.uniform_bits), drawn by random methods
        self._da = self._db = False

    @property
    def base(self) -> torch.Tensor:
        if self.c is None and self._da:
            raise RuntimeError("the father's chunk was turned into a delta")
        return self.a if self.c is None else self.c

    def da(self) -> torch.Tensor:
        """A - base, in a's buffer (only with a real base: without one dA = 0)."""
        if not self._da:
            self.a.sub_(self.c)
            self._da = True
        return self.a

    def db(self) -> torch.Tensor:
        """B - base, in b's buffer."""
        if not self._db:
            self.b.sub_(self.base)
            self._db = True
        return self.b

    def scratch(self, i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return thread_buffer(_SCRATCH[i], self.e - self.s, dtype, self.a.device)


def is_stored(t) -> bool:
    """A tensor left in its file (``io.reader.StoredTensor``: ``read(start, stop)``), not in memory."""
    return t is not None and not isinstance(t, torch.Tensor) and hasattr(t, "read")


def _span(flat, s: int, e: int) -> torch.Tensor:
    """Elements [s, e) of a flat tensor or of a ``StoredTensor`` (read from its file)."""
    return flat.read(s, e) if is_stored(flat) else flat[s:e]


def _gather(flat, s: int, e: int, at: torch.Tensor) -> torch.Tensor:
    """Elements s + ``at`` (CPU indices) of a flat tensor or ``StoredTensor``, as float32 on the CPU."""
    span = _span(flat, s, e)
    return span[at.to(span.device)].float().cpu()


class Parents:
    """One tensor of each parent, flat, on the merge device; yields float32 chunks.

    A parent may be a ``StoredTensor`` (recipes that ``streams``: the export, and search trials): its
    chunks are then read from the file as they are needed (on the CPU, then copied to a CUDA device's
    chunk buffer)."""

    def __init__(self, father, mother, base, device, name: str = "tensor"):
        self.name = name
        self.shape = tuple(father.shape)
        self.device = torch.device(device)
        self.roles = {"father": father, "mother": mother, "base": base}

        def flat(t):
            if t is None or is_stored(t):  # read a chunk at a time on the CPU, copied to the device in load()
                return t
            return t.reshape(-1).to(self.device)

        self.a, self.b, self.c = flat(father), flat(mother), flat(base)
        self.stored = any(is_stored(t) for t in (father, mother, base))
        self.n = self.a.numel()
        self.chunk = CHUNK_CUDA if self.device.type == "cuda" else CHUNK_CPU
        self.row_aligned = False  # set by methods that work per row (della)
        self._sum = None

    @property
    def rows(self) -> tuple[int, int]:
        """(rows, cols) of the leading-axis view (a 0-d or 1-D tensor: one column per element)."""
        if len(self.shape) == 0:
            return 1, 1
        r = self.shape[0]
        return r, (self.n // r if r else 0)

    def ranges(self):
        size = self.chunk
        if self.row_aligned:
            cols = max(self.rows[1], 1)
            size = max(1, size // cols) * cols
        return [(s, min(self.n, s + size)) for s in range(0, self.n, size)]

    def load(self, s: int, e: int, tag: str = "", check: tuple[str, ...] = ()) -> Chunk:
        """Chunk [s, e) in this thread's buffers ``tag``; ``check``: the inputs ("a", "b", "c") to
        add to the finite check (those the kernel does not read; see ``add_to_check``)."""
        n = e - s

        def get(src, t: str):
            if src is None:
                return None
            return thread_buffer(t + tag, n, torch.float32, self.device).copy_(_span(src, s, e))

        a, b, c = get(self.a, "a"), get(self.b, "b"), get(self.c, "c")
        for x in (a if "a" in check else None, b if "b" in check else None, c if "c" in check else None):
            if x is not None:
                self.add_to_check(x)
        return Chunk(s, e, a, b, c, tag)

    def add_to_check(self, x: torch.Tensor) -> None:
        """Add ``x``'s sum to the finite check. The merge adds every output chunk (float32, before the
        cast): NaN and Inf propagate through the kernels' arithmetic (a dropped entry is multiplied
        by 0, and 0 x Inf = NaN), so one sum covers every input the output depends on; a kernel names
        the inputs it ignores or drops whole (``kernels.method_kernel``), and their chunks are added here too."""
        t = x.sum()
        self._sum = t if self._sum is None else self._sum + t

    def chunks(self):
        for s, e in self.ranges():
            yield self.load(s, e)

    def check_finite(self) -> None:
        """Raise ``NonFiniteTensorError`` naming the tensor and the parent when the summed chunks
        were not finite (and an exact count confirms it: huge finite values may overflow a sum)."""
        if self._sum is None or bool(torch.isfinite(self._sum)):
            return
        for role, t in self.roles.items():
            if t is None:
                continue
            if is_stored(t):  # a chunk at a time: an overflowing but finite merge loads nothing whole
                check_finite_chunked(t, role, self.name)
            else:
                check_finite(t, role, self.name)

    def samples(self, which: list[str]) -> dict[str, torch.Tensor]:
        """|dA| ("a") and/or |dB| ("b") at ``select.sample_positions(n)``."""
        pos = sample_positions(self.n, self.device)
        if not self.stored:
            base = (self.a if self.c is None else self.c)[pos].float()
            return {w: ((self.a if w == "a" else self.b)[pos].float() - base).abs_() for w in which}
        # parents in their files: one pass over the chunks, gathering the (ascending) positions each
        # holds straight from the bytes read, before converting (the same float32 differences as
        # above; converting whole chunks for ~1% of their entries cost ties 3% of its CPU at the
        # benchmark's size). Gathered on the CPU, where the bytes are read; then moved to the device.
        pos = pos.cpu()
        out = {w: torch.empty(pos.numel(), dtype=torch.float32) for w in which}
        base = self.a if self.c is None else self.c
        ranges = self.ranges()
        cuts = torch.searchsorted(pos, torch.tensor([s for s, _ in ranges] + [self.n], dtype=pos.dtype)).tolist()
        for (s, e), lo, hi in zip(ranges, cuts[:-1], cuts[1:]):
            if lo == hi:
                continue
            at = pos[lo:hi] - s
            c = _gather(base, s, e, at)  # a read is valid until the thread's next one: gather first
            for w in which:
                torch.sub(_gather(self.a if w == "a" else self.b, s, e, at), c, out=out[w][lo:hi]).abs_()
        return {w: v.to(self.device) for w, v in out.items()}


def _non_finite(role: str, name: str, n_nan: int, n_inf: int) -> NonFiniteTensorError:
    return NonFiniteTensorError(
        f"{role} tensor {name!r} holds {n_nan} NaN and {n_inf} Inf values: fix or replace that checkpoint before merging"
    )


def check_finite(t: torch.Tensor, role: str, name: str) -> None:
    """Raise ``NonFiniteTensorError`` if floating ``t`` holds NaN or Inf, naming ``role`` and ``name``."""
    if not t.is_floating_point():
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        raise _non_finite(role, name, n_nan, int(bad.sum()) - n_nan)


def check_finite_chunked(t, role: str, name: str) -> None:
    """As ``check_finite``, a chunk at a time: a float32 sum per chunk, and only when their total is
    not finite a second pass that counts exactly. ``t``: a tensor, or a ``StoredTensor`` (read from
    its file; never loaded whole)."""
    if not t.is_floating_point():
        return
    n = t.numel()
    src = t if is_stored(t) else t.reshape(-1)
    device = torch.device("cpu") if is_stored(t) else src.device

    def chunks():
        for s in range(0, n, CHUNK_CPU):
            e = min(n, s + CHUNK_CPU)
            yield thread_buffer("a", e - s, torch.float32, device).copy_(_span(src, s, e))

    total = None
    for x in chunks():
        total = x.sum() if total is None else total + x.sum()
    if total is None or bool(torch.isfinite(total)):
        return
    n_nan = n_bad = 0
    for x in chunks():
        n_nan += int(torch.isnan(x).sum())
        n_bad += int((~torch.isfinite(x)).sum())
    if n_bad:
        raise _non_finite(role, name, n_nan, n_bad - n_nan)
