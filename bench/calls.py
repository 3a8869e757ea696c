"""The project functions one run calls: distinct functions defined in the project's own files
(not the venv's), counted with `sys.setprofile` while train.py runs in this process.

python -m bench.calls debug=fdr trainer=cpu task.model.backbone.pretrained=false   # any train.py overrides
"""

import runpy
import sys
from collections import Counter
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def main() -> None:
    seen: set[tuple[str, str]] = set()
    skip = (str(PROJECT / ".venv"), str(PROJECT / "bench"), str(PROJECT / "tests"))

    def profile(frame, event, arg) -> None:  # noqa: ANN001
        if event == "call":
            path = frame.f_code.co_filename
            if path.startswith(str(PROJECT)) and not path.startswith(skip):
                seen.add((Path(path).relative_to(PROJECT).as_posix(), frame.f_code.co_qualname))

    sys.argv = ["train.py", *sys.argv[1:]]
    sys.setprofile(profile)
    try:
        runpy.run_path(str(PROJECT / "train.py"), run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
    files = Counter(path for path, _ in seen)
    print(f"{len(seen)} distinct project functions in {len(files)} files")
    for path, count in sorted(files.items()):
        print(f"  {count:3d}  {path}")


if __name__ == "__main__":
    main()
