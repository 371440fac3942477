"""SQuAD v1.1: sliding windows over long contexts, offset mappings, n-best span search.

Data from ``<dir>/squad/{train,dev}-v1.1.json`` or the hub's ``rajpurkar/squad``. Only the dev file
exists on machines without the hub; ``data.train_from_eval`` splits its articles into a training
part and an evaluation part so SQuAD still runs end to end on real data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qbert.errors import QbertError
from qbert.tasks import metrics as M
from qbert.tasks.base import EvalOutput, Task, data_dir, file_digest, require_hub, split_point


@dataclass(frozen=True)
class SquadExample:
    """One question about one context, with its gold answers (text and character start)."""

    id: str
    title: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


def read_squad_json(path: Path) -> list[list[SquadExample]]:
    """Parse a SQuAD v1.1 file into articles, each a list of examples in file order."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        articles = []
        for article in payload["data"]:
            examples = []
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    texts, starts = _answers(qa, context, path)
                    examples.append(
                        SquadExample(qa["id"], article.get("title", ""), qa["question"], context, texts, starts)
                    )
            articles.append(examples)
    except UnicodeDecodeError as exc:
        raise QbertError(f"not UTF-8 text (offset {exc.start:,}); save the file as UTF-8", source=str(path)) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise QbertError(f"not a SQuAD v1.1 file ({type(exc).__name__}: {exc})", source=str(path)) from None
    if not any(articles):
        raise QbertError("no questions in the file (expected data[].paragraphs[].qas[])", source=str(path))
    return articles


def _answers(qa: dict[str, Any], context: str, path: Path) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """A question's gold answers, each checked to be the span of the context it says it is."""
    texts, starts = [], []
    for answer in qa["answers"]:
        text, start = answer["text"], answer["answer_start"]
        if not isinstance(text, str) or not text or not isinstance(start, int) or isinstance(start, bool) \
                or not 0 <= start <= len(context) - len(text) or context[start:start + len(text)] != text:
            raise QbertError(f"question {qa.get('id')!r}: answer {str(text)[:40]!r} at answer_start {start!r} is not "
                             "that span of its context (fix the answer or its start)", source=str(path))
        texts.append(text)
        starts.append(start)
    if not texts:
        raise QbertError(f"question {qa.get('id')!r} has no answers (SQuAD v1.1 gives each at least one)",
                         source=str(path))
    return tuple(texts), tuple(starts)


class Squad(Task):
    """SQuAD v1.1 extractive question answering; metrics exact match and F1 (official script)."""

    name = "squad"
    head = "question_answering"
    metrics = ("exact_match", "f1")
    headline = "f1"

    def __init__(self, doc_stride: int = 128, n_best: int = 20, max_answer_len: int = 30):
        self.doc_stride = doc_stride
        self.n_best = n_best
        self.max_answer_len = max_answer_len

    # ---------------------------------------------------------------- loading

    @staticmethod
    def _file(root: Path, split: str) -> Path:
        name = "train-v1.1.json" if split == "train" else "dev-v1.1.json"
        for candidate in (root / "squad" / name, root / name):
            if candidate.is_file():
                return candidate
        return root / "squad" / name

    def _articles(self, split: str, data: Any) -> list[list[SquadExample]]:
        root = data_dir(data.dir)
        if root is None:
            require_hub(self.name)
            return self._hub_articles(split)
        path = self._file(root, split)
        if not path.is_file():
            fix = ("set data.train_from_eval (e.g. 0.75) to train on part of the dev articles"
                   if split == "train" else "add the file")
            raise QbertError(f"squad {split} split not found at {path}: {fix}", key="data.dir")
        return read_squad_json(path)

    def _hub_articles(self, split: str) -> list[list[SquadExample]]:
        from datasets import load_dataset

        rows = load_dataset("rajpurkar/squad", split="train" if split == "train" else "validation")
        articles: dict[str, list[SquadExample]] = {}
        for row in rows:
            articles.setdefault(row["title"], []).append(
                SquadExample(row["id"], row["title"], row["question"], row["context"],
                             tuple(row["answers"]["text"]), tuple(row["answers"]["answer_start"]))
            )
        return list(articles.values())

    def load(self, split: str, data: Any) -> list[SquadExample]:
        if data.train_from_eval is not None:
            articles = self._articles("dev", data)
            cut = split_point(len(articles), data.train_from_eval)
            chosen = articles[:cut] if split == "train" else articles[cut:]
        else:
            chosen = self._articles(split, data)
        examples = [e for article in chosen for e in article]
        limit = data.max_train_samples if split == "train" else data.max_eval_samples
        return examples[:limit] if limit else examples

    def data_fingerprint(self, data: Any) -> dict[str, Any]:
        root = data_dir(data.dir)
        split = "dev" if data.train_from_eval is not None else "train"
        if root is None:
            source: dict[str, Any] = {"hub": "rajpurkar/squad", "split": split}
        else:
            path = self._file(root, split)
            source = {"file": path.name, "sha256": file_digest(path) if path.is_file() else None}
        return {**source, "train_from_eval": data.train_from_eval, "max_train_samples": data.max_train_samples,
                "doc_stride": self.doc_stride}

    # ---------------------------------------------------------------- tokenizing

    def _windows(self, tokenizer: Any, examples: list[SquadExample], max_len: int):
        if tokenizer.padding_side != "right":
            raise QbertError("SQuAD windows need a tokenizer that pads on the right", key="model")
        try:
            return tokenizer(
                [e.question.lstrip() for e in examples],
                [e.context for e in examples],
                truncation="only_second",
                max_length=max_len,
                stride=self.doc_stride,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
            )
        except ValueError as exc:
            raise QbertError(
                f"windows of {max_len} tokens cannot overlap by {self.doc_stride} with the question in them "
                f"({str(exc).splitlines()[0]}); lower finetune.doc_stride or raise finetune.max_seq_len",
                key="finetune.doc_stride",
            ) from None

    def encode_train(self, tokenizer: Any, examples: list[SquadExample], max_len: int) -> list[dict[str, Any]]:
        """One feature per window; the answer's token span, or the [CLS] position when it is cut off."""
        enc = self._windows(tokenizer, examples, max_len)
        features = []
        for i, offsets in enumerate(enc["offset_mapping"]):
            example = examples[enc["overflow_to_sample_mapping"][i]]
            sequence_ids = enc.sequence_ids(i)
            input_ids = enc["input_ids"][i]
            cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
            start_char = example.answer_starts[0]
            end_char = start_char + len(example.answers[0])
            context_tokens = [t for t, s in enumerate(sequence_ids) if s == 1]
            first, last = context_tokens[0], context_tokens[-1]
            if offsets[first][0] > start_char or offsets[last][1] < end_char:
                start_pos = end_pos = cls_index
            else:
                start_pos = first
                while start_pos <= last and offsets[start_pos][0] <= start_char:
                    start_pos += 1
                start_pos -= 1
                end_pos = last
                while end_pos >= first and offsets[end_pos][1] >= end_char:
                    end_pos -= 1
                end_pos += 1
            feature = {k: enc[k][i] for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc}
            feature["start_positions"] = start_pos
            feature["end_positions"] = end_pos
            features.append(feature)
        return features

    def encode_eval(self, tokenizer: Any, examples: list[SquadExample], max_len: int) -> list[dict[str, Any]]:
        """One feature per window, with context offsets (None elsewhere) and its example's index."""
        enc = self._windows(tokenizer, examples, max_len)
        features = []
        for i, offsets in enumerate(enc["offset_mapping"]):
            sequence_ids = enc.sequence_ids(i)
            feature = {k: enc[k][i] for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc}
            feature["example_index"] = enc["overflow_to_sample_mapping"][i]
            feature["offsets"] = [tuple(o) if s == 1 else None for o, s in zip(offsets, sequence_ids, strict=True)]
            features.append(feature)
        return features

    # ---------------------------------------------------------------- scoring

    def best_spans(
        self, examples: list[SquadExample], features: list[dict[str, Any]],
        outputs: list[tuple[np.ndarray, np.ndarray]],
    ) -> list[tuple[str, float]]:
        """Best answer text and score per example: the n-best start and end logits of every window,
        valid spans only (inside the context, end not before start, at most ``max_answer_len``)."""
        best: list[tuple[str, float]] = [("", -np.inf) for _ in examples]
        for feature, (start_logits, end_logits) in zip(features, outputs, strict=True):
            index = feature["example_index"]
            offsets = feature["offsets"]
            context = examples[index].context
            starts = np.argsort(start_logits)[::-1][: self.n_best]
            ends = np.argsort(end_logits)[::-1][: self.n_best]
            for s in starts:
                if s >= len(offsets) or offsets[s] is None:
                    continue
                for e in ends:
                    if e >= len(offsets) or offsets[e] is None or e < s or e - s + 1 > self.max_answer_len:
                        continue
                    score = float(start_logits[s] + end_logits[e])
                    if score > best[index][1]:
                        best[index] = (context[offsets[s][0] : offsets[e][1]], score)
        return best

    def score(self, examples: list[SquadExample], features: list[dict[str, Any]], outputs: Any) -> EvalOutput:
        spans = self.best_spans(examples, features, outputs)
        predictions = {e.id: text for e, (text, _) in zip(examples, spans, strict=True)}
        answers = {e.id: list(e.answers) for e in examples}
        rows = [
            {"id": e.id, "prediction": text, "answers": list(e.answers),
             "score": score if np.isfinite(score) else None}
            for e, (text, score) in zip(examples, spans, strict=True)
        ]
        return EvalOutput(M.squad_scores(predictions, answers), rows)
