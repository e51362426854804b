"""The merge engine: the per-tensor functions of ``methods`` in two modes.

- export (``merge_to_disk``): the child's shard layout is reserved first; then a pool of workers
  (processes forked from this one on Linux, else threads) merges tensors a chunk at a time, from
  the parents' files straight into each tensor's place in the child's; memory is bounded by the
  workers' chunk buffers and the few tensors held whole (``max_inflight_bytes``), never the model.
- in memory (``InMemoryMerger``): the child written into an already loaded model's parameters
  (through ``darwin_hydra.io.layout.param_views``, fused MoE experts included), for search trials.

Both call ``merge_named``: masks are a function of (genome_hash, tensor name, element index) and
whole-tensor statistics are exact or summed in a fixed order, and every merge kernel runs with one
intra-op thread (parallelism is across tensors): the same genome gives a bit-identical child
whatever the worker count or the order tensors are merged in.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Mapping

import torch

from darwin_hydra.merge.methods import NonFiniteTensorError, merge_tensor, streams
from darwin_hydra.merge.recipe import TensorRecipe, tensor_seed

__all__ = ["InMemoryMerger", "NonFiniteTensorError", "merge_named", "merge_to_disk", "resolve_device"]

log = logging.getLogger(__name__)

_section_lock = threading.Lock()
_section_users = 0
_section_saved: tuple[int, bool] = (1, True)


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available)."""
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"merge.device={device!r} but torch sees no CUDA device; use merge.device=cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"merge.device={device!r}: use cpu, cuda, cuda:N or auto")
    return torch.device(device)


def resolve_workers(workers: int) -> int:
    """``workers`` threads, 0 = one per available core."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def merging():
    """What every merge runs under, restored afterwards (nesting and concurrent merges count):

    - torch ops with one intra-op thread: kernels are parallel across tensors, and a reduction
      split over a varying thread count would change the last bits;
    - Python's cyclic garbage collector paused: a merge allocates some 40 short-lived tensors a
      chunk and no reference cycles, and the collector's passes over everything the process holds
      (torch's modules included) cost ~10% of an export (1.21 s against 1.35 s, medians of 8
      interleaved runs, scripts/bench_merge.py setup).
    """
    global _section_users, _section_saved
    with _section_lock:
        if _section_users == 0:
            _section_saved = (torch.get_num_threads(), gc.isenabled())
            torch.set_num_threads(1)
            gc.disable()
        _section_users += 1
    try:
        yield
    finally:
        with _section_lock:
            _section_users -= 1
            if _section_users == 0:
                threads, collecting = _section_saved
                torch.set_num_threads(threads)
                if collecting:
                    gc.enable()


def _init_worker() -> None:
    torch.set_num_threads(1)


def merge_named(
    name: str,
    father: torch.Tensor,
    mother: torch.Tensor,
    base: torch.Tensor | None,
    recipe: TensorRecipe,
    genome_hash: str,
    device: torch.device | str = "cpu",
    out_dtype: torch.dtype | None = None,
    sink=None,
) -> torch.Tensor | None:
    """``methods.merge_tensor`` with the mask seed of (genome_hash, name)."""
    seed = tensor_seed(genome_hash, name)
    return merge_tensor(father, mother, base, recipe, seed, name=name, device=device, out_dtype=out_dtype, sink=sink)


def _check_map(names: list[str], ratio_map: Mapping[str, TensorRecipe], others: dict) -> None:
    missing = [n for n in names if n not in ratio_map]
    if missing:
        raise KeyError(f"the ratio map has no recipe for {len(missing)} tensor(s), e.g. {missing[:5]}")
    for role, reader in others.items():
        if reader is None:
            continue
        absent = [n for n in names if n not in reader]
        if absent:
            raise KeyError(f"the {role} checkpoint {reader.path} lacks {len(absent)} tensor(s), e.g. {absent[:5]}")


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    t = getattr(torch, str(dtype), None)
    if not isinstance(t, torch.dtype) or not t.is_floating_point:
        raise ValueError(f"merge.dtype={dtype!r} is not a floating torch dtype (bfloat16, float16, float32)")
    return t


# Tensors submitted ahead, per worker (within max_inflight_bytes): a worker never waits for work.
# Each tensor holds nothing until a worker starts it (its output streams into its slot); those
# that do not stream hold their inputs and output while merged.
QUEUE_PER_WORKER = 8


def merge_to_disk(
    father,
    mother,
    base,
    ratio_map: Mapping[str, TensorRecipe],
    genome_hash: str,
    out_dir: str | Path,
    *,
    workers: int = 0,
    device: str = "cpu",
    max_shard_bytes: int = 2_000_000_000,
    extra_files: Mapping[str, str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
    max_inflight_bytes: int = 1 << 30,
    processes: bool | None = None,
) -> Path:
    """Stream the child of ``father``/``mother`` (and ``base``) ``CheckpointReader``s into ``out_dir``.

    The layout of the shards is reserved first, in the father's tensor order; then each tensor is
    merged under ``ratio_map[name]`` by one of ``workers`` (0 = one per core) and written straight
    into its place, in any order. A merged tensor (``methods.streams``: not a transplant) goes chunk
    by chunk from the parents' safetensors files to the child's on the CPU and holds no tensor in
    flight (a worker's chunk buffers, a few MB); a transplant, a CUDA merge or a pickled parent holds
    its inputs and its output (about 4 x its size), and no more than ``max_inflight_bytes`` of those
    are scheduled at once (one tensor always may). ``dtype`` (e.g. "bfloat16"): the child's floating
    dtype (default: the father's, transplants included).

    ``processes``: the workers are processes forked from this one instead of threads (True: even
    one worker; an error where fork is unavailable); None = processes on Linux for a CPU merge with
    2+ workers. Threads hold the GIL between torch's kernels, ~40 a chunk, and wait for each other
    there, and forked workers read the parents through mmap (a truncated parent kills a worker, not
    this process): processes took 0.81x (ties) and 0.99x (dare_ties) the threads' time on the 2-core
    benchmark (docs/merge.md).
    Both give the same files, bit for bit. With one worker, merging, hashing and writing take turns
    on one core (the export uses one core, as asked).

    Everything lands in ``out_dir`` atomically (``CheckpointWriter``), with ``checksums.json`` and
    ``extra_files`` (relative path -> text); on any error nothing named ``out_dir`` is left.
    """
    from tqdm.auto import tqdm

    from darwin_hydra.io.checkpoint import CheckpointWriter
    from darwin_hydra.faults import fault_point

    t0 = time.perf_counter()
    names = list(father.names)
    _check_map(names, ratio_map, {"mother": mother, "base": base})
    dev = resolve_device(device)
    out_dtype = _dtype(dtype)
    n_workers = resolve_workers(workers)
    forked = _use_processes(processes, dev, n_workers)

    readers = [r for r in (father, mother, base) if r is not None]
    # chunk-streamed merges read their parents straight from the files (methods.Parents), CPU only
    can_stream = dev.type == "cpu" and all(getattr(r, "format", None) == "safetensors" for r in readers)

    def streamed(name: str) -> bool:
        return can_stream and streams(ratio_map[name]) and father.dtype(name).is_floating_point

    def parent(reader, name: str, stream: bool):
        if reader is None:
            return None
        if not stream:
            return reader.get(name)
        t = reader.stored(name)
        t.prefetch()
        return t

    def stored_dtype(name: str) -> torch.dtype:
        dt = father.dtype(name)
        return (out_dtype or dt) if dt.is_floating_point else dt

    def job(name: str, slot) -> str:
        """Merge ``name`` into its reserved slot; its sha256. A streamed tensor goes a chunk at a
        time, with no output tensor."""
        from darwin_hydra.io.checkpoint import SlotWriter, storable, write_slot

        stream = streamed(name)
        # (merge_tensor returns an integer tensor as the father's, whatever out_dtype says)
        args = (parent(father, name, stream), parent(mother, name, stream), parent(base, name, stream),
                ratio_map[name], genome_hash, dev, stored_dtype(name))
        if not stream:
            return write_slot(slot, storable(name, merge_named(name, *args)))
        with SlotWriter(slot) as w:
            merge_named(name, *args, sink=w.write)
            for t in args[:3]:
                if t is not None:
                    t.release()  # a mapping reader's pages of this tensor (forked workers)
            return w.finish()

    roles = 3 if base is not None else 2

    def cost(name: str) -> int:
        """Bytes a tensor holds while merged: nothing when it streams from the parents' files into its
        slot (a worker's few MB of chunk buffers aside), else its inputs and its output."""
        if streamed(name):
            return 0
        nbytes = father.nbytes(name)
        return roles * nbytes + nbytes // father.dtype(name).itemsize * stored_dtype(name).itemsize

    total = sum(father.nbytes(n) for n in names)
    with merging(), CheckpointWriter(
        out_dir, max_shard_bytes=max_shard_bytes, source_dir=father.path, dtype=out_dtype, overwrite=overwrite
    ) as writer:
        bar = tqdm(total=total, desc="merge", unit="B", unit_scale=True, disable=not progress, leave=False)
        slots = {n: writer.reserve(n, stored_dtype(n), father.shape(n)) for n in names}
        done = _export(names, job, slots, cost, n_workers, max_inflight_bytes, forked, readers)
        try:
            for name, sha in done:
                writer.fill(name, sha)
                bar.update(father.nbytes(name))
                fault_point("export")
        finally:
            done.close()  # on an error: stop the workers before the writer removes its files
            bar.close()
        for rel, text in (extra_files or {}).items():
            writer.write_text(rel, text)
    dt = time.perf_counter() - t0
    log.info("merged %d tensors (%.2f GB) into %s in %.1f s (%d worker %s, %s)", len(names), total / 1e9, out_dir, dt,
             n_workers, "processes" if forked else "threads", dev)
    return Path(out_dir)


def _use_processes(processes: bool | None, dev: torch.device, n_workers: int) -> bool:
    """Whether the export forks worker processes (``merge_to_disk``'s ``processes``)."""
    if processes is False or (processes is None and n_workers < 2):
        return False
    if dev.type != "cpu":
        if processes:
            raise ValueError(f"merge.processes=true merges on the CPU only (merge.device={dev}); use threads")
        return False
    can_fork = sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods()
    if multiprocessing.current_process().daemon:  # a daemonic process may not have children
        can_fork = False
    if processes and not can_fork:
        raise ValueError(
            f"merge.processes=true needs fork on Linux, outside a daemonic process (this is {sys.platform}): "
            "set it to null or false"
        )
    return can_fork


# In a forked export worker: (job, slots) of the merge that forked it (set by _forked_init).
_forked_export = None


def _forked_init(job, slots, parent: int, readers) -> None:
    global _forked_export
    _forked_export = (job, slots)
    for r in readers:  # a worker may die of a truncated parent (SIGBUS): the export then stops with an error
        if getattr(r, "format", None) == "safetensors":
            r.map_files()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler inherited from the parent: terminate() ends us
    _die_with_parent(parent)
    torch.set_num_threads(1)


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this worker when the merging process dies (killed, out of memory): its
    pipes stay open in the other workers, so an orphaned worker would otherwise wait forever."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        failed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: an export worker may outlive a killed merge")
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _forked_job(name: str) -> str:
    """Merge ``name`` into its slot; its sha256. An error that cannot cross the pipe (an exception
    that does not unpickle) comes back as a RuntimeError with its type and message."""
    job, slots = _forked_export
    try:
        return job(name, slots[name])
    except Exception as e:
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:
            raise RuntimeError(f"{type(e).__name__}: {e}") from None
        raise


def _export(names, job, slots, cost, n_workers: int, max_inflight_bytes: int, forked: bool, readers=()):
    """Merge every tensor into its reserved slot on ``n_workers`` threads, or processes forked from
    this one (``forked``); yield (name, sha256) as each is written, in any order. Forked workers get
    the job and the parents' readers by fork, not pickling: only names and digests cross the pipes."""
    if forked:
        pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=multiprocessing.get_context("fork"),
                                   initializer=_forked_init, initargs=(job, slots, os.getpid(), readers))

        def submit(name):
            with warnings.catch_warnings():  # Python 3.12+ warns on any fork of a threaded process;
                # the workers only merge, read and write files (no locks of other threads)
                warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
                return pool.submit(_forked_job, name)
    else:
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="merge", initializer=_init_worker)

        def submit(name):
            return pool.submit(job, name, slots[name])

    running: dict = {}
    ok = False
    try:
        inflight = 0
        it = iter(names)
        pending = next(it, None)
        while pending is not None or running:
            while pending is not None and (
                not running
                or (len(running) < QUEUE_PER_WORKER * n_workers and inflight + cost(pending) <= max_inflight_bytes)
            ):
                c = cost(pending)
                running[submit(pending)] = (pending, c)
                inflight += c
                pending = next(it, None)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name, c = running[fut]
                try:
                    sha = fut.result()
                except BrokenProcessPool:
                    raise
                except Exception as e:
                    e.add_note(f"(while merging tensor {name!r})")
                    raise
                del running[fut]
                inflight -= c
                yield name, sha
        ok = True
    except BrokenProcessPool as e:
        queued = [n for n, _ in running.values()]
        raise RuntimeError(
            f"an export worker process died (killed, out of memory, or a parent's file truncated while it was "
            f"read?) with {len(queued)} tensor(s) submitted, e.g. {queued[:4]}; nothing was written to the output "
            "directory"
        ) from e
    finally:
        for fut in running:
            fut.cancel()
        if forked and not ok:  # an error or Ctrl-C: stop the workers now rather than after their tensors
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


class InMemoryMerger:
    """Writes children into one loaded model, trial after trial.

    ``father``/``mother``/``base``: name -> tensor (canonical on-disk names), read once, checked
    for NaN/Inf once, and kept (on ``device`` when it is CUDA, unless ``parents_on_device=False``).
    ``apply`` re-merges only the tensors whose recipe changed since the last call (or whose random
    masks changed with the genome hash) and copies them into the model's parameters in place.

    Speed: a small model (at most ``BATCH_MAX_ELEMENTS`` floats) is also kept concatenated, and
    dare_ties / dare_linear / task_arithmetic recipes (Darwin's genome) are merged for all tensors
    at once (``batched``: one trial is ~30 torch calls instead of ~40 a tensor); other recipes, and
    big models, go tensor by tensor, over ``workers`` threads (0 = one per core) when there is
    enough work. Both paths give the same bits as ``merge_to_disk``.
    """

    PARALLEL_MIN_ELEMENTS = 1 << 22
    BATCH_MAX_ELEMENTS = 1 << 22

    def __init__(
        self,
        model,
        father: Mapping[str, torch.Tensor],
        mother: Mapping[str, torch.Tensor],
        base: Mapping[str, torch.Tensor] | None = None,
        device: str = "cpu",
        workers: int = 0,
        parents_on_device: bool | None = None,
    ):
        from darwin_hydra.io.layout import param_views
        from darwin_hydra.merge.batched import BatchedParents
        from darwin_hydra.merge.methods import check_finite

        self.model = model
        self.views = param_views(model)
        self.device = resolve_device(device)
        stage = self.device.type == "cuda" if parents_on_device is None else parents_on_device

        def keep(tensors):
            if tensors is None:
                return None
            return {n: (t.to(self.device) if stage else t) for n, t in tensors.items()}

        self.father, self.mother, self.base = keep(father), keep(mother), keep(base)
        missing = sorted(set(self.views) - set(self.father))
        extra = sorted(set(self.father) - set(self.views))
        if missing or extra:
            raise KeyError(
                f"the loaded model and the parents' tensors differ: model-only {missing[:5]}, parents-only {extra[:5]}"
            )
        for role, tensors in (("father", self.father), ("mother", self.mother), ("base", self.base)):
            if tensors is None:
                continue
            if set(tensors) != set(self.father):
                raise KeyError(f"the {role}'s tensors differ from the father's: {sorted(set(tensors) ^ set(self.father))[:5]}")
            for n, t in tensors.items():  # once here, so that no trial pays for it
                check_finite(t, role, n)
        floats = [n for n in self.views if self.father[n].is_floating_point()]
        small = sum(self.father[n].numel() for n in floats) <= self.BATCH_MAX_ELEMENTS
        self.batch = BatchedParents(floats, self.father, self.mother, self.base, self.device) if small and floats else None
        self.workers = resolve_workers(workers)
        self._last: dict[str, tuple] = {}
        self.merged_last = 0
        self.seconds_last = 0.0

    def _merge(self, name: str, recipe: TensorRecipe, genome_hash: str) -> None:
        out = merge_named(
            name,
            self.father[name],
            self.mother[name],
            self.base[name] if self.base is not None else None,
            recipe,
            genome_hash,
            self.device,
        )
        self.views[name].copy_(out)

    @torch.no_grad()
    def apply(self, ratio_map: Mapping[str, TensorRecipe], genome_hash: str) -> int:
        """Write the child of ``ratio_map`` into the model; returns how many tensors were re-merged."""
        from darwin_hydra.merge.batched import batchable

        t0 = time.perf_counter()
        todo = []
        for name in self.views:
            recipe = ratio_map[name]
            key = (recipe, genome_hash if recipe.random else None)
            if self._last.get(name) != key:
                todo.append((name, recipe, key))
        groups: dict[tuple, dict[str, TensorRecipe]] = {}
        single = []
        for name, recipe, _ in todo:
            group = batchable(recipe) if self.batch is not None and name in self.batch.index else None
            if group is None:
                single.append((name, recipe))
            else:
                groups.setdefault(group, {})[name] = recipe
        work = sum(self.father[n].numel() for n, _ in single)
        try:
            with merging():
                for recipes in groups.values():
                    for name, out in self.batch.merge(recipes, genome_hash).items():
                        self.views[name].copy_(out.view(self.views[name].shape))
                if self.workers > 1 and work >= self.PARALLEL_MIN_ELEMENTS and len(single) > 1:
                    with ThreadPoolExecutor(self.workers, thread_name_prefix="merge", initializer=_init_worker) as pool:
                        futs = [pool.submit(self._merge, n, r, genome_hash) for n, r in single]
                        for f in futs:
                            f.result()
                else:
                    for n, r in single:
                        self._merge(n, r, genome_hash)
        except BaseException:
            for n, _, _ in todo:  # some of these now hold a partial child: merge them again next time
                self._last.pop(n, None)
            raise
        for n, _, key in todo:
            self._last[n] = key
        self.merged_last = len(todo)
        self.seconds_last = time.perf_counter() - t0
        return len(todo)
