"""CRD against the math: the centred reward-matching loss is zero exactly at the KL-regularised optimum
p* = p_old exp(r / beta) / Z (a 1-D mixture, in closed form) and an Adam fit of a Gaussian lands on the tilted
Gaussian; centring makes a constant (per condition) added to the reward change nothing; the gradient is the
implementation's detached-mean form; the ELBO-weighted implicit reward is the log-density ratio and the KL estimate
the KL, for exact Gaussian denoisers; the recipe trains only the student, refuses bad configs by name, and a
3-update run changes the student (not the teacher or the classifier) and exports a pipeline that plain diffusers
loads and that reproduces `recipe.generate`; `init_from` starts from an exported folder."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tiny import sample_exports_cleanly, tiny_overrides

from distill.base.errors import ConfigError
from distill.parametrization import EDMProcess
from distill.recipes.crd import (
    centre,
    classifier_reward,
    crd_loss,
    edm_weight,
    elbo_weight,
    implicit_reward,
    ink_reward,
    kl_estimate,
)
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.registry import build_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(teacher, run, *extra):
    return load_config("digits/crd.yaml", tiny_overrides(teacher, run, "recipe.group_size=2",
                                                         "student.num_steps=2", *extra))


def normal_logpdf(x, m, s):
    return -0.5 * ((x - m) / s) ** 2 - torch.log(torch.as_tensor(s, dtype=x.dtype)) - 0.5 * math.log(2 * math.pi)


def mixture_logpdf(x, means, std, weights):
    comps = torch.stack([normal_logpdf(x, m, std) + math.log(w) for m, w in zip(means, weights)])
    return torch.logsumexp(comps, 0)


# ---------------------------------------------------------------------------------------------------------------
# The centred objective, with exact log-ratios
# ---------------------------------------------------------------------------------------------------------------

MEANS, STD, WEIGHTS = (-1.0, 0.5, 1.2), 0.3, (0.5, 0.3, 0.2)


def tilted_mixture(a: float, beta: float):
    """p_old(x) exp(a x / beta) / Z for p_old a Gaussian mixture of common std: again a mixture, each mean shifted
    by a std^2 / beta, each weight times exp(a m / beta + a^2 std^2 / (2 beta^2)), renormalised."""
    means = tuple(m + a * STD**2 / beta for m in MEANS)
    w = torch.tensor([wk * math.exp(a * m / beta + a**2 * STD**2 / (2 * beta**2)) for m, wk in zip(MEANS, WEIGHTS)])
    return means, tuple((w / w.sum()).tolist())


def test_centred_loss_is_zero_exactly_at_the_tilted_optimum(f64):
    a, beta, k = 0.7, 0.5, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g, dtype=torch.float64) * 1.5  # any samples: off-policy
    reward = a * x
    star = tilted_mixture(a, beta)
    log_ratio = mixture_logpdf(x, star[0], STD, star[1]) - mixture_logpdf(x, MEANS, STD, WEIGHTS)
    assert crd_loss(log_ratio, reward, beta, k).abs().max() < 1e-20
    # un-centred, log Z(c) would be left over: beta l - r = -beta log Z, not zero
    assert (beta * log_ratio - reward).abs().min() > 1e-3
    # p_old itself, the tilt of another beta, and the tilt of another reward are not optimal
    for other in (torch.zeros_like(x),
                  mixture_logpdf(x, *tilted_mixture(a, 2 * beta)[:1], STD, tilted_mixture(a, 2 * beta)[1])
                  - mixture_logpdf(x, MEANS, STD, WEIGHTS)):
        assert crd_loss(other, reward, beta, k).mean() > 1e-3


def test_a_constant_per_condition_added_to_the_reward_changes_nothing(f64):
    g = torch.Generator().manual_seed(1)
    log_ratio = torch.randn(24, generator=g, dtype=torch.float64, requires_grad=True)
    reward = torch.randn(24, generator=g, dtype=torch.float64)
    shift = torch.tensor([3.0, -7.0, 0.5], dtype=torch.float64).repeat_interleave(8)  # one constant per group
    base = crd_loss(log_ratio, reward, 0.3, 8)
    (grad,) = torch.autograd.grad(base.sum(), log_ratio)
    shifted = crd_loss(log_ratio, reward + shift, 0.3, 8)
    (grad_shifted,) = torch.autograd.grad(shifted.sum(), log_ratio)
    torch.testing.assert_close(shifted, base)
    torch.testing.assert_close(grad_shifted, grad)
    # and a constant added to the implicit reward (log Z of p_old) changes nothing either
    torch.testing.assert_close(crd_loss(log_ratio + shift, reward, 0.3, 8), base)
    # the centring is per group: a shift across groups (not constant within one) does change the loss
    assert (crd_loss(log_ratio, reward + torch.arange(24.0, dtype=torch.float64), 0.3, 8) - base).abs().max() > 1e-3


def test_gradient_is_the_residual_and_equals_the_detached_mean_form(f64):
    """d/dl_i of mean_j (beta l^c_j - r^c_j)^2 / beta is 2 (beta l^c_i - r^c_i) / n: the group mean of l carries
    no gradient because the centred residuals sum to zero (the implementation detaches it); finite differences."""
    g = torch.Generator().manual_seed(2)
    beta, k, n = 0.4, 4, 12
    log_ratio = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    reward = torch.randn(n, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(crd_loss(log_ratio, reward, beta, k).mean(), log_ratio)
    resid = beta * centre(log_ratio.detach(), k) - centre(reward, k)
    torch.testing.assert_close(grad, 2 * resid / n)
    detached = log_ratio - log_ratio.detach().reshape(-1, k).mean(1).repeat_interleave(k)
    (grad_detached,) = torch.autograd.grad(((beta * detached - centre(reward, k)) ** 2 / beta).mean(), log_ratio)
    torch.testing.assert_close(grad_detached, grad)
    fd = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = 1e-6
        with torch.no_grad():
            fd[i] = (crd_loss(log_ratio + e, reward, beta, k).mean() - crd_loss(log_ratio - e, reward, beta, k).mean())
        fd[i] /= 2e-6
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_fitting_a_gaussian_with_the_centred_loss_reaches_the_tilted_gaussian(f64):
    """p_theta = N(m, s^2), p_old = N(0, 1), r(x) = a x - kappa x^2 / 2: p* = N(mu*, v*), precision 1 + kappa / beta
    and mean (a / beta) v*. Samples from a fixed wider proposal (the sampler is decoupled from p_theta)."""
    a, kappa, beta = 0.6, 0.8, 0.5
    v_star = 1 / (1 + kappa / beta)
    mu_star = a / beta * v_star
    m = torch.zeros((), dtype=torch.float64, requires_grad=True)
    log_s = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([m, log_s], lr=0.02)
    g = torch.Generator().manual_seed(3)
    for _ in range(1500):
        x = torch.randn(64, generator=g, dtype=torch.float64) * 1.5
        log_ratio = normal_logpdf(x, m, log_s.exp()) - normal_logpdf(x, 0.0, 1.0)
        loss = crd_loss(log_ratio, a * x - kappa * x**2 / 2, beta, 16).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.item() == pytest.approx(mu_star, abs=0.01)
    assert log_s.exp().item() ** 2 == pytest.approx(v_star, rel=0.02)


# ---------------------------------------------------------------------------------------------------------------
# The forward-process estimates, for exact Gaussian denoisers under EDM
# ---------------------------------------------------------------------------------------------------------------


def gaussian_denoiser(x_t, sigma, m, s):
    return m + s**2 / (s**2 + sigma**2) * (x_t - m)


def test_elbo_weight_is_edms_sigma_cubed_and_edm_weight_is_lambda():
    process = EDMProcess()
    u = torch.linspace(0.05, 0.95, 7)
    sigma = process.from_unit(u)
    du = 1e-3
    dsigma = (process.from_unit(u + du) - process.from_unit(u - du)) / (2 * du)  # d sigma / du, numerically
    torch.testing.assert_close(elbo_weight(process, u, 0.5), sigma**-3 * dsigma * 0.5, rtol=2e-3, atol=0)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(edm_weight(process, sigma, 4), lam / 4)


def _quadrature(n_u: int, n_eps: int, seed: int):
    """Unit times on [0, 1] (midpoints) and noise, one row per (u, eps) pair, and the ELBO weights for u ~ U[0, 1]."""
    process = EDMProcess()
    u = ((torch.arange(n_u, dtype=torch.float64) + 0.5) / n_u).repeat_interleave(n_eps)
    sigma = process.from_unit(u).double()
    eps = torch.randn(n_u * n_eps, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return sigma, eps, elbo_weight(process, u, 1.0).double()


def test_elbo_implicit_reward_is_the_log_density_ratio_for_exact_denoisers(f64):
    """E_{u, eps} of w(u) (||D_old - x||^2 - ||D_theta - x||^2) = log N(x; m1, s1^2) - log N(x; m0, s0^2), up to the
    truncation of sigma to [0.002, 80] (negligible here), for the exact denoisers of the two Gaussians."""
    (m1, s1), (m0, s0) = (0.3, 0.4), (-0.1, 0.6)
    sigma, eps, w = _quadrature(4000, 64, 4)
    for x0 in (-0.5, 0.2, 0.9):
        x = torch.full_like(sigma, x0)
        x_t = x + sigma * eps
        ell = implicit_reward(x[:, None], gaussian_denoiser(x_t, sigma, m1, s1)[:, None],
                              gaussian_denoiser(x_t, sigma, m0, s0)[:, None], w)
        exact = float(normal_logpdf(torch.tensor(x0), m1, s1) - normal_logpdf(torch.tensor(x0), m0, s0))
        assert float(ell.mean()) == pytest.approx(exact, abs=0.02 * (1 + abs(exact)))


def test_elbo_kl_estimate_is_the_kl_between_the_gaussians(f64):
    """E_{x ~ p1, u, eps} w(u) ||D_1(x_t) - D_ref(x_t)||^2 = KL(N(m1, s1^2) || N(m2, s2^2)) (Girsanov, exact
    denoisers); 0 for the reference itself."""
    (m1, s1), (m2, s2) = (0.3, 0.4), (-0.1, 0.6)
    sigma, eps, w = _quadrature(2000, 256, 5)
    x = m1 + s1 * torch.randn(len(sigma), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x_t = x + sigma * eps
    d1, d2 = gaussian_denoiser(x_t, sigma, m1, s1), gaussian_denoiser(x_t, sigma, m2, s2)
    kl = float(kl_estimate(d1[:, None], d2[:, None], w).mean())
    exact = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    assert kl == pytest.approx(exact, rel=0.03)
    assert float(kl_estimate(d2[:, None], d2[:, None], w).abs().max()) == 0.0


def test_rewards():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 2])
    logp = torch.log_softmax(logits, -1)[[0, 1], [0, 2]]
    torch.testing.assert_close(classifier_reward(logits, labels, log=True), logp)
    torch.testing.assert_close(classifier_reward(logits, labels, log=False), logp.exp())
    img = -torch.ones(2, 1, 4, 4)
    img[1, :, :2] = 1.0  # half the pixels inked
    torch.testing.assert_close(ink_reward(img), torch.tensor([0.0, 0.5]))


# ---------------------------------------------------------------------------------------------------------------
# The recipe on the tiny teacher
# ---------------------------------------------------------------------------------------------------------------


def test_only_the_student_gets_gradients(tiny_teacher):
    recipe, data = build_recipe(_config(tiny_teacher, Path("/nonexistent")), torch.device("cpu"))
    assert recipe.target_decay == 0.9 and recipe.reference is recipe.teacher
    target = copy.deepcopy(recipe.generator).requires_grad_(False)
    batch = data.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with update_nets(recipe, "generator", target=target) as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and logs["kl"] > 0 and {"crd_loss", "reward", "implicit_reward_abs"} <= set(logs)
    assert logs["implicit_reward_abs"] == 0.0  # the student is its old copy: log p_theta / p_old = 0
    assert all(p.grad is not None for p in recipe.generator.parameters())
    for net in (recipe.teacher, recipe.classifier, target):
        assert all(p.grad is None for p in net.parameters())
    with update_nets(recipe, "generator") as nets, pytest.raises(RuntimeError, match="target network"):
        recipe.generator_loss(nets, batch, 0)


def test_conditions_are_grouped_and_the_diagnostic_is_the_mean_reward(tiny_teacher):
    recipe, _ = build_recipe(_config(tiny_teacher, Path("/nonexistent")), torch.device("cpu"))
    cond = recipe.grouped_condition({"class_labels": torch.tensor([3, 7, 1, 5])})
    assert cond["class_labels"].tolist() == [3, 3, 7, 7]
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"class_labels": torch.tensor([0, 1, 2, 3])}
    torch.manual_seed(2)
    got = recipe.diagnostics(recipe.generator, cond, noise)["reward"]
    torch.manual_seed(2)
    expected = recipe.reward(recipe.generate(recipe.generator, cond, noise), cond).mean().item()
    assert got == pytest.approx(expected) and got < 0  # a log-probability


@pytest.mark.parametrize("overrides, message", [
    (["recipe.group_size=3"], "recipe.group_size: 3 does not divide data.batch_size (4)"),
    (["recipe.min_t=0.5", "recipe.max_t=0.4"], "recipe.min_t: must be < recipe.max_t (0.4), got 0.5"),
    (["recipe.beta=0"], "recipe.beta:"),
    (["recipe.kl_weight=-1"], "recipe.kl_weight:"),
    (["recipe.reward=aesthetic"], "recipe.reward:"),
    (["recipe.old_decay=1"], "recipe.old_decay:"),
    (["recipe.adaptive_kl=true"], "unknown config key recipe.adaptive_kl"),  # left out (docs/crd.md)
    (["recipe.init_from=builtin:digits_teacher"], "recipe.init_from: builtin:digits_teacher does not hold a network"),
])
def test_bad_config_is_refused_by_name(tiny_teacher, overrides, message):
    with pytest.raises(ConfigError) as e:
        build_recipe(_config(tiny_teacher, Path("/nonexistent"), *overrides), torch.device("cpu"))
    assert str(e.value).startswith(message), str(e.value)


def test_init_from_a_folder_without_a_pipeline_is_refused(tiny_teacher, tmp_path):
    with pytest.raises(FileNotFoundError):
        build_recipe(_config(tiny_teacher, Path("/nonexistent"), f"recipe.init_from={tmp_path}"), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------------------
# Three updates, the export (a clean process samples it), and a second run started from that export
# ---------------------------------------------------------------------------------------------------------------

def test_three_updates_train_the_student_and_the_export_reproduces_generate(tiny_teacher, tmp_path):
    from distill.models.denoiser import load_denoiser
    from distill.training.trainer import Trainer

    labels, seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234
    teacher_before = {k: v.clone() for k, v in load_denoiser(tiny_teacher).state_dict().items()}
    trainer = Trainer(_config(tiny_teacher, tmp_path / "run", "run.max_steps=3", "export.at_end=true",
                              "trainer.ema_decay=0.5"))
    recipe = trainer.recipe
    before = {k: v.clone() for k, v in recipe.generator.state_dict().items()}
    classifier_before = {k: v.clone() for k, v in recipe.classifier.state_dict().items()}
    folder = trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in recipe.generator.state_dict().items())
    for k, v in recipe.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"the teacher changed: {k}"
    for k, v in recipe.classifier.state_dict().items():
        assert torch.equal(v, classifier_before[k]), f"the classifier changed: {k}"
    assert json.loads((folder / "distill.json").read_text())["num_inference_steps"] == 2
    with torch.no_grad(), trainer.ema_weights() as gen:
        torch.manual_seed(seed)
        noise = torch.randn(len(labels), 1, 8, 8)
        reference = (recipe.generate(gen, {"class_labels": torch.tensor(labels)}, noise) / 2 + 0.5).clamp(0, 1)
        exported = {k: v.clone() for k, v in gen.state_dict().items()}
    got = sample_exports_cleanly({"student": {"folder": str(folder), "steps": 2}}, labels, seed, tmp_path)
    assert reference.std() > 0.01
    torch.testing.assert_close(got["student"], reference, atol=2e-5, rtol=1e-4)

    # init_from: the exported student starts the next run (and, as kl_reference init, anchors it)
    again, _ = build_recipe(_config(tiny_teacher, Path("/nonexistent"), f"recipe.init_from={folder}",
                                    "recipe.kl_reference=init"), torch.device("cpu"))
    for k, v in again.generator.state_dict().items():  # the export's null-class row is the teacher's again
        torch.testing.assert_close(v, exported[k] if k != "class_embedding.weight" else
                                   torch.cat([exported[k][:-1], recipe.teacher.model.class_embedding.weight[-1:]]))
    assert again.reference is not again.teacher and again.ref_guidance == 1.0
    assert all(p.requires_grad for p in again.generator.parameters())
    assert not any(p.requires_grad for p in again.reference.parameters())
    for a, b in zip(again.reference.parameters(), again.generator.parameters()):
        assert torch.equal(a, b)
