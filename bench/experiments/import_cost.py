"""Where the start-up time of `import qcow2` / `qcow2 info` goes, and what two fixes would save.

    python bench/experiments/import_cost.py [--runs 15] [IMG]

Measures (best of --runs fresh processes, wall clock):
  baseline          python -c pass
  import qcow2      python -c "import qcow2"
  no-dataclass      the same with a stand-in `dataclasses` module whose decorator does nothing:
                    an upper bound of what hand-written __slots__ classes (or building the
                    record classes lazily) would save; the package still imports, records are
                    not usable, so nothing else is run in that mode
  open IMG          python -c "import qcow2; qcow2.open(IMG).close()"
  qcow2 info IMG    the console script, when the command exists
"""

from __future__ import annotations

import argparse
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


def best(argv: list[str], runs: int, env: dict[str, str] | None = None) -> float:
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
    ]
    with tempfile.TemporaryDirectory() as d:
        Path(d, "dataclasses.py").write_text(SHIM)
        import os

        env = dict(os.environ, PYTHONPATH=d)
        rows.append(("import qcow2, dataclass decorator stubbed",
                     best([py, "-c", "import qcow2"], a.runs, env)))
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
