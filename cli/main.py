"""The ``qbert`` command. Each command lives in its own module; heavy imports happen inside them."""

from __future__ import annotations

import typer

from cli import inspect as inspect_cmd
from cli import ls as ls_cmd
from cli import run as run_cmd
from cli import validate as validate_cmd

app = typer.Typer(
    name="qbert",
    help="Experiment runner for BERT quantization research: fine-tune, calibrate, quantize, "
    "evaluate and export GLUE/SQuAD models from one YAML config.",
    epilog="Example: qbert run configs/default.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("run", epilog="Example: qbert run configs/smoke.yaml finetune.epochs=2 seeds=[1,2,3]")(run_cmd.run)
app.command("validate", epilog="Example: qbert validate configs/*.yaml")(validate_cmd.validate)
app.command("ls", epilog="Example: qbert ls --runs-dir runs")(ls_cmd.ls)
app.add_typer(inspect_cmd.app, name="inspect")


def main() -> None:
    """Entry point for ``python -m cli``."""
    app()
