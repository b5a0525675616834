"""The Python API and the CLI around a published encoder: run dirs, fine-tuning, export."""

import json
import os

import keras
import numpy as np
import pytest

import zoo
from zoo import backbones, cli

SHAPE = (16, 16, 1)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """What `recipes.train --model_dir` leaves behind, minus checkpoints and logs."""
    path = tmp_path_factory.mktemp("run")
    encoder = backbones.build("resnet18_small", SHAPE, width=0.125)
    encoder.save(path / "encoder.keras")
    run = {"recipe": "simclr", "recipe_config": {"temperature": 0.5, "proj_dim": 32}, "backbone": "resnet18_small",
           "backbone_width": 0.125, "input_shape": list(SHAPE), "dataset": "fashion_mnist", "train_split": "train",
           "epochs": 2, "seed": 3, "strategy": "default", "num_replicas": 1, "wall_time_s": 9.0,
           "images_per_sec": 50.0, "git_commit": "deadbeef"}
    metrics = {"knn": {"accuracy": 0.7, "protocol": {"k": 200, "t": 0.1}},
               "linear_probe": {"accuracy": 0.75, "protocol": {"epochs": 30}}}
    (path / "run.json").write_text(json.dumps(run))
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_cli_publish_list_info_rm(run_dir, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert cli.main(["--store", store, "publish", str(run_dir), "--name", "simclr_tiny", "--label", "stable"]) == 0
    assert "published simclr_tiny:1" in capsys.readouterr().out
    assert cli.main(["--store", store, "list"]) == 0
    out = capsys.readouterr().out
    assert "simclr_tiny" in out and "knn=0.700" in out and "linear_probe=0.750" in out
    assert cli.main(["--store", store, "info", "simclr_tiny:stable"]) == 0
    card = json.loads(capsys.readouterr().out)
    # What `recipes.train --zoo_entry` needs to retrain:
    assert card["recipe"] == "simclr" and card["recipe_config"] == {"temperature": 0.5, "proj_dim": 32}
    assert card["backbone_width"] == 0.125 and card["seed"] == 3 and card["epochs"] == 2
    assert card["metrics"]["linear_probe"]["protocol"] == {"epochs": 30}
    assert cli.main(["--store", store, "publish", str(run_dir), "--name", "../evil"]) == 1
    assert "Invalid model name" in capsys.readouterr().err
    assert cli.main(["--store", store, "info", "simclr_tiyn"]) == 1
    assert "Did you mean 'simclr_tiny'" in capsys.readouterr().err
    assert cli.main(["--store", store, "rm", "simclr_tiny:1"]) == 0
    assert capsys.readouterr().out.strip() == "removed simclr_tiny:1"
    assert cli.main(["--store", store, "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_publish_rejects_incomplete_run_dirs(run_dir, tmp_path):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "run.json").write_text((run_dir / "run.json").read_text())
    with pytest.raises(zoo.ArtifactError, match="metrics.json is missing"):
        zoo.publish(str(incomplete), name="x", store=str(tmp_path / "store"))


def test_loaded_encoder_fine_tunes(run_dir, tmp_path):
    store = str(tmp_path / "store")
    zoo.publish(str(run_dir), name="simclr_tiny", store=store)
    encoder = zoo.load("simclr_tiny", store=store)
    assert encoder.trainable_weights
    keras.utils.set_random_seed(0)
    classifier = keras.Sequential([encoder, keras.layers.Dense(3)])
    classifier.compile(optimizer=keras.optimizers.Adam(1e-2),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (24, *SHAPE)).astype("float32")
    labels = rng.integers(0, 3, 24)
    before = [w.numpy().copy() for w in encoder.trainable_weights]
    history = classifier.fit(images, labels, batch_size=24, epochs=8, verbose=0).history["loss"]
    assert history[-1] < history[0] * 0.8, history
    assert any(not np.allclose(a, w.numpy()) for a, w in zip(before, encoder.trainable_weights))


def test_export_file_name_and_contents_are_one_version_when_a_publish_moves_latest(run_dir, tmp_path, monkeypatch):
    import tensorflow as tf

    store = str(tmp_path / "store")
    zoo.publish(str(run_dir), name="simclr_tiny", store=store)
    other = zoo.load("simclr_tiny", store=store)
    other.set_weights([w + 0.5 for w in other.get_weights()])
    info = zoo.info

    def publish_then_info(*args, **kwargs):  # version 2 lands while the export is under way
        if zoo.list_models(store=store)[0]["latest"] == 1:
            zoo.publish(name="simclr_tiny", encoder=other, store=store)
        return info(*args, **kwargs)

    monkeypatch.setattr(zoo, "info", publish_then_info)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--store", store, "export", "simclr_tiny", "--format=saved_model"]) == 0
    images = np.random.default_rng(1).uniform(0, 255, (2, *SHAPE)).astype("float32")
    features = other(images, training=False).numpy()  # the file is named v2: it holds version 2
    served = tf.saved_model.load("simclr_tiny_v2").signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["embedding"].numpy(), features / np.linalg.norm(features, axis=1, keepdims=True),
                               atol=1e-5)


def test_export_saved_model_and_onnx(run_dir, tmp_path, capsys):
    import tensorflow as tf

    store = str(tmp_path / "store")
    zoo.publish(str(run_dir), name="simclr_tiny", store=store)
    encoder = zoo.load("simclr_tiny", store=store)
    images = np.random.default_rng(1).uniform(0, 255, (2, *SHAPE)).astype("float32")
    features = encoder(images, training=False).numpy()
    expected = features / np.linalg.norm(features, axis=1, keepdims=True)

    out = str(tmp_path / "sm")
    assert cli.main(["--store", store, "export", "simclr_tiny", "--format=saved_model", "--output", out]) == 0
    served = tf.saved_model.load(out).signatures["serving_default"](images=tf.constant(images))["embedding"]
    np.testing.assert_allclose(served.numpy(), expected, atol=1e-5)
    assert cli.main(["--store", store, "export", "simclr_tiny", "--output", out]) == 1  # never overwrites
    assert "exists" in capsys.readouterr().err

    pytest.importorskip("tf2onnx")
    onnx_path = str(tmp_path / "m.onnx")
    assert cli.main(["--store", store, "export", "simclr_tiny:1", "--format=onnx", "--output", onnx_path]) == 0
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(onnx_path)
    result = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(result, features, atol=1e-4)


def test_zoo_serve_serves_a_published_entry(run_dir, tmp_path):
    """`zoo serve NAME` (delegated to serving) answers REST predict with the zoo's embeddings."""
    import base64
    import re
    import subprocess
    import sys
    import urllib.request

    import tensorflow as tf

    store = str(tmp_path / "store")
    zoo.publish(str(run_dir), name="simclr_tiny", store=store)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    server = subprocess.Popen(
        [sys.executable, "-m", "zoo.cli", "--store", store, "serve", "simclr_tiny", "--port=0",
         "--rest_api_port=0", "--backend=python"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = ""
        while "REST" not in line:
            line = server.stdout.readline()
            assert line, "zoo serve exited before serving"
        port = int(re.search(r"REST (\d+)", line).group(1))
        images = np.random.default_rng(2).integers(0, 256, (2, *SHAPE)).astype("uint8")
        instances = [{"b64": base64.b64encode(tf.io.encode_png(i).numpy()).decode()} for i in images]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/simclr_tiny:predict",
            data=json.dumps({"signature_name": "embed_bytes", "instances": instances}).encode())
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        predictions = np.array(json.load(opener.open(request, timeout=60))["predictions"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    np.testing.assert_allclose(predictions, zoo.embed("simclr_tiny", images, store=store), atol=1e-5)


def test_card_gives_recipes_train_what_it_needs_to_retrain(run_dir, tmp_path):
    from zoo.card import retraining_spec

    store = str(tmp_path / "store")
    zoo.publish(str(run_dir), name="simclr_tiny", store=store)
    spec = retraining_spec(zoo.info("simclr_tiny", store=store))
    assert spec["recipe"] == "simclr" and spec["recipe_config"]["temperature"] == 0.5
    assert spec["dataset"] == "fashion_mnist" and spec["input_shape"] == list(SHAPE) and spec["seed"] == 3

    bare = keras.Sequential([keras.Input(SHAPE), keras.layers.Flatten(), keras.layers.Dense(2)])
    zoo.publish(name="bare", encoder=bare, store=store)
    with pytest.raises(zoo.ArtifactError, match="cannot be retrained"):
        retraining_spec(zoo.info("bare", store=store))


def test_publish_the_embedding_head_serves_what_knn_embedding_measured(run_dir, tmp_path, capsys):
    import shutil

    from recipes.heads import mlp
    from recipes.train import embedding_model
    from zoo.errors import ArtifactError

    with pytest.raises(ArtifactError, match="no embedding.keras"):
        zoo.publish(run_dir, name="no_head", embedding="head", store=str(tmp_path / "store"))

    head_dir = tmp_path / "run_with_head"
    shutil.copytree(run_dir, head_dir)
    encoder = keras.saving.load_model(head_dir / "encoder.keras")
    head = mlp(32, 24, name="projection_head")
    embedding_model(encoder, head).save(head_dir / "embedding.keras")
    metrics = json.loads((head_dir / "metrics.json").read_text())
    metrics["knn_embedding"] = {"accuracy": 0.8, "protocol": {"k": 200, "t": 0.1, "features": "head"}}
    (head_dir / "metrics.json").write_text(json.dumps(metrics))

    store = str(tmp_path / "store")
    assert cli.main(["--store", store, "publish", str(head_dir), "--name", "with_head", "--embedding", "head"]) == 0
    assert "published with_head:1" in capsys.readouterr().out
    card = zoo.info("with_head", store=store)
    assert card["embedding"] == "head" and card["embedding_dim"] == 24
    assert card["metrics"]["knn"]["accuracy"] == 0.8  # the headline kNN is the served embedding's
    assert card["metrics"]["knn_encoder"]["accuracy"] == 0.7 and "linear_probe_encoder" in card["metrics"]
    images = np.random.RandomState(0).randint(0, 256, (3, *SHAPE)).astype("float32")
    np.testing.assert_allclose(zoo.load("with_head", store=store).predict(images, verbose=0),
                               head(encoder(images)).numpy(), rtol=1e-5, atol=1e-6)
    assert zoo.info("with_head", store=store)["embedding"] == "head"
    zoo.publish(run_dir, name="plain", store=store)
    assert zoo.info("plain", store=store)["embedding"] == "encoder"


def _classifier_run_dir(run_dir, path):
    """A label recipe's run directory: run_dir's encoder plus classifier.keras and the class names."""
    import shutil

    from recipes.semi.finetune import classifier_model

    shutil.copytree(run_dir, path)
    encoder = keras.saving.load_model(path / "encoder.keras")
    head = keras.layers.Dense(3, name="head")
    classifier_model(encoder, head).save(path / "classifier.keras")
    run = json.loads((path / "run.json").read_text())
    (path / "run.json").write_text(json.dumps({**run, "recipe": "finetune", "class_names": ["a", "b", "c"]}))
    return path


def test_a_published_classifier_answers_tf_serving_classify(run_dir, tmp_path):
    """Official stubs: Classify on tf.Examples of encoded images returns the classifier's probabilities."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc

    import base64

    from serving.server import ModelServer
    from serving.testing import http_call
    from zoo import export

    store = str(tmp_path / "store")
    ref = zoo.publish(str(_classifier_run_dir(run_dir, tmp_path / "run")), name="tiny_classifier", store=store)
    card = zoo.info(ref, store=store)
    assert card["class_names"] == ["a", "b", "c"] and export.CLASSIFIER_FILENAME in card["files"]
    classifier = zoo.load_classifier("tiny_classifier", store=store)
    images = np.random.default_rng(3).integers(0, 256, (2, *SHAPE)).astype("uint8")
    expected = np.asarray(classifier(images.astype("float32")))

    server = ModelServer(model_name="tiny_classifier", model_base_path=zoo.serving_base_path(ref, store=store),
                         file_system_poll_wait_seconds=0)
    server.start()
    pngs = [tf.io.encode_png(image).numpy() for image in images]
    try:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            examples = [{"features": {"feature": {"image/encoded": {"bytes_list": {"value": [png]}}}}}
                        for png in pngs]
            answer = stub.Classify(classification_pb2.ClassificationRequest(
                model_spec={"name": "tiny_classifier", "signature_name": "classify"},
                input={"example_list": {"examples": examples}}), timeout=60)
        # The README's REST call: the same examples as JSON, image bytes as {"b64": ...}.
        status, body = http_call(f"{server.rest_url}/v1/models/tiny_classifier:classify", "POST", {
            "signature_name": "classify",
            "examples": [{"image/encoded": {"b64": base64.b64encode(png).decode()}} for png in pngs]})
    finally:
        server.stop()
    rows = answer.result.classifications
    assert [[c.label for c in row.classes] for row in rows] == [["a", "b", "c"]] * 2
    np.testing.assert_allclose([[c.score for c in row.classes] for row in rows], expected, rtol=1e-5, atol=1e-6)
    assert status == 200, body
    assert [[label for label, _ in row] for row in body["results"]] == [["a", "b", "c"]] * 2
    np.testing.assert_allclose([[score for _, score in row] for row in body["results"]], expected, rtol=1e-5,
                               atol=1e-6)


def test_load_classifier_explains_an_encoder_without_one(run_dir, tmp_path):
    store = str(tmp_path / "store")
    zoo.publish(str(run_dir), name="simclr_tiny", store=store)
    with pytest.raises(zoo.ArtifactError, match="without a classifier"):
        zoo.load_classifier("simclr_tiny", store=store)
    with pytest.raises(ValueError, match="one probability per class name"):
        zoo.publish(encoder=keras.saving.load_model(run_dir / "encoder.keras"), name="bad", store=store,
                    classifier=keras.saving.load_model(_classifier_run_dir(run_dir, tmp_path / "run")
                                                       / "classifier.keras"), class_names=["a", "b"])
