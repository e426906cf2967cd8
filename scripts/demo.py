"""Demo: build a small qcow2 image (data, zero and compressed clusters, a backing file),
then work on it with the `qcow2` tool: info, map, convert to raw, compare, write through
`qcow2 io` (qemu-io syntax), resize, and compare again (now different)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from qcow2.format.builder import ZERO, ImageSpec, build_image


def sh(*argv: str) -> None:
    print("$", " ".join(argv), flush=True)
    rc = subprocess.run(argv).returncode
    print(f"(exit status {rc})\n", flush=True)


def main() -> int:
    tool = os.path.join(os.path.dirname(sys.executable), "qcow2")
    d = tempfile.mkdtemp(prefix="qcow2-demo-")
    base = os.path.join(d, "base.qcow2")
    top = os.path.join(d, "top.qcow2")
    text = b"The quick brown fox jumps over the lazy dog. " * 1500
    with open(base, "wb") as f:
        f.write(build_image(ImageSpec(size=64 << 20, clusters={
            0: text[:65536], 1: text[100:65636], 16: ("compressed", text[:65536])})))
    with open(top, "wb") as f:
        f.write(build_image(ImageSpec(size=64 << 20, backing_file="base.qcow2",
                                      backing_format="qcow2",
                                      clusters={1: ZERO, 2: b"\xab" * 65536})))
    print(f"Built {base} and {top} (top is an overlay of base)\n")
    sh(tool, "info", "--backing-chain", top)
    sh(tool, "map", "--output=json", top)
    raw = os.path.join(d, "top.raw")
    sh(tool, "convert", "-p", "-O", "raw", top, raw)
    sh(tool, "compare", top, raw)
    sh(tool, "io", "-c", "write -P 0x5a 1000 100000", "-c", "write -z 2M 64k",
       "-c", "read -P 0x5a 1000 100000", "-c", "map", top)
    sh(tool, "resize", top, "+64M")
    sh(tool, "compare", top, raw)
    sh(tool, "info", "--output=json", raw)
    print(f"Files left in {d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
