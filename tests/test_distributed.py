"""Two CPU processes over gloo under `accelerate launch`: training, one consistent checkpoint, resume."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import DIGITS_YAML, REPO, subprocess_env, tiny_overrides

from distill.training.checkpoints import list_checkpoints

TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *args]
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def ddp_run(tiny_teacher, tmp_path_factory):
    """Two steps under 2 processes with `distill.cli train`, then resumed to four steps (each rank dumps what it
    holds at the end, see tests/tiny.py)."""
    run = tmp_path_factory.mktemp("ddp")
    common = ("trainer.checkpoint_every=2", "trainer.ema_decay=0.9")
    first = launch("-m", "distill.cli", "train", str(DIGITS_YAML),
                   *tiny_overrides(tiny_teacher, run, *common, "run.max_steps=2"))
    after_first = [p.name for p in list_checkpoints(run)]
    step2 = {name: load_file(run / "checkpoints/step-00000002" / name)
             for name in ("model.safetensors", "model_1.safetensors")}
    launch(str(REPO / "tests" / "tiny.py"), str(run / "dump"), str(DIGITS_YAML),
           *tiny_overrides(tiny_teacher, run, *common, "run.max_steps=4", "trainer.resume=latest"))
    ranks = [torch.load(run / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return {"run": run, "stdout": first.stdout, "after_first": after_first, "step2": step2, "ranks": ranks,
            "teacher": tiny_teacher}


def test_ddp_writes_one_consistent_checkpoint(ddp_run):
    run = ddp_run["run"]
    assert ddp_run["after_first"] == ["step-00000002"]
    assert ddp_run["stdout"].count("run directory:") == 1  # only the main process reports
    ckpt = run / "checkpoints" / "step-00000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    states = []
    for rank in (0, 1):
        states.append(torch.load(ckpt / f"random_states_{rank}.pkl", weights_only=False))
    assert not (ckpt / "random_states_2.pkl").exists()
    # Each rank saved its own RNG state (the step seed includes the rank), not a copy of rank 0's.
    assert not torch.equal(states[0]["torch_manual_seed"], states[1]["torch_manual_seed"])
    teacher = load_file(ddp_run["teacher"] / "unet" / "diffusion_pytorch_model.safetensors")
    for name in ("model.safetensors", "model_1.safetensors"):  # generator, critic
        saved = {k.split("model.", 1)[1]: v for k, v in ddp_run["step2"][name].items()}  # (denoiser.)model.<unet key>
        assert saved.keys() == teacher.keys()
        assert any(not torch.equal(saved[k], v) for k, v in teacher.items()), f"{name} did not train"
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_ddp_resume_keeps_ranks_in_sync(ddp_run):
    run = ddp_run["run"]
    r0, r1 = ddp_run["ranks"]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps_run"] == r1["steps_run"] == [2, 3]  # both resumed from step 2
    assert [p.name for p in list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    for net in ("generator", "critic", "ema"):
        assert r0[net].keys() == r1[net].keys()
        differ = [k for k in r0[net] if not torch.equal(r0[net][k], r1[net][k])]
        assert not differ, f"{net} differs between ranks: {differ[:3]}"
    step4 = load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
    assert step4.keys() == r0["generator"].keys()
    assert all(torch.equal(step4[k], r0["generator"][k]) for k in step4)
    assert any(not torch.equal(step4[k], ddp_run["step2"]["model.safetensors"][k]) for k in step4)



def test_a_two_process_checkpoint_resumes_on_one_process_and_says_so(ddp_run, tmp_path):
    """The checkpoint of the 2-process run, resumed by one process: it trains on, and the log says that the global
    batch changed (8 -> 4 samples per update), instead of changing it silently."""
    run = ddp_run["run"]
    ckpt = run / "checkpoints" / "step-00000004"
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    cmd = [sys.executable, "-m", "distill.cli", "train", str(DIGITS_YAML),
           *tiny_overrides(ddp_run["teacher"], tmp_path, "run.max_steps=5", "trainer.checkpoint_every=5",
                           "trainer.ema_decay=0.9", f"trainer.resume={ckpt}")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 1 process(es); it was written by 2: the global batch changes from 8 to 4 samples" in proc.stderr
    state = json.loads((tmp_path / "checkpoints" / "step-00000005" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["world_size"] == 1 and state["global_batch"] == 4


def test_ddp_with_one_base_in_memory(tiny_teacher, tmp_path):
    """Student and fake score as adapters on one frozen base, each wrapped by DDP on its own (the base is in
    neither wrapper): both ranks end with the same adapters, GAN head and EMA, and the adapters trained."""
    yaml = REPO / "recipes" / "digits/dmd2_adapters.yaml"
    overrides = tiny_overrides(tiny_teacher, tmp_path, "run.max_steps=2", "recipe.lora_rank=4", "recipe.gan=true",
                               "trainer.generator.lr=1e-3", "trainer.critic.lr=1e-3")
    launch(str(REPO / "tests" / "tiny.py"), str(tmp_path / "dump"), str(yaml), *overrides)
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["steps_run"] == r1["steps_run"] == [0, 1]
    for net in ("generator", "critic", "ema"):
        differ = [k for k in r0[net] if not torch.equal(r0[net][k], r1[net][k])]
        assert not differ, f"{net} differs between ranks: {differ[:3]}"
    assert r0["generator"] and all("lora" in k for k in r0["generator"])
    lora_b = [v for k, v in r0["generator"].items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: non-zero means the student trained


def test_ddp_with_gradient_accumulation(tiny_teacher, tmp_path):
    """Micro-batches before the last accumulate locally (accelerate's `no_sync`, entered afresh for the loss and for
    its backward), the last one all-reduces: after two updates of two micro-batches each, both ranks hold the
    same networks and EMA."""
    overrides = tiny_overrides(tiny_teacher, tmp_path, "run.max_steps=2", "trainer.gradient_accumulation_steps=2")
    launch(str(REPO / "tests" / "tiny.py"), str(tmp_path / "dump"), str(DIGITS_YAML), *overrides)
    r0, r1 = (torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == 2 and r0["steps_run"] == r1["steps_run"] == [0, 1]
    for net in ("generator", "critic", "ema"):
        assert r0[net], f"rank 0 dumped no {net}"
        differ = [k for k in r0[net] if not torch.equal(r0[net][k], r1[net][k])]
        assert not differ, f"{net} differs between ranks: {differ[:3]}"


def test_ddp_encodes_the_prompts_once(tmp_path):
    """Two processes on a text teacher: the main process encodes the prompts and writes the cache, the other
    process reads that file (no rank encodes them again, and no two ranks write one temporary file)."""
    import yaml
    from tiny_pipelines import BUILDERS, PROMPTS, write_prompts

    teacher = BUILDERS["sd15"](tmp_path / "sd15")
    cache = tmp_path / "cache"
    cfg = {"recipe": {"name": "dmd2"}, "teacher": {"path": str(teacher)},
           "run": {"output_dir": str(tmp_path / "run"), "max_steps": 1},
           "data": {"name": "prompts", "prompts": str(write_prompts(tmp_path / "prompts.txt")),
                    "cache_dir": str(cache), "resolution": 16, "batch_size": 2},
           "trainer": {"progress_bar": False, "checkpoint_every": 0, "sample_every": 0}, "export": {"at_end": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = launch("-m", "distill.cli", "train", str(tmp_path / "config.yaml"))
    log = proc.stdout + proc.stderr
    assert log.count(f"prompt embeddings: encoded {len(PROMPTS)} prompts") == 1, log[-3000:]
    assert log.count(f"prompt embeddings: read {len(PROMPTS)} prompts") == 1, log[-3000:]
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 1 and files[0].startswith("prompts-") and files[0].endswith(".safetensors"), files
