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
