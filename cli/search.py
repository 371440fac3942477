"""``qbert search``: the fewest sites of a post-training plan raised to 16 bits to stay within a target of FP32."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from qbert.cli.common import RUNS_DIR_HELP, user_errors


def search(
    config: Annotated[Path, typer.Argument(help="Experiment config (YAML) with a post-training recipe (w8a8_ptq, "
                                           "ptq, mp_ptq, peg).", show_default=False)],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, values parsed as YAML.", show_default=False)
    ] = None,
    target: Annotated[str, typer.Option(help="loss<=POINTS (headline points below FP32) or loss<=PERCENT% "
                                        "(relative to FP32).")] = "loss<=1.0",
    seed: Annotated[int | None, typer.Option(help="The seed searched (default: the config's first).",
                                             show_default=False)] = None,
    margin: Annotated[float, typer.Option(min=0, help="How far inside the target the search part must be (points, "
                                          "or percent for a relative target): room for the held-out part.")] = 0.0,
    confidence: Annotated[float, typer.Option(
        help="The search part's loss must be within the target at this one-sided confidence (a paired bootstrap over "
             "its examples); 0: the point estimate.")] = 0.9,
    holdout: Annotated[float, typer.Option(help="Share of the evaluation split held out for the final score.")] = 0.5,
    probe: Annotated[int, typer.Option(min=1, help="Examples of the search part the sensitivities are measured on.")
                     ] = 256,
    sites: Annotated[Literal["activations", "all"], typer.Option(
        help="Candidate sites: the quantized activations, or weights too.")] = "activations",
    high_bits: Annotated[str, typer.Option(help="Bits of a raised site (9-16), or fp: left in floating point (no "
                                           "range clips it).")] = "16",
    force: Annotated[bool, typer.Option("--force", help="Search again even if this search finished.")] = False,
    runs_dir: Annotated[Path | None, typer.Option(help=RUNS_DIR_HELP, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Choose the fewest sites to raise to 16 bits so the dev metric stays within TARGET of FP32.

    One seed: the evaluation split is cut into a search part (every decision) and a held-out part (the final
    score). Sites are ranked by leave-one-out sensitivity on probe examples of the search part, then raised in that
    order until the search part's loss is within the target at --confidence (a paired bootstrap). Writes
    search.json, evaluations.json (an interrupted search resumes) and chosen.yaml (the config with the chosen site
    rules) under <runs>/search/.
    """
    with user_errors(source=config):
        from rich.console import Console

        from qbert.config import load_config
        from qbert.precision_search import (
            SearchSettings,
            check_searchable,
            parse_confidence,
            parse_high_bits,
            parse_target,
            run_search,
        )
        from qbert.progress import Reporter

        goal = parse_target(target)
        bits = parse_high_bits(high_bits)
        bound = parse_confidence(confidence)
        cfg = load_config(config, overrides or [])
        check_searchable(cfg)
        settings = SearchSettings(goal, cfg.seeds[0] if seed is None else seed, holdout=holdout, probe=probe,
                                  margin=margin,
                                  kinds=("activation",) if sites == "activations" else ("activation", "weight"),
                                  high_bits=bits, confidence=bound)
        console = Console()
        console.print(f"[bold]{cfg.name}[/]: {cfg.model} on {cfg.task}, recipe {cfg.recipe.name}, seed "
                      f"{settings.seed}, target {goal}", soft_wrap=True)
        result = run_search(cfg, settings, root=runs_dir, reporter=Reporter(enabled=not quiet), force=force,
                            say=lambda line: console.print(line, soft_wrap=True, highlight=False))
        if result["chosen"]:
            console.print(search_table(result))
        else:
            console.print(f"no site needs raising: {result['recipe']} is within the target on the search part "
                          f"({result['evaluations']['total']} evaluations)", soft_wrap=True)
        held = result["held_out"]
        verdict = "within" if held["within"] else "NOT within"
        console.print(
            f"held-out part ({result['examples']['held_out']} examples): FP32 {held['fp32']:.2f}, "
            f"{result['recipe']} {held['start']:.2f}, chosen {held['chosen']:.2f}: loss {held['loss']:.2f} "
            f"{'%' if goal.relative else 'points'}, {verdict} {goal}", soft_wrap=True, highlight=False)
        if not result["reached"]:
            hint = ("; 16-bit sites keep their calibrated ranges, so clipping, not the grid's resolution, may be what "
                    "costs: try --high-bits fp" if settings.high_bits is not None else "; try --sites all")
            console.print(f"the target was not reached on the search part even with every candidate at "
                          f"{settings.raised} ({result['search']['chosen']:.2f}){hint}", soft_wrap=True,
                          highlight=False)
        if result["reached"] and not held["within"]:
            console.print(f"the search part ({result['examples']['search']} examples) was within the target and the "
                          "held-out part is not: its metric is noisier than the target; a higher --confidence or a "
                          "--margin asks the search part for more", soft_wrap=True)
        console.print(f"results: {result['folder']} (chosen.yaml: the config with these sites)", soft_wrap=True)
        if not result["reached"]:
            raise typer.Exit(1)


def search_table(result: dict) -> object:
    """The chosen sites with their sensitivities, and the evaluations spent."""
    from rich.table import Table

    sensitivity = {row["site"]: row["sensitivity"] for row in result["sensitivity"]["ranking"]}
    raised = "FP32" if result["high_bits"] is None else f"{result['high_bits']} bits"
    table = Table(title=f"{len(result['chosen'])} site(s) raised to {raised} "
                  f"({result['evaluations']['total']} evaluations)")
    table.add_column("rank", justify="right")
    table.add_column("site")
    table.add_column("sensitivity", justify="right")
    for rank, site in enumerate(result["chosen"], 1):
        table.add_row(str(rank), site, f"{sensitivity[site]:.4g}")
    return table
