"""Units of φ(x) (§3): which held-out images maximise ⟨φ(x), v⟩ along a direction v.

The paper compares natural-basis directions v = e_i (a single unit) with random
directions and finds both give "semantically related" images. It reports no
number; `majority_label_share`, `mean_pairwise_cosine` and `permutation_test`
turn the comparison into one.

    below, _ = split_sequential(model.module, layer)           # φ: the network up to `layer`
    features = layer_features(below, images, params=variables)  # [N, n]
    directions = jnp.concatenate([natural_basis(n, units), random_unit_directions(key, 8, n)])
    top = top_k_images(features, directions, k=10)             # indices [D, k]
    share = majority_label_share(labels[top.indices], num_classes=10)

`layer_features` takes any model's φ the way every analysis takes a model
(`jaxadv.functional.logits_function`): a function of the images, a function
apply(params, x) with its params, or a flax module (e.g. one whose `__call__`
returns the hidden layer) with its variables. All functions are pure;
`top_k_images` handles a batch of directions at once.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import checks
from jaxadv.functional import failed_call

_PERMUTATION_BLOCK = 500


class TopK(NamedTuple):
    """For each direction (row): indices into the image set, and their projections ⟨φ(x), v⟩, best first."""
    indices: jax.Array   # int32 [D, k]
    scores: jax.Array    # float32 [D, k]


def layer_features(features_fn, images, *, params=None, batch_size: int = 2000) -> jax.Array:
    """φ(x) for every image, flattened to [N, n].

    features_fn: x [B, *image_shape] -> φ(x) [B, ...], with `params` if it is a flax module or a function
      apply(params, x) (see `jaxadv.functional.logits_function`).
    Computed in chunks of `batch_size` so that conv feature maps of the whole
    test set never sit in memory at once.
    """
    features_fn, _ = checks.model(features_fn, params, name="features_fn")
    images = jnp.asarray(checks.images(images, "images"), jnp.float32)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch = jax.ShapeDtypeStruct((2,) + images.shape[1:], images.dtype)
    try:
        out = jax.eval_shape(features_fn, batch)
    except Exception as error:    # noqa: BLE001 - the user's function: reported with the fix
        raise failed_call("features_fn", batch.shape, error) from error
    if getattr(out, "shape", (None,))[0] != 2:
        raise ValueError(f"features_fn: returned shape {getattr(out, 'shape', None)} for a batch of 2 images; "
                         "it must keep the batch axis (wrap a function of one image in jax.vmap)")
    chunks = [_flat_features(features_fn, images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return jnp.concatenate(chunks, axis=0)


@jax.jit
def _flat_features(features_fn, x):
    return features_fn(x).reshape(x.shape[0], -1)


def natural_basis(dim: int, units: Sequence[int]) -> jax.Array:
    """The natural basis vectors e_i for i in `units`, as rows: [len(units), dim]."""
    units = np.asarray(units, dtype=np.int64)
    if units.ndim != 1 or units.size == 0:
        raise ValueError("units must be a non-empty 1-D sequence of unit indices")
    if units.min() < 0 or units.max() >= dim:
        raise ValueError(f"units must lie in [0, {dim}), got min {units.min()} max {units.max()}")
    return jax.nn.one_hot(jnp.asarray(units), dim, dtype=jnp.float32)


def random_unit_directions(key: jax.Array, n: int, dim: int) -> jax.Array:
    """`n` directions drawn uniformly on the unit sphere of ℝ^dim (normalised Gaussians): [n, dim].

    The paper does not say how its random v was drawn; the uniform law on the
    sphere is the one that favours no basis.
    """
    if n < 1 or dim < 1:
        raise ValueError(f"n and dim must be positive, got n={n}, dim={dim}")
    v = jax.random.normal(key, (n, dim), jnp.float32)
    return v / jnp.linalg.norm(v, axis=1, keepdims=True)


@jax.jit
def _project(features, directions):
    return directions @ features.T            # [D, N]


def top_k_images(features, directions, k: int) -> TopK:
    """The `k` images with the largest ⟨φ(x), v⟩ for each row v of `directions`.

    features: [N, n] (from `layer_features`); directions: [D, n] or a single [n].
    Ties are broken towards the lower index (as `lax.top_k` does).
    """
    features = jnp.asarray(features, jnp.float32)
    directions = jnp.asarray(directions, jnp.float32)
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, n], got {features.shape}")
    if directions.ndim == 1:
        directions = directions[None]
    if directions.ndim != 2 or directions.shape[1] != features.shape[1]:
        raise ValueError(f"directions must have shape [D, {features.shape[1]}], got {directions.shape}")
    if not 1 <= k <= features.shape[0]:
        raise ValueError(f"k must lie in [1, {features.shape[0]}], got {k}")
    scores, indices = jax.lax.top_k(_project(features, directions), k)
    return TopK(indices.astype(jnp.int32), scores)


def live_units(features, tolerance: float = 0.0) -> np.ndarray:
    """Indices of the units whose activation varies over the image set.

    A unit constant over I (a dead ReLU) orders the images arbitrarily, so its
    "top-k" says nothing about the unit: such units are left out of the statistics.
    """
    features = np.asarray(features)
    spread = features.max(axis=0) - features.min(axis=0)
    return np.flatnonzero(spread > tolerance)


# -- coherence of a top-k set ------------------------------------------------

def majority_label_share(top_labels, num_classes: int) -> jax.Array:
    """Per row of `top_labels` ([D, k] int), the share of the most frequent label: in [1/k, 1]."""
    top_labels = jnp.asarray(top_labels)
    if top_labels.ndim != 2:
        raise ValueError(f"top_labels must have shape [D, k], got {top_labels.shape}")
    counts = jax.nn.one_hot(top_labels, num_classes, dtype=jnp.float32).sum(axis=1)   # [D, C]
    return counts.max(axis=1) / top_labels.shape[1]


def mean_pairwise_cosine(vectors) -> jax.Array:
    """Per group ([D, k, m]), the mean cosine similarity over the k(k-1)/2 distinct pairs."""
    vectors = jnp.asarray(vectors, jnp.float32)
    if vectors.ndim < 3:
        raise ValueError(f"vectors must have shape [D, k, ...] with k >= 2, got {vectors.shape}")
    v = vectors.reshape(vectors.shape[0], vectors.shape[1], -1)
    k = v.shape[1]
    if k < 2:
        raise ValueError("need at least two vectors per group for a pairwise similarity")
    unit = v / jnp.maximum(jnp.linalg.norm(v, axis=2, keepdims=True), 1e-12)
    gram = jnp.einsum("dim,djm->dij", unit, unit)
    off_diagonal = gram.sum(axis=(1, 2)) - jnp.trace(gram, axis1=1, axis2=2)
    return off_diagonal / (k * (k - 1))


def permutation_test(a, b, seed: int = 0, num_permutations: int = 10000) -> tuple[float, float]:
    """Two-sided permutation test for a difference of means between samples `a` and `b`.

    Returns (mean(a) - mean(b), p-value). The p-value counts the observed split
    among the permutations ((hits + 1) / (num_permutations + 1)), so it is never 0.
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError("permutation_test needs two non-empty samples a and b")
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be positive, got {num_permutations}")
    pooled = np.concatenate([a, b])
    observed = a.mean() - b.mean()
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, num_permutations, _PERMUTATION_BLOCK):   # blocks bound the memory
        rows = min(_PERMUTATION_BLOCK, num_permutations - start)
        shuffled = rng.permuted(np.broadcast_to(pooled, (rows, pooled.size)), axis=1)
        diffs = shuffled[:, :a.size].mean(axis=1) - shuffled[:, a.size:].mean(axis=1)
        hits += np.count_nonzero(np.abs(diffs) >= np.abs(observed) - 1e-12)
    return float(observed), float((hits + 1) / (num_permutations + 1))


# -- the whole comparison: single units against random directions and chance --------------------------

def direction_coherence(features, images, labels, key: jax.Array, *, num_random: int, k: int, seed: int = 0,
                        num_classes: int = 10, num_chance_subsets: int = 2000, num_permutations: int = 10000,
                        shown_units: int = 4) -> dict:
    """How coherent the top-k images of every live unit are, against random directions and random k-subsets.

    features [N, n] (φ of `images` [N, ...]), labels [N]. Per group ("natural": every live unit e_i, "random":
    `num_random` random unit directions, "chance": `num_chance_subsets` random k-subsets), each set's majority
    label share and mean pairwise pixel cosine; "tests": two-sided permutation tests between the groups;
    "shown_units": `shown_units` live units picked at random for a figure ("shown_rows": their rows of
    natural). The paper compared units with random directions by eye; this gives the numbers.
    """
    images = checks.images(images)
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != images.shape[0]:
        raise ValueError(f"features: expected [N, n] for the {images.shape[0]} images, got {features.shape}")
    labels = np.asarray(checks.labels(labels, images.shape[0], num_classes))
    k = checks.int_at_least(k, "k", 2)
    live = live_units(features)
    if live.size == 0:
        raise ValueError("features: every unit is constant on the images")
    random_key, chance_key, pick_key = jax.random.split(key, 3)
    groups = {"natural": _top_k_coherence(features, images, labels, natural_basis(features.shape[1], live), k,
                                          num_classes),
              "random": _top_k_coherence(features, images, labels,
                                         random_unit_directions(random_key, num_random, features.shape[1]), k,
                                         num_classes)}
    chance = np.stack([np.asarray(jax.random.choice(kk, len(labels), (k,), replace=False))
                       for kk in jax.random.split(chance_key, num_chance_subsets)])
    groups["chance"] = _coherence(images, labels, chance, num_classes)
    tests = {}
    for metric in ("majority_share", "pixel_cosine"):
        pairs = {"natural_minus_random": ("natural", "random", "p_natural_vs_random"),
                 "natural_minus_chance": ("natural", "chance", "p_natural_vs_chance"),
                 "random_minus_chance": ("random", "chance", "p_random_vs_chance")}
        tests[metric] = {}
        for difference, (a, b, p) in pairs.items():
            tests[metric][difference], tests[metric][p] = permutation_test(
                groups[a][metric], groups[b][metric], seed=seed, num_permutations=num_permutations)
    rows = np.sort(np.asarray(jax.random.choice(pick_key, live.size, (min(shown_units, live.size),), replace=False)))
    return {"dim": features.shape[1], "live_units": int(live.size), **groups, "tests": tests,
            "shown_rows": [int(i) for i in rows], "shown_units": [int(live[i]) for i in rows]}


def _top_k_coherence(features, images, labels, directions, k, num_classes):
    indices = np.asarray(top_k_images(features, directions, k).indices)
    return {"indices": indices, **_coherence(images, labels, indices, num_classes)}


def _coherence(images, labels, indices, num_classes):
    return {"majority_share": np.asarray(majority_label_share(labels[indices], num_classes)),
            "pixel_cosine": np.asarray(mean_pairwise_cosine(np.asarray(images)[indices]))}
