"""Self-E (recipes/self_e.py): the self-evaluation gradient against the reverse KL of Gaussians in closed form, its
fixed point, the classifier score of the conditional mode, the loss at weight 0, which networks train, that the
teacher's weights reach no loss, refused configs, and a run whose export loads with plain diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import REPO, sample_exports_cleanly, tiny_overrides

from distill.base.errors import ConfigError
from distill.parametrization import flow_interpolate
from distill.recipes.dmd2 import dmd_gradient, dmd_loss
from distill.recipes.flow_map import two_time_x0, velocity_from_x0
from distill.recipes.self_e import guided, renoise
from distill.training.nets import update_nets
from distill.training.preflight import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# Closed forms on Gaussians (flow coordinates: x_tau = (1 - tau) x0 + tau e)
# ---------------------------------------------------------------------------------------------------------------


def gaussian_denoiser(m, v, tau):
    """E[x0 | x_tau] for x0 ~ N(m, v)."""
    return lambda x: m + (1 - tau) * v / ((1 - tau) ** 2 * v + tau**2) * (x - (1 - tau) * m)


def kl_at(tau, m_q, v_q, m_p, v_p):
    """KL(q_tau || p_tau) of the two Gaussians re-noised to tau."""
    a, A = (1 - tau) * m_q, (1 - tau) ** 2 * v_q + tau**2
    b, B = (1 - tau) * m_p, (1 - tau) ** 2 * v_p + tau**2
    return 0.5 * (torch.log(B / A) + (A + (a - b) ** 2) / B - 1)


def hermite(n=30):
    """Probabilists' Gauss-Hermite nodes and weights (expectations under N(0, 1), exact for polynomials)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return torch.tensor(x), torch.tensor(w / w.sum())


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.9])
def test_self_evaluation_gradient_is_the_reverse_kl_gradient(f64, tau):
    """E[(D_fake - D_real)(x^_tau) dx^/dtheta] = tau^2 / (1 - tau)^2 dKL(q_tau || p_tau)/dtheta (eq. 2), with the
    exact denoisers of data N(m, v) (the model's own score) and of the generator's samples N(m', v')."""
    m, v = torch.tensor(0.3), torch.tensor(0.5)
    theta = torch.tensor([-0.4, np.log(1.7)], requires_grad=True)  # generator: x^ = m' + exp(log v' / 2) e
    nodes, weights = hermite()
    e, e2 = (g.flatten() for g in torch.meshgrid(nodes, nodes, indexing="ij"))
    w = (weights[:, None] * weights[None, :]).flatten()
    x_hat = theta[0] + torch.exp(theta[1] / 2) * e
    x_tau = renoise(x_hat.detach()[:, None], e2[:, None], torch.full((len(e),), tau))[:, 0]
    d_real = gaussian_denoiser(m, v, tau)(x_tau)
    d_fake = gaussian_denoiser(theta[0].detach(), theta[1].detach().exp(), tau)(x_tau)
    surrogate = (w * 0.5 * (x_hat - (x_hat - (d_fake - d_real)).detach()) ** 2).sum()
    (got,) = torch.autograd.grad(surrogate, theta)
    (kl_grad,) = torch.autograd.grad(kl_at(tau, theta[0], theta[1].exp(), m, v), theta)
    torch.testing.assert_close(got, tau**2 / (1 - tau) ** 2 * kl_grad, rtol=1e-8, atol=1e-10)
    assert got.abs().min() > 1e-2  # the check is not vacuous


def test_self_evaluation_gradient_vanishes_on_the_models_own_distribution(f64):
    """Samples distributed as the model's own score implies: fake = real denoiser, gradient and loss gradient 0."""
    m, v, tau = torch.tensor(0.3), torch.tensor(0.5), torch.full((64,), 0.4)
    x_hat = (m + v.sqrt() * torch.randn(64, 1)).requires_grad_(True)
    x_tau = renoise(x_hat.detach(), torch.randn(64, 1), tau)
    grad = dmd_gradient(x_hat.detach(), gaussian_denoiser(m, v, 0.4)(x_tau), gaussian_denoiser(m, v, 0.4)(x_tau))
    assert torch.equal(grad, torch.zeros_like(grad))
    dmd_loss(x_hat, grad).sum().backward()
    assert torch.equal(x_hat.grad, torch.zeros_like(x_hat))


def test_conditional_fake_score_is_the_models_classifier_score(f64):
    """fake_score: conditional: D_c - (D_u + w (D_c - D_u)) = -(w - 1)(D_c - D_u), and for two Gaussian classes with
    exact denoisers D_c - D_u = tau^2 / (1 - tau) grad_x log p(c | x_tau) (Tweedie), the model's classifier score."""
    tau, w, v = 0.6, 3.0, torch.tensor(0.2)
    means = torch.tensor([-0.5, 0.7])
    x = torch.linspace(-1.5, 1.5, 31, requires_grad=True)
    var_tau = (1 - tau) ** 2 * v + tau**2
    logp = torch.stack([-(x - (1 - tau) * mu) ** 2 / (2 * var_tau) for mu in means])  # equal priors, equal variances
    post = torch.softmax(logp, 0)
    d_c = [gaussian_denoiser(mu, v, tau)(x) for mu in means]
    d_u = post[0] * d_c[0] + post[1] * d_c[1]
    (score,) = torch.autograd.grad(torch.log(post[0]).sum(), x)
    torch.testing.assert_close(d_c[0] - d_u, tau**2 / (1 - tau) * score, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d_c[0] - guided(d_c[0], d_u, w), -(w - 1) * (d_c[0] - d_u))
    assert torch.equal(guided(d_c[0], d_u, 1.0), d_c[0])


# ---------------------------------------------------------------------------------------------------------------
# The recipe on the tiny class-conditional teacher
# ---------------------------------------------------------------------------------------------------------------


def _config(teacher, run, *extra):
    return load_config("digits/self_e.yaml", tiny_overrides(teacher, run, *extra))


def _recipe(teacher, *extra):
    from distill.training.registry import build_run

    recipe, data, loaded = build_run(_config(teacher, Path("/nonexistent"), *extra), torch.device("cpu"))
    return recipe, data, loaded


def test_weight_zero_is_the_plain_flow_matching_loss(tiny_teacher):
    recipe, data, _ = _recipe(tiny_teacher, "recipe.self_eval_weight=0", "recipe.label_dropout=0")
    batch = data.sample(4, torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    torch.manual_seed(5)  # replay the draws: data times, then data noise
    x0, t0, s_max = batch.images, recipe.t0, recipe.s_max
    t = t0 + (s_max - t0) * torch.rand(4)
    z = torch.randn_like(x0)
    x = flow_interpolate(x0, z, t)
    with torch.no_grad():
        v = velocity_from_x0(x, two_time_x0(recipe.generator, recipe.process, x, t, t, batch.cond), t, t0)
    torch.testing.assert_close(loss.detach(), (v - (z - x0)).pow(2).mean(), rtol=1e-5, atol=1e-6)
    assert "self_eval_loss" not in logs


def test_self_evaluation_vanishes_when_the_fake_score_is_the_models_own(tiny_teacher):
    """With the landed distribution's denoiser equal to the model's own (samples as its score implies), the
    self-evaluation gradient is zero and the loss is the flow-matching loss alone."""
    recipe, data, _ = _recipe(tiny_teacher)
    recipe.fake_x0 = recipe.real_x0
    batch = data.sample(6, torch.Generator().manual_seed(1))
    with update_nets(recipe, "generator") as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
    assert logs["self_eval_grad_abs"] == 0 and logs["self_eval_loss"] == 0
    assert loss.item() == pytest.approx(logs["data_loss"])


@pytest.mark.parametrize("extra", [(), ("recipe.fake_score=conditional", "recipe.guidance_scale=2.0",
                                        "recipe.evaluator=ema")])
def test_each_update_trains_only_its_network(tiny_teacher, extra):
    from distill.training.trainer import Trainer

    trainer = Trainer(_config(tiny_teacher, Path("/nonexistent"), *extra))  # makes the EMA target where asked
    recipe = trainer.recipe
    batch = trainer.dataset.sample(6, torch.Generator().manual_seed(0))
    target = trainer.target_network
    with update_nets(recipe, "generator", target=target) as nets:
        loss, logs = recipe.generator_loss(nets, batch, 0)
        loss.backward()
    assert torch.isfinite(loss) and logs["self_eval_grad_abs"] > 0
    assert recipe.generator.end_embedding.mlp[2].weight.grad.abs().sum() > 0  # the clean-edge jump is trained
    assert sum(p.grad.abs().sum() for p in recipe.generator.student.parameters() if p.grad is not None) > 0
    if recipe.critic is None:
        return
    assert all(p.grad is None for p in recipe.critic.parameters())
    recipe.generator.zero_grad(set_to_none=True)
    with update_nets(recipe, "critic") as nets:
        loss, _ = recipe.critic_loss(nets, batch, 0)
        loss.backward()
    assert all(p.grad is None for p in recipe.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.critic.parameters())


@pytest.mark.parametrize("init", ["scratch", "teacher"])
def test_the_teachers_weights_reach_no_loss(tiny_teacher, init):
    recipe, data, teacher = _recipe(tiny_teacher, f"recipe.init={init}", "recipe.guidance_scale=1.5")
    student = recipe.generator.student.model.state_dict()
    same = [torch.equal(v, student[k]) for k, v in teacher.model.state_dict().items() if v.is_floating_point()]
    assert all(same) if init == "teacher" else not all(same)  # scratch: a fresh network of the teacher's design
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(float("nan"))
    assert not any(m is teacher or m is teacher.model for m in vars(recipe).values())
    batch = data.sample(6, torch.Generator().manual_seed(2))
    for update, loss_fn in (("generator", recipe.generator_loss), ("critic", recipe.critic_loss)):
        with update_nets(recipe, update) as nets:
            loss, _ = loss_fn(nets, batch, 0)
        assert torch.isfinite(loss), update


def test_run_and_export_reproduce_generate_at_one_and_two_steps(tiny_teacher, tmp_path):
    from distill.training.trainer import Trainer

    labels, seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4], 1234
    runs, reference = {}, {}
    for steps in (1, 2):
        trainer = Trainer(_config(tiny_teacher, tmp_path / f"k{steps}", "run.max_steps=2", "export.at_end=true",
                                  "trainer.ema_decay=0.5", f"student.num_steps={steps}",
                                  "recipe.end_embedding_gain=100.0"))
        before = {k: v.clone() for k, v in trainer.recipe.generator.state_dict().items()}
        critic = {k: v.clone() for k, v in trainer.recipe.critic.state_dict().items()}
        folder = trainer.train()
        after = trainer.recipe.generator.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("end_embedding"))
        assert any(not torch.equal(v, trainer.recipe.critic.state_dict()[k]) for k, v in critic.items())
        meta = json.loads((folder / "distill.json").read_text())
        runs[steps] = {"folder": str(folder), "steps": meta["num_inference_steps"]}
        with torch.no_grad(), trainer.ema_weights() as gen:
            torch.manual_seed(seed)
            noise = torch.randn(len(labels), 1, 8, 8)
            x0 = trainer.recipe.generate(gen, {"class_labels": torch.tensor(labels)}, noise)
            assert gen.end_embedding.mlp[2].weight.abs().sum() > 0  # d(t0) is not zero: the fold is exercised
        reference[steps] = (x0 / 2 + 0.5).clamp(0, 1)
    got = sample_exports_cleanly(runs, labels, seed, tmp_path)
    for steps in runs:
        assert reference[steps].std() > 0.01
        torch.testing.assert_close(got[str(steps)], reference[steps], atol=2e-5, rtol=1e-4, msg=f"{steps} steps")


@pytest.mark.parametrize("extra,key", [
    (("recipe.min_tau=0.9", "recipe.max_tau=0.5"), "recipe.min_tau"),
    (("recipe.fake_score=conditional",), "recipe.fake_score"),
    (("recipe.guidance_scale=2.0", "recipe.label_dropout=0.0"), "recipe.label_dropout"),
    (("recipe.self_eval_weight=-1",), "recipe.self_eval_weight"),
    (("recipe.data_fraction=1.0",), "recipe.data_fraction"),
    (("recipe.fake_score=teacher",), "recipe.fake_score"),
    (("recipe.timesteps=[0, 20]",), "recipe.timesteps"),
])
def test_bad_config_names_the_key(tiny_teacher, extra, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _config(tiny_teacher, Path("/nonexistent"), *extra)


def test_any_step_script_says_which_step_count_the_export_cannot_take_and_keeps_the_run(tmp_path, capsys):
    """scripts/self_e_any_step.py: 41 pipeline steps exceed the exported CM scheduler's 40 levels; the row says so
    (the run does not end after its training), --out keeps the last checkpoint, and --run scores it again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("self_e_any_step", REPO / "scripts" / "self_e_any_step.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--budget", "1", "--steps", "41", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pipeline, 41: not possible" in out and "40" in out and "1 updates" in out
    assert (tmp_path / "self_e" / "checkpoints" / "step-00000001").is_dir()
    assert script.main(["--run", str(tmp_path / "self_e"), "--steps", "41"]) == 0
    assert "loaded from" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give one of them"):
        script.main(["--run", str(tmp_path / "self_e"), "--out", str(tmp_path / "x")])
