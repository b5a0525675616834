"""Train-step throughput: images/sec per recipe, backbone, batch size and strategy.

    python benchmarks/throughput.py --recipes=moco,simclr --batch_sizes=128,256
    python benchmarks/throughput.py --strategies=default,mirrored2   # 2 logical CPU replicas
    python benchmarks/throughput.py --recipes=all --settings=fmnist  # the quality runs' heads
    python benchmarks/throughput.py --precisions=float32,mixed_bfloat16  # recipes.precision
    python benchmarks/throughput.py --settings=fmnist --hparams=bn_splits=2  # one setting changed

--settings=paper builds each recipe with its paper's defaults; --settings=fmnist with the
hyperparameters of the Fashion-MNIST quality runs (benchmarks/fmnist_settings.py), whose
epoch budgets are computed from these numbers.

Each configuration builds the recipe exactly as `recipes.train` does, runs warm-up
steps (tracing), then times `--repeats` runs of `--steps` train steps on fixed random
uint8 batches of Fashion-MNIST's shape (the data pipeline is not what is measured) and
reports the best: on this 2-core VM the same steps run at one of two speeds, ~0.6x apart,
switching from one repeat to the next, so a single timing can be either. Recipes with a
per-image table (NPID's memory bank, SeLa's and DeepCluster's labels) are built for
`--dataset_size` images, Fashion-MNIST's training split by default, so a step costs what it
costs in a real run. Recipes with a label step over the whole training set (SeLa's
self-labelling, DeepCluster's k-means) also report `label_step_seconds`: one label step on
`--dataset_size` random images, after a first untimed one (tracing); random images give a
near-uniform prediction, which Sinkhorn-Knopp solves fastest, so SeLa's label step on a
trained encoder can take longer (benchmarks/self_label_speed.py). Writes
benchmarks/results/throughput[_fmnist].json and prints a markdown table.
"""

import json
import os
import sys
import time

from absl import app, flags

import fmnist_settings
from recipes.train import parse_hparams  # importing recipes.train defines --width, --seed, --backbone_norm and
# --hparams, reused here

FLAGS = flags.FLAGS
flags.DEFINE_list("recipes", ["moco"], "Recipes to time ('all' for every registered one).")
flags.DEFINE_list("backbones", ["resnet18_small"], "Backbones.")
flags.DEFINE_list("batch_sizes", ["256"], "Global batch sizes.")
flags.DEFINE_list("strategies", ["default"], "default, or mirrored2 (2 logical CPU replicas).")
flags.DEFINE_list("precisions", ["float32"], "Keras dtype policies to time: float32, mixed_bfloat16, mixed_float16.")
flags.DEFINE_list("image_shape", ["28", "28", "1"], "H,W,C of the images.")
flags.DEFINE_integer("warmup", 3, "Untimed steps (tracing).")
flags.DEFINE_integer("steps", 6, "Timed steps per repeat.")
flags.DEFINE_integer("repeats", 5, "Timed repeats; the best one is reported (others are interference).")
flags.DEFINE_integer("dataset_size", 60000, "Training images a recipe is built for (NPID's bank, SeLa's "
                     "and DeepCluster's labels) and its label step runs over.")
flags.DEFINE_enum("settings", "paper", ["paper", "fmnist"], "Recipe hyperparameters: papers' defaults or "
                  "the Fashion-MNIST quality runs'.")
flags.DEFINE_string("out", None, "JSON output (default benchmarks/results/throughput.json, or "
                    "throughput_fmnist.json with --settings=fmnist).")


# The label step of each recipe that has one: the work between train steps, over every training image.
LABEL_STEPS = {
    "sela": lambda recipe, images: recipe.assign_labels(images, update=1),
    "deepcluster": lambda recipe, images: recipe.cluster(images, epoch=1),
}


def time_configuration(recipe_name, backbone, batch_size, strategy_name, precision):
    from recipes.precision import global_policy

    with global_policy(precision):
        return {**_time_configuration(recipe_name, backbone, batch_size, strategy_name), "precision": precision}


def _time_configuration(recipe_name, backbone, batch_size, strategy_name):
    import keras
    import numpy as np
    import tensorflow as tf

    from recipes.base import get_recipe_class
    from recipes.train import build_recipe, make_optimizer
    from zoo import backbones

    shape = tuple(int(d) for d in FLAGS.image_shape)
    strategy = (tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if strategy_name == "mirrored2"
                else tf.distribute.get_strategy())
    recipe_cls = get_recipe_class(recipe_name)
    norm = FLAGS.backbone_norm or recipe_cls.backbone_norm
    total = FLAGS.warmup + FLAGS.steps
    keras.utils.set_random_seed(FLAGS.seed)
    with strategy.scope():
        if FLAGS.settings == "fmnist":  # the quality runs' encoder (MAE's is a ViT)
            backbone = fmnist_settings.backbone(recipe_name)
        encoder = backbones.build(backbone, shape, FLAGS.width, norm=norm)
        hparams = fmnist_settings.hparams(recipe_name, epochs=1) if FLAGS.settings == "fmnist" else {}
        hparams.update(parse_hparams(FLAGS.hparams))  # on top of --settings: to time one setting against another
        recipe = build_recipe(recipe_cls, encoder, hparams, FLAGS.seed, total_steps=total,
                              num_examples=FLAGS.dataset_size)
        recipe.compile(optimizer=make_optimizer("sgd", 0.01, 5e-4, total, 0))
    rng = np.random.RandomState(FLAGS.seed)
    batch = {"image": rng.randint(0, 256, (batch_size, *shape)).astype("uint8"),
             "label": rng.randint(0, 10, batch_size).astype("int64"),
             "index": np.arange(batch_size, dtype="int64")}
    dataset = tf.data.Dataset.from_tensors(batch).repeat()
    # Warm-up with the recipe's own callbacks (a first label step, which traces, is not what is timed).
    images = rng.randint(0, 256, (FLAGS.dataset_size, *shape)).astype("uint8")
    recipe.fit(dataset, steps_per_epoch=FLAGS.warmup, epochs=1, verbose=0, callbacks=recipe.training_callbacks(images))
    seconds = []
    for _ in range(FLAGS.repeats):
        started = time.perf_counter()
        recipe.fit(dataset, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0)
        seconds.append(time.perf_counter() - started)
    label_step = {}
    if recipe_name in LABEL_STEPS:
        started = time.perf_counter()
        LABEL_STEPS[recipe_name](recipe, images)
        label_step = {"label_step_seconds": round(time.perf_counter() - started, 2)}
    return {"recipe": recipe_name, "backbone": backbone, "backbone_norm": norm,
            "width": FLAGS.width, "batch_size": batch_size,
            "strategy": strategy_name, "settings": FLAGS.settings, "hparams": parse_hparams(FLAGS.hparams),
            "replicas": strategy.num_replicas_in_sync,
            "image_shape": list(shape), "steps": FLAGS.steps, "seconds_per_repeat": [round(s, 3) for s in seconds],
            "dataset_size": FLAGS.dataset_size, "images_per_sec": round(FLAGS.steps * batch_size / min(seconds), 1),
            **label_step}


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    if "mirrored2" in FLAGS.strategies:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import recipes  # noqa: F401  (registers every recipe)
    from recipes.base import RECIPES

    names = sorted(RECIPES) if FLAGS.recipes == ["all"] else FLAGS.recipes
    results = []
    for name in names:
        for backbone in FLAGS.backbones:
            for batch_size in map(int, FLAGS.batch_sizes):
                for strategy in FLAGS.strategies:
                    for precision in FLAGS.precisions:
                        try:
                            row = time_configuration(name, backbone, batch_size, strategy, precision)
                        except Exception as error:  # a recipe that cannot run this shape is reported, not fatal
                            row = {"recipe": name, "backbone": backbone, "batch_size": batch_size,
                                   "strategy": strategy, "precision": precision,
                                   "error": f"{type(error).__name__}: {error}"[:300]}
                        print(json.dumps(row), flush=True)
                        results.append(row)
    out = FLAGS.out or ("benchmarks/results/throughput_fmnist.json" if FLAGS.settings == "fmnist"
                        else "benchmarks/results/throughput.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
                   "cpu_count": os.cpu_count(), "results": results}, f, indent=2)
    print("\n| recipe | settings | backbone | batch | strategy | precision | images/sec | label step (s) |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['recipe']} | {FLAGS.settings} | {r['backbone']} | {r['batch_size']} | {r['strategy']} | "
              f"{r['precision']} | {r.get('images_per_sec', r.get('error'))} | {r.get('label_step_seconds', '')} |")


if __name__ == "__main__":
    app.run(main)
