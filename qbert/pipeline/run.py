"""The fixed pipeline, for every seed: fine-tune (skipped for an already fine-tuned model) ->
prepare -> QAT (recipes that train) -> calibrate -> convert -> evaluate -> export.

This module owns the order; the recipe (from ``recipes/``) implements the stages and hands a
:class:`~qbert.recipes.Quantized` value from one to the next. It never changes when a recipe is added.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qbert.config import ExperimentConfig
from qbert.errors import QbertError, warn
from qbert.models import ModelSource, check_finetuned, load_finetuned, load_model, load_tokenizer, resolve_model
from qbert.pipeline.checkpoint import cache_root, cached_checkpoint, finetune_key, resume_file
from qbert.pipeline.context import StageContext
from qbert.pipeline.evaluate import evaluate_splits
from qbert.pipeline.export import card_facts, export_seed
from qbert.pipeline.finetune import (
    bf16_keys,
    emulated_bf16,
    finetune,
    resolve_device,
    resolve_hardware,
    seed_everything,
    slow_int8_gemm,
)
from qbert.pipeline.stages import run_stages
from qbert.pipeline.trainlog import TrainingLog, watched_ranges
from qbert.progress import SILENT, Reporter
from qbert.recipes import Quantized, Training, get_recipe
from qbert.records import read_record, seed_record
from qbert.runs import (
    RESUME_DIR,
    atomic_write_json,
    atomic_write_jsonl,
    config_dir,
    environment,
    finished_seeds,
    is_done,
    now,
    replace_folder,
    reset_seed_dir,
    runs_root,
    seed_dir,
    seed_lock,
    summarize,
    write_config,
    write_status,
)
from qbert.tasks import Task, get_task
from qbert.tasks.features import encode_cached, features_root

log = logging.getLogger("qbert")


@dataclass
class SeedOutcome:
    """What happened to one seed: ``done`` (ran now), ``skipped`` (finished before) or ``failed``."""

    seed: int
    state: str
    folder: Path
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ExperimentResult:
    """The outcome of ``run_experiment``: per-seed outcomes and the summary over finished seeds."""

    config: ExperimentConfig
    folder: Path
    seeds: list[SeedOutcome]
    summary: dict[str, Any] | None


def preflight(config: ExperimentConfig) -> tuple[ModelSource, Task]:
    """Resolve the model and check the data before any work starts (fails fast, one line)."""
    source = resolve_model(config.model)
    task = get_task(config.task, config)
    recipe = get_recipe(config.recipe.name)
    if config.skips_finetuning:
        check_finetuned(source, task)
    needs_train = not config.skips_finetuning or recipe.needs_calibration or recipe.trains
    for split in (("train",) if needs_train else ()) + task.present_splits(config.data):
        if not task.load(split, config.data):
            raise QbertError(f"the {config.task} {split} split has no examples", key="data")
    check_site_plan(config)
    return source, task


def check_site_plan(config: ExperimentConfig, skeleton: torch.nn.Module | None = None) -> Any:
    """Resolve the recipe's site plan on the model's skeleton (meta device, no weights), so a site rule
    that matches nothing or a group count that does not divide the hidden size fails before any work.
    Returns the plan (None for recipes without static sites). ``skeleton``: one already built."""
    from qbert.models import model_skeleton
    from qbert.quant.sites import enumerate_sites
    from qbert.recipes import Recipe

    recipe_cls = get_recipe(config.recipe.name)
    if recipe_cls.plan is Recipe.plan:
        return None
    if skeleton is None:
        task = get_task(config.task, config)
        skeleton, _ = model_skeleton(config.model, task.head, task.num_labels)
    return recipe_cls(config.recipe, config).plan(enumerate_sites(skeleton))


def stage_context(config: ExperimentConfig, seed: int, task: Task, tokenizer: Any, device: torch.device,
                  reporter: Reporter = SILENT, features: Path | None = None) -> StageContext:
    """The stages' view of one seed: the task's training features (calibration, QAT) and first
    evaluation split (methods that time inference), tokenized on first use (cached in ``features`` when
    given: :mod:`qbert.tasks.features`)."""
    split = task.eval_splits[0]
    max_len = config.finetune.max_seq_len

    def encode(which: str, encoder: Callable[..., Any]) -> Callable[[], Any]:
        def load() -> Any:
            examples = task.load(which, config.data)
            log.info("tokenizing %d %s examples", len(examples), which)
            with reporter.bar(f"tokenize {which}", 1) as advance:
                encoded = encode_cached(encoder, tokenizer, examples, max_len, features, f"{config.task}-{which}")
                advance(1, info=f"{len(encoded)} features")
            return encoded

        return load

    return StageContext(
        config, seed, tokenizer, device, log, reporter,
        load_train=encode("train", task.encode_train), load_eval=encode(split, task.encode_eval),
        eval_split=split, question_answering=task.head == "question_answering",
    )


def baseline_check(config: ExperimentConfig, task: Any, metrics: dict[str, float]) -> dict[str, Any] | None:
    """The FP32 baseline against the input-blind predictor on the first evaluation split (majority class;
    regression: a constant): ``{predictor, metrics, weak}``; a weak baseline is warned about."""
    if task.head == "question_answering":  # no input-blind span predictor worth comparing with
        return None
    split = task.eval_splits[0]
    found = task.trivial(task.load("train", config.data), task.load(split, config.data))
    if found is None:
        return None
    predictor, trivial = found
    ours = metrics.get(task.headline)
    weak = ours is not None and ours <= trivial[task.headline] + WEAK_MARGIN
    if weak:
        warn(log, "the FP32 baseline is no better than the input-blind predictor on %s (%s %.2f vs %s %.2f by %s): "
             "quantized results measured against it say little; train longer, change the learning rate or check "
             "the model", split, task.headline, ours, task.headline, trivial[task.headline], predictor)
    return {"predictor": predictor, "metrics": trivial, "weak": weak}


WEAK_MARGIN = 0.5
"""Headline points above the input-blind predictor under which an FP32 baseline is called weak."""


@contextlib.contextmanager
def _seed_log(folder: Path) -> Iterator[None]:
    handler = logging.FileHandler(folder / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def run_experiment(
    config: ExperimentConfig, *, root: str | Path | None = None, force: bool = False,
    reporter: Reporter = SILENT, on_start: Any = None, on_seed: Any = None, seeds: list[int] | None = None,
) -> ExperimentResult:
    """Run every seed of ``config`` (finished seeds are skipped unless ``force``) and summarise.

    ``on_start(folder)`` is called once the model and data are known to be usable, ``on_seed(outcome)``
    after each seed. ``seeds``: only these of the config's seeds (a sweep runs one seed per job).
    ``finetune.precision: auto`` is decided here, for this machine: the saved config and the hash hold the choice.
    """
    config = resolve_hardware(config)
    source, task = preflight(config)
    results_root = runs_root(root)
    folder = config_dir(results_root, config.name, config.config_hash())
    if on_start is not None:
        on_start(folder)
    write_config(folder / "config.yaml", config.resolved())
    outcomes = []
    # finished means: the same config hash under any run name (as `qbert sweep` and `qbert table` see it)
    finished = {} if force else finished_seeds(results_root, config.config_hash())
    for seed in seeds or config.seeds:
        sfolder = seed_dir(results_root, config.name, config.config_hash(), seed)
        record = read_record(finished[seed]) if seed in finished else None
        if record is not None:
            outcome = SeedOutcome(seed, "skipped", finished[seed], record.metrics)
        else:
            with seed_lock(sfolder) as holder:
                if holder is not None:
                    outcome = SeedOutcome(seed, "busy", sfolder, error=f"another process ({holder}) is running it")
                else:
                    outcome = _run_one(config, seed, sfolder, source, task, results_root, reporter)
        outcomes.append(outcome)
        if on_seed is not None:
            on_seed(outcome)
    elsewhere = [o.folder for o in outcomes if o.state == "skipped" and o.folder.parent != folder]
    return ExperimentResult(config, folder, outcomes, summarize(folder, also=elsewhere))


def _run_one(config: ExperimentConfig, seed: int, sfolder: Path, source: Any, task: Task, results_root: Path,
             reporter: Reporter) -> SeedOutcome:
    """Run one seed into its folder. A finished seed (``--force``) is rerun beside it and replaced only once
    the new results exist, so a failing rerun loses nothing."""
    replacing = is_done(sfolder)
    work = sfolder.with_name(f".{sfolder.name}.rerun") if replacing else sfolder
    reset_seed_dir(work)
    try:
        record = run_seed(config, seed, work, source, task, results_root, reporter)
    except BaseException as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        state = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        write_status(work, state, error=f"{type(exc).__name__}: {first_line}", finished=now())
        if replacing:
            log.warning("the rerun of seed %d failed; its finished results are kept, the rerun's log is in %s",
                        seed, work)
        raise
    if replacing:
        replace_folder(work, sfolder)
    return SeedOutcome(seed, "done", sfolder, record["metrics"])


def split_evaluator(
    config: ExperimentConfig, task: Task, tokenizer: Any, device: torch.device, folder: Path,
    reporter: Reporter = SILENT, features: Path | None = None,
) -> Callable[..., tuple[dict, dict, dict]]:
    """``evaluate_all(model, tag="")``: every evaluation split of the config's task (metrics, timing facts,
    outputs by split), writing ``predictions<tag>[-<split>].jsonl`` into ``folder`` when the config saves
    predictions; tokenized features cached in ``features`` when given."""

    def evaluate_all(model: torch.nn.Module, tag: str = "") -> tuple[dict, dict, dict]:
        metrics, evaluation, outputs = evaluate_splits(
            model, task, tokenizer, config.data, batch_size=config.evaluate.batch_size,
            max_len=config.finetune.max_seq_len, device=device, precision=config.evaluate.precision,
            clamp=config.evaluate.clamp_regression, reporter=reporter, features=features,
        )
        if config.evaluate.save_predictions:
            for i, (split, output) in enumerate(outputs.items()):
                name = f"predictions{tag}{'' if i == 0 else '-' + split}.jsonl"
                atomic_write_jsonl(folder / name, output.predictions)
        return metrics, evaluation, outputs

    return evaluate_all


def evaluate_beside(model: torch.nn.Module, arithmetic: str, reference: dict[str, Any],
                    evaluate_all: Callable[..., tuple[dict, dict, dict]], **facts: Any) -> dict[str, Any]:
    """``model`` (another arithmetic of the evaluated model) on the same splits: its metrics, and per split
    its agreement with the ``reference`` outputs (the simulated model's)."""
    from qbert.pipeline.evaluate import agreement

    metrics, evaluation, outputs = evaluate_all(model, f"-{arithmetic}")
    return {"metrics": metrics, "simulated": False, "arithmetic": arithmetic,
            "agreement": {s: agreement(reference[s], outputs[s]) for s in reference}, **facts,
            "evaluate": evaluation, "seconds": round(sum(v["seconds"] for v in evaluation.values()), 2)}


def evaluate_onnx(path: Path, reference: dict[str, Any],
                  evaluate_all: Callable[..., tuple[dict, dict, dict]]) -> dict[str, Any]:
    """The exported ONNX model on onnxruntime (CPU), beside the simulated outputs ``reference``."""
    from qbert.quant.onnx_export import OnnxModel

    runner = OnnxModel(path)
    return evaluate_beside(runner, "onnx", reference, evaluate_all, runtime=runner.runtime)


def onnxruntime_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime", "onnxscript"))


def evaluate_integer(q: Quantized, device: torch.device, reference: dict[str, Any],
                     evaluate_all: Callable[..., tuple[dict, dict, dict]], folder: Path) -> dict[str, Any]:
    """The model with its linear layers on integer GEMMs (int8 x int8 -> int32), beside the simulation.

    The kernel: ``torch._int_mm`` where it is fast (CUDA, x86 CPUs with VNNI or AMX); elsewhere (x86 CPUs
    without int8 dot-product instructions, where ``torch._int_mm`` is exact but ~40x slower than the fp32
    GEMM) the exported ONNX graph on onnxruntime, whose int8 GEMMs run exactly there under
    ``session.x64quantprecision`` (U8U8 kernels) and faster than fp32. Both are exact integer products; the
    float steps around them (bias, rescaling) round as each runtime rounds."""
    from qbert.quant.integer_model import float_gemms, integer_gemms

    gemms = integer_gemms(q.instrumented)
    if device.type == "cpu" and slow_int8_gemm(device) and onnxruntime_available():
        import tempfile

        from qbert.pipeline.export import export_onnx
        from qbert.quant.onnx_export import OnnxModel

        float_gemms(q.instrumented)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".integer-onnx-") as tmp:
            facts = export_onnx(q, Path(tmp))
            runner = OnnxModel(facts["path"])
            # onnxruntime has no int8 fusion for a 16-bit input: those GEMMs multiply the grid values in float
            gemms = {**gemms, "kernel": f"{runner.runtime} int8 GEMMs (MatMulIntegerToFloat; exact with "
                     f"{', '.join(f'{k}={v}' for k, v in runner.session_config.items()) or 'its defaults'})",
                     "float_on_grid": gemms["two_int8_gemms"], "two_int8_gemms": []}
            return evaluate_beside(runner, "integer", reference, evaluate_all, gemms=gemms)
    try:
        return evaluate_beside(q.model, "integer", reference, evaluate_all, gemms=gemms)
    finally:
        float_gemms(q.instrumented)


def run_seed(
    config: ExperimentConfig, seed: int, folder: Path, source: ModelSource, task: Task, root: Path,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """One seed through every stage; writes the seed folder and returns its metrics record."""
    folder.mkdir(parents=True, exist_ok=True)
    resolved = config.resolved()
    write_config(folder / "config.yaml", {**resolved, "seeds": [seed]})
    write_status(folder, "running", seed=seed, started=now())
    with _seed_log(folder):
        if config.finetune.threads:
            torch.set_num_threads(config.finetune.threads)
        device = resolve_device(config.finetune.device)
        atomic_write_json(folder / "env.json", environment(str(device)))
        log.info("seed %d: %s on %s with recipe %s, device %s", seed, config.model, config.task,
                 config.recipe.name, device)
        slow = bf16_keys(config) if emulated_bf16(device) else []
        if slow:
            warn(log, "%s: bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX flag): autocast emulates it, "
                 "and on an AVX2 machine training ran 21x and evaluation 8x slower than fp32 "
                 "(bench/finetune_throughput.py); set %s for speed (the numbers change a little; "
                 "finetune.precision=auto picks by machine)",
                 ", ".join(slow), " ".join(f"{k}=fp32" for k in slow))
        if config.evaluate.integer and slow_int8_gemm(device) and not onnxruntime_available():
            warn(log, "evaluate.integer: this CPU has no int8 dot-product instructions (no AVX512-VNNI, AVX-VNNI or "
                 "AMX flag), where torch._int_mm is exact but about 40x slower than the fp32 GEMM, and onnxruntime "
                 "(which runs the integer GEMMs fast and exactly here) is not installed: the integer evaluation "
                 "will be slow; pip install 'qbert[onnx]'")
        missing_splits = task.missing_splits(config.data)
        for split, why in missing_splits.items():
            warn(log, "%s: no %s evaluation split (%s): evaluating the others; metrics.json lists it under "
                 "missing_splits", config.task, split, why)
        tokenizer = load_tokenizer(source)
        recipe = get_recipe(config.recipe.name)(config.recipe, config)
        features = features_root(root)
        ctx = stage_context(config, seed, task, tokenizer, device, reporter, features)
        timings: dict[str, float] = {}

        def train(model: torch.nn.Module, cfg: Any = None, name: str = "finetune", watch: Any = None,
                  resume: Path | None = None, **hooks: Any) -> dict[str, Any]:
            events = folder / "tensorboard" / name if config.log.tensorboard else None

            def training_log(total: int) -> TrainingLog:
                return TrainingLog(name, total, every=config.log.every, folder=events, watch=watch)

            return finetune(model, ctx.train_features(), cfg or config.finetune, seed=seed,
                            pad_token_id=tokenizer.pad_token_id, device=device, reporter=reporter,
                            stage="QAT" if name == "qat" else "fine-tune", training_log=training_log,
                            resume=resume, **hooks)

        # fine-tune: the FP32 checkpoint is shared through the cache by every recipe that starts from it
        start = time.perf_counter()
        checkpoint = None
        if config.skips_finetuning:  # the user's own fine-tuned model (checked by the preflight)
            training, checkpoint = None, source.location
            model = load_finetuned(source.location).to(device)
        elif recipe.trains and recipe.starts_from == "pretrained":
            training: dict[str, Any] | None = None
            seed_everything(seed)
            model = load_model(source, task.head, task.num_labels)
        else:
            key, key_data = finetune_key(config, seed, source.identity, task.data_fingerprint(config.data))

            def train_checkpoint(tmp: Path) -> dict[str, Any]:
                seed_everything(seed)
                fresh = load_model(source, task.head, task.num_labels)
                info = train(fresh, resume=resume_file(cache_root(root), key))
                fresh.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                return info

            ckpt, info, cached = cached_checkpoint(cache_root(root), key, key_data, train_checkpoint)
            training, checkpoint = {**info, "cached": cached}, str(ckpt)
            model = load_finetuned(ckpt).to(device)
        timings["finetune"] = round(time.perf_counter() - start, 2)

        # prepare -> calibrate -> [QAT: the same loop with the recipe's quantizers in place] -> convert; what the
        # recipe returns is what is evaluated and exported
        if recipe.trains:
            ctx.train_features()

        def train_quantized(q: Quantized, plan: Training) -> dict[str, Any]:
            seed_everything(seed)
            return train(q.model, plan.config, "qat", watched_ranges(q.quantizers), folder / RESUME_DIR / "qat.pt",
                         extra_parameter_groups=plan.parameter_groups, before_step=plan.before_step)

        q, qat = run_stages(recipe, model.to(device), ctx, train=train_quantized, timings=timings)
        eval_device = q.device or device

        # evaluate every evaluation split; metrics of later splits carry the split name
        evaluate_all = split_evaluator(config, task, tokenizer, eval_device, folder, reporter, features)
        metrics, evaluation, outputs = evaluate_all(q.model)
        timings["evaluate"] = round(sum(v["seconds"] for v in evaluation.values()), 2)
        trivial = baseline_check(config, task, metrics) if recipe.name == "fp32" else None

        # the same model with its linear layers on integer GEMMs, beside the simulation
        integer = None
        if config.evaluate.integer:
            integer = evaluate_integer(q, eval_device, outputs, evaluate_all, folder)
            timings["evaluate_integer"] = integer["seconds"]

        start = time.perf_counter()
        card = card_facts(config, seed, metrics, folder, integer["metrics"] if integer else None)
        exports = export_seed(q, config.export.formats, folder, card)
        if exports:
            timings["export"] = round(time.perf_counter() - start, 2)
        onnx = None
        if "onnx" in exports:  # the exported file on onnxruntime, on the same evaluation splits
            onnx = evaluate_onnx(folder / exports["onnx"]["path"], outputs, evaluate_all)
            timings["evaluate_onnx"] = onnx["seconds"]

        record = seed_record(**{
            "name": config.name,
            "config_hash": config.config_hash(),
            "seed": seed,
            "model": config.model,
            "task": config.task,
            "recipe": config.recipe.name,
            "headline": task.headline,
            "simulated": q.simulated,
            "arithmetic": q.arithmetic,
            "metrics": metrics,
            "integer": integer,
            "onnx": onnx,
            "finetune": training,
            "qat": qat,
            "checkpoint": checkpoint,
            "evaluate": evaluation,
            "missing_splits": missing_splits,
            "trivial": trivial,
            "recipe_report": q.report,
            "exports": exports,
            "timings": timings,
        })
        atomic_write_json(folder / "metrics.json", record)
        shutil.rmtree(folder / RESUME_DIR, ignore_errors=True)  # the results are stored: nothing to resume
        write_status(folder, "done", finished=now())
        log.info("seed %d done: %s", seed, metrics)
        return record
