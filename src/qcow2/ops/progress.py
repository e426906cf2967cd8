"""Progress reports exactly as qemu-img prints them (util/qemu-progress.c).

`-p` prints `    (xx.xx/100%)` followed by a carriage return on stdout whenever progress grew by
more than `min_skip` percent (and always at 0 and 100), and a newline at the end. Without `-p`,
SIGUSR1 prints the current value on stderr. QEMU keeps the state in C `float`s, so the
arithmetic is rounded to single precision after every operation: the printed digits then match.
"""

from __future__ import annotations

import signal
import struct
import sys
import threading
from types import FrameType
from typing import Any, TextIO

_F32 = struct.Struct("f")


def f32(x: float) -> float:
    """Round a double to the nearest C float (as an assignment to `float` does)."""
    return float(_F32.unpack(_F32.pack(x))[0])


class Progress:
    """qemu_progress_init/print/end. Call `print(delta, max)` as QEMU does, then `end()`."""

    def __init__(self, enabled: bool, min_skip: float, stream: TextIO | None = None,
                 err_stream: TextIO | None = None, use_signal: bool = True) -> None:
        self.enabled = enabled
        self.min_skip = f32(min_skip)
        self.current = 0.0
        self.last_print = 0.0
        self._stream = stream
        self._err = err_stream
        self._pending = False
        self._old_handler: Any = None
        self._signal_installed = False
        if not enabled and use_signal and hasattr(signal, "SIGUSR1") and \
                threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGUSR1, self._on_signal)
            self._signal_installed = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._pending = True

    def print(self, delta: float, max_: int) -> None:
        """qemu_progress_print(): `max_` 0 means `delta` is the absolute percentage."""
        rel = f32(f32(f32(delta) / 100) * max_)
        current = f32(delta) if max_ == 0 else f32(self.current + rel)
        if current > 100:
            current = 100.0
        self.current = current
        # A report below the last printed one prints too (amend's operations each start
        # their own projection, so its progress can go back).
        if (current > f32(self.last_print + self.min_skip)
                or current < f32(self.last_print - self.min_skip)
                or current == 100 or current == 0):
            self.last_print = current
            self._show()

    def _show(self) -> None:
        if self.enabled:
            out = self._stream or sys.stdout
            out.write(f"    ({self.current:3.2f}/100%)\r")
            out.flush()
        elif self._pending:
            self._pending = False
            err = self._err or sys.stderr
            err.write(f"    ({self.current:3.2f}/100%)\n")
            err.flush()

    def end(self) -> None:
        if self.enabled:
            out = self._stream or sys.stdout
            out.write("\n")
            out.flush()
        if self._signal_installed:
            signal.signal(signal.SIGUSR1, self._old_handler)
            self._signal_installed = False
