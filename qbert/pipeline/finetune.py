"""The fine-tune stage: one training loop for every recipe (QAT recipes train with quantizers in place).

AdamW (no decay on biases and LayerNorm weights), linear warmup then linear decay to zero,
gradient clipping, length-grouped dynamically padded batches, optional bf16 autocast.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from qbert.config import FinetuneConfig
from qbert.errors import QbertError
from qbert.pipeline.batching import length_grouped_batches, model_inputs, pad_batch
from qbert.pipeline.trainlog import TrainingLog
from qbert.progress import SILENT, Reporter


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run repeats exactly on the CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(choice: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise QbertError("CUDA was asked for but is not available; use device: auto or cpu",
                             key="finetune.device")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """bf16 autocast context on CPU or CUDA, or a no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, exclude: set[int] = frozenset()  # type: ignore[assignment]
) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices, none for biases and normalisation weights
    (parameters whose ``id`` is in ``exclude`` are left to the caller)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in exclude:
            continue
        if param.ndim < 2 or "LayerNorm" in name or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Learning rate rises linearly over ``warmup_steps`` then falls linearly to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                  scheduler: Any, cfg: FinetuneConfig, device: torch.device) -> torch.Tensor:
    """One optimisation step on a padded batch: forward (under autocast for bf16), backward, gradient clipping,
    AdamW, the schedule, gradients dropped. Returns the loss. (What ``bench/qat_step.py`` times.)"""
    with autocast(device, cfg.precision):
        loss = model(**model_inputs(batch, device, with_targets=True)).loss
    loss.backward()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def finetune(
    model: torch.nn.Module,
    features: list[dict[str, Any]],
    cfg: FinetuneConfig,
    *,
    seed: int,
    pad_token_id: int,
    device: torch.device,
    reporter: Reporter = SILENT,
    extra_parameter_groups: list[dict[str, Any]] | None = None,
    before_step: Callable[[int], None] | None = None,
    training_log: Callable[[int], TrainingLog] | None = None,
    stage: str = "fine-tune",
) -> dict[str, Any]:
    """Train ``model`` in place on tokenized ``features``; returns what happened (steps, loss, time).

    QAT hooks: ``extra_parameter_groups`` trains quantizer ranges with their own settings (their
    parameters must not also be in the model's ordinary groups); ``before_step(step)`` runs before
    every optimisation step (quantization delay). ``training_log(total_steps)``: where the loss goes
    as training runs (default: run.log at the default interval); ``stage``: its name in progress output.
    """
    if not features:
        raise QbertError("the training set is empty", key="data.max_train_samples")
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(f["input_ids"]) for f in features]
    batches_per_epoch = math.ceil(len(features) / cfg.batch_size)
    total_steps = max(1, math.ceil(cfg.epochs * batches_per_epoch))
    warmup_steps = int(cfg.warmup * total_steps)
    extra = list(extra_parameter_groups or [])
    separate = {id(p) for group in extra for p in group["params"]}
    groups = parameter_groups(model, cfg.weight_decay, exclude=separate) + extra
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = linear_warmup_decay(optimizer, warmup_steps, total_steps)

    step, losses, tokens = 0, [], 0
    record = training_log(total_steps) if training_log is not None else TrainingLog("finetune", total_steps)
    start = time.perf_counter()
    with contextlib.closing(record), reporter.bar(stage, total_steps) as advance:
        while step < total_steps:
            for indices in length_grouped_batches(lengths, cfg.batch_size, generator, cfg.group_by_length):
                if step >= total_steps:
                    break
                if before_step is not None:
                    before_step(step)
                batch = pad_batch([features[i] for i in indices], pad_token_id)
                tokens += int(batch["attention_mask"].sum())
                lr = scheduler.get_last_lr()[0]
                loss = training_step(model, batch, optimizer, scheduler, cfg, device)
                losses.append(float(loss.detach()))
                step += 1
                if not math.isfinite(losses[-1]):
                    raise QbertError(f"training loss is {losses[-1]} at step {step} of {total_steps}: training "
                                     f"diverged; lower the learning rate (now {cfg.lr:g})", key="finetune.lr")
                advance(1, info=f"loss {np.mean(losses[-20:]):.4f}")
                record.step(step, losses[-1], lr)
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "steps": total_steps,
        "epochs": cfg.epochs,
        "train_features": len(features),
        "final_loss": float(np.mean(losses[-20:])),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": cfg.precision,
    }
