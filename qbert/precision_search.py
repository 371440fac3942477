"""Mixed precision chosen for you (``qbert search``): the fewest sites of a post-training plan raised to 16 bits (or
left in floating point) so that the dev metric stays within a target of FP32.

Intel ships int8 BERTs with a few FFN output layers left in FP32 "to meet the 1% relative accuracy loss";
Bondarenko et al. 2021 (Table 4) pick the 16-bit sites by hand (the FFN's input, output and residual sum). The search
does it from data, for one seed of a config whose recipe is a post-training plan with site rules (``w8a8_ptq``,
``ptq``, ``mp_ptq``, ``peg``):

1. **Split.** The first evaluation split is shuffled with the seed and cut in two: the *search* part, on which every
   decision is made, and the *held-out* part, which only scores the final choice (so the reported result is not
   tuned on the numbers it reports). The FP32 model is the config's own fine-tuned checkpoint (the cache of
   ``qbert run``).
2. **Sensitivity, leave-one-out.** For every quantized activation site (``--sites all``: weights too), the plan with
   that site alone raised to 16 bits (``--high-bits fp``: left in floating point) is calibrated as the recipe
   calibrates and run on ``probe`` examples of the search part; its sensitivity is how much that lowers the mean
   squared difference between the quantized and FP32 outputs (logits, or the regression score). The output
   difference is used rather than the metric: it is continuous, needs no labels and separates sites that a few
   hundred examples' accuracy would tie (Bondarenko et al.'s Table 2 leaves whole families out and reads the
   metric; this is the same experiment per site).
3. **Fewest sites.** Sites are raised in the order of their sensitivity; the smallest prefix whose loss against
   FP32 on the search part is within the target *with confidence* is found by doubling the prefix, then bisecting
   (the loss is taken as monotone in the prefix; every evaluation is counted and listed). With confidence: the
   ``confidence`` quantile (default 0.9) of the loss over bootstrap resamples of the search part, the same
   resamples for FP32 and the plan (paired), must be within the target. The point estimate on a few hundred
   examples is as likely to be optimistic as not, so a choice that just meets it misses the target on other
   examples about half the time; the bound asks for more where the search part is small or the plan disagrees
   with FP32 often, and for little where it is large (MNLI's 4,900) and they agree.
4. **Held out.** FP32, the starting plan and the chosen plan are scored on the held-out part.

A 16-bit site keeps the range its estimator calibrated, so values beyond it are still clipped: where clipping and
not resolution is what costs (MiniLM-L6's STS-B, below the target even with every activation at 16 bits), only
floating point helps.

Every evaluation is stored as it finishes (``evaluations.json`` beside ``search.json``), so an interrupted search
resumes where it stopped and a search for another target reuses them; ``chosen.yaml`` is the config with the chosen
site rules, ready for ``qbert run``.
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbert.config import ExperimentConfig, parse_config, stable_hash
from qbert.errors import QbertError
from qbert.progress import SILENT, Reporter

SEARCH_FOLDER = "search"
"""Searches live in ``<runs>/search/<config name>/<hash>/seed=<S>/`` (beside the runs, not among them)."""


@dataclass(frozen=True)
class Target:
    """How far below FP32 the headline metric may fall: ``limit`` points, or ``limit`` percent of FP32's value."""

    limit: float
    relative: bool = False

    def loss(self, fp32: float, value: float) -> float:
        """The loss of ``value`` against ``fp32`` in the target's unit (points, or percent of FP32)."""
        points = fp32 - value
        return 100 * points / abs(fp32) if self.relative else points

    def met(self, fp32: float, value: float, margin: float = 0.0) -> bool:
        """Whether ``value`` is within the target, ``margin`` (same unit) inside it."""
        return self.loss(fp32, value) <= self.limit - margin + 1e-9

    def __str__(self) -> str:
        return f"loss<={self.limit:g}{'%' if self.relative else ''}"


_TARGET = re.compile(r"\s*loss\s*<=\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*")


def parse_target(text: str) -> Target:
    """``loss<=1.0`` (headline points below FP32) or ``loss<=1%`` (relative to FP32's value)."""
    match = _TARGET.fullmatch(text)
    if match is None:
        raise QbertError(f"{text!r} is not a target: write loss<=POINTS (the headline metric at most that many "
                         "points below FP32, e.g. loss<=1.0) or loss<=PERCENT% (relative, e.g. loss<=1%)",
                         key="--target")
    return Target(float(match.group(1)), relative=bool(match.group(2)))


def parse_high_bits(text: str | int | None) -> int | None:
    """``16`` (9-16 bits) or ``fp`` (None: floating point)."""
    if text is None or str(text).strip().lower() in ("fp", "fp32", "float"):
        return None
    try:
        bits = int(str(text))
    except ValueError:
        bits = 0
    if not 9 <= bits <= 16:
        raise QbertError(f"{text!r}: the bits of a raised site, 9 to 16 (e.g. 16), or fp to leave it in floating "
                         "point", key="--high-bits")
    return bits


@dataclass(frozen=True)
class SearchSettings:
    """What a search does besides its config: the target and how it spends evaluations."""

    target: Target
    seed: int
    holdout: float = 0.5
    """Share of the evaluation split held out for the final score."""
    probe: int = 256
    """Examples of the search part that the sensitivities are measured on."""
    kinds: tuple[str, ...] = ("activation",)
    """Which quantized sites are candidates: activations, or also weights."""
    margin: float = 0.0
    """How far inside the target the search part must be (the target's unit): room for the difference between the
    search part and the held-out part."""
    high_bits: int | None = 16
    """Bits of a raised site; None: floating point (the site is left unquantized, no range clips it)."""
    confidence: float | None = 0.9
    """One-sided confidence of the search part's loss bound (a paired bootstrap); None: the point estimate."""

    @property
    def raised(self) -> str:
        return "FP32" if self.high_bits is None else f"{self.high_bits} bits"

    def data(self) -> dict[str, Any]:
        return {"target": str(self.target), "margin": self.margin, "confidence": self.confidence,
                "kinds": list(self.kinds), **self.evaluation_data()}

    def evaluation_data(self) -> dict[str, Any]:
        """What every evaluation depends on: the target and the candidate kinds only decide which are made."""
        return {"seed": self.seed, "holdout": self.holdout, "probe": self.probe, "high_bits": self.high_bits}


def parse_confidence(value: float | None) -> float | None:
    """A one-sided confidence in ``[0.5, 1)``; ``0`` or None: the point estimate (None)."""
    if value is None or value == 0:
        return None
    if not 0.5 <= value < 1:
        raise QbertError(f"{value!r}: a confidence from 0.5 to below 1 (e.g. 0.9), or 0 for the point estimate",
                         key="--confidence")
    return float(value)


BOOTSTRAP_DRAWS = 1000
"""Resamples of the search part behind a confidence bound."""


def bootstrap_draws(n: int, seed: int, draws: int = BOOTSTRAP_DRAWS) -> Any:
    """``draws`` resamples (with replacement) of ``n`` examples' indices, one row each, from ``seed``."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def loss_bound(target: Target, fp32: list[float], candidate: list[float], confidence: float) -> float:
    """The ``confidence`` quantile of the loss of ``candidate`` against ``fp32``, the headline metric of each on the
    same resamples (paired: the two lists are index for index the same draws)."""
    import numpy as np

    losses = [target.loss(reference, value) for reference, value in zip(fp32, candidate, strict=True)]
    return float(np.quantile(losses, confidence))


def check_searchable(config: ExperimentConfig) -> None:
    """A clear error unless ``config``'s recipe is a post-training plan with site rules on a scored task."""
    from qbert.recipes import get_recipe
    from qbert.recipes.ptq import StaticQuantParams, StaticQuantRecipe
    from qbert.tasks import get_task

    recipe = get_recipe(config.recipe.name)
    if not issubclass(recipe, StaticQuantRecipe) or recipe.trains or not isinstance(config.recipe, StaticQuantParams):
        raise QbertError(f"recipe {config.recipe.name} is not a post-training plan with site rules; qbert search "
                         "starts from one: set recipe.name to w8a8_ptq (or ptq, mp_ptq, peg)", key="recipe.name")
    if get_task(config.task, config).head == "question_answering":
        raise QbertError(f"task {config.task}: qbert search scores classification and regression tasks (GLUE); "
                         "question answering is not supported yet", key="task")


def search_folder(root: Path, config: ExperimentConfig, settings: SearchSettings) -> Path:
    """Where the searches of one config, seed and split write: searches for other targets (or candidate kinds) share
    the folder and its evaluations; ``search.json`` and ``chosen.yaml`` are the latest search's."""
    from qbert.runs import SEED_PREFIX

    identity = stable_hash({"config": config.config_hash(), **settings.evaluation_data()})
    return root / SEARCH_FOLDER / config.name / identity / f"{SEED_PREFIX}{settings.seed}"


def with_raised(config: ExperimentConfig, sites: list[str], bits: int | None) -> ExperimentConfig:
    """``config`` with ``sites`` raised to ``bits`` (None: floating point) by site rules after its own."""
    data = config.resolved()
    rules = data["recipe"].get("sites") or []
    rules = [{k: v} for k, v in rules.items()] if isinstance(rules, dict) else list(rules)
    data["recipe"]["sites"] = rules + [{site: None if bits is None else {"bits": bits}} for site in sites]
    return parse_config(data)


def switchable(config: ExperimentConfig, settings: SearchSettings, plan: Any, candidates: list[str]) -> bool:
    """Whether every evaluation can use one calibrated model with the raised sites' quantizers switched off, and
    get what calibrating a model with those sites in floating point gives: raised sites go to floating point (not
    to other bits, which an estimator may range differently), they are all activations (a weight in floating point
    changes what the activation estimators downstream observe), the activation estimators observe floating-point
    activations (not ``calibrate.upstream_quantized``, where each observes its upstream sites quantized), and no
    candidate lends its permutation to another site (PEG's shared FFN permutation: without its source quantized,
    each site sorts its own)."""
    if settings.high_bits is not None or config.calibrate.upstream_quantized:
        return False
    kinds = {site.name: site.kind for site in plan.sites}
    lent = {source for name, source in plan.permutation_sources.items() if source != name}
    return all(kinds[name] == "activation" and name not in lent for name in candidates)


def fp32_config(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The FP32 run of ``config``'s model, task and fine-tuning (shares its cached checkpoint)."""
    data = config.resolved()
    for key in ("recipe", "export", "estimator", "calibrate", "reference"):
        data.pop(key, None)
    return parse_config({**data, "name": f"{config.name}_fp32", "recipe": {"name": "fp32"}, "seeds": [seed]})


def smallest_prefix(n: int, ok: Callable[[int], bool]) -> int | None:
    """The smallest ``k`` in ``0..n`` with ``ok(k)``, taking ``ok`` as monotone (false, then true): ``0``, then
    doubling ``1, 2, 4, ...`` (capped at ``n``) until true, then bisecting the last step. None if ``ok(n)`` is false.
    About ``2 log2(k)`` calls instead of ``k``."""
    if ok(0):
        return 0
    low, high = 0, min(1, n)
    while not ok(high):
        if high == n:
            return None
        low, high = high, min(2 * high, n)
    while high - low > 1:
        middle = (low + high) // 2
        if ok(middle):
            high = middle
        else:
            low = middle
    return high


class Evaluations:
    """Every evaluation a search made, by key, stored after each one (an interrupted search resumes)."""

    def __init__(self, path: Path, identity: dict[str, Any]):
        from qbert.runs import read_json

        self.path, self.identity, self.spent = path, identity, 0
        stored = read_json(path) if path.is_file() else None
        self.values: dict[str, Any] = stored["values"] if stored and stored.get("identity") == identity else {}
        self.reused = len(self.values)

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        from qbert.runs import atomic_write_json

        if key not in self.values:
            self.values[key] = compute()
            self.spent += 1
            atomic_write_json(self.path, {"identity": self.identity, "values": self.values})
        return self.values[key]


def run_search(config: ExperimentConfig, settings: SearchSettings, *, root: str | Path | None = None,
               reporter: Reporter = SILENT, force: bool = False, say: Callable[[str], None] = lambda _: None
               ) -> dict[str, Any]:
    """Search the fewest sites of ``config``'s plan to raise to ``settings.high_bits``; the result (also written to
    ``search.json``) with the chosen sites, every evaluation and the held-out scores."""
    import numpy as np
    import torch

    from qbert.models import load_finetuned, load_tokenizer, resolve_model
    from qbert.pipeline.evaluate import predict
    from qbert.pipeline.finetune import resolve_device, resolve_hardware
    from qbert.pipeline.run import run_experiment, stage_context
    from qbert.pipeline.stages import run_stages
    from qbert.quant.sites import enumerate_sites
    from qbert.recipes import get_recipe
    from qbert.records import read_record
    from qbert.runs import atomic_write_json, read_json, runs_root, write_config
    from qbert.tasks import get_task
    from qbert.tasks.features import features_root

    config = resolve_hardware(config)  # finetune.precision: auto, decided for this machine

    check_searchable(config)
    if not 0 < settings.holdout < 1:
        raise QbertError(f"--holdout {settings.holdout}: a share between 0 and 1 (e.g. 0.5)", key="--holdout")
    results_root = runs_root(root)
    folder = search_folder(results_root, config, settings)
    if (folder / "search.json").is_file() and not force:
        done = read_json(folder / "search.json")
        if done is not None and all(done.get(k) == v for k, v in settings.data().items()):
            return done
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # the FP32 model: the config's fine-tuned checkpoint (trained once, cached, as `qbert run` does)
    say(f"FP32 checkpoint of {config.model} on {config.task}, seed {settings.seed}")
    fp32_run = run_experiment(fp32_config(config, settings.seed), root=results_root, reporter=reporter)
    outcome = fp32_run.seeds[0]
    if outcome.state not in ("done", "skipped"):
        raise QbertError(f"the FP32 run of seed {settings.seed} did not finish ({outcome.error}); see {outcome.folder}",
                         key="seeds")
    record = read_record(outcome.folder)
    checkpoint = record.checkpoint if record is not None else None
    if not checkpoint:
        raise QbertError(f"the FP32 run of seed {settings.seed} recorded no checkpoint; see {outcome.folder}",
                         key="seeds")
    source, task = resolve_model(config.model), get_task(config.task, config)
    device = resolve_device(config.finetune.device)
    tokenizer = load_tokenizer(source)
    fp32 = load_finetuned(checkpoint).to(device).eval()
    ctx = stage_context(config, settings.seed, task, tokenizer, device, reporter, features_root(results_root))

    # the two parts of the evaluation split (decisions on one, the final score on the other)
    split = task.eval_splits[0]
    examples = task.load(split, config.data)
    order = np.random.default_rng(settings.seed).permutation(len(examples))
    cut = round(len(examples) * settings.holdout)
    if cut < 1 or cut >= len(examples):
        raise QbertError(f"{split} has {len(examples)} examples: too few to hold out {settings.holdout:.0%}",
                         key="--holdout")
    parts = {name: [examples[i] for i in sorted(idx)] for name, idx in (("held_out", order[:cut]),
                                                                         ("search", order[cut:]))}
    probe = [parts["search"][i] for i in sorted(np.random.default_rng(settings.seed + 1).permutation(
        len(parts["search"]))[: settings.probe])]
    encoded = {name: task.encode_eval(tokenizer, part, config.finetune.max_seq_len)
               for name, part in {**parts, "probe": probe}.items()}

    def outputs(model: torch.nn.Module, part: str) -> np.ndarray:
        out = predict(model, encoded[part], question_answering=False, batch_size=config.evaluate.batch_size,
                      pad_token_id=tokenizer.pad_token_id, device=device, precision=config.evaluate.precision)
        if config.evaluate.clamp_regression and task.label_range is not None:
            out = np.clip(out, *task.label_range)
        return out

    labels = {name: np.asarray([e.label for e in part]) for name, part in parts.items()}

    def predictions(model: torch.nn.Module, part: str) -> np.ndarray:
        return task.predictions_from(np.asarray(outputs(model, part), dtype=np.float64))

    def headline(part: str, predicted: np.ndarray, rows: Any = slice(None)) -> float:
        return float(task.compute(labels[part][rows], predicted[rows])[task.headline])

    def metric(model: torch.nn.Module, part: str) -> float:
        return round(headline(part, predictions(model, part)), 4)

    def build(raised: list[str]) -> Any:
        cfg = with_raised(config, raised, settings.high_bits)
        recipe = get_recipe(cfg.recipe.name)(cfg.recipe, cfg)
        built["calibrations"] += 1
        return run_stages(recipe, copy.deepcopy(fp32), ctx)[0]

    built: dict[str, Any] = {"calibrations": 0}

    def quantized(raised: list[str]) -> torch.nn.Module:
        """The starting plan with ``raised`` at high bits: calibrated for these sites, or (``switchable``) the one
        calibrated starting model with their quantizers switched off, which computes the same."""
        if not built.get("switch"):
            return build(raised).model
        if "start" not in built:
            built["start"] = build([])
            built["states"] = {name: q.state for name, q in built["start"].instrumented.activations().items()}
        off = set(raised)
        for name, q in built["start"].instrumented.activations().items():
            q.set_state("disabled" if name in off else built["states"][name])
        return built["start"].model

    identity = {"checkpoint": str(checkpoint), "config": config.config_hash(), **settings.evaluation_data()}
    store = Evaluations(folder / "evaluations.json", identity)
    reference = outputs(fp32, "probe")
    fp32_predicted = predictions(fp32, "search")
    fp32_search = round(headline("search", fp32_predicted), 4)
    draws = (bootstrap_draws(len(parts["search"]), settings.seed + 2) if settings.confidence is not None else [])
    fp32_resampled = [headline("search", fp32_predicted, rows) for rows in draws]
    say(f"FP32 {task.headline} {fp32_search:.2f} on the search part ({len(parts['search'])} {split} examples; "
        f"{len(parts['held_out'])} held out)")

    def error(raised: list[str]) -> float:
        key = "probe " + ",".join(raised)
        return store.get(key, lambda: float(np.mean((outputs(quantized(raised), "probe") - reference) ** 2)))

    def scored(raised: list[str], part: str = "search") -> float:
        return store.get(f"{part} " + ",".join(raised), lambda: metric(quantized(raised), part))

    def judged(raised: list[str]) -> tuple[float, float]:
        """The metric on the search part and the loss bound the decision reads (the point loss without confidence)."""
        predicted = np.asarray(store.get("search predictions " + ",".join(raised),
                                         lambda: predictions(quantized(raised), "search").tolist()))
        value = round(headline("search", predicted), 4)
        if settings.confidence is None:
            return value, settings.target.loss(fp32_search, value)
        resampled = [headline("search", predicted, rows) for rows in draws]
        return value, loss_bound(settings.target, fp32_resampled, resampled, settings.confidence)

    # candidates: the quantized sites of the starting plan, below high_bits
    plan = get_recipe(config.recipe.name)(config.recipe, config).plan(enumerate_sites(fp32))
    candidates = [s.name for s in plan.quantized() if s.kind in settings.kinds
                  and (settings.high_bits is None or plan.specs[s.name].bits < settings.high_bits)]
    if not candidates:
        raise QbertError(f"the plan of recipe {config.recipe.name} has no {' or '.join(settings.kinds)} site below "
                         f"{settings.raised} to raise", key="recipe")
    built["switch"] = switchable(config, settings, plan, candidates)
    base_error = error([])
    with reporter.bar("sensitivity", len(candidates)) as advance:
        sensitivity = {}
        for site in candidates:
            sensitivity[site] = base_error - error([site])
            advance(1, info=site)
    ranking = sorted(candidates, key=lambda s: (-sensitivity[s], candidates.index(s)))
    say(f"sensitivity: {len(candidates)} sites ranked on {len(probe)} examples; most sensitive: "
        + ", ".join(ranking[:3]))

    # the smallest prefix of the ranking within the target on the search part: doubling, then bisection
    trace: list[dict[str, Any]] = []

    def within(k: int) -> bool:
        value, bound = judged(ranking[:k])
        ok = bound <= settings.target.limit - settings.margin + 1e-9
        loss = settings.target.loss(fp32_search, value)
        trace.append({"sites": k, "metric": value, "loss": round(loss, 4), "bound": round(bound, 4), "within": ok})
        unit = "%" if settings.target.relative else ""
        bounded = (f", {settings.confidence:.0%} bound {bound:.2f}{unit}" if settings.confidence is not None else "")
        say(f"  {k:3d} sites at {settings.raised}: {task.headline} {value:.2f} on the search part, loss "
            f"{loss:.2f}{unit}{bounded} ({'within' if ok else 'outside'} {settings.target}"
            f"{f' with a margin of {settings.margin:g}' if settings.margin else ''})")
        return ok

    chosen = smallest_prefix(len(ranking), within)
    picked = ranking[:chosen] if chosen is not None else list(ranking)

    # the final score, on examples no decision saw
    held = {"fp32": metric(fp32, "held_out"), "start": scored([], "held_out"), "chosen": scored(picked, "held_out")}
    result = {
        "config": config.name, "config_hash": config.config_hash(), "model": config.model, "task": config.task,
        "recipe": config.recipe.name, "headline": task.headline, "split": split, **settings.data(),
        "checkpoint": str(checkpoint),
        "examples": {name: len(part) for name, part in {**parts, "probe": probe}.items()},
        "reached": chosen is not None, "chosen": picked,
        "search": {"fp32": fp32_search, "start": trace[0]["metric"],
                   "chosen": next((t["metric"] for t in reversed(trace) if t["sites"] == len(picked)), None)},
        "held_out": {**held, "loss": round(settings.target.loss(held["fp32"], held["chosen"]), 4),
                     "start_loss": round(settings.target.loss(held["fp32"], held["start"]), 4),
                     "within": settings.target.met(held["fp32"], held["chosen"])},
        "sensitivity": {"measure": "decrease of the mean squared output difference to FP32 on the probe examples "
                        "when the site alone is raised", "start_error": base_error,
                        "ranking": [{"site": s, "sensitivity": sensitivity[s]} for s in ranking]},
        "trace": trace,
        "evaluations": {"total": len(store.values), "now": store.spent, "reused": store.reused,
                        "sensitivity": len(candidates) + 1, "selection": len(trace), "held_out": 2,
                        "calibrations": built["calibrations"], "switched": built["switch"]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    chosen_config = with_raised(config, picked, settings.high_bits)
    write_config(folder / "chosen.yaml", {**chosen_config.resolved(), "name": f"{config.name}_searched"})
    result["folder"] = str(folder)
    atomic_write_json(folder / "search.json", result)
    return result
