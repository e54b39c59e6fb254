"""The direction of imports: core code never reaches napari or Qt."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(imports: str) -> set[str]:
    code = f"import sys, json\n{imports}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


HEAVY = ("torch", "napari", "qtpy", "PyQt6", "PyQt5", "PySide6", "magicgui", "vispy")


def test_package_import_is_light():
    mods = _modules_after("import napari_medseg")
    loaded = [m for m in HEAVY if m in mods]
    assert loaded == [], f"importing napari_medseg loaded {loaded}"


@pytest.mark.parametrize("module", [
    "napari_medseg.core.volume",
    "napari_medseg.io",
    "napari_medseg.models",
    "napari_medseg.interactive",
    "napari_medseg.cli",
])
def test_headless_modules_do_not_load_gui(module):
    mods = _modules_after(f"import {module}")
    gui = [m for m in ("napari", "qtpy", "PyQt6", "PyQt5", "PySide6", "magicgui", "vispy")
           if m in mods]
    assert gui == [], f"importing {module} loaded {gui}"


def test_import_contracts():
    """import-linter contracts in setup.cfg (static: catches imports inside functions too)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    res = subprocess.run([exe, "--config", "setup.cfg"], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
