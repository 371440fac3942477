"""GLUE and SQuAD tasks: loading, tokenizing and scoring, by name."""

from __future__ import annotations

from typing import Any

from qbert.tasks.base import EvalOutput, Task
from qbert.tasks.glue import Cola, Mnli, Mrpc, Qnli, Qqp, Rte, Sst2, Stsb, Wnli
from qbert.tasks.squad import Squad

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (Cola, Sst2, Mrpc, Stsb, Qqp, Mnli, Qnli, Rte, Wnli, Squad)
}


def get_task(name: str, config: Any | None = None) -> Task:
    """The task called ``name``; ``config`` (an ExperimentConfig) supplies SQuAD's window settings."""
    if name == "squad" and config is not None:
        return Squad(config.finetune.doc_stride, config.evaluate.n_best, config.evaluate.max_answer_len)
    return TASKS[name]()


__all__ = ["TASKS", "EvalOutput", "Task", "get_task"]
