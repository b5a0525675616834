"""Which classes does a FixMatch run confuse, and how often is it confidently wrong? Mid-run.

    python benchmarks/fixmatch_snapshot.py --model_dir=runs/label_efficiency/fixmatch_ssl100_10k \
        --init_from=simclr_resnet18_fmnist_28ep

A run started since launch.json exists (recipes.launch) says itself how to rebuild its
model (encoder, dataset, FixMatch hyperparameters): then --model_dir is all it takes, and
the flags below that describe the run are used only for older run directories.

FixMatch trains on its own confident predictions, so a class that the early model
confuses with another can stay confused: the wrong label is confident, hence kept, hence
learnt. This restores the latest checkpoint of a FixMatch run (training or stopped; it
only reads a copy) and scores its EMA model on the test split: confusion matrix,
per-class recall, and, at confidence thresholds, the share of test images above each and
their accuracy, i.e. what FixMatch's mask would keep and how much of it is right, and
the accuracy with BN statistics re-estimated on clean training images. A
finished run has the confusion matrix in its metrics.json already. Writes
benchmarks/results/fixmatch_snapshot_<run>.json.
"""

import json
import os
import shutil
import tempfile

from absl import app, flags

flags.DEFINE_string("model_dir", None, "The FixMatch run directory (with checkpoints/).")
flags.DEFINE_string("init_from", None, "The run's --init_from (zoo name), to rebuild its encoder.")
flags.DEFINE_string("backbone", "resnet18_small", "The run's --backbone, when it had no --init_from.")
flags.DEFINE_float("width", 0.25, "The run's --width, when it had no --init_from.")
flags.DEFINE_string("dataset", "fashion_mnist", "The run's dataset (its test split is scored).")
flags.DEFINE_bool("distribution_alignment", False, "The run's distribution_alignment hyperparameter "
                  "(its checkpoint then holds the prediction history), when it has no launch.json.")
flags.DEFINE_list("thresholds", ["0.95", "0.99"], "Confidence thresholds to report.")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON goes.")
flags.mark_flag_as_required("model_dir")
FLAGS = flags.FLAGS


def run_settings() -> dict:
    """How to rebuild the run's model: its launch.json, else the flags (older run directories)."""
    import inspect

    from recipes import launch
    from recipes.semi.fixmatch import FixMatch

    recorded = launch.read(FLAGS.model_dir)
    if recorded is None:
        return {"init_from": FLAGS.init_from, "backbone": FLAGS.backbone, "width": FLAGS.width,
                "backbone_norm": "batch", "dataset": FLAGS.dataset,
                "model_hparams": {"distribution_alignment": FLAGS.distribution_alignment}}
    if recorded["recipe"] != "fixmatch":
        raise SystemExit(f"{FLAGS.model_dir} is a {recorded['recipe']} run, not a FixMatch one.")
    accepted = inspect.signature(FixMatch.__init__).parameters
    return {**{key: recorded[key] for key in ("init_from", "backbone", "width", "backbone_norm", "dataset")},
            "model_hparams": {k: v for k, v in recorded["hparams"].items() if k in accepted}}


def accuracy_with_clean_bn_statistics(model, data, dataset, test, images=4096, seed=0):
    """Test accuracy after replacing the EMA encoder's BN moving statistics by those of clean
    training images. The moving statistics are averaged over FixMatch's joint batches, 7/15
    of them strong views; if they were what hurt the clean test images, this would recover."""
    import keras
    import numpy as np
    import tensorflow as tf

    train_x, _ = data.load_arrays(dataset, "train")
    # All of a training split smaller than `images` (synthetic_shapes has 2,000).
    batch = train_x[np.random.RandomState(seed).choice(len(train_x), min(images, len(train_x)), replace=False)]
    model.ema_encoder.trainable = True  # frozen BN layers ignore training=True
    for layer in model.ema_encoder.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # the moving statistics become this batch's
    model.ema_encoder(tf.constant(batch), training=True)
    model.ema_encoder.trainable = False
    return model.accuracy(*test)


def main(argv):
    del argv
    import numpy as np

    import zoo
    from recipes import data, evaluate
    from recipes.checkpointing import resume
    from recipes.semi.fixmatch import FixMatch, paper_optimizer
    from zoo import backbones

    checkpoints = os.path.join(FLAGS.model_dir, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise SystemExit(f"No checkpoints/ in {FLAGS.model_dir}: is it a FixMatch run directory?")
    run = run_settings()
    test_x, test_y = data.load_arrays(run["dataset"], "test")
    num_classes = int(test_y.max()) + 1
    encoder = (zoo.load(run["init_from"]) if run["init_from"]
               else backbones.build(run["backbone"], test_x.shape[1:], width=run["width"], norm=run["backbone_norm"]))
    model = FixMatch(encoder, num_classes, **run["model_hparams"])
    model.compile(optimizer=paper_optimizer(1))  # the schedule is irrelevant: only variables are restored
    with tempfile.TemporaryDirectory() as copy:  # a running job may rotate its checkpoints meanwhile
        shutil.copytree(checkpoints, copy, dirs_exist_ok=True)
        _, epochs = resume(model, copy)
    probabilities = model.predict_proba(test_x)
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    report = evaluate.classification_report(test_y, predicted, num_classes)
    confident = {}
    for threshold in map(float, FLAGS.thresholds):
        kept = confidence >= threshold
        confident[str(threshold)] = {"share": round(float(kept.mean()), 4),
                                     "accuracy": round(float(np.mean(predicted[kept] == test_y[kept])), 4)
                                     if kept.any() else None}
    result = {"model_dir": FLAGS.model_dir, "epochs_done": epochs,
              "optimizer_steps": int(model.optimizer.iterations.numpy()), "model": "EMA", "split": "test",
              **report, "confident": confident,
              "accuracy_bn_from_clean_images": accuracy_with_clean_bn_statistics(model, data, run["dataset"],
                                                                                  (test_x, test_y))}
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(FLAGS.model_dir))
    path = os.path.join(FLAGS.out_dir, f"fixmatch_snapshot_{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "confusion"}))
    print(np.array(report["confusion"]))
    print(f"Wrote {path}.")


if __name__ == "__main__":
    app.run(main)
