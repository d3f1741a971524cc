"""Diversity distillation's hybrid sampler and control transfer (arXiv 2503.10637), on the tiny fixtures.

The hybrid with no teacher step is the student's rollout and with every step the teacher's sampler; the student's
input at the hand-over is the teacher's ODE state at the student's level (and that state is the closed-form ODE
solution on a Gaussian); the exported folder's model card, run in a process that cannot import distill, reproduces
the samples. A LoRA trained on the teacher leaves the teacher's weights untouched, loads into the student with every
module matched, changes nothing while zero, fuses into a stock pipeline; bad input is refused by name."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from tiny import NO_DISTILL, subprocess_env, tiny_unet

from distill.export.hybrid import export_hybrid
from distill.export.pipeline import export_pipeline
from distill.models.adapters import AdapterDenoiser
from distill.models.denoiser import Denoiser, load_denoiser
from distill.models.hybrid import (
    handover_sigma,
    hybrid_sample,
    load_pair,
    matching_teacher_steps,
    teacher_grid,
    teacher_state,
)
from distill.models.lora_transfer import add_style_lora, apply_lora, dilate, ink, train_lora
from distill.models.sampling import sample
from distill.models.schedules import rollout, student_from_teacher
from distill.parametrization import EDMProcess

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # the tiny student's steps


@pytest.fixture(scope="module")
def pair(tiny_teacher, tmp_path_factory):
    """(teacher folder, student pipeline folder, teacher, student, schedule): the student is the tiny teacher with
    perturbed weights under the consistency parametrization, exported as a 3-step ConsistencyModelPipeline."""
    teacher = load_denoiser(tiny_teacher, prediction="edm")
    student = student_from_teacher(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = export_pipeline(student, tmp_path_factory.mktemp("student") / "student", num_steps=K)
    teacher, student, schedule, _ = load_pair(tiny_teacher, folder)
    return tiny_teacher, folder, teacher, student, schedule


def _inputs(n=6, seed=0):
    cond = {"class_labels": torch.arange(n) % 10}
    return cond, torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# The hybrid sampler
# ---------------------------------------------------------------------------------------------------------------


def test_no_teacher_step_is_the_students_rollout_and_every_step_the_teachers_sampler(pair):
    _, _, teacher, student, schedule = pair
    cond, noise = _inputs()
    torch.manual_seed(3)
    hybrid = hybrid_sample(teacher, student, schedule, cond, noise, handover_sigma(schedule, 0))
    torch.manual_seed(3)
    with torch.no_grad():
        alone = rollout(student, schedule, cond, noise)
    assert torch.equal(hybrid, alone)
    hybrid = hybrid_sample(teacher, student, schedule, cond, noise, handover_sigma(schedule, K), teacher_steps=4)
    assert torch.equal(hybrid, sample(teacher, cond, noise, num_steps=4))


class _Spy(torch.nn.Module):
    """The student, recording the input and level of every call."""

    def __init__(self, inner: Denoiser):
        super().__init__()
        self.inner, self.model, self.calls = inner, inner.model, []

    def forward(self, x, t, cond):
        self.calls.append((x.clone(), t.clone()))
        return self.inner(x, t, cond)


@pytest.mark.parametrize("n", [1, 2])
def test_the_students_input_at_the_hand_over_is_the_teachers_ode_state_at_its_level(pair, n):
    _, _, teacher, student, schedule = pair
    cond, noise = _inputs()
    spy = _Spy(student)
    sigma = handover_sigma(schedule, n)
    hybrid_sample(teacher, spy, schedule, cond, noise, sigma, teacher_steps=3)
    assert len(spy.calls) == K - n
    x, t = spy.calls[0]
    assert torch.equal(t, schedule.t(n, 6, x.device))
    assert torch.equal(x, teacher_state(teacher, cond, noise, sigma, 3))


class _GaussianX0(torch.nn.Module):
    """The exact x0 of data N(mu, s0^2) per pixel under EDM noise, from the network's inputs (c_in x, 250 log sigma)."""

    mu, s0, sd = 0.3, 0.4, 0.5

    def forward(self, x_in, time):
        sigma = (time / 250.0).exp().view(-1, 1, 1, 1)
        x = x_in * (sigma**2 + self.sd**2).sqrt()
        return self.mu + self.s0**2 / (self.s0**2 + sigma**2) * (x - self.mu)


class _CallFamily:
    def call(self, model, x_in, time, cond):
        return model(x_in, time)


def test_the_teacher_state_is_the_closed_form_ode_solution_on_a_gaussian():
    """For data N(mu, s0^2) the probability-flow ODE keeps (x - mu) / sqrt(s0^2 + sigma^2) constant."""
    g = _GaussianX0()
    teacher = Denoiser(g, EDMProcess(), "x0", family=_CallFamily())
    _, noise = _inputs()
    x = teacher_state(teacher, {}, noise, 2.0, 40)
    exact = g.mu + (80.0 * noise - g.mu) * ((g.s0**2 + 2.0**2) / (g.s0**2 + 80.0**2)) ** 0.5
    torch.testing.assert_close(x, exact, rtol=1e-3, atol=2e-3)


def test_the_teacher_grid_ends_on_the_hand_over_level_and_counts_steps_as_the_papers_code():
    process = EDMProcess()
    ts = teacher_grid(process, 2.0, 5)
    assert len(ts) == 6 and float(ts[0]) == pytest.approx(80.0) and float(ts[-1]) == 2.0
    assert (ts[1:] < ts[:-1]).all()
    full = process.from_unit(torch.linspace(1, 0, 21, dtype=torch.float64))
    assert matching_teacher_steps(process, float(full[7]), 20) == 7  # a level of the 20-step grid: its index
    assert matching_teacher_steps(process, 0.0, 20) == 20 and matching_teacher_steps(process, 79.0, 20) == 1


def test_the_model_cards_code_reproduces_the_hybrid_without_distill(pair, tmp_path):
    teacher_folder, student_folder, teacher, student, schedule = pair
    cases = [(0, 1, 1.0), (1, 3, 1.5), (2, 2, 1.0), (K, 3, 1.0)]  # (n, teacher steps, guidance)
    script = NO_DISTILL + "\nimport torch\nresults = {}\n"
    for n, steps, w in cases:
        folder = export_hybrid(teacher_folder, student_folder, tmp_path / f"hybrid{n}", n, steps, w)
        card = (folder / "README.md").read_text()
        code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
        script += f"exec({code!r})\nresults[{n}] = images\n"
    script += f"torch.save(results, {str(tmp_path / 'out.pt')!r})\nassert not NoDistill.tried, NoDistill.tried\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    cond = {"class_labels": torch.tensor([0, 1, 2, 3])}
    for n, steps, w in cases:
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(4, 1, 8, 8, generator=g)
        ours = hybrid_sample(teacher, student, schedule, cond, noise, handover_sigma(schedule, n), steps, w,
                             generator=g)
        torch.testing.assert_close(results[n], (ours / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-5)


def test_bad_hand_over_and_mismatched_networks_are_refused_by_name(pair):
    _, _, teacher, student, schedule = pair
    cond, noise = _inputs()
    with pytest.raises(ValueError, match=r"sigma=5\.0 is not on the student's schedule"):
        hybrid_sample(teacher, student, schedule, cond, noise, 5.0)
    with pytest.raises(ValueError, match="teacher steps n=4"):
        handover_sigma(schedule, K + 1)
    from diffusers import UNet2DModel

    config = {k: v for k, v in student.model.config.items() if not k.startswith("_")}
    bigger = Denoiser(UNet2DModel.from_config({**config, "sample_size": 16}), student.process, "cm")
    with pytest.raises(ValueError, match="sample_size: teacher 8, student 16"):
        hybrid_sample(teacher, bigger, schedule, cond, noise, handover_sigma(schedule, 1))
    with pytest.raises(ValueError, match="unknown solver"):
        teacher_state(teacher, cond, noise, 2.0, 2, solver="heun")


# ---------------------------------------------------------------------------------------------------------------
# Control transfer
# ---------------------------------------------------------------------------------------------------------------


def _plain_weights(model):
    return {k.replace(".base_layer.", "."): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def test_dilation_thickens_strokes():
    x = -torch.ones(1, 1, 5, 5)
    x[..., 2, 2] = 1.0
    y = dilate(x)
    assert (y > 0).sum() == 5 and y[..., 1, 2] == 1 and y[..., 1, 1] == -1
    assert ink(y) > ink(x)


def test_a_teacher_lora_leaves_the_teacher_untouched_and_moves_to_the_student(pair, tmp_path):
    _, _, teacher, student, schedule = pair
    teacher = teacher.copy(trainable=False)
    before = _plain_weights(teacher.model)
    images = dilate(torch.rand(16, 1, 8, 8) * 2 - 1)
    role, losses = train_lora(teacher, images, torch.arange(16) % 10, steps=3, batch_size=4, lr=1e-2,
                              null_class=10)
    after = _plain_weights(teacher.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert len(losses) == 3
    state, config = role.lora_weights()
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # trained away from zero

    student_before = _plain_weights(student.model)
    styled = apply_lora(student, state, config)
    assert all(torch.equal(v, _plain_weights(student.model)[k]) for k, v in student_before.items())
    adapted = {p for p, m in styled.model.named_modules() if hasattr(m, "lora_A") and "style" in m.lora_A}
    assert adapted == set(config["target_modules"]) and len(adapted) == len(state) // 2
    got, _ = styled.lora_weights()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)

    cond, noise = _inputs()
    x, t = noise * 2.0, schedule.t(1, 6, noise.device)
    with torch.no_grad():
        out, plain = styled(x, t, cond), student(x, t, cond)
        assert not torch.allclose(out, plain)
        fused = styled.merged()
        torch.testing.assert_close(fused(x, t, cond), out, rtol=1e-5, atol=1e-5)
    folder = export_pipeline(fused, tmp_path / "styled", num_steps=K, drop_null_class=False)
    reloaded = load_denoiser(folder)
    assert reloaded.model.config.num_class_embeds == 10
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t, cond), out, rtol=1e-5, atol=1e-5)


def test_a_zero_lora_changes_nothing(pair):
    _, _, teacher, student, schedule = pair
    teacher = teacher.copy(trainable=False)
    role = add_style_lora(teacher)
    state, config = role.lora_weights()
    styled = apply_lora(student, state, config)
    cond, noise = _inputs()
    x, t = noise * 2.0, schedule.t(1, 6, noise.device)
    with torch.no_grad():
        assert torch.equal(styled(x, t, cond), student(x, t, cond))
        assert torch.equal(role(x, t, cond), AdapterDenoiser(teacher, None)(x, t, cond))


def test_a_lora_for_another_architecture_is_refused_by_module_name(pair):
    _, _, teacher, _, _ = pair
    role = add_style_lora(teacher.copy(trainable=False))
    state, config = role.lora_weights()
    no_attention = Denoiser(tiny_unet(attention=False), teacher.process, "cm")
    with pytest.raises(ValueError, match=r"module '.*attentions\.0\.to_q'.*architectures differ"):
        apply_lora(no_attention, state, config)
    wider = Denoiser(tiny_unet(), teacher.process, "cm")
    wider.model.conv_in = torch.nn.Conv2d(2, 8, 3, padding=1)  # a different weight shape, same name
    config = {**config, "target_modules": ["conv_in"]}
    a, b = torch.zeros(4, 1, 3, 3), torch.zeros(8, 4, 1, 1)
    with pytest.raises(ValueError, match="module 'conv_in' has weight"):
        apply_lora(wider, {"conv_in.lora_A.weight": a, "conv_in.lora_B.weight": b}, config)
