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
