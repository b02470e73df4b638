"""Packaging: adapters/ and eval/ install as tokenreduce.adapters / tokenreduce.eval, in a wheel too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
#: repo folder -> installed package name (pyproject's package-dir mapping)
SOURCES = {"tokenreduce": "tokenreduce", "adapters": "tokenreduce.adapters", "eval": "tokenreduce.eval"}


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _packages_on_disk() -> dict[str, Path]:
    """Installed package name -> folder, for every folder with an __init__.py under the source roots."""
    found = {}
    for folder, package in SOURCES.items():
        base = ROOT / folder
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base)
            if any(p == "__pycache__" or p.startswith(".") for p in rel.parts):
                continue
            found[".".join((package, *rel.parts))] = init.parent
    return found


def test_every_package_is_listed_in_pyproject():
    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    on_disk = _packages_on_disk()
    assert "tokenreduce.adapters.llava" in on_disk  # the walk itself works
    missing = sorted(set(on_disk) - listed)
    assert not missing, (
        f"folders with an __init__.py not in [tool.setuptools] packages of pyproject.toml "
        f"(they would be left out of a wheel): {missing}"
    )
    stale = sorted(listed - set(on_disk))
    assert not stale, f"[tool.setuptools] packages lists packages with no folder/__init__.py: {stale}"
    assert setuptools_cfg["package-dir"] == {package: folder for folder, package in SOURCES.items()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="pip install -e '.[dev]' installs setuptools and wheel")
    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the sources: setuptools builds in-tree, and a stale build/ or *.egg-info in the
    # repo would leak into the wheel (and the build would litter the working tree).
    src = tmp_path_factory.mktemp("src")
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in SOURCES:
        shutil.copytree(ROOT / folder, src / folder, ignore=junk)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    wheels = list(out.glob("tokenreduce-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, got {wheels}"
    return wheels[0]


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "tokenreduce/__init__.py",
        "tokenreduce/adapters/__init__.py",
        "tokenreduce/adapters/llava/llava15.py",
        "tokenreduce/eval/__init__.py",
        "tokenreduce/assets/shapes.png",
    ):
        assert required in names, f"{required} missing from {wheel.name}"
    for package in _packages_on_disk():
        init = package.replace(".", "/") + "/__init__.py"
        assert init in names, f"package {package} missing from {wheel.name}"
    top = {n.split("/")[0] for n in names}
    assert "adapters" not in top and "eval" not in top, f"top-level adapters/ or eval/ in the wheel: {sorted(top)}"
    assert any(n.endswith(".dist-info/entry_points.txt") for n in names)


@pytest.mark.slow
def test_wheel_imports_from_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import tokenreduce, tokenreduce.adapters, tokenreduce.eval, tokenreduce.adapters.llava.zoo\n"
        "print(json.dumps({'tokenreduce': tokenreduce.__file__, 'adapters': tokenreduce.adapters.__file__,\n"
        "  'eval': tokenreduce.eval.__file__, 'reducers': sorted(tokenreduce.reducers())}))\n"
    )
    # -I: isolated mode, so neither the cwd nor PYTHONPATH puts the source tree first; the editable install's
    # finder stays on sys.path, which is the point: the wheel dir must win over it.
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("tokenreduce", "adapters", "eval"):
        path = Path(got[key]).resolve()
        assert path.is_relative_to(site.resolve()), f"{key} imported from {path}, not from the unzipped wheel"
        assert not path.is_relative_to(ROOT), f"{key} imported from the source tree: {path}"
    assert {"aim-merge", "random", "pool"} <= set(got["reducers"]), got["reducers"]
