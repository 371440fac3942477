"""The fine-tuned checkpoint cache: one trainer per key across processes, atomic appearance."""

import multiprocessing
import time

import pytest

from qbert.pipeline.checkpoint import cached_checkpoint


def slow_train(folder):
    (folder / "weights.txt").write_text("w")
    with open(folder.parent / "trainings.log", "a") as log:
        log.write("trained\n")
    time.sleep(1.0)
    return {"seconds": 1.0}


def worker(root, results):
    folder, info, cached = cached_checkpoint(root, "k1", {"x": 1}, slow_train)
    results.put((str(folder), cached, (folder / "weights.txt").read_text()))


def test_two_processes_train_a_checkpoint_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(tmp_path, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert (tmp_path / "trainings.log").read_text() == "trained\n"
    assert [o[1] for o in outcomes] == [False, True]  # one trained, the other waited and reused
    assert all(o[2] == "w" for o in outcomes)


def test_failed_training_leaves_no_checkpoint(tmp_path):
    def broken(folder):
        (folder / "partial.bin").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_checkpoint(tmp_path, "k2", {}, broken)
    assert not (tmp_path / "k2").exists()
    assert not list(tmp_path.glob("k2.tmp-*"))
    folder, info, cached = cached_checkpoint(tmp_path, "k2", {}, lambda f: {"ok": True})
    assert info == {"ok": True} and cached is False
    assert cached_checkpoint(tmp_path, "k2", {}, broken)[2] is True  # now reused, never retrained


def test_leftovers_of_a_killed_training_are_removed(tmp_path):
    (tmp_path / "k3.tmp-12345").mkdir()
    (tmp_path / "k3.tmp-12345" / "partial.bin").write_text("half")
    cached_checkpoint(tmp_path, "k3", {}, lambda f: {"ok": True})
    assert not list(tmp_path.glob("k3.tmp-*")) and (tmp_path / "k3" / "finetune.json").is_file()


def _train_weights(folder):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.arange(1000, dtype=torch.float32)}, folder / "model.safetensors")
    with open(folder.parent / "trainings.log", "a") as log:
        log.write("trained\n")
    return {"steps": 1}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "record"])
def test_a_damaged_checkpoint_is_moved_aside_and_trained_again(tmp_path, capsys, damage):
    """Every checkpoint records its files' sizes and SHA-256 (hashlib here, independently); a checkpoint that
    no longer matches is moved aside with a warning and retrained, never loaded."""
    import hashlib
    import json

    folder, _, _ = cached_checkpoint(tmp_path, "k4", {}, _train_weights)
    weights = folder / "model.safetensors"
    record = json.loads((folder / "finetune.json").read_text())
    assert record["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    assert record["files"]["model.safetensors"]["size"] == weights.stat().st_size
    assert cached_checkpoint(tmp_path, "k4", {}, _train_weights)[2] is True
    original = weights.read_bytes()
    data = bytearray(original)
    if damage == "flip":
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[:-100]))
    elif damage == "delete":
        weights.unlink()
    else:
        (folder / "finetune.json").write_text('{"key": "k4", "trai')
    capsys.readouterr()
    again, _, cached = cached_checkpoint(tmp_path, "k4", {}, _train_weights)
    assert cached is False and (tmp_path / "trainings.log").read_text() == "trained\n" * 2
    assert "is damaged" in capsys.readouterr().err
    aside = list(tmp_path.glob("k4.damaged-*"))
    assert len(aside) == 1 and (again / "model.safetensors").read_bytes() == original


def test_a_checkpoint_from_before_checksums_is_checked_by_reading_it(tmp_path, capsys):
    import json

    folder, _, _ = cached_checkpoint(tmp_path, "k5", {}, _train_weights)
    record = json.loads((folder / "finetune.json").read_text())
    del record["files"]
    (folder / "finetune.json").write_text(json.dumps(record))
    assert cached_checkpoint(tmp_path, "k5", {}, _train_weights)[2] is True  # read fine: checksums recorded now
    assert "files" in json.loads((folder / "finetune.json").read_text())
    (folder / "finetune.json").write_text(json.dumps(record))
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:50])
    assert cached_checkpoint(tmp_path, "k5", {}, _train_weights)[2] is False
    assert "model.safetensors" in capsys.readouterr().err


def test_an_explicit_thread_count_is_part_of_the_checkpoint_key():
    """Thread counts change the summation order and so the weights' last bits: a config that sets
    finetune.threads gets its own checkpoint; unset, the key is the one earlier checkpoints have."""
    from qbert.config import parse_config
    from qbert.pipeline.checkpoint import finetune_key

    def key(threads):
        cfg = parse_config({"model": "tiny-random", "finetune": {"threads": threads}})
        return finetune_key(cfg, 0, {"alias": "tiny-random"}, {"file": "x"})

    (unset, unset_data), (one, _), (two, _) = key(None), key(1), key(2)
    assert len({unset, one, two}) == 3
    assert "threads" not in unset_data["finetune"] and "device" not in unset_data["finetune"]
    assert key(1)[0] == one


def test_a_long_wait_for_a_checkpoint_is_announced_and_a_short_one_is_not(tmp_path, capsys, monkeypatch):
    """A worker waiting on another's 24-minute fine-tuning printed nothing: it looked hung."""
    import os
    import threading

    import qbert.runs
    from qbert.runs import pid_lock

    monkeypatch.setattr(qbert.runs, "QUIET_WAIT_S", 0.3)
    for hold, announced in ((0.1, False), (1.0, True)):
        key = f"k{hold}"
        taken = threading.Event()

        def holder(key, taken, hold):
            with pid_lock(tmp_path / f"{key}.lock"):  # another process, as far as the lock can tell
                taken.set()
                time.sleep(hold)

        thread = threading.Thread(target=holder, args=(key, taken, hold))
        thread.start()
        taken.wait()
        folder, _, cached = cached_checkpoint(tmp_path, key, {}, lambda f: {"ok": True})
        thread.join()
        err = capsys.readouterr().err
        assert not cached and folder.is_dir()
        assert (f"another process (pid {os.getpid()}) holds the fine-tuned checkpoint" in err) is announced, err


def _publish_training_state(root):
    from qbert.pipeline.finetune import save_training_state

    save_training_state(root / "k.resume.pt", {"identity": "x", "step": 3})


def _publish_checkpoint(root):
    def train(folder):
        (folder / "weights.bin").write_bytes(b"w" * 100)
        (folder / "sub").mkdir()
        (folder / "sub" / "vocab.txt").write_text("a\nb\n")
        return {"ok": True}

    cached_checkpoint(root, "k", {}, train)


def _publish_tensors(root):
    import numpy as np

    from qbert.quant.fileformat import save_tensors

    save_tensors(root / "model.safetensors", {"w": np.arange(6, dtype=np.int8)}, {"format": "t"})


def _publish_text(root):
    from qbert.runs import atomic_write_text

    atomic_write_text(root / "metrics.json", "{}\n")


def _publish_rerun(root):
    from qbert.runs import replace_folder

    (root / "seed=42").mkdir()
    (root / "seed=42" / "metrics.json").write_text("{}")
    (root / ".seed=42.rerun").mkdir()
    (root / ".seed=42.rerun" / "metrics.json").write_text('{"accuracy": 1}')
    replace_folder(root / ".seed=42.rerun", root / "seed=42")


@pytest.mark.parametrize("publish", [_publish_training_state, _publish_checkpoint, _publish_tensors, _publish_text,
                                     _publish_rerun])
def test_every_published_file_reaches_the_disk_before_its_rename(tmp_path, monkeypatch, publish):
    """A rename can reach the disk before the data it names: each file (and folder) is fsynced before the
    rename that publishes it, so a power cut leaves the old file or the whole new one."""
    import os
    from pathlib import Path

    synced: set[Path] = set()
    published: list[Path] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        src = Path(src)
        if Path(dst).name.startswith("."):  # moving the old one aside: nothing is published
            return real_replace(src, dst)
        entries = [src, *src.rglob("*")] if src.is_dir() else [src]
        late = [str(p.relative_to(tmp_path)) for p in entries if p.resolve() not in synced]
        assert not late, f"renamed before reaching the disk: {late}"
        published.append(Path(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    publish(tmp_path.resolve())
    assert published  # the publisher did rename something into place
