"""Widgets that act on a session (model loader), the environment-check view, and the dashboard that composes
everything. Threading rules (reference/notebook.md §1.2): click handlers return at once and start work on a
thread; each widget has exactly one writer thread (the loader's worker thread for its progress bars and
status, the check thread for the env view, the session's pump for the live views)."""
from __future__ import annotations

import concurrent.futures as cf
import html
import threading
import time
from typing import TYPE_CHECKING, Any

from workbench.ui.tables import html_table, message
from workbench.ui.views import CacheView, LatencyView, OutcomesView, StatusLine, TimelineView, View

if TYPE_CHECKING:
    from workbench.ui.session import Session

PROGRESS_HZ = 10.0     # progress bars are written at most this often (raw widgets are not throttled)


class _Throttle:
    """Lets a value through at most `hz` times a second, always letting the final one through."""

    def __init__(self, hz: float):
        self.period, self.last = 1.0 / hz, 0.0

    def ready(self, final: bool = False) -> bool:
        now = time.monotonic()
        if final or now - self.last >= self.period:
            self.last = now
            return True
        return False


# ---------------------------------------------------------------------------------------------- loader
class ModelLoader:
    """Zoo / artifact picker, copies, Load button, progress bars for compile and load, errors shown in place.

    A click starts the load on the loader's own worker thread (one load at a time), which is the only writer
    of the progress bars and the status line."""

    def __init__(self, session: "Session"):
        self.session = session
        self._widget = None
        self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="workbench-loader")
        self.last_future: cf.Future | None = None
        self.history: list[str] = []          # status lines of past loads (text repr)

    def options(self) -> list[tuple[str, str]]:
        from workbench.ui import artifacts
        opts = [(f"zoo: {n}", n) for n in artifacts.zoo_names()]
        for d in artifacts.list_cached()[:30]:
            opts.append((f"artifact: {d.name}", str(d)))
        return opts

    def widget(self):
        if self._widget is not None:
            return self._widget
        import ipywidgets as W
        opts = self.options()
        default = next((v for _, v in opts if v == "mlp"), opts[0][1] if opts else "")
        self.model = W.Combobox(value=default, options=[v for _, v in opts], ensure_option=False,
                                placeholder="zoo name, artifact dir or .onnx", description="model",
                                layout=W.Layout(width="360px"))
        self.copies = W.BoundedIntText(value=1, min=-1000, max=100_000, description="copies",
                                       layout=W.Layout(width="160px"))
        self.button = W.Button(description="Load", icon="download", button_style="primary",
                               tooltip="compile (or reuse the cached artifact) and load into the workers")
        self.compile_bar = W.IntProgress(value=0, min=0, max=1, description="compile",
                                         layout=W.Layout(width="360px"))
        self.load_bar = W.IntProgress(value=0, min=0, max=1, description="load", layout=W.Layout(width="360px"))
        self.status = W.HTML(message("pick a model and click Load"))
        self.button.on_click(lambda _b: self.submit(self.model.value, self.copies.value))
        self._widget = W.VBox([W.HBox([self.model, self.copies, self.button]),
                               W.HBox([self.compile_bar, self.load_bar]), self.status])
        self._widget.add_class("workbench-loader")
        return self._widget

    def submit(self, model: str, copies: int) -> cf.Future:
        """Load in the background (what the button does); returns the future of `session.load`."""
        self.widget()
        self.last_future = self._pool.submit(self._run, str(model).strip(), int(copies))
        return self.last_future

    def _run(self, model: str, copies: int):
        bars = {"compile": self.compile_bar, "load": self.load_bar}
        throttles = {k: _Throttle(PROGRESS_HZ) for k in bars}
        for b in bars.values():
            b.value, b.bar_style = 0, ""
        self.button.disabled = True
        self._say(f"loading {model} ×{copies} …")

        def progress(stage: str, done: int, total: int, msg: str) -> None:
            bar = bars.get(stage)
            if bar is None or not throttles[stage].ready(final=done >= total):
                return
            with bar.hold_sync():
                bar.max = max(1, total)
                bar.value = min(done, bar.max)
            self._say(msg)
        try:
            loaded = self.session.load(model, copies=copies, progress=progress)
        except Exception as e:  # noqa: BLE001 - shown in place; the session stays usable
            for b in bars.values():
                if b.value < b.max:
                    b.bar_style = "danger"
            self._say(f"could not load {model!r}: {e}", "error")
            return None
        finally:
            self.button.disabled = False
        for b in bars.values():
            b.value, b.bar_style = b.max, "success"
        self._say(f"loaded {loaded}", "ok")
        return loaded

    def _say(self, text: str, kind: str = "info") -> None:
        self.history.append(text)
        if self._widget is not None:
            self.status.value = message(text, kind)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def text(self) -> str:
        return "ModelLoader: " + (self.history[-1] if self.history else "idle")

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        b = dict(self.widget()._repr_mimebundle_())
        b["text/plain"] = self.text()
        return b

    def __repr__(self) -> str:
        return self.text()


# ------------------------------------------------------------------------------------------ env checker
class EnvView:
    """The environment checker's report (workbench.env.checks.check) with each failing check's fix;
    'Re-check' runs it again on a thread."""

    def __init__(self, report: Any = None, *, gpu: bool = True, devices: bool = False):
        self.report = report
        self.gpu, self.devices = gpu, devices
        self.error: str | None = None
        self._widget = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self) -> Any:
        """Run the checks now (in this thread) and show them."""
        from workbench.env.checks import check
        try:
            rep = check(gpu=self.gpu, devices=self.devices)
            self.report, self.error = rep, None
        except Exception as e:  # noqa: BLE001 - the view says what broke instead of crashing the dashboard
            self.error = f"the environment check failed: {type(e).__name__}: {e}"
        self._write()
        return self.report

    def run_async(self) -> threading.Thread:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self.run, name="workbench-envcheck", daemon=True)
                self._thread.start()
            return self._thread

    def frame(self):
        """The checks as a polars frame (group, name, status, found, wanted, why, fix)."""
        return self.report.to_frame() if self.report is not None else None

    def html(self) -> str:
        if self.error:
            return message(self.error, "error")
        if self.report is None:
            return message("checking the environment …")
        df = self.report.to_frame().select("group", "name", "status", "found", "wanted", "fix")
        colors = {"pass": "#1a7f37", "warn": "#9a6700", "fail": "#cf222e", "unavailable": "#6e7781"}

        def style(col: str, v: Any) -> str:
            base = "text-align:left;max-width:380px;white-space:normal"
            return f"{base};color:{colors[v]};font-weight:bold" if col == "status" and v in colors else base
        head = f"<b>{html.escape(self.report.summary())}</b>"
        return head + html_table(df, max_rows=200, cell_style=style)

    def text(self) -> str:
        if self.error:
            return self.error
        return self.report.to_text() if self.report is not None else "EnvView: not checked yet"

    def widget(self):
        if self._widget is None:
            import ipywidgets as W
            self._html = W.HTML(self.html())
            button = W.Button(description="Re-check", icon="refresh")
            button.on_click(lambda _b: self.run_async())
            self._widget = W.VBox([button, self._html])
            if self.report is None and self.error is None:
                self.run_async()
        return self._widget

    def _write(self) -> None:
        if self._widget is not None:
            self._html.value = self.html()

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        b = dict(self.widget()._repr_mimebundle_())
        b["text/plain"] = self.text()
        b["text/html"] = self.html()
        return b

    def __repr__(self) -> str:
        return self.text() if self.report is None or self.error else f"EnvView({self.report.summary()})"


# -------------------------------------------------------------------------------------------- dashboard
class Dashboard:
    """Status line, model loader, and tabs: request outcomes, latency, timeline, cache, environment.
    Live views are fed by the session's pump; `Dashboard.of(requests, actions)` draws recorded telemetry."""

    TABS = ("Requests", "Latency", "Timeline", "Cache", "Environment")

    def __init__(self, views: dict[str, View], loader: ModelLoader | None = None, env: EnvView | None = None,
                 status: StatusLine | None = None):
        self.views = views
        self.loader = loader
        self.env = env          # None: no Environment tab (e.g. telemetry recorded on another machine)
        self.status = status
        self._widget = None

    @classmethod
    def live_views(cls, window: int | None = 20_000) -> dict[str, View]:
        """window: how many recent actions the latency view aggregates (None: all)."""
        return {"Requests": OutcomesView(), "Latency": LatencyView(window), "Timeline": TimelineView(),
                "Cache": CacheView()}

    @classmethod
    def of(cls, requests=None, actions=None, env: Any = None, **snapshot_kw: Any) -> "Dashboard":
        """A dashboard of recorded telemetry (e.g. an experiment's), drawn once. env: an EnvView or a check
        report to show in an Environment tab (the machine the telemetry came from)."""
        from workbench.ui.snapshot import Snapshot
        views = cls.live_views(window=None)
        snap = Snapshot.of(requests, actions, **snapshot_kw)
        for v in views.values():
            v.update(snap)
        if env is not None and not isinstance(env, EnvView):
            env = EnvView(env)
        return cls(views, env=env)

    def widget(self):
        if self._widget is None:
            import ipywidgets as W
            tabs = [self.views[t].widget() for t in self.TABS if t in self.views]
            titles = [t for t in self.TABS if t in self.views]
            if self.env is not None:
                tabs.append(self.env.widget())
                titles.append("Environment")
            tab = W.Tab(children=tabs, titles=titles, selected_index=0)
            self._tab_views = [self.views[t] for t in self.TABS if t in self.views]
            self._show_tab(0)
            tab.observe(lambda ch: self._show_tab(ch["new"]), "selected_index")
            parts = ([self.status.widget()] if self.status else []) + \
                    ([self.loader.widget()] if self.loader else []) + [tab]
            self._widget = W.VBox(parts)
            self._widget.add_class("workbench-dashboard")
        return self._widget

    def _show_tab(self, index: int | None) -> None:
        """Only the selected tab's views are redrawn live (hidden ones catch up when shown, and on flush)."""
        for i, v in enumerate(self._tab_views):
            v.active = i == index
        if self.pump is not None and index is not None and index < len(self._tab_views):
            self.pump.poke(force=True)

    pump = None     # set by the session: poked when a tab is shown

    def text(self) -> str:
        parts = [self.status.text()] if self.status else []
        if self.loader:
            parts.append(self.loader.text())
        parts += [v.text() for v in self.views.values()]
        return "\n".join(parts)

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict:
        b = dict(self.widget()._repr_mimebundle_())
        b["text/plain"] = self.text()
        b["text/html"] = "".join(v.html() for v in self.views.values())
        return b

    def __repr__(self) -> str:
        return self.text()
