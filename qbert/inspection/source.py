"""What an inspection looks at: the fine-tuned FP32 model of a config's seed, or of a finished run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qbert.config import ExperimentConfig, load_config
from qbert.errors import QbertError


@dataclass
class Inspected:
    """A fine-tuned model with the config, seed, task and tokenizer it belongs to."""

    config: ExperimentConfig
    seed: int
    model: Any
    tokenizer: Any
    task: Any
    checkpoint: str

    @property
    def label(self) -> str:
        """``<run name> seed <n>``."""
        return f"{self.config.name} seed {self.seed}"


def _run_folder(folder: Path) -> tuple[Path, int | None]:
    """A seed folder (``seed=N``) or a config folder (its first seed folder): the seed folder and its seed."""
    if folder.name.startswith("seed="):
        return folder, int(folder.name.split("=", 1)[1])
    seeds = sorted((p for p in folder.glob("seed=*") if p.is_dir()), key=lambda p: int(p.name.split("=", 1)[1]))
    if (folder / "config.yaml").is_file() and seeds:
        return seeds[0], int(seeds[0].name.split("=", 1)[1])
    raise QbertError(f"{folder} is not a run folder (runs/<name>/<hash>[/seed=N]) nor a config file: pass a config "
                     "YAML or a run's folder")


def load_inspected(target: str | Path, overrides: list[str] | None = None, *, seed: int | None = None,
                   runs_dir: str | Path | None = None) -> Inspected:
    """The FP32 fine-tuned model of ``target``: a config (its first seed, or ``seed``), whose checkpoint must be
    in the cache (``qbert run`` trains it), a model folder the config names as already fine-tuned, or a run
    folder (the checkpoint its ``metrics.json`` records)."""
    from qbert.models import load_finetuned, load_tokenizer, resolve_model
    from qbert.pipeline.checkpoint import cache_root, finetune_key
    from qbert.records import read_record
    from qbert.runs import runs_root
    from qbert.tasks import get_task

    target = Path(target)
    checkpoint: str | None = None
    if target.is_dir():
        folder, seed = _run_folder(target)
        config = load_config(folder / "config.yaml", overrides or [])
        record = read_record(folder)
        if record is not None and record.checkpoint and Path(record.checkpoint).is_dir():
            checkpoint = record.checkpoint
    else:
        config = load_config(target, overrides or [])
    if seed is None:
        seed = config.seeds[0]
    source = resolve_model(config.model)
    task = get_task(config.task, config)
    if checkpoint is None and config.skips_finetuning:
        checkpoint = source.location
    if checkpoint is None:
        key, _ = finetune_key(config, seed, source.identity, task.data_fingerprint(config.data))
        cached = cache_root(runs_root(runs_dir)) / key
        if not (cached / "finetune.json").is_file():
            raise QbertError(f"no fine-tuned checkpoint of {config.name} seed {seed} in {cached.parent}: train it "
                             f"first: `qbert run {target} 'seeds=[{seed}]'` caches it", key="seeds")
        checkpoint = str(cached)
    model = load_finetuned(checkpoint).eval()
    return Inspected(config, seed, model, load_tokenizer(source), task, checkpoint)
