"""Lipschitz bounds (§4.3) against dense matrices, Jacobians and brute force."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import spectral
from jaxadv.models import Layer, Model, apply_layer, get_model


def circular_conv_matrix(kernel: np.ndarray, hw: tuple[int, int], stride: int) -> np.ndarray:
    """Dense matrix of the strided circular cross-correlation, from its definition:
    z_d(q) = Σ_{c,u} x_c((q·Δ + u) mod n) w_{c,d}(u)."""
    k, _, c, d = kernel.shape
    h, w = hw
    mh, mw = h // stride, w // stride
    matrix = np.zeros((mh, mw, d, h, w, c))
    for q1 in range(mh):
        for q2 in range(mw):
            for u1 in range(k):
                for u2 in range(k):
                    p1, p2 = (q1 * stride + u1) % h, (q2 * stride + u2) % w
                    matrix[q1, q2, :, p1, p2, :] += kernel[u1, u2].T
    return matrix.reshape(mh * mw * d, h * w * c)


def layer_jacobian_norm(layer: Layer, params: dict, in_shape) -> float:
    """Exact operator norm of the real layer: the SVD of its full Jacobian."""
    jac = jax.jacfwd(lambda x: apply_layer(layer, params, x[None])[0])(jnp.zeros(in_shape))
    return float(np.linalg.norm(np.asarray(jac, np.float64).reshape(-1, math.prod(in_shape)), 2))


def conv_layer(rng, k, c, d, stride, padding):
    layer = Layer("conv", d, kernel=k, stride=stride, padding=padding)
    params = {"w": jnp.asarray(rng.normal(size=(k, k, c, d)), jnp.float32), "b": jnp.ones((d,), jnp.float32)}
    return layer, params


@pytest.mark.parametrize("stride, hw", [(1, (8, 8)), (2, (8, 8)), (2, (6, 10)), (3, (9, 6))])
def test_fourier_equals_dense_circular_matrix(stride, hw):
    rng = np.random.default_rng(stride)
    kernel = rng.normal(size=(3, 3, 2, 4)).astype(np.float32)
    expected = np.linalg.norm(circular_conv_matrix(kernel, hw, stride), 2)
    got = float(spectral.conv_operator_norm(kernel, hw, stride, "CIRCULAR"))
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("stride", [1, 2])
def test_fourier_bounds_zero_padded_layer_and_power_iteration_matches(padding, stride):
    rng = np.random.default_rng(10 * stride + len(padding))
    layer, params = conv_layer(rng, 3, 2, 3, stride, padding)
    in_shape = (9, 9, 2)
    exact = layer_jacobian_norm(layer, params, in_shape)
    fourier = float(spectral.conv_operator_norm(params["w"], in_shape[:2], stride, padding))
    power = float(spectral.layer_power_iteration(layer, params, in_shape, jax.random.PRNGKey(0), 400))
    assert fourier >= exact * (1 - 1e-5)
    assert power <= exact * (1 + 1e-5)
    assert power == pytest.approx(exact, rel=1e-3)


def test_input_size_circular_grid_can_underestimate_zero_padded_layer():
    # Why `fourier_grid` pads: the circular grid of the input size (n = 3) misses
    # the zero-padded layer's norm 2cos(π/7) for the difference kernel x[i] − x[i+1].
    kernel = np.zeros((2, 2, 1, 1), np.float32)
    kernel[0, 0], kernel[0, 1] = 1.0, -1.0
    layer = Layer("conv", 1, kernel=2, padding="SAME")
    params = {"w": jnp.asarray(kernel), "b": jnp.zeros((1,))}
    exact = layer_jacobian_norm(layer, params, (3, 3, 1))
    assert exact == pytest.approx(2 * math.cos(math.pi / 7), rel=1e-5)
    assert float(spectral.conv_operator_norm(kernel, (3, 3), 1, "CIRCULAR")) < exact - 0.05
    assert float(spectral.conv_operator_norm(kernel, (3, 3), 1, "SAME")) >= exact


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (784, 10)])
def test_dense_operator_norm_matches_svd(shape):
    w = jax.random.normal(jax.random.PRNGKey(sum(shape)), shape)
    assert float(spectral.dense_operator_norm(w)) == pytest.approx(float(jnp.linalg.norm(w, 2)), rel=1e-5)


def test_power_iteration_on_dense_layer():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(30, 12)) @ np.diag(np.linspace(1, 3, 12))   # well-separated top singular value
    layer = Layer("dense", 12)
    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.ones((12,))}
    power = float(spectral.layer_power_iteration(layer, params, (30,), jax.random.PRNGKey(1), 300))
    assert power == pytest.approx(np.linalg.norm(w, 2), rel=1e-4)


@pytest.mark.parametrize("window, stride, expected", [(2, 2, 1.0), (3, 2, 2.0), (3, 1, 3.0), (2, 3, 1.0)])
def test_max_pool_bound_is_reached(window, stride, expected):
    hw = (9, 9)
    assert spectral.max_pool_bound(hw, window, stride) == pytest.approx(expected)
    layer = Layer("maxpool", kernel=window, stride=stride)
    pool = lambda x: apply_layer(layer, {}, x[None])[0]
    # Move the input that is the maximum of every window covering it: the bound is tight.
    x = jnp.zeros((*hw, 1)).at[4, 4, 0].set(1.0)
    r = jnp.zeros_like(x).at[4, 4, 0].set(0.5)
    ratio = float(jnp.linalg.norm(pool(x + r) - pool(x)) / jnp.linalg.norm(r))
    assert ratio == pytest.approx(expected, rel=1e-6)
    # And no random perturbation exceeds it.
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    xs = jax.random.normal(keys[0], (200, *hw, 1))
    rs = 0.3 * jax.random.normal(keys[1], (200, *hw, 1))
    moved = jnp.linalg.norm((jax.vmap(pool)(xs + rs) - jax.vmap(pool)(xs)).reshape(200, -1), axis=1)
    assert bool(jnp.all(moved <= expected * jnp.linalg.norm(rs.reshape(200, -1), axis=1) + 1e-5))


def test_sigmoid_bound():
    xs = jnp.linspace(-6, 6, 1001)
    slopes = jax.vmap(jax.grad(jax.nn.sigmoid))(xs)
    assert float(jnp.max(slopes)) == pytest.approx(spectral.SIGMOID_BOUND, rel=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 0.75, 1.0])
def test_contrast_normalization_bound(gamma):
    epsilon = 0.3
    bound = spectral.contrast_normalization_bound(epsilon, gamma)
    normalize = lambda x: x / (epsilon + jnp.sum(x ** 2)) ** gamma
    jac_norm = lambda x: jnp.linalg.norm(jax.jacfwd(normalize)(x), 2)
    assert float(jac_norm(jnp.zeros(5))) == pytest.approx(bound, rel=1e-5)
    scales = jnp.logspace(-2, 2, 60)[:, None]
    xs = scales * jax.random.normal(jax.random.PRNGKey(0), (60, 5))
    assert float(jnp.max(jax.vmap(jac_norm)(xs))) <= bound * (1 + 1e-5)


def small_conv_model() -> Model:
    return Model("tiny", (
        Layer("conv", 3, kernel=3, stride=2, padding="SAME"), Layer("relu"),
        Layer("maxpool", kernel=3, stride=2), Layer("flatten"),
        Layer("dense", 6), Layer("sigmoid"), Layer("dense", 4)), input_shape=(11, 11, 2))


def test_layer_bounds_walk_bounds_the_network():
    model = small_conv_model()
    params = model.init(jax.random.PRNGKey(0))
    rows = spectral.layer_bounds(model, params, power_iterations=200, key=jax.random.PRNGKey(1))
    assert [r["layer"] for r in rows] == ["Conv. 1", "ReLU", "Max-pool", "Flatten", "FC. 1", "Sigmoid", "FC. 2"]
    assert rows[0]["shape"] == [2, 3, 3, 3] and rows[0]["stride"] == 2
    assert rows[4]["shape"] == [3 * 2 * 2, 6] and rows[4]["stride"] is None
    assert [r["upper_bound"] for r in rows[1:4]] == [1.0, 2.0, 1.0]
    assert rows[5]["upper_bound"] == 0.25
    for row, layer, p, shape in zip(rows, model.layers, params,
                                    (model.input_shape,) + model.output_shapes()[:-1]):
        if layer.has_params:
            assert row["power_iteration"] <= row["upper_bound"] * (1 + 1e-5)
            assert row["power_iteration"] == pytest.approx(layer_jacobian_norm(layer, p, shape), rel=1e-3)
        else:
            assert row["power_iteration"] is None
    bound = spectral.network_bound(model, params)
    assert bound == pytest.approx(math.prod(r["upper_bound"] for r in rows))
    # The whole network's Jacobian at random inputs never exceeds the product.
    logits = lambda x: model.apply(params, x[None])[0]
    xs = jax.random.normal(jax.random.PRNGKey(3), (8, *model.input_shape))
    jac_norms = jax.vmap(lambda x: jnp.linalg.norm(jax.jacfwd(logits)(x).reshape(4, -1), 2))(xs)
    assert float(jnp.max(jac_norms)) <= bound


def test_zoo_model_bounds_are_weight_norms_and_sigmoid_slopes():
    model = get_model("FC100-100-10")
    params = model.init(jax.random.PRNGKey(0))
    bounds = [r["upper_bound"] for r in spectral.layer_bounds(model, params)]
    expected = [np.linalg.norm(np.asarray(params[0]["w"]), 2), 0.25,
                np.linalg.norm(np.asarray(params[2]["w"]), 2), 0.25,
                np.linalg.norm(np.asarray(params[4]["w"]), 2)]
    np.testing.assert_allclose(bounds, expected, rtol=1e-5)


def test_certified_radius_is_below_exact_linear_distance():
    # For a linear classifier the exact L2 distance to the nearest decision
    # boundary is min_j (z_y − z_j) / ‖w_y − w_j‖: the certificate must not exceed it.
    model = get_model("FC10(1e-4)")
    params = model.init(jax.random.PRNGKey(4))
    x = jax.random.uniform(jax.random.PRNGKey(5), (64, 28, 28, 1))
    logits = model.apply(params, x)
    radius = spectral.certified_radius(logits, spectral.network_bound(model, params))
    w = np.asarray(params[0]["w"], np.float64)
    z = np.asarray(logits, np.float64)
    top = z.argmax(1)
    exact = np.array([min((z[i, top[i]] - z[i, j]) / np.linalg.norm(w[:, top[i]] - w[:, j])
                          for j in range(10) if j != top[i]) for i in range(64)])
    assert np.all(np.asarray(radius) <= exact * (1 + 1e-5))
    assert np.all(np.asarray(radius) > 0)


def test_certified_radius_formula():
    logits = jnp.array([[3.0, 1.0, 0.5], [0.0, 2.0, 2.0]])
    np.testing.assert_allclose(spectral.certified_radius(logits, 2.0), [2.0 / (2 * math.sqrt(2)), 0.0], rtol=1e-6)


def test_validation_names_the_argument():
    with pytest.raises(ValueError, match="kernel"):
        spectral.conv_operator_norm(jnp.zeros((3, 3, 2)), (8, 8))
    with pytest.raises(ValueError, match="stride"):
        spectral.conv_operator_norm(jnp.zeros((3, 3, 1, 1)), (8, 8), stride=0)
    with pytest.raises(ValueError, match="input_hw"):
        spectral.conv_operator_norm(jnp.zeros((3, 3, 1, 1)), (9, 8), stride=2)
    with pytest.raises(ValueError, match="padding"):
        spectral.conv_operator_norm(jnp.zeros((3, 3, 1, 1)), (8, 8), padding="REFLECT")
    with pytest.raises(ValueError, match="w must be a matrix"):
        spectral.dense_operator_norm(jnp.zeros(3))
    with pytest.raises(ValueError, match="gamma"):
        spectral.contrast_normalization_bound(1.0, 2.0)
    with pytest.raises(ValueError, match="key"):
        model = get_model("FC10(1)")
        spectral.layer_bounds(model, model.init(jax.random.PRNGKey(0)), power_iterations=5)
    with pytest.raises(ValueError, match="logits"):
        spectral.certified_radius(jnp.zeros(10), 1.0)
