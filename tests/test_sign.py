"""SIGN against the math: IGN's idempotence residual (zero for a projection, its gradient by finite differences and
routed through the inner application only), the score-based term's gradient as the closed-form score difference on
a Gaussian and, in expectation, the gradient of KL between the noised distributions; re-application at sigma_min is
the identity of the consistency-model parametrization; the recipe trains only its own networks, reduces to DMD2
with the idempotence term off, reports its residual, refuses bad configs by name, and its exports reproduce
`recipe.generate` at 1 and 2 steps in a process that never imports distill."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tiny import sample_exports_cleanly, tiny_overrides

from distill.base.errors import ConfigError
from distill.recipes.dmd2 import dmd_gradient, dmd_loss
from distill.recipes.sign import idempotence_loss, reapplication_input, score_idempotence_loss
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.registry import build_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(teacher, run, *extra):
    return load_config("digits/sign.yaml", tiny_overrides(teacher, run, *extra))


# ---------------------------------------------------------------------------------------------------------------
# IGN's idempotence residual
# ---------------------------------------------------------------------------------------------------------------


def test_a_projection_has_zero_idempotence_loss_and_other_maps_do_not(f64):
    g = torch.Generator().manual_seed(0)
    B = torch.randn(5, 2, generator=g, dtype=torch.float64)
    C = torch.randn(2, 5, generator=g, dtype=torch.float64)
    P = B @ torch.linalg.inv(C @ B) @ C  # an oblique projection onto span(B): P P = P, P != P^T
    torch.testing.assert_close(P @ P, P)
    z = torch.randn(64, 5, generator=g, dtype=torch.float64)
    y = z @ P.T  # f(z)
    assert idempotence_loss(y @ P.T, y).abs().max() < 1e-24  # f(f(z)) = f(z)
    A = P + 0.1 * torch.randn(5, 5, generator=g, dtype=torch.float64)  # not idempotent
    y = z @ A.T
    expected = (y @ A.T - y).pow(2).sum(1) / 5
    torch.testing.assert_close(idempotence_loss(y @ A.T, y), expected)
    assert expected.min() > 0


def test_idempotence_gradient_is_routed_through_the_inner_application(f64):
    """L(theta) = ||f_theta'(f_theta(z)) - f_theta(z)||^2 / D with theta' a frozen copy: autograd's gradient in theta
    equals the finite difference that moves the inner weights only, and in y = f(z) it is 2 (J^T - I)(f(y) - y) / D."""
    torch.manual_seed(1)
    inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()).double()
    outer = copy.deepcopy(inner).requires_grad_(False)  # IGN's theta' (the trainer's target network, decay 0)
    z = torch.randn(8, 4, dtype=torch.float64)

    def loss(w):
        y = torch.tanh(torch.nn.functional.linear(z, w, inner[0].bias))
        return idempotence_loss(outer(y), y).mean()

    w = inner[0].weight
    loss(w).backward()
    fd = torch.zeros_like(w)
    for i in range(4):
        for j in range(4):
            e = torch.zeros_like(w)
            e[i, j] = 1e-6
            with torch.no_grad():
                fd[i, j] = (loss(w + e) - loss(w - e)) / 2e-6
    assert fd.abs().max() > 1e-3
    torch.testing.assert_close(w.grad, fd, rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in outer.parameters())
    # In y: through the outer's input (its Jacobian J) and the target slot.
    y = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    idempotence_loss(outer(y), y).sum().backward()
    J = torch.autograd.functional.jacobian(lambda v: outer(v).sum(0), y.detach()).permute(1, 0, 2)  # (N, out, in)
    residual = (outer(y) - y).detach()
    expected = 2 * (torch.einsum("noi,no->ni", J, residual) - residual) / 4
    torch.testing.assert_close(y.grad, expected)


def test_reapplication_at_sigma_min_is_the_identity(tiny_teacher):
    """The trivial re-application: at sigma_min the CM boundary scalings make any network the identity
    (c_skip = 1, c_out = 0) and the pipeline adds (almost) no noise, so f(f(z)) = f(z) holds by construction there."""
    recipe, _ = build_recipe(_config(tiny_teacher, Path("/nonexistent")), torch.device("cpu"))
    student, sched = recipe.generator, recipe.schedule
    y = torch.randn(3, 1, 8, 8)
    noise = torch.randn(3, 1, 8, 8)
    s_min = torch.tensor([sched.sigma_min])
    # the pipeline's noise sqrt(sigma^2 - sigma_min^2) is zero up to float32's rounding of sigma_min (6e-7)
    torch.testing.assert_close(reapplication_input(sched, y, s_min, noise), y, rtol=0, atol=5e-6)
    assert torch.equal(student(y, s_min.expand(3), {"class_labels": torch.tensor([1, 2, 3])}), y)
    # Above sigma_min: the pipeline's re-noising y + sqrt(sigma^2 - sigma_min^2) n.
    s = torch.tensor([0.1])
    expected = y + (0.1**2 - sched.sigma_min**2) ** 0.5 * noise
    torch.testing.assert_close(reapplication_input(sched, y, s, noise), expected)


# ---------------------------------------------------------------------------------------------------------------
# The score-based term on a Gaussian: real N(mu, c^2), the student's y = m + s z, re-noised y_sigma = y + sigma n
# ---------------------------------------------------------------------------------------------------------------

MU, C = torch.tensor([0.3, -0.6, 0.1]), torch.tensor([0.4, 0.25, 0.6])


def gaussian_projector(x, sigma, mean, std):
    """E[x0 | x0 + sigma n = x] for x0 ~ N(mean, std^2): the exact denoiser (projector) at level sigma."""
    return mean + std**2 / (std**2 + sigma[:, None] ** 2) * (x - mean)


def gaussian_score(x, sigma, mean, std):
    """grad log of N(mean, std^2 + sigma^2) at x."""
    return -(x - mean) / (std**2 + sigma[:, None] ** 2)


def test_score_term_gradient_is_the_closed_form_score_difference(f64):
    g = torch.Generator().manual_seed(2)
    m, s = torch.tensor([-0.2, 0.4, 0.5]), torch.tensor([0.7, 0.1, 0.3])
    y = (m + s * torch.randn(256, 3, generator=g)).requires_grad_(True)
    sigma = torch.rand(256, generator=g) * 3 + 0.05
    y_s = y.detach() + sigma[:, None] * torch.randn(256, 3, generator=g)
    p_real, p_fake = gaussian_projector(y_s, sigma, MU, C), gaussian_projector(y_s, sigma, m, s)
    score_idempotence_loss(y, p_real, p_fake, normalize=False).sum().backward()
    score_gap = gaussian_score(y_s, sigma, m, s) - gaussian_score(y_s, sigma, MU, C)  # grad log q - grad log p
    assert score_gap.abs().mean() > 0.05
    torch.testing.assert_close(y.grad, sigma[:, None] ** 2 * score_gap / 3)
    # The value is the teacher projector's idempotence residual minus the fake one's, halved.
    value = score_idempotence_loss(y.detach(), p_real, p_fake, normalize=False)
    torch.testing.assert_close(value, 0.5 * ((y - p_real).pow(2) - (y - p_fake).pow(2)).detach().mean(1))
    # Normalised, the gradient is DMD2's exactly; and it vanishes where the projectors agree.
    y.grad = None
    score_idempotence_loss(y, p_real, p_fake).sum().backward()
    x = y.detach().clone().requires_grad_(True)
    dmd_loss(x, dmd_gradient(x.detach(), p_real, p_fake)).sum().backward()
    torch.testing.assert_close(y.grad, x.grad)
    y.grad = None
    score_idempotence_loss(y, p_real, p_real.clone()).sum().backward()
    assert torch.equal(y.grad, torch.zeros_like(y))


def test_score_term_descends_the_kl_between_the_noised_distributions(f64):
    """E over (z, n) of the parameter gradient (w = 1) is sigma^2 / D times grad_(m, s) KL(N(m, s^2 + sigma^2) ||
    N(mu, c^2 + sigma^2)), per coordinate, in closed form."""
    g = torch.Generator().manual_seed(3)
    m = torch.tensor([-0.2, 0.4, 0.5], requires_grad=True)
    s = torch.tensor([0.7, 0.1, 0.3], requires_grad=True)
    n, sig = 400_000, 0.8
    sigma = torch.full((n,), sig)
    y = m + s * torch.randn(n, 3, generator=g)
    y_s = y.detach() + sig * torch.randn(n, 3, generator=g)
    with torch.no_grad():
        p_real, p_fake = gaussian_projector(y_s, sigma, MU, C), gaussian_projector(y_s, sigma, m, s)
    score_idempotence_loss(y, p_real, p_fake, normalize=False).mean().backward()
    vq, vp = s.detach() ** 2 + sig**2, C**2 + sig**2
    dkl_dm = (m.detach() - MU) / vp
    dkl_ds = s.detach() / vp - s.detach() / vq
    torch.testing.assert_close(m.grad, sig**2 * dkl_dm / 3, rtol=0.02, atol=2e-4)
    torch.testing.assert_close(s.grad, sig**2 * dkl_ds / 3, rtol=0.02, atol=2e-4)


# ---------------------------------------------------------------------------------------------------------------
# The recipe on the tiny teacher
# ---------------------------------------------------------------------------------------------------------------


def test_generator_and_critic_updates_train_only_their_own_networks(tiny_teacher):
    cfg = _config(tiny_teacher, Path("/nonexistent"), "student.num_steps=2", "teacher.guidance_scale=1.5")
    recipe, data = build_recipe(cfg, torch.device("cpu"))
    assert recipe.target_decay == 0.0  # IGN's frozen copy theta' = theta, refreshed after every update
    target = copy.deepcopy(recipe.generator).requires_grad_(False)
    batch = data.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with update_nets(recipe, "generator", target=target) as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and logs["idempotence_loss"] > 0 and logs["projector_gap"] > 0
    assert all(p.grad is not None for p in recipe.generator.parameters())
    for net in (recipe.teacher, recipe.critic, target):
        assert all(p.grad is None for p in net.parameters())
    recipe.generator.zero_grad(set_to_none=True)
    with update_nets(recipe, "critic", target=target) as nets:
        recipe.critic_loss(nets, batch, 0)[0].backward()
    assert all(p.grad is not None for p in recipe.critic.parameters())
    assert all(p.grad is None for p in recipe.generator.parameters())
    with update_nets(recipe, "generator") as nets, pytest.raises(RuntimeError, match="target network"):
        recipe.generator_loss(nets, batch, 0)


def _generator_grads(cfg, batch, target=None):
    recipe, _ = build_recipe(cfg, torch.device("cpu"))
    torch.manual_seed(7)
    with update_nets(recipe, "generator", target=target) as nets:
        loss, _ = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    return recipe, [p.grad.clone() for p in recipe.generator.parameters()]


def test_without_idempotence_the_gradient_is_dmd2s_and_with_it_differs(tiny_teacher):
    run = Path("/nonexistent")
    common = ("student.num_steps=2", "teacher.guidance_scale=1.5")
    data = build_recipe(_config(tiny_teacher, run, *common), torch.device("cpu"))[1]
    batch = data.sample(4, torch.Generator().manual_seed(1))
    dmd2_cfg = load_config("digits/dmd2.yaml", tiny_overrides(tiny_teacher, run, *common))
    _, ref = _generator_grads(dmd2_cfg, batch)
    recipe, off = _generator_grads(_config(tiny_teacher, run, *common, "recipe.idempotence_weight=0"), batch)
    assert recipe.target_decay is None
    for a, b in zip(off, ref):
        torch.testing.assert_close(a, b)
    recipe, on = _generator_grads(_config(tiny_teacher, run, *common), batch,
                                  target=copy.deepcopy(recipe.generator).requires_grad_(False))
    assert max((a - b).abs().max().item() for a, b in zip(on, ref)) > 1e-6


def test_diagnostics_is_the_residual_of_one_more_pipeline_step(tiny_teacher):
    recipe, _ = build_recipe(_config(tiny_teacher, Path("/nonexistent"), "student.num_steps=2"), torch.device("cpu"))
    cond = {"class_labels": torch.tensor([0, 4, 9, 2])}
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    got = recipe.diagnostics(recipe.generator, cond, noise)
    torch.manual_seed(11)
    with torch.no_grad():
        y = recipe.generate(recipe.generator, cond, noise)
        s, s_min = 0.1, recipe.schedule.sigma_min
        renoise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(0))
        again = recipe.generator(y + (s**2 - s_min**2) ** 0.5 * renoise, torch.full((4,), s), cond)
    expected = (again.clamp(-1, 1) - y).pow(2).mean().item()
    assert set(got) == {"idempotence_residual"} and expected > 0
    assert got["idempotence_residual"] == pytest.approx(expected, rel=1e-5)


def test_diagnostics_renoises_a_batch_of_one_with_noise_other_than_its_own(tiny_teacher):
    """A batch of one cannot borrow another row's noise; re-using its own would re-noise y with the very noise
    that made it. The re-application noise comes from a fixed seed, so it differs and is reproducible."""
    recipe, _ = build_recipe(_config(tiny_teacher, Path("/nonexistent"), "student.num_steps=2"), torch.device("cpu"))
    cond = {"class_labels": torch.tensor([7])}
    noise = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)  # the 2-step rollout re-noises between its steps
    with torch.no_grad():
        y = recipe.generate(recipe.generator, cond, noise)
        s, s_min = 0.1, recipe.schedule.sigma_min
        own = recipe.generator(y + (s**2 - s_min**2) ** 0.5 * noise, torch.full((1,), s), cond)
    own_residual = (own.clamp(-1, 1) - y).pow(2).mean().item()
    residuals = []
    for _ in range(2):
        torch.manual_seed(11)
        residuals.append(recipe.diagnostics(recipe.generator, cond, noise)["idempotence_residual"])
    first = residuals[0]
    assert residuals[1] == first
    assert first != pytest.approx(own_residual, rel=1e-3)


@pytest.mark.parametrize("overrides, message", [
    (["recipe.idempotence_sigma=0.002"], "recipe.idempotence_sigma: 0.002 is outside the noise levels"),
    (["recipe.min_t=0.5", "recipe.max_t=0.4"], "recipe.min_t: must be < recipe.max_t (0.4), got 0.5"),
    (["recipe.score_weight=0"], "recipe.score_weight:"),
    (["recipe.idempotence_weight=-1"], "recipe.idempotence_weight:"),
    (["recipe.tightness_weight=1"], "unknown config key recipe.tightness_weight"),  # IGN's L_tight: left out
])
def test_bad_config_is_refused_by_name(tiny_teacher, overrides, message):
    with pytest.raises(ConfigError) as e:
        build_recipe(_config(tiny_teacher, Path("/nonexistent"), *overrides), torch.device("cpu"))
    assert str(e.value).startswith(message), str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# A few updates, and the export: a clean process (distill unimportable) samples each pipeline
# ---------------------------------------------------------------------------------------------------------------

def test_few_updates_train_the_student_and_the_export_reproduces_generate(tiny_teacher, tmp_path):
    from distill.models.denoiser import load_denoiser
    from distill.training.trainer import Trainer

    labels, seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234
    teacher_before = {k: v.clone() for k, v in load_denoiser(tiny_teacher).state_dict().items()}
    runs, reference = {}, {}
    for steps in (1, 2):
        trainer = Trainer(_config(tiny_teacher, tmp_path / f"k{steps}", "run.max_steps=3", "export.at_end=true",
                                  "trainer.ema_decay=0.5", f"student.num_steps={steps}"))
        recipe = trainer.recipe
        before = {k: v.clone() for k, v in recipe.generator.state_dict().items()}
        folder = trainer.train()
        assert any(not torch.equal(v, before[k]) for k, v in recipe.generator.state_dict().items())
        for k, v in recipe.teacher.state_dict().items():
            assert torch.equal(v, teacher_before[k]), f"the teacher changed: {k}"
        for t, p in zip(trainer.target_network.parameters(), recipe.generator.parameters()):
            assert torch.equal(t, p)  # decay 0: the frozen copy is the student after its last update
        meta = json.loads((folder / "distill.json").read_text())
        assert meta["num_inference_steps"] == steps
        runs[steps] = {"folder": str(folder), "steps": steps}
        with torch.no_grad(), trainer.ema_weights() as gen:
            torch.manual_seed(seed)
            noise = torch.randn(len(labels), 1, 8, 8)
            x0 = recipe.generate(gen, {"class_labels": torch.tensor(labels)}, noise)
        reference[steps] = (x0 / 2 + 0.5).clamp(0, 1)
    got = sample_exports_cleanly(runs, labels, seed, tmp_path)
    for steps in (1, 2):
        assert reference[steps].std() > 0.01
        torch.testing.assert_close(got[str(steps)], reference[steps], atol=2e-5, rtol=1e-4, msg=f"{steps} steps")
