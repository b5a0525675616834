"""Publishing and loading through the stores: round trips, checksums, concurrency, http, gfile URIs."""

import functools
import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import tensorflow as tf

import zoo
from zoo import backbones, cli
from zoo.store import HttpStore, serving_base_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 16, 3)
RUN = {
    "recipe": "moco", "recipe_config": {"queue_size": 64, "temperature": 0.2}, "backbone": "resnet18_small",
    "backbone_width": 0.125, "input_shape": list(SHAPE), "dataset": "synthetic_shapes", "train_split": "train",
    "epochs": 1, "seed": 0, "strategy": "default", "num_replicas": 1, "wall_time_s": 1.5,
    "images_per_sec": 100.0, "git_commit": "abc123",
}
METRICS = {"knn": {"accuracy": 0.42, "protocol": {"k": 200, "t": 0.1, "split": "test"}}}


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No test may touch the user's ~/.ssl_zoo or ~/.cache."""
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def encoder():
    return backbones.build("resnet18_small", SHAPE, width=0.125)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (4, *SHAPE)).astype("uint8")


@pytest.fixture(scope="module")
def published(encoder, tmp_path_factory):
    """A store with one published entry; tests that damage it must copy it first."""
    root = str(tmp_path_factory.mktemp("store"))
    ref = zoo.publish(name="tiny", encoder=encoder, run=RUN, metrics=METRICS, store=root, labels=["stable"])
    assert ref == "tiny:1"
    return root


def _copy_store(src, dst):
    subprocess.run(["cp", "-r", src, str(dst)], check=True)
    return str(dst)


def test_load_in_a_fresh_process_gives_the_same_embeddings(published, encoder, images, tmp_path):
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import numpy as np, zoo
        encoder = zoo.load("tiny", store={published!r})
        images = np.load({str(tmp_path / "images.npy")!r}).astype("float32")
        np.save({str(tmp_path / "out.npy")!r}, np.asarray(encoder(images, training=False)))
    """)
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=180)
    expected = np.asarray(encoder(images.astype("float32"), training=False))
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6, rtol=0)


def test_card_records_recipe_metrics_hardware_and_checksums(published):
    card = zoo.info("tiny:stable", store=published)
    assert card["version"] == 1 and card["labels"] == ["stable"]
    assert card["recipe"] == "moco" and card["recipe_config"] == RUN["recipe_config"]
    assert card["input_shape"] == list(SHAPE) and card["embedding_dim"] == 64
    assert card["metrics"]["knn"]["protocol"]["k"] == 200
    assert card["hardware"]["cpu_count"] and card["code_version"]["git_commit"] == "abc123"
    assert card["created_at"].endswith("Z") and card["wall_time_s"] == 1.5
    assert {"encoder.keras", "saved_model.pb", "variables/variables.index"} <= set(card["files"])
    assert all(len(f["sha256"]) == 64 for f in card["files"].values())
    [row] = zoo.list_models(store=published)
    assert row["name"] == "tiny" and row["metrics"] == {"knn": 0.42} and row["labels"] == {"stable": 1}


def test_published_saved_model_serves_both_signatures(published, encoder, images):
    path = os.path.join(serving_base_path("tiny", store=published), "1")
    loaded = tf.saved_model.load(path)
    features = np.asarray(encoder(images.astype("float32"), training=False))
    expected = features / np.linalg.norm(features, axis=1, keepdims=True)
    by_pixels = loaded.signatures["serving_default"](images=tf.constant(images, tf.float32))["embedding"]
    pngs = tf.stack([tf.io.encode_png(image) for image in images])
    by_bytes = loaded.signatures["embed_bytes"](image_bytes=pngs)["embedding"]
    np.testing.assert_allclose(by_pixels.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(by_bytes.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(zoo.embed("tiny", images, store=published), expected, atol=1e-5)


def test_a_flipped_byte_in_any_file_fails_load_and_verify(published, tmp_path, capsys):
    root = _copy_store(published, tmp_path / "store")
    files = zoo.info("tiny", store=root)["files"]
    files = [*files, "card.json"]
    assert len(files) >= 6
    version_dir = os.path.join(root, "models", "tiny", "1")
    for relpath in files:
        path = os.path.join(version_dir, relpath)
        original = open(path, "rb").read()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x01
        open(path, "wb").write(bytes(damaged))
        try:
            with pytest.raises(zoo.ChecksumError, match="(?i)nothing was loaded"):
                zoo.load("tiny", store=root)
            with pytest.raises(zoo.ChecksumError, match="not served"):  # `zoo serve tiny` checks too
                serving_base_path("tiny", store=root)
            capsys.readouterr()
            assert cli.main(["--store", root, "verify"]) == 1
            out = capsys.readouterr().out
            assert "CORRUPT  tiny:1" in out and relpath in out
        finally:
            open(path, "wb").write(original)
    assert cli.main(["--store", root, "verify"]) == 0
    assert zoo.load("tiny", store=root) is not None


_WORKER = """
import os, sys, time
import keras, numpy as np, zoo
root, go, i = sys.argv[1], sys.argv[2], int(sys.argv[3])
keras.utils.set_random_seed(i)
inputs = keras.Input((4, 4, 1), name="images")
encoder = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(inputs)))
open(f"{go}.ready{i}", "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
print(zoo.publish(name="shared", encoder=encoder, store=root, description=f"worker {i}"))
"""


def test_concurrent_publishers_lose_nothing(tmp_path):
    root, go = str(tmp_path / "store"), str(tmp_path / "go")
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    workers = [
        subprocess.Popen([sys.executable, "-c", _WORKER, root, go, str(i)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(8)
    ]
    # Release them together once all have imported TensorFlow (their slowest part).
    import time

    deadline = time.monotonic() + 240
    while not all(os.path.exists(f"{go}.ready{i}") for i in range(8)) and time.monotonic() < deadline:
        assert all(w.poll() is None for w in workers), "a publisher died during start-up"
        time.sleep(0.1)
    open(go, "w").close()
    results = [w.communicate(timeout=240) for w in workers]
    for w, (out, err) in zip(workers, results):
        assert w.returncode == 0, err[-2000:]
    refs = sorted(out.strip().splitlines()[-1] for out, _ in results)
    assert refs == sorted(f"shared:{v}" for v in range(1, 9))
    index = json.load(open(os.path.join(root, "index.json")))
    assert sorted(map(int, index["models"]["shared"]["versions"])) == list(range(1, 9))
    descriptions = {zoo.info("shared", v, store=root)["description"] for v in range(1, 9)}
    assert descriptions == {f"worker {i}" for i in range(8)}
    report = zoo.verify(store=root)
    assert not report["corrupt"] and len(report["checked"]) == 8 and not report["leftovers"]


def test_hostile_names_never_touch_the_store(encoder, tmp_path):
    root = str(tmp_path / "store")
    for name in ["../x", "", "Tiny", "mоco", "a/b"]:
        with pytest.raises(zoo.InvalidNameError):
            zoo.publish(name=name, encoder=encoder, store=root)
        with pytest.raises(zoo.InvalidNameError):
            zoo.load(name, store=root)
    assert not os.path.exists(root)


def test_unknown_names_suggest_close_ones(published):
    with pytest.raises(zoo.NotFoundError, match="Did you mean 'tiny'"):
        zoo.load("tinny", store=published)
    with pytest.raises(zoo.NotFoundError, match=r"no version 5"):
        zoo.load("tiny:5", store=published)


def test_versions_labels_and_removal(encoder, published, tmp_path):
    root = _copy_store(published, tmp_path / "store")
    assert zoo.publish(name="tiny", encoder=encoder, store=root) == "tiny:2"
    assert zoo.info("tiny", store=root)["version"] == 2
    zoo.set_label("tiny", "canary", 2, store=root)
    assert zoo.info("tiny:canary", store=root)["labels"] == ["canary"]
    assert zoo.remove("tiny:1", store=root) == [1]
    assert not os.path.exists(os.path.join(root, "models", "tiny", "1"))
    assert zoo.list_models(store=root)[0]["versions"] == [2]
    with pytest.raises(zoo.NotFoundError, match="no version label 'stable'"):
        zoo.load("tiny:stable", store=root)
    assert zoo.publish(name="tiny", encoder=encoder, store=root) == "tiny:3"  # numbers are never reused
    assert zoo.remove("tiny", store=root) == [2, 3]
    assert zoo.list_models(store=root) == []
    assert zoo.publish(name="tiny", encoder=encoder, store=root) == "tiny:4"


def test_failed_publish_leaves_the_store_unchanged(published, tmp_path):
    import keras

    root = _copy_store(published, tmp_path / "store")
    before = open(os.path.join(root, "index.json")).read()
    inputs = keras.Input((8, 8, 1))
    spatial = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))  # not a pooled encoder
    with pytest.raises(ValueError, match="pooled features"):
        zoo.publish(name="tiny", encoder=spatial, store=root)
    assert open(os.path.join(root, "index.json")).read() == before
    assert os.listdir(os.path.join(root, "tmp")) == []


def test_object_store_publish_copies_saved_model_pb_last(monkeypatch):
    """gs:// cannot rename a directory: until saved_model.pb lands, a polling server finds nothing to load."""
    import tensorflow as tf

    from zoo import store as store_module

    src, dst = "ram://move_src", "ram://move_dst"
    for relpath in ("saved_model.pb", "variables/variables.index", "variables/variables.data-00000-of-00001",
                    "encoder.keras", "card.json"):
        tf.io.gfile.makedirs(os.path.dirname(f"{src}/{relpath}"))
        with tf.io.gfile.GFile(f"{src}/{relpath}", "w") as f:
            f.write(relpath)
    copied, copy = [], tf.io.gfile.copy
    monkeypatch.setattr(tf.io.gfile, "copy", lambda a, b, *args: (copied.append(b), copy(a, b, *args)))
    store_module._move_dir(src, dst)
    assert len(copied) == 5 and copied[-1] == f"{dst}/saved_model.pb"
    with tf.io.gfile.GFile(f"{dst}/variables/variables.index") as f:
        assert f.read() == "variables/variables.index"
    assert not tf.io.gfile.exists(src)


def test_gfile_uri_store(encoder, images, tmp_path):
    root = "file://" + str(tmp_path / "gfile_store")
    assert zoo.publish(name="tiny", encoder=encoder, store=root) == "tiny:1"
    loaded = zoo.load("tiny", store=root)
    np.testing.assert_allclose(loaded(images.astype("float32")), encoder(images.astype("float32")), atol=1e-6)
    assert zoo.verify(store=root)["corrupt"] == {}


@pytest.fixture()
def http_root(published, tmp_path):
    """Serves a copy of the published store directory on 127.0.0.1 with Python's http.server."""
    served = _copy_store(published, tmp_path / "served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=served)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def test_http_store_downloads_verifies_and_caches(http_root, encoder, images, tmp_path):
    url, served = http_root
    store = HttpStore(url, cache_dir=str(tmp_path / "cache"))
    loaded = zoo.load("tiny:stable", store=store)
    np.testing.assert_allclose(loaded(images.astype("float32")), encoder(images.astype("float32")), atol=1e-6)
    assert zoo.info("tiny", store=url)["recipe"] == "moco"
    base = serving_base_path("tiny", store=store)
    assert base.startswith(str(tmp_path / "cache")) and os.path.exists(os.path.join(base, "1", "saved_model.pb"))
    with pytest.raises(zoo.ReadOnlyStoreError, match="read-only"):
        zoo.publish(name="other", encoder=encoder, store=url)

    # A damaged cache is noticed and mended from the server: the cache is not trusted blindly.
    cached = os.path.join(base, "1", "saved_model.pb")
    original = open(cached, "rb").read()
    open(cached, "wb").write(b"damaged")
    zoo.load("tiny", store=store)
    assert open(cached, "rb").read() == original

    # Tampering on the server is caught for files not yet cached (fresh cache).
    path = os.path.join(served, "models", "tiny", "1", "encoder.keras")
    data = bytearray(open(path, "rb").read())
    data[100] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(zoo.ChecksumError, match="does not match"):
        zoo.load("tiny", store=HttpStore(url, cache_dir=str(tmp_path / "fresh_cache")))
    assert not os.path.exists(os.path.join(tmp_path, "fresh_cache", "http")) or not any(
        f.endswith("encoder.keras") for _, _, fs in os.walk(tmp_path / "fresh_cache") for f in fs)


def test_http_cache_gains_a_version_whole_never_half_downloaded(http_root, tmp_path):
    """A model server may be polling the cached base path: a version dir appears with all its files."""
    url, _ = http_root
    store = HttpStore(url, cache_dir=str(tmp_path / "cache"))
    version_dir = os.path.join(store.cache, "models", "tiny", "1")
    get, seen = store._get, []

    def get_and_look(relpath):
        seen.append(os.path.exists(version_dir))
        return get(relpath)

    store._get = get_and_look
    base = serving_base_path("tiny", store=store)
    assert len(seen) > 2 and not any(seen)  # the index and every file came before the dir existed
    assert os.path.exists(os.path.join(base, "1", "saved_model.pb"))
    assert os.listdir(os.path.join(store.cache, "tmp")) == []  # nothing staged is left behind


def test_unreachable_http_store_says_what_to_do(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(zoo.StoreUnreachableError, match="Could not reach zoo store .*ZOO_HOME"):
        zoo.load("tiny", store=f"http://127.0.0.1:{port}/zoo")


def test_a_download_cut_short_is_a_store_error_not_a_traceback(tmp_path):
    """The server promises 100 bytes and hangs up after 3: http.client's IncompleteRead."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer():
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        with pytest.raises(zoo.StoreUnreachableError, match="Could not reach zoo store"):
            HttpStore(f"http://127.0.0.1:{listener.getsockname()[1]}/zoo", cache_dir=str(tmp_path / "cache")).read_index()
    finally:
        thread.join(timeout=10)
        listener.close()
