"""onnxruntime's fused integer GEMM with int8 weights (U8S8) against uint8 weights (U8U8, qbert's ONNX export),
side by side in one run: the largest error against exact integer arithmetic, and the time.

One QDQ MatMul as qbert writes it (a per-tensor uint8 ``Q -> DQ`` of the input, ``DequantizeLinear`` of the
weight codes, per-row weight scales), which onnxruntime fuses into ``MatMulIntegerToFloat``, at BERT-base's
FFN shape (``--rows`` x 768 x 3072) and MiniLM's (x 384 x 1536). The input is GELU-like (one-sided, so its
zero point sits at the bottom of the grid and most codes are large), the weights a normal sample with
symmetric 8-bit codes in [-127, 127]. The same codes go into both files: int8 with zero point 0, or
``codes + 128`` as uint8 with zero point 128. "exact" is the float64 product of the de-quantized grids;
an error above float32 rounding is saturation (onnxruntime's U8S8 kernel sums pairs of products in 16-bit
lanes on x86 CPUs without VNNI). Times: the median of ``--repeats`` runs after two warm-up runs, for
``--rounds`` rounds that alternate the formats. Prints JSON (the CPU's flags that decide included).
Usage: python bench/onnx_gemm_formats.py [--rows 4096] [--threads 2] [--repeats 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def gemm_model(path: Path, codes: np.ndarray, w_scale: np.ndarray, x_scale: float, x_zero: int,
               unsigned: bool) -> None:
    """A QDQ MatMul ``y = DQ(Q(x)) @ DQ(W)^T`` with the weight codes ``[N, K]`` stored as int8 or uint8 + 128."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    stored = (codes.astype(np.int16) + 128).astype(np.uint8) if unsigned else codes.astype(np.int8)
    zero = np.full(w_scale.shape, 128 if unsigned else 0, dtype=np.uint8 if unsigned else np.int8)
    inits = [
        numpy_helper.from_array(stored.T.copy(), "w_codes"),  # [K, N]: MatMul's B
        numpy_helper.from_array(w_scale.astype(np.float32), "w_scale"),
        numpy_helper.from_array(zero, "w_zero"),
        numpy_helper.from_array(np.array(x_scale, dtype=np.float32), "x_scale"),
        numpy_helper.from_array(np.array(x_zero, dtype=np.uint8), "x_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_codes", "w_scale", "w_zero"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    k, n = codes.shape[1], codes.shape[0]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fused_ops(path: Path) -> list[str]:
    import onnx

    return sorted({n.op_type for n in onnx.load(str(path.with_suffix(".optimized.onnx"))).graph.node})


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((line for line in text.splitlines() if line.startswith("flags")), "flags:")
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return [flag for flag in line.split(":", 1)[1].split() if flag in wanted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    shapes = {"minilm_ffn": (384, 1536), "bert_base_ffn": (768, 3072)}
    out: dict = {"onnxruntime": ort.__version__, "cpu_flags": cpu_flags(), "rows": args.rows,
                 "threads": args.threads, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (k, n) in shapes.items():
            pre = rng.standard_normal((args.rows, k)).astype(np.float32) * 3
            x = (0.5 * pre * (1 + np.tanh(0.8 * pre))).astype(np.float32)  # GELU-like: one-sided
            x_scale = float(x.max() - x.min()) / 255
            x_zero = int(np.clip(round(-x.min() / x_scale), 0, 255))
            weight = rng.standard_normal((n, k)).astype(np.float32) * 0.05
            w_scale = np.abs(weight).max(axis=1) / 127
            codes = np.clip(np.round(weight / w_scale[:, None]), -127, 127).astype(np.int64)
            xq = np.clip(np.round(x / x_scale) + x_zero, 0, 255)
            exact = ((xq - x_zero) * x_scale) @ (codes * w_scale[:, None]).T  # float64: the grids' product
            sessions, row = {}, {}
            for fmt, unsigned in (("u8s8", False), ("u8u8", True)):
                path = Path(tmp) / f"{name}_{fmt}.onnx"
                gemm_model(path, codes, w_scale, x_scale, x_zero, unsigned)
                sessions[fmt] = session(path, args.threads)
                got = sessions[fmt].run(None, {"x": x})[0].astype(np.float64)
                error = np.abs(got - exact)
                row[fmt] = {"fused": fused_ops(path), "max_abs_error": float(error.max()),
                            "outputs_off_by_over_1e-3_of_max": int((error > 1e-3 * np.abs(exact).max()).sum()),
                            "seconds": []}
            for _ in range(args.rounds):
                for fmt, sess in sessions.items():
                    for _ in range(2):
                        sess.run(None, {"x": x})
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        sess.run(None, {"x": x})
                        times.append(time.perf_counter() - start)
                    row[fmt]["seconds"].append(statistics.median(times))
            for fmt in sessions:
                row[fmt]["median_s"] = statistics.median(row[fmt]["seconds"])
            row["u8u8_speed_vs_u8s8"] = round(row["u8s8"]["median_s"] / row["u8u8"]["median_s"], 3)
            row["outputs"] = int(exact.size)
            out["shapes"][name] = row
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
