"""The main job, end to end: pretrain -> evaluate -> publish -> load -> serve -> embed.

    ./run main            # MoCo v2 on Fashion-MNIST with the demo budget (< 10 min, 2 CPU cores)

1. `python -m recipes.train` pretrains MoCo v2 on Fashion-MNIST (the real CLI, so
   the run can be resumed, inspected in TensorBoard and retrained from its card);
2. prints its kNN accuracy next to a randomly initialised encoder of the same
   architecture (same protocol: weighted kNN, k=200, T=0.1, train -> test split);
3. publishes the run to the local zoo ($ZOO_HOME, default ~/.ssl_zoo) and loads it
   back with `zoo.load`;
4. starts the TF-Serving-compatible server on the published model, embeds test
   images over gRPC and REST (arrays and PNG bytes), checks the answers equal the
   in-process embeddings, and stops the server.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 8, "MoCo pretraining epochs (the demo budget).")
flags.DEFINE_string("model_dir", "runs/main_job", "Training run directory (rerunning resumes it).")
flags.DEFINE_string("name", "moco_resnet18_fashion_mnist", "Zoo name to publish under.")
flags.DEFINE_integer("seed", 0, "Seed for weights, data order and augmentation.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["--recipe=moco", "--dataset=fashion_mnist", "--backbone=resnet18_small", "--width=0.25",
              "--batch_size=256", "--lr=0.06", "--weight_decay=5e-4", "--knn_every=0", "--probe_epochs=10",
              "--hparams=queue_size=4096,momentum=0.99,temperature=0.2,hidden_dim=512", "--verbose=2"]


def step(title):
    print(f"\n=== {title}", flush=True)


def pretrain():
    command = [sys.executable, "-m", "recipes.train", *TRAIN_ARGS, f"--epochs={FLAGS.epochs}",
               f"--seed={FLAGS.seed}", f"--model_dir={FLAGS.model_dir}"]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    with open(os.path.join(FLAGS.model_dir, "metrics.json")) as f:
        return json.load(f)


def random_init_knn():
    import keras

    from recipes import data, evaluate
    from zoo import backbones

    train_x, train_y = data.load_arrays("fashion_mnist", "train")
    test_x, test_y = data.load_arrays("fashion_mnist", "test")
    keras.utils.set_random_seed(FLAGS.seed)
    encoder = backbones.build("resnet18_small", train_x.shape[1:], 0.25)
    extract = evaluate.feature_extractor(encoder)
    result = evaluate.knn_accuracy(extract(train_x), train_y, extract(test_x), test_y, 10)
    return result["accuracy"], test_x[:16]


def png_bytes(images):
    import tensorflow as tf

    return [tf.io.encode_png(image).numpy() for image in images]


def serve_and_query(name, images, expected):
    import numpy as np

    import zoo
    from serving.client import EmbeddingClient
    from serving.server import ModelServer

    server = ModelServer(model_name=name, model_base_path=zoo.serving_base_path(name))
    ports = server.start()
    print(f"server up: gRPC 127.0.0.1:{ports['grpc']}, REST 127.0.0.1:{ports['rest']}")
    try:
        answers = {
            "gRPC, float images": EmbeddingClient(f"127.0.0.1:{ports['grpc']}", name, "grpc").embed(images),
            "REST, float images": EmbeddingClient(f"http://127.0.0.1:{ports['rest']}", name, "rest").embed(images),
            "REST, PNG bytes (b64)": EmbeddingClient(f"http://127.0.0.1:{ports['rest']}", name, "rest").embed(
                png_bytes(images)),
        }
    finally:
        server.stop()
    print("server stopped")
    worst = 0.0
    for label, answer in answers.items():
        difference = float(np.abs(answer - expected).max())
        worst = max(worst, difference)
        print(f"{label:24s} shape {answer.shape}, max |served - in-process| = {difference:.2e}")
    if worst > 1e-4:
        raise SystemExit(f"Served embeddings differ from in-process ones by {worst:.2e} (> 1e-4).")


def main(argv):
    del argv
    os.chdir(ROOT)
    import numpy as np

    started = time.time()
    step(f"1. Pretrain MoCo v2 on Fashion-MNIST ({FLAGS.epochs} epochs)")
    metrics = pretrain()
    trained = metrics["knn"]["accuracy"]

    step("2. kNN accuracy (weighted kNN, k=200, T=0.1; Fashion-MNIST train -> test)")
    random_accuracy, sample = random_init_knn()
    print(f"MoCo v2, {FLAGS.epochs} epochs:       {trained:.4f}")
    print(f"random init, same encoder:  {random_accuracy:.4f}")
    print(f"difference:                 {100 * (trained - random_accuracy):+.2f} points")
    if "linear_probe" in metrics:
        print(f"linear probe (MoCo):        {metrics['linear_probe']['accuracy']:.4f}")

    step("3. Publish to the zoo and load it back")
    import zoo

    ref = zoo.publish(FLAGS.model_dir, name=FLAGS.name)
    card = zoo.info(ref)
    encoder = zoo.load(ref)
    expected = np.asarray(encoder(sample.astype("float32"), training=False))
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    print(f"published {ref} to {card['store']}")
    print(f"zoo.load({ref!r}) -> embedding shape {tuple(encoder(sample).shape)}")
    print("card metrics:", json.dumps({k: v.get("accuracy") for k, v in card.get("metrics", {}).items()
                                       if isinstance(v, dict) and "accuracy" in v}))

    step("4. Serve it (TF Serving API) and embed test images over gRPC and REST")
    serve_and_query(FLAGS.name, sample, expected)
    print(f"\nmain job done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    app.run(main)
