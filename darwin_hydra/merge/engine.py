"""The merge engine: the per-tensor functions of ``methods`` in two modes.

- export (``merge_to_disk``): the child's shard layout is reserved first; then a pool of workers
  (processes forked from this one on Linux, else threads) merges tensors a chunk at a time, from
  the parents' files straight into each tensor's place in the child's; memory is bounded by the
  workers' chunk buffers and the few tensors held whole (``max_inflight_bytes``), never the model.
- in memory (``InMemoryMerger``): the child written into an already loaded model's parameters
  (through ``darwin_hydra.io.layout.param_views``, fused MoE experts included), for search trials;
  the parents stay in their files there too, and a trial streams only the tensors it re-merges.

Both call ``merge_named``: masks are a function of (genome_hash, tensor name, element index) and
whole-tensor statistics are exact or summed in a fixed order, and every merge kernel runs with one
intra-op thread (parallelism is across tensors): the same genome gives a bit-identical child
whatever the worker count or the order tensors are merged in.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from darwin_hydra.merge.methods import NonFiniteTensorError, merge_tensor, streams
from darwin_hydra.merge.recipe import TensorRecipe, tensor_seed
from darwin_hydra.merge.workers import init_worker, run_jobs, use_processes

__all__ = ["InMemoryMerger", "NonFiniteTensorError", "ParentTensors", "merge_named", "merge_to_disk", "resolve_device"]

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
        # a tensor the recipe takes whole from the father needs nothing of the others
        absent = [n for n in names if n not in reader and not _father_only(ratio_map[n])]
        if absent:
            raise KeyError(f"the {role} checkpoint {reader.path} lacks {len(absent)} tensor(s), e.g. {absent[:5]}")


def _father_only(recipe: TensorRecipe) -> bool:
    return recipe.transplant_side() == "father" and not recipe.rows_from


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    t = getattr(torch, str(dtype), None)
    if not isinstance(t, torch.dtype) or not t.is_floating_point:
        raise ValueError(f"merge.dtype={dtype!r} is not a floating torch dtype (bfloat16, float16, float32)")
    return t




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

    from darwin_hydra.io.writer import CheckpointWriter
    from darwin_hydra.faults import fault_point

    t0 = time.perf_counter()
    names = list(father.names)
    _check_map(names, ratio_map, {"mother": mother, "base": base})
    dev = resolve_device(device)
    out_dtype = _dtype(dtype)
    n_workers = resolve_workers(workers)
    forked = use_processes(processes, dev, n_workers)

    readers = [r for r in (father, mother, base) if r is not None]
    # chunk-streamed merges read their parents straight from the files (chunks.Parents), CPU only
    can_stream = dev.type == "cpu" and all(getattr(r, "format", None) == "safetensors" for r in readers)

    def streamed(name: str) -> bool:
        return can_stream and streams(ratio_map[name]) and father.dtype(name).is_floating_point

    def parent(reader, name: str, stream: bool):
        if reader is None or (reader is not father and _father_only(ratio_map[name])):
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
        from darwin_hydra.io.writer import SlotWriter, storable, write_slot

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
        done = run_jobs(names, job, slots, cost, n_workers, max_inflight_bytes, forked, readers)
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


class ParentTensors:
    """One parent as the in-memory mode reads it: a ``CheckpointReader`` left in its files (a tensor
    is a ``StoredTensor``, read a chunk at a time through the page cache when merged, never copied
    whole) or a mapping name -> tensor held in memory (tests, small callers)."""

    def __init__(self, source, role: str, device: torch.device | None = None):
        self.role = role
        self.absent: set[str] = set()  # the model's tensors this parent lacks (set by InMemoryMerger)
        self.reader = source if hasattr(source, "stored") else None
        self.tensors = None
        if self.reader is None:
            self.tensors = {n: (t.to(device) if device is not None else t) for n, t in source.items()}

    def __contains__(self, name: str) -> bool:
        return name in (self.reader if self.reader is not None else self.tensors)

    def names(self) -> list[str]:
        return list(self.reader.names) if self.reader is not None else list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.reader.shape(name) if self.reader is not None else self.tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.dtype(name) if self.reader is not None else self.tensors[name].dtype

    def tensor(self, name: str):
        """What ``merge_named`` takes: the stored tensor (safetensors), else the tensor itself."""
        if self.reader is None:
            return self.tensors[name]
        return self.reader.stored(name) if self.reader.format == "safetensors" else self.reader.get(name)

    def whole(self, name: str) -> torch.Tensor:
        """The whole tensor in memory (the small-model batch, built once)."""
        return self.tensors[name] if self.reader is None else self.reader.get(name)

    @property
    def held_bytes(self) -> int:
        """Bytes this parent holds in this process (0 when it is left in its files)."""
        return 0 if self.tensors is None else sum(t.numel() * t.element_size() for t in self.tensors.values())


class _Whole(Mapping):
    """name -> whole tensor of a ``ParentTensors`` (what ``BatchedParents`` reads once)."""

    def __init__(self, parent: ParentTensors, names: list[str]):
        self.parent, self._names = parent, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.parent.whole(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class InMemoryMerger:
    """Writes children into one loaded model, trial after trial.

    ``father``/``mother``/``base``: each a ``CheckpointReader`` (the parents stay in their files: a
    trial reads only the tensors it re-merges, a chunk at a time through the page cache, which every
    process on the machine shares) or a mapping name -> tensor (held as given; on ``device`` when
    that is CUDA, unless ``parents_on_device=False``). ``apply`` re-merges only the tensors whose
    recipe changed since the last call (or whose random masks changed with the genome hash) and
    writes them into the model's parameters in place: a merged tensor goes chunk by chunk from the
    parents to its parameter (the export's kernel with a sink that writes into the parameter: no
    output tensor), merged on that parameter's device (a model spread over several devices by a
    ``device_map`` is written device by device), unless ``device`` names one merge device for all.

    Memory: the model, each worker's chunk buffers, and a transplanted tensor while it is copied;
    parents held in memory only when given as mappings. Their NaN/Inf are checked here for mappings;
    for readers by each merge, as the export does (the output chunks' sum), and before that by the
    scan stage's static pass over every parent tensor.

    Speed: a small model (at most ``BATCH_MAX_ELEMENTS`` floats, on one device) is also kept
    concatenated in float32 (read whole once, at most 4M floats x 3 parents: ~50 MB), and dare_ties
    / dare_linear / task_arithmetic recipes (Darwin's genome) are merged for all tensors at once
    (``batched``: one trial is ~30 torch calls instead of ~40 a tensor); other recipes, and big
    models, go tensor by tensor, over ``workers`` threads (0 = one per core) when there is enough
    work. Every path gives the same bits as ``merge_to_disk``.
    """

    PARALLEL_MIN_ELEMENTS = 1 << 22
    BATCH_MAX_ELEMENTS = 1 << 22

    def __init__(
        self,
        model,
        father,
        mother,
        base=None,
        device: str | None = None,
        workers: int = 0,
        parents_on_device: bool | None = None,
    ):
        from darwin_hydra.io.layout import param_views
        from darwin_hydra.merge.batched import BatchedParents
        from darwin_hydra.merge.chunks import check_finite

        self.model = model
        self.views = views = param_views(model)
        offloaded = [n for n, v in views.items() if v.device.type == "meta"]
        if offloaded:
            raise ValueError(
                f"{len(offloaded)} tensor(s) of the trial model have no device memory (offloaded by the device_map, e.g. "
                f"{offloaded[:3]}): a trial writes into every parameter, so the model must fit on its devices; raise "
                "memory.max_memory or use more GPUs"
            )
        self.device = resolve_device(device) if device is not None else None
        stage = self.device is not None and self.device.type == "cuda" if parents_on_device is None else parents_on_device
        to = self.device if stage else None
        self.father = ParentTensors(father, "father", to)
        self.mother = ParentTensors(mother, "mother", to)
        self.base = None if base is None else ParentTensors(base, "base", to)
        parents = [p for p in (self.father, self.mother, self.base) if p is not None]
        if self.father.reader is None:
            missing = sorted(set(views) - set(self.father.names()))
            extra = sorted(set(self.father.names()) - set(views))
            if missing or extra:
                raise KeyError(f"the loaded model and the parents' tensors differ: model-only {missing[:5]}, "
                               f"parents-only {extra[:5]}")
        for p in parents:
            # the mother and the base may lack tensors a recipe takes whole from the father (a text-only
            # mother beside a multimodal father: the vision tower); apply checks each trial's recipes
            p.absent = {n for n in views if n not in p}
            if p.absent and p is self.father:
                raise KeyError(f"the father's tensors lack {len(p.absent)} of the model's, e.g. {sorted(p.absent)[:5]}")
            bad = [n for n, v in views.items() if n not in p.absent and p.shape(n) != tuple(v.shape)]
            if bad:
                n = bad[0]
                raise ValueError(f"the {p.role}'s tensor {n!r} has shape {p.shape(n)}, the model's {tuple(views[n].shape)}")
            if p.tensors is not None:
                for n, t in p.tensors.items():  # once here, so that no trial pays for it
                    check_finite(t, p.role, n)
        self._partial = [p for p in parents if p.absent]
        # the batch: float tensors every parent holds
        floats = [n for n in views if self.father.dtype(n).is_floating_point and not any(n in p.absent for p in parents)]
        devices = {views[n].device for n in floats}
        batch_device = self.device or (devices.pop() if len(devices) == 1 else None)
        small = sum(views[n].numel() for n in floats) <= self.BATCH_MAX_ELEMENTS
        self.batch = None
        if small and floats and batch_device is not None:
            self.batch = BatchedParents(floats, _Whole(self.father, floats), _Whole(self.mother, floats),
                                        None if self.base is None else _Whole(self.base, floats), batch_device)
        self.workers = resolve_workers(workers)
        self._last: dict[str, tuple] = {}
        self.merged_last = 0
        self.seconds_last = 0.0

    @property
    def held_bytes(self) -> int:
        """Bytes of parents this merger holds in memory (mappings, and the small-model batch)."""
        held = sum(p.held_bytes for p in (self.father, self.mother, self.base) if p is not None)
        return held + (self.batch.nbytes if self.batch is not None else 0)

    def _merge(self, name: str, recipe: TensorRecipe, genome_hash: str) -> None:
        """Merge ``name`` into its parameter: chunk by chunk into the parameter's memory when the recipe
        streams, else (a transplant, copied rows, an integer tensor) through one output tensor."""
        from darwin_hydra.merge.chunks import is_stored

        view = self.views[name]
        dev = self.device or view.device
        parents = [p.tensor(name) if p is not None and name not in p.absent else None
                   for p in (self.father, self.mother, self.base)]
        # the child in the father's dtype, as exported, then into the parameter (a float32 trial model holds
        # the bf16 child exactly)
        args = (*parents, recipe, genome_hash, dev, self.father.dtype(name))
        try:
            if streams(recipe) and self.father.dtype(name).is_floating_point and view.is_contiguous():
                flat = view.view(-1)
                at = [0]

                def sink(piece: torch.Tensor) -> None:
                    n = piece.numel()
                    flat[at[0] : at[0] + n].copy_(piece)
                    at[0] += n

                merge_named(name, *args, sink=sink)
            else:
                view.copy_(merge_named(name, *args))
        finally:
            for t in parents:
                if is_stored(t):
                    t.release()  # a mapping reader's pages of this tensor leave this process's RSS

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
        for p in self._partial:
            lacking = [n for n, r, _ in todo if n in p.absent and not _father_only(r)]
            if lacking:
                raise KeyError(f"the {p.role} checkpoint lacks {len(lacking)} tensor(s) this trial merges, e.g. "
                               f"{lacking[:5]}: only tensors taken whole from the father may be missing there")
        groups: dict[tuple, dict[str, TensorRecipe]] = {}
        single = []
        for name, recipe, _ in todo:
            group = batchable(recipe) if self.batch is not None and name in self.batch.index else None
            if group is None:
                single.append((name, recipe))
            else:
                groups.setdefault(group, {})[name] = recipe
        work = sum(self.views[n].numel() for n, _ in single)
        try:
            with merging():
                for recipes in groups.values():
                    for name, out in self.batch.merge(recipes, genome_hash).items():
                        self.views[name].copy_(out.view(self.views[name].shape))
                if self.workers > 1 and work >= self.PARALLEL_MIN_ELEMENTS and len(single) > 1:
                    with ThreadPoolExecutor(self.workers, thread_name_prefix="merge", initializer=init_worker) as pool:
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
