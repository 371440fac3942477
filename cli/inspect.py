"""``qbert inspect sites``: the resolved quantization plan of a config, site by site."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from qbert.cli.common import user_errors

app = typer.Typer(
    help="Look inside a config without running it.", no_args_is_help=True, add_completion=False,
    epilog="Example: qbert inspect sites configs/mrpc_peg.yaml",
)


@app.command("sites", epilog="Example: qbert inspect sites configs/mnli_peg.yaml --summary")
def sites(
    config: Annotated[Path, typer.Argument(help="Experiment config (YAML).", show_default=False)],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, values parsed as YAML.", show_default=False)
    ] = None,
    summary: Annotated[bool, typer.Option("--summary", help="Only the totals, not every site.")] = False,
    kind: Annotated[
        str | None, typer.Option(help="Only 'activation' or 'weight' sites.", show_default=False)
    ] = None,
) -> None:
    """Print every site of CONFIG's model with its bits, granularity and range estimator, then totals.

    Reads only the model's config (weights are not loaded); canonical BERT ids work offline.
    """
    with user_errors(source=config):
        from qbert.recipes import get_recipe
        from rich.console import Console
        from rich.table import Table

        from qbert.config import load_config
        from qbert.errors import QbertError
        from qbert.models import model_skeleton
        from qbert.pipeline.run import check_site_plan
        from qbert.tasks import get_task

        if kind not in (None, "activation", "weight"):
            raise QbertError(f"--kind {kind!r}: use activation or weight")
        cfg = load_config(config, overrides or [])
        console = Console()
        task = get_task(cfg.task, cfg)
        skeleton, origin = model_skeleton(cfg.model, task.head, task.num_labels)
        plan = check_site_plan(cfg, skeleton)
        recipe = get_recipe(cfg.recipe.name)
        console.print(f"[bold]{cfg.name}[/]: recipe {cfg.recipe.name} ({recipe.source}); model {cfg.model} ({origin})")
        if plan is None:
            doc = " ".join((recipe.__doc__ or "").strip().split("\n\n")[0].split())  # the first paragraph
            console.print(f"recipe {cfg.recipe.name} has no static quantization sites: {doc}")
            return
        if not summary:
            table = Table("site", "kind", "quantizer", "estimator", box=None, pad_edge=False)
            for site in plan.sites:
                if kind and site.kind != kind:
                    continue
                spec = plan.specs[site.name]
                source = plan.permutation_sources.get(site.name)
                shared = f" (permutation of {source})" if source and source != site.name else ""
                table.add_row(site.name, site.kind, spec.describe() + shared if spec else "[dim]fp32[/]",
                              getattr(spec, "estimator", "") if spec else "")
            console.print(table)
        for kind_name, t in plan.totals().items():
            bits = ", ".join(f"{n} at {b} bits" for b, n in t["by_bits"].items()) or "none quantized"
            console.print(f"{kind_name} sites: {t['sites']} ({bits}; {t['fp']} in floating point)")
