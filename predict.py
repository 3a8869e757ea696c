"""Classify your own digit images with a checkpoint written by train.py.

    python predict.py ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt inputs=my_digits/
    python predict.py last seven.jpg eight.png               # the `ckpt_path=`/`inputs=` prefixes are optional

Prints one line per image: file, digit, confidence (the softmax probability of that digit).
Images are PNG or JPEG of any size up to PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`,
about 89 million pixels; a larger one is refused in one line), a light digit on a dark background
or a dark one on light paper; each is converted as MNIST's digits were made: grayscale, light ink
on black, the digit scaled to fit a 20x20 box keeping its aspect ratio, then placed in a 28x28
image so that its centre of mass is at the centre. The model is rebuilt from the checkpoint alone
(mnist_extras/loading.py: no object unpickled, no `_target_` outside the project's parts); it runs
on the CPU. A file that is not a checkpoint of this project, or an image that cannot be read, ends
in one line and exit code 2.
"""

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mnist_extras.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def key_optional(key: str):
    """An argparse type: the value with its `key=` prefix, if any, removed."""

    def value(text: str) -> str:
        other = next((k for k in ("ckpt_path", "inputs") if k != key and text.startswith(f"{k}=")), None)
        if other:
            raise argparse.ArgumentTypeError(f"{text}: {other} comes {'first' if other == 'ckpt_path' else 'second'}")
        return text.removeprefix(f"{key}=")

    return value


def parse_args(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description="Classify digit images with a checkpoint.")
    parser.add_argument("ckpt_path", type=key_optional("ckpt_path"), help="a checkpoint of train.py, or `last`")
    parser.add_argument("inputs", nargs="+", type=key_optional("inputs"), help="image files or folders of them")
    return parser.parse_args(args)


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for given in inputs:
        path = Path(given).expanduser()
        found = [path] if path.is_file() else []
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ConfigError(
                f"inputs={given}: an image, or a folder holding .png/.jpg/.jpeg files; fix: inputs=my_digits/"
            )
        files += found
    return files


def read_image(file: Path) -> np.ndarray:
    """One image file as MNIST's (28, 28) uint8; ConfigError if it is no digit image or too large to decode."""
    try:
        with warnings.catch_warnings():
            # PIL warns past MAX_IMAGE_PIXELS and refuses past twice that: refused from the limit on.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                return to_mnist(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ConfigError(
            f"inputs: {file} has more than {Image.MAX_IMAGE_PIXELS:,} pixels, PIL's guard against decompression "
            f"bombs; fix: scale it down (a digit needs 28x28)"
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"inputs: {file} cannot be read as a digit image ({err}); fix: remove it from {file.parent}"
        ) from None


def to_mnist(image: Image.Image) -> np.ndarray:
    """Any digit image -> (28, 28) uint8, light ink on black, as MNIST's images were made."""
    image = ImageOps.exif_transpose(image)
    if "A" in image.getbands() or "transparency" in image.info:
        # Drawing apps save dark strokes on a transparent background: put them on white paper.
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:
        pixels, border = 255 - pixels, 255 - border
    # Paper that is not quite black becomes black; the ink is stretched to the full range.
    pixels = np.clip(pixels - np.median(border), 0, None)
    if pixels.max() <= 0:
        raise ValueError("the image is blank")
    pixels *= 255 / pixels.max()
    rows, cols = np.nonzero(pixels > 255 * 0.1)
    digit = pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = digit.shape
    scale = 20 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(digit.astype(np.uint8)).resize(size, Image.Resampling.LANCZOS), np.float32)
    mass = small.sum()
    centre_y = (small.sum(axis=1) * np.arange(small.shape[0])).sum() / mass
    centre_x = (small.sum(axis=0) * np.arange(small.shape[1])).sum() / mass
    top = int(np.clip(round(14 - centre_y), 0, 28 - small.shape[0]))
    left = int(np.clip(round(14 - centre_x), 0, 28 - small.shape[1]))
    canvas = np.zeros((28, 28), dtype=np.uint8)
    canvas[top : top + small.shape[0], left : left + small.shape[1]] = small.round().astype(np.uint8)
    return canvas


def predict(ckpt_path: str | Path, files: list[Path]) -> list[tuple[Path, int, float]]:
    """(file, digit, confidence) for each image file."""
    import torch

    from data_modules import normalize
    from mnist_extras.loading import load_task

    images = np.stack([read_image(file) for file in files])
    task = load_task(ckpt_path)
    batch = normalize(torch.from_numpy(images).unsqueeze(1))
    with torch.inference_mode():
        confidence, digit = task(batch).softmax(dim=1).max(dim=1)
    return [(file, int(d), float(c)) for file, d, c in zip(files, digit, confidence, strict=True)]


def main(args: list[str]) -> int:
    """Print the predictions; 2 after one `error:` line for anything the user can fix."""
    from mnist_extras.loading import resolve

    values = parse_args(args)
    try:
        rows = predict(resolve(values.ckpt_path), image_files(values.inputs))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    width = max(len(str(file)) for file, _, _ in rows)
    print(f"{'file':<{width}}  digit  confidence")
    for file, digit, confidence in rows:
        print(f"{str(file):<{width}}  {digit:>5}  {confidence:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
