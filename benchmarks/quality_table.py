"""One table for every recipe's Fashion-MNIST quality run, next to the shared baselines.

    python benchmarks/quality_table.py

Reads benchmarks/results/quality_<recipe>.json (written by benchmarks/quality.py) and
throughput_fmnist.json (or the throughput file a run names), and writes
benchmarks/results/quality_table.md: per recipe the epochs it got within MoCo's time budget,
kNN (k=200, T=0.1) on the encoder's features and on the recipe's embedding (projection-head
output, InstDisc's protocol), linear-probe accuracy on the test split, the kNN gain over the
random-init encoder, train-step images/sec, and the command that produced the row. Recipes not
run yet are listed as such.
"""

import json
import os
import sys

import fmnist_settings

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def embedding_accuracy(row) -> str:
    """kNN on a recipe's embedding (its projection-head output); blank for rows without one."""
    return f"{row['knn_embedding']['accuracy']:.4f}" if "knn_embedding" in row else ""


def images_per_sec(throughput_json) -> dict:
    """{recipe: train images/sec} from a throughput.py JSON (default strategy)."""
    return {r["recipe"]: r["images_per_sec"] for r in throughput_json["results"]
            if r.get("strategy") == "default" and "images_per_sec" in r}


def label_step_seconds(throughput_json) -> dict:
    """{recipe: seconds of one label step} from a throughput.py JSON (SeLa, DeepCluster)."""
    return {r["recipe"]: r["label_step_seconds"] for r in throughput_json["results"]
            if r.get("strategy") == "default" and "label_step_seconds" in r}


def load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main():
    throughput = images_per_sec(load("throughput_fmnist.json"))
    runs = {recipe: load(f"quality_{recipe}.json") for recipe in fmnist_settings.HPARAMS}
    finished = [run for run in runs.values() if run]
    if not finished:
        sys.exit("No quality_<recipe>.json in benchmarks/results yet: run benchmarks/quality.py first.")
    baselines = {name: row for name, row in finished[0]["rows"].items()
                 if name == "raw pixels" or name == "random init" or name.startswith("supervised")}
    for run in finished[1:]:  # every row must stand on the same baselines
        for name, row in baselines.items():
            if run["rows"].get(name, {}).get("knn", {}).get("accuracy") != row["knn"]["accuracy"]:
                sys.exit(f"{run['recipe']}'s {name!r} row differs from {finished[0]['recipe']}'s: rerun it.")
    random_knn = baselines["random init"]["knn"]["accuracy"]

    lines = ["| encoder | epochs | kNN (k=200, T=0.1) | kNN vs random init (points) | kNN on the embedding "
             "(head output) | linear probe | train img/s |",
             "|---|---|---|---|---|---|---|"]
    for name, row in baselines.items():
        knn = row["knn"]["accuracy"]
        lines.append(f"| {name} | | {knn:.4f} | {(knn - random_knn) * 100:+.1f} | | "
                     f"{row['linear_probe']['accuracy']:.4f} | |")
    commands = []
    for recipe, run in runs.items():
        if run is None:
            lines.append(f"| {recipe} | not run yet | | | | | {throughput.get(recipe, '')} |")
            continue
        row = next(v for k, v in run["rows"].items() if k.startswith(f"{recipe} ("))
        knn = row["knn"]["accuracy"]
        # A run whose settings were timed in another file (quality.py --throughput) reports that timing.
        speed = run.get("throughput", {}).get("images_per_sec") or throughput.get(recipe, "")
        lines.append(f"| **{recipe}** | {run['run']['epochs']} | {knn:.4f} | {(knn - random_knn) * 100:+.1f} | "
                     f"{embedding_accuracy(row)} | {row['linear_probe']['accuracy']:.4f} | {speed} |")
        commands.append(f"- {recipe}: `{run['run'].get('command', '')}`, then `{run['command']}`")
    text = "\n".join(lines + ["", "Commands:", *commands]) + "\n"
    with open(os.path.join(RESULTS, "quality_table.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
