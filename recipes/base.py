"""The method contract: typed parameters, the stages a method implements, and the value it returns.

A recipe is stateless: it holds its parameters and the experiment config, and nothing else. The
pipeline owns the order of the stages, written once in :func:`qbert.pipeline.stages.run_stages`, and passes
one value, :class:`Quantized`, from each stage to the next::

    q = recipe.prepare(model, ctx)        # quantizers in
    q = recipe.calibrate(q, ctx)          # starting ranges from calibration data (QAT: ready to train)
    (train q.model)                       # only when recipe.trains, with recipe.training(q, ...)
    q = recipe.convert(q, ctx)            # ranges frozen, weights decoded or moved to integer kernels
    evaluate(q), export(q, format)        # what was evaluated is q.arithmetic

A recipe declares only the stages it needs (the defaults here pass the value on) and composes their bodies from
the library below it (:mod:`qbert.quant`); data reaches it through ``ctx`` (the stage context).

This module is torch-free (the registry, config validation and ``qbert validate`` import it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import field_serializer, field_validator

from qbert.schema import Section

if TYPE_CHECKING:
    from qbert.config import ExperimentConfig, FinetuneConfig
    from qbert.pipeline.context import StageContext

Arithmetic = Literal["float", "simulated", "integer", "decoded"]
"""What an evaluation of a :class:`Quantized` model computes: ``float`` (no quantization),
``simulated`` (fake quantization in floating point), ``integer`` (integer kernels), ``decoded``
(low-bit codes decoded back to floating-point weights, as GOBO)."""


class RecipeParams(Section):
    """Base of every recipe's typed parameters; ``name`` selects the recipe."""

    name: str = "fp32"


class SiteRuleParams(RecipeParams):
    """Parameters with ordered per-site rules: ``sites: {glob: changes or null}``.

    Subclasses declare ``sites`` with their own change type. The resolved config stores the rules as
    a list of one-key mappings, so their order (a later rule wins) survives saving and hashing.
    """

    sites: dict[str, Any] = {}

    @field_validator("sites", mode="before")
    @classmethod
    def _ordered_pairs(cls, value: Any) -> Any:
        if isinstance(value, list):
            merged: dict[str, Any] = {}
            for item in value:
                if not isinstance(item, dict) or len(item) != 1:
                    raise ValueError("each rule is one `pattern: changes` mapping")
                merged.update(item)
            return merged
        return value

    @field_serializer("sites")
    def _as_list(self, sites: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        if not sites:
            return {}  # keeps the hash of configs without rules stable
        return [{pattern: None if o is None else o.model_dump(exclude_none=True)} for pattern, o in sites.items()]


@dataclass
class Quantized:
    """What a method hands from stage to stage, and finally to evaluation and export.

    ``model`` is what runs; ``arithmetic`` says what evaluating it measures (so ``simulated`` in the
    results is a fact about the evaluated model, not a flag of the recipe); ``instrumented`` holds
    the site plan, every quantizer with its state (scale, zero point, permutation) and the weights
    behind the weight quantizers; ``codes`` the low-bit codes of methods that store them (GOBO);
    ``report`` the method's numbers (sizes, ranges, timings).
    """

    model: Any
    recipe: str
    arithmetic: Arithmetic = "float"
    instrumented: Any = None
    """:class:`qbert.quant.sites.Instrumented` of fake-quant methods (None otherwise)."""
    codes: dict[str, Any] = field(default_factory=dict)
    """Low-bit codes by parameter name (GOBO: :class:`qbert.quant.gobo.GoboCode`)."""
    report: dict[str, Any] = field(default_factory=dict)
    device: Any = None
    """Where the model must be evaluated (integer CPU kernels: cpu); None = where it is."""
    tokenizer: Any = None
    """Saved beside every export when present."""
    config: Any = None
    """The :class:`qbert.config.ExperimentConfig` it was made with (recipe parameters, estimator, calibrate)."""
    reference: Any = None
    """The floating-point model a later stage compares against (AdaRound's reconstruction targets),
    dropped once used."""

    @property
    def simulated(self) -> bool:
        """Whether evaluating the model measures fake-quantized (simulated) arithmetic."""
        return self.arithmetic == "simulated"

    @property
    def quantizers(self) -> dict[str, Any]:
        """Every quantizer by site name (empty for methods without quantizers)."""
        return dict(self.instrumented.quantizers) if self.instrumented is not None else {}

    @property
    def plan(self) -> Any:
        """The resolved site plan (None for methods without static sites)."""
        return self.instrumented.plan if self.instrumented is not None else None

    def but(self, **changes: Any) -> Quantized:
        """A copy with ``changes`` (stages return new values instead of mutating what they got)."""
        if "report" in changes:
            changes["report"] = {**self.report, **changes["report"]}
        return replace(self, **changes)


@dataclass
class Training:
    """How a method that trains (QAT) wants the fine-tune loop run."""

    config: Any
    """The :class:`qbert.config.FinetuneConfig` of the QAT loop."""
    parameter_groups: list[dict[str, Any]] = field(default_factory=list)
    """Optimiser groups with their own settings (e.g. quantization ranges' learning rate)."""
    before_step: Callable[[int], None] | None = None
    """Called before every training step (e.g. to end a quantization delay)."""


class Recipe:
    """A quantization method: class attributes declare what it is, stage methods what it does.

    Override only the stages the method needs; each takes the :class:`Quantized` value of the stage
    before and returns the next one. Capability flags tell the pipeline what to run:
    ``trains`` (QAT: prepare, then fine-tune with quantizers in place), ``needs_calibration``
    (training sequences are drawn for ``calibrate``), ``starts_from``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[RecipeParams]]
    source: ClassVar[str]
    """The paper (and table) the recipe follows."""
    trains: ClassVar[bool] = False
    """QAT: the model trains with quantizers in place (after ``prepare``)."""
    starts_from: ClassVar[Literal["pretrained", "finetuned"]] = "finetuned"
    """QAT only: ``pretrained`` (quantizers in from the first fine-tuning step, as Q8BERT) or
    ``finetuned`` (the fine-tuned FP32 checkpoint, then QAT, as Bondarenko et al.)."""
    needs_calibration: ClassVar[bool] = False
    """Whether ``prepare`` or ``calibrate`` reads training sequences (``ctx.calibration_features``)."""
    export_formats: ClassVar[tuple[str, ...]] = ()
    """The ``export.formats`` this recipe's :class:`Quantized` value can be written as."""
    fp32_evaluation: ClassVar[str | None] = None
    """Why this recipe must be evaluated in fp32 (None: bf16 evaluation is allowed)."""
    reference_code: ClassVar[str | None] = None
    """The paper's code whose calibration and training choices ``reference:`` can apply (``qbert.reference``)."""

    def __init__(self, params: RecipeParams, config: ExperimentConfig):
        self.params = params
        self.config = config

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """Reject impossible combinations of this recipe with the rest of the config (ValueError)."""
        if cls.fp32_evaluation and config.evaluate.precision != "fp32":
            raise ValueError(f"evaluate.precision: {cls.fp32_evaluation}; set evaluate.precision: fp32")

    # stages ------------------------------------------------------------------------------------
    def plan(self, sites: list[Any]) -> Any:
        """The resolved site plan for ``sites`` (``qbert inspect sites``); None: no static sites."""
        return None

    def prepare(self, model: Any, ctx: StageContext) -> Quantized:
        """Put the method's quantizers into ``model``. Default: nothing."""
        return self.quantized(model, ctx)

    def quantized(self, model: Any, ctx: StageContext, arithmetic: Arithmetic = "float", **fields: Any) -> Quantized:
        """A :class:`Quantized` value of this recipe (name, config, tokenizer filled in)."""
        return Quantized(model, self.name, arithmetic, tokenizer=ctx.tokenizer, config=self.config, **fields)

    def training(self, q: Quantized, finetune: FinetuneConfig) -> Training:
        """QAT (``trains``): the settings of the fine-tune loop run on ``q.model``."""
        return Training(finetune)

    def calibrate(self, q: Quantized, ctx: StageContext) -> Quantized:
        """Estimate starting ranges from calibration data (``ctx.calibration_pass(model)``); default: none."""
        return q

    def convert(self, q: Quantized, ctx: StageContext) -> Quantized:
        """The model that is evaluated and exported: ranges frozen, codes decoded, integer kernels; default: as is."""
        return q
