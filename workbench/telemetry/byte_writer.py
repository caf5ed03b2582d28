"""The part of `librt.strings` (mypyc's runtime library, installed with mypy) that `row_writer` uses, in plain
Python: where librt is missing (a pure-Python install, the GPU machine), the row writers run on this. Same
behaviour: 8 little-endian bytes a value, the same conversions and errors as librt's (and struct's)."""
from __future__ import annotations

import struct

_I64, _F64 = struct.Struct("<q").pack, struct.Struct("<d").pack


class BytesWriter:
    def __init__(self) -> None:
        self._b = bytearray()

    def write(self, data: bytes) -> None:
        self._b += data

    def getvalue(self) -> bytes:
        return bytes(self._b)

    def truncate(self, size: int) -> None:
        del self._b[size:]

    def __len__(self) -> int:
        return len(self._b)


def write_i64_le(w: BytesWriter, v: int) -> None:
    try:
        w.write(_I64(v))
    except struct.error as e:       # as librt: ValueError out of range, TypeError for a value of another type
        raise (ValueError if isinstance(v, int) else TypeError)(str(e)) from None


def write_f64_le(w: BytesWriter, v: float) -> None:
    try:
        w.write(_F64(v))
    except struct.error as e:
        raise TypeError(str(e)) from None
