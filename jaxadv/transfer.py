"""Cross-model and cross-training-set transfer of perturbed images (§4.2, Tables 2-4).

The paper's transfer tables are one computation: feed every perturbed set to
every model and count how often the model no longer predicts the *original*
label (the paper's "error induced"). The rows are adversarial sets made for
each model, or random-noise controls; the last column is each set's average
distortion. This module holds the pieces as pure functions:

    sets = [PerturbedSet(x, adv_for_model_a, y), PerturbedSet(x, gaussian_noise(key, x, 0.1), y)]
    table = transfer_table([logits_a, logits_b], sets)
    table.error_rates            # [num_sets, num_models] fractions
    table.av_distortion          # [num_sets] mean per-pixel RMS distortion
    transfer_versus_noise(table.error_rates[:k], table.error_rates[k], names)  # the paper's claim, cell by cell

Distortion is the paper's per-pixel RMS, sqrt(Σ(x'−x)²/n), averaged over a set.
Noise and rescaled perturbations are clipped to the valid image box [0, 1] by
default, and the distortion reported is always the one actually applied.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import checks
from jaxadv.report import percent

LogitsFn = Callable[[jax.Array], jax.Array]

#: Rows evaluated per call to a logits function; a fixed size keeps shapes static under jit.
DEFAULT_BATCH_SIZE = 1000
#: Bisection steps for the clipped rescaling: float32 has 24 mantissa bits, 60 halvings is past them.
_BISECTION_STEPS = 60


class PerturbedSet(NamedTuple):
    """Perturbed images with the clean images they came from and those images' true labels."""
    originals: jax.Array   # [N, *image_shape]
    images: jax.Array      # [N, *image_shape]
    labels: jax.Array      # [N] int, true labels of `originals`


class TransferTable(NamedTuple):
    """Error of each model on each set, and each set's distortion."""
    error_rates: np.ndarray     # [num_sets, num_models] fraction misclassified w.r.t. the true label
    av_distortion: np.ndarray   # [num_sets] mean per-image per-pixel RMS distortion
    set_sizes: np.ndarray       # [num_sets] images per set


# -- distortion ---------------------------------------------------------------

def distortions(originals: jax.Array, images: jax.Array) -> jax.Array:
    """Per-image distortion sqrt(Σ(x'−x)²/n): the per-pixel RMS of the perturbation, shape [N]."""
    originals, images = _check_pair(originals, images)
    diff = (images - originals).reshape(images.shape[0], -1)
    return jnp.sqrt(jnp.mean(diff ** 2, axis=1))


def average_distortion(originals: jax.Array, images: jax.Array) -> float:
    """The paper's "average distortion" of a set: the mean over images of `distortions`."""
    return float(jnp.mean(distortions(originals, images)))


# -- controls and rescaled perturbations ------------------------------------

def gaussian_noise(key: jax.Array, images: jax.Array, stddev: float, *,
                   clip: bool = True, lower: float = 0.0, upper: float = 1.0) -> jax.Array:
    """`images` + N(0, stddev²) per pixel, drawn from `key`; clipped to [lower, upper] unless `clip=False`.

    Clipping keeps the result a valid image, so the applied distortion is below
    `stddev` wherever pixels sit near a bound (measure it with `distortions`).
    """
    given = images
    images = _as_float_images(images, "images")
    stddev = checks.positive_finite(stddev, images.dtype, "stddev", allow_zero=True)
    box = checks.box(lower, upper, images, scalar=True, strict=True)
    if clip:
        images = jnp.asarray(checks.in_range(given, np.asarray(images), *box, (lower, upper)))
    lower, upper = box
    noisy = images + stddev * jax.random.normal(key, images.shape, images.dtype)
    return jnp.clip(noisy, lower, upper) if clip else noisy


def rescale_perturbations(originals: jax.Array, images: jax.Array, rms: float, *,
                          clip: bool = True, lower: float = 0.0, upper: float = 1.0) -> jax.Array:
    """Each image's perturbation stretched along its own direction to a per-pixel RMS of `rms`.

    Without clipping this is x + s·(x'−x) with s = rms·√n / ‖x'−x‖₂: the direction
    is kept exactly and the RMS is exact. With clipping (the default) it returns
    clip(x + s·(x'−x)) with s found by bisection so that the perturbation *after
    clipping* has RMS `rms`: the image stays valid, every pixel moves the way the
    original perturbation moved it, and the distortion is still the one requested.
    If even s → ∞ cannot reach `rms` (the perturbation runs into the box on too
    many pixels) the result is the saturated image, i.e. the largest reachable
    distortion. An image with zero perturbation has no direction and is returned
    unchanged.
    """
    given = originals, images
    originals, images = _check_pair(originals, images)
    rms = checks.positive_finite(rms, images.dtype, "rms", allow_zero=True)
    box = checks.box(lower, upper, images, scalar=True, strict=True)
    if clip:
        originals = jnp.asarray(checks.in_range(given[0], np.asarray(originals), *box, (lower, upper), "originals"))
        images = jnp.asarray(checks.in_range(given[1], np.asarray(images), *box, (lower, upper), "images"))
    lower, upper = box
    shape = originals.shape
    flat = (originals.reshape(shape[0], -1), images.reshape(shape[0], -1))
    return _rescale_flat(*flat, jnp.float32(rms), jnp.float32(lower), jnp.float32(upper), clip).reshape(shape)


@functools.partial(jax.jit, static_argnames="clip")
def _rescale_flat(x, x_adv, rms, lower, upper, clip):
    d = x_adv - x
    norm = jnp.sqrt(jnp.sum(d ** 2, axis=1, keepdims=True))
    has_direction = norm > 0
    scale_exact = jnp.where(has_direction, rms * np.sqrt(x.shape[1]) / jnp.where(has_direction, norm, 1.0), 0.0)
    if not clip:
        return x + scale_exact * d

    def clipped_rms(scale):
        return jnp.sqrt(jnp.mean((jnp.clip(x + scale * d, lower, upper) - x) ** 2, axis=1, keepdims=True))

    # Clipping only removes distance, so the clipped RMS at the exact scale is <= rms:
    # the root lies above it. Beyond the scale at which every moving pixel has hit
    # its bound the RMS is flat, so that scale bounds the root from above.
    room = jnp.where(d > 0, upper - x, x - lower)
    saturation = jnp.max(jnp.where(d != 0, room / jnp.where(d != 0, jnp.abs(d), 1.0), 0.0), axis=1, keepdims=True)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = clipped_rms(mid) < rms
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    _, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, bisect, (scale_exact, jnp.maximum(saturation, scale_exact)))
    # The upper end reaches rms whenever rms is reachable, and is the saturated image when not.
    return jnp.clip(x + hi * d, lower, upper)


# -- error rates ----------------------------------------------------------------

def predictions(logits_fn: LogitsFn, images: jax.Array, batch_size: int = DEFAULT_BATCH_SIZE, *,
                params=None) -> np.ndarray:
    """argmax of `logits_fn` over `images`, evaluated in fixed-size batches (the last one padded).

    With `params`, `logits_fn` is a flax module or a function apply(params, x) (`jaxadv.logits_function`).
    """
    images = _as_float_images(images, "images")
    logits_fn, _ = checks.model(logits_fn, params, images)
    return _predictions(logits_fn, images, batch_size)


def _predictions(logits_fn, images: jax.Array, batch_size: int, argument: str = "logits_fn") -> np.ndarray:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = images.shape[0]
    batch = min(batch_size, max(n, 1))
    padded = -(-n // batch) * batch
    images = jnp.concatenate([images, jnp.zeros((padded - n,) + images.shape[1:], images.dtype)])
    # The model is an argument (its parameters traced), so one compile serves every model of one architecture.
    logits = [np.asarray(_logits(logits_fn, images[i:i + batch])) for i in range(0, padded, batch)]
    logits = np.concatenate(logits)[:n] if logits else np.zeros((0, 2), np.float32)
    bad = int(np.sum(~np.all(np.isfinite(logits.reshape(n, -1)), axis=-1)))
    if bad:    # argmax would read NaN as class 0: refused in the same pass, before any rate is formed
        raise ValueError(f"{argument}: returned NaN or infinite logits for {bad} of {n} images")
    return np.argmax(logits, axis=-1)


@jax.jit
def _logits(logits_fn, x):
    return logits_fn(x)


def error_rate_matrix(logits_fns: Sequence[LogitsFn], image_sets: Sequence[jax.Array],
                      labels: Sequence[jax.Array], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Entry [s, m]: the fraction of image_sets[s] that logits_fns[m] does not classify as labels[s].

    Each model is a logits function, or a pair (model, params): a flax module and its variables, or a
    function apply(params, x) and its parameters.
    """
    logits_fns = [checks.model(*fn, name=f"logits_fns[{i}]")[0] if type(fn) is tuple
                  else checks.model(fn, name=f"logits_fns[{i}]")[0] for i, fn in enumerate(logits_fns)]
    if len(image_sets) != len(labels):
        raise ValueError(f"image_sets and labels must have the same length, got {len(image_sets)} and {len(labels)}")
    if len(logits_fns) == 0:
        raise ValueError("logits_fns must name at least one model")
    rates = np.zeros((len(image_sets), len(logits_fns)), np.float64)
    for s, (images, y) in enumerate(zip(image_sets, labels)):
        if np.shape(images)[:1] == (0,):
            raise ValueError(f"image_sets[{s}] is empty: an error rate needs at least one image")
        images = _as_float_images(images, f"image_sets[{s}]")
        if s == 0:           # each model's call checked once, not once per set
            classes = min(checks.model(fn, None, images, name=f"logits_fns[{m}]", images_name=f"image_sets[{s}]")[1]
                          for m, fn in enumerate(logits_fns))
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != images.shape[0]:
            raise ValueError(f"labels[{s}] must have shape [{images.shape[0]}] to match image_sets[{s}], got {y.shape}"
                             f"{checks.batch_axis_hint(logits_fns[0], images)}")
        y = checks.labels(y, images.shape[0], classes, f"labels[{s}]")
        for m, logits_fn in enumerate(logits_fns):
            rates[s, m] = np.mean(_predictions(logits_fn, images, batch_size, f"logits_fns[{m}]") != y)
    return rates


def transfer_table(logits_fns: Sequence[LogitsFn], sets: Sequence[PerturbedSet],
                   batch_size: int = DEFAULT_BATCH_SIZE) -> TransferTable:
    """Every model's error on every set, with each set's average distortion and size."""
    sets = [PerturbedSet(*s) for s in sets]
    rates = error_rate_matrix(logits_fns, [s.images for s in sets], [s.labels for s in sets], batch_size)
    av = np.array([average_distortion(s.originals, s.images) for s in sets], np.float64)
    sizes = np.array([np.shape(s.images)[0] for s in sets], np.int64)
    return TransferTable(rates, av, sizes)


def transfer_versus_noise(adversarial_rates, noise_rates, names: Sequence[str]) -> dict:
    """Which off-diagonal transfer cells exceed a noise row's error on the same model (column).

    `adversarial_rates` [k, k]: row i is the set made for model i; `noise_rates` [k]:
    one noise row. The paper's claim is that sets made for another model fool a
    model more often than (larger) random noise does; a tie does not count as more.
    Returns {"cells", "above_noise", "not_above": [{made_for, fed_to, transfer, noise}]}.
    """
    k = len(names)
    if np.shape(adversarial_rates) != (k, k) or np.shape(noise_rates) != (k,):
        raise ValueError(f"adversarial_rates must be [{k}, {k}] and noise_rates [{k}] for {k} names, "
                         f"got {np.shape(adversarial_rates)} and {np.shape(noise_rates)}")
    adversarial_rates, noise_rates = np.asarray(adversarial_rates), np.asarray(noise_rates)
    cells = [(i, j) for i in range(len(names)) for j in range(len(names)) if i != j]
    not_above = [{"made_for": names[i], "fed_to": names[j], "transfer": float(adversarial_rates[i, j]),
                  "noise": float(noise_rates[j])} for i, j in cells if adversarial_rates[i, j] <= noise_rates[j]]
    return {"cells": len(cells), "above_noise": len(cells) - len(not_above), "not_above": not_above}


def gaussian_noise_sets(key: jax.Array, images: jax.Array, labels, stddevs: Sequence[float]) -> list[PerturbedSet]:
    """One clipped Gaussian-noise control set per stddev, each drawn from its own key `fold_in(key, i)`.

    The transfer tables' noise rows: random distortions to set beside the adversarial ones.
    """
    checks.labels(labels, np.shape(checks.images(images))[0], None)
    for i, stddev in enumerate(stddevs):
        checks.positive_finite(stddev, np.float64, f"stddevs[{i}]", allow_zero=True)
    return [PerturbedSet(images, gaussian_noise(jax.random.fold_in(key, i), images, s), labels)
            for i, s in enumerate(stddevs)]


def describe_transfer_versus_noise(comparison: dict, noise_label: str) -> str:
    """One sentence from `transfer_versus_noise`'s result: how many cells beat the noise, and which did not."""
    text = (f"Off-diagonal transfer above {noise_label} on the same model: "
            f"{comparison['above_noise']} of {comparison['cells']} cells.")
    if comparison["not_above"]:
        text += " Not above: " + "; ".join(f"{c['made_for']} → {c['fed_to']} {percent(c['transfer'], 1)} vs "
                                           f"{percent(c['noise'], 1)}" for c in comparison["not_above"]) + "."
    return text


# -- validation -------------------------------------------------------------------

def _as_float_images(images, name: str) -> jax.Array:
    """`images` [N, ...] in their work dtype (`checks.images`; an empty set passes, for empty predictions)."""
    if np.shape(images)[:1] == (0,) and len(np.shape(images)) >= 2:
        checks.work_dtype(np.asarray(images))
        return jnp.asarray(images)
    return jnp.asarray(checks.images(images, name))


def _check_pair(originals, images) -> tuple[jax.Array, jax.Array]:
    originals = _as_float_images(originals, "originals")
    images = _as_float_images(images, "images")
    if originals.shape != images.shape:
        raise ValueError(f"originals and images must have the same shape, got {originals.shape} and {images.shape}")
    return originals, images
