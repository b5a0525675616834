"""Self-supervised losses as pure functions of tensors.

Each returns per-example losses (shape [batch]) so that the caller decides the
reduction; under tf.distribute a recipe sums them and divides by the *global* batch
size, which makes the summed gradient across replicas equal the single-device one.
Every function here is checked against an independent numpy reference in
tests/test_losses.py. Each computes in float32 when given bfloat16/float16 tensors
(`recipes.precision`: mixed-precision training).
"""

import tensorflow as tf

from recipes.precision import computes_in_float32


@computes_in_float32
def l2_normalize(x, axis=-1):
    """Unit-length rows; the embedding space every contrastive loss lives in."""
    return tf.math.l2_normalize(x, axis=axis, epsilon=1e-12)


@computes_in_float32
def info_nce(queries, positive_keys, negative_keys, temperature):
    """InfoNCE of MoCo (He et al. 2020, eq. 1; van den Oord et al. 2018).

    For each query q with positive key k+ and shared negatives {k-}:
        loss = -log( exp(q.k+/T) / (exp(q.k+/T) + sum_k- exp(q.k-/T)) )
    The inputs are expected L2-normalized (dot product = cosine similarity).

    Args:
      queries: [B, D] query embeddings.
      positive_keys: [B, D] the key of the same image under another view.
      negative_keys: [K, D] keys of other images (MoCo's queue).
      temperature: softmax temperature T (0.2 in MoCo v2).

    Returns:
      [B] per-example losses.
    """
    positive_logits = tf.reduce_sum(queries * positive_keys, axis=-1, keepdims=True)
    negative_logits = tf.matmul(queries, negative_keys, transpose_b=True)
    logits = tf.concat([positive_logits, negative_logits], axis=1) / temperature
    # The positive sits at index 0 of every row.
    return tf.reduce_logsumexp(logits, axis=1) - logits[:, 0]


@computes_in_float32
def contrastive_accuracy(queries, positive_keys, negative_keys):
    """Fraction of queries whose positive key beats every negative: a health signal."""
    positive_logits = tf.reduce_sum(queries * positive_keys, axis=-1)
    best_negative = tf.reduce_max(tf.matmul(queries, negative_keys, transpose_b=True), axis=1)
    return tf.reduce_mean(tf.cast(positive_logits > best_negative, tf.float32))


@computes_in_float32
def cross_entropy_with_index(logits, positive_index):
    """-log softmax(logits)[positive_index] per row: the shared core of InfoNCE variants."""
    positive_logits = tf.gather(logits, positive_index, axis=1, batch_dims=1)
    return tf.reduce_logsumexp(logits, axis=1) - positive_logits


@computes_in_float32
def nt_xent(z_1, z_2, temperature, all_z_1=None, all_z_2=None, offset=0):
    """NT-Xent, the normalized-temperature cross entropy of SimCLR (Chen et al. 2020, eq. 1).

    Each of the 2N views in a batch is an anchor; its positive is the other view of
    the same image and its negatives are the 2N - 2 views of the other images:
        l(i, j) = -log( exp(s_ij / T) / sum_{k != i} exp(s_ik / T) ),  s = cosine.

    Under tf.distribute a replica holds only its anchors (`z_1`, `z_2`, its rows of
    the batch) but contrasts them with the *global* batch (`all_z_1`, `all_z_2`,
    gathered with `distribute.all_gather`); `offset` is the global row of its first
    anchor. Without them the local batch is the whole batch.

    Args:
      z_1, z_2: [b, D] projections of the two views of this replica's images.
      temperature: T (0.5 for CIFAR-scale batches, 0.1 for ImageNet with 4096).
      all_z_1, all_z_2: [N, D] projections of the global batch, or None.
      offset: global index of row 0 of `z_1`.

    Returns:
      [2b] per-anchor losses: the anchors of view 1, then those of view 2.
    """
    all_z_1 = z_1 if all_z_1 is None else all_z_1
    all_z_2 = z_2 if all_z_2 is None else all_z_2
    z_1, z_2 = l2_normalize(z_1), l2_normalize(z_2)
    candidates = l2_normalize(tf.concat([all_z_1, all_z_2], axis=0))  # [2N, D]
    global_rows = all_z_1.shape[0] or tf.shape(all_z_1)[0]
    rows = tf.range(tf.shape(z_1)[0]) + offset
    anchors = tf.concat([z_1, z_2], axis=0)
    self_index = tf.concat([rows, rows + global_rows], axis=0)
    positive_index = tf.concat([rows + global_rows, rows], axis=0)
    logits = tf.matmul(anchors, candidates, transpose_b=True) / temperature
    # An anchor is not its own negative: mask its similarity with itself out of the softmax.
    self_mask = tf.one_hot(self_index, tf.shape(candidates)[0], on_value=-1e9, off_value=0.0, dtype=logits.dtype)
    return cross_entropy_with_index(logits + self_mask, positive_index)


@computes_in_float32
def instance_softmax(features, memory, index, temperature):
    """NPID's non-parametric softmax over a memory bank (Wu et al. 2018, eq. 2).

    P(i | v) = exp(v_i . v / T) / sum_j exp(v_j . v / T), where v = f(x_i) is the
    current feature of image i and the v_j are the bank's entries for *all* n images:
    every image is its own class, and the class "weights" are remembered features.

    Args:
      features: [B, D] L2-normalized features of the batch.
      memory: [n, D] the memory bank.
      index: [B] dataset index of each image (its row in the bank).
      temperature: T (0.07).

    Returns:
      [B] per-example -log P(i | v_i).
    """
    logits = tf.matmul(features, memory, transpose_b=True) / temperature
    return cross_entropy_with_index(logits, tf.cast(index, tf.int32))


@computes_in_float32
def instance_nce(positive_similarity, noise_similarity, temperature, log_normalizer, dataset_size):
    """NPID's noise-contrastive estimate of the instance softmax (Wu et al. 2018, eq. 3-6).

    With P(i|v) = exp(s/T) / Z and uniform noise P_n = 1/n, each data sample is told
    apart from m noise samples by h(i, v) = P(i|v) / (P(i|v) + m P_n):
        loss = -log h(i, v_i) - sum_{noise j} log(1 - h(i, v'_j)).
    Z is a constant (a Monte-Carlo estimate, `log_normalizer` = log Z), so the cost
    per image is m + 1 dot products instead of n. Computed in log space:
    -log h = softplus(log(m P_n) - log P) and -log(1 - h) = softplus(log P - log(m P_n)).

    Args:
      positive_similarity: [B] v_i . f(x_i), the bank entry of the image itself.
      noise_similarity: [B, m] v_j . f(x_i) for m noise entries.
      temperature: T.
      log_normalizer: scalar log Z.
      dataset_size: n.

    Returns:
      [B] per-example NCE losses.
    """
    num_noise = noise_similarity.shape[-1] or tf.shape(noise_similarity)[-1]
    log_noise = tf.math.log(tf.cast(num_noise, positive_similarity.dtype) / float(dataset_size))  # log(m P_n)
    log_p_positive = positive_similarity / temperature - log_normalizer
    log_p_noise = noise_similarity / temperature - log_normalizer
    return tf.nn.softplus(log_noise - log_p_positive) + tf.reduce_sum(
        tf.nn.softplus(log_p_noise - log_noise), axis=-1
    )


@computes_in_float32
def cpc_info_nce(predictions, candidates, positive_index):
    """CPC's InfoNCE (van den Oord et al. 2018, eq. 4; Henaff et al. 2019, eq. 3).

    A prediction z_hat of the patch k rows below must score its true latent z
    higher (by the bilinear score z_hat . z, no normalization, no temperature) than
    the latents of all other patches, of this and of other images.

    Args:
      predictions: [M, D] predicted latents W_k c.
      candidates: [P, D] latents of every patch of the (global) batch.
      positive_index: [M] row of each prediction's true patch in `candidates`.

    Returns:
      [M] per-prediction losses.
    """
    logits = tf.matmul(predictions, candidates, transpose_b=True)
    return cross_entropy_with_index(logits, tf.cast(positive_index, tf.int32))


@computes_in_float32
def byol_loss(predictions, targets):
    """BYOL's normalized mean squared error (Grill et al. 2020, eq. 2).

    ||q/|q| - z'/|z'|||^2 = 2 - 2 cos(q, z'). No negatives: the target network is an
    EMA of the online one, and collapse is avoided by the predictor plus the
    stop-gradient on the target. Per example, one direction; the recipe adds the
    swapped direction (eq. 3, the symmetric loss).

    Returns:
      [B] per-example losses in [0, 4].
    """
    cosine = tf.reduce_sum(l2_normalize(predictions) * l2_normalize(tf.stop_gradient(targets)), axis=-1)
    return 2.0 - 2.0 * cosine


@computes_in_float32
def batch_standardize(z, epsilon=1e-5):
    """(z - mean) / std over the batch dimension, biased variance: BatchNorm without affine."""
    mean, variance = tf.nn.moments(z, axes=[0])
    return (z - mean) / tf.sqrt(variance + epsilon)


@computes_in_float32
def barlow_twins_loss(z_1, z_2, lambda_offdiag=5e-3):
    """Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, eq. 1-2).

    C = bn(z_1)^T bn(z_2) / N is the cross-correlation of the two views' embeddings
    over the batch. The invariance term pushes its diagonal to 1 (each feature agrees
    across views), the redundancy-reduction term its off-diagonal to 0 (features are
    decorrelated):  sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.

    This is a loss of the whole batch, not a mean of per-example terms: pass the
    embeddings of the *global* batch.

    Returns:
      A scalar.
    """
    batch = tf.cast(tf.shape(z_1)[0], z_1.dtype)
    correlation = tf.matmul(batch_standardize(z_1), batch_standardize(z_2), transpose_a=True) / batch
    diagonal = tf.linalg.diag_part(correlation)
    on_diagonal = tf.reduce_sum(tf.square(1.0 - diagonal))
    off_diagonal = tf.reduce_sum(tf.square(correlation)) - tf.reduce_sum(tf.square(diagonal))
    return on_diagonal + lambda_offdiag * off_diagonal


@computes_in_float32
def dino_loss(student_logits, teacher_logits, center, student_temperature, teacher_temperature):
    """DINO's self-distillation cross entropy (Caron et al. 2021, eq. 1-2 and sec. 3.1).

    The teacher's distribution over K prototype "classes" is centred (subtract the
    running mean of its outputs: prevents one dimension from dominating) and
    sharpened (a low temperature: prevents the uniform collapse that centring alone
    would favour). Every student view learns to predict every *other* teacher view:
        sum_{t} sum_{s != t} H(softmax((g_t - c) / T_t), softmax(g_s / T_s)) / #pairs.

    Args:
      student_logits: list of [B, K], the student's output for every view: the
        global views first, in the order of `teacher_logits`, then the local views.
      teacher_logits: list of [B, K], the teacher's output for the global views.
      center: [K] running centre of the teacher's outputs.
      student_temperature: T_s (0.1).
      teacher_temperature: T_t (0.04 -> 0.07 during warm-up).

    Returns:
      [B] per-example losses averaged over the (teacher, student) pairs.
    """
    total, pairs = 0.0, 0
    student_log_probs = [tf.nn.log_softmax(s / student_temperature, axis=-1) for s in student_logits]
    for t, teacher in enumerate(teacher_logits):
        target = tf.stop_gradient(tf.nn.softmax((teacher - center) / tf.cast(teacher_temperature, teacher.dtype),
                                                axis=-1))
        for s, log_probs in enumerate(student_log_probs):
            if s == t:  # the same view: nothing to learn from predicting yourself
                continue
            total += -tf.reduce_sum(target * log_probs, axis=-1)
            pairs += 1
    return total / pairs


@computes_in_float32
def pretext_cross_entropy(logits, labels):
    """The loss of the classification pretext tasks: cross-entropy of the task's classes.

    RotNet (Gidaris et al. 2018): which of 4 rotations; jigsaw (Noroozi & Favaro 2016):
    which of P tile permutations; relative position (Doersch et al. 2015): which of 8
    neighbouring places.

    Args:
      logits: [N, K] class scores.
      labels: [N] int, the true class (the transformation the input was given).

    Returns:
      [N] per-example losses, -log softmax(logits)[label].
    """
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits)


@computes_in_float32
def sinkhorn_knopp(scores, epsilon=0.05, iterations=3, shared_scores=None, sum_over_replicas=None):
    """SwAV's codes: soft assignments of samples to prototypes with equal prototype usage.

    Caron et al. 2020, sec. 3.1 and Algorithm 1 (after Cuturi 2013; Asano et al. 2020):
    Q = exp(scores / epsilon) is scaled, alternately, so that every prototype receives
    1/K of the total mass and every sample 1/N of it, `iterations` times; the result,
    times N, gives each sample a distribution over the K prototypes.

    Args:
      scores: [B, K] this replica's samples' scores (cosines with the prototypes).
      epsilon: entropic regularization (0.05 in the paper; smaller = harder codes).
      iterations: Sinkhorn iterations (3 in the paper).
      shared_scores: [L, K] scores of samples every replica holds alike (SwAV's queue), or None.
      sum_over_replicas: sums a tensor over replicas (`distribute.all_reduce_sum`); None for one device.

    Returns:
      [B, K] codes of the `scores` rows, each row summing to 1.
    """
    reduce_replicas = sum_over_replicas or (lambda x: x)
    local = tf.exp(tf.stop_gradient(scores) / epsilon)
    # The shared rows (none without a queue) are on every replica: counted once, not summed over replicas.
    shared = tf.zeros([0, tf.shape(local)[1]], local.dtype) if shared_scores is None else \
        tf.exp(tf.stop_gradient(tf.cast(shared_scores, local.dtype)) / epsilon)
    samples = reduce_replicas(tf.cast(tf.shape(local)[0], local.dtype)) + tf.cast(tf.shape(shared)[0], local.dtype)
    prototypes = tf.cast(tf.shape(local)[1], local.dtype)

    def mass_per_prototype():
        return reduce_replicas(tf.reduce_sum(local, axis=0)) + tf.reduce_sum(shared, axis=0)

    total = tf.reduce_sum(mass_per_prototype())
    local, shared = local / total, shared / total
    for _ in range(iterations):
        mass = mass_per_prototype() * prototypes  # each prototype's mass -> 1/K
        local, shared = local / mass, shared / mass
        local = local / (tf.reduce_sum(local, axis=1, keepdims=True) * samples)  # each sample's -> 1/N
        shared = shared / (tf.reduce_sum(shared, axis=1, keepdims=True) * samples)
    return local * samples


SELF_LABEL_FLOOR = 500.0  # nats below an image's best cluster, see self_label_assignments


@computes_in_float32
def self_label_assignments(log_probs, lam=25.0, tolerance=1e-6, max_iterations=10000):
    """SeLa's label step: equipartitioned hard labels for a whole dataset.

    Asano, Rupprecht, Vedaldi 2020, sec. 3.1: the labels Q minimize the cross-entropy to
    the network's predictions P subject to every one of the K clusters receiving N/K of the
    N images, an optimal-transport problem solved approximately by Sinkhorn-Knopp on
    P^lambda: scale its columns (clusters) by r and its rows (images) by c, alternately,
    until the clusters each hold 1/K of the mass and the images 1/N. Each image then takes
    its most likely cluster under Q (the paper's hard labels).

    P^25 underflows float64 for any probability below ~1e-13, and a cluster or an image whose
    entries are all 0 has no scaling (the paper's code then carries NaNs). So each row is
    divided by its largest entry first (Q absorbs that into the image's c), and
    lambda * log p is floored at `SELF_LABEL_FLOOR` below the row's best: e^-500 stays positive,
    changes no entry within 20 nats (at lambda 25) of the image's best cluster, and keeps
    every scaling under 1e218. (A log-domain Sinkhorn needs no floor but took 3x longer.)

    Args:
      log_probs: [N, K] log-softmax of the predictions for every image of the dataset.
      lam: lambda, the inverse entropic regularization (25 in the paper; larger = closer to
        the exact transport solution, slower to converge).
      tolerance: stop once the image scalings c change by less than this over one round,
        mean_n |c_n / c_n' - 1|. The paper's code stops at a *sum* below 0.1, a mean of 2e-6
        on CIFAR's 50,000 images but 6e-3 on 16, where the labels are not settled yet.
      max_iterations: at most this many scaling rounds.

    Returns:
      (labels [N] int32, log_q [N, K] float64: the log of Q, which sums to 1).
    """
    log_p = lam * tf.cast(log_probs, tf.float64)
    log_p = tf.maximum(log_p - tf.reduce_max(log_p, axis=1, keepdims=True), -SELF_LABEL_FLOOR)
    p = tf.exp(log_p)
    n = tf.cast(tf.shape(p)[0], tf.float64)
    k = tf.cast(tf.shape(p)[1], tf.float64)

    def round_(i, r, c, change):
        r = 1.0 / (k * tf.linalg.matvec(p, c, transpose_a=True))  # cluster sums 1/K
        new_c = 1.0 / (n * tf.linalg.matvec(p, r))                  # image sums 1/N
        return i + 1, r, new_c, tf.reduce_mean(tf.abs(c / new_c - 1.0))

    start = (tf.constant(0), tf.ones_like(p[0]) / k, tf.ones_like(p[:, 0]) / n, tf.constant(float("inf"), tf.float64))
    _, r, c, _ = tf.while_loop(lambda i, r, c, change: (i < max_iterations) & (change > tolerance), round_, start)
    log_q = log_p + tf.math.log(r)[None, :] + tf.math.log(c)[:, None]
    return tf.argmax(log_q, axis=1, output_type=tf.int32), log_q


@computes_in_float32
def swav_loss(scores, codes, temperature=0.1):
    """SwAV's swapped prediction (Caron et al. 2020, eq. 1-2).

    The code of each assignment view (the global crops) is predicted from every other
    view's scores: -sum_k q_i[k] log softmax(s_v / T)[k], averaged over the views v != i
    and over the assignment views i.

    Args:
      scores: list of V [B, K] scores (L2-normalized embeddings times normalized prototypes), one per view.
      codes: list of A [B, K] codes (`sinkhorn_knopp`) of views 0..A-1, A <= V.
      temperature: T of the softmax over prototypes (0.1).

    Returns:
      [B] per-example losses.
    """
    log_probabilities = [tf.nn.log_softmax(s / temperature, axis=-1) for s in scores]
    per_view = []
    for i, q in enumerate(codes):
        others = [-tf.reduce_sum(q * log_p, axis=-1) for v, log_p in enumerate(log_probabilities) if v != i]
        per_view.append(tf.add_n(others) / len(others))
    return tf.add_n(per_view) / len(per_view)


@computes_in_float32
def masked_patch_mse(predictions, target_patches, mask, normalize_targets=True):
    """MAE's reconstruction loss (He et al. 2022, sec. 3): mean squared error on masked patches.

    Args:
      predictions: [B, N, P] predicted pixels of every patch.
      target_patches: [B, N, P] the patches' pixels.
      mask: [B, N], 1 for a masked (hidden) patch, 0 for a visible one: only masked ones count.
      normalize_targets: normalize each target patch by its own mean and (unbiased) variance,
        the paper's "normalized pixels" target (`norm_pix_loss` in its code), which it found
        gives better features.

    Returns:
      [B] per-image losses: the mean over the image's masked patches of the per-pixel MSE.
    """
    targets = tf.cast(target_patches, predictions.dtype)
    if normalize_targets:
        pixels = tf.cast(tf.shape(targets)[-1], targets.dtype)
        mean = tf.reduce_mean(targets, axis=-1, keepdims=True)
        variance = tf.reduce_sum(tf.square(targets - mean), axis=-1, keepdims=True) / (pixels - 1.0)
        targets = (targets - mean) / tf.sqrt(variance + 1e-6)
    per_patch = tf.reduce_mean(tf.square(predictions - targets), axis=-1)
    mask = tf.cast(mask, predictions.dtype)
    return tf.reduce_sum(per_patch * mask, axis=1) / tf.reduce_sum(mask, axis=1)


@computes_in_float32
def counting_loss(whole, tiles_sum, other_whole, margin=10.0):
    """Learning to count (Noroozi, Pirsiavash, Favaro 2017, eq. 4).

    The "counts" of visual primitives in an image equal the sum of those in its tiles:
        |phi(D x) - sum_j phi(T_j x)|^2 + max(0, M - |phi(D y) - sum_j phi(T_j x)|^2),
    where D downsamples, T_j cuts the j-th tile, and y is another image, whose counts must
    differ (the contrastive term that rules out phi = 0).

    Args:
      whole: [B, D] counts of the downsampled images phi(D x).
      tiles_sum: [B, D] summed counts of their tiles.
      other_whole: [B, D] counts of other downsampled images phi(D y).
      margin: M (10 in the paper).

    Returns:
      [B] per-example losses.
    """
    match = tf.reduce_sum(tf.square(whole - tiles_sum), axis=-1)
    mismatch = tf.reduce_sum(tf.square(other_whole - tiles_sum), axis=-1)
    return match + tf.nn.relu(margin - mismatch)


@computes_in_float32
def reconstruction_loss(predictions, targets, weights):
    """Context Encoders' reconstruction loss (Pathak et al. 2016): weighted L2 over the predicted
    region, per image: sum(w * (p - t)^2) / (C * |{w > 0}|).

    Args:
      predictions, targets: [B, H, W, C] pixels (any common scale).
      weights: [B, H, W, 1] or [B, H, W, C]; 0 outside the predicted region, 1 on the dropped
        pixels, `overlap_weight` on the boundary band.

    Returns:
      [B] losses: the weighted squared error averaged over the predicted region's pixel values.
    """
    weights = tf.cast(weights, predictions.dtype)
    squared = tf.square(predictions - tf.cast(targets, predictions.dtype))
    weighted = tf.reduce_sum(weights * squared, axis=[1, 2, 3])
    values = tf.reduce_sum(tf.cast(weights > 0, predictions.dtype) * tf.ones_like(squared), axis=[1, 2, 3])
    return weighted / tf.maximum(values, 1.0)


@computes_in_float32
def discriminator_loss(real_logits, fake_logits):
    """Context Encoders' adversarial term, discriminator side. [B]: -log D(real) - log(1 - D(fake)), D = sigmoid(logit): the discriminator's cross-entropy."""
    return tf.nn.softplus(-real_logits) + tf.nn.softplus(fake_logits)


@computes_in_float32
def generator_adversarial_loss(fake_logits):
    """Context Encoders' adversarial term, painter side. [B]: -log D(fake), the non-saturating generator loss (the released code labels fakes real)."""
    return tf.nn.softplus(-fake_logits)


@computes_in_float32
def colorization_loss(logits, indices, weights, pixel_weights):
    """Colorization's loss (Zhang et al. 2016): rebalanced multinomial cross-entropy (eq. 2), per image: the mean over its pixels of
    -v_hw sum_q Z_hwq log softmax(logits_hw)_q.

    Args:
      logits: [B, H, W, Q] predicted bin logits.
      indices, weights: [B, H, W, k] the soft-encoded targets (`recipes.pretext.colorization.soft_encode`).
      pixel_weights: [B, H, W] v, the rebalancing weight of each pixel's nearest bin.
    Returns:
      [B] per-image losses.
    """
    log_probabilities = tf.nn.log_softmax(logits, axis=-1)
    cross_entropy = -tf.reduce_sum(tf.cast(weights, logits.dtype) * tf.gather(log_probabilities, indices, batch_dims=3),
                                   axis=-1)
    return tf.reduce_mean(tf.cast(pixel_weights, logits.dtype) * cross_entropy, axis=[1, 2])
