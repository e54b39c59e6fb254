"""The memory planner: free memory, estimates against measured peaks, re-plans, refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from napari_medseg.core.planner import (
    ENV_LIMIT,
    GIB,
    FreeMemory,
    _cgroup_room,
    estimate_memory,
    free_memory,
    parse_size,
    plan_run,
)
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.errors import MedSegError

SHAPE = dict(input_shape=(96, 192, 192), model_shape=(38, 96, 96), n_channels=1, n_classes=6,
             patch=(32, 64, 64), first_features=8)


def test_parse_size():
    assert parse_size("2G") == 2 << 30
    assert parse_size("512 MiB") == 512 << 20
    assert parse_size(4096) == 4096
    with pytest.raises(MedSegError, match="not a size"):
        parse_size("lots")


def test_free_memory_is_capped_by_limit_and_environment(monkeypatch):
    monkeypatch.delenv(ENV_LIMIT, raising=False)
    sys_free = free_memory()
    assert sys_free.bytes > 0
    monkeypatch.setenv(ENV_LIMIT, "100M")
    env = free_memory()
    assert env.bytes == 100 << 20 and env.source == ENV_LIMIT
    explicit = free_memory("50M")  # the argument wins over the environment
    assert explicit.bytes == 50 << 20 and explicit.source == "memory_limit"


def test_cgroup_v2_and_v1_limits_are_read(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1073741824\n")
    (v2 / "memory.current").write_text("268435456\n")
    room, name = _cgroup_room(v2)
    assert room == 3 << 28 and name == "cgroup v2"
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(2 << 30))
    (v1 / "memory.usage_in_bytes").write_text(str(1 << 30))
    room, name = _cgroup_room(tmp_path / "v1")
    assert room == 1 << 30 and name == "cgroup v1"
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    assert _cgroup_room(tmp_path / "v1") == (None, "")


def test_estimate_grows_with_volume_and_shrinks_with_lazy_output():
    small = estimate_memory(**SHAPE)
    big = estimate_memory(**dict(SHAPE, input_shape=(192, 384, 384)))
    assert big.ram > 2 * small.ram
    lazy = estimate_memory(**dict(SHAPE, input_shape=(192, 384, 384)), lazy_output=True,
                           lazy_input=True)
    assert lazy.ram < big.ram / 2


def test_tta_is_dropped_when_only_the_fast_mode_fits():
    kw = dict(SHAPE, n_classes=200, patch=(96, 96, 96), input_shape=(40, 100, 100),
              model_shape=(40, 100, 100), resampled=False, reoriented_copy=False)
    with_tta = estimate_memory(tta=True, **kw)
    without = estimate_memory(tta=False, **kw)
    assert with_tta.ram > without.ram
    free = FreeMemory(int((with_tta.ram + without.ram) / 2 / 0.9), "test")
    plan = plan_run(tta=True, free=free, **kw)
    assert plan.fast and "fast mode" in plan.notes
    with pytest.raises(MedSegError, match=r"needs about .* GiB .* free \(test\)"):
        plan_run(tta=True, free=FreeMemory(int(without.ram / 2), "test"), **kw)


def test_gpu_plans_move_output_to_cpu_then_the_run_to_cpu():
    # GPU figures are passed in, so this runs without a GPU
    kw = dict(SHAPE, param_bytes=50 << 20)
    full = estimate_memory(device_type="cuda", batch_size=2, **kw)
    assert full.vram > 0
    roomy = FreeMemory(64 << 30, "test")
    plan = plan_run(device_type="cuda", free=roomy, free_gpu=FreeMemory(int(full.vram / 0.85),
                                                                         "test gpu"), **kw)
    assert plan.batch_size in (None, 2) and not plan.output_on_cpu and plan.device is None
    kw = dict(kw, model_shape=(64, 512, 512), n_classes=20)  # large cells
    one = estimate_memory(device_type="cuda", batch_size=1, output_on_cpu=True, **kw)
    one_gpu = estimate_memory(device_type="cuda", batch_size=1, **kw)
    assert one_gpu.vram > one.vram
    plan = plan_run(device_type="cuda", free=roomy,
                    free_gpu=FreeMemory(int((one.vram + one_gpu.vram) / 2 / 0.9), "test gpu"),
                    **kw)
    assert plan.batch_size == 1 and plan.output_on_cpu
    plan = plan_run(device_type="cuda", free=roomy, free_gpu=FreeMemory(1 << 20, "test gpu"),
                    **kw)
    assert plan.device == "cpu"


@pytest.fixture(scope="module")
def model():
    from napari_medseg.models import load_model

    return load_model("abdomen-ct-small")


def test_predict_refuses_a_run_over_the_limit_before_running(model, monkeypatch):
    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(0, 100, (96, 256, 256)).astype(np.int16),
                 make_affine((1.0, 0.75, 0.75)), modality="CT", source="big_ct.nii.gz")
    calls = []
    monkeypatch.setenv(ENV_LIMIT, "64M")
    with pytest.raises(MedSegError) as err:
        model.predict(vol, device="cpu", progress=lambda d, t: calls.append(d))
    msg = str(err.value)
    assert "\n" not in msg and "big_ct.nii.gz" in msg
    assert "GiB" in msg and ENV_LIMIT in msg and "ome.zarr" in msg
    assert calls == []  # refused before any window ran


def test_predict_records_its_plan(model):
    vol = Volume(np.full((20, 40, 40), -50, np.int16), make_affine((2.5, 1.5, 1.5)),
                 modality="CT")
    pred = model.predict(vol, device="cpu", memory_limit="4G")
    plan = pred.info["memory_plan"]
    assert plan["free_source"] in ("memory_limit", "MemAvailable", "cgroup v1", "cgroup v2")
    assert 0 < plan["estimated_ram_gib"] < 4


_MEASURE = r"""
import json
import numpy as np, psutil
from napari_medseg.core.volume import Volume, make_affine
from napari_medseg.models import load_model
m = load_model("abdomen-ct-small")
m.predict(Volume(np.zeros((24, 48, 48), np.int16), make_affine((2.5, 1.5, 1.5))), device="cpu")
rng = np.random.default_rng(0)
v = Volume(rng.normal(0, 200, (64, 192, 192)).astype(np.int16),
           make_affine((1.25, 0.75, 0.75)), modality="CT")
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
base = psutil.Process().memory_info().rss
plan = m.plan_memory([v], device="cpu")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current size
    f.write("5")
m.predict(v, device="cpu")
print(json.dumps({"extra": hwm() - base, "estimate": plan.estimate.ram}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_estimate_bounds_the_measured_peak_of_the_builtin_model():
    pytest.importorskip("psutil")
    out = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # an upper bound, but not a wild one
    assert r["extra"] <= r["estimate"], r
    assert r["estimate"] <= 3 * r["extra"] + 0.25 * GIB, r
