"""jaxadv: Szegedy et al., "Intriguing properties of neural networks", in JAX.

What a user calls, importable from here: the attacks, any model as a logits function, data sets, the attack
over a data set and the bounds. The rest lives in the modules (docs/api.md lists them all).

The names load on first use (PEP 562), so that `import jaxadv.optim` or `import jaxadv.data` pulls in only
what it needs.
"""
import importlib

#: Each public name and the module that defines it.
_HOMES = {
    # attacks
    "lbfgs_attack": "jaxadv.attacks.lbfgs", "lbfgs_attack_untargeted": "jaxadv.attacks.lbfgs",
    "AttackConfig": "jaxadv.attacks.config", "random_wrong_targets": "jaxadv.attacks.targets",
    "minimal_perturbation": "jaxadv.attacks.minimal", "ddn": "jaxadv.attacks.ddn", "alma": "jaxadv.attacks.alma",
    "fmn": "jaxadv.attacks.fmn", "deepfool": "jaxadv.attacks.deepfool", "superdeepfool": "jaxadv.attacks.deepfool",
    "fgsm": "jaxadv.attacks.fast", "fgm": "jaxadv.attacks.fast", "pgd": "jaxadv.attacks.fast",
    "attack_dataset": "jaxadv.attacks.dataset",
    # models and data
    "logits_function": "jaxadv.functional", "get_model": "jaxadv.models", "ZooModel": "jaxadv.models",
    "ZOO": "jaxadv.models", "ALL_MODELS": "jaxadv.models", "load_models": "jaxadv.zoo",
    "load_dataset": "jaxadv.data",
    # bounds
    "certified_radius": "jaxadv.certify", "certificates": "jaxadv.certify", "operator_bounds": "jaxadv.lipschitz",
    # sweeps
    "run_sweep": "jaxadv.sweep",
}

__all__ = list(_HOMES)


def __getattr__(name):
    """Import `name`'s module on first use and return the name (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'jaxadv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
