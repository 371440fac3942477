"""GOBO speed and compression: qbert's implementation against a literal implementation of the paper's
procedure (scikit-learn GaussianMixture fit + score_samples, argmin reassignment per round), side by
side in one run, on every linear layer and the three embedding tables of

  (a) a BERT-base-shaped model (BertForSequenceClassification, 3 labels) whose weights are normal with
      std 0.04 and a heavy tail (a random 0.1% of them scaled by 8), built from a config, and
  (b) MiniLM-L6's real pre-trained weights (plus a fresh 2-label head).

Also the compression of the packed file for the BERT-base shape at 3 and 4 bits, with every matrix at
that width and in the paper's Table III setting (embeddings at 4 bits), against the paper's 9.83x
and 7.92x. Prints JSON; progress goes to stderr.
Usage: python bench/gobo.py [--bits 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from qbert.recipes.gobo import GoboSpec

from qbert.models import BERT_BASE_CONFIG, load_model, resolve_model
from qbert.quant.gobo import quantize_model
from qbert.quant.gobo_literal import literal_gobo
from qbert.quant.packing import write_packed
from qbert.quant.sites import weight_modules

PAPER = {"compression": {"3": 9.83, "4": 7.92}, "quantize_minutes_one_core_bert_base": 10}
TARGETS = {"speedup_at_least": 20.0, "bert_base_seconds_under": 10.0}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def bert_base_shape(seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, num_labels=3, **BERT_BASE_CONFIG)
    model = BertForSequenceClassification(config).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in weight_modules(model).values():
            w = rng.standard_normal(module.weight.shape, dtype=np.float32) * np.float32(0.04)
            flat = w.reshape(-1)
            flat[rng.choice(flat.size, max(1, flat.size // 1000), replace=False)] *= np.float32(8)
            module.weight.copy_(torch.from_numpy(w))
    return model


def minilm() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(resolve_model("minilm-l6"), "classification", 2).eval()


def specs(model: torch.nn.Module, bits: int, embedding_bits: int | None = None) -> dict[str, GoboSpec]:
    return {
        site: GoboSpec(bits=embedding_bits if embedding_bits and site.startswith("embeddings.") else bits)
        for site in weight_modules(model)
    }


def snapshot(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {site: m.weight.detach().numpy().copy() for site, m in weight_modules(model).items()}


def restore(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        for site, m in weight_modules(model).items():
            m.weight.copy_(torch.from_numpy(weights[site]))


def compare(name: str, model: torch.nn.Module, bits: int, threads: int) -> dict[str, object]:
    original = snapshot(model)
    plan = specs(model, bits)
    say(f"{name}: literal implementation on {len(plan)} matrices ({sum(w.size for w in original.values()):,} weights)")
    start = time.perf_counter()
    literal = {}
    for site in plan:
        literal[site] = literal_gobo(original[site], bits)
    literal_seconds = time.perf_counter() - start
    say(f"{name}: literal {literal_seconds:.1f} s; qbert")
    ours = quantize_model(model, plan, threads=threads)
    same_outliers = same_iterations = 0
    max_centroid_diff = 0.0
    for site, ref in literal.items():
        code, stats = ours.codes[ours.parameter_names[site]], ours.stats[site]
        same_outliers += int(np.array_equal(np.flatnonzero(ref.outliers), code.outlier_positions))
        same_iterations += int(ref.iterations == stats.iterations)
        max_centroid_diff = max(max_centroid_diff, float(np.abs(ref.centroids - code.codebook).max()))
    numel = sum(s.numel for s in ours.stats.values())
    restore(model, original)
    return {
        "matrices": len(plan),
        "weights": numel,
        "bits": bits,
        "qbert_seconds": round(ours.seconds, 3),
        "literal_seconds": round(literal_seconds, 2),
        "speedup": round(literal_seconds / ours.seconds, 1),
        "outlier_fraction": round(sum(s.outliers for s in ours.stats.values()) / numel, 6),
        "iterations": {"min": min(s.iterations for s in ours.stats.values()),
                       "max": max(s.iterations for s in ours.stats.values())},
        "agreement_with_literal": {
            "matrices_with_identical_outliers": same_outliers,
            "matrices_with_equal_iterations": same_iterations,
            "max_centroid_abs_difference": max_centroid_diff,
        },
    }


def compression(model: torch.nn.Module, threads: int) -> dict[str, object]:
    original = snapshot(model)
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (3, 4):
            row = {}
            for setting, emb_bits in (("all_matrices", None), ("table_iii_embeddings_4bit", 4)):
                result = quantize_model(model, specs(model, bits, emb_bits), threads=threads)
                ledger = write_packed(Path(tmp) / f"{bits}_{setting}.safetensors", model, result.codes)
                restore(model, original)
                row[setting] = {
                    "compression": round(ledger.compression, 3),
                    "coded_compression": round(ledger.coded_compression, 3),
                    "file_mb": round(ledger.file_bytes / 1e6, 2),
                    "fp32_mb": round(ledger.fp32_bytes / 1e6, 2), "ledger_mb": ledger.as_dict()["megabytes"],
                }
            row["paper"] = PAPER["compression"][str(bits)]
            out[str(bits)] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3, help="bits of the timed comparison (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="qbert's threads (default: torch's, all cores)")
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    results: dict[str, object] = {"threads": threads, "paper": PAPER, "targets": TARGETS}
    say("building the BERT-base-shaped model")
    base = bert_base_shape()
    results["bert_base_shape"] = compare("bert-base shape", base, args.bits, threads)
    results["bert_base_shape_compression"] = compression(base, threads)
    del base
    results["minilm_l6"] = compare("minilm-l6", minilm(), args.bits, threads)
    base_row, mini_row = results["bert_base_shape"], results["minilm_l6"]
    results["targets_met"] = {
        "speedup": min(base_row["speedup"], mini_row["speedup"]) >= TARGETS["speedup_at_least"],
        "bert_base_seconds": base_row["qbert_seconds"] < TARGETS["bert_base_seconds_under"],
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
