"""Test helper: record every widget comm message in-process, no kernel needed (reference/notebook.md §3.2).

    with CommRecorder() as rec:
        w = ipywidgets.IntProgress(); w.value = 3
    rec.updates("value")   # -> [3]

ipywidgets 8 creates comms through `comm.create_comm`, which is meant to be replaced; the recorder swaps in a
comm that appends (time, thread name, msg_type, data) to a list instead of sending.
"""
from __future__ import annotations

import threading
import time
from typing import Any

import comm
from comm.base_comm import BaseComm


class _RecordingComm(BaseComm):
    recorder: "CommRecorder | None" = None

    def publish_msg(self, msg_type: str, data: Any = None, metadata: Any = None, buffers: Any = None,
                    **keys: Any) -> None:
        rec = _RecordingComm.recorder
        if rec is not None:
            rec._append(self.comm_id, msg_type, data or {})


class CommRecorder:
    def __init__(self) -> None:
        self.log: list[tuple[float, str, str, str, dict]] = []   # (time, thread, comm_id, msg_type, data)
        self._lock = threading.Lock()
        self._saved = None

    def _append(self, comm_id: str, msg_type: str, data: dict) -> None:
        with self._lock:
            self.log.append((time.monotonic(), threading.current_thread().name, comm_id, msg_type, data))

    def __enter__(self) -> "CommRecorder":
        self._saved = comm.create_comm
        _RecordingComm.recorder = self
        comm.create_comm = lambda *a, **k: _RecordingComm(*a, **k)
        return self

    def __exit__(self, *exc: Any) -> None:
        comm.create_comm = self._saved
        _RecordingComm.recorder = None

    def messages(self, comm_id: str | None = None) -> list[tuple[float, str, str, str, dict]]:
        with self._lock:
            return [m for m in self.log if comm_id is None or m[2] == comm_id]

    def updates(self, key: str, comm_id: str | None = None, with_meta: bool = False) -> list:
        """Values sent for trait `key` (in order); with_meta: (time, thread, value) tuples."""
        out = []
        for t, thread, cid, mtype, data in self.messages(comm_id):
            state = data.get("state", {}) if isinstance(data, dict) else {}
            if mtype == "comm_msg" and data.get("method") == "update" and key in state:
                out.append((t, thread, state[key]) if with_meta else state[key])
        return out

    def opened(self, model_name: str | None = None) -> list[dict]:
        """The initial states of comms opened (widgets created), optionally of one model class."""
        return [d.get("state", {}) for _, _, _, mtype, d in self.messages()
                if mtype == "comm_open" and (model_name is None or d.get("state", {}).get("_model_name") == model_name)]
