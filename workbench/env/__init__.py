"""The machine the workbench runs on: predictability environment, checks and physical floors.

`check()` -> CheckReport (OS, CUDA environment, NVML per GPU, TVM/cupy devices, floors when measured);
`workbench.env.floors.measure()` -> Floors. Importing this package imports nothing heavy.
"""
from __future__ import annotations


def check(floors=None, gpu: bool = True, devices: bool = True):
    """Check this machine for predictable serving; see workbench.env.checks.check."""
    from workbench.env.checks import check as _check
    return _check(floors=floors, gpu=gpu, devices=devices)


__all__ = ["check"]
