"""The export stage: writes a :class:`~qbert.recipes.base.Quantized` value in one of ``EXPORT_FORMATS``.

An exporter takes the value the method returned (never the recipe) and a folder, writes its artefact
atomically, checks it against the evaluated model, and returns what it wrote (``path`` absolute; the
pipeline records it relative to the seed folder). ``EXPORT_FORMATS`` is the registry the config
validates against; it imports nothing heavy, so ``qbert validate`` stays fast. Which recipe can write
which format is the recipe's ``export_formats``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qbert.errors import QbertError

log = logging.getLogger("qbert")


def export_packed(q: Any, folder: Path, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """The packed safetensors file (``qbert.quant.packing``) plus the tokenizer, with its bit ledger;
    the file is read back and every parameter compared bit for bit with the evaluated model."""
    import numpy as np

    from qbert.quant.packing import read_packed, write_packed

    if not q.codes:
        raise QbertError(f"format 'packed' stores low-bit codes and recipe {q.recipe} produced none "
                         "(packed is written by gobo)", key="export.formats")
    path = folder / "model.safetensors"
    ledger = write_packed(path, q.model, q.codes)
    if q.tokenizer is not None:
        q.tokenizer.save_pretrained(folder)
    stored = read_packed(path).tensors
    mismatched = [
        name for name, param in q.model.named_parameters()
        if not np.array_equal(stored[name], param.detach().cpu().numpy())
    ]
    if mismatched:
        raise RuntimeError(f"{path}: decoded tensors differ from the evaluated model: {', '.join(mismatched[:5])}")
    log.info("packed export: %s, %.2f MB, %.2fx smaller than FP32", path, ledger.file_bytes / 1e6,
             ledger.compression)
    return {"path": str(path), "bit_exact": True, **ledger.as_dict()}


def export_integer(q: Any, folder: Path, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """The integer file (``qbert.quant.integer``: bit-packed weight codes, int32 biases where the method
    made them, activation grids) plus the tokenizer; read back, de-quantized and compared bit for bit
    with the weights and biases the evaluated model used."""
    import numpy as np
    import torch

    from qbert.quant.integer import read_integer, write_integer
    from qbert.quant.sites import weight_modules

    inst = q.instrumented
    if inst is None:
        raise QbertError(f"format 'integer' stores uniform quantizers' codes and recipe {q.recipe} has none",
                         key="export.formats")
    model = q.model
    path = folder / "model.safetensors"
    info = write_integer(path, inst, recipe=q.recipe)
    if q.tokenizer is not None:
        q.tokenizer.save_pretrained(folder)
    params, _ = read_integer(path)
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        used = {n.replace(".parametrizations.weight.original", ".weight"): p for n, p in model.named_parameters()}
        for site, module in weight_modules(model).items():
            if site in inst.weight_tensors:
                used[names[id(inst.weight_tensors[site])].replace(".parametrizations.weight.original", ".weight")] = (
                    module.weight)
    mismatched = [n for n, v in params.items() if not np.array_equal(v, used[n].detach().cpu().numpy())]
    if mismatched:
        raise RuntimeError(f"{path}: de-quantized tensors differ from the evaluated model: {', '.join(mismatched[:5])}")
    fp32_bytes = 4 * sum(p.numel() for n, p in used.items() if n in params)
    log.info("integer export: %s, %.2f MB", path, info["bytes"] / 1e6)
    return {"path": str(path), "bit_exact": True, "file_bytes": info["bytes"],
            "compression": round(fp32_bytes / info["bytes"], 3), "entries": info["entries"]}


def evaluated_weights(model: Any) -> dict[str, Any]:
    """Every parameter of ``model`` as the evaluated model used it, by its plain name: quantized weights
    on their grid (the parametrization's output), GOBO's decoded weights, the rest as they are;
    quantizer parameters left out."""
    import torch
    from torch.nn.utils import parametrize

    from qbert.quant.quantizer import Quantizer

    skip = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    weights: dict[str, Any] = {}
    with torch.no_grad(), parametrize.cached():
        for name, module in model.named_modules():
            if isinstance(module, Quantizer):
                continue
            prefix = f"{name}." if name else ""
            for pname, param in module.named_parameters(recurse=False):
                if id(param) not in skip:
                    weights[prefix + pname] = param.detach()
            if parametrize.is_parametrized(module):
                for pname in module.parametrizations:
                    weights[prefix + pname] = getattr(module, pname).detach()
    return {k: v for k, v in weights.items() if ".parametrizations." not in k}


def quantizer_record(q: Any) -> list[dict[str, Any]]:
    """Every quantizer of ``q``: site, kind, grid, scale, zero point, permutation, state (JSON-ready)."""
    rows = []
    for site, quantizer in q.quantizers.items():
        spec = quantizer.spec
        rows.append({
            "site": site, "kind": "weight" if site.endswith(".weight") else "activation", "bits": spec.bits,
            "symmetric": spec.symmetric, "narrow": spec.narrow, "granularity": spec.granularity,
            "groups": quantizer.groups, "qmin": quantizer.qmin, "qmax": quantizer.qmax, "state": quantizer.state,
            "scale": quantizer.scale.detach().cpu().reshape(-1).tolist(),
            "zero_point": quantizer.zero_point.detach().cpu().reshape(-1).tolist(),
            "permutation": (quantizer.permutation.cpu().tolist()
                            if quantizer.permutation is not None and quantizer.groups > 1 else None),
        })
    return rows


def export_hf(q: Any, folder: Path, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``save_pretrained`` folder any transformers user can load: the weights as evaluated (on their
    grids, or GOBO-decoded), the tokenizer, ``quantizers.json`` (every quantizer's grid; activation
    quantization is not part of a plain transformers model) and a model card. Reloaded with
    ``from_pretrained`` and compared bit for bit with the evaluated weights."""
    import copy

    import numpy as np

    from qbert.files import apply_umask
    from qbert.runs import atomic_write_json, atomic_write_text

    if q.arithmetic == "integer" and q.instrumented is None:
        raise QbertError(f"format 'hf' needs float weights and recipe {q.recipe} runs int8 modules",
                         key="export.formats")
    weights = evaluated_weights(q.model)
    config = copy.deepcopy(q.model.config)
    config._attn_implementation = None  # qbert's instrumented attention is not part of the saved model
    fresh = type(q.model)._from_config(config)
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k not in weights]:
        raise RuntimeError(f"{folder}: the evaluated weights do not fit {type(q.model).__name__}: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    fresh.save_pretrained(folder)
    if q.tokenizer is not None:
        q.tokenizer.save_pretrained(folder)
    apply_umask(folder)
    activations = [r for r in quantizer_record(q) if r["kind"] == "activation"]
    atomic_write_json(folder / "quantizers.json", {"recipe": q.recipe, "arithmetic": q.arithmetic,
                                                   "quantizers": quantizer_record(q)})
    atomic_write_text(folder / "README.md", _model_card(q, card or {}, bool(activations)))
    reloaded = type(q.model).from_pretrained(folder)
    mismatched = [name for name, value in reloaded.state_dict().items()
                  if name in weights and not np.array_equal(value.cpu().numpy(), weights[name].cpu().numpy())]
    if mismatched:
        raise RuntimeError(f"{folder}: reloaded weights differ from the evaluated model: {', '.join(mismatched[:5])}")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    log.info("hf export: %s, %.2f MB", folder, size / 1e6)
    return {"path": str(folder / "config.json"), "bit_exact": True, "folder_bytes": size,
            "activation_quantizers": len(activations),
            "reproduces_evaluation": not activations}


def _model_card(q: Any, card: dict[str, Any], activations: bool) -> str:
    config = q.config
    recipe = config.recipe.model_dump(mode="json") if config is not None else {"name": q.recipe}
    lines = [
        "---", "library_name: transformers", "tags: [bert, quantization, qbert]", "---", "",
        f"# {card.get('name', q.recipe)}: {q.recipe} ({q.arithmetic})", "",
        f"Quantized with qbert's recipe `{q.recipe}`"
        + (f" on task `{config.task}`" if config is not None else "") + ".", "",
        f"- recipe parameters: `{json.dumps(recipe)}`",
    ]
    for key in ("task", "seed", "metrics", "integer_metrics", "model", "config_hash", "command"):
        value = card.get(key)
        if value is not None:
            lines.append(f"- {key.replace('_', ' ')}: `{value if isinstance(value, str) else json.dumps(value)}`")
    lines += ["", "The weights are stored as the evaluated model used them (on their quantization grids, or "
              "decoded from their codebooks); they load with `AutoModel*.from_pretrained`."]
    if activations:
        lines.append("Activation quantization is not part of a plain transformers model: its grids are in "
                     "`quantizers.json`, so this folder alone computes weight-only quantized arithmetic.")
    else:
        lines.append("No activation is quantized: this folder computes exactly what was evaluated.")
    return "\n".join(lines) + "\n"


def export_onnx(q: Any, folder: Path, card: dict[str, Any] | None = None, graph: str = "fused") -> dict[str, Any]:
    """``model.onnx`` (QuantizeLinear / DequantizeLinear at the method's sites, int8 GEMMs laid out as
    integer runtimes fuse them, deployable and fused: :mod:`qbert.quant.onnx_export`; ``graph``: see
    :func:`~qbert.quant.onnx_export.export_onnx_model`) plus the tokenizer; run once in onnxruntime on a
    fixed batch and compared with the evaluated (simulated) model."""
    import torch

    from qbert.quant.integer_model import float_gemms, integer_gemms
    from qbert.quant.onnx_export import OnnxModel, export_onnx_model

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch.onnx's exporter translates with it)
    except ImportError as exc:
        raise QbertError(f"format 'onnx' needs onnx and onnxruntime ({exc.name} is missing): "
                         "pip install 'qbert[onnx]'", key="export.formats") from None
    if q.arithmetic == "integer" and q.instrumented is None:
        raise QbertError(f"format 'onnx' needs a float or fake-quantized model and recipe {q.recipe} runs "
                         "PyTorch int8 modules", key="export.formats")
    model = q.model.cpu().eval()
    sample = _sample_inputs(q, model)
    inst = q.instrumented
    with torch.no_grad():
        reference = dict(model(**sample).items())
    applied = inst is not None and not any("integer_gemm" in m._modules for m in model.modules())
    gemms = integer_gemms(inst) if inst is not None else None
    try:
        metadata = {"qbert.recipe": q.recipe, "qbert.arithmetic": q.arithmetic}
        if card:
            metadata.update({f"qbert.{k}": str(card[k]) for k in ("task", "seed", "config_hash") if k in card})
        facts = export_onnx_model(model, folder / "model.onnx", sample, metadata, graph=graph)
    finally:
        if applied:
            float_gemms(inst)
    if q.tokenizer is not None:
        q.tokenizer.save_pretrained(folder)
    runner = OnnxModel(folder / "model.onnx")
    outputs = runner(**sample)
    diff = max(float((getattr(outputs, k) - v.float()).abs().max()) for k, v in reference.items() if v is not None)
    if diff != diff:
        raise RuntimeError(f"{folder / 'model.onnx'}: onnxruntime returned NaN on a fixed batch")
    size = (folder / "model.onnx").stat().st_size
    log.info("onnx export: %s, %.2f MB, max |output difference| on a fixed batch %.4g", folder / "model.onnx",
             size / 1e6, diff)
    return {"path": str(folder / "model.onnx"), "file_bytes": size, "runtime": runner.runtime, **facts,
            # GEMMs onnxruntime can fuse into int8 ones (a 16-bit input's QDQ feeds a float MatMul there)
            "integer_gemms": len(gemms["integer"]) - len(gemms["two_int8_gemms"]) if gemms else 0,
            "fixed_batch_max_abs_output_diff": round(diff, 6)}


def export_torchscript(q: Any, folder: Path, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """``model.torchscript.pt`` (as the PyTorch tutorial serialises its dynamic int8 BERT) plus the tokenizer:
    a traced module that ``torch.jit.load`` runs without qbert or transformers, taking the inputs named in
    its ``qbert.json`` extra file positionally and returning a dict of outputs. Reloaded and compared with
    the evaluated model on a batch of another shape than the traced one.

    TorchScript because it is what serialises PyTorch's dynamic int8 modules in torch 2.13:
    ``torch.export`` cannot flatten their packed weights, and a state dict needs qbert to rebuild the model."""
    import io
    import warnings

    import torch

    from qbert.runs import atomic_write_bytes

    model = q.model.cpu().eval()
    sample = _sample_inputs(q, model)
    names = list(sample)
    with torch.no_grad():
        outputs = [k for k, v in model(**sample).items() if v is not None]

    class Positional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.model(**dict(zip(names, inputs, strict=True)))
            return {k: out[k] for k in outputs}

    extra = {"inputs": names, "outputs": outputs, "recipe": q.recipe, "arithmetic": q.arithmetic,
             **{k: card[k] for k in ("task", "seed", "config_hash") if card and k in card}}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Positional().eval(), tuple(sample.values()), strict=False)
        torch.jit.save(traced, buffer, _extra_files={"qbert.json": json.dumps(extra)})
    path = folder / "model.torchscript.pt"
    atomic_write_bytes(path, buffer.getvalue())
    if q.tokenizer is not None:
        q.tokenizer.save_pretrained(folder)
    check = {k: v[:, :-3] for k, v in sample.items()}  # 3 tokens shorter than the traced batch
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        reloaded = torch.jit.load(str(path))(*check.values())
        expected = model(**check)
    diff = max(float((reloaded[k] - expected[k]).abs().max()) for k in outputs)
    if diff != 0.0:
        raise RuntimeError(f"{path}: the reloaded module differs from the evaluated model by {diff:.3g}")
    log.info("torchscript export: %s, %.2f MB", path, path.stat().st_size / 1e6)
    return {"path": str(path), "file_bytes": path.stat().st_size, "inputs": names, "outputs": outputs,
            "reload_exact": True}


def _sample_inputs(q: Any, model: Any) -> dict[str, Any]:
    """Two rows of different lengths (the export's dynamic axes need at least two of each)."""
    import torch

    from qbert.architectures import for_model_type

    inputs = for_model_type(model.config.model_type).inputs
    if q.tokenizer is not None:
        encoded = q.tokenizer(["qbert exports this model to ONNX.", "A second, longer sentence: the batch and "
                               "sequence axes stay dynamic."], padding=True, return_tensors="pt")
        return {k: v for k, v in encoded.items() if k in inputs}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    sample = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {k: v for k, v in sample.items() if k in inputs}


EXPORT_FORMATS: dict[str, Callable[[Any, Path, dict[str, Any] | None], dict[str, Any]]] = {
    "packed": export_packed,
    "integer": export_integer,
    "hf": export_hf,
    "onnx": export_onnx,
    "torchscript": export_torchscript,
}
"""Export formats by name: ``exporter(quantized, folder, card) -> facts about what was written`` (``card``:
facts for formats that write a model card; the others ignore it)."""


def export(q: Any, fmt: str, folder: str | Path, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``q`` as ``fmt`` into ``folder`` (created); returns what was written. ``card``: facts for the
    formats that write a model card (task, seed, metrics, command)."""
    if fmt not in EXPORT_FORMATS:
        raise QbertError(f"unknown export format {fmt!r} (available: {', '.join(EXPORT_FORMATS)})", key="format")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return EXPORT_FORMATS[fmt](q, folder, card)


def card_facts(config: Any, seed: int, metrics: dict[str, float], seed_folder: Path,
               integer_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """What a model card says about the run that made the model (and the command that reruns it)."""
    return {"name": config.name, "task": config.task, "seed": seed, "metrics": metrics,
            "integer_metrics": integer_metrics, "model": config.model, "config_hash": config.config_hash(),
            "command": f"qbert run {seed_folder / 'config.yaml'}"}


def export_seed(q: Any, formats: list[str], seed_folder: Path, card: dict[str, Any],
                root: Path | None = None) -> dict[str, dict[str, Any]]:
    """Write ``formats`` into ``root/<format>`` (default ``<seed folder>/export``); what was written by
    format, paths relative to the seed folder when inside it (as ``metrics.json`` records them)."""
    root = root if root is not None else seed_folder / "export"
    written = {}
    for fmt in formats:
        facts = export(q, fmt, root / fmt, card=card)
        path = Path(facts["path"])
        written[fmt] = {**facts, "path": str(path.relative_to(seed_folder)) if path.is_relative_to(seed_folder)
                        else str(path)}
    return written
