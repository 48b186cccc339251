"""The default models of every experiment: the paper's zoo, trained once and loaded from WORKDIR/models.

    python -m experiments.table1 --models experiments/configs/zoo.py     # the same as no --models

A config of your own has the same shape: a `get_models(context)` that returns
{name: (model, params)}, each model a flax module with its variables or a
function apply(params, x) with its params (see the README, "Your own model").
"""
from jaxadv.models import ZOO
from jaxadv.zoo import ModelsContext, load_models


def get_models(context: ModelsContext) -> dict:
    return load_models(ZOO, context)
