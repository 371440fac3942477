"""Inference throughput of every int8 path a user would pick, side by side in one run, against FP32 eager.

MiniLM-L6 fine-tuned on MRPC (configs/mrpc_fp32.yaml seed 42, from qbert's checkpoint cache or trained
first) with each path's MRPC dev F1, and a BERT-base-shaped model (random weights: speed only), at
batch 1 and 32, sequence 128, all cores. Paths: FP32 eager; bf16 autocast + torch.compile; PyTorch
dynamic int8 (the tutorial's quantize_dynamic); torchao int8 dynamic activations + int8 weights under
torch.compile (when torchao imports); onnxruntime FP32 and dynamic int8 (quantize_dynamic); qbert's
integer W8A8, PEG and MP (eager and compiled: ``qbert.to_integer``); qbert's ONNX export of each on
onnxruntime. qbert's recipes use the settings of configs/mrpc_<recipe>.yaml, calibrated with seed 42.

Every model sees the same real MRPC dev inputs padded to the sequence length; compiled models compile
one static graph per batch size (``dynamic=False``, the same for every compiled path). Every path is
built first; then, per batch size, ``--rounds`` rounds time each path in turn (``--repeats`` passes
after two warm-up passes, their median), so a slow spell of the machine touches every path alike.
Throughput is sequences per second, the median over rounds; ``speedup`` is throughput over FP32
eager's in this run. Prints JSON (and writes it to ``--out``).
Usage: python bench/integer_inference.py [--models minilm,bert-base] [--batch-sizes 1,32] [--repeats 5]
       [--rounds 3] [--finetune-precision auto]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
QBERT_RECIPES = ("w8a8_ptq", "peg", "mp_ptq")


def padded_batches(features: list[dict[str, Any]], batch_size: int, seq_len: int, pad_id: int) -> list[dict]:
    """Features as ``[batch_size, seq_len]`` keyword tensors; the last batch is filled with copies of
    row 0 (their outputs are dropped), so every batch has one shape."""
    batches = []
    for start in range(0, len(features), batch_size):
        rows = features[start:start + batch_size]
        real = len(rows)
        rows = rows + [features[0]] * (batch_size - real)
        batch = {}
        for key, pad in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
            batch[key] = torch.tensor([list(r[key][:seq_len]) + [pad] * (seq_len - len(r[key][:seq_len]))
                                       for r in rows], dtype=torch.long)
        batches.append({"inputs": batch, "rows": real})
    return batches


def logits_of(out: Any) -> torch.Tensor:
    return (out["logits"] if isinstance(out, dict) else out.logits).float()


def throughput(forward: Callable[[dict], Any], inputs: dict, repeats: int) -> float:
    """Sequences per second: the median of ``repeats`` timed passes after two warm-up passes."""
    rows = inputs["input_ids"].shape[0]
    with torch.inference_mode():
        for _ in range(2):
            forward(inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward(inputs)
            times.append(time.perf_counter() - start)
    return rows / statistics.median(times)


def time_in_turns(forwards: dict[str, Callable[[dict], Any]], inputs: dict, rounds: int, repeats: int,
                  rows: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    """``rounds`` rounds of timing every path in turn (:func:`throughput`), so a slow spell of the machine
    touches every path alike: each path's throughput per round. A path that fails is dropped from
    ``forwards`` with its error in ``rows[path]``."""
    samples: dict[str, list[float]] = {path: [] for path in forwards}
    for _ in range(rounds):
        for path in list(samples):
            try:
                samples[path].append(throughput(forwards[path], inputs, repeats))
            except Exception as exc:
                rows[path]["error"] = failure(exc)
                del forwards[path], samples[path]
    return samples


def dev_f1(forward: Callable[[dict], Any], batches: list[dict], task: Any, examples: list, features: list) -> float:
    outputs = []
    with torch.inference_mode():
        for batch in batches:
            outputs.append(logits_of(forward(batch["inputs"]))[: batch["rows"]].numpy())
    return round(task.score(examples, features, np.concatenate(outputs)).metrics["f1"], 2)


def eager(model: torch.nn.Module) -> Callable[[dict], Any]:
    model.eval()
    return lambda inputs: model(**inputs)


def compiled(model: torch.nn.Module, bf16: bool = False) -> Callable[[dict], Any]:
    model.eval()
    fast = torch.compile(model, dynamic=False)

    def forward(inputs: dict) -> Any:
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fast(**inputs)
        return fast(**inputs)

    return forward


def onnx_runner(path: Path) -> Callable[[dict], Any]:
    from qbert.quant.onnx_export import OnnxModel

    runner = OnnxModel(path)
    return lambda inputs: runner(**inputs)


def recipe_settings(recipe: str) -> dict[str, Any]:
    from qbert.config import load_config

    config = load_config(ROOT / "configs" / f"mrpc_{recipe}.yaml")
    return {"recipe": config.recipe.model_dump(), "estimator": config.estimator.model_dump(),
            "calibrate": config.calibrate.model_dump()}


def paths_for(model: torch.nn.Module, tokenizer: Any, workdir: Path) -> dict[str, Callable[[], dict[str, Any]]]:
    """Each path as a builder returning ``{"forward": ..., "f1_reference": optional forward, "facts": ...}``."""
    import qbert

    def fp32_eager():
        return {"forward": eager(copy.deepcopy(model))}

    def bf16_compile():
        return {"forward": compiled(copy.deepcopy(model), bf16=True)}

    def torch_dynamic_int8():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        return {"forward": eager(int8)}

    def torchao_int8_compile():
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao = copy.deepcopy(model)
        quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        return {"forward": compiled(ao), "facts": {"torchao": torchao.__version__}}

    def onnx_fp32_file() -> Path:
        path = workdir / "fp32" / "model.onnx"
        if not path.is_file():
            qbert.export(qbert.quantize(copy.deepcopy(model), "fp32", tokenizer=tokenizer), "onnx", path.parent)
        return path

    def ort_fp32():
        return {"forward": onnx_runner(onnx_fp32_file())}

    def ort_dynamic_int8():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target = workdir / "fp32" / "model.int8.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(onnx_fp32_file()), str(target), weight_type=QuantType.QInt8)
        return {"forward": onnx_runner(target)}

    quantized: dict[tuple[str, str], Any] = {}

    def qbert_model(recipe: str, arithmetic: str) -> Any:
        """The recipe's model (calibrated with seed 42: every copy is the same), simulated or on integer GEMMs."""
        if (recipe, arithmetic) not in quantized:
            settings = recipe_settings(recipe)
            q = qbert.quantize(copy.deepcopy(model), settings["recipe"], calibration="mrpc", tokenizer=tokenizer,
                               estimator=settings["estimator"], calibrate=settings["calibrate"], seed=42)
            if arithmetic == "integer":
                q = qbert.to_integer(q)
            else:
                qbert.export(q, "onnx", workdir / recipe)
            quantized[recipe, arithmetic] = q
        return quantized[recipe, arithmetic]

    def qbert_integer(recipe: str, compile_it: bool):
        def build():
            q = qbert_model(recipe, "integer")
            gemms = q.report["gemms"]
            return {"forward": compiled(q.model) if compile_it else eager(q.model),
                    "f1_reference": eager(qbert_model(recipe, "simulated").model),
                    "facts": {"integer_gemms": len(gemms["integer"]), "float_gemms": len(gemms["float"])}}
        return build

    def qbert_onnx(recipe: str):
        def build():
            q = qbert_model(recipe, "simulated")
            return {"forward": onnx_runner(workdir / recipe / "model.onnx"), "f1_reference": eager(q.model)}
        return build

    builders = {"fp32_eager": fp32_eager, "bf16_compile": bf16_compile, "torch_dynamic_int8": torch_dynamic_int8,
                "torchao_int8_compile": torchao_int8_compile, "onnxruntime_fp32": ort_fp32,
                "onnxruntime_dynamic_int8": ort_dynamic_int8}
    for recipe in QBERT_RECIPES:
        builders[f"qbert_{recipe}_integer_eager"] = qbert_integer(recipe, False)
        builders[f"qbert_{recipe}_integer_compile"] = qbert_integer(recipe, True)
        builders[f"qbert_{recipe}_onnxruntime"] = qbert_onnx(recipe)
    return builders


def load(name: str, precision: str | None = None) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, description) for ``minilm`` (fine-tuned on MRPC; ``precision``: its
    ``finetune.precision`` instead of the config's) or ``bert-base`` (random)."""
    import qbert
    from qbert.models import load_finetuned, load_model, load_tokenizer, resolve_model

    if name == "minilm":
        overrides = ["seeds=[42]"] + ([f"finetune.precision={precision}"] if precision else [])
        with tempfile.TemporaryDirectory() as runs:
            result = qbert.run(ROOT / "configs" / "mrpc_fp32.yaml", overrides, runs_dir=runs)
            checkpoint = json.loads((result.seeds[0].folder / "metrics.json").read_text())["checkpoint"]
        return load_finetuned(checkpoint), load_tokenizer(resolve_model(checkpoint)), f"MiniLM-L6 MRPC ({checkpoint})"
    if name == "bert-base":
        source = resolve_model("bert-base-random")
        torch.manual_seed(0)
        return load_model(source, "classification", 2), load_tokenizer(source), "BERT-base shape, random weights"
    raise SystemExit(f"unknown model {name!r} (minilm, bert-base)")


def emit(results: dict[str, Any], out: str | None) -> None:
    """Print the results as JSON (and write them to ``out``)."""
    text = json.dumps(results, indent=2)
    if out:
        Path(out).write_text(text + "\n")
    print(text)


def failure(exc: Exception) -> str:
    if os.environ.get("QBERT_BENCH_DEBUG"):
        traceback.print_exc()
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per round (their median)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing every path in turn")
    parser.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: all cores)")
    parser.add_argument("--paths", default=None, help="comma-separated subset of the paths")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--finetune-precision", default=None,
                        help="MiniLM's MRPC fine-tune precision instead of the config's bf16 (auto: fp32 on a CPU "
                        "without native bf16, where bf16 trains ~20x slower)")
    args = parser.parse_args()
    os.environ.setdefault("QBERT_DATA_DIR", str(DEFAULT_DATA))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    # every compiled path x batch size is another graph of the same forward functions: keep them all
    # (past dynamo's default of 8 per function, later paths would silently run eager)
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 1024
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error in the row, never a silent eager run
    import onnxruntime

    from qbert.config import parse_config
    from qbert.tasks import get_task

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "seq_len": args.seq_len, "repeats": args.repeats,
                               "rounds": args.rounds,
                               "batch_sizes": sizes, "torch": torch.__version__,
                               "onnxruntime": onnxruntime.__version__, "models": {}}
    config = parse_config({"task": "mrpc", "finetune": {"epochs": 0, "max_seq_len": args.seq_len}})
    task = get_task("mrpc", config)
    for name in args.models.split(","):
        model, tokenizer, description = load(name, args.finetune_precision)
        examples = task.load("dev", config.data)
        features = task.encode_eval(tokenizer, examples, args.seq_len)
        pad = tokenizer.pad_token_id
        f1_batches = padded_batches(features, max(sizes), args.seq_len, pad) if name == "minilm" else []
        timing = {size: padded_batches(features[:size], size, args.seq_len, tokenizer.pad_token_id)[0]["inputs"]
                  for size in sizes}
        entry: dict[str, Any] = {"model": description, "paths": {}}
        with tempfile.TemporaryDirectory() as tmp:
            builders = paths_for(model, tokenizer, Path(tmp))
            chosen = args.paths.split(",") if args.paths else list(builders)
            forwards: dict[str, Callable[[dict], Any]] = {}
            for path in chosen:  # build every path (and score it on the dev set) first
                start = time.perf_counter()
                try:
                    built = builders[path]()
                    row: dict[str, Any] = dict(built.get("facts", {}))
                    if f1_batches:
                        row["f1"] = dev_f1(built["forward"], f1_batches, task, examples, features)
                        if "f1_reference" in built:
                            row["f1_simulated"] = dev_f1(built["f1_reference"], f1_batches, task, examples, features)
                    forwards[path] = built["forward"]
                except Exception as exc:  # a path that cannot run here is reported, not fatal
                    row = {"error": failure(exc)}
                row["seconds_to_build"] = round(time.perf_counter() - start, 1)
                entry["paths"][path] = row
                print(json.dumps({name: {path: row}}), flush=True)
                built = None
            for size in sizes:  # then time them in turns
                samples = time_in_turns(forwards, timing[size], args.rounds, args.repeats, entry["paths"])
                for path, values in samples.items():
                    entry["paths"][path].setdefault("sequences_per_second", {})[str(size)] = round(
                        statistics.median(values), 2)
                    entry["paths"][path].setdefault("rounds", {})[str(size)] = [round(v, 2) for v in values]
                print(json.dumps({name: {"batch_size": size, "sequences_per_second": {
                    p: entry["paths"][p]["sequences_per_second"][str(size)] for p in samples}}}), flush=True)
            forwards.clear()
        base = entry["paths"].get("fp32_eager", {}).get("sequences_per_second", {})
        for row in entry["paths"].values():
            if "sequences_per_second" in row and base:
                row["speedup_vs_fp32_eager"] = {s: round(v / base[s], 2)
                                                for s, v in row["sequences_per_second"].items()}
        results["models"][name] = entry
    emit(results, args.out)


if __name__ == "__main__":
    main()
