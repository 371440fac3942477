"""Fine-tuning wall time at equal dev metric: qbert's defaults (bf16 autocast, length-grouped batches padded to
their longest sequence) against HuggingFace run_glue's defaults where they decide the speed (fp32, every batch
padded to max_seq_len 128, shuffled batches), on MiniLM-L6, same batch size, steps, learning-rate schedule,
optimizer and seed; one run per side, side by side. Prints JSON with both times, both dev metrics, the ratio.

The baseline is qbert's own training loop with run_glue's precision and padding, not the HF Trainer (which
needs accelerate): the optimizer, schedule and clipping are the same for both sides, so the time difference is
the precision and the padding. About 30 min on 2 cores.
Usage: python bench/finetune_vs_run_glue.py [--tasks mrpc,sst2] [--epochs 3,0.1]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from qbert.config import DataConfig, FinetuneConfig
from qbert.models import load_model, load_tokenizer, resolve_model
from qbert.pipeline.evaluate import predict
from qbert.pipeline.finetune import finetune, seed_everything
from qbert.tasks import get_task

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAX_LEN = 128


def padded_to(features: list[dict], length: int, pad_token_id: int) -> list[dict]:
    """Every feature padded to ``length`` (run_glue's pad_to_max_length): batches are then all ``length`` wide."""
    out = []
    for f in features:
        extra = length - len(f["input_ids"])
        out.append({**f, "input_ids": f["input_ids"] + [pad_token_id] * extra,
                    "token_type_ids": f["token_type_ids"] + [0] * extra,
                    "attention_mask": f["attention_mask"] + [0] * extra})
    return out


def train_and_score(task, tokenizer, train, dev, dev_examples, cfg: FinetuneConfig, seed: int) -> dict:
    seed_everything(seed)
    model = load_model(resolve_model("minilm-l6"), task.head, task.num_labels)
    info = finetune(model, train, cfg, seed=seed, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    outputs = predict(model, dev, question_answering=False, batch_size=64, pad_token_id=tokenizer.pad_token_id,
                      device=torch.device("cpu"))
    metrics = task.score(dev_examples, dev, outputs).metrics
    return {"seconds": info["seconds"], "steps": info["steps"], "final_loss": round(info["final_loss"], 4),
            "dev": {k: round(v, 2) for k, v in metrics.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="mrpc,sst2")
    parser.add_argument("--epochs", default="3,0.1", help="epochs per task (SST-2: a tenth of an epoch, CPU time)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    data = DataConfig(dir=os.environ.get("QBERT_DATA_DIR") or str(DEFAULT_DATA))
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    results = {"model": "minilm-l6", "threads": torch.get_num_threads(), "seed": args.seed, "tasks": {}}
    for name, epochs in zip(args.tasks.split(","), [float(e) for e in args.epochs.split(",")], strict=True):
        task = get_task(name)
        train = task.encode_train(tokenizer, task.load("train", data), MAX_LEN)
        dev_examples = task.load("dev", data)
        dev = task.encode_eval(tokenizer, dev_examples, MAX_LEN)
        common = {"epochs": epochs, "lr": 5e-5, "batch_size": 32, "max_seq_len": MAX_LEN}
        run_glue = train_and_score(task, tokenizer, padded_to(train, MAX_LEN, tokenizer.pad_token_id), dev,
                                   dev_examples, FinetuneConfig(**common, precision="fp32", group_by_length=False),
                                   args.seed)
        qbert = train_and_score(task, tokenizer, train, dev, dev_examples,
                                FinetuneConfig(**common, precision="bf16", group_by_length=True), args.seed)
        results["tasks"][name] = {"epochs": epochs, "examples": len(train), "run_glue_defaults": run_glue,
                                  "qbert": qbert, "speedup": round(run_glue["seconds"] / qbert["seconds"], 2)}
        print(json.dumps({name: results["tasks"][name]}), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
