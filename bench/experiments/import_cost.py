"""Where the start-up time of `import qcow2` / `qcow2 info` goes, and what two fixes would save.

    python bench/experiments/import_cost.py [--runs 15] [IMG]

Measures (best of --runs fresh processes, wall clock):
  baseline          python -c pass (also: import ctypes.util, import dataclasses alone)
  import qcow2      python -c "import qcow2"
  no-dataclass      the same with a stand-in `dataclasses` module whose decorator does nothing:
                    an upper bound of what hand-written __slots__ classes (or building the
                    record classes lazily) would save; the package still imports, records are
                    not usable, so nothing else is run in that mode
  ctypes stubbed    an empty `ctypes` package: what importing ctypes lazily (qcow2.io only
                    needs it to punch holes) would save
  open IMG          python -c "import qcow2; qcow2.open(IMG).close()"
  qcow2 info IMG    the console script, when the command exists
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHIM = '''
"""Stand-in for dataclasses: decorators return the class unchanged (import-cost experiment)."""
MISSING = object()
def dataclass(cls=None, /, **kw):
    return (lambda c: c) if cls is None else cls
def field(*a, **kw):
    return kw.get("default", None)
def fields(obj):
    return ()
def asdict(obj):
    return {}
def replace(obj, **kw):
    return obj
def astuple(obj):
    return ()
def is_dataclass(obj):
    return False
class FrozenInstanceError(AttributeError):
    pass
class InitVar:
    pass
KW_ONLY = object()
'''


BENCH = Path(__file__).resolve().parent.parent
# As bench/run.py: children get a bytecode cache kept outside src/ (an installed package has
# .pyc files; PYTHONDONTWRITEBYTECODE=1 sandboxes recompile everything at every start).
ENV = dict(os.environ, PYTHONPYCACHEPREFIX=str(BENCH / "corpus" / "pycache"))
ENV.pop("PYTHONDONTWRITEBYTECODE", None)


def best(argv: list[str], runs: int, env: dict[str, str] | None = None) -> float:
    env = env or ENV
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image", nargs="?")
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    py = sys.executable
    rows: list[tuple[str, float]] = [
        ("python -c pass", best([py, "-c", "pass"], a.runs)),
        ("python -c 'import qcow2'", best([py, "-c", "import qcow2"], a.runs)),
        ("python -c 'import ctypes.util' (qcow2.io's top import)",
         best([py, "-c", "import ctypes.util"], a.runs)),
        ("python -c 'import dataclasses'", best([py, "-c", "import dataclasses"], a.runs)),
    ]
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        # d1: dataclasses stand-in; d2: an empty ctypes package (what a lazy import in
        # qcow2.io's _punch() would leave at start-up)
        Path(d1, "dataclasses.py").write_text(SHIM)
        Path(d2, "ctypes").mkdir()
        Path(d2, "ctypes", "__init__.py").write_text("")
        Path(d2, "ctypes", "util.py").write_text("")
        for label, path in (("dataclass decorator stubbed", d1), ("ctypes stubbed", d2),
                            ("both stubbed", f"{d1}:{d2}")):
            env = dict(ENV, PYTHONPATH=path)
            rows.append((f"import qcow2, {label}", best([py, "-c", "import qcow2"], a.runs, env)))
    if a.image:
        rows.append(("python -c 'qcow2.open(IMG).close()'",
                     best([py, "-c", f"import qcow2; qcow2.open({a.image!r}).close()"], a.runs)))
        tool = Path(py).parent / "qcow2"
        for cmd in ("info", "map"):
            try:
                r = best([str(tool), cmd, a.image], a.runs)
            except subprocess.CalledProcessError:
                continue
            rows.append((f"qcow2 {cmd} IMG", r))
            rows.append((f"qemu-img {cmd} IMG", best(["qemu-img", cmd, a.image], a.runs)))
    for label, t in rows:
        print(f"{label:45} {t * 1000:7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
