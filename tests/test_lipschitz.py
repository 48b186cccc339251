"""Bounds traced from a jaxpr (jaxadv.lipschitz) against dense Jacobians, power iteration and brute force.

Every reference here is built apart from the traced path: each operator's
dense matrix comes from `jax.jacfwd` of the layer written with flax or lax
directly, and its norm from NumPy's SVD in float64.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import lipschitz, spectral
from jaxadv.models import get_model


def exact_norm(linear_fn, input_shape) -> float:
    """‖J‖₂ of a linear map from its full Jacobian (float64 SVD)."""
    jac = jax.jit(jax.jacfwd(linear_fn))(jnp.zeros(input_shape, jnp.float32))
    return float(np.linalg.norm(np.asarray(jac, np.float64).reshape(-1, math.prod(input_shape)), 2))


def max_jacobian_norm(fn, input_shape, num_points=6, seed=0) -> float:
    """The largest ‖∂f/∂x‖₂ over random inputs: a lower bound of f's Lipschitz constant."""
    xs = jax.random.normal(jax.random.PRNGKey(seed), (num_points, *input_shape))
    jacobians = np.asarray(jax.jit(jax.vmap(jax.jacfwd(fn)))(xs), np.float64).reshape(num_points, -1, math.prod(input_shape))
    return float(max(np.linalg.norm(j, 2) for j in jacobians))


class SmallCNN(nn.Module):
    """A strided convolution, average and (overlapping) max pooling, a dense head."""
    padding: str = "SAME"

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), strides=2, padding=self.padding, name="conv")(x))
        x = nn.avg_pool(x, (2, 2), strides=(1, 1))
        x = nn.max_pool(x, (2, 2), strides=(1, 1))
        x = x.reshape(x.shape[0], -1)
        x = nn.sigmoid(nn.Dense(6, name="fc1")(x))
        return nn.Dense(4, name="fc2")(x)


INPUT_SHAPE = (1, 8, 8, 2)


def small_cnn(padding):
    module = SmallCNN(padding)
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros(INPUT_SHAPE))
    return module, variables, jax.tree_util.Partial(module.apply, variables)


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
def test_cnn_rows_bound_exact_norms_and_power_iteration(padding):
    module, variables, logits_fn = small_cnn(padding)
    bounds = lipschitz.operator_bounds(logits_fn, jnp.zeros(INPUT_SHAPE), power_iterations=300,
                                       key=jax.random.PRNGKey(1))
    rows = {row["layer"]: row for row in bounds.rows}
    assert [row["layer"] for row in bounds.rows] == ["Conv. 1", "ReLU", "Avg-pool", "Max-pool", "Flatten", "FC. 1",
                                                     "Sigmoid", "FC. 2"]
    params = variables["params"]
    conv = lambda x: nn.Conv(3, (3, 3), strides=2, padding=padding, use_bias=False).apply(
        {"params": {"kernel": params["conv"]["kernel"]}}, x)
    exact = {"Conv. 1": exact_norm(conv, INPUT_SHAPE),
             "Avg-pool": exact_norm(lambda x: nn.avg_pool(x, (2, 2), strides=(1, 1)), (1, 4, 4, 3)),
             "FC. 1": float(np.linalg.norm(np.asarray(params["fc1"]["kernel"], np.float64), 2)),
             "FC. 2": float(np.linalg.norm(np.asarray(params["fc2"]["kernel"], np.float64), 2))}
    for name, norm in exact.items():
        row = rows[name]
        assert row["upper_bound"] >= norm * (1 - 1e-5), name
        assert row["power_iteration"] <= norm * (1 + 1e-4), name
        assert row["power_iteration"] <= row["upper_bound"] * (1 + 1e-5), name
        assert row["power_iteration"] == pytest.approx(norm, rel=1e-2), name
    # Exact: dense maps, the circular convolution (the Fourier method's own setting), average pooling.
    exact_rows = ["FC. 1", "FC. 2", "Avg-pool"] + (["Conv. 1"] if padding == "CIRCULAR" else [])
    for name in exact_rows:
        assert rows[name]["upper_bound"] == pytest.approx(exact[name], rel=1e-4), name
    assert rows["Conv. 1"]["shape"] == [2, 3, 3, 3] and rows["Conv. 1"]["stride"] == 2
    assert rows["FC. 1"]["shape"] == [12, 6] and rows["FC. 1"]["stride"] is None
    assert rows["Max-pool"]["upper_bound"] == pytest.approx(2.0)   # 2×2 windows at stride 1: 4 cover an input
    assert rows["Sigmoid"]["upper_bound"] == spectral.SIGMOID_BOUND
    assert rows["ReLU"]["power_iteration"] is None
    # A chain: the network bound is the product of the rows, each row's output bound the running product.
    assert bounds.network_bound == pytest.approx(math.prod(row["upper_bound"] for row in bounds.rows), rel=1e-12)
    running = np.cumprod([row["upper_bound"] for row in bounds.rows])
    np.testing.assert_allclose([row["lipschitz_out"] for row in bounds.rows], running, rtol=1e-12)
    assert max_jacobian_norm(logits_fn, INPUT_SHAPE) <= bounds.network_bound
    assert bounds.features_bound == pytest.approx(bounds.network_bound / rows["FC. 2"]["upper_bound"], rel=1e-12)
    np.testing.assert_array_equal(bounds.head_weights, np.asarray(params["fc2"]["kernel"]))


CONV_CASES = {
    # name: (input shape, dimension numbers, kernel shape, stride, padding, lhs dilation, rhs dilation, groups)
    "nhwc-dilated-groups": ((1, 9, 8, 4), ("NHWC", "HWIO", "NHWC"), (3, 2, 2, 6), (1, 1), "SAME", (1, 1), (2, 3), 2),
    "nchw-strides-explicit-pairs": ((1, 4, 9, 7), ("NCHW", "OIHW", "NCHW"), (6, 2, 3, 2), (2, 3),
                                    ((1, 2), (0, 1)), (1, 1), (1, 2), 2),
    "negative-padding": ((1, 7, 7, 2), ("NHWC", "HWIO", "NHWC"), (3, 3, 2, 3), (1, 2), ((-1, 1), (2, -1)),
                         (1, 1), (1, 1), 1),
    "transposed": ((1, 5, 5, 2), ("NHWC", "HWIO", "NHWC"), (3, 3, 2, 3), (1, 1), ((2, 2), (2, 2)), (2, 2), (1, 1), 1),
    "1d": ((1, 11, 3), ("NWC", "WIO", "NWC"), (4, 3, 5), (2,), "VALID", (1,), (1,), 1),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_any_convolution_is_bounded(case):
    shape, dimension_numbers, kernel_shape, stride, padding, lhs_dilation, rhs_dilation, groups = CONV_CASES[case]
    kernel = jax.random.normal(jax.random.PRNGKey(len(case)), kernel_shape)
    conv = functools.partial(jax.lax.conv_general_dilated, rhs=kernel, window_strides=stride, padding=padding,
                             lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                             dimension_numbers=dimension_numbers, feature_group_count=groups)
    bounds = lipschitz.operator_bounds(lambda x: conv(x) + 1.0, jnp.zeros(shape), power_iterations=200,
                                       key=jax.random.PRNGKey(0))
    (row,) = bounds.rows
    exact = exact_norm(conv, shape)
    assert row["layer"] == "Conv. 1"
    assert row["upper_bound"] >= exact * (1 - 1e-5)
    assert row["power_iteration"] <= exact * (1 + 1e-4)
    assert row["power_iteration"] == pytest.approx(exact, rel=2e-2)


@pytest.mark.parametrize("stride, dilation, groups", [(1, 2, 2), (2, 1, 1), (2, 2, 4)])
def test_circular_convolution_with_dilation_and_groups_is_exact(stride, dilation, groups):
    module = nn.Conv(4, (3, 3), strides=stride, padding="CIRCULAR", kernel_dilation=dilation,
                     feature_group_count=groups, use_bias=False)
    shape = (1, 8, 8, 4)
    variables = jax.jit(module.init)(jax.random.PRNGKey(stride), jnp.zeros(shape))
    conv = functools.partial(module.apply, variables)
    (row,) = lipschitz.operator_bounds(conv, jnp.zeros(shape)).rows
    assert row["upper_bound"] == pytest.approx(exact_norm(conv, shape), rel=1e-4)


def test_circular_padding_with_a_stride_not_dividing_the_size_is_still_a_bound():
    module = nn.Conv(3, (3, 3), strides=3, padding="CIRCULAR", use_bias=False)
    shape = (1, 8, 8, 2)
    conv = functools.partial(module.apply, jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros(shape)))
    (row,) = lipschitz.operator_bounds(conv, jnp.zeros(shape)).rows
    assert row["upper_bound"] >= exact_norm(conv, shape) * (1 - 1e-5)


def im2col_conv(x, kernel, stride, padding):
    """A convolution written as shifted slices, concatenated and multiplied by a matrix (as jaxadv.models.conv2d)."""
    k, _, _, features = kernel.shape
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    elif padding == "CIRCULAR":
        x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="wrap")
    out_h, out_w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    views = [x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
             for i in range(k) for j in range(k)]
    return jnp.concatenate(views, axis=-1) @ kernel.reshape(-1, features)


@pytest.mark.parametrize("padding, stride", [("SAME", 1), ("VALID", 2), ("CIRCULAR", 1), ("CIRCULAR", 2)])
def test_im2col_convolution_is_read_as_a_convolution(padding, stride):
    kernel = jax.random.normal(jax.random.PRNGKey(stride), (3, 3, 2, 4))
    shape = (1, 8, 8, 2)
    conv = lambda x: im2col_conv(x, kernel, stride, padding)
    bounds = lipschitz.operator_bounds(conv, jnp.zeros(shape), power_iterations=200, key=jax.random.PRNGKey(0))
    (row,) = bounds.rows
    exact = exact_norm(conv, shape)
    assert row["layer"] == "Conv. 1" and row["shape"] == [2, 3, 3, 4] and row["stride"] == stride
    # The Fourier method on the layer's own grid, not √9 · ‖W‖ of the patches' matrix.
    assert row["upper_bound"] == pytest.approx(spectral.conv_operator_norm(kernel, (8, 8), stride, padding), rel=1e-6)
    assert row["upper_bound"] < 3 * spectral.dense_operator_norm(kernel.reshape(-1, 4))
    assert row["upper_bound"] >= exact * (1 - 1e-5)
    if padding == "CIRCULAR":
        assert row["upper_bound"] == pytest.approx(exact, rel=1e-4)
    # Power iteration runs on the real operator, from the unpadded input.
    assert row["power_iteration"] == pytest.approx(exact, rel=1e-2)
    assert row["power_iteration"] <= exact * (1 + 1e-4)


def test_residual_branches_add_and_concatenation_takes_the_root_sum_of_squares():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    w1, w2 = jax.random.normal(k1, (5, 5)), jax.random.normal(k2, (5, 3))
    n1, n2 = spectral.dense_operator_norm(w1), spectral.dense_operator_norm(w2)
    residual = lambda x: jnp.tanh(x @ w1) + x
    bounds = lipschitz.operator_bounds(residual, jnp.zeros((1, 5)))
    assert bounds.network_bound == pytest.approx(n1 + 1.0, rel=1e-12)
    assert [row["layer"] for row in bounds.rows] == ["FC. 1", "Tanh"]
    stacked = lambda x: jnp.concatenate([x, x @ w2], axis=1) @ jnp.ones((8, 1))
    bounds = lipschitz.operator_bounds(stacked, jnp.zeros((1, 5)))
    assert bounds.network_bound == pytest.approx(math.sqrt(1 + n2 ** 2) * math.sqrt(8), rel=1e-6)
    # Two halves of one input side by side again: each element appears once, an isometry.
    halves = lambda x: jnp.concatenate([x[:, 3:], x[:, :3]], axis=1)
    assert lipschitz.network_bound(halves, jnp.zeros((1, 5))) == 1.0
    assert lipschitz.network_bound(lambda x: jnp.maximum(x @ w1, x), jnp.zeros((1, 5))) == pytest.approx(
        math.sqrt(n1 ** 2 + 1), rel=1e-12)


def test_scaling_broadcasting_and_sums():
    scale = jnp.array([[1.0, -3.0, 2.0]])
    x0 = jnp.zeros((2, 3))
    assert lipschitz.network_bound(lambda x: x * scale, x0) == pytest.approx(3.0)
    assert lipschitz.network_bound(lambda x: x / 4.0 - 1.0, x0) == pytest.approx(0.25)
    # x [2, 1] broadcast over 3 columns with weights: √(1 + 9 + 4) per element.
    assert lipschitz.network_bound(lambda x: x[:, :1] * scale, x0) == pytest.approx(math.sqrt(14))
    assert lipschitz.network_bound(lambda x: jnp.sum(x, axis=1), x0) == pytest.approx(math.sqrt(3))
    mean = lipschitz.operator_bounds(lambda x: jnp.mean(x, axis=1), x0)
    assert [row["layer"] for row in mean.rows] == ["Mean"]
    assert mean.network_bound == pytest.approx(1 / math.sqrt(3))
    assert lipschitz.network_bound(lambda x: jnp.broadcast_to(x[:, None], (2, 4, 3)), x0) == pytest.approx(2.0)
    assert lipschitz.network_bound(lambda x: jnp.max(x, axis=1), x0) == 1.0
    assert lipschitz.network_bound(lambda x: jnp.clip(x, -1, 1), x0) == 1.0
    assert lipschitz.network_bound(lambda x: jnp.ones((2, 3)), x0) == 0.0


def test_unknown_primitive_raises_naming_it():
    w = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="'exp'"):
        lipschitz.operator_bounds(lambda x: jnp.exp(x) @ w, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="'mul'"):
        lipschitz.operator_bounds(lambda x: (x * x) @ w, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="'gt'"):   # a comparison other than with 0 (a leaky ReLU's) has no rule
        lipschitz.operator_bounds(lambda x: jnp.where(x > 0.5, x, 0.1 * x), jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="'exp'.*inside"):   # inside a jitted sub-function
        lipschitz.operator_bounds(jax.jit(lambda x: jax.nn.relu(jnp.exp(x))), jnp.zeros((1, 4)))


def test_weights_computed_inside_the_model_are_constants():
    # Weight normalisation inside the function: W / ‖W‖ is input-independent, evaluated before any rule applies.
    w = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    fn = lambda x: x @ (w / jnp.linalg.norm(w, 2)) * 2.0
    assert lipschitz.network_bound(fn, jnp.zeros((1, 6))) == pytest.approx(2.0, rel=1e-5)


def test_custom_vjp_and_checkpoint_are_walked_into():
    @jax.custom_vjp
    def clipped_gradient_tanh(x):
        return jnp.tanh(x)

    clipped_gradient_tanh.defvjp(lambda x: (jnp.tanh(x), None), lambda _, g: (jnp.clip(g, -1, 1),))
    fn = jax.checkpoint(lambda x: jax.nn.sigmoid(clipped_gradient_tanh(x) * 3.0))
    bounds = lipschitz.operator_bounds(fn, jnp.zeros((1, 4)))
    assert [row["layer"] for row in bounds.rows] == ["Tanh", "Scale", "Sigmoid"]
    assert bounds.network_bound == pytest.approx(0.75)


def test_network_bound_of_a_sigmoid_mlp_is_the_product_of_weight_norms_and_slopes():
    mlp = nn.Sequential([nn.Dense(7), nn.sigmoid, nn.Dense(5), nn.sigmoid, nn.Dense(3)])
    variables = jax.jit(mlp.init)(jax.random.PRNGKey(3), jnp.zeros((1, 16)))
    fn = jax.tree_util.Partial(mlp.apply, variables)
    norms = [np.linalg.norm(np.asarray(variables["params"][f"layers_{i}"]["kernel"], np.float64), 2) for i in (0, 2, 4)]
    bounds = lipschitz.operator_bounds(fn, jnp.zeros((1, 16)))
    np.testing.assert_allclose([row["upper_bound"] for row in bounds.rows], [norms[0], 0.25, norms[1], 0.25, norms[2]],
                               rtol=1e-5)
    assert bounds.network_bound == pytest.approx(math.prod(norms) / 16, rel=1e-5)


@pytest.mark.parametrize("name", ["FC100-100-10", "ConvNet"])
def test_zoo_bounds_are_weight_norms_slopes_and_fourier_bounds(name):
    """The zoo as the experiments reach it: `Partial(model.apply, params)`, whatever its layers are written in."""
    model = get_model(name)
    params = jax.jit(model.init)(jax.random.PRNGKey(0))
    bounds = lipschitz.operator_bounds(jax.tree_util.Partial(model.apply, params), jnp.zeros((1, *model.input_shape)))
    weights = [w for w in jax.tree.leaves(params) if w.ndim >= 2]   # kernels, in layer order
    conv_inputs = iter([(28, 28), (14, 14)])                         # the ConvNet's maps before each convolution
    expected = [spectral.dense_operator_norm(w) if w.ndim == 2 else
                spectral.conv_operator_norm(w, next(conv_inputs), 1, "SAME") for w in weights]
    linear = [row for row in bounds.rows if row["kind"] in ("dense", "conv")]
    np.testing.assert_allclose([row["upper_bound"] for row in linear], expected, rtol=1e-5)
    others = {row["layer"]: row["upper_bound"] for row in bounds.rows if row["kind"] not in ("dense", "conv")}
    assert others == ({"Flatten": 1.0, "Sigmoid": 0.25} if name == "FC100-100-10"
                      else {"ReLU": 1.0, "Max-pool": 1.0, "Flatten": 1.0})
    assert bounds.network_bound == pytest.approx(math.prod(row["upper_bound"] for row in bounds.rows), rel=1e-12)


def test_pairwise_radius_is_the_exact_boundary_distance_of_a_linear_model():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
    w, b = jax.random.normal(k1, (20, 6)), jax.random.normal(k2, (6,))
    fn = jax.jit(lambda x: x.reshape(len(x), -1) @ w + b)
    x = jax.random.normal(k3, (64, 4, 5))
    bounds = lipschitz.operator_bounds(fn, x[:1])
    assert bounds.features_bound == 1.0
    logits = fn(x)
    z, w64 = np.asarray(logits, np.float64), np.asarray(w, np.float64)
    top = z.argmax(1)
    exact = np.array([min((z[i, top[i]] - z[i, j]) / np.linalg.norm(w64[:, top[i]] - w64[:, j])
                          for j in range(6) if j != top[i]) for i in range(64)])
    pairwise = np.asarray(bounds.pairwise_certified_radius(logits))
    paper = np.asarray(bounds.certified_radius(logits))
    np.testing.assert_allclose(pairwise, exact, rtol=1e-5)
    assert np.all(paper <= pairwise * (1 + 1e-6)) and np.mean(paper < 0.9 * pairwise) > 0.5
    # labels=: the radius of a class to keep, 0 where another leads; the prediction gives the default's.
    other = (top + 1) % 6
    np.testing.assert_array_equal(np.asarray(bounds.pairwise_certified_radius(logits, labels=top)), pairwise)
    assert np.all(np.asarray(bounds.pairwise_certified_radius(logits, labels=other)) == 0)
    # Stepping just past the radius toward the nearest boundary does flip the prediction: it is tight.
    j_star = np.array([min((j for j in range(6) if j != top[i]),
                           key=lambda j: (z[i, top[i]] - z[i, j]) / np.linalg.norm(w64[:, top[i]] - w64[:, j]))
                       for i in range(64)])
    direction = (w64[:, j_star] - w64[:, top]).T
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    step = lambda scale: jnp.asarray((scale * exact[:, None] * direction).reshape(x.shape), jnp.float32)
    assert np.all(np.argmax(fn(x + step(0.99)), 1) == top)
    assert np.all(np.argmax(fn(x + step(1.01)), 1) != top)


def test_pairwise_radius_is_certified_on_a_cnn():
    _, _, logits_fn = small_cnn("SAME")
    bounds = lipschitz.operator_bounds(logits_fn, jnp.zeros(INPUT_SHAPE))
    logits_fn = jax.jit(logits_fn)
    x = jax.random.normal(jax.random.PRNGKey(7), (16, *INPUT_SHAPE[1:]))
    logits = logits_fn(x)
    predicted = jnp.argmax(logits, 1)
    radius = bounds.pairwise_certified_radius(logits)
    assert bool(jnp.all(radius >= bounds.certified_radius(logits) * (1 - 1e-6)))
    # Perturbations of norm 0.999·radius: along each margin's gradient (the steepest way to close it) and at random.
    directions = [jax.random.normal(k, x.shape) for k in jax.random.split(jax.random.PRNGKey(8), 20)]
    margins = lambda v: jnp.take_along_axis(logits_fn(v), predicted[:, None], 1) - logits_fn(v)   # [B, K]
    directions += list(-jax.jit(jax.jacrev(lambda v: margins(v).sum(0)))(x))   # per image: images are independent
    directions = jnp.stack(directions)                                          # [20 + K, B, ...]
    norms = jnp.linalg.norm(directions.reshape(*directions.shape[:2], -1), axis=2)
    steps = 0.999 * radius[None, :, None, None, None] * directions / jnp.maximum(norms, 1e-30)[..., None, None, None]
    moved = jax.vmap(logits_fn)(x[None] + steps)
    assert bool(jnp.all(jnp.argmax(moved, -1) == predicted[None]))


def test_float64_under_x64():
    with jax.enable_x64(True):
        w = jax.random.normal(jax.random.PRNGKey(0), (9, 4), jnp.float64)
        kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 2), jnp.float64)
        fn = lambda x: jax.nn.relu(jax.lax.conv(x, kernel.transpose(3, 2, 0, 1), (1, 1), "SAME")).reshape(1, -1)[:, :9] @ w
        bounds = lipschitz.operator_bounds(fn, jnp.zeros((1, 1, 5, 5), jnp.float64), power_iterations=50,
                                           key=jax.random.PRNGKey(2))
        assert bounds.rows[-1]["upper_bound"] == pytest.approx(np.linalg.norm(np.asarray(w), 2), rel=1e-12)
        assert bounds.rows[0]["upper_bound"] >= bounds.rows[0]["power_iteration"]


def test_validation_names_the_argument():
    with pytest.raises(TypeError, match="logits_fn"):
        lipschitz.operator_bounds("not a function", jnp.zeros((1, 3)))
    with pytest.raises(TypeError, match="example_input"):
        lipschitz.operator_bounds(lambda x: x, [1.0, 2.0])
    with pytest.raises(TypeError, match="example_input"):
        lipschitz.operator_bounds(lambda x: x, jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="key"):
        lipschitz.operator_bounds(lambda x: x, jnp.zeros((1, 3)), power_iterations=5)
    with pytest.raises(ValueError, match="power_iterations"):
        lipschitz.operator_bounds(lambda x: x, jnp.zeros((1, 3)), power_iterations=-1)
    with pytest.raises(TypeError, match="one array"):
        lipschitz.operator_bounds(lambda x: (x, x), jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="dense layer"):
        lipschitz.operator_bounds(jnp.tanh, jnp.zeros((1, 3))).pairwise_certified_radius(jnp.zeros((1, 3)))


def test_flax_leaky_relu_is_bounded_by_its_steeper_slope_and_gelu_is_refused_by_name():
    """nn.leaky_relu traces as jnp.where(x >= 0, x, 0.01·x): one row of bound 1 between the dense norms (numpy SVD);
    a slope above 1 (jnp.where(x >= 0, x, 3·x)) is bounded by 3, checked against the Jacobian at random points."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    svd = np.linalg.norm(w1, 2) * np.linalg.norm(w2, 2)
    bounds = lipschitz.operator_bounds(lambda x: nn.leaky_relu(x @ w1) @ w2, jnp.zeros((1, 6)))
    assert [row["layer"] for row in bounds.rows] == ["FC. 1", "Leaky ReLU", "FC. 2"]
    np.testing.assert_allclose(bounds.network_bound, svd, rtol=1e-5)
    steep = lambda x: (lambda h: jnp.where(h >= 0, h, h * 3.0))(x @ w1) @ w2
    bound = lipschitz.operator_bounds(steep, jnp.zeros((1, 6))).network_bound
    np.testing.assert_allclose(bound, 3 * svd, rtol=1e-5)
    for x in rng.normal(size=(20, 1, 6)).astype(np.float32):
        jacobian = jax.jacobian(lambda v: steep(v[None])[0])(x[0])
        assert np.linalg.norm(np.asarray(jacobian), 2) <= bound * (1 + 1e-5)
    with pytest.raises(ValueError, match="'integer_pow' on the input's path has no global Lipschitz bound.*GELU"):
        lipschitz.operator_bounds(lambda x: jax.nn.gelu(x @ w1) @ w2, jnp.zeros((1, 6)))
    with pytest.raises(ValueError, match="'ge' of an input-dependent value has no Lipschitz rule"):
        lipschitz.operator_bounds(lambda x: jnp.where(x >= 1.0, x, 0.0) @ w1, jnp.zeros((1, 6)))
