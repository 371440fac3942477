"""Wall time of a floating-point ``qbert search`` with its evaluations made on one calibrated model (the raised
sites' quantizers switched off) against the same search calibrating a model per plan, one after the other in one
run, each from no stored evaluations. Prints JSON: each side's seconds and calibrations, the ratio, and whether
both stored the same evaluations and chose the same sites.

Default: configs/stsb_w8a8_ptq.yaml, seed 42, target loss<=1.0 (the README's STS-B search). The FP32 checkpoint
comes from the cache (``QBERT_CACHE_DIR``; fine-tuned first, untimed, when missing). ``--threads`` sets torch's.
Usage: python bench/search_switch.py [--config configs/stsb_w8a8_ptq.yaml] [--target "loss<=1.0"] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "stsb_w8a8_ptq.yaml"))
    parser.add_argument("--target", default="loss<=1.0")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("QBERT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from qbert import precision_search
    from qbert.config import load_config
    from qbert.pipeline.run import run_experiment

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    seed = config.seeds[0] if args.seed is None else args.seed
    settings = precision_search.SearchSettings(precision_search.parse_target(args.target), seed=seed,
                                               high_bits=None)
    switchable = precision_search.switchable
    sides: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as work:
        # untimed: the FP32 run that finds (or makes) the cached checkpoint, shared by both sides' folders
        for name in ("switched", "calibrated"):
            run_experiment(precision_search.fp32_config(config, seed), root=Path(work) / name)
        for name in ("switched", "calibrated"):
            precision_search.switchable = switchable if name == "switched" else (lambda *a: False)
            start = time.perf_counter()
            result = precision_search.run_search(config, settings, root=Path(work) / name)
            seconds = time.perf_counter() - start
            stored = json.loads((Path(result["folder"]) / "evaluations.json").read_text())["values"]
            sides[name] = {"seconds": round(seconds, 1), "evaluations": result["evaluations"],
                           "chosen": result["chosen"], "held_out": result["held_out"], "stored": stored}
    precision_search.switchable = switchable
    print(json.dumps({
        "config": config.name, "seed": seed, "target": args.target, "threads": torch.get_num_threads(),
        "switched_s": sides["switched"]["seconds"], "calibrated_s": sides["calibrated"]["seconds"],
        "speedup": round(sides["calibrated"]["seconds"] / sides["switched"]["seconds"], 2),
        "calibrations": {name: side["evaluations"]["calibrations"] for name, side in sides.items()},
        "evaluations": sides["switched"]["evaluations"]["total"],
        "same_evaluations": sides["switched"]["stored"] == sides["calibrated"]["stored"],
        "same_choice": sides["switched"]["chosen"] == sides["calibrated"]["chosen"]
        and sides["switched"]["held_out"] == sides["calibrated"]["held_out"],
        "chosen_sites": len(sides["switched"]["chosen"]),
    }, indent=2))


if __name__ == "__main__":
    main()
