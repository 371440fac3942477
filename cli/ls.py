"""``qbert ls``: the runs (or sweeps) under the results folder, with status and headline metric."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from qbert.cli.common import RUNS_DIR_HELP, user_errors

STATUSES = ("done", "incomplete", "running", "orphaned", "damaged", "failed", "interrupted")


def ls(
    task: Annotated[str | None, typer.Option(help="Only this task.", show_default=False)] = None,
    recipe: Annotated[str | None, typer.Option(help="Only this recipe.", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(help="Only this model.", show_default=False)] = None,
    status: Annotated[
        str | None, typer.Option(help=f"Only runs whose status is this ({', '.join(STATUSES)}).", show_default=False)
    ] = None,
    sweeps: Annotated[bool, typer.Option("--sweeps", help="List sweeps instead of runs.")] = False,
    runs_dir: Annotated[Path | None, typer.Option(help=RUNS_DIR_HELP, show_default=False)] = None,
) -> None:
    """List experiments under the results folder: seeds finished, status, headline median."""
    with user_errors():
        from rich.console import Console

        from qbert.errors import QbertError
        from qbert.report import run_status, runs_table, sweeps_table
        from qbert.runs import list_runs, runs_root

        root = runs_root(runs_dir)
        console = Console()
        if not console.is_terminal:  # piped or in a log: whole names and paths, one row per line
            console = Console(width=400)
        if sweeps:
            from qbert.sweep import list_sweeps

            rows = list_sweeps(root)
            console.print(sweeps_table(rows) if rows else f"no sweeps under {root}")
            return
        if status is not None and status not in STATUSES:
            raise QbertError(f"unknown status {status!r} (one of {', '.join(STATUSES)})", key="--status")
        rows = [
            r for r in list_runs(root)
            if (task is None or r["config"].get("task") == task)
            and (recipe is None or (r["config"].get("recipe") or {}).get("name") == recipe)
            and (model is None or _same_model(model, r["config"].get("model")))
            and (status is None or status in run_status(r).split(", "))
        ]
        if not rows:
            console.print(f"no runs under {root}" + (" match the filters" if task or recipe or model or status else ""))
            return
        console.print(runs_table(rows))


def _same_model(wanted: str, configured: object) -> bool:
    """``--model`` matches the config's model as written, or a model folder by its last part
    (``--model bert-base-uncased`` finds ``models/bert-base-uncased``)."""
    text = str(configured or "")
    return wanted in (text, text.rstrip("/").rsplit("/", 1)[-1])
