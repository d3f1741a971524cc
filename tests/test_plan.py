"""`distill plan` (distill/plan.py): a fake-tensor trace of one training step against the same tracker on the
trainer's real step, the exact counts, the shipped model configs against their published parameter counts, the
batches' shapes against the pipelines' own prompt embeddings, and the command.

The default run traces one small config both ways (tens of seconds); the whole matrix of issue 21 (DMD2 and sCM,
full and adapters, with and without gradient checkpointing, the text teachers) and the big model configs are
marked slow: `python -m pytest -m slow tests/test_plan.py`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from distill.base.errors import ConfigError
from distill.base.paths import ASSETS
from distill.plan import (
    MODEL_CONFIGS,
    GiB,
    StepMemTracker,
    adamw_bytes,
    choose_model,
    folder_conditions,
    load_plan_config,
    model_config_names,
    peak_snapshot,
    plan_config,
    read_model_config,
    tensor_bytes,
    traced_trainer_step,
)

#: the shipped model configs' networks: (parameters counted by building them, the published size, tolerance).
#: SD3.5 Medium's "2.5B" counts its 384 x 384 x 1536 positional-embedding table, a buffer in diffusers
#: (226,492,416 values); Wan 2.1's "1.3B" and "14B" are nominal (the same configs count 1.42B and 14.29B).
PARAMETERS = {
    "sd15": (859_520_964, 860e6, 0.01),
    "sdxl": (2_567_463_684, 2.57e9, 0.01),
    "sd3_medium": (2_028_328_000, 2.0e9, 0.02),
    "sd35_medium": (2_243_171_520, 2.5e9 - 226_492_416, 0.02),
    "flux_dev": (11_901_408_320, 11.9e9, 0.01),
    "wan_1_3b": (1_418_996_800, 1.3e9, 0.10),
    "wan_14b": (14_288_491_584, 14e9, 0.03),
}

#: a small step of the digits teacher (8 x 8 pixels, two samples per micro-batch): seconds to trace either way
SMALL = ["data.batch_size=2", "data.resolution=8"]
#: the slow matrix's step: 8 samples of 16 x 16 pixels, where activations weigh (gradient checkpointing shows)
MATRIX = ["data.batch_size=8"]


def test_every_shipped_model_config_is_checked_here():
    assert sorted(PARAMETERS) == model_config_names()


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_model_config_builds_with_its_published_parameter_count(name):
    import diffusers

    model = read_model_config(name)
    with torch.device("meta"):
        net = getattr(diffusers, model.network["_class_name"]).from_config(model.network)
    counted, published, tolerance = PARAMETERS[name]
    assert sum(p.numel() for p in net.parameters()) == counted == model.parameters
    assert abs(counted / published - 1) < tolerance, (name, counted, published)


def test_a_config_names_its_model_by_its_teacher():
    cfg = load_plan_config("sdxl/dmd2.yaml")
    assert choose_model(cfg, None)[0].name == "sdxl"  # its teacher.path is a hub id listed by sdxl.json
    assert choose_model(cfg, "flux_dev")[0].name == "flux_dev"  # --model wins
    model, folder = choose_model(load_plan_config("digits/dmd2.yaml"), None)
    assert model is None and folder == ASSETS / "digits_teacher"  # a folder here: its own config.json files
    with pytest.raises(ConfigError, match="teacher.path.*--model NAME"):
        choose_model(load_plan_config("sdxl/dmd2.yaml", ["teacher.path=someone/unknown-model"]), None)
    with pytest.raises(ConfigError, match="--model: no model config 'sdxxl'"):
        choose_model(cfg, "sdxxl")


def test_a_model_config_file_with_unknown_keys_is_refused(tmp_path):
    bad = tmp_path / "mine.json"
    bad.write_text(json.dumps({**json.loads((MODEL_CONFIGS / "sd15.json").read_text()), "resolutoin": 512}))
    with pytest.raises(ConfigError, match="mine.json.*unknown model config keys \\['resolutoin'\\]"):
        read_model_config(str(bad))


# ---------------------------------------------------------------------------------------------------------------
# The plan against the trainer's real step, traced by the same tracker
# ---------------------------------------------------------------------------------------------------------------


def measured(config: str, overrides: list[str], tmp_path):
    """(the trainer, the peak of its second step traced on this CPU)."""
    from distill.training.preflight import load_config
    from distill.training.trainer import Trainer

    cfg = load_config(config, [f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                               "trainer.sample_every=0", "trainer.checkpoint_every=0", *overrides])
    trainer = Trainer(cfg)
    return trainer, traced_trainer_step(trainer)


def compare(config: str, overrides: list[str], tmp_path):
    plan = plan_config(load_plan_config(config, overrides), device="cpu")
    trainer, real = measured(config, overrides, tmp_path)
    print(f"{config} {overrides}: plan {plan.traced_peak} B, traced CPU step {real['Total']} B "
          f"({plan.traced_peak / real['Total'] - 1:+.2%})")
    assert abs(plan.traced_peak / real["Total"] - 1) < 0.10
    return plan, real, trainer


@pytest.fixture(scope="module")
def digits_dmd2(tmp_path_factory, one_thread):
    """DMD2 on the digits teacher (critic_steps 2: the plan traces one critic update), planned and run."""
    return compare("digits/dmd2.yaml", SMALL, tmp_path_factory.mktemp("dmd2"))


def test_the_plan_of_a_step_is_its_traced_peak(digits_dmd2):
    plan, real, _ = digits_dmd2
    assert plan.traced_peak == pytest.approx(real["Total"], rel=1e-6)  # within bytes: the same storages
    assert plan.peak == plan.traced_peak  # world size 1: nothing added or taken away


def test_at_ema_decay_0_no_average_is_kept_in_the_plan_or_the_step(tmp_path, one_thread):
    plan, real, trainer = compare("digits/dmd2.yaml", [*SMALL, "trainer.ema_decay=0"], tmp_path)
    assert plan.traced_peak == pytest.approx(real["Total"], rel=1e-6)
    roles = {r.role: r for r in plan.roles}
    assert roles["EMA of the generator"].parameters == 0
    assert plan.persistent == sum(r.parameters + r.optimizer for r in plan.roles) + plan.buffers


def test_parameter_and_optimizer_bytes_are_exact_counts(digits_dmd2):
    plan, real, trainer = digits_dmd2
    roles = {r.role: r for r in plan.roles}
    # what the trainer holds: its networks' parameters, its optimizers' states, its EMA's averages
    r = trainer.recipe
    for name, module, opt in (("generator", r.generator, trainer.generator_opt),
                              ("critic", r.critic, trainer.critic_opt)):
        assert roles[name].parameters == sum(p.numel() * p.element_size() for p in module.parameters())
        states = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
        assert roles[name].optimizer == sum(t.numel() * t.element_size() for t in states)
    ema = trainer.ema.shadow_params
    assert roles["EMA of the generator"].parameters == sum(t.numel() * t.element_size() for t in ema)
    # and the tracker's parameters at the peak, in the plan and in the real step: every network's
    assert real["Parameter"] == plan.traced_breakdown["Parameter"] == sum(
        x.parameters for name, x in roles.items() if not name.startswith("EMA"))
    # the counts are numel x 4 bytes (float32), AdamW: two float32 states per element and a step per tensor
    numel, tensors = sum(p.numel() for p in r.teacher.parameters()), len(list(r.teacher.parameters()))
    assert roles["teacher"].parameters == roles["generator"].parameters == 4 * numel
    assert roles["generator"].gradients == 4 * numel
    assert roles["generator"].optimizer == 2 * 4 * numel + 4 * tensors


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "gradient-checkpointing"])
@pytest.mark.parametrize("config", ["digits/dmd2.yaml", "digits/dmd2_adapters.yaml", "digits/scm.yaml",
                                    "digits/rcm.yaml", "digits/lcm.yaml"])
def test_the_plan_matches_the_traced_cpu_step(config, checkpointing, tmp_path, one_thread):
    compare(config, [*MATRIX, f"trainer.gradient_checkpointing={str(checkpointing).lower()}"], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["text/dmd2.yaml", "text_flow/dmd2.yaml"])
def test_the_plan_matches_the_traced_cpu_step_of_a_text_teacher(config, tmp_path, one_thread):
    compare(config, ["data.batch_size=8"], tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Sharding, DDP, the tracker
# ---------------------------------------------------------------------------------------------------------------


def test_fsdp2_shards_are_exact_counts(digits_dmd2, one_thread):
    full = {r.role: r for r in digits_dmd2[0].roles}
    plan = plan_config(load_plan_config("digits/dmd2.yaml", [*SMALL, "trainer.parallel=fsdp2"]), world_size=4,
                       device="cpu")
    roles = {r.role: r for r in plan.roles}
    from distill.models.denoiser import load_denoiser

    # FSDP2 pads each parameter to ceil(rows / 4) rows per rank
    teacher = load_denoiser(ASSETS / "digits_teacher")
    shards = sum(math.ceil(p.shape[0] / 4) * (p.numel() // p.shape[0]) * 4 for p in teacher.parameters())
    for name in ("generator", "critic", "teacher", "EMA of the generator"):
        assert roles[name].parameters == shards
        assert full[name].parameters / 4 <= shards < full[name].parameters / 4 * 1.1
    assert roles["generator"].optimizer == 2 * shards + 4 * len(list(teacher.parameters()))
    assert plan.traced_breakdown["Parameter"] == sum(r.parameters for n, r in roles.items() if not n.startswith("EMA"))
    assert plan.ddp_buckets == 0


#: rank 0's peak of a real FSDP2 step, traced by the plan's tracker (run under `accelerate launch`)
TRACE_RANK = """
import json, sys
from distill.plan import traced_trainer_step
from distill.training.preflight import load_config
from distill.training.trainer import Trainer

trainer = Trainer(load_config(sys.argv[2], sys.argv[3:]))
peak = traced_trainer_step(trainer)
if trainer.accelerator.is_main_process:
    open(sys.argv[1], "w").write(json.dumps(peak))
"""


@pytest.mark.slow
def test_the_fsdp2_plan_matches_a_two_process_step(tmp_path):
    """FSDP2 over two CPU processes (gloo): rank 0's traced step against the plan on the fake process group."""
    from test_distributed import launch

    overrides = [*MATRIX, "trainer.parallel=fsdp2"]
    script = tmp_path / "trace_rank.py"
    script.write_text(TRACE_RANK)
    launch(str(script), str(tmp_path / "peak.json"), "recipes/digits/dmd2.yaml", *overrides,
           f"run.output_dir={tmp_path / 'run'}", "trainer.sample_every=0", "trainer.checkpoint_every=0",
           "trainer.mixed_precision='no'")
    real = json.loads((tmp_path / "peak.json").read_text())
    plan = plan_config(load_plan_config("digits/dmd2.yaml", overrides), world_size=2, device="cpu")
    print(f"FSDP2 on 2: plan {plan.traced_peak} B, traced rank 0 {real['Total']} B")
    assert abs(plan.traced_peak / real["Total"] - 1) < 0.10


def test_ddp_buckets_are_one_more_copy_of_the_gradients(digits_dmd2):
    """DDP (gradient_as_bucket_view off) allocates its buckets when it wraps a network: traced on a real one-process
    gloo group, they are the plan's count, the trained parameters' bytes."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    plan = plan_config(load_plan_config("digits/dmd2.yaml", SMALL), world_size=8, device="cpu")
    roles = {r.role: r for r in plan.roles}
    assert plan.ddp_buckets == roles["generator"].gradients + roles["critic"].gradients
    assert plan.peak == plan.traced_peak + plan.ddp_buckets

    from distill.models.denoiser import load_denoiser

    net = load_denoiser(ASSETS / "digits_teacher").model.requires_grad_(True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tracker = StepMemTracker()
        tracker.track_external(net)
        with tracker:
            before = tracker.get_tracker_snapshot()[torch.device("cpu")]["Total"]
            wrapped = DistributedDataParallel(net)
            after = tracker.get_tracker_snapshot()[torch.device("cpu")]["Total"]
        del wrapped
    finally:
        dist.destroy_process_group()
    assert after - before == roles["generator"].gradients


def test_memtracker_and_fsdpmemtracker_agree_on_a_sharded_network():
    """The plan traces with MemTracker (a step has three sharded roots and two optimizers; FSDPMemTracker takes
    one of each); on one sharded network the two record the same peak."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import fully_shard

    from distill.plan import fake_process_group, initial_optimizer_states

    peaks = {}
    with fake_process_group(4) as mesh, FakeTensorMode():
        for kind in ("fsdp", "mem"):
            net = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
            for layer in (net[0], net[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(net, mesh=mesh)
            opt = torch.optim.AdamW(net.parameters())
            initial_optimizer_states([opt])  # a later step: the states exist before it
            x = torch.randn(32, 64)
            if kind == "fsdp":
                tracker = FSDPMemTracker(net, opt)
                tracker.track_inputs((x,))
            else:
                tracker = StepMemTracker()
                tracker.track_external(net, opt, x)
            with tracker:
                net(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            peaks[kind] = peak_snapshot(tracker)["Total"]
    assert not dist.is_initialized()
    assert peaks["fsdp"] == peaks["mem"] > 0


def test_the_jvp_attention_of_a_gpu_plan_is_linear_in_the_sequence():
    """Traced for a GPU, sCM's JVP attention allocates what the Triton kernel does (O, its tangent, the log-sum-exp),
    not the attention matrices of the CPU formulas."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from distill.kernels.jvp_attention import scaled_dot_product_attention
    from distill.plan import FakeValues, gpu_jvp_attention

    b, h, seq, d = 1, 4, 4096, 64
    with FakeTensorMode(), FakeValues():
        q, k, v = (torch.randn(b, h, seq, d, dtype=torch.bfloat16) for _ in range(3))
        tracker = StepMemTracker()
        with gpu_jvp_attention(), tracker, torch.no_grad():
            out, tangent = torch.func.jvp(scaled_dot_product_attention, (q, k, v), (q, k, v))
    assert out.shape == tangent.shape == (b, h, seq, d)
    outputs = 2 * b * h * seq * d * 2 + b * h * seq * 4  # O and its tangent in bf16, the float32 log-sum-exp
    assert peak_snapshot(tracker)["Total"] < 4 * outputs < b * h * seq * seq * 2  # one bf16 attention matrix


def test_exact_count_helpers():
    p = torch.zeros(10, 3)
    assert tensor_bytes(p) == 120
    assert adamw_bytes([p]) == 2 * 120 + 4
    assert adamw_bytes([torch.zeros(4096)], "adamw_8bit") == 2 * 4096 + 4  # 8-bit: one byte per state element


# ---------------------------------------------------------------------------------------------------------------
# Batches of the pipelines' shapes
# ---------------------------------------------------------------------------------------------------------------


def assert_conditions_match(folder, tmp_path):
    """The plan's condition shapes of a teacher folder are those of its pipeline's own prompt embeddings."""
    from distill.data.prompts import PromptDataset
    from distill.families.target import read_json

    data = PromptDataset(folder, ["a red square", "a blue circle"], 16, tmp_path / "cache")
    net = read_json(next(folder / s / "config.json" for s in ("unet", "transformer") if (folder / s).is_dir()))
    batch = data.sample(3, torch.Generator().manual_seed(0))
    real = {k: (tuple(v.shape[1:]), str(v.dtype).removeprefix("torch.")) for k, v in batch.cond.items()}
    assert folder_conditions(folder, net, 16) == real


@pytest.mark.parametrize("name", ["text_teacher", "flow_text_teacher"])
def test_condition_shapes_of_the_bundled_text_teachers(name, tmp_path):
    assert_conditions_match(ASSETS / name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux", "wan"])
def test_condition_shapes_of_the_tiny_pipelines(family, tmp_path):
    import tiny_pipelines

    folder = getattr(tiny_pipelines, f"build_{family}")(tmp_path / family)
    assert_conditions_match(folder, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# The command, and every shipped model config
# ---------------------------------------------------------------------------------------------------------------


def test_distill_plan_prints_json(capsys):
    from distill.cli import main

    assert main(["plan", "digits/dmd2.yaml", *SMALL, "--world-size", "2", "--gpu-memory", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["world_size"] == 2 and out["gpu_memory"] == 24 * GiB
    assert out["needs"] == out["peak"] + out["reserve"]
    assert {r["role"] for r in out["roles"]} >= {"generator", "critic", "teacher"}


def test_distill_plan_names_what_is_wrong(capsys):
    from distill.cli import main

    assert main(["plan", "sdxl/dmd2.yaml", "--model", "nope"]) == 2
    assert "--model: no model config 'nope'" in capsys.readouterr().err
    assert main(["plan", "sdxl/dmd2.yaml", "data.resolution=1004"]) == 2
    assert "data.resolution" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_plan_of_sdxl_on_eight_gpus_offline(capsys):
    from distill.cli import main

    assert main(["plan", "recipes/sdxl/dmd2.yaml", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "sdxl (Stable Diffusion XL base 1.0 UNet)" in out and "world size 8" in out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_every_model_config_plans(name, tmp_path):
    """DMD2 with adapters on each shipped model config, at its own resolution, one sample per rank, FSDP2 on 8."""
    model = read_model_config(name)
    config = tmp_path / "plan.yaml"
    config.write_text(f"recipe: {{name: dmd2, adapters: true}}\nteacher: {{path: {model.hub_ids[0]}}}\n"
                      f"data: {{name: prompts, prompts: prompts.txt, resolution: {model.resolution}, "
                      f"num_frames: {model.num_frames}, batch_size: 1}}\n"
                      "trainer: {parallel: fsdp2, gradient_checkpointing: true}\n")
    plan = plan_config(load_plan_config(config), world_size=8)
    roles = {r.role: r for r in plan.roles}
    assert roles["teacher (the adapters' base)"].parameters > model.parameters * 4 // 8 * 0.99
    assert plan.peak > plan.persistent > 0
