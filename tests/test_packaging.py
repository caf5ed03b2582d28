"""pyproject.toml and environment.yml name the same packages with the same bounds; the kernel spec is sane."""
import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _req(s: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", s)
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_req(r) for r in py["dependencies"])
    for extra in ("gpu", "notebook", "dev"):
        wanted.update(_req(r) for r in py["optional-dependencies"][extra])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    got = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            got.update(_req(r) for r in dep["pip"] if not r.startswith("-e"))
        elif not dep.startswith("python=") and dep != "pip":
            got.update([_req(dep)])
    assert got == wanted, f"differ: only in pyproject {set(wanted.items()) - set(got.items())}, " \
                          f"only in environment.yml {set(got.items()) - set(wanted.items())}"


def test_kernel_spec_runs_the_launcher():
    spec = json.loads((ROOT / "kernels" / "clockwork-workbench" / "kernel.json").read_text())
    assert spec["display_name"] == "Clockwork Workbench"
    assert spec["argv"][1:3] == ["-m", "workbench.env.launcher"]
    assert "{connection_file}" in spec["argv"]
    assert spec["env"]["CUDA_CACHE_DISABLE"] == "1"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    head = readme[: readme.find("##", readme.find("make test"))]
    assert "make lab" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()
