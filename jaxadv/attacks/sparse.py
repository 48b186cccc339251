"""Sparse changes: the best single pixel of every image, and the fewest pixels that change the label.

    from jaxadv.attacks import single_pixel_attack, min_pixels_attack
    one = single_pixel_attack(logits_fn, images, labels)         # every pixel, set to 0 and to 1
    few = min_pixels_attack(logits_fn, images, labels)           # greedy, one pixel at a time
    print(one.success.mean(), jnp.median(few.num_pixels[few.success]))

The question is the paper's summary's: "how a change in a single pixel could
cause a network to misclassify". Both searches minimise the untargeted margin
m(x) = Z_label(x) − max_{j≠label} Z_j(x) (logits); the label changes once m < 0.

**Single pixel, exhaustively.** For every image and every pixel p, the
candidate "x with x_p set to v" is evaluated for `num_values` values v evenly
spaced in [lower, upper] (default 2: the two bounds), as ordinary batched
forward passes of the model: n·V candidates per image, `images_per_pass` images
at a time under `lax.map`, so memory stays bounded whatever N. The result is the
candidate of smallest margin, and success is recomputed on it.

*When the bounds are exact.* For a linear model (softmax regression, FC10(λ)),
each logit is affine in x_p, so m(v) = Z_label(v) − max_j Z_j(v) is an affine
function minus a maximum of affine functions: concave in v. A concave function
on an interval attains its minimum at an endpoint, so scanning {lower, upper} is
exact, for any number of classes. For sigmoid or ReLU nets a logit is a sum of
monotone units of both signs, m(v) can dip inside the interval, and the bounds
are not guaranteed (the tiny sigmoid net of `tests/test_sparse.py` has pixels whose
best value is inside). Measured on the Fashion-MNIST zoo (`experiments.sparse_and_fast`,
100 test images per model, 17 values against the bounds): for none of the six
Table 1 models did the finer scan flip an image the bounds did not, or lower any
image's best margin; see that experiment's `table.md` for the share of single
pixels whose own best value is inside. So the bounds are the default; pass
num_values = 17 or 33 to scan inside. The cost is 784·2 forward passes per image
(timings in docs/benchmarks.md).

**Fewest pixels, greedily** (`min_pixels_attack`). Step 1 is the exhaustive
single-pixel search above, so the count is 1 exactly when `single_pixel_attack`
succeeds. Each later step keeps the pixels already set and sets one more: the
`shortlist` pixels with the best first-order gain (JSMA's saliency: the margin's
gradient g at the current image, g_p·(v − x_p) minimised over the values) are
evaluated exactly at every value, and the best exact margin is taken. The
shortlist is the cost/quality knob: `shortlist=None` evaluates every pixel at
every step (exhaustive greedy). The default of 32 gave the exhaustive greedy's
count on every one of 200 test images of two zoo models, in less time
(docs/benchmarks.md). `tests/test_sparse.py` holds the exhaustive mode
to a Python greedy loop. Images run in `lanes` (as the L-BFGS attack
does): a lane whose image succeeds, or reaches `max_pixels`, takes the next
image, so a fast image never waits for a slow one. A greedy count is an upper
bound on the true minimum (which is combinatorial), except at 1, where it is exact.

Every row's arithmetic is its own (fixed shapes, padding with copies of the
first image), so an image's result does not depend on its batch position.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxadv import checks


class SinglePixelResult(NamedTuple):
    """Per image (leading axis = batch).

    adversarial: the image with its best pixel set (same shape as the input).
    success: argmax of logits_fn(adversarial) != label, recomputed on it.
    pixel: the flat index of the best pixel; value: the value it is set to.
    margin: the untargeted margin of the best candidate (from the scan; < 0 flips).
    pixel_margin: [N, *shape] the smallest margin each pixel reaches alone
      (< 0: that pixel alone flips the label); pixel_value: the value that reaches it.
    """
    adversarial: jax.Array
    success: jax.Array
    pixel: jax.Array
    value: jax.Array
    margin: jax.Array
    pixel_margin: jax.Array
    pixel_value: jax.Array


class MinPixelsResult(NamedTuple):
    """Per image. num_pixels: pixels changed in `adversarial` (0 if the image was already
    not classified as its label; `max_pixels` with success False if the search gave up).
    success: recomputed on `adversarial`. l0: the same count read from the images (pixels
    that differ), l2: ‖adversarial − x‖₂."""
    adversarial: jax.Array
    success: jax.Array
    num_pixels: jax.Array
    l0: jax.Array
    l2: jax.Array


def margin(logits, labels):
    """Z_label − max_{j≠label} Z_j over the last axis (labels broadcast against logits[..., 0])."""
    labels = jnp.asarray(labels, jnp.int32)
    mine = jnp.arange(logits.shape[-1]) == labels[..., None]
    z_label = jnp.sum(jnp.where(mine, logits, 0), axis=-1)
    return z_label - jnp.max(jnp.where(mine, -jnp.inf, logits), axis=-1)


def _pad(tree, multiple):
    """Pad the leading axis to a multiple with copies of row 0 (harmless: rows are independent)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    extra = -n % multiple
    if not extra:
        return tree
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)]), tree)


def _recompute_success(logits_fn, adversarial, labels):
    return jnp.argmax(logits_fn(adversarial), axis=-1) != labels


@functools.partial(jax.jit, static_argnames=("num_values", "images_per_pass"))
def single_pixel_core(logits_fn, images, labels, lower, upper, num_values: int = 2,
                      images_per_pass: int = 8) -> SinglePixelResult:
    """The compiled search on validated arrays (see `single_pixel_attack`); lower, upper: scalars."""
    num_images, shape = images.shape[0], images.shape[1:]
    n = math.prod(shape)
    dtype = images.dtype
    values = jnp.linspace(jnp.asarray(lower, dtype), jnp.asarray(upper, dtype), num_values).astype(dtype)
    eye = jnp.eye(n, dtype=bool)

    def one_image(args):
        x, label = args                                                 # [n], []

        def at_value(v):                                                # every pixel of x set to v: [n]
            candidates = jnp.where(eye, v, x[None, :]).reshape((n,) + shape)
            return margin(logits_fn(candidates), label)

        margins = jax.lax.map(at_value, values)                         # [V, n]
        best = jnp.argmin(margins, axis=0)                              # first value on ties
        return jnp.min(margins, axis=0), values[best]

    flat = images.reshape(num_images, n)
    padded = _pad((flat, labels), images_per_pass)
    pixel_margin, pixel_value = jax.lax.map(one_image, padded, batch_size=images_per_pass)
    pixel_margin, pixel_value = pixel_margin[:num_images], pixel_value[:num_images]
    pixel = jnp.argmin(pixel_margin, axis=-1).astype(jnp.int32)
    rows = jnp.arange(num_images)
    value = pixel_value[rows, pixel]
    adversarial = flat.at[rows, pixel].set(value).reshape(images.shape)
    return SinglePixelResult(adversarial=adversarial,
                             success=_recompute_success(logits_fn, adversarial, labels),
                             pixel=pixel, value=value, margin=pixel_margin[rows, pixel],
                             pixel_margin=pixel_margin.reshape(images.shape),
                             pixel_value=pixel_value.reshape(images.shape))


class _Lanes(NamedTuple):
    image_index: jax.Array  # [L] the index of the image a lane works on (N: idle)
    x: jax.Array            # [L, n]
    changed: jax.Array      # [L, n] bool
    count: jax.Array        # [L]
    next_slot: jax.Array    # position in the queue of the next image to load
    out_x: jax.Array        # [N, n]
    out_count: jax.Array    # [N]


@functools.partial(jax.jit, static_argnames=("num_values", "max_pixels", "shortlist", "lanes", "images_per_pass"))
def min_pixels_core(logits_fn, images, labels, lower, upper, num_values: int = 2, max_pixels: int = 100,
                    shortlist: int | None = 32, lanes: int = 64, images_per_pass: int = 8) -> MinPixelsResult:
    """The compiled greedy search on validated arrays (see `min_pixels_attack`); lower, upper: scalars."""
    num_images, shape = images.shape[0], images.shape[1:]
    n = math.prod(shape)
    dtype = images.dtype
    k = n if shortlist is None else min(shortlist, n)
    values = jnp.linspace(jnp.asarray(lower, dtype), jnp.asarray(upper, dtype), num_values).astype(dtype)
    flat = images.reshape(num_images, n)
    # Already not classified as the label: 0 pixels. Otherwise step 1 is the exhaustive single-pixel search.
    wrong = _recompute_success(logits_fn, images, labels)
    first = single_pixel_core(logits_fn, images, labels, lower, upper, num_values=num_values,
                              images_per_pass=images_per_pass)
    rows = jnp.arange(num_images)
    x1 = first.adversarial.reshape(num_images, n)
    changed1 = jnp.zeros((num_images, n), bool).at[rows, first.pixel].set(True) & (x1 != flat)
    start_x = jnp.where(wrong[:, None], flat, x1)
    start_count = jnp.where(wrong, 0, 1).astype(jnp.int32)
    needs_more = ~wrong & ~first.success & (max_pixels > 1)
    # The queue: images that need more steps, in batch order (stable sort); `waiting` of them.
    queue = jnp.argsort(~needs_more, stable=True).astype(jnp.int32)
    waiting = jnp.sum(needs_more)
    lane_rows = jnp.arange(lanes)

    def load(state: _Lanes, free):
        """Lanes in `free` take the next images of the queue (or go idle: image N)."""
        slot = state.next_slot + jnp.cumsum(free) - 1
        take = free & (slot < waiting)
        idle_or_kept = jnp.where(free, num_images, state.image_index)
        image_index = jnp.where(take, queue[jnp.clip(slot, 0, num_images - 1)], idle_or_kept)
        safe = jnp.clip(image_index, 0, num_images - 1)
        x = jnp.where(take[:, None], start_x[safe], state.x)
        changed = jnp.where(take[:, None], changed1[safe], state.changed)
        count = jnp.where(take, start_count[safe], state.count)
        return state._replace(image_index=image_index, x=x, changed=changed, count=count,
                              next_slot=state.next_slot + jnp.sum(free))

    def step(state: _Lanes):
        active = state.image_index < num_images
        label = labels[jnp.clip(state.image_index, 0, num_images - 1)]
        x, changed = state.x, state.changed
        # Saliency: first-order change of the margin for each pixel and value; changed pixels and
        # "set to its own value" are not candidates.
        grad = jax.grad(lambda z: jnp.sum(margin(logits_fn(z.reshape((lanes,) + shape)), label)))(x)
        delta = values[None, None, :] - x[:, :, None]                                    # [L, n, V]
        invalid = changed[:, :, None] | (delta == 0)
        gain = jnp.min(jnp.where(invalid, jnp.inf, grad[:, :, None] * delta), axis=-1)    # [L, n]
        _, pick = jax.lax.top_k(-gain, k)                                               # [L, k], ties: lowest index
        # Exact margins of the shortlist at every value: [L, k, V].
        candidates = jnp.broadcast_to(x[:, None, None, :], (lanes, k, num_values, n))
        onehot = jax.nn.one_hot(pick, n, dtype=bool)[:, :, None, :]
        candidates = jnp.where(onehot, values[None, None, :, None], candidates)
        logits = logits_fn(candidates.reshape((lanes * k * num_values,) + shape))
        exact = margin(logits, jnp.repeat(label, k * num_values)).reshape(lanes, k, num_values)
        exact = jnp.where(jnp.take_along_axis(invalid, pick[:, :, None], axis=1), jnp.inf, exact)
        best = jnp.argmin(exact.reshape(lanes, -1), axis=-1)
        has_candidate = jnp.isfinite(jnp.min(exact.reshape(lanes, -1), axis=-1))
        p = pick[lane_rows, best // num_values]
        v = values[best % num_values]
        move = active & has_candidate
        x = jnp.where(move[:, None], x.at[lane_rows, p].set(v), x)
        changed = changed | (move[:, None] & (jnp.arange(n) == p[:, None]))
        count = state.count + move
        flipped = jnp.argmax(logits_fn(x.reshape((lanes,) + shape)), axis=-1) != label
        finished = active & (flipped | (count >= max_pixels) | ~has_candidate)
        write = jnp.where(finished, state.image_index, num_images)                      # N: dropped
        state = state._replace(x=x, changed=changed, count=count,
                               out_x=state.out_x.at[write].set(x, mode="drop"),
                               out_count=state.out_count.at[write].set(count, mode="drop"))
        return load(state, finished | ~active)

    def running(state: _Lanes):
        return jnp.any(state.image_index < num_images)

    init = _Lanes(image_index=jnp.full((lanes,), num_images, jnp.int32), x=jnp.zeros((lanes, n), dtype),
                  changed=jnp.zeros((lanes, n), bool), count=jnp.zeros((lanes,), jnp.int32),
                  next_slot=jnp.int32(0), out_x=start_x, out_count=start_count)
    final = jax.lax.while_loop(running, step, load(init, jnp.ones((lanes,), bool)))
    adversarial = final.out_x.reshape(images.shape)
    difference = final.out_x - flat
    return MinPixelsResult(adversarial=adversarial, success=_recompute_success(logits_fn, adversarial, labels),
                           num_pixels=final.out_count, l0=jnp.sum(difference != 0, axis=-1).astype(jnp.int32),
                           l2=jnp.sqrt(jnp.sum(difference * difference, axis=-1)))


# -- public entry points (inputs checked in NumPy before anything is compiled) ----------------------

def single_pixel_attack(logits_fn: Callable, images, labels, *, num_values: int = 2, lower=0.0, upper=1.0,
                        images_per_pass: int = 8, params=None) -> SinglePixelResult:
    """Every pixel of every image set to each of `num_values` values in [lower, upper]; the best per image.

    logits_fn: pure [B, *shape] -> [B, classes], or with `params` a flax module (params: its variables) or a
    function apply(params, x) (`jaxadv.functional.logits_function`); images: [B, *shape] floating in
    [lower, upper] (scalars); labels: [B] ints, the class to move away from (the
    true label or the model's prediction). num_values = 2 scans the bounds (exact
    for linear models, see the module's docstring); images_per_pass bounds the
    memory: images_per_pass · n · n values per forward pass. Bad input raises
    ValueError/TypeError naming the argument before anything is compiled.
    """
    logits_fn, images, labels, lower, upper = validate(logits_fn, images, labels, lower, upper, num_values=num_values,
                                                       images_per_pass=images_per_pass, params=params)
    return single_pixel_core(logits_fn, images, labels, lower, upper, num_values=num_values,
                             images_per_pass=images_per_pass)


def min_pixels_attack(logits_fn: Callable, images, labels, *, max_pixels: int = 100, shortlist: int | None = 32,
                      num_values: int = 2, lower=0.0, upper=1.0, lanes: int = 64,
                      images_per_pass: int = 8, params=None) -> MinPixelsResult:
    """The fewest pixels (greedy; exact at 1) whose change moves `logits_fn` off `labels`.

    Step 1 is `single_pixel_attack`; then one pixel per step, the best exact margin
    among the `shortlist` pixels of largest first-order gain (None: every pixel).
    max_pixels: give up after this many (success False). lanes: images in flight at
    once; each step costs lanes · shortlist · num_values forward rows and one gradient.
    logits_fn, params: the model, as for `single_pixel_attack`.
    """
    if shortlist is not None:
        checks.int_at_least(shortlist, "shortlist", 1)
    checks.int_at_least(max_pixels, "max_pixels", 1)
    checks.int_at_least(lanes, "lanes", 1)
    logits_fn, images, labels, lower, upper = validate(logits_fn, images, labels, lower, upper, num_values=num_values,
                                                       images_per_pass=images_per_pass, params=params)
    return min_pixels_core(logits_fn, images, labels, lower, upper, num_values=num_values, max_pixels=max_pixels,
                           shortlist=shortlist, lanes=lanes, images_per_pass=images_per_pass)


def validate(logits_fn, images, labels, lower, upper, *, num_values, images_per_pass, params=None):
    """The checks of a sparse or fast-gradient attack's entry (`checks.attack_inputs`, scalar bounds): returns
    (logits_fn, images, labels, lower, upper) as traceable arrays of the work dtype, the box rounded inward."""
    checks.int_at_least(num_values, "num_values", 2)
    checks.int_at_least(images_per_pass, "images_per_pass", 1)
    checked = checks.attack_inputs(logits_fn, images, labels, lower, upper, params=params, scalar_bounds=True)
    dtype = checks.work_dtype(checked.images)
    return (checked.logits_fn, jnp.asarray(checked.images, dtype), jnp.asarray(checked.labels, jnp.int32),
            jnp.asarray(checked.lower, dtype), jnp.asarray(checked.upper, dtype))
