"""Every recipe on the real families' tiny whole pipelines (tests/tiny_pipelines.py): SD1.5 (VP, epsilon) and SD3
(rectified flow, shift 3).

* Two steps through the trainer, the export to the family's stock pipeline, and one process that cannot import
  `distill` loading every folder and reproducing the EMA student's own rollout from given noise (Phased DMD: its
  experts switched by the pipeline's own callback, as its model card prints it).
* A student trained as a LoRA adapter on the teacher is also exported in diffusers' LoRA format:
  `load_lora_weights` on the teacher's pipeline gives the merged export's output.
* Every parametrization (VP epsilon / v / x0, flow with a static and a dynamic shift, EDM) is accepted by every
  recipe: one training step, or, where the recipe cannot apply, a refusal when the config is loaded that names the
  key and says why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import NO_DISTILL, subprocess_env
from tiny_pipelines import BUILDERS, PROMPTS, write_prompts

from distill.base.errors import ConfigError
from distill.config import apply_overrides
from distill.models.schedules import rollout
from distill.training.preflight import build_config
from distill.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SEED = 4321


def write_images(root: Path) -> Path:
    """Four random images of different sizes (none square) with captions, in Hugging Face's imagefolder layout."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, caption in enumerate(PROMPTS):
        Image.fromarray((rng.random((20 + 4 * i, 24, 3)) * 255).astype(np.uint8)).save(root / f"image_{i}.png")
        lines.append(json.dumps({"file_name": f"image_{i}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny teachers, a prompts file, a captioned images folder and one embeddings cache for the module."""
    root = tmp_path_factory.mktemp("families_recipes")
    return {"root": root, "sd15": BUILDERS["sd15"](root / "sd15"), "sd3": BUILDERS["sd3"](root / "sd3"),
            "prompts": write_prompts(root / "prompts.txt"), "images": write_images(root / "images"),
            "cache": root / "cache"}


def run_config(world: dict, recipe: str, teacher: Path, run: Path, data: str, *overrides: str):
    """A run of seconds: 2 steps of batch 2 at 16 px (8x8 latents), a 2-step student, guidance 2 on the teacher."""
    source = {"prompts": {"name": "prompts", "prompts": str(world["prompts"])},
              "images": {"name": "images", "images": str(world["images"])}}[data]
    raw = {"recipe": {"name": recipe}, "teacher": {"path": str(teacher), "guidance_scale": 2.0},
           "run": {"output_dir": str(run), "max_steps": 2},
           "data": {**source, "cache_dir": str(world["cache"]), "resolution": 16, "batch_size": 2},
           "student": {"num_steps": 2},
           "trainer": {"progress_bar": False, "checkpoint_every": 0, "sample_every": 0, "ema_decay": 0.5,
                       "on_nonfinite": "stop", "generator": {"lr": 1e-3}, "critic": {"lr": 1e-3}},
           "export": {"at_end": False}}
    return build_config(apply_overrides(raw, list(overrides)))


# ---------------------------------------------------------------------------------------------------------------
# Train, export, reload without distill
# ---------------------------------------------------------------------------------------------------------------

#: name -> (recipe, data, overrides). DMD2 itself: tests/test_families_export.py.
RUNS = {
    "swiftbrush": ("swiftbrush", "prompts", ("recipe.lora_rank=4",)),
    "decoupled_dmd": ("decoupled_dmd", "prompts", ()),
    "fdistill": ("fdistill", "images", ()),
    "phased_dmd": ("phased_dmd", "prompts", ()),
    "scm": ("scm", "images", ()),
    "rcm": ("rcm", "images", ()),
    "lcm": ("lcm", "images", ()),
    "dmd2_lora": ("dmd2", "prompts", ("recipe.adapters=true", "recipe.lora_rank=4", "trainer.generator.lr=1e-2")),
}
FAMILIES = ("sd15", "sd3")

CLEAN_LOAD = NO_DISTILL + r"""
import os
import re
import torch
from diffusers import DiffusionPipeline

spec = json.load(open(sys.argv[1]))
noise = torch.load(spec["noise"])
results = {}


def sample(pipe, **extra):
    torch.manual_seed(spec["seed"])  # flow pipelines draw the re-noising from the global generator
    return pipe(spec["prompts"], latents=noise.clone(), num_inference_steps=spec["steps"], height=16, width=16,
                output_type="latent", generator=torch.Generator().manual_seed(spec["seed"]), **extra).images


for name, run in spec["runs"].items():
    folder, off = run["folder"], {"guidance_scale": run["guidance"]}
    if run["phased"]:  # the loop exactly as the model card prints it
        code = re.search(r"```python\n(.*?)```", open(folder + "/README.md").read(), re.S).group(1)
        namespace = {}
        exec(code.split("\npipe, switch = ")[0], namespace)
        pipe, switch = namespace["load_phased"](folder)
        pipe.set_progress_bar_config(disable=True)
        first = sample(pipe, callback_on_step_end=switch, **off)
        results[name] = {"latents": first, "again": sample(pipe, callback_on_step_end=switch, **off),
                         "pipeline": type(pipe).__name__}
        continue
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    results[name] = {"latents": sample(pipe, **off), "pipeline": type(pipe).__name__}
    if run["lora"]:  # the student alone, as a LoRA on the teacher's pipeline with the export's scheduler
        base = DiffusionPipeline.from_pretrained(run["teacher"])
        base.set_progress_bar_config(disable=True)
        base.scheduler = type(pipe.scheduler).from_pretrained(folder, subfolder="scheduler")
        results[name]["teacher"] = sample(base, **off)
        base.load_lora_weights(folder)
        results[name]["lora"] = sample(base, **off)
        # the model card's LoRA code as printed, run beside the folder
        code = re.findall(r"```python\n(.*?)```", open(folder + "/README.md").read(), re.S)[-1]
        os.chdir(os.path.dirname(folder))
        namespace = {}
        exec(code, namespace)
        results[name]["card_images"] = len(namespace["images"])
torch.save(results, spec["results"])
assert not NoDistill.tried, NoDistill.tried
assert not [m for m in sys.modules if m == "distill" or m.startswith("distill.")]
print("clean load ok")
"""


@pytest.fixture(scope="module")
def exported(world, one_thread):
    """Every (recipe, family): 2 training steps, the export, and the EMA student's rollout from fixed noise and
    seed; then one clean process samples every folder from the same noise and seed."""
    root = world["root"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(noise, root / "noise.pt")
    out, runs = {}, {}
    for family in FAMILIES:
        for name, (recipe, data, overrides) in RUNS.items():
            key = f"{name}-{family}"
            cfg = run_config(world, recipe, world[family], root / "runs" / key, data, *overrides)
            trainer = Trainer(cfg)
            trainer.train()
            folder = trainer.export(root / "exports" / key)
            cond = {k: v[:2] for k, v in trainer.dataset.cond.items()}  # PROMPTS[:2], encoded by the pipeline
            with torch.no_grad(), trainer.ema_weights() as gen:
                student = trainer.recipe.export_model(gen)
                torch.manual_seed(SEED)
                want = rollout(student, trainer.recipe.schedule, cond, noise.clone())
            out[key] = {"trainer": trainer, "folder": folder, "want": want}
            runs[key] = {"folder": str(folder), "teacher": str(world[family]), "phased": recipe == "phased_dmd",
                         "lora": "recipe.adapters=true" in overrides, "guidance": trainer.dataset.target.guidance_scale({})}  # SD1.5/SD3: no guidance embedding
    spec = {"runs": runs, "noise": str(root / "noise.pt"), "results": str(root / "results.pt"), "seed": SEED,
            "prompts": PROMPTS[:2], "steps": 2}
    (root / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(root / "spec.json")], capture_output=True,
                          text=True, timeout=600, env=subprocess_env(), cwd=root)
    assert proc.returncode == 0 and "clean load ok" in proc.stdout, proc.stderr[-3000:]
    results = torch.load(root / "results.pt")
    for key in out:
        out[key]["got"] = results[key]
    return out


PIPELINES = {"sd15": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(RUNS))
def test_recipe_exports_the_stock_pipeline_and_reproduces_the_student(exported, name, family):
    r = exported[f"{name}-{family}"]
    got, want = r["got"], r["want"]
    assert got["pipeline"] == PIPELINES[family]
    assert want.std() > 1e-3
    torch.testing.assert_close(got["latents"], want, atol=2e-5, rtol=1e-4)
    meta = json.loads((r["folder"] / "distill.json").read_text())
    assert meta["num_inference_steps"] == 2 and meta["recipe"] == RUNS[name][0]
    assert not [p for p in r["folder"].rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".py")]


@pytest.mark.parametrize("family", FAMILIES)
def test_phased_experts_switch_per_step_and_reset(exported, family):
    """The callback hands step 1 to expert 1 (the experts differ after training) and the pipeline back to expert 0:
    a second call samples the same student."""
    r = exported[f"phased_dmd-{family}"]
    torch.testing.assert_close(r["got"]["again"], r["got"]["latents"], atol=0, rtol=0)
    experts = r["trainer"].recipe.generator.experts
    diff = [(a - b).abs().max() for a, b in zip(experts[0].parameters(), experts[1].parameters())]
    assert max(diff) > 0
    meta = json.loads((r["folder"] / "distill.json").read_text())
    assert meta["experts"] == ["phase_0", "phase_1"] and meta["pipeline"] == PIPELINES[family]
    network = meta["network"]
    assert sorted(p.name for p in (r["folder"] / "phase_1").iterdir()) == [network]  # no second VAE or encoder


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_the_teacher_is_the_merged_student(exported, family):
    """pytorch_lora_weights.safetensors in diffusers' format: `load_lora_weights` on the teacher's pipeline (with
    the export's scheduler) samples what the merged export samples; without it the teacher samples otherwise."""
    from safetensors.torch import load_file

    r = exported[f"dmd2_lora-{family}"]
    got = r["got"]
    torch.testing.assert_close(got["lora"], got["latents"], atol=2e-5, rtol=1e-4)
    assert (got["teacher"] - got["latents"]).abs().max() > 1e-3  # the adapter trained: the teacher differs
    prefix = {"sd15": "unet.", "sd3": "transformer."}[family]
    weights = load_file(r["folder"] / "pytorch_lora_weights.safetensors")
    assert weights and all(k.startswith(prefix) and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in weights)
    lora = json.loads((r["folder"] / "distill.json").read_text())["lora"]
    assert lora["rank"] == 4 and lora["weights"] == "pytorch_lora_weights.safetensors"
    assert got["card_images"] == 1  # the model card's LoRA code runs as printed
    merged = load_file(next((r["folder"] / prefix[:-1]).glob("*.safetensors")))
    assert not [k for k in merged if "lora" in k or "base_layer" in k]  # the pipeline itself is the merged network


# ---------------------------------------------------------------------------------------------------------------
# Image data: the pipeline's own latents
# ---------------------------------------------------------------------------------------------------------------


def test_images_are_centre_cropped_and_encoded_as_the_pipeline_decodes(world):
    """A wide image keeps its centre; latents are the VAE posterior mean normalised as SD3's pipeline inverts it
    before decoding ((z - shift) * scale), and data.name: images yields them with the captions' embeddings."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from distill.data.images import ImageDataset, load_image

    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, 4:12] = (255, 0, 0)  # red centre, black sides
    Image.fromarray(wide).save(world["root"] / "wide.png")
    pixels = load_image(world["root"] / "wide.png", 8)
    assert pixels.shape == (3, 8, 8)
    torch.testing.assert_close(pixels[0], torch.ones(8, 8))  # only the red centre is left
    torch.testing.assert_close(pixels[1:], -torch.ones(2, 8, 8))
    data = ImageDataset(world["sd3"], world["images"], 16, world["cache"])
    assert data.latents.shape == (4, 4, 8, 8) and len(data) == 4
    vae = AutoencoderKL.from_pretrained(world["sd3"] / "vae")
    image = load_image(world["images"] / "image_2.png", 16)
    with torch.no_grad():
        z = vae.encode(image[None]).latent_dist.mean
    want = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert vae.config.shift_factor != 0
    torch.testing.assert_close(data.latents[2:3], want, atol=1e-5, rtol=1e-5)
    batch = data.sample(3, torch.Generator().manual_seed(0))
    assert batch.images.shape == (3, 4, 8, 8) and batch.cond["encoder_hidden_states"].shape[0] == 3
    idx = torch.randint(0, 4, (3,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.images, data.latents[idx])
    torch.testing.assert_close(batch.cond["encoder_hidden_states"], data.cond["encoder_hidden_states"][idx])


# ---------------------------------------------------------------------------------------------------------------
# Every recipe x every parametrization: one step, or a refusal when the config is loaded
# ---------------------------------------------------------------------------------------------------------------


def _dynamic_shift_sd3(root: Path) -> Path:
    """The tiny SD3 with a resolution-dependent shift (use_dynamic_shifting, as Flux and SD3.5-style configs)."""
    folder = BUILDERS["sd3"](root)
    file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(file.read_text())
    config.update(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)
    file.write_text(json.dumps(config))
    return folder


#: parametrization -> how to build its teacher folder (None: the tiny EDM digits teacher).
PARAMETRIZATIONS = {
    "vp-epsilon": lambda root: BUILDERS["sd15"](root, prediction_type="epsilon"),
    "vp-v": lambda root: BUILDERS["sd15"](root, prediction_type="v_prediction"),
    "vp-x0": lambda root: BUILDERS["sd15"](root, prediction_type="sample"),
    "flow-static": lambda root: BUILDERS["sd3"](root, shift=3.0),
    "flow-dynamic": _dynamic_shift_sd3,
    "edm": None,
}
PAIRS = ("recipe.pairs.num_pairs=4", "recipe.pairs.shard_size=4", "recipe.pairs.num_steps=2",
         "recipe.pairs.batch_size=4", "recipe.pairs.progress_bar=false")
#: recipe -> (module, overrides); the pair-based ones read the `pairs` fixture's store.
RECIPES = {
    "dmd2": ("dmd2", ()),
    "dmd2_gan": ("dmd2", ("recipe.gan=true",)),
    "dmd2_adapters": ("dmd2", ("recipe.adapters=true", "recipe.lora_rank=2")),
    "dmd_regression": ("dmd2", ("recipe.regression_weight=0.25", *PAIRS)),
    "swiftbrush": ("swiftbrush", ("recipe.lora_rank=2",)),
    "decoupled_dmd": ("decoupled_dmd", ()),
    "fdistill": ("fdistill", ()),
    "phased_dmd": ("phased_dmd", ()),
    "scm": ("scm", ()),
    "rcm": ("rcm", ()),
    "lcm": ("lcm", ()),
    "instaflow": ("instaflow", PAIRS),
    "reflow": ("reflow", PAIRS),
}
PAIR_BASED = {"dmd_regression", "instaflow", "reflow"}


@pytest.fixture(scope="module")
def text_stores(world, teachers, tmp_path_factory):
    """parametrization -> a 4-pair store of its latent teacher on the captions of data.name: images (made once,
    on first use), for the pair-based recipes."""
    from distill.data.pairs import generate_from_config

    root, made = tmp_path_factory.mktemp("text_pairs"), {}

    def store(parametrization: str) -> Path:
        if parametrization not in made:
            path = root / parametrization
            generate_from_config(run_config(world, "instaflow", teachers[parametrization], root / "run", "images",
                                            *PAIRS, f"recipe.pairs.path={path}"))
            made[parametrization] = path
        return made[parametrization]

    return store


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("parametrizations")
    return {name: tiny_teacher if build is None else build(root / name) for name, build in PARAMETRIZATIONS.items()}


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory, tiny_teacher):
    """A 4-pair store of the tiny EDM teacher (2 ODE steps), for the pair-based recipes."""
    from distill.data.pairs import generate_from_config

    path = tmp_path_factory.mktemp("pairs") / "store"
    cfg = build_config(apply_overrides({"recipe": {"name": "reflow"}}, [
        f"teacher.path={tiny_teacher}", "teacher.prediction=edm", "data.resolution=8", f"recipe.pairs.path={path}",
        *PAIRS]))
    generate_from_config(cfg)
    return path


def _edm_config(teacher: Path, run: Path, recipe: str, overrides: tuple[str, ...], pairs: Path):
    raw = {"recipe": {"name": recipe}, "teacher": {"path": str(teacher), "prediction": "edm", "guidance_scale": 2.0},
           "run": {"output_dir": str(run), "max_steps": 1}, "data": {"name": "digits", "resolution": 8,
                                                                       "batch_size": 2},
           "student": {"num_steps": 1 if recipe == "instaflow" else 2},
           "trainer": {"progress_bar": False, "checkpoint_every": 0, "sample_every": 0, "on_nonfinite": "stop",
                       "generator": {"lr": 1e-3}, "critic": {"lr": 1e-3}},
           "export": {"at_end": False}}
    return build_config(apply_overrides(raw, [*overrides, *([f"recipe.pairs.path={pairs}"] if pairs else [])]))


@pytest.mark.parametrize("parametrization", sorted(PARAMETRIZATIONS))
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_accepts_every_parametrization(world, teachers, pair_store, text_stores, tmp_path, name,
                                                    parametrization):
    recipe, overrides = RECIPES[name]
    teacher = teachers[parametrization]
    run = tmp_path / "run"
    if parametrization == "edm":
        cfg = _edm_config(teacher, run, recipe, overrides, pair_store if name in PAIR_BASED else None)
    else:
        load = lambda *extra: run_config(world, recipe, teacher, run, "images", "run.max_steps=1",  # noqa: E731
                                         *overrides, *extra)
        if name == "reflow" and parametrization.startswith("vp"):
            # reflow trains a flow-matching teacher's own flow: refused before anything is loaded, saying why
            with pytest.raises(ConfigError, match=r"^teacher\.path: .*flow-matching teacher.*VP family"):
                load()
            return
        if name in PAIR_BASED:  # a store of the captions' embeddings, made by this teacher
            extra = [f"recipe.pairs.path={text_stores(parametrization)}"]
            cfg = load(*extra, *(["student.num_steps=1"] if recipe == "instaflow" else []))
        else:
            cfg = load()
    trainer = Trainer(cfg)
    before = [p.detach().clone() for p in trainer.recipe.generator.parameters()]
    logs = trainer.train_step()
    losses = {k: v for k, v in logs.items() if k.endswith("loss")}
    assert losses and all(np.isfinite(v) for v in losses.values()), logs
    assert trainer.nonfinite_skipped == 0
    after = list(trainer.recipe.generator.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "the generator did not train"


# ---------------------------------------------------------------------------------------------------------------
# Refusals: before training, naming the key and the reason
# ---------------------------------------------------------------------------------------------------------------

REFUSED = [
    # recipes that need data images, on prompts alone
    ("scm", (), "data.name", "x0"),
    ("rcm", (), "data.name", "x0"),
    ("lcm", (), "data.name", "solver step"),
    ("fdistill", (), "recipe.gan", "GAN head"),
    ("dmd2", ("recipe.gan=true",), "recipe.gan", "GAN head"),
    ("decoupled_dmd", ("recipe.gan=true",), "recipe.gan", "GAN head"),
    # a ConsistencyModelPipeline option on a latent family
    ("scm", ("recipe.timesteps=[20, 0]", "data.name=images", "data.prompts=null", "data.images=IMAGES"),
     "recipe.timesteps", "ConsistencyModelPipeline"),
]


@pytest.mark.parametrize("recipe,overrides,key,reason", REFUSED, ids=[f"{r[0]}-{r[2]}" for r in REFUSED])
def test_refused_when_the_config_is_loaded(world, tmp_path, recipe, overrides, key, reason):
    overrides = tuple(o.replace("IMAGES", str(world["images"])) for o in overrides)
    with pytest.raises(ConfigError) as e:
        run_config(world, recipe, world["sd15"], tmp_path / "run", "prompts", *overrides)
    msg = str(e.value)
    assert msg.startswith(f"{key}:") and reason in msg, msg
    if key != "recipe.timesteps":
        assert "data.name: images" in msg  # what to do instead
    assert not (tmp_path / "run").exists()


def test_image_data_is_refused_for_a_pixel_teacher_and_a_bad_folder(world, tiny_teacher, tmp_path):
    base = ["data.name=images", f"data.cache_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"^data\.images: .*pixel-space"):
        build_config(apply_overrides({"recipe": {"name": "dmd2"}}, base + [f"data.images={world['images']}"]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "a cat"}\n')
    with pytest.raises(ConfigError, match=r"^data\.images: .*line 1 names .*missing\.png"):
        run_config(world, "scm", world["sd15"], tmp_path / "run", "images", f"data.images={bad}")
    (bad / "metadata.jsonl").write_text('{"file_name": 3}\n')
    with pytest.raises(ConfigError, match=r"^data\.images: .*line 1 needs string keys"):
        run_config(world, "scm", world["sd15"], tmp_path / "run", "images", f"data.images={bad}")


def test_phased_students_need_a_pipeline_with_a_step_callback(tmp_path):
    """DiTPipeline has no callback_on_step_end, so no stock pipeline could switch a phased student's experts."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from distill.export.checks import check_expert_export

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=11)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8)
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "dit")
    with pytest.raises(ConfigError, match=r"^recipe\.name: .*DiTPipeline.*callback_on_step_end"):
        check_expert_export(tmp_path / "dit", None)


@pytest.fixture(scope="module")
def unexportable(tmp_path_factory, world):
    """Teachers no stock pipeline can sample a student of: (folder, teacher.prediction, words of the reason)."""
    import shutil

    from diffusers import DDIMScheduler, DDPMScheduler
    from tiny import tiny_unet

    root = tmp_path_factory.mktemp("unexportable")
    tiny_unet().save_pretrained(root / "vp_unet2d" / "unet", safe_serialization=True)
    DDPMScheduler().save_pretrained(root / "vp_unet2d" / "scheduler")
    shutil.copytree(world["sd3"], root / "sd3_vp")
    DDIMScheduler().save_pretrained(root / "sd3_vp" / "scheduler")  # a flow transformer under a VP scheduler
    return {"class-conditional VP UNet2DModel": (root / "vp_unet2d", None, "ConsistencyModelPipeline"),
            "SD3 under a VP scheduler": (root / "sd3_vp", None, "flow-matching scheduler"),
            "SD1.5 read as a flow model": (world["sd15"], "flow", "LCMScheduler")}


@pytest.mark.parametrize("teacher", ["class-conditional VP UNet2DModel", "SD3 under a VP scheduler",
                                     "SD1.5 read as a flow model"])
def test_a_teacher_that_cannot_be_exported_is_refused_by_every_recipe(world, unexportable, tmp_path, teacher):
    folder, prediction, reason = unexportable[teacher]
    for name, (recipe, overrides) in RECIPES.items():
        extra = [f"teacher.prediction={prediction}"] if prediction else []
        with pytest.raises(ConfigError) as e:
            run_config(world, recipe, folder, tmp_path / "run", "images", *overrides, *extra)
        msg = str(e.value)
        assert msg.startswith("teacher.path: ") and reason in msg, f"{name}: {msg}"
    assert not (tmp_path / "run").exists()
