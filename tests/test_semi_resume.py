"""Label recipes survive interruption: FixMatch per epoch, Pseudo-Label / Noisy Student per round
and, inside a round, every few hundred steps.

A crash is simulated in-process: the checkpoint is written, then the run raises.
The rerun with the same arguments must continue, not start over, and end as an
uninterrupted run does.
"""

import keras
import numpy as np
import pytest

from recipes import checkpointing
from recipes.semi import fixmatch, self_training
from recipes.semi.finetune import FineTune, fit_classifier
from recipes.semi.fixmatch import run_fixmatch
from recipes.semi.noisy_student import run_noisy_student
from recipes.semi.pseudo_label import run_pseudo_label
from tests.distributed_utils import two_replica_strategy
from tests.encoders import small_encoder
from tests.test_semi_self_training import _adam, _shapes, _tiny_encoder


class Crash(Exception):
    pass


def _run_until_crash(monkeypatch, run, cls, calls):
    """Runs `run()`, crashing it right after its `calls`-th `cls.save`; then restores `save`."""
    original = cls.save
    count = {"n": 0}

    def save_then_maybe_crash(self, *args, **kwargs):
        original(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == calls:
            raise Crash()

    with monkeypatch.context() as patch, pytest.raises(Crash):
        patch.setattr(cls, "save", save_then_maybe_crash)
        run()


def _fixmatch(checkpoint_dir):
    keras.utils.set_random_seed(0)  # the same initial weights for every run
    labelled = _shapes(12, seed=1)
    unlabelled, truth = _shapes(24, seed=2)
    encoder = small_encoder()
    return run_fixmatch(encoder, 3, labelled, unlabelled, steps=6, log_every=2, batch_size=4, mu=2,
                        threshold=0.3, heldout_unlabelled_labels=truth, checkpoint_dir=checkpoint_dir)


def test_fixmatch_resumes_after_the_last_epoch_and_ends_like_an_uninterrupted_run(monkeypatch, tmp_path, capsys):
    reference, _ = _fixmatch(str(tmp_path / "reference"))

    _run_until_crash(monkeypatch, lambda: _fixmatch(str(tmp_path / "interrupted")), checkpointing.EpochCheckpoint,
                     calls=2)
    capsys.readouterr()
    resumed, metrics = _fixmatch(str(tmp_path / "interrupted"))
    assert "epoch 2 done" in capsys.readouterr().out
    assert int(resumed.optimizer.iterations.numpy()) == 6  # 4 restored + 2 trained, not 6 more
    # Same weights (online and EMA): the resumed run skipped the batches it had already seen.
    for got, expected in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert "mask_rate" in metrics


def test_fixmatch_resume_keeps_earlier_test_accuracies_and_wall_time(monkeypatch, tmp_path):
    def run():
        keras.utils.set_random_seed(0)
        labelled, (unlabelled, _), test = _shapes(12, seed=1), _shapes(24, seed=2), _shapes(30, seed=3)
        return run_fixmatch(small_encoder(), 3, labelled, unlabelled, test, steps=6, log_every=2, test_every=1,
                            batch_size=4, mu=2, threshold=0.3, checkpoint_dir=str(tmp_path))

    clock = {"now": 1000.0}
    monkeypatch.setattr(checkpointing.time, "time", lambda: clock["now"])

    def tick_then_log(self, *args, original=fixmatch.LogTestAccuracy.on_epoch_end):
        clock["now"] += 10.0  # each epoch "takes" 10 s (this callback runs before the checkpoint's)
        original(self, *args)

    monkeypatch.setattr(fixmatch.LogTestAccuracy, "on_epoch_end", tick_then_log)
    _run_until_crash(monkeypatch, run, checkpointing.EpochCheckpoint, calls=2)
    clock["now"] += 3600.0  # time between sessions is not training time
    _, metrics = run()
    assert [step for step, _ in metrics["test_accuracy_by_step"]] == [2, 4, 6]  # the first two from session one
    assert metrics["wall_time_s"] == 30.0


def _pseudo_label(checkpoint_dir):
    keras.utils.set_random_seed(0)
    labelled = _shapes(12, seed=1, noise=30.0)
    unlabelled, truth = _shapes(60, seed=2, noise=30.0)
    return run_pseudo_label(_tiny_encoder, 3, labelled, unlabelled, _shapes(60, seed=3, noise=30.0), steps=20,
                            batch_size=12, heldout_unlabelled_labels=truth, optimizer_fn=_adam, rounds=2,
                            threshold=0.5, augment="none", checkpoint_dir=checkpoint_dir)


def test_self_training_resumes_after_the_last_finished_round(monkeypatch, tmp_path, capsys):
    _, reference = _pseudo_label(str(tmp_path / "reference"))

    # Crash after round 1 is saved (saves: round 0, round 1).
    _run_until_crash(monkeypatch, lambda: _pseudo_label(str(tmp_path / "interrupted")),
                     checkpointing.RoundCheckpoint, calls=2)
    saved = checkpointing.RoundCheckpoint(str(tmp_path / "interrupted")).finished_rows()
    assert [row["round"] for row in saved] == [0, 1]
    capsys.readouterr()
    _, resumed = _pseudo_label(str(tmp_path / "interrupted"))
    assert "Resuming after self-training round 1" in capsys.readouterr().out
    assert [row["round"] for row in resumed] == [0, 1, 2]
    assert resumed[:2] == saved  # finished rounds are not trained again
    # Round 2's teacher is the restored round-1 student: it labels the pool as in the
    # uninterrupted run.
    for key in ("num_pseudo_labelled", "teacher_unlabelled_accuracy", "pseudo_label_accuracy"):
        assert resumed[2][key] == pytest.approx(reference[2][key])


def _noisy_student(checkpoint_dir):
    keras.utils.set_random_seed(0)
    labelled = _shapes(12, seed=1, noise=30.0)
    unlabelled, truth = _shapes(60, seed=2, noise=30.0)
    def residual_encoder():  # a residual block, so the students get stochastic depth as well as dropout
        return small_encoder()

    return run_noisy_student(residual_encoder, 3, labelled, unlabelled, _shapes(60, seed=3, noise=30.0), steps=20,
                             batch_size=12, heldout_unlabelled_labels=truth, optimizer_fn=_adam, rounds=2,
                             threshold=0.5, checkpoint_dir=checkpoint_dir)


@pytest.mark.parametrize("run", [_pseudo_label, _noisy_student], ids=["pseudo_label", "noisy_student"])
def test_self_training_resumes_inside_a_round_and_ends_like_an_uninterrupted_run(run, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(self_training, "SAVE_EVERY_STEPS", 5)
    reference_model, reference = run(str(tmp_path / "reference"))
    assert not list(tmp_path.glob("reference/*_progress"))  # finished rounds drop their progress saves

    # Saves while training: the teacher at steps 5, 10, 15, 20; the round-1 student at 5, 10 -> crash.
    _run_until_crash(monkeypatch, lambda: run(str(tmp_path / "interrupted")), checkpointing.EpochCheckpoint,
                     calls=6)
    capsys.readouterr()
    resumed_model, resumed = run(str(tmp_path / "interrupted"))
    out = capsys.readouterr().out
    assert "Resuming after self-training round 0" in out and "(step 10 done)" in out
    assert int(resumed_model.optimizer.iterations.numpy()) == 20  # round 2 trained whole, once
    assert [row["test_accuracy"] for row in resumed] == pytest.approx([row["test_accuracy"] for row in reference])
    for key in ("num_pseudo_labelled", "pseudo_label_accuracy"):
        assert [row[key] for row in resumed[1:]] == pytest.approx([row[key] for row in reference[1:]])
    # Same final weights: the resumed student skipped the batches it had seen and drew the
    # dropout and stochastic-depth masks (Noisy Student's model noise) an uninterrupted run would.
    for got, expected in zip(resumed_model.get_weights(), reference_model.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_self_training_rounds_count_the_training_time_of_every_session(monkeypatch, tmp_path):
    monkeypatch.setattr(self_training, "SAVE_EVERY_STEPS", 5)
    clock = {"now": 1000.0}
    monkeypatch.setattr(checkpointing.time, "time", lambda: clock["now"])

    def tick_then_save(self, batch, logs=None, original=checkpointing.SaveEverySteps.on_train_batch_end):
        clock["now"] += 1.0  # each step "takes" 1 s
        original(self, batch, logs)

    monkeypatch.setattr(checkpointing.SaveEverySteps, "on_train_batch_end", tick_then_save)
    _, reference = _pseudo_label(str(tmp_path / "reference"))
    # The round-1 student crashes at its step 10 (saves: teacher 5-20, student 5, 10).
    _run_until_crash(monkeypatch, lambda: _pseudo_label(str(tmp_path / "interrupted")),
                     checkpointing.EpochCheckpoint, calls=6)
    clock["now"] += 3600.0  # time between sessions is not training time
    _, resumed = _pseudo_label(str(tmp_path / "interrupted"))
    assert reference[0]["train_wall_time_s"] == 20.0  # the teacher's 20 steps
    assert [row["train_wall_time_s"] for row in resumed] == [row["train_wall_time_s"] for row in reference]


def test_fit_classifier_refuses_checkpointing_with_a_trained_optimizer(tmp_path):
    model = FineTune(_tiny_encoder(), 3, augment="none")
    images, labels = _shapes(12, seed=1)
    fit_classifier(model, images, labels=labels, steps=2, batch_size=4)
    with pytest.raises(ValueError, match="optimizer has not trained"):
        fit_classifier(model, images, labels=labels, steps=2, batch_size=4, checkpoint_dir=str(tmp_path))


def test_fit_classifier_on_two_replicas_resumes_like_an_uninterrupted_run(monkeypatch, tmp_path):
    """Under MirroredStrategy too (its optimizer variables are built up front, mirrored)."""
    strategy = two_replica_strategy()
    images, labels = _shapes(24, seed=1)

    def fine_tune(directory):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = FineTune(_tiny_encoder(), 3, dropout=0.3)
            model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
        fit_classifier(model, images, labels=labels, steps=6, batch_size=8, checkpoint_dir=directory, save_every=2)
        return model

    reference = fine_tune(str(tmp_path / "reference"))
    _run_until_crash(monkeypatch, lambda: fine_tune(str(tmp_path / "interrupted")), checkpointing.EpochCheckpoint,
                     calls=2)
    resumed = fine_tune(str(tmp_path / "interrupted"))
    assert int(resumed.optimizer.iterations.numpy()) == 6
    for got, expected in zip(resumed.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
