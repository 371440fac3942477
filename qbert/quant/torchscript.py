"""A TorchScript export (``export.formats: [torchscript]``) called like the HuggingFace model it came from."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch


class TorchScriptModel(torch.nn.Module):
    """``model.torchscript.pt`` behind the keyword interface the evaluation loop uses (inputs by name in,
    an object with ``logits`` / ``start_logits`` / ``end_logits`` out)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        extra = {"qbert.json": ""}
        self.path = Path(path)
        self.module = torch.jit.load(str(path), _extra_files=extra)
        info = json.loads(extra["qbert.json"] or "{}")
        self.input_names: list[str] = info.get("inputs", ["input_ids", "token_type_ids", "attention_mask"])
        self.info = info

    def forward(self, **inputs: torch.Tensor) -> SimpleNamespace:
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise ValueError(f"{self.path}: the model needs inputs {missing}")
        return SimpleNamespace(**self.module(*(inputs[name] for name in self.input_names)))
