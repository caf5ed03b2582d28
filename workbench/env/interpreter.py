"""The interpreter's switch interval while the controller runs in this process.

A thread that wants the interpreter lock waits up to `sys.getswitchinterval()` while another Python thread runs.
The controller runs in the kernel's (or `workbench run`'s) process, so a busy cell, a chart refresh or the
telemetry spill thread delays each of its decisions by up to that much: on the H200, with a busy cell and a
chart refresh, SLO attainment fell from 84 % to 46 % at Python's 5 ms and held at 80 % at 0.5 ms
(bench/results/controller_gpu_busy*.md).
"""
from __future__ import annotations

import sys

SWITCH_INTERVAL = 0.0005   # s


def lower_switch_interval(seconds: float | None = SWITCH_INTERVAL) -> float:
    """Lower the switch interval to `seconds` (never raise it: a lower one set by the user stays; None leaves it).
    Returns the interval now in force."""
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 1:
            raise ValueError(f"switch_interval={seconds!r}: give seconds in (0, 1] (e.g. 0.0005), or None to "
                             f"leave the interpreter's switch interval as it is")
        if seconds < sys.getswitchinterval():
            sys.setswitchinterval(seconds)
    return sys.getswitchinterval()
