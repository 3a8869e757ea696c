"""One line describing the machine a benchmark ran on, printed at the top of every bench script."""

import os


def describe() -> str:
    import torch

    from mnist_extras.speed import cpu_name

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"
