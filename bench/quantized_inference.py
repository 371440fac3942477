"""Evaluation time of MiniLM-L6 on the MRPC dev set: FP32, PyTorch dynamic int8 (real int8 kernels)
and qbert's fake-quantized W8A8 and PEG K=6+P (simulation cost), measured side by side in one run.

Also the serialised model size of FP32 and dynamic int8. Weights are the pre-trained MiniLM with a
fresh head (speed does not depend on the fine-tuned values). Prints JSON.
--model bert-base-random measures BERT-base's shape (random weights: speed does not depend on them).
Usage: python bench/quantized_inference.py [--repeats 3] [--threads N] [--model minilm-l6|bert-base-random]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch

import qbert
from qbert.config import parse_config
from qbert.models import load_model, load_tokenizer, resolve_model
from qbert.pipeline.evaluate import predict
from qbert.quant.size import state_dict_megabytes
from qbert.tasks import get_task

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def seconds(model, features, repeats: int) -> float:
    """Median wall time of ``repeats`` full passes, after one warm-up pass."""
    def once() -> float:
        start = time.perf_counter()
        predict(model, features, question_answering=False, batch_size=64, pad_token_id=0, device=torch.device("cpu"))
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per model (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--model", default="minilm-l6", help="minilm-l6 or bert-base-random (BERT-base's shape)")
    args = parser.parse_args()
    os.environ.setdefault("QBERT_DATA_DIR", str(DEFAULT_DATA))
    if args.threads:
        torch.set_num_threads(args.threads)
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    results: dict[str, object] = {"model": args.model, "threads": torch.get_num_threads(), "repeats": args.repeats}

    def fresh():
        torch.manual_seed(0)
        return load_model(source, "classification", 2).eval()

    timings: dict[str, float] = {}
    fp32 = fresh()
    cfg = parse_config({"model": args.model, "task": "mrpc", "recipe": {"name": "w8a8_ptq"},
                        "calibrate": {"batches": 4, "batch_size": 4}})
    task = get_task("mrpc", cfg)
    features = task.encode_eval(tokenizer, task.load("dev", cfg.data), 128)
    results["features"] = len(features)
    timings["fp32"] = seconds(fp32, features, args.repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(fresh(), {torch.nn.Linear}, dtype=torch.qint8)
    timings["dynamic_int8"] = seconds(int8, features, args.repeats)
    results["size_mb"] = {
        "fp32": round(state_dict_megabytes(fp32), 2), "dynamic_int8": round(state_dict_megabytes(int8), 2)
    }
    train = task.encode_train(tokenizer, task.load("train", cfg.data)[:256], 128)
    for name, recipe in {"fake_w8a8": {"name": "w8a8_ptq"}, "fake_peg_k6p": {"name": "peg"}}.items():
        model = qbert.quantize(fresh(), recipe, calibration=train, tokenizer=tokenizer,
                               calibrate={"batches": 4, "batch_size": 4}).model
        timings[name] = seconds(model, features, args.repeats)
    results["eval_seconds"] = {k: round(v, 3) for k, v in timings.items()}
    results["ratios"] = {
        "dynamic_int8_speedup_vs_fp32": round(timings["fp32"] / timings["dynamic_int8"], 2),
        "fake_w8a8_slowdown_vs_fp32": round(timings["fake_w8a8"] / timings["fp32"], 2),
        "fake_peg_slowdown_vs_fp32": round(timings["fake_peg_k6p"] / timings["fp32"], 2),
        "dynamic_int8_size_ratio": round(results["size_mb"]["fp32"] / results["size_mb"]["dynamic_int8"], 2),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
