"""scripts/budget_curve.py: the bar it measures against, its match rule, and that its student at update B of a longer
run is the student of the headline table's B-update cell."""

from __future__ import annotations

import importlib.util
import json

import pytest
from tiny import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


def _script():
    spec = importlib.util.spec_from_file_location("budget_curve", REPO / "scripts" / "budget_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(recipe: str, fd: float, steps: int = 1, budget: int = 400, sets: str = "") -> tuple[str, dict]:
    label = f"{recipe} ({sets})" if sets else recipe
    return f"{recipe}|steps={steps}|budget={budget}|set={sets}", {
        "recipe": recipe, "label": label, "steps": steps, "budget": budget, "fd_digits": fd}


def test_the_bar_is_the_best_seed_mean_of_the_other_recipes_own_configs():
    curve = _script()
    table = dict([
        _entry("a", 2.0), _entry("a", 2.2, sets="run.seed=1"), _entry("a", 2.4, sets="run.seed=2"),  # mean 2.2
        _entry("b", 2.1),                                    # one seed: the best mean, sd 0
        _entry("b", 1.0, sets="recipe.x=1"),                 # a --set variant: not a participant
        _entry("c", 0.5, steps=2),                           # another step count
        _entry("d", 0.7, budget=800),                        # another budget
        _entry("new", 0.1),                                  # the recipe being curved
    ])
    best = curve.bar(table, steps=1, budget=400, exclude={"new"})
    assert best == {"label": "b", "mean": 2.1, "sd": 0.0, "seeds": [0]}
    table.update([_entry("b", 2.5, sets="run.seed=1")])      # b's mean 2.3 now above a's 2.2
    best = curve.bar(table, steps=1, budget=400, exclude={"new"})
    assert best["label"] == "a" and best["seeds"] == [0, 1, 2]
    assert best["mean"] == pytest.approx(2.2) and best["sd"] == pytest.approx(0.2)
    assert curve.bar(table, steps=4, budget=400, exclude=set()) is None


def test_a_recipe_matches_at_the_first_budget_within_mean_plus_sd():
    curve = _script()
    target = {"label": "a", "mean": 2.2, "sd": 0.2, "seeds": [0, 1, 2]}
    points = [{"budget": 200, "fd_digits": 3.0}, {"budget": 400, "fd_digits": 2.41},
              {"budget": 800, "fd_digits": 2.39}, {"budget": 1600, "fd_digits": 2.0}]
    assert curve.first_match(points, target) == 800
    assert curve.first_match(points[:3], {**target, "sd": 0.0}) is None
    assert curve.first_match(points, None) is None


def test_the_curve_reproduces_the_tables_cell_at_its_budget(tiny_teacher, tmp_path, capsys):
    """Trained once to 3 updates and scored at 2 and 3: the point at 2 is the table's 2-update cell to the bit (the
    trainer's RNG is per update and its learning rate constant), so a curve's points are budget runs."""
    curve = _script()
    sets = [f"teacher.path={tiny_teacher}", "data.batch_size=4"]
    table_out = tmp_path / "table"
    assert curve.compare.main(["--budget", "2", "--steps", "1", "--recipes", "dmd2", "--out", str(table_out),
                               "--set", *sets]) == 0
    table_file = table_out / "compare" / "results.json"
    table = json.loads(table_file.read_text())
    key, rival = _entry("rival", 1e9, budget=2)                  # a bar nobody reaches
    table[key] = rival
    table_file.write_text(json.dumps(table))
    capsys.readouterr()
    args = ["--recipes", "dmd2", "--steps", "1", "--budgets", "3", "2", "--table-budget", "2", "--table",
            str(table_file), "--out", str(tmp_path / "curve"), "--set", *sets]
    assert curve.main(args) == 0
    out = capsys.readouterr().out
    held = json.loads((tmp_path / "curve" / "budget_curve.json").read_text())
    (entry,) = held.values()
    assert [p["budget"] for p in entry["curve"]] == [2, 3]
    cell = table[f"dmd2|steps=1|budget=2|set={' '.join(sets)}"]
    for figure in ("fd_digits", "precision", "recall", "accuracy", "diversity"):
        assert entry["curve"][0][figure] == cell[figure]
    assert entry["curve"][1]["fd_digits"] != cell["fd_digits"]   # one more update moved the student
    assert entry["matches_at"] == 2 and entry["bar"]["label"] == "rival"
    assert "dmd2 (1 step): matches at 2 updates" in out and "the same run up to that update" in out
    assert (tmp_path / "curve" / "fd_vs_updates.png").stat().st_size > 0
    assert curve.main(args) == 0                                 # resumable: nothing trained again
    assert "measured before, skipped" in capsys.readouterr().out


def test_unknown_recipe_and_bad_budget_are_named(tmp_path):
    curve = _script()
    with pytest.raises(SystemExit, match=r"no recipes/digits/<name>.yaml for \['nope'\]"):
        curve.main(["--recipes", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--budgets: every budget must be positive"):
        curve.main(["--recipes", "dmd2", "--budgets", "0", "--out", str(tmp_path)])
