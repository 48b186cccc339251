"""One work queue for every per-image attack: a lane that finishes takes the next image.

    attack = LaneAttack(init, step, done)            # pure functions of ONE image's state
    final = run_lanes(attack, inputs, lanes=32)      # every image's final state, in input order

An attack is written the optax way, as pure functions on a NamedTuple state of
one image: `init(inputs) -> state` (inputs: one image's slice of the `inputs`
pytree), `step(state) -> state` (one model evaluation, say) and
`done(state) -> bool`. `run_lanes` vmaps them over a fixed number of lanes and
runs a `lax.while_loop`: every iteration steps all lanes, and on the
iterations where some lane is done (a `lax.cond`, so the common iteration pays
nothing for it) it stores those lanes' states, in place, at their images'
positions and starts the next waiting images in them. Attacks with a fixed
step count finish all their lanes together; DeepFool's lanes finish when
their images do.

Every image is stepped at least once, and is stored at the first check after a
step where `done` holds. Each lane's arithmetic is its own and the lane count
fixes every shape, so an image gets the same bits in any batch, at any
position, in any lane. Another lane count is another vmapped program, whose
rounding may differ in the last bit: most attacks then drift by a few ulps,
but ALMA's RMSProp iterates amplify it (about 2% in L2 on a tiny ReLU net),
so fix `lanes` where results must be reproduced bit for bit.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class LaneAttack(NamedTuple):
    """The pure per-image functions of an attack (see the module docstring).

    output: what `run_lanes` keeps of a finished image's state (None: the
      whole state); a small output spares the [num_images, ...] store the
      state's big working arrays (an L-BFGS memory, say).
    """
    init: Callable[[Any], Any]
    step: Callable[[Any], Any]
    done: Callable[[Any], jax.Array]
    output: Callable[[Any], Any] | None = None


class _Queue(NamedTuple):
    states: Any          # [lanes, ...] the lanes' current states
    image_index: jax.Array  # [lanes] which image each lane serves (num_images: idle)
    next_image_index: jax.Array  # the first image not yet started
    finished: Any        # [num_images, ...] the stored outputs of the final states
    steps: jax.Array     # loop iterations so far


def run_lanes(attack: LaneAttack, inputs, lanes: int, max_steps: int | None = None):
    """Runs `attack` on every image of `inputs`, `lanes` images at a time; returns the final outputs.

    attack: a `LaneAttack`. inputs: a pytree of arrays with a leading image axis
      [num_images, ...] (e.g. the images, labels and bounds); lanes: a static
      int >= 1, the number of images stepped together (more than num_images is
      allowed: the extra lanes idle on copies of the first image).
    max_steps: a cap on the loop's iterations (None: none); at the cap the
      running images keep the output of their current state, and images never
      started that of their initial state.
    Returns the pytree of final outputs (`attack.output` of each final state,
    or the state) with a leading axis [num_images], in input order. Safe
    under jit (static shapes only).
    """
    num_images = jax.tree.leaves(inputs)[0].shape[0]
    output = attack.output or (lambda state: state)
    init, step, done = jax.vmap(attack.init), jax.vmap(attack.step), jax.vmap(attack.done)
    output_lanes = jax.vmap(output)

    def take(index):
        return jax.tree.map(lambda a: a[jnp.minimum(index, num_images - 1)], inputs)

    first = jnp.arange(lanes)
    states = init(take(first))
    if max_steps is None:
        finished = jax.tree.map(lambda a: jnp.zeros((num_images,) + a.shape[1:], a.dtype), output_lanes(states))
    else:
        finished = jax.vmap(lambda one: output(attack.init(one)))(inputs)
    queue = _Queue(states, jnp.where(first < num_images, first, num_images), jnp.asarray(min(lanes, num_images)),
                   finished, jnp.zeros((), jnp.int32))

    def store(queue, ended):
        # the ended lanes' outputs at their images (idle lanes write out of range: dropped)
        slot = jnp.where(ended, queue.image_index, num_images)
        return jax.tree.map(lambda f, s: f.at[slot].set(s, mode="drop"), queue.finished, output_lanes(queue.states))

    def refill(queue, ended):
        # 1. store the ended lanes' outputs
        finished = store(queue, ended)
        # 2. hand the next images, in lane order, to the ended lanes
        image_index = queue.next_image_index + jnp.cumsum(ended) - 1
        image_index = jnp.where(image_index < num_images, image_index, num_images)
        # (a scatter into the ended lanes, not a select over all: it updates the states in place, so the
        #  loop carries them through the `cond` without a copy on the iterations that refill nothing)
        lane = jnp.where(ended, jnp.arange(lanes), lanes)
        states = jax.tree.map(lambda old, new: old.at[lane].set(new, mode="drop"), queue.states, init(take(image_index)))
        return _Queue(states, jnp.where(ended, image_index, queue.image_index), queue.next_image_index + jnp.sum(ended), finished,
                      queue.steps)

    def body(queue):
        queue = queue._replace(states=step(queue.states), steps=queue.steps + 1)
        ended = done(queue.states) & (queue.image_index < num_images)
        return jax.lax.cond(jnp.any(ended), refill, lambda q, _: q, queue, ended)

    def running(queue):
        busy = jnp.any(queue.image_index < num_images)
        return busy if max_steps is None else busy & (queue.steps < max_steps)

    queue = jax.lax.while_loop(running, body, queue)
    if max_steps is None:
        return queue.finished
    return store(queue, queue.image_index < num_images)     # the images still running at the cap
