"""A user's flax CNN, defined only here, through every analysis: attack, sweep, transfer, bounds, units, training.

The model has what the zoo lacks: a strided convolution, average pooling, a compact module (not a Sequential).
Each analysis is checked against an independent reference, not only run.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxadv import logits_function
from jaxadv.adversarial_training import INPUT, AdversarialTrainingConfig, adversarial_train
from jaxadv.attacks import ATTACK_LBFGS, AttackConfig, SearchConfig, attack_dataset, lbfgs_attack, lbfgs_attack_untargeted, random_wrong_targets
from jaxadv.functional import LastDenseInput
from jaxadv.lipschitz import operator_bounds
from jaxadv.spectral import certified_radius
from jaxadv.transfer import error_rate_matrix
from jaxadv.units import layer_features, natural_basis, top_k_images

#: A cheaper attack than the default (the minimality of the attack is tested elsewhere).
QUICK = AttackConfig(search=SearchConfig(max_bracket_steps=4, bisection_steps=2),
                     lbfgs=ATTACK_LBFGS._replace(max_iterations=40))


class UserCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME")(x))     # 12 -> 6
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))                          # 6 -> 3
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def trained():
    """UserCNN fitted briefly to a synthetic 4-class problem (the brightest quadrant), with its data."""
    key = jax.random.PRNGKey(0)
    images = jax.random.uniform(key, (400, 12, 12, 1)) * 0.5
    labels = jax.random.randint(jax.random.PRNGKey(1), (400,), 0, 4)
    rows, cols = (labels // 2) * 6, (labels % 2) * 6
    bright = (jnp.arange(12)[None, :, None] >= rows[:, None, None]) & (jnp.arange(12)[None, :, None] < rows[:, None, None] + 6)
    bright &= (jnp.arange(12)[None, None, :] >= cols[:, None, None]) & (jnp.arange(12)[None, None, :] < cols[:, None, None] + 6)
    images = jnp.clip(images + 0.4 * bright[..., None], 0.0, 1.0)
    model = UserCNN()
    variables = model.init(jax.random.PRNGKey(2), images[:1])
    optimizer = optax.adam(3e-2)
    loss = lambda v: optax.softmax_cross_entropy_with_integer_labels(model.apply(v, images), labels).mean()  # noqa

    @jax.jit
    def step(v, state):
        grads = jax.grad(loss)(v)
        updates, state = optimizer.update(grads, state, v)
        return optax.apply_updates(v, updates), state

    state = optimizer.init(variables)
    for _ in range(60):
        variables, state = step(variables, state)
    accuracy = float(jnp.mean(jnp.argmax(model.apply(variables, images), -1) == labels))
    assert accuracy > 0.9, accuracy
    return model, variables, np.asarray(images), np.asarray(labels, np.int32)


def test_the_attack_takes_the_module_and_its_variables(trained):
    model, variables, images, labels = trained
    x, y = images[:40], labels[:40]
    result = lbfgs_attack_untargeted(model, x, y, QUICK, params=variables)
    adversarial = np.asarray(result.adversarial)
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    predicted = np.argmax(np.asarray(model.apply(variables, adversarial)), -1)
    np.testing.assert_array_equal(np.asarray(result.success), predicted != y)       # success is recomputed
    assert np.mean(np.asarray(result.success)) > 0.9
    # The same attack through a plain function and its params: the same answers, bit for bit.
    apply = lambda v, x: UserCNN().apply(v, x)   # noqa: E731
    again = lbfgs_attack_untargeted(apply, x, y, QUICK, params=variables)
    np.testing.assert_array_equal(np.asarray(again.adversarial), adversarial)


def test_the_sweep_of_a_data_set_resumes_and_matches_the_batch_attack(trained, tmp_path):
    model, variables, images, labels = trained
    x, y = images[:80], labels[:80]                         # more images than the CPU's 32 lanes
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(3), y, 4), np.int32)
    logits_fn = logits_function(model, variables)
    swept = attack_dataset(logits_fn, x, targets, tmp_path / "sweep", QUICK, chunk_size=40, block_size=20,
                           progress=False)
    direct = lbfgs_attack(logits_fn, x, targets, QUICK._replace(lanes=32))
    np.testing.assert_array_equal(swept["success"], np.asarray(direct.success))
    np.testing.assert_allclose(swept["l2"], np.asarray(direct.l2), rtol=1e-5, atol=1e-6)
    resumed = attack_dataset(logits_fn, x, targets, tmp_path / "sweep", QUICK, chunk_size=40, block_size=20,
                             progress=False)
    for field in swept:
        np.testing.assert_array_equal(resumed[field], swept[field])


def test_transfer_counts_what_each_model_gets_wrong(trained):
    model, variables, images, labels = trained
    other = jax.tree.map(lambda w: w * 0.5, variables)      # a second model: the same net, halved weights
    fns = [logits_function(model, variables), logits_function(model, other)]
    sets = [images[:50], np.clip(images[50:120] + 0.2, 0, 1)]
    truths = [labels[:50], labels[50:120]]
    rates = error_rate_matrix(fns, sets, truths, batch_size=16)
    # The same through (module, variables) pairs, the way every analysis takes a model.
    np.testing.assert_array_equal(error_rate_matrix([(model, variables), (model, other)], sets, truths, 16), rates)
    for s, (x, y) in enumerate(zip(sets, truths)):
        for m, v in enumerate((variables, other)):
            wrong = [int(np.argmax(np.asarray(model.apply(v, image[None]))[0]) != label) for image, label in zip(x, y)]
            assert rates[s, m] == pytest.approx(np.mean(wrong))


def test_bounds_hold_against_the_jacobian_and_radii_are_certified(trained):
    model, variables, images, labels = trained
    logits_fn = logits_function(model, variables)
    bounds = operator_bounds(model, images[:1], power_iterations=50, key=jax.random.PRNGKey(4), params=variables)
    kinds = [row["kind"] for row in bounds.rows]
    assert "conv" in kinds and "avgpool" in kinds and "dense" in kinds, kinds
    for row in bounds.rows:
        if row["power_iteration"] is not None:
            assert row["power_iteration"] <= row["upper_bound"] * (1 + 1e-4), row
    # The network bound holds where it can be checked exactly: the Jacobian's norm at any input.
    for x in images[:5]:
        jacobian = jax.jacobian(lambda z: logits_fn(z[None])[0])(jnp.asarray(x)).reshape(4, -1)
        assert np.linalg.norm(np.asarray(jacobian, np.float64), 2) <= bounds.network_bound * (1 + 1e-5)
    logits = logits_fn(images[:40])
    paper = np.asarray(certified_radius(logits, bounds.network_bound))
    pairwise = np.asarray(bounds.pairwise_certified_radius(logits))
    assert np.all(pairwise >= paper * (1 - 1e-5))
    # Certified: no perturbation found inside the radius changes the prediction (the attack's smallest one).
    result = lbfgs_attack_untargeted(logits_fn, images[:40], np.argmax(np.asarray(logits), -1).astype(np.int32),
                                     QUICK)
    found = np.asarray(result.l2)[np.asarray(result.success)]
    assert np.all(found >= pairwise[np.asarray(result.success)] * (1 - 1e-4))


def test_units_read_the_last_feature_layer(trained):
    model, variables, images, labels = trained
    features = layer_features(LastDenseInput(model), images, params=variables, batch_size=64)
    # By hand, through flax's own layers: conv, ReLU, average pool, flatten.
    params = variables["params"]
    h = nn.relu(nn.Conv(6, (3, 3), strides=2, padding="SAME").apply({"params": params["Conv_0"]}, images))
    h = nn.avg_pool(h, (2, 2), strides=(2, 2)).reshape(len(images), -1)
    np.testing.assert_allclose(features, h, rtol=1e-5, atol=1e-6)
    top = top_k_images(features, natural_basis(features.shape[1], [0, 5]), k=7)
    for unit, indices in zip((0, 5), np.asarray(top.indices)):
        np.testing.assert_array_equal(np.sort(indices), np.sort(np.argsort(-np.asarray(h[:, unit]), kind="stable")[:7]))


def test_adversarial_training_of_the_users_model_at_its_input(trained):
    model, variables, images, labels = trained

    def attack(logits_fn, inputs, labels, key, lower, upper):
        result = lbfgs_attack(logits_fn, inputs, random_wrong_targets(key, labels, 4), QUICK, lower, upper)
        return result.adversarial, result.success

    config = AdversarialTrainingConfig(epochs=1, batch_size=40, pool_layers=(INPUT,), pool_size=20,
                                       pool_batch_size=8, refresh_every=5, refresh_fraction=0.5)
    params, history = adversarial_train(model, images, labels, jax.random.PRNGKey(5), config, attack,
                                        params=variables)
    assert history[-1]["step"] == 10 and "fresh_success_rate" in history[1]
    assert not np.allclose(params["params"]["Dense_0"]["kernel"], variables["params"]["Dense_0"]["kernel"])
    with pytest.raises(TypeError, match="nn.Sequential"):
        adversarial_train(model, images, labels, jax.random.PRNGKey(5), config._replace(pool_layers=(1,)), attack,
                          params=variables)
