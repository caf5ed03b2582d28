"""Reading a Relax function in tests: its bindings, the op a binding calls, a value's dtype."""
from __future__ import annotations


def bindings(func):
    for block in func.body.blocks:
        yield from block.bindings


def op_name(value) -> str | None:
    import tvm
    from tvm import relax
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


def dtype(expr) -> str:
    return str(expr.ty.dtype)
