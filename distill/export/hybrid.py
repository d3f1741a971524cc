"""The hybrid sampler's export (`distill.models.hybrid`, diversity distillation): one folder holding the teacher,
the student's stock pipeline, `hybrid.json` (the hand-over and the teacher's sigmas) and a model card whose code
(:data:`HYBRID_LOOP`, diffusers and torch only, no distill import, no remote code) reproduces
:func:`distill.models.hybrid.hybrid_sample`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distill.base.paths import resolve_path
from distill.export.pipeline import replace_dir
from distill.models.hybrid import check_pair, handover_sigma, load_pair, teacher_grid
from distill.models.sampling import SOLVERS, unit_grid

HYBRID_LOOP = '''import json

import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


def load_hybrid(folder):
    """(teacher UNet, student pipeline, hybrid.json) of a hybrid folder."""
    meta = json.load(open(f"{folder}/hybrid.json"))
    teacher = UNet2DModel.from_pretrained(f"{folder}/{meta['teacher']}", subfolder="unet").eval()
    return teacher, DiffusionPipeline.from_pretrained(f"{folder}/{meta['student']}"), meta


@torch.no_grad()
def sample_hybrid(teacher, pipe, meta, class_labels, generator=None):
    """Images in [0, 1], (N, C, H, W): the teacher's ODE to the hand-over level, then the student's pipeline."""
    labels = torch.as_tensor(class_labels)
    c = pipe.unet.config
    x = randn_tensor((len(labels), c.in_channels, c.sample_size, c.sample_size), generator=generator)
    sigmas, sd, w = meta["teacher_sigmas"], meta["sigma_data"], meta["guidance_scale"]
    null = torch.full_like(labels, teacher.config.num_class_embeds - 1)

    def teacher_x0(x, sigma):  # EDM preconditioning (Karras et al. 2022, Table 1), c_noise = 250 log(sigma)
        s = torch.full((len(x),), sigma, dtype=torch.float32)
        c_in = (1 / (s**2 + sd**2).sqrt()).view(-1, 1, 1, 1)
        t = meta["noise_scale"] * torch.log(s + 1e-44)
        out = teacher(x * c_in, t, class_labels=labels).sample
        if w != 1.0:  # classifier-free guidance: uncond + w (cond - uncond)
            uncond = teacher(x * c_in, t, class_labels=null).sample
            out = uncond + w * (out - uncond)
        s = s.view(-1, 1, 1, 1)
        return sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * out

    n = meta["handover_step"]
    if n == 0:
        x = x * pipe.scheduler.init_noise_sigma
    else:  # DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in the teacher's sigmas; alpha = 1, lambda = -log(sigma)
        x = x * sigmas[0]
        prev = None
        for i in range(len(sigmas) - 1):
            x0 = teacher_x0(x, sigmas[i])
            if sigmas[i + 1] == 0:
                x = x0
                break
            h = torch.log(torch.tensor(sigmas[i] / sigmas[i + 1], dtype=torch.float64)).item()
            d = x0
            if prev is not None and meta["solver_order"] == 2:
                r = prev[1] / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev[0]
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(torch.tensor(-h, dtype=torch.float64)).item() * d
            prev = (x0, h)
    if n < meta["student_steps"]:  # ConsistencyModelPipeline's own loop, from step n
        pipe.scheduler.set_timesteps(**meta["student_schedule"])
        for t in pipe.scheduler.timesteps[n:]:
            out = pipe.unet(pipe.scheduler.scale_model_input(x, t), t, class_labels=labels, return_dict=False)[0]
            x = pipe.scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
    return (x / 2 + 0.5).clamp(0, 1)
'''


def _copy_folder(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".tmp-*", ".old-*"))


def export_hybrid(teacher_folder: str | Path, student_folder: str | Path, out_dir: str | Path, n: int,
                  teacher_steps: int = 1, guidance_scale: float = 1.0, solver: str = "dpm_solver_2m") -> Path:
    """Write the hybrid with n teacher steps to `out_dir`: `teacher/` (a copy of the teacher folder), `student/` (a
    copy of the student's pipeline folder), `hybrid.json` (the hand-over and the teacher's sigmas) and a model card
    whose code (:data:`HYBRID_LOOP`) reproduces :func:`hybrid_sample` with diffusers and torch alone."""
    teacher_folder, student_folder, out_dir = resolve_path(str(teacher_folder)), Path(student_folder), Path(out_dir)
    teacher, student, schedule, call = load_pair(teacher_folder, student_folder)
    check_pair(teacher, student, schedule)
    sigma = handover_sigma(schedule, n)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {list(SOLVERS)}")
    if n == 0:
        sigmas: list[float] = []
    elif sigma == 0.0:  # the teacher's own sampler (sampling.sample): its grid, ending at the data
        sigmas = teacher.process.from_unit(unit_grid(teacher_steps)).double().tolist()
        sigmas[-1] = 0.0
    else:
        sigmas = teacher_grid(teacher.process, sigma, teacher_steps).double().tolist()
    k = schedule.num_steps
    meta = {"teacher": "teacher", "student": "student", "student_steps": k, "student_schedule": call,
            "handover_step": n, "handover_sigma": sigma, "teacher_steps": teacher_steps if n else 0,
            "teacher_sigmas": sigmas, "solver": solver, "solver_order": SOLVERS[solver],
            "guidance_scale": guidance_scale, "sigma_data": teacher.process.sigma_data,
            "noise_scale": teacher.process.noise_scale}
    args = ", ".join(f"{key}={value}" for key, value in call.items())
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _copy_folder(teacher_folder, tmp / "teacher")
    _copy_folder(student_folder, tmp / "student")
    (tmp / "hybrid.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.md").write_text(
        "---\nlibrary_name: diffusers\ntags: [distill, diversity-distillation, hybrid-sampling]\n---\n\n"
        f"# Hybrid sampler: {n} teacher step(s), then the {k}-step student\n\n"
        "Diversity distillation (Gandikota & Bau 2025, arXiv 2503.10637): the teacher (`teacher/`, a multi-step EDM "
        f"UNet2DModel) integrates its probability-flow ODE from sigma_max down to sigma = {sigma:.6g} in "
        f"{meta['teacher_steps']} {solver} step(s); the distilled student (`student/`, a stock "
        f"`ConsistencyModelPipeline`) continues from its step {n} of {k} with that state as the step's input. "
        "diffusers and torch only, no custom pipeline class, no remote code:\n\n"
        f"```python\n{HYBRID_LOOP}\n"
        f"teacher, pipe, meta = load_hybrid(\"{out_dir.name}\")\n"
        "images = sample_hybrid(teacher, pipe, meta, class_labels=[0, 1, 2, 3], "
        "generator=torch.Generator().manual_seed(0))\n```\n\n"
        f"- hand-over: student step {n} (sigma {sigma:.6g}); 0 would be the student alone, {k} the teacher alone\n"
        f"- teacher: {meta['teacher_steps']} solver step(s) over its Karras ramp down to the hand-over level, "
        f"classifier-free guidance {guidance_scale} (uncond + w (cond - uncond))\n"
        f"- student: its pipeline's schedule (`scheduler.set_timesteps({args})`), steps {n}..{k - 1}\n"
        "- seeding: `generator=` fixes the sample: it draws the start noise, then the student's re-noising\n"
        "- classes: 0..9\n")
    replace_dir(tmp, out_dir)
    return out_dir
