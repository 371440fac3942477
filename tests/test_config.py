"""The config schema, YAML loading, overrides and their one-line errors."""

from pathlib import Path

import pytest

from qbert.config import ExperimentConfig, apply_overrides, load_config, parse_config
from qbert.errors import QbertError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.endswith((".sweep.yaml", ".table.yaml")))


def test_there_are_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_validates(path):
    cfg = load_config(path)
    assert cfg.name
    assert len(cfg.config_hash()) == 12


def test_defaults_are_in_the_schema():
    cfg = ExperimentConfig()
    assert cfg.finetune.lr == 2.0e-5 and cfg.finetune.warmup == 0.1
    assert cfg.recipe.name == "fp32"
    assert cfg.calibrate.batches == 16
    assert cfg.resolved()["evaluate"]["batch_size"] == 64


def test_name_defaults_to_file_stem_and_is_sanitised(tmp_path):
    path = tmp_path / "my run.yaml"
    path.write_text("task: rte\n")
    assert load_config(path).name == "my_run"
    assert parse_config({"name": "a b/c"}).name == "a_b_c"


def test_hash_ignores_key_order_name_and_seeds():
    a = parse_config({"task": "rte", "finetune": {"lr": 3e-5, "epochs": 2}, "seeds": [1]})
    b = parse_config({"finetune": {"epochs": 2, "lr": 3e-5}, "task": "rte", "name": "other", "seeds": [1, 2]})
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != parse_config({"task": "rte"}).config_hash()


def test_explicit_zero_and_false_are_kept():
    cfg = parse_config({"finetune": {"warmup": 0, "group_by_length": False}})
    assert cfg.finetune.warmup == 0 and cfg.finetune.group_by_length is False


@pytest.mark.parametrize(
    "text, message",
    [
        ("finetune:\n  lrr: 1.0e-5\n", "finetune.lrr: unknown key (did you mean 'lr'?)"),
        ("finetun: {}\n", "finetun: unknown key (did you mean 'finetune'?)"),
        ("finetune: {lr: fast}\n", "finetune.lr: Input should be a valid number"),
        ("task: mrcp\n", "task: 'mrcp' is not valid"),
        ("recipe: {name: fp16}\n", "recipe: unknown recipe 'fp16' (did you mean 'fp32'?)"),
        ("recipe: {name: fp32, bits: 4}\n", "recipe.bits: unknown key"),
        ("seeds: []\n", "seeds: List should have at least 1 item"),
        ("seeds: [1, 1]\n", "seeds: seeds must be distinct"),
        ("data: {train_from_eval: 1.5}\n", "data.train_from_eval: Input should be less than 1"),
        ("task: squad\nfinetune: {max_seq_len: 128, doc_stride: 128}\n", "doc_stride (128) must be well below"),
        ("export: {formats: [tflite]}\n", "export.formats: unknown export format 'tflite'"),
        ("recipe: {name: gobo}\nexport: {formats: [onnx]}\n", "export.formats: recipe gobo cannot write 'onnx'"),
        ("task: [mrpc\n", "invalid YAML: line"),
        ("task: mrpc\ntask: rte\n", "duplicate key 'task'"),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_bad_configs_give_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(QbertError) as info:
        load_config(path)
    rendered = info.value.render()
    assert rendered.startswith(str(path))
    assert message in rendered
    assert "\n" not in rendered


def test_missing_file(tmp_path):
    with pytest.raises(QbertError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_set_nested_values_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: mrpc\nfinetune: {lr: 1.0e-5}\n")
    cfg = load_config(path, ["finetune.lr=3e-5", "seeds=[1,2]", "data.max_train_samples=100", "task=rte"])
    assert cfg.finetune.lr == 3e-5 and cfg.seeds == [1, 2]
    assert cfg.data.max_train_samples == 100 and cfg.task == "rte"


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.lr", "is not key.path=value"),
        ("finetune.lr=abc", "finetune.lr: Input should be a valid number"),
        ("finetune.nope=1", "finetune.nope: unknown key"),
        ("task.x=1", "task is not a mapping"),
        ("seeds=[1,", "invalid YAML"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("task: mrpc\n")
    with pytest.raises(QbertError) as info:
        load_config(path, [override])
    assert message in info.value.render()


def test_overrides_do_not_mutate_input():
    raw = {"finetune": {"lr": 1e-5}}
    apply_overrides(raw, ["finetune.lr=2e-5"])
    assert raw == {"finetune": {"lr": 1e-5}}


def test_site_rules_keep_their_order_through_the_resolved_config():
    rules = {"ffn.output": {"bits": 16}, "layer.1.ffn.output": None}
    a = parse_config({"recipe": {"name": "w8a8_ptq", "sites": rules}})
    b = parse_config({"recipe": {"name": "w8a8_ptq", "sites": dict(reversed(list(rules.items())))}})
    assert a.config_hash() != b.config_hash()  # order decides which rule wins
    again = parse_config(a.resolved())
    assert again.config_hash() == a.config_hash() and list(again.recipe.sites) == list(rules)
    # configs without rules hash as they did before rules were ordered
    assert parse_config({"recipe": {"name": "w8a8_ptq"}}).resolved()["recipe"]["sites"] == {}


# ---------------------------------------------------------------- config hash across versions

def _schema_keys() -> tuple[set[str], dict[str, set[str]]]:
    from qbert.recipes import available, get_recipe

    from qbert.config import ExperimentConfig, hashed_data

    def keys(d: dict, prefix: str = "") -> list[str]:
        out: list[str] = []
        for k, v in d.items():
            if isinstance(v, dict) and v and k != "recipe":
                out += keys(v, f"{prefix}{k}.")
            else:
                out.append(prefix + k)
        return out

    config = {k for k in keys(hashed_data(ExperimentConfig().resolved())) if not k.startswith("recipe")}
    return config, {n: set(get_recipe(n).Params.model_fields) for n in available()}


def test_every_key_added_since_the_hash_snapshot_is_hash_neutral():
    """A key added to the schema without a HASH_NEUTRAL entry would re-hash (orphan) every earlier result."""
    import json

    from qbert.config import HASH_NEUTRAL

    snapshot = json.loads((ROOT / "tests" / "data" / "hashed_keys.json").read_text())
    config, recipes = _schema_keys()
    added = {k for k in config if k not in snapshot["config"]}
    for name, fields in recipes.items():
        if name in snapshot["recipes"]:  # a new recipe has new hashes anyway
            added |= {f"recipe.{f}" for f in fields if f not in snapshot["recipes"][name]}
    assert not added - set(HASH_NEUTRAL), f"register in qbert.config.HASH_NEUTRAL: {sorted(added - set(HASH_NEUTRAL))}"


def test_a_key_at_its_neutral_value_does_not_change_the_hash(monkeypatch):
    import qbert.config as config_module
    from qbert.config import hashed_data, stable_hash

    resolved = parse_config({"recipe": {"name": "peg"}}).resolved()
    before = stable_hash(hashed_data(resolved))
    monkeypatch.setitem(config_module.HASH_NEUTRAL, "estimator.new_option", "as_before")
    monkeypatch.setitem(config_module.HASH_NEUTRAL, "recipe.new_param", 0)
    later = {**resolved, "estimator": {**resolved["estimator"], "new_option": "as_before"},
             "recipe": {**resolved["recipe"], "new_param": 0}}
    assert stable_hash(hashed_data(later)) == before
    changed = {**later, "estimator": {**later["estimator"], "new_option": "other"}}
    assert stable_hash(hashed_data(changed)) != before
    assert stable_hash(hashed_data({**resolved, "name": "x", "seeds": [1, 2]})) == before


def test_config_hashes_of_committed_configs_are_stable():
    """The hashes the README's results were written under (a change here orphans them)."""
    assert load_config(ROOT / "configs" / "mrpc_peg.yaml").config_hash() == "4d4f24c16edd"
    assert load_config(ROOT / "configs" / "mrpc_w8a8_ptq.yaml").config_hash() == "7c9d3bba12ad"


def test_a_folder_or_pipe_given_as_config_is_named_as_such(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.yaml")  # reading it would wait forever
    for path in (tmp_path, tmp_path / "pipe.yaml"):
        with pytest.raises(QbertError, match="not a regular file"):
            load_config(path)


def test_auto_precision_is_decided_where_the_run_starts_and_hashed_as_the_choice(monkeypatch):
    import platform

    import qbert.pipeline.finetune as finetune
    from qbert.pipeline.finetune import resolve_hardware

    base = {"name": "p", "finetune": {"device": "cpu"}}
    explicit = {p: parse_config({**base, "finetune": {"device": "cpu", "precision": p}}) for p in ("fp32", "bf16")}
    auto = parse_config({**base, "finetune": {"device": "cpu", "precision": "auto"}})
    assert auto.finetune.precision == "auto"  # reading a config probes no hardware
    monkeypatch.setattr(finetune, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # an AVX2-only x86 CPU
    avx2 = resolve_hardware(auto)
    assert avx2.finetune.precision == "fp32" and avx2.resolved()["finetune"]["precision"] == "fp32"
    assert avx2.config_hash() == explicit["fp32"].config_hash() and auto.finetune.precision == "auto"
    monkeypatch.setattr(finetune, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16", "amx_bf16"}))
    amx = resolve_hardware(auto)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert amx.finetune.precision == ("bf16" if x86 else "fp32")  # other CPUs: unknown, so fp32
    assert amx.config_hash() == explicit[amx.finetune.precision].config_hash()
    monkeypatch.setattr(finetune, "cpu_flags", lambda: None)  # no /proc/cpuinfo
    assert resolve_hardware(auto).finetune.precision == "fp32"
    assert resolve_hardware(explicit["bf16"]) is explicit["bf16"]  # an explicit choice is kept
