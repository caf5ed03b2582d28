"""The one thread that writes live widgets.

ipywidgets has no locks, so every live view is written by exactly one thread: this pump. Producers (the
controller's result thread, workloads, cells) only call `poke()`, which sets a flag. The pump wakes on the
flag, takes ONE snapshot of the telemetry, hands it to every view, and then sleeps out the rest of its period,
so however fast rows arrive the widgets are written at most `max_hz` times a second, with aggregates.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

MIN_HZ, MAX_HZ = 0.2, 10.0


class View(Protocol):
    """`update(snapshot)`; a view may also have `active` (False: not on screen, e.g. a hidden tab): it is then
    skipped except on forced ticks (`flush()`, the final tick), which update every view."""
    def update(self, snapshot: Any) -> None: ...


class Pump:
    """Calls `view.update(snapshot_fn())` for every registered view, at most `max_hz` times a second, after
    something `poke()`d it (and every `idle_s` seconds regardless, so time-based views advance)."""

    def __init__(self, snapshot_fn: Callable[[], Any], max_hz: float = 4.0, name: str = "workbench-ui-pump",
                 idle_s: float | None = None):
        if not (MIN_HZ <= max_hz <= MAX_HZ):
            raise ValueError(f"pump rate max_hz={max_hz} is outside [{MIN_HZ}, {MAX_HZ}] Hz "
                             f"(live charts are meant to update 2-5 times a second)")
        self.snapshot_fn = snapshot_fn
        self.max_hz = float(max_hz)
        self.period = 1.0 / self.max_hz
        self.idle_s = idle_s
        self._views: list[View] = []
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._tick_done = threading.Condition()
        self._first_poke: int | None = None   # monotonic ns of the oldest poke not yet drawn
        self.ticks = 0          # ticks finished
        self._started = 0       # ticks started (their snapshot is taken after this count moves)
        self._force = False     # next tick updates every view, active or not
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        self.latencies_ns: collections.deque[int] = collections.deque(maxlen=2048)  # poke -> views written
        self.tick_cost_ns: collections.deque[int] = collections.deque(maxlen=2048)  # wall time per tick
        self.tick_cpu_ns: collections.deque[int] = collections.deque(maxlen=2048)   # this thread's CPU per tick
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ producers
    def poke(self, force: bool = False) -> None:
        """New data is there (cheap, any thread; called for every telemetry row). force: the next tick updates
        hidden views too."""
        if force:
            self._force = True
        if self._first_poke is None:
            self._first_poke = time.monotonic_ns()
        if not self._dirty.is_set():
            self._dirty.set()

    def add(self, view: View) -> View:
        with self._lock:
            if view not in self._views:
                self._views.append(view)
        self.poke(force=True)
        return view

    def remove(self, view: View) -> None:
        with self._lock:
            if view in self._views:
                self._views.remove(view)

    @property
    def views(self) -> list[View]:
        with self._lock:
            return list(self._views)

    def flush(self, timeout: float = 10.0) -> bool:
        """Ask for one more tick and wait until it has run (so widgets show everything recorded so far)."""
        if not self.alive:
            return False
        with self._tick_done:
            target = self._started + 1   # the first tick that starts after now sees every row recorded so far
            self.poke(force=True)
            return self._tick_done.wait_for(lambda: self.ticks >= target or not self.alive, timeout=timeout) \
                and self.ticks >= target

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def close(self, final_tick: bool = True) -> None:
        """Stop the thread (after one last tick, so saved widget state holds the final data). Idempotent."""
        if self._stop.is_set():
            return
        if final_tick and self._thread.is_alive():
            self.flush(timeout=10.0)
        self._stop.set()
        self._dirty.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    # ---------------------------------------------------------------------------------------- the thread
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._dirty.wait(timeout=self.idle_s if self.idle_s else 0.5) and not self.idle_s:
                continue
            if self._stop.is_set():
                break
            self._dirty.clear()
            poked, self._first_poke = self._first_poke, None
            force, self._force = self._force, False
            self._started += 1
            start, cpu = time.monotonic_ns(), time.thread_time_ns()
            self._tick(force)
            end = time.monotonic_ns()
            self.tick_cost_ns.append(end - start)
            self.tick_cpu_ns.append(time.thread_time_ns() - cpu)
            if poked is not None:
                self.latencies_ns.append(end - poked)
            with self._tick_done:
                self.ticks += 1
                self._tick_done.notify_all()
            self._stop.wait(max(0.0, self.period - (end - start) / 1e9))   # the rate bound
        with self._tick_done:
            self._tick_done.notify_all()

    def _tick(self, force: bool = True) -> None:
        views = [v for v in self.views if force or getattr(v, "active", True)]
        if not views:
            return
        try:
            snap = self.snapshot_fn()
        except Exception as e:  # noqa: BLE001 - a broken source must not kill the pump; say why
            self._error(f"snapshot failed: {type(e).__name__}: {e}")
            return
        for v in views:
            try:
                v.update(snap)
            except Exception as e:  # noqa: BLE001 - one broken view must not stop the others
                self._error(f"{type(v).__name__}.update failed: {type(e).__name__}: {e}")

    def _error(self, msg: str) -> None:
        self.errors.append(msg)
        log.warning("workbench ui pump: %s", msg)

    def stats(self) -> dict:
        lat = sorted(self.latencies_ns)
        cost = sorted(self.tick_cost_ns)
        cpu = sorted(self.tick_cpu_ns)

        def pct(xs: list[int], q: float) -> float | None:
            return xs[min(len(xs) - 1, int(q * len(xs)))] / 1e6 if xs else None
        return {"ticks": self.ticks, "max_hz": self.max_hz, "views": len(self.views),
                "update_latency_ms_p50": pct(lat, 0.5), "update_latency_ms_p99": pct(lat, 0.99),
                "tick_cost_ms_p50": pct(cost, 0.5), "tick_cost_ms_p99": pct(cost, 0.99),
                "tick_cpu_ms_p50": pct(cpu, 0.5), "tick_cpu_ms_p99": pct(cpu, 0.99),
                "errors": list(self.errors)}

    def __repr__(self) -> str:
        return f"Pump({self.max_hz:g} Hz, {len(self.views)} views, {self.ticks} ticks, alive={self.alive})"
