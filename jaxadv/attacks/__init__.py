"""The paper's box-constrained L-BFGS attack (§4.1), batched on device.

    from jaxadv.attacks import lbfgs_attack, AttackConfig, random_wrong_targets
    result = lbfgs_attack(jax.tree_util.Partial(model.apply, params), images, targets)

`box_lbfgs`: projected L-BFGS for one flat box-constrained problem (ask/tell), the core of
    `jaxadv.optim.box_lbfgs` (the optax transformation that the attack's loop calls).
`lbfgs`: the attack (objective, per-image c search, lanes).
`boundary`: refinement to the nearest boundary point (SQP on the exact problem, then a
    boundary walk where the SQP stalls).
`exact`: the exact minimum of a linear model (a scipy reference).
`targets`: target-label helpers and the all-targets minimum.
`dataset`: the attack over a whole data set, for any model: sharded over every device, in
    resumable chunks (`attack_dataset`), with its sizes from the traced model (`attack_sizes`).
`sparse`: the exhaustive single-pixel search and the fewest pixels that change the label.
`fast`: FGSM / FGM, BIM / PGD, and the smallest fast-gradient step that succeeds.
`lanes`: the work queue every per-image attack runs on (a lane that finishes takes the next image).
`ddn`, `alma`, `fmn`, `deepfool`: the minimal-L2 attacks DDN, ALMA, FMN, DeepFool and SuperDeepFool.
`minimal`: `minimal_perturbation`, the per-image best of several attacks; `robust_accuracy_curve`.
"""
from jaxadv.box_lbfgs import BoxLBFGSConfig, BoxLBFGSState
from jaxadv.attacks.boundary import RefineConfig, RefineResult, refine_core
from jaxadv.attacks.projection import project_onto_cuts
from jaxadv.attacks.config import ATTACK_LBFGS, PENALTIES, UNTARGETED, AttackConfig, SearchConfig
from jaxadv.attacks.lbfgs import AttackResult, lbfgs_attack, lbfgs_attack_core, lbfgs_attack_untargeted
from jaxadv.attacks.dataset import (LBFGS_SOURCES, RESULT_FIELDS, AttackSizes, attack_dataset, attack_sizes,
                                    attack_source_fingerprint, select_images)
from jaxadv.attacks.fast import (FastResult, fast_gradient_direction, fgm, fgsm, minimal_fast_gradient, pgd,
                                 success_along_direction)
from jaxadv.attacks.sparse import MinPixelsResult, SinglePixelResult, min_pixels_attack, single_pixel_attack
from jaxadv.attacks.lanes import LaneAttack, run_lanes
from jaxadv.attacks.common import MinNormResult
from jaxadv.attacks.ddn import ddn
from jaxadv.attacks.alma import ALMAConfig, alma
from jaxadv.attacks.fmn import fmn
from jaxadv.attacks.deepfool import deepfool, superdeepfool
from jaxadv.attacks.minimal import (DEFAULT_ATTACKS, MinimalResult, minimal_perturbation, polished,
                                   robust_accuracy_curve)
from jaxadv.attacks.targets import (AllTargetsResult, all_wrong_targets, lbfgs_attack_all_targets,
                                    random_wrong_targets, runner_up_targets)

__all__ = ["AttackConfig", "SearchConfig", "ATTACK_LBFGS", "AttackResult", "AllTargetsResult", "BoxLBFGSConfig", "BoxLBFGSState", "PENALTIES", "UNTARGETED",
           "all_wrong_targets", "lbfgs_attack", "lbfgs_attack_all_targets", "lbfgs_attack_core",
           "lbfgs_attack_untargeted", "project_onto_cuts", "RefineConfig", "RefineResult", "refine_core",
           "random_wrong_targets", "runner_up_targets",
           "FastResult", "fast_gradient_direction", "fgm", "fgsm", "minimal_fast_gradient", "pgd", "success_along_direction",
           "MinPixelsResult", "SinglePixelResult", "min_pixels_attack", "single_pixel_attack",
           "AttackSizes", "LBFGS_SOURCES", "RESULT_FIELDS", "attack_dataset", "attack_sizes", "attack_source_fingerprint",
           "select_images"]
__all__ += ["LaneAttack", "run_lanes", "MinNormResult", "ddn", "ALMAConfig", "alma", "fmn", "deepfool", "superdeepfool",
            "DEFAULT_ATTACKS", "MinimalResult", "minimal_perturbation", "polished", "robust_accuracy_curve"]
