"""Target labels for the attack: given, a random wrong label, the runner-up, or every wrong label."""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import checks
from jaxadv.attacks.config import AttackConfig
from jaxadv.attacks.lbfgs import AttackResult, lbfgs_attack


def random_wrong_targets(key: jax.Array, labels, num_classes: int = 10) -> jax.Array:
    """A label drawn uniformly from the num_classes - 1 wrong ones, per image (seeded by `key`)."""
    labels = _check_labels(labels, num_classes)
    offsets = jax.random.randint(key, labels.shape, 1, num_classes)
    return ((labels + offsets) % num_classes).astype(jnp.int32)


def runner_up_targets(logits, labels=None) -> jax.Array:
    """The highest-scoring class other than the true label (if `labels` is given) or the predicted class.

    With labels, the target is never the true class, so a misclassified image
    gets its (wrong) predicted class and the attack succeeds at distortion 0;
    without labels it is the second-highest logit (CleverHans' default).
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits: expected shape [batch, classes >= 2], got {logits.shape}")
    exclude = jnp.argmax(logits, axis=-1) if labels is None else jnp.asarray(_check_labels(labels, logits.shape[1]))
    if exclude.shape != logits.shape[:1]:
        raise ValueError(f"labels: expected shape {logits.shape[:1]}, got {exclude.shape}")
    excluded = jax.nn.one_hot(exclude, logits.shape[1], dtype=bool)
    pick = jnp.argmax(jnp.where(excluded, -jnp.inf, logits), axis=-1)
    # Where every other logit is -inf too, argmax may land on the excluded class: take the first other.
    pick = jnp.where(jnp.take_along_axis(excluded, pick[:, None], axis=-1)[:, 0], jnp.argmax(~excluded, axis=-1), pick)
    return pick.astype(jnp.int32)


def all_wrong_targets(labels, num_classes: int = 10) -> jax.Array:
    """[B, num_classes - 1]: every wrong label of each image, in the order label+1, label+2, ... (mod num_classes)."""
    labels = _check_labels(labels, num_classes)
    return ((labels[:, None] + jnp.arange(1, num_classes)) % num_classes).astype(jnp.int32)


class AllTargetsResult(NamedTuple):
    """The minimum over targets (`best`, `target`) and every target's own result (leading axis: target)."""
    best: AttackResult
    target: jax.Array
    per_target: AttackResult


def lbfgs_attack_all_targets(logits_fn: Callable, images, labels, config: AttackConfig = AttackConfig(),
                             num_classes: int | None = None, lower=0.0, upper=1.0, *, params=None) -> AllTargetsResult:
    """Attack every wrong label; per image keep the successful one with the smallest distortion.

    That minimum is the untargeted minimal distortion (the smallest r that
    changes the label at all). Iterations and evaluations of `best` are summed
    over all targets. Each target is one `lbfgs_attack` call on the same
    shapes (one compilation). num_classes: None (the model's), or the model's
    class count stated (checked: a smaller one would leave classes untried).
    logits_fn, params: the model, as for `lbfgs_attack`.
    """
    checked = checks.attack_inputs(logits_fn, images, labels, lower, upper, params=params)
    logits_fn, classes = checked.logits_fn, checked.num_classes
    if num_classes is None:
        num_classes = classes
    elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes != classes:
        raise ValueError(f"num_classes: {num_classes!r}, but logits_fn gives {classes} classes; "
                         "pass num_classes=None to use the model's")
    labels = jnp.asarray(checked.labels)
    all_targets = all_wrong_targets(labels, num_classes)
    results = [lbfgs_attack(logits_fn, checked.images, all_targets[:, k], config, checked.lower, checked.upper,
                            labels=labels)
               for k in range(num_classes - 1)]
    per_target = jax.tree.map(lambda *a: jnp.stack(a), *results)
    score = jnp.where(per_target.success, per_target.distortion, jnp.inf)           # [K-1, B]
    pick = jnp.argmin(score, axis=0)
    best = jax.tree.map(lambda a: jnp.take_along_axis(a, pick.reshape((1, -1) + (1,) * (a.ndim - 2)), 0)[0], per_target)
    best = best._replace(iterations=per_target.iterations.sum(0), evaluations=per_target.evaluations.sum(0))
    return AllTargetsResult(best=best, target=all_targets[jnp.arange(labels.shape[0]), pick], per_target=per_target)


def _check_labels(labels, num_classes):
    return jnp.asarray(checks.labels(labels, None, num_classes, "labels"), jnp.int32)
