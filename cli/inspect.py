"""``qbert inspect``: a config's quantization plan (sites), a fine-tuned model's activation outliers (outliers)
and its weight distributions (weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from qbert.cli.common import RUNS_DIR_HELP, user_errors

app = typer.Typer(
    help="Look inside a config or a fine-tuned model: sites, outliers, weights.", no_args_is_help=True,
    add_completion=False,
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
        placement = getattr(cfg.recipe, "placement", None)
        placed = f"; placement {placement}" if placement else ""
        console.print(f"[bold]{cfg.name}[/]: recipe {cfg.recipe.name} ({recipe.source}){placed}; model {cfg.model} "
                      f"({origin})")
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


Target = Annotated[Path, typer.Argument(  # help texts are rich markup: no [...] in them
    help="Experiment config (YAML; its cached fine-tuned checkpoint) or a run folder (runs/<name>/<hash> or its "
    "seed=N).", show_default=False)]
ConfigOverrides = Annotated[
    list[str] | None, typer.Argument(help="key.path=value overrides of the config.", show_default=False)]
Seed = Annotated[int | None, typer.Option(help="Which seed's checkpoint (default: the config's first).",
                                          show_default=False)]
Figures = Annotated[bool, typer.Option("--figures/--no-figures", help="Write the PNG figures.")]
RunsDir = Annotated[Path | None, typer.Option(help=RUNS_DIR_HELP, show_default=False)]
"""The arguments and options ``outliers`` and ``weights`` share."""

DEFAULT_HISTOGRAMS = ("layer.0.attn.query.weight", "layer.{last}.ffn.output.weight", "embeddings.word.weight")
"""Matrices ``inspect weights`` draws histograms of: GOBO Figure 1's kind of layers, first and last."""


def _out_folder(out: Path | None, runs_dir: Path | None, inspected, kind: str) -> Path:
    from qbert.runs import runs_root

    if out is not None:
        return out
    return runs_root(runs_dir) / "inspect" / f"{inspected.config.name}-seed{inspected.seed}" / kind


@app.command("outliers", epilog="Example: qbert inspect outliers configs/stsb_fp32.yaml --sequences 16")
def outliers(
    target: Target,
    overrides: ConfigOverrides = None,
    seed: Seed = None,
    sequences: Annotated[int, typer.Option(min=1, help="Evaluation sequences to run (from the first).")] = 16,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <runs>/inspect/<name>-seed<n>/outliers).",
                                             show_default=False)] = None,
    figures: Figures = True,
    runs_dir: RunsDir = None,
) -> None:
    """The activation outliers of a fine-tuned model (Bondarenko et al. 2021, Figures 2 and 5).

    On the first evaluation sequences: per layer, the per-dimension range of the FFN input, output and residual
    sum, the dimensions with values beyond 6 standard deviations and how many of those sit on [SEP] or [CLS],
    each token's range (one sequence), and each head's attention to [SEP], [CLS] and the rest. Writes
    outliers.json, CSVs and PNGs; prints the outlier dimensions per layer.
    """
    with user_errors(source=target):
        from rich.console import Console
        from rich.table import Table

        from qbert.inspection import outliers as found
        from qbert.inspection.source import load_inspected

        console = Console()
        inspected = load_inspected(target, overrides or [], seed=seed, runs_dir=runs_dir)
        split = inspected.task.eval_splits[0]
        examples = inspected.task.load(split, inspected.config.data)[:sequences]
        max_len = inspected.config.finetune.max_seq_len
        features = inspected.task.encode_eval(inspected.tokenizer, examples, max_len)[:sequences]
        report = found.inspect_outliers(inspected.model, inspected.tokenizer, features)
        folder = _out_folder(out, runs_dir, inspected, "outliers")
        files = found.save(report, folder, inspected.label, figures=figures)
        console.print(f"[bold]{inspected.label}[/]: {report.sequences} {split} sequences, {report.token_count} "
                      f"tokens ({100 * report.sep_share:.1f}% [SEP], {100 * report.cls_share:.1f}% [CLS]); "
                      f"checkpoint {inspected.checkpoint}", soft_wrap=True)
        console.print(f"dimensions with values beyond {found.OUTLIER_STD:g} std of their tensor, farthest first "
                      "(dim: farthest value in std; where most of those values are, when on [CLS] or [SEP]):",
                      soft_wrap=True)
        table = Table("layer", "site", "outlier dimensions", box=None, pad_edge=False)
        for s in report.sites:
            dims = s.outlier_dimensions()
            cells = [f"{d['dim']}: {d['stds']:.0f}σ" + (f" {100 * d['at_cls']:.0f}% [CLS]" if d["at_cls"] >= 0.5 else
                                                        f" {100 * d['at_sep']:.0f}% [SEP]" if d["at_sep"] >= 0.5
                                                        else "") for d in dims[:3]]
            more = f" (+{len(dims) - 3})" if len(dims) > 3 else ""
            table.add_row(str(s.layer), s.site, ", ".join(cells) + more if cells else "-")
        console.print(table)
        sep, cls = report.attention[..., 0], report.attention[..., 1]
        console.print("attention per layer (mean over heads) to [SEP]: "
                      + " ".join(f"{v:.2f}" for v in sep.mean(-1)) + "; to [CLS]: "
                      + " ".join(f"{v:.2f}" for v in cls.mean(-1))
                      + f"; heads sending most of it to [SEP]: {int((sep > 0.5).sum())}/{sep.size}, "
                        f"to [CLS]: {int((cls > 0.5).sum())}/{cls.size}", soft_wrap=True)
        console.print(f"wrote {', '.join(sorted(files))} to {folder}", soft_wrap=True)


@app.command("weights", epilog="Example: qbert inspect weights configs/stsb_gobo.yaml --bits 3")
def weights(
    target: Target,
    overrides: ConfigOverrides = None,
    seed: Seed = None,
    histograms: Annotated[str, typer.Option(
        help="Weight sites (globs, comma-separated; {last} = the last layer) to draw histograms of.")
    ] = ",".join(DEFAULT_HISTOGRAMS),
    bits: Annotated[int | None, typer.Option(min=1, max=8, help="Bits of the clustering whose error per iteration "
                                             "is traced (default: the config's gobo bits, else 3).",
                                             show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <runs>/inspect/<name>-seed<n>/weights).",
                                             show_default=False)] = None,
    figures: Figures = True,
    runs_dir: RunsDir = None,
) -> None:
    """The weight distributions of a fine-tuned model, as GOBO (Zadeh et al. 2020) draws them.

    Per matrix: the fitted Gaussian and the outliers GOBO keeps in FP32 (log-density <= -4): histograms
    (Figure 1), the outlier share of every encoder FC layer (Figure 3), and for the first histogram's linear
    layer the L1 and L2 error per iteration of GOBO's stopping rule against K-means (Figure 2). Writes
    weights.csv, weights.json and PNGs; prints the outlier shares.
    """
    with user_errors(source=target):
        from rich.console import Console
        from rich.table import Table

        from qbert.errors import QbertError
        from qbert.inspection import weights as found
        from qbert.inspection.source import load_inspected

        console = Console()
        inspected = load_inspected(target, overrides or [], seed=seed, runs_dir=runs_dir)
        matrices = found.weight_matrices(inspected.model)
        last = inspected.model.config.num_hidden_layers - 1
        patterns = [p.strip() for p in histograms.split(",") if p.strip()]
        chosen = found.select(list(matrices), patterns, last)
        if patterns and not chosen:
            raise QbertError(f"--histograms {histograms!r} matches no weight site (e.g. layer.0.ffn.output.weight, "
                             "embeddings.word.weight)", key="--histograms")
        stats = found.matrix_stats(matrices)
        recipe = inspected.config.recipe
        bits = bits or (getattr(recipe, "bits", None) if recipe.name == "gobo" else None) or 3
        traced = next((s for s in chosen if s.startswith("layer.")), None)
        errors = found.clustering_errors(matrices[traced], bits) if traced else None
        folder = _out_folder(out, runs_dir, inspected, "weights")
        files = found.save(matrices, stats, chosen, errors, traced, folder, inspected.label, figures=figures)
        linear = [s for s in stats if s.site.startswith("layer.")]
        share = sum(s.outliers for s in linear) / sum(s.numel for s in linear)
        console.print(f"[bold]{inspected.label}[/]: {len(stats)} weight matrices; GOBO outliers (log-density <= "
                      f"{found.DEFAULT_THRESHOLD:g}) in the encoder's FC layers: {100 * share:.3f}% of their "
                      "weights", soft_wrap=True)
        families = ("attn.query", "attn.key", "attn.value", "attn.output", "ffn.intermediate", "ffn.output")
        short = ("query", "key", "value", "attn.out", "ffn.int", "ffn.out")
        table = Table("layer", *short, box=None, pad_edge=False, title="outliers per FC layer (%)",
                      title_justify="left")
        shares = {s.site: f"{100 * s.outlier_fraction:.3f}" for s in linear}
        for layer in range(last + 1):
            table.add_row(str(layer), *(shares.get(f"layer.{layer}.{f}.weight", "-") for f in families))
        console.print(table)
        if errors:
            g, k = errors["gobo"], errors["kmeans"]
            settles = "settles" if k["converged"] else "has not settled"
            console.print(f"{traced}, {bits} bits: GOBO stops after {len(g['l1']) - 1} rounds at L1 {g['l1'][-1]:.3e} "
                          f"per weight; K-means {settles} after {len(k['l1']) - 1} at L1 {k['l1'][-1]:.3e}, "
                          f"L2 {k['l2'][-1]:.3e} (GOBO: {g['l2'][-1]:.3e})", soft_wrap=True)
        console.print(f"wrote {', '.join(sorted(files))} to {folder}", soft_wrap=True)
