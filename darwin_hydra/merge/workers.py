"""The export's workers: threads, or processes forked from the merging one, that run one job per
tensor (merge it into its slot, return its sha256), at most ``max_inflight_bytes`` of inputs held
at once. Forked workers get the job and the parents' readers by fork, not pickling (only names and
digests cross the pipes), read the parents through mmap, die with the merging process, and are
stopped at once when the export fails.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

import torch

__all__ = ["QUEUE_PER_WORKER", "init_worker", "run_jobs", "use_processes"]

log = logging.getLogger(__name__)

# Tensors submitted ahead, per worker (within max_inflight_bytes): a worker never waits for work.
# Each tensor holds nothing until a worker starts it (its output streams into its slot); those
# that do not stream hold their inputs and output while merged.
QUEUE_PER_WORKER = 8


def init_worker() -> None:
    """Every merge kernel runs with one intra-op thread (parallelism is across tensors)."""
    torch.set_num_threads(1)


def use_processes(processes: bool | None, dev: torch.device, n_workers: int) -> bool:
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


class _WorkerPids:
    """The pids of a forked pool's workers, each reported by the worker as it starts (shared memory,
    inherited by fork), so that the merging process can stop them (``stop``) without reaching into
    the pool. Slot 0 says whether the pool is stopping: a worker that starts after ``stop`` exits."""

    def __init__(self, ctx, n_workers: int):
        self._slots = ctx.Array("q", n_workers + 1)

    def register(self) -> bool:
        """In a worker: record its pid; False when the pool is stopping."""
        with self._slots.get_lock():
            if self._slots[0]:
                return False
            i = self._slots[1:].index(0) + 1  # a pool never starts more than n_workers processes
            self._slots[i] = os.getpid()
            return True

    def stop(self) -> None:
        """Terminate (SIGTERM) every worker started so far; one that starts later exits at once."""
        with self._slots.get_lock():
            self._slots[0] = 1
            pids = {p for p in self._slots[1:] if p}
        for proc in multiprocessing.active_children():  # Process objects: never a reused pid
            if proc.pid in pids:
                proc.terminate()


def _forked_init(job, slots, parent: int, readers, pids: _WorkerPids) -> None:
    global _forked_export
    if not pids.register():  # the merge is stopping already
        os._exit(0)
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


def run_jobs(names, job, slots, cost, n_workers: int, max_inflight_bytes: int, forked: bool, readers=()):
    """Merge every tensor into its reserved slot on ``n_workers`` threads, or processes forked from
    this one (``forked``); yield (name, sha256) as each is written, in any order. Forked workers get
    the job and the parents' readers by fork, not pickling: only names and digests cross the pipes."""
    if forked:
        ctx = multiprocessing.get_context("fork")
        pids = _WorkerPids(ctx, n_workers)
        pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx,
                                   initializer=_forked_init, initargs=(job, slots, os.getpid(), readers, pids))

        def submit(name):
            with warnings.catch_warnings():  # Python 3.12+ warns on any fork of a threaded process;
                # the workers only merge, read and write files (no locks of other threads)
                warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
                return pool.submit(_forked_job, name)
    else:
        pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="merge", initializer=init_worker)

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
            pids.stop()
        pool.shutdown(wait=True, cancel_futures=True)
