"""Text-conditioned pair stores on the tiny SD3 (a flow-matching latent family): each pair's condition is the
pipeline's cached embeddings of a prompt drawn by the shard's generator; resume; a change of prompts refused by
key; then reflow (exported as the stock StableDiffusion3Pipeline with its Euler ODE scheduler) and InstaFlow on
the reflowed flow's pairs, both reloaded in a process that never imports distill and reproducing the student."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import NO_DISTILL, subprocess_env
from tiny_pipelines import BUILDERS, PROMPTS, write_prompts

from distill.base.errors import ConfigError
from distill.config import apply_overrides
from distill.data.pairs import (
    MANIFEST,
    PairDataset,
    PairStore,
    generate_from_config,
    open_pairs,
    shard_name,
    shard_seed,
)
from distill.models.sampling import sample
from distill.models.schedules import rollout
from distill.training.nets import update_nets
from distill.training.preflight import build_config
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = ("recipe.pairs.num_pairs=6", "recipe.pairs.shard_size=3", "recipe.pairs.num_steps=2",
         "recipe.pairs.batch_size=3", "recipe.pairs.progress_bar=false", "recipe.pairs.seed=3")


def text_config(world: dict, recipe: str, teacher: Path, store: Path, run: Path, *extra: str):
    """2 steps of batch 2 at 16 px (8x8 latents) on the prompts file, teacher guidance 2."""
    raw = {"recipe": {"name": recipe}, "teacher": {"path": str(teacher), "guidance_scale": 2.0},
           "run": {"output_dir": str(run), "max_steps": 2},
           "data": {"name": "prompts", "prompts": str(world["prompts"]), "cache_dir": str(world["cache"]),
                    "resolution": 16, "batch_size": 2},
           "student": {"num_steps": 1 if recipe == "instaflow" else 2},
           "trainer": {"progress_bar": False, "checkpoint_every": 0, "sample_every": 0, "ema_decay": 0.5,
                       "on_nonfinite": "stop", "generator": {"lr": 1e-3}},
           "export": {"at_end": False}}
    return build_config(apply_overrides(raw, [*PAIRS, f"recipe.pairs.path={store}", *extra]))


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs_text")
    world = {"root": root, "sd3": BUILDERS["sd3"](root / "sd3"), "prompts": write_prompts(root / "prompts.txt"),
             "cache": root / "cache"}
    world["store"] = root / "store"
    generate_from_config(text_config(world, "reflow", world["sd3"], world["store"], root / "run"))
    return world


def test_text_store_holds_the_guided_teacher_ode_of_drawn_prompts(world):
    from distill.data import make_dataset
    from distill.models.denoiser import load_denoiser

    cfg = text_config(world, "reflow", world["sd3"], world["store"], world["root"] / "run")
    teacher = load_denoiser(world["sd3"], resolution=16)
    data = make_dataset("prompts", 16, cfg.data, teacher)
    teacher.family.set_null_embeddings(data.null_condition)
    store = PairStore(world["store"], verify=True)
    assert store.spec["condition_keys"] == ["encoder_hidden_states", "pooled_projections"]
    assert store.spec["labels"] == "prompts" and store.spec["num_prompts"] == len(PROMPTS)
    drawn = []
    for i, shard in enumerate(store):
        g = torch.Generator().manual_seed(shard_seed(3, i))
        noise = torch.randn(3, 4, 8, 8, generator=g)
        idx = torch.randint(0, len(PROMPTS), (3,), generator=g)
        drawn += idx.tolist()
        torch.testing.assert_close(shard["noise"], noise, atol=0, rtol=0)
        assert shard["prompt_index"].tolist() == idx.tolist()
        assert sorted(shard) == ["noise", "prompt_index", "sample"]  # indices, not megabytes of embeddings
        cond = {k: data.cond[k][idx] for k in ("encoder_hidden_states", "pooled_projections")}
        want = sample(teacher, cond, noise, num_steps=2, guidance_scale=2.0, batch_size=3)
        torch.testing.assert_close(shard["sample"], want, atol=1e-5, rtol=1e-5)
        unguided = sample(teacher, cond, noise, num_steps=2, guidance_scale=1.0, batch_size=3)
        assert (unguided - want).abs().max() > 1e-4  # the guidance is in the stored samples
    assert len(set(drawn)) > 1
    # Reading back: the pipeline's cached embeddings of each pair's drawn prompt, beside its noise and sample.
    dataset = open_pairs(cfg.recipe.pairs, data)
    assert dataset.latent
    g = torch.Generator().manual_seed(0)
    batch = dataset.sample(5, g)
    g = torch.Generator().manual_seed(0)
    shard = store.shard(int(torch.multinomial(store.counts, 1, generator=g).item()))
    rows = torch.randint(0, 3, (5,), generator=g)
    prompts = shard["prompt_index"][rows]
    assert sorted(batch.cond) == ["encoder_hidden_states", "pooled_projections"]
    for k, v in batch.cond.items():
        torch.testing.assert_close(v, data.cond[k][prompts], atol=0, rtol=0)
    torch.testing.assert_close(batch.noise, shard["noise"][rows], atol=0, rtol=0)
    torch.testing.assert_close(batch.images, shard["sample"][rows], atol=0, rtol=0)
    with pytest.raises(ValueError, match="indices into 4 prompts"):
        PairDataset(world["store"])  # without the embeddings


def test_text_store_resumes_to_the_identical_store(world, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(world["store"], store)
    (store / shard_name(1)).unlink()
    manifest = json.loads((store / MANIFEST).read_text())
    del manifest["shards"]["1"]
    manifest["complete"] = False
    (store / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    from distill.data import pairs as pairs_module

    made, real = [], pairs_module.make_shard
    pairs_module.make_shard = lambda teacher, pc, i, *a, **k: made.append(i) or real(teacher, pc, i, *a, **k)
    try:
        generate_from_config(text_config(world, "reflow", world["sd3"], store, tmp_path / "run"))
    finally:
        pairs_module.make_shard = real
    assert made == [1]
    assert files(store) == files(world["store"])


def test_other_prompts_are_refused_naming_the_key(world, tmp_path):
    other = write_prompts(tmp_path / "other.txt", ["a purple cube", *PROMPTS[1:]])
    cfg = text_config(world, "reflow", world["sd3"], world["store"], tmp_path / "run", f"data.prompts={other}")
    with pytest.raises(ConfigError, match=r"^pairs\.path: .*prompts_sha256"):
        generate_from_config(cfg)
    with pytest.raises(ConfigError, match=r"^recipe\.pairs\.path: .*prompts_sha256"):
        Trainer(cfg)  # training on the store with other prompts in the data section


def test_what_is_not_supported_is_refused_when_the_config_is_loaded(world, tmp_path):
    sd15 = BUILDERS["sd15"](tmp_path / "sd15")
    store, run = tmp_path / "store", tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^teacher\.path: .*flow-matching teacher.*StableDiffusionPipeline"):
        text_config(world, "reflow", sd15, store, run)  # reflow of a VP latent teacher
    with pytest.raises(ConfigError, match=r"^recipe\.flow_guidance_weight: .*flow-matching"):
        text_config(world, "instaflow", sd15, store, run, "recipe.flow_guidance_weight=0.5")
    with pytest.raises(ConfigError, match=r"^recipe\.block_out_channels: .*transformer"):
        text_config(world, "reflow", world["sd3"], store, run, "recipe.block_out_channels=[8, 16]")
    text_config(world, "instaflow", sd15, store, run)  # InstaFlow's plain regression applies to VP teachers
    assert not run.exists()


CLEAN_LOAD = NO_DISTILL + r"""
import torch
from diffusers import DiffusionPipeline

spec = json.load(open(sys.argv[1]))
noise = torch.load(spec["noise"])
results = {}
for name, run in spec["runs"].items():
    pipe = DiffusionPipeline.from_pretrained(run["folder"])
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    out = pipe(spec["prompts"], latents=noise.clone(), num_inference_steps=run["steps"], guidance_scale=0.0,
               height=16, width=16, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    results[name] = {"latents": out, "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                     "stochastic": bool(pipe.scheduler.config.get("stochastic_sampling"))}
torch.save(results, spec["results"])
assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


@pytest.fixture(scope="module")
def chain(world):
    """Teacher pairs -> 2 reflow steps -> stock SD3 flow -> its pairs -> 2 InstaFlow steps -> stock SD3; one clean
    process samples both exports from the same noise."""
    root = world["root"]
    reflow = Trainer(text_config(world, "reflow", world["sd3"], world["store"], root / "reflow"))
    reflow.train()
    flow_dir = reflow.export(root / "flow")
    flow_store = root / "flow_store"
    generate_from_config(text_config(world, "instaflow", flow_dir, flow_store, root / "insta"))
    insta = Trainer(text_config(world, "instaflow", flow_dir, flow_store, root / "insta"))
    insta.train()
    pipe_dir = insta.export(root / "insta_export")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.save(noise, root / "noise.pt")
    from distill.data import make_dataset

    data = make_dataset("prompts", 16, insta.cfg.data, insta.recipe.flow)
    cond = {k: v[:2] for k, v in data.cond.items()}  # PROMPTS[:2], encoded by the pipeline
    want = {}
    with torch.no_grad(), reflow.ema_weights() as gen:
        want["reflow"] = reflow.recipe.generate(gen, cond, noise.clone())
    with torch.no_grad(), insta.ema_weights() as gen:
        want["instaflow"] = rollout(gen, insta.recipe.schedule, cond, noise.clone())
    runs = {"reflow": {"folder": str(flow_dir), "steps": 2}, "instaflow": {"folder": str(pipe_dir), "steps": 1}}
    spec = {"runs": runs,
            "noise": str(root / "noise.pt"), "results": str(root / "results.pt"), "prompts": PROMPTS[:2]}
    (root / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(root / "spec.json")], capture_output=True,
                          text=True, timeout=600, env=subprocess_env(), cwd=root)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    return {"want": want, "got": torch.load(root / "results.pt"), "reflow": reflow, "insta": insta,
            "flow_dir": flow_dir, "pipe_dir": pipe_dir}


def test_reflowed_flow_exports_the_stock_pipeline_with_its_euler_ode(chain, world):
    from safetensors.torch import load_file

    got, want = chain["got"]["reflow"], chain["want"]["reflow"]
    assert got["pipeline"] == "StableDiffusion3Pipeline" and got["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert not got["stochastic"]
    assert want.std() > 1e-3
    torch.testing.assert_close(got["latents"], want, atol=2e-5, rtol=1e-4)
    teacher = load_file(next((world["sd3"] / "transformer").glob("*.safetensors")))
    flow = load_file(next((chain["flow_dir"] / "transformer").glob("*.safetensors")))
    assert any(not torch.equal(flow[k], teacher[k]) for k in teacher)  # it trained
    shift = json.loads((chain["flow_dir"] / "scheduler" / "scheduler_config.json").read_text())["shift"]
    assert shift == 3.0  # the teacher's
    meta = json.loads((chain["flow_dir"] / "distill.json").read_text())
    assert meta["num_inference_steps"] == 2 and meta["recipe"] == "reflow"
    # 2 Euler steps on the students' trailing times: shift(1) = 1, shift(1/2) = 3 * 0.5 / (1 + 2 * 0.5), then 0
    assert meta["sigmas"] == pytest.approx([1.0, 0.75, 0.0], abs=1e-6)


def test_reflow_loss_is_the_native_flow_matching_loss(chain):
    """On SD3 the flow is the transformer's own velocity: loss = ||v(x_s, s) - (z - x1)||^2 / D."""
    recipe = chain["reflow"].recipe
    batch = recipe.dataset.sample(3, torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    with update_nets(recipe, "generator") as nets:
        loss, _ = recipe.generator_loss(nets, batch, 0)
    torch.manual_seed(7)
    s = torch.rand(3)
    gen = recipe.generator
    with torch.no_grad():
        x_s = (1 - s)[:, None, None, None] * batch.images + s[:, None, None, None] * batch.noise
        v = gen.raw(x_s, s, batch.cond)  # the transformer's native (flow) output
    want = (v - (batch.noise - batch.images)).pow(2).flatten(1).mean(1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_instaflow_on_text_pairs_exports_the_students_one_step(chain):
    got, want = chain["got"]["instaflow"], chain["want"]["instaflow"]
    assert got["pipeline"] == "StableDiffusion3Pipeline"
    assert want.std() > 1e-3
    torch.testing.assert_close(got["latents"], want, atol=2e-5, rtol=1e-4)
    recipe = chain["insta"].recipe
    batch = recipe.dataset.sample(2, torch.Generator().manual_seed(0))
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    assert logs["regression_loss"] > 0 and torch.isfinite(loss)
