"""``qbert ls``: the runs under the results folder, with status and headline metric."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import RUNS_DIR_HELP, user_errors


def ls(
    runs_dir: Annotated[Path | None, typer.Option(help=RUNS_DIR_HELP, show_default=False)] = None,
) -> None:
    """List experiments under the results folder: seeds finished, status, headline median."""
    with user_errors():
        from rich.console import Console

        from qbert.report import runs_table
        from qbert.runs import list_runs, runs_root

        root = runs_root(runs_dir)
        rows = list_runs(root)
        console = Console()
        if not rows:
            console.print(f"no runs under {root}")
            return
        console.print(runs_table(rows))
