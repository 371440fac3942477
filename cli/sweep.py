"""``qbert sweep``: a grid of experiments through the pipeline, locally or on a Ray cluster."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from qbert.cli.common import RUNS_DIR_HELP, user_errors


def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep file or experiment config (YAML).", show_default=False)],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides for every cell.", show_default=False)
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", "-g", help="key=v1,v2,... : an axis over a config key (or a sweep file's var); "
                     "repeat for more axes.", show_default=False),
    ] = None,
    seeds: Annotated[str | None, typer.Option(help="Seeds of every cell: A..B or A,B,C.", show_default=False)] = None,
    executor: Annotated[str, typer.Option(help="local (worker processes) or ray.")] = "local",
    workers: Annotated[int, typer.Option(min=1, help="local: worker processes.")] = 1,
    threads: Annotated[
        int | None, typer.Option(min=1, help="torch threads per run (ray: CPUs per task). Default: cores / workers.",
                                 show_default=False)
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="ray: cluster address, or auto (default: a running local cluster, else a new "
                                 "local instance).", show_default=False)
    ] = None,
    gpus_per_run: Annotated[float, typer.Option(min=0, help="ray: GPUs per task (cuda configs ask for 1).")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Rerun seeds that already finished.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and exit.")] = False,
    runs_dir: Annotated[Path | None, typer.Option(help=RUNS_DIR_HELP, show_default=False)] = None,
) -> None:
    """Run every cell of a grid (every seed of every config), skipping what already finished.

    One failing run does not stop the others; the sweep ends with a table of what finished, failed
    and was skipped, and exits 1 if anything failed.
    """
    with user_errors(source=config):
        import os

        from rich.console import Console

        from qbert.report import sweep_table
        from qbert.runs import runs_root
        from qbert.sweep import expand, load_sweep, parse_grid_option, parse_seeds_option, ray_module, run_sweep

        spec, base = load_sweep(config)
        axes = dict(parse_grid_option(text) for text in grid or [])
        cells = expand(spec, base, grid=axes, overrides=overrides or [],
                       seeds=parse_seeds_option(seeds) if seeds is not None else None)
        console = Console()
        total = sum(len(c.config.seeds) for c in cells)
        if executor == "ray":
            ray_module()
        elif executor != "local":
            from qbert.errors import QbertError

            raise QbertError(f"unknown executor {executor!r} (local or ray)", key="--executor")
        if threads is None and executor == "local":
            threads = max(1, (os.cpu_count() or 1) // workers)
        console.print(f"[bold]sweep {spec.name}[/]: {len(cells)} cells, {total} runs, executor {executor}"
                      + (f", {workers} workers x {threads} threads" if executor == "local" else ""))
        if dry_run:
            from rich.markup import escape

            for cell in cells:
                console.print(escape(f"  {cell.config.name} {cell.hash} seeds {cell.config.seeds}  [{cell.label}]"))
            return

        def report(job, outcome) -> None:
            detail = (outcome.error or "") if outcome.state in ("failed", "busy") else ", ".join(
                f"{k} {v:.2f}" for k, v in outcome.metrics.items())
            console.print(f"{outcome.state:>8}  {outcome.name} seed {outcome.seed}: {detail}", markup=False)

        command = "qbert sweep " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        # one record per sweep file and command-line grid: another grid of the same file has its own record
        record_name = spec.name
        if axes or overrides or seeds is not None:
            from qbert.config import stable_hash

            record_name += "-" + stable_hash({"grid": axes, "set": overrides or [], "seeds": seeds}, length=8)
        result = run_sweep(cells, name=record_name, root=runs_dir, executor=executor, workers=workers,
                           threads=threads, address=address, gpus=gpus_per_run, force=force, command=command,
                           on_done=report, on_progress=lambda line: console.print(line, markup=False, soft_wrap=True))
        console.print(sweep_table(result))
        console.print(f"{result.count('done')} ran, {result.count('skipped')} skipped (finished before), "
                      f"{result.count('failed')} failed"
                      + (f", {result.count('busy')} busy (run by another process)" if result.count("busy") else "")
                      + f"; record: {result.record}; results: {runs_root(runs_dir)}")
        if result.count("failed"):
            raise typer.Exit(1)
