"""Real browser: JupyterLab on 127.0.0.1 started by the test, driven by Playwright with Debian's Chromium
(/usr/bin/chromium; never a downloaded browser). Runs the quickstart, clicks the loader's Load button, and checks
that the charts draw data. Screenshots are kept under reports/browser/."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from workbench.env.commands import install_kernel
from workbench.ui.report import kernel_env

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "reports" / "browser"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
TOKEN = "workbench-test"
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a scratch copy of the quickstart, with our kernel installed in a private prefix."""
    root = tmp_path_factory.mktemp("lab-root")
    shutil.copy(ROOT / "notebooks" / "01_quickstart.ipynb", root / "01_quickstart.ipynb")
    prefix = tmp_path_factory.mktemp("lab-prefix")
    install_kernel(prefix=str(prefix))
    settings = tmp_path_factory.mktemp("lab-settings")
    (settings / "overrides.json").write_text(
        '{"@jupyterlab/apputils-extension:notification": {"checkForUpdates": false, "fetchNews": "false"},'
        ' "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"}}')
    env = kernel_env()
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(prefix / "share" / "jupyter"), env.get("JUPYTER_PATH")]))
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path_factory.mktemp("lab-workspaces"))
    port = _free_port()
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
         "--LabApp.extension_manager=readonly", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         f"--LabServerApp.app_settings_dir={settings}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start: {(root / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.3)
    yield url, root
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def test_quickstart_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, root = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{url}/lab/tree/01_quickstart.ipynb?reset&token={TOKEN}")
            page.wait_for_selector(".jp-StatusBar-Widget >> text=/Clockwork Workbench \\| Idle/", timeout=90_000)
            for _ in range(3):     # a click racing the kernel's start can be lost: retry until cells run
                page.click("div.lm-MenuBar-itemLabel:text-is('Run')")
                page.click("li.lm-Menu-item[data-command='runmenu:run-all']")
                try:
                    page.wait_for_selector(".jp-InputPrompt >> text=/\\[(\\*|\\d+)\\]/", timeout=15_000)
                    break
                except Exception:  # noqa: BLE001
                    continue
            # the run cell's progress bar reaches 100% and the summary is printed: the notebook ran to the end
            page.wait_for_selector("text=/\\d+ requests, SLO attainment/", timeout=180_000)
            loader = page.locator(".workbench-loader").first
            loader.wait_for(timeout=30_000)
            loader.locator("button:has-text('Load')").click()
            page.wait_for_selector(".workbench-loader >> text=/loaded mlp ×1/", timeout=120_000)
            # charts with data: the outcome chart's rows arrived and Vega drew SVG marks for them
            page.wait_for_function(
                "Array.from(document.querySelectorAll('.workbench-vega')).some(e => Number(e.dataset.rows) > 0)",
                timeout=60_000)
            marks = page.evaluate("Array.from(document.querySelectorAll('.workbench-vega svg.marks'))"
                                  ".map(s => s.querySelectorAll('path').length)")
            rows = page.evaluate("Array.from(document.querySelectorAll('.workbench-vega')).map(e => e.dataset.rows)")
            page.screenshot(path=str(ARTIFACTS / "quickstart.png"), full_page=False)
            page.locator(".workbench-dashboard").first.screenshot(path=str(ARTIFACTS / "dashboard.png"))
        finally:
            browser.close()
    assert marks and max(marks) > 10, f"charts drew no marks: {marks}"
    assert any(r and int(r) > 0 for r in rows), rows
    loader_errors = [e for e in errors if "workbench" in e.lower() or "vega" in e.lower()]
    assert not loader_errors, loader_errors
