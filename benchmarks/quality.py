"""Quality benchmark: how good is a recipe's encoder, next to the baselines that matter.

    python benchmarks/quality.py --recipe=simclr --run_dir=runs/quality_simclr

Trains the recipe with `recipes.train` (or reuses a finished run in --run_dir) with the
settings of benchmarks/fmnist_settings.py: MoCo's time budget (the epochs follow from the
measured throughputs), one optimizer, heads sized for 28-px images. Then it reports on
the Fashion-MNIST test split, with one protocol for every row:
  * weighted kNN (k=200, T=0.1, memory = the 60k training images), for the recipe also on
    its embedding (projection-head output, from the run's metrics.json), and
  * a linear probe (AdamW, standardized frozen features)
for: raw pixels, a randomly initialised encoder, the self-supervised encoder, and a
supervised encoder of the same architecture (cross-entropy with labels, flips and
crops). The baseline rows are computed once per protocol and cached in
quality_baselines.json. Writes benchmarks/results/quality_<recipe>.json and .md, plus two pictures:
a 2-D t-SNE map of test embeddings coloured by class, and a retrieval grid (query
image + its 8 nearest test neighbours).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

import fmnist_settings
import quality_table

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "moco", "Recipe to benchmark.")
flags.DEFINE_integer("epochs", None, "Pretraining epochs (default: MoCo's time budget, from "
                     "benchmarks/results/throughput_fmnist.json).")
flags.DEFINE_string("run_dir", None, "Run directory (default runs/quality_<recipe>); a finished run is reused.")
flags.DEFINE_list("train_args", [], "Extra recipes.train flags, e.g. --train_args=--lr=0.03,--warmup_epochs=1 "
                  "(after the settings, so they win).")
flags.DEFINE_integer("supervised_epochs", 8, "Epochs of the supervised baseline (0: skip).")
flags.DEFINE_integer("probe_epochs", 30, "Linear-probe epochs for every row.")
flags.DEFINE_float("width", fmnist_settings.WIDTH, "Backbone width multiplier for the recipe and every "
                   "baseline (outputs get a _w<width> suffix when it is not the default).")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where JSON, markdown and pictures go.")
flags.DEFINE_bool("pictures", True, "Draw the t-SNE map and retrieval grid (--nopictures to re-score a run "
                  "whose pictures exist: t-SNE is the slow part).")

flags.DEFINE_string("throughput", "benchmarks/results/throughput_fmnist.json",
                    "Throughputs (throughput.py --settings=fmnist) that set the budget and the table's img/s; "
                    "another file when the recipe's settings changed after that one was measured.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def width_suffix():
    """'' at the settings' width, else e.g. '_w0.5', so other widths never overwrite its results."""
    return "" if FLAGS.width == fmnist_settings.WIDTH else f"_w{FLAGS.width:g}"


def measured_throughput():
    """({recipe: train images/sec}, {recipe: label-step seconds}) from --throughput (default strategy)."""
    with open(os.path.join(ROOT, FLAGS.throughput)) as f:
        measured = json.load(f)
    return quality_table.images_per_sec(measured), quality_table.label_step_seconds(measured)


def budget_epochs(recipe):
    return fmnist_settings.budget_epochs(recipe, *measured_throughput())


def train_recipe(run_dir):
    if os.path.exists(os.path.join(run_dir, "metrics.json")):
        print(f"reusing finished run {run_dir}")
        return
    epochs = FLAGS.epochs or budget_epochs(FLAGS.recipe)
    settings = fmnist_settings.optimizer_flags(FLAGS.recipe)
    if fmnist_settings.hparams(FLAGS.recipe, epochs):
        settings.append(fmnist_settings.hparams_flag(FLAGS.recipe, epochs))
    command = [sys.executable, "-m", "recipes.train", f"--recipe={FLAGS.recipe}", "--dataset=fashion_mnist",
               f"--backbone={fmnist_settings.backbone(FLAGS.recipe)}", f"--width={FLAGS.width}", f"--epochs={epochs}",
               f"--seed={FLAGS.seed}",
               f"--model_dir={run_dir}", "--knn_every=5", "--verbose=2", f"--probe_epochs={FLAGS.probe_epochs}",
               *settings, *FLAGS.train_args]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def supervised_encoder(train_x, train_y, epochs, seed):
    """Same architecture trained with labels: the ceiling a label-free recipe aims at."""
    import keras
    import tensorflow as tf

    from recipes.augment import ViewPolicy, random_view
    from zoo import backbones

    keras.utils.set_random_seed(seed)
    encoder = backbones.build(fmnist_settings.backbone(FLAGS.recipe), train_x.shape[1:], FLAGS.width)
    policy = ViewPolicy(crop_scale=(0.6, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    batch = 256
    steps = len(train_x) // batch

    class Supervised(keras.Model):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.classifier = keras.layers.Dense(10)

        def call(self, images, training=False):
            if training:
                seed_pair = tf.random.experimental.stateless_fold_in([seed, 7], tf.cast(self.optimizer.iterations, tf.int32))
                images = random_view(images, seed_pair, policy, batch)
            return self.classifier(self.encoder(images, training=training))

    model = Supervised()
    model.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, epochs * steps),
                                                 momentum=0.9, weight_decay=5e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    dataset = (tf.data.Dataset.from_tensor_slices((train_x, train_y)).shuffle(len(train_x), seed=seed)
               .batch(batch, drop_remainder=True).prefetch(2))
    model.fit(dataset, epochs=epochs, verbose=2)
    return encoder, model


def evaluate_features(name, train_features, train_y, test_features, test_y, protocol):
    from recipes import evaluate

    knn = evaluate.knn_accuracy(train_features, train_y, test_features, test_y, 10, protocol=protocol)
    probe = evaluate.linear_probe(train_features, train_y, test_features, test_y, 10,
                                  epochs=FLAGS.probe_epochs, seed=FLAGS.seed, protocol=protocol)
    print(f"{name:28s} kNN {knn['accuracy']:.4f}  linear probe {probe['accuracy']:.4f}", flush=True)
    return {"knn": knn, "linear_probe": probe}


def save_pictures(features, images, labels, class_names, prefix):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.manifold import TSNE

    rng = np.random.RandomState(FLAGS.seed)
    subset = rng.choice(len(features), 2000, replace=False)
    normalized = features / np.linalg.norm(features, axis=1, keepdims=True)
    points = TSNE(2, random_state=FLAGS.seed, init="pca").fit_transform(normalized[subset])
    figure, axis = plt.subplots(figsize=(7, 6))
    for c, class_name in enumerate(class_names):
        mask = labels[subset] == c
        axis.scatter(points[mask, 0], points[mask, 1], s=4, label=class_name)
    axis.legend(markerscale=3, fontsize=7, loc="best")
    axis.set_title(f"t-SNE of {FLAGS.recipe} test embeddings (Fashion-MNIST, 2000 images)")
    axis.set_xticks([]), axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(f"{prefix}_tsne.png", dpi=110)
    plt.close(figure)

    queries = rng.choice(len(features), 8, replace=False)
    similarity = normalized[queries] @ normalized.T
    similarity[np.arange(8), queries] = -np.inf  # not the query itself
    neighbours = np.argsort(-similarity, axis=1)[:, :8]
    figure, axes = plt.subplots(8, 9, figsize=(9, 8.4))
    for row, query in enumerate(queries):
        for col, index in enumerate([query, *neighbours[row]]):
            ax = axes[row, col]
            ax.imshow(images[index].squeeze(), cmap="gray")
            ax.set_xticks([]), ax.set_yticks([])
            correct = labels[index] == labels[query]
            for spine in ax.spines.values():
                spine.set_color("black" if col == 0 else ("tab:green" if correct else "tab:red"))
                spine.set_linewidth(2)
        axes[row, 0].set_ylabel(class_names[labels[query]], fontsize=7)
    axes[0, 0].set_title("query", fontsize=8)
    figure.suptitle(f"{FLAGS.recipe}: 8 nearest test neighbours (green: same class, red: other)", fontsize=9)
    figure.tight_layout()
    figure.savefig(f"{prefix}_retrieval.png", dpi=90)
    plt.close(figure)


def baseline_rows(train_x, train_y, test_x, test_y, protocol):
    """Raw pixels, random init and supervised rows; computed once per protocol and cached."""
    import keras
    import numpy as np

    from recipes import evaluate
    from zoo import backbones

    key = (f"{fmnist_settings.backbone(FLAGS.recipe)} width={FLAGS.width:g} seed={FLAGS.seed} probe_epochs={FLAGS.probe_epochs} "
           f"supervised_epochs={FLAGS.supervised_epochs}")
    path = os.path.join(FLAGS.out_dir, "quality_baselines.json")
    cache = {}
    if os.path.exists(path):
        with open(path) as f:
            cache = json.load(f)
    if key in cache:
        print(f"reusing baselines from {path} ({key})")
        return cache[key]

    rows = {}
    flat = lambda x: x.reshape(len(x), -1).astype(np.float32)  # noqa: E731
    rows["raw pixels"] = evaluate_features("raw pixels", flat(train_x), train_y, flat(test_x), test_y, protocol)
    keras.utils.set_random_seed(FLAGS.seed)
    random_encoder = backbones.build(fmnist_settings.backbone(FLAGS.recipe), train_x.shape[1:], FLAGS.width)
    extract = evaluate.feature_extractor(random_encoder)
    rows["random init"] = evaluate_features("random init", extract(train_x), train_y, extract(test_x), test_y,
                                            protocol)
    if FLAGS.supervised_epochs > 0:
        sup_encoder, sup_model = supervised_encoder(train_x, train_y, FLAGS.supervised_epochs, FLAGS.seed)
        sup_name = f"supervised ({FLAGS.supervised_epochs} epochs)"
        extract = evaluate.feature_extractor(sup_encoder)
        rows[sup_name] = evaluate_features(sup_name, extract(train_x), train_y, extract(test_x), test_y, protocol)
        logits = sup_model.predict(test_x, batch_size=1024, verbose=0)
        rows[sup_name]["classifier_test_accuracy"] = float(np.mean(np.argmax(logits, 1) == test_y))
    cache[key] = rows
    with open(path, "w") as f:
        json.dump(cache, f, indent=2)
    return rows


def main(argv):
    del argv
    os.chdir(ROOT)
    import keras

    from recipes import data, evaluate

    run_dir = FLAGS.run_dir or f"runs/quality_{FLAGS.recipe}{width_suffix()}"
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    started = time.time()
    train_recipe(run_dir)
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        run_metrics = json.load(f)
    train_metrics = run_metrics.get("train", {})

    train_x, train_y = data.load_arrays("fashion_mnist", "train")
    test_x, test_y = data.load_arrays("fashion_mnist", "test")
    protocol = {"dataset": "fashion_mnist", "train_split": "train", "test_split": "test", "seed": FLAGS.seed}
    baselines = baseline_rows(train_x, train_y, test_x, test_y, protocol)

    encoder = keras.saving.load_model(os.path.join(run_dir, "encoder.keras"))
    extract = evaluate.feature_extractor(encoder)
    ssl_test_features = extract(test_x)
    name = f"{FLAGS.recipe} ({run['epochs']} epochs)"
    ssl_row = evaluate_features(name, extract(train_x), train_y, ssl_test_features,
                                test_y, {**protocol, "pretrain_epochs": run["epochs"]})
    if "knn_embedding" in run_metrics:  # the run's own kNN on its projection-head output, same k, T and memory
        ssl_row["knn_embedding"] = run_metrics["knn_embedding"]
    rows = {"raw pixels": baselines["raw pixels"], "random init": baselines["random init"], name: ssl_row,
            **{k: v for k, v in baselines.items() if k.startswith("supervised")}}

    prefix = os.path.join(FLAGS.out_dir, f"quality_{FLAGS.recipe}{width_suffix()}")
    if FLAGS.pictures:
        save_pictures(ssl_test_features, test_x, test_y, data.info("fashion_mnist").class_names, prefix)
    images_per_sec, label_step_seconds = measured_throughput()
    result = {"recipe": FLAGS.recipe, "backbone": fmnist_settings.backbone(FLAGS.recipe), "width": FLAGS.width, "run": run, "rows": rows,
              "pretrain_wall_time_s": train_metrics.get("wall_time_s"),
              "pretrain_images_per_sec": train_metrics.get("images_per_sec"),
              "throughput": {"file": FLAGS.throughput, "images_per_sec": images_per_sec.get(FLAGS.recipe),
                             "label_step_seconds": label_step_seconds.get(FLAGS.recipe),
                             "budget_epochs": fmnist_settings.budget_epochs(FLAGS.recipe, images_per_sec,
                                                                            label_step_seconds)},
              "benchmark_wall_time_s": round(time.time() - started, 1),
              "command": "python benchmarks/quality.py " + " ".join(sys.argv[1:])}
    with open(prefix + ".json", "w") as f:
        json.dump(result, f, indent=2)
    table = ["| encoder | kNN (k=200, T=0.1) | kNN on the embedding (head output) | linear probe |",
             "|---|---|---|---|"]
    table += [f"| {k} | {v['knn']['accuracy']:.4f} | {quality_table.embedding_accuracy(v)} | {v['linear_probe']['accuracy']:.4f} |"
              for k, v in rows.items()]
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    app.run(main)
