"""Fine-tune and evaluation throughput of MiniLM-L6 on MRPC, measured side by side in one run.

Ratios printed as JSON: bf16 autocast against fp32 (training and evaluation), and dynamic padding
with length-grouped batches against padding every batch to max_seq_len. Needs the MRPC files
($QBERT_DATA_DIR or ../shared/data). Usage: python bench/finetune_throughput.py [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from qbert.config import DataConfig, FinetuneConfig
from qbert.models import load_model, load_tokenizer, resolve_model
from qbert.pipeline.batching import length_grouped_batches, model_inputs, pad_batch
from qbert.pipeline.evaluate import predict
from qbert.pipeline.finetune import autocast, finetune, seed_everything
from qbert.tasks import get_task

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def train_seconds(features, precision: str, steps: int, batch_size: int) -> float:
    seed_everything(0)
    model = load_model(resolve_model("minilm-l6"), "classification", 2)
    cfg = FinetuneConfig(epochs=steps * batch_size / len(features), batch_size=batch_size, precision=precision)
    return finetune(model, features, cfg, seed=0, pad_token_id=0, device=torch.device("cpu"))["seconds"]


def eval_seconds(model, features, precision: str) -> float:
    start = time.perf_counter()
    predict(model, features, question_answering=False, batch_size=64, pad_token_id=0,
            device=torch.device("cpu"), precision=precision)
    return time.perf_counter() - start


def padded_tokens(features, batch_size: int, group: bool, max_len: int | None) -> int:
    lengths = [len(f["input_ids"]) for f in features]
    batches = length_grouped_batches(lengths, batch_size, torch.Generator().manual_seed(0), group)
    return sum(len(b) * (max_len or max(lengths[i] for i in b)) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per precision")
    args = parser.parse_args()
    data = DataConfig(dir=os.environ.get("QBERT_DATA_DIR") or str(DEFAULT_DATA))
    task = get_task("mrpc")
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    train = task.encode_train(tokenizer, task.load("train", data), 128)
    dev = task.encode_eval(tokenizer, task.load("dev", data), 128)
    torch.set_num_threads(os.cpu_count() or 1)

    fp32_train = train_seconds(train, "fp32", args.steps, 32)
    bf16_train = train_seconds(train, "bf16", args.steps, 32)
    model = load_model(resolve_model("minilm-l6"), "classification", 2).eval()
    eval_seconds(model, dev[:64], "fp32")  # warm-up
    fp32_eval = eval_seconds(model, dev, "fp32")
    bf16_eval = eval_seconds(model, dev, "bf16")

    dynamic = padded_tokens(train, 32, True, None)
    fixed = padded_tokens(train, 32, False, 128)
    real = sum(len(f["input_ids"]) for f in train)
    # one step on a padded-to-128 batch against a length-grouped batch, same examples
    lengths = [len(f["input_ids"]) for f in train]
    batch = length_grouped_batches(lengths, 32, torch.Generator().manual_seed(1))[0]
    with torch.inference_mode(), autocast(torch.device("cpu"), "bf16"):
        tight = pad_batch([train[i] for i in batch], 0)
        wide = {k: torch.nn.functional.pad(v, (0, 128 - v.shape[1])) if v.ndim == 2 else v for k, v in tight.items()}
        times = {}
        for name, b in (("dynamic", tight), ("max_len", wide)):
            model(**model_inputs(b, torch.device("cpu"), False))
            start = time.perf_counter()
            for _ in range(3):
                model(**model_inputs(b, torch.device("cpu"), False))
            times[name] = (time.perf_counter() - start) / 3

    print(json.dumps({
        "model": "minilm-l6", "task": "mrpc", "threads": torch.get_num_threads(),
        "train_steps": args.steps, "train_batch_size": 32,
        "train_seconds": {"fp32": round(fp32_train, 2), "bf16": round(bf16_train, 2)},
        "train_speedup_bf16_vs_fp32": round(fp32_train / bf16_train, 2),
        "eval_seconds_408": {"fp32": round(fp32_eval, 2), "bf16": round(bf16_eval, 2)},
        "eval_speedup_bf16_vs_fp32": round(fp32_eval / bf16_eval, 2),
        "tokens_per_epoch": {"real": real, "dynamic_grouped": dynamic, "padded_to_128": fixed},
        "padding_overhead": {"dynamic_grouped": round(dynamic / real - 1, 3),
                             "padded_to_128": round(fixed / real - 1, 3)},
        "forward_speedup_dynamic_vs_padded_to_128": round(times["max_len"] / times["dynamic"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
