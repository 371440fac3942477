"""Sweeps: a grid over config keys expanded into runs of the ordinary pipeline, run by an executor.

A sweep is one config (or a config path template such as ``configs/{task}_{method}.yaml`` with
``vars``) and a ``grid`` of dotted config keys, each with a list of values. Every combination is a
*cell*: an ordinary experiment, identified like any run by the hash of its resolved config. The unit
of work is one seed of one cell, so a finished seed is skipped, an interrupted one restarts, and one
failure does not stop the others.

Executors: ``local`` (worker processes, each with its own thread count) and ``ray`` (each seed a Ray
task with the CPUs and GPUs it declares). Both write the same ``runs/`` layout; the fine-tuned FP32
checkpoint a cell needs comes from the checkpoint cache, whose lock makes sure no two workers train
the same one at once.

Sweep file (YAML)::

    name: bondarenko_table6                   # the sweep's name (default: the file's stem)
    config: ../../{task}_{method}.yaml        # relative to this file; {var}s from vars
    vars: {task: [mrpc, rte], method: [fp32, w8a8_ptq]}
    grid: {finetune.lr: [2.0e-5, 3.0e-5]}     # dotted config keys
    set: {model: minilm-l6}                   # fixed overrides for every cell
    seeds: [42, 43, 44]
"""

from __future__ import annotations

import concurrent.futures as futures
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import statistics
import string
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from qbert.config import (
    MAX_SEEDS,
    ExperimentConfig,
    Section,
    apply_overrides,
    file_kind,
    parse_config,
    parse_override,
    read_yaml,
    schema_error,
    stable_hash,
)
from qbert.errors import QbertError, stacks_on_sigusr1, terminated_as_interrupt, warn
from qbert.progress import LINE_INTERVAL_S, duration, log_reporter
from qbert.records import read_record, read_status, unreadable
from qbert.runs import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    config_dir,
    finished_seeds,
    live_state,
    now,
    read_json,
    runs_root,
    seed_dir,
    summarize,
)

log = logging.getLogger(__name__)

SWEEPS_DIR = ".sweeps"

MAX_CELLS = 10_000
"""Most cells one part of a sweep may expand to (a typo such as a 100-value axis times another)."""


# ---------------------------------------------------------------- the sweep file


def _non_empty_axes(axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
    for key, values in axes.items():
        if not values:
            raise ValueError(f"{key} has no values (give at least one, or remove it)")
    return axes


class SweepPart(Section):
    """One block of cells: a config (template), its template variables and a grid of config keys."""

    config: str = Field(description="Config file, relative to the sweep file; may hold {var} placeholders.")
    vars: dict[str, list[Any]] = Field(default_factory=dict, description="Values of the {var}s in config "
                                       "(a var the template does not use is a label of the part's cells).")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Dotted config key -> values.")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted config key -> value, every cell.")

    @field_validator("vars", "grid")
    @classmethod
    def _non_empty(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _non_empty_axes(axes)


class SweepSpec(Section):
    """A sweep: one part (config, vars, grid, set) or a list of ``parts``, fixed overrides, seeds."""

    name: str | None = Field(None, description="The sweep's name (default: the file's stem).")
    config: str | None = Field(None, description="As in a part, when the sweep has one.")
    vars: dict[str, list[Any]] = Field(default_factory=dict, description="As in a part.")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="As in a part.")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted config key -> value, every cell.")
    parts: list[SweepPart] = Field(default_factory=list, description="Blocks of cells with their own configs.")
    seeds: list[int] | None = Field(None, min_length=1, description="Seeds of every cell (default: the config's).")

    @field_validator("vars", "grid")
    @classmethod
    def _non_empty(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return _non_empty_axes(axes)

    def resolved_parts(self) -> list[SweepPart]:
        """The parts: the top-level config/vars/grid as one part, or ``parts``."""
        if self.config is not None:
            if self.parts:
                raise QbertError("give either config (one part) or parts, not both", source=self.name, key="parts")
            return [SweepPart(config=self.config, vars=self.vars, grid=self.grid)]
        if not self.parts:
            raise QbertError("a sweep file needs config (or parts: [{config: ...}, ...])", source=self.name,
                             key="config")
        return self.parts


def load_sweep(path: str | Path) -> tuple[SweepSpec, Path]:
    """A sweep file, or an experiment config seen as a sweep of one cell, and the folder its paths
    are relative to."""
    path = Path(path)
    data = read_yaml(path)
    if file_kind(data) == "table":
        sweep = path.parent / str(data.get("sweep"))
        raise QbertError(f"this is a table spec, not a sweep: run its sweep file ({sweep})", source=str(path))
    if file_kind(data) == "config":
        return SweepSpec(name=data.get("name") or path.stem, config=path.name), path.parent
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise schema_error(exc, SweepSpec, str(path)) from None
    spec.name = re.sub(r"[^A-Za-z0-9._-]+", "_", spec.name or path.stem.removesuffix(".sweep"))
    return spec, path.parent


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``key=v1,v2,...`` (values parsed as YAML; commas inside brackets do not split) -> key, values."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise QbertError(f"--grid {text!r} is not key=v1,v2,... (e.g. finetune.lr=2e-5,3e-5)", source="command line")
    parts, depth, current = [], 0, ""
    for char in raw:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    values = [parse_override(f"{key.strip()}={part.strip()}")[1] for part in parts]
    return key.strip(), values


def parse_seeds_option(text: str) -> list[int]:
    """``1000..1004`` (inclusive) or ``42,43,44``."""
    try:
        if ".." in text:
            first, last = (int(x) for x in text.split("..", 1))
            if last < first:
                raise ValueError
            if last - first + 1 > MAX_SEEDS:
                raise QbertError(f"--seeds {text!r} names {last - first + 1:,} seeds, more than {MAX_SEEDS:,}",
                                 source="command line")
            return list(range(first, last + 1))
        seeds = [int(x) for x in text.split(",") if x.strip()]
        if not seeds:
            raise ValueError
        return seeds
    except ValueError:
        raise QbertError(f"--seeds {text!r} is not a range A..B or a list A,B,C (e.g. 1000..1004)",
                         source="command line") from None


# ---------------------------------------------------------------- expansion


@dataclass
class Cell:
    """One experiment of a sweep and the grid coordinates that made it."""

    config: ExperimentConfig
    coords: dict[str, Any]
    source: str

    @property
    def hash(self) -> str:
        """The cell's identity: the hash of its config as it runs on this machine (``finetune.precision: auto``
        decided here, which imports torch; other configs hash as written)."""
        return self.on_this_machine().config.config_hash()

    def on_this_machine(self) -> Cell:
        """The cell with its hardware choices (``finetune.precision: auto``) decided for this machine."""
        if self.config.finetune.precision != "auto":
            return self
        from qbert.pipeline.finetune import resolve_hardware

        return Cell(resolve_hardware(self.config), self.coords, self.source)

    @property
    def label(self) -> str:
        """Its grid coordinates, for display."""
        return ", ".join(f"{k}={_short(v)}" for k, v in self.coords.items()) or self.config.name


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return str(value)


def _name_suffix(key: str, value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"{key.rsplit('.', 1)[-1]}-{stable_hash(value, 6)}"
    return f"{key.rsplit('.', 1)[-1]}-{value}"


def _placeholders(template: str, source: str | None = None) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as exc:
        raise QbertError(f"config template {template!r} is not valid ({exc}); write placeholders as {{name}}",
                         source=source, key="config") from None


def _as_override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()}"


def expand(spec: SweepSpec, base_dir: Path, *, grid: dict[str, list[Any]] | None = None,
           overrides: list[str] | None = None, seeds: list[int] | None = None) -> list[Cell]:
    """Every cell of a sweep: for each part, template vars x grid; ``overrides`` for all cells and
    ``seeds`` if given.

    ``grid`` (from the command line) replaces the values of a part's var or grid key of the same
    name, or adds an axis. A var the part's config path does not use (a label, like the MNLI part's
    ``task: [mnli]`` beside ``mnli_minilm_{method}.yaml``) cannot be replaced: the grid selects among
    its values instead, and a part with none of the grid's values is left out.
    """
    cells, seen = [], set()
    for part in spec.resolved_parts():
        for cell in _expand_part(spec, part, base_dir, grid or {}, overrides or [], seeds or spec.seeds):
            written = (cell.config.name, cell.config.config_hash())  # as written: expanding probes no hardware
            if written not in seen:  # parts re-targeted by --grid may overlap
                seen.add(written)
                cells.append(cell)
    return cells


def _expand_part(spec: SweepSpec, part: SweepPart, base_dir: Path, grid: dict[str, list[Any]],
                 overrides: list[str], seeds: list[int] | None) -> list[Cell]:
    variables = dict(part.vars)
    axes = dict(part.grid)
    needed = _placeholders(part.config, spec.name)
    for key, values in grid.items():
        if key in variables and key not in needed:  # a label: select, do not re-target
            variables[key] = [value for value in variables[key] if value in values]
        else:
            (variables if key in variables else axes)[key] = values
    cells_here = math.prod(len(v) for v in variables.values()) * math.prod(len(v) for v in axes.values())
    if cells_here > MAX_CELLS:
        raise QbertError(f"the grid has {cells_here:,} cells, more than {MAX_CELLS:,}; split it into smaller sweeps",
                         source=spec.name, key="grid")
    missing = [name for name in needed if name not in variables]
    if missing:
        raise QbertError(f"{{{missing[0]}}} in {part.config!r} has no values (add vars.{missing[0]} or "
                         f"--grid {missing[0]}=...)", source=spec.name, key="config")
    fixed = [_as_override(k, v) for k, v in {**spec.set, **part.set}.items()] + overrides
    cells = []
    var_names = list(variables)
    for var_values in itertools.product(*(variables[n] for n in var_names)):
        bound = dict(zip(var_names, var_values, strict=True))
        path = base_dir / part.config.format(**{n: bound[n] for n in needed})
        if not path.is_file():
            raise QbertError(f"config file {path} not found (from {part.config!r} with {bound})",
                             source=spec.name, key="config")
        raw = read_yaml(path)
        if file_kind(raw) != "config":  # sweeps do not nest; a table spec is not a run
            raise QbertError(f"{path} is not an experiment config (it is a {file_kind(raw)} file): a sweep's "
                             "parts name experiment configs", source=spec.name, key="config")
        raw.setdefault("name", path.stem)
        raw = apply_overrides(raw, fixed)
        for axis_values in itertools.product(*axes.values()):
            point = dict(zip(axes, axis_values, strict=True))
            data = apply_overrides(raw, [_as_override(k, v) for k, v in point.items()])
            if point:
                data["name"] = "-".join([str(data["name"]), *(_name_suffix(k, v) for k, v in point.items())])
            if seeds:
                data["seeds"] = list(seeds)
            where = f"{path} in sweep {spec.name}" + (f" ({point})" if point else "")
            cells.append(Cell(parse_config(data, where), {**bound, **point}, str(path)))
    return cells


# ---------------------------------------------------------------- running one seed


@dataclass
class TaskOutcome:
    """One seed of one cell: done (ran now), skipped (finished before) or failed."""

    name: str
    hash: str
    seed: int
    state: str
    metrics: dict[str, float] = field(default_factory=dict)
    headline: str | None = None
    error: str | None = None
    log: str | None = None
    seconds: float = 0.0
    files: dict[str, bytes] = field(default_factory=dict)


def _error_log(root: Path, sweep: str, name: str, config_hash: str, seed: int) -> Path:
    return root / SWEEPS_DIR / sweep / "logs" / f"{name}-{config_hash}-seed{seed}.log"


def run_task(data: dict[str, Any], seed: int, root: str, sweep: str, threads: int | None = None,
             collect_files: bool = False, force: bool = False) -> TaskOutcome:
    """Run one seed of one cell (``data``: its resolved config) and report, never raise.

    A failure's traceback goes to ``<root>/.sweeps/<sweep>/logs/``; the outcome names that file.
    ``collect_files``: return the seed folder's small files, for executors on other machines.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    from qbert.pipeline.run import run_experiment

    start = time.perf_counter()
    config = parse_config(data, f"sweep {sweep}")
    config_hash = config.config_hash()
    root_path = Path(root)
    folder = seed_dir(root_path, config.name, config_hash, seed)
    try:
        with terminated_as_interrupt():  # the sweep stops its workers with SIGTERM: the seed ends "interrupted"
            result = run_experiment(config, root=root_path, seeds=[seed], force=force,
                                    reporter=log_reporter(logging.getLogger("qbert.progress")))
        outcome = result.seeds[0]
        record = read_record(outcome.folder)
        task = TaskOutcome(config.name, config_hash, seed, outcome.state, outcome.metrics,
                           headline=record.headline if record else None, error=outcome.error,
                           log=str(folder / "run.log"))
    except BaseException as exc:  # a failing run must not stop the sweep; KeyboardInterrupt still stops it
        if isinstance(exc, KeyboardInterrupt):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        path = _error_log(root_path, sweep, config.name, config_hash, seed)
        atomic_write_text(path, "".join(traceback.format_exception(exc)))
        task = TaskOutcome(config.name, config_hash, seed, "failed", error=f"{type(exc).__name__}: {first}",
                           log=str(path))
    task.seconds = round(time.perf_counter() - start, 2)
    if collect_files and folder.is_dir():
        task.files = {p.name: p.read_bytes() for p in folder.iterdir()
                      if p.is_file() and p.stat().st_size < 64 << 20}
    return task


def _worker_init(threads: int | None, parent: int | None = None) -> None:
    if parent is not None:
        _die_with(parent)
    stacks_on_sigusr1()
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger().setLevel(logging.WARNING)


def _die_with(parent: int) -> None:
    """Make this worker process end when ``parent`` (the sweep) ends, even by ``kill -9`` (Linux: the
    kernel's parent-death signal; elsewhere workers end when the pool's pipes close)."""
    import ctypes
    import ctypes.util
    import signal

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


# ---------------------------------------------------------------- executors


@dataclass
class Job:
    """One seed of one cell, as sent to an executor."""

    cell: Cell
    seed: int
    force: bool = False
    """Rerun a finished seed (its results are replaced only once the new ones exist)."""

    @property
    def key(self) -> tuple[str, str, int]:
        """Run name, config hash and seed: where the job's seed folder is."""
        return self.cell.config.name, self.cell.hash, self.seed


def run_local(jobs: list[Job], root: Path, sweep: str, workers: int, threads: int | None,
              on_done: Callable[[Job, TaskOutcome], None]) -> None:
    """Run jobs in ``workers`` processes (in this process when 1). A worker that dies fails the jobs
    it held; the others go on in a fresh pool."""
    if workers <= 1:
        _worker_init(threads)
        for job in jobs:
            on_done(job, run_task(job.cell.config.resolved(), job.seed, str(root), sweep, threads, force=job.force))
        return
    pending = list(jobs)
    context = multiprocessing.get_context("spawn")
    while pending:
        broken = False
        with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                                         initargs=(threads, os.getpid())) as pool:
            running: dict[futures.Future, Job] = {}
            try:
                while (pending or running) and not broken:
                    while pending and len(running) < workers and not broken:
                        try:
                            future = pool.submit(run_task, pending[0].cell.config.resolved(), pending[0].seed,
                                                 str(root), sweep, threads, force=pending[0].force)
                        except futures.process.BrokenProcessPool:  # a worker died between two jobs
                            broken = True
                            break
                        running[future] = pending.pop(0)
                    if broken or not running:
                        break
                    done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                    for future in done:
                        job = running.pop(future)
                        try:
                            on_done(job, future.result())
                        except futures.process.BrokenProcessPool:
                            broken = True
                            on_done(job, _died(job, root, sweep))
                if broken:
                    for job in running.values():
                        on_done(job, _died(job, root, sweep))
            except BaseException:
                _stop_workers(pool)
                raise


def _stop_workers(pool: futures.ProcessPoolExecutor, grace: float | None = None) -> None:
    """Cancel what has not started and stop the pool's workers as Ctrl-C would (SIGTERM; each marks its seed
    interrupted), so that leaving the pool does not wait for their runs to finish (a Ctrl-C in a terminal
    reaches them too; a SIGTERM sent to the sweep alone did not: the sweep waited for every running cell).
    A worker still alive after ``grace`` seconds (default :data:`STOP_GRACE_S`) is killed, with a warning:
    a stopped sweep ends in bounded time, as a scheduler that follows SIGTERM with SIGKILL expects."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # CPython's pool keeps them here,
    pool.shutdown(wait=False, cancel_futures=True)  # until shutdown forgets them
    for process in processes:
        if process.is_alive():
            process.terminate()
    # wait on the exit sentinels, not join(): the pool's own thread reaps the workers too, and a process
    # reaped by the other thread looks alive to this one
    grace = STOP_GRACE_S if grace is None else grace
    deadline = time.monotonic() + grace
    left = {process.sentinel: process for process in processes}
    while left and (remaining := deadline - time.monotonic()) > 0:
        for sentinel in multiprocessing.connection.wait(list(left), remaining):
            del left[sentinel]
    if left:
        warn(log, "%d sweep worker(s) did not stop within %.0f s of SIGTERM: killed (a seed one was running shows "
             "as `orphaned` in `qbert ls`; rerun the sweep to resume it)", len(left), grace)
        for process in left.values():
            process.kill()


STOP_GRACE_S = 20.0
"""How long a stopped sweep waits for its workers to mark their seeds interrupted and exit (about two seconds
here) before it kills them."""


def _died(job: Job, root: Path, sweep: str) -> TaskOutcome:
    name, config_hash, seed = job.key
    folder = seed_dir(root, name, config_hash, seed)
    return TaskOutcome(name, config_hash, seed, "failed",
                       error="worker process died (killed or out of memory); rerun the sweep to resume",
                       log=str(folder / "run.log"))


def ray_module() -> Any:
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise QbertError("the ray executor needs Ray: pip install 'qbert[ray]' (or pip install ray)",
                         key="--executor") from None
    return ray


def run_ray(jobs: list[Job], root: Path, sweep: str, address: str | None, threads: int | None,
            gpus: float, on_done: Callable[[Job, TaskOutcome], None]) -> None:
    """Send every job to a Ray cluster as a task with the CPUs and GPUs it declares, and write what
    comes back into ``root`` (a no-op where the workers share its filesystem)."""
    ray = ray_module()
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise QbertError(f"cannot reach a Ray cluster at {address!r}: {first} (start one with `ray start "
                             "--head`, or leave --address out for a local instance)", key="--address") from None
    remote = ray.remote(run_task)
    refs = {}
    for job in jobs:
        cfg = job.cell.config
        cpus = threads or cfg.finetune.threads or 1
        job_gpus = gpus or (1 if cfg.finetune.device == "cuda" else 0)
        ref = remote.options(num_cpus=cpus, num_gpus=job_gpus, max_retries=0).remote(
            cfg.resolved(), job.seed, str(root.resolve()), sweep, cpus, True, force=job.force)
        refs[ref] = job
    remaining = list(refs)
    try:
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            job = refs[ready[0]]
            try:
                outcome = ray.get(ready[0])
            except Exception as exc:  # the task's process died (ray.exceptions.WorkerCrashedError and kin)
                outcome = _died(job, root, sweep)
                outcome.error = f"Ray task failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
            _gather(root, outcome)
            on_done(job, outcome)
    except BaseException:
        for ref in remaining:
            ray.cancel(ref, force=True)
        raise


def _gather(root: Path, outcome: TaskOutcome) -> None:
    folder = seed_dir(root, outcome.name, outcome.hash, outcome.seed)
    for name, content in outcome.files.items():
        atomic_write_bytes(folder / name, content)  # skips a file that already holds it
    outcome.files = {}


# ---------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    """What a sweep did: one outcome per seed of every cell, and where its record is."""

    name: str
    cells: list[Cell]
    outcomes: list[TaskOutcome]
    record: Path

    def count(self, state: str) -> int:
        """How many seeds ended in ``state``."""
        return sum(1 for o in self.outcomes if o.state == state)


class SweepProgress:
    """The live view of a sweep: seeds finished (ran, skipped, failed), what is running now and for how long
    (read from the seed folders, so it works for every executor on a shared filesystem), and an estimate of the
    time left: each unfinished seed at the mean time of its cell's seeds that ran (a cell with none yet: at the
    median of the cells' means, and the line says how many seeds that is)."""

    def __init__(self, root: Path, jobs: list[Job], skipped: int, workers: int,
                 clock: Callable[[], float] = time.time):
        self.root, self.jobs, self.workers, self.clock = root, list(jobs), max(1, workers), clock
        self.total = len(self.jobs) + skipped
        self.counts = {"done": 0, "skipped": skipped, "failed": 0, "busy": 0}
        self.seconds: dict[str, list[float]] = {}
        """Run times of the seeds that ran, by cell hash."""
        self.finished: set[tuple[str, str, int]] = set()
        self._lock = threading.Lock()  # finish() runs in the sweep's thread, line() also in the heartbeat's

    def finish(self, job: Job, outcome: TaskOutcome) -> None:
        """Count ``job``'s outcome."""
        with self._lock:
            self.finished.add(job.key)
            self.counts[outcome.state] = self.counts.get(outcome.state, 0) + 1
            if outcome.state in ("done", "failed") and outcome.seconds:
                self.seconds.setdefault(job.cell.hash, []).append(outcome.seconds)

    def running(self) -> list[tuple[Job, float, str]]:
        """Unfinished jobs whose seed folder says running and whose lock a process holds (a seed left ``running``
        by a killed process is not): the job, seconds since it started, its last log line."""
        found = []
        for job in self.jobs:
            if job.key in self.finished:
                continue
            folder = seed_dir(self.root, *job.key)
            if live_state(folder) != "running":
                continue
            try:
                started = (folder / "status.json").stat().st_mtime
            except OSError:  # the folder was cleared for a restart just now: not running at this moment
                continue
            found.append((job, max(0.0, self.clock() - started), last_log_line(folder / "run.log")))
        return found

    def line(self) -> str:
        """One line: counts, the running seeds with their current step, and the estimated time left."""
        with self._lock:
            return self._line()

    def _line(self) -> str:
        c = self.counts
        finished = sum(c.values())
        busy = f", {c['busy']} busy" if c["busy"] else ""
        parts = [f"sweep: {finished}/{self.total} seeds finished ({c['done']} ran, {c['skipped']} skipped, "
                 f"{c['failed']} failed{busy})"]
        running = self.running()
        for job, seconds, last in running:
            where = f": {last}" if last else ""
            parts.append(f"running {job.key[0]} seed {job.seed} for {duration(seconds)}{where}")
        left = self.total - finished
        if left and self.seconds:
            seconds, untimed, guess = self.time_left(running)
            guessed = f" ({untimed} in cells not timed yet, counted at {duration(guess)} each)" if untimed else ""
            parts.append(f"about {duration(seconds / min(self.workers, left))} left{guessed}")
        return "; ".join(parts)

    def time_left(self, running: list[tuple[Job, float, str]]) -> tuple[float, int, float]:
        """Seconds of work left (one worker), how many seeds were guessed, and the guess per seed."""
        means = {cell: sum(times) / len(times) for cell, times in self.seconds.items()}
        guess = statistics.median(means.values())
        elapsed = {job.key: seconds for job, seconds, _ in running}
        total, untimed = 0.0, 0
        for job in self.jobs:
            if job.key in self.finished:
                continue
            estimate = means.get(job.cell.hash)
            if estimate is None:
                estimate, untimed = guess, untimed + 1
            total += max(0.0, estimate - elapsed.get(job.key, 0.0))
        return total, untimed, guess


LOG_LINE_CHARS = 90
"""The most characters of a running seed's last log line that the sweep's progress line shows."""


def last_log_line(path: Path) -> str:
    """The message of the last line of a run.log (without time and level), shortened; empty when none."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 4096))
            lines = handle.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:  # not written yet (the seed is starting) or being replaced: the line just shows no step
        return ""
    if not lines:
        return ""
    message = lines[-1].split(": ", 1)[-1]
    return message if len(message) <= LOG_LINE_CHARS else message[: LOG_LINE_CHARS - 3] + "..."


def _record(root: Path, name: str, cells: list[Cell], command: str, executor: str,
            outcomes: dict[tuple[str, str, int], TaskOutcome], started: str) -> Path:
    path = root / SWEEPS_DIR / f"{name}.json"
    atomic_write_json(path, {
        "name": name,
        "command": command,
        "executor": executor,
        "started": started,
        "updated": now(),
        "cells": [
            {
                "name": c.config.name, "hash": c.hash, "coords": c.coords, "source": c.source,
                "task": c.config.task, "model": c.config.model, "recipe": c.config.recipe.name,
                "seeds": {str(s): _state(outcomes.get((c.config.name, c.hash, s))) for s in c.config.seeds},
            }
            for c in cells
        ],
    })
    return path


def _state(outcome: TaskOutcome | None) -> dict[str, Any]:
    if outcome is None:
        return {"state": "pending"}
    return {"state": outcome.state, **({"error": outcome.error, "log": outcome.log} if outcome.error else {})}


def run_sweep(cells: list[Cell], *, name: str, root: str | Path | None = None, executor: str = "local",
              workers: int = 1, threads: int | None = None, address: str | None = None, gpus: float = 0,
              force: bool = False, command: str = "",
              on_done: Callable[[Job, TaskOutcome], None] | None = None,
              on_progress: Callable[[str], None] | None = None, heartbeat_s: float = LINE_INTERVAL_S) -> SweepResult:
    """Run every seed of every cell; finished seeds are skipped (unless ``force``), failures recorded.

    ``on_progress(line)`` gets the sweep's progress line (:class:`SweepProgress`) after every seed that ran and
    every ``heartbeat_s`` seconds while seeds run."""
    root = runs_root(root)
    cells = [cell.on_this_machine() for cell in cells]  # workers get the configs as they run here
    started = now()
    outcomes: dict[tuple[str, str, int], TaskOutcome] = {}
    jobs: list[Job] = []
    seen: set[tuple[str, str, int]] = set()
    for cell in cells:
        finished_before = {} if force else finished_seeds(root, cell.hash)
        for seed in cell.config.seeds:
            job = Job(cell, seed, force)
            if job.key in seen:
                continue
            seen.add(job.key)
            folder = finished_before.get(seed) or seed_dir(root, *job.key)
            if seed in finished_before:
                finished = read_record(folder)
                outcome = TaskOutcome(folder.parent.parent.name, job.cell.hash, seed, "skipped",
                                      finished.metrics if finished else {},
                                      headline=finished.headline if finished else None, log=str(folder / "run.log"))
                outcomes[job.key] = outcome
                if on_done:
                    on_done(job, outcome)
            else:
                jobs.append(job)
    record = _record(root, name, cells, command, executor, outcomes, started)
    progress = SweepProgress(root, jobs, len(outcomes), workers if executor == "local" else len(jobs))

    def done(job: Job, outcome: TaskOutcome) -> None:
        outcomes[job.key] = outcome
        progress.finish(job, outcome)
        _record(root, name, cells, command, executor, outcomes, started)
        if on_done:
            on_done(job, outcome)
        if on_progress:
            on_progress(progress.line())

    stop = threading.Event()
    if on_progress and jobs:
        def beat() -> None:
            while not stop.wait(heartbeat_s):
                on_progress(progress.line())

        threading.Thread(target=beat, name="sweep-progress", daemon=True).start()
    try:
        if jobs:
            if executor == "local":
                run_local(jobs, root, name, workers, threads, done)
            elif executor == "ray":
                run_ray(jobs, root, name, address, threads, gpus, done)
            else:
                raise QbertError(f"unknown executor {executor!r} (local or ray)", key="--executor")
    finally:
        stop.set()
        for cell in cells:
            folder = config_dir(root, cell.config.name, cell.hash)
            if folder.is_dir():
                summarize(folder)
        _record(root, name, cells, command, executor, outcomes, started)
    ordered = [outcomes[k] for k in _keys(cells) if k in outcomes]
    return SweepResult(name, cells, ordered, record)


def _keys(cells: Iterable[Cell]) -> list[tuple[str, str, int]]:
    keys, seen = [], set()
    for cell in cells:
        for seed in cell.config.seeds:
            key = (cell.config.name, cell.hash, seed)
            if key not in seen:
                seen.add(key)
                keys.append(key)
    return keys


def list_sweeps(root: Path) -> list[dict[str, Any]]:
    """Every sweep recorded under ``root``, newest first, with live seed states from the run folders."""
    rows = []
    for path in (root / SWEEPS_DIR).glob("*.json"):
        record = read_json(path)
        if not isinstance(record, dict):
            unreadable(path, "not a readable sweep record")
            continue
        counts: dict[str, int] = {}
        for cell in record.get("cells", []):
            for seed, info in cell.get("seeds", {}).items():
                folder = seed_dir(root, cell["name"], cell["hash"], int(seed))
                state = read_status(folder).state if folder.is_dir() else info.get("state", "pending")
                state = "done" if state == "skipped" else (state or "pending")
                if state == "missing":
                    state = "pending"
                counts[state] = counts.get(state, 0) + 1
        rows.append({"name": record.get("name", path.stem), "path": path, "cells": len(record.get("cells", [])),
                     "counts": counts, "command": record.get("command", ""), "updated": record.get("updated", ""),
                     "executor": record.get("executor", "")})
    return sorted(rows, key=lambda r: r["updated"], reverse=True)

