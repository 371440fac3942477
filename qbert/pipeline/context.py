"""What the pipeline hands a method's stages: settings, tokenizer, device, and data on demand."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qbert.config import ExperimentConfig
from qbert.errors import QbertError
from qbert.progress import SILENT, Reporter

Features = list[dict[str, Any]]


@dataclass
class StageContext:
    """One seed's stage settings and data: the config (estimator, calibrate, finetune sections), the
    seed, the tokenizer, the device, and the tokenized training / evaluation features, loaded on
    first use (a method that needs no data never loads any)."""

    config: ExperimentConfig
    seed: int
    tokenizer: Any
    device: Any
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("qbert"))
    reporter: Reporter = SILENT
    load_train: Callable[[], Features] | None = None
    """Tokenized training features (calibration is drawn from them; QAT trains on them)."""
    load_eval: Callable[[], Features] | None = None
    """Tokenized features of the first evaluation split (methods that time inference read them)."""
    eval_split: str | None = None
    """The split ``load_eval`` reads."""
    question_answering: bool = False
    _cache: dict[str, Features] = field(default_factory=dict, repr=False)

    def train_features(self) -> Features:
        """The training features (loaded once); a clear error when none were given."""
        if "train" not in self._cache:
            if self.load_train is None:
                raise QbertError(f"recipe {self.config.recipe.name} needs calibration data: pass calibration= "
                                 "(a task name, texts or tokenized features)", key="calibration")
            self._cache["train"] = self.load_train()
        return self._cache["train"]

    def eval_features(self) -> Features | None:
        """The first evaluation split's features, or None when there is no evaluation data."""
        if self.load_eval is None:
            return None
        if "eval" not in self._cache:
            self._cache["eval"] = self.load_eval()
        return self._cache["eval"]

    # data services for the stages: recipes ask the context instead of importing the pipeline ------------------
    def calibration_batches(self, batches: int, batch_size: int) -> list[Features]:
        """``batches`` batches of ``batch_size`` distinct training features, drawn with the seed."""
        from qbert.pipeline.calibrate import calibration_batches

        return calibration_batches(self.train_features(), batches, batch_size, self.seed)

    def model_batches(self, batches: list[Features], with_targets: bool = False) -> list[dict[str, Any]]:
        """Feature batches padded to their longest sequence, as the model's keyword tensors on the device."""
        from qbert.pipeline.batching import model_inputs, pad_batch

        return [model_inputs(pad_batch(b, self.tokenizer.pad_token_id), self.device, with_targets) for b in batches]

    def calibration_pass(self, model: Any) -> Callable[..., dict[str, Any]]:
        """``run_pass(description="calibrate")``: the ``calibrate`` section's seeded batches through ``model``
        (padded to their longest sequence, or to ``finetune.max_seq_len`` with ``calibrate.padding:
        max_length``), without gradients; returns what ran."""
        from qbert.pipeline.calibrate import run_calibration

        section = self.config.calibrate
        batches = self.calibration_batches(section.batches, section.batch_size)
        pad_to = self.config.finetune.max_seq_len if section.padding == "max_length" else None

        def run_pass(description: str = "calibrate") -> dict[str, Any]:
            return run_calibration(model, batches, pad_token_id=self.tokenizer.pad_token_id, device=self.device,
                                   pad_to=pad_to, reporter=self.reporter, description=description)

        return run_pass

    def time_inference(self, model: Any) -> float | None:
        """Seconds ``model`` takes to predict the first evaluation split on the CPU (None: no evaluation data)."""
        import time

        import torch

        from qbert.pipeline.evaluate import predict

        features = self.eval_features()
        if not features:
            return None
        start = time.perf_counter()
        predict(model, features, question_answering=self.question_answering,
                batch_size=self.config.evaluate.batch_size, pad_token_id=self.tokenizer.pad_token_id,
                device=torch.device("cpu"))
        return time.perf_counter() - start
