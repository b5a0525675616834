"""The training CLI's path for recipes that use labels: finetune, fixmatch, pseudo_label, noisy_student.

`recipes.train` hands over here when --recipe names one of them. The labelled subset
comes from --labels_per_class or --label_fraction (stratified, seeded); the rest of
the training split is the unlabelled pool, its true labels held back only to report
pseudo-label accuracy. Results carry their protocol like every other metric.
"""

from __future__ import annotations

import functools

import numpy as np

from recipes import data
from recipes.evaluate import classification_report

LABEL_RECIPES = ("finetune", "fixmatch", "pseudo_label", "noisy_student")


def check_label_flags(labels_per_class=None, label_fraction=None):
    """The labelled split needs one of the two flags; refused early, before any data is read."""
    if labels_per_class is None and label_fraction is None:
        raise ValueError("Recipes that learn from labels need --labels_per_class=N or --label_fraction=F.")
    if labels_per_class is not None and label_fraction is not None:
        raise ValueError("Give one of --labels_per_class and --label_fraction, not both.")


# Keyword-only arguments of the run functions that train_with_labels sets itself or that take objects
# (--hparams gives JSON values); the others (FixMatch's test_every) are settable by --hparams.
_SET_HERE = {"student_encoder_fn", "epochs", "steps", "log_every", "batch_size", "heldout_unlabelled_labels",
             "strategy", "seed", "verbose", "checkpoint_dir", "teacher", "optimizer", "optimizer_fn"}


def label_run_hparam_names(recipe):
    """Keywords the recipe's run function takes besides the model's own (empty for other recipes).

    With the model's constructor arguments these are what --hparams may set, checked before any
    data is read.
    """
    import inspect

    from recipes.semi.finetune import run_finetune
    from recipes.semi.fixmatch import run_fixmatch
    from recipes.semi.noisy_student import run_noisy_student
    from recipes.semi.pseudo_label import run_pseudo_label

    run = {"finetune": run_finetune, "fixmatch": run_fixmatch, "pseudo_label": run_pseudo_label,
           "noisy_student": run_noisy_student}.get(recipe)
    if run is None:
        return set()
    parameters = inspect.signature(run).parameters.values()
    return {p.name for p in parameters if p.kind == p.KEYWORD_ONLY} - _SET_HERE


def labelled_split(train_labels, labels_per_class=None, label_fraction=None, seed=0):
    check_label_flags(labels_per_class, label_fraction)
    return data.split_labelled(train_labels, fraction=label_fraction, per_class=labels_per_class, seed=seed)


def check_student_encoder(recipe, has_student_encoder):
    """Only Noisy Student trains separate (e.g. wider) students; refused early, before any data is read."""
    if has_student_encoder and recipe != "noisy_student":
        raise ValueError(f"A separate student encoder (--student_width) is for noisy_student, not {recipe!r}.")


def train_with_labels(recipe, encoder_fn, train, test, *, student_encoder_fn=None, labels_per_class=None,
                      label_fraction=None, epochs=10, steps_per_epoch=None, batch_size=64, strategy=None, seed=0,
                      hparams=None, verbose=0, checkpoint_dir=None):
    """Runs one label-using recipe; returns (model, exported encoder, metrics); the model's
    `exported_classifier` is the classifier to publish.

    `checkpoint_dir` makes every run resumable: FixMatch per logged epoch, the
    others every 500 steps (Pseudo-Label and Noisy Student keep finished rounds
    whole). `student_encoder_fn` builds Noisy Student's students (default
    `encoder_fn`), e.g. wider than the teacher.
    """
    from recipes.semi.finetune import run_finetune
    from recipes.semi.fixmatch import run_fixmatch
    from recipes.semi.noisy_student import run_noisy_student
    from recipes.semi.pseudo_label import run_pseudo_label

    hparams = dict(hparams or {})
    check_student_encoder(recipe, student_encoder_fn is not None)
    (train_x, train_y), (test_x, test_y) = train, test
    num_classes = int(max(train_y.max(), test_y.max()) + 1)
    labelled_idx, unlabelled_idx = labelled_split(train_y, labels_per_class, label_fraction, seed)
    labelled = (train_x[labelled_idx], train_y[labelled_idx])
    common = dict(strategy=strategy, seed=seed, verbose=verbose)
    # --steps_per_epoch fixes every model's length to epochs * steps_per_epoch steps; without
    # it an epoch is one pass over that model's own training set (for 100 labels: 1-2 steps).
    steps = epochs * steps_per_epoch if steps_per_epoch else None
    labelled_batches = max(1, len(labelled_idx) // batch_size)  # fit_classifier's epoch
    if steps is None and recipe != "fixmatch" and labelled_batches < 10:
        print(f"Note: without --steps_per_epoch an epoch of the {'fine-tune' if recipe == 'finetune' else 'teacher'} "
              f"is one pass over the {len(labelled_idx)} labelled images, {labelled_batches} step(s) of {batch_size}: "
              f"{epochs * labelled_batches} steps in all. The README's few-label runs pass --steps_per_epoch=100.",
              flush=True)
    if recipe == "finetune":
        model, metrics = run_finetune(encoder_fn(), num_classes, *labelled, (test_x, test_y), epochs=epochs,
                                      steps=steps, batch_size=batch_size, checkpoint_dir=checkpoint_dir,
                                      **common, **hparams)
    elif recipe == "fixmatch":
        steps = steps or epochs * max(1, len(train_x) // batch_size)
        # As in the paper, the whole training split (labels dropped) is the unlabelled pool.
        model, metrics = run_fixmatch(encoder_fn(), num_classes, labelled, train_x, (test_x, test_y), steps=steps,
                                      log_every=steps // epochs,
                                      batch_size=batch_size, heldout_unlabelled_labels=train_y,
                                      checkpoint_dir=checkpoint_dir, **common, **hparams)
    elif recipe in ("pseudo_label", "noisy_student"):
        run = run_pseudo_label
        if recipe == "noisy_student":
            run = functools.partial(run_noisy_student, student_encoder_fn=student_encoder_fn)
        model, rounds = run(encoder_fn, num_classes, labelled, train_x[unlabelled_idx], (test_x, test_y),
                            epochs=epochs, steps=steps, batch_size=batch_size,
                            heldout_unlabelled_labels=train_y[unlabelled_idx], checkpoint_dir=checkpoint_dir,
                            **common, **hparams)
        metrics = {"rounds": rounds, "test_accuracy": rounds[-1].get("test_accuracy")}
        seconds = [row.get("train_wall_time_s") for row in rounds]
        if None not in seconds:  # every round timed (rounds finished before timing existed are not)
            metrics["wall_time_s"] = round(sum(seconds), 2)
    else:
        raise ValueError(f"{recipe!r} is not a label-using recipe ({', '.join(LABEL_RECIPES)}).")
    protocol = {"method": "classifier test accuracy", "dataset_split": "test", "labelled": int(len(labelled_idx)),
                "labels_per_class": labels_per_class, "label_fraction": label_fraction, "epochs": epochs,
                "steps_per_model": steps,
                "batch_size": batch_size, "seed": seed}
    if recipe in ("pseudo_label", "noisy_student"):
        protocol["steps_per_student"] = model.student_budget(epochs, steps)[1]
        protocol["unlabelled_ratio"] = model.unlabelled_ratio
    report = classification_report(test_y, model.predict_proba(test_x).argmax(axis=1), num_classes)
    metrics["classifier"] = {"accuracy": float(metrics["test_accuracy"]), "protocol": protocol,
                             "confusion": report["confusion"], "per_class_recall": report["per_class_recall"]}
    encoder = getattr(model, "exported_encoder", model.encoder)
    return model, encoder, _plain(metrics)


def _plain(value):
    """numpy scalars -> Python, so metrics serialize as JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
