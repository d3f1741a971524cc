"""FSDP2 over two CPU processes (gloo) under `accelerate launch`: `trainer.parallel: fsdp2` shards every network,
trains as one process does on the same global batch, writes sharded safetensors checkpoints that resume on two
processes and on one, survives a kill, and exports the same stock pipeline (docs/scale.md).

The same global batch: two processes with one micro-batch each draw the samples and noise that one process with
two micro-batches draws (distill.base.seeding.MicroBatchRNG), so their runs differ only by the order of float sums.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import _free_port, launch
from tiny import DIGITS_YAML, REPO, subprocess_env, tiny_overrides

from distill.training.checkpoints import list_checkpoints
from distill.training.files import check_checkpoint

#: largest difference allowed between a 2-process FSDP2 run and a 1-process run on the same global batch: the
#: gradient sums are taken in another order (reduce-scatter vs. accumulation), nothing else differs
TOL = 2e-5
DUMP = str(REPO / "tests" / "tiny.py")
SCM_YAML = REPO / "recipes" / "digits" / "scm.yaml"
RCM_YAML = REPO / "recipes" / "digits" / "rcm.yaml"
ADAPTERS_YAML = REPO / "recipes" / "digits" / "dmd2_adapters.yaml"


def one_process(dump: Path, yaml: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, DUMP, str(dump), str(yaml), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def dumped(run: Path, rank: int = 0) -> dict:
    return torch.load(run / "dump" / f"rank{rank}.pt", weights_only=False)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a, "the two runs hold different tensors"
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_run(two: dict, one: dict, tol: float = TOL) -> None:
    """A 2-process run against a 1-process run of the same global batch: weights, EMA and every logged loss."""
    assert two["steps_run"] == one["steps_run"]
    for net in ("generator", "critic", "ema"):
        if one[net]:
            assert max_diff(two[net], one[net]) <= tol, net
    for a, b in zip(two["logs"], one["logs"], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


@pytest.fixture(scope="module")
def dmd2_runs(tiny_teacher, tmp_path_factory):
    """DMD2 on FSDP2: 2 processes x 1 micro-batch to step 4 (checkpoints at 2 and 4, export), and 1 process x 2
    micro-batches to step 4; then the 2-process step-2 checkpoint resumed to step 4 on 2 processes and on 1."""
    root = tmp_path_factory.mktemp("fsdp")
    common = ("trainer.parallel=fsdp2", "run.max_steps=4", "trainer.ema_decay=0.9")
    two, one, back2, back1 = (root / n for n in ("two", "one", "resumed_on_two", "resumed_on_one"))
    log2 = launch(DUMP, str(two / "dump"), str(DIGITS_YAML),
                  *tiny_overrides(tiny_teacher, two, *common, "trainer.checkpoint_every=2",
                                  "export.at_end=true")).stderr
    one_process(one / "dump", DIGITS_YAML, *tiny_overrides(tiny_teacher, one, *common, "export.at_end=true",
                                                           "trainer.gradient_accumulation_steps=2"))
    ckpt = two / "checkpoints" / "step-00000002"
    launch(DUMP, str(back2 / "dump"), str(DIGITS_YAML),
           *tiny_overrides(tiny_teacher, back2, *common, f"trainer.resume={ckpt}"))
    log1 = one_process(back1 / "dump", DIGITS_YAML,
                       *tiny_overrides(tiny_teacher, back1, *common, f"trainer.resume={ckpt}",
                                       "trainer.gradient_accumulation_steps=2")).stderr
    return {"root": root, "two": two, "one": one, "back2": back2, "back1": back1, "log1": log1, "log2": log2,
            "teacher": tiny_teacher, "common": common}


def test_fsdp2_ranks_agree_and_equal_one_process_on_the_same_global_batch(dmd2_runs):
    r0, r1 = dumped(dmd2_runs["two"], 0), dumped(dmd2_runs["two"], 1)
    assert r0["world_size"] == 2 and r0["steps_run"] == [0, 1, 2, 3]
    for net in ("generator", "critic", "ema"):
        assert max_diff(r0[net], r1[net]) == 0.0, f"{net} differs between ranks"
    one = dumped(dmd2_runs["one"])
    assert one["world_size"] == 1
    assert_same_run(r0, one)
    teacher = load_file(dmd2_runs["teacher"] / "unet" / "diffusion_pytorch_model.safetensors")
    trained = {k.split("model.", 1)[1]: v for k, v in r0["generator"].items()}
    assert any(not torch.equal(trained[k], v) for k, v in teacher.items()), "the student did not train"


def test_the_second_process_builds_on_the_meta_device_and_receives_the_same_weights(dmd2_runs, tmp_path):
    """trainer.fsdp.meta_init (the default): only the main process loads the teacher and builds the networks with
    weights; the other receives its shards. The run is the one in which every process builds its own, bit for bit."""
    assert "the other 1 process(es) built them on the meta device and received their shards" in dmd2_runs["log2"]
    every = tmp_path / "every"
    log = launch(DUMP, str(every / "dump"), str(DIGITS_YAML),
                 *tiny_overrides(dmd2_runs["teacher"], every, *dmd2_runs["common"],
                                 "trainer.fsdp.meta_init=false")).stderr
    assert "meta device" not in log
    for rank in (0, 1):
        meta, built = dumped(dmd2_runs["two"], rank), dumped(every, rank)
        for net in ("generator", "critic", "ema"):
            assert max_diff(meta[net], built[net]) == 0.0, (rank, net)


def test_a_meta_built_network_takes_the_main_layout_or_names_what_differs():
    from torch import nn

    from distill.training.parallel import MainWeights

    main = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    main[1].to(torch.float64)
    layout = [(q, tuple(t.shape), str(t.dtype).removeprefix("torch."))
              for q, t in ((s[0], s[1]._parameters[s[3]]) for s in MainWeights([("net", main)], True).slots)]
    with torch.device("meta"):
        other = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    weights = MainWeights([("net", other)], False)
    weights._take_layout(layout)  # the main's dtypes, taken on the meta device
    assert [p.dtype for p in other.parameters()] == [torch.float32] * 2 + [torch.float64] * 2
    with torch.device("meta"):
        wrong = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5))
    with pytest.raises(RuntimeError, match=r"built net\.0\.weight \(5, 3\) on the meta device where the main "
                                           r"process has net\.0\.weight \(4, 3\).*meta_init=false"):
        MainWeights([("net", wrong)], False)._take_layout(layout)


def test_fsdp2_checkpoints_are_sharded_safetensors(dmd2_runs):
    ckpt = dmd2_runs["two"] / "checkpoints" / "step-00000002"
    assert check_checkpoint(ckpt) == 2
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == 2 and state["global_batch"] == 8
    assert state["ema"]["optimization_step"] == 2
    files = sorted(p.name for p in ckpt.rglob("*") if p.is_file())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == 2 and files == sorted(shards + ["trainer_state.json"]), files  # no pickle anywhere
    names = set()
    for f in (ckpt / "sharded").glob("*.safetensors"):
        names |= set(load_file(f))
    for prefix in ("generator.model.", "generator.optim.", "critic.model.", "critic.optim.", "ema."):
        assert any(n.startswith(prefix) for n in names), prefix
    assert not list((dmd2_runs["two"] / "checkpoints").glob(".tmp-*"))


def test_a_sharded_checkpoint_resumes_exactly_on_two_processes_and_on_one(dmd2_runs):
    uninterrupted = dumped(dmd2_runs["two"])
    on_two = dumped(dmd2_runs["back2"])
    assert on_two["steps_run"] == [2, 3]
    for net in ("generator", "critic", "ema"):
        assert max_diff(on_two[net], uninterrupted[net]) == 0.0, net  # same processes, same sums: bit-exact
    on_one = dumped(dmd2_runs["back1"])
    assert on_one["steps_run"] == [2, 3] and on_one["world_size"] == 1
    assert_same_run({**uninterrupted, "steps_run": [2, 3], "logs": uninterrupted["logs"][2:]}, on_one)
    assert "it was written by 2: the global batch stays 8 samples per update" in dmd2_runs["log1"]


def test_the_export_of_a_sharded_run_is_the_one_process_pipeline(dmd2_runs):
    two, one = dmd2_runs["two"] / "pipeline", dmd2_runs["one"] / "pipeline"
    assert json.loads((two / "model_index.json").read_text()) == json.loads((one / "model_index.json").read_text())
    a = load_file(two / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(one / "unet" / "diffusion_pytorch_model.safetensors")
    assert max_diff(a, b) <= TOL
    trained = dumped(dmd2_runs["two"])["generator"]  # the export is not the raw student: it is the EMA one
    raw = {k.split("model.", 1)[1]: v for k, v in trained.items() if k.split("model.", 1)[1] in a}
    assert raw.keys() == a.keys()
    assert max((a[k] - raw[k]).abs().max().item() for k in a if a[k].shape == raw[k].shape) > 0


@pytest.mark.parametrize("yaml,extra,tol", [
    (SCM_YAML, ("student.num_steps=1",), TOL),  # the JVP path through sharded networks
    pytest.param(RCM_YAML, ("student.num_steps=1",), TOL, marks=pytest.mark.slow),  # the JVP and a fake score
    # one base: Adam's normalised step turns float-order differences of near-zero LoRA gradients into differences
    # of a few percent of one step (lr 1e-3 here)
    pytest.param(ADAPTERS_YAML, ("recipe.lora_rank=4", "trainer.generator.lr=1e-3", "trainer.critic.lr=1e-3"), 1e-4,
                 marks=pytest.mark.slow),
], ids=["scm", "rcm", "dmd2_adapters"])
def test_fsdp2_equals_one_process(yaml, extra, tol, tiny_teacher, tmp_path):
    common = ("trainer.parallel=fsdp2", "run.max_steps=2", "trainer.ema_decay=0.5", *extra)
    launch(DUMP, str(tmp_path / "two" / "dump"), str(yaml), *tiny_overrides(tiny_teacher, tmp_path / "two", *common))
    one_process(tmp_path / "one" / "dump", yaml,
                *tiny_overrides(tiny_teacher, tmp_path / "one", *common, "trainer.gradient_accumulation_steps=2"))
    r0, r1, one = dumped(tmp_path / "two", 0), dumped(tmp_path / "two", 1), dumped(tmp_path / "one")
    for net in ("generator", "critic", "ema"):
        if one[net]:
            assert max_diff(r0[net], r1[net]) == 0.0, f"{net} differs between ranks"
    assert_same_run(r0, one, tol)
    moved = [k for k in r0["generator"] if "lora_B" in k or "lora" not in k]
    assert any(r0["generator"][k].abs().max() > 0 for k in moved)


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow  # about a minute: two launches and a run killed mid-way
def test_a_killed_fsdp2_run_resumes_from_its_last_complete_checkpoint(tiny_teacher, tmp_path):
    """kill -9 of both processes while they train and checkpoint every update: every checkpoint left is complete,
    and `trainer.resume=latest` carries on from the newest one."""
    overrides = tiny_overrides(tiny_teacher, tmp_path, "trainer.parallel=fsdp2", "run.max_steps=100000",
                               "trainer.checkpoint_every=1", "trainer.keep_checkpoints=3")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "distill.cli", "train", str(DIGITS_YAML), *overrides]
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            done = list_checkpoints(tmp_path)
            if done and int(done[-1].name.split("-")[1]) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
    finally:  # the launcher and its workers (torch's elastic agent puts those in sessions of their own)
        for pid in _processes_naming(str(tmp_path)):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 30
        while _processes_naming(str(tmp_path)) and time.time() < deadline:
            time.sleep(0.1)
        assert not _processes_naming(str(tmp_path)), "a training process survived SIGKILL"
    left = list_checkpoints(tmp_path)
    assert left, "no checkpoint before the kill"
    for ckpt in left:
        check_checkpoint(ckpt)  # complete: a partial one is a hidden .tmp-* folder, never listed
    last = int(left[-1].name.split("-")[1])
    resumed = tmp_path / "resumed"
    launch(DUMP, str(resumed / "dump"), str(DIGITS_YAML),
           *tiny_overrides(tiny_teacher, tmp_path, "trainer.parallel=fsdp2", f"run.max_steps={last + 2}",
                           "trainer.checkpoint_every=1", "trainer.keep_checkpoints=3", "trainer.resume=latest"))
    assert dumped(resumed)["steps_run"] == [last, last + 1]
    assert int(list_checkpoints(tmp_path)[-1].name.split("-")[1]) == last + 2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_the_shipped_accelerate_configs_load(tmp_path):
    """recipes/accelerate/*.yaml are accelerate launch configs accelerate reads, and none asks for its FSDP plugin
    (distill shards itself: trainer.parallel)."""
    from accelerate.commands.config.config_args import ClusterConfig

    files = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
    assert [f.name for f in files] == ["cpu_two_processes.yaml", "one_node.yaml", "two_nodes.yaml"]
    for f in files:
        cfg = ClusterConfig.from_yaml_file(f)
        assert cfg.distributed_type in ("MULTI_GPU", "MULTI_CPU") and cfg.num_processes >= 2, f.name


def test_accelerates_fsdp_plugin_is_refused_by_name(tiny_teacher, tmp_path, monkeypatch):
    from tiny import tiny_config

    from distill.base.errors import ConfigError
    from distill.training.trainer import Trainer

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="--use_fsdp .* set trainer.parallel=fsdp2"):
        Trainer(tiny_config(tiny_teacher, tmp_path))


def test_the_cpu_launch_config_trains_with_fsdp2(tiny_teacher, tmp_path):
    """The shipped 2-process CPU launch file, as its header says."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes" / "accelerate" / "cpu_two_processes.yaml"), "--main_process_port",
           str(_free_port()), "-m", "distill.cli", "train", str(DIGITS_YAML),
           *tiny_overrides(tiny_teacher, tmp_path, "trainer.parallel=fsdp2", "run.max_steps=1")]
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FSDP2: 3 network(s) sharded over 2 process(es)" in proc.stderr


def test_distill_export_of_a_sharded_checkpoint_on_one_process(dmd2_runs, tmp_path):
    """`distill export` reads the 2-process run's last sharded checkpoint on one process and writes the pipeline
    the run itself exported at its end, bit for bit."""
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "export", str(dmd2_runs["two"]), str(out)],
                          capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(dmd2_runs["two"] / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert max_diff(a, b) == 0.0
