"""The round-based self-training loop shared by Pseudo-Label and Noisy Student.

Self-training in its oldest form (Yarowsky 1995; Scudder 1965): a model trained on
the labelled data labels the unlabelled data, the confident part of those labels is
added to the training set, a model is trained again, and so on. Per round:

  1. the teacher predicts class probabilities on the unlabelled images in inference
     mode (no augmentation, no dropout, BN moving statistics: Noisy Student insists
     the teacher is *not* noised, Xie et al. 2020, sec. 2);
  2. `select_pseudo_labels` keeps the confident ones, optionally class-balanced;
  3. a student (a fresh model, or the teacher's weights continued) trains on
     labelled + pseudo-labelled examples with the student's own noise;
  4. the student becomes the next round's teacher.

The recipe built by `make_model` carries the method's hyperparameters (rounds,
threshold, hard/soft labels, balancing, weight of pseudo-labelled examples, whether
the student starts from the teacher), so one loop serves both methods. It is a plain
Python function so the CLI can call it directly (`--recipe=pseudo_label` or
`--recipe=noisy_student`).
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from recipes.checkpointing import RoundCheckpoint, noted_wall_time
from recipes.semi.finetune import classifier_dataset, default_optimizer, fit_classifier, last_loss
from recipes.semi.losses import select_pseudo_labels

SAVE_EVERY_STEPS = 500  # a checkpointed round saves its model this often while it trains


class SelfTrainingMixin:
    """Hyperparameters of a round-based self-training method (mixed into a FineTune).

    Args:
      rounds: teacher -> student iterations after the initial teacher.
      threshold: keep an unlabelled example when its top class probability >= this.
      hard_labels: train on argmax labels (True) or on the teacher's probabilities.
      per_class: keep at most this many pseudo-labelled examples per class (None: all).
      fill_classes: repeat examples of classes with fewer than `per_class` up to it.
      unlabelled_weight: loss weight of a pseudo-labelled example relative to a
        labelled one (Lee 2013's alpha).
      init_from_teacher: the student starts from the teacher's weights (and must share
        its architecture) instead of from its own initialization.
      student_steps_scale: a student trains this many times the teacher's steps (or
        epochs). The teacher learns from the few labels; a student's training set is
        that plus tens of thousands of pseudo-labelled images, which the teacher's
        budget covers only once or twice.
      unlabelled_ratio: pseudo-labelled rows per labelled row in every student batch
        (the Noisy Student code's `unlabel_ratio`; Lee 2013's loss also averages the two
        parts separately). None: one shuffled set, where 100 labels among 30,000
        pseudo-labels are seen about twice per student. The batch size stays the same;
        the labelled rows are cycled.
    """

    def _init_self_training(self, rounds, threshold, hard_labels, per_class, fill_classes,
                            unlabelled_weight, init_from_teacher, student_steps_scale=1.0,
                            unlabelled_ratio=None):
        if int(rounds) < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds!r}.")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}.")
        self.rounds = int(rounds)
        self.threshold = float(threshold)
        self.hard_labels = bool(hard_labels)
        self.per_class = None if per_class is None else int(per_class)
        self.fill_classes = bool(fill_classes)
        self.unlabelled_weight = float(unlabelled_weight)
        self.init_from_teacher = bool(init_from_teacher)
        if float(student_steps_scale) <= 0:
            raise ValueError(f"student_steps_scale must be > 0, got {student_steps_scale!r}.")
        self.student_steps_scale = float(student_steps_scale)
        if unlabelled_ratio is not None and float(unlabelled_ratio) <= 0:
            raise ValueError(f"unlabelled_ratio must be > 0 or None, got {unlabelled_ratio!r}.")
        self.unlabelled_ratio = None if unlabelled_ratio is None else float(unlabelled_ratio)

    def self_training_config(self):
        return {"rounds": self.rounds, "threshold": self.threshold, "hard_labels": self.hard_labels,
                "per_class": self.per_class, "fill_classes": self.fill_classes,
                "unlabelled_weight": self.unlabelled_weight, "init_from_teacher": self.init_from_teacher,
                "student_steps_scale": self.student_steps_scale, "unlabelled_ratio": self.unlabelled_ratio}

    def student_budget(self, epochs, steps):
        """(epochs, steps) of a student, given the teacher's."""
        scaled_steps = None if steps is None else max(1, round(steps * self.student_steps_scale))
        return max(1, round(epochs * self.student_steps_scale)), scaled_steps

    def pseudo_labels(self, probabilities):
        """(indices, targets) of the unlabelled examples this method trains on."""
        return select_pseudo_labels(probabilities, self.threshold, self.per_class, self.fill_classes,
                                    self.hard_labels)

    def student_dataset(self, images_l, labels_l, pseudo_images, pseudo_targets, batch_size, seed=0):
        """Endless training batches of a student: its labels and pseudo-labels, weighted and mixed."""
        labelled = {"image": images_l, "weight": np.ones(len(labels_l), np.float32)}
        pseudo = {"image": pseudo_images, "weight": np.full(len(pseudo_images), self.unlabelled_weight, np.float32)}
        if self.hard_labels:
            labelled["label"], pseudo["label"] = labels_l, np.asarray(pseudo_targets, np.int64)
        else:
            labelled["target"] = np.eye(self.num_classes, dtype=np.float32)[labels_l]
            pseudo["target"] = np.asarray(pseudo_targets, np.float32).reshape(-1, self.num_classes)
        return student_dataset(labelled, pseudo, batch_size, self.unlabelled_ratio, seed)


def student_dataset(labelled, pseudo, batch_size, unlabelled_ratio=None, seed=0):
    """Endless student batches from labelled and pseudo-labelled column dicts.

    Both dicts hold "image", "label" or "target", and "weight". With
    `unlabelled_ratio=None` they are one shuffled set; with a ratio r each batch holds
    round(B / (1 + r)) labelled rows (at least one) and the rest pseudo-labelled, the
    two sets shuffled and repeated independently, and the labelled rows spread evenly
    through the batch so every replica's share has some.
    """
    if unlabelled_ratio is None or len(pseudo["image"]) == 0:
        merged = {key: np.concatenate([labelled[key], pseudo[key]]) for key in labelled}
        return _classifier_dataset(merged, batch_size, seed)
    labelled_rows = min(batch_size - 1, max(1, round(batch_size / (1.0 + unlabelled_ratio))))
    pseudo_rows = batch_size - labelled_rows
    both = tf.data.Dataset.zip((_classifier_dataset(labelled, labelled_rows, seed),
                                _classifier_dataset(pseudo, pseudo_rows, seed + 1)))
    # Row order: labelled row i at fraction (i + 0.5) / labelled_rows of the batch, likewise
    # the pseudo-labelled rows, so a replica's contiguous slice gets its share of each.
    order = np.argsort(np.concatenate([(np.arange(labelled_rows) + 0.5) / labelled_rows,
                                       (np.arange(pseudo_rows) + 0.5) / pseudo_rows]), kind="stable")

    def merge(l, p):
        return {key: tf.gather(tf.concat([l[key], p[key]], axis=0), order) for key in l}

    return both.map(merge).prefetch(tf.data.AUTOTUNE)


def _classifier_dataset(columns, batch_size, seed):
    return classifier_dataset(columns["image"], labels=columns.get("label"), targets=columns.get("target"),
                              weights=columns["weight"], batch_size=batch_size, seed=seed)


def _copy_weights(teacher, student):
    for source, target in ((teacher.encoder, student.encoder), (teacher.classifier, student.classifier)):
        weights = source.get_weights()
        if [w.shape for w in weights] != [w.shape for w in target.get_weights()]:
            raise ValueError("init_from_teacher=True needs a student with the teacher's architecture; "
                             "use init_from_teacher=False for a larger student.")
        target.set_weights(weights)


def run_self_training(make_model, labelled, unlabelled_images, test=None, *, epochs=20, batch_size=64,
                      steps=None, heldout_unlabelled_labels=None, teacher=None, optimizer_fn=None, strategy=None,
                      seed=0, verbose=0, checkpoint_dir=None):
    """Trains a teacher on the labels, then `rounds` teacher -> student rounds.

    Args:
      make_model: `make_model(round) -> recipe` building a fresh, uncompiled model
        (round 0 is the initial teacher); the round-1 model's hyperparameters
        (`rounds`, `threshold`, ...) drive the loop.
      labelled: (uint8 images [L,H,W,C], int labels [L]).
      unlabelled_images: uint8 [N,H,W,C].
      test: optional (images, labels) for per-round test accuracy.
      epochs, batch_size: training of the teacher (epochs count passes over that
        model's training set, labelled + pseudo-labelled for students); students
        train `student_steps_scale` times as long.
      steps: if given, the teacher trains for this many steps instead of `epochs`.
      heldout_unlabelled_labels: true labels of the unlabelled images, if known, to
        measure pseudo-label accuracy (never used for training).
      teacher: a trained classifier (e.g. from `run_finetune`) to skip round 0.
      optimizer_fn: `() -> keras optimizer`, one per model (default: SGD + Nesterov).
      strategy: tf.distribute strategy to build and train under (default: current).
      checkpoint_dir: if given, every finished round's weights and metrics are
        saved there, and a rerun continues after the last finished round (its
        model becomes the teacher); the model in training is saved every
        `SAVE_EVERY_STEPS` steps, and the rerun continues it from there
        (`fit_classifier`), so an interruption costs at most that many steps. A
        round not started yet draws its initial weights afresh, so it need not
        equal an uninterrupted run's.

    Returns:
      (final student, list of per-round metric dicts; round 0 is the teacher).
    """
    strategy = strategy or tf.distribute.get_strategy()
    images_l, labels_l = np.asarray(labelled[0]), np.asarray(labelled[1], np.int64)
    unlabelled_images = np.asarray(unlabelled_images)
    truth = None if heldout_unlabelled_labels is None else np.asarray(heldout_unlabelled_labels)
    if truth is not None and len(truth) != len(unlabelled_images):
        raise ValueError(f"heldout_unlabelled_labels has {len(truth)} rows for {len(unlabelled_images)} images.")

    def build(round_index):
        with strategy.scope():
            model = make_model(round_index)
            model.compile(optimizer=optimizer_fn() if optimizer_fn else default_optimizer())
        return model

    def evaluate(model, round_index, **extra):
        row = {"round": round_index, "num_labelled": int(len(labels_l)), **extra}
        if test is not None:
            row["test_accuracy"] = model.accuracy(*test, batch_size=batch_size * 4)
        return row

    checkpoint = RoundCheckpoint(checkpoint_dir) if checkpoint_dir else None

    def progress_dir(round_index):
        return checkpoint.progress_dir(round_index) if checkpoint else None

    def timed_fit(model, round_index, **data):
        """fit_classifier, checkpointed per round; returns (history, training seconds of every
        session of this round: a resumed round counts the time noted before the interruption)."""
        started = time.time()
        history = fit_classifier(model, batch_size=batch_size, verbose=verbose, save_every=SAVE_EVERY_STEPS,
                                 checkpoint_dir=progress_dir(round_index), **data)
        seconds = noted_wall_time(progress_dir(round_index)) if checkpoint else None
        return history, round(time.time() - started if seconds is None else seconds, 2)

    metrics = checkpoint.finished_rows() if checkpoint else []
    if metrics:  # resuming: the last finished round's model is the teacher
        teacher = build(len(metrics) - 1)
        checkpoint.restore(teacher, len(metrics) - 1)
    else:
        if teacher is None:
            teacher = build(0)
            history, seconds = timed_fit(teacher, 0, images=images_l, labels=labels_l, epochs=epochs, steps=steps,
                                         seed=seed)
            metrics.append(evaluate(teacher, 0, train_loss=last_loss(history), train_wall_time_s=seconds))
        else:
            metrics.append(evaluate(teacher, 0))
        if checkpoint:
            checkpoint.save(teacher, metrics)

    student = build(1)  # its hyperparameters (rounds, threshold, ...) drive the loop
    for round_index in range(len(metrics), student.rounds + 1):
        if round_index > 1:
            student = build(round_index)
        probabilities = teacher.predict_proba(unlabelled_images, batch_size=batch_size * 4)
        chosen, pseudo_targets = student.pseudo_labels(probabilities)
        row = {"num_pseudo_labelled": int(len(chosen)),
               "coverage": float(len(np.unique(chosen)) / max(1, len(unlabelled_images)))}
        if truth is not None:
            predicted = probabilities.argmax(axis=1)
            row["teacher_unlabelled_accuracy"] = float(np.mean(predicted == truth))
            unique = np.unique(chosen)
            row["pseudo_label_accuracy"] = float(np.mean(predicted[unique] == truth[unique])) if len(unique) else None

        if student.init_from_teacher:
            _copy_weights(teacher, student)
        student_epochs, student_steps = student.student_budget(epochs, steps)
        dataset = student.student_dataset(images_l, labels_l, unlabelled_images[chosen], pseudo_targets,
                                          batch_size, seed=seed + round_index)
        history, seconds = timed_fit(student, round_index, dataset=dataset,
                                     num_examples=len(labels_l) + len(chosen), epochs=student_epochs,
                                     steps=student_steps)
        metrics.append(evaluate(student, round_index, train_loss=last_loss(history), train_wall_time_s=seconds,
                                **row))
        if checkpoint:
            checkpoint.save(student, metrics)
        teacher = student
    return teacher, metrics
