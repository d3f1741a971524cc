"""scripts/compare_recipes.py on two recipes with a tiny budget and the tiny teacher: table, plot, JSON, resume."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tiny import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_digits_config_is_a_participant():
    compare = _script("compare_recipes")
    found = compare.digits_configs()
    assert {"dmd2", "phased_dmd"} <= set(found)
    assert set(found) == {p.stem for p in (REPO / "recipes" / "digits").glob("*.yaml")}


def test_two_recipes_tiny_budget_and_resume(tiny_teacher, tmp_path, capsys):
    compare = _script("compare_recipes")
    args = ["--budget", "1", "--steps", "1", "2", "--recipes", "dmd2", "phased_dmd", "--out", str(tmp_path),
            "--set", f"teacher.path={tiny_teacher}", "data.batch_size=4"]
    assert compare.main(args) == 0
    first = capsys.readouterr().out
    assert first.count("FD-digits") == 4 and "[4/4] phased_dmd 2-step" in first
    results = json.loads((tmp_path / "compare" / "results.json").read_text())
    assert sorted((r["recipe"], r["steps"]) for r in results.values()) == [
        ("dmd2", 1), ("dmd2", 2), ("phased_dmd", 1), ("phased_dmd", 2)]
    for r in results.values():
        assert r["budget"] == 1 and r["fd_digits"] > 0 and 0 <= r["accuracy"] <= 1 and r["diversity"] > 0
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["train_seconds"] > 0
    table = (tmp_path / "compare_recipes.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| dmd2") or line.startswith("| phased_dmd")]
    assert len(rows) == 4 and "real half B (floor)" in table
    assert (tmp_path / "compare" / "fd_digits.png").stat().st_size > 0
    from PIL import Image

    for name, k in (("dmd2", 1), ("phased_dmd", 2)):  # one grid per student: 10 classes x 10 samples
        (path,) = (tmp_path / "compare" / "grids").glob(f"{name}_*_{k}step.png")  # named with the --set values
        with Image.open(path) as grid:
            assert grid.size[0] == grid.size[1] > 0
    # A second call measures nothing again (resumable) and writes the same table.
    assert compare.main(args) == 0
    second = capsys.readouterr().out
    assert second.count("measured before") == 4 and "accuracy" not in second.split("wrote")[0]
    assert (tmp_path / "compare_recipes.md").read_text() == table
    # --report-only trains nothing: the table of what results.json holds, here the 1-step rows only.
    assert compare.main(["--report-only", "--steps", "1", "--out", str(tmp_path)]) == 0
    third = capsys.readouterr().out
    assert "FD-digits" not in third and "measured before" not in third
    rows = [line for line in (tmp_path / "compare_recipes.md").read_text().splitlines()
            if line.startswith("| dmd2") or line.startswith("| phased_dmd")]
    assert len(rows) == 2 and all(" | 1 | " in line for line in rows)


def test_unknown_recipe_is_named(tmp_path):
    compare = _script("compare_recipes")
    with pytest.raises(SystemExit, match="no recipes/digits/<name>.yaml for \\['nope'\\]"):
        compare.main(["--recipes", "nope", "--out", str(tmp_path)])


def test_grid_names_carry_the_overrides():
    compare = _script("compare_recipes")
    assert compare.grid_name("dmd2", 4, []) == "dmd2_4step.png"
    assert compare.grid_name("fdistill", 1, ["recipe.divergence=forward_kl"]) == "fdistill_divergence-forward_kl_1step.png"
    assert compare.grid_name("x", 2, ["teacher.path=/a/b/tiny"]) == "x_path-tiny_2step.png"


def test_class_diversity_closed_form():
    import torch

    compare = _script("compare_recipes")
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert compare.class_diversity(feats, labels) == pytest.approx((5.0 + 0.0) / 2)


def _entry(recipe: str, steps: int, fd: float) -> dict:
    return {"fd_digits": fd, "precision": 0.8, "recall": 0.8, "accuracy": 0.97, "diversity": 6.9, "recipe": recipe,
            "steps": steps, "budget": 400, "train_seconds": 10.0, "label": recipe}


def test_merge_joins_parallel_cells_and_refuses_a_conflict(tmp_path, capsys):
    compare = _script("compare_recipes")
    held = {"dmd2|steps=1|budget=400|set=": _entry("dmd2", 1, 1.9)}
    a = {"phased_dmd|steps=2|budget=400|set=": _entry("phased_dmd", 2, 1.5), **held}  # repeats an entry, identical
    b = {"dmd2|steps=2|budget=400|set=": _entry("dmd2", 2, 1.6)}
    out = tmp_path / "docs"
    for folder, entries in ((out, held), (tmp_path / "a", a), (tmp_path / "b", b)):
        (folder / "compare" / "grids").mkdir(parents=True)
        (folder / "compare" / "results.json").write_text(json.dumps(entries))
    (tmp_path / "a" / "compare" / "grids" / "phased_dmd_2step.png").write_bytes(b"grid of a")
    (out / "compare" / "grids" / "dmd2_1step.png").write_bytes(b"kept")
    (tmp_path / "b" / "compare" / "grids" / "dmd2_1step.png").write_bytes(b"not copied over the held grid")

    assert compare.main(["--report-only", "--budget", "400", "--out", str(out),
                         "--merge", str(tmp_path / "a"), str(tmp_path / "b" / "compare" / "results.json")]) == 0
    assert "merged 2 new entries from 2 folder(s)" in capsys.readouterr().out
    merged = json.loads((out / "compare" / "results.json").read_text())
    assert merged == {**held, **a, **b}
    assert (out / "compare" / "grids" / "phased_dmd_2step.png").read_bytes() == b"grid of a"
    assert (out / "compare" / "grids" / "dmd2_1step.png").read_bytes() == b"kept"
    table = (out / "compare_recipes.md").read_text()
    assert "`OMP_NUM_THREADS=1 python scripts/compare_recipes.py --budget 400 --steps 1 2 4 --out" in table
    assert [line.split(" | ")[3:7:3] for line in table.splitlines() if line.startswith(("| dmd2", "| phased"))] == [
        ["-", "1.900"], ["-", "1.600"], ["-", "1.500"]]  # teacher pairs, FD-digits

    # The same cell measured twice with other figures: refused, naming the key and both files; nothing written.
    (tmp_path / "c" / "compare").mkdir(parents=True)
    (tmp_path / "c" / "compare" / "results.json").write_text(
        json.dumps({"dmd2|steps=2|budget=400|set=": _entry("dmd2", 2, 1.7)}))
    before = (out / "compare" / "results.json").read_text()
    with pytest.raises(SystemExit, match=r"'dmd2\|steps=2\|budget=400\|set=' differs between .*c/compare/results.json"):
        compare.main(["--report-only", "--out", str(out), "--merge", str(tmp_path / "c")])
    assert (out / "compare" / "results.json").read_text() == before
    with pytest.raises(SystemExit, match="--merge: no results file at .*nowhere"):
        compare.main(["--report-only", "--out", str(out), "--merge", str(tmp_path / "nowhere")])


def test_plot_range_marks_a_collapsed_student_instead_of_flattening_the_rest():
    compare = _script("compare_recipes")
    clustered = [1.47, 1.51, 1.63, 1.74, 1.80, 1.81, 1.82, 1.87, 1.95]
    lo, hi = compare.y_range(clustered + [8.62])  # Decoupled DMD's collapse, far past the outlier fence
    assert lo == 1.47 and 1.95 < hi < 2.1
    assert compare.y_range(clustered) == (1.47, 1.95)  # nothing far out: every value in range, no headroom
    assert compare.y_range([1.0, 2.0, 3.0, 4.0, 5.0]) == (1.0, 5.0)  # evenly spread: nothing is an outlier
    assert compare.y_range([2.0]) == (1.5, 2.5)


def test_offscale_labels_stack_instead_of_overlapping():
    compare = _script("compare_recipes")
    series = {"scm": [(1, 4.45), (2, 1.99)], "lcm": [(1, 4.30), (2, 2.32)], "ddmd": [(1, 8.62), (2, 7.68)],
              "dmd2": [(1, 1.87), (2, 1.63)]}
    assert compare.offscale_rows(series, 3.2) == {("ddmd", 1): 0, ("scm", 1): 1, ("lcm", 1): 2, ("ddmd", 2): 0}
    assert compare.offscale_rows(series, 9.0) == {}


def test_legend_names_shorten_the_set_keys():
    compare = _script("compare_recipes")
    assert compare.legend_name("dmd2") == "dmd2"
    assert compare.legend_name("fdistill (recipe.divergence=forward_kl)") == "fdistill, divergence=forward_kl"
    assert compare.legend_name("x (recipe.ca_min_t=0.02 teacher.path=/a/b)") == "x, ca_min_t=0.02, path=/a/b"


def test_jobs_runs_cells_in_child_processes_with_the_same_figures(tiny_teacher, tmp_path, capsys):
    """--jobs 2: each cell a child process on one thread, merged as it ends; the figures are those of the same cells
    measured one at a time in this process, and a measured cell is not given to a child again."""
    compare = _script("compare_recipes")
    common = ["--budget", "1", "--recipes", "dmd2", "phased_dmd", "--set", f"teacher.path={tiny_teacher}",
              "data.batch_size=4"]
    assert compare.main([*common, "--steps", "2", "--out", str(tmp_path / "serial")]) == 0
    serial = json.loads((tmp_path / "serial" / "compare" / "results.json").read_text())
    capsys.readouterr()

    out = tmp_path / "parallel"
    (out / "compare").mkdir(parents=True)
    held = {"dmd2|steps=1|budget=1|set=" + " ".join(common[-2:]): _entry("dmd2", 1, 9.0)}  # measured before
    (out / "compare" / "results.json").write_text(json.dumps(held))
    assert compare.main([*common, "--steps", "1", "2", "--jobs", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "[1/4] dmd2 1-step: measured before" in said and "dmd2 1-step: started" not in said
    assert said.count("started (log") == 3 and said.count("FD-digits") == 4  # 3 children + the held entry
    parallel = json.loads((out / "compare" / "results.json").read_text())
    assert set(parallel) == set(held) | set(serial) | {"phased_dmd|steps=1|budget=1|set=" + " ".join(common[-2:])}
    for key, r in serial.items():
        assert {a: b for a, b in parallel[key].items() if a != "train_seconds"} == {
            a: b for a, b in r.items() if a != "train_seconds"}, key
    assert parallel[next(iter(held))] == next(iter(held.values()))
    assert len(list((out / "compare" / "grids").glob("*.png"))) == 3
    assert "(`--jobs N` measures N cells at a time" in (out / "compare_recipes.md").read_text()


def test_jobs_says_a_failed_cell_and_exits_nonzero(tiny_teacher, tmp_path, capsys, monkeypatch):
    """A child that crashes is said with its log's last lines, the other cells go on and the exit status is 1; a cell
    refused by config validation (here a corrupt teacher weights file) is 'not run', not a failure."""
    import shutil
    import sys

    compare = _script("compare_recipes")
    real = compare.cell_command
    crash = [sys.executable, "-c", "import sys; print('RuntimeError: out of memory in phased_dmd'); sys.exit(3)"]
    monkeypatch.setattr(compare, "cell_command", lambda name, *a: crash if name == "phased_dmd" else real(name, *a))
    args = ["--budget", "1", "--steps", "1", "--recipes", "dmd2", "phased_dmd", "--jobs", "2", "--out",
            str(tmp_path / "out"), "--set", f"teacher.path={tiny_teacher}", "data.batch_size=4"]
    assert compare.main(args) == 1
    said = capsys.readouterr().out
    assert "[2/2] phased_dmd 1-step: FAILED (exit 3), last lines of its log:\n    RuntimeError: out of memory" in said
    assert "[1/2] dmd2 1-step: FD-digits" in said and "1 cell(s) failed" in said
    assert [r["recipe"] for r in json.loads((tmp_path / "out" / "compare" / "results.json").read_text()).values()] == [
        "dmd2"]
    monkeypatch.setattr(compare, "cell_command", real)

    broken = tmp_path / "broken_teacher"
    shutil.copytree(tiny_teacher, broken)
    (weights,) = broken.rglob("*.safetensors")
    weights.write_bytes(b"not a safetensors file")
    refused = [*args[:-2], f"teacher.path={broken}"]
    assert compare.main(refused) == 0
    said = capsys.readouterr().out
    assert said.count("not run (teacher.path: ") == 2 and "is truncated or corrupt" in said and "FAILED" not in said
    with pytest.raises(SystemExit, match="--jobs: expected a count of 1 or more, got 0"):
        compare.main([*args[:7], "--jobs", "0"])


def test_pair_trained_recipes_say_their_teacher_pairs(tmp_path):
    """The table's "teacher pairs" column: a pair-trained recipe's num_pairs (teacher work outside its train seconds),
    '-' for the recipes that query the teacher while training."""
    compare = _script("compare_recipes")
    found = compare.digits_configs()
    assert compare.teacher_pairs(found["reflow"]) == 4096 and compare.teacher_pairs(found["dmd2"]) == 0
    (tmp_path / "cfg.yaml").write_text("recipe:\n  name: x\n  pairs: {path: p, num_pairs: 128}\n")
    assert compare.teacher_pairs(tmp_path / "cfg.yaml") == 128
    reference = {"fd_digits": 1.5, "accuracy": 0.99, "precision": 0.9, "recall": 0.9, "diversity": 6.8}
    results = {"a": _entry("reflow", 1, 4.46), "b": _entry("dmd2", 1, 1.87)}
    compare.write_outputs(results, reference, tmp_path, "cmd", {"reflow": 4096, "dmd2": 0})
    rows = {line.split(" | ")[0]: line.split(" | ")[3] for line in (tmp_path / "compare_recipes.md").read_text()
            .splitlines() if line.startswith(("| reflow", "| dmd2"))}
    assert rows == {"| reflow": "4096", "| dmd2": "-"}


def test_training_seeds_share_a_row_with_mean_and_spread(tmp_path):
    """Entries that differ only in run.seed are one row: mean ± sample sd of every figure and each seed's FD-digits;
    a one-seed row has no spread; other --set values stay their own rows; a method's diagnostics are averaged too."""
    compare = _script("compare_recipes")
    assert compare.split_seed("dmd2 (run.seed=2)") == ("dmd2", 2)
    assert compare.split_seed("fdistill (recipe.divergence=x run.seed=1)") == ("fdistill (recipe.divergence=x)", 1)
    assert compare.split_seed("scm") == ("scm", None)
    assert compare.key_sets("a|steps=1|budget=400|set=teacher.path=/t run.seed=3") == "teacher.path=/t"

    def seeded(recipe, seed, fd, diag=None):
        e = _entry(recipe, 1, fd)
        if seed:
            e["label"] = f"{recipe} (run.seed={seed})"
        if diag is not None:
            e["diagnostics"] = {"residual": diag}
        return e

    results = {"dmd2|steps=1|budget=400|set=": seeded("dmd2", 0, 1.0, 0.1),
               "dmd2|steps=1|budget=400|set=run.seed=1": seeded("dmd2", 1, 2.0, 0.3),
               "dmd2|steps=1|budget=400|set=run.seed=2": seeded("dmd2", 2, 3.0, 0.5),
               "scm|steps=1|budget=400|set=": seeded("scm", 0, 4.5)}
    results["dmd2|steps=1|budget=400|set=run.seed=2"]["recall"] = 0.5  # recalls 0.8, 0.8, 0.5: mean 0.7, sd 0.173
    reference = {"fd_digits": 1.5, "accuracy": 0.99, "precision": 0.9, "recall": 0.9, "diversity": 6.8}
    compare.write_outputs(results, reference, tmp_path, "cmd")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in (tmp_path / "compare_recipes.md").read_text()
            .splitlines() if line.startswith(("| dmd2", "| scm"))}
    assert set(rows) == {"dmd2", "scm"}
    dmd2, scm = rows["dmd2"], rows["scm"]
    assert dmd2[4] == "3" and dmd2[6] == "2.000 ± 1.000" and dmd2[7] == "1.000, 2.000, 3.000"
    assert dmd2[10] == "0.700 ± 0.173" and dmd2[12] == "residual 0.3000 ± 0.2000 |"
    assert scm[4] == "1" and scm[6] == "4.500" and scm[7] == "-" and scm[12] == "- |"
    # --seeds: seed S of a config is the cell with run.seed=S added, except the config's own seed (0)
    config = compare.digits_configs()["dmd2"]
    assert compare.cell_sets(config, ["data.batch_size=4"], 0) == ["data.batch_size=4"]
    assert compare.cell_sets(config, ["data.batch_size=4"], 2) == ["data.batch_size=4", "run.seed=2"]
    assert compare.cell_sets(config, [], None) == []


def test_seeds_train_each_cell_once_per_seed(tiny_teacher, tmp_path, capsys):
    """--seeds 0 1 in one process: two runs of the cell (each its own run folder), one table row of two seeds whose
    second entry is the one `--set run.seed=1` keys."""
    compare = _script("compare_recipes")
    common = ["--budget", "1", "--steps", "1", "--recipes", "dmd2", "--out", str(tmp_path), "--set",
              f"teacher.path={tiny_teacher}", "data.batch_size=4"]
    assert compare.main([*common, "--seeds", "0", "1"]) == 0
    assert capsys.readouterr().out.count("FD-digits") == 2
    results = json.loads((tmp_path / "compare" / "results.json").read_text())
    sets = f"teacher.path={tiny_teacher} data.batch_size=4"
    assert sorted(results) == [f"dmd2|steps=1|budget=1|set={sets}", f"dmd2|steps=1|budget=1|set={sets} run.seed=1"]
    a, b = results.values()
    assert a["fd_digits"] != b["fd_digits"]  # another seed trained another student
    (row,) = [line for line in (tmp_path / "compare_recipes.md").read_text().splitlines() if line.startswith("| dmd2")]
    assert row.split(" | ")[4] == "2" and " ± " in row.split(" | ")[6]


def test_results_are_written_atomically(tmp_path, monkeypatch):
    """A crash while results.json is rewritten (here the rename fails) leaves the previous file whole."""
    import os

    from distill.base.paths import write_text_atomic

    results = tmp_path / "results.json"
    write_text_atomic(results, '{"a": 1}\n')
    assert results.read_text() == '{"a": 1}\n'

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        write_text_atomic(results, '{"a": 1, "b": 2}\n')
    assert results.read_text() == '{"a": 1}\n'


def test_multistep_scores_depend_on_the_seed_not_on_what_the_process_drew_before(tiny_teacher, tmp_path):
    """A k-step rollout re-noises between steps with torch.randn_like: score_student draws that noise from the
    stream of its `seed` as well, so one student scores the same whatever the process drew before, and the
    process's own stream is left where it was (a run that scores along the way trains on unchanged)."""
    import torch

    from distill.demo.digits_judge import FDDigits
    from distill.training.registry import recipe_configs
    from distill.training.trainer import Trainer

    compare = _script("compare_recipes")
    config = recipe_configs("digits", ["dmd2"])["dmd2"]
    cfg = compare.cell_config("dmd2", config, 2, 1, tmp_path, [f"teacher.path={tiny_teacher}", "data.batch_size=4"])
    trainer = Trainer(cfg)
    trainer.train_step()
    judge = FDDigits(resolution=cfg.data.resolution)
    reports = []
    for before in (1, 2):
        torch.manual_seed(before)
        state = torch.get_rng_state()
        reports.append(compare.score_student(trainer, judge, seed=0))
        assert torch.equal(torch.get_rng_state(), state)  # the process's stream put back
    assert reports[0] == reports[1]
    other = compare.score_student(trainer, judge, seed=1)  # another seed: other noises, other figures
    assert other["fd_digits"] != reports[0]["fd_digits"]
    # The re-noising stream is not the starting noise's: peek at each chunk's first draw, leaving the stream as it is.
    drawn, original = [], trainer.recipe.generate

    def generate(gen, cond, noise):
        with torch.random.fork_rng():
            drawn.append((torch.randn_like(noise), noise))
        return original(gen, cond, noise)

    trainer.recipe.generate = generate
    assert compare.score_student(trainer, judge, seed=0) == reports[0]
    assert drawn and not any(torch.equal(renoise, noise) for renoise, noise in drawn)
