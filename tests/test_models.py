"""The zoo in flax: output shapes, parameter counts (by hand), the paper's weight decay, cuts at hidden layers."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


from jaxadv.functional import INPUT, hidden_layers, split_sequential
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
    variables = model.init(jax.random.PRNGKey(0))
    logits = model.module.apply(variables, jnp.zeros((3, 28, 28, 1), jnp.float32))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    counted = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables))
    assert counted == HAND_COUNTS[name] == model.num_params()
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    # The recipe names real layers: every decayed or frozen name holds a kernel.
    assert set(model.weight_decay) | set(model.frozen) <= set(variables["params"])


def test_get_model_returns_one_object_per_name():
    """`model.apply` is then one function: analyses compiled for it are reused."""
    assert get_model("FC100-100-10") is get_model("FC100-100-10")
    assert hash(get_model("ConvNet").module) == hash(get_model("ConvNet").module)


@pytest.mark.parametrize("name", ["FC100-100-10", "ConvNet"])
def test_the_network_cut_at_each_hidden_layer_composes_to_the_whole(name):
    model = get_model(name)
    variables = model.init(jax.random.PRNGKey(1))
    x = jax.random.uniform(jax.random.PRNGKey(2), (4, 28, 28, 1))
    logits = model.module.apply(variables, x)
    layers = hidden_layers(model.module)
    assert layers == {"FC100-100-10": (2, 4), "ConvNet": (1, 2, 4, 5, 8)}[name]
    for layer in (INPUT,) + layers:
        below, above = split_sequential(model.module, layer)
        np.testing.assert_allclose(above(variables, below(variables, x)), logits, rtol=1e-5, atol=1e-6)


def test_weight_decay_penalty_by_hand():
    model = get_model("FC100-100-10")  # λ = 1e-5, 1e-5, 1e-6 on layers of 100, 100, 10 units
    variables = model.init(jax.random.PRNGKey(3))
    w = [np.asarray(variables["params"][f"layers_{i}"]["kernel"], np.float64) for i in (1, 3, 5)]
    expected = 1e-5 * (w[0] ** 2).sum() / 100 + 1e-5 * (w[1] ** 2).sum() / 100 + 1e-6 * (w[2] ** 2).sum() / 10
    np.testing.assert_allclose(float(weight_decay_penalty(model, variables)), expected, rtol=1e-5)


def test_frozen_encoder_is_not_decayed():
    model = get_model("AE400-10")
    assert model.frozen == ("layers_1",) and model.pretrain == "sparse_autoencoder"
    variables = model.init(jax.random.PRNGKey(4))
    expected = 1e-6 * float(jnp.sum(variables["params"]["layers_3"]["kernel"] ** 2)) / 10
    np.testing.assert_allclose(float(weight_decay_penalty(model, variables)), expected, rtol=1e-5)


def test_the_convnets_matmul_convolution_is_flax_nn_conv():
    """The zoo's ConvNet is nn.Conv with its convolution computed as a matmul: same values and gradients."""
    from jaxadv.models import conv_general_dilated_as_matmul
    x = jax.random.uniform(jax.random.PRNGKey(5), (3, 14, 14, 4))
    plain = nn.Conv(6, (3, 3), padding="SAME")
    fast = nn.Conv(6, (3, 3), padding="SAME", conv_general_dilated=conv_general_dilated_as_matmul)
    variables = plain.init(jax.random.PRNGKey(6), x)
    np.testing.assert_allclose(fast.apply(variables, x), plain.apply(variables, x), rtol=1e-5, atol=1e-5)
    loss = lambda m: lambda v: jnp.sum(jnp.sin(m.apply(v, x)))   # noqa: E731
    for a, b in zip(jax.tree.leaves(jax.grad(loss(fast))(variables)), jax.tree.leaves(jax.grad(loss(plain))(variables))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # Dilation and groups are passed on to XLA's convolution, not dropped.
    grouped = nn.Conv(6, (3, 3), feature_group_count=2, kernel_dilation=2, conv_general_dilated=conv_general_dilated_as_matmul)
    reference = nn.Conv(6, (3, 3), feature_group_count=2, kernel_dilation=2)
    variables = reference.init(jax.random.PRNGKey(7), x)
    np.testing.assert_allclose(grouped.apply(variables, x), reference.apply(variables, x), rtol=1e-5, atol=1e-5)


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
