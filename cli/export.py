"""``qbert export``: write export formats for a finished run's seed, without training it again."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from qbert.cli.common import user_errors


def export(
    run_folder: Annotated[Path, typer.Argument(help="A finished seed folder: runs/<name>/<hash>/seed=<n>.",
                                               show_default=False)],
    formats: Annotated[list[str], typer.Option(
        "--format", "-f", help="hf, integer, onnx, packed or torchscript; repeatable.", show_default=False)],
    out: Annotated[Path | None, typer.Option(help="Write into OUT/<format> (default: the seed's export/).",
                                             show_default=False)] = None,
) -> None:
    """Write FORMATs for a finished post-training run, without training again.

    The method is derived again from the run's checkpoint, config and seed (seconds), checked against the
    run's report, and written."""
    with user_errors(source=run_folder):
        from qbert.pipeline.reexport import export_run

        for fmt, facts in export_run(run_folder, formats, out).items():
            size = facts.get("file_bytes") or facts.get("folder_bytes")
            typer.echo(f"{fmt}: {facts['path']}" + (f" ({size / 1e6:.2f} MB)" if size else "")
                       + (", bit-exact" if facts.get("bit_exact") else ""))
