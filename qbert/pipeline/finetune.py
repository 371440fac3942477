"""The fine-tune stage: one training loop for every recipe (QAT recipes train with quantizers in place).

AdamW (no decay on biases and LayerNorm weights), linear warmup then linear decay to zero,
gradient clipping, length-grouped dynamically padded batches, optional bf16 autocast.

Given a ``resume`` file, the loop saves its whole state there every ``save_every`` seconds and when it ends
(weights, optimiser, schedule, random generators, where it is in the epoch, what modules such as quantizers
keep outside their state dict), and a later call with the same file continues from it: an interrupted
training resumes at its last save and ends with the weights an uninterrupted one would have (on the same
device and thread count).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qbert.config import FinetuneConfig, stable_hash
from qbert.errors import QbertError, warn
from qbert.files import fsync_path
from qbert.pipeline.batching import length_grouped_batches, model_inputs, pad_batch
from qbert.pipeline.trainlog import TrainingLog
from qbert.progress import SILENT, Reporter

log = logging.getLogger(__name__)

SAVE_EVERY = 600.0
"""Seconds of training between two saves of the training state (when the caller names a ``resume`` file)."""


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


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""x86 CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic; without them CPU autocast emulates it."""


X86 = platform.machine().lower() in ("x86_64", "amd64")
"""Whether this machine is x86-64, where the CPU flags below say what bf16 and int8 arithmetic costs."""


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them in ``/proc/cpuinfo``, or None where unknown (read once)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""x86 CPU flags of int8 dot-product instructions; without them ``torch._int_mm`` falls back to a slow path."""


def x86_without(device: torch.device, wanted: frozenset[str], flags: frozenset[str] | None = None) -> bool:
    """Whether ``device`` is an x86 CPU with none of the ``wanted`` flags. False where unknown (other devices
    and architectures, no ``/proc/cpuinfo``)."""
    if device.type != "cpu" or not X86:
        return False
    flags = cpu_flags() if flags is None else flags
    return flags is not None and not flags & wanted


def emulated_bf16(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 autocast on ``device`` is emulated: an x86 CPU without AVX512-BF16 or AMX."""
    return x86_without(device, NATIVE_BF16_FLAGS, flags)


def slow_int8_gemm(device: torch.device, flags: frozenset[str] | None = None) -> bool:
    """Whether ``torch._int_mm`` on ``device`` lacks fast kernels: an x86 CPU without VNNI or AMX (measured on
    an AVX2 EPYC: exact, but 44x slower than the fp32 GEMM)."""
    return x86_without(device, INT8_DOT_FLAGS, flags)


def native_bf16(device: str) -> bool:
    """Whether ``device`` (a ``finetune.device`` choice) computes bf16 natively: CUDA that supports it, or an
    x86 CPU with AVX512-BF16 or AMX. False where unknown (other CPUs): ``precision: auto`` then trains in fp32."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    return X86 and flags is not None and bool(flags & NATIVE_BF16_FLAGS)


def resolve_hardware(config: Any) -> Any:
    """``config`` as it runs on this machine: ``finetune.precision: auto`` becomes bf16 where the device computes
    it natively (:func:`native_bf16`), else fp32. Called where work starts (a run, a sweep, a search) and where
    runs are looked up (tables), so the saved config and its hash hold the choice; reading and validating a
    config never probes the hardware (nor imports torch)."""
    if config.finetune.precision != "auto":
        return config
    chosen = "bf16" if native_bf16(config.finetune.device) else "fp32"
    return config.model_copy(update={"finetune": config.finetune.model_copy(update={"precision": chosen})})


def bf16_keys(config: Any) -> list[str]:
    """The config keys that ask for bf16 autocast."""
    asked = [("finetune.precision", config.finetune.precision), ("evaluate.precision", config.evaluate.precision),
             ("recipe.precision", getattr(config.recipe, "precision", None))]
    return [key for key, value in asked if value == "bf16"]


def autocast(device: torch.device, precision: str):
    """bf16 autocast context on CPU or CUDA, or a no-op for fp32."""
    if precision not in ("fp32", "bf16"):  # "auto" must be resolved where the run starts (resolve_hardware)
        raise ValueError(f"precision {precision!r} is not fp32 or bf16: resolve the config with resolve_hardware")
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


def _stateful(model: torch.nn.Module) -> dict[str, Any]:
    """Modules that keep training state outside their state dict (``training_state``/``load_training_state``)."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "training_state")}


def _random_states(device: torch.device) -> dict[str, Any]:
    kind, keys, position, gauss, cached = np.random.get_state(legacy=True)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, gauss, cached],
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_random_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, position, gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, gauss, cached))
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def training_identity(model: torch.nn.Module, features: list[dict[str, Any]], cfg: FinetuneConfig, seed: int,
                      total_steps: int) -> str:
    """What a saved training state must have been trained on to be continued: the settings, the data's size,
    the seed, the step count and the names and shapes of the trained tensors."""
    tensors = [(n, list(t.shape)) for n, t in model.state_dict().items()]
    return stable_hash({"finetune": cfg.model_dump(mode="json", exclude={"device", "threads"}), "seed": seed,
                        "features": len(features), "steps": total_steps, "tensors": tensors}, length=16)


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably (a reader, even after a power cut, sees the previous
    save or this one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_training_state(path: Path, identity: str) -> dict[str, Any] | None:
    """The state saved at ``path`` if it continues this training (same ``identity``), else None (with a
    warning when a file is there but cannot be used)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: start over rather than fail the run
        warn(log, "cannot read the saved training state %s (%s): training from the start", path,
             str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    if not isinstance(state, dict) or state.get("identity") != identity:
        warn(log, "the saved training state %s belongs to another training (other settings, data or model): "
             "training from the start", path)
        return None
    return state


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
    resume: Path | None = None,
    save_every: float | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on tokenized ``features``; returns what happened (steps, loss, time).

    QAT hooks: ``extra_parameter_groups`` trains quantizer ranges with their own settings (their
    parameters must not also be in the model's ordinary groups); ``before_step(step)`` runs before
    every optimisation step (quantization delay). ``training_log(total_steps)``: where the loss goes
    as training runs (default: run.log at the default interval); ``stage``: its name in progress output.
    ``resume``: the file the training state is saved to every ``save_every`` seconds (default
    :data:`SAVE_EVERY`) and at the end, and continued from when it is there (the caller removes it once the
    results are stored).
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

    step, losses, tokens, seconds_before, position, resumed = 0, [], 0, 0.0, 0, []
    identity = training_identity(model, features, cfg, seed, total_steps) if resume is not None else ""
    saved = load_training_state(resume, identity) if resume is not None else None
    if saved is not None:
        modules = _stateful(model)
        for name, module_state in saved["modules"].items():
            modules[name].load_training_state(module_state)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        generator.set_state(saved["epoch_generator"])
        _set_random_states(saved["random"], device)
        step, position, losses, tokens = saved["step"], saved["position"], saved["losses"], saved["tokens"]
        seconds_before, resumed = saved["seconds"], [*saved["resumed"], step]
        log.info("%s resumes at step %d of %d from %s", stage, step, total_steps, resume)
    every = SAVE_EVERY if save_every is None else save_every
    record = training_log(total_steps) if training_log is not None else TrainingLog("finetune", total_steps)
    start = last_save = time.perf_counter()

    def save(epoch_generator: torch.Tensor) -> None:
        save_training_state(resume, {  # type: ignore[arg-type]
            "identity": identity, "step": step, "position": position, "epoch_generator": epoch_generator,
            "losses": losses, "tokens": tokens, "seconds": seconds_before + time.perf_counter() - start,
            "resumed": resumed, "model": model.state_dict(),
            "modules": {name: m.training_state() for name, m in _stateful(model).items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "random": _random_states(device),
        })

    # a resumed training's bar counts the steps left, so its eta is this process's pace
    shown = f"{stage} (resumed at step {step} of {total_steps})" if step else stage
    with contextlib.closing(record), reporter.bar(shown, total_steps - step) as advance:
        while step < total_steps:
            epoch_generator = generator.get_state()
            batches = length_grouped_batches(lengths, cfg.batch_size, generator, cfg.group_by_length)
            for indices in batches[position:]:
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
                position += 1
                if not math.isfinite(losses[-1]):
                    raise QbertError(f"training loss is {losses[-1]} at step {step} of {total_steps}: training "
                                     f"diverged; lower the learning rate (now {cfg.lr:g})", key="finetune.lr")
                advance(1, info=f"loss {np.mean(losses[-20:]):.4f}")
                record.step(step, losses[-1], lr)
                if resume is not None and (step == total_steps or time.perf_counter() - last_save >= every):
                    save(epoch_generator)
                    last_save = time.perf_counter()
            position = 0
    seconds = seconds_before + time.perf_counter() - start
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
        **({"resumed_at_steps": resumed} if resumed else {}),
    }
