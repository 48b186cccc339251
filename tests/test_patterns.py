"""The pattern pass (jaxadv.patterns on jaxadv.graph) against plain-convolution twins and dense spectral norms.

A convolution written as im2col, after a zero or a wrap padding, must be bounded
exactly as the same convolution written with `lax.conv_general_dilated`, and
never below the operator's true norm (the largest singular value of its dense
Jacobian, NumPy's SVD in float64); the rewritten graph must compute what the
traced function computes.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv import graph, linear_bounds, lipschitz, patterns


def dense_norm(linear_fn, input_shape) -> float:
    jacobian = jax.jacfwd(linear_fn)(jnp.zeros(input_shape, jnp.float32))
    return float(np.linalg.norm(np.asarray(jacobian, np.float64).reshape(-1, math.prod(input_shape)), 2))


def pad(x, padding, k):
    mode = "wrap" if padding == "CIRCULAR" else "constant"
    return jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode=mode)


def im2col(x, kernel, stride, padding):
    """A convolution as shifted slices, concatenated and multiplied by a matrix (jaxadv.models.conv2d's way)."""
    k, _, _, features = kernel.shape
    x = pad(x, padding, k) if padding != "VALID" else x
    out_h, out_w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    views = [x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
             for i in range(k) for j in range(k)]
    return jnp.concatenate(views, axis=-1) @ kernel.reshape(-1, features)


def xla(x, kernel, stride, padding):
    """The twin: the same padding by jnp.pad, then XLA's VALID convolution."""
    x = pad(x, padding, kernel.shape[0]) if padding != "VALID" else x
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("padding, stride", [("SAME", 1), ("SAME", 2), ("VALID", 2), ("CIRCULAR", 1),
                                             ("CIRCULAR", 2)])
def test_im2col_and_padded_convolutions_are_bounded_as_their_plain_twins(padding, stride):
    kernel = jax.random.normal(jax.random.PRNGKey(stride), (3, 3, 2, 4))
    shape = (1, 8, 8, 2)
    x = jax.random.normal(jax.random.PRNGKey(9), shape)
    np.testing.assert_allclose(im2col(x, kernel, stride, padding), xla(x, kernel, stride, padding), atol=1e-5)
    rows = {}
    for name, conv in (("im2col", im2col), ("xla", xla)):
        (rows[name],) = lipschitz.operator_bounds(lambda v: conv(v, kernel, stride, padding), x).rows
    exact = dense_norm(lambda v: xla(v, kernel, stride, padding), shape)
    for key in ("layer", "kind", "shape", "stride"):
        assert rows["im2col"][key] == rows["xla"][key]
    assert rows["im2col"]["layer"] == "Conv. 1" and rows["im2col"]["lipschitz_in"] == 1.0
    assert rows["im2col"]["upper_bound"] == pytest.approx(rows["xla"]["upper_bound"], rel=1e-6)
    assert rows["im2col"]["upper_bound"] >= exact * (1 - 1e-5)
    if padding == "CIRCULAR":   # wrapped around: a circular convolution, whose Fourier norm is the norm
        assert rows["im2col"]["upper_bound"] == pytest.approx(exact, rel=1e-4)
    # Read op by op, the patches would be bounded by √9 · ‖W‖ (3 · the matrix's norm), the pad by 1.
    assert rows["im2col"]["upper_bound"] < 3 * np.linalg.norm(np.asarray(kernel).reshape(-1, 4), 2)


def net(x, kernel, w):
    """Each pattern once: a zero-padded and a wrapped im2col convolution, a leaky ReLU, an average pool."""
    h = jax.nn.leaky_relu(im2col(x, kernel, 1, "SAME"), 0.2)
    h = im2col(h, jnp.transpose(kernel, (0, 1, 3, 2))[..., :2] * 0.5, 1, "CIRCULAR")
    h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0
    return h.reshape(h.shape[0], -1) @ w


def test_the_pattern_pass_rewrites_each_pattern_and_computes_what_the_trace_computes():
    kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (4 * 4 * 2, 3))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 2))
    closed = jax.make_jaxpr(lambda v: net(v, kernel, w))(x)
    flat, consts = graph.flatten(closed)
    rewritten = graph.simplify(flat, consts, patterns.PATTERNS)
    names = [eqn.primitive.name for eqn in rewritten.eqns]
    assert names.count("convolution") == 2 and names.count("leaky_relu") == 1 and names.count("average") == 1
    depends = graph.depends_on_input(rewritten)
    on_path = [eqn.primitive.name for eqn in rewritten.eqns if any(v in depends for v in eqn.outvars)]
    assert not {"concatenate", "pad", "slice", "select_n", "ge", "reduce_window_sum"} & set(on_path)
    (out,) = graph.Walker({}, lambda v: False, "evaluation", "").run(rewritten, consts, [x])
    np.testing.assert_allclose(out, net(x, kernel, w), rtol=1e-5, atol=1e-5)
    # A walk that reads no synthetic equation walks into the equations it replaced, as into a call.
    rows = [row["layer"] for row in lipschitz.operator_bounds(lambda v: net(v, kernel, w), x[:1]).rows]
    assert rows == ["Conv. 1", "Leaky ReLU", "Conv. 2", "Avg-pool", "Flatten", "FC. 1"]


def test_a_network_of_every_pattern_is_bounded_by_the_product_of_its_dense_norms():
    kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (4 * 4 * 2, 3))
    bounds = lipschitz.operator_bounds(lambda v: net(v, kernel, w), jnp.zeros((1, 8, 8, 2)))
    by_layer = {row["layer"]: row["upper_bound"] for row in bounds.rows}
    conv1 = dense_norm(lambda v: im2col(v, kernel, 1, "SAME"), (1, 8, 8, 2))
    second = jnp.transpose(kernel, (0, 1, 3, 2))[..., :2] * 0.5
    conv2 = dense_norm(lambda v: im2col(v, second, 1, "CIRCULAR"), (1, 8, 8, 4))
    assert by_layer["Conv. 1"] >= conv1 * (1 - 1e-5)
    assert by_layer["Conv. 2"] == pytest.approx(conv2, rel=1e-4)   # circular: exact
    assert by_layer["Avg-pool"] == pytest.approx(0.5)               # 2×2 windows, stride 2: 1/√4
    assert by_layer["Leaky ReLU"] == 1.0
    assert bounds.network_bound == pytest.approx(math.prod(row["upper_bound"] for row in bounds.rows), rel=1e-6)


def test_a_primitive_without_a_rule_is_refused_with_where_to_add_one_in_both_analyses():
    fn = jax.jit(lambda x: jnp.exp(x) @ jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"no Lipschitz rule for the primitive 'exp' on the input's path "
                                         r"\(inside jit\(<lambda>\)\); jaxadv\.lipschitz\.RULES maps .*docstring"):
        lipschitz.operator_bounds(fn, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"no linear-bound rule for the primitive 'exp'.*"
                                         r"jaxadv\.linear_bounds\.RULES maps .*docstring"):
        linear_bounds.build_graph(fn, jax.ShapeDtypeStruct((1, 4), jnp.float32))
    assert "To add one" in lipschitz.__doc__ and "RULES[primitive name] = rule" in lipschitz.__doc__


def test_the_rewritten_graph_evaluates_under_jit_with_the_weights_as_arguments():
    """Weights passed to jit are tracers, constants of the inner trace: no pattern may need their values."""
    kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (4 * 4 * 2, 3))
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 2))

    def rewritten(k, m, v):
        flat, consts = graph.flatten(jax.make_jaxpr(lambda u: net(u, k, m))(v))
        simplified = graph.simplify(flat, consts, patterns.PATTERNS)
        assert sum(eqn.primitive is patterns.CONVOLUTION for eqn in simplified.eqns) == 2
        return graph.Walker({}, lambda value: False, "evaluation", "").run(simplified, consts, [v])[0]

    compiled = jax.jit(rewritten)
    np.testing.assert_allclose(compiled(kernel, w, x), net(x, kernel, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compiled(-kernel, w, x), net(x, -kernel, w), rtol=1e-5, atol=1e-5)
    assert compiled._cache_size() == 1
