"""The export stage: writes the artefacts named in ``export.formats``.

No format is implemented yet; the quantization issues add ONNX QDQ, packed low-bit safetensors and
PyTorch dynamic int8 here. The registry is the single list the config validates against.
"""

from __future__ import annotations

from collections.abc import Callable

EXPORT_FORMATS: dict[str, Callable[..., dict]] = {}
