"""Save and load trained parameters, bit for bit.

A checkpoint is a folder with `params.msgpack` (flax.serialization, which keeps
each array's raw bytes) and `meta.json` (anything JSON-serialisable: the model
name, training settings, errors, timings). Each file is written to a temporary
name and moved into place with `os.replace`, and `meta.json` goes last: a
folder with `meta.json` is a complete checkpoint, so a run killed mid-save
never leaves one that loads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.io import write_atomic
from jaxadv.models import Model

PARAMS_FILE = "params.msgpack"
META_FILE = "meta.json"


def save_checkpoint(directory: str | os.PathLike, params, meta: dict) -> None:
    """Write `params` (a model's tuple of per-layer dicts) and `meta` to `directory`."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)  # incomplete until the new meta lands
    host_params = jax.tree.map(np.asarray, params)
    write_atomic(directory / PARAMS_FILE, flax.serialization.to_bytes(host_params))
    write_atomic(directory / META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode())


def has_checkpoint(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return (directory / META_FILE).is_file() and (directory / PARAMS_FILE).is_file()


def load_checkpoint(directory: str | os.PathLike, model: Model):
    """Return (params, meta) saved in `directory` for `model`; shapes are checked against it."""
    directory = Path(directory)
    if not has_checkpoint(directory):
        raise FileNotFoundError(f"no complete checkpoint in {str(directory)!r} "
                                f"(needs {PARAMS_FILE} and {META_FILE})")
    meta = json.loads((directory / META_FILE).read_text())
    state = flax.serialization.msgpack_restore((directory / PARAMS_FILE).read_bytes())
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    if not isinstance(state, dict) or len(state) != len(template):
        raise ValueError(f"checkpoint {str(directory)!r} does not hold {len(template)} layers "
                         f"of {model.name}")
    params = []
    for i, layer_template in enumerate(template):
        stored = state[str(i)]
        if set(stored) != set(layer_template):
            raise ValueError(f"checkpoint {str(directory)!r} layer {i} has {sorted(stored)}, "
                             f"{model.name} expects {sorted(layer_template)}")
        layer = {}
        for name, spec in layer_template.items():
            value = np.asarray(stored[name])
            if value.shape != spec.shape or value.dtype != spec.dtype:
                raise ValueError(f"checkpoint {str(directory)!r} layer {i} {name!r} is "
                                 f"{value.dtype}{list(value.shape)}, {model.name} expects "
                                 f"{spec.dtype}{list(spec.shape)}")
            layer[name] = jnp.asarray(value)
        params.append(layer)
    return tuple(params), meta
