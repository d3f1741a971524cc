"""Files and folders a config names, checked before any model is loaded or folder written; values that mean
"never"; the error message for each input of issue 13.

Every broken file or folder is a named error (the file, and the key that named it), exit 2 from the CLI without a
traceback; an output folder that holds another run is refused unless trainer.resume is set; nothing untrained is
exported as a distilled model.
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from tiny import DIGITS_YAML, tiny_config, tiny_overrides, weights

from distill.base.errors import ConfigError, NonFiniteError
from distill.cli import main
from distill.config import config_to_yaml
from distill.training.checkpoints import list_checkpoints
from distill.training.files import check_checkpoint, check_run_dir, check_safetensors, check_teacher_folder
from distill.training.preflight import load_config
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def trained_run(tiny_teacher, tmp_path_factory, one_thread):
    """Two steps of the tiny run with a checkpoint after each."""
    run = tmp_path_factory.mktemp("trained") / "run"
    trainer = Trainer(tiny_config(tiny_teacher, run, "trainer.checkpoint_every=1"))
    trainer.train()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]
    return run


def copy_teacher(tiny_teacher, tmp_path):
    return shutil.copytree(tiny_teacher, tmp_path / "teacher")


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with a one-line error and no traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error: ") and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------------------
# The teacher folder
# ---------------------------------------------------------------------------------------------------------------


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda t: truncate(t / WEIGHTS), f"{WEIGHTS}' is truncated or corrupt"),
        (lambda t: truncate(t / WEIGHTS, keep=0.999), "is truncated or corrupt"),
        (lambda t: (t / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}..."), "truncated or corrupt"),
        (lambda t: (t / WEIGHTS).write_bytes(b"\xff" * 8 + b"x" * 100), "its header needs"),
        (lambda t: (t / WEIGHTS).unlink(), "the teacher's weights must be safetensors"),
        (lambda t: (t / "unet/config.json").unlink(), "no 'unet/config.json' or 'transformer/config.json'"),
        (lambda t: (t / "unet/config.json").write_text("{\"_class_name\": "), "unet/config.json' is not readable JSON"),
        (lambda t: (t / "unet/config.json").write_text("[1, 2]"), "must hold a JSON object"),
        (lambda t: (t / "unet/config.json").write_text("{}"), "names no diffusers class"),
        (lambda t: shutil.rmtree(t / "scheduler"), "scheduler_config.json' is missing"),
        (lambda t: (t / "scheduler/scheduler_config.json").write_text("{oops"), "scheduler_config.json' is not readable JSON"),
        (lambda t: (t / "scheduler/scheduler_config.json").write_text('{"_class_name": "NoSuchScheduler"}'),
         "cannot infer a noise process from scheduler class 'NoSuchScheduler'"),
    ],
    ids=["truncated-half", "truncated-last-bytes", "corrupt-header", "header-longer-than-file", "weights-missing",
         "unet-config-missing", "unet-config-corrupt", "unet-config-not-object", "unet-config-no-class",
         "scheduler-missing", "scheduler-corrupt", "scheduler-unknown"],
)
def test_broken_teacher_folder_is_named_at_load(tiny_teacher, tmp_path, breakage, expected):
    teacher = copy_teacher(tiny_teacher, tmp_path)
    breakage(teacher)
    with pytest.raises(ConfigError) as e:
        tiny_config(teacher, tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith("teacher.path: ") and expected in msg, msg
    assert not (tmp_path / "run").exists()


def test_truncated_teacher_weights_through_the_cli(tiny_teacher, tmp_path, capsys):
    teacher = copy_teacher(tiny_teacher, tmp_path)
    truncate(teacher / WEIGHTS)
    err = cli_error(capsys, ["train", str(DIGITS_YAML), *tiny_overrides(teacher, tmp_path / "run")])
    assert f"teacher.path: '{teacher / WEIGHTS}' is truncated or corrupt" in err
    assert not (tmp_path / "run").exists()


def test_folder_of_the_wrong_kind_as_teacher(tiny_teacher, trained_run, tmp_path):
    file = tmp_path / "weights.safetensors"
    shutil.copy(tiny_teacher / WEIGHTS, file)
    with pytest.raises(ConfigError, match="is a file; a teacher is a diffusers folder"):
        tiny_config(file, tmp_path / "run")
    with pytest.raises(ConfigError, match="is a distill run directory .*pipeline"):
        tiny_config(trained_run, tmp_path / "run")
    with pytest.raises(ConfigError, match="is a distill checkpoint .*trainer.resume"):
        tiny_config(trained_run / "checkpoints/step-00000002", tmp_path / "run")


def test_intact_files_pass_the_checks(tiny_teacher, trained_run):
    check_teacher_folder(tiny_teacher)
    check_safetensors(tiny_teacher / WEIGHTS)
    assert check_checkpoint(trained_run / "checkpoints/step-00000002") == 2


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: trainer.resume and distill export
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda c: (c / "trainer_state.json").unlink(), "is not a complete checkpoint"),
        (lambda c: (c / "trainer_state.json").write_text("{\"step\": "), "trainer_state.json' is not readable JSON"),
        (lambda c: (c / "trainer_state.json").write_text('{"step": -3}'), "'step' must be an integer >= 0, got -3"),
        (lambda c: truncate(c / "model.safetensors"), "model.safetensors' is truncated or corrupt"),
        (lambda c: (c / "model.safetensors").unlink(), "model.safetensors' is missing"),
        (lambda c: truncate(c / "model_1.safetensors", keep=0.9), "model_1.safetensors' is truncated or corrupt"),
        (lambda c: truncate(c / "optimizer.bin"), "optimizer.bin' is truncated or corrupt"),
        (lambda c: truncate(c / "random_states_0.pkl"), "random_states_0.pkl' is truncated or corrupt"),
    ],
    ids=["no-state", "state-corrupt", "state-negative-step", "generator-truncated", "generator-missing",
         "critic-truncated", "optimizer-truncated", "rng-truncated"],
)
def test_broken_resume_checkpoint_is_named_at_load(tiny_teacher, trained_run, tmp_path, breakage, expected):
    ckpt = shutil.copytree(trained_run / "checkpoints/step-00000002", tmp_path / "ckpt")
    breakage(ckpt)
    with pytest.raises(ConfigError) as e:
        tiny_config(tiny_teacher, tmp_path / "run", f"trainer.resume={ckpt}")
    msg = str(e.value)
    assert msg.startswith("trainer.resume: ") and expected in msg, msg


def test_resume_given_a_run_directory_says_how(tiny_teacher, trained_run, tmp_path):
    with pytest.raises(ConfigError, match="is a run directory: resume it with trainer.resume=latest"):
        tiny_config(tiny_teacher, tmp_path / "run", f"trainer.resume={trained_run}")


def test_resume_latest_with_a_truncated_checkpoint_fails_before_loading(tiny_teacher, trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    truncate(run / "checkpoints/step-00000002/model.safetensors")
    err = cli_error(capsys, ["train", str(DIGITS_YAML),
                             *tiny_overrides(tiny_teacher, run, "trainer.checkpoint_every=1", "run.max_steps=3",
                                             "trainer.resume=latest")])
    assert "trainer.resume: " in err and "step-00000002/model.safetensors' is truncated" in err
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]  # nothing written


def test_export_refuses_what_is_not_a_trained_run(trained_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    err = cli_error(capsys, ["export", str(tmp_path / "nowhere"), out])
    assert "run directory" in err and "does not exist" in err
    bare = tmp_path / "bare"
    bare.mkdir()
    assert "config.yaml' is missing" in cli_error(capsys, ["export", str(bare), out])

    run = shutil.copytree(trained_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints")
    err = cli_error(capsys, ["export", str(run), out])
    assert "no complete checkpoint" in err and "checkpoint_every" in err

    run = shutil.copytree(trained_run, tmp_path / "run0")
    state = run / "checkpoints/step-00000002/trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": 0}))
    err = cli_error(capsys, ["export", str(run), out])
    assert "is at step 0" in err and "untrained" in err

    truncate(run / "checkpoints/step-00000001/model.safetensors")
    err = cli_error(capsys, ["export", str(run), out, "--checkpoint", str(run / "checkpoints/step-00000001")])
    assert err.startswith("distill: error: --checkpoint: ") and "model.safetensors' is truncated" in err

    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("batch_size: 4", "batch_size: 0"))
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints", dirs_exist_ok=True)
    err = cli_error(capsys, ["export", str(run), out])
    assert f"{run / 'config.yaml'}: data.batch_size: must be an integer >= 1, got 0" in err
    assert not (tmp_path / "out").exists()


def test_trainer_refuses_to_export_an_untrained_student(tiny_teacher, tmp_path):
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path / "run"))
    with pytest.raises(ConfigError, match="untrained student"):
        trainer.export(tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()


def test_export_of_a_run_whose_resume_checkpoint_was_pruned(tiny_teacher, trained_run, tmp_path, capsys):
    # A resumed run's config.yaml names a checkpoint that keep_checkpoints may have deleted since: export ignores it.
    run = shutil.copytree(trained_run, tmp_path / "run")
    text = (run / "config.yaml").read_text().replace("resume: null", f"resume: {tmp_path / 'pruned'}")
    (run / "config.yaml").write_text(text)
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model_index.json").is_file()


# ---------------------------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------------------------


def test_output_dir_with_another_run_is_refused_untouched(tiny_teacher, trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra in ([], ["student.num_steps=2"]):  # the same config, or another: its checkpoints are not this run's
        err = cli_error(capsys, ["train", str(DIGITS_YAML),
                                 *tiny_overrides(tiny_teacher, run, "trainer.checkpoint_every=1", *extra)])
        assert f"run.output_dir: '{run}' already holds another run: checkpoints step-00000001, step-00000002;" in err
        assert "trainer.resume=latest" in err and "choose another run.output_dir" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_output_dir_config_without_checkpoints(tiny_teacher, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(tiny_teacher, run)
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    check_run_dir(cfg)  # the same run again (it never checkpointed): allowed, it rewrites the same files
    other = tiny_config(tiny_teacher, run, "run.seed=5", "data.batch_size=2")
    with pytest.raises(ConfigError, match=r"another run: a config.yaml that differs in run.seed, data.batch_size; continue"):
        check_run_dir(other)
    check_run_dir(tiny_config(tiny_teacher, run, "run.seed=5", "trainer.resume=latest"))  # resume: allowed
    (run / "config.yaml").unlink()
    (run / "notes.txt").write_text("a folder with other files is not a run")
    check_run_dir(other)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match="run.output_dir: .* is a file, not a folder"):
        check_run_dir(tiny_config(tiny_teacher, file))


def test_output_dir_with_another_run_resumes_when_asked_and_says_so(tiny_teacher, trained_run, tmp_path, caplog):
    run = shutil.copytree(trained_run, tmp_path / "run")
    trainer = Trainer(tiny_config(tiny_teacher, run, "trainer.checkpoint_every=1", "run.max_steps=3",
                                  "trainer.resume=latest"))
    with caplog.at_level(logging.INFO, logger="distill"):
        trainer.train()
    text = caplog.text
    assert f"resumed from {run / 'checkpoints/step-00000002'} at step 2" in text
    assert "held a config.yaml that differs in run.max_steps; replaced by this run's" in text
    assert trainer.step == 3 and load_config(run / "config.yaml").run.max_steps == 3


# ---------------------------------------------------------------------------------------------------------------
# Values that mean "never", "none" or "at once"
# ---------------------------------------------------------------------------------------------------------------


def test_checkpoint_every_and_sample_every_zero_mean_never(tiny_teacher, tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_config(tiny_teacher, run, "trainer.checkpoint_every=0", "trainer.sample_every=0",
                        "run.max_steps=3")).train()
    assert not (run / "checkpoints").exists() and not (run / "samples").exists()
    assert (run / "config.yaml").is_file()
    run = tmp_path / "run2"  # the positive control: 2 writes at steps 2 and 3 (the last update)
    Trainer(tiny_config(tiny_teacher, run, "trainer.checkpoint_every=2", "trainer.sample_every=2",
                        "run.max_steps=3")).train()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000003"]
    assert [p.name for p in sorted((run / "samples").iterdir())] == ["step_00000002.png"]


def test_max_consecutive_nonfinite_zero_stops_at_the_first(monkeypatch, tiny_teacher, tmp_path):
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path / "run", "trainer.max_consecutive_nonfinite=0",
                                  "run.max_steps=4"))
    original = trainer.recipe.generator_loss
    monkeypatch.setattr(trainer.recipe, "generator_loss",
                        lambda nets, batch, step: (original(nets, batch, step)[0] * (math.nan if step == 1 else 1.0), {}))
    with pytest.raises(NonFiniteError, match="max_consecutive_nonfinite=0"):
        trainer.train()
    trainer.accelerator.end_training()
    assert trainer.step == 1 and trainer.nonfinite_skipped == 1


def test_ema_decay_zero_means_the_raw_weights(tiny_teacher, tmp_path):
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path / "run", "trainer.ema_decay=0"))
    trainer.train_step()
    trainer.train_step()
    w = weights(trainer)
    raw = [v for v in w["generator"].values()]
    assert all(torch.equal(r, e) for r, e in zip(raw, w["ema"].values()))


def test_null_max_grad_norm_does_not_clip(monkeypatch, tiny_teacher, tmp_path):
    # The gradient the optimizer steps with: its norm as measured (null) or clipped to max_grad_norm.
    def stepped_norm(norm: str) -> tuple[float, float]:
        trainer = Trainer(tiny_config(tiny_teacher, tmp_path / norm, f"trainer.max_grad_norm={norm}"))
        seen = []
        step = trainer.generator_opt.step

        def recording_step(*args, **kwargs):
            grads = [p.grad for p in trainer.recipe.generator.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
            return step(*args, **kwargs)

        monkeypatch.setattr(trainer.generator_opt, "step", recording_step)
        logs = trainer.train_step()
        return logs["generator/grad_norm"], seen[0]

    measured, stepped = stepped_norm("null")
    assert stepped == pytest.approx(measured, rel=1e-5) and measured > 1e-3
    measured, stepped = stepped_norm("1e-4")
    assert measured > 1e-3 and stepped == pytest.approx(1e-4, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# The inputs of issue 13, each refused with its message
# ---------------------------------------------------------------------------------------------------------------

ISSUE_13 = [
    ("trainer.max_grad_norm=-1", "trainer.max_grad_norm: must be a number > 0, or null, got -1"),
    ("recipe.dmd_weight=-1", "recipe.dmd_weight: must be a number > 0, got -1"),
    ("run.output_dir=", "run.output_dir: must be a non-empty string, got ''"),
    ("trainer.log_every=0", "trainer.log_every: must be an integer >= 1, got 0"),
    ("data.batch_size=0", "data.batch_size: must be an integer >= 1, got 0"),
    ("trainer.generator.lr=-1e-4", "trainer.generator.lr: must be a number in (0, 1], got -0.0001"),
    ("data.resolution=7", "data.resolution: must be an integer in [8, 1024] and a multiple of 4, got 7"),
    ("recipe.min_t=0.99", "recipe.min_t: must be < recipe.max_t (0.98), got 0.99"),
    ("trainer.ema_decay=1.5", "trainer.ema_decay: must be a number in [0, 1), got 1.5"),
    ("run.max_steps=0", "run.max_steps: must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("override, message", ISSUE_13, ids=[o for o, _ in ISSUE_13])
def test_issue_13_inputs(override, message, tmp_path, capsys):
    extra = [] if override.startswith("run.output_dir") else [f"run.output_dir={tmp_path / 'run'}"]
    with pytest.raises(ConfigError) as e:  # first in-process: were it accepted, the CLI below would train
        load_config(DIGITS_YAML, [*extra, override])
    assert str(e.value) == message
    err = cli_error(capsys, ["train", str(DIGITS_YAML), *extra, override])
    assert err.strip() == f"distill: error: {message}"
    assert not (tmp_path / "run").exists()
