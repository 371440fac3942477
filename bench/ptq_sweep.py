"""Wall time of the Table 6 PTQ sweep (bench/table6_ptq.sweep.yaml: CoLA, SST-2, MRPC, STS-B, RTE x FP32, W8A8
PTQ, MP-PTQ, PEG x seeds 42-44 on MiniLM-L6, 60 seeds, every FP32 checkpoint already cached), with an earlier
commit's code and with this checkout's, one after the other in one run. Prints JSON: each side's seconds, the
ratio, and whether both sides computed the same metrics seed for seed.

The sides: ``before`` is ``--before`` (default 028487b, the last commit before issue 19's speed work) in a git
worktree with its own virtual environment (``make setup``); ``after`` is this checkout, first with an empty
tokenized-features cache (``after_cold``), then with the features it wrote (``after_warm``, as every sweep after
the first). Untimed preparation: the FP32 fine-tunes the cache lacks (about an hour per missing task and 3 seeds
on 2 cores; ``--cache`` to keep them between runs) and the worktree's environment. The sweeps run with
``qbert sweep``'s defaults (one worker).
Usage: python bench/ptq_sweep.py [--before 028487b] [--cache DIR] [--work DIR] [--grid task=mrpc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qbert.records import read_record

ROOT = Path(__file__).resolve().parents[1]
SWEEP = Path("bench") / "table6_ptq.sweep.yaml"
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def sweep(code: Path, runs: Path, env: dict, *extra: str) -> float:
    """``qbert sweep`` of the Table 6 PTQ grid with the code in ``code``; its wall time (it must finish every
    seed)."""
    command = [str(code / ".venv" / "bin" / "qbert"), "sweep", str(code / SWEEP), "--runs-dir", str(runs), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return seconds


def metrics_by_seed(runs: Path) -> dict[str, dict]:
    """Every finished seed's metrics (the evaluation splits' scores), by run name and seed folder."""
    out = {}
    for path in sorted(runs.glob("*/*/seed=*/metrics.json")):
        record = read_record(path.parent)
        if record is not None:
            out[f"{path.parts[-4]}/{path.parts[-2]}"] = record.metrics
    return out


def worktree(commit: str, folder: Path) -> Path:
    """A checkout of ``commit`` in ``folder`` with its environment set up (reused when already there)."""
    if not (folder / ".git").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(folder), commit],
                       check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["make", "-C", str(folder), "setup"], check=True, stdout=subprocess.DEVNULL)
    # the grid file is this checkout's; the configs it names are the commit's own (unchanged since 028487b)
    shutil.copy(ROOT / SWEEP, folder / SWEEP)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="028487b", help="the commit to compare against")
    parser.add_argument("--work", type=Path, default=Path("/tmp/qbert-ptq-sweep"), help="scratch folder")
    parser.add_argument("--cache", type=Path, help="FP32 checkpoint cache (default: WORK/cache)")
    parser.add_argument("--grid", action="append", default=[],
                        help="a slice of the sweep for every side, e.g. task=mrpc (qbert sweep's --grid; repeatable)")
    args = parser.parse_args()
    only = [option for axis in args.grid for option in ("--grid", axis)]
    work = args.work.resolve()
    cache = (args.cache or work / "cache").resolve()
    env = {**os.environ, "QBERT_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1",
           "QBERT_DATA_DIR": os.environ.get("QBERT_DATA_DIR") or str(DEFAULT_DATA)}
    for old in work.glob("runs-*"):
        shutil.rmtree(old)

    prepare = sweep(ROOT, work / "runs-prepare", env, *only, "--grid", "method=fp32")
    before_code = worktree(args.before, work / "before")
    before = sweep(before_code, work / "runs-before", env, *only)
    shutil.rmtree(cache / "features", ignore_errors=True)
    after_cold = sweep(ROOT, work / "runs-after", env, *only)
    after_warm = sweep(ROOT, work / "runs-after-warm", env, *only)

    old, new = metrics_by_seed(work / "runs-before"), metrics_by_seed(work / "runs-after")
    differ = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    print(json.dumps({
        "sweep": str(SWEEP), "slice": args.grid, "seeds": len(new), "before_commit": args.before, "after_commit": head,
        "prepare_seconds": round(prepare, 1), "before_seconds": round(before, 1),
        "after_cold_seconds": round(after_cold, 1), "after_warm_seconds": round(after_warm, 1),
        "speedup_cold": round(before / after_cold, 2), "speedup_warm": round(before / after_warm, 2),
        "same_metrics": not differ, "differing_seeds": differ,
    }, indent=2))


if __name__ == "__main__":
    main()
