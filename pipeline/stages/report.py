"""The paper-style table of a study, from MLflow.

    python pipeline/report.py --study demo [--tracking-uri URI | --runs-root DIR] [--out DIR] [--paper STUDY.yaml]

Rows: one per stage of the study (the newest FINISHED run tagged ``study=<id>``, ``stage=<name>``;
an unfinished stage shows its newest run and its status). Columns: stage, run, method, arch,
top-1 and top-5 (%) of every prediction rule any run logged (``val/top1/<rule>``: ``main`` = +TR,
``joint`` = +JP, ``lc`` = +LC, DKS ``ensemble`` / ``dks.i`` ...; blank where a method has no such
rule), parameters (millions; the model rebuilt from the run's config on the meta device when the
run did not log ``model/params``), training images/s (median over epochs), wall time (min).

Seeds. A study with ``seeds: N`` tags each run with ``seed`` and ``seeded_stage``: its seeds make one
row, each figure the mean +- the standard deviation over the seeds (column ``seeds``: which), wall
time their sum. A top-1 cell is marked ``^`` (ahead of the baseline) only when its mean exceeds the
baseline row's ``top1 main`` by more than two standard errors of the difference
(``sqrt(sd^2/n + sd_b^2/n_b)``); with one seed on either side nothing is marked. The baseline row is
the stage named ``baseline``, else the first row whose method is ``baseline``. A groups stage over
several seeds notes each seed's grouping's ARI beside that of the mean confusion.

With ``--paper STUDY.yaml`` (the study stage passes its own file), the figures a stage quotes
from its paper (``paper: {rule: [top-1, top-5]}`` in the study file, e.g. ``{main: [76.4, 93.3],
joint: [76.9, 93.7]}``; one number = top-1 only) appear beside ours, as ``paper top1 <rule>``
columns next to ``top1 <rule>``.

The table is printed as Markdown, saved as ``report.md`` (and ``report.csv``) with a bar chart
``report.png`` (top-1 of every rule per run) in ``--out``, and logged as artifacts of a summary
run (tags ``study``, ``stage``, ``method=report``) in the study's experiment.

Unless ``--no-mlflow``, each finished training stage's model (``runs:/<id>/model``) is registered in MLflow's
Model Registry as ``<study>-<method>`` (a run registered before keeps its version), the alias ``best`` is set on
the version with the highest val/top1/main, and the table ends with a link to each (``models:/<name>@best``).
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

from pipeline.stages.common import (DOCS_EPILOG, ToolError, add_tracking_options, load_trained, log_stage_run,
                                    parse_tags, run_cli, scratch_dir, store_uri)
from pipeline.tracking import models, runs
from pipeline.train import schema

RULE_ORDER = ["main", "joint", "lc", "ensemble"]
FIXED = ["stage", "run", "method", "arch", "status", "seeds"]
AHEAD = " ^"  # marks a top-1 mean beyond two standard errors above the baseline's
TAIL = ["params (M)", "img/s", "wall (min)"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python pipeline/report.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print (and save, and log to MLflow) the comparison table of a study.",
        epilog=__doc__.split("\n\n", 2)[2] + DOCS_EPILOG)
    parser.add_argument("--study", required=True, help="study id (the `study` tag of its runs)")
    parser.add_argument("--out", help="folder for report.md / .csv / .png (default: <runs-root>/studies/<id>/report)")
    parser.add_argument("--paper", metavar="STUDY.yaml", help="study file whose stages quote paper figures "
                        "(`paper: {rule: [top1, top5]}`): shown beside ours")
    add_tracking_options(parser, "the summary run", "that of the study's runs", run_name_default="report",
                         no_mlflow_help="print and save only")
    return parser


def read_study_file(path) -> tuple[dict[str, dict[str, tuple]], list[str]]:
    """``{stage: {rule: (top1, top5)}}`` from a study file's ``paper`` keys, and its stages' order."""
    try:
        data = schema.read_yaml(path, "--paper")
        stages = (data.get("stages") if isinstance(data, dict) else None) or {}
        figures = {str(name): schema.paper_figures(spec["paper"], f"{path}: stages.{name}.paper")
                   for name, spec in stages.items() if isinstance(spec, dict) and "paper" in spec}
        return figures, [str(name) for name in stages]
    except schema.SchemaError as err:
        raise ToolError(str(err)) from None


def in_file_order(rows: list[dict], order: list[str]) -> list[dict]:
    """The rows in the study file's stage order (stages run side by side start in any order); others last."""
    return sorted(rows, key=lambda row: order.index(row["stage"]) if row["stage"] in order else len(order))


def add_paper_columns(rows: list[dict], columns: list[str], figures: dict) -> list[str]:
    """Put each stage's paper figures in its row (a stage with no run yet gets a row of its own);
    ``paper topK <rule>`` right after ``topK <rule>``."""
    have = {row["stage"] for row in rows}
    rows.extend({"stage": name, "run": "", "status": "not run", "run_id": ""} for name in figures if name not in have)
    shown = set()
    for row in rows:
        for rule, (top1, top5) in figures.get(row["stage"], {}).items():
            for k, value in ((1, top1), (5, top5)):
                if value is not None:
                    row[f"paper top{k} {rule}"] = value
                    shown.add((k, rule))
    out = []
    for column in columns:
        out.append(column)
        k, _, rule = column.partition(" ")
        if k in ("top1", "top5") and (int(k[3]), rule) in shown:
            out.append(f"paper {column}")
    # a rule the paper quotes but no run logged yet still gets its column
    for k, rule in sorted(shown, key=lambda kr: (_rule_key(kr[1]), kr[0])):
        if f"paper top{k} {rule}" not in out:
            out.insert(len(out) - len(TAIL), f"paper top{k} {rule}")
    return out


def _rule_key(rule: str) -> tuple:
    return (RULE_ORDER.index(rule), "") if rule in RULE_ORDER else (len(RULE_ORDER), rule)


def pick_runs(all_runs) -> list:
    """Newest FINISHED run per stage (else the newest), in start order; summary runs left out."""
    by_stage: dict[str, list] = {}
    for run in all_runs:
        if run.data.tags.get("method") == "report":
            continue
        by_stage.setdefault(run.data.tags.get("stage") or run.info.run_name or run.info.run_id, []).append(run)
    chosen = []
    for stage, items in by_stage.items():
        finished = [r for r in items if r.info.status == "FINISHED"]
        chosen.append(max(finished or items, key=lambda r: r.info.start_time or 0))
    return sorted(chosen, key=lambda r: r.info.start_time or 0)


def count_params(client, run, tmp: str) -> float | None:
    """Parameters of a training run's model, rebuilt on the meta device from its config + weights' shapes."""
    if "model/params" in run.data.metrics:
        return run.data.metrics["model/params"]
    if "model.arch" not in run.data.params:
        return None
    try:
        _, model, _, _ = load_trained(client, run, runs.run_dir_of(run), tmp)
        import ssal_models

        return float(ssal_models.count_parameters(model)["total"])
    except Exception:  # noqa: BLE001 (weights not reachable: leave the cell blank)
        return None


def collect(client, study: str, tmp: str) -> tuple[list[dict], list[str]]:
    chosen = pick_runs(runs.study_runs(client, study))
    if not chosen:
        raise ToolError(f"no runs tagged study={study!r} in {client.tracking_uri}; run the study first "
                        f"(python pipeline/launch.py --study FILE --local) or pass the right --tracking-uri")
    rules = sorted({k.split("/", 2)[2] for r in chosen for k in r.data.metrics if k.startswith("val/top1/")},
                   key=_rule_key)
    rows = []
    for run in chosen:
        m, tags = run.data.metrics, run.data.tags
        row = {"stage": tags.get("stage", ""), "run": run.info.run_name or run.info.run_id[:8],
               "method": tags.get("method", ""), "arch": tags.get("arch", ""), "status": run.info.status,
               "run_id": run.info.run_id}
        for rule in rules:
            for k in (1, 5):
                value = m.get(f"val/top{k}/{rule}")
                row[f"top{k} {rule}"] = None if value is None else 100 * value
        row["seeds"] = tags.get("seed", "")
        row["seeded_stage"] = tags.get("seeded_stage") or row["stage"]
        if tags.get("method") == "groups":
            row["note"] = ", ".join(f"{key.split('/')[-1]} ARI {value:.3f}" for key, value in sorted(m.items())
                                    if key.startswith("groups/ari/"))
            per_seed = sorted((key.split("/")[1][len("ari_seed"):], key.split("/")[2], value)
                              for key, value in m.items() if key.startswith("groups/ari_seed"))
            if per_seed:
                row["note"] += " (mean confusion); each seed alone: " + ", ".join(
                    f"seed {seed} {k} ARI {value:.3f}" for seed, k, value in per_seed)
        params = count_params(client, run, tmp) if tags.get("method") not in ("groups",) else None
        row["params (M)"] = None if params is None else params / 1e6
        history = [x.value for x in client.get_metric_history(run.info.run_id, "train/images_per_second")] \
            if "train/images_per_second" in m else []
        row["img/s"] = statistics.median(history) if history else None
        wall = m.get("run/wall_seconds")
        if wall is None and run.info.end_time and run.info.start_time:
            wall = (run.info.end_time - run.info.start_time) / 1000
        row["wall (min)"] = None if wall is None else wall / 60
        rows.append(row)
    columns = FIXED + [f"top{k} {rule}" for rule in rules for k in (1, 5)] + TAIL
    rows = merge_seeds(rows, columns)
    mark_ahead(rows, columns)
    if all(row["n"] == 1 for row in rows):  # a study without seeds: no column for them
        columns.remove("seeds")
    return rows, columns


def merge_seeds(rows: list[dict], columns: list[str]) -> list[dict]:
    """One row per study stage: its seeds' figures as mean (``row[c]``) and sd (``row["sd"][c]``)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["seeded_stage"], []).append(row)
    merged = []
    for stage, items in groups.items():
        if len(items) == 1:
            merged.append({**items[0], "stage": stage, "n": 1, "sd": {}, "members": items})
            continue
        items = sorted(items, key=lambda r: int(r["seeds"]) if str(r["seeds"]).isdigit() else 0)
        row = {**items[0], "stage": stage, "run": f"{stage}.seed*", "n": len(items), "sd": {}, "members": items,
               "seeds": ",".join(str(r["seeds"]) for r in items),
               "status": "/".join(sorted({r["status"] for r in items})),
               "run_id": ",".join(r["run_id"] for r in items)}
        for column in columns:
            values = [r[column] for r in items if isinstance(r.get(column), (int, float))]
            if column in FIXED or not values:
                continue
            row[column] = sum(values) if column == "wall (min)" else statistics.mean(values)
            if column != "wall (min)" and len(values) > 1:
                row["sd"][column] = statistics.stdev(values)
        merged.append(row)
    return merged


def mark_ahead(rows: list[dict], columns: list[str]) -> None:
    """``row["ahead"]``: the top-1 columns whose mean is > 2 standard errors above the baseline's main."""
    base = next((r for r in rows if r["stage"] == "baseline"), None) or next(
        (r for r in rows if r.get("method") == "baseline"), None)
    if base is None or base.get("top1 main") is None or "top1 main" not in base["sd"]:
        return
    for row in rows:
        row["ahead"] = set()
        if row is base:
            continue
        for column in (c for c in columns if c.startswith("top1 ")):
            if row.get(column) is None or column not in row["sd"]:
                continue
            se = math.sqrt(row["sd"][column] ** 2 / row["n"] + base["sd"]["top1 main"] ** 2 / base["n"])
            if row[column] - base["top1 main"] > 2 * se:
                row["ahead"].add(column)


def fmt(value, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column.startswith("top") or column.startswith("paper top"):
        return f"{value:.2f}"
    if column == "params (M)":
        return f"{value:.2f}"
    if column == "img/s":
        return f"{value:.0f}"
    if column == "wall (min)":
        return f"{value:.1f}"
    return str(value)


def cell(row: dict, column: str) -> str:
    """A figure, with its +- sd over seeds and the mark of a lead beyond two standard errors."""
    text = fmt(row.get(column), column)
    sd = row.get("sd", {}).get(column)
    if text and sd is not None:
        text += f" ± {fmt(sd, column)}"
    return text + (AHEAD if column in row.get("ahead", ()) else "")


def markdown(rows: list[dict], columns: list[str], study: str) -> str:
    seeded = any(row.get("n", 1) > 1 for row in rows)
    lines = [f"# Study `{study}`", "", "Top-1 / top-5 in % on the val split; `main` = +TR, `joint` = +JP, `lc` = +LC"
             + ("; `paper ...`: the figure the paper reports for that row" if any(c.startswith("paper ")
                                                                                  for c in columns) else "")
             + ("; mean ± standard deviation over the seeds of column `seeds` (wall: their sum); `^`: top-1 ahead "
                "of the baseline's main by more than two standard errors." if seeded else "."),
             "", "| " + " | ".join(columns) + " |", "|" + "|".join("---" if c in FIXED else "---:" for c in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, c) for c in columns) + " |")
    notes = [f"- {row['stage']}: {row['note']}" for row in rows if row.get("note")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], columns: list[str], study: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rules = [c for c in columns if c.startswith("top1 ")]
    shown = [r for r in rows if any(r.get(c) is not None for c in rules)]
    # wide enough for a label per bar; the legend sits right of the axes, never over a bar
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rules) * max(1, len(shown)) + 3), 4.6), dpi=110)
    width = 0.8 / max(1, len(rules))
    x = np.arange(len(shown))
    for i, col in enumerate(rules):
        values = [r.get(col) if r.get(col) is not None else 0 for r in shown]
        errors = [r.get("sd", {}).get(col, np.nan) for r in shown]  # nan: no error bar drawn
        bars = ax.bar(x + (i - (len(rules) - 1) / 2) * width, values, width, yerr=errors, capsize=2,
                      label=col.replace("top1 ", ""))
        for bar, r, err in zip(bars, shown, errors):
            if r.get(col) is not None:  # vertical, above the error bar: neighbours' labels cannot overlap
                ax.annotate(f"{r[col]:.1f}", (bar.get_x() + bar.get_width() / 2,
                                              bar.get_height() + np.nan_to_num(err)),
                            xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7,
                            rotation=90)
    top = max((r[c] + r.get("sd", {}).get(c, 0) for r in shown for c in rules if r.get(c) is not None), default=1)
    ax.set_ylim(0, top * 1.18)
    ax.set_xticks(x)
    ax.set_xticklabels([r["stage"] or r["run"] for r in shown], rotation=20, ha="right")
    ax.set_ylabel("val top-1 (%)")
    seeded = any(r.get("n", 1) > 1 for r in shown)
    ax.set_title(f"study {study}: top-1 per prediction rule" + (" (mean ± sd over seeds)" if seeded else ""))
    ax.legend(title="rule", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def register_models(client, uri: str, study: str, rows: list[dict]) -> str:
    """Each finished training stage's model (``runs:/<id>/model``) registered as ``<study>-<method>``, alias
    ``best`` on the highest val/top1/main; the Markdown lines that link them ("" when none has a model)."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:  # every seed's run is a version of its own: a seeded row lists them in "members"
        for member in row.get("members", [row]):
            if member["status"] == "FINISHED" and member.get("top1 main") is not None:
                by_method.setdefault(member["method"], []).append(member)
    lines = []
    for method, items in by_method.items():
        name = f"{study}-{method}"
        if not models.register_best(client, name, [(row["run_id"], row["top1 main"]) for row in items]):
            continue
        best = client.get_model_version_by_alias(name, models.BEST_ALIAS)
        stage = next((row["stage"] for row in items if row["run_id"] == best.run_id), best.run_id)
        lines.append(f"- `{name}`: `best` = version {best.version} (stage {stage}): "
                     f"`mlflow.pytorch.load_model(\"models:/{name}@{models.BEST_ALIAS}\")`; "
                     f"{models.registry_link(uri, name)}")
    if not lines:
        return ""
    return "\n## Models (MLflow Model Registry)\n\n" + "\n".join(lines) + "\n"


def run(args) -> dict:
    from pipeline.train.config import resolve_path

    uri = store_uri(args.tracking_uri, args.runs_root)
    client = runs.client(uri)
    with scratch_dir("report") as tmp:  # weights downloaded to count parameters
        rows, columns = collect(client, args.study, tmp)
    if args.paper:
        figures, order = read_study_file(args.paper)
        columns = add_paper_columns(rows, columns, figures)
        rows[:] = in_file_order(rows, order)
    text = markdown(rows, columns, args.study)
    if not args.no_mlflow:
        text += register_models(client, uri, args.study, rows)
    out = Path(args.out) if args.out else resolve_path(args.runs_root) / "studies" / args.study / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns + ["run_id"])
        for row in rows:
            writer.writerow([cell(row, c) for c in columns] + [row["run_id"]])
    fig = bar_chart(rows, columns, args.study)
    fig.savefig(out / "report.png")
    print(text)
    print(f"saved {out / 'report.md'}, {out / 'report.csv'}, {out / 'report.png'}")
    result = {"rows": rows, "columns": columns, "markdown": text, "out": str(out), "run_id": None}
    if not args.no_mlflow:
        experiment = args.experiment
        if not experiment:
            first = client.get_run(rows[0].get("members", rows)[0]["run_id"])  # a seeded row: its first seed's
            experiment = client.get_experiment(first.info.experiment_id).name
        tags = {"study": args.study, "stage": "report", "method": "report", **parse_tags(args.tag)}
        files = [out / name for name in ("report.md", "report.csv", "report.png")]
        result["run_id"] = log_stage_run(uri, experiment, out / ".tracking", args.run_name,
                                         params={"study": args.study}, tags=tags, artifacts=files, label="summary run")
    return result


def main(argv=None) -> int:
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
