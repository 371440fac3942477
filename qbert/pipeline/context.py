"""What the pipeline hands a recipe at each stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qbert.config import ExperimentConfig
from qbert.progress import SILENT, Reporter
from qbert.tasks import Task


@dataclass
class StageContext:
    """One seed's run: config, task, tokenizer, device, folder, and the training features."""

    config: ExperimentConfig
    seed: int
    task: Task
    tokenizer: Any
    device: torch.device
    folder: Path
    log: logging.Logger
    train_features: list[dict[str, Any]] = field(default_factory=list)
    reporter: Reporter = SILENT
