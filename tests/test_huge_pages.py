"""Importing napari_medseg lets PyTorch's CPU allocator use transparent huge pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="transparent huge pages are a Linux feature")

_PROBE = """
import json, os, sys
import napari_medseg  # before torch, as the plugin, the CLI and the workers import it
import torch
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB, touched
huge = 0
if os.path.exists("/proc/self/smaps_rollup"):
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("AnonHugePages:"):
            huge = int(line.split()[1]) * 1024
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge": huge}))
"""


def _probe(value):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = value
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode():
    f = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not f.exists():
        return None
    text = f.read_text()
    return text[text.index("[") + 1:text.index("]")]


def test_import_asks_for_huge_pages_and_keeps_an_explicit_setting():
    on = _probe(None)
    off = _probe("0")
    assert on["env"] == "1" and off["env"] == "0"
    mode = _thp_mode()
    if mode not in ("madvise", "always"):
        pytest.skip(f"the kernel's transparent_hugepage setting is {mode!r}")
    if not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("no /proc/self/smaps_rollup (Linux < 4.14)")
    assert on["huge"] >= 2 << 20, on  # the 64 MB tensor sits (partly) on 2 MB pages
    if mode == "madvise":  # without PyTorch's madvise nothing is huge
        assert off["huge"] < on["huge"], (on, off)
