"""One way in for any model (jaxadv.functional): the forms agree, wrong calls are named, compilations are reused."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxadv.attacks import ATTACK_LBFGS, AttackConfig, RefineConfig, SearchConfig, lbfgs_attack
from jaxadv.attacks.lbfgs import lbfgs_attack_core
from jaxadv.functional import (INPUT, check_logits_call, hidden_layers, logits_function, representation_bounds,
                               split_sequential)
from jaxadv.models import flatten, get_model

#: A cheap attack: the tests here are about calls and compilations, not minimality.
QUICK = AttackConfig(search=SearchConfig(max_bracket_steps=2, bisection_steps=1),
                     lbfgs=ATTACK_LBFGS._replace(max_iterations=10), refine=RefineConfig(steps=0), lanes=8)


class SmallNet(nn.Module):
    """A user's model, written as a compact module (not a Sequential)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _images(n=6, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (n, 8, 8, 1))


def _variables(seed):
    return SmallNet().init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 1)))


def test_every_form_of_a_model_gives_the_same_logits():
    x, variables = _images(), _variables(0)
    expected = SmallNet().apply(variables, x)
    apply = SmallNet().apply
    forms = [logits_function(SmallNet(), variables), logits_function(apply, variables),
             logits_function(lambda v, x: SmallNet().apply(v, x), variables),
             logits_function(jax.tree_util.Partial(apply, variables)),
             logits_function(functools.partial(apply, variables)), logits_function(lambda x: apply(variables, x))]
    for form in forms:
        assert isinstance(form, jax.tree_util.Partial)
        np.testing.assert_array_equal(form(x), expected)
    # A functools.partial over arrays becomes a Partial whose arrays are leaves (traced, not baked in).
    assert len(jax.tree.leaves(forms[4])) == len(jax.tree.leaves(variables))
    # Two equal modules share the static part, so jit keys on it once.
    assert jax.tree.structure(forms[0]) == jax.tree.structure(logits_function(SmallNet(), _variables(1)))


def test_a_wrong_call_is_named_with_its_fix():
    x, variables = _images(), _variables(0)
    targets = jnp.zeros(6, jnp.int32)
    # module.apply without its variables: the message names the argument and says what to pass.
    with pytest.raises(TypeError, match=r"logits_fn: SmallNet.apply takes the variables first.*params=variables"):
        lbfgs_attack(SmallNet().apply, x, targets)
    with pytest.raises(TypeError, match=r"logits_fn: a flax module needs its variables: pass params=variables"):
        lbfgs_attack(SmallNet(), x, targets)
    # apply(params, x) passed alone: calling it with one argument fails, and the error says how to call it.
    with pytest.raises(TypeError, match=r"logits_fn: calling it on a batch of shape \(2, 8, 8, 1\) failed.*params="):
        lbfgs_attack(lambda params, x: SmallNet().apply(params, x), x, targets)
    # A function of one image (no batch axis) is named, with jax.vmap as the fix.
    with pytest.raises(ValueError, match=r"logits_fn: returned shape \(3,\) for a batch of 2.*jax.vmap"):
        lbfgs_attack(lambda x: SmallNet().apply(variables, x).sum(0), x, targets)
    with pytest.raises(TypeError, match=r"model: expected a flax module or a function, got ZooModel \(a zoo model: "
                                        r"pass model.module"):
        logits_function(get_model("FC10(1)"))
    with pytest.raises(TypeError, match="model: expected a flax module or a function, got int"):
        logits_function(3)
    assert check_logits_call(logits_function(SmallNet(), variables), (8, 8, 1)) == 3


def test_new_parameters_of_one_architecture_compile_the_attack_once():
    """The loop over checkpoints: five parameter sets, one compilation (a fresh closure per call: five)."""
    x, targets = _images(), jnp.full(6, 1, jnp.int32)
    lbfgs_attack(SmallNet(), x, targets, QUICK, params=_variables(99))     # compiled once, before counting
    before = lbfgs_attack_core._cache_size()
    results = [lbfgs_attack(SmallNet(), x, targets, QUICK, params=_variables(seed)) for seed in range(5)]
    assert lbfgs_attack_core._cache_size() == before
    assert len({float(r.l2.sum()) for r in results}) == 5       # five models, five answers
    for seed in range(5):                                        # the same through module.apply and a Partial
        variables = _variables(seed)
        np.testing.assert_array_equal(lbfgs_attack(SmallNet().apply, x, targets, QUICK, params=variables).l2,
                                      results[seed].l2)
    assert lbfgs_attack_core._cache_size() == before
    # The counter can fail: a closure per call is a new function to jit, each a compilation.
    for seed in range(2):
        variables = _variables(seed)
        lbfgs_attack(lambda x, v=variables: SmallNet().apply(v, x), x, targets, QUICK)
    assert lbfgs_attack_core._cache_size() == before + 2


def test_a_sequential_cut_at_each_layer_and_its_boxes():
    module = nn.Sequential([flatten, nn.Dense(5), nn.sigmoid, nn.Dense(4), nn.relu, nn.Dense(3)])   # a list: unhashable
    variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 2, 2, 1))
    assert hidden_layers(module) == (2, 4)
    for layer in (INPUT, 0, 1, 2, 3, 4):
        below, above = split_sequential(module, layer)
        np.testing.assert_allclose(above(variables, below(variables, x)), module.apply(variables, x), rtol=1e-6)
    assert [representation_bounds(module, k) for k in (INPUT, 1, 2, 3, 4)] == [
        (0.0, 1.0), (-np.inf, np.inf), (0.0, 1.0), (-np.inf, np.inf), (0.0, np.inf)]
    with pytest.raises(ValueError, match=r"layer: must be in \[-1, 5\)"):
        split_sequential(module, 5)
    with pytest.raises(TypeError, match="module: cutting a network at a hidden layer needs a flax nn.Sequential"):
        split_sequential(SmallNet(), 0)
    # An unhashable Sequential still keys a jit cache (by identity): the attack runs on its head.
    head = logits_function(split_sequential(module, 2)[1], variables)
    h = split_sequential(module, 2)[0](variables, x)
    result = lbfgs_attack(head, h, jnp.argmin(head(h), -1).astype(jnp.int32), QUICK)
    assert result.adversarial.shape == h.shape




def test_a_sweep_over_checkpoints_compiles_once(tmp_path, compilations):
    """attack_dataset over five parameter sets of one architecture: the first call compiles, the others reuse it."""
    from jaxadv.attacks import attack_dataset
    x, targets = _images(40), np.full(40, 1, np.int32)
    sweep = functools.partial(attack_dataset, config=QUICK, chunk_size=20, block_size=20, progress=False)
    sweep(SmallNet(), x, targets, tmp_path / "warm", params=_variables(99))
    before = len(compilations)
    outs = [sweep(SmallNet(), x, targets, tmp_path / f"ckpt{seed}", params=_variables(seed)) for seed in range(5)]
    assert len(compilations) == before, compilations[before:]
    assert len({float(out["l2"].sum()) for out in outs}) == 5
    # The counter sees compilations: a closure per call compiles anew.
    sweep(lambda x: SmallNet().apply(_variables(7), x), x, targets, tmp_path / "closure")
    assert len(compilations) > before


def test_wrappers_of_one_module_never_share_a_compilation():
    """ModuleApply(m) and LastDenseInput(m) hold the same module but are different functions: jit must not mix them."""
    from jaxadv.functional import LastDenseInput, ModuleApply
    from jaxadv.units import layer_features
    x, variables = _images(5), _variables(0)
    assert ModuleApply(SmallNet()) != LastDenseInput(SmallNet()) and not ModuleApply(SmallNet()) == LastDenseInput(SmallNet())
    assert ModuleApply(SmallNet()) == ModuleApply(SmallNet()) and not ModuleApply(SmallNet()) != ModuleApply(SmallNet())
    for _ in range(2):     # alternate: each call must get its own program
        assert layer_features(LastDenseInput(SmallNet()), x, params=variables).shape == (5, 4 * 4 * 4)
        assert layer_features(SmallNet(), x, params=variables).shape == (5, 3)
    with pytest.raises(TypeError, match=r"features_fn: LastDenseInput is a function of \(variables, x\): pass params="):
        layer_features(LastDenseInput(SmallNet()), x)
    # A function of one image is told about jax.vmap, in every analysis.
    from jaxadv.transfer import predictions
    per_image = lambda image: image.reshape(-1)[:3]    # noqa: E731
    with pytest.raises((TypeError, ValueError), match="jax.vmap"):
        predictions(per_image, x)
    with pytest.raises((TypeError, ValueError), match="jax.vmap"):
        layer_features(lambda image: jnp.dot(jnp.ones((3, 8)), image[:, :, 0]), x)
