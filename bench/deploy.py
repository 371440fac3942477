"""Accuracy x deployed speed: every int8 path a user would deploy MiniLM-L6 with, side by side in one run.

MiniLM-L6 fine-tuned on MRPC by qbert (configs/mrpc_fp32.yaml seed 42, from qbert's checkpoint cache or
trained first; fp32 on CPUs without native bf16). Per path: MRPC dev F1 (408 pairs, padded to the
sequence length), agreement with the FP32 model's predictions, throughput at each batch size, file size.

Paths: PyTorch FP32 eager and dynamic int8 (``quantize_dynamic``); onnxruntime FP32 (qbert's export of the
FP32 model, fused by onnxruntime's transformer optimizer) and onnxruntime dynamic int8 on that fused graph;
onnxruntime static QDQ with its own defaults (``quantize_static`` after its
``quant_pre_process``, on the unfused graph as its docs start: per-channel weights, MinMax, 64 MRPC training
pairs to calibrate); OpenVINO FP32 and OpenVINO int8 through NNCF (``model_type=TRANSFORMER``,
overflow fix on: CPUs without VNNI; the same 64 pairs) when ``pip install 'qbert[bench]'`` is there; and
qbert's ONNX files for W8A8, PEG and MP post-training quantization under each placement (``all``, ``gemm``,
``linear``), with the settings of configs/mrpc_<recipe>.yaml and calibration seed 42, each run as qbert's
runner runs it (the session options the file records). The anchors run with their runtimes' defaults.

Every path is built and scored first; then per batch size ``--rounds`` rounds time each path in turn
(``--repeats`` passes after two warm-up passes, their median), so a slow spell of the machine touches every
path alike. ``speedup`` is throughput over PyTorch FP32 eager's in this run; ``vs_fastest_anchor`` over the
fastest int8 anchor's. Prints JSON lines while it works and the whole result at the end (``--out`` too).

Usage: python bench/deploy.py [--batch-sizes 1,32] [--rounds 3] [--repeats 5] [--paths a,b] [--out f.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from integer_inference import (  # noqa: E402  (bench/ scripts share their helpers)
    DEFAULT_DATA,
    emit,
    failure,
    load,
    logits_of,
    padded_batches,
    recipe_settings,
    time_in_turns,
)

RECIPES = ("w8a8_ptq", "peg", "mp_ptq")
PLACEMENTS = ("all", "gemm", "linear")
ANCHORS_INT8 = ("torch_dynamic_int8", "onnxruntime_dynamic_int8", "onnxruntime_static_qdq",
                "onnxruntime_static_qdq_matmul", "openvino_int8_nncf")
CALIBRATION_PAIRS = 64


def ort_session(path: Path, threads: int, config: dict[str, str] | None = None) -> Callable[[dict], Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def forward(inputs: dict) -> Any:
        return {"logits": torch.from_numpy(session.run(["logits"], {k: inputs[k].numpy() for k in names})[0])}

    return forward


def openvino_forward(model: Any, threads: int) -> Callable[[dict], Any]:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads})
    names = [i.get_any_name() for i in compiled.inputs]
    named = any("logits" in o.get_names() for o in compiled.outputs)
    output = compiled.output("logits") if named else compiled.output(0)

    def forward(inputs: dict) -> Any:
        result = compiled({k: inputs[k].numpy() for k in names})
        return {"logits": torch.from_numpy(np.asarray(result[output]))}

    return forward


def calibration_inputs(tokenizer: Any, seq_len: int, inputs: tuple[str, ...]) -> list[dict[str, np.ndarray]]:
    """The first 64 MRPC training pairs, one per batch, padded to ``seq_len``."""
    from qbert.config import parse_config
    from qbert.tasks import get_task

    config = parse_config({"task": "mrpc", "finetune": {"epochs": 0, "max_seq_len": seq_len}})
    task = get_task("mrpc", config)
    features = task.encode_eval(tokenizer, task.load("train", config.data)[:CALIBRATION_PAIRS], seq_len)
    batches = padded_batches(features, 1, seq_len, tokenizer.pad_token_id)
    return [{k: v.numpy() for k, v in b["inputs"].items() if k in inputs} for b in batches]


def paths_for(model: torch.nn.Module, tokenizer: Any, workdir: Path, threads: int,
              seq_len: int) -> dict[str, Callable[[], dict[str, Any]]]:
    """Each path as a builder returning ``{"forward": ..., "file": optional path, "facts": ...}``."""
    import qbert

    inputs = ("input_ids", "attention_mask", "token_type_ids")

    def fp32_onnx() -> Path:
        path = workdir / "fp32" / "model.onnx"
        if not path.is_file():
            qbert.export(qbert.quantize(copy.deepcopy(model), "fp32", tokenizer=tokenizer), "onnx", path.parent)
        return path

    def fp32_onnx_unfused() -> Path:
        """The FP32 graph before fusions: what onnxruntime's static quantizer is documented to start from
        (after its own pre-processing)."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from qbert.pipeline.export import export_onnx

        path = workdir / "fp32-unfused" / "model.onnx"
        if not path.is_file():
            path.parent.mkdir(parents=True)
            export_onnx(qbert.quantize(copy.deepcopy(model), "fp32", tokenizer=tokenizer), path.parent,
                        graph="deployable")
            # its symbolic shape inference fails on the exporter's dynamic shapes; ONNX's shape inference is used.
            # It writes a scratch file into the working directory: run it in the temporary folder
            with contextlib.chdir(path.parent):
                quant_pre_process(str(path), str(path.with_name("preprocessed.onnx")), skip_symbolic_shape=True)
        return path.with_name("preprocessed.onnx")

    def calibration() -> list[dict[str, np.ndarray]]:
        return calibration_inputs(tokenizer, seq_len, inputs)

    def fp32_eager():
        copy_ = copy.deepcopy(model).eval()
        return {"forward": lambda b: copy_(**b)}

    def torch_dynamic_int8():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        return {"forward": lambda b: int8(**b)}

    def onnxruntime_fp32():
        return {"forward": ort_session(fp32_onnx(), threads), "file": fp32_onnx()}

    def onnxruntime_dynamic_int8():
        from onnxruntime.quantization import quantize_dynamic

        target = workdir / "ort_dynamic.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(fp32_onnx()), str(target))
        return {"forward": ort_session(target, threads), "file": target}

    def onnxruntime_static_qdq(op_types: list[str] | None = None, name: str = "ort_static"):
        from onnxruntime.quantization import CalibrationDataReader, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter(calibration())

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.items, None)

        target = workdir / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(fp32_onnx_unfused()), str(target), Reader(), per_channel=True,
                            op_types_to_quantize=op_types)
        return {"forward": ort_session(target, threads), "file": target}

    def openvino_fp32():
        import openvino as ov

        return {"forward": openvino_forward(ov.Core().read_model(str(fp32_onnx())), threads)}

    def openvino_int8_nncf():
        import nncf
        import openvino as ov

        ov_model = ov.Core().read_model(str(fp32_onnx()))
        data = nncf.Dataset(calibration())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = nncf.quantize(ov_model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=CALIBRATION_PAIRS,
                                 advanced_parameters=nncf.AdvancedQuantizationParameters(
                                     overflow_fix=nncf.OverflowFix.ENABLE))
        target = workdir / "openvino_int8.xml"
        ov.save_model(int8, str(target))
        return {"forward": openvino_forward(int8, threads), "file": target, "extra_file": target.with_suffix(".bin"),
                "facts": {"nncf": nncf.__version__, "openvino": ov.__version__}}

    def qbert_onnx(recipe: str, placement: str):
        def build():
            from qbert.quant.onnx_export import session_config

            settings = recipe_settings(recipe)
            q = qbert.quantize(copy.deepcopy(model), {**settings["recipe"], "placement": placement},
                               calibration="mrpc", tokenizer=tokenizer, estimator=settings["estimator"],
                               calibrate=settings["calibrate"], seed=42)
            folder = workdir / f"{recipe}-{placement}"
            facts = qbert.export(q, "onnx", folder)
            path = Path(facts["path"])
            simulated = q.model.eval()
            return {"forward": ort_session(path, threads, session_config(path)), "file": path,
                    "simulated": lambda b: simulated(**b),
                    "facts": {"fused": facts.get("fused", {}), "integer_gemms": facts.get("integer_gemms"),
                              "session_config": session_config(path)}}
        return build

    builders: dict[str, Callable[[], dict[str, Any]]] = {
        "fp32_eager": fp32_eager, "torch_dynamic_int8": torch_dynamic_int8, "onnxruntime_fp32": onnxruntime_fp32,
        "onnxruntime_dynamic_int8": onnxruntime_dynamic_int8, "onnxruntime_static_qdq": onnxruntime_static_qdq,
        "onnxruntime_static_qdq_matmul": lambda: onnxruntime_static_qdq(["MatMul"], "ort_static_matmul"),
        "openvino_fp32": openvino_fp32, "openvino_int8_nncf": openvino_int8_nncf}
    for recipe in RECIPES:
        for placement in PLACEMENTS:
            builders[f"qbert_{recipe}_{placement}"] = qbert_onnx(recipe, placement)
    return builders


def predictions(forward: Callable[[dict], Any], batches: list[dict]) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for batch in batches:
            out.append(logits_of(forward(batch["inputs"]))[: batch["rows"]].numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per round (their median)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing every path in turn")
    parser.add_argument("--threads", type=int, default=None, help="torch, onnxruntime and OpenVINO threads "
                        "(default: all cores)")
    parser.add_argument("--paths", default=None, help="comma-separated subset of the paths (fp32_eager is always in)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    os.environ.setdefault("QBERT_DATA_DIR", str(DEFAULT_DATA))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    import onnxruntime

    from qbert.config import parse_config
    from qbert.pipeline.finetune import cpu_flags
    from qbert.tasks import get_task

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    flags = cpu_flags() or frozenset()
    results: dict[str, Any] = {
        "threads": threads, "seq_len": args.seq_len, "repeats": args.repeats, "rounds": args.rounds,
        "batch_sizes": sizes, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "cpu_int8_dot": sorted(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) or "none (AVX2 only: no VNNI/AMX)",
        "paths": {}}
    config = parse_config({"task": "mrpc", "finetune": {"epochs": 0, "max_seq_len": args.seq_len}})
    task = get_task("mrpc", config)
    model, tokenizer, description = load("minilm", "auto")
    results["model"] = description
    examples = task.load("dev", config.data)
    features = task.encode_eval(tokenizer, examples, args.seq_len)
    eval_batches = padded_batches(features, max(sizes), args.seq_len, tokenizer.pad_token_id)
    timing = {size: padded_batches(features[:size], size, args.seq_len, tokenizer.pad_token_id)[0]["inputs"]
              for size in sizes}

    def f1(logits: np.ndarray) -> float:
        return round(task.score(examples, features, logits).metrics["f1"], 2)

    with tempfile.TemporaryDirectory() as tmp:
        builders = paths_for(model, tokenizer, Path(tmp), threads, args.seq_len)
        chosen = ["fp32_eager"] + [p for p in (args.paths.split(",") if args.paths else builders) if p != "fp32_eager"]
        forwards: dict[str, Callable[[dict], Any]] = {}
        reference = None
        for path in chosen:  # build every path and score it on the dev set first
            start = time.perf_counter()
            try:
                built = builders[path]()
                row: dict[str, Any] = dict(built.get("facts", {}))
                logits = predictions(built["forward"], eval_batches)
                if reference is None:
                    reference = logits.argmax(1)
                row["f1"] = f1(logits)
                row["agreement_with_fp32"] = round(float((logits.argmax(1) == reference).mean()), 4)
                if "simulated" in built:
                    simulated = predictions(built["simulated"], eval_batches)
                    row["f1_simulated"] = f1(simulated)
                    row["agreement_with_simulated"] = round(float((logits.argmax(1) == simulated.argmax(1)).mean()), 4)
                if "file" in built:
                    row["file_mb"] = round(sum(Path(f).stat().st_size for f in (built["file"], built.get("extra_file"))
                                               if f) / 1e6, 2)
                forwards[path] = built["forward"]
            except Exception as exc:  # a path that cannot run here (a missing extra) is reported, not fatal
                row = {"error": failure(exc)}
            row["seconds_to_build"] = round(time.perf_counter() - start, 1)
            results["paths"][path] = row
            print(json.dumps({path: row}), flush=True)
            built = None
        for size in sizes:  # then time them in turns
            samples = time_in_turns(forwards, timing[size], args.rounds, args.repeats, results["paths"])
            for path, values in samples.items():
                row = results["paths"][path]
                row.setdefault("sequences_per_second", {})[str(size)] = round(statistics.median(values), 2)
                row.setdefault("rounds", {})[str(size)] = [round(v, 2) for v in values]
            print(json.dumps({"batch_size": size, "sequences_per_second": {
                p: results["paths"][p]["sequences_per_second"][str(size)] for p in samples}}), flush=True)
        forwards.clear()
    base = results["paths"].get("fp32_eager", {}).get("sequences_per_second", {})
    anchors = [results["paths"][a]["sequences_per_second"] for a in ANCHORS_INT8
               if "sequences_per_second" in results["paths"].get(a, {})]
    fastest = {s: max(a[s] for a in anchors) for s in base} if anchors else {}
    for row in results["paths"].values():
        speed = row.get("sequences_per_second")
        if speed and base:
            row["speedup"] = {s: round(v / base[s], 2) for s, v in speed.items()}
        if speed and fastest:
            row["vs_fastest_anchor"] = {s: round(v / fastest[s], 2) for s, v in speed.items()}
    emit(results, args.out)


if __name__ == "__main__":
    main()
