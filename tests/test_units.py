"""Units of φ(x): top-k against a plain sort, directions, coherence statistics."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv.functional import split_sequential
from jaxadv.models import get_model, max_pool
from jaxadv.units import (
    layer_features, live_units, majority_label_share, mean_pairwise_cosine, natural_basis,
    permutation_test, random_unit_directions, top_k_images)


def test_top_k_matches_a_plain_sort():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(37, 6)).astype(np.float32)
    directions = np.concatenate([np.eye(6, dtype=np.float32)[[0, 4]], rng.normal(size=(3, 6)).astype(np.float32)])
    top = top_k_images(features, directions, k=5)
    for row, v in enumerate(directions):
        projections = features.astype(np.float64) @ v
        expected = np.argsort(-projections, kind="stable")[:5]
        np.testing.assert_array_equal(np.asarray(top.indices[row]), expected)
        np.testing.assert_allclose(np.asarray(top.scores[row]), projections[expected], rtol=1e-5, atol=1e-5)


def test_top_k_of_natural_basis_is_the_largest_unit_values():
    features = np.array([[0.1, 5.0], [0.9, -1.0], [0.5, 2.0], [0.7, 3.0]], np.float32)
    top = top_k_images(features, natural_basis(2, [0, 1]), k=2)
    np.testing.assert_array_equal(np.asarray(top.indices), [[1, 3], [0, 3]])


def test_top_k_accepts_a_single_direction_and_rejects_bad_shapes():
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert top_k_images(features, jnp.ones(3), k=2).indices.shape == (1, 2)
    with pytest.raises(ValueError, match="directions"):
        top_k_images(features, jnp.ones((2, 4)), k=2)
    with pytest.raises(ValueError, match="k must"):
        top_k_images(features, jnp.ones(3), k=5)


def test_random_unit_directions_are_unit_norm_seeded_and_isotropic():
    v = random_unit_directions(jax.random.PRNGKey(1), 2000, 5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(v), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(v, random_unit_directions(jax.random.PRNGKey(1), 2000, 5))
    # Uniform on the sphere: E[v vᵀ] = I / dim.
    second_moment = np.asarray(v).T @ np.asarray(v) / 2000
    np.testing.assert_allclose(second_moment, np.eye(5) / 5, atol=0.03)


def test_natural_basis_rejects_out_of_range_units():
    np.testing.assert_array_equal(natural_basis(3, [2]), [[0.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="units"):
        natural_basis(3, [3])


def test_layer_features_are_the_flattened_activations_in_any_chunking():
    model = get_model("ConvNet")
    params = model.init(jax.random.PRNGKey(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (7, 28, 28, 1))
    # The ConvNet by hand up to its second pool (layer 5), through flax's own layers.
    conv1, conv2 = model.module.layers[0], model.module.layers[3]
    h = conv1.apply({"params": params["params"]["layers_0"]}, images)
    h = max_pool(jax.nn.relu(h), 2, 2)
    h = max_pool(jax.nn.relu(conv2.apply({"params": params["params"]["layers_3"]}, h)), 2, 2)
    below, _ = split_sequential(model.module, 5)
    got = layer_features(below, images, params=params, batch_size=3)
    np.testing.assert_allclose(got, h.reshape(7, -1), rtol=1e-5, atol=1e-6)
    # Any function of the images is a feature map; one that drops the batch axis is named.
    np.testing.assert_array_equal(layer_features(lambda x: x[:, ::2], images), images[:, ::2].reshape(7, -1))
    with pytest.raises(ValueError, match="features_fn.*batch axis"):
        layer_features(lambda x: x.sum(0), images)
    with pytest.raises(TypeError, match="features_fn.*variables"):
        layer_features(model.module, images)


def test_live_units_drop_constant_units():
    features = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0]])
    np.testing.assert_array_equal(live_units(features), [1])


def test_majority_label_share_against_counting():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(20, 7))
    expected = [np.bincount(row, minlength=4).max() / 7 for row in labels]
    np.testing.assert_allclose(majority_label_share(labels, 4), expected, rtol=1e-6)


def test_mean_pairwise_cosine_against_brute_force():
    rng = np.random.default_rng(4)
    vectors = rng.normal(size=(3, 5, 2, 2))
    for group, result in zip(vectors, np.asarray(mean_pairwise_cosine(vectors))):
        flat = group.reshape(5, -1)
        cosines = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in itertools.combinations(flat, 2)]
        np.testing.assert_allclose(result, np.mean(cosines), rtol=1e-5)


def test_permutation_test_against_exact_enumeration():
    a, b = np.array([3.0, 4.0, 5.0]), np.array([0.0, 1.0, 2.0, 2.5])
    pooled = np.concatenate([a, b])
    observed = a.mean() - b.mean()
    splits = [np.array(s) for s in itertools.combinations(range(7), 3)]
    exact = np.mean([abs(pooled[s].mean() - np.delete(pooled, s).mean()) >= abs(observed) - 1e-12 for s in splits])
    difference, p = permutation_test(a, b, seed=0, num_permutations=20000)
    assert difference == pytest.approx(observed)
    assert p == pytest.approx(exact, abs=0.01)


def test_permutation_test_is_not_significant_for_one_distribution():
    rng = np.random.default_rng(5)
    _, p = permutation_test(rng.normal(size=50), rng.normal(size=50), seed=1, num_permutations=2000)
    _, p_shifted = permutation_test(rng.normal(size=50) + 2.0, rng.normal(size=50), seed=1, num_permutations=2000)
    assert p > 0.01 and p_shifted < 0.01


def test_direction_coherence_finds_a_planted_label_unit_and_matches_its_parts():
    """Unit 0 is 1 on class 0's images and 0 elsewhere (plus a little noise): its top-k are all class 0 (share 1);
    the groups and tests are the library's own parts applied by hand: top_k_images, majority_label_share,
    mean_pairwise_cosine and permutation_test."""
    from jaxadv.units import direction_coherence
    rng = np.random.default_rng(0)
    labels = (np.arange(60) % 3).astype(np.int32)
    images = rng.uniform(0, 1, (60, 4, 4, 1)).astype(np.float32)
    features = rng.normal(0, 0.01, (60, 5)).astype(np.float32)
    features[:, 0] += labels == 0
    features[:, 3] = 0.5                       # a dead unit: left out
    out = direction_coherence(features, images, labels, jax.random.PRNGKey(1), num_random=6, k=4, num_classes=3,
                              num_chance_subsets=50, num_permutations=99, shown_units=2)
    assert out["live_units"] == 4 and out["dim"] == 5 and len(out["natural"]["majority_share"]) == 4
    assert out["natural"]["majority_share"][0] == 1.0
    top = np.asarray(top_k_images(features, natural_basis(5, np.array([0, 1, 2, 4])), 4).indices)
    np.testing.assert_array_equal(out["natural"]["indices"], top)
    np.testing.assert_allclose(out["natural"]["pixel_cosine"], np.asarray(mean_pairwise_cosine(images[top])))
    diff, p = permutation_test(out["natural"]["majority_share"], out["random"]["majority_share"], seed=0,
                               num_permutations=99)
    assert out["tests"]["majority_share"]["natural_minus_random"] == diff
    assert out["tests"]["majority_share"]["p_natural_vs_random"] == p
    assert len(out["chance"]["majority_share"]) == 50 and set(out["shown_units"]) <= {0, 1, 2, 4}
