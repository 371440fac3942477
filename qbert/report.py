"""Terminal rendering of results (rich tables): what `qbert run` and `qbert ls` print."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table


def fmt(value: float | None, digits: int = 2) -> str:
    """A metric for display, or a dash."""
    return "-" if value is None else f"{value:.{digits}f}"


def seed_line(outcome: Any) -> str:
    """One line per finished or skipped seed."""
    metrics = ", ".join(f"{k} {fmt(v)}" for k, v in outcome.metrics.items())
    if outcome.state == "busy":
        return f"seed {outcome.seed}: busy: {outcome.error}; skipped here (rerun once it has finished)"
    verb = "skipped (already finished)" if outcome.state == "skipped" else outcome.state
    return f"seed {outcome.seed}: {verb}: {metrics}"


def results_table(result: Any) -> Table:
    """Per-seed metrics and the median, min, max and n over seeds of one experiment."""
    summary = result.summary or {}
    names = list((summary.get("metrics") or {}).keys())
    title = f"{result.config.name}: {result.config.model} / {result.config.task} / {result.config.recipe.name}"
    caption = "metrics x100 (GLUE convention)"
    if summary.get("simulated"):
        caption += "; simulated (fake-quant) arithmetic"
    table = Table(title=title, caption=caption)
    table.add_column("seed")
    for name in names:
        headline = name == summary.get("headline")
        table.add_column(f"[bold]{name}[/]" if headline else name, justify="right")
    for seed, metrics in (summary.get("per_seed") or {}).items():
        table.add_row(str(seed), *(fmt(metrics.get(n)) for n in names))
    if summary:
        agg = summary["metrics"]
        table.add_section()
        table.add_row("median", *(fmt(agg[n]["median"]) for n in names))
        table.add_row("min-max", *(f"{fmt(agg[n]['min'])}-{fmt(agg[n]['max'])}" for n in names))
        table.add_row("n", *(str(agg[n]["n"]) for n in names))
    return table


def _seed_counts(row: dict[str, Any]) -> tuple[int, int]:
    """Finished and planned seeds of a config folder (planned: the config's seeds and any found)."""
    states = row["states"]
    done = sum(1 for s in states.values() if s == "done")
    return done, len({str(s) for s in row["config"].get("seeds") or []} | set(states))


def run_status(row: dict[str, Any]) -> str:
    """A config folder's status: done (every planned seed), incomplete, or the other seed states."""
    done, planned = _seed_counts(row)
    others = sorted({s for s in row["states"].values() if s != "done"})
    return "done" if done == planned and not others else ", ".join(others) or "incomplete"


def runs_table(rows: list[dict[str, Any]]) -> Table:
    """`qbert ls`: one row per config folder with seed states and the headline median."""
    table = Table(title="runs")
    for column in ("name", "hash", "model", "task", "recipe", "seeds", "status", "headline (median)"):
        table.add_column(column, justify="right" if column.startswith("headline") else "left", overflow="fold")
    for row in rows:
        cfg = row["config"]
        done, planned = _seed_counts(row)
        status = run_status(row)
        summary = row["summary"]
        headline = "-"
        if summary is not None and summary.headline in summary.metrics:
            h = summary.headline
            headline = f"{h} {fmt(summary.metrics[h]['median'])} (n={int(summary.metrics[h]['n'])})"
        table.add_row(
            str(cfg.get("name", row["path"].parent.name)), row["path"].name, str(cfg.get("model")),
            str(cfg.get("task")), str((cfg.get("recipe") or {}).get("name")), f"{done}/{planned}", status, headline,
        )
    return table


def sweep_table(result: Any) -> Table:
    """`qbert sweep`: one row per seed of every cell: state, headline metric, or the error and its log."""
    table = Table(title=f"sweep {result.name}")
    for column in ("run", "hash", "seed", "state", "result"):
        table.add_column(column)
    style = {"done": "green", "skipped": "dim", "failed": "red", "busy": "yellow"}
    for outcome in result.outcomes:
        if outcome.state == "failed":
            detail = escape(f"{outcome.error}\nlog: {outcome.log}")
        elif outcome.state == "busy":
            detail = escape(str(outcome.error))
        else:
            h = outcome.headline or next(iter(outcome.metrics), None)
            detail = f"{h} {fmt(outcome.metrics.get(h))}" if h else "-"
        table.add_row(outcome.name, outcome.hash, str(outcome.seed),
                      f"[{style.get(outcome.state, '')}]{outcome.state}[/]", detail)
    return table


def sweeps_table(rows: list[dict[str, Any]]) -> Table:
    """`qbert ls --sweeps`: one row per recorded sweep with its seeds' states."""
    table = Table(title="sweeps")
    for column in ("sweep", "cells", "done", "failed", "pending / running", "updated", "command"):
        table.add_column(column)
    for row in rows:
        counts = row["counts"]
        other = sum(v for k, v in counts.items() if k not in ("done", "failed"))
        table.add_row(row["name"], str(row["cells"]), str(counts.get("done", 0)), str(counts.get("failed", 0)),
                      str(other), row["updated"], row["command"])
    return table
