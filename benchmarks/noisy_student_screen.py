"""One Noisy Student round, several students from one teacher: which setting lets a student beat it?

    python benchmarks/noisy_student_screen.py \
        --variants='{}' --variants='{"unlabelled_ratio": null}' --variants='{"dropout": 0, "stochastic_depth": 0}'

Fashion-MNIST, 100 labels (10 per class, seed 0), resnet18_small width 0.25. The
teacher is round 0 of `--recipe=noisy_student` (the same seeds, so the same model
the full run starts from: un-noised by default, `--teacher_noise` for the noised 0.658
teacher of the session-10 screens); it labels the unlabelled pool once, and each
variant (a JSON dict of `NoisyStudent` arguments over the defaults, plus "steps")
trains one student on those pseudo-labels. A screen, not the full method: one
round, one seed; the full runs are in benchmarks/label_efficiency.py. Writes
--out as JSON (test accuracy of teacher and students, pseudo-label accuracy,
final training loss, seconds).
"""

import json
import os
import time

import keras
import numpy as np
from absl import app, flags

from recipes import data
from recipes.semi.cli import labelled_split
from recipes.semi.finetune import default_optimizer, fit_classifier
from recipes.semi.noisy_student import NoisyStudent, first_teacher_settings
from zoo import backbones

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("variants", ["{}"], "NoisyStudent arguments over the defaults, as JSON (\"steps\" too).")
flags.DEFINE_integer("labels_per_class", 10, "Labelled images per class.")
flags.DEFINE_integer("steps", 1000, "Training steps of the teacher and (unless a variant says) of each student.")
flags.DEFINE_integer("per_class", 3000, "Pseudo-labels kept per class (the label-efficiency runs' setting).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the split, weights and augmentations.")
flags.DEFINE_bool("teacher_noise", False, "Train the teacher under the student's noise (NoisyStudent teacher_noise).")
flags.DEFINE_string("out", "benchmarks/results/noisy_student_screen.json", "Output JSON.")


def _encoder():
    return backbones.build("resnet18_small", (28, 28, 1), 0.25)


def main(argv):
    del argv
    train_x, train_y = data.load_arrays("fashion_mnist", "train")
    test_x, test_y = data.load_arrays("fashion_mnist", "test")
    labelled_idx, unlabelled_idx = labelled_split(train_y, FLAGS.labels_per_class, None, FLAGS.seed)
    images_l, labels_l = train_x[labelled_idx], train_y[labelled_idx]
    images_u, truth_u = train_x[unlabelled_idx], train_y[unlabelled_idx]
    keras.utils.set_random_seed(FLAGS.seed)  # as recipes.train: round 0's weights match the full run's

    start = time.time()
    settings = first_teacher_settings({"per_class": FLAGS.per_class, "teacher_noise": FLAGS.teacher_noise})
    teacher = NoisyStudent(_encoder(), 10, seed=FLAGS.seed, **settings)
    teacher.compile(optimizer=default_optimizer())
    fit_classifier(teacher, images_l, labels=labels_l, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
                   seed=FLAGS.seed)
    result = {"protocol": {"dataset": "fashion_mnist", "labelled": int(len(labels_l)), "test_split": "test",
                           "backbone": "resnet18_small", "width": 0.25, "batch_size": FLAGS.batch_size,
                           "per_class": FLAGS.per_class, "seed": FLAGS.seed,
                           "teacher_noise": FLAGS.teacher_noise},
              "teacher": {"steps": FLAGS.steps, "test_accuracy": teacher.accuracy(test_x, test_y),
                          "seconds": round(time.time() - start, 1)},
              "students": []}
    print(json.dumps(result["teacher"]), flush=True)
    probabilities = teacher.predict_proba(images_u, FLAGS.batch_size * 4)

    for variant in FLAGS.variants:
        arguments = json.loads(variant)
        steps = int(arguments.pop("steps", FLAGS.steps))
        start = time.time()
        student = NoisyStudent(_encoder(), 10, **{"per_class": FLAGS.per_class, "seed": FLAGS.seed + 1, **arguments})
        student.compile(optimizer=default_optimizer())
        chosen, targets = student.pseudo_labels(probabilities)
        dataset = student.student_dataset(images_l, labels_l, images_u[chosen], targets, FLAGS.batch_size,
                                          seed=FLAGS.seed + 1)
        history = fit_classifier(student, dataset=dataset, steps=steps, batch_size=FLAGS.batch_size)
        row = {"variant": json.loads(variant), "steps": steps, "unlabelled_ratio": student.unlabelled_ratio,
               "num_pseudo_labelled": int(len(chosen)),
               "pseudo_label_accuracy": (float(np.mean(probabilities.argmax(1)[chosen] == truth_u[chosen]))
                                         if len(chosen) else None),
               "train_loss": float(history["loss"][-1]), "test_accuracy": student.accuracy(test_x, test_y),
               "seconds": round(time.time() - start, 1)}
        result["students"].append(row)
        print(json.dumps(row), flush=True)

    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
