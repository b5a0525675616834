"""DeepCluster: k-means on the network's own features as classification targets.

Caron, Bojanowski, Joulin, Douze 2018, "Deep Clustering for Unsupervised Learning of
Visual Features" (ECCV).

Training alternates, once per epoch, between
  1. *clustering*: features of every training image (unaugmented, BatchNorm in
     inference mode) from the encoder and the MLP head above it (the paper clusters
     the output of AlexNet's fc layers below the classifier, before their last ReLU),
     PCA-reduced to `pca_dim` (256) with whitening, L2-normalized, then k-means with
     `num_clusters` centroids: 20 Lloyd iterations from randomly drawn data points (the
     paper's faiss settings), seeded by (seed, epoch) so a resumed run re-clusters
     exactly as the original did;
  2. *training*: cross-entropy of a freshly initialized linear classifier (the "top
     layer", N(0, 0.01) weights, zero bias, the paper's code) on the cluster indices,
     with random resized crops and flips (the paper's augmentation; no colour jitter).

Against the trivial solutions the paper names (sec. 3.3):
  * *empty clusters*: when a cluster loses all its points during k-means, it takes the
    centroid of a non-empty cluster (drawn with probability proportional to its size
    minus one, as faiss does) with a small symmetric perturbation (x (1 +- 1/1024) on
    alternate coordinates), and the next assignment splits that cluster's points
    between the two (`kmeans`);
  * *big clusters dominating*: the paper samples images uniformly over the pseudo-classes
    (its `UnifLabelSampler`). Our data pipeline is the CLI's (uniform over images), so
    instead each example's loss is weighted by N / (K_nonempty |its cluster|): a uniform
    batch then has the same expected loss and gradient as one drawn uniformly over the
    non-empty clusters and then uniformly within one (`uniform_cluster_weights`).

The classifier is re-initialized after every clustering (cluster k of one epoch has
nothing to do with cluster k of the next), and so are its optimizer slots (momentum,
Adam moments): the paper's code gives the top layer a new optimizer every epoch. The
encoder and the MLP head keep training, with their optimizer state.

Where the clustering runs: it needs the whole dataset, so it is not part of
`train_step`. `training_callbacks(images)` gives the Keras callback that runs it at the
start of every epoch (`python -m recipes.train` adds it; pass it to `fit` yourself when
training from Python). Features come from one device in cross-replica context, PCA and
k-means run in numpy (float64) with a seed fixed by the epoch, so every replica and every
worker derives the same labels. Labels and weights are non-trainable variables, written
to every replica; the train step refuses to run before the first clustering.

Dropout: the released code's AlexNet drops half of the inputs of each fc layer (fc6, fc7) in
training, not those of the top layer, and never when computing features for k-means.
Here `dropout` (0.5) does the same on the inputs of the MLP head's two Dense layers, with
masks drawn for the global batch from the step's seed and sliced per replica
(`recipes.augment.GlobalDraws`; Keras' Dropout layer draws per replica), so 1 and N
replicas drop the same units. Without a head (`hidden_dim=0`) there is no dropout.

Differences from the paper, on purpose: loss weights instead of a sampler
(above); the top layer shares the run's optimizer (SGD with momentum in the CLI), reset
at each clustering, where the paper's gives it a plain SGD without momentum; no Sobel
filter (the paper's input for colour ImageNet, to keep colour from being an easy cue:
it changes the encoder's input channels, which the CLI fixes from the dataset, and
grey images such as Fashion-MNIST have no colour to remove).
"""

import time

import keras
import numpy as np
import tensorflow as tf

from recipes import distribute
from recipes.augment import GlobalDraws, ViewPolicy, random_view
from recipes.base import Recipe, register
from recipes.evaluate import feature_extractor
from recipes.heads import mlp
from recipes.losses import pretext_cross_entropy

UNLABELLED = -1
# The faiss perturbation of a split centroid: x (1 + EPS) and x (1 - EPS) on alternate coordinates.
SPLIT_EPS = 1.0 / 1024

# The paper's augmentation (its cluster_assign transform): RandomResizedCrop at torchvision's
# default scale 0.08-1 and a horizontal flip; no colour jitter, grayscale or blur.
DEEPCLUSTER_VIEW = ViewPolicy(crop_scale=(0.08, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


# ---- the clustering, as pure numpy functions ----------------------------------------
def pca_whiten(features, dim: int, relative_floor: float = 1e-6) -> np.ndarray:
    """Projects rows of `features` [N, D] on their top `dim` principal components, each
    scaled to unit variance (faiss' PCAMatrix with eigen_power=-0.5), in float64.

    Variances below `relative_floor` x the largest are floored to it before the division,
    so directions of (near-)zero variance are not amplified into noise. Each component's
    sign is fixed (its largest coordinate positive), so the result is deterministic.
    """
    x = np.asarray(features, np.float64)
    n, d = x.shape
    if not 1 <= dim <= d:
        raise ValueError(f"PCA dimension {dim} must be in [1, {d}] (the feature dimension).")
    centered = x - x.mean(axis=0)
    covariance = centered.T @ centered / n
    variances, components = np.linalg.eigh(covariance)  # ascending
    variances, components = variances[::-1][:dim], components[:, ::-1][:, :dim]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(dim)])
    components = components * np.where(signs == 0, 1.0, signs)
    variances = np.maximum(variances, relative_floor * max(variances[0], np.finfo(np.float64).tiny))
    return centered @ components / np.sqrt(variances)


def l2_normalize_rows(x, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def preprocess_features(features, pca_dim: int) -> np.ndarray:
    """The paper's preprocessing before k-means: PCA to `pca_dim` with whitening, then L2
    normalization. `pca_dim` is capped at the feature dimension and at N - 1 (the rank of
    N centered points: beyond it whitening would only scale round-off)."""
    n, d = np.shape(features)
    return l2_normalize_rows(pca_whiten(features, max(1, min(pca_dim, d, n - 1))))


def nearest_centroids(x, centroids, chunk: int = 8192) -> np.ndarray:
    """Index of the nearest centroid (squared L2) of every row of x; ties go to the lower index."""
    squared = np.sum(centroids * centroids, axis=1)
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), chunk):  # bounded memory: [chunk, K] distances at a time
        block = x[start:start + chunk]
        out[start:start + chunk] = np.argmin(squared[None, :] - 2.0 * block @ centroids.T, axis=1)
    return out


def split_empty_clusters(centroids, sizes, rng) -> int:
    """faiss' fix for empty clusters, in place: each empty cluster i, in index order, takes
    the centroid of a cluster j drawn with probability proportional to |j| - 1 (only clusters
    of 2+ points can be split), perturbed symmetrically, c_i = c_j (1 + e s) and c_j <- c_j (1 - e s)
    with s = +1, -1, +1, ... over coordinates and e = 1/1024; the two are then counted as
    holding half of j's points each (the next assignment does the actual split).

    Returns the number of splits.
    """
    splits = 0
    signs = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
    for i in np.flatnonzero(sizes == 0):
        splittable = np.maximum(sizes - 1, 0).astype(np.float64)
        if splittable.sum() == 0:  # every point is alone in its cluster: nothing to split
            break
        j = rng.choice(len(sizes), p=splittable / splittable.sum())
        base = centroids[j].copy()
        centroids[i] = base * (1.0 + SPLIT_EPS * signs)
        centroids[j] = base * (1.0 - SPLIT_EPS * signs)
        sizes[i] = sizes[j] // 2
        sizes[j] -= sizes[i]
        splits += 1
    return splits


def kmeans(x, num_clusters: int, iterations: int = 20, seed=0, initial_centroids=None):
    """Lloyd's k-means as the paper runs it (faiss): `iterations` rounds of assignment then
    centroid update, empty clusters split after each update (`split_empty_clusters`), and
    the returned assignment is each point's nearest final centroid.

    Args:
      x: [N, D] points (float64 recommended).
      num_clusters: K <= N.
      iterations: Lloyd iterations (20 in the paper).
      seed: seeds the initial centroids (K distinct random points) and the splits; an int or
        a sequence of ints (numpy's `default_rng`).
      initial_centroids: [K, D] to start from instead of random points.

    Returns:
      (assignments int64 [N], centroids [K, D], number of cluster splits over the run).
    """
    x = np.asarray(x, np.float64)
    n = len(x)
    if not 1 <= num_clusters <= n:
        raise ValueError(f"k-means needs 1 <= num_clusters <= {n} points, got {num_clusters}.")
    rng = np.random.default_rng(seed)
    if initial_centroids is None:
        centroids = x[rng.choice(n, num_clusters, replace=False)].copy()
    else:
        centroids = np.array(initial_centroids, np.float64)
        if centroids.shape != (num_clusters, x.shape[1]):
            raise ValueError(f"initial_centroids must be [{num_clusters}, {x.shape[1]}], got {centroids.shape}.")
    splits = 0
    for _ in range(iterations):
        assignments = nearest_centroids(x, centroids)
        sizes = np.bincount(assignments, minlength=num_clusters)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assignments, x)
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled, None]
        splits += split_empty_clusters(centroids, sizes, rng)
    return nearest_centroids(x, centroids), centroids, splits


def uniform_cluster_weights(labels, num_clusters: int) -> np.ndarray:
    """Per-example loss weights N / (K_nonempty |cluster of the example|).

    The paper samples each batch uniformly over the non-empty pseudo-classes (then uniformly
    within one). Weighting the loss of a batch drawn uniformly over the N images by these
    weights gives the same loss (and gradient) in expectation: every non-empty cluster
    carries a total weight of N / K_nonempty, i.e. 1 / K_nonempty of the mean.
    """
    labels = np.asarray(labels)
    sizes = np.bincount(labels, minlength=num_clusters).astype(np.float64)
    nonempty = np.count_nonzero(sizes)
    return len(labels) / (nonempty * sizes[labels])


# ---- the recipe ----------------------------------------------------------------------
@register("deepcluster")
class DeepCluster(Recipe):
    """k-means pseudo-labels of the whole dataset, recomputed every epoch, as classification targets.

    Args:
      encoder: backbone to pretrain.
      dataset_size: N, number of training images; batches must carry `index` in [0, N).
      num_clusters: K of k-means. The paper: 10000 on ImageNet's 1.3M images (~10x its 1000
        classes, where it found features best); default 100 (~10x the 10 classes of our
        datasets, Fashion-MNIST and CIFAR-10).
      pca_dim: PCA-whitening dimension before k-means (256), capped at the feature dimension.
      kmeans_iterations: Lloyd iterations (20, the paper's faiss setting).
      hidden_dim: width of the 2-layer MLP head (Dense-ReLU-Dense) between encoder and
        classifier, whose output k-means clusters (the paper's fc6-fc7, 4096 wide for
        AlexNet's 9216-d conv features); 0 = no head, cluster the encoder's features.
      dropout: rate on the inputs of the MLP head's Dense layers in training (0.5, the
        released code's before fc6 and fc7); 0 = none.
      feature_batch_size: images per forward pass when computing features for clustering.
      bn_splits: BatchNorm groups over the global batch; None = one per replica.
      view_policy: augmentation fields to change from the paper's crop + flip (a dict).
      seed: augmentation, k-means and classifier-initialization seed.
    """

    needs_index = True

    def __init__(self, encoder, dataset_size=60000, num_clusters=100, pca_dim=256, kmeans_iterations=20,
                 hidden_dim=512, dropout=0.5, feature_batch_size=1024, bn_splits=None, view_policy=None, seed=0,
                 **kwargs):
        super().__init__(encoder, seed=seed, **kwargs)
        self.dataset_size = int(dataset_size)
        self.num_clusters = int(num_clusters)
        self.pca_dim = int(pca_dim)
        self.kmeans_iterations = int(kmeans_iterations)
        self.hidden_dim = int(hidden_dim or 0)
        self.dropout = float(dropout)
        self.feature_batch_size = int(feature_batch_size)
        self.bn_splits = None if bn_splits is None else int(bn_splits)
        self.view_policy = DEEPCLUSTER_VIEW.updated(view_policy or {})
        if self.num_clusters < 2:
            raise ValueError(f"DeepCluster needs num_clusters >= 2, got {self.num_clusters}.")
        if self.num_clusters > self.dataset_size:
            raise ValueError(f"num_clusters={self.num_clusters} exceeds the {self.dataset_size} images: "
                             "k-means starts from num_clusters distinct images.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DeepCluster's dropout must be in [0, 1), got {dropout}.")
        if self.pca_dim < 1 or self.kmeans_iterations < 1 or self.feature_batch_size < 1 or self.hidden_dim < 0:
            raise ValueError(f"DeepCluster needs pca_dim >= 1, kmeans_iterations >= 1, feature_batch_size >= 1 and "
                             f"hidden_dim >= 0; got {self.pca_dim}, {self.kmeans_iterations}, "
                             f"{self.feature_batch_size}, {self.hidden_dim}.")
        features = encoder.output_shape[-1]
        self.head = None
        if self.hidden_dim:
            self.head = mlp(self.hidden_dim, self.hidden_dim, num_layers=2, name="deepcluster_mlp")
            self.head.build((None, features))
            features = self.hidden_dim
        self.classifier = keras.layers.Dense(
            self.num_clusters, kernel_initializer=keras.initializers.RandomNormal(stddev=0.01, seed=self.seed),
            bias_initializer="zeros", name="top_layer")
        self.classifier.build((None, features))
        self.labels = self.add_weight(shape=(self.dataset_size,), dtype="int32", trainable=False,
                                      initializer=keras.initializers.Constant(UNLABELLED), name="labels")
        self.sample_weights = self.add_weight(shape=(self.dataset_size,), trainable=False, initializer="ones",
                                              name="sample_weights")
        self.accuracy_tracker = keras.metrics.Mean(name="cluster_acc")
        self._extract = None

    def get_config(self):
        return {**super().get_config(), "dataset_size": self.dataset_size, "num_clusters": self.num_clusters,
                "pca_dim": self.pca_dim, "kmeans_iterations": self.kmeans_iterations, "hidden_dim": self.hidden_dim,
                "dropout": self.dropout, "feature_batch_size": self.feature_batch_size, "bn_splits": self.bn_splits,
                "view_policy": self.view_policy.to_config()}

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def embedding_head(self):
        """The MLP head: its output is what k-means clusters (None without a head)."""
        return self.head

    def _features(self, x, training):
        """What k-means clusters: the MLP head's output (before its ReLU), else the encoder's."""
        features = self.encoder(x, training=training)
        return features if self.head is None else self.head(features, training=training)

    def head_logits(self, features, draws=None):
        """Top-layer logits from encoder features, through the MLP head (and its final ReLU);
        with `draws` (a `GlobalDraws`, training), the paper's dropout before each Dense layer."""
        if self.head is None:
            return self.classifier(features)
        x = features
        for layer in self.head.layers:  # Dense, ReLU, Dense: no BatchNorm, so no BN groups needed
            if draws is not None and self.dropout and isinstance(layer, keras.layers.Dense):
                keep = draws.uniform(shape=(x.shape[-1],)) >= self.dropout
                x = x * tf.cast(keep, x.dtype) / (1.0 - self.dropout)
            x = layer(x)
        return self.classifier(tf.nn.relu(x))

    # ---- training on the pseudo-labels ---------------------------------------------
    def loss_terms(self, data):
        images, index = data["image"], self.dataset_index(data)
        global_batch = self.global_batch(images)
        labels = tf.gather(self.labels.value, index)
        check = tf.debugging.assert_non_negative(
            labels, message="DeepCluster's pseudo-labels were never computed: cluster first "
                            "(recipe.cluster(images), or fit with recipe.training_callbacks(images)).")
        with tf.control_dependencies([check]):
            views = random_view(images, self.step_seed(1), self.view_policy, global_batch)
            features = self.encode_in_groups(lambda x, training: self.encoder(x, training=training), views,
                                             self.bn_splits or self.num_replicas)
        draws = GlobalDraws(self.step_seed(2), global_batch, images.shape[0])
        logits = self.head_logits(features, draws)
        losses = pretext_cross_entropy(logits, labels)
        weights = tf.cast(tf.gather(self.sample_weights.value, index), losses.dtype)
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels)
        self.accuracy_tracker.update_state(tf.cast(hits, tf.float32))
        return tf.reduce_sum(weights * losses) / global_batch, {}

    # ---- the clustering --------------------------------------------------------------
    def compute_features(self, images) -> np.ndarray:
        """[N, D] features k-means clusters, of the unaugmented images, BN in inference mode."""
        if len(images) != self.dataset_size:
            raise ValueError(f"DeepCluster clusters all {self.dataset_size} training images (the rows of the "
                             f"labels), got {len(images)}.")
        if self._extract is None:  # traced once per recipe (free batch size), not once per epoch
            self._extract = feature_extractor(
                lambda batch, training: self._features(tf.cast(batch, keras.config.floatx()), training),
                self.feature_batch_size)
        return self._extract(images)

    def cluster(self, images, epoch: int = 0) -> dict:
        """One clustering: features -> PCA-whitening -> L2 -> k-means (seeded by seed and `epoch`);
        stores the labels and loss weights, re-initializes the classifier and its optimizer slots.
        Returns the labels and clustering statistics."""
        x = preprocess_features(self.compute_features(images), self.pca_dim)
        labels, _, splits = kmeans(x, self.num_clusters, self.kmeans_iterations, seed=[self.seed, 11, int(epoch)])
        weights = uniform_cluster_weights(labels, self.num_clusters)
        distribute.assign_synced([self.labels, self.sample_weights],
                                 [tf.constant(labels, tf.int32), tf.constant(weights, self.sample_weights.dtype)])
        self.reset_classifier(epoch)
        return {"labels": labels, "splits": splits, "sizes": np.bincount(labels, minlength=self.num_clusters)}

    def classifier_slots(self) -> list:
        """The optimizer's variables for the classifier's kernel and bias (momentum, Adam's moments).

        Keras 3 names a slot `{variable.path with / as _}_{slot}` (`add_variable_from_reference`);
        each slot is attributed to the trainable variable with the longest such prefix, so a
        layer named like the classifier's prefix does not capture its slots.
        """
        optimizer = getattr(self, "optimizer", None)
        if optimizer is None or not optimizer.built:
            return []
        prefixes = [(v.path.replace("/", "_") + "_", v) for v in self.optimized_variables]
        top = {id(self.classifier.kernel), id(self.classifier.bias)}
        slots = []
        for slot in optimizer.variables:
            owners = [(len(prefix), v) for prefix, v in prefixes
                      if slot.name.startswith(prefix) and tuple(slot.shape) == tuple(v.shape)]
            if owners and id(max(owners, key=lambda pair: pair[0])[1]) in top:
                slots.append(slot)
        return slots

    def reset_classifier(self, epoch: int = 0):
        """The paper's fresh top layer (weights N(0, 0.01), bias 0; seeded by seed and `epoch`)
        and fresh optimizer slots for it."""
        kernel, bias = self.classifier.kernel, self.classifier.bias
        seed = tf.constant([self.seed, 1000003 + int(epoch)], tf.int32)
        values = [0.01 * tf.random.stateless_normal(kernel.shape, seed, dtype=kernel.dtype),
                  tf.zeros(bias.shape, bias.dtype)]
        slots = self.classifier_slots()
        distribute.assign_synced([kernel, bias] + slots, values + [tf.zeros(s.shape, s.dtype) for s in slots])

    def training_callbacks(self, images) -> list:
        return [Reclustering(self, images)]


class Reclustering(keras.callbacks.Callback):
    """Runs DeepCluster's clustering at the start of every epoch (`fit`'s epoch number seeds
    k-means and the classifier, so a resumed run re-clusters as the original did)."""

    def __init__(self, recipe: DeepCluster, images):
        super().__init__()
        self.recipe, self.images = recipe, images

    def on_epoch_begin(self, epoch, logs=None):
        started = time.time()
        result = self.recipe.cluster(self.images, epoch)
        sizes = result["sizes"]
        print(f"\nDeepCluster clustering before epoch {epoch + 1}: {time.time() - started:.1f} s; "
              f"{np.count_nonzero(sizes)}/{len(sizes)} clusters non-empty, {sizes[sizes > 0].min()}-{sizes.max()} "
              f"images each ({len(self.images) / len(sizes):.0f} if equal); {result['splits']} empty-cluster "
              "splits.", flush=True)
