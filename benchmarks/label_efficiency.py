"""Few-label benchmark: how far do unlabelled images carry a classifier with 100 or 1% labels?

    python benchmarks/label_efficiency.py --run_root=runs/label_efficiency \
        --ssl_encoder=moco_resnet18_fmnist_45ep --zoo_store=/path/to/store

Every row is one `python -m recipes.train` command (printed in the table), run on
Fashion-MNIST with the same seeded labelled subset (10 per class = 100 labels, or 1%
= 600 labels, stratified, seed 0) and the same encoder (resnet18_small, width 0.25).
A run directory that already holds metrics.json is reused, so an interrupted
benchmark continues where it stopped (it must have been trained with the row's flags).
Every finished run is also recorded in benchmarks/results/label_efficiency/<run>.json
(its command, commit and numbers): a record whose command matches stands in for a run
directory that is gone (another machine, a cleaned runs/), so the table survives
without retraining; --recorded_only tabulates what is recorded or on disk and trains
nothing. Accuracy is the classifier's on the 10,000 test images (FixMatch: its EMA
model). Writes benchmarks/results/label_efficiency.json and .md.

Two supervised-only rows: the default flip-and-translate augmentation (the reference
the "vs supervised only" column uses) and the strong view (RandAugment + Cutout), which
alone lifts 100 labels by a few points.

Budgets (per model): supervised-only, fine-tuning and every pseudo-labelling model
train 1,000 steps of 64 labelled (+ pseudo-labelled) images; pseudo-label and Noisy
Student add 3 rounds (a teacher then 3 students); FixMatch trains --fixmatch_steps
steps of 64 labelled + 448 unlabelled images (weak + strong views);
--pl_student_steps_scale / --ns_student_steps_scale give the students that many times
the teacher's steps (1 and 6 by default; rows and run directories other than 1x are
marked). With
--ssl_encoder, five more rows start from that published self-supervised encoder
(fine-tune, pseudo-label twice: default and fresh strong students of 6x steps for 2
rounds, Noisy Student, FixMatch; for the self-training methods the teacher and every
student are built from it): it was pretrained on the same 60k
training images, labels unused.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("run_root", "runs/label_efficiency", "One sub-directory per run; finished runs are reused.")
flags.DEFINE_string("ssl_encoder", None, "Published self-supervised encoder for the fine-tune rows (skipped if unset).")
flags.DEFINE_string("zoo_store", None, "Zoo store holding --ssl_encoder (default $ZOO_HOME or ~/.ssl_zoo).")
flags.DEFINE_list("splits", ["100", "1pct"], "Labelled splits: 100 (10 per class) and/or 1pct (1%).")
flags.DEFINE_list("fixmatch_steps", ["100:3000", "1pct:2000"], "FixMatch training steps per split (multiples of 50).")
flags.DEFINE_list("fixmatch_scratch_splits", ["100", "1pct"], "Splits that also get FixMatch from a random init.")
flags.DEFINE_float("pl_student_steps_scale", 1.0, "Pseudo-label students train this many times the teacher's "
                   "1,000 steps (run directories get a _s<scale> suffix when not 1).")
flags.DEFINE_float("ns_student_steps_scale", 6.0, "Noisy Student students train this many times the teacher's "
                   "1,000 steps (the paper trains students at least as long as teachers; 6x measured better "
                   "than 3x with 1%, benchmarks/RESULTS.md; _s<scale> suffix).")
flags.DEFINE_integer("seed", 0, "Seed of the labelled split, weights and augmentations.")
flags.DEFINE_string("out", "benchmarks/results/label_efficiency", "Output path without extension.")
flags.DEFINE_string("records", "benchmarks/results/label_efficiency", "One JSON record per finished run.")
flags.DEFINE_bool("recorded_only", False, "Tabulate the runs recorded or on disk; train nothing.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT_FLAGS = {"100": "--labels_per_class=10", "1pct": "--label_fraction=0.01"}
COMMON = ["--dataset=fashion_mnist", "--backbone=resnet18_small", "--width=0.25", "--batch_size=64", "--verbose=2"]
THOUSAND_STEPS = ["--epochs=10", "--steps_per_epoch=100"]
# Training under RandAugment + Cutout (FixMatch's strong view) instead of flip + translate.
STRONG = {"augment": '"strong"'}
# Pseudo-label whose every model starts afresh and trains under the strong view, 3x longer.
FRESH_STRONG = {"init_from_teacher": "false", **STRONG, "student_steps_scale": "3"}
# The same from the SSL encoder with 6x students, two rounds (a third lost ground at 3x; benchmarks/RESULTS.md).
SSL_FRESH_STRONG = {**FRESH_STRONG, "student_steps_scale": "6", "rounds": "2"}


def hparams_flag(values):
    """`--hparams=k=v,...` for recipes.train, or nothing."""
    return ["--hparams=" + ",".join(f"{k}={v}" for k, v in values.items())] if values else []


def runs(split):
    """(row name, run name, recipe.train flags) for one labelled split."""
    label_flag = SPLIT_FLAGS[split]
    steps = dict(item.split(":") for item in FLAGS.fixmatch_steps)[split]
    fixmatch = ["--recipe=fixmatch", f"--epochs={int(steps) // 50}", "--steps_per_epoch=50"]
    pseudo_label, pl_suffix, pl_note = _student_settings(FLAGS.pl_student_steps_scale)
    noisy_student, ns_suffix, ns_note = _student_settings(FLAGS.ns_student_steps_scale, per_class=3000)
    rows = [("supervised only", f"sup{split}", ["--recipe=finetune", *THOUSAND_STEPS]),
            ("supervised only, strong augmentation", f"sup{split}_strong",
             ["--recipe=finetune", *THOUSAND_STEPS, *hparams_flag(STRONG)]),
            (f"pseudo-label (3 rounds{pl_note})", f"pl{split}{pl_suffix}",
             ["--recipe=pseudo_label", *THOUSAND_STEPS, *pseudo_label]),
            ("pseudo-label (3 rounds, fresh students, strong augmentation, students 3x steps)",
             f"pl{split}_fresh_strong_s3", ["--recipe=pseudo_label", *THOUSAND_STEPS, *hparams_flag(FRESH_STRONG)]),
            (f"Noisy Student (3 rounds{ns_note})", f"ns{split}{ns_suffix}",
             ["--recipe=noisy_student", *THOUSAND_STEPS, *noisy_student])]
    if split in FLAGS.fixmatch_scratch_splits:
        rows.append(("FixMatch", f"fixmatch{split}", fixmatch))
    if FLAGS.ssl_encoder:
        init = [f"--init_from={FLAGS.ssl_encoder}"] + ([f"--zoo_store={FLAGS.zoo_store}"] if FLAGS.zoo_store else [])
        rows.append(("SSL encoder + fine-tune", f"ssl{split}", ["--recipe=finetune", *THOUSAND_STEPS, *init]))
        rows.append((f"SSL encoder + pseudo-label{pl_note}", f"pl_ssl{split}{pl_suffix}",
                     ["--recipe=pseudo_label", *THOUSAND_STEPS, *pseudo_label, *init]))
        rows.append(("SSL encoder + pseudo-label (2 rounds, fresh students from the encoder, strong augmentation, "
                     "students 6x steps)", f"pl_ssl{split}_fresh_strong_s6_r2",
                     ["--recipe=pseudo_label", *THOUSAND_STEPS, *hparams_flag(SSL_FRESH_STRONG), *init]))
        rows.append((f"SSL encoder + Noisy Student{ns_note}", f"ns_ssl{split}{ns_suffix}",
                     ["--recipe=noisy_student", *THOUSAND_STEPS, *noisy_student, *init]))
        rows.append(("SSL encoder + FixMatch", f"fixmatch_ssl{split}", [*fixmatch, *init]))
    return [(row, name, [*COMMON, *flags_, label_flag, f"--seed={FLAGS.seed}"]) for row, name, flags_ in rows]


def _student_settings(scale, **hparams):
    """(--hparams flag, run-directory suffix, row note) for students trained `scale` x the teacher's steps."""
    if scale == 1:
        return hparams_flag(hparams), "", ""
    return hparams_flag({**hparams, "student_steps_scale": f"{scale:g}"}), f"_s{scale:g}", f", students {scale:g}x steps"


def result_for(row, split, name, args):
    """The row's result: from its run directory, else its record, else by training it (None: --recorded_only)."""
    run_dir = os.path.join(FLAGS.run_root, name)
    record_path = os.path.join(FLAGS.records, name + ".json")
    metrics_path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(metrics_path):
        record = _read_json(record_path)
        if record and record["command"] == train_command(args):
            return {**record, "method": row}
        if FLAGS.recorded_only:
            return None
        command = [sys.executable, "-m", "recipes.train", *args, f"--model_dir={run_dir}"]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    run = _read_json(os.path.join(run_dir, "run.json"))
    ran_with = {flag for flag in run["command"].split()[3:] if not flag.startswith("--model_dir=")}
    if ran_with != set(args):  # a directory of the same name from another command: not this row's result
        raise ValueError(f"{run_dir} was trained with other flags than the row {row!r}: it has "
                         f"{sorted(ran_with - set(args))}, lacks {sorted(set(args) - ran_with)}. "
                         "Move it away or pass another --run_root.")
    result = summarize(row, split, args, _read_json(metrics_path), run)
    from recipes.checkpointing import write_json  # atomic: a half-written record would break the next run

    os.makedirs(FLAGS.records, exist_ok=True)
    write_json(record_path, result)
    return result


def _read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def train_command(args):
    return "python -m recipes.train " + " ".join(args)


def summarize(row, split, args, metrics, run):
    result = {"method": row, "split": split, "labelled": metrics["classifier"]["protocol"]["labelled"],
              "test_accuracy": metrics["classifier"]["accuracy"], "encoder_knn": metrics["knn"]["accuracy"],
              "wall_time_s": run["wall_time_s"], "git_commit": run.get("git_commit"),
              "command": train_command(args)}
    if "rounds" in metrics:
        result["rounds"] = [{k: r.get(k) for k in ("round", "test_accuracy", "num_pseudo_labelled",
                                                   "pseudo_label_accuracy")} for r in metrics["rounds"]]
    return result


def markdown(results):
    lines = ["| labels | method | test accuracy | vs supervised only | training time | commit |",
             "|---|---|---|---|---|---|"]
    baseline = {r["split"]: r["test_accuracy"] for r in results if r["method"] == "supervised only"}
    for r in results:
        delta = r["test_accuracy"] - baseline[r["split"]] if r["split"] in baseline else float("nan")
        lines.append(f"| {r['labelled']} | {r['method']} | {r['test_accuracy']:.4f} | {delta * 100:+.1f} | "
                     f"{r['wall_time_s'] / 60:.1f} min | {(r.get('git_commit') or '?')[:7]} |")
    lines += ["", "Commands (each in its own `--model_dir`):", ""]
    lines += [f"- {r['method']}, {r['labelled']} labels: `{r['command']}`" for r in results]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    results = []
    for split in FLAGS.splits:
        for row, name, args in runs(split):
            result = result_for(row, split, name, args)
            if result is None:
                print(f"{row:32s} {split:5s} not recorded, skipped (--recorded_only)", flush=True)
                continue
            results.append(result)
            print(f"{row:32s} {split:5s} {result['test_accuracy']:.4f}", flush=True)
    protocol = {"dataset": "fashion_mnist", "train_split": "train (labelled subset seeded, rest unlabelled)",
                "test_split": "test (10,000)", "backbone": "resnet18_small", "width": 0.25, "seed": FLAGS.seed}
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out + ".json", "w") as f:
        json.dump({"protocol": protocol, "results": results}, f, indent=2)
    with open(FLAGS.out + ".md", "w") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    app.run(main)
