"""Paper tables from run outputs: a table spec names a sweep, which of its coordinates are rows and
columns, the metric of each column and the paper's numbers; each cell is our median over seeds (with
min-max and n) beside the paper's number and the difference.

Only run outputs are read (each seed's ``metrics.json``, found by the cell's config hash), never
recomputed. Spec (YAML)::

    title: "Bondarenko et al. (2021), Table 6"
    source: "seeds/004, Table 6"
    model: bert-base-uncased             # the paper's model; `model=...` on the command line re-targets
    sweep: table6.sweep.yaml             # relative to the spec
    rows:
      by: method                         # a sweep coordinate (var or grid key)
      items:
        - {value: fp32, label: FP32, paper: {cola: 57.27, mrpc: 88.36}}
        - {value: qbert_qat, label: Q-BERT QAT, missing: "no recipe: Q-BERT"}
    columns:
      by: task                           # or null: every column reads the row's one cell
      items:
        - {value: mrpc, label: MRPC, metric: [f1, accuracy]}   # a list: per-seed mean of the metrics
        - {value: cola, label: CoLA, metric: matthews}
    glue: true                           # a GLUE score column (macro average, WNLI excluded)
    notes: ["..."]

A metric with a dot is a path into ``metrics.json`` (``recipe_report.size.mb``, ``timings.evaluate``);
``a|b`` is the first of them a run has (GOBO's packed file or the integer file's compression).
"""

from __future__ import annotations

import csv
import io
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from qbert.config import Section, expect_kind, read_yaml, schema_error
from qbert.errors import QbertError
from qbert.records import SeedRecord, read_record
from qbert.runs import finished_seeds
from qbert.sweep import Cell, expand, load_sweep

GLUE_METRICS = {
    "cola": "Matthews correlation", "sst2": "accuracy", "mrpc": "mean of F1 and accuracy",
    "stsb": "mean of Pearson and Spearman", "qqp": "mean of F1 and accuracy", "mnli": "matched accuracy",
    "qnli": "accuracy", "rte": "accuracy",
}


class Item(Section):
    """A row or a column: the coordinate value it selects, its label, and (columns) its metric."""

    value: Any = Field(None, description="The coordinate value this item selects (the axis' `by`).")
    label: str = Field(description="Row or column heading.")
    where: dict[str, Any] | None = Field(None, description="Coordinates to match instead of the axis' by=value.")
    metric: str | list[str] | None = Field(None, description="Metric name, dotted path into metrics.json (a|b: "
                                           "the first a run has), or a list (per-seed mean); null: the task's "
                                           "headline.")
    digits: int = Field(2, description="Decimals shown.")
    scale: float = Field(1.0, description="Multiplies our values (e.g. bytes -> MiB); the paper's are as given.")
    paper: dict[str, float | None] = Field(default_factory=dict, description="Row: column value -> number.")
    missing: str | None = Field(None, description="Why this row cannot be run here (e.g. no recipe).")


class Axis(Section):
    """The rows or the columns of a table: the sweep coordinate they select by, and their items."""

    by: str | None = Field(None, description="A var or grid key of the sweep; null: items use `where` or none.")
    items: list[Item] = Field(description="One per row or column, in order.")


class TableSpec(Section):
    """A paper table: which sweep produces it, its rows and columns, and the paper's numbers."""

    title: str = Field(description="The table's caption.")
    source: str = Field("", description="Where the paper's numbers come from (seed file, table).")
    model: str | None = Field(None, description="The model the cells run with (default: the configs'); "
                              "`model=...` on the command line re-targets.")
    paper_model: str | None = Field(None, description="The paper's model, when not `model`.")
    sweep: str = Field(description="The sweep file that produces the cells, relative to the spec.")
    rows: Axis
    columns: Axis
    glue: bool = Field(False, description="Add a GLUE score column (macro average, WNLI excluded).")
    versus: str | None = Field(None, description="A row's label: each column also shows ours minus that row's ours "
                               "(and the paper's minus its own), so a delta compares methods on one model, never "
                               "our model against the paper's.")
    notes: list[str] = Field(default_factory=list, description="Footnotes printed under the table.")


def load_table_spec(path: str | Path) -> TableSpec:
    """Read and validate a table spec (one-line errors naming the file and key)."""
    path = Path(path)
    data = read_yaml(path)
    expect_kind(data, path, "table")
    try:
        return TableSpec.model_validate(data)
    except ValidationError as exc:
        raise schema_error(exc, TableSpec, str(path)) from None


# ---------------------------------------------------------------- cells


@dataclass
class Value:
    """Our number for one cell: median, min, max, n over finished seeds, or why there is none."""

    status: str  # ok | not run | no recipe | not in sweep
    median: float | None = None
    low: float | None = None
    high: float | None = None
    n: int = 0
    planned: int = 0
    simulated: bool = False
    weak: bool = False
    """A seed's FP32 model was no better than the input-blind predictor (its metrics.json ``trivial``)."""
    paper: float | None = None
    note: str | None = None
    seeds: list[int] = field(default_factory=list)
    base: float | None = None
    """The ``versus`` row's median in the same column (ours)."""
    paper_base: float | None = None
    """The ``versus`` row's paper number in the same column."""

    @property
    def gain(self) -> float | None:
        """Ours minus the ``versus`` row's ours."""
        return None if self.median is None or self.base is None else self.median - self.base

    @property
    def paper_gain(self) -> float | None:
        """The paper's minus the paper's ``versus`` row."""
        return None if self.paper is None or self.paper_base is None else self.paper - self.paper_base

    @property
    def delta(self) -> float | None:
        if self.median is None or self.paper is None:
            return None
        return self.median - self.paper


def lookup_metric(record: SeedRecord, metric: str) -> float | None:
    """A metric name, or a dotted path into ``metrics.json`` (keys may hold dots: the longest match wins);
    ``a|b``: the first alternative the record has."""
    if "|" in metric:
        return next((v for v in (lookup_metric(record, m) for m in metric.split("|")) if v is not None), None)
    node: Any = record.model_dump(mode="json") if "." in metric else record.metrics
    parts = metric.split(".")
    while parts:
        if not isinstance(node, dict):
            return None
        for n in range(len(parts), 0, -1):
            key = ".".join(parts[:n])
            if key in node:
                node, parts = node[key], parts[n:]
                break
        else:
            return None
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None


def seed_records(root: Path, cell: Cell) -> dict[int, SeedRecord]:
    """The metrics records of a cell's finished seeds (of the seeds it asks for), under any run name."""
    records = {seed: read_record(folder)
               for seed, folder in finished_seeds(root, cell.hash).items() if seed in cell.config.seeds}
    return {seed: record for seed, record in records.items() if record is not None}


def cell_value(root: Path, cell: Cell, metric: str | list[str] | None, scale: float = 1.0) -> Value:
    """A cell's number from its seeds' ``metrics.json`` (``metric`` None: the task's headline)."""
    records = seed_records(root, cell)
    per_seed = []
    for seed in sorted(records):
        metrics = [records[seed].headline] if metric is None else [metric] if isinstance(metric, str) else metric
        values = [lookup_metric(records[seed], m) for m in metrics]
        if all(v is not None for v in values):
            per_seed.append(scale * sum(values) / len(values))
    planned = len(cell.config.seeds)
    if not per_seed:
        return Value("n/a" if records else "not run", planned=planned,
                     note=f"{metric} is not in the runs' metrics.json" if records else None)
    return Value("ok", statistics.median(per_seed), min(per_seed), max(per_seed), len(per_seed), planned,
                 simulated=any(r.simulated for r in records.values()), seeds=sorted(records),
                 weak=any((r.trivial or {}).get("weak") for r in records.values()))


@dataclass
class RenderedTable:
    """A table spec filled from run outputs."""

    spec: TableSpec
    spec_path: Path
    model: str
    rows: list[Item]
    columns: list[Item]
    values: dict[tuple[int, int], Value]
    glue: dict[int, Value]
    fill_command: str
    not_run: int

    def metric_note(self) -> str:
        """Which metric each column shows."""
        parts = []
        for col in self.columns:
            m = (col.metric if isinstance(col.metric, str) else "the task's headline" if not col.metric
                 else f"mean of {' and '.join(col.metric)}")
            parts.append(f"{col.label}: {m}")
        return "; ".join(parts)


def build_table(spec_path: str | Path, root: Path, overrides: list[str] | None = None,
                grid: dict[str, list[Any]] | None = None, columns: list[str] | None = None,
                runs_dir: str | Path | None = None) -> RenderedTable:
    """Fill a table spec from the run outputs under ``root`` (``overrides``: e.g. ``model=minilm-l6``;
    ``grid``: re-targets a sweep axis, e.g. ``{"task": ["stsb"]}``; ``columns``: only the columns with these
    labels, without the GLUE score; ``runs_dir``: the results folder the user named, repeated in the command
    that fills the table)."""
    spec_path = Path(spec_path)
    spec = load_table_spec(spec_path)
    if columns:
        labels = [col.label for col in spec.columns.items]
        unknown = [c for c in columns if c not in labels]
        if unknown:
            raise QbertError(f"no column is labelled {unknown[0]!r}; use one of: {', '.join(labels)}",
                             source=str(spec_path), key="columns")
        kept = [col for col in spec.columns.items if col.label in columns]
        spec = spec.model_copy(update={"columns": spec.columns.model_copy(update={"items": kept}), "glue": False})
    sweep_path = spec_path.parent / spec.sweep
    sweep, base = load_sweep(sweep_path)
    if spec.model and not any(o.startswith("model=") for o in overrides or []):
        overrides = [f"model={spec.model}", *(overrides or [])]
    cells = expand(sweep, base, overrides=overrides, grid=grid)
    model = cells[0].config.model if cells else (spec.model or "?")
    values: dict[tuple[int, int], Value] = {}
    for r, row in enumerate(spec.rows.items):
        for c, col in enumerate(spec.columns.items):
            paper = row.paper.get(str(col.value) if col.value is not None else col.label)
            if row.missing:
                values[r, c] = Value("no recipe", paper=paper, note=row.missing)
                continue
            # a column's coordinate is not asked of cells that do not have it (an FP32 row in every column)
            rows_want, cols_want = _where(spec.rows, row), _where(spec.columns, col)
            match = [cell for cell in cells
                     if all(cell.coords.get(k) == v for k, v in rows_want.items())
                     and all(cell.coords.get(k, v) == v for k, v in cols_want.items())]
            if not match:
                values[r, c] = Value("not in sweep", paper=paper)
                continue
            metric, scale = (col.metric, col.scale) if col.metric is not None else (row.metric, row.scale)
            value = cell_value(root, match[0], metric, scale)
            value.paper = paper
            values[r, c] = value
    glue = {}
    if spec.glue:
        glue_cols = _glue_columns(spec, values)
        for r in range(len(spec.rows.items)):
            ours = [values[r, c].median for c in glue_cols]
            theirs = [values[r, c].paper for c in glue_cols]
            glue[r] = Value(
                "ok" if all(v is not None for v in ours) else "incomplete",
                statistics.fmean(ours) if all(v is not None for v in ours) else None,
                paper=statistics.fmean(theirs) if all(v is not None for v in theirs) else None,
                simulated=any(values[r, c].simulated for c in glue_cols),
            )
    if spec.versus is not None:
        labels = [row.label for row in spec.rows.items]
        if spec.versus not in labels:
            raise QbertError(f"no row is labelled {spec.versus!r}; use one of: {', '.join(labels)}",
                             source=str(spec_path), key="versus")
        base = labels.index(spec.versus)
        for (_r, c), value in values.items():
            value.base, value.paper_base = values[base, c].median, values[base, c].paper
    not_run = sum(1 for v in values.values() if v.status == "not run")
    command = " ".join(["qbert sweep", shlex.quote(str(sweep_path)), *(shlex.quote(o) for o in overrides or []),
                        *(f"--grid {shlex.quote(k + '=' + ','.join(map(str, v)))}" for k, v in (grid or {}).items()),
                        *([f"--runs-dir {shlex.quote(str(runs_dir))}"] if runs_dir is not None else [])])
    return RenderedTable(spec, spec_path, model, spec.rows.items, spec.columns.items, values, glue, command, not_run)


def _where(axis: Axis, item: Item) -> dict[str, Any]:
    if item.where is not None:
        return item.where
    return {axis.by: item.value} if axis.by else {}


def _glue_columns(spec: TableSpec, values: dict[tuple[int, int], Value]) -> list[int]:
    """Columns of GLUE tasks (WNLI excluded) that the sweep covers."""
    return [c for c, col in enumerate(spec.columns.items)
            if col.where is None and str(col.value) in GLUE_METRICS
            and any(values[r, c].status not in ("not in sweep", "no recipe") for r in range(len(spec.rows.items)))]


# ---------------------------------------------------------------- formats


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


WEAK_MARK = "‡"
"""Marks a cell whose FP32 baseline is no better than the input-blind predictor."""


def ours_text(value: Value, digits: int = 2, mark: str = "†") -> str:
    """``median (min-max) n=k``, marked when simulated; the status when there is no number."""
    if value.status != "ok":
        return value.status
    text = _num(value.median, digits)
    if value.n > 1:
        text += f" ({_num(value.low, digits)}-{_num(value.high, digits)})"
    text += f" n={value.n}" + (f"/{value.planned}" if value.planned and value.n < value.planned else "")
    return text + (mark if value.simulated else "") + (WEAK_MARK if value.weak else "")


def _signed(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:+.{digits}f}"


def delta_text(value: Value, digits: int = 2) -> str:
    """Ours minus the paper's, signed; empty when either is missing."""
    return _signed(value.delta, digits)


def _column_heads(table: RenderedTable, c: int) -> list[str]:
    """The sub-columns of table column ``c``: ours, paper, Δ; with ``versus``: ours and Δ vs that row, then
    the paper's and its Δ vs that row where the paper has numbers in the column."""
    versus = table.spec.versus
    if versus is None:
        return ["ours", "paper", "Δ"]
    heads = ["ours", f"Δ vs {versus}"]
    if any(table.values[r, c].paper is not None for r in range(len(table.rows))):
        heads += ["paper", f"paper Δ vs {versus}"]
    return heads


def _column_cells(table: RenderedTable, r: int, c: int, heads: int) -> list[str]:
    """Row ``r``'s cells under the ``heads`` sub-columns of table column ``c``."""
    v, digits = table.values[r, c], table.columns[c].digits
    paper = _num(v.paper, digits) if v.paper is not None else ""
    if table.spec.versus is None:
        return [ours_text(v, digits), paper, delta_text(v, digits)]
    cells = [ours_text(v, digits), _signed(v.gain, digits)]
    return cells + [paper, _signed(v.paper_gain, digits)] if heads > 2 else cells


def _grid(table: RenderedTable) -> tuple[list[str], list[list[str]]]:
    header = [""]
    heads = [_column_heads(table, c) for c in range(len(table.columns))]
    for col, col_heads in zip(table.columns, heads, strict=True):
        header += [f"{col.label} {head}" for head in col_heads]
    if table.glue:
        header += ["GLUE ours", "GLUE paper", "GLUE Δ"]
    body = []
    for r, row in enumerate(table.rows):
        line = [row.label]
        for c, col_heads in enumerate(heads):
            line += _column_cells(table, r, c, len(col_heads))
        if table.glue:
            g = table.glue[r]
            line += [_num(g.median) + ("†" if g.simulated and g.median is not None else "")
                     if g.status == "ok" else "incomplete", _num(g.paper) if g.paper is not None else "",
                     delta_text(g)]
        body.append(line)
    return header, body


def footnotes(table: RenderedTable) -> list[str]:
    """What every rendering states under the table: models, metrics, marks, GLUE rule, how to fill it."""
    paper_model = table.spec.paper_model or table.spec.model or "?"
    source = f" ({table.spec.source})" if table.spec.source else ""
    notes = [f"Ours: {table.model}, median (min-max) over seeds, n = finished seeds; paper: {paper_model}{source}."]
    notes.append(f"Metrics: {table.metric_note()}.")
    if any(v.simulated for v in table.values.values()):
        notes.append("† simulated: fake-quantized model evaluated in floating point, not integer kernels.")
    if any(v.weak for v in table.values.values()):
        notes.append(f"{WEAK_MARK} weak baseline: a seed's FP32 model is no better than predicting the majority class "
                     "(regression: a constant); see its metrics.json `trivial`.")
    if table.glue:
        used = [table.columns[c] for c in _glue_columns(table.spec, table.values)]
        notes.append("GLUE: macro average over the tasks in the sweep (" + ", ".join(
            f"{c.label} {GLUE_METRICS[str(c.value)]}" for c in used) + "; WNLI excluded), ours and the "
            "paper's over the same tasks.")
    for row in table.rows:
        if row.missing:
            notes.append(f"{row.label}: {row.missing}.")
    if table.spec.versus is not None:
        notes.append(f"Δ vs {table.spec.versus}: ours minus our {table.spec.versus} row (the same model and seeds); "
                     f"the paper's Δ likewise within the paper's model. Compare the two Δs, not ours with the paper's "
                     "numbers.")
    notes += table.spec.notes
    if table.not_run:
        notes.append(f"{table.not_run} cells not run; fill them with: {table.fill_command}")
    return notes


def to_markdown(table: RenderedTable) -> str:
    """GitHub Markdown: ours, paper and delta columns per table column, then the footnotes."""
    header, body = _grid(table)
    lines = [f"**{table.spec.title}**", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body]
    lines += [""] + [f"- {note}" for note in footnotes(table)]
    return "\n".join(lines) + "\n"


def to_csv(table: RenderedTable) -> str:
    """One CSV row per cell (and GLUE), with status, spread, n, simulated, paper and delta."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["row", "column", "metric", "status", "median", "min", "max", "n", "planned", "simulated",
                     "paper", "delta", "model", "delta_versus", "paper_delta_versus"])
    for r, row in enumerate(table.rows):
        for c, col in enumerate(table.columns):
            v = table.values[r, c]
            metric = col.metric if isinstance(col.metric, str) else "+".join(col.metric or [])
            writer.writerow([row.label, col.label, metric, v.status, v.median, v.low, v.high, v.n, v.planned,
                             v.simulated, v.paper, v.delta, table.model, v.gain, v.paper_gain])
        if table.glue:
            g = table.glue[r]
            writer.writerow([row.label, "GLUE", "macro average", g.status, g.median, "", "", "", "", g.simulated,
                             g.paper, g.delta, table.model])
    return out.getvalue()


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
                  "†": r"$^\dagger$", "Δ": r"$\Delta$"}


def _tex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(table: RenderedTable) -> str:
    """A booktabs ``table`` environment with ours / paper / delta per column."""
    header, body = _grid(table)
    heads = [_column_heads(table, c) for c in range(len(table.columns))] + ([["ours", "paper", "Δ"]] if table.glue
                                                                            else [])
    labels = [c.label for c in table.columns] + (["GLUE"] if table.glue else [])
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{l" + "".join("r" * len(h) for h in heads) + "}", r"\toprule",
             " & " + " & ".join(rf"\multicolumn{{{len(h)}}}{{c}}{{{_tex(lab)}}}" for lab, h in zip(labels, heads,
                                                                                              strict=True)) + r" \\",
             " & " + " & ".join(" & ".join(_tex(x) for x in h) for h in heads) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(cell) for cell in line) + r" \\" for line in body]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex(table.spec.title)}. "
              + _tex(" ".join(footnotes(table)[:3])) + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_rich(table: RenderedTable) -> Any:
    """The terminal form: one column per table column, ours above the paper's number and the difference."""
    from rich.table import Table

    out = Table(title=table.spec.title, caption="\n".join(footnotes(table)), caption_justify="left",
                show_lines=True)
    out.add_column("")
    for col in table.columns:
        out.add_column(col.label, justify="right", overflow="fold")
    if table.glue:
        out.add_column("GLUE", justify="right")

    versus = table.spec.versus

    def cell(v: Value, digits: int) -> str:
        text = ours_text(v, digits)
        if versus is not None:
            text += f"\n[bold]Δ vs {versus} {_signed(v.gain, digits)}[/]" if v.gain is not None else ""
            if v.paper is not None:
                text += f"\n[dim]paper {_num(v.paper, digits)}" + (
                    f" (Δ vs {versus} {_signed(v.paper_gain, digits)})" if v.paper_gain is not None else "") + "[/]"
            return text
        if v.paper is not None:
            text += f"\n[dim]paper {_num(v.paper, digits)}" + (f" ({delta_text(v, digits)})" if v.delta is not None
                                                               else "") + "[/]"
        return text

    for r, row in enumerate(table.rows):
        line = [row.label] + [cell(table.values[r, c], col.digits) for c, col in enumerate(table.columns)]
        if table.glue:
            g = table.glue[r]
            line.append(cell(Value(g.status if g.status != "ok" else "ok", g.median, paper=g.paper,
                                   simulated=g.simulated), 2) if g.median is not None else
                        "incomplete" + (f"\n[dim]paper {_num(g.paper)}[/]" if g.paper is not None else ""))
        out.add_row(*line)
    return out


def spec_files(folder: Path) -> list[Path]:
    """Every table spec under ``folder`` (files that are not sweep files)."""
    return sorted(p for p in folder.rglob("*.yaml") if not p.name.endswith(".sweep.yaml"))
