"""Tests of ``lionopt sweep``: the grid, the robustness number, the batch-size ablation."""

from __future__ import annotations

import json

import pytest

from lionopt.cli import main
from lionopt.cli import sweep as sweep_cli
from lionopt.hparams import DEFAULT_FACTOR
from lionopt.tasks import get_task


def test_small_sweep_with_batch_sizes(tmp_path, capsys, monkeypatch):
    splits = []
    original = sweep_cli.train_run

    def recording(task, data, *args, **kwargs):
        splits.append((data.info.get("split"), data.train_x.shape[0], data.val_x.shape[0]))
        return original(task, data, *args, **kwargs)

    monkeypatch.setattr(sweep_cli, "train_run", recording)
    out = tmp_path / "sweep"
    argv = ["sweep", "--tasks", "digits", "--steps", "8", "--evals", "1", "--no-progress",
            "--lr-multipliers", "0.1,10", "--wd-multipliers", "1", "--batch-sizes", "32,64",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "robustness" in text and "Batch-size ablation" in text
    assert "lion's best lr across batch sizes" in text
    assert set(splits) == {("tune", 1150, 288)}  # never the validation split

    report = json.loads((out / "sweep.json").read_text())
    assert report["schema"] == "lionopt.sweep/1" and report["complete"] is True
    (task,) = report["tasks"]
    blocks = task["batch_sizes"]
    # the default batch is 128 and 8 steps: the same number of examples at every batch size
    assert [(b["batch_size"], b["steps"]) for b in blocks] == [(32, 32), (64, 16)]
    for block in blocks:
        assert len(block["runs"]) == 4  # 2 optimizers x 2 lr x 1 wd
        lion = block["grids"]["lion"]
        lion_lr = 1e-3 / DEFAULT_FACTOR  # centred on from_adamw of AdamW's 1e-3
        assert lion["lr"] == pytest.approx([lion_lr / 10, lion_lr * 10])
        assert lion["weight_decay"] == pytest.approx([0.01 * DEFAULT_FACTOR])
        assert len(lion["final_metric"]) == 1 and len(lion["final_metric"][0]) == 2
        for name in ("adamw", "lion"):
            assert 0.0 < block["robustness"][name] <= 1.0
            assert block["best"][name]["final_metric"] == max(
                v for row in block["grids"][name]["final_metric"] for v in row
            )
        assert (out / f"sweep_digits_bs{block['batch_size']}.png").stat().st_size > 0
    assert "batch 32" in (out / "sweep.md").read_text()


def test_robustness_counts_cells_within_tolerance():
    task = get_task("charlm")  # lower is better
    config = {"optimizers": ["lion"], "lr_multipliers": [1.0, 3.0], "wd_multipliers": [1.0, 10.0],
              "tolerance": 0.02, "factor": 3.0}  # fmt: skip
    finals = {(1.0, 1.0): 2.00, (3.0, 1.0): 2.03, (1.0, 10.0): 2.05, (3.0, 10.0): None}
    runs = [
        {
            "optimizer": "lion",
            "lr_multiplier": lr,
            "wd_multiplier": wd,
            "final_metric": v,
            "diverged": v is None,
        }
        for (lr, wd), v in finals.items()
    ]
    block = {"runs": runs}
    sweep_cli.summarize_block(task, block, config)
    # best 2.00; within 2%: 2.00 and 2.03; 2.05 is not; the diverged cell counts as a miss
    assert block["robustness"]["lion"] == pytest.approx(2 / 4)
    assert block["best"]["lion"]["final_metric"] == 2.00
    assert block["grids"]["lion"]["final_metric"] == [[2.00, 2.03], [2.05, None]]


def test_invalid_multipliers(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--lr-multipliers", "1,-3"])
    assert "positive" in capsys.readouterr().err
