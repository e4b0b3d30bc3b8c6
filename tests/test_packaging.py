"""A non-editable install holds the whole service: every module of every sub-package and the
shipped configs (a flat `packages = [...]` list once left the sub-packages out)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_and_config(tmp_path):
    # offline: the build backend (setuptools) is the one installed here
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*cmd, "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("clip_sae_sweeps-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        p.relative_to(ROOT).as_posix()
        for package in ("sae", "sweeps")
        for p in (ROOT / package).rglob("*")
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    assert {"sweeps/search/driver.py", "sweeps/configs/demo.yaml"} <= wanted
    assert wanted - names == set()
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "sae-sweep = sweeps.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def _requirements() -> list:
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def test_every_dependency_has_a_tested_range_and_a_pin():
    """A fresh machine gets what the suite passed with: each direct dependency stops below a
    release it was not tested with, and constraints.txt pins a version inside its range (an
    open `optuna>=4.0` once let a fresh install take optuna 5, which broke NSGA-II sweeps)."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    for req in _requirements():
        ops = {spec.operator for spec in req.specifier}
        assert ops & {"<", "==", "~="}, f"{req}: give it an upper bound"
        name = canonicalize_name(req.name)
        if name in ("torch", "torchvision"):  # the machine picks the build (CPU or CUDA)
            assert name not in pins
            continue
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt pins {req.name} outside {req}"
