"""DMD2's losses against closed forms on Gaussian toys, and the recipe's gradient routing."""

from __future__ import annotations

import torch

from distill.parametrization import EDMProcess, add_noise
from distill.recipes.dmd2 import denoising_loss, dmd_gradient, dmd_loss


def gaussian_x0(x_t: torch.Tensor, sigma: torch.Tensor, mu: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mu, c^2 I) and x_t = x0 + sigma eps (EDM, alpha = 1)."""
    s2 = sigma.reshape(-1, 1) ** 2
    return mu + c**2 / (c**2 + s2) * (x_t - mu)


def test_dmd_gradient_vanishes_when_distributions_match(f64):
    g = torch.Generator().manual_seed(0)
    mu, c = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.5, 1.0, 0.7])
    x = mu + c * torch.randn(256, 3, generator=g)
    sigma = torch.rand(256, generator=g) * 5 + 0.05
    x_t = x + sigma[:, None] * torch.randn(256, 3, generator=g)
    real = gaussian_x0(x_t, sigma, mu, c)
    fake = gaussian_x0(x_t, sigma, mu.clone(), c.clone())
    assert torch.equal(dmd_gradient(x, real, fake), torch.zeros_like(x))


def test_dmd_gradient_closed_form_points_to_teacher(f64):
    # Equal variances: x0_fake - x0_real = (mu_f - mu_r) sigma^2 / (c^2 + sigma^2), whatever x_t is.
    g = torch.Generator().manual_seed(1)
    mu_r, mu_f, c = torch.tensor([1.0, -2.0]), torch.tensor([-0.5, 0.5]), torch.tensor([0.8, 0.8])
    x = mu_f + c * torch.randn(512, 2, generator=g)
    sigma = torch.rand(512, generator=g) * 3 + 0.1
    x_t = x + sigma[:, None] * torch.randn(512, 2, generator=g)
    real, fake = gaussian_x0(x_t, sigma, mu_r, c), gaussian_x0(x_t, sigma, mu_f, c)
    grad = dmd_gradient(x, real, fake)
    s2 = sigma[:, None] ** 2
    expected = (mu_f - mu_r) * s2 / (c**2 + s2) / (x - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(grad, expected)
    # A gradient step x - lr * grad moves every sample toward the teacher's mean.
    step = -grad
    assert ((step * (mu_r - mu_f)).sum(1) > 0).all()


def test_dmd_loss_gradient_is_the_dmd_gradient(f64):
    x = torch.randn(4, 1, 3, 3, requires_grad=True)
    grad = torch.randn(4, 1, 3, 3)
    dmd_loss(x, grad).sum().backward()
    torch.testing.assert_close(x.grad, grad / 9)  # per-sample mean over D = 9 elements
    assert torch.allclose(dmd_loss(x.detach(), grad), 0.5 * grad.pow(2).mean((1, 2, 3)))


def test_dmd_training_recovers_teacher_gaussian(f64):
    """A generator G(z) = m + s z trained only with the DMD loss (with the exact fake score of its current
    output distribution) converges to the teacher N(mu_r, c_r^2)."""
    g = torch.Generator().manual_seed(2)
    mu_r, c_r = torch.tensor([1.5, -0.5]), torch.tensor([0.4, 1.2])
    m = torch.zeros(2, requires_grad=True)
    log_s = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([m, log_s], lr=0.05)
    process = EDMProcess(sigma_min=0.02, sigma_max=4.0, sigma_data=1.0)
    for _ in range(600):
        z = torch.randn(256, 2, generator=g)
        x = m + log_s.exp() * z
        sigma = process.from_unit(torch.rand(256, generator=g) * 0.96 + 0.02)
        x_t = add_noise(process, x.detach(), torch.randn(256, 2, generator=g), sigma)
        with torch.no_grad():
            real = gaussian_x0(x_t, sigma, mu_r, c_r)
            fake = gaussian_x0(x_t, sigma, m.detach(), log_s.exp().detach())
            grad = dmd_gradient(x.detach(), real, fake)
        opt.zero_grad()
        dmd_loss(x, grad).mean().backward()
        opt.step()
    torch.testing.assert_close(m.detach(), mu_r, atol=0.08, rtol=0)
    torch.testing.assert_close(log_s.exp().detach(), c_r, atol=0.08, rtol=0.05)


def test_denoising_loss_is_edm_weighted_x0_error(f64):
    """In the EDM network's own output space, the plain MSE is lambda(sigma) * MSE in x0 (Karras et al. Table 1)."""
    from distill.parametrization import convert

    sd = 0.5
    sigma = torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1, 1)
    x_t, x0, x0_hat = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    one = torch.ones_like(sigma)
    native = lambda v: convert(v, "x0", "edm", x_t, one, sigma, sigma_data=sd)  # noqa: E731
    lam = ((sigma**2 + sd**2) / (sigma * sd) ** 2).flatten()
    expected = lam * (x0_hat - x0).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(denoising_loss(native(x0_hat), native(x0)), expected)


def test_recipe_routes_gradients(tiny_teacher):
    """The generator loss trains only the student; the critic loss trains only the fake score (and GAN head)."""
    from distill.training.nets import update_nets
    from distill.training.preflight import load_config
    from distill.training.registry import build_recipe

    for steps, gan in ((1, False), (3, True)):
        cfg = load_config("digits/dmd2.yaml", [f"teacher.path={tiny_teacher}", "data.resolution=8",
                                               f"student.num_steps={steps}", f"recipe.gan={str(gan).lower()}",
                                               "teacher.guidance_scale=2.0"])
        recipe, data = build_recipe(cfg, torch.device("cpu"))
        batch = data.sample(4, torch.Generator().manual_seed(0))
        with update_nets(recipe, "generator") as nets:
            loss, logs = recipe.generator_loss(nets, batch, 0)
        loss.backward()
        assert torch.isfinite(loss) and logs["dmd_loss"] >= 0
        assert all(p.grad is not None for p in recipe.generator.parameters())
        assert all(p.grad is None for p in recipe.critic.parameters())
        assert all(p.grad is None for p in recipe.teacher.parameters())
        recipe.generator.zero_grad(set_to_none=True)
        with update_nets(recipe, "critic") as nets:
            loss, logs = recipe.critic_loss(nets, batch, 0)
        loss.backward()
        assert torch.isfinite(loss) and ("gan_loss" in logs) == gan
        assert all(p.grad is not None for p in recipe.critic.parameters())
        assert all(p.grad is None for p in recipe.generator.parameters())
