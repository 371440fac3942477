"""Finished runs as plot points: every config of a task and model with its metric over seeds and its model size,
and the leave-one-out runs of Bondarenko et al. Table 2 as a site-family x layer grid."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from qbert.config import hashed_data, stable_hash
from qbert.records import SeedRecord, read_record
from qbert.runs import finished_seeds, list_runs
from qbert.tables import lookup_metric

MB = 1e6


def fp32_megabytes(model: str, task: Any) -> float:
    """The FP32 size of ``model`` with ``task``'s head: 4 bytes per parameter (read from its config only)."""
    from qbert.models import model_skeleton

    skeleton, _ = model_skeleton(model, task.head, task.num_labels)
    return 4 * sum(p.numel() for p in skeleton.parameters()) / MB


def model_megabytes(record: SeedRecord, fp32_mb: float) -> tuple[float | None, str]:
    """A run's model size in MB and where it comes from: the uniform recipes' size report (integer weights
    plus FP32 rest), GOBO's ledger (coded matrices in place of their FP32 bytes), dynamic int8's saved state
    dict, or the FP32 size for fp32; None when the run reports none."""
    report = record.recipe_report
    if isinstance(report.get("size"), dict) and "mb" in report["size"]:
        return float(report["size"]["mb"]), "size report"
    if "coded_bytes" in report and "fp32_bytes" in report:
        return fp32_mb - (report["fp32_bytes"] - report["coded_bytes"]) / MB, "gobo ledger"
    if isinstance(report.get("size_mb"), dict) and "int8" in report["size_mb"]:
        return float(report["size_mb"]["int8"]), "int8 state dict"
    if record.recipe == "fp32":
        return fp32_mb, "fp32 parameters"
    return None, "no size reported"


def _per_seed(records: list[SeedRecord], metric: list[str] | None) -> list[float]:
    values = []
    for record in records:
        names = metric or [record.headline]
        found = [lookup_metric(record, m) for m in names]
        if all(v is not None for v in found):
            values.append(sum(found) / len(found))
    return values


def finished_configs(root: Path, task: str, model: str) -> Configs:
    """(name, hash, resolved config, finished seed records) of every config of ``task`` and ``model``, one
    per config hash (a hash finished under several run names is listed once, under its newest name)."""
    found, seen = [], set()
    for row in list_runs(root):
        config = row["config"]
        config_hash = row["path"].name
        if config.get("task") != task or config.get("model") != model or config_hash in seen:
            continue
        seen.add(config_hash)
        records = [r for r in (read_record(f) for f in finished_seeds(root, config_hash).values()) if r is not None]
        if records:
            found.append((config.get("name", row["path"].parent.name), config_hash, config, records))
    return found


Configs = list[tuple[str, str, dict[str, Any], list[SeedRecord]]]


def collect_points(root: Path, task: Any, model: str, metric: list[str] | None = None,
                   configs: Configs | None = None) -> list[dict[str, Any]]:
    """One point per finished config of ``task`` on ``model``: label, recipe, hash, size (MB and its source),
    median / min / max / n of the metric (per-seed mean of ``metric``; None: the headline) over seeds.
    ``configs``: the runs already read (``finished_configs``)."""
    fp32_mb = fp32_megabytes(model, task)
    if configs is None:
        configs = finished_configs(root, task.name, model)
    points = []
    for name, config_hash, config, records in configs:
        values = _per_seed(records, metric)
        mb, source = model_megabytes(records[0], fp32_mb)
        if not values or mb is None:
            continue
        points.append({
            "label": name, "recipe": records[0].recipe, "hash": config_hash, "mb": round(mb, 3),
            "size_source": source, "median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values), "simulated": any(r.simulated for r in records),
            "recipe_params": config.get("recipe", {}),
        })
    for group in {p["label"] for p in points}:  # one run name with other settings: name the recipe keys that differ
        same = [p for p in points if p["label"] == group]
        if len(same) < 2:
            continue
        keys = sorted({k for p in same for k in p["recipe_params"]})
        differ = [k for k in keys if len({repr(p["recipe_params"].get(k)) for p in same}) > 1]
        for p in same:
            shown = " ".join(f"{k}={p['recipe_params'].get(k)}" for k in differ) or p["hash"][:6]
            p["label"] = f"{p['label']} ({shown})"
    for p in points:
        del p["recipe_params"]
    return sorted(points, key=lambda p: p["mb"])


def leave_out_grid(root: Path, task: Any, model: str, metric: list[str] | None = None,
                   configs: Configs | None = None) -> tuple[np.ndarray, list[str], list[str]] | None:
    """Table 2's leave-one-out as a grid: rows = site families, columns = layers (``all``: every layer), cells =
    median over seeds of the metric with that family kept in floating point minus the same config with nothing
    left out. Built from every finished config with ``recipe.leave_out`` naming one family (``ffn.residual_sum``)
    or one site of one layer (``layer.3.ffn.residual_sum``) whose all-quantized twin (``leave_out: []``) exists;
    None when there is none."""
    if configs is None:
        configs = finished_configs(root, task.name, model)

    def twin_key(config: dict[str, Any]) -> str:
        recipe = {k: v for k, v in config.get("recipe", {}).items() if k != "leave_out"}
        return stable_hash(hashed_data({**config, "recipe": recipe}))

    baselines = {}
    for _, _, config, records in configs:
        if config.get("recipe", {}).get("leave_out") == []:
            values = _per_seed(records, metric)
            if values:
                baselines[twin_key(config)] = statistics.median(values)
    cells: dict[tuple[str, str], float] = {}
    for _, _, config, records in configs:
        leave_out = config.get("recipe", {}).get("leave_out")
        base = baselines.get(twin_key(config))
        if base is None or not isinstance(leave_out, list) or len(leave_out) != 1:
            continue
        parts = leave_out[0].split(".")
        if parts[0] == "layer" and len(parts) > 2 and parts[1].isdigit():
            family, layer = ".".join(parts[2:]), parts[1]
        else:
            family, layer = leave_out[0], "all"
        values = _per_seed(records, metric)
        if values:
            cells[(family, layer)] = statistics.median(values) - base
    if not cells:
        return None
    from qbert.quant.sites import LAYER_FAMILIES

    families = sorted({f for f, _ in cells}, key=lambda f: (LAYER_FAMILIES.index(f) if f in LAYER_FAMILIES else -1, f))
    layers = sorted({lay for _, lay in cells if lay != "all"}, key=int) + (
        ["all"] if any(lay == "all" for _, lay in cells) else [])
    grid = np.full((len(families), len(layers)), np.nan)
    for (family, layer), value in cells.items():
        grid[families.index(family), layers.index(layer)] = value
    return grid, families, layers


def save_plots(root: Path, task: Any, model: str, metric: list[str] | None, folder: Path) -> dict[str, Any]:
    """``qbert plot``: ``points.csv`` and ``accuracy_size.png`` (and, with leave-one-out runs, ``sensitivity.csv``
    and ``.png``) in ``folder``. Returns the points, the Pareto front, the metric's name and the files written;
    no points (nothing finished with a size) writes nothing."""
    from qbert.inspection import csv_text, plots
    from qbert.runs import atomic_write_text

    configs = finished_configs(root, task.name, model)
    points = collect_points(root, task, model, metric, configs)
    name = " and ".join(metric) if metric else task.headline
    done: dict[str, Any] = {"points": points, "front": plots.pareto_front(points), "metric": name, "files": []}
    if not points:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    label = f"{name} (x100)" if not metric or len(metric) == 1 else f"mean of {name} (x100)"
    keys = ["label", "recipe", "hash", "mb", "size_source", "median", "min", "max", "n", "simulated"]
    atomic_write_text(folder / "points.csv", csv_text(keys + ["pareto"], [
        [p[k] for k in keys] + [p in done["front"]] for p in points]))
    plots.accuracy_size(points, folder / "accuracy_size.png", f"{task.name} on {model}: {label} against size", label)
    done["files"] = ["accuracy_size.png", "points.csv"]
    grid = leave_out_grid(root, task, model, metric, configs)
    if grid is not None:
        values, families, layers = grid
        plots.sensitivity(values, families, layers, folder / "sensitivity.png",
                          f"{task.name} on {model}: {name} gain when a site family stays FP32 (Bondarenko Table 2)")
        atomic_write_text(folder / "sensitivity.csv", csv_text(["family", *layers], [
            [f, *("" if np.isnan(v) else round(float(v), 4) for v in row)]
            for f, row in zip(families, values, strict=True)]))
        done["files"] += ["sensitivity.png", "sensitivity.csv"]
    return done
