"""The memory plan of a run: the bytes each part needs, on which device, against what each device has.

Built from the parents' headers and the config alone (no model is loaded), in milliseconds, so that a
run that cannot fit stops in preflight naming the shortfall, before the scan. The parts, by phase
(the phases run one after another, so a device's need is the largest phase's sum)::

    all phases   the process itself (Python, torch, transformers, lm-eval: ~0.6 GB of host RAM)
    static       the static scan's float64 chunks and one tensor of each parent
    scan         one parent's model (mri.dtype), the reference's one layer the delta probe swaps in,
                 the probe batch's per-layer inputs (L x B x T x H)
    search       the trial model (parents.dtype), the merge's chunk buffers and a transplanted tensor,
                 the proxy batch (B x T x V log-probs), the evaluation batch (B x T x V logits)
    export       the workers' chunk buffers and mapped pages of the largest tensors, the tensors
                 held whole (at most merge's 1 GiB in flight)

The parents' files are read through the page cache (shared, reclaimable, counted once on the
machine): shown, never required. A trial model spread by ``memory.device_map`` is counted on the
GPUs in proportion to their budgets (accelerate's "balanced"; "sequential" fills them in order).

Budgets: ``memory.max_memory`` per device when given; else host RAM = ``memory.host_ram``, or
MemAvailable (/proc/meminfo) plus this process's own resident memory, and a GPU's free memory
(``torch.cuda.mem_get_info``). The estimates of activations assume ``EVAL_TOKENS`` tokens an
evaluation request (lm-eval pads a batch to its longest request); ``benchmark.batch_size="auto"``
counts one request (lm-eval then finds the largest batch that fits by itself).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

log = logging.getLogger(__name__)

GiB = 1 << 30
PROCESS_BYTES = 600 << 20  # Python with torch, transformers, lm-eval, optuna imported (measured ~0.4-0.6 GB)
EVAL_TOKENS = 256  # tokens assumed per evaluation request
CHUNK_BUFFERS = 16  # float32 chunk buffers a merging thread holds (parents, deltas, masks, scratch, output)
STATIC_CHUNK_BYTES = 5 * (1 << 24) * 8  # mri/static.py: 2^24-element float64 chunks and their temporaries
DEVICE_MAP_CHOICES = ("auto", "balanced", "balanced_low_0", "sequential")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


class MemoryPlanError(ValueError):
    """The run cannot fit: the message names each device short of memory and the numbers."""


def parse_bytes(value: Any, option: str = "size") -> int:
    """Bytes of ``12345``, ``"500MB"``, ``"70GiB"``, ``"1.5 GB"`` (decimal and binary units)."""
    if isinstance(value, bool):
        raise ValueError(f"{option}={value!r}: give a size such as 70GiB or 500MB")
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{option}={value!r}: give a size such as 70GiB, 500MB or a byte count")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"{option}={value!r}: a size must be positive")
    return int(n)


def device_key(key: Any) -> int | str:
    """accelerate's key of a device: a GPU index as an int ("0" -> 0), "cpu" / "disk" as they are."""
    k = str(key)
    if k.isdigit():
        return int(k)
    if k.startswith("cuda:") and k[5:].isdigit():
        return int(k[5:])
    if k in ("cpu", "disk", "mps"):
        return k
    raise ValueError(f"memory.max_memory: unknown device {key!r}; use a GPU index (0, 1, ...) or cpu")


def max_memory_bytes(max_memory: Mapping[str, Any] | None) -> dict[int | str, int]:
    """``memory.max_memory`` as accelerate takes it: {0: bytes, 1: bytes, "cpu": bytes}."""
    return {device_key(k): parse_bytes(v, f"memory.max_memory.{k}") for k, v in (max_memory or {}).items()}


def placement(memory, device: str = "cpu") -> dict[str, Any]:
    """``models.load_model``'s placement arguments for the ``memory`` config (None: ``device`` whole)."""
    if memory is None or memory.device_map is None:
        return {"device": device}
    dm = memory.device_map
    if not isinstance(dm, str):
        dm = {str(k): (int(v) if str(v).isdigit() else str(v)) for k, v in dict(dm).items()}
    return {"device": device, "device_map": dm, "max_memory": max_memory_bytes(memory.max_memory) or None}


# --------------------------------------------------------------------------------------------------
# what the machine has


def host_available() -> int:
    """MemAvailable (/proc/meminfo) plus this process's resident memory: what this run may hold."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            import psutil  # not a dependency: used when present (macOS, ...)

            avail = int(psutil.virtual_memory().available)
        except ImportError:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail + own_rss()


def own_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def gpu_free() -> dict[int, int]:
    """Free bytes of each visible CUDA device ({} without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {i: int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}


# --------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Part:
    phase: str  # "all", "static", "scan", "search", "export"
    what: str
    device: str  # "cpu" (host RAM), "cuda:N", or "page cache" (shown, never required)
    bytes: int
    note: str = ""


@dataclass
class MemoryPlan:
    parts: list[Part]
    budgets: dict[str, int]  # device -> bytes this run may use there
    sources: dict[str, str]  # device -> where that budget comes from
    enforce: bool = True
    notes: list[str] = field(default_factory=list)

    def need(self) -> dict[str, int]:
        """Per device: the largest phase's sum, plus what every phase holds (the process itself)."""
        out: dict[str, int] = {}
        for dev in {p.device for p in self.parts if p.device != "page cache"}:
            phases = self._phases(dev)
            out[dev] = phases.pop("all", 0) + max(phases.values(), default=0)
        return out

    def _phases(self, dev: str) -> dict[str, int]:
        sums: dict[str, int] = {}
        for p in self.parts:
            if p.device == dev:
                sums[p.phase] = sums.get(p.phase, 0) + p.bytes
        return sums

    def shortfalls(self) -> list[str]:
        """One line per device that cannot hold its largest phase, with the numbers and what to change."""
        out = []
        for dev, need in sorted(self.need().items()):
            budget = self.budgets.get(dev)
            if budget is None:
                out.append(f"{dev}: the plan puts {gb(need)} there, but no such device is visible")
            elif need > budget:
                phase = self._peak_phase(dev)
                worst = max((p for p in self.parts if p.device == dev and p.phase == phase), key=lambda p: p.bytes,
                            default=None)
                out.append(f"{dev}: needs {gb(need)} (phase {phase}), has {gb(budget)} ({self.sources.get(dev, '')}): "
                           f"short by {gb(need - budget)}" + (f"; largest part: {worst.what} {gb(worst.bytes)}"
                                                               if worst else ""))
        return out

    def _peak_phase(self, dev: str) -> str:
        phases = self._phases(dev)
        phases.pop("all", None)
        return max(phases, key=phases.get) if phases else "all"

    def table(self) -> str:
        """The plan as the run prints it: every part, then need against budget per device."""
        from darwin_hydra.texttable import text_table

        lines = ["memory plan (estimates from the parents' headers and the config):"]
        lines.append(text_table(["phase", "device", "bytes", "part"],
                                [[p.phase, p.device, gb(p.bytes), p.what + (f" ({p.note})" if p.note else "")]
                                 for p in self.parts], right=[False, False, True, False]))
        rows = []
        for dev, need in sorted(self.need().items()):
            budget = self.budgets.get(dev)
            ok = budget is not None and need <= budget
            rows.append([dev, gb(need), gb(budget) if budget is not None else "-",
                         f"{'fits' if ok else 'DOES NOT FIT'} ({self.sources.get(dev, 'no such device')})"])
        lines.append(text_table(["device", "need", "budget", "verdict"], rows, right=[False, True, True, False]))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def check(self) -> None:
        """Raise ``MemoryPlanError`` naming every shortfall (with ``enforce``; else log them)."""
        short = self.shortfalls()
        if not short:
            return
        msg = ("the run does not fit in memory: " + "; ".join(short) +
               ". Lower parents.dtype / benchmark.batch_size / probes.batch_size, spread the model with "
               "memory.device_map=auto, or raise memory.max_memory / memory.host_ram if the budget is wrong.")
        if self.enforce:
            raise MemoryPlanError(msg)
        log.warning("%s (memory.enforce=false: running anyway)", msg)


def gb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a checkpoint, from its headers: its elements, the largest decoder layer's,
    the largest tensor's bytes, and the text config's sizes."""

    numel: int
    layer_numel: int
    largest_bytes: int
    num_layers: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, reader) -> "ModelShape":
        from darwin_hydra.arch import num_layers, tensor_info

        numel, largest_b, layers = 0, 0, {}
        for n in reader.names:
            k = 1
            for d in reader.shape(n):
                k *= d
            numel += k
            largest_b = max(largest_b, reader.nbytes(n))
            layer = tensor_info(n).layer
            if layer is not None:
                layers[layer] = layers.get(layer, 0) + k
        cfg = reader.config
        text = cfg.get("text_config") or cfg
        try:
            n_layers = num_layers(cfg)
        except Exception:  # noqa: BLE001 - a config without a layer count: the plan counts the layers seen
            n_layers = len(layers)
        return cls(numel, max(layers.values(), default=0), largest_b, n_layers,
                   int(text.get("hidden_size") or 0), int(text.get("vocab_size") or 0))


def _itemsize(dtype: Any) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[str(dtype).removeprefix("torch.")]


def _budgets(memory, devices: set[str]) -> tuple[dict[str, int], dict[str, str]]:
    budgets: dict[str, int] = {}
    sources: dict[str, str] = {}
    limits = max_memory_bytes(memory.max_memory if memory is not None else None)
    if memory is not None and memory.host_ram is not None:
        budgets["cpu"], sources["cpu"] = parse_bytes(memory.host_ram, "memory.host_ram"), "memory.host_ram"
    else:
        budgets["cpu"], sources["cpu"] = host_available(), "MemAvailable + this process"
    if "cpu" in limits and limits["cpu"] < budgets["cpu"]:
        budgets["cpu"], sources["cpu"] = limits["cpu"], "memory.max_memory.cpu"
    if any(d.startswith("cuda") for d in devices) or any(isinstance(k, int) for k in limits):
        free = gpu_free()
        for i, b in free.items():
            budgets[f"cuda:{i}"], sources[f"cuda:{i}"] = b, "free (torch.cuda.mem_get_info)"
        for k, b in limits.items():
            if isinstance(k, int) and k in free:
                budgets[f"cuda:{k}"], sources[f"cuda:{k}"] = min(b, free[k]), f"memory.max_memory.{k}"
    return budgets, sources


def _spread(total: int, device: str, memory, budgets: dict[str, int]) -> dict[str, int]:
    """Where a model of ``total`` bytes lives: whole on ``device``, or over the GPUs of a device_map."""
    if memory is None or memory.device_map is None:
        return {_canon(device): total}
    gpus = sorted((d for d in budgets if d.startswith("cuda")), key=lambda d: int(d[5:]))
    limits = max_memory_bytes(memory.max_memory)
    named = [f"cuda:{k}" for k in limits if isinstance(k, int)]
    if named:
        gpus = [g for g in gpus if g in named] or named
    if not gpus or isinstance(memory.device_map, Mapping):  # CPU only, or a hand-made map: counted on its devices
        devs = sorted({_canon(str(v)) for v in dict(memory.device_map).values()}) if isinstance(
            memory.device_map, Mapping) else ["cpu"]
        return {d: total // len(devs) for d in devs}
    if memory.device_map == "sequential":
        out, left = {}, total
        for g in gpus:
            take = min(left, budgets.get(g, 0)) if g != gpus[-1] else left
            if take:
                out[g] = take
            left -= take
        return out
    weights = {g: budgets.get(g, 1) for g in gpus}
    s = sum(weights.values()) or 1
    return {g: total * w // s for g, w in weights.items()}


def _canon(device: str) -> str:
    d = str(device)
    if d.isdigit():
        return f"cuda:{d}"
    return "cuda:0" if d == "cuda" else d


def plan_run(cfg, readers: Mapping[str, Any], stages: list[str] | None = None) -> MemoryPlan:
    """The plan of a run: ``cfg`` the typed ``DarwinConfig``, ``readers`` the parents' readers (headers
    only are read), ``stages`` the stages to run (default ``cfg.pipeline.stages``)."""
    from darwin_hydra.merge.chunks import CHUNK_CPU, CHUNK_CUDA
    from darwin_hydra.merge.engine import resolve_workers

    stages = set(stages if stages is not None else cfg.pipeline.stages)
    memory = getattr(cfg, "memory", None)
    father = readers["father"]
    shape = ModelShape.of(father)
    run_device = _canon(cfg.device)
    mri_device = _canon(cfg.mri.device)
    devices = {run_device, mri_device}
    budgets, sources = _budgets(memory, devices)
    parts = [Part("all", "this process (Python, torch, transformers, lm-eval)", "cpu", PROCESS_BYTES)]
    parts.append(Part("all", "parents' files, read through the page cache (shared, reclaimable)", "page cache",
                      sum(r.total_bytes for r in readers.values()),
                      " + ".join(f"{role} {gb(r.total_bytes)}" for role, r in readers.items())))
    notes = []
    if "scan" in stages:
        parts.append(Part("static", "the static scan: float64 chunks, one tensor of each parent", mri_device,
                          STATIC_CHUNK_BYTES + 2 * shape.largest_bytes, "before any model is loaded"))
    if "scan" in stages or "health" in stages:
        isz = _itemsize(cfg.mri.dtype)
        spread = _spread(shape.numel * isz, mri_device, memory, budgets)
        for dev, b in spread.items():
            parts.append(Part("scan", "the MRI's model (one parent at a time)", dev, b, f"{cfg.mri.dtype}"))
        if cfg.mri.delta_probe:
            parts.append(Part("scan", "the delta probe's reference layer (swapped in, the own one saved)",
                              next(iter(spread), mri_device), 2 * shape.layer_numel * isz,
                              "one layer, never a whole second model"))
        acts = (shape.num_layers + 4) * cfg.probes.batch_size * cfg.probes.max_length * shape.hidden * isz
        parts.append(Part("scan", "the probe batch's inputs of every layer", mri_device, acts,
                          f"{shape.num_layers} layers x {cfg.probes.batch_size} x {cfg.probes.max_length} tokens"))
    if "search" in stages or "report" in stages:
        isz = _itemsize(cfg.parents.dtype)
        model_bytes = shape.numel * isz
        spread = _spread(model_bytes, run_device, memory, budgets)
        for dev, b in spread.items():
            parts.append(Part("search", "the trial model", dev, b, f"{shape.numel / 1e9:.2f}B parameters, "
                              f"{cfg.parents.dtype}"))
        for dev in spread:
            chunk = CHUNK_CUDA if dev.startswith("cuda") else CHUNK_CPU
            threads = 1 if dev.startswith("cuda") else resolve_workers(0)
            parts.append(Part("search", "the merge's chunk buffers and a transplanted tensor", dev,
                              threads * CHUNK_BUFFERS * chunk * 4 + 2 * shape.largest_bytes,
                              "parents stay in their files"))
        head = max(spread) if spread else run_device  # the logits come out where the head lives
        vocab_item = 4 + isz
        opt = cfg.optimizer
        # the proxy keeps the logits of the teacher's answer positions only (proxy.logprobs' logits_to_keep)
        scored = opt.proxy_answer_tokens + 1 if opt.proxy_answer_tokens > 0 else cfg.probes.max_length
        proxy = opt.proxy_prompts * scored * shape.vocab * (vocab_item + 4)
        parts.append(Part("search", "the proxy batch's log-probs", head, proxy,
                          f"{opt.proxy_prompts} prompts x {scored} positions x {shape.vocab} vocab"))
        bs = cfg.benchmark.batch_size
        per_request = EVAL_TOKENS * (shape.vocab * vocab_item + 8 * shape.hidden * isz)
        if isinstance(bs, str):  # "auto": lm-eval finds the largest batch that fits by itself
            parts.append(Part("search", "the evaluation batch", head, per_request,
                              f"batch_size={bs}: lm-eval sizes it; one request of {EVAL_TOKENS} tokens counted"))
        else:
            parts.append(Part("search", "the evaluation batch", head, int(bs) * per_request,
                              f"{bs} requests x {EVAL_TOKENS} tokens (estimate) x {shape.vocab} vocab"))
    if "merge" in stages:
        workers = resolve_workers(cfg.merge.workers)
        dev = _canon(cfg.merge.device if cfg.merge.device != "auto" else cfg.device)
        parts.append(Part("export", "the export's workers (chunk buffers, mapped pages of the tensors merged)",
                          "cpu", workers * (3 * shape.largest_bytes + CHUNK_BUFFERS * CHUNK_CPU * 4)))
        parts.append(Part("export", "tensors held whole (transplants, copied rows)", dev,
                          min(1 << 30, 4 * shape.largest_bytes), "at most 1 GiB in flight"))
    if sum(r.total_bytes for r in readers.values()) > budgets.get("cpu", 0):
        notes.append("the parents' files exceed the host's free memory: trials will re-read them from disk "
                     "(slower, not refused)")
    return MemoryPlan(parts, budgets, sources, enforce=True if memory is None else bool(memory.enforce), notes=notes)
