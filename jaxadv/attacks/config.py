"""The settings of the L-BFGS attack: the c search, the L-BFGS run at each c and the refinement, nested.

    config = AttackConfig(search=SearchConfig(bisection_steps=3), lbfgs=ATTACK_LBFGS._replace(ftol=1e-5),
                          refine=RefineConfig(steps=40), lanes=64)

`check_config` refuses a config with a wrong type or range, naming the nested
field (`config.search.growth: must be finite and > 1`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxadv import box_lbfgs
from jaxadv.attacks import boundary

PENALTIES = ("l2", "l2_squared")
WARM_STARTS = ("none", "best", "last")


class SearchConfig(NamedTuple):
    """The c search of `lbfgs_attack` (static).

    penalty: 'l2_squared' (‖r‖₂², as CleverHans/advertorch/Foolbox; the
      default: its pull grows with ‖r‖ and stops near the boundary) or 'l2'
      (the paper's |r| = ‖r‖₂, whose constant pull runs past it).
    initial_c, growth: the first run uses initial_c; until a run has
      succeeded and another has failed, c is multiplied by `growth` after a
      success and divided by it after a failure (at most `max_bracket_steps`
      such moves), then `bisection_steps` geometric bisections sqrt(lo · hi)
      refine the largest successful c.
    warm_start: where each run after the first starts: 'best' (the best
      successful point so far, else the last run's end point), 'last' (the
      last run's end point) or 'none' (x itself, a cold start).
    keep_memory: with penalty 'l2_squared', carry the L-BFGS memory from one
      c to the next (each stored y_j moved by 2Δc·s_j: exact, the penalty's
      Hessian is 2c·I); consecutive c are close, so warm runs end in a few steps.
    max_steps: a global cap on loop steps (one batched gradient each); None
      derives a cap that no complete search can exceed.
    runner_ups: untargeted mode only: after the untargeted run, targeted runs
      toward this many other classes, those nearest by the linear estimate at
      x (see `lbfgs_attack_untargeted`).
    """
    penalty: str = "l2_squared"
    initial_c: float = 1.0
    growth: float = 10.0
    max_bracket_steps: int = 6
    bisection_steps: int = 6
    warm_start: str = "best"
    keep_memory: bool = True
    max_steps: int | None = None
    runner_ups: int = 1


#: The L-BFGS run at each c: a short memory (3: the memory is each step's main traffic) and a loose ftol.
ATTACK_LBFGS = box_lbfgs.BoxLBFGSConfig(memory_size=3, ftol=1e-4)


class AttackConfig(NamedTuple):
    """Settings of `lbfgs_attack` (static: a new config compiles a new program).

    search: the c search (`SearchConfig`).
    lbfgs: the box-constrained L-BFGS run at each c (`box_lbfgs.BoxLBFGSConfig`;
      default `ATTACK_LBFGS`).
    refine: the refinement to the nearest boundary point after the search
      (`boundary.RefineConfig`; steps=0 is the paper's method; its `untargeted` is
      set by the mode, targeted or untargeted). Its boundary walk
      (walk_steps) is off in the targeted default: set walk_steps=60 for a
      targeted attack on a ReLU / max-pooling model.
    lanes: images attacked at once (None: all); see `lbfgs_attack_core`.
    """
    search: SearchConfig = SearchConfig()
    lbfgs: box_lbfgs.BoxLBFGSConfig = ATTACK_LBFGS
    refine: boundary.RefineConfig = boundary.RefineConfig()
    lanes: int | None = 32

    def settings(self) -> dict:
        """Nested dicts of every setting by name (what a sweep records as its identity)."""
        return {name: value._asdict() if hasattr(value, "_asdict") else value for name, value in self._asdict().items()}

    def refine_config(self, untargeted: bool = False) -> boundary.RefineConfig:
        return self.refine._replace(untargeted=untargeted)

    def max_runs(self) -> int:
        return 1 + self.search.max_bracket_steps + self.search.bisection_steps

    def step_cap(self) -> int:
        if self.search.max_steps is not None:
            return self.search.max_steps
        per_run = self.lbfgs.max_iterations * (self.lbfgs.max_line_search_steps + 1) + 1
        return self.max_runs() * per_run


#: The untargeted mode's defaults: a coarse c search (stops once c is bracketed, ftol 1e-3); the refinement,
#: a 100-step walk where it stalls and the runner-up run do the work.
UNTARGETED = AttackConfig(search=SearchConfig(bisection_steps=0), lbfgs=ATTACK_LBFGS._replace(ftol=1e-3),
                          refine=boundary.RefineConfig(cuts=4, walk_steps=100))

def _finite(v):
    return bool(np.isfinite(v))


# (field path, "int" / "number" / "bool" / a tuple of choices, whether None is allowed, the range, its wording)
_RULES = (
    ("search.penalty", PENALTIES, False, None, ""),
    ("search.warm_start", WARM_STARTS, False, None, ""),
    ("search.keep_memory", "bool", False, None, ""),
    ("search.initial_c", "number", False, lambda v: _finite(v) and v > 0, "finite and > 0"),
    ("search.growth", "number", False, lambda v: _finite(v) and v > 1, "finite and > 1"),
    ("search.max_bracket_steps", "int", False, lambda v: v >= 0, ">= 0"),
    ("search.bisection_steps", "int", False, lambda v: v >= 0, ">= 0"),
    ("search.max_steps", "int", True, lambda v: v >= 1, ">= 1 or None"),
    ("search.runner_ups", "int", False, lambda v: v >= 0, ">= 0"),
    ("lbfgs.memory_size", "int", False, lambda v: v >= 1, ">= 1"),
    ("lbfgs.max_iterations", "int", False, lambda v: v >= 1, ">= 1"),
    ("lbfgs.max_line_search_steps", "int", False, lambda v: v >= 1, ">= 1"),
    ("lbfgs.gtol", "number", False, lambda v: v >= 0, ">= 0"),
    ("lbfgs.ftol", "number", False, lambda v: v >= 0, ">= 0"),
    ("lbfgs.armijo", "number", False, lambda v: 0 < v < 1, "in (0, 1)"),
    ("lbfgs.steepest_before_stop", "bool", False, None, ""),
    ("refine.steps", "int", False, lambda v: v >= 0, ">= 0"),
    ("refine.cuts", "int", False, lambda v: v >= 1, ">= 1"),
    ("refine.margin", "number", False, lambda v: v >= 0, ">= 0"),
    ("refine.rtol", "number", False, lambda v: v >= 0, ">= 0"),
    ("refine.dual_iterations", "int", False, lambda v: v >= 1, ">= 1"),
    ("refine.overshoot", "number", False, lambda v: _finite(v) and v >= 0, "finite and >= 0"),
    ("refine.walk_steps", "int", False, lambda v: v >= 0, ">= 0"),
    ("refine.walk_step", "number", False, lambda v: _finite(v) and v > 0, "finite and > 0"),
    ("refine.walk_gamma", "number", False, lambda v: _finite(v) and v >= 0, "finite and >= 0"),
    ("refine.patience", "int", False, lambda v: v >= 1, ">= 1"),
    ("lanes", "int", True, lambda v: v >= 1, ">= 1 or None"),
)
_KINDS = {"int": (int, np.integer), "number": (int, float, np.integer, np.floating), "bool": (bool, np.bool_)}


def check_config(config):
    """Refuse an `AttackConfig` whose parts or fields have the wrong type or range, naming the field."""
    if not isinstance(config, AttackConfig):
        raise TypeError(f"config: expected an AttackConfig, got {type(config).__name__}")
    for part, kind in (("search", SearchConfig), ("lbfgs", box_lbfgs.BoxLBFGSConfig), ("refine", boundary.RefineConfig)):
        if not isinstance(getattr(config, part), kind):
            raise TypeError(f"config.{part}: expected a {kind.__name__}, got {type(getattr(config, part)).__name__}")
    for path, kind, optional, valid, wording in _RULES:
        value = config
        for name in path.split("."):
            value = getattr(value, name)
        if value is None and optional:
            continue
        if isinstance(kind, tuple):
            if value not in kind:
                raise ValueError(f"config.{path}: expected one of {kind}, got {value!r}")
            continue
        if (kind != "bool" and isinstance(value, bool)) or not isinstance(value, _KINDS[kind]):
            raise TypeError(f"config.{path}: expected {'an' if kind == 'int' else 'a'} {kind}, got {value!r}")
        if valid is not None and not valid(value):
            raise ValueError(f"config.{path}: must be {wording}, got {value!r}")
