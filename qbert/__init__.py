"""qbert: BERT quantization experiments on GLUE and SQuAD (fine-tune, calibrate, quantize, evaluate, export)."""

import os

# Offline by default: the hub is contacted only when the user opts in with QBERT_ONLINE=1 (or sets
# HF_HUB_OFFLINE=0 themselves). This must happen before huggingface_hub is imported anywhere.
if os.environ.get("QBERT_ONLINE", "").lower() in ("1", "true", "yes"):
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
else:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
