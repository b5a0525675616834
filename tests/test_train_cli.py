"""The training CLI as users run it: errors, resume after kill -9, NaN stop, multi-worker."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--dataset=synthetic_shapes", "--backbone=resnet18_small", "--width=0.125", "--batch_size=32",
         "--steps_per_epoch=3", "--knn_every=0", "--probe_epochs=0", "--verbose=0",
         "--hparams=queue_size=64,hidden_dim=32,projection_dim=16,momentum=0.9"]


def _env(tmp_data_dir, **extra):
    env = dict(os.environ, TFDS_DATA_DIR=str(tmp_data_dir), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def _train(args, env, **kwargs):
    return subprocess.run([sys.executable, "-m", "recipes.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.mark.parametrize("flag, listed", [("--recipe=nope", "moco"), ("--backbone=nope", "resnet18_small"),
                                          ("--dataset=nope", "fashion_mnist"), ("--hparams=nope=1", "queue_size")])
def test_unknown_names_list_the_valid_ones(flag, listed, data_dir, tmp_path):
    result = _train([*SMALL, f"--model_dir={tmp_path}", "--epochs=1", flag], _env(data_dir))
    assert result.returncode == 2  # a usage error: one line, no traceback
    assert "nope" in result.stderr and listed in result.stderr
    assert "Traceback" not in result.stderr


def _load_weights(path):
    import keras

    import zoo.backbones  # noqa: F401  (registers the custom layers)
    return keras.saving.load_model(path).get_weights()


def _load_trainable(path):
    import keras

    import zoo.backbones  # noqa: F401
    return [w.numpy() for w in keras.saving.load_model(path).trainable_weights]


def test_kill_minus_9_then_rerun_resumes_and_matches_uninterrupted_run(data_dir, tmp_path):
    env = _env(data_dir)
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    args = [*SMALL, "--epochs=3", "--steps_per_epoch=6"]
    assert _train([*args, f"--model_dir={reference_dir}"], env).returncode == 0

    process = subprocess.Popen([sys.executable, "-m", "recipes.train", *args, f"--model_dir={interrupted_dir}"],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (interrupted_dir / "checkpoints" / "checkpoint").exists():
        assert process.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted_dir / "encoder.keras").exists()

    resumed = _train([*args, f"--model_dir={interrupted_dir}"], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout
    for got, expected in zip(_load_weights(interrupted_dir / "encoder.keras"),
                             _load_weights(reference_dir / "encoder.keras")):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    metrics = json.loads((interrupted_dir / "metrics.json").read_text())
    assert metrics["knn"]["protocol"]["k"] == 200
    # The epochs trained before the kill still count in the run's time.
    run = json.loads((interrupted_dir / "run.json").read_text())
    assert len(run["epoch_seconds"]) == 3 and min(run["epoch_seconds"]) > 0
    assert run["wall_time_s"] == pytest.approx(sum(run["epoch_seconds"]), abs=0.05)
    assert metrics["knn_embedding"]["protocol"]["k"] == 200  # MoCo's 128-d projection, InstDisc's protocol
    assert 0.0 <= metrics["knn_embedding"]["accuracy"] <= 1.0


def test_a_rerun_with_other_settings_is_refused_not_spliced(data_dir, tmp_path):
    env = _env(data_dir)
    args = [*SMALL, "--epochs=1", f"--model_dir={tmp_path}"]
    assert _train(args, env).returncode == 0
    encoder = (tmp_path / "encoder.keras").read_bytes()
    refused = _train([*args[:-2], "--epochs=2", "--lr=0.1", f"--model_dir={tmp_path}"], env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "epochs: 1 then, 2 now" in refused.stderr and "lr: 0.06 then, 0.1 now" in refused.stderr
    assert (tmp_path / "encoder.keras").read_bytes() == encoder  # nothing retrained or overwritten
    # Not part of the definition: evaluation and logging flags.
    assert _train([*args, "--probe_epochs=1"], env).returncode == 0


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    env = _env(data_dir)
    assert _train([*SMALL, "--epochs=1", f"--model_dir={tmp_path}"], env).returncode == 0
    # A deliberately spliced run: epoch 2 at a learning rate that diverges.
    result = _train([*SMALL, "--epochs=2", "--lr=1e30", "--allow_changed_flags", f"--model_dir={tmp_path}"], env)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "NaN" in result.stderr and "last good checkpoint (epoch 1)" in result.stderr
    latest = (tmp_path / "checkpoints" / "checkpoint").read_text()
    assert "ckpt-1" in latest and "ckpt-2" not in latest


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_multi_worker_mirrored_end_with_identical_weights(data_dir, tmp_path):
    # Build the dataset once so the two workers do not race to prepare it.
    from recipes import data
    data.load_arrays("synthetic_shapes", "test", data_dir=str(data_dir))
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "recipes.train", *SMALL, "--epochs=1", "--strategy=multi_worker",
             f"--model_dir={tmp_path}"], cwd=ROOT, env=_env(data_dir, TF_CONFIG=tf_config),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["num_replicas"] == 2 and run["strategy"] == "multi_worker"
    # Parameters are all-reduced and must agree exactly; BN moving statistics are each
    # worker's own (each normalizes its own rows), as in DDP without SyncBN.
    chief = _load_trainable(tmp_path / "encoder.keras")
    worker = _load_trainable(tmp_path / "worker_1" / "encoder.keras")
    assert len(chief) == len(worker) > 0
    for a, b in zip(chief, worker):
        np.testing.assert_array_equal(a, b)
    import keras

    from zoo import backbones
    keras.utils.set_random_seed(0)  # the run's initialization: training must have moved it
    initial = [w.numpy() for w in backbones.build("resnet18_small", (32, 32, 3), 0.125).trainable_weights]
    assert any(not np.allclose(a, b) for a, b in zip(chief, initial))


def _tensorboard_scalars(log_dir):
    """{tag: [values by epoch]} from the TensorBoard event files in `log_dir`."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return scalars


def test_publish_as_then_retrain_from_the_card_publishes_version_2(data_dir, tmp_path):
    env = _env(data_dir, ZOO_HOME=str(tmp_path / "zoo"))
    first = _train([*SMALL, "--epochs=1", "--lr=0.02", "--backbone_norm=layer", f"--model_dir={tmp_path / 'a'}",
                    "--publish_as=tiny_moco", "--knn_every=1"], env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "Published tiny_moco:1" in first.stdout
    assert _tensorboard_scalars(tmp_path / "a" / "logs" / "validation").keys() == {"epoch_knn", "epoch_knn_embedding"}
    # Only --zoo_entry, a new dir and a shorter schedule: everything else comes from the card.
    second = _train(["--zoo_entry=tiny_moco", "--epochs=1", "--steps_per_epoch=2", "--knn_every=0",
                     "--probe_epochs=0", "--verbose=0", f"--model_dir={tmp_path / 'b'}", "--publish_as=tiny_moco"], env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Published tiny_moco:2" in second.stdout
    run_a = json.loads((tmp_path / "a" / "run.json").read_text())
    run_b = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run_b["recipe_config"] == run_a["recipe_config"]
    assert (run_b["backbone"], run_b["backbone_width"], run_b["backbone_norm"], run_b["dataset"], run_b["lr"]) == \
        (run_a["backbone"], run_a["backbone_width"], "layer", run_a["dataset"], 0.02)
    assert run_b["retrained_from"] == "tiny_moco" and run_b["steps_per_epoch"] == 2


def test_a_label_recipe_retrains_from_its_card_with_the_same_labelled_split(data_dir, tmp_path):
    env = _env(data_dir, ZOO_HOME=str(tmp_path / "zoo"))
    common = ["--epochs=1", "--verbose=0", "--knn_every=0", "--probe_epochs=0", "--publish_as=tiny_finetune"]
    first = _train(["--recipe=finetune", "--dataset=synthetic_shapes", "--width=0.125", "--batch_size=16",
                    "--labels_per_class=4", "--hparams=dropout=0.1", f"--model_dir={tmp_path / 'a'}", *common], env)
    assert first.returncode == 0, first.stderr[-2000:]
    # 4 labels x 8 classes at batch 16: an epoch is 2 steps, and the CLI says so.
    assert "one pass over the 32 labelled images, 2 step(s) of 16: 2 steps in all" in first.stdout
    second = _train(["--zoo_entry=tiny_finetune", f"--model_dir={tmp_path / 'b'}", *common], env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Published tiny_finetune:2" in second.stdout
    run_a = json.loads((tmp_path / "a" / "run.json").read_text())
    run_b = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run_b["recipe_config"] == run_a["recipe_config"] and run_b["recipe_config"]["dropout"] == 0.1
    assert run_b["labels_per_class"] == 4 and run_b["label_fraction"] is None


def test_cpc_trains_a_layer_norm_encoder_by_default(data_dir, tmp_path):
    args = [*SMALL[:-1], "--recipe=cpc", "--batch_size=8", "--epochs=1", "--steps_per_epoch=1",
            "--hparams=prediction_steps=1,context_dim=8", f"--model_dir={tmp_path}"]
    result = _train(args, _env(data_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "run.json").read_text())["backbone_norm"] == "layer"
    import keras

    import zoo.backbones  # noqa: F401  (registers the custom layers)
    names = [w.path for w in keras.saving.load_model(tmp_path / "encoder.keras").weights]
    assert any("_ln/" in name for name in names) and not any("_bn/" in name for name in names)


@pytest.mark.parametrize("recipe, hparams", [("finetune", ""), ("fixmatch", "mu=2,distribution_alignment=true"),
                                             ("pseudo_label", "rounds=1"),
                                             ("noisy_student", "rounds=1,student_steps_scale=1.5")])
def test_label_recipes_train_from_the_cli_with_a_labelled_split(recipe, hparams, data_dir, tmp_path):
    import keras

    import zoo

    store = tmp_path / "zoo"
    result = _train([f"--recipe={recipe}", "--dataset=synthetic_shapes", "--width=0.125", "--batch_size=16",
                     "--epochs=1", "--steps_per_epoch=2", "--labels_per_class=5", "--verbose=0",
                     f"--hparams={hparams}", f"--model_dir={tmp_path}", f"--publish_as={recipe}_shapes",
                     f"--zoo_store={store}"], _env(data_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    # The published card says how the classifier behind the encoder was trained.
    card = zoo.info(f"{recipe}_shapes", store=str(store))
    assert card["recipe"] == recipe and card["recipe_config"]["label_count"] == 5 * 8
    # The classifier is published beside the encoder (TF Serving's Classify: test_zoo_api.py).
    assert len(card["class_names"]) == 8 and "classifier.keras" in card["files"]
    classifier = zoo.load_classifier(f"{recipe}_shapes", store=str(store))
    probabilities = np.asarray(classifier(np.zeros((2, *card["input_shape"]), "float32")))
    np.testing.assert_allclose(probabilities.sum(axis=1), [1, 1], rtol=1e-5)
    if recipe != "finetune":
        assert card["recipe_config"]["threshold"] == (0.3 if recipe == "noisy_student" else 0.95)
    if recipe == "fixmatch":
        assert card["recipe_config"]["distribution_alignment"] is True
        assert card["recipe_config"]["alignment_target"] == [1 / 8] * 8  # 5 labels in each of the 8 classes
    if recipe in ("pseudo_label", "noisy_student"):
        assert card["recipe_config"]["rounds"] == 1
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["classifier"]["protocol"]["labelled"] == 5 * 8  # synthetic_shapes has 8 classes
    assert 0.0 <= metrics["classifier"]["accuracy"] <= 1.0
    confusion = np.array(metrics["classifier"]["confusion"])  # rows: the 8 classes of the test split
    assert confusion.shape == (8, 8) and np.trace(confusion) / confusion.sum() == \
        pytest.approx(metrics["classifier"]["accuracy"])
    assert metrics["classifier"]["protocol"]["steps_per_model"] == 2  # --epochs x --steps_per_epoch
    if recipe in ("pseudo_label", "noisy_student"):
        assert [r["round"] for r in metrics["rounds"]] == [0, 1]
        protocol = metrics["classifier"]["protocol"]
        assert protocol["steps_per_student"] == (3 if recipe == "noisy_student" else 2)
        assert protocol["unlabelled_ratio"] == (3.0 if recipe == "noisy_student" else None)
    # Fine-tunable, whatever the recipe froze (FixMatch's EMA encoder and classifier).
    assert zoo.load(f"{recipe}_shapes", store=str(store)).trainable and classifier.trainable
    for name in ("encoder.keras", "classifier.keras"):
        assert keras.saving.load_model(tmp_path / name).trainable_weights
    assert any((tmp_path / "checkpoints").iterdir())  # what was trained is kept (resume: test_semi_resume.py)
    if recipe == "fixmatch":  # the snapshot benchmark restores the run's EMA model from its checkpoint,
        # rebuilt from the run's launch.json alone (dataset, width, alignment's prediction history).
        snapshot = subprocess.run([sys.executable, "benchmarks/fixmatch_snapshot.py", f"--model_dir={tmp_path}",
                                   f"--out_dir={tmp_path / 'out'}"],
                                  cwd=ROOT, env=_env(data_dir), capture_output=True, text=True, timeout=300)
        assert snapshot.returncode == 0, snapshot.stderr[-2000:]
        result = json.loads((tmp_path / "out" / f"fixmatch_snapshot_{tmp_path.name}.json").read_text())
        assert (result["epochs_done"], result["optimizer_steps"]) == (1, 2)
        assert result["accuracy"] == pytest.approx(metrics["classifier"]["accuracy"])


def test_noisy_student_trains_wider_students_with_student_width(data_dir, tmp_path):
    """The paper's students are equal or larger; the published encoder is the last (wider) student."""
    import keras

    import zoo.backbones  # noqa: F401  (registers the custom layers)
    common = ["--dataset=synthetic_shapes", "--width=0.125", "--batch_size=16", "--epochs=1", "--steps_per_epoch=2",
              "--labels_per_class=5", "--verbose=0", "--hparams=rounds=1,stochastic_depth=0"]
    result = _train([*common, "--recipe=noisy_student", "--student_width=0.25", f"--model_dir={tmp_path / 'ns'}"],
                    _env(data_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((tmp_path / "ns" / "run.json").read_text())
    assert (run["backbone_width"], run["student_width"]) == (0.125, 0.25)
    published = keras.saving.load_model(tmp_path / "ns" / "encoder.keras")
    teacher_sized = zoo.backbones.build("resnet18_small", (32, 32, 3), width=0.125)
    assert published.output_shape[-1] == 2 * teacher_sized.output_shape[-1]

    # Refused before any data is read: a dataset that does not exist is never reached.
    # (Without stochastic_depth, which Pseudo-Label would refuse first: its students have no model noise.)
    refused = _train([*common[:-1], "--hparams=rounds=1", "--dataset=no_such_dataset", "--recipe=pseudo_label",
                      "--student_width=0.25", f"--model_dir={tmp_path / 'pl'}"], _env(data_dir))
    assert refused.returncode != 0 and "noisy_student" in refused.stderr
    assert "no_such_dataset" not in refused.stderr


@pytest.mark.parametrize("flags, says", [([], "--labels_per_class=N or --label_fraction=F"),
                                         (["--labels_per_class=5", "--label_fraction=0.1"], "not both"),
                                         (["--labels_per_class=5", "--init_from=no_such_encoder"],
                                          "No model named 'no_such_encoder'"),
                                         (["--labels_per_class=5", "--publish_as=My Model"], "Invalid model name"),
                                         (["--labels_per_class=5", "--publish_as=mine",
                                           "--zoo_store=http://127.0.0.1:9/zoo"], "read-only"),
                                         (["--labels_per_class=5", "--hparams=dropuot=0.1"], "dropuot"),
                                         (["--labels_per_class=5", "--lr=0.1", "--weight_decay=0"],
                                          "--lr, --weight_decay: not used by finetune")])
def test_command_mistakes_are_refused_before_any_data_is_read(flags, says, data_dir, tmp_path):
    # The dataset does not exist: each mistake must be reported before it would be noticed.
    result = _train(["--recipe=finetune", "--dataset=no_such_dataset", f"--model_dir={tmp_path}",
                     f"--zoo_store={tmp_path / 'zoo'}", *flags], _env(data_dir))
    assert result.returncode == 2 and says in result.stderr, result.stderr[-2000:]
    assert "no_such_dataset" not in result.stderr and "Traceback" not in result.stderr


def test_missing_dataset_says_how_to_install_it(tmp_path):
    # The CLI's own main with the Debian source dir pointed somewhere empty (as on a machine without the package).
    program = ("import pathlib, sys; from absl import app; from recipes import data, train; "
               "data.FASHION_MNIST_SOURCE_DIR = pathlib.Path(sys.argv.pop(1)); app.run(train.main)")
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path / "absent"), "--dataset=fashion_mnist",
                             f"--model_dir={tmp_path / 'run'}"], cwd=ROOT, env=_env(tmp_path / "tfds"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "apt-get install dataset-fashion-mnist" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_finetune_init_from_a_published_encoder(data_dir, tmp_path):
    import zoo
    from zoo import backbones

    encoder = backbones.build("resnet18_small", (32, 32, 3), width=0.125)
    zoo.publish(name="start_point", encoder=encoder, store=str(tmp_path / "zoo"))
    result = _train(["--recipe=finetune", "--dataset=synthetic_shapes", "--batch_size=16", "--epochs=1",
                     "--labels_per_class=4", "--verbose=0", "--init_from=start_point",
                     f"--zoo_store={tmp_path / 'zoo'}", f"--model_dir={tmp_path / 'run'}"], _env(data_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["init_from"] == "start_point" and run["labels_per_class"] == 4


def test_a_card_retrains_on_other_data_with_that_datas_size_and_schedule():
    """A card records the config of the run that made it, dataset size and total steps
    included; a retrained NPID or SeLa must size its bank / labels and space its label
    steps for its own data and schedule, not the recorded ones."""
    import recipes  # noqa: F401  (registers every recipe)
    from recipes.base import get_recipe_class
    from recipes.train import build_recipe, card_hparams
    from tests.encoders import small_encoder

    recorded = get_recipe_class("sela")(small_encoder((16, 16, 1)), dataset_size=60000, num_clusters=8,
                                        total_steps=4680).get_config()
    hparams = card_hparams(recorded)
    assert "dataset_size" not in hparams and "total_steps" not in hparams and hparams["num_clusters"] == 8
    retrained = build_recipe(get_recipe_class("sela"), small_encoder((16, 16, 1)), hparams, seed=1, total_steps=30,
                             num_examples=500)
    assert (retrained.dataset_size, retrained.total_steps, retrained.num_clusters) == (500, 30, 8)
    assert tuple(retrained.labels.shape) == (10, 500)


def test_run_fact_flags_say_which_recipes_take_the_run_facts():
    """`needs_index` / `needs_total_steps` tell recipes.train and a Keras user (examples/keras_api.py)
    which recipes take `dataset_size` / `total_steps`; a recipe whose constructor takes one without
    the flag would silently run with its default (a 60k bank, a constant momentum, no label schedule)."""
    import inspect

    import recipes  # noqa: F401  (registers every recipe)
    from recipes.base import RECIPES

    for name, recipe_class in RECIPES.items():
        accepted = inspect.signature(recipe_class.__init__).parameters
        assert recipe_class.needs_total_steps == ("total_steps" in accepted), name
        assert recipe_class.needs_index == ("dataset_size" in accepted), name
    assert {name for name, c in RECIPES.items() if c.needs_total_steps} == {"byol", "dino", "sela"}


def test_hparams_keep_json_lists_and_dicts_whole():
    from recipes.train import parse_hparams

    parsed = parse_hparams('queue_size=64,symmetric=true,name=x,view_policy={"crop_scale":[0.5,1.0],"flip":false},'
                           'dims=[1,2]')
    assert parsed == {"queue_size": 64, "symmetric": True, "name": "x",
                      "view_policy": {"crop_scale": [0.5, 1.0], "flip": False}, "dims": [1, 2]}
    with pytest.raises(ValueError, match="not key=value"):
        parse_hparams("a=1,oops")


def test_a_failed_json_write_keeps_the_previous_file(tmp_path):
    """metrics.json marks a finished run: a write that dies midway must not leave half a file."""
    from recipes.checkpointing import write_json

    path = tmp_path / "metrics.json"
    write_json(str(path), {"knn": {"accuracy": 0.8}})
    with pytest.raises(TypeError):
        write_json(str(path), {"knn": {"accuracy": 0.9}, "bad": object()})  # fails after writing some of it
    assert json.loads(path.read_text()) == {"knn": {"accuracy": 0.8}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no temporary left behind


def test_sela_runs_its_label_step_from_the_cli(data_dir, tmp_path):
    """recipes.train adds the recipe's own callbacks: without SeLa's label step the first
    train step would stop on labels that were never computed."""
    args = [*SMALL[:-1], "--recipe=sela", "--batch_size=16", "--epochs=2", "--steps_per_epoch=2",
            "--hparams=num_clusters=8,num_heads=2,num_label_updates=2,label_batch_size=256", f"--model_dir={tmp_path}"]
    result = _train(args, _env(data_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "run.json").read_text())["recipe_config"]
    assert (config["num_label_updates"], config["total_steps"], config["num_clusters"]) == (2, 4, 8)


def test_the_recorded_commit_is_the_one_the_run_started_from(monkeypatch):
    # A run of hours outlives commits made beside it; run.json names the code it imported.
    from types import SimpleNamespace

    from recipes import train as train_module

    heads = iter(["started_at", "checked_out_later"])
    train_module.git_commit.cache_clear()
    try:
        monkeypatch.setattr(train_module.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=next(heads)))
        assert train_module.git_commit() == "started_at"
        assert train_module.git_commit() == "started_at"
    finally:
        train_module.git_commit.cache_clear()
