"""``qbert run``: every seed of one experiment through the pipeline, then its results table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from qbert.cli.common import RUNS_DIR_HELP, user_errors


def run(
    config: Annotated[Path, typer.Argument(help="Experiment config (YAML).", show_default=False)],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, values parsed as YAML.", show_default=False)
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun seeds that already finished.")] = False,
    runs_dir: Annotated[Path | None, typer.Option(help=RUNS_DIR_HELP, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Fine-tune, calibrate, quantize, evaluate and export CONFIG for every seed.

    Finished seeds are skipped (results are found by config hash); an interrupted seed restarts.
    """
    with user_errors(source=config):
        from rich.console import Console

        from qbert.config import load_config
        from qbert.pipeline.run import run_experiment
        from qbert.progress import Reporter
        from qbert.report import results_table, seed_line

        cfg = load_config(config, overrides or [])
        console = Console()
        result = run_experiment(
            cfg, root=runs_dir, force=force, reporter=Reporter(enabled=not quiet),
            on_start=lambda folder: console.print(
                f"[bold]{cfg.name}[/]: {cfg.model} on {cfg.task}, recipe {cfg.recipe.name}, "
                f"seeds {cfg.seeds} -> {folder}", soft_wrap=True,
            ),
            on_seed=lambda outcome: console.print(seed_line(outcome), soft_wrap=True),
        )
        if result.summary:
            console.print(results_table(result))
        else:
            console.print("no seed of this config has finished yet", soft_wrap=True)
        console.print(f"results: {result.folder}", soft_wrap=True)
