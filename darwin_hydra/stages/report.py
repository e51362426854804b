"""Report stage: the benchmark on the held-out test split (base when given, father, mother, child, best
uniform merge) with 95% intervals and paired-bootstrap differences, charts, ``report.md``, the child's
model card, and the same tables and charts in W&B."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from darwin_hydra.faults import fault_point
from darwin_hydra.pipeline import RunContext, Stage

log = logging.getLogger(__name__)


def _evaluate(ctx: RunContext, benchmark, model, tok) -> object:
    from darwin_hydra.evaluate.benchmark import evaluate_model

    return evaluate_model(model, tok, list(benchmark.report_tasks), include_path=ctx.resolve(benchmark.include_path),
                          batch_size=benchmark.batch_size, limit=benchmark.limit, metric=benchmark.metric,
                          lm_eval_defaults=benchmark.lm_eval_defaults)


def uniform_label(baseline: dict) -> str:
    """The uniform merge's name in the results: ``uniform r=0.50``."""
    return f"uniform r={float(baseline['best_ratio']):.2f}"


def benchmark_models(ctx: RunContext, benchmark) -> dict[str, object]:
    """Score the base (when ``parents.base`` is given), father, mother, child (and the best uniform merge
    when the search found one) on the report tasks (test split). The uniform merge is scored in the
    run's trial session."""
    from darwin_hydra.memory import placement
    from darwin_hydra.models import load_model, load_tokenizer

    dtype, trust = ctx.cfg.parents.dtype, ctx.cfg.parents.trust_remote_code
    where = dict(placement(ctx.cfg.memory, ctx.cfg.device), trust_remote_code=trust)
    results = {}
    tok = load_tokenizer(ctx.parent_path("father"), trust_remote_code=trust)
    for role in ("base", "father", "mother"):
        path = ctx.parent_path(role)
        if path is not None:
            results[role] = _evaluate(ctx, benchmark, load_model(path, dtype=dtype, **where), tok)
    exported = ctx.results.merge or ctx.stage("merge").load(ctx)
    if exported is not None:
        results["child"] = _evaluate(ctx, benchmark, load_model(exported.dir, dtype=dtype, **where), tok)
    search = ctx.results.search or ctx.stage("search").load(ctx)
    baseline = search.uniform_baseline if search is not None else None
    if baseline:
        session = ctx.trial_session()
        session.apply_uniform(float(baseline["best_ratio"]))
        results[uniform_label(baseline)] = _evaluate(ctx, benchmark, session.model, session.tokenizer)
    return results


def pct(x: float, signed: bool = False) -> str:
    """``x`` (a share) in points with one decimal; never ``-0.0`` (a bound a rounding error below 0)."""
    text = f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"
    return text.replace("-0.0", "+0.0" if signed else "0.0") if text.lstrip("+-") == "0.0" else text


_METRIC_WORDS = {
    "acc": "acc (the right answer is the greedy continuation / the most likely choice)",
    "acc_norm": "acc_norm (the most likely choice per character)",
    "exact_match": "exact_match (the greedy generation, cut at the stop sequence, is the answer)",
}


def metric_line(results: dict) -> str:
    """Which per-item metric scored which tasks, in words."""
    by_metric: dict[str, list[str]] = {}
    for task, metric in next(iter(results.values())).metrics.items():
        by_metric.setdefault(metric, []).append(task)
    parts = []
    for metric, tasks in by_metric.items():
        name, _, flt = metric.partition(",")
        words = _METRIC_WORDS.get(name, name) + (f", filter {flt}" if flt else "")
        parts.append(words + (f" for {', '.join(tasks)}" if len(by_metric) > 1 else ""))
    return "Per-item score: " + "; ".join(parts) + "."


def candidates_section(record: dict | None) -> str:
    """Every candidate for the child scored on the dev split (search.json's ``candidates``), the one
    chosen and why; the proxy's rank correlation with the dev score (``proxy_vs_dev``)."""
    if not record or not record.get("candidates"):
        return ""
    cands = record["candidates"]
    chosen = cands["chosen"]
    lines = ["## Dev candidates (how the child was chosen)", "",
             "| candidate | dev score | proxy | genome_hash | what it is |", "|---|---|---|---|---|"]
    for row in cands["rows"]:
        mark = " **(child)**" if row["genome_hash"] == chosen["genome_hash"] and row["kind"] == chosen["kind"] else ""
        proxy = f"{row['proxy']:.3g}" if row.get("proxy") is not None else "-"
        lines.append(f"| {row['kind']}{mark} | {pct(row['dev'])} | {proxy} | `{row['genome_hash']}` | {row['how']} |")
    lines += ["", f"The child is the {chosen['kind']} candidate: {cands['rule']}. The dev split chose it; the "
              "benchmark above is on the test split."]
    pv = record.get("proxy_vs_dev")
    if pv and pv.get("spearman") is not None:
        lines += ["", f"Proxy vs dev score: Spearman rank correlation {pv['spearman']:+.2f} over the {pv['n']} models "
                  "scored on both (phase 2's genomes, the uniform ratios, the MRI's child)."]
    return "\n".join(lines)


def benchmark_section(results: dict, n_boot: int, seed: int, baseline: dict | None = None) -> tuple[str, dict]:
    """Markdown table (score % with 95% CI per task and the skill mean) and paired-bootstrap
    child-minus-other differences of the skill mean; also returns the numbers as data. ``baseline``:
    search.json's uniform_baseline, which says how the uniform row was chosen."""
    from darwin_hydra.evaluate.stats import bootstrap_ci, paired_bootstrap

    models = list(results)
    tasks = list(results[models[0]].tasks)
    uniform = uniform_label(baseline) if baseline else None
    n_ratios = (len(baseline.get("grid") or []) or baseline.get("evaluations")) if baseline else None

    def label(m: str) -> str:
        return f"{m} (best of {n_ratios} ratios on dev)" if m == uniform else m

    data: dict = {"models": {}, "differences": {}}
    head = "| model | " + " | ".join(tasks) + " | skill mean |"
    lines = ["## Benchmark (test split, never seen by the search)", "", head, "|" + "---|" * (len(tasks) + 2)]
    for m in models:
        r = results[m]
        cells = []
        _, mlo, mhi = bootstrap_ci(r.correct, n_boot=n_boot, seed=seed)
        data["models"][m] = {"mean": r.mean, "mean_ci": [mlo, mhi], "tasks": {}}
        for t in tasks:
            tr = r.tasks[t]
            cells.append(f"{pct(tr.accuracy)} [{pct(tr.ci_low)}, {pct(tr.ci_high)}]")
            data["models"][m]["tasks"][t] = {"accuracy": tr.accuracy, "ci": [tr.ci_low, tr.ci_high], "n": tr.n,
                                             "metric": tr.metric}
        cells.append(f"**{pct(r.mean)}** [{pct(mlo)}, {pct(mhi)}]")
        lines.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    lines += ["", "Share of items right in %, 95% interval in brackets (Wilson per task, bootstrap for the mean). "
              + metric_line(results)]
    if uniform in results:
        grid = ", ".join(f"{float(g['ratio']):.2f}" for g in baseline.get("grid") or [])
        lines += ["", f"{uniform}: one ratio for every tensor, the best of {n_ratios} uniform ratios"
                  + (f" ({grid})" if grid else "") + " on the dev split, as many benchmark evaluations as the "
                  "search's phase 2 used."]
        data["uniform"] = {"model": uniform, "ratios": n_ratios, "chosen_on": "dev",
                           "best_ratio": float(baseline["best_ratio"])}
    lines.append("")
    if "child" in results:
        lines += ["Child minus each other model (skill mean, paired bootstrap over items within each task, "
                  f"{n_boot} resamples, 95% interval):", "", "| child minus | difference | 95% interval | excludes 0 |",
                  "|---|---|---|---|"]
        child = results["child"].correct
        for m in models:
            if m == "child":
                continue
            diff, lo, hi = paired_bootstrap(child, results[m].correct, n_boot=n_boot, seed=seed)
            data["differences"][m] = {"diff": diff, "ci": [lo, hi]}
            excl = "yes" if lo > 0 or hi < 0 else "no"
            interval = f"[{pct(lo, signed=True)}, {pct(hi, signed=True)}]"
            lines.append(f"| {label(m)} | {pct(diff, signed=True)} | {interval} | {excl} |")
    return "\n".join(lines), data


def health_section(health: dict | None) -> str:
    if not health:
        return ""
    lines = ["## Health check", "", f"Verdict: **{health['verdict']}**."]
    t = health["thresholds"]
    lines.append(
        f"Interference: child importance > {t['interference_factor']}x both parents' and {t['interference_margin']} above; "
        f"function loss: a parent's importance >= {t['loss_min_parent']} and the child's < {t['loss_fraction']}x it."
    )
    if health["flags"]:
        lines += ["", "Flagged:"] + [f"- {f['text']}" for f in health["flags"]]
        lines += ["", "Flags say where the child's use of a layer departs from both parents'; read them next to "
                  "the benchmark: a flag with no score loss is a changed route to the same answers."]
    return "\n".join(lines)


def moe_section(health: dict | None) -> str:
    """Dead experts and routing entropy per layer for father, mother and child (same calibration data)."""
    moe = (health or {}).get("moe")
    if not moe:
        return ""
    roles = list(moe)
    lines = ["## MoE health", "", "Dead experts (MRI rule) and routing entropy (bits) per layer, on the same "
             "calibration prompts for every model.", "",
             "| layer | " + " | ".join(f"dead share {r}" for r in roles) + " | " + " | ".join(f"entropy {r}" for r in roles) + " |",
             "|---|" + "---|" * (2 * len(roles))]
    layers = list(moe[roles[0]]["per_layer"])
    for l in layers:
        cells = [f"{moe[r]['per_layer'][l]['dead_share']:.2f}" for r in roles]
        cells += [f"{moe[r]['per_layer'][l]['routing_entropy']:.2f}" for r in roles]
        lines.append(f"| {l} | " + " | ".join(cells) + " |")
    lines += ["", "Dead experts in all: " + ", ".join(f"{r} {moe[r]['dead']}/{moe[r]['experts']}" for r in roles) + "."]
    return "\n".join(lines)


def per_layer_ratios(ratio_map, num_layers: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Mean ratio per layer and component (attn / ffn), and transplant counts per layer."""
    from darwin_hydra.arch import ATTN, tensor_info

    sums = {"attn": [0.0] * num_layers, "ffn": [0.0] * num_layers}
    counts = {"attn": [0] * num_layers, "ffn": [0] * num_layers}
    trans = {"father": [0] * num_layers, "mother": [0] * num_layers}
    for name, rec in ratio_map.items():
        info = tensor_info(name)
        if info.layer is None or info.layer >= num_layers:
            continue
        comp = "attn" if info.component == ATTN else "ffn"
        sums[comp][info.layer] += rec.ratio
        counts[comp][info.layer] += 1
        side = rec.transplant_side() if hasattr(rec, "transplant_side") else None
        if side in trans:
            trans[side][info.layer] += 1
    means = {c: [s / n if n else float("nan") for s, n in zip(sums[c], counts[c])] for c in sums}
    return means, trans


class ReportStage(Stage):
    name = "report"

    def __init__(self, benchmark, export, seed):
        self.benchmark, self.export, self.seed = benchmark, export, seed

    def load(self, ctx: RunContext) -> Path | None:
        """This run's ``report.md`` when it reports the child now exported."""
        path, data = ctx.run_dir / "report.md", ctx.run_dir / "benchmark.json"
        if not (path.exists() and data.exists()):
            return None
        exported = ctx.results.merge or ctx.stage("merge").load(ctx)
        if exported is None or json.loads(data.read_text()).get("genome_hash") != exported.recipe.genome_hash:
            return None
        return path

    def run(self, ctx: RunContext) -> Path:
        from darwin_hydra.io.atomic import write_text_atomic
        from darwin_hydra.report import charts
        from darwin_hydra.report.card import card_body, model_card, relpath
        from darwin_hydra.stages.merge import child_recipe

        cfg = ctx.cfg
        chart_dir = ctx.run_dir / "charts"
        scan = ctx.require("scan")
        images: dict[str, Path] = {f"mri_{k}": Path(v) for k, v in scan.chart_paths.items()}

        results = benchmark_models(ctx, self.benchmark)
        search = ctx.results.search or ctx.stage("search").load(ctx)
        baseline = search.uniform_baseline if search is not None else None
        bench_md, bench_data = benchmark_section(results, self.benchmark.n_bootstrap, self.seed, baseline)
        table = {m: {t: (100 * r.tasks[t].accuracy, 100 * r.tasks[t].ci_low, 100 * r.tasks[t].ci_high) for t in r.tasks}
                 for m, r in results.items()}
        images["benchmark"] = charts.benchmark_bars(table, chart_dir / "benchmark.png")

        if search is not None and search.history:
            images["evolution"] = charts.evolution_curve(search.history, chart_dir / "evolution.png")

        health = ctx.results.health or ctx.stage("health").load(ctx)
        if health:
            images["health"] = Path(health["chart"])

        exported = ctx.results.merge or ctx.stage("merge").load(ctx)
        recipe = exported.recipe if exported is not None else child_recipe(ctx)
        means, trans = per_layer_ratios(recipe.ratio_map, ctx.num_layers)
        images["layer_ratios"] = charts.layer_ratios(means, trans, chart_dir / "layer_ratios.png")

        def chart_md(imgs: dict[str, Path], base: Path) -> str:
            lines = ["## Charts", ""]
            for k, p in imgs.items():
                lines += [f"### {k.replace('_', ' ')}", "", f"![{k}]({relpath(p, base)})", ""]
            return "\n".join(lines)

        sections = {"benchmark": bench_md, "candidates": candidates_section(search.record if search else None),
                    "health": "\n\n".join(s for s in (health_section(health), moe_section(health)) if s)}
        report_md = "\n\n".join(
            [f"# darwin-hydra report: {cfg.parents.name}", f"Run directory: `{ctx.run_dir}`",
             card_body(ctx, recipe, sections | {"charts": chart_md(images, ctx.run_dir)})]
        )
        bench_data["genome_hash"] = recipe.genome_hash
        if search is not None and search.record.get("candidates"):
            bench_data["child_chosen_on_dev"] = {"kind": search.record["candidates"]["chosen"]["kind"],
                                                 "proxy_vs_dev": search.record.get("proxy_vs_dev")}
        ctx.write_json("benchmark.json", bench_data)
        fault_point("report")

        if exported is not None:
            img_dir = exported.dir / "images"
            img_dir.mkdir(exist_ok=True)
            card_images = {}
            for k, p in images.items():
                dst = img_dir / Path(p).name
                shutil.copyfile(p, dst)
                card_images[k] = dst
            write_text_atomic(exported.dir / "README.md", model_card(ctx, recipe, sections | {"charts": chart_md(card_images, exported.dir)}))
        report = write_text_atomic(ctx.run_dir / "report.md", report_md)  # last: a finished report means a finished run

        ctx.tracker.log_images({f"report/{k}": v for k, v in images.items()})
        cols = ["model"] + list(next(iter(table.values()))) + ["skill mean"]
        ctx.tracker.log_table("report/benchmark", cols,
                              [[m] + [v[0] for v in row.values()] + [100 * results[m].mean] for m, row in table.items()])
        ctx.tracker.log_summary({f"test/{m}_mean": r.mean for m, r in results.items()})
        log.info("report: %s\n%s", report, bench_md)
        if self.export.push_to_hub and exported is not None:
            from darwin_hydra.report.hub import push_child

            push_child(exported.dir, self.export.hub_repo_id, self.export.hub_private)
        return report
