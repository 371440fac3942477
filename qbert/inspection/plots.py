"""Figures of the inspections, drawn with matplotlib's Agg backend (no display needed; the ``viz`` extra).

Every function takes the numbers an inspection computed and writes one PNG; none computes anything the
CSV/JSON files next to it do not hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qbert.errors import QbertError

DPI = 110


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise QbertError("figures need matplotlib: pip install 'qbert[viz]' (make setup installs it)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    import io

    from qbert.runs import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def dimension_ranges(report: Any, path: Path, title: str) -> Path:
    """Bondarenko Figure 2b / Appendix D: per layer (rows) and hidden dimension (columns), the largest
    magnitude of each FFN tensor, one panel per tensor, on a log colour scale."""
    from matplotlib.colors import LogNorm

    plt = pyplot()
    layers = sorted({s.layer for s in report.sites})
    FFN_SITES = list(dict.fromkeys(s.site for s in report.sites))  # the report's order: FFN input, output, sum
    fig, axes = plt.subplots(len(FFN_SITES), 1, figsize=(10, 1.2 + 0.45 * len(layers) * len(FFN_SITES)),
                             squeeze=False, layout="constrained")
    for ax, name in zip(axes[:, 0], FFN_SITES, strict=True):
        grid = np.stack([np.maximum(np.abs(report.site(i, name).minimum), np.abs(report.site(i, name).maximum))
                         for i in layers])
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma",
                          norm=LogNorm(vmin=max(grid.min(), 1e-3), vmax=grid.max()))
        ax.set_yticks(range(len(layers)), [str(i) for i in layers])
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: largest |value| per dimension", fontsize=9, loc="left")
        for i in layers:  # name the widest dimension of each layer
            row = grid[layers.index(i)]
            ax.annotate(str(int(row.argmax())), (row.argmax(), layers.index(i)), color="cyan", fontsize=7,
                        ha="center", va="center")
        fig.colorbar(image, ax=ax, pad=0.01)
    axes[-1, 0].set_xlabel("hidden dimension")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def token_ranges(report: Any, layer: int, path: Path, title: str) -> Path:
    """Bondarenko Figure 2a: for each token of one sequence, the range (min to max over dimensions) of the
    FFN output and of the residual sum in ``layer``; special tokens in red."""
    plt = pyplot()
    tokens = report.tokens
    x = np.arange(len(tokens))
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(tokens)), 3.2))
    for offset, name, color in ((-0.15, "ffn.output", "tab:blue"), (0.15, "ffn.residual_sum", "tab:orange")):
        low, high = report.token_ranges[(layer, name)]
        ax.vlines(x + offset, low, high, color=color, lw=3, label=name)
    ax.set_xticks(x, tokens, rotation=90, fontsize=7)
    for label, token in zip(ax.get_xticklabels(), tokens, strict=True):
        if token in ("[SEP]", "[CLS]"):
            label.set_color("red")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel("min .. max over dimensions")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def attention_heads(attention: np.ndarray, path: Path, title: str) -> Path:
    """Bondarenko Figure 5 / Appendix A: layer x head, the mean attention a token sends to [SEP] (left) and to
    [CLS] (right), each cell annotated."""
    plt = pyplot()
    layers, heads = attention.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.9 * heads, 0.9 + 0.45 * layers), squeeze=False)
    for ax, index, name in ((axes[0, 0], 0, "[SEP]"), (axes[0, 1], 1, "[CLS]")):
        grid = attention[..., index]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(layers):
            for h in range(heads):
                ax.text(h, i, f"{grid[i, h]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if grid[i, h] < 0.6 else "black")
        ax.set_xticks(range(heads), [str(h) for h in range(heads)], fontsize=7)
        ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"attention to {name}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def weight_histogram(values: np.ndarray, mean: float, std: float, outliers: np.ndarray, path: Path,
                     title: str) -> Path:
    """GOBO Figure 1b/1c: the histogram of one weight matrix, the fitted Gaussian, the outliers marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    counts, edges, _ = ax.hist(values, bins=200, color="tab:blue", alpha=0.8, label="weights")
    width = edges[1] - edges[0]
    grid = np.linspace(edges[0], edges[-1], 400)
    density = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
    ax.plot(grid, density * len(values) * width, color="black", lw=1, label="Gaussian fit")
    if len(outliers):
        ax.plot(outliers, np.full(len(outliers), max(counts.max() * 0.01, 1.0)), "|", color="red", ms=8,
                label=f"outliers ({len(outliers)}, {100 * len(outliers) / len(values):.3f}%)")
    ax.set_yscale("log")
    ax.set_ylim(0.5, counts.max() * 2)
    ax.set_xlabel("weight")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def outlier_shares(names: Sequence[str], shares: Sequence[float], path: Path, title: str) -> Path:
    """GOBO Figure 3: the outlier percentage of every FC layer, in forward order."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * len(names)), 3.2))
    ax.bar(range(len(names)), [100 * s for s in shares], color="tab:red")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("outliers (%)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def error_per_iteration(histories: dict[str, dict[str, list[float]]], path: Path, title: str) -> Path:
    """GOBO Figure 2: L1 and L2 error of the clustering per iteration: K-means until its assignment settles,
    GOBO's rule (the same rounds, stopped where L1 stops falling) drawn over it with its stop marked."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), squeeze=False, layout="constrained")
    styles = {"kmeans": {"color": "tab:blue", "lw": 1, "marker": "."},
              "gobo": {"color": "tab:red", "lw": 2.5, "marker": "o", "ms": 4}}
    for ax, norm in zip(axes[0], ("l1", "l2"), strict=True):
        for method in sorted(histories, key=lambda m: m == "gobo"):  # gobo on top
            history = histories[method][norm]
            ax.plot(range(len(history)), history, label=f"{method} ({len(history) - 1} rounds)",
                    **styles.get(method, {}))
        if "gobo" in histories:
            ax.axvline(len(histories["gobo"][norm]) - 1, color="tab:red", ls=":", lw=1)
        ax.set_xlabel("iteration (0: equal-population start)")
        ax.set_ylabel("L1 error (mean |w - c|)" if norm == "l1" else "L2 error (mean (w - c)^2)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def accuracy_size(points: list[dict[str, Any]], path: Path, title: str, metric: str) -> Path:
    """Accuracy against model size: one marker per run (median over seeds, error bars min..max) named in the
    legend with its median and n, the Pareto front (no other point smaller and at least as good) joined."""
    from matplotlib.ticker import NullFormatter

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2), layout="constrained")
    front = pareto_front(points)
    colors = plt.get_cmap("tab10")
    markers = "osD^vP*Xh<>"
    for i, p in enumerate(points):
        on = p in front
        ax.errorbar(p["mb"], p["median"], yerr=[[p["median"] - p["min"]], [p["max"] - p["median"]]],
                    fmt=markers[i % len(markers)], color=colors(i % 10), capsize=3, ms=7,
                    mec="black" if on else colors(i % 10),
                    label=f"{p['label']}: {p['median']:.2f}, {p['mb']:.1f} MB (n={p['n']})" + (" *" if on else ""))
    ordered = sorted(front, key=lambda p: p["mb"])
    ax.plot([p["mb"] for p in ordered], [p["median"] for p in ordered], color="black", lw=1, ls="--",
            label="Pareto front (*)")
    ax.set_xscale("log")
    low, high = min(p["mb"] for p in points) / 1.3, max(p["mb"] for p in points) * 1.3
    ax.set_xlim(low, high)
    ticks = [m * 10**e for e in range(-2, 6) for m in (1, 2, 5) if low <= m * 10**e <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("model size (MB, log scale)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats: none is at most as large and at least as good, and better in one."""
    return [p for p in points
            if not any(q["mb"] <= p["mb"] and q["median"] >= p["median"] and (q["mb"] < p["mb"] or q["median"] >
                                                                              p["median"]) for q in points)]


def sensitivity(grid: np.ndarray, rows: Sequence[str], columns: Sequence[str], path: Path, title: str) -> Path:
    """Bondarenko Table 2 as a heat map: the metric change when one site family of one layer is left in
    floating point (rows: site families, columns: layers); NaN cells were not run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(columns), 0.8 + 0.4 * len(rows)))
    bound = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:+.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(columns)), columns, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
