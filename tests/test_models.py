"""The zoo: output shapes, parameter counts (by hand), the paper's weight decay, layer access."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv.models import ALL_MODELS, ZOO, get_model, weight_decay_penalty

# Hand counts: dense in*out + out; conv k*k*cin*cout + cout (SAME padding keeps 28x28, pools halve).
HAND_COUNTS = {
    "FC10(1e-4)": 784 * 10 + 10,
    "FC10(1e-2)": 784 * 10 + 10,
    "FC10(1)": 784 * 10 + 10,
    "FC100-100-10": (784 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10),
    "FC200-200-10": (784 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10),
    "AE400-10": (784 * 400 + 400) + (400 * 10 + 10),
    "FC123-456-10": (784 * 123 + 123) + (123 * 456 + 456) + (456 * 10 + 10),
    "ConvNet": (3 * 3 * 1 * 16 + 16) + (3 * 3 * 16 * 32 + 32) + (7 * 7 * 32 * 100 + 100) + (100 * 10 + 10),
}


def test_zoo_names():
    assert ZOO == ("FC10(1e-4)", "FC10(1e-2)", "FC10(1)", "FC100-100-10", "FC200-200-10", "AE400-10")
    assert set(ALL_MODELS) == set(HAND_COUNTS)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape_and_parameter_count(name):
    model = get_model(name)
    params = model.init(jax.random.PRNGKey(0))
    logits = model.apply(params, jnp.zeros((3, 28, 28, 1), jnp.float32))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    counted = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    assert counted == HAND_COUNTS[name] == model.num_params()
    assert len(params) == len(model.layers)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["FC100-100-10", "ConvNet"])
def test_apply_from_and_activations_agree(name):
    model = get_model(name)
    params = model.init(jax.random.PRNGKey(1))
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 28, 28, 1))
    acts = model.activations(params, x)
    np.testing.assert_allclose(acts[-1], model.apply(params, x), rtol=1e-5, atol=1e-6)
    for i in model.hidden_layers():
        np.testing.assert_allclose(model.apply_from(params, acts[i], i + 1), acts[-1], rtol=1e-5, atol=1e-6)
    assert [a.shape[1:] for a in acts] == list(model.output_shapes())


def test_weight_decay_penalty_by_hand():
    model = get_model("FC100-100-10")  # λ = 1e-5, 1e-5, 1e-6 on layers of 100, 100, 10 units
    params = model.init(jax.random.PRNGKey(3))
    w = [np.asarray(p["w"], np.float64) for p in params if p]
    expected = 1e-5 * (w[0] ** 2).sum() / 100 + 1e-5 * (w[1] ** 2).sum() / 100 + 1e-6 * (w[2] ** 2).sum() / 10
    np.testing.assert_allclose(float(weight_decay_penalty(model, params)), expected, rtol=1e-5)


def test_frozen_encoder_is_not_decayed():
    model = get_model("AE400-10")
    assert not model.layers[0].trainable and model.pretrain == "sparse_autoencoder"
    params = model.init(jax.random.PRNGKey(4))
    expected = 1e-6 * float(jnp.sum(params[2]["w"] ** 2)) / 10
    np.testing.assert_allclose(float(weight_decay_penalty(model, params)), expected, rtol=1e-5)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'FC7'"):
        get_model("FC7")
