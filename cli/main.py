"""The ``qbert`` command. Each command lives in its own module; heavy imports happen inside them."""

from __future__ import annotations

import inspect
from typing import Annotated

import typer
from qbert.cli import export as export_cmd
from qbert.cli import inspect as inspect_cmd
from qbert.cli import ls as ls_cmd
from qbert.cli import plot as plot_cmd
from qbert.cli import run as run_cmd
from qbert.cli import search as search_cmd
from qbert.cli import sweep as sweep_cmd
from qbert.cli import table as table_cmd
from qbert.cli import validate as validate_cmd

app = typer.Typer(
    name="qbert",
    help="Experiment runner for BERT quantization research: fine-tune, calibrate, quantize, "
    "evaluate and export GLUE/SQuAD models from one YAML config.",
    epilog="Example: qbert run configs/default.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _version(value: bool) -> None:
    if value:
        import qbert

        typer.echo(f"qbert {qbert.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Experiment runner for BERT quantization research: fine-tune, calibrate, quantize, evaluate and export
    GLUE/SQuAD models from one YAML config."""
    from qbert.errors import stacks_on_sigusr1, terminate_as_interrupt

    terminate_as_interrupt()
    stacks_on_sigusr1()

app.command("run", epilog="Example: qbert run configs/smoke.yaml finetune.epochs=2 'seeds=[1,2,3]'")(run_cmd.run)
app.command(
    "sweep",
    epilog="Example: qbert sweep configs/mrpc_w8a8_ptq.yaml --grid calibrate.batches=1,4,16 --seeds 42..44 --workers 2",
)(sweep_cmd.sweep)
app.command("table", epilog="Example: qbert table configs/papers/bondarenko2021/table6.yaml model=minilm-l6")(
    table_cmd.table
)
app.command(
    "validate", epilog="Example: qbert validate configs/*.yaml; qbert validate configs/mrpc_peg.yaml recipe.groups=3"
)(validate_cmd.validate)
app.command("search", epilog="Example: qbert search configs/stsb_w8a8_ptq.yaml --target 'loss<=1.0'")(
    search_cmd.search)
app.command("ls", epilog="Example: qbert ls --task mrpc --recipe peg --status done; qbert ls --sweeps")(ls_cmd.ls)
app.command("export", epilog="Example: qbert export runs/mrpc_gobo/<hash>/seed=42 --format hf")(export_cmd.export)
app.command("plot", epilog="Example: qbert plot --task stsb --model minilm-l6 --metric pearson,spearman")(
    plot_cmd.plot)
app.add_typer(inspect_cmd.app, name="inspect")


def _reflow(text: str) -> str:
    """A docstring as help text: each paragraph one line, so the terminal wraps it (rich keeps the source's
    line breaks and wraps again around them)."""
    return "\n\n".join(" ".join(part.split()) for part in inspect.cleandoc(text).split("\n\n"))


def _reflow_commands(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        doc = info.help or (info.callback.__doc__ if info.callback else None)
        if doc:
            info.help = _reflow(doc)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_commands(group.typer_instance)


_reflow_commands(app)


def main() -> None:
    """Entry point for ``python -m cli``."""
    app()
