"""benchmarks/carry.py: a run packed on one machine resumes from its latest checkpoint on the next."""

import importlib.util
import os

import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("carry", os.path.join(ROOT, "benchmarks", "carry.py"))
carry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(carry)


def _train_and_checkpoint(run_dir, values):
    """A CheckpointManager (as recipes.checkpointing uses) that saved one value per epoch."""
    weight = tf.Variable(0.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(weight=weight), os.path.join(run_dir, "checkpoints"),
                                         max_to_keep=2)
    for epoch, value in enumerate(values, start=1):
        weight.assign(value)
        manager.save(checkpoint_number=epoch)


def test_save_then_restore_resumes_from_the_latest_checkpoint(tmp_path, monkeypatch):
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    machine_a.mkdir(), machine_b.mkdir()
    monkeypatch.chdir(machine_a)
    _train_and_checkpoint("runs/fm", [1.0, 2.0, 3.0])
    for name, text in (("runs/fm/launch.json", "{}"), ("runs/fm/logs/events", "x"), ("runs/fm/embedding.keras", "x"),
                       ("runs/fm.log", "epoch 3\n")):
        os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name, "w") as f:
            f.write(text)

    written = carry.save(["runs/fm", "runs/fm.log"], "carry", skip=("embedding.keras",))
    assert written == ["carry/runs__fm.tar.gz", "carry/runs__fm.log.tar.gz"]
    packed = sorted(carry.members("runs/fm"))
    assert "runs/fm/launch.json" in packed and "runs/fm/checkpoints/checkpoint" in packed
    assert not any("logs" in p or "embedding" in p or "ckpt-2" in p for p in packed), packed  # ckpt-3 only
    assert carry.members("runs/fm", skip=("checkpoints",)) == ["runs/fm/embedding.keras", "runs/fm/launch.json"]

    os.rename("carry", machine_b / "carry")  # what the commit carries to the next machine
    monkeypatch.chdir(machine_b)
    restored, kept = carry.restore("carry")
    assert sorted(restored) == ["runs/fm", "runs/fm.log"] and kept == []
    assert open("runs/fm.log").read() == "epoch 3\n"

    weight = tf.Variable(0.0)
    checkpoint = tf.train.Checkpoint(weight=weight)
    manager = tf.train.CheckpointManager(checkpoint, "runs/fm/checkpoints", max_to_keep=2)
    checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
    assert float(weight.numpy()) == 3.0
    for epoch in (4, 5):  # the resumed run goes on saving, and rotating out the ones not carried
        weight.assign(float(epoch))
        manager.save(checkpoint_number=epoch)
    assert sorted(os.listdir("runs/fm/checkpoints")) == [
        "checkpoint", "ckpt-4.data-00000-of-00001", "ckpt-4.index", "ckpt-5.data-00000-of-00001", "ckpt-5.index"]


def test_restore_never_overwrites_work_already_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _train_and_checkpoint("runs/fm", [1.0])
    carry.save(["runs/fm"], "carry", skip=())
    _train_and_checkpoint("runs/fm", [1.0, 7.0])  # this machine went further
    restored, kept = carry.restore("carry")
    assert restored == [] and kept == ["runs/fm"]
    assert sorted(n for n in os.listdir("runs/fm/checkpoints") if n.endswith(".index")) == ["ckpt-1.index",
                                                                                           "ckpt-2.index"]


def test_bad_paths_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing was packed"):
        carry.save(["runs/missing"], "carry", skip=())
    with pytest.raises(ValueError, match="__"):
        carry.archive_name("runs/a__b")
    assert not os.path.exists("carry")
