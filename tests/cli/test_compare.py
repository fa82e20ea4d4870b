"""Tests of ``lionopt compare``: end to end, the fairness protocol, interruption, validation."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import torch

import lionopt
from lionopt.cli import _report, main
from lionopt.cli import compare as compare_cli
from lionopt.hparams import DEFAULT_FACTOR
from lionopt.tasks import get_task
from lionopt.tasks import optimizers as registry
from lionopt.tasks.protocol import make_plan, mean_std, steps_to_reach, train_run

TINY = ["--steps", "6", "--evals", "2", "--no-progress"]


def load_report(path) -> dict:
    return json.loads(path.read_text())


def check_stat(stat: dict) -> None:
    assert set(stat) == {"mean", "std", "n"}
    assert isinstance(stat["n"], int)
    assert stat["n"] == 0 or isinstance(stat["mean"], float)


def test_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--quick", *TINY, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "digits" in table and "charlm" in table and "lion" in table
    for name in ("compare.json", "compare.md", "compare_digits.png", "compare_charlm.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "compare_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = load_report(out / "compare.json")
    assert report["schema"] == "lionopt.compare/1"
    assert report["complete"] is True and report["interrupted"] is False
    assert report["config"]["seeds"] == [0, 1] and report["config"]["quick"] is True
    assert isinstance(report["machine"]["torch"], str) and isinstance(report["wall_s"], float)
    assert [t["name"] for t in report["tasks"]] == ["digits", "charlm"]
    for task in report["tasks"]:
        assert task["status"] == "complete"
        assert isinstance(task["higher_is_better"], bool) and task["steps"] == 6
        assert len(task["runs"]) == 4  # 2 seeds x 2 optimizers
        for run in task["runs"]:
            assert run["optimizer"] in ("adamw", "lion")
            assert isinstance(run["final_metric"], float)
            assert run["history"]["step"][-1] == 6
            assert len(run["history"]["val_metric"]) == len(run["history"]["step"]) == 2
            assert run["state_bytes"] > 0 and run["train_step_ms"] >= run["optimizer_step_ms"]
        assert set(task["summary"]) == {"adamw", "lion"}
        for summary in task["summary"].values():
            for key in ("final_metric", "best_metric", "optimizer_step_ms", "train_step_ms"):
                check_stat(summary[key])
            reach = summary["steps_to_adamw_final"]
            assert reach["n"] == 2 and 0 <= reach["reached"] <= 2
        # Lion keeps one state tensor per parameter, AdamW two (plus its step counters)
        lion_bytes = task["summary"]["lion"]["state_bytes"]
        assert task["summary"]["adamw"]["state_bytes"] > 1.9 * lion_bytes
        assert len(task["verdict"]) == 1 and "AdamW" in task["verdict"][0]
    assert "## digits" in (out / "compare.md").read_text()


def test_same_init_and_batches_for_every_optimizer(monkeypatch):
    """Through the CLI: each optimizer of a seed starts from the same weights, same batches."""
    task_cls = type(get_task("digits"))
    seen = []  # (optimizer, seed-marker, initial params, batch tensors)
    original_loss = task_cls.loss

    def recording_factory(name):
        make = registry.OPTIMIZERS[name]

        def factory(params, lr, wd, factor):
            params = list(params)
            seen.append(
                {"optimizer": name, "init": [p.detach().clone() for p in params], "batches": []}
            )
            return make(params, lr, wd, factor)

        return factory

    def recording_loss(self, model, batch):
        if model.training:
            seen[-1]["batches"].append(batch[1].clone())
        return original_loss(self, model, batch)

    for name in ("adamw", "lion"):
        monkeypatch.setitem(registry.OPTIMIZERS, name, recording_factory(name))
    monkeypatch.setattr(task_cls, "loss", recording_loss)
    argv = ["compare", "--tasks", "digits", "--seeds", "2", "--steps", "4", "--evals", "1"]
    assert main([*argv, "--no-progress"]) == 0

    assert [s["optimizer"] for s in seen] == ["adamw", "lion", "adamw", "lion"]
    for a, b in ((seen[0], seen[1]), (seen[2], seen[3])):  # same seed
        assert all(torch.equal(x, y) for x, y in zip(a["init"], b["init"], strict=True))
        assert len(a["batches"]) == 4
        assert all(torch.equal(x, y) for x, y in zip(a["batches"], b["batches"], strict=True))
    # different seeds really differ, so the equalities above are not vacuous
    assert not torch.equal(seen[0]["init"][0], seen[2]["init"][0])
    assert not torch.equal(seen[0]["batches"][0], seen[2]["batches"][0])


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
    argv = ["compare", "--tasks", "digits,charlm", "--seeds", "2", *TINY, "--out", str(out)]
    assert main(argv) == 130
    assert "INTERRUPTED" in capsys.readouterr().out

    report = load_report(out / "compare.json")
    assert report["interrupted"] is True and report["complete"] is False
    digits, charlm = report["tasks"]
    assert digits["status"] == "partial" and charlm["status"] == "not run"
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
    ],
)
def test_invalid_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        main(["compare", "--device", "cuda", "--no-progress"])


def test_verdict_says_when_lion_loses():
    def summary(final, reached):
        return {
            "final_metric": mean_std(final),
            "steps_to_adamw_final": {"n": 2, "reached": reached, "mean_steps": 50.0},
            "diverged": 0,
            "state_bytes": 100,
            "optimizer_step_ms": mean_std([1.0]),
            "train_step_ms": mean_std([2.0]),
        }

    task = {
        "metric": "accuracy",
        "higher_is_better": True,
        "steps": 100,
        "summary": {"adamw": summary([0.90, 0.91], 2), "lion": summary([0.80, 0.81], 0)},
    }
    (line,) = compare_cli.verdicts(task)
    assert line.startswith("lion loses to AdamW") and "never reaches" in line
    task["summary"]["lion"] = summary([0.95, 0.96], 2)
    assert compare_cli.verdicts(task)[0].startswith("lion beats AdamW")


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
    assert main(["compare", "--tasks", "digits", "--seeds", "1", *TINY, "--out", str(out)]) == 130
    report = load_report(out / "compare.json")
    assert report["interrupted"] is True
    assert [r["optimizer"] for r in report["tasks"][0]["runs"]] == ["adamw"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # our handler is removed again


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    """matplotlib is an optional extra: without it the JSON and Markdown are still written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    out = tmp_path / "out"
    argv = ["compare", "--tasks", "digits", "--seeds", "1", *TINY, "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md"]
    assert "matplotlib is not installed" in capsys.readouterr().err
