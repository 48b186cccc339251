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


@pytest.mark.parametrize("size,kernel,stride,padding,channels", [
    (28, 3, 1, "SAME", (1, 16)), (14, 3, 1, "SAME", (16, 32)), (13, 5, 2, "SAME", (3, 4)),
    (12, 4, 2, "SAME", (2, 3)), (11, 3, 2, "VALID", (2, 5)), (27, 11, 4, "VALID", (3, 6)), (9, 1, 3, "SAME", (4, 2))])
def test_conv2d_as_a_matmul_equals_xla_convolution(size, kernel, stride, padding, channels):
    from jaxadv.models import conv2d
    k1, k2 = jax.random.split(jax.random.PRNGKey(size * kernel + stride))
    x = jax.random.normal(k1, (2, size, size + 1, channels[0]))
    w = jax.random.normal(k2, (kernel, kernel) + channels)
    reference = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = conv2d(x, w, stride, padding)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    # The gradients too (they are what training runs): against the convolution's, through a fixed cotangent.
    cotangent = jax.random.normal(jax.random.PRNGKey(7), reference.shape)
    ours_grads = jax.grad(lambda x, w: jnp.vdot(conv2d(x, w, stride, padding), cotangent), (0, 1))(x, w)
    reference_grads = jax.grad(lambda x, w: jnp.vdot(jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")), cotangent), (0, 1))(x, w)
    for a, b in zip(ours_grads, reference_grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,window,stride", [(28, 2, 2), (15, 3, 3), (13, 3, 2)])
def test_max_pool_equals_reduce_window_with_its_gradient(size, window, stride):
    from jaxadv.models import max_pool
    x = jax.random.normal(jax.random.PRNGKey(size), (2, size, size, 3))   # no ties
    reference = lambda h: jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, window, window, 1),
                                                (1, stride, stride, 1), "VALID")
    np.testing.assert_array_equal(max_pool(x, window, stride), reference(x))
    cotangent = jax.random.normal(jax.random.PRNGKey(1), reference(x).shape)
    np.testing.assert_array_equal(jax.grad(lambda h: jnp.vdot(max_pool(h, window, stride), cotangent))(x),
                                  jax.grad(lambda h: jnp.vdot(reference(h), cotangent))(x))
