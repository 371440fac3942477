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
