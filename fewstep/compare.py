"""``fewstep compare RUN...``: one table and one plot for evaluated runs that distil the same teacher.

Each run folder contributes its ``config.yaml`` (method, teacher) and ``summary.json`` (the ``eval``
block written by ``fewstep eval`` or ``eval.reference``, and the training cost). Runs are refused
unless they share the teacher and were evaluated under one protocol (same number of samples, the same
reference images and feature network): FIDs from different protocols are not comparable.

Runs whose resolved configs differ only in ``train.seed`` are replicates of one recipe: besides their own
rows they get one row per step count in a second table, the mean over training seeds and the spread
(smallest to largest), so a difference between methods can be read against the seed-to-seed variation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from fewstep.reliability import current_config

__all__ = ["compare_runs", "load_run_summary"]


def load_run_summary(run: Path) -> dict[str, Any]:
    """The fields of one run that the comparison needs; clear errors for folders that lack them."""
    config_path, summary_path = run / "config.yaml", run / "summary.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run} is not a run folder ({config_path.name} is missing)")
    config = current_config(run, yaml.safe_load(config_path.read_text()))  # as its last resume left it
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if "eval" not in summary:
        raise ValueError(f"{run} has not been evaluated: run `fewstep eval {run}` first (or set eval.reference "
                         "in its recipe)")
    teacher = config.get("teacher", {})
    train = dict(config.get("train") or {})
    seed = train.pop("seed", 0)
    recipe = json.dumps({**config, "train": train}, sort_keys=True, default=str)  # the config less its seed
    return {"run": run, "method": config["method"]["name"], "teacher": str(teacher.get("pretrained")),
            "seed": seed, "recipe": recipe,
            "autoguidance": teacher.get("autoguidance"), "guidance": float(teacher.get("guidance", 1.0)),
            "eval": summary["eval"], "nimg": summary.get("nimg"),
            "wall_time_s": summary.get("wall_time_s"), "peak_memory_mb": summary.get("peak_memory_mb")}


def _protocol(e: dict[str, Any]) -> tuple:
    return e.get("num"), e.get("reference"), e.get("features")


def _check_comparable(runs: list[dict[str, Any]]) -> None:
    teachers = {r["teacher"] for r in runs}
    if len(teachers) > 1:
        listed = "; ".join(f"{r['run']}: {r['teacher']}" for r in runs)
        raise ValueError(f"these runs distil different teachers, so their numbers are not comparable: {listed}. "
                         "Compare runs that share teacher.pretrained")
    protocols = {_protocol(r["eval"]) for r in runs}
    if len(protocols) > 1:
        listed = "; ".join(f"{r['run']}: n={r['eval'].get('num')}, {r['eval'].get('reference')}" for r in runs)
        raise ValueError(f"these runs were evaluated under different protocols ({listed}); re-run `fewstep eval` "
                         "with the same --num, --reference and --features")


def _rows(run: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    found = []
    for label, metrics in run["eval"].items():
        m = re.fullmatch(r"student (\d+) steps?", label)
        if m and isinstance(metrics, dict):
            found.append((int(m.group(1)), metrics))
    return sorted(found, key=lambda row: row[0])


def _teacher_label(run: dict[str, Any]) -> str:
    """'teacher', or how the run's teacher row was guided (its recipe's teacher.guidance / autoguidance)."""
    if run["guidance"] == 1.0:
        return "teacher"
    return f"teacher, {'autoguided' if run['autoguidance'] else 'CFG'} {run['guidance']:g}"


def _teacher_rows(runs: list[dict[str, Any]]) -> list[tuple[str, int, dict[str, Any]]]:
    """One teacher row per distinct teacher setting among the runs (the unguided one first): runs that
    guide their teacher evaluate it guided, which is another distribution."""
    rows: dict[str, tuple[str, int, dict[str, Any]]] = {}
    for run in runs:
        label = _teacher_label(run)
        for name, metrics in run["eval"].items():
            m = re.fullmatch(r"teacher (\d+) steps", name)
            if m and isinstance(metrics, dict) and label not in rows:
                rows[label] = (label, int(m.group(1)), metrics)
    return sorted(rows.values(), key=lambda row: row[0] != "teacher")


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def compare_runs(paths: list[Path], out: Path | None = None) -> str:
    """The Markdown table of ``paths`` (also written to ``out/compare.md`` with the plot ``out/compare.png``)."""
    runs = [load_run_summary(Path(p)) for p in paths]
    _check_comparable(runs)
    e = runs[0]["eval"]
    lines = [f"Teacher: `{runs[0]['teacher']}`. FID, precision and recall on n = {e.get('num')} samples against "
             f"{e.get('reference')}.", "",
             "| method | run | steps | FID | precision | recall | images seen | wall time | peak memory | samples/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    teachers = _teacher_rows(runs)
    for label, k, m in teachers:
        lines.append(f"| {label} | – | {k} | {m['fid']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | – | – | – | "
                     f"{m['samples_per_s']:.1f} |")
    for run in runs:
        wall = None if run["wall_time_s"] is None else run["wall_time_s"] / 60
        for k, m in _rows(run):
            lines.append(
                f"| {run['method']} | {run['run'].name} | {k} | {m['fid']:.2f} | {m['precision']:.3f} | "
                f"{m['recall']:.3f} | {_fmt(run['nimg'], ',')} | {_fmt(wall, '.1f', ' min')} | "
                f"{_fmt(run['peak_memory_mb'], '.0f', ' MB')} | {m['samples_per_s']:.1f} |")
    lines += _seed_table(runs)
    table = "\n".join(lines) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(table)
        plot_fid_vs_steps(runs, teachers[0] if teachers else None, out / "compare.png")
    return table


def _seed_table(runs: list[dict[str, Any]]) -> list[str]:
    """Mean and spread over training seeds of every recipe that was run with more than one seed (none: [])."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run["recipe"], []).append(run)
    groups = {key: members for key, members in groups.items() if len({r["seed"] for r in members}) > 1}
    if not groups:
        return []
    lines = ["", "Across training seeds (runs whose configs differ only in `train.seed`): mean, and the spread "
             "from the smallest to the largest value.", "",
             "| method | runs | seeds | steps | FID mean | FID spread | precision mean | recall mean |",
             "|---|---|---|---|---|---|---|---|"]
    for members in groups.values():
        by_steps: dict[int, list[dict[str, Any]]] = {}
        for run in members:
            for k, m in _rows(run):
                by_steps.setdefault(k, []).append(m)
        names = ", ".join(r["run"].name for r in members)
        seeds = ", ".join(str(r["seed"]) for r in members)
        for k, rows in sorted(by_steps.items()):
            if len(rows) < len(members):
                continue  # a step count not evaluated in every replicate has no mean over the seeds
            fids = [m["fid"] for m in rows]
            lines.append(f"| {members[0]['method']} | {names} | {seeds} | {k} | {sum(fids) / len(fids):.2f} | "
                         f"{min(fids):.2f} – {max(fids):.2f} | {sum(m['precision'] for m in rows) / len(rows):.3f} | "
                         f"{sum(m['recall'] for m in rows) / len(rows):.3f} |")
    return lines


def plot_fid_vs_steps(runs: list[dict[str, Any]], teacher: tuple[str, int, dict[str, Any]] | None,
                      path: Path) -> Path:
    """FID against the number of sampling steps, one line per run, the (first) teacher row as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # distinct colours for up to 20 runs
    steps_seen: set[int] = set()
    for run in runs:
        rows = _rows(run)
        steps_seen.update(k for k, _ in rows)
        ax.plot([k for k, _ in rows], [m["fid"] for _, m in rows], marker="o", label=f"{run['method']} ({run['run'].name})")
    if teacher is not None:
        ax.axhline(teacher[2]["fid"], color="k", linestyle="--", linewidth=1, label=f"{teacher[0]}, {teacher[1]} steps")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # rows span from near the teacher to diverged runs
    ax.set_xticks(sorted(steps_seen), [str(k) for k in sorted(steps_seen)])
    ax.set_xlabel("sampling steps (network evaluations per step vary by method)")
    ax.set_ylabel("FID (lower is better, log scale)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
