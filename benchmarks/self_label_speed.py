"""How long SeLa's label step takes to solve, and whether its stopping rule settles the labels.

    python benchmarks/self_label_speed.py

`recipes.losses.self_label_assignments` on Fashion-MNIST's size (N=60,000 images, K=128
clusters, lambda=25) for seeded random predictions of growing confidence (logits drawn
N(0, scale^2): scale 0.1 is a near-uniform fresh network, 10 an over-confident one). Per
scale: seconds (after a warm-up call that traces the graph), how many labels differ from
those of a far tighter tolerance (1e-9), and the range of cluster sizes (N/K = 469 if
equal). One head; SeLa runs one such solve per head per label step. Writes
benchmarks/results/self_label_speed.json.
"""

import json
import os
import time

from absl import app, flags

flags.DEFINE_integer("images", 60000, "N.")
flags.DEFINE_integer("clusters", 128, "K.")
flags.DEFINE_float("lam", 25.0, "lambda.")
flags.DEFINE_list("scales", ["0.1", "1", "3", "10"], "Standard deviations of the random logits.")
flags.DEFINE_integer("seed", 0, "Seed of the logits.")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON goes.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
    del argv
    os.chdir(ROOT)
    import numpy as np
    import tensorflow as tf

    from recipes.losses import self_label_assignments

    solve = tf.function(self_label_assignments)
    rng = np.random.RandomState(FLAGS.seed)
    rows = []
    for scale in map(float, FLAGS.scales):
        log_probs = tf.nn.log_softmax(rng.randn(FLAGS.images, FLAGS.clusters).astype("float32") * scale).numpy()
        settled = solve(log_probs, FLAGS.lam, 1e-9)[0].numpy()  # also the warm-up (tracing)
        started = time.perf_counter()
        labels = solve(log_probs, FLAGS.lam)[0].numpy()
        seconds = time.perf_counter() - started
        sizes = np.bincount(labels, minlength=FLAGS.clusters)
        row = {"scale": scale, "seconds": round(seconds, 2), "labels_unlike_tolerance_1e-9": int((labels != settled).sum()),
               "cluster_size_min": int(sizes.min()), "cluster_size_max": int(sizes.max())}
        print(json.dumps(row), flush=True)
        rows.append(row)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "self_label_speed.json"), "w") as f:
        json.dump({"command": "python benchmarks/self_label_speed.py", "images": FLAGS.images,
                   "clusters": FLAGS.clusters, "lam": FLAGS.lam, "seed": FLAGS.seed, "cpu_count": os.cpu_count(),
                   "results": rows}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
