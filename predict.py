"""Classify your own digit images with a checkpoint written by train.py.

    python predict.py ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt inputs=my_digits/
    python predict.py last seven.jpg eight.png               # the `ckpt_path=`/`inputs=` prefixes are optional

Prints file, digit and confidence (its softmax probability) per PNG or JPEG, converted as MNIST's digits
were made; the model comes from the checkpoint alone (mnist_extras/loading.py). Errors: one line, exit 2.
"""

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from data_modules import normalize
from mnist_extras.errors import ConfigError
from mnist_extras.loading import load_task, resolve

IMAGES = (".png", ".jpg", ".jpeg")


def image_files(inputs: list[str]) -> list[Path]:
    files = []
    for given in inputs:
        path = Path(given).expanduser()
        if not (found := [path] if path.is_file() else sorted(p for p in path.glob("*") if p.suffix.lower() in IMAGES)):
            raise ConfigError(f"inputs={given}: an image, or a folder of .png/.jpg/.jpeg files; fix: inputs=my_digits/")
        files += found
    return files


def read_image(file: Path) -> np.ndarray:
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
        raise ConfigError(f"inputs: {file} cannot be read as a digit image ({err}); fix: remove it") from None


def to_mnist(image: Image.Image) -> np.ndarray:
    """Any digit image as MNIST's (28, 28) uint8: light ink on black, the digit scaled to fit 20x20,
    its centre of mass at the centre."""
    image = ImageOps.exif_transpose(image)
    if "A" in image.getbands() or "transparency" in image.info:
        # Drawing apps save dark strokes on a transparent background: put them on white paper.
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:
        pixels, border = 255 - pixels, 255 - border
    pixels = np.clip(pixels - np.median(border), 0, None)  # paper that is not quite black becomes black
    if pixels.max() <= 0:
        raise ValueError("the image is blank")
    pixels *= 255 / pixels.max()  # the ink stretched to the full range
    rows, cols = np.nonzero(pixels > 255 * 0.1)
    digit = Image.fromarray(pixels[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.uint8))
    small = digit.resize([max(1, round(side * 20 / max(digit.size))) for side in digit.size], Image.Resampling.LANCZOS)
    mass = np.asarray(small, np.float32)
    centre = (np.indices(mass.shape) * mass).sum(axis=(1, 2))[::-1] / mass.sum()  # x, y
    left, top = np.clip(np.round(14 - centre), 0, 28 - np.array(small.size)).astype(int)
    canvas = Image.new("L", (28, 28))
    canvas.paste(small, (int(left), int(top)))
    return np.array(canvas)


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="predict.py", description="Classify digit images with a checkpoint.")
    parser.add_argument("ckpt_path", type=lambda text: text.removeprefix("ckpt_path="), help="a checkpoint, or last")
    parser.add_argument("inputs", nargs="+", type=lambda text: text.removeprefix("inputs="), help="images or folders")
    values = parser.parse_args(args)
    try:
        path = resolve(values.ckpt_path)
        files = image_files(values.inputs)
        images = torch.from_numpy(np.stack([read_image(file) for file in files])).unsqueeze(1)
        with torch.inference_mode():
            confidences, digits = load_task(path)(normalize(images)).softmax(dim=1).max(dim=1)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    width = max(len(str(file)) for file in files)
    print(f"{'file':<{width}}  digit  confidence")
    for file, digit, confidence in zip(files, digits, confidences, strict=True):
        print(f"{str(file):<{width}}  {int(digit):>5}  {float(confidence):>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
