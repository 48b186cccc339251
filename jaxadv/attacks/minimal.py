"""The smallest change of label: the per-image best of several minimal-L2 attacks, and robust accuracy from it.

    from jaxadv.attacks import minimal_perturbation, robust_accuracy_curve
    best = minimal_perturbation(model, images, labels, params=variables)
    print(best.success.mean(), jnp.median(best.l2), best.attack, best.gradients.mean())
    accuracy = robust_accuracy_curve(best.l2, best.success, jnp.linspace(0, 3, 31))

No single minimal-norm attack wins on every model (AttackBench, Cinà et al.
2024), so a serious evaluation reports, per image, the smallest perturbation
that any of several attacks found. `minimal_perturbation` runs each attack of
`attacks` on every image and keeps, per image, the smallest successful one and
which attack found it.

`polished(attack)` follows an attack with the L-BFGS attack's untargeted
refinement (`boundary.refine_core`: SQP onto the nearest linearised
boundary, then a DDN-like walk along the boundary where the SQP stalls) from
each point the attack found: the gradient attacks end near the right
boundary but not on its nearest point, and a few dozen refinement gradients
close the gap. The default set, ALMA (500 steps) polished beside
`lbfgs_attack_untargeted`, about 860 gradients per image on the zoo's ConvNet,
was the best pair or triple within 1,000 gradients among our attacks on the
zoo's ConvNet and FC100-100-10 (200 Fashion-MNIST test images each);
scripts/bench_optimality.py measures it against adv_lib's attacks.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.attacks.common import Best, MinNormResult, finish, validate
from jaxadv.attacks.alma import alma
from jaxadv.attacks.boundary import RefineConfig, refine_core
from jaxadv.attacks.lbfgs import lbfgs_attack_untargeted

#: The polish of `polished`: the untargeted refinement, 20 SQP steps then at most 60 walk steps.
POLISH = RefineConfig(steps=20, cuts=4, untargeted=True, walk_steps=60)


def polished(attack: Callable, config: RefineConfig = POLISH, lanes: int = 32) -> Callable:
    """`attack` followed by the boundary refinement from each of its successful points.

    attack: called as attack(logits_fn, images, labels, lower=, upper=); config:
    an untargeted `RefineConfig` (untargeted=True); lanes: the refinement's lanes.
    Returns an attack of the same call whose result is a `MinNormResult`
    (an image keeps the refined point where it is adversarial and closer;
    gradients add the refinement's).
    """
    if not isinstance(config, RefineConfig) or not config.untargeted:
        raise TypeError("config: expected an untargeted RefineConfig (untargeted=True)")

    def run(logits_fn, images, labels, *, lower=0.0, upper=1.0):
        result = _as_min_norm(attack(logits_fn, images, labels, lower=lower, upper=upper))
        logits_fn, images, labels, lower_b, upper_b = validate(logits_fn, images, labels, lower, upper, None,
                                                               counts={}, lanes=lanes)
        return polish_result(logits_fn, images, labels, lower_b, upper_b, result, config=config, lanes=lanes)
    return run


#: (name, attack) pairs; an attack is called as attack(logits_fn, images, labels, lower=, upper=) and returns
#: adversarial, success, l2, and gradients (or the L-BFGS attack's evaluations) per image.
DEFAULT_ATTACKS = (
    ("alma+polish", polished(functools.partial(alma, steps=500))),
    ("lbfgs_untargeted", lbfgs_attack_untargeted),
)


class MinimalResult(NamedTuple):
    """Per image (leading axis = batch): the smallest perturbation found by any attack.

    adversarial, success, l2: the winning attack's (the image itself, False
      and 0 where every attack failed). attack: the index in `attacks` of the
      winner (-1 where none succeeded). gradients: model gradient evaluations
      of every attack together. l2_by_attack: [B, attacks] each attack's L2
      (inf where it failed).

    An image the model already misclassifies needs no change: success True, l2
    0, the image itself (exclude it with `model(images).argmax(-1) == labels`).
    """
    adversarial: jax.Array
    success: jax.Array
    l2: jax.Array
    attack: jax.Array
    gradients: jax.Array
    l2_by_attack: jax.Array


def minimal_perturbation(model, images, labels, *, params=None,
                         attacks: Sequence[tuple[str, Callable]] = DEFAULT_ATTACKS, lower=0.0,
                         upper=1.0) -> MinimalResult:
    """The documented one call for the smallest change of label, untargeted, in L2.

    model, params: any model (`jaxadv.functional.logits_function`). images:
      [B, ...] floating, inside [lower, upper]; labels: [B] the true classes.
    attacks: (name, attack) pairs, each called as
      attack(logits_fn, images, labels, lower=lower, upper=upper); e.g.
      ("ddn", functools.partial(ddn, steps=300)). Default `DEFAULT_ATTACKS`.
    lower, upper: the box, broadcastable to images.
    """
    if isinstance(attacks, (str, bytes)) or not isinstance(attacks, Sequence) or not attacks or not all(
            isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str) and callable(a[1]) for a in attacks):
        raise TypeError("attacks: expected a non-empty sequence of (name, attack) pairs")
    logits_fn, images, labels, _, _ = validate(model, images, labels, lower, upper, params, counts={}, lanes=1)
    results = [_as_min_norm(attack(logits_fn, images, labels, lower=lower, upper=upper)) for _, attack in attacks]
    return best_of(images, results)


def _as_min_norm(result) -> MinNormResult:
    gradients = result.gradients if hasattr(result, "gradients") else result.evaluations
    return MinNormResult(result.adversarial, result.success, result.l2, jnp.asarray(gradients, jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "lanes"))
def polish_result(logits_fn, images, labels, lower, upper, result: MinNormResult, *, config: RefineConfig,
                  lanes: int) -> MinNormResult:
    """`result` refined towards the nearest boundary point (`refine_core` from each successful point);
    an image keeps the refined point where it is adversarial and closer. lower/upper shaped as images."""
    num_images = images.shape[0]
    flat = lambda a: a.reshape(num_images, -1)
    refined = refine_core(logits_fn, flat(images), flat(result.adversarial), labels, result.success, flat(lower),
                          flat(upper), config=config, lanes=lanes, shape=images.shape[1:])
    candidate = finish(logits_fn, images, labels, Best(refined.best, refined.l2), refined.evaluations, lanes, False)
    better = candidate.success & (~result.success | (candidate.l2 < result.l2))
    point = jnp.where(better[:, None], flat(candidate.adversarial), flat(result.adversarial))
    return finish(logits_fn, images, labels, Best(point, jnp.zeros(num_images, images.dtype)),
                  result.gradients + refined.evaluations, lanes, False)


def best_of(images, results) -> MinimalResult:
    """Per image, the smallest successful result of `results` (each with adversarial, success, l2 and
    gradients or evaluations), and which one it is."""
    l2 = jnp.stack([jnp.where(r.success, r.l2, jnp.inf) for r in results], -1)
    winner = jnp.argmin(l2, -1)
    success = jnp.isfinite(jnp.min(l2, -1))
    adversarial = jnp.stack([r.adversarial for r in results])[winner, jnp.arange(images.shape[0])]
    adversarial = jnp.where(success.reshape((-1,) + (1,) * (images.ndim - 1)), adversarial, images)
    gradients = sum(_as_min_norm(r).gradients for r in results)
    return MinimalResult(adversarial, success, jnp.where(success, jnp.min(l2, -1), 0).astype(images.dtype),
                         jnp.where(success, winner, -1).astype(jnp.int32), gradients, l2)


def robust_accuracy_curve(distances, success, epsilons) -> jax.Array:
    """Robust accuracy at each ε: the share of images whose label no perturbation of norm ≤ ε changed.

    distances: [B] each image's smallest perturbation found (any norm); success:
      [B] bool, whether one was found (an image already misclassified counts as
      distance 0, success True); epsilons: [E] the budgets. Returns [E]: the
      mean over images of not (success and distance ≤ ε), the curve
      AttackBench's optimality score integrates.
    """
    distances, success, epsilons = np.asarray(distances), np.asarray(success), np.asarray(epsilons)
    if distances.ndim != 1 or success.shape != distances.shape:
        raise ValueError(f"distances, success: expected two [B] arrays, got {distances.shape} and {success.shape}")
    if success.dtype != bool:
        raise TypeError(f"success: expected booleans, got {success.dtype}")
    if epsilons.ndim != 1 or not np.issubdtype(epsilons.dtype, np.number):
        raise ValueError(f"epsilons: expected a 1-D array of numbers, got shape {epsilons.shape}")
    if distances.size == 0:
        raise ValueError("distances: empty")
    broken = jnp.asarray(success)[None, :] & (jnp.asarray(distances)[None, :] <= jnp.asarray(epsilons)[:, None])
    return 1.0 - jnp.mean(broken, axis=-1)
