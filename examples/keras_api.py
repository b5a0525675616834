"""Pretrain, evaluate and publish an encoder from Python, with Keras's own fit().

What `python -m recipes.train` does, reduced to the calls a Keras user writes: a recipe
is a `keras.Model` around an encoder; `fit` trains it on batches of uint8 images; the
encoder (not the recipe) is what is evaluated, published and served.

    python examples/keras_api.py                                   # SimCLR on Fashion-MNIST, 1 epoch
    python examples/keras_api.py --dataset=folder:my_images --image_size=64 --recipe=byol
"""

import keras
import numpy as np
from absl import app, flags

import recipes  # noqa: F401  (registers every recipe by name)
import zoo
from recipes import data, evaluate
from recipes.base import get_recipe_class
from zoo import backbones

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "simclr", "A recipe that needs no labels (simclr, moco, byol, barlow_twins, ...).")
flags.DEFINE_string("dataset", "fashion_mnist", "A dataset name or folder:PATH (see recipes.image_folder).")
flags.DEFINE_integer("image_size", None, "Folder datasets: square side to resize to.")
flags.DEFINE_integer("epochs", 1, "Training epochs.")
flags.DEFINE_integer("steps_per_epoch", None, "Cap on steps per epoch (default: one pass).")
flags.DEFINE_integer("batch_size", 256, "Batch size.")
flags.DEFINE_string("publish_as", "my_encoder", "Zoo name to publish the encoder under (empty: do not publish).")
flags.DEFINE_string("zoo_store", None, "Zoo store (default $ZOO_HOME or ~/.ssl_zoo).")


def main(argv):
    del argv
    keras.utils.set_random_seed(0)
    train_x, train_y = data.load_arrays(FLAGS.dataset, "train", image_size=FLAGS.image_size)
    test_x, test_y = data.load_arrays(FLAGS.dataset, "test", image_size=FLAGS.image_size)

    # The encoder maps uint8 images in [0, 255] to pooled features; normalization is inside it.
    encoder = backbones.build("resnet18_small", train_x.shape[1:], width=0.25)
    recipe_class = get_recipe_class(FLAGS.recipe)
    steps = FLAGS.steps_per_epoch or len(train_x) // FLAGS.batch_size
    # The paper's defaults; hyperparameters are keywords. Run facts where a recipe needs them: a row
    # per image (NPID's memory bank, SeLa's labels), the run's length (BYOL's and DINO's momentum
    # schedule, SeLa's label steps).
    recipe = recipe_class(encoder, **recipe_class.run_facts(total_steps=FLAGS.epochs * steps,
                                                          dataset_size=len(train_x)))
    recipe.compile(optimizer=keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(0.06, FLAGS.epochs * steps), momentum=0.9, weight_decay=5e-4))
    # Batches are {"image": uint8 [B, H, W, C]}: the recipe makes its views inside the train step.
    batches = data.make_dataset(train_x, batch_size=FLAGS.batch_size, repeat=True,
                                with_index=recipe_class.needs_index)
    # training_callbacks: what a recipe runs beside its train step (SeLa's label step over all images).
    recipe.fit(batches, epochs=FLAGS.epochs, steps_per_epoch=steps, verbose=2,
               callbacks=recipe.training_callbacks(train_x))

    extract = evaluate.feature_extractor(encoder)
    num_classes = int(max(train_y.max(), test_y.max()) + 1)
    knn = evaluate.knn_accuracy(extract(train_x), train_y, extract(test_x), test_y, num_classes)["accuracy"]
    print(f"kNN accuracy (k=200, T=0.1, {FLAGS.dataset} test, {FLAGS.epochs} epochs, seed 0): {knn:.4f}")

    if FLAGS.publish_as:
        ref = zoo.publish(name=FLAGS.publish_as, encoder=encoder, store=FLAGS.zoo_store,
                          run={"recipe": FLAGS.recipe, "dataset": FLAGS.dataset, "epochs": FLAGS.epochs,
                               "recipe_config": recipe.get_config()},
                          metrics={"knn": {"accuracy": knn, "protocol": {
                              "method": "weighted kNN", "k": 200, "temperature": 0.1, "dataset": FLAGS.dataset,
                              "split": "test", "epochs": FLAGS.epochs, "seed": 0}}})
        reloaded = zoo.load(ref, store=FLAGS.zoo_store)
        same = np.allclose(reloaded.predict(test_x[:8], verbose=0), encoder.predict(test_x[:8], verbose=0), atol=1e-5)
        print(f"published {ref}; reloaded encoder gives the same features: {same}")


if __name__ == "__main__":
    app.run(main)
