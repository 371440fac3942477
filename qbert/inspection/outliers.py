"""Activation outliers of a fine-tuned BERT, as Bondarenko et al. (2021) draw them.

On a few evaluation sequences, for every encoder layer: the per-dimension minimum and maximum of the FFN
input, the FFN output and their residual sum (Figure 2b, Appendix D), the range over dimensions of every
token of one sequence (Figure 2a), the dimensions with values beyond six standard deviations of the
tensor's values and how many of those values sit on [SEP] and [CLS], and how much attention each head
sends to [SEP], to [CLS] and to the other tokens (Figure 5, Appendix A). Padding is never counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

FFN_SITES = ("ffn.input", "ffn.output", "ffn.residual_sum")
"""The tensors of Figure 2: the FFN's input, its output, and their sum (the input of its LayerNorm)."""

OUTLIER_STD = 6.0
"""A value is an outlier when it lies more than this many standard deviations from the tensor's mean."""


@dataclass
class SiteOutliers:
    """One tensor of one layer over the inspected tokens."""

    layer: int
    site: str
    minimum: np.ndarray
    """Per hidden dimension."""
    maximum: np.ndarray
    mean: float
    std: float
    """Of all values of the tensor (every valid token, every dimension)."""
    counts: np.ndarray
    """Per dimension: values beyond :data:`OUTLIER_STD` standard deviations."""
    at_sep: np.ndarray
    """Per dimension: how many of those values are at a [SEP] token."""
    at_cls: np.ndarray

    def outlier_dimensions(self) -> list[dict[str, Any]]:
        """Dimensions with outliers, the farthest first: dim, count, share at [SEP]/[CLS], min, max, in stds."""
        found = []
        for dim in np.flatnonzero(self.counts):
            far = max(abs(self.maximum[dim] - self.mean), abs(self.minimum[dim] - self.mean)) / self.std
            found.append({
                "dim": int(dim), "values": int(self.counts[dim]),
                "at_sep": round(float(self.at_sep[dim] / self.counts[dim]), 4),
                "at_cls": round(float(self.at_cls[dim] / self.counts[dim]), 4),
                "min": round(float(self.minimum[dim]), 4), "max": round(float(self.maximum[dim]), 4),
                "stds": round(float(far), 2),
            })
        return sorted(found, key=lambda d: -d["stds"])


@dataclass
class OutlierReport:
    """What :func:`inspect_outliers` found."""

    sites: list[SiteOutliers]
    token_ranges: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    """Sequence 0: per (layer, site), the minimum and maximum over dimensions of each of its tokens."""
    tokens: list[str]
    """Sequence 0's tokens."""
    attention: np.ndarray
    """``[layers, heads, 3]``: the mean attention probability a query token sends to [SEP], [CLS], the rest."""
    sequences: int
    token_count: int
    sep_share: float
    """Of the inspected tokens, the share that are [SEP] (what the outliers' [SEP] share compares with)."""
    cls_share: float
    extra: dict[str, Any] = field(default_factory=dict)

    def site(self, layer: int, name: str) -> SiteOutliers:
        """The statistics of ``name`` (one of :data:`FFN_SITES`) in ``layer``."""
        return next(s for s in self.sites if s.layer == layer and s.site == name)


def _capture(model: torch.nn.Module) -> tuple[dict[tuple[int, str], torch.Tensor], list[Any]]:
    """Hooks that keep the last forward's FFN input, output and residual sum of every layer."""
    from qbert.architectures import bind

    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    bound = bind(model)
    for i, _ in enumerate(bound.layers):
        for name in FFN_SITES:
            module, at = bound.tap(i, name)
            if at == "output":
                handles.append(module.register_forward_hook(
                    lambda _m, _args, out, key=(i, name): seen.__setitem__(key, out.detach())))
            else:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, key=(i, name): seen.__setitem__(key, args[0].detach())))
    return seen, handles


def attention_to_special(probs: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, sep: int,
                         cls: int) -> torch.Tensor:
    """``[heads, 3]`` sums over the valid query tokens of a batch: the probability mass each sends to [SEP]
    keys, to [CLS] keys and to the rest (``probs``: ``[batch, heads, query, key]``)."""
    keys = mask[:, None, None, :].to(probs.dtype)
    to_sep = (probs * (ids == sep)[:, None, None, :] * keys).sum(-1)
    to_cls = (probs * (ids == cls)[:, None, None, :] * keys).sum(-1)
    rest = (probs * keys).sum(-1) - to_sep - to_cls
    queries = mask[:, None, :].to(probs.dtype)
    return torch.stack([(part * queries).sum((0, 2)) for part in (to_sep, to_cls, rest)], dim=-1)


def inspect_outliers(model: torch.nn.Module, tokenizer: Any, features: list[dict[str, Any]], *,
                     batch_size: int = 16, device: str | torch.device = "cpu") -> OutlierReport:
    """Run ``features`` (tokenized evaluation examples) through ``model`` in fp32 and gather the statistics."""
    from qbert.pipeline.batching import model_inputs, pad_batch
    from qbert.quant.sites import _set_attention_implementation

    if not features:
        raise ValueError("no sequences to inspect")
    model = model.to(device).eval()
    previous = model.config._attn_implementation
    _set_attention_implementation(model, "eager")  # probabilities come back only from the eager attention
    seen, handles = _capture(model)
    values: dict[tuple[int, str], list[torch.Tensor]] = {}
    special: list[torch.Tensor] = []
    attention = None
    token_ranges: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    sep, cls = tokenizer.sep_token_id, tokenizer.cls_token_id
    try:
        with torch.inference_mode():
            for start in range(0, len(features), batch_size):
                batch = pad_batch(features[start:start + batch_size], tokenizer.pad_token_id)
                inputs = model_inputs(batch, torch.device(device), with_targets=False)
                out = model(**inputs, output_attentions=True)
                mask = inputs["attention_mask"].bool()
                ids = inputs["input_ids"]
                special.append(torch.stack([ids[mask] == sep, ids[mask] == cls], dim=-1))
                for key, tensor in seen.items():
                    values.setdefault(key, []).append(tensor[mask].float())
                    if start == 0:
                        first = tensor[0, : int(mask[0].sum())].float()
                        token_ranges[key] = (first.min(-1).values.numpy(), first.max(-1).values.numpy())
                sums = torch.stack([attention_to_special(p.float(), ids, mask, sep, cls) for p in out.attentions])
                attention = sums if attention is None else attention + sums
    finally:
        for handle in handles:
            handle.remove()
        _set_attention_implementation(model, previous)
    at = torch.cat(special)
    total = len(at)
    sites = []
    for (layer, name), chunks in sorted(values.items(), key=lambda item: (item[0][0], FFN_SITES.index(item[0][1]))):
        x = torch.cat(chunks)  # [tokens, hidden]
        mean, std = float(x.mean()), float(x.std())
        beyond = (x - mean).abs() > OUTLIER_STD * std
        sites.append(SiteOutliers(
            layer, name, x.min(0).values.numpy(), x.max(0).values.numpy(), mean, std,
            beyond.sum(0).numpy(), (beyond & at[:, :1]).sum(0).numpy(), (beyond & at[:, 1:]).sum(0).numpy(),
        ))
    tokens = tokenizer.convert_ids_to_tokens(list(features[0]["input_ids"]))
    return OutlierReport(
        sites, token_ranges, tokens, (attention / total).numpy(), len(features), total,
        float(at[:, 0].float().mean()), float(at[:, 1].float().mean()),
    )


def summary(report: OutlierReport) -> dict[str, Any]:
    """The report as JSON-ready data: per layer and site every outlier dimension, and attention to [SEP]/[CLS]."""
    layers: dict[str, Any] = {}
    for s in report.sites:
        layers.setdefault(str(s.layer), {})[s.site] = {
            "mean": round(s.mean, 5), "std": round(s.std, 5),
            "range": [round(float(s.minimum.min()), 4), round(float(s.maximum.max()), 4)],
            "outlier_values": int(s.counts.sum()), "outlier_dimensions": s.outlier_dimensions(),
        }
    sep = report.attention[..., 0]
    return {
        "sequences": report.sequences, "tokens": report.token_count, "outlier_std": OUTLIER_STD,
        "sep_share": round(report.sep_share, 4), "cls_share": round(report.cls_share, 4),
        "layers": layers,
        "attention": {
            "to_sep_per_layer": [round(float(v), 4) for v in sep.mean(-1)],
            "to_cls_per_layer": [round(float(v), 4) for v in report.attention[..., 1].mean(-1)],
            "heads_mostly_on_sep": int((sep > 0.5).sum()), "heads": int(sep.size),
        },
    }


def widest_layer(report: OutlierReport) -> int:
    """The layer whose residual sum reaches the largest magnitude (the one Figure 2a draws)."""
    sums = [s for s in report.sites if s.site == "ffn.residual_sum"]
    return max(sums, key=lambda s: max(abs(s.minimum.min()), abs(s.maximum.max()))).layer


def save(report: OutlierReport, folder: Path, title: str, figures: bool = True) -> dict[str, Path]:
    """Write ``outliers.json``, ``dimension_ranges.csv``, ``token_ranges.csv``, ``attention.csv`` and (unless
    ``figures`` is false) the three figures into ``folder``; returns the files by name."""
    from qbert.inspection import csv_text
    from qbert.runs import atomic_write_json, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    atomic_write_json(folder / "outliers.json", summary(report))
    files["outliers.json"] = folder / "outliers.json"
    rows = [[s.layer, s.site, d, float(s.minimum[d]), float(s.maximum[d]), int(s.counts[d]), int(s.at_sep[d]),
             int(s.at_cls[d])] for s in report.sites for d in range(len(s.minimum))]
    atomic_write_text(folder / "dimension_ranges.csv", csv_text(
        ["layer", "site", "dim", "min", "max", f"values_beyond_{OUTLIER_STD:g}_std", "at_sep", "at_cls"], rows))
    rows = [[layer, site, i, token, float(low[i]), float(high[i])]
            for (layer, site), (low, high) in sorted(report.token_ranges.items())
            for i, token in enumerate(report.tokens)]
    atomic_write_text(folder / "token_ranges.csv", csv_text(["layer", "site", "position", "token", "min", "max"],
                                                            rows))
    rows = [[layer, head, *(round(float(v), 6) for v in report.attention[layer, head])]
            for layer in range(report.attention.shape[0]) for head in range(report.attention.shape[1])]
    atomic_write_text(folder / "attention.csv", csv_text(["layer", "head", "to_sep", "to_cls", "to_rest"], rows))
    files.update({name: folder / name for name in ("dimension_ranges.csv", "token_ranges.csv", "attention.csv")})
    if figures:
        from qbert.inspection import plots

        layer = widest_layer(report)
        files["dimension_ranges.png"] = plots.dimension_ranges(
            report, folder / "dimension_ranges.png", f"{title}: FFN activations per dimension (Bondarenko Fig. 2b)")
        files["token_ranges.png"] = plots.token_ranges(
            report, layer, folder / "token_ranges.png",
            f"{title}: layer {layer}, range of each token (Bondarenko Fig. 2a)")
        files["attention.png"] = plots.attention_heads(
            report.attention, folder / "attention.png", f"{title}: attention per head (Bondarenko Fig. 5)")
    return files
