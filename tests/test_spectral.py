"""The operator norms of §4.3 (jaxadv.spectral) against dense matrices, Jacobians and brute force.

The traced bounds of whole networks are tested in tests/test_lipschitz.py.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import spectral


def circular_conv_matrix(kernel: np.ndarray, hw: tuple[int, int], stride: int) -> np.ndarray:
    """Dense matrix of the strided circular cross-correlation, from its definition:
    z_d(q) = Σ_{c,u} x_c((q·Δ + u) mod n) w_{c,d}(u)."""
    return circular_conv_matrix_rect(kernel, hw, stride)


def jacobian_norm(linear_fn, in_shape) -> float:
    """Exact operator norm of a linear map: the SVD of its full Jacobian."""
    jac = jax.jacfwd(linear_fn)(jnp.zeros(in_shape))
    return float(np.linalg.norm(np.asarray(jac, np.float64).reshape(-1, math.prod(in_shape)), 2))


def conv_layer(kernel, stride, padding):
    """The real layer's linear part, one NHWC image [H, W, C] at a time."""
    conv = functools.partial(jax.lax.conv_general_dilated, rhs=jnp.asarray(kernel), window_strides=(stride, stride),
                             padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return lambda x: conv(x[None])[0]


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
    kernel = rng.normal(size=(3, 3, 2, 3)).astype(np.float32)
    in_shape = (9, 9, 2)
    layer = conv_layer(kernel, stride, padding)
    exact = jacobian_norm(layer, in_shape)
    fourier = float(spectral.conv_operator_norm(kernel, in_shape[:2], stride, padding))
    power = float(spectral.power_iteration_norm(layer, in_shape, jax.random.PRNGKey(0), 400))
    assert fourier >= exact * (1 - 1e-5)
    assert power <= exact * (1 + 1e-5)
    assert power == pytest.approx(exact, rel=1e-3)


def test_input_size_circular_grid_can_underestimate_zero_padded_layer():
    # Why `fourier_grid` pads: the circular grid of the input size (n = 3) misses
    # the zero-padded layer's norm 2cos(π/7) for the difference kernel x[i] − x[i+1].
    kernel = np.zeros((2, 2, 1, 1), np.float32)
    kernel[0, 0], kernel[0, 1] = 1.0, -1.0
    exact = jacobian_norm(conv_layer(kernel, 1, "SAME"), (3, 3, 1))
    assert exact == pytest.approx(2 * math.cos(math.pi / 7), rel=1e-5)
    assert float(spectral.conv_operator_norm(kernel, (3, 3), 1, "CIRCULAR")) < exact - 0.05
    assert float(spectral.conv_operator_norm(kernel, (3, 3), 1, "SAME")) >= exact


def grouped_dense_kernel(kernel, groups):
    """The [k, k, C, D] kernel of a grouped convolution: zero where channel and feature groups differ."""
    k1, k2, c_per_group, d = kernel.shape
    full = np.zeros((k1, k2, c_per_group * groups, d), kernel.dtype)
    per_group = d // groups
    for g in range(groups):
        full[:, :, g * c_per_group:(g + 1) * c_per_group, g * per_group:(g + 1) * per_group] = \
            kernel[..., g * per_group:(g + 1) * per_group]
    return full


@pytest.mark.parametrize("stride, dilation, groups", [(1, 2, 1), (2, 1, 2), (2, 2, 3)])
def test_circular_norm_with_dilation_and_groups_equals_dense_matrix(stride, dilation, groups):
    rng = np.random.default_rng(stride + 10 * dilation + 100 * groups)
    kernel = rng.normal(size=(3, 2, 2, 2 * groups)).astype(np.float32)
    dilated = np.asarray(spectral.dilate_kernel(kernel, dilation))
    assert dilated.shape[:2] == (2 * dilation + 1, dilation + 1)
    expected = np.linalg.norm(circular_conv_matrix_rect(grouped_dense_kernel(dilated, groups), (8, 6), stride), 2)
    got = spectral.circular_conv_norm(dilated, (8, 6), stride, feature_group_count=groups)
    assert got == pytest.approx(expected, rel=1e-4)
    assert spectral.conv_operator_norm(kernel, (8, 6), stride, "CIRCULAR", dilation=dilation,
                                       feature_group_count=groups) == pytest.approx(got, rel=1e-6)


def circular_conv_matrix_rect(kernel, hw, stride):
    """`circular_conv_matrix` for rectangular kernels [k1, k2, C, D], one stride or one per axis."""
    k1, k2, c, d = kernel.shape
    h, w = hw
    s1, s2 = (stride, stride) if isinstance(stride, int) else stride
    mh, mw = h // s1, w // s2
    matrix = np.zeros((mh, mw, d, h, w, c))
    for q1 in range(mh):
        for q2 in range(mw):
            for u1 in range(k1):
                for u2 in range(k2):
                    matrix[q1, q2, :, (q1 * s1 + u1) % h, (q2 * s2 + u2) % w, :] += kernel[u1, u2].T
    return matrix.reshape(mh * mw * d, h * w * c)


def test_one_dimensional_convolution_is_the_two_dimensional_one_with_a_unit_axis():
    kernel = np.random.default_rng(0).normal(size=(4, 3, 5)).astype(np.float32)
    one = spectral.conv_operator_norm(kernel, (12,), 2, "CIRCULAR")
    two = spectral.conv_operator_norm(kernel[None], (1, 12), (1, 2), "CIRCULAR")
    assert one == pytest.approx(two, rel=1e-6)
    assert one == pytest.approx(np.linalg.norm(circular_conv_matrix_rect(kernel[None], (1, 12), (1, 2)), 2), rel=1e-4)


def test_fourier_grid_for_explicit_pairs_and_input_dilation():
    assert spectral.fourier_grid((9, 9), (3, 3), 1, "SAME") == (11, 11)
    assert spectral.fourier_grid((9, 9), (3, 3), (2, 3), ((1, 2), (0, 0))) == (12, 9)
    assert spectral.fourier_grid((5,), (3,), 1, [(2, 2)], input_dilation=2) == (13,)
    assert spectral.fourier_grid((7,), (3,), 2, [(-1, 1)]) == (8,)


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (784, 10)])
def test_dense_operator_norm_matches_svd(shape):
    w = jax.random.normal(jax.random.PRNGKey(sum(shape)), shape)
    assert float(spectral.dense_operator_norm(w)) == pytest.approx(float(jnp.linalg.norm(w, 2)), rel=1e-5)


def test_power_iteration_on_dense_layer():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(30, 12)) @ np.diag(np.linspace(1, 3, 12))   # well-separated top singular value
    power = float(spectral.power_iteration_norm(lambda x: x @ jnp.asarray(w, jnp.float32), (1, 30),
                                                jax.random.PRNGKey(1), 300))
    assert power == pytest.approx(np.linalg.norm(w, 2), rel=1e-4)


def reduce_window(x, computation, window, stride, padding="VALID", base_dilation=1, window_dilation=1):
    """Pooling of one image [H, W] (all axes pooled alike)."""
    init = -jnp.inf if computation is jax.lax.max else 0.0
    return jax.lax.reduce_window(x, init, computation, (window, window), (stride, stride), padding,
                                 (base_dilation,) * 2, (window_dilation,) * 2)


@pytest.mark.parametrize("window, stride, expected", [(2, 2, 1.0), (3, 2, 2.0), (3, 1, 3.0), (2, 3, 1.0)])
def test_max_pool_bound_is_reached(window, stride, expected):
    hw = (9, 9)
    assert spectral.max_pool_bound(hw, window, stride) == pytest.approx(expected)
    pool = lambda x: reduce_window(x, jax.lax.max, window, stride)
    # Move the input that is the maximum of every window covering it: the bound is tight.
    x = jnp.zeros(hw).at[4, 4].set(1.0)
    r = jnp.zeros_like(x).at[4, 4].set(0.5)
    ratio = float(jnp.linalg.norm(pool(x + r) - pool(x)) / jnp.linalg.norm(r))
    assert ratio == pytest.approx(expected, rel=1e-6)
    # And no random perturbation exceeds it.
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    xs = jax.random.normal(keys[0], (200, *hw))
    rs = 0.3 * jax.random.normal(keys[1], (200, *hw))
    moved = jnp.linalg.norm((jax.vmap(pool)(xs + rs) - jax.vmap(pool)(xs)).reshape(200, -1), axis=1)
    assert bool(jnp.all(moved <= expected * jnp.linalg.norm(rs.reshape(200, -1), axis=1) + 1e-5))


@pytest.mark.parametrize("window, stride, padding", [(2, 2, "VALID"), (3, 1, "VALID"), (3, 2, "SAME"),
                                                     (2, 1, ((1, 0), (0, 2)))])
def test_sum_pool_norm_is_exact(window, stride, padding):
    hw = (7, 6)
    exact = jacobian_norm(lambda x: reduce_window(x, jax.lax.add, window, stride, padding), hw)
    assert spectral.sum_pool_norm(hw, window, stride, padding) == pytest.approx(exact, rel=1e-5)
    if window == stride and padding == "VALID":   # non-overlapping: √(window size)
        assert spectral.sum_pool_norm(hw, window, stride) == pytest.approx(window, rel=1e-6)


@pytest.mark.parametrize("padding, base_dilation, window_dilation", [((1, 2), 1, 1), ((0, 0), 2, 1), ((2, 1), 1, 2)])
def test_window_matrix_is_reduce_windows_jacobian(padding, base_dilation, window_dilation):
    def pool(x):   # one axis of XLA's reduce_window sum
        return jax.lax.reduce_window(x, 0.0, jax.lax.add, (3,), (2,), (padding,), (base_dilation,), (window_dilation,))
    jac = np.asarray(jax.jacfwd(pool)(jnp.zeros(7)))
    matrix = spectral.window_matrix(7, 3, 2, padding, input_dilation=base_dilation, window_dilation=window_dilation)
    np.testing.assert_array_equal(matrix, jac)


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


def linear_logits(key, batch=64):
    k1, k2, k3 = jax.random.split(key, 3)
    w, b = jax.random.normal(k1, (30, 10)) / 5, jax.random.normal(k2, (10,))
    x = jax.random.uniform(k3, (batch, 30))
    return w, x @ w + b


def test_certified_radius_is_below_exact_linear_distance():
    # For a linear classifier the exact L2 distance to the nearest decision
    # boundary is min_j (z_y − z_j) / ‖w_y − w_j‖: the certificate must not exceed it,
    # and the pairwise radius is exactly it.
    w, logits = linear_logits(jax.random.PRNGKey(4))
    radius = spectral.certified_radius(logits, spectral.dense_operator_norm(w))
    w64, z = np.asarray(w, np.float64), np.asarray(logits, np.float64)
    top = z.argmax(1)
    exact = np.array([min((z[i, top[i]] - z[i, j]) / np.linalg.norm(w64[:, top[i]] - w64[:, j])
                          for j in range(10) if j != top[i]) for i in range(len(z))])
    assert np.all(np.asarray(radius) <= exact * (1 + 1e-5))
    assert np.all(np.asarray(radius) > 0)
    np.testing.assert_allclose(spectral.pairwise_certified_radius(logits, w, 1.0), exact, rtol=1e-5)


def test_pairwise_radius_is_never_below_the_papers():
    w, logits = linear_logits(jax.random.PRNGKey(5))
    features_bound = 3.7
    pairwise = spectral.pairwise_certified_radius(logits, w, features_bound)
    paper = spectral.certified_radius(logits, spectral.dense_operator_norm(w) * features_bound)
    assert bool(jnp.all(pairwise >= paper * (1 - 1e-6)))
    # Identical columns never flip: their pair is ignored, unless the logits are tied.
    same = jnp.concatenate([w[:, :1], w[:, :1]], axis=1)
    radius = spectral.pairwise_certified_radius(jnp.array([[2.0, 1.0], [1.0, 1.0]]), same, 1.0)
    assert math.isinf(float(radius[0])) and float(radius[1]) == 0.0


def test_pairwise_radius_of_given_labels_matches_a_loop_over_classes():
    w, logits = linear_logits(jax.random.PRNGKey(6))
    labels = np.arange(logits.shape[0]) % logits.shape[1]                # many differ from the prediction
    radii = np.asarray(spectral.pairwise_certified_radius(logits, w, 2.5, labels=labels))
    z, columns = np.asarray(logits, np.float64), np.asarray(w, np.float64)
    for i, y in enumerate(labels):
        expected = min((z[i, y] - z[i, j]) / (np.linalg.norm(columns[:, y] - columns[:, j]) * 2.5)
                       for j in range(z.shape[1]) if j != y)
        np.testing.assert_allclose(radii[i], max(expected, 0.0), rtol=1e-5, atol=1e-7)
    assert np.any(radii == 0) and np.any(radii > 0)
    predicted = jnp.argmax(logits, axis=1)
    np.testing.assert_array_equal(spectral.pairwise_certified_radius(logits, w, 2.5, labels=predicted),
                                  spectral.pairwise_certified_radius(logits, w, 2.5))
    with pytest.raises(ValueError, match="labels"):
        spectral.pairwise_certified_radius(logits, w, 2.5, labels=labels[:2])


def test_certified_radius_formula():
    logits = jnp.array([[3.0, 1.0, 0.5], [0.0, 2.0, 2.0]])
    np.testing.assert_allclose(spectral.certified_radius(logits, 2.0), [2.0 / (2 * math.sqrt(2)), 0.0], rtol=1e-6)


def test_validation_names_the_argument():
    with pytest.raises(ValueError, match="kernel"):
        spectral.conv_operator_norm(jnp.zeros((3, 3, 2)), (8, 8))
    with pytest.raises(ValueError, match="stride"):
        spectral.conv_operator_norm(jnp.zeros((3, 3, 1, 1)), (8, 8), stride=0)
    with pytest.raises(ValueError, match="spatial_shape"):
        spectral.conv_operator_norm(jnp.zeros((3, 3, 1, 1)), (9, 8), stride=2)
    with pytest.raises(ValueError, match="padding"):
        spectral.conv_operator_norm(jnp.zeros((3, 3, 1, 1)), (8, 8), padding="REFLECT")
    with pytest.raises(ValueError, match="padding"):
        spectral.conv_operator_norm(jnp.zeros((3, 3, 1, 1)), (8, 8), padding=((1, 1),))
    with pytest.raises(ValueError, match="feature_group_count"):
        spectral.circular_conv_norm(jnp.zeros((3, 3, 1, 3)), (8, 8), feature_group_count=2)
    with pytest.raises(ValueError, match="w must be a matrix"):
        spectral.dense_operator_norm(jnp.zeros(3))
    with pytest.raises(ValueError, match="gamma"):
        spectral.contrast_normalization_bound(1.0, 2.0)
    with pytest.raises(ValueError, match="window"):
        spectral.max_pool_bound((2, 2), 3, 1)
    with pytest.raises(ValueError, match="num_iterations"):
        spectral.power_iteration_norm(lambda x: x, (3,), jax.random.PRNGKey(0), 0)
    with pytest.raises(ValueError, match="logits"):
        spectral.certified_radius(jnp.zeros(10), 1.0)
    with pytest.raises(ValueError, match="head_weights"):
        spectral.pairwise_certified_radius(jnp.zeros((2, 3)), jnp.zeros((5, 4)), 1.0)
