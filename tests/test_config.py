"""Config loading: every shipped YAML validates; bad keys, types and paths are named; overrides and the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny import DIGITS_YAML, REPO, subprocess_env

from distill.base.errors import ConfigError
from distill.base.paths import resolve_path
from distill.config import Config, OptimizerConfig, config_to_yaml
from distill.training.preflight import build_config, load_config
from distill.training.registry import recipe_module

#: distill configs; recipes/accelerate/ holds `accelerate launch` configs (tests/test_fsdp.py)
SHIPPED = sorted(p for p in (REPO / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate")


def test_recipes_folder_ships_configs():
    assert DIGITS_YAML in SHIPPED


#: shipped configs whose teacher is a real model (a Hugging Face id, resolved only from the local cache) are named
#: `<recipe>_<family>.yaml`: validated with teacher.path pointing at the tiny pipeline of that family
#: (tests/tiny_pipelines.py) and data.prompts or data.images at a tiny prompts file or captioned images folder.
#: What the tiny stand-in cannot take from the real config: DiTPipeline samples only at its transformer's size
#: (the tiny DiT's 16 px, DiT-XL-2-256's 256 px), and DiT's prompts are class indices.
STAND_IN_EXTRA = {"dit": ["data.resolution=16"]}


@pytest.fixture
def stand_ins(tmp_path):
    """Overrides that let a real-model config load offline: the family's tiny pipeline and its data."""
    from test_families_recipes import write_images
    from tiny_pipelines import BUILDERS, CLASS_PROMPTS, PROMPTS, write_prompts

    def make(path: Path) -> list[str]:
        raw = yaml.safe_load(path.read_text())
        if resolve_path(raw["teacher"]["path"]).is_dir():
            return []
        family = path.parent.name
        assert family in BUILDERS, f"{path.name}: a real-model config is recipes/<family>/<recipe>.yaml, family one " \
                                   f"of {sorted(BUILDERS)}"
        teacher = BUILDERS[family](tmp_path / path.stem)
        prompts = CLASS_PROMPTS if family == "dit" else PROMPTS
        data = {"prompts": lambda: write_prompts(tmp_path / "prompts.txt", prompts),
                "images": lambda: write_images(tmp_path / "images")}
        name = raw["data"]["name"]
        return [f"teacher.path={teacher}", f"data.{name}={data[name]()}", *STAND_IN_EXTRA.get(family, [])]
    return make


def test_real_model_config_names_the_hub_id_and_how_to_get_it():
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "recipes" / "sd15/dmd2.yaml")
    assert str(e.value).startswith("teacher.path") and "huggingface-cli download" in str(e.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path, stand_ins):
    overrides = stand_ins(path)
    cfg = load_config(path, overrides)
    assert isinstance(cfg, Config)
    assert isinstance(cfg.recipe, recipe_module(cfg.recipe_name).Config)
    assert resolve_path(cfg.teacher.path).is_dir()
    # Every key written in the file survives validation with its value (nothing silently dropped or renamed).
    raw = yaml.safe_load(path.read_text())
    resolved = yaml.safe_load(config_to_yaml(cfg))
    replaced = {o.split("=")[0] for o in overrides}
    for section, values in raw.items():
        for key, value in values.items():
            if f"{section}.{key}" in replaced:
                continue
            got = resolved[section][key]
            assert got == (list(value) if isinstance(value, tuple) else value), f"{section}.{key}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads_by_name(path, stand_ins):
    # `distill train digits/dmd2.yaml` works from any directory: a name relative to recipes/ falls back to the
    # shipped configs.
    overrides = stand_ins(path)
    assert load_config(f"{path.parent.name}/{path.name}", overrides) == load_config(path, overrides)


@pytest.mark.parametrize("old, new", [("dmd2_digits.yaml", "recipes/digits/dmd2.yaml"),
                                      ("recipes/dmd2_text_flow.yaml", "recipes/text_flow/dmd2.yaml"),
                                      ("fdistill_forward_kl_2step_toy.yaml", "recipes/toy/fdistill_forward_kl_2step.yaml")])
def test_a_config_of_the_flat_layout_names_its_new_place(old, new):
    with pytest.raises(ConfigError, match=f"config file '{re.escape(old)}' does not exist; the shipped configs are "
                                          f"grouped by target: {re.escape(Path(old).name)} is now {re.escape(new)}"):
        load_config(old)
    assert (REPO / new).is_file()


def test_a_missing_config_that_never_shipped_says_only_that(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope_digits.yaml' does not exist$"):
        load_config(tmp_path / "nope_digits.yaml")


@pytest.mark.parametrize(
    "override, key",
    [
        ("bogus_section={a: 1}", "bogus_section"),
        ("run.max_stepz=3", "run.max_stepz"),
        ("trainer.generator.lrr=1", "trainer.generator.lrr"),
        ("recipe.gan_wieght=0.1", "recipe.gan_wieght"),
    ],
)
def test_unknown_key_is_named(override, key):
    with pytest.raises(ConfigError, match="unknown config key") as e:
        load_config(DIGITS_YAML, [override])
    assert key in str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.critic_steps=abc", "trainer.critic_steps"),
        ("trainer.critic_steps=1.5", "trainer.critic_steps"),
        ("trainer.critic_steps=true", "trainer.critic_steps"),
        ("trainer.generator.betas=[1]", "trainer.generator.betas"),
        ("trainer.generator.betas=[0.9, abc]", "trainer.generator.betas[1]"),
        ("trainer.generator.lr=fast", "trainer.generator.lr"),
        ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite"),
        ("trainer.progress_bar=2", "trainer.progress_bar"),
        ("trainer.generator=3", "trainer.generator"),
        ("recipe.gan=maybe", "recipe.gan"),
        ("run.output_dir=[a, b]", "run.output_dir"),
    ],
)
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS_YAML, [override])
    assert str(e.value).startswith(f"{key}:"), str(e.value)


@pytest.mark.parametrize(
    "override, key",
    [("student.num_steps=0", "student.num_steps"),
     ("trainer.gradient_accumulation_steps=0", "trainer.gradient_accumulation_steps")],
)
def test_out_of_range_value_is_named(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(DIGITS_YAML, [override])


def test_missing_teacher_folder_names_key_and_path(tmp_path):
    missing = tmp_path / "no_such_teacher"
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS_YAML, [f"teacher.path={missing}"])
    assert "teacher.path" in str(e.value) and str(missing) in str(e.value)


def test_builtin_teacher_resolves_to_shipped_assets():
    assert resolve_path("builtin:digits_teacher") == REPO / "distill" / "assets" / "digits_teacher"
    assert (resolve_path("builtin:digits_teacher") / "unet" / "config.json").is_file()
    with pytest.raises(ConfigError, match="teacher.path"):
        load_config(DIGITS_YAML, ["teacher.path=builtin:no_such_asset"])


def test_unknown_recipe_lists_available_ones():
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS_YAML, ["recipe.name=no_such_method"])
    msg = str(e.value)
    assert "recipe.name" in msg and "no_such_method" in msg and "'dmd2'" in msg


def test_config_without_recipe_section_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {max_steps: 3}\n")
    with pytest.raises(ConfigError, match="recipe.name"):
        load_config(path)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: {name: dmd2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_overrides_are_parsed_as_yaml_values(tmp_path):
    cfg = load_config(DIGITS_YAML, [
        "run.seed=7",
        "trainer.max_grad_norm=null",
        "trainer.progress_bar=false",
        "trainer.generator.betas=[0.5, 0.9]",
        "trainer.generator.lr=1e-4",  # YAML 1.1 reads this as a string; the float field must still take it
        "trainer.critic.lr=3.0e-5",
        "trainer.resume=latest",
        f"run.output_dir={tmp_path}/a=b",  # only the first "=" splits
        "recipe.max_t=0.5",
        "recipe.gan=true",
    ])
    assert cfg.run.seed == 7 and type(cfg.run.seed) is int
    assert cfg.trainer.max_grad_norm is None
    assert cfg.trainer.progress_bar is False
    assert cfg.trainer.generator == OptimizerConfig(lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, warmup_steps=0)
    assert cfg.trainer.critic.lr == 3e-5
    assert cfg.trainer.resume == "latest"
    assert cfg.run.output_dir == f"{tmp_path}/a=b"
    assert cfg.recipe.max_t == 0.5 and cfg.recipe.gan is True
    # Untouched keys keep the file's values.
    assert cfg.trainer.critic_steps == 2 and cfg.data.resolution == 16


def test_later_override_wins_and_bad_override_syntax_is_rejected():
    assert load_config(DIGITS_YAML, ["run.seed=1", "run.seed=2"]).run.seed == 2
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DIGITS_YAML, ["run.seed"])
    with pytest.raises(ConfigError, match="trainer.critic_steps is not a section"):
        load_config(DIGITS_YAML, ["trainer.critic_steps.x=1"])


def test_config_to_yaml_round_trips(tiny_teacher):
    cfg = load_config(DIGITS_YAML, [f"teacher.path={tiny_teacher}", "trainer.generator.betas=[0.5, 0.9]",
                                    "trainer.max_grad_norm=null", "recipe.gan=true", "recipe.min_t=0.1",
                                    "student.num_steps=3", "trainer.resume=latest", "teacher.prediction=null"])
    text = config_to_yaml(cfg)
    again = build_config(yaml.safe_load(text))
    assert again == cfg
    assert config_to_yaml(again) == text
    assert text.startswith("recipe:\n  name: dmd2\n")


def _cli() -> list[str]:
    exe = shutil.which("distill")
    return [exe] if exe else [sys.executable, "-m", "distill.cli"]


def test_cli_bad_key_exits_2_with_message(tmp_path):
    proc = subprocess.run([*_cli(), "train", str(DIGITS_YAML), "trainer.bad_key=1", f"run.output_dir={tmp_path}/run"],
                          check=False, capture_output=True, text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 2, proc.stderr
    assert "trainer.bad_key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_main_reports_config_errors(tmp_path, capsys):
    from distill.cli import main

    assert main(["train", str(DIGITS_YAML), "trainer.critic_steps=abc"]) == 2
    assert "trainer.critic_steps" in capsys.readouterr().err
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "config.yaml" in capsys.readouterr().err
