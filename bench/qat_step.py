"""QAT training-step cost: one MiniLM-L6 training step in FP32, with every W8A8 site fake-quantized at fixed ranges,
and with learned ranges; and the fake-quantize kernel alone (the fused kernels of
qbert.quant.fused, the eager hand-written backward, autograd through the elementwise ops), side by side in one
run. The kernels, then the three steps, are timed in --rounds interleaved rounds (FP32, fixed, learned, FP32, ...)
and the median round counts, so a machine that slows down mid-run does not favour one (round_seconds shows the
spread).

A step is the pipeline's (qbert.pipeline.finetune.training_step): forward under bf16 autocast, backward, gradient
clipping, AdamW (the learned ranges among its parameters), the schedule, gradients dropped (``train_step``); and
forward and backward alone (``forward_backward``: simulation's share without the optimizer's fixed cost).
The steps are timed at the batch shapes QAT trains with in the pipeline: for each of --tasks, Table 10's QAT
batch size for the task (recipes/qat.py) and the median padded length of one epoch of its length-grouped training
batches (the real training split, MiniLM's tokenizer, max length 128); --batch and --seq time one shape instead.
--model bert-base-random: BERT-base's shape (random weights). Prints JSON.
Usage: python bench/qat_step.py [--steps 10] [--rounds 3] [--tasks mrpc,stsb,rte,cola,mnli] [--batch 8 --seq 64]
       [--threads N] [--model minilm-l6|bert-base-random]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from qbert.recipes.qat import TABLE_10

from qbert.config import DataConfig, EstimatorConfig, FinetuneConfig
from qbert.models import load_model, load_tokenizer, resolve_model
from qbert.pipeline.batching import length_grouped_batches
from qbert.pipeline.finetune import linear_warmup_decay, parameter_groups, training_step
from qbert.quant import fused
from qbert.quant.functional import fake_quantize, fake_quantize_autograd
from qbert.quant.sites import enumerate_sites, instrument, resolve_plan
from qbert.quant.spec import QuantSpec
from qbert.quant.static import quantizer_factory, range_weights
from qbert.tasks import get_task

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pipeline_shapes(tasks: list[str]) -> dict[str, tuple[int, int]]:
    """Each task's QAT batch shape: Table 10's batch size, and the median padded length over one epoch of
    length-grouped batches of its training split (max length 128, as the configs)."""
    data = DataConfig(dir=os.environ.get("QBERT_DATA_DIR") or str(DEFAULT_DATA))
    tokenizer = load_tokenizer(resolve_model("minilm-l6"))
    shapes = {}
    for name in tasks:
        task = get_task(name)
        lengths = [len(f["input_ids"]) for f in task.encode_train(tokenizer, task.load("train", data), 128)]
        size = TABLE_10[name]["batch_size"]
        batches = length_grouped_batches(lengths, size, torch.Generator().manual_seed(0))
        shapes[name] = (size, int(statistics.median(max(lengths[i] for i in b) for b in batches)))
    return shapes


def seconds_per_call(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", default="mrpc,stsb,rte,cola,mnli", help="time the QAT batch shapes of these tasks")
    parser.add_argument("--batch", type=int, help="sequences per step (with --seq: this one shape instead)")
    parser.add_argument("--seq", type=int, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", default="minilm-l6", help="minilm-l6 or bert-base-random (BERT-base's shape)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # the kernel: one FFN-intermediate-sized activation, learned scale and zero point
    x = (torch.randn(8, 64, 1536) * 3).requires_grad_(True)
    scale = torch.tensor([0.05], requires_grad=True)
    zero = torch.tensor([128.0], requires_grad=True)

    def kernel(fn):
        return lambda: fn(x, scale, zero, 0, 255).sum().backward()

    kernels = {"fused": (True, fake_quantize), "eager": (False, fake_quantize),
               "autograd": (False, fake_quantize_autograd)}
    kernel_rounds = {name: [] for name in kernels}
    for _ in range(args.rounds):
        for name, (on, fn) in kernels.items():
            fused.set_enabled(on)
            kernel_rounds[name].append(seconds_per_call(kernel(fn), 30) * 1e3)
    fused.set_enabled(True)
    kernel_ms = {name: statistics.median(times) for name, times in kernel_rounds.items()}

    # the training step: the FP32 model and an instrumented copy, one with fixed and one with learned ranges
    shapes = {"custom": (args.batch or 8, args.seq or 64)} if args.batch or args.seq else \
        pipeline_shapes(args.tasks.split(","))
    model = load_model(resolve_model(args.model), "classification", 2)
    weight, activation = QuantSpec(bits=8, symmetric=True), QuantSpec(bits=8)
    models = {"fp32": model}
    for state in ("fixed", "learn"):
        quantized = copy.deepcopy(model)
        plan = resolve_plan(enumerate_sites(quantized), weights=weight, activations=activation, weight_base=weight,
                            activation_base=activation)
        inst = instrument(quantized, plan, quantizer_factory(EstimatorConfig()))
        range_weights(inst)
        for q in inst.activations().values():
            q.set_range(torch.tensor([-4.0]), torch.tensor([4.0]))
            q.set_state("fixed")
        inst.set_state(state)
        models[state] = quantized
    cfg = FinetuneConfig(precision="bf16")  # gradient clipping at 1.0 and AdamW's decay, as the configs
    device = torch.device("cpu")
    trainers = {}
    for variant, m in models.items():
        m.train()
        optimizer = torch.optim.AdamW(parameter_groups(m, cfg.weight_decay), lr=2e-5)
        trainers[variant] = optimizer, linear_warmup_decay(optimizer, 0, 10**9)

    def step(variant, batch):
        return lambda: training_step(models[variant], batch, *trainers[variant], cfg, device)

    def forward_backward(variant, batch):  # the step without clipping and the optimizer: simulation's own share
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = models[variant](**batch).loss
            loss.backward()
            models[variant].zero_grad(set_to_none=True)
        return run

    results = {}
    for name, (size, length) in shapes.items():
        ids = torch.randint(1000, 2000, (size, length))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (size,))}
        for variant in models:  # the first steps compile the fused kernels for this shape: not timed
            step(variant, batch)()
        results[name] = {"batch": [size, length]}
        for label, work in (("train_step", step), ("forward_backward", forward_backward)):
            rounds = {variant: [] for variant in models}
            for _ in range(args.rounds):
                for variant in models:
                    rounds[variant].append(seconds_per_call(work(variant, batch), args.steps))
            fp32, fixed, learned = (statistics.median(rounds[v]) for v in ("fp32", "fixed", "learn"))
            results[name][label] = {
                "seconds": {"fp32": round(fp32, 3), "w8a8_fixed_ranges": round(fixed, 3),
                            "w8a8_learned_ranges": round(learned, 3)},
                "slowdown": {"fixed": round(fixed / fp32, 2), "learned": round(learned / fp32, 2)},
                "round_seconds": {v: [round(t, 3) for t in times] for v, times in rounds.items()},
            }
    print(json.dumps({
        "model": args.model,
        "threads": torch.get_num_threads(),
        "fake_quantize_ms": {name: round(ms, 2) for name, ms in kernel_ms.items()},
        "rounds": args.rounds,
        "shapes": results,
        "sites": {"weights": len(inst.weights()), "activations": len(inst.activations())},
        "fused_kernels": fused.enabled(),
    }, indent=1))


if __name__ == "__main__":
    main()
