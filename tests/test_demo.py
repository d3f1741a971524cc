"""The main job's glue, shortened: train a few DMD2 steps on the shipped teacher, export, evaluate from the folder."""

from __future__ import annotations

import json

from PIL import Image

from distill.cli import main


def test_demo_writes_pipeline_grid_and_metrics(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--teacher-steps", "2", "run.max_steps=2", "data.batch_size=4",
               "trainer.critic_steps=1", "trainer.sample_every=0", "trainer.checkpoint_every=0",
               "trainer.progress_bar=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "FD-digits" in printed and "not Inception FID" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert metrics["count"] == 898 and len(rows) == 3
    floor, teacher, student = (rows[k]["fd_digits"] for k in rows)
    assert 0 < floor < teacher  # a 2-step teacher is far from real data
    assert student > 0 and rows[list(rows)[2]]["nfe"] == 1
    for row in rows.values():
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["x_floor"] == row["fd_digits"] / floor
    assert "precision" in printed and "recall" in printed and "x floor" in printed
    grid = Image.open(out / "teacher_vs_student.png")
    assert grid.size[0] > 10 * 16 and grid.size[1] > 8 * 16  # 10 columns x 8 rows of 16x16 digits (scaled)
    assert (out / "pipeline" / "model_index.json").is_file()
    assert (out / "config.yaml").is_file()
