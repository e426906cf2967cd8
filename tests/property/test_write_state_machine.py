"""A hypothesis state machine of write / write_zeroes / discard / resize / flush / reopen /
amend (refcount width, compat, lazy refcounts) on a qcow2 image against a bytearray model.
Invariant: every read equals the model; after an amend our check finds nothing. At the end,
qemu-img check (when installed) finds no corruption and no leak."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import qcow2
from qcow2.engine.amend import AmendError
from qcow2.engine.writer import WritableQcow2Image
from qcow2.format.builder import ImageSpec, build_image

CS = 4096
MAX = 1 << 20


class WriteMachine(RuleBasedStateMachine):
    img: WritableQcow2Image

    @initialize(version=st.sampled_from([2, 3]), order=st.sampled_from([0, 4, 6]))
    def setup(self, version: int, order: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qcow2-sm-"))
        self.path = self.dir / "sm.qcow2"
        self.path.write_bytes(build_image(ImageSpec(size=256 * 1024, cluster_bits=12,
                                                    version=version,
                                                    refcount_order=order if version == 3
                                                    else 4)))
        self.model = bytearray(256 * 1024)
        self.img = qcow2.open(str(self.path), readonly=False)  # type: ignore[assignment]

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        size = len(self.model)
        off = data.draw(st.integers(0, size - 1))
        n = data.draw(st.integers(1, min(3 * CS + 100, size - off)))
        return off, n

    @rule(data=st.data(), fill=st.integers(1, 255))
    def write(self, data: st.DataObject, fill: int) -> None:
        off, n = self._range(data)
        self.img.write(off, bytes([fill]) * n)
        self.model[off:off + n] = bytes([fill]) * n

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        off, n = self._range(data)
        self.img.write_zeroes(off, n, unmap=unmap)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        off, n = self._range(data)
        self.img.discard(off, n)
        lo = -(-off // CS) * CS
        end = off + n
        hi = end if end == len(self.model) else end // CS * CS
        if lo < hi:
            self.model[lo:hi] = bytes(hi - lo)

    @rule(sectors=st.integers(1, MAX // 512))
    def resize(self, sectors: int) -> None:
        new = sectors * 512
        self.img.resize(new)
        if new < len(self.model):
            del self.model[new:]
        else:
            self.model.extend(bytes(new - len(self.model)))

    @rule(bits=st.sampled_from([1, 2, 8, 16, 64]))
    def amend_refcount_bits(self, bits: int) -> None:
        v2 = self.img.header.version < 3
        try:
            self.img.amend(refcount_bits=bits)
        except AmendError as e:
            assert v2 and bits != 16, e
            return
        assert self.img.header.refcount_bits == bits
        self._checked()

    @rule(compat=st.sampled_from(["0.10", "1.1"]), lazy=st.none() | st.booleans())
    def amend_compat(self, compat: str, lazy: bool | None) -> None:
        h = self.img.header
        wide = h.refcount_bits != 16
        try:
            self.img.amend(compat=compat, lazy_refcounts=lazy)
        except AmendError as e:
            assert (compat == "0.10" and (wide or lazy)), e
            return
        assert self.img.header.version == (2 if compat == "0.10" else 3)
        self._checked()

    def _checked(self) -> None:
        res = self.img.check()
        assert not res.corruptions and not res.leaks and not res.check_errors, res.messages

    @rule()
    def flush(self) -> None:
        self.img.flush()

    @rule()
    def reopen(self) -> None:
        self.img.close()
        self.img = qcow2.open(str(self.path), readonly=False)  # type: ignore[assignment]

    @precondition(lambda self: hasattr(self, "img"))
    @invariant()
    def reads_equal_model(self) -> None:
        assert self.img.virtual_size == len(self.model)
        assert self.img.read(0, len(self.model)) == bytes(self.model)

    def teardown(self) -> None:
        if not hasattr(self, "img"):
            return
        self.img.close()
        if shutil.which("qemu-img"):
            r = subprocess.run(["qemu-img", "check", "--output=json", str(self.path)],
                               capture_output=True, text=True)
            res = json.loads(r.stdout)
            assert r.returncode == 0 and "leaks" not in res and "corruptions" not in res, (
                r.stdout, r.stderr)
        shutil.rmtree(self.dir, ignore_errors=True)


WriteMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=30,
                                          deadline=None)
TestWriteMachine = WriteMachine.TestCase
