"""Is DINO's teacher uniform at initialization? With and without BN in the head.

    python benchmarks/dino_teacher_at_init.py

DINO distils the teacher's sharpened, centred distribution over K prototypes. If a fresh
encoder gives every image nearly the same features, every image gets nearly the same
logits, centring removes them, and the teacher is uniform (entropy ln K): the loss then
sits at ln K until something breaks the symmetry. This measures, on Fashion-MNIST test
images and a fresh resnet18_small + DINO head (the quality run's sizes):
  * mean pairwise cosine of the pooled encoder features,
  * per-prototype standard deviation of the logits across images,
  * entropy of the centred teacher at T = 0.04 and 0.07, against ln K,
for the head without BN (the paper's ViT head) and with BN after its hidden layers
(`head_batch_norm=True`). Writes benchmarks/results/dino_teacher_at_init.json.
"""

import json
import os

from absl import app, flags

flags.DEFINE_integer("images", 512, "Test images to measure on.")
flags.DEFINE_integer("seed", 0, "Seed of the fresh weights.")
flags.DEFINE_string("out_dir", "benchmarks/results", "Where the JSON goes.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT_DIM, HIDDEN_DIM, BOTTLENECK_DIM = 4096, 512, 256  # benchmarks/fmnist_settings.py's DINO head


def main(argv):
    del argv
    os.chdir(ROOT)
    import keras
    import numpy as np

    from recipes import data
    from recipes.heads import dino_head
    from zoo import backbones

    test_x, _ = data.load_arrays("fashion_mnist", "test")
    images = test_x[:FLAGS.images]
    rows = []
    for batch_norm in (False, True):
        keras.utils.set_random_seed(FLAGS.seed)
        encoder = backbones.build("resnet18_small", images.shape[1:], width=0.25)
        head = dino_head(OUTPUT_DIM, HIDDEN_DIM, BOTTLENECK_DIM, batch_norm=batch_norm)
        features = keras.ops.convert_to_numpy(encoder(images, training=True))
        logits = keras.ops.convert_to_numpy(head(features, training=True)).astype("float64")
        unit = features / np.linalg.norm(features, axis=1, keepdims=True)
        cosines = unit @ unit.T
        row = {"head_batch_norm": batch_norm,
               "feature_mean_pairwise_cosine": float(cosines[np.triu_indices(len(unit), 1)].mean()),
               "logit_std_across_images": float(logits.std(axis=0).mean())}
        centred = logits - logits.mean(axis=0)
        for temperature in (0.04, 0.07):
            z = centred / temperature
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            row[f"teacher_entropy_T{temperature}"] = float(-(p * np.log(p + 1e-30)).sum(axis=1).mean())
        rows.append(row)
        print(json.dumps(row))
    result = {"images": FLAGS.images, "seed": FLAGS.seed, "ln_K": float(np.log(OUTPUT_DIM)),
              "head": {"output_dim": OUTPUT_DIM, "hidden_dim": HIDDEN_DIM, "bottleneck_dim": BOTTLENECK_DIM},
              "encoder": "resnet18_small w0.25, training-mode BN (as in a train step)", "rows": rows}
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "dino_teacher_at_init.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
