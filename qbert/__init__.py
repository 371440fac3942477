"""qbert: BERT quantization experiments on GLUE and SQuAD (fine-tune, calibrate, quantize, evaluate, export).

The Python API (:mod:`qbert.api`) is importable from here and loads torch only when called::

    import qbert
    q = qbert.quantize(model, "w8a8_ptq", calibration="mrpc", tokenizer=tokenizer)
    qbert.evaluate(q, "mrpc"); qbert.export(q, "integer", "out/"); qbert.run("configs/mrpc_peg.yaml")
"""

import os
from importlib import metadata
from typing import Any

# Offline by default: the hub is contacted only when the user opts in with QBERT_ONLINE=1 (or sets
# HF_HUB_OFFLINE=0 themselves). This must happen before huggingface_hub is imported anywhere.
if os.environ.get("QBERT_ONLINE", "").lower() in ("1", "true", "yes"):
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
else:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    __version__ = metadata.version("qbert")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

_API = ("quantize", "prepare", "convert", "to_integer", "evaluate", "export", "load", "run", "search")
__all__ = [*_API, "Quantized", "__version__"]


def __getattr__(name: str) -> Any:
    # lazy: `import qbert` (and the CLI's --help) must not import torch
    if name in _API:
        from qbert import api

        return getattr(api, name)
    if name == "Quantized":
        from qbert.recipes.base import Quantized

        return Quantized
    raise AttributeError(f"module 'qbert' has no attribute {name!r}")
