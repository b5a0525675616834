"""Pretrain an encoder with a recipe: `python -m recipes.train --recipe=moco --dataset=fashion_mnist`.

What a run leaves in --model_dir:
  checkpoints/   one per epoch (model, optimizer, epoch): rerunning the same command
                 after an interruption (even kill -9) resumes from the last one;
  launch.json    the settings that define the run, written at its start: a rerun with
                 other ones is refused rather than resumed (recipes.launch);
  logs/          TensorBoard scalars;
  encoder.keras  the pretrained encoder (what the zoo publishes by default);
  embedding.keras  the encoder with the recipe's projection head (recipes that have one);
  classifier.keras  label recipes: images -> class probabilities (published with the encoder);
  run.json       recipe, its config, backbone, data, schedule, strategy, timing;
  metrics.json   kNN (encoder features and, where the recipe has one, its embedding) and
                 linear probe on the test split, each with its protocol.

The data order is a function of (seed, epoch) only, so a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "moco", "Recipe name (see recipes.base.RECIPES).")
flags.DEFINE_string("dataset", "fashion_mnist", "Dataset name (see recipes.data.DATASETS), or folder:PATH for your "
                    "own images in PATH/<split>/<class>/ (see recipes.image_folder).")
flags.DEFINE_integer("image_size", None, "Folder datasets: resize every image's shorter side to this and crop the "
                     "centre square (default: keep the files' size, which must then be one size).")
flags.DEFINE_integer("channels", None, "Folder datasets: 1 (grey) or 3 (RGB) channels (default: the first "
                     "training image's).")
flags.DEFINE_string("data_dir", None, "TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_string("train_split", "train", "Split to pretrain on (labels unused).")
flags.DEFINE_string("test_split", "test", "Split for the final kNN / linear-probe evaluation.")
flags.DEFINE_string("backbone", "resnet18_small", "Encoder (see zoo.backbones.BACKBONES).")
flags.DEFINE_float("width", 0.25, "Channel width multiplier of the backbone.")
flags.DEFINE_enum("backbone_norm", None, ["batch", "layer"],
                  "Normalization in the backbone (default: the recipe's; layer for CPC as in CPC v2, else batch).")
flags.DEFINE_integer("epochs", 10, "Training epochs.")
flags.DEFINE_integer("steps_per_epoch", None, "Optional cap on steps per epoch (default: one pass).")
flags.DEFINE_integer("batch_size", 256, "Global batch size (split across replicas).")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"], "tf.distribute strategy.")
flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, the encoder and metrics go.")
flags.DEFINE_integer("seed", 0, "Seed for weights, data order and augmentations.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "sgd_l2", "lars", "adamw"],
                  "SGD momentum 0.9 with Keras's decoupled weight decay; sgd_l2: SGD momentum 0.9 with "
                  "the papers' weight decay (an L2 term in the gradient, ~10x stronger at the same value; "
                  "see recipes/optimizers.py); lars: LARS momentum 0.9 (SimCLR, BYOL, Barlow Twins), "
                  "--weight_decay as its coupled L2; or AdamW.")
flags.DEFINE_string("optimizer_args", "", "More optimizer arguments as key=value,... (JSON values), e.g. "
                    "eta=0.02,vector_lr_scale=0.024 for lars, nesterov=true for sgd.")
flags.DEFINE_float("lr", 0.06, "Peak learning rate (cosine decay to 0).")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay. The default suits SGD; with --optimizer=lars set it: "
                   "SimCLR, BYOL and Barlow Twins use 1e-6 to 1.5e-6 there.")
flags.DEFINE_integer("warmup_epochs", 0, "Linear learning-rate warm-up epochs.")
flags.DEFINE_string("hparams", "", "Recipe hyperparameters as key=value,key=value (values parsed as JSON).")
flags.DEFINE_integer("knn_every", 1, "Log held-out kNN accuracy every N epochs (0: never).")
flags.DEFINE_integer("knn_monitor_size", 10000, "Training images used as the kNN memory while monitoring.")
flags.DEFINE_integer("probe_epochs", 30, "Linear-probe epochs in the final evaluation (0: skip).")
flags.DEFINE_enum("precision", "float32", ["float32", "mixed_bfloat16", "mixed_float16"],
                  "Keras dtype policy of training: mixed_* compute in 16 bits on float32 weights, losses "
                  "in float32, loss scaling under mixed_float16 (recipes.precision). Evaluation and the "
                  "published encoder are float32 either way.")
flags.DEFINE_bool("jit_compile", False, "XLA (fails under MirroredStrategy in TF 2.21; slower on CPU).")
flags.DEFINE_integer("verbose", 1, "Keras progress: 0 silent, 1 bar, 2 line per epoch.")
flags.DEFINE_string("zoo_entry", None, "Rerun the recipe recorded in this zoo entry's card (NAME or NAME:VERSION); "
                    "flags given explicitly (e.g. --dataset) override the card.")
flags.DEFINE_string("publish_as", None, "Publish the trained encoder to the zoo under this name (a new version).")
flags.DEFINE_enum("publish_embedding", "encoder", ["encoder", "head"],
                  "What --publish_as publishes: the encoder's pooled features, or the encoder with the recipe's "
                  "projection head (metrics.json's knn_embedding measures that embedding).")
flags.DEFINE_integer("labels_per_class", None, "Label-using recipes: labelled images per class (stratified).")
flags.DEFINE_float("label_fraction", None, "Label-using recipes: fraction of the training split that keeps labels.")
flags.DEFINE_string("init_from", None, "Start from this published zoo encoder (NAME or NAME:VERSION) instead of "
                    "a random one.")
flags.DEFINE_float("student_width", None, "noisy_student: width multiplier of every student (default --width). "
                   "The paper's students are equal or larger than their teacher; the last student is the "
                   "published encoder.")
flags.DEFINE_bool("allow_changed_flags", False, "Resume a --model_dir whose run was started with other settings "
                  "(refused by default: it would mix two runs); the change is recorded in its launch.json.")
flags.DEFINE_string("zoo_store", None, "Zoo store for --zoo_entry / --init_from / --publish_as "
                    "(default $ZOO_HOME or ~/.ssl_zoo).")

# The flags that define what a run trains, each with the run.json key that records it. launch.json
# compares them before a rerun resumes (recipes.launch), run.json records them, and a zoo card gives
# them back to a retraining run (--zoo_entry).
RUN_DEFINING_FLAGS = {
    "recipe": "recipe", "dataset": "dataset", "train_split": "train_split", "backbone": "backbone",
    "width": "backbone_width", "backbone_norm": "backbone_norm", "init_from": "init_from", "epochs": "epochs",
    "steps_per_epoch": "steps_per_epoch", "batch_size": "batch_size", "seed": "seed", "optimizer": "optimizer",
    "optimizer_args": "optimizer_args", "lr": "lr", "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs", "labels_per_class": "labels_per_class",
    "label_fraction": "label_fraction", "student_width": "student_width", "image_size": "image_size",
    "channels": "channels"}
# Not from the card: a retrained entry starts afresh, and its labelled split is set apart
# (flags_from_zoo_entry).
_CARD_FLAGS = {flag: key for flag, key in RUN_DEFINING_FLAGS.items()
               if flag not in ("init_from", "labels_per_class", "label_fraction")}


def _run_defining_values() -> dict:
    """Flag -> value of every run-defining flag, with the recipe's own norm when the flag is unset."""
    values = {flag: FLAGS[flag].value for flag in RUN_DEFINING_FLAGS}
    values["backbone_norm"] = backbone_norm()
    return values


def run_definition(hparams: dict) -> dict:
    """The settings that define what a run trains (recipes.launch): a rerun resumes only if they match.

    --precision is part of it only when mixed, so runs recorded before the flag existed (all
    float32) still resume; a mixed_float16 checkpoint also holds the loss-scale optimizer's state."""
    mixed = {"precision": FLAGS.precision} if FLAGS.precision != "float32" else {}
    return {**_run_defining_values(), "optimizer_args": parse_hparams(FLAGS.optimizer_args), "hparams": hparams,
            **mixed}


class TrainingDiverged(RuntimeError):
    pass


class UsageError(ValueError):
    """A flag, name, dataset or zoo entry the user can fix: the CLI prints it without a traceback."""


@contextlib.contextmanager
def usage_errors():
    """Turns what setting a run up refuses (bad flags, unknown names, missing data) into UsageError."""
    from recipes.data import DatasetChecksumError, DatasetNotFoundError
    from zoo.errors import ZooError

    try:
        yield
    except (ValueError, DatasetNotFoundError, DatasetChecksumError, ZooError) as error:
        raise UsageError(str(error)) from error


def _top_level_items(text: str):
    """Splits on commas outside brackets/braces, so JSON lists and dicts stay whole."""
    depth, start = 0, 0
    for i, char in enumerate(text):
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def parse_hparams(text: str) -> dict:
    """'a=1,b=0.5,c=true,d="x",e={"k":[1,2]}' -> {'a': 1, 'b': 0.5, 'c': True, 'd': 'x', 'e': {...}}."""
    result = {}
    for item in filter(None, (part.strip() for part in _top_level_items(text))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--hparams item {item!r} is not key=value.")
        try:
            result[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            result[key.strip()] = value
    return result


@functools.cache
def git_commit() -> str:
    """HEAD when first asked, which `train` does as it starts: the code a long run imported,
    not whatever was checked out by the time it finished."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def epoch_batches(images, batch_size, steps_per_epoch, first_epoch, last_epoch, seed, with_index):
    """Batches for epochs [first_epoch, last_epoch): a fresh permutation per (seed, epoch)."""
    import tensorflow as tf

    images_t = tf.constant(images)
    count = len(images)

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(count, dtype=tf.int64),
                                                         seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=True).take(steps_per_epoch)

    def gather(index):
        batch = {"image": tf.gather(images_t, index)}
        if with_index:
            batch["index"] = index
        return batch

    # Infinite (fit stops after steps_per_epoch * epochs): a finite dataset makes
    # multi-worker input use get_next_as_optional, which loses the static batch size.
    dataset = tf.data.Dataset.range(first_epoch, last_epoch).flat_map(one_epoch).repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2).with_options(options)


def flags_from_zoo_entry(ref: str, store=None) -> dict:
    """Fills unset flags from a zoo card; returns the recorded recipe hyperparameters."""
    import zoo
    from zoo.card import retraining_spec

    spec = retraining_spec(zoo.info(ref, store=store))
    for flag, key in _CARD_FLAGS.items():
        if not FLAGS[flag].present and spec.get(key) is not None:
            FLAGS[flag].value = spec[key]
    if not (FLAGS["labels_per_class"].present or FLAGS["label_fraction"].present):  # the card's labelled split
        for flag in ("labels_per_class", "label_fraction"):
            FLAGS[flag].value = spec.get(flag)
    print(f"Retraining {spec['recipe']} from zoo entry {ref} on {FLAGS.dataset}.")
    return card_hparams(spec["recipe_config"])


# Recipe arguments that are facts of a run, not hyperparameters: --seed sets the seed; the
# data the class count, the labelled images' count and the dataset size (NPID's bank, SeLa's
# and DeepCluster's labels); the schedule the total steps (SeLa's label steps).
RUN_FACT_ARGUMENTS = ("seed", "num_classes", "label_count", "dataset_size", "total_steps")


def card_hparams(recipe_config: dict) -> dict:
    """The hyperparameters of a recorded recipe config, without the facts of the run that made it:
    a retrained entry takes those from its own data and schedule."""
    return {k: v for k, v in recipe_config.items() if k not in RUN_FACT_ARGUMENTS}


def worker_batches(global_batches, context, global_batch_size):
    """This worker's rows of every global batch, as per-replica batches with static shapes.

    Every worker builds the same (seeded) global batches and keeps rows
    [w * local, (w + 1) * local): the split MirroredStrategy makes on one machine, so
    N workers compute what one machine with N devices computes.
    """
    import tensorflow as tf

    local = global_batch_size // context.num_input_pipelines
    start = context.input_pipeline_id * local
    per_replica = context.get_per_replica_batch_size(global_batch_size)
    mine = global_batches.map(lambda batch: {k: v[start:start + local] for k, v in batch.items()})
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return mine.unbatch().batch(per_replica, drop_remainder=True).with_options(options)


def make_optimizer(name, lr, weight_decay, total_steps, warmup_steps, extra_args=None):
    """The --optimizer with a cosine schedule (after an optional linear warm-up).

    `extra_args`: further constructor arguments (--optimizer_args), e.g. LARS's eta.
    """
    import keras

    from recipes.optimizers import LARS, SGDL2

    if warmup_steps >= total_steps > 0:
        raise ValueError(f"The warm-up ({warmup_steps} steps) must end before the run does ({total_steps} steps): "
                         "lower --warmup_epochs, or the rate would never decay.")
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup_steps else lr, max(1, total_steps - warmup_steps),
        warmup_target=lr if warmup_steps else None, warmup_steps=warmup_steps)
    build = {"sgd": lambda **kw: keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=weight_decay, **kw),
             "sgd_l2": lambda **kw: SGDL2(schedule, momentum=0.9, l2=weight_decay, **kw),
             "lars": lambda **kw: LARS(schedule, momentum=0.9, l2=weight_decay, **kw),
             "adamw": lambda **kw: keras.optimizers.AdamW(schedule, weight_decay=weight_decay, **kw)}
    if name not in build:
        raise ValueError(f"Unknown optimizer {name!r}. Known: {', '.join(build)}.")
    try:
        return build[name](**(extra_args or {}))
    except TypeError as error:  # an argument this optimizer does not take
        raise ValueError(f"--optimizer_args {sorted(extra_args)} do not fit {name}: {error}") from None


def hparam_names(recipe_cls):
    """Keyword arguments the recipe's constructor takes, following `**kwargs` up to `Recipe`.

    None when some constructor collects keywords under another name (anything goes).
    """
    from recipes.base import Recipe

    names = set()
    for cls in recipe_cls.__mro__:
        if "__init__" not in cls.__dict__:
            continue
        parameters = inspect.signature(cls.__dict__["__init__"]).parameters.values()
        if any(p.kind == p.VAR_KEYWORD and p.name != "kwargs" for p in parameters):
            return None
        names.update(p.name for p in parameters if p.kind != p.VAR_KEYWORD)
        if cls is Recipe or not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break  # what Recipe passes on is keras.Model's (name, dtype, ...), not a hyperparameter
    return names - {"self", "encoder", "num_classes", "seed"}  # set by the CLI (--seed, the dataset)


def check_hparam_names(recipe_cls, hparams, extra_names=()):
    """Refuses hyperparameters the recipe does not take, listing the ones it does.

    `extra_names`: keywords taken by whatever runs the recipe (the label recipes' run functions).
    """
    accepted = hparam_names(recipe_cls)
    if accepted is None:
        return
    accepted |= set(extra_names)
    unknown = [k for k in hparams if k not in accepted]
    if unknown:
        raise ValueError(f"Unknown hyperparameters {unknown} for recipe {recipe_cls.recipe_name!r}. "
                         f"Valid: {', '.join(sorted(accepted))}.")


# Flags of make_optimizer: the self-supervised recipes' optimizer; the label recipes build their own.
OPTIMIZER_FLAGS = ("optimizer", "lr", "weight_decay", "warmup_epochs", "optimizer_args")


def build_recipe(recipe_cls, encoder, hparams, seed, total_steps, num_examples):
    """Instantiates a recipe, passing run facts only to recipes that ask for them
    (`needs_total_steps`, `needs_index`); a fact given in `hparams` wins."""
    check_hparam_names(recipe_cls, hparams)
    extra = {k: v for k, v in recipe_cls.run_facts(total_steps, num_examples).items() if k not in hparams}
    return recipe_cls(encoder, seed=seed, **extra, **hparams)


def _callbacks(recipe, checkpoint, model_dir, knn_data, num_classes, timing):
    import keras
    import numpy as np

    class Guard(keras.callbacks.Callback):
        """Stops on a non-finite loss; saves a checkpoint only after a finite epoch."""

        diverged_at = None

        def on_epoch_begin(self, epoch, logs=None):
            timing["epoch_start"] = time.time()

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not np.isfinite(float(loss)):
                self.diverged_at = (timing["epoch"], batch)
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            timing["epoch_seconds"].append(time.time() - timing["epoch_start"])
            timing["epoch"] = epoch + 1
            if self.diverged_at is None:
                # The epoch times go with the checkpoint (its notes), so a resumed run still knows them.
                checkpoint.save(epoch + 1, {"epoch_seconds": [round(s, 2) for s in timing["epoch_seconds"]]})

    guard = Guard()
    callbacks = [guard]
    if knn_data is not None:
        from recipes.evaluate import KnnMonitor

        callbacks.append(KnnMonitor(*knn_data, num_classes=num_classes, every=FLAGS.knn_every))
    # Last, so it writes what the callbacks before it added to the epoch's logs: the held-out
    # kNN lands in logs/validation as epoch_knn and epoch_knn_embedding.
    callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, "logs"), update_freq="epoch"))
    return guard, callbacks


def _read_json(path) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def backbone_norm() -> str:
    """--backbone_norm, or the recipe's own choice."""
    from recipes.base import get_recipe_class

    return FLAGS.backbone_norm or get_recipe_class(FLAGS.recipe).backbone_norm


def run_facts(strategy, train_images) -> dict:
    """The run.json fields every recipe shares: what was trained on what, how."""
    recorded = {RUN_DEFINING_FLAGS[flag]: value for flag, value in _run_defining_values().items()}
    return {
        **recorded, "input_shape": list(train_images.shape[1:]), "test_split": FLAGS.test_split,
        "strategy": FLAGS.strategy, "num_replicas": strategy.num_replicas_in_sync, "precision": FLAGS.precision,
        "retrained_from": FLAGS.zoo_entry,
        "git_commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "recipes.train"] + sys.argv[1:]),
    }


def in_float32(*models):
    """After training: the global policy back to float32 and float32 copies of `models` (None
    stays None), so evaluation measures, and the run directory holds, what the zoo publishes."""
    import keras

    from zoo.export import without_mixed_precision

    keras.mixed_precision.set_global_policy("float32")
    return [None if model is None else without_mixed_precision(model) for model in models]


def embedding_model(encoder, head):
    """Images -> the recipe's embedding: the encoder with its projection head on top."""
    import keras

    return keras.Model(encoder.inputs, head(encoder.outputs[0]), name=f"{encoder.name}_embedding")


def write_outputs(chief, model_dir, encoder, run_info, metrics, embedding_head=None, classifier=None):
    """encoder.keras (+ embedding.keras or classifier.keras), run.json, metrics.json on the chief
    (then --publish_as)."""
    from zoo.export import save_trainable

    if not chief:  # this worker's final encoder, to check workers agree; its checkpoints stay, so a
        # rerun after the chief failed later resumes every worker at the same epoch
        save_trainable(encoder, os.path.join(model_dir, "encoder.keras"))
        return
    save_trainable(encoder, os.path.join(model_dir, "encoder.keras"))
    if embedding_head is not None:
        save_trainable(embedding_model(encoder, embedding_head), os.path.join(model_dir, "embedding.keras"))
    if classifier is not None:
        save_trainable(classifier, os.path.join(model_dir, "classifier.keras"))
    from recipes.checkpointing import write_json

    for name, content in (("run.json", run_info), ("metrics.json", metrics)):
        write_json(os.path.join(model_dir, name), content)
    if FLAGS.publish_as:
        import zoo

        ref = zoo.publish(model_dir, name=FLAGS.publish_as, store=FLAGS.zoo_store, embedding=FLAGS.publish_embedding)
        print(f"Published {ref}.")


def train_label_recipe(new_encoder, student_encoder_fn, strategy, chief, model_dir, hparams, steps, train,
                       test) -> dict:
    """finetune / fixmatch / pseudo_label / noisy_student; checkpoints/ makes them resumable (see semi.cli)."""
    from recipes import data, evaluate
    from recipes.semi.cli import train_with_labels

    started = time.time()
    model, encoder, metrics = train_with_labels(
        FLAGS.recipe, new_encoder, train, test, student_encoder_fn=student_encoder_fn,
        labels_per_class=FLAGS.labels_per_class,
        label_fraction=FLAGS.label_fraction, epochs=FLAGS.epochs, steps_per_epoch=steps,
        batch_size=FLAGS.batch_size, strategy=strategy, seed=FLAGS.seed, hparams=hparams, verbose=FLAGS.verbose,
        checkpoint_dir=os.path.join(model_dir, "checkpoints"))
    wall = time.time() - started
    encoder, classifier = in_float32(encoder, model.exported_classifier)
    protocol = {"dataset": FLAGS.dataset, "train_split": FLAGS.train_split, "test_split": FLAGS.test_split,
                "seed": FLAGS.seed}
    metrics.update(evaluate.evaluate_encoder(encoder, *train, *test, int(train[1].max()) + 1, probe_epochs=0,
                                             protocol=protocol))
    # Class ids index the dataset's names; a last class absent from both splits has no output.
    class_names = data.info(FLAGS.dataset, FLAGS.image_size, FLAGS.channels).class_names[:classifier.output_shape[-1]]
    run_info = {**run_facts(strategy, train[0]), "recipe_config": model.get_config(),
                "embedding_dim": int(encoder.output_shape[-1]), "steps_per_epoch": steps,
                # FixMatch counts the sessions before a resume too; the others, this session.
                "wall_time_s": metrics.pop("wall_time_s", round(wall, 2)), "images_per_sec": None,
                "class_names": list(class_names)}
    write_outputs(chief, model_dir, encoder, run_info, metrics, classifier=classifier)
    print(f"{FLAGS.recipe}: test accuracy {metrics['classifier']['accuracy']:.4f} "
          f"({metrics['classifier']['protocol']['labelled']} labels); encoder kNN {metrics['knn']['accuracy']:.4f}")
    return {"run": run_info, "metrics": metrics}


def train(argv=None) -> dict:
    """Runs the training CLI's flags; Keras's global dtype policy is --precision while the
    models are built and trained, and is restored on return."""
    from recipes import precision

    git_commit()  # the commit is taken now; run.json is written hours later
    with precision.global_policy(FLAGS.precision):
        return _train(argv)


def _train(argv=None) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    import recipes  # noqa: F401  (registers every recipe)
    from recipes import data, distribute, evaluate, launch
    from recipes.base import get_recipe_class
    from recipes.checkpointing import resume
    from recipes.semi.cli import LABEL_RECIPES, check_label_flags, check_student_encoder, label_run_hparam_names
    from zoo import backbones

    with usage_errors():  # everything here is checked before any data is read
        hparams = flags_from_zoo_entry(FLAGS.zoo_entry, FLAGS.zoo_store) if FLAGS.zoo_entry else {}
        hparams.update(parse_hparams(FLAGS.hparams))
        recipe_cls = get_recipe_class(FLAGS.recipe)
        check_hparam_names(recipe_cls, hparams, label_run_hparam_names(FLAGS.recipe))
        if FLAGS.backbone not in backbones.BACKBONES:
            raise ValueError(f"Unknown backbone {FLAGS.backbone!r}. "
                             f"Valid backbones: {', '.join(backbones.BACKBONES)}.")
        if not FLAGS.model_dir:
            raise ValueError("--model_dir is required (checkpoints, logs and the encoder go there).")
        check_student_encoder(FLAGS.recipe, FLAGS.student_width is not None)
        if FLAGS.recipe in LABEL_RECIPES:
            check_label_flags(FLAGS.labels_per_class, FLAGS.label_fraction)
            ignored = [f"--{name}" for name in OPTIMIZER_FLAGS if FLAGS[name].present]
            if ignored:  # would be silently ignored: the label recipes build their own optimizer
                raise ValueError(f"{', '.join(ignored)}: not used by {FLAGS.recipe}, which trains with its own "
                                 "optimizer (FixMatch: its paper's SGD with Nesterov momentum, lr 0.03 with cosine "
                                 "decay, weight decay 5e-4 on the kernels; finetune, pseudo_label and noisy_student: "
                                 "SGD with Nesterov momentum, lr 0.03). Leave the flag out.")
        if FLAGS.init_from:
            import zoo

            zoo.info(FLAGS.init_from, store=FLAGS.zoo_store)  # an unknown name or version fails here
        if FLAGS.publish_as:
            from zoo.index import validate_name
            from zoo.store import open_store

            validate_name(FLAGS.publish_as)  # not after hours of training
            open_store(FLAGS.zoo_store).require_writable()  # an http(s) store is read-only

    strategy = distribute.make_strategy(FLAGS.strategy)
    chief = distribute.is_chief()
    # Every worker must write its checkpoints; only the chief's go to --model_dir.
    model_dir = FLAGS.model_dir if chief else os.path.join(FLAGS.model_dir, f"worker_{distribute.task_index()}")
    os.makedirs(model_dir, exist_ok=True)

    with usage_errors():
        launch.check_or_record(model_dir, run_definition(hparams), allow_changes=FLAGS.allow_changed_flags)
        train_images, train_labels = data.load_arrays(FLAGS.dataset, FLAGS.train_split, FLAGS.data_dir,
                                                      FLAGS.image_size, FLAGS.channels)
        test_images, test_labels = data.load_arrays(FLAGS.dataset, FLAGS.test_split, FLAGS.data_dir,
                                                    FLAGS.image_size, FLAGS.channels)
        if FLAGS.batch_size % strategy.num_replicas_in_sync:
            raise ValueError(f"--batch_size={FLAGS.batch_size} must be divisible by "
                             f"{strategy.num_replicas_in_sync} replicas.")
        full_steps = len(train_images) // FLAGS.batch_size
        if full_steps == 0:
            raise ValueError(f"--batch_size={FLAGS.batch_size} exceeds the {len(train_images)} training images.")
    num_classes = int(max(train_labels.max(), test_labels.max()) + 1)
    steps = min(full_steps, FLAGS.steps_per_epoch or full_steps)
    total_steps = steps * FLAGS.epochs

    keras.utils.set_random_seed(FLAGS.seed)  # here: data loading may consume Python/numpy randomness

    def fresh_encoder(width=FLAGS.width):
        return backbones.build(FLAGS.backbone, train_images.shape[1:], width, norm=backbone_norm())

    def new_encoder():
        if FLAGS.init_from:
            import zoo

            from zoo.export import with_dtype_policy

            # Published in float32; trained in --precision.
            return with_dtype_policy(zoo.load(FLAGS.init_from, store=FLAGS.zoo_store), FLAGS.precision)
        return fresh_encoder()

    if FLAGS.recipe in LABEL_RECIPES:
        # --student_width: a fresh encoder per student, even when the teacher starts --init_from.
        student_encoder_fn = None if FLAGS.student_width is None else lambda: fresh_encoder(FLAGS.student_width)
        return train_label_recipe(new_encoder, student_encoder_fn, strategy, chief, model_dir, hparams,
                                  FLAGS.steps_per_epoch, (train_images, train_labels), (test_images, test_labels))
    with strategy.scope():
        with usage_errors():  # hyperparameters the recipe or the optimizer refuses
            encoder = new_encoder()
            recipe = build_recipe(recipe_cls, encoder, hparams, FLAGS.seed, total_steps, len(train_images))
            optimizer = make_optimizer(FLAGS.optimizer, FLAGS.lr, FLAGS.weight_decay, total_steps,
                                       FLAGS.warmup_epochs * steps, parse_hparams(FLAGS.optimizer_args))
        recipe.compile(optimizer=optimizer, jit_compile=FLAGS.jit_compile)
        checkpoint, initial_epoch = resume(recipe, os.path.join(model_dir, "checkpoints"))

    run_info = {**run_facts(strategy, train_images), "recipe_config": recipe.get_config(),
                "embedding_dim": int(encoder.output_shape[-1]), "steps_per_epoch": steps}
    # Fewer than initial_epoch for runs checkpointed before epoch times were noted.
    timing = {"epoch_seconds": checkpoint.notes.get("epoch_seconds", []), "epoch": initial_epoch,
              "epoch_start": time.time()}
    previous_run = _read_json(os.path.join(model_dir, "run.json"))
    knn_data = None
    if FLAGS.knn_every > 0:
        monitor = np.random.RandomState(FLAGS.seed).permutation(len(train_images))[:FLAGS.knn_monitor_size]
        knn_data = (train_images[monitor], train_labels[monitor], test_images, test_labels)
    guard, callbacks = _callbacks(recipe, checkpoint, model_dir, knn_data, num_classes, timing)
    callbacks = recipe.training_callbacks(train_images) + callbacks

    if initial_epoch < FLAGS.epochs:
        batches = epoch_batches(train_images, FLAGS.batch_size, steps, initial_epoch, FLAGS.epochs, FLAGS.seed,
                                recipe_cls.needs_index)
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            global_batches = batches
            batches = strategy.distribute_datasets_from_function(
                lambda context: worker_batches(global_batches, context, FLAGS.batch_size))
        recipe.fit(batches, epochs=FLAGS.epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                   callbacks=callbacks, verbose=FLAGS.verbose)
    if guard.diverged_at is not None:
        epoch, step = guard.diverged_at
        raise TrainingDiverged(
            f"Loss became NaN/inf at epoch {epoch + 1}, step {step + 1}. Training stopped; the last good "
            f"checkpoint (epoch {epoch}) is kept in {os.path.join(model_dir, 'checkpoints')}. Lower --lr or "
            f"check the recipe hyperparameters, then rerun the same command to resume.")

    epoch_seconds = timing["epoch_seconds"]
    if timing["epoch"] == initial_epoch and previous_run.get("wall_time_s"):
        # Re-evaluating a finished run (nothing trained now): its time is the one it reported.
        run_info.update({k: previous_run.get(k) for k in ("wall_time_s", "images_per_sec", "epoch_seconds")})
    else:
        run_info["wall_time_s"] = round(sum(epoch_seconds), 2)
        run_info["images_per_sec"] = round(len(epoch_seconds) * steps * FLAGS.batch_size / sum(epoch_seconds), 1) \
            if epoch_seconds else None
        run_info["epoch_seconds"] = [round(s, 2) for s in epoch_seconds]
        if len(epoch_seconds) < timing["epoch"]:  # resumed from a checkpoint older than the per-epoch record
            run_info["untimed_epochs"] = timing["epoch"] - len(epoch_seconds)
    protocol = {"dataset": FLAGS.dataset, "train_split": FLAGS.train_split, "test_split": FLAGS.test_split,
                "pretrain_epochs": FLAGS.epochs, "seed": FLAGS.seed}
    encoder, embedding_head = in_float32(encoder, recipe.embedding_head())
    metrics = evaluate.evaluate_encoder(encoder, train_images, train_labels, test_images, test_labels, num_classes,
                                        probe_epochs=FLAGS.probe_epochs, seed=FLAGS.seed, protocol=protocol,
                                        embedding_head=embedding_head)
    metrics["train"] = {"wall_time_s": run_info["wall_time_s"], "images_per_sec": run_info["images_per_sec"]}
    write_outputs(chief, model_dir, encoder, run_info, metrics, embedding_head)
    knn = metrics["knn"]["accuracy"]
    probe = metrics.get("linear_probe", {}).get("accuracy")
    embedding = metrics.get("knn_embedding", {}).get("accuracy")
    print(f"kNN accuracy (k=200, T=0.1, {FLAGS.dataset} {FLAGS.test_split}): {knn:.4f}"
          + (f"; on the embedding (head output): {embedding:.4f}" if embedding is not None else "")
          + (f"; linear probe: {probe:.4f}" if probe is not None else ""))
    return {"run": run_info, "metrics": metrics}


def main(argv):
    del argv
    try:
        train()
    except UsageError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as error:
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(3)
    except ValueError as error:
        from recipes.checkpointing import CheckpointError

        if not isinstance(error, CheckpointError):
            raise
        print(f"ERROR: {error}", file=sys.stderr)  # nothing was trained over the damaged checkpoints
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
