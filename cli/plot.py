"""``qbert plot``: accuracy against model size over a task's finished runs, and Table 2's leave-one-out grid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from qbert.cli.common import RUNS_DIR_HELP, user_errors


def plot(
    task: Annotated[str, typer.Option(help="The task whose runs are plotted (mrpc, stsb, mnli, ...).")] = "stsb",
    model: Annotated[str, typer.Option(help="Only runs of this model (the config's model key).")] = "minilm-l6",
    metric: Annotated[str | None, typer.Option(help="Metric (comma-separated: the per-seed mean), e.g. "
                                               "pearson,spearman; default: the task's headline.",
                                               show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <runs>/plots/<task>-<model>).",
                                             show_default=False)] = None,
    runs_dir: Annotated[Path | None, typer.Option(help=RUNS_DIR_HELP, show_default=False)] = None,
) -> None:
    """Accuracy against model size for every finished config of a task: the median over seeds with min-max
    error bars, the size from each recipe's report (integer weights plus what stays FP32; GOBO's ledger;
    dynamic int8's state dict), the Pareto front marked. With leave-one-out runs (recipe.leave_out naming one
    site family, or one layer's site, beside the same config with leave_out: []) also Table 2's sensitivity
    as a family x layer heat map. Writes accuracy_size.png, points.csv (and sensitivity.png/csv).
    """
    with user_errors():
        from rich.console import Console
        from rich.table import Table

        from qbert.errors import QbertError
        from qbert.inspection.results import save_plots
        from qbert.runs import runs_root
        from qbert.tasks import TASKS, get_task

        if task not in TASKS:
            raise QbertError(f"unknown task {task!r} (one of {', '.join(TASKS)})", key="--task")
        root = runs_root(runs_dir)
        metrics = [m.strip() for m in metric.split(",") if m.strip()] if metric else None
        folder = out or root / "plots" / f"{task}-{model.replace('/', '_')}"
        done = save_plots(root, get_task(task), model, metrics, folder)
        if not done["points"]:
            raise QbertError(f"no finished {task} run of {model} with a size under {root}: run some first, e.g. "
                             f"qbert sweep configs/default.sweep.yaml", key="--task")
        table = Table("run", "recipe", "MB", done["metric"], "n", "Pareto", box=None, pad_edge=False)
        for p in done["points"]:
            table.add_row(p["label"], p["recipe"], f"{p['mb']:.2f}",
                          f"{p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f})", str(p["n"]),
                          "yes" if p in done["front"] else "")
        console = Console()
        console.print(table)
        written = done["files"]
        console.print(f"wrote {', '.join(written)} to {folder}", soft_wrap=True)
