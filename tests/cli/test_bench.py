"""``lionopt bench``: a smoke run of the command (tiny preset, 2 steps) and its pieces."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from lionopt.bench import core, impls, presets, report
from lionopt.cli import main


def test_quick_bench_writes_json_table_and_plot(tmp_path, capsys) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--quick", "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert {"date", "command", "machine", "steps", "warmup", "fused_cpu_build", "presets"} <= set(
        doc
    )
    assert doc["steps"] == 2 and doc["machine"]["threads"] == torch.get_num_threads()
    (preset,) = doc["presets"]
    assert preset["preset"] == "tiny" and preset["tensors"] == 10 and preset["params"] == 20800
    assert preset["roofline_gbps"] > 0 and preset["roofline_method"]
    results = {r["name"]: r for r in preset["results"]}
    assert set(results) == {impl.name for impl in impls.IMPLS}
    for name in (
        "lionopt fused (default)",
        "lionopt foreach",
        "lionopt loop",
        "seed-style loop",
        "torch AdamW loop",
        "torch AdamW foreach",
        "torch AdamW fused",
    ):
        r = results[name]
        assert r["status"] == "ok", r
        for key in ("ms", "gbps", "x_adamw_loop", "x_adamw_foreach", "x_adamw_fused", "x_roofline"):
            assert r[key] is not None and r[key] > 0, (name, key, r[key])
        if sys.platform.startswith("linux"):
            assert r["extra_peak_mb"] is not None and r["extra_peak_mb"] >= 0
    assert results["torch AdamW fused"]["x_adamw_fused"] == pytest.approx(1.0)
    for impl in impls.IMPLS:
        if impl.group == "peer":
            expected = "ok" if impls.peer_installed(impl) else "skipped"
            assert results[impl.name]["status"] == expected, results[impl.name]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "lionopt fused (default)" in table and "xroofline" in table


def test_json_to_stdout_is_pure_json(capsys) -> None:
    args = ["bench", "--quick", "--json", "-", "--no-peers", "--no-memory", "--impls", "fused"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in doc["presets"][0]["results"]]
    assert names == ["lionopt fused (default)", "torch AdamW fused"]


def test_missing_peer_is_skipped_and_a_failing_one_reported() -> None:
    def broken(params):
        raise RuntimeError("boom")

    chosen = [
        impls.IMPLS[0],
        impls.Impl("absent", "lion", broken, "peer", requires="lionopt_no_such_module"),
        impls.Impl("broken", "lion", broken, "peer"),
    ]
    result = core.run_preset(
        "t", "t", [(100,)], chosen, dtype=torch.float32, device="cpu", steps=1, warmup=0
    )
    status = {r.name: (r.status, r.note) for r in result.results}
    assert status["absent"] == ("skipped", "lionopt_no_such_module not installed")
    assert status["broken"][0] == "error" and "boom" in status["broken"][1]
    assert status[impls.IMPLS[0].name][0] == "ok"
    assert "skipped" in report.format_table(result)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS peak is read on Linux")
def test_extra_peak_memory_sees_a_temporary() -> None:
    def allocates() -> None:
        torch.ones(64 * 2**20 // 4).sum()  # a 64 MiB temporary, written

    assert core.extra_peak_bytes(allocates, "cpu") >= 48 * 2**20
    assert core.extra_peak_bytes(lambda: None, "cpu") < 8 * 2**20


def test_presets_and_ideal_bytes() -> None:
    gpt = presets.PRESETS["gpt"][1]
    assert len(gpt) == 100 and 29e6 < sum(presets.numel(s) for s in gpt) < 31e6
    gpt2 = presets.PRESETS["gpt2-small"][1]
    assert 124e6 < sum(presets.numel(s) for s in gpt2) < 125e6
    assert presets.parse_shapes("4x5, 7 ,2x3x4") == [(4, 5), (7,), (2, 3, 4)]
    with pytest.raises(ValueError):
        presets.parse_shapes("4x-1")
    params = [torch.zeros(10), torch.zeros(3, 5)]
    assert impls.ideal_bytes("lion", params) == 25 * 20
    assert impls.ideal_bytes("adamw", params) == 25 * 28
    assert impls.ideal_bytes("lion", [torch.zeros(10, dtype=torch.bfloat16)]) == 10 * 10


def test_custom_sizes_and_bad_arguments(capsys) -> None:
    args = ["bench", "--numel", "5000", "--steps", "1", "--warmup", "0", "--no-peers"]
    assert main([*args, "--no-memory", "--impls", "lionopt fused", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["presets"][0]["params"] == 5000
    assert main(["bench", "--preset", "nope"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_lion_loads_even_without_torchvision() -> None:
    module = impls._import_peer("timm.optim")
    assert hasattr(module, "Lion")
