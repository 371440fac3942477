"""``qbert table``: a paper's table from run outputs, next to the paper's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from qbert.cli.common import RUNS_DIR_HELP, user_errors


def table(
    spec: Annotated[Path, typer.Argument(help="Table spec (configs/papers/...), or a folder of them.",
                                         show_default=False)],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides of every cell, e.g. model=minilm-l6.", show_default=False),
    ] = None,
    grid: Annotated[
        list[str] | None,
        typer.Option("--grid", "-g", help="key=v1,v2: re-target a sweep axis, e.g. task=stsb.", show_default=False),
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option("--columns", help="Only these columns (labels, comma-separated), e.g. MNLI; no GLUE score.",
                     show_default=False),
    ] = None,
    md: Annotated[Path | None, typer.Option("--md", help="Also write Markdown here.", show_default=False)] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="Also write CSV here.", show_default=False)] = None,
    tex: Annotated[Path | None, typer.Option("--tex", help="Also write LaTeX here.", show_default=False)] = None,
    runs_dir: Annotated[Path | None, typer.Option(help=RUNS_DIR_HELP, show_default=False)] = None,
) -> None:
    """Render a table spec from finished runs: our median (min-max, n) beside the paper's number.

    Reads only run outputs; cells not run say so, and the table ends with the qbert sweep command
    that fills them. With a folder, every spec in it is rendered (files get the spec's name).
    """
    with user_errors(source=spec):
        from rich.console import Console

        from qbert.errors import QbertError
        from qbert.runs import atomic_write_text, runs_root
        from qbert.sweep import parse_grid_option
        from qbert.tables import build_table, spec_files, to_csv, to_latex, to_markdown, to_rich

        console = Console()
        specs = spec_files(spec) if spec.is_dir() else [spec]
        if not specs:
            raise QbertError("no table specs (*.yaml, not *.sweep.yaml) in this folder: give a spec or a folder "
                             "of them, e.g. configs/papers/bondarenko2021", key="SPEC")
        for path in specs:
            rendered = build_table(path, runs_root(runs_dir), overrides or [],
                                   dict(parse_grid_option(text) for text in grid or []),
                                   [c.strip() for c in columns.split(",")] if columns else None, runs_dir)
            console.print(to_rich(rendered))
            for target, render, suffix in ((md, to_markdown, ".md"), (csv, to_csv, ".csv"), (tex, to_latex, ".tex")):
                if target is None:
                    continue
                out = target / f"{path.parent.name}_{path.stem}{suffix}" if spec.is_dir() else target
                atomic_write_text(out, render(rendered))
                console.print(f"wrote {out}")
