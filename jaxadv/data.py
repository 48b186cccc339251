"""MNIST and Fashion-MNIST as float32 images in [0, 1] with int32 labels.

    train = load_dataset("fashion_mnist", "train")           # Dataset(images [60000,28,28,1], labels [60000])
    p1, p2 = training_halves(train)                         # the paper's disjoint halves, 30,000 each

Where the data comes from, in order:
  1. `data_dir` (the `--data-dir` flag), else the environment variable
     `JAXADV_DATA_DIR`: a folder holding `mnist/` and/or `fashion_mnist/` with
     the original IDX files (gzipped or not). A local folder is authoritative:
     when one is given, no network is tried and a missing file is an error.
     A relative `$JAXADV_DATA_DIR` means the folder relative to where the
     process started (`STARTING_DIRECTORY`), as the shell that set it meant it,
     wherever the process has changed directory since.
  2. Debian's `dataset-fashion-mnist` package folder (Fashion-MNIST only).
  3. tensorflow-datasets, which needs the internet (or prepared data) to serve.
     When its download hosts cannot be reached, that is an error at once
     (tensorflow-datasets itself would retry each file for minutes).
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import os
import socket
import urllib.parse
import urllib.request
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

DATASETS = ("mnist", "fashion_mnist")
SPLITS = ("train", "test")
DATA_DIR_ENV = "JAXADV_DATA_DIR"
#: Where this process started (read when jaxadv.data is first imported, which `import jaxadv` does): a relative
#: $JAXADV_DATA_DIR is resolved against it. Read at first use rather than frozen at import, the variable may still
#: be set or changed after import (a notebook, a test); resolved against the start, a later os.chdir cannot move it.
try:
    STARTING_DIRECTORY = os.getcwd()
except FileNotFoundError:      # started in a folder deleted since: a relative variable cannot mean anything
    STARTING_DIRECTORY = None
#: Where Debian's `dataset-fashion-mnist` package installs the IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Seconds the check that tensorflow-datasets could download may wait for a host to answer.
DOWNLOAD_PROBE_TIMEOUT = 5.0

_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049
_FILE_STEMS = {"train": "train", "test": "t10k"}
#: Examples per split, in MNIST and Fashion-MNIST alike.
NUM_EXAMPLES = {"train": 60_000, "test": 10_000}


#: Class names for captions (Fashion-MNIST's short names; MNIST's classes are its digits).
CLASS_NAMES = {
    "fashion_mnist": ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"),
    "mnist": tuple(str(k) for k in range(10)),
}


class Dataset(NamedTuple):
    """A split of a data set: images float32 [N, 28, 28, 1] in [0, 1] and labels int32 [N]."""
    images: np.ndarray  # float32 [N, 28, 28, 1] in [0, 1]
    labels: np.ndarray  # int32 [N]


class DataError(FileNotFoundError):
    """A data file is missing, truncated or not an IDX file of the expected kind."""


def load_dataset(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load split `split` ("train" or "test") of `name` ("mnist" or "fashion_mnist")."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    local = data_dir if data_dir is not None else environment_data_dir()
    if local is not None:
        source = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        return _load_local(_dataset_folder(Path(local), name, source), name, split)
    if name == "fashion_mnist" and DEBIAN_FASHION_MNIST_DIR.is_dir():
        return _load_local(DEBIAN_FASHION_MNIST_DIR, name, split)
    return _load_tfds(name, split)


def training_halves(dataset: Dataset) -> tuple[Dataset, Dataset]:
    """The paper's two disjoint halves P1 and P2 of a training set.

    P1 holds the even-indexed examples and P2 the odd-indexed ones. Interleaving
    (rather than cutting at the middle) keeps both halves free of any ordering in
    the source file, and needs no random generator, so it is the same everywhere.
    """
    n = len(dataset.labels)
    if len(dataset.images) != n:
        raise ValueError(f"dataset has {len(dataset.images)} images but {n} labels")
    if n % 2:
        raise ValueError(f"dataset must have an even number of examples to halve, got {n}")
    return (Dataset(dataset.images[0::2], dataset.labels[0::2]),
            Dataset(dataset.images[1::2], dataset.labels[1::2]))


# -- IDX files ------------------------------------------------------------------

def environment_data_dir() -> Path | None:
    """$JAXADV_DATA_DIR as an absolute path (a relative one against `STARTING_DIRECTORY`), or None when unset."""
    value = os.environ.get(DATA_DIR_ENV) or None
    if value is None or STARTING_DIRECTORY is None:
        return None if value is None else Path(value).absolute()
    return Path(STARTING_DIRECTORY, value)


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped or not) into a uint8 array.

    The header is a big-endian magic number 0x0000 08 DD (08 = unsigned byte,
    DD = number of dimensions) followed by DD big-endian uint32 sizes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:      # zlib.error: corrupt in the middle
            raise DataError(f"{path} is a truncated or corrupt gzip file ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path} is too short to be an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise DataError(f"{path} has magic number {magic}, expected {expected_magic} "
                        f"({'images' if expected_magic == _IMAGES_MAGIC else 'labels'})")
    if raw[0] or raw[1] or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (magic number {magic})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw) - header} data bytes but its header "
                        f"{shape} needs {expected - header}: the file is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _dataset_folder(root: Path, name: str, source: str) -> Path:
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} (from {source}) does not exist")
    for candidate in (root / name, root / name.replace("_", "-")):
        if candidate.is_dir():
            return candidate
    raise DataError(f"no {name}/ folder in data folder {str(root)!r} (from {source}); "
                    f"it holds: {sorted(p.name for p in root.iterdir()) or 'nothing'}")


def _find_file(folder: Path, stem: str) -> Path | None:
    for suffix in (".gz", ""):
        for sep in ("-", "."):  # the official names use "-idx3-ubyte"; some mirrors use ".idx3-ubyte"
            path = folder / f"{stem.replace('-idx', sep + 'idx', 1)}{suffix}"
            if path.is_file():
                return path
    return None


def _load_local(folder: Path, name: str, split: str) -> Dataset:
    stem = _FILE_STEMS[split]
    found = {}
    for kind, idx in (("images", "idx3"), ("labels", "idx1")):
        path = _find_file(folder, f"{stem}-{kind}-{idx}-ubyte")
        if path is None:
            hint = ""
            if name == "mnist" and split == "train" and kind == "images":
                hint = (" The MNIST training images are not in this folder (the shared offline copy has "
                        "only the MNIST test images): use --dataset fashion_mnist, or give a folder "
                        "that holds train-images-idx3-ubyte.gz.")
            raise DataError(f"{name} {split} {kind}: no file {stem}-{kind}-{idx}-ubyte[.gz] in "
                            f"{str(folder)!r}.{hint}")
        found[kind] = path
    images = read_idx(found["images"], _IMAGES_MAGIC)
    labels = read_idx(found["labels"], _LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{found['images']} holds images of shape {images.shape[1:]}, expected (28, 28)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{found['labels']} holds {labels.shape} labels for {len(images)} images "
                        f"in {found['images']}")
    return _to_dataset(images, labels)


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> Dataset:
    # One multiply on the uint8 buffer: about 0.2 s for 60,000 images.
    images = np.multiply(images, np.float32(1 / 255), dtype=np.float32).reshape(-1, 28, 28, 1)
    return Dataset(images, labels.astype(np.int32))


def _load_tfds(name: str, split: str) -> Dataset:
    """Serve from tensorflow-datasets: ArrayRecord (no TensorFlow) first, then tfds.load."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a dependency
        raise DataError(_no_data(name, split, f"tensorflow-datasets cannot be imported ({e})")) from None
    with _quiet("absl"):      # "Variant folder ... has no dataset_info.json" merely means: not prepared
        builder = tfds.builder(name)
        prepared = builder.is_prepared()
    if not prepared:
        # Offline, tensorflow-datasets retried every file for about 7 minutes (urllib3's backoff, once
        # for data_source and again for load) and left *.tmp.* folders behind: probe its hosts first.
        unreachable = _unreachable_host(builder.url_infos or {})
        if unreachable:
            raise DataError(_no_data(name, split, f"tensorflow-datasets has no copy prepared under "
                                                  f"{str(Path(builder.data_dir).parent.parent)!r} and cannot download "
                                                  f"one ({unreachable})"))
    errors = []
    try:
        source = tfds.data_source(name, split=split)
        examples = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(ex["image"], np.uint8).reshape(28, 28) for ex in examples])
        labels = np.asarray([ex["label"] for ex in examples])
        return _to_dataset(images, labels)
    except Exception as e:  # noqa: BLE001 - any failure falls through to the next source
        errors.append(f"tfds.data_source: {type(e).__name__}: {e}")
    try:
        batch = tfds.as_numpy(tfds.load(name, split=split, batch_size=NUM_EXAMPLES[split]))
        batch = next(iter(batch))
        return _to_dataset(np.asarray(batch["image"]).reshape(-1, 28, 28), np.asarray(batch["label"]))
    except Exception as e:  # noqa: BLE001
        errors.append(f"tfds.load: {type(e).__name__}: {e}")
    details = "; ".join(" ".join(error.split())[:300] for error in errors)
    raise DataError(_no_data(name, split, f"tensorflow-datasets could not serve it ({details})"))


@contextlib.contextmanager
def _quiet(logger: str):
    """Silence `logger`'s warnings for the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _no_data(name: str, split: str, why: str) -> str:
    return (f"could not load {name} {split}: no local data folder was given and {why}. Pass --data-dir DIR "
            f"(or set ${DATA_DIR_ENV}) naming a folder that holds {name}/ with the IDX files (e.g. ../shared/data)")


def _unreachable_host(urls) -> str | None:
    """"host:port: reason" for the first download host that does not accept a connection, else None.

    Behind a proxy (http_proxy, https_proxy, ...) a direct connection says nothing: no verdict then.
    """
    if urllib.request.getproxies():
        return None
    hosts = set()
    for url in map(urllib.parse.urlsplit, urls):
        if url.hostname:
            hosts.add((url.hostname, url.port or (443 if url.scheme == "https" else 80)))
    for host, port in sorted(hosts):
        try:
            socket.create_connection((host, port), timeout=DOWNLOAD_PROBE_TIMEOUT).close()
        except OSError as error:
            return f"{host}:{port} cannot be reached: {error.strerror or error}"
    return None
