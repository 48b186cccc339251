"""The attacks: the paper's box-constrained L-BFGS (§4.1) and the minimal-L2 and fast attacks beside it.

    from jaxadv.attacks import lbfgs_attack, random_wrong_targets
    result = lbfgs_attack(model, images, targets, params=params)

Every attack takes any model (`jaxadv.logits_function`), runs batched on device, and gives each image the
same result in any batch. The modules, whose internals stay importable from them:

`config`: the attack's settings; `lbfgs`: the attack (objective, per-image c search, lanes); `boundary`: the refinement to the nearest
    boundary point; `targets`: target labels and the all-targets minimum.
`dataset`: the attack over a whole data set, sharded and in resumable chunks, sized from the traced model.
`ddn`, `alma`, `fmn`, `deepfool`: DDN, ALMA, FMN, DeepFool and SuperDeepFool; `minimal`: the per-image
    best of several attacks and the robust-accuracy curve.
`fast`: FGSM / FGM, BIM / PGD; `sparse`: single pixels and the fewest pixels that change the label.
`lanes`: the work queue every per-image attack runs on; `exact`: the exact minimum of a linear model.
"""
from jaxadv.attacks.boundary import RefineConfig
from jaxadv.attacks.config import ATTACK_LBFGS, AttackConfig, SearchConfig
from jaxadv.attacks.lbfgs import lbfgs_attack, lbfgs_attack_untargeted
from jaxadv.attacks.dataset import attack_dataset, attack_sizes
from jaxadv.attacks.fast import fgm, fgsm, minimal_fast_gradient, pgd
from jaxadv.attacks.sparse import min_pixels_attack, single_pixel_attack
from jaxadv.attacks.ddn import ddn
from jaxadv.attacks.alma import alma
from jaxadv.attacks.fmn import fmn
from jaxadv.attacks.deepfool import deepfool, superdeepfool
from jaxadv.attacks.minimal import minimal_perturbation, robust_accuracy_curve
from jaxadv.attacks.targets import (all_wrong_targets, lbfgs_attack_all_targets, random_wrong_targets,
                                    runner_up_targets)

__all__ = [
    # the paper's attack and its settings
    "lbfgs_attack", "lbfgs_attack_untargeted", "lbfgs_attack_all_targets",
    "AttackConfig", "SearchConfig", "RefineConfig", "ATTACK_LBFGS",
    # target labels
    "random_wrong_targets", "runner_up_targets", "all_wrong_targets",
    # a whole data set
    "attack_dataset", "attack_sizes",
    # minimal-L2 attacks
    "ddn", "alma", "fmn", "deepfool", "superdeepfool", "minimal_perturbation", "robust_accuracy_curve",
    # fast and sparse attacks
    "fgsm", "fgm", "pgd", "minimal_fast_gradient", "single_pixel_attack", "min_pixels_attack",
]
