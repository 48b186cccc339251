"""Adversarial training: the pool, per-layer examples touching only the layers above, the loop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxadv.adversarial_training import (
    INPUT, AdversarialTrainingConfig, Examples, adversarial_train, dropout_layers, epoch_batches, forward, logits_above,
    fresh_adversarial_examples, init_pool, num_replaced, pool_loss, refresh_pool, representation_bounds,
    training_loss)
from jaxadv.functional import apply_layers
from jaxadv.models import flatten, get_model

#: Layers: 0 flatten, 1 dense, 2 sigmoid, 3 dense, 4 sigmoid, 5 dense; hidden representations 2 and 4.
TINY = nn.Sequential((flatten, nn.Dense(6), nn.sigmoid, nn.Dense(5), nn.sigmoid, nn.Dense(3)))
DENSE = (1, 3, 5)


def _init(key, module=TINY):
    return module.init(key, jnp.zeros((1, 2, 2, 1)))


def _examples(key, n, shape=(4,), offset=0.0):
    return Examples(jax.random.uniform(key, (n, *shape)) + offset, jnp.arange(n, dtype=jnp.int32) % 3)


def test_refresh_keeps_size_and_mixes_old_and_new():
    pool = init_pool(_examples(jax.random.PRNGKey(0), 40))
    fresh = _examples(jax.random.PRNGKey(1), 15, offset=10.0)   # fresh inputs are >= 10, old ones < 1
    new = refresh_pool(pool, jax.random.PRNGKey(2), fresh, fraction=0.25)
    assert new.inputs.shape == pool.inputs.shape and new.labels.shape == (40,)
    is_fresh = np.asarray(new.inputs[:, 0] >= 10.0)
    assert is_fresh.sum() == num_replaced(40, 0.25) == 10
    np.testing.assert_array_equal(np.asarray(new.born), is_fresh.astype(np.int32))
    # Kept entries are untouched; replaced ones are the first fresh examples, each once.
    np.testing.assert_array_equal(new.inputs[~is_fresh], pool.inputs[~is_fresh])
    fresh_rows = {tuple(np.asarray(r)) for r in new.inputs[is_fresh]}
    assert fresh_rows == {tuple(np.asarray(r)) for r in fresh.inputs[:10]}
    assert int(new.refreshes) == 1


def test_repeated_refreshes_pick_different_slots_and_age_the_pool():
    pool = init_pool(_examples(jax.random.PRNGKey(0), 100))
    for r in range(1, 4):
        pool = refresh_pool(pool, jax.random.PRNGKey(10 + r), _examples(jax.random.PRNGKey(r), 30, offset=r), 0.3)
    born = np.asarray(pool.born)
    assert set(np.unique(born)) == {0, 1, 2, 3}          # old and new coexist
    assert (born == 3).sum() == 30
    assert int(pool.refreshes) == 3


def test_refresh_rejects_too_few_fresh_examples_and_bad_fraction():
    pool = init_pool(_examples(jax.random.PRNGKey(0), 10))
    with pytest.raises(ValueError, match="fresh"):
        refresh_pool(pool, jax.random.PRNGKey(1), _examples(jax.random.PRNGKey(1), 2), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        refresh_pool(pool, jax.random.PRNGKey(1), _examples(jax.random.PRNGKey(1), 10), 0.0)


@pytest.mark.parametrize("layer", [INPUT, 2, 4])
def test_pool_gradient_reaches_only_the_layers_above(layer):
    params = _init(jax.random.PRNGKey(0))
    h = jax.random.uniform(jax.random.PRNGKey(1), (8, *{INPUT: (2, 2, 1), 2: (6,), 4: (5,)}[layer]))
    examples = Examples(h, jnp.arange(8, dtype=jnp.int32) % 3)
    grads = jax.grad(lambda p: pool_loss(TINY, p, layer, examples))(params)
    for index in DENSE:
        for leaf in jax.tree.leaves(grads["params"][f"layers_{index}"]):
            if index <= layer:
                assert np.all(np.asarray(leaf) == 0.0), f"layer {index} got a gradient from pool {layer}"
            else:
                assert np.any(np.asarray(leaf) != 0.0), f"layer {index} got no gradient from pool {layer}"


def test_an_optimiser_step_on_a_hidden_pool_leaves_the_lower_layers_unchanged():
    params = _init(jax.random.PRNGKey(0))
    examples = Examples(jax.random.uniform(jax.random.PRNGKey(1), (8, 5)), jnp.arange(8, dtype=jnp.int32) % 3)
    optimizer = optax.adam(1e-2)
    grads = jax.grad(lambda p: pool_loss(TINY, p, 4, examples))(params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    for name in ("layers_1", "layers_3"):
        for a, b in zip(jax.tree.leaves(params["params"][name]), jax.tree.leaves(new["params"][name])):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(params["params"]["layers_5"]["kernel"], new["params"]["layers_5"]["kernel"])


def _decay(params):
    return 0.3 * jnp.sum(params["params"]["layers_1"]["kernel"] ** 2) / 6


def test_training_loss_is_the_example_weighted_mean_plus_the_penalty():
    model = nn.Sequential((flatten, nn.Dense(6), nn.sigmoid, nn.Dense(3)))
    params = _init(jax.random.PRNGKey(0), model)
    clean = Examples(jax.random.uniform(jax.random.PRNGKey(1), (6, 2, 2, 1)), jnp.arange(6, dtype=jnp.int32) % 3)
    hidden = Examples(jax.random.uniform(jax.random.PRNGKey(2), (2, 6)), jnp.array([1, 2], jnp.int32))
    logits = np.concatenate([model.apply(params, clean.inputs), apply_layers(model, params, hidden.inputs, 3)])
    targets = np.concatenate([clean.labels, hidden.labels])
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    cross_entropy = -log_softmax[np.arange(8), targets].mean()
    decay = 0.3 * np.sum(np.asarray(params["params"]["layers_1"]["kernel"]) ** 2) / 6
    got = training_loss(model, params, clean, ((2, hidden),), jax.random.PRNGKey(3), penalty=_decay)
    np.testing.assert_allclose(got, cross_entropy + decay, rtol=1e-5)


def test_dropout_masks_hidden_units_and_is_off_without_a_key():
    params = _init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (64, 2, 2, 1))
    assert dropout_layers(TINY) == (2, 4)
    assert dropout_layers(get_model("ConvNet").module) == (2, 5, 8)
    np.testing.assert_array_equal(forward(TINY, params, x), TINY.apply(params, x))
    dropped = forward(TINY, params, x, key=jax.random.PRNGKey(2), dropout_rate=0.5)
    assert not np.allclose(dropped, TINY.apply(params, x))
    # Inverted dropout keeps the mean of a linear read-out: average over many masks.
    one = jnp.ones((1, 2, 2, 1))
    linear_head = lambda key: forward(TINY, params, jnp.broadcast_to(one, (4000, 2, 2, 1)), key=key, dropout_rate=0.5)
    np.testing.assert_allclose(linear_head(jax.random.PRNGKey(4)).mean(0), TINY.apply(params, one)[0], atol=0.05)


def test_representation_bounds():
    model = get_model("ConvNet").module
    assert representation_bounds(model, INPUT) == (0.0, 1.0)
    assert representation_bounds(TINY, 2) == (0.0, 1.0)
    assert representation_bounds(model, 1) == (0.0, float("inf"))
    assert representation_bounds(model, 0) == (-float("inf"), float("inf"))


def test_epoch_batches_visit_each_example_once_per_epoch():
    batches = epoch_batches(jax.random.PRNGKey(0), 50, 8, epochs=3)
    assert batches.shape == (18, 8)
    for epoch in batches.reshape(3, 48):
        assert len(set(epoch.tolist())) == 48


@jax.jit
def _gradient_sign_step(logits_fn, inputs, labels, lower, upper):
    loss = lambda z: optax.softmax_cross_entropy_with_integer_labels(logits_fn(z), labels).sum()
    adversarial = jnp.clip(inputs + 0.05 * jnp.sign(jax.grad(loss)(inputs)), lower, upper)
    return adversarial, jnp.argmax(logits_fn(adversarial), -1) != labels


def _gradient_sign_attack(logits_fn, inputs, labels, key, lower, upper):
    """A cheap stand-in attack: one signed gradient step away from the true label, clipped to the box.

    `logits_fn` is a `jax.tree_util.Partial`, so it passes through jit as an argument and one
    compilation per shape serves every refresh.
    """
    return _gradient_sign_step(logits_fn, inputs, labels, lower, upper)


def test_fresh_examples_live_in_the_representation_box():
    params = _init(jax.random.PRNGKey(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (10, 2, 2, 1))
    labels = jnp.arange(10, dtype=jnp.int32) % 3
    fresh, success = fresh_adversarial_examples(TINY, params, 2, images, labels, jax.random.PRNGKey(2),
                                                _gradient_sign_attack)
    assert fresh.inputs.shape == (10, 6) and success.shape == (10,)
    assert float(fresh.inputs.min()) >= 0.0 and float(fresh.inputs.max()) <= 1.0
    clean_h = apply_layers(TINY, params, images, 0, 3)
    assert not np.allclose(fresh.inputs, clean_h)


def test_adversarial_train_runs_fills_and_refreshes_pools_and_learns():
    key = jax.random.PRNGKey(0)
    images = jax.random.uniform(key, (240, 2, 2, 1))
    labels = (images[:, 0, 0, 0] > 0.5).astype(jnp.int32) + (images[:, 0, 1, 0] > 0.5)   # majority share 1/2
    config = AdversarialTrainingConfig(epochs=12, batch_size=16, learning_rate=1e-1, pool_layers=(INPUT, 2, 4),
                                       pool_size=40, pool_batch_size=8, refresh_every=60, refresh_fraction=0.25)
    calls = []

    def attack(logits_fn, inputs, labels, key, lower, upper):
        calls.append(inputs.shape)
        return _gradient_sign_attack(logits_fn, inputs, labels, key, lower, upper)

    error = lambda p: {"error": float(jnp.mean(jnp.argmax(TINY.apply(p, images), -1) != labels))}   # noqa: E731
    params, history = adversarial_train(TINY, images, labels, jax.random.PRNGKey(1), config, attack, error)
    assert len(history) == 3 and history[-1]["step"] == 180
    # The first refresh fills each pool (40 per layer) in batches of 10, the next replaces 10 per layer.
    assert calls == [(10, 2, 2, 1)] * 4 + [(10, 6)] * 4 + [(10, 5)] * 4 + [(10, 2, 2, 1), (10, 6), (10, 5)]
    assert "fresh_success_rate" not in history[0] and set(history[1]["fresh_success_rate"]) == {"-1", "2", "4"}
    assert history[-1]["error"] < 0.35, history   # the majority class alone errs on half


def test_adversarial_train_validates_its_config():
    images, labels = jnp.zeros((10, 2, 2, 1)), jnp.zeros(10, jnp.int32)
    with pytest.raises(ValueError, match="make_adversarial"):
        adversarial_train(TINY, images, labels, jax.random.PRNGKey(0), AdversarialTrainingConfig(pool_layers=(2,), batch_size=5))
    with pytest.raises(ValueError, match="pool_layers"):
        adversarial_train(TINY, images, labels, jax.random.PRNGKey(0), AdversarialTrainingConfig(pool_layers=(5,), batch_size=5))
    with pytest.raises(ValueError, match="dropout_rate"):
        adversarial_train(TINY, images, labels, jax.random.PRNGKey(0), AdversarialTrainingConfig(dropout_rate=1.0, batch_size=5))


def test_adversarial_train_takes_any_model_at_the_input():
    """A plain function apply(params, x) with its params: input pools work, hidden pools are refused by name."""
    images = jax.random.uniform(jax.random.PRNGKey(0), (64, 2, 2, 1))
    labels = (images[:, 0, 0, 0] > 0.5).astype(jnp.int32)
    apply = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"] + p["b"]   # noqa: E731
    params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(2)}
    config = AdversarialTrainingConfig(epochs=3, batch_size=16, learning_rate=1e-1, pool_layers=(INPUT,), pool_size=16,
                                       pool_batch_size=4, refresh_every=4, refresh_fraction=0.5)
    trained, history = adversarial_train(apply, images, labels, jax.random.PRNGKey(1), config, _gradient_sign_attack,
                                         params=params)
    assert history[-1]["step"] == 12 and not np.allclose(trained["w"], 0.0)
    with pytest.raises(TypeError, match="nn.Sequential"):
        adversarial_train(apply, images, labels, jax.random.PRNGKey(1), config._replace(pool_layers=(2,)),
                          _gradient_sign_attack, params=params)
    with pytest.raises(TypeError, match="params"):
        adversarial_train(apply, images, labels, jax.random.PRNGKey(1), config, _gradient_sign_attack)


def test_logits_above_is_the_head_and_hashes_by_value():
    params = _init(jax.random.PRNGKey(0))
    h = jax.random.uniform(jax.random.PRNGKey(1), (4, 5))
    f, g = logits_above(TINY, params, 4), logits_above(TINY, _init(jax.random.PRNGKey(2)), 4)
    np.testing.assert_array_equal(f(h), apply_layers(TINY, params, h, 5))
    # Same static part, different parameters: one compiled program serves both.
    assert jax.tree.structure(f) == jax.tree.structure(g)


def test_a_sequential_written_with_a_list_trains_and_its_frozen_layers_stay():
    """nn.Sequential([...]) is how flax's docs write one; frozen names (AE400-10's encoder) are never moved."""
    module = nn.Sequential([flatten, nn.Dense(6), nn.sigmoid, nn.Dense(3)])
    images = jax.random.uniform(jax.random.PRNGKey(0), (64, 2, 2, 1))
    labels = (images[:, 0, 0, 0] > 0.5).astype(jnp.int32)
    config = AdversarialTrainingConfig(epochs=2, batch_size=16, learning_rate=1e-1, pool_layers=(INPUT, 2),
                                       pool_size=16, pool_batch_size=4, refresh_every=4, refresh_fraction=0.5)
    start = _init(jax.random.PRNGKey(1), module)
    trained, _ = adversarial_train(module, images, labels, jax.random.PRNGKey(2), config, _gradient_sign_attack,
                                   params=lambda key: start, frozen=("layers_1",))
    np.testing.assert_array_equal(trained["params"]["layers_1"]["kernel"], start["params"]["layers_1"]["kernel"])
    assert not np.allclose(trained["params"]["layers_3"]["kernel"], start["params"]["layers_3"]["kernel"])
    with pytest.raises(ValueError, match="frozen: no parameters named"):
        adversarial_train(module, images, labels, jax.random.PRNGKey(2), config, _gradient_sign_attack,
                          params=start, frozen=("layers_9",))
