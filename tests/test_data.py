"""IDX parsing, the data sources, and the paper's P1/P2 halves."""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np
import pytest

import jaxadv.data as data
from jaxadv.data import DataError, Dataset, load_dataset, read_idx, training_halves


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """A hand-made IDX file: big-endian magic 0x0000 08 <ndim>, the sizes, then the raw bytes."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(folder, stem, images, labels, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    for kind, idx, array in (("images", "idx3", images), ("labels", "idx1", labels)):
        raw = idx_bytes(array)
        name = f"{stem}-{kind}-{idx}-ubyte"
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


@pytest.fixture
def fake_root(tmp_path):
    """<tmp>/fashion_mnist/ with 6 train and 4 test images; <tmp>/mnist/ without training images."""
    rng = np.random.default_rng(0)
    for stem, n in (("train", 6), ("t10k", 4)):
        write_split(tmp_path / "fashion_mnist", stem, rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
    write_split(tmp_path / "mnist", "t10k", rng.integers(0, 256, (4, 28, 28)), rng.integers(0, 10, 4),
                compress=False)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(6))))
    return tmp_path


# -- IDX parsing ------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_matches_hand_made_file(tmp_path, compress):
    expected = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 7
    raw = idx_bytes(expected)
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:8] == b"\x00\x00\x00\x02"
    path = tmp_path / "x.idx"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    got = read_idx(path)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, expected)


def test_read_idx_rejects_wrong_magic(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 28, 28)))))  # an images file (2051)
    with pytest.raises(DataError, match=r"magic number 2051, expected 2049.*") as info:
        read_idx(path, expected_magic=2049)
    assert str(path) in str(info.value)
    path.write_bytes(struct.pack(">I", 0x0D03) + b"\x00" * 12)  # 0x0D = float, not unsigned byte
    with pytest.raises(DataError, match="unsigned bytes"):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_rejects_truncated_file(tmp_path, compress):
    raw = idx_bytes(np.ones((3, 28, 28)))
    path = tmp_path / "cut"
    if compress:
        path.write_bytes(gzip.compress(raw)[:-20])  # the gzip stream itself is cut short
    else:
        path.write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_a_gzip_file_corrupt_in_the_middle_is_named(tmp_path):
    """Bytes flipped inside the compressed stream: zlib's own error (no file name) became a DataError naming it."""
    rng = np.random.default_rng(1)
    compressed = bytearray(gzip.compress(idx_bytes(rng.integers(0, 4, (50, 28, 28)))))   # compressible: coded
    compressed[len(compressed) // 2:len(compressed) // 2 + 16] = b"\xff" * 16
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes(compressed))
    with pytest.raises(zlib.error):                       # what gzip itself raises here, naming no file
        gzip.decompress(bytes(compressed))
    with pytest.raises(DataError, match="corrupt gzip file") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_cut_header(tmp_path):
    path = tmp_path / "h"
    path.write_bytes(struct.pack(">I", 0x0803) + b"\x00\x00\x00\x02")
    with pytest.raises(DataError, match="header"):
        read_idx(path)


# -- local folders ---------------------------------------------------------------------

def test_load_local_folder_scales_and_types(fake_root):
    train = load_dataset("fashion_mnist", "train", fake_root)
    raw = read_idx(fake_root / "fashion_mnist" / "train-images-idx3-ubyte.gz")
    assert train.images.shape == (6, 28, 28, 1) and train.images.dtype == np.float32
    assert train.labels.shape == (6,) and train.labels.dtype == np.int32
    np.testing.assert_allclose(train.images[..., 0], raw / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(train.labels, read_idx(fake_root / "fashion_mnist" / "train-labels-idx1-ubyte.gz"))
    test = load_dataset("mnist", "test", str(fake_root))  # uncompressed files work too
    assert test.images.shape == (4, 28, 28, 1)
    assert 0.0 <= test.images.min() and test.images.max() <= 1.0


def test_environment_variable_names_the_folder(fake_root, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(fake_root))
    assert len(load_dataset("fashion_mnist", "test").labels) == 4


def test_a_relative_environment_variable_means_where_the_process_started(fake_root, monkeypatch, tmp_path):
    """JAXADV_DATA_DIR=../shared/data, then an os.chdir (a test, a notebook, a config file): still the folder the
    shell meant, relative to the process's starting directory, not to wherever the code runs now."""
    relative = os.path.relpath(fake_root, data.STARTING_DIRECTORY)
    monkeypatch.setenv(data.DATA_DIR_ENV, relative)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert not (elsewhere / relative).exists()          # read against the current folder, it would not be found
    np.testing.assert_array_equal(load_dataset("fashion_mnist", "test").labels,
                                  read_idx(fake_root / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz"))


def test_missing_folder_is_a_clear_error_and_no_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tensorflow-datasets was tried although a local folder was given")
    monkeypatch.setattr(data, "_load_tfds", no_network)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as info:
        load_dataset("fashion_mnist", "train", missing)
    assert str(missing) in str(info.value) and "--data-dir" in str(info.value)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=data.DATA_DIR_ENV):
        load_dataset("fashion_mnist", "train")
    with pytest.raises(DataError, match="no fashion_mnist/ folder"):
        load_dataset("fashion_mnist", "train", tmp_path)


def test_missing_file_names_what_and_where(fake_root):
    (fake_root / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte") as info:
        load_dataset("fashion_mnist", "test", fake_root)
    assert str(fake_root / "fashion_mnist") in str(info.value)


def test_missing_mnist_training_images_says_so_plainly(fake_root):
    with pytest.raises(DataError, match="MNIST training images are not in this folder"):
        load_dataset("mnist", "train", fake_root)


def test_labels_and_images_must_agree(fake_root):
    folder = fake_root / "fashion_mnist"
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3))))
    with pytest.raises(DataError, match="labels"):
        load_dataset("fashion_mnist", "test", fake_root)


@pytest.mark.parametrize("name, split, match", [("cifar10", "train", "name"), ("MNIST", "test", "name"),
                                                ("mnist", "validation", "split")])
def test_bad_names_raise_value_error(fake_root, name, split, match):
    with pytest.raises(ValueError, match=match):
        load_dataset(name, split, fake_root)


def test_debian_package_folder_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    rng = np.random.default_rng(1)
    write_split(tmp_path, "t10k", rng.integers(0, 256, (3, 28, 28)), np.array([1, 2, 3]))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path)
    np.testing.assert_array_equal(load_dataset("fashion_mnist", "test").labels, [1, 2, 3])


# -- tensorflow-datasets --------------------------------------------------------------

@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")


def _as_if_prepared(monkeypatch, tfds):
    # A prepared copy needs no download, so load_dataset does not probe the download host first.
    # (mock_data stands in for a prepared copy, but patches download_and_prepare, not is_prepared.)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", lambda self: True)


def test_tfds_source_offline_with_mock_data(no_local_data, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("PIL")
    _as_if_prepared(monkeypatch, tfds)
    with tfds.testing.mock_data(num_examples=5):
        ds = load_dataset("mnist", "test")
    assert ds.images.shape == (5, 28, 28, 1) and ds.images.dtype == np.float32
    assert ds.labels.dtype == np.int32 and ((0 <= ds.labels) & (ds.labels < 10)).all()
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0


def test_tfds_failure_tells_the_user_to_pass_data_dir(no_local_data, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")
    monkeypatch.setattr(tfds, "data_source", offline)
    monkeypatch.setattr(tfds, "load", offline)
    _as_if_prepared(monkeypatch, tfds)
    with pytest.raises(DataError, match="--data-dir") as info:
        load_dataset("fashion_mnist", "train")
    assert "no internet" in str(info.value) and "\n" not in str(info.value)


# -- P1 / P2 --------------------------------------------------------------------------

def test_training_halves_disjoint_complete_deterministic():
    n = 100
    ids = np.arange(n, dtype=np.int32)  # labels used as example ids
    ds = Dataset(np.broadcast_to(ids[:, None, None, None] / n, (n, 28, 28, 1)).astype(np.float32), ids)
    p1, p2 = training_halves(ds)
    assert len(p1.labels) == len(p2.labels) == n // 2
    assert not set(p1.labels) & set(p2.labels)
    assert sorted(set(p1.labels) | set(p2.labels)) == list(ids)
    np.testing.assert_array_equal(p1.images[:, 0, 0, 0], (p1.labels / n).astype(np.float32))  # images travel with their labels
    q1, q2 = training_halves(ds)
    np.testing.assert_array_equal(p1.labels, q1.labels)
    np.testing.assert_array_equal(p2.labels, q2.labels)


def test_training_halves_rejects_odd_or_mismatched():
    with pytest.raises(ValueError, match="even"):
        training_halves(Dataset(np.zeros((3, 28, 28, 1), np.float32), np.zeros(3, np.int32)))
    with pytest.raises(ValueError, match="labels"):
        training_halves(Dataset(np.zeros((4, 28, 28, 1), np.float32), np.zeros(2, np.int32)))


# -- real data ------------------------------------------------------------------------

def test_real_fashion_mnist(data_dir):
    train = load_dataset("fashion_mnist", "train", data_dir)
    test = load_dataset("fashion_mnist", "test", data_dir)
    assert train.images.shape == (60_000, 28, 28, 1) and test.images.shape == (10_000, 28, 28, 1)
    assert train.images.dtype == np.float32 and train.labels.dtype == np.int32
    assert train.images.min() == 0.0 and train.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)  # Fashion-MNIST is balanced
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    p1, p2 = training_halves(train)
    assert len(p1.labels) == len(p2.labels) == 30_000


def test_real_mnist_test_split(data_dir):
    test = load_dataset("mnist", "test", data_dir)
    assert test.images.shape == (10_000, 28, 28, 1)
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first test digits
