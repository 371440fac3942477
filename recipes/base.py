"""What a recipe is: typed parameters plus hooks the fixed pipeline calls at each stage."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import field_serializer, field_validator

from qbert.config import RecipeParams

if TYPE_CHECKING:
    import torch

    from qbert.config import ExperimentConfig, FinetuneConfig
    from qbert.pipeline.context import StageContext


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


class Recipe:
    """A quantization method. Subclasses set the class attributes and override the hooks they need.

    The pipeline is fine-tune -> calibrate -> quantize -> evaluate -> export; a recipe never runs
    its own training loop. Post-training recipes start from the cached FP32 checkpoint
    (``trains_with_quantizers = False``); QAT recipes put their quantizers in before fine-tuning.
    """

    name: ClassVar[str]
    Params: ClassVar[type[RecipeParams]]
    source: ClassVar[str]
    """The paper (and table) the recipe follows."""
    simulated: ClassVar[bool] = False
    """Whether evaluation numbers come from fake-quantized (simulated) arithmetic."""
    trains_with_quantizers: ClassVar[bool] = False
    """True for QAT: the model trains with quantizers in place (after ``prepare_for_training``)."""
    starts_from: ClassVar[str] = "finetuned"
    """QAT only: ``pretrained`` (quantizers in from the first fine-tuning step, as Q8BERT) or
    ``finetuned`` (the cached FP32 checkpoint, then QAT, as Bondarenko et al.)."""
    needs_calibration: ClassVar[bool] = False
    export_formats: ClassVar[tuple[str, ...]] = ()
    """The ``export.formats`` this recipe can write."""
    fp32_evaluation: ClassVar[str | None] = None
    """Why this recipe must be evaluated in fp32 (None: bf16 evaluation is allowed)."""

    def __init__(self, params: RecipeParams, config: ExperimentConfig):
        self.params = params
        self.config = config

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """Reject impossible combinations of this recipe with the rest of the config (ValueError)."""
        if cls.fp32_evaluation and config.evaluate.precision != "fp32":
            raise ValueError(f"evaluate.precision: {cls.fp32_evaluation}; set evaluate.precision: fp32")

    def prepare_for_training(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        """Called before fine-tuning when ``trains_with_quantizers``; returns the model to train."""
        return model

    def training_config(self, finetune: FinetuneConfig) -> FinetuneConfig:
        """QAT: the training settings (default: the ``finetune`` section as is)."""
        return finetune

    def extra_parameter_groups(self) -> list[dict[str, Any]]:
        """QAT: optimiser groups with their own settings (e.g. quantization ranges' learning rate)."""
        return []

    def before_step(self, step: int) -> None:
        """QAT: called before every training step (e.g. to end a quantization delay)."""

    def quantize(self, model: torch.nn.Module, ctx: StageContext) -> torch.nn.Module:
        """Turn the fine-tuned model into the model that is evaluated and exported."""
        return model

    def site_plan(self, sites: list[Any]) -> Any:
        """The resolved site plan for ``sites`` (``qbert inspect sites``); None: no static sites."""
        return None

    def evaluation_device(self, device: torch.device) -> torch.device:
        """Where the quantized model is evaluated (real int8 CPU kernels override this)."""
        return device

    def report(self) -> dict[str, Any]:
        """Recipe-specific numbers recorded with the metrics (sizes, outlier counts, timings)."""
        return {}
