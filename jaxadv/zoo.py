"""The models an experiment analyses: the trained zoo, cached on disk, or a user's, from a config file.

    models = trained_models(ZOO, "fashion_mnist", "runs/fashion_mnist")   # {name: (model, variables)}
    model, variables = models["FC100-100-10"]
    logits_fn = logits_function(model.module, variables)               # the path a user's model takes

Trained models live in WORKDIR/models/<name>/ (a `jaxadv.checkpoint`, loaded
bit for bit and checked against the module's parameter shapes); a model trained
on custom data is stored under "<name>@<tag>" (e.g. "FC100-100-10@P1").
Training is deterministic (`jaxadv.train`), so a deleted model retrains to the
same bits.

Configs as code, the big_vision way: `load_models("my_models.py", context)`
imports that file and calls its `get_models(context)`, which returns
{name: (model, params)} (a flax module and its variables, or a function
apply(params, x) and its params), however the parameters are loaded. The zoo
is the default config (experiments/configs/zoo.py); a list of zoo names
loads those.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import jax
import numpy as np

from jaxadv.checkpoint import has_checkpoint, load_checkpoint, read_meta, save_checkpoint
from jaxadv.data import DATASETS, Dataset, load_dataset
from jaxadv.io import check_writable, is_writer
from jaxadv.models import get_model
from jaxadv.train import error_rate, train, zoo_config

#: quick=True trains on this many training images (the first ones).
QUICK_TRAIN_SIZE = 2000


class WorkdirMismatch(ValueError):
    """A workdir whose stored models were trained on another data set."""


class ConfigError(ValueError):
    """A models config file that cannot be used: named, with what is wrong."""


class ModelsContext(NamedTuple):
    """What a config's get_models(context) may use: where data and trained models live, and --quick."""
    dataset: str = "fashion_mnist"
    workdir: str | os.PathLike = "runs/fashion_mnist"
    data_dir: str | None = None
    quick: bool = False


def load_models(spec: str | os.PathLike | Sequence[str], context: ModelsContext = ModelsContext()) -> dict:
    """{name: (model, params)} for `spec`: a config file ending in .py, or zoo model names (trained or loaded).

    A config file defines `get_models(context)` returning a dict {name: (model, params)}, each model a flax
    module or a function apply(params, x). Zoo models come as (their nn.Sequential module, variables).
    """
    if isinstance(spec, (str, os.PathLike)) and str(spec).endswith(".py"):
        return _models_from_file(Path(spec), context)
    names = [spec] if isinstance(spec, str) else list(spec)
    trained = trained_models(names, context.dataset, context.workdir, context.data_dir, context.quick)
    return {name: (model.module, variables) for name, (model, variables) in trained.items()}


def _models_from_file(path: Path, context: ModelsContext) -> dict:
    if not path.is_file():
        raise ConfigError(f"--models: no config file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"jaxadv_models_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # dataclasses (flax modules) look their module up there
    with _named_errors(f"importing {str(path)!r}"):
        spec.loader.exec_module(module)
    if not callable(getattr(module, "get_models", None)):
        raise ConfigError(f"--models: {str(path)!r} defines no get_models(context) returning {{name: (model, params)}}")
    with _named_errors(f"get_models of {str(path)!r}"):
        models = module.get_models(context)
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"--models: get_models in {str(path)!r} must return a non-empty dict "
                          f"{{name: (model, params)}}, got {type(models).__name__}")
    for name, entry in models.items():
        if not isinstance(name, str) or not isinstance(entry, tuple) or len(entry) != 2 or not callable(entry[0]):
            raise ConfigError(f"--models: get_models in {str(path)!r}: entry {name!r} must be a name mapped to "
                              "(model, params), the model a flax module or a function apply(params, x)")
    return models


@contextlib.contextmanager
def _named_errors(what: str):
    """A config file's own error as a ConfigError naming `what` and the error's first line (chained, for a
    traceback where one is wanted); the library's user errors (a ConfigError, missing data, ...) pass as they are."""
    try:
        yield
    except Exception as error:     # noqa: BLE001 - the user's code: named, with its first line
        if type(error).__module__.startswith("jaxadv."):
            raise
        raise ConfigError(f"--models: {what} raised {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def model_dir(workdir: str | os.PathLike, name: str, tag: str | None = None) -> Path:
    """Where model `name` (trained on `tag`'s set, if given) is stored under `workdir`."""
    return Path(workdir) / "models" / _stored_name(name, tag)


def trained_models(names: Iterable[str], dataset: str, workdir: str | os.PathLike | None,
                   data_dir: str | None = None, quick: bool = False, *,
                   train_set: Dataset | None = None, tag: str | None = None,
                   seed: int = 0, verbose: bool = True) -> dict:
    """{stored name: (model, params)} for `names`, loaded from WORKDIR/models/ or trained and saved.

    By default a model is trained on the whole training split of `dataset` (the
    first QUICK_TRAIN_SIZE images with `quick`). With `train_set` (e.g. P1) a
    `tag` is required and the model is stored and returned as "<name>@<tag>".
    A stored quick model is retrained when a full one is asked for; a stored
    full model serves quick runs too, which is said in one line (`verbose`). Training is deterministic: the key is
    PRNGKey(seed) folded with a hash of the stored name.
    """
    names = [names] if isinstance(names, str) else list(names)
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    workdir = Path("runs") / dataset if workdir is None else Path(workdir)
    if train_set is not None and not tag:
        raise ValueError("tag is required with train_set, so that the model is not stored under the "
                         "name of the model trained on the whole training set")
    if tag is not None and (not isinstance(tag, str) or not tag or "/" in tag):
        raise ValueError(f"tag must be a non-empty string without '/', got {tag!r}")
    if train_set is not None:
        train_set = Dataset(np.asarray(train_set.images), np.asarray(train_set.labels))
    fingerprint = _fingerprint(train_set) if train_set is not None else None

    # Every stored model is loaded (a damaged one named) and every folder checked before any is trained.
    out, data, missing = {}, train_set, []
    for name in names:
        model = get_model(name)
        directory = model_dir(workdir, name, tag)
        if has_checkpoint(directory):
            params, meta = load_checkpoint(directory, model)
            if _reusable(meta, dataset, quick, fingerprint, directory):
                if quick and not meta.get("quick") and verbose:     # said, not silent: a quick run's results
                    print(f"{_stored_name(name, tag)}: the fully trained model in {str(directory)!r} serves this "
                          "quick run (another --workdir trains a quick one)", file=sys.stderr, flush=True)
                out[_stored_name(name, tag)] = (model, params)
                continue
        check_writable(directory)          # before the training, not after
        missing.append(name)
    for name in missing:
        model = get_model(name)
        stored = _stored_name(name, tag)
        directory = model_dir(workdir, name, tag)
        if data is None:
            data = load_dataset(dataset, "train", data_dir)
        subset = _quick_subset(data) if quick else data
        config = zoo_config(model, quick=quick, verbose=verbose)
        if verbose:
            print(f"training {stored} on {len(subset.labels)} {dataset} images "
                  f"({config.epochs} epochs, Adam lr {config.learning_rate:g})", file=sys.stderr, flush=True)
        start = time.perf_counter()
        params = train(model, subset.images, subset.labels, _model_key(seed, stored), config)
        params = jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        meta = {"model": name, "stored_name": stored, "tag": tag, "dataset": dataset, "quick": quick,
                "seed": seed, "num_train": len(subset.labels), "train_fingerprint": fingerprint,
                "num_params": model.num_params(), "train_seconds": round(seconds, 2),
                "train_error": error_rate(model.module, params, subset.images, subset.labels),
                "optimizer": "adam, cosine-decayed learning rate", "config": config._asdict()}
        if is_writer():     # (every process of a --distributed run trains the same model: training is deterministic)
            save_checkpoint(directory, params, meta)
        out[stored] = (model, params)
    return {_stored_name(name, tag): out[_stored_name(name, tag)] for name in names}


def load_meta(workdir: str | os.PathLike, name: str, tag: str | None = None) -> dict:
    """The meta.json of a stored model (training settings, train_seconds, ...), without its params' checksum."""
    return read_meta(model_dir(workdir, name, tag))


# -- helpers --------------------------------------------------------------------------

def _stored_name(name: str, tag: str | None) -> str:
    return f"{name}@{tag}" if tag else name


def _model_key(seed: int, stored_name: str) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(stored_name.encode()) & 0x7FFFFFFF)


def _quick_subset(data: Dataset) -> Dataset:
    return Dataset(data.images[:QUICK_TRAIN_SIZE], data.labels[:QUICK_TRAIN_SIZE])


def _fingerprint(data: Dataset) -> str:
    """Cheap identity of a custom training set, so a tag reused for other data retrains."""
    crc = zlib.crc32(np.ascontiguousarray(data.labels).tobytes())
    crc = zlib.crc32(np.ascontiguousarray(data.images[:: max(len(data.images) // 64, 1)]).tobytes(), crc)
    return f"{len(data.labels)}:{crc:08x}"


def _reusable(meta: dict, dataset: str, quick: bool, fingerprint: str | None, directory: Path) -> bool:
    if meta.get("dataset") != dataset:
        raise WorkdirMismatch(f"{str(directory)!r} holds a model trained on {meta.get('dataset')!r}, not "
                         f"{dataset!r}: use another --workdir (the default is runs/<dataset>)")
    if meta.get("quick") and not quick:
        return False  # a smoke-test model never stands in for a real one
    if fingerprint is not None and meta.get("train_fingerprint") not in (None, fingerprint):
        return False
    return True
