"""`distill eval` (distill/evaluate.py): the subcommands' shared arguments and the defaults each kept from the
script it replaced, and the digits evaluations on one short DMD2 run of the shipped teacher (the judge works at
16x16, so the tiny 8x8 teacher cannot stand in)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from tiny import REPO, subprocess_env

from distill.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")  # `runs`, `steps` and `reflow` set one thread, as they did


def parse(*argv: str):
    return build_parser().parse_args(["eval", *argv])


def test_every_subcommand_shares_seed_and_threads():
    for argv in (["digits", "r"], ["text", "r"], ["runs", "r"], ["steps", "r"], ["reflow"], ["teacher"],
                 ["text-teacher"]):
        args = parse(*argv)
        assert args.seed == 1234 and parse(*argv, "--seed", "7").seed == 7
        assert args.threads == (1 if argv[0] in ("runs", "steps", "reflow", "text-teacher") else 0)


def test_defaults_are_those_of_the_replaced_scripts():
    assert parse("digits", "r").teacher_steps == 20 and parse("text", "r").teacher_steps == 20
    assert parse("runs", "a", "b").teacher_steps == 50 and parse("runs", "a", "b").runs == ["a", "b"]
    assert parse("steps", "r").steps == 2
    reflow = parse("reflow", "--flow", "a=x", "--flow", "b=y=z", "--student", "s=p")
    assert reflow.flow == [("a", "x"), ("b", "y=z")] and reflow.student == [("s", "p")]
    assert reflow.teacher == "builtin:digits_teacher" and reflow.teacher_steps == 50 and reflow.out is None
    teacher = parse("teacher")
    assert (teacher.teacher, teacher.steps, teacher.guidance) == ("builtin:digits_teacher", [1, 2, 4, 8, 20, 50], [1.0])
    text = parse("text-teacher")
    assert (text.teacher, text.steps, text.guidance) == ("builtin:text_teacher", [5, 10, 20], [1.0, 2.0, 3.0, 5.0])


def test_reflow_folders_are_named(capsys):
    with pytest.raises(SystemExit):
        parse("reflow", "--flow", "builtin:digits_teacher")
    assert "expected NAME=PATH" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "dmd2"
    assert main(["train", "digits/dmd2.yaml", f"run.output_dir={out}", "run.max_steps=2", "data.batch_size=4",
                 "trainer.critic_steps=1", "trainer.sample_every=0", "trainer.checkpoint_every=0",
                 "trainer.progress_bar=false"]) == 0
    return out


def test_digits_runs_and_steps_on_a_finished_run(run, tmp_path, capsys):
    assert main(["eval", "digits", str(run), "--teacher-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "not Inception FID" in printed and "teacher (1 steps, w=1.0)" in printed
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    assert list(rows) == ["real half B (the floor)", "teacher (1 steps, w=1.0)",
                          "student (1 step, diffusers pipeline)"]
    assert Image.open(run / "teacher_vs_student.png").size[0] > 10 * 16

    grids = tmp_path / "grids"
    assert main(["eval", "runs", str(run), "--teacher-steps", "1", "--grids", str(grids)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1] == "| run | steps | recipe | FD-digits | x floor | precision | recall | accuracy |"
    assert [line.split(" | ")[0] for line in table[3:]] == ["| real half B (the floor)", "| teacher, w=1.0", "| dmd2"]
    # the same seed and labels as `eval digits`: the same student figures
    scored = json.loads((run / "fd_digits.json").read_text())
    assert scored["fd_digits"] == rows["student (1 step, diffusers pipeline)"]["fd_digits"]
    assert scored["recipe"]["dmd_weight"] == 1.0  # the recipe section of the run's config
    assert sorted(p.name for p in grids.iterdir()) == ["dmd2.png", "teacher_w1.0.png"]

    assert main(["eval", "steps", str(run), "--steps", "2"]) == 0
    assert f"{run} 2 steps: FD-digits" in capsys.readouterr().out
    assert (run / "student_2step.png").is_file()


def test_runs_refuses_runs_of_different_resolutions(run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    config = (run / "config.yaml").read_text()
    assert "  resolution: 16\n" in config
    (other / "config.yaml").write_text(config.replace("  resolution: 16\n", "  resolution: 8\n"))
    assert main(["eval", "runs", str(run), str(other)]) == 2  # before anything is sampled
    assert "runs differ in data.resolution [8, 16]" in capsys.readouterr().err


@pytest.mark.slow
def test_reflow_table(run, tmp_path, capsys):
    out = tmp_path / "reflow.json"
    assert main(["eval", "reflow", "--flow", "teacher=builtin:digits_teacher", "--student", f"dmd2={run}/pipeline",
                 "--teacher-steps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert list(rows) == ["flow teacher", "floor (real half B)", "teacher (1 steps, w=1)", "student dmd2 (1 step)"]
    assert 0 < rows["flow teacher"]["straightness"] and rows["student dmd2 (1 step)"]["parameters"] > 10**6
    assert "student dmd2 (1 step)" in capsys.readouterr().out


@pytest.mark.slow
def test_teacher_curve_writes_table_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    md, png = tmp_path / "curve.md", tmp_path / "curve.png"
    assert main(["eval", "teacher", "--steps", "1", "--markdown", str(md), "--plot", str(png)]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["1", "1.00"]
    assert md.read_text().splitlines()[4].startswith("| 1 | 1 | ")
    assert Image.open(png).size[0] > 0


def test_eval_runs_as_a_module():
    """`python -m distill.cli eval ...` reaches the same parser as the `distill` entry point."""
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "eval", "-h"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(name in proc.stdout for name in ("digits", "text", "runs", "steps", "reflow", "teacher", "text-teacher"))
