"""The paper's box-constrained L-BFGS attack (§4.1), batched on device.

    from jaxadv.attacks import lbfgs_attack, AttackConfig, random_wrong_targets
    result = lbfgs_attack(jax.tree_util.Partial(model.apply, params), images, targets)

`box_lbfgs`: projected L-BFGS for one flat box-constrained problem (ask/tell).
`lbfgs`: the attack (objective, per-image c search, lanes).
`targets`: target-label helpers and the all-targets minimum.
"""
from jaxadv.attacks.box_lbfgs import BoxLBFGSConfig, BoxLBFGSState, minimize_box
from jaxadv.attacks.lbfgs import PENALTIES, AttackConfig, AttackResult, lbfgs_attack, lbfgs_attack_core
from jaxadv.attacks.targets import (AllTargetsResult, all_wrong_targets, lbfgs_attack_all_targets,
                                    random_wrong_targets, runner_up_targets)

__all__ = ["AttackConfig", "AttackResult", "AllTargetsResult", "BoxLBFGSConfig", "BoxLBFGSState", "PENALTIES",
           "all_wrong_targets", "lbfgs_attack", "lbfgs_attack_all_targets", "lbfgs_attack_core", "minimize_box",
           "random_wrong_targets", "runner_up_targets"]
