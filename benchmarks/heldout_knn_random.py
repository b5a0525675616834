"""The held-out kNN monitor's number for a randomly initialized encoder: the floor of every
`val_knn` curve.

    python benchmarks/heldout_knn_random.py

`recipes.train --knn_every=N` logs `val_knn`: weighted kNN (k=200, T=0.1) of the Fashion-MNIST
test images against a memory of 10,000 training images (the run's seeded subset), which is
lower than the final evaluation's kNN against all 60,000. This computes the same protocol,
with the same subset, for fresh encoders of the quality runs' architecture, so a training
curve can be read against "no training at all". Writes
benchmarks/results/heldout_knn_random.json.

    python benchmarks/heldout_knn_random.py --full_memory --seeds=0,1,2,3,4

does the same with all 60,000 training images as memory, the final evaluation's protocol and
the quality table's "random init" row (seed 0), to show how much that baseline moves with the
weight seed alone. Writes benchmarks/results/random_init_knn.json.

    python benchmarks/heldout_knn_random.py --full_memory --seeds=0,1,2,3,4 --encoder=cpc

measures the random init of the encoder CPC publishes, which is not the table's: the same
backbone with layer norm, run on every 8-px patch of the 6x6 grid and averaged over patches
(`recipes.contrastive.cpc.grid_encoder`). Writes benchmarks/results/random_init_knn_cpc.json.
"""

import json
import os

from absl import app, flags

flags.DEFINE_list("seeds", ["0", "1", "2"], "Weight seeds of the random encoders.")
flags.DEFINE_integer("monitor_seed", 0, "The run's --seed, which picks the 10,000 memory images.")
flags.DEFINE_integer("monitor_size", 10000, "recipes.train's --knn_monitor_size.")
flags.DEFINE_enum("encoder", "backbone", ["backbone", "cpc"],
                  "backbone: the quality runs' encoder; cpc: CPC's published patch-grid encoder around it.")
flags.DEFINE_bool("full_memory", False, "All 60,000 training images as memory (the final evaluation's kNN).")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON goes.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_encoder(image_shape):
    import fmnist_settings
    from zoo import backbones

    if FLAGS.encoder == "backbone":
        return backbones.build(fmnist_settings.BACKBONE, image_shape, width=fmnist_settings.WIDTH)
    from recipes.contrastive.cpc import CPC

    backbone = backbones.build(fmnist_settings.BACKBONE, image_shape, width=fmnist_settings.WIDTH,
                               norm=CPC.backbone_norm)
    return CPC(backbone).encoder  # the quality run's patch grid: CPC's defaults, 8-px patches at stride 4


def main(argv):
    del argv
    os.chdir(ROOT)
    import keras
    import numpy as np

    import fmnist_settings
    from recipes import data
    from recipes.evaluate import feature_extractor, knn_accuracy

    train_x, train_y = data.load_arrays("fashion_mnist", "train")
    test_x, test_y = data.load_arrays("fashion_mnist", "test")
    if FLAGS.full_memory:
        memory, described, name = np.arange(len(train_x)), "all 60,000 training images", "random_init_knn.json"
    else:  # as train.py's monitor
        memory = np.random.RandomState(FLAGS.monitor_seed).permutation(len(train_x))[:FLAGS.monitor_size]
        described = f"{FLAGS.monitor_size} training images (--seed={FLAGS.monitor_seed})"
        name = "heldout_knn_random.json"
    if FLAGS.encoder == "cpc":
        name = name.replace(".json", "_cpc.json")
    rows = []
    for seed in map(int, FLAGS.seeds):
        keras.utils.set_random_seed(seed)
        encoder = _random_encoder(train_x.shape[1:])
        extract = feature_extractor(encoder)
        result = knn_accuracy(extract(train_x[memory]), train_y[memory], extract(test_x), test_y, 10)
        rows.append({"seed": seed, "val_knn": result["accuracy"]})
        print(json.dumps(rows[-1]))
    accuracies = [r["val_knn"] for r in rows]
    summary = {"protocol": {**result["protocol"], "memory": described, "queries": "fashion_mnist test (10,000)",
                            "encoder": f"{fmnist_settings.BACKBONE} width {fmnist_settings.WIDTH}, random init"
                            + (", CPC's layer-norm patch-grid encoder (8-px patches, stride 4, mean over the 6x6 grid)"
                               if FLAGS.encoder == "cpc" else "")},
               "rows": rows, "mean": float(np.mean(accuracies)), "std": float(np.std(accuracies))}
    print(f"random-init kNN ({described}): {summary['mean']:.4f} +- {summary['std']:.4f} over {len(rows)} seeds")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, name), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    app.run(main)
