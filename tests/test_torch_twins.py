"""scripts/torch_twins.py: PyTorch twins compute the flax models' logits and input gradients (skipped without torch)."""
import os

import jax
import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch = pytest.importorskip("torch")

from jaxadv.models import get_model  # noqa: E402
from scripts.bench_models import reference_cnn, relu_cnn  # noqa: E402
from scripts.torch_twins import _TieSplittingMaxPool, check_twin, torch_twin  # noqa: E402


def _images(n=24, seed=0):
    """Images with flat zero backgrounds, where max-pool windows tie, and textured digits."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28, 1), np.float32)
    images[:, 6:22, 8:20] = rng.uniform(0, 1, (n, 16, 12, 1))
    return images


@pytest.mark.parametrize("name", ["FC100-100-10", "ConvNet", "relu_cnn", "reference_cnn"])
def test_twin_has_the_same_logits_and_gradients(name):
    images = _images()
    if name in ("relu_cnn", "reference_cnn"):
        module = relu_cnn() if name == "relu_cnn" else reference_cnn()
        variables = module.init(jax.random.PRNGKey(1), images[:1])
    else:
        module, variables = get_model(name).module, get_model(name).init(jax.random.PRNGKey(1))
    # Positive biases make a flat background's activations tie inside each pooling window.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.05 if "bias" in jax.tree_util.keystr(path) else v, variables)
    logits_difference, gradient_difference = check_twin(jax.tree_util.Partial(module.apply, variables),
                                                        torch_twin(module, variables), images, name=name)
    assert logits_difference < 1e-5 and gradient_difference < 1e-2


def test_tie_splitting_pool_is_needed_for_the_zoo_convnet():
    """With torch's own max pool (all of a tied window's gradient to one entry) the check fails."""
    module, variables = get_model("ConvNet").module, get_model("ConvNet").init(jax.random.PRNGKey(1))
    variables = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.05 if "bias" in jax.tree_util.keystr(path) else v, variables)
    twin = torch_twin(module, variables)
    for index, layer in enumerate(twin):
        if isinstance(layer, _TieSplittingMaxPool):
            twin[index] = torch.nn.MaxPool2d(2, 2)
    with pytest.raises(AssertionError, match="gradients differ"):
        check_twin(jax.tree_util.Partial(module.apply, variables), twin, _images(), name="ConvNet")


def test_untranslatable_layer_is_named():
    import flax.linen as nn
    with pytest.raises(ValueError, match="layer 1"):
        torch_twin(nn.Sequential((nn.Dense(4), nn.tanh)), {"params": {"layers_0": {
            "kernel": np.zeros((3, 4), np.float32), "bias": np.zeros(4, np.float32)}}})
