"""Classify your own digit images with a checkpoint written by train.py.

    python predict.py ckpt_path=outputs/DATE/TIME/checkpoints/last.ckpt inputs=my_digits/
    python predict.py ckpt_path=last inputs=seven.jpg

Prints one line per image: file, digit, confidence (the softmax probability of that digit).
Images are PNG or JPEG of any size, a light digit on a dark background or a dark one on light
paper; each is converted as MNIST's digits were made: grayscale, light ink on black, the digit
scaled to fit a 20x20 box keeping its aspect ratio, then placed in a 28x28 image so that its centre
of mass is at the centre. The model is rebuilt from the checkpoint alone; it runs on the CPU.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mnist_extras.errors import ConfigError, exit_on_error, resolve_checkpoint

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
KEYS = ("ckpt_path", "inputs")


def parse_args(args: list[str]) -> dict[str, str]:
    """`ckpt_path=PATH inputs=PATH`, in the key=value form train.py and eval.py take."""
    values = {}
    for arg in args:
        key, equals, value = arg.partition("=")
        if not equals or key not in KEYS:
            raise ConfigError(
                f"{arg}: not an argument of predict.py; fix: python predict.py ckpt_path=PATH inputs=FILE_OR_FOLDER"
            )
        values[key] = value
    for key in KEYS:
        if not values.get(key):
            raise ConfigError(f"{key}: not set; fix: python predict.py ckpt_path=PATH inputs=FILE_OR_FOLDER")
    return values


def image_files(inputs: str) -> list[Path]:
    path = Path(inputs).expanduser()
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if not files:
        raise ConfigError(
            f"inputs={inputs}: an image, or a folder holding .png/.jpg/.jpeg files; fix: inputs=my_digits/"
        )
    return files


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


def predict(ckpt_path: str, files: list[Path]) -> list[tuple[Path, int, float]]:
    """(file, digit, confidence) for each image file."""
    import torch

    from mnist_extras.checkpoints import load_task
    from data_modules import normalize

    task, _ = load_task(ckpt_path)
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(to_mnist(image))
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"inputs: {file} cannot be read as a digit image ({err}); fix: remove it from {file.parent}"
            ) from err
    batch = normalize(torch.from_numpy(np.stack(images)).unsqueeze(1))
    with torch.inference_mode():
        confidence, digit = task(batch).softmax(dim=1).max(dim=1)
    return [(file, int(d), float(c)) for file, d, c in zip(files, digit, confidence, strict=True)]


def main(args: list[str]) -> None:
    values = parse_args(args)
    ckpt_path = resolve_checkpoint(values["ckpt_path"])
    rows = predict(str(ckpt_path), image_files(values["inputs"]))
    width = max(len(str(file)) for file, _, _ in rows)
    print(f"{'file':<{width}}  digit  confidence")
    for file, digit, confidence in rows:
        print(f"{str(file):<{width}}  {digit:>5}  {confidence:>10.3f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception as err:
        exit_on_error(err)
        raise
