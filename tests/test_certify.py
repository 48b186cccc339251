"""Certified L2 radii by CROWN (jaxadv.certify): sound against exact minima, sampling and the attack, as tight
as the same relaxation solved by scipy, never below the Lipschitz radius, one compilation per architecture.

References: the exact box-constrained minimum of softmax regression (jaxadv.attacks.exact) and the box-free
distance to the nearest boundary (closed form); the exact minimum of a small ReLU net (one QP per activation
pattern and class, scipy SLSQP); the nearest differently-labelled point of a dense grid (2-D nets); the
attack's distance; the relaxed problem solved by scipy (tests/data/certify_reference.json, written by
scripts/certify_reference.py); the pairwise Lipschitz radius.
"""
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import exact_relu_untargeted_minimum, small_relu_net
from jaxadv.attacks import lbfgs_attack_untargeted
from jaxadv.attacks.exact import exact_linear_minimum
from jaxadv.certify import certificates, certified_radius, margin_lower_bounds
from jaxadv.graph import NoRule
from jaxadv.lipschitz import operator_bounds
from jaxadv.linear_bounds import Node
from jaxadv.relaxations import output_bounds, relaxation
from jaxadv.models import conv2d, max_pool

ROUNDING = 1e-5   # float32: a radius may exceed an exact float64 minimum by rounding alone


def _softmax_regression(seed, inputs=20, classes=5):
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(inputs, classes)), rng.normal(size=classes)
    return (lambda x: x @ jnp.asarray(w, x.dtype) + jnp.asarray(b, x.dtype)), w, b


def test_softmax_regression_radius_is_the_exact_minimum_where_the_box_is_inactive():
    fn, w, b = _softmax_regression(0)
    rng = np.random.default_rng(1)
    images = np.concatenate([rng.uniform(0.3, 0.7, (6, 20)), rng.uniform(0, 1, (6, 20)) ** 4]).astype(np.float32)
    images[6:, :10] = 0.0                                                     # on the box's face: often active
    radii = np.asarray(certified_radius(fn, images), np.float64)
    labels = np.argmax(images @ w + b, -1)
    for x, y, radius in zip(images.astype(np.float64), labels, radii):
        others = [j for j in range(5) if j != y]
        exact = min(exact_linear_minimum(w, b, x, j)[1] for j in others)
        free = min((x @ (w[:, y] - w[:, j]) + b[y] - b[j]) / np.linalg.norm(w[:, y] - w[:, j]) for j in others)
        assert radius <= exact * (1 + ROUNDING)
        if exact <= free * (1 + 1e-9):                                        # the box is not active
            np.testing.assert_allclose(radius, free, rtol=1e-4)
        # The bounds are the model itself: the search finds the box-constrained minimum, active box or not.
        np.testing.assert_allclose(radius, exact, rtol=1e-4)


def test_relu_net_radius_never_exceeds_the_exact_minimum():
    fn, weights = small_relu_net(0)
    images = np.random.default_rng(1).uniform(0, 1, (10, 5)).astype(np.float32)
    labels = np.argmax(np.asarray(fn(jnp.asarray(images))), -1)
    radii = np.asarray(certified_radius(fn, images), np.float64)
    exact = np.array([exact_relu_untargeted_minimum(x.astype(np.float64), y, *weights) for x, y in zip(images, labels)])
    assert np.all(radii <= exact * (1 + ROUNDING)), (radii, exact)
    assert np.all(radii > 0) and np.median(exact / radii) < 3, exact / radii    # a certificate, not a zero


def _two_input_net(activation, seed):
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(size=(2, 6)) * 3, rng.normal(size=6)
    w2, b2 = rng.normal(size=(6, 3)), rng.normal(size=3)
    return lambda x: activation(x @ jnp.asarray(w1, x.dtype) + jnp.asarray(b1, x.dtype)) @ jnp.asarray(w2, x.dtype) + b2


@pytest.mark.parametrize("activation", [jax.nn.sigmoid, jnp.tanh, nn.leaky_relu, jax.nn.relu, lambda h: jnp.minimum(h, 0.5)],
                         ids=["sigmoid", "tanh", "flax_leaky_relu", "relu", "min"])
def test_two_input_nets_radius_never_exceeds_the_nearest_grid_point_of_another_label(activation):
    """Every grid point of another label is a real adversarial point: the true minimum, hence the radius, is below."""
    fn = _two_input_net(activation, 3)
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 601), np.linspace(0, 1, 601)), -1).reshape(-1, 2).astype(np.float32)
    grid_labels = np.argmax(np.asarray(jax.jit(fn)(grid)), -1)
    images = np.random.default_rng(4).uniform(0, 1, (12, 2)).astype(np.float32)
    labels = np.argmax(np.asarray(fn(jnp.asarray(images))), -1)
    radii = np.asarray(certified_radius(fn, images), np.float64)
    for x, y, radius in zip(images, labels, radii):
        nearest = np.min(np.linalg.norm(grid[grid_labels != y] - x, axis=1), initial=np.inf)
        assert radius <= nearest * (1 + ROUNDING), (radius, nearest)
    assert np.mean(radii > 0) >= 0.5


@pytest.mark.parametrize("name", ["logistic", "tanh", "leaky", "relu", "concave"])
def test_relaxations_bound_the_function_on_their_interval(name):
    rng = np.random.default_rng(0)
    centre, half = rng.normal(size=400) * 4, rng.uniform(0, 5, 400) ** 2
    lower, upper = jnp.asarray(centre - half, jnp.float32), jnp.asarray(centre + half, jnp.float32)
    slopes = {"leaky": (0.01, 1.0), "relu": (0.0, 1.0), "concave": (1.5, -0.5)}
    if name in slopes:
        node = Node("piecewise", (0,), (400,), jnp.float32, params=dict(kink=0.3, value=0.3, below=slopes[name][0],
                                                                          above=slopes[name][1]))
        def f(x):
            return 0.3 + slopes[name][0] * np.minimum(x - 0.3, 0) + slopes[name][1] * np.maximum(x - 0.3, 0)
    else:
        node = Node("smooth", (0,), (400,), jnp.float32, params=dict(name=name))
        f = (lambda x: 1 / (1 + np.exp(-x))) if name == "logistic" else np.tanh
    alpha_l, beta_l, alpha_u, beta_u = (np.asarray(a, np.float64) for a in relaxation(node, lower, upper))
    x = np.asarray(lower, np.float64) + np.linspace(0, 1, 2001)[:, None] * np.asarray(upper - lower, np.float64)
    assert np.all(alpha_l * x + beta_l <= f(x) + 1e-5) and np.all(f(x) <= alpha_u * x + beta_u + 1e-5)
    # The node's output bounds are the function's extremes on the interval (dense samples include the kink's
    # neighbourhood to within the grid step).
    low, up = (np.asarray(b, np.float64) for b in output_bounds(node, lower, upper))
    assert np.all(low <= f(x).min(axis=0) + 1e-5) and np.all(f(x).max(axis=0) <= up + 1e-5)
    lipschitz = max(map(abs, slopes[name])) if name in slopes else 1.0
    step = np.asarray(upper - lower, np.float64) / 2000
    assert np.all(f(x).min(axis=0) - low <= lipschitz * step + 1e-5)
    assert np.all(up - f(x).max(axis=0) <= lipschitz * step + 1e-5)


class _EveryOperator(nn.Module):
    """Circular and im2col convolutions, leaky ReLU, a residual add, BatchNorm, tanh, both max-pool forms,
    average pooling, ReLU, sigmoid."""

    @nn.compact
    def __call__(self, x):
        h = nn.leaky_relu(nn.Conv(4, (3, 3), padding="CIRCULAR", kernel_init=nn.initializers.normal(1.0))(x - 0.5))
        h = h + conv2d(h, self.param("im2col", nn.initializers.normal(0.3), (3, 3, 4, 4)), 1, "SAME")
        h = jnp.tanh(nn.BatchNorm(use_running_average=True)(h))
        h = max_pool(h, 2, 2)
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "SAME")
        h = nn.avg_pool(h, (2, 2), (2, 2))
        h = nn.relu(nn.Dense(8, kernel_init=nn.initializers.normal(2.0))(h.reshape(h.shape[0], -1)))
        return nn.Dense(3, kernel_init=nn.initializers.normal(3.0))(nn.sigmoid(h) - 0.5)


def test_every_operator_bounds_the_margins_at_tiny_eps_and_no_sampled_point_inside_the_radius_changes_the_label():
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1))
    module = _EveryOperator()
    variables = module.init(jax.random.PRNGKey(0), x)
    logits = module.apply(variables, x)
    labels = jnp.argmax(logits, -1)
    margins = np.asarray(logits[jnp.arange(4), labels][:, None] - logits)
    bounds = np.asarray(margin_lower_bounds(module, x, 1e-6, params=variables))
    others = ~np.eye(3, dtype=bool)[np.asarray(labels)]
    # The graph computes the model: at ε → 0 the bounds close on the margins.
    np.testing.assert_allclose(bounds[others], margins[others], atol=1e-4)
    assert np.all(bounds[others] <= margins[others] + 1e-5)
    radii = np.asarray(certified_radius(module, x, params=variables, steps=8))
    assert np.all(radii > 0)
    # Points on the sphere of the radius (then clipped into the box, which only moves them closer) keep the label.
    directions = jax.random.normal(jax.random.PRNGKey(2), (4, 500, 8, 8, 1))
    directions /= jnp.linalg.norm(directions.reshape(4, 500, -1), axis=-1)[..., None, None, None]
    points = jnp.clip(x[:, None] + radii[:, None, None, None, None] * directions, 0, 1)
    predicted = jnp.argmax(module.apply(variables, points.reshape(-1, 8, 8, 1)), -1).reshape(4, 500)
    assert bool(jnp.all(predicted == labels[:, None]))


def test_sigmoid_net_radius_is_above_the_pairwise_lipschitz_radius_and_below_the_attack():
    rng = np.random.default_rng(5)
    wide = nn.initializers.normal(2.0)
    module = nn.Sequential([lambda v: v - 0.5, nn.Dense(16, kernel_init=wide), nn.sigmoid,
                            nn.Dense(12, kernel_init=wide), nn.sigmoid, nn.Dense(4, kernel_init=wide)])
    x = jnp.asarray(rng.uniform(0, 1, (12, 10)), jnp.float32)
    variables = module.init(jax.random.PRNGKey(2), x)
    logits = module.apply(variables, x)
    pairwise = np.asarray(operator_bounds(module, x[:1], params=variables).pairwise_certified_radius(logits))
    radii = np.asarray(certified_radius(module, x, params=variables))
    assert np.all(radii >= pairwise * (1 - ROUNDING)), (radii, pairwise)
    attack = lbfgs_attack_untargeted(jax.tree_util.Partial(module.apply, variables), x, jnp.argmax(logits, -1))
    found = np.asarray(attack.success)
    assert found.mean() > 0.5 and np.all(radii[found] <= np.asarray(attack.l2)[found] * (1 + ROUNDING))


class _StridedConvAveragePool(nn.Module):
    """The README's "Your own model" CNN, smaller: a strided convolution, ReLU, average pooling, a dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (5, 5), strides=2)(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(5)(x.reshape(len(x), -1))


def test_a_strided_conv_with_average_pooling_is_certified_at_least_the_pairwise_radius_and_below_the_attack():
    module = _StridedConvAveragePool()
    x = jnp.asarray(np.random.default_rng(6).uniform(0, 1, (20, 12, 12, 1)), jnp.float32)
    variables = module.init(jax.random.PRNGKey(3), x)
    logits = module.apply(variables, x)
    bounds = operator_bounds(module, x[:1], params=variables)
    pairwise = np.asarray(bounds.pairwise_certified_radius(logits))
    found = certificates(module, x, params=variables)
    # Bounds the caller already holds (Table 5's) give the same certificates as those traced inside.
    np.testing.assert_array_equal(np.asarray(certificates(module, x, params=variables, lipschitz_bounds=bounds)),
                                  np.asarray(found))
    radii, crown, own_pairwise = (np.asarray(r) for r in found)
    assert np.all(radii >= pairwise * (1 - ROUNDING)), (radii, pairwise)
    np.testing.assert_allclose(own_pairwise, pairwise, rtol=1e-5)
    np.testing.assert_array_equal(radii, np.maximum(crown, own_pairwise))
    assert np.all(crown > 0)
    attack = lbfgs_attack_untargeted(jax.tree_util.Partial(module.apply, variables), x, jnp.argmax(logits, -1))
    moved = np.asarray(attack.success)
    assert moved.mean() > 0.5 and np.all(radii[moved] <= np.asarray(attack.l2)[moved] * (1 + ROUNDING))


def test_matches_the_same_relaxation_solved_by_scipy():
    """Like with like: one hidden layer, CROWN's own relaxation lines, the set solved exactly by SLSQP."""
    reference = json.loads((Path(__file__).parent / "data" / "certify_reference.json").read_text())
    for case in reference["cases"]:
        w1, b1, w2, b2 = (np.asarray(case[k], np.float32) for k in ("w1", "b1", "w2", "b2"))
        slope = case["negative_slope"]
        def fn(x):
            return jnp.where((h := x @ w1 + b1) >= 0, h, slope * h) @ w2 + b2
        ours = np.asarray(margin_lower_bounds(fn, np.asarray(case["images"], np.float32), case["eps"],
                                              np.asarray(case["labels"]), lower=case["lower"], upper=case["upper"],
                                              exact_hidden=True))
        theirs = np.asarray(case["bounds"])
        finite = np.isfinite(theirs)
        # At least as tight; and, the relaxation being the same, no tighter either (float32 rounding aside).
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-4, atol=1e-4)


def test_a_result_is_a_property_of_its_image_in_any_batch_or_chunk():
    fn, _ = small_relu_net(2, inputs=6)
    images = np.random.default_rng(3).uniform(0, 1, (9, 6)).astype(np.float32)
    whole = np.asarray(certified_radius(fn, images, steps=8))
    chunked = np.asarray(certified_radius(fn, images, chunk_size=4, steps=8))
    assert len(images) > 4
    reversed_ = np.asarray(certified_radius(fn, images[::-1], steps=8))[::-1]
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    np.testing.assert_allclose(reversed_, whole, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(certified_radius(fn, images[4:5], steps=8)), whole[4:5], rtol=1e-6)
    # A layer's units bounded a few at a time (max_rows): the same bounds.
    np.testing.assert_allclose(np.asarray(margin_lower_bounds(fn, images, 0.2, max_rows=5)),
                               np.asarray(margin_lower_bounds(fn, images, 0.2)), rtol=1e-5, atol=1e-6)




def test_new_parameters_reuse_the_compilation(compilations):
    module = nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(3)])
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (4, 6)), jnp.float32)
    certified_radius(module, x, params=module.init(jax.random.PRNGKey(99), x), steps=3)
    before = len(compilations)
    radii = [certified_radius(module, x, params=module.init(jax.random.PRNGKey(k), x), steps=3)
             for k in range(3)]
    assert len(compilations) == before, compilations[before:]
    assert len({float(r.sum()) for r in radii}) == 3


def test_unsupported_primitives_and_bad_input_are_refused_by_name():
    x = jnp.full((2, 3), 0.5)
    with pytest.raises(NoRule, match=r"'exp'.*jaxadv\.linear_bounds\.RULES"):
        certified_radius(lambda v: jnp.exp(v) @ jnp.ones((3, 2)), x)
    with pytest.raises(NoRule, match="'mul' of input-dependent operands"):
        certified_radius(lambda v: (v * v) @ jnp.ones((3, 2)), x)
    def fn(v):
        return v @ jnp.eye(3)
    # Bad arguments are plain ValueErrors, not refusals of an operator (certify catches only those).
    for bad in (lambda: certified_radius(fn, x + 1), lambda: certified_radius(fn, x, jnp.zeros(3, jnp.int32))):
        with pytest.raises(ValueError) as refused:
            bad()
        assert not isinstance(refused.value, NoRule)
    with pytest.raises(ValueError, match=r"images: values must lie in \[lower, upper\]"):
        certified_radius(fn, x + 1)
    with pytest.raises(ValueError, match="labels"):
        certified_radius(fn, x, jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="steps"):
        certified_radius(fn, x, steps=0)
    with pytest.raises(TypeError, match="images"):
        certified_radius(fn, jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(TypeError, match="lipschitz_bounds"):
        certificates(fn, x, lipschitz_bounds={"head_weights": None})


@pytest.mark.parametrize("fn", [
    lambda v: jax.nn.gelu(v) @ jnp.ones((3, 2)),                      # a power of an input-dependent value
    lambda v: (v / jnp.sum(v * v)) @ jnp.ones((3, 2)),                # a product of input-dependent values
    lambda v: jnp.exp(v) @ jnp.ones((3, 2)),                          # a primitive without a rule
    lambda v: jnp.where(v > v[0], v, 0.0) @ jnp.ones((3, 2)),         # a comparison other than a sign test
    lambda v: jnp.sort(v) @ jnp.ones((3, 2)),                         # a primitive without a rule
], ids=["gelu", "div", "exp", "comparison", "sort"])
def test_every_refusal_of_an_operator_is_a_no_rule_error_in_both_analyses(fn):
    """Each analysis refuses what it cannot bound with `graph.NoRule` (a ValueError naming the operator), so a
    caller such as `certificates` can tell a refused operator from a bad argument."""
    one = jax.ShapeDtypeStruct((1, 3), jnp.float32)
    with pytest.raises(NoRule):
        operator_bounds(lambda v: jax.vmap(fn)(v), one)
    with pytest.raises(NoRule):
        certified_radius(lambda v: jax.vmap(fn)(v), jnp.full((2, 3), 0.5))


def test_sandwich_summary_and_figure_read_only_the_images_the_attack_moved():
    from jaxadv.certify import sandwich_summary
    from jaxadv.plots import sandwich_figure
    rng = np.random.default_rng(0)
    certified = rng.uniform(0.1, 1, 50)
    attained = certified * rng.uniform(1, 4, 50)
    success = rng.uniform(size=50) > 0.2
    attained[~success] = 0.0                                            # not moved: ignored, not a violation
    certified[0], success[0] = 0.0, True                                # certified 0 (misclassified): no ratio
    summary = sandwich_summary(certified, attained, success)
    ratio = (attained / np.where(certified > 0, certified, 1))[success & (certified > 0)]
    assert summary["images"] == len(ratio) and summary["violations"] == 0
    np.testing.assert_allclose([summary["ratio_median"], summary["ratio_p90"]],
                               [np.median(ratio), np.quantile(ratio, 0.9)])
    assert sandwich_summary(attained[success], certified[success])["violations"] > 0
    figure = sandwich_figure({"net": (certified[success], attained[success])})
    assert len(figure.axes) == 1 and len(figure.axes[0].lines) == 2
    with pytest.raises(ValueError, match="certified and attained"):
        sandwich_summary(certified, attained[:3])


def test_a_wide_layer_over_many_images_bounds_every_image_alike():
    """784 → 400 sigmoid → 10 on 48 images: at ε → 0 every image's bounds close on its margins (XLA:CPU once
    miscomputed images 40 and up when the [48, 800, 784] coefficients were bounded in one batch)."""
    module = nn.Sequential([lambda v: v.reshape(v.shape[0], -1), nn.Dense(400), nn.sigmoid, nn.Dense(10)])
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (48, 28, 28, 1)), jnp.float32)
    variables = module.init(jax.random.PRNGKey(0), x)
    logits = np.asarray(module.apply(variables, x))
    labels = logits.argmax(-1)
    margins = logits[np.arange(48), labels][:, None] - logits
    bounds = np.asarray(margin_lower_bounds(module, x, 1e-6, params=variables))
    others = np.isfinite(bounds)
    np.testing.assert_allclose(bounds[others], margins[others], atol=1e-4)


def _pooled_cnn(seed: int):
    """conv 3×3×3 (im2col) → ReLU → max pool 2×2 → conv 3×3×4 → ReLU → dense 3, and the second convolution's
    output as its own function (the node that the second ReLU reads)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    k1, k2 = jax.random.normal(keys[0], (3, 3, 1, 3)), 0.5 * jax.random.normal(keys[1], (3, 3, 3, 4))
    b1, w = 0.1 * jax.random.normal(keys[2], (3,)), jax.random.normal(keys[3], (64, 3))
    def conv2(x):
        return conv2d(max_pool(jax.nn.relu(conv2d(x, k1, 1, "SAME") + b1 - 0.3), 2, 2), k2, 1, "SAME")
    def fn(x):
        return jax.nn.relu(conv2(x)).reshape(x.shape[0], -1) @ w
    return fn, conv2


def test_forward_bounds_of_a_second_convolution_equal_the_backward_pass_and_hold_on_sampled_points():
    from jaxadv import linear_bounds
    from jaxadv.certify import minimum_over_ball_and_faces
    from jaxadv.forward_bounds import forward_bounds, forward_supported
    fn, conv2 = _pooled_cnn(0)
    x = jax.random.uniform(jax.random.PRNGKey(5), (1, 8, 8, 1))
    x = x.at[:, :3].set(0.0)                                           # a flat background: tied pool windows
    graph = linear_bounds.build_graph(fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    relus = [node for node in graph.nodes if node.kind == "piecewise"]
    eps, flat = 0.4, x.reshape(-1)
    def minimum(c, o):
        return minimum_over_ball_and_faces(c, o, flat, eps, jnp.zeros_like(flat), jnp.ones_like(flat))
    bounds = {0: (jnp.maximum(x - eps, 0), jnp.minimum(x + eps, 1))}
    relaxed = {}
    for node in graph.nodes[:relus[1].index]:                          # the relaxations the second conv reads
        if node.kind in linear_bounds.NONLINEAR:
            source = node.inputs[0]
            bounds[source] = linear_bounds._intermediate_bounds(graph, relaxed, source, 0, minimum, x.dtype, 64)
            relaxed[node.index] = relaxation(node, *bounds[source])
    # The first convolution, wider than the input, is bounded from its Jacobian built once: the same bounds.
    from jaxadv.certify import _prefix_gram, _wide_prefix_bounds
    prefix = _prefix_gram(graph, x.dtype)
    assert prefix.index == relus[0].inputs[0] and prefix.gram is None
    wide = _wide_prefix_bounds(prefix, prefix.jacobian @ flat + prefix.constant, flat, eps, 0 * flat, 0 * flat + 1)
    for ours, backward in zip(wide, bounds[prefix.index]):
        np.testing.assert_allclose(ours, np.asarray(backward).reshape(-1), rtol=1e-5, atol=1e-5)
    source = relus[1].inputs[0]
    assert forward_supported(graph, source)
    low, up = forward_bounds(graph, relaxed, source, minimum, x.dtype)
    back_low, back_up = linear_bounds._intermediate_bounds(graph, relaxed, source, 0, minimum, x.dtype, 64)
    # Through one layer of relaxations both passes pick each unit's relaxation by its coefficient's sign.
    np.testing.assert_allclose(low, back_low, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(up, back_up, rtol=1e-4, atol=1e-4)
    assert float(jnp.mean(up - low)) > 0.1                              # the ball matters: not a trivial check
    directions = jax.random.normal(jax.random.PRNGKey(6), (4000,) + x.shape[1:])
    radii = eps * jax.random.uniform(jax.random.PRNGKey(7), (4000, 1, 1, 1)) ** (1 / 64)
    norms = jnp.linalg.norm(directions.reshape(4000, -1), axis=1)[:, None, None, None]
    points = jnp.clip(x + radii * directions / norms, 0, 1)            # in the ball ∩ box
    values = conv2(points)
    assert bool(jnp.all(values >= low - 1e-5)) and bool(jnp.all(values <= up + 1e-5))


@pytest.mark.parametrize("pool", ["reshape", "padded_window"])
def test_max_pool_relaxation_bounds_the_maximum_at_every_vertex_and_sampled_point(pool):
    from jaxadv import linear_bounds
    shape = (1, 4, 4, 2)
    def fn(v):
        if pool == "reshape":
            return max_pool(v, 2, 2)
        return jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    graph = linear_bounds.build_graph(fn, jax.ShapeDtypeStruct(shape, jnp.float32))
    (node,) = [n for n in graph.nodes if n.kind == "max"]
    rng = np.random.default_rng(1)
    # Ties (several equal boxes, as ReLU outputs over a flat background), points, dominant and overlapping boxes.
    lower = np.round(rng.uniform(-1, 1, shape), 1).astype(np.float32)
    upper = lower + np.where(rng.uniform(size=shape) < 0.2, 0, np.round(rng.uniform(0, 2, shape), 1))
    lower[..., 1], upper[..., 1] = 0.0, 0.5
    def pool_input(v):                                                   # the nodes before the max (a reshape)
        for previous in graph.nodes[1:node.index]:
            v = previous.fn(v)
        return v
    lower_w, upper_w, constant = relaxation(node, pool_input(jnp.asarray(lower)), pool_input(jnp.asarray(upper)))
    corners = rng.uniform(size=(3000,) + shape) < 0.5
    samples = np.concatenate([np.where(corners, lower, upper),
                              lower + rng.uniform(size=(3000,) + shape) * (upper - lower)]).astype(np.float32)
    exact = fn(jnp.asarray(samples).reshape((-1,) + shape[1:]))[:, None]
    candidates = jax.vmap(lambda v: node.fn(pool_input(v), 0.0))(jnp.asarray(samples))
    below = (lower_w * candidates).sum(axis=1)
    above = (upper_w * candidates).sum(axis=1) + constant
    assert bool(jnp.all(below <= exact + 1e-5)) and bool(jnp.all(exact <= above + 1e-5))
    # Where one candidate dominates the others, the upper bound is that candidate itself (exact).
    low, up = node.fn(pool_input(jnp.asarray(lower)), -jnp.inf), node.fn(pool_input(jnp.asarray(upper)), -jnp.inf)
    best = jnp.argmax(low, axis=0)
    others = jnp.where(jax.nn.one_hot(best, low.shape[0], axis=0) > 0, -jnp.inf, up).max(axis=0)
    dominant = np.asarray(low.max(axis=0) >= others)
    assert dominant.any() and (~dominant).any()
    np.testing.assert_allclose(np.asarray(above)[:, dominant], np.asarray(exact)[:, dominant], atol=1e-5)
