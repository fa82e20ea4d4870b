"""Tests of ``lionopt compare``: the tuned protocol end to end, fairness, user tasks, failures."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap

import pytest
import torch

import lionopt
from lionopt.cli import _report, main
from lionopt.hparams import DEFAULT_FACTOR, from_adamw
from lionopt.tasks import get_task, study
from lionopt.tasks.protocol import (
    make_plan,
    mean_std,
    optimizer_params,
    steps_to_reach,
    train_run,
)

TINY = ["--steps", "6", "--evals", "2", "--no-progress"]


def load_report(path) -> dict:
    return json.loads(path.read_text())


def check_stat(stat: dict) -> None:
    assert set(stat) == {"mean", "std", "n"}
    assert isinstance(stat["n"], int)
    assert stat["n"] == 0 or isinstance(stat["mean"], float)


def check_tuning(tuning: dict, hib: bool) -> None:
    grid, scores = tuning["lr_grid"], tuning["tune_metric"]
    assert len(grid) >= 4 and grid == sorted(grid) and len(scores) == len(grid)
    assert tuning["lr"] in grid
    finite = [s for s in scores if s is not None]
    best = max(finite) if hib else min(finite)
    assert tuning["chosen_tune_metric"] == best == scores[grid.index(tuning["lr"])]
    # the grid is extended at an edge unless the extensions ran out
    i = grid.index(tuning["lr"])
    assert 0 < i < len(grid) - 1 or tuning["extensions"] == study.MAX_EXTENSIONS


def test_tuned_protocol_end_to_end_with_workers(tmp_path, capsys):
    """The default protocol in 2 worker processes: tuning record, four rows, files."""
    out = tmp_path / "out"
    assert main(["compare", "--quick", *TINY, "--jobs", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("AdamW tuned", "Lion translated", "Lion calibrated", "Lion tuned", "Best:"):
        assert word in text
    assert "compare_digits.png" in text.splitlines()[-1]

    report = load_report(out / "compare.json")
    assert report["schema"] == "lionopt.compare/2" and report["complete"] is True
    assert report["config"]["jobs"] == 2 and report["cpu_s"] > 0
    assert [t["name"] for t in report["tasks"]] == ["digits", "charlm"]
    for task in report["tasks"]:
        assert task["status"] == "complete" and task["protocol"] == "tuned", task["errors"]
        assert list(task["summary"]) == list(study.ROWS)
        adamw, lion = task["tuning"]["adamw"], task["tuning"]["lion"]
        check_tuning(adamw, task["higher_is_better"])
        check_tuning(lion, task["higher_is_better"])
        assert adamw["steps"] == 3 and len(task["tune_runs"]) == len(adamw["lr_grid"]) + len(
            lion["lr_grid"]
        )
        a, w = adamw["lr"], task["adamw_weight_decay"]
        rows = task["summary"]
        assert rows["adamw"]["lr"] == pytest.approx(a)
        assert rows["adamw"]["weight_decay"] == pytest.approx(w)
        assert rows["lion-translated"]["lr"] == pytest.approx(from_adamw(a, w)["lr"])
        assert rows["lion-tuned"]["lr"] == pytest.approx(lion["lr"])
        cal = task["calibration"]
        assert rows["lion-calibrated"]["lr"] == pytest.approx(a * cal["adamw_update_rms"])
        for name in study.ROWS[1:]:  # every Lion row keeps AdamW's per-step decay lr·λ
            s = rows[name]
            assert s["lr"] * s["weight_decay"] == pytest.approx(a * w)
            assert s["state_bytes"] * 1.9 < rows["adamw"]["state_bytes"]
        assert len(task["runs"]) == 8  # 4 rows x 2 seeds
        for run in task["runs"]:
            assert isinstance(run["final_metric"], float) and run["error"] is None
            assert run["history"]["step"] == [3, 6]
            assert run["train_step_ms"] >= run["optimizer_step_ms"] > 0
        for s in rows.values():
            for key in ("final_metric", "best_metric", "optimizer_step_ms", "train_step_ms"):
                check_stat(s[key])
        assert task["verdict"][0].startswith("Best:")
    md = (out / "compare.md").read_text()
    assert "## digits" in md and "Tuning adamw" in md and "Calibration" in md
    assert (out / "compare_charlm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_tune_is_the_one_shot_run(tmp_path):
    out = tmp_path / "out"
    argv = ["compare", "--tasks", "digits", "--seeds", "1", "--no-tune", "--jobs", "1"]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    (task,) = load_report(out / "compare.json")["tasks"]
    assert task["protocol"] == "one-shot" and task["tuning"] == {} and not task["tune_runs"]
    assert list(task["summary"]) == ["adamw", "lion"]
    assert task["summary"]["adamw"]["hparams"]["lr"] == pytest.approx(1e-3)
    assert task["summary"]["lion"]["hparams"]["lr"] == pytest.approx(1e-3 / DEFAULT_FACTOR)


def test_same_init_and_batches_for_every_row(monkeypatch):
    """Every run of one (split, seed) starts from the same weights and sees the same batches."""
    seen = []
    original = study.train_run

    def recording(task, data, plan, name, **kw):
        record = {"key": (data.info.get("split", "val"), plan.seed), "batches": []}
        original_step = type(task).train_step.__get__(task)

        def train_step(model, optimizer, data_, indices, step):
            if step == 0:
                record["init"] = [p.detach().clone() for p in model.parameters()]
            record["batches"].append(indices.clone())
            return original_step(model, optimizer, data_, indices, step)

        task.train_step = train_step  # this run only: calibration uses the class's step
        seen.append(record)
        try:
            return original(task, data, plan, name, **kw)
        finally:
            del task.train_step

    monkeypatch.setattr(study, "train_run", recording)
    argv = ["compare", "--tasks", "digits", "--seeds", "2", "--steps", "4", "--evals", "1"]
    assert main([*argv, "--jobs", "1", "--no-progress"]) == 0
    groups: dict = {}
    for record in seen:
        groups.setdefault(record["key"], []).append(record)
    assert {k: len(v) for k, v in groups.items() if k[0] == "val"} == {("val", 0): 4, ("val", 1): 4}
    for runs in groups.values():
        for other in runs[1:]:
            assert all(
                torch.equal(x, y) for x, y in zip(runs[0]["init"], other["init"], strict=True)
            )
            assert all(
                torch.equal(x, y) for x, y in zip(runs[0]["batches"], other["batches"], strict=True)
            )
    a, b = groups["val", 0][0], groups["val", 1][0]
    assert not torch.equal(a["init"][0], b["init"][0])  # seeds really differ
    assert not torch.equal(a["batches"][0], b["batches"][0])
    # tuning trains on the tune split: other batches (fewer rows) than the final runs
    assert groups["tune", 0][0]["batches"][0].max() < 1150


def test_train_run_is_reproducible():
    task = get_task("digits")
    data = task.load()
    plan = make_plan(task, data, seed=5, steps=5, batch_size=16)
    first = train_run(task, data, plan, "lion", evals=1)
    second = train_run(task, data, plan, "lion", evals=1)
    assert first.history["val_metric"] == second.history["val_metric"]
    assert first.hparams == {
        "lr": pytest.approx(task.adamw_lr / DEFAULT_FACTOR),
        "weight_decay": pytest.approx(task.adamw_weight_decay * DEFAULT_FACTOR),
        "betas": [0.9, 0.99],
        "cautious": False,
    }


def test_decay_groups_in_the_protocol():
    """With groups, biases and norm gains keep their values under pure decay; with all, not."""
    task = get_task("charlm")
    data = task.load()
    plan = make_plan(task, data, seed=0, steps=1, batch_size=2)
    model = task.build_model(data)
    groups = optimizer_params(model, "groups")
    names = {g["name"]: g for g in groups}
    assert names["no_decay"]["weight_decay"] == 0.0 and "weight_decay" not in names["decay"]
    n_nodecay = sum(p.numel() for p in names["no_decay"]["params"])
    assert n_nodecay == sum(p.numel() for n, p in model.named_parameters() if p.ndim < 2)
    run = train_run(task, data, plan, "lion", lr=1e-3, weight_decay=0.5, evals=1)
    assert run.hparams["weight_decay"] == 0.5 and run.error is None


USER_TASKS = """
import math
import torch
from torch import nn
from lionopt.tasks import TensorTask

g = torch.Generator().manual_seed(0)
X = torch.randn(256, 6, generator=g)
Y = (X[:, 0] + X[:, 1] > 0).long()


def accuracy(out, y):
    return (out.argmax(1) == y).float().mean().item()


def good():
    return TensorTask(name="mine", model=lambda: nn.Linear(6, 2), train=(X[:192], Y[:192]),
                      val=(X[192:], Y[192:]), loss=nn.functional.cross_entropy, metric=accuracy,
                      higher_is_better=True, steps=8, batch_size=32, adamw_lr=1e-2,
                      adamw_weight_decay=0.0)


class Boom(nn.Linear):
    calls = 0

    def forward(self, x):
        if self.training:
            Boom.calls += 1
            if Boom.calls == 3:
                raise RuntimeError("boom in forward")
        return super().forward(x)


broken = TensorTask(name="broken", model=lambda: Boom(6, 2), train=(X[:192], Y[:192]),
                    val=(X[192:], Y[192:]), loss=nn.functional.cross_entropy, metric=accuracy,
                    steps=8, batch_size=32)
nan_metric = TensorTask(name="nanmetric", model=lambda: nn.Linear(6, 2), train=(X, Y),
                        val=(X, Y), loss=nn.functional.cross_entropy,
                        metric=lambda out, y: math.nan, steps=8, batch_size=32)
not_a_task = 3
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_tasks.py"
    path.write_text(textwrap.dedent(USER_TASKS))
    return path


def test_user_task_from_a_file(tmp_path, user_file):
    out = tmp_path / "out"
    argv = ["compare", "--task", f"{user_file}:good", "--seeds", "2", "--jobs", "1"]
    assert main([*argv, "--evals", "2", "--no-progress", "--out", str(out)]) == 0
    (task,) = load_report(out / "compare.json")["tasks"]
    assert task["name"] == "mine" and task["status"] == "complete" and task["steps"] == 8
    assert task["metric"] == "accuracy" and list(task["summary"]) == list(study.ROWS)
    assert {3e-3, 1e-2, 3e-2, 0.1} <= set(task["tuning"]["adamw"]["lr_grid"])


def test_failing_tasks_are_named_and_the_rest_is_kept(tmp_path, user_file, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--task", f"{user_file}:good", "--task", f"{user_file}:broken",
            "--task", f"{user_file}:nan_metric", "--task", f"{user_file}:not_a_task",
            "--task", f"{user_file}:missing", "--seeds", "1", "--no-tune", "--jobs", "1",
            "--evals", "4", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "task 'broken', adamw seed 0: RuntimeError at step 3: boom in forward" in err
    assert "task 'nanmetric', adamw seed 0: the metric returned nan at step 2" in err
    assert "expected a lionopt.tasks.Task" in err and "has no attribute 'missing'" in err
    tasks = {t["name"]: t for t in load_report(out / "compare.json")["tasks"]}
    assert tasks["mine"]["status"] == "complete"
    assert tasks["mine"]["summary"]["lion"]["final_metric"]["n"] == 1
    assert tasks["broken"]["status"] == "partial" and len(tasks["broken"]["errors"]) == 1
    assert tasks["broken"]["summary"]["lion"]["final_metric"]["n"] == 1  # Lion ran fine
    assert tasks["nanmetric"]["status"] == "partial" and tasks["nanmetric"]["summary"] == {}
    assert any("Error:" in v for v in tasks["nanmetric"]["verdict"])
    md = (out / "compare.md").read_text()
    assert "boom in forward" in md


def test_user_task_from_a_module(tmp_path, user_file, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["compare", "--task", "my_tasks:good", "--seeds", "1", "--no-tune", "--jobs", "1"]
    assert main([*argv, "--evals", "1", "--no-progress", "--json"]) == 0


def test_reuse_tuning_for_the_doubled_steps_check(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    argv = ["compare", "--tasks", "digits", "--seeds", "1", "--jobs", "1", *TINY]
    assert main([*argv, "--out", str(first)]) == 0
    argv = ["compare", "--tasks", "digits", "--seeds", "1", "--jobs", "1", "--steps", "12",
            "--evals", "1", "--no-progress", "--reuse-tuning", str(first / "compare.json"),
            "--out", str(second)]  # fmt: skip
    assert main(argv) == 0
    (a,) = load_report(first / "compare.json")["tasks"]
    (b,) = load_report(second / "compare.json")["tasks"]
    assert b["protocol"] == "reused" and not b["tune_runs"] and b["steps"] == 12
    assert b["tuning"] == a["tuning"]
    for row in study.ROWS:
        assert b["summary"][row]["hparams"]["lr"] == a["summary"][row]["hparams"]["lr"]


def test_interrupt_writes_a_valid_partial_report(tmp_path, monkeypatch, capsys):
    """Ctrl-C inside the second seed's Lion step: the first seed's runs survive intact."""
    calls = {"n": 0}
    original_step = lionopt.Lion.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # 6 steps of seed 0, then 2 steps into seed 1
            raise KeyboardInterrupt
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(lionopt.Lion, "step", step)
    out = tmp_path / "out"
    argv = ["compare", "--tasks", "digits", "--seeds", "2", "--no-tune", "--jobs", "1"]
    assert main([*argv, *TINY, "--out", str(out)]) == 130
    assert "INTERRUPTED" in capsys.readouterr().out

    report = load_report(out / "compare.json")
    assert report["interrupted"] is True and report["complete"] is False
    (digits,) = report["tasks"]
    assert digits["status"] == "partial"
    assert [(r["optimizer"], r["seed"]) for r in digits["runs"]] == [
        ("adamw", 0),
        ("lion", 0),
        ("adamw", 1),
    ]
    assert digits["summary"]["lion"]["final_metric"]["n"] == 1
    assert digits["summary"]["adamw"]["final_metric"]["n"] == 2
    assert "Interrupted" in (out / "compare.md").read_text()
    assert (out / "compare_digits.png").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    _report.atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        _report.atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizers", "adamw,sgd"], "unknown sgd"),
        (["--tasks", "imagenet"], "unknown imagenet"),
        (["--steps", "0"], "positive integer"),
        (["--seeds", "two"], "positive integer"),
        (["--tune-length", "2"], "(0, 1]"),
        (["--jobs", "0"], "positive integer"),
    ],
)
def test_invalid_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_tuned_protocol_needs_adamw(capsys):
    assert main(["compare", "--optimizers", "lion", "--no-progress"]) == 2
    assert "add adamw" in capsys.readouterr().err


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        main(["compare", "--device", "cuda", "--no-progress"])


def summary(final, reached=2, lr=1e-3):
    return {
        "final_metric": mean_std(final),
        "steps_to_adamw_final": {"n": 2, "reached": reached, "mean_steps": 50.0},
        "diverged": 0,
        "state_bytes": 100,
        "lr": lr,
        "optimizer_step_ms": mean_std([1.0]),
        "train_step_ms": mean_std([2.0]),
    }


def test_verdict_says_who_won_and_whether_it_is_noise():
    task = {
        "metric": "accuracy",
        "higher_is_better": True,
        "steps": 100,
        "summary": {"adamw": summary([0.90, 0.91]), "lion-tuned": summary([0.80, 0.81], 0)},
    }
    head, line = study.verdicts(task)
    assert head.startswith("Best: AdamW tuned") and "more than the noise" in head
    assert "by 10.00 points" in head
    assert line.startswith("Lion tuned loses to AdamW tuned by 10.00 points")
    assert "never reaches" in line
    task["summary"]["lion-tuned"] = summary([0.95, 0.96])
    assert study.verdicts(task)[1].startswith("Lion tuned beats AdamW tuned")
    task["summary"]["lion-tuned"] = summary([0.89, 0.93])  # spread 0.028, diff 0.005
    head, line = study.verdicts(task)
    assert "within noise" in head and "within seed noise" in line


def test_difference_uses_two_standard_errors():
    a, b = mean_std([1.0, 2.0, 3.0]), mean_std([2.0, 3.0, 4.0])
    d = study.difference(a, b)
    assert d["diff"] == -1.0 and d["se"] == pytest.approx((2 / 3) ** 0.5)
    assert d["noise"] is True
    assert study.difference(mean_std([1.0]), b)["noise"] is None


def test_steps_to_reach_respects_direction():
    history = {"step": [10, 20, 30], "val_metric": [3.0, None, 2.0]}
    assert steps_to_reach(history, 2.5, higher_is_better=False) == 30
    assert steps_to_reach(history, 2.5, higher_is_better=True) == 10
    assert steps_to_reach(history, 9.0, higher_is_better=True) is None


def test_sigterm_is_handled_like_ctrl_c(tmp_path, monkeypatch):
    """A SIGTERM during training ends the run with a partial report instead of a dead process."""
    calls = {"n": 0}
    original_step = lionopt.Lion.step

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(lionopt.Lion, "step", step)
    out = tmp_path / "out"
    argv = ["compare", "--tasks", "digits", "--seeds", "1", "--no-tune", "--jobs", "1"]
    assert main([*argv, *TINY, "--out", str(out)]) == 130
    report = load_report(out / "compare.json")
    assert report["interrupted"] is True
    assert [r["optimizer"] for r in report["tasks"][0]["runs"]] == ["adamw"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # our handler is removed again


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is an optional extra: without it the JSON and Markdown are still written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    out = tmp_path / "out"
    argv = ["compare", "--tasks", "digits", "--seeds", "1", "--no-tune", "--jobs", "1"]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md"]
    captured = capsys.readouterr()
    assert "matplotlib is not installed" in captured.err
    last = captured.out.strip().splitlines()[-1]
    assert last == f"Report written to {out}/: compare.md, compare.json." and "PNG" not in last


def test_from_json_renders_a_saved_report(tmp_path, capsys):
    out, again = tmp_path / "out", tmp_path / "again"
    argv = ["compare", "--tasks", "digits", "--seeds", "1", "--jobs", "1", *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    first = capsys.readouterr().out
    assert main(["compare", "--from-json", str(out / "compare.json"), "--out", str(again)]) == 0
    second = capsys.readouterr().out
    assert first.split("Total wall time")[0] == second.split("Total wall time")[0]
    assert (again / "compare_digits.png").exists()


def test_tune_only_runs_the_grids_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    argv = ["compare", "--tasks", "digits", "--tune-only", "--tune-length", "1", "--jobs", "1"]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    (task,) = load_report(out / "compare.json")["tasks"]
    assert task["status"] == "complete" and task["runs"] == [] and task["rows"] == {}
    assert task["tuning"]["adamw"]["steps"] == 6 and task["tuning"]["lion"]["lr"] is not None


def test_one_shot_reports_do_not_call_adamw_tuned() -> None:
    from lionopt.tasks.study import row_title

    assert row_title("adamw", {"protocol": "one-shot"}) == "AdamW (task values)"
    assert row_title("adamw", {"protocol": "tuned"}) == "AdamW tuned"
