"""The text-to-image evaluation scripts (scripts/eval_fid.py, eval_clip.py, bench_speed.py) and their shared pieces
(distill/evaluation/t2i_eval.py) on the tiny SD1.5 pipeline: FID with a stand-in feature network against a closed form, CLIP
score with a tiny local CLIPModel against a hand computation, and the speed table's rows and ratios."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from tiny import REPO
from tiny_pipelines import PROMPTS, build_clip, build_sd15, stand_in_features

from distill.evaluation.t2i_eval import (
    BadInput,
    call_settings,
    center_crop_resize,
    from_pil,
    generate,
    load_pipeline,
    read_prompts,
    uint8_images,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = "tiny_pipelines:stand_in_features"
GEN = ["--steps", "2", "--batch-size", "3", "--image-size", "16", "--device", "cpu", "--seed", "7"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i_eval")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS + [p.replace("a ", "one ") for p in PROMPTS]) + "\n")  # 8 prompts
    return build_sd15(root / "sd15"), prompts


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, eq. 6)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * linalg.sqrtm(sa @ sb).real))


def _features(folder, resolution: int) -> np.ndarray:
    images = [from_pil(center_crop_resize(Image.open(f).convert("RGB"), resolution)) for f in sorted(folder.iterdir())]
    with torch.no_grad():
        return stand_in_features()(torch.stack(images)).double().numpy()


def test_fid_of_a_set_against_itself_is_zero_and_matches_the_closed_form(sd15, tmp_path, capsys):
    pipeline, prompts = sd15
    fid = _script("eval_fid")
    gen, out = tmp_path / "gen", tmp_path / "fid.json"
    common = ["--prompts", str(prompts), "--feature-module", FEATURES, "--resolution", "12", *GEN]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--reference: .*empty holds no images"):
        fid.main([str(pipeline), "--reference", str(tmp_path / "empty"), *common])
    # Generate and save the PNGs (against two non-square real images, centre-cropped), then use them as the
    # reference: generating again gives the same images, through the same crop and resize.
    (tmp_path / "real").mkdir()
    Image.new("RGB", (20, 14), (9, 9, 9)).save(tmp_path / "real" / "a.png")
    Image.new("RGB", (14, 20), (200, 9, 9)).save(tmp_path / "real" / "b.png")
    assert fid.main([str(pipeline), "--reference", str(tmp_path / "real"), "--save-images", str(gen), *common]) == 0
    assert sorted(p.name for p in gen.iterdir()) == [f"{i:06d}.png" for i in range(8)]
    shutil.copytree(gen, tmp_path / "ref")
    assert fid.main([str(pipeline), "--reference", str(tmp_path / "ref"), "--floor", "--json", str(out), *common]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert abs(result["fid"]) < 1e-6 and result["generated"] == result["reference_count"] == 8
    assert "FD (custom features)" in printed and "generated vs reference" in printed and "floor" in printed
    assert "2 steps" in printed and "image i: seed 7 + i" in printed
    # The floor: a seeded random half of the reference against the other half, by the formula.
    feats = _features(tmp_path / "ref", 12)
    half = fid.floor_halves(8).numpy()
    assert half.sum() == 4 and not (half == (np.arange(8) % 2 == 0)).all()  # not the parity split
    assert result["floor"] == pytest.approx(_frechet(feats[half], feats[~half]), rel=1e-6, abs=1e-9)
    assert result["floor_counts"] == [4, 4]

    # A shifted reference (brighter): larger, and equal to the closed form on the features.
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for f in sorted((tmp_path / "ref").iterdir()):
        arr = np.asarray(Image.open(f).convert("RGB")).astype(np.int16)
        Image.fromarray(np.clip(arr + 60, 0, 255).astype(np.uint8)).save(shifted / f.name)
    assert fid.main([str(gen), "--reference", str(shifted), "--json", str(out), *common]) == 0
    moved = json.loads(out.read_text())
    assert moved["fid"] > 1e-3
    assert moved["fid"] == pytest.approx(_frechet(_features(gen, 12), _features(shifted, 12)), rel=1e-5)
    assert "8 images read from" in moved["images"]


def test_fid_inputs_are_checked_and_nothing_is_downloaded(sd15, tmp_path, monkeypatch):
    pipeline, prompts = sd15
    fid = _script("eval_fid")

    def no_download(*args, **kwargs):
        raise AssertionError("eval_fid.py tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    (tmp_path / "ref").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "ref" / f"{i}.png")
    base = [str(pipeline), "--prompts", str(prompts), "--reference", str(tmp_path / "ref")]
    with pytest.raises(SystemExit, match="--inception-weights: .*missing.pth is not a file"):
        fid.main([*base, "--inception-weights", str(tmp_path / "missing.pth")])
    if importlib.util.find_spec("torch_fidelity") is None or importlib.util.find_spec("torchvision") is None:
        (tmp_path / "weights.pth").write_bytes(b"")
        with pytest.raises(SystemExit, match="needs torch-fidelity, which imports torchvision.*--feature-module"):
            fid.main([*base, "--inception-weights", str(tmp_path / "weights.pth")])
    with pytest.raises(SystemExit, match="--feature-module: expected MODULE:FACTORY"):
        fid.main([*base, "--feature-module", "tiny_pipelines"])
    with pytest.raises(SystemExit, match="--feature-module: tiny_pipelines has no 'nope'"):
        fid.main([*base, "--feature-module", "tiny_pipelines:nope"])
    with pytest.raises(SystemExit, match="returned a list, not an nn.Module"):
        fid.main([*base, "--feature-module", "builtins:list"])
    with pytest.raises(SystemExit, match="--floor: needs at least 4 reference images"):
        fid.main([*base, "--feature-module", FEATURES, "--floor"])
    with pytest.raises(SystemExit, match="--num-prompts: asked for 9 prompts but .* holds 8"):
        fid.main([*base, "--feature-module", FEATURES, "--num-prompts", "9"])
    with pytest.raises(SystemExit, match="--prompts: .*nope.txt is not a file"):
        fid.main([str(pipeline), "--prompts", str(tmp_path / "nope.txt"), "--reference", str(tmp_path / "ref"),
                  "--feature-module", FEATURES])
    with pytest.raises(SystemExit):  # argparse: one of the two feature networks is required
        fid.main(base)


def test_clip_score_is_torchmetrics_100_x_mean_cosine_of_a_local_clip(sd15, tmp_path, capsys):
    from transformers import CLIPModel, CLIPProcessor

    pipeline, prompts = sd15
    clip_dir = build_clip(tmp_path / "clip")
    clip = _script("eval_clip")
    out = tmp_path / "clip.json"
    assert clip.main([str(pipeline), "--prompts", str(prompts), "--clip-model", str(clip_dir), "--prefix", "a ",
                      "--save-images", str(tmp_path / "gen"), "--json", str(out), *GEN]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["count"] == 8 and "CLIP score (100 x cos)" in printed and "mean cosine" in printed
    assert "unnamed CLIP (width 16, 1 layers, patch 8) (16 px)" in printed

    # By hand: the projected embeddings of each saved image and its prefixed caption, cosine, mean, x 100.
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    processor = CLIPProcessor.from_pretrained(str(clip_dir))
    captions = ["a " + p for p in read_prompts(prompts)]
    images = [Image.open(f).convert("RGB") for f in sorted((tmp_path / "gen").iterdir())]
    with torch.no_grad():
        img = model.get_image_features(**processor(images=images, return_tensors="pt"))
        txt = model.get_text_features(**processor(text=captions, return_tensors="pt", padding=True, truncation=True))
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    cosine = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert result["clip_score"] == pytest.approx(max(100 * cosine.mean().item(), 0.0), abs=1e-3)
    assert result["mean_cosine"] == pytest.approx(result["clip_score"] / 100)

    # The saved images read back give the same score (nothing generated).
    assert clip.main([str(tmp_path / "gen"), "--prompts", str(prompts), "--clip-model", str(clip_dir), "--prefix",
                      "a ", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["clip_score"] == pytest.approx(result["clip_score"], abs=1e-4)
    with pytest.raises(SystemExit, match="--clip-model: .*nowhere is not a saved CLIPModel folder"):
        clip.main([str(pipeline), "--prompts", str(prompts), "--clip-model", str(tmp_path / "nowhere")])


def test_clip_architecture_names_the_paper_models():
    from transformers import CLIPConfig

    clip = _script("eval_clip")
    vit_l = CLIPConfig(vision_config={"hidden_size": 1024, "num_hidden_layers": 24, "patch_size": 14,
                                          "num_attention_heads": 16})
    vit_g = CLIPConfig(vision_config={"hidden_size": 1408, "num_hidden_layers": 40, "patch_size": 14,
                                          "num_attention_heads": 16})
    assert clip.clip_architecture(vit_l) == "ViT-L/14 (224 px)"
    assert clip.clip_architecture(vit_g) == "ViT-g/14 (224 px)"


def test_speed_rows_are_medians_and_ratios_to_the_teacher():
    bench = _script("bench_speed")
    measured = [{"name": "teacher", "seconds": [4.0, 2.0, 9.0], "steps": 25, "cfg": True, "guidance": 7.5},
                {"name": "student 1 step", "seconds": [0.5, 0.1, 0.1], "steps": 1, "cfg": False, "guidance": 1.0}]
    teacher, student = bench.speed_rows(measured, batch_size=2)
    assert teacher["seconds_per_call"] == 4.0 and teacher["ms_per_image"] == 2000.0 and teacher["nfe"] == 50
    assert teacher["images_per_second"] == 0.5 and teacher["speedup"] == teacher["throughput_ratio"] == 1.0
    assert student["seconds_per_call"] == 0.1 and student["nfe"] == 1 and student["cfg"] == "no"
    assert student["speedup"] == pytest.approx(40.0) and student["throughput_ratio"] == pytest.approx(40.0)
    assert student["images_per_second"] == pytest.approx(20.0)


def test_bench_speed_teacher_with_cfg_against_the_same_folder_at_fewer_steps(sd15, tmp_path, capsys):
    pipeline, prompts = sd15
    bench = _script("bench_speed")
    out = tmp_path / "speed.json"
    assert bench.main([str(pipeline), str(pipeline), "--prompts", str(prompts), "--teacher-steps", "10",
                       "--teacher-guidance", "3", "--student-steps", "1", "2", "--batch-size", "2", "--warmup", "1",
                       "--repeats", "3", "--image-size", "16", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    teacher, one, two = result["rows"]
    assert [r["name"] for r in result["rows"]] == ["teacher", "student 1 step", "student 2 steps"]
    assert (teacher["steps"], teacher["cfg"], teacher["nfe"], teacher["guidance"]) == (10, "yes", 20, 3.0)
    assert (one["steps"], one["cfg"], one["nfe"], one["guidance"]) == (1, "no", 1, 1.0)  # no distill.json: 1.0, off
    assert (two["steps"], two["nfe"]) == (2, 2) and result["batch"] == 2
    for r in result["rows"]:
        assert r["repeats"] == 3 and r["ms_per_image"] == pytest.approx(1000 * r["seconds_per_call"] / 2)
        assert r["speedup"] == pytest.approx(teacher["ms_per_image"] / r["ms_per_image"])
    assert teacher["speedup"] == 1.0 and one["speedup"] > 1  # 20 network evaluations against 1
    assert "speed-up" in printed and "only the ratios are indicative" in printed
    with pytest.raises(SystemExit, match="--student-steps: must be at least 1, got 0"):
        bench.main([str(pipeline), str(pipeline), "--prompts", str(prompts), "--student-steps", "0"])
    with pytest.raises(SystemExit, match="not a diffusers pipeline folder"):
        bench.main([str(tmp_path), str(pipeline), "--prompts", str(prompts), "--repeats", "1", "--warmup", "0"])
    one_step = tmp_path / "one_step"  # a distill export trained for one step, asked for two
    one_step.mkdir()
    (one_step / "distill.json").write_text(json.dumps({"num_inference_steps": 1, "call": "pipe(num_inference_steps=1)"}))
    with pytest.raises(SystemExit, match=r"--student-steps: 2 steps asked, but .*one_step was trained for 1 step "
                                         r"\(num_inference_steps in its distill.json\).*Ask for 1 to 1"):
        bench.main([str(pipeline), str(one_step), "--prompts", str(prompts), "--student-steps", "1", "2"])


def test_an_image_depends_on_its_seed_not_on_the_batch(sd15):
    pipeline, prompts = sd15
    pipe = load_pipeline(pipeline)
    settings = call_settings(pipe, pipeline, steps=2, size=16)
    assert settings.guidance_scale == 7.5 and "guidance: pipeline default" in settings.source
    prompts = read_prompts(prompts)[:4]
    one_by_one = torch.cat([images for _, images in generate(pipe, prompts, settings, seed=3, batch_size=1)])
    batched = torch.cat([images for _, images in generate(pipe, prompts, settings, seed=3, batch_size=4)])
    assert one_by_one.dtype == torch.uint8 and one_by_one.shape == (4, 3, 16, 16)
    assert (one_by_one.int() - batched.int()).abs().max() <= 1
    # Image i is drawn with seed + i: the second prompt at seed 3 is the first of the list from it at seed 4.
    (_, later), = generate(pipe, prompts[1:], settings, seed=4, batch_size=4)
    assert (later[0].int() - batched[1].int()).abs().max() <= 1
    assert (later[1].int() - batched[1].int()).abs().float().mean() > 5  # another prompt and seed: another image


def test_a_distill_export_brings_its_steps_guidance_and_size(sd15, tmp_path):
    pipeline, _ = sd15
    student = tmp_path / "student"
    shutil.copytree(pipeline, student)
    (student / "distill.json").write_text(json.dumps({
        "num_inference_steps": 2, "resolution": 16,
        "call": 'pipe("a photo of a cat", num_inference_steps=2, guidance_scale=0.0, height=16, width=16)'}))
    pipe = load_pipeline(student)
    settings = call_settings(pipe, student)
    assert (settings.steps, settings.guidance_scale, settings.size) == (2, 0.0, 16)
    assert settings.kwargs() == {"num_inference_steps": 2, "guidance_scale": 0.0, "height": 16, "width": 16}
    assert call_settings(pipe, student, steps=4, guidance_scale=2.0).kwargs()["guidance_scale"] == 2.0
    assert call_settings(pipe, pipeline).steps == 50  # StableDiffusionPipeline's default


def test_the_exports_other_call_arguments_are_repeated_and_a_broken_call_is_named(tmp_path):
    # PixArt's export states use_resolution_binning=False: without it the pipeline resizes to the nearest bin.
    student = tmp_path / "student"
    student.mkdir()
    meta = {"num_inference_steps": 1, "resolution": 256,
            "call": 'pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0, height=256, width=256, '
                    'use_resolution_binning=False)'}
    (student / "distill.json").write_text(json.dumps(meta))

    class Pipe:  # call_settings reads only the signature's defaults, which every value above overrides
        def __call__(self, prompt=None, num_inference_steps=20, guidance_scale=4.5):
            pass

    settings = call_settings(Pipe(), student)
    assert settings.kwargs() == {"use_resolution_binning": False, "num_inference_steps": 1, "guidance_scale": 1.0,
                                 "height": 256, "width": 256}
    assert "use_resolution_binning=False from distill.json" in settings.source
    assert call_settings(Pipe(), tmp_path).kwargs() == {"num_inference_steps": 20, "guidance_scale": 4.5}
    (student / "distill.json").write_text(json.dumps({**meta, "call": "pipe(num_inference_steps=one)"}))
    with pytest.raises(BadInput, match=r"distill.json: its 'call' is not a pipeline call with literal arguments"):
        call_settings(Pipe(), student)


def test_prompts_from_text_and_coco_captions(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\n\n  second  \nthird\nfourth\n")
    assert read_prompts(text) == ["first", "second", "third", "fourth"]
    assert read_prompts(text, 2) == ["first", "second"]
    drawn = read_prompts(text, 2, subset_seed=1)
    assert len(drawn) == 2 and drawn == read_prompts(text, 2, subset_seed=1) and set(drawn) <= set(read_prompts(text))
    assert [read_prompts(text).index(p) for p in drawn] == sorted(read_prompts(text).index(p) for p in drawn)
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 9, "id": 5, "caption": "nine, second caption"}, {"image_id": 9, "id": 2, "caption": "nine "},
        {"image_id": 3, "id": 7, "caption": "three"}]}))
    assert read_prompts(coco) == ["three", "nine"]  # images by id, each its first caption (lowest annotation id)
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(BadInput, match="not a COCO captions file"):
        read_prompts(tmp_path / "other.json")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(BadInput, match="holds no prompts"):
        read_prompts(tmp_path / "blank.txt")


def test_center_crop_resize_and_uint8_conversion():
    img = Image.new("RGB", (30, 10), (0, 0, 0))
    img.paste((255, 0, 0), (10, 0, 20, 10))  # the centred 10 x 10 square is red
    out = center_crop_resize(img, 4, "bicubic")
    assert out.size == (4, 4) and np.asarray(out)[..., 0].min() == 255 and np.asarray(out)[..., 1].max() == 0
    floats = np.array([[[[0.0, 0.5, 1.0]]]], dtype=np.float32)  # (1, 1, 1, 3)
    assert uint8_images(floats).flatten().tolist() == [0, 128, 255]
