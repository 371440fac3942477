"""Quantization-aware training: Q8BERT (Zafrir et al. 2019) and the per-tensor QAT of Bondarenko et
al. 2021 (sec. 4-5, Tables 6, 7, 10-12), in the ordinary fine-tune loop with the quantizers in place.

- ``q8bert``: from the pre-trained model. Symmetric 8-bit grids ``[-127, 127]``: weights of every
  fully connected layer and of the three embedding tables, ranged from the weight's current max at every step; symmetric
  8-bit *inputs* of every fully connected layer, ranged by an exponential moving average of
  ``max |x|`` (decay ``ema_decay``) that is frozen at evaluation. Softmax, LayerNorm, GELU, the
  attention matmuls and the GEMM outputs stay in floating point (no requantization). Optional
  quantization delay (``start_step``). After training, every bias becomes an int32 multiple of
  ``s_input * s_weight`` (what integer inference adds to the int32 accumulator). The
  straight-through gradient is the identity, also where an input is clipped (NLP Architect's).
- ``w8a8_qat``: from the fine-tuned FP32 checkpoint. Every site quantized per tensor (symmetric
  weights, asymmetric activations), ranges initialised by the W8A8 PTQ calibration (the
  ``estimator`` and ``calibrate`` sections), then scale and zero point learned with the network
  (LSQ-style straight-through gradients). Training settings default to Table 10's best per task.
- ``w4a8_qat`` / ``w4a32_qat``: the same with 4-bit weights whose ranges start from the MSE
  estimator, 8-bit (or floating-point) activations, optionally 2-bit token embeddings
  (``embedding_bits: 2``); Table 11's settings.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator
from qbert.recipes.base import Quantized, Training
from qbert.recipes.ptq import LowBitWeights, Rule, SitePlanRecipe, StaticQuantParams, calibrate_ranges

from qbert.errors import QbertError
from qbert.quant.spec import QuantSpec
from qbert.schema import Section

# Bondarenko et al. Appendix B.3-B.4: the best configuration per task (bold in the paper) of their
# search space. Where the extracted table does not show which epoch count was bold (W8A8 STS-B,
# W4A8 STS-B and RTE) the cheaper 3 is used. Table 11 has no dropout column: the model's default.
TABLE_10: dict[str, dict[str, Any]] = {
    "cola": {"lr": 2e-5, "batch_size": 16, "epochs": 3, "attention_dropout": 0.0},
    "sst2": {"lr": 2e-5, "batch_size": 32, "epochs": 3, "attention_dropout": 0.1},
    "mrpc": {"lr": 1e-5, "batch_size": 8, "epochs": 3, "attention_dropout": 0.1},
    "stsb": {"lr": 4e-5, "batch_size": 16, "epochs": 3, "attention_dropout": 0.1},
    "qqp": {"lr": 4e-5, "batch_size": 32, "epochs": 3, "attention_dropout": 0.1},
    "mnli": {"lr": 2e-5, "batch_size": 16, "epochs": 3, "attention_dropout": 0.1},
    "qnli": {"lr": 3e-5, "batch_size": 32, "epochs": 3, "attention_dropout": 0.0},
    "rte": {"lr": 3e-5, "batch_size": 8, "epochs": 6, "attention_dropout": 0.1},
}
TABLE_11: dict[str, dict[str, Any]] = {
    "cola": {"lr": 2e-5, "batch_size": 16, "epochs": 3},
    "sst2": {"lr": 3e-5, "batch_size": 32, "epochs": 3},
    "mrpc": {"lr": 2e-5, "batch_size": 8, "epochs": 3},
    "stsb": {"lr": 6e-5, "batch_size": 32, "epochs": 3},
    "qqp": {"lr": 5.5e-5, "batch_size": 32, "epochs": 3},
    "mnli": {"lr": 4e-5, "batch_size": 16, "epochs": 3},
    "qnli": {"lr": 2e-5, "batch_size": 16, "epochs": 3},
    "rte": {"lr": 5e-5, "batch_size": 8, "epochs": 3},
}
if TYPE_CHECKING:
    from qbert.config import FinetuneConfig

TRAINING_KEYS = ("lr", "batch_size", "epochs", "attention_dropout")


class QuantNoise(Section):
    """Quant-Noise (Fan et al. 2020): at each training step only a random share of the weights (and activations) is
    fake-quantized, the rest trains in floating point, as dropout; evaluation quantizes everything."""

    p: float = Field(0.5, gt=0, le=1, description="Share of the blocks quantized at each training step; 1 = plain "
                     "QAT. 0.5: Fan et al.'s scalar (int8) setting (fairseq --quant-noise-scalar 0.5).")
    block_size: int = Field(1, ge=1, description="Consecutive entries along the last dimension (a weight's input "
                            "features, an activation's hidden units) drawn together; 1 = each entry, as Fan et al.'s "
                            "scalar quantization; 8 = their product-quantization block.")
    activations: bool = Field(True, description="Also the activation quantizers (Fan et al.'s scalar Quant-Noise "
                              "quantizes a share of both); false = weights only.")


class QatParams(StaticQuantParams):
    """Training settings of the QAT stage (null: the paper's best for the task, else ``finetune``)."""

    lr: float | None = Field(None, gt=0, description="Peak learning rate of QAT; null = the paper's table, "
                             "else finetune.lr.")
    batch_size: int | None = Field(None, gt=0, description="QAT batch size; null = the paper's table, else "
                                   "finetune.batch_size.")
    epochs: float | None = Field(None, gt=0, description="QAT epochs; null = the paper's table, else finetune.epochs.")
    attention_dropout: float | None = Field(
        None, ge=0, lt=1, description="Self-attention dropout during QAT; null = the paper's table, else the model's."
    )
    range_lr: float | None = Field(
        None, gt=0, description="Learning rate of learned quantization ranges (no weight decay); null = lr."
    )
    precision: Literal["fp32", "bf16"] | None = Field(
        None, description="Training precision of the QAT loop; null = finetune.precision. bf16 autocast casts each "
        "fake-quantized output back to bf16 (off the grid by up to ~1 step at 8 bits); fp32 keeps it on the grid, "
        "as the reference code trains.",
    )
    quant_noise: QuantNoise | None = Field(
        None, description="Quant-Noise (Fan et al. 2020): quantize a random share p of the blocks at each training "
        "step; a number is p (`quant_noise: 0.5`); null = every site quantized at every step.")

    @field_validator("quant_noise", mode="before")
    @classmethod
    def _share_alone(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"p": value}
        return value


def set_attention_dropout(model: Any, p: float) -> None:
    """Self-attention probability dropout of every layer (BERT's ``attention_probs_dropout_prob``)."""
    import torch

    model.config.attention_probs_dropout_prob = p
    for module in model.modules():
        if type(module).__name__.endswith("SelfAttention") and isinstance(getattr(module, "dropout", None),
                                                                          torch.nn.Dropout):
            module.dropout.p = p


def quantizer_ranges(q: Quantized) -> dict[str, list[float]]:
    """Every quantizer's representable range ``[lo, hi]`` (5 decimals), by site."""
    return {
        name: [round(float(lo.min()), 5), round(float(hi.max()), 5)]
        for name, quantizer in q.quantizers.items()
        for lo, hi in [quantizer.quant_range()]
    }


class QatRecipe(SitePlanRecipe):
    """Base of the QAT recipes: a site plan, quantizers in before training, frozen after it."""

    trains = True
    needs_calibration = True  # training sequences: the QAT loop, and the ranges' initialisation
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    defaults_source: ClassVar[str] = ""

    @classmethod
    def check(cls, config: Any) -> None:
        super().check(config)
        table = cls.defaults.get(config.task, {})
        if config.skips_finetuning and config.recipe.epochs is None and "epochs" not in table:
            raise ValueError("recipe.epochs: the model is already fine-tuned (finetune.epochs 0), so the QAT loop "
                             "needs its own epochs; set recipe.epochs (e.g. 3)")

    def quantized(self, model: Any, ctx: Any, arithmetic: Any = "float", **fields: Any) -> Quantized:
        """The recipe's value, with Quant-Noise on its quantizers when the parameters ask for it."""
        noise: QuantNoise | None = self.params.quant_noise  # type: ignore[attr-defined]
        instrumented = fields.get("instrumented")
        if noise is not None and instrumented is not None:
            chosen = instrumented.quantizers if noise.activations else instrumented.weights()
            for quantizer in chosen.values():
                quantizer.noise = (noise.p, noise.block_size)
            fields["report"] = {**fields.get("report", {}), "quant_noise": {**noise.model_dump(),
                                                                            "quantizers": len(chosen)}}
        return super().quantized(model, ctx, arithmetic, **fields)

    def training_settings(self) -> dict[str, Any]:
        """The resolved QAT settings and where each came from."""
        params: QatParams = self.params  # type: ignore[assignment]
        table = self.defaults.get(self.config.task, {})
        settings: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key in TRAINING_KEYS:
            value = getattr(params, key)
            if value is not None:
                settings[key], sources[key] = value, "recipe"
            elif key in table:
                settings[key], sources[key] = table[key], self.defaults_source
            elif key != "attention_dropout":
                settings[key], sources[key] = getattr(self.config.finetune, key), "finetune"
        return {**settings, "sources": sources}

    def training_config(self, finetune: FinetuneConfig) -> FinetuneConfig:
        """The fine-tune section with the QAT settings (lr, batch size, epochs) in place."""
        settings = self.training_settings()
        update = {k: settings[k] for k in ("lr", "batch_size", "epochs") if k in settings}
        if self.params.precision is not None:  # type: ignore[attr-defined]
            update["precision"] = self.params.precision  # type: ignore[attr-defined]
        return finetune.model_copy(update=update)

    def training(self, q: Quantized, finetune: FinetuneConfig) -> Training:
        params: QatParams = self.params  # type: ignore[assignment]
        groups = []
        if params.range_lr is not None:
            ranges = [p for quantizer in q.quantizers.values() for p in quantizer.parameters() if p.requires_grad]
            if ranges:
                groups = [{"params": ranges, "lr": params.range_lr, "weight_decay": 0.0}]
        return Training(self.training_config(finetune), groups)

    def set_dropout(self, model: Any) -> None:
        """The QAT attention dropout (Table 10), when the settings name one."""
        dropout = self.training_settings().get("attention_dropout")
        if dropout is not None:
            set_attention_dropout(model, dropout)

class LearnedRangeQat(QatRecipe):
    """PTQ-initialised ranges, then learned (Bondarenko et al.): prepare puts the quantizers in, calibrate sets
    the ranges as static PTQ does and makes them trainable, training learns them, convert freezes them."""

    def prepare(self, model, ctx):
        """Quantizers on every planned site (weight ranges from the weights), the QAT attention dropout."""
        self.set_dropout(model)
        return self.instrumented(model, ctx)

    def calibrate(self, q, ctx):
        """The PTQ initialisation: activation ranges calibrated and frozen, then every range a trainable
        parameter."""
        from qbert.quant.static import freeze_activations

        inst = q.instrumented
        initialisation = {key: value for key, value in q.report.items() if key != "quant_noise"}
        initialisation.update(calibrate_ranges(inst, ctx))
        initialisation.update(freeze_activations(inst))
        initial = quantizer_ranges(q)
        inst.set_state("learn")
        report = {"training": self.training_settings(), "initialisation": initialisation,
                  "ranges": {name: {"initial": r} for name, r in initial.items()}}
        if "quant_noise" in q.report:
            report["quant_noise"] = q.report["quant_noise"]
        return replace(q, report=report)

    def convert(self, q, ctx):
        from qbert.quant.size import instrumented_size

        q.instrumented.set_state("fixed")
        learned = quantizer_ranges(q)
        report = {key: value for key, value in q.report.items() if key != "ranges"}
        report["size"] = instrumented_size(q.instrumented)
        report["ranges"] = {name: {**q.report["ranges"][name], "learned": learned[name]} for name in learned}
        return replace(q, report=report)


class W8A8QatParams(QatParams):
    """W8A8 QAT with learned ranges."""

    name: Literal["w8a8_qat"] = "w8a8_qat"


class W8A8Qat(LearnedRangeQat):
    """8-bit per-tensor weights and activations everywhere, ranges from PTQ then learned."""

    name = "w8a8_qat"
    Params = W8A8QatParams
    source = "Bondarenko et al. 2021, sec. 4-5, Table 6 (W8A8 QAT), Table 10 (settings)"
    defaults = TABLE_10
    defaults_source = "Bondarenko Table 10"


class LowBitQatParams(QatParams):
    """Low-bit weights (MSE-initialised), optional 8-bit activations and low-bit token embeddings."""

    weight_bits: int = Field(4, ge=2, le=8, description="Bits of every weight (embedding tables included).")
    embedding_bits: int | None = Field(
        None, ge=2, le=8, description="Bits of the word (token) embedding table; null = weight_bits."
    )


class W4A8QatParams(LowBitQatParams):
    name: Literal["w4a8_qat"] = "w4a8_qat"
    activation_bits: int | None = Field(8, ge=2, le=16, description="Activation bits; null = floating point.")


class W4A32QatParams(LowBitQatParams):
    name: Literal["w4a32_qat"] = "w4a32_qat"
    activation_bits: int | None = Field(None, ge=2, le=16, description="Activation bits; null = floating point.")


class W4A8Qat(LowBitWeights, LearnedRangeQat):
    """4-bit weights from the MSE estimator, 8-bit activations, then QAT with learned ranges."""

    name = "w4a8_qat"
    Params = W4A8QatParams
    source = "Bondarenko et al. 2021, Table 7 and 12 (W4A8 QAT, 2-bit embd.), Table 11 (settings)"
    defaults = TABLE_11
    defaults_source = "Bondarenko Table 11"


class W4A32Qat(W4A8Qat):
    """4-bit weights (MSE-initialised), activations in floating point, QAT."""

    name = "w4a32_qat"
    Params = W4A32QatParams
    source = "Bondarenko et al. 2021, Table 7 and 12 (W4A32 QAT), Table 11 (settings)"


# Q8BERT ------------------------------------------------------------------------------------------
class Q8BertParams(QatParams):
    """Q8BERT: EMA decay of the activation thresholds and the quantization delay."""

    name: Literal["q8bert"] = "q8bert"
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="Decay of the EMA of max|x| per step.")
    start_step: int = Field(0, ge=0, description="Quantization delay: training steps run in FP32 before "
                            "fake quantization (and the EMA) start.")
    ste: Literal["identity", "clipped"] = Field(
        "identity", description="Straight-through gradient: identity passes it everywhere (NLP Architect's "
        "Q8BERT); clipped zeroes it outside the range, as the Bondarenko recipes.")


class Q8BertSites:
    """Mixin: Q8BERT's sites and grids. Symmetric narrow 8-bit grids ``[-127, 127]``; weights of every fully
    connected layer and embedding table ranged by their max |w|; the inputs of every fully connected layer (an
    EMA of max |x| while training); every other activation in floating point."""

    def weight_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, symmetric=True, narrow=True, ste=self._ste(), estimator="minmax")

    def activation_spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, symmetric=True, narrow=True, ste=self._ste(), estimator="running_absmax")

    def _ste(self) -> Literal["identity", "clipped"]:
        return getattr(self.params, "ste", "identity")  # type: ignore[attr-defined]

    default_placement = "linear"  # the inputs of every fully connected layer

    def recipe_rules(self, sites: list[Any]) -> list[Rule]:
        if any(s.name == "pooler.output" for s in sites) and not any(s.name == "head.output.weight" for s in sites):
            return [("pooler.output", None, "recipe")]  # the pooled output feeds nothing quantized
        return []


class Q8Bert(Q8BertSites, QatRecipe):
    """Q8BERT W8A8: symmetric 8-bit FC weights, FC inputs and embeddings; EMA activation ranges."""

    name = "q8bert"
    Params = Q8BertParams
    source = "Zafrir et al. 2019 (Q8BERT); Bondarenko et al. 2021 Table 6 (Q8BERT W8A8 QAT row)"
    starts_from = "pretrained"
    reference_code = None  # NLP Architect's method, not the Bondarenko et al. code

    def prepare(self, model, ctx):
        from qbert.quant.sites import enumerate_sites, instrument
        from qbert.quant.static import quantizer_factory

        cfg = self.training_config(self.config.finetune)
        steps = math.ceil(cfg.epochs * math.ceil(len(ctx.train_features()) / cfg.batch_size))
        if self.params.start_step >= steps:
            raise QbertError(f"start_step {self.params.start_step} is not below the {steps} training steps, so "
                             "quantization would never start; lower it", key="recipe.start_step")
        self.set_dropout(model)
        estimators = self.config.estimator.model_copy(update={"momentum": self.params.ema_decay})
        inst = instrument(model, self.plan(enumerate_sites(model)), quantizer_factory(estimators))
        inst.set_state("estimate_train" if self.params.start_step == 0 else "disabled")
        return self.quantized(model, ctx, "simulated", instrumented=inst,
                         report={"training": self.training_settings(), "ema_decay": self.params.ema_decay,
                                 "start_step": self.params.start_step})

    def training(self, q, finetune):
        start = self.params.start_step

        def before_step(step: int) -> None:
            if step == start:
                q.instrumented.set_state("estimate_train")

        return Training(self.training_config(finetune), before_step=before_step)

    def convert(self, q, ctx):
        from qbert.quant.integer import quantize_biases
        from qbert.quant.sites import linear_inputs
        from qbert.quant.size import instrumented_size
        from qbert.quant.static import range_weights

        inst = q.instrumented
        unobserved = [n for n, quantizer in inst.activations().items() if not quantizer.estimator.observed]
        if unobserved:
            raise QbertError(f"quantization never started ({unobserved[0]} saw no training step); lower "
                             "start_step below the number of training steps", key="recipe.start_step")
        range_weights(inst)  # the trained weights' own max, as at every training step
        inst.set_state("fixed", kind="activation")
        bias = quantize_biases(inst, linear_inputs(q.model))
        return q.but(report={"bias_int32": bias, "ranges": quantizer_ranges(q), "size": instrumented_size(inst)})
