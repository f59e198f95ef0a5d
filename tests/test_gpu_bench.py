"""The GPU scripts' own logic, on the CPU: bench/gpu_kernels.py's checks and coverage,
bench/gpu_models.py's targets and weights. (The CUDA figures themselves need a GPU.)"""

import importlib.util
import pathlib
import sys

import pytest
import torch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import bench/timing.py beside them
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_kernel_check_rejects_wrong_results(monkeypatch):
    gk = load("gpu_kernels", monkeypatch)
    truth = torch.randn(64, dtype=torch.float64)
    ref = truth.half()  # the reference loses fp16 rounding
    assert gk.check("same as reference", ref.clone(), ref, truth)
    assert not gk.check("off by 0.1", ref + 0.1, ref, truth)
    assert not gk.check("relative, off by 1%", ref * 1.01, ref, truth, norm=True)
    nan = ref.clone()
    nan[3] = float("nan")
    assert not gk.check("a NaN", nan, ref, truth)
    assert not gk.check("exact, one value off", ref + (torch.arange(64) == 5), ref, exact=True)
    assert [c["ok"] for c in gk.CHECKS] == [True, False, False, False, False]


def test_kernel_smoke_checks_every_kernel(monkeypatch):
    gk = load("gpu_kernels", monkeypatch)
    list(gk.cases(torch.device("cpu"), smoke=True))
    names = " ".join(c["name"] for c in gk.CHECKS)
    for kernel in ("group_norm", "group_norm_stats+apply", "rms_norm", "upsample_conv3x3", "frames_to_input",
                   "output_to_frames", "tile_change", "blend_tiles"):
        assert kernel in names
    assert all(c["ok"] for c in gk.CHECKS), gk.CHECKS


def test_models_summary_marks_issue_15_targets(monkeypatch):
    gm = load("gpu_models", monkeypatch)
    rows = [dict(case="sd15-1080p", op="encode", variant="ours", ms=27.0),
            dict(case="sd15-1080p", op="encode", variant="diffusers-eager", ms=100.0),
            dict(case="sd15-1080p", op="decode", variant="ours", ms=60.0),
            dict(case="taef2-1080p", op="encode", variant="ours", status="FAIL check"),
            dict(case="sd15-512", op="encode", variant="ours", ms=5.0)]
    summary = {(s["case"], s["op"]): s for s in gm.summarize(rows)}
    assert summary[("sd15-1080p", "encode")]["target"] == "<= 28 ms: met"
    assert summary[("sd15-1080p", "encode")]["ours/eager"] == pytest.approx(0.27)
    assert summary[("sd15-1080p", "decode")]["target"] == "<= 50 ms: MISSED"
    assert summary[("taef2-1080p", "encode")]["target"] == "<= 4 ms: not measured"
    assert "target" not in summary[("sd15-512", "encode")]
    assert all("target" not in s for s in gm.summarize(rows, targets=False))  # smoke runs: CPU times


def test_models_take_taef2_weights_from_the_given_folder(monkeypatch, tmp_path, shared_data):
    gm = load("gpu_models", monkeypatch)
    case = next(c for c in gm.gpu_cases() if c.name == "taef2-1080p")
    real, source = gm.make_ours(case, shared_data / "weights")
    assert "real taef2 weights" in source
    rand, source = gm.make_ours(case, tmp_path)
    assert "random weights" in source and "has no taef2 weights" in source
    key = next(k for k in real.state_dict() if k.endswith("weight"))
    assert real.state_dict()[key].shape == rand.state_dict()[key].shape
    assert not torch.equal(real.state_dict()[key], rand.state_dict()[key])
