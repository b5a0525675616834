"""Fine-tuning, Pseudo-Label and Noisy Student: the round loop, its metrics, and that it helps."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from recipes.base import RECIPES
from recipes.semi.finetune import FineTune, run_finetune
from recipes.semi.noisy_student import NoisyStudent, run_noisy_student
from recipes.semi.pseudo_label import PseudoLabel, run_pseudo_label
from recipes.semi.self_training import _copy_weights, student_dataset


def _shapes(n, seed, size=16, noise=75.0):
    """Filled squares, rings and crosses (classes 0, 1, 2) at random places on a noisy background."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 3, n)
    images = rng.normal(40, noise, (n, size, size))
    for i in range(n):
        r, c = rng.randint(1, size - 9, 2)
        v = rng.uniform(120, 220)
        if labels[i] == 0:
            images[i, r + 1:r + 7, c + 1:c + 7] += v
        elif labels[i] == 1:
            images[i, r:r + 8, c:c + 8] += v
            images[i, r + 2:r + 6, c + 2:c + 6] -= v
        else:
            images[i, r + 3:r + 5, c:c + 8] += v
            images[i, r:r + 8, c + 3:c + 5] += v
            images[i, r + 3:r + 5, c + 3:c + 5] -= v
    return images.clip(0, 255).astype("uint8")[..., None], labels.astype("int64")


def _tiny_encoder():
    """A two-layer CNN: enough for the shapes, small enough to train in seconds."""
    images = keras.Input((16, 16, 1))
    x = keras.layers.Rescaling(1 / 255.0)(images)
    x = keras.layers.Conv2D(16, 3, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    return keras.Model(images, keras.layers.GlobalMaxPooling2D()(x))


def _adam():
    return keras.optimizers.Adam(3e-3)


def test_recipes_are_registered_and_record_their_hyperparameters():
    assert {"finetune", "pseudo_label", "noisy_student", "fixmatch"} <= set(RECIPES)
    # The tiny test encoder has no residual blocks, hence no stochastic depth.
    config = NoisyStudent(_tiny_encoder(), 3, rounds=2, per_class=50, label_count=9, stochastic_depth=0).get_config()
    assert config["rounds"] == 2 and config["threshold"] == 0.3 and config["per_class"] == 50
    assert config["hard_labels"] is False and config["dropout"] == 0.5 and config["augment"] == "strong"
    assert config["strong_policy"] == {"num_ops": 2, "magnitude": 0.9, "cutout": 0.0}
    assert config["num_classes"] == 3 and config["label_count"] == 9
    config = PseudoLabel(_tiny_encoder(), 3).get_config()
    assert config["threshold"] == 0.95 and config["hard_labels"] is True and config["init_from_teacher"]
    with pytest.raises(ValueError, match="augment"):
        FineTune(_tiny_encoder(), 3, augment="heavy")
    with pytest.raises(ValueError, match="threshold"):
        PseudoLabel(_tiny_encoder(), 3, threshold=1.5)


def test_finetune_learns_and_trains_on_soft_weighted_targets():
    keras.utils.set_random_seed(0)
    images, labels = _shapes(48, seed=0, noise=30.0)
    model, metrics = run_finetune(_tiny_encoder(), 3, images, labels, test=(images, labels), epochs=30,
                                  batch_size=16, optimizer=_adam(), augment="none")
    assert metrics["test_accuracy"] > 0.8 and metrics["protocol"]["labelled"] == 48
    assert model.get_config()["label_count"] == 48
    # Soft targets + per-example weights: a zero weight removes an example from the loss.
    targets = np.eye(3, dtype=np.float32)[labels]
    batch = {"image": tf.constant(images[:8]), "target": tf.constant(targets[:8]),
             "weight": tf.constant([1.0] * 4 + [0.0] * 4)}
    loss, _, _ = model.loss_and_gradients(batch)
    half = {"image": batch["image"][:4], "target": batch["target"][:4]}
    model_loss_half, _, _ = model.loss_and_gradients(half)
    np.testing.assert_allclose(float(loss) * 2, float(model_loss_half), rtol=1e-5)


def test_pseudo_label_rounds_report_coverage_and_accuracies():
    keras.utils.set_random_seed(0)
    labelled = _shapes(12, seed=1, noise=30.0)
    unlabelled, truth = _shapes(60, seed=2, noise=30.0)
    test = _shapes(60, seed=3, noise=30.0)
    model, metrics = run_pseudo_label(_tiny_encoder, 3, labelled, unlabelled, test, steps=30, batch_size=12,
                                      heldout_unlabelled_labels=truth, optimizer_fn=_adam, rounds=2,
                                      threshold=0.5, augment="none")
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for row in metrics[1:]:
        assert 0.0 <= row["coverage"] <= 1.0 and row["num_pseudo_labelled"] == round(row["coverage"] * 60)
        assert {"test_accuracy", "pseudo_label_accuracy", "teacher_unlabelled_accuracy"} <= set(row)
    assert isinstance(model, PseudoLabel) and model.exported_encoder is model.encoder
    np.testing.assert_allclose(model.exported_classifier(test[0].astype("float32")), model.predict_proba(test[0]),
                               rtol=1e-5, atol=1e-6)  # the published classifier is the last student


def test_students_train_student_steps_scale_times_the_teachers_steps():
    keras.utils.set_random_seed(0)
    labelled = _shapes(12, seed=1, noise=30.0)
    unlabelled, _ = _shapes(24, seed=2, noise=30.0)
    optimizers_built = []

    def optimizer():
        optimizers_built.append(None)
        return _adam()

    student, _ = run_pseudo_label(_tiny_encoder, 3, labelled, unlabelled, steps=4, batch_size=12,
                                  optimizer_fn=optimizer, rounds=1, threshold=0.0, augment="none",
                                  student_steps_scale=2.5)
    assert len(optimizers_built) == 2  # the teacher and one student, each with its own optimizer
    assert int(student.optimizer.iterations) == 10  # 4 teacher steps x 2.5
    with pytest.raises(ValueError, match="student_steps_scale"):
        PseudoLabel(_tiny_encoder(), 3, student_steps_scale=0)


def _columns(first_id, n, weight, hard=True):
    """Images whose every pixel is the row's id, so a batch row tells where it came from."""
    ids = np.arange(first_id, first_id + n)
    columns = {"image": np.repeat(ids.astype(np.uint8), 4).reshape(n, 2, 2, 1),
               "weight": np.full(n, weight, np.float32)}
    if hard:
        columns["label"] = ids % 3
    else:
        columns["target"] = np.eye(3, dtype=np.float32)[ids % 3]
    return columns


def test_student_batches_hold_labelled_rows_at_the_unlabelled_ratio_spread_evenly():
    labelled, pseudo = _columns(0, 4, 1.0, hard=False), _columns(100, 90, 0.5, hard=False)
    batches = list(student_dataset(labelled, pseudo, batch_size=16, unlabelled_ratio=3.0, seed=0).take(12))
    seen = []
    for batch in batches:
        ids = batch["image"].numpy()[:, 0, 0, 0]
        is_labelled = ids < 100
        assert is_labelled.sum() == 4  # round(16 / (1 + 3))
        # one labelled row in every quarter of the batch: each of 2 or 4 replicas gets its share
        assert is_labelled.reshape(4, 4).sum(axis=1).tolist() == [1, 1, 1, 1]
        np.testing.assert_array_equal(batch["weight"].numpy(), np.where(is_labelled, 1.0, 0.5))
        np.testing.assert_array_equal(batch["target"].numpy().argmax(axis=1), ids % 3)
        seen.extend(ids.tolist())
    # the 4 labelled rows cycle once per batch; the 90 pseudo-labelled ones are each seen ~once
    assert all(seen.count(i) == 12 for i in range(4))
    assert set(range(100, 190)) <= set(seen)
    # no ratio: one shuffled set, each row equally likely (4 labelled rows in 94)
    mixed = [b["image"].numpy()[:, 0, 0, 0] for b in student_dataset(labelled, pseudo, 16, None).take(47)]
    assert sum(int((ids < 100).sum()) for ids in mixed) == 32  # 47 x 16 rows = 8 passes over the 94
    with pytest.raises(ValueError, match="unlabelled_ratio"):
        PseudoLabel(_tiny_encoder(), 3, unlabelled_ratio=0)


def test_student_starts_from_teacher_only_with_equal_architecture():
    keras.utils.set_random_seed(0)
    teacher, student = PseudoLabel(_tiny_encoder(), 3), PseudoLabel(_tiny_encoder(), 3)
    _copy_weights(teacher, student)
    for a, b in zip(teacher.get_weights(), student.get_weights()):
        np.testing.assert_array_equal(a, b)
    wider = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Flatten(), keras.layers.Dense(8)])
    with pytest.raises(ValueError, match="init_from_teacher=False"):
        _copy_weights(teacher, PseudoLabel(wider, 3))


def test_noisy_students_first_teacher_is_unnoised_unless_asked():
    """Algorithm 1, step 1: the first teacher learns the labels without the student's noise."""
    labelled = _shapes(9, seed=4)
    unlabelled, _ = _shapes(32, seed=2)
    for teacher_noise, expected in ((False, ("weak", 0.0)), (True, ("strong", 0.5))):
        teacher, metrics = run_noisy_student(_tiny_encoder, 3, labelled, unlabelled, steps=2, batch_size=8,
                                             optimizer_fn=_adam, rounds=0, stochastic_depth=0,
                                             teacher_noise=teacher_noise)
        assert len(metrics) == 1 and (teacher.augment, teacher.dropout) == expected
        assert teacher.get_config()["teacher_noise"] is teacher_noise


def test_noisy_student_beats_its_teacher():
    """One round on a task where 9 labels leave the teacher at ~89% test accuracy.

    The teacher labels 600 unlabelled images without noise; the 120 most confident
    per class (threshold 0.6, hard labels) train a student under input noise
    (flip + translate) and dropout 0.5. The student starts from the teacher's
    weights (the paper trains it from scratch; starting from the teacher lets this
    test use few steps). Deterministic: fixed data, initialization and shuffling seeds.
    """
    keras.utils.set_random_seed(0)
    labelled = _shapes(9, seed=4)
    unlabelled, truth = _shapes(600, seed=2)
    test = _shapes(600, seed=3)
    student, metrics = run_noisy_student(
        _tiny_encoder, 3, labelled, unlabelled, test, steps=300, batch_size=16,
        heldout_unlabelled_labels=truth, optimizer_fn=_adam, rounds=1, augment="weak", hard_labels=True,
        threshold=0.6, per_class=120, init_from_teacher=True, stochastic_depth=0)
    teacher_row, student_row = metrics
    assert student_row["num_pseudo_labelled"] == 360  # 120 per class
    # Filtering works: the kept pseudo-labels are more accurate than the teacher's labels overall.
    assert student_row["pseudo_label_accuracy"] > student_row["teacher_unlabelled_accuracy"]
    assert student_row["test_accuracy"] >= teacher_row["test_accuracy"] + 0.05, metrics
    assert isinstance(student, NoisyStudent)
    # Published: the student in inference mode (its dropout off), as evaluated.
    np.testing.assert_allclose(student.exported_classifier(test[0][:50].astype("float32")),
                               student.predict_proba(test[0][:50]), rtol=1e-5, atol=1e-6)
