"""The project functions one run calls, counted with `sys.setprofile` while train.py runs in this
process: distinct functions defined in the project's own files (not the venv's, bench's or tests'),
and apart from them the module and class bodies the run executes, which the profiler reports as
calls too.

python -m bench.calls debug=fdr trainer=cpu task.model.backbone.pretrained=false   # any train.py overrides
python -m bench.calls --list debug=fdr trainer=cpu    # and each function and body by name
"""

import inspect
import runpy
import sys
from collections import Counter
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def main() -> None:
    seen: dict[tuple[str, str], bool] = {}  # (file, qualified name): whether it is a function's body
    skip = (str(PROJECT / ".venv"), str(PROJECT / "bench"), str(PROJECT / "tests"))

    def profile(frame, event, arg) -> None:  # noqa: ANN001
        code = frame.f_code
        if event == "call" and code.co_filename.startswith(str(PROJECT)) and not code.co_filename.startswith(skip):
            name = (Path(code.co_filename).relative_to(PROJECT).as_posix(), code.co_qualname)
            seen[name] = bool(code.co_flags & inspect.CO_OPTIMIZED)  # def, lambda, comprehension: not a module/class

    listed = "--list" in sys.argv
    sys.argv = ["train.py", *[arg for arg in sys.argv[1:] if arg != "--list"]]
    sys.setprofile(profile)
    try:
        runpy.run_path(str(PROJECT / "train.py"), run_name="__main__")
    except SystemExit:
        pass
    finally:
        sys.setprofile(None)
    functions = Counter(path for (path, _), function in seen.items() if function)
    bodies = Counter(path for (path, _), function in seen.items() if not function)
    print(f"{sum(functions.values())} distinct project functions in {len(functions)} files, and "
          f"{sum(bodies.values())} module and class bodies")  # fmt: skip
    print("  functions  bodies  file")
    for path in sorted(functions | bodies):
        print(f"  {functions[path]:9d}  {bodies[path]:6d}  {path}")
    if listed:
        for (path, name), function in sorted(seen.items()):
            print(f"  {'function' if function else 'body':8s}  {path}  {name}")


if __name__ == "__main__":
    main()
