"""Online or target encoder? Evaluates both from a finished run's last checkpoint.

    python benchmarks/target_encoder_knn.py --run_dir=runs/q/dino_lars

Recipes with an EMA target keep two encoders: the one gradients train (DINO's student,
BYOL's online network, MoCo's query encoder) and its moving average (DINO's teacher,
BYOL's target, MoCo's key encoder). DINO's paper evaluates the teacher, which it finds
better than the student throughout training (Caron et al. 2021, sec. 5.6 and fig. 6);
BYOL's and MoCo's evaluate the online encoder. This rebuilds the recipe from the run's
run.json, restores its last checkpoint and measures both encoders with the quality table's
protocol (weighted kNN, k=200, T=0.1, 60k training images as memory, test split; linear
probe on standardized frozen features), so the two numbers differ only in the encoder.
Writes benchmarks/results/target_encoder_knn_<run>.json.
"""

import json
import os

from absl import app, flags

from recipes.train import make_optimizer, parse_hparams  # also defines --probe_epochs (default 30)

flags.DEFINE_string("run_dir", None, "A finished recipes.train run (run.json and checkpoints/).")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON goes.")
flags.mark_flag_as_required("run_dir")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def restored_recipe(run: dict, run_dir: str, input_shape):
    """The run's recipe with the weights of its last checkpoint."""
    import recipes  # noqa: F401  (registers every recipe)
    from recipes.base import get_recipe_class
    from recipes.checkpointing import resume
    from zoo import backbones

    steps = run["steps_per_epoch"]
    encoder = backbones.build(run["backbone"], input_shape, run["backbone_width"], norm=run["backbone_norm"])
    recipe = get_recipe_class(run["recipe"])(encoder, **run["recipe_config"])
    recipe.compile(optimizer=make_optimizer(run["optimizer"], run["lr"], run["weight_decay"], run["epochs"] * steps,
                                            run["warmup_epochs"] * steps, parse_hparams(run["optimizer_args"])))
    _, epochs = resume(recipe, os.path.join(run_dir, "checkpoints"))
    if epochs != run["epochs"]:
        raise ValueError(f"{run_dir}'s last checkpoint is epoch {epochs} of {run['epochs']}: not a finished run.")
    return recipe


def main(argv):
    del argv
    os.chdir(ROOT)
    from recipes import data, evaluate

    with open(os.path.join(FLAGS.run_dir, "run.json")) as f:
        run = json.load(f)
    train_x, train_y = data.load_arrays(run["dataset"], run["train_split"])
    test_x, test_y = data.load_arrays(run["dataset"], run["test_split"])
    recipe = restored_recipe(run, FLAGS.run_dir, train_x.shape[1:])
    targets = recipe.target_models()
    if not targets:
        raise ValueError(f"{run['recipe']} has no target encoder.")
    protocol = {"dataset": run["dataset"], "train_split": run["train_split"], "test_split": run["test_split"],
                "pretrain_epochs": run["epochs"], "seed": run["seed"]}
    result = {"run_dir": FLAGS.run_dir, "recipe": run["recipe"], "command": run.get("command")}
    for role, encoder in (("online", recipe.encoder), ("target", targets[0])):
        metrics = evaluate.evaluate_encoder(encoder, train_x, train_y, test_x, test_y, int(train_y.max()) + 1,
                                            probe_epochs=FLAGS.probe_epochs, seed=run["seed"], protocol=protocol)
        result[role] = {"knn": metrics["knn"]["accuracy"],
                        "linear_probe": metrics.get("linear_probe", {}).get("accuracy")}
        print(role, json.dumps(result[role]), flush=True)
    result["knn_protocol"] = metrics["knn"].get("protocol")
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(FLAGS.run_dir))
    with open(os.path.join(FLAGS.out_dir, f"target_encoder_knn_{name}.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
