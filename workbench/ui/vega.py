"""`VegaChart`: an offline Vega-Lite widget whose data can be replaced without re-embedding the chart.

Why not `alt.JupyterChart`: it re-embeds the whole view on every update, and in offline mode every chart
instance carries its own ~900 KB copy of Vega in the widget state. Here the Vega bundle (built by vl-convert,
no CDN) lives once per kernel in a `VegaLib` widget; each `VegaChart` holds a small loader, the spec (with a
named data source) and the current rows. Updates set `values` only; the browser swaps them in through Vega's
changeset API. Saved widget state (nbclient, JupyterLab) contains spec + last rows, so exported reports render.
"""
from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from workbench.ui.paths import cache_dir

DATA_NAME = "table"

_LIB_ESM = "function render() {}\nexport default { render };\n"

_CHART_ESM = r"""
const libs = (globalThis.__workbenchVegaLibs ??= new Map());
function loadVega(model) {
  const id = model.get("lib").replace(/^IPY_MODEL_/, "");
  if (!libs.has(id)) {
    libs.set(id, (async () => {
      const lib = await model.widget_manager.get_model(id);
      const url = URL.createObjectURL(new Blob([lib.get("bundle")], { type: "text/javascript" }));
      try { return await import(url); } finally { URL.revokeObjectURL(url); }
    })());
  }
  return libs.get(id);
}
async function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "workbench-vega";
  el.appendChild(box);
  let api = null, gen = 0;
  const push = () => {
    if (!api) return;
    const name = model.get("data_name");
    try { api.view.data(name); } catch (e) { return; }   // a chart with inline data only: nothing to swap
    const rows = structuredClone(model.get("values"));
    api.view.change(name, api.view.changeset().remove(() => true).insert(rows)).resize().run();
    box.dataset.rows = String(rows.length);
  };
  const embed = async () => {
    const mine = ++gen;
    try {
      const { vegaEmbed } = await loadVega(model);
      const next = await vegaEmbed(box, structuredClone(model.get("spec")), { actions: false, renderer: "svg" });
      if (mine !== gen) { next.finalize(); return; }
      if (api) api.finalize();
      api = next;
      push();
    } catch (e) {
      box.innerHTML = '<pre style="color:#b00">chart error: ' + String(e && e.message || e) + "</pre>";
      console.error(e);
    }
  };
  model.on("change:spec", embed);
  model.on("change:values", push);
  await embed();
  return () => { model.off("change:spec", embed); model.off("change:values", push); if (api) api.finalize(); };
}
export default { render };
"""

_bundle_lock = threading.Lock()
_bundle: str | None = None
_lib: "VegaLib | None" = None


def vega_bundle() -> str:
    """The vl-convert bundle exporting `vegaEmbed` (built once per machine and cached on disk: ~1-2 s to build)."""
    global _bundle
    with _bundle_lock:
        if _bundle is None:
            try:
                import vl_convert as vlc
            except ImportError as e:   # a machine without vl-convert (the GPU box) can use a bundle built elsewhere
                built = sorted(cache_dir("ui").glob("vega-embed-*.js"), key=lambda p: p.stat().st_mtime)
                if not built:
                    raise ImportError(f"the charts need vl-convert-python to build their Vega bundle once ({e}); "
                                      f"install it, or copy a built vega-embed-*.js into {cache_dir('ui')}") from None
                _bundle = built[-1].read_text()
                return _bundle
            from altair.utils._importers import vl_version_for_vl_convert

            version = vl_version_for_vl_convert()
            key = hashlib.sha256(f"{vlc.__version__}|{version}".encode()).hexdigest()[:16]
            path = cache_dir("ui") / f"vega-embed-{key}.js"
            try:
                _bundle = path.read_text()
            except OSError:
                _bundle = vlc.javascript_bundle("export { vegaEmbed };\n", vl_version=version)
                _write_atomic(path, _bundle)
        return _bundle


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError:
        pass   # a read-only cache only costs the rebuild next time


class VegaLib(anywidget.AnyWidget):
    """Holds the Vega bundle once per kernel; never displayed, referenced by every `VegaChart`."""
    _esm = _LIB_ESM
    bundle = traitlets.Unicode("").tag(sync=True)


def vega_lib() -> VegaLib:
    """The kernel's shared `VegaLib` (recreated if someone closed it)."""
    global _lib
    with _bundle_lock:
        lib = _lib
    if lib is None or lib.comm is None:
        lib = VegaLib(bundle=vega_bundle())
        with _bundle_lock:
            _lib = lib
    return lib


class VegaChart(anywidget.AnyWidget):
    """A Vega-Lite chart whose rows (`values`) are swapped in place. The spec names its data `DATA_NAME`."""
    _esm = _CHART_ESM
    _css = ".workbench-vega .vega-embed { overflow: visible; }"
    lib = traitlets.Unicode("").tag(sync=True)
    spec = traitlets.Dict().tag(sync=True)
    values = traitlets.List().tag(sync=True)
    data_name = traitlets.Unicode(DATA_NAME).tag(sync=True)

    def __init__(self, spec: dict | Any, values: list[dict] | None = None, **kw: Any):
        if hasattr(spec, "to_dict"):   # an Altair chart
            spec = spec.to_dict()
        super().__init__(lib=f"IPY_MODEL_{vega_lib().model_id}", spec=spec, values=values or [], **kw)

    def __repr__(self) -> str:
        title = self.spec.get("title") or next((c.get("title") for c in self.spec.get("hconcat", [])
                                                 + self.spec.get("vconcat", []) if c.get("title")), "")
        title = title.get("text", "") if isinstance(title, dict) else title
        inline = sum(len(v) for v in self.spec.get("datasets", {}).values())
        return f"VegaChart({title!r}, {len(self.values) or inline} rows)"

    def _repr_mimebundle_(self, **kw):
        bundle = super()._repr_mimebundle_(**kw)
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        return {**(bundle or {}), "text/plain": repr(self)}
