"""Is the zoo a fair stage for merging? The parents and the 11 uniform merges, scored with lm-eval.

``uniform_merge_table`` scores the base, father, mother and ``child(r) = (1-r)*father + r*mother`` for
r = 0.0, 0.1, ..., 1.0 (a plain in-memory linear merge, independent of the merge engine), plus
hand-built children that need the zoo's ground truth, in two blocks of layers:

- parents that changed **disjoint** layers (the default zoo): block A = the mother's layers, block B =
  the rest. The ``transplant`` takes the mother's tensors in block A and the father's everywhere else
  (= base + delta_father + delta_mother, since the two deltas live in disjoint layers); the two-block
  merges ``child = lerp(father, mother, r_a)`` in block A, ``lerp(father, mother, r_b)`` in B.
- parents that both changed **overlapping** layers (full fine-tunes, a mother distilled from the
  father): block A = the lower half of the layers, B = the upper half, and the two-block merges over
  the symmetric grid r_a, r_b in {0, 0.25, 0.5, 0.75, 1} (its corners (1, 0) and (0, 1) are the two
  layer-split transplants).

Either way these are what a per-layer ratio can do and one global ratio cannot. ``fairness`` checks the
issue's criteria 4a and 4b on the table, and how far the best hand-built child is above the best
uniform merge (the ``uniform`` family's point is that it is not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from darwin_hydra.arch import tensor_info
from darwin_hydra.evaluate.benchmark import BenchmarkResult, evaluate_model
from darwin_hydra.zoo.build import load_metadata
from darwin_hydra.zoo.tasks import task_name

log = logging.getLogger(__name__)

RATIOS = tuple(round(0.1 * i, 1) for i in range(11))
# Two-block grid: the ratio in the mother's layers x the ratio in the father's layers ((1.0, 0.0) is the transplant).
BLOCK_GRID = tuple((a, b) for a in (0.6, 0.7, 0.8, 0.9, 1.0) for b in (0.0, 0.2, 0.4) if (a, b) != (1.0, 0.0))
# Parents whose changes overlap: the ratio in the lower half x the ratio in the upper half, off the diagonal
# (the diagonal is a uniform merge); (1, 0) and (0, 1) are the two layer-split transplants.
HALVES = (0.0, 0.25, 0.5, 0.75, 1.0)
HALVES_GRID = tuple((a, b) for a in HALVES for b in HALVES if a != b)


@dataclass
class MergeRow:
    """One scored model: ``name`` (father, mother, r=0.3, transplant, blocks 0.9/0.2), its ratio (None if
    not uniform), accuracy per skill in [0, 1] and the skill average."""

    name: str
    ratio: float | None
    scores: dict[str, float]
    mean: float
    result: BenchmarkResult | None = field(default=None, repr=False)


@dataclass
class MergeTable:
    pair: str
    split: str
    skills: list[str]
    mother_skill: str
    father_layers: list[int]
    mother_layers: list[int]
    rows: list[MergeRow]
    # the two blocks of the hand-built children: the mother's layers and the rest (disjoint parents), or
    # the lower and the upper half (overlapping parents)
    block_a: list[int] = field(default_factory=list)
    block_b: list[int] = field(default_factory=list)
    # what the mother was fine-tuned from ("base", or "father": a distill, the base no merge input)
    mother_init: str = "base"

    def row(self, name: str) -> MergeRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r} in the merge table; rows: {[r.name for r in self.rows]}")

    @property
    def father(self) -> MergeRow:
        return self.row("father")

    @property
    def mother(self) -> MergeRow:
        return self.row("mother")

    @property
    def base(self) -> MergeRow | None:
        return next((r for r in self.rows if r.name == "base"), None)

    @property
    def children(self) -> list[MergeRow]:
        """Every merge that is not a parent itself: uniform 0 < r < 1, the transplant, the two-block merges."""
        return [r for r in self.rows if r.name not in ("father", "mother", "base") and r.ratio not in (0.0, 1.0)]

    @property
    def overlapping(self) -> bool:
        """Both parents changed some layer (full fine-tunes, a distill): blocks are the two halves."""
        return bool(set(self.father_layers) & set(self.mother_layers))


def _uniform_name(r: float) -> str:
    return f"r={r:.1f}"


def _ratio_str(r: float) -> str:
    return f"{r:.1f}" if round(r, 1) == r else f"{r:.2f}"


def _blocks_name(r_a: float, r_b: float) -> str:
    return f"blocks {_ratio_str(r_a)}/{_ratio_str(r_b)}"


@torch.no_grad()
def uniform_merge_table(
    root: str | Path,
    pair: str = "dense",
    split: str = "test",
    ratios: tuple[float, ...] = RATIOS,
    transplant: bool = True,
    block_grid: tuple[tuple[float, float], ...] | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    base: bool = True,
) -> MergeTable:
    """Score (``base``) the pair's base, father, mother, the uniform merges at ``ratios``, and the
    two-block merges of ``block_grid`` (ratio in block A, ratio in block B; see the module docstring;
    None: ``BLOCK_GRID`` with the ``transplant`` for parents that changed disjoint layers, ``HALVES_GRID``
    for overlapping ones) of the zoo at ``root`` on the ``split`` tasks of each skill, with lm-eval
    (``evaluate_model``)."""
    root = Path(root)
    meta = load_metadata(root)
    if pair not in meta["pairs"]:
        raise ValueError(f"zoo {root} has no pair {pair!r}; it has {sorted(meta['pairs'])}")
    skills = list(meta["skills"])
    truth = meta["pairs"][pair]["ground_truth"]
    members = meta["pairs"][pair]["members"]
    tasks = [task_name(s, split) for s in skills]
    tok = AutoTokenizer.from_pretrained(root / pair / "father")
    child = AutoModelForCausalLM.from_pretrained(root / pair / "father", dtype=torch.float32).eval()
    father = {k: v.clone() for k, v in child.state_dict().items()}
    mother = AutoModelForCausalLM.from_pretrained(root / pair / "mother", dtype=torch.float32).state_dict()
    params = child.state_dict()

    def score(name: str, ratio: float | None) -> MergeRow:
        res = evaluate_model(child, tok, tasks, root / "tasks", batch_size=batch_size, limit=limit)
        per_skill = {s: res.tasks[task_name(s, split)].accuracy for s in skills}
        log.info("%s %s: mean %.3f %s", pair, name, res.mean, per_skill)
        return MergeRow(name, ratio, per_skill, res.mean, res)

    rows: list[MergeRow] = []
    if base and (root / pair / "base").is_dir():
        base_sd = AutoModelForCausalLM.from_pretrained(root / pair / "base", dtype=torch.float32).state_dict()
        for k, t in params.items():
            t.copy_(base_sd[k])
        rows.append(score("base", None))
        del base_sd
    for r in ratios:
        for k, t in params.items():
            t.copy_(torch.lerp(father[k], mother[k], r))  # (1-r)*father + r*mother
        row = score(_uniform_name(r), r)
        rows.append(row)
        if r == 0.0:
            rows.append(MergeRow("father", 0.0, row.scores, row.mean, row.result))
        if r == 1.0:
            rows.append(MergeRow("mother", 1.0, row.scores, row.mean, row.result))
    if not any(r.name == "father" for r in rows) or not any(r.name == "mother" for r in rows):
        raise ValueError("ratios must include 0.0 (the father) and 1.0 (the mother)")
    table = MergeTable(
        pair=pair,
        split=split,
        skills=skills,
        mother_skill=meta["mother_skill"],
        father_layers=list(truth["father_layers"]),
        mother_layers=list(truth["mother_layers"]),
        rows=rows,
        mother_init=members["mother"].get("init", "base"),
    )
    n_layers = int(meta["pairs"][pair]["num_layers"])
    if table.overlapping:
        block_a = list(range(n_layers // 2))
        transplant = False  # the grid's corners are the layer-split transplants
        grid = HALVES_GRID if block_grid is None else block_grid
    else:
        block_a = sorted(truth["mother_layers"])
        grid = BLOCK_GRID if block_grid is None else block_grid
    table.block_a = block_a
    table.block_b = [i for i in range(n_layers) if i not in block_a]
    in_a = {k: tensor_info(k).layer in set(block_a) for k in params}
    if transplant:
        for k, t in params.items():
            t.copy_(mother[k] if in_a[k] else father[k])
        rows.append(score("transplant", None))
    for r_a, r_b in grid:
        for k, t in params.items():
            t.copy_(torch.lerp(father[k], mother[k], r_a if in_a[k] else r_b))
        rows.append(score(_blocks_name(r_a, r_b), None))
    return table


def fairness(table: MergeTable) -> dict:
    """The issue's criteria on ``table`` (points = accuracy x 100).

    4a: ``mother - father >= 30`` on the mother's skill, and ``father - mother >= 20`` on at least one
    other skill. 4b: the best child (uniform 0 < r < 1, the transplant, a two-block merge) has a skill
    average at least 5 points above the better parent's. Also: the best child minus the best uniform
    merge (what a per-layer ratio can add to one global ratio; about 0 where a uniform merge is the best).
    """
    f, m = table.father, table.mother
    s = table.mother_skill
    others = [k for k in table.skills if k != s]
    mother_gain = 100 * (m.scores[s] - f.scores[s])
    father_gain = {k: 100 * (f.scores[k] - m.scores[k]) for k in others}
    best = max(table.children, key=lambda r: r.mean)
    best_uniform = max((r for r in table.children if r.ratio is not None), key=lambda r: r.mean)
    parent_best = max(f.mean, m.mean)
    out = {
        "mother_gain_on_her_skill": mother_gain,
        "father_gain_by_skill": father_gain,
        "4a": mother_gain >= 30 and max(father_gain.values(), default=-1e9) >= 20,
        "best_child": best.name,
        "best_child_margin": 100 * (best.mean - parent_best),
        "best_uniform": best_uniform.name,
        "best_uniform_margin": 100 * (best_uniform.mean - parent_best),
        "best_child_minus_best_uniform": 100 * (best.mean - best_uniform.mean),
        "4b": 100 * (best.mean - parent_best) >= 5,
    }
    if table.base is not None:
        out["base_mean"] = 100 * table.base.mean
    return out


def format_table(table: MergeTable) -> str:
    """The table as markdown: one row per model, one column per skill (points) and the skill average."""
    head = ["model"] + [f"{s}" + (" (mother's)" if s == table.mother_skill else "") for s in table.skills] + ["avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = [n for n in ("base", "father", "mother") if any(r.name == n for r in table.rows)]
    order = first + [r.name for r in table.rows if r.name not in first]
    a, b = _span(table.block_a), _span(table.block_b)
    for name in order:
        r = table.row(name)
        if name == "base":
            label = "base" + (" (the father's start; no merge input)" if table.mother_init == "father" else "")
        elif name == "father":
            label = f"father (layers {_span(table.father_layers)})"
        elif name == "mother":
            start = " from the father" if table.mother_init == "father" else ""
            label = f"mother{start} (layers {_span(table.mother_layers)})"
        elif name == "transplant":
            label = f"transplant: mother's layers {a}, father's rest"
        elif name.startswith("blocks "):
            r_a, r_b = name.removeprefix("blocks ").split("/")
            label = f"two-block: r={r_a} in layers {a}, r={r_b} in {b}"
        else:
            label = f"uniform {name}"
        cells = [f"{100 * r.scores[s]:.1f}" for s in table.skills] + [f"**{100 * r.mean:.1f}**"]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def _span(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))
