"""PyTorch twins of flax models, for running PyTorch attack libraries (adv_lib) on the same weights.

    from scripts.torch_twins import torch_twin, check_twin
    twin = torch_twin(module, params)          # a torch.nn.Module taking the same NHWC images
    check_twin(jax_logits_fn, twin, images)    # raises unless the logits and gradients agree to ~1e-5

Bench code, not the library: `jaxadv` never imports torch. Set OMP_WAIT_POLICY=PASSIVE
before importing this module (torch's OpenMP threads otherwise spin on shared cores).

A twin is a plain `torch.nn.Sequential` built from the flax `nn.Sequential`'s layers, with the
same values and the same gradients (up to float rounding; `check_twin` compares both):
`nn.Dense`, `nn.Conv` (SAME or VALID padding, any stride; XLA's SAME split, odd pixel after),
`nn.relu`, `nn.sigmoid`, flatten, and max or average pooling (`jaxadv.models.max_pool` or a
`functools.partial` of `flax.linen.max_pool` / `avg_pool`). It takes images as jaxadv holds them,
NHWC, turns them to NCHW once before the first convolution, and back to NHWC before flattening,
so that the dense layer after a flatten sees the features in flax's order.
"""
from __future__ import annotations

import functools
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jaxadv.models import flatten as zoo_flatten, max_pool as zoo_max_pool  # noqa: E402


class _ToNCHW(torch.nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


class _FlattenNCHW(torch.nn.Module):
    """Flatten NCHW activations in flax's order: back to NHWC first."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1)


class _SamePad(torch.nn.Module):
    """XLA's SAME padding for one convolution or pooling: the odd pixel goes after."""

    def __init__(self, window, stride):
        super().__init__()
        self.window, self.stride = window, stride

    def forward(self, x):
        pads = []
        for size, window, stride in zip(reversed(x.shape[2:]), reversed(self.window), reversed(self.stride)):
            out = -(-size // stride)
            total = max((out - 1) * stride + window - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


class _TieSplittingMaxPool(torch.nn.Module):
    """`jaxadv.models.max_pool` with window == stride: each window's max, its gradient split equally among
    the entries that tie for it, as JAX's max is differentiated (torch's MaxPool2d gives it all to one).

    The tie matters: on a flat background a convolution's output is its bias, equal across a window.
    """

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(self, x):
        k = self.window
        x = x[:, :, :x.shape[2] // k * k, :x.shape[3] // k * k]
        top = F.max_pool2d(x, k, k).detach()
        tied = (x == top.repeat_interleave(k, 2).repeat_interleave(k, 3)).to(x.dtype)
        # The value is the max, exactly; the gradient is tied / count, spread over the tied entries.
        spread = F.avg_pool2d((x - x.detach()) * tied, k, k) / F.avg_pool2d(tied, k, k)
        return top + spread


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _conv(layer: nn.Conv, variables) -> list:
    kernel = np.asarray(variables["kernel"])                       # HWIO
    if layer.feature_group_count != 1 or (layer.kernel_dilation not in (None, 1, (1, 1))):
        raise ValueError(f"torch_twin: only plain convolutions are supported, got {layer}")
    stride = _pair(layer.strides or 1)
    conv = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2], stride=stride,
                           bias=layer.use_bias)
    conv.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    if layer.use_bias:
        conv.bias.data = torch.from_numpy(np.asarray(variables["bias"]).copy())
    padding = layer.padding if isinstance(layer.padding, str) else None
    if padding == "SAME":
        return [_SamePad(kernel.shape[:2], stride), conv]
    if padding == "VALID":
        return [conv]
    raise ValueError(f"torch_twin: convolution padding must be 'SAME' or 'VALID', got {layer.padding!r}")


def _dense(layer: nn.Dense, variables) -> list:
    kernel = np.asarray(variables["kernel"])
    linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1], bias=layer.use_bias)
    linear.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.T))
    if layer.use_bias:
        linear.bias.data = torch.from_numpy(np.asarray(variables["bias"]).copy())
    return [linear]


def _pool(layer) -> list | None:
    """The torch pooling of a pooling layer, or None if `layer` is not one."""
    if not isinstance(layer, functools.partial):
        return None
    keywords = layer.keywords
    if layer.func is zoo_max_pool:
        if keywords["window"] == keywords["stride"]:
            return [_TieSplittingMaxPool(keywords["window"])]
        # Overlapping windows: jaxadv's max_pool is XLA's reduce_window, whose gradient goes to one entry.
        return [torch.nn.MaxPool2d(_pair(keywords["window"]), _pair(keywords["stride"]))]
    if layer.func in (nn.max_pool, nn.avg_pool):
        window = tuple(keywords["window_shape"])
        stride = tuple(keywords.get("strides") or (1,) * len(window))
        padding = keywords.get("padding", "VALID")
        if padding not in ("VALID", "SAME") or (padding == "SAME" and layer.func is nn.avg_pool):
            raise ValueError(f"torch_twin: pooling padding {padding!r} is not supported")
        pool = torch.nn.MaxPool2d(window, stride) if layer.func is nn.max_pool else torch.nn.AvgPool2d(window, stride)
        # -inf padding for a max: torch's MaxPool2d pads with -inf itself only symmetrically.
        return ([_SamePad(window, stride)] if padding == "SAME" else []) + [pool]
    return None


def torch_twin(module: nn.Sequential, variables) -> torch.nn.Sequential:
    """A float32 `torch.nn.Sequential` computing what `module.apply(variables, x)` does, for NHWC `x`.

    Args:
      module: a flax `nn.Sequential` of the layers listed in the module docstring.
      variables: its variables, {"params": {"layers_<i>": ...}}.

    Raises ValueError naming the first layer it cannot translate.
    """
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"module: expected a flax nn.Sequential, got {type(module).__name__}")
    params = variables["params"]
    layers, channels_first = [], False
    for index, layer in enumerate(module.layers):
        if isinstance(layer, nn.Conv):
            if not channels_first:
                layers.append(_ToNCHW())
                channels_first = True
            layers += _conv(layer, params[f"layers_{index}"])
        elif isinstance(layer, nn.Dense):
            layers += _dense(layer, params[f"layers_{index}"])
        elif layer is nn.relu:
            layers.append(torch.nn.ReLU())
        elif layer is nn.sigmoid:
            layers.append(torch.nn.Sigmoid())
        elif layer is zoo_flatten:
            layers.append(_FlattenNCHW() if channels_first else torch.nn.Flatten())
            channels_first = False
        elif (pool := _pool(layer)) is not None:
            if not channels_first:
                layers.append(_ToNCHW())
                channels_first = True
            layers += pool
        else:
            raise ValueError(f"torch_twin: layer {index} ({layer!r}) has no PyTorch translation")
    twin = torch.nn.Sequential(*layers).float().eval()
    for parameter in twin.parameters():
        parameter.requires_grad_(False)
    return twin


def twin_logits(twin: torch.nn.Module, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """The twin's logits of NHWC `images`, as a float32 numpy array."""
    with torch.no_grad():
        return np.concatenate([twin(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))).numpy()
                               for i in range(0, len(images), batch_size)])


def check_twin(logits_fn, twin: torch.nn.Module, images: np.ndarray, atol: float = 1e-5, rtol: float = 1e-5,
               name: str = "model", gradient_images: int = 64, gradient_rtol: float = 1e-2) -> tuple[float, float]:
    """The largest |JAX − torch| difference of the logits on `images`, and of the input gradients of a
    fixed random combination of the logits on the first `gradient_images`, relative to the gradient's
    norm, per image; AssertionError unless the logits are within atol + rtol·|logit| and the
    gradients within gradient_rtol.

    Equal logits are not enough: the attacks follow gradients, and where two subgradients are
    valid (a max pool's tied window) the twin must pick JAX's.
    """
    jax_logits = np.asarray(jax.jit(logits_fn)(images), np.float32)
    difference = np.abs(twin_logits(twin, images) - jax_logits)
    bad = difference > atol + rtol * np.abs(jax_logits)
    if bad.any():
        raise AssertionError(f"{name}: the torch twin's logits differ from JAX's by up to {difference.max():.3g} "
                             f"on {int(bad.any(axis=1).sum())} of {len(images)} images")
    x = np.ascontiguousarray(images[:gradient_images])
    weights = np.random.default_rng(0).standard_normal(jax_logits[:len(x)].shape).astype(np.float32)
    jax_gradient = np.asarray(jax.grad(lambda v: jnp.sum(logits_fn(v) * weights))(x))
    inputs = torch.from_numpy(x).requires_grad_(True)
    torch_gradient = torch.autograd.grad((twin(inputs) * torch.from_numpy(weights)).sum(), inputs)[0].numpy()
    # Per image, the relative L2 difference: values within an ulp of a window's max tie in one framework
    # and not the other, which moves a few pixels' gradients; a wrong rule for ties moves many.
    per_image = lambda g: np.sqrt(np.sum(np.square(g.reshape(len(x), -1).astype(np.float64)), -1))
    gradient_difference = float(np.max(per_image(torch_gradient - jax_gradient) / per_image(jax_gradient)))
    if gradient_difference > gradient_rtol:
        raise AssertionError(f"{name}: the torch twin's input gradients differ from JAX's by up to "
                             f"{gradient_difference:.3g} of their norm")
    return float(difference.max()), gradient_difference


class _CountBackward(torch.autograd.Function):
    """The identity, counting the rows of every gradient that flows back through it."""

    @staticmethod
    def forward(ctx, x, counter):
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.counter.gradients += grad.shape[0]
        return grad, None


class CountedModel(torch.nn.Module):
    """`model` counting its gradients: image rows of every backward pass to the input (a Jacobian's K count K)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.gradients = 0

    def forward(self, x):
        return self.model(_CountBackward.apply(x, self) if x.requires_grad else x)
