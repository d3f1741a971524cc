"""f-distill, Decoupled DMD and SwiftBrush/VSD against their math: every h(r) from its f by autograd, reverse KL and
the decoupled terms against DMD2's gradient, the VSD gradient with the LoRA off."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_overrides

from distill.base.batch import Batch
from distill.base.errors import ConfigError
from distill.recipes.decoupled_dmd import decoupled_gradients
from distill.recipes.dmd2 import dmd_gradient
from distill.recipes.fdistill import F_OF_R, H_OF_R, density_ratio, f_weights
from distill.training.nets import update_nets
from distill.training.preflight import load_config
from distill.training.registry import build_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# f-distill: the weights
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", sorted(F_OF_R))
def test_h_is_f_second_derivative_times_r_squared(divergence):
    r = torch.logspace(-3, 3, 61, dtype=torch.float64).requires_grad_(True)
    f = F_OF_R[divergence]
    (df,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    torch.testing.assert_close(H_OF_R[divergence](r.detach()), d2f * r.detach() ** 2, rtol=1e-9, atol=1e-12)
    one = torch.ones(1, dtype=torch.float64)
    assert abs(f(one).item()) < 1e-12  # an f-divergence: f(1) = 0 ...
    assert (d2f > 0).all()  # ... and f convex


def test_weights_are_normalised_and_clamped():
    logits = torch.tensor([-30.0, -1.0, 0.0, 2.0, 30.0])
    torch.testing.assert_close(density_ratio(logits), torch.exp(torch.tensor([-10.0, -1.0, 0.0, 2.0, 10.0])))
    for divergence in H_OF_R:
        w = f_weights(logits, divergence)
        torch.testing.assert_close(w.mean(), torch.tensor(1.0))
        h = H_OF_R[divergence](density_ratio(logits))
        torch.testing.assert_close(w, h / h.mean())
    assert torch.equal(f_weights(logits, "reverse_kl"), torch.ones(5))
    # Less mode-seeking divergences weight samples the teacher finds likelier (larger r) more; Neyman the reverse.
    for divergence in ("forward_kl", "jensen_shannon", "squared_hellinger", "jeffreys"):
        assert (f_weights(logits, divergence).diff() > 0).all(), divergence
    assert (f_weights(logits, "neyman").diff() < 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Decoupled DMD: the two terms
# ---------------------------------------------------------------------------------------------------------------


def test_decoupled_terms_sum_to_the_dmd_gradient_with_a_cfg_teacher():
    g = torch.Generator().manual_seed(0)
    x, cond, uncond, fake = (torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(4))
    for w in (1.0, 1.5, 4.0):
        dm, ca = decoupled_gradients(x, cond, uncond, fake, w)
        real = uncond + w * (cond - uncond)
        torch.testing.assert_close(dm + ca, dmd_gradient(x, real, fake))
        norm = (x - real).abs().mean((1, 2, 3), keepdim=True)
        torch.testing.assert_close(dm, (fake - cond) / norm)  # DM: s_real^cond - s_fake^cond, in x0 form
        if w == 1.0:
            assert torch.equal(ca, torch.zeros_like(ca))  # no guidance: no CFG augmentation


# ---------------------------------------------------------------------------------------------------------------
# Recipe-level identities on the tiny teacher
# ---------------------------------------------------------------------------------------------------------------


def _recipe(tiny_teacher, yaml: str, *extra: str, seed: int = 0):
    cfg = load_config(yaml, tiny_overrides(tiny_teacher, "unused", *extra))
    torch.manual_seed(seed)  # identical initial heads and adapters
    return build_recipe(cfg, torch.device("cpu"))


def _generator_step(recipe, batch: Batch, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The generator loss and its gradient on the student, from fixed random numbers."""
    torch.manual_seed(seed)
    with update_nets(recipe, "generator") as nets:
        loss, _ = recipe.generator_loss(nets, batch, 0)
    loss.backward()
    grads = [p.grad.clone() for p in recipe.generator.parameters()]
    recipe.generator.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _train_critic(recipe, batch: Batch, steps: int = 3) -> None:
    """A few critic updates so the fake score (and head) differ from the teacher."""
    opt = torch.optim.SGD(recipe.critic.parameters(), lr=0.5)
    for i in range(steps):
        torch.manual_seed(100 + i)
        with update_nets(recipe, "critic") as nets:
            loss, _ = recipe.critic_loss(nets, batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def _copy_weights(src, dst) -> None:
    dst.generator.load_state_dict(src.generator.state_dict())
    dst.critic.load_state_dict(src.critic.state_dict())


@pytest.mark.parametrize("steps", [1, 2])
def test_reverse_kl_f_distill_is_dmd2_with_gan(tiny_teacher, steps):
    extra = ("data.resolution=8", f"student.num_steps={steps}", "teacher.guidance_scale=1.5")
    dmd, data = _recipe(tiny_teacher, "digits/dmd2.yaml", *extra, "recipe.gan=true", "recipe.gan_generator_weight=0.1")
    batch = data.sample(6, torch.Generator().manual_seed(0))
    _train_critic(dmd, batch)
    want_loss, want = _generator_step(dmd, batch, seed=7)
    assert max(g.abs().max() for g in want) > 0
    for divergence, same in (("reverse_kl", True), ("forward_kl", False)):
        fd, _ = _recipe(tiny_teacher, "digits/fdistill.yaml", *extra, f"recipe.divergence={divergence}",
                        "recipe.gan_generator_weight=0.1")
        _copy_weights(dmd, fd)
        loss, got = _generator_step(fd, batch, seed=7)
        if same:
            torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        else:  # the weights matter: forward KL moves the student differently
            assert max((a - b).abs().max() for a, b in zip(got, want)) > 1e-6


def test_decoupled_dmd_with_one_noise_draw_is_dmd2_with_a_cfg_teacher(tiny_teacher):
    extra = ("data.resolution=8", "teacher.guidance_scale=2.5")
    dmd, data = _recipe(tiny_teacher, "digits/dmd2.yaml", *extra)
    batch = data.sample(6, torch.Generator().manual_seed(1))
    _train_critic(dmd, batch)
    want_loss, want = _generator_step(dmd, batch, seed=3)
    cases = (("recipe.ca_min_t=0.02", "recipe.ca_max_t=0.98", True),  # samplers coincide, weights 1
             ("recipe.ca_min_t=0.5", "recipe.ca_max_t=0.98", False))  # the CA term on its own noise levels
    for lo, hi, same in cases:
        dec, _ = _recipe(tiny_teacher, "digits/decoupled_dmd.yaml", *extra, lo, hi)
        _copy_weights(dmd, dec)
        loss, got = _generator_step(dec, batch, seed=3)
        delta = max((a - b).abs().max() for a, b in zip(got, want))
        if same:  # DM + CA, each weighted 1: DMD2's gradient; the losses differ (two squares), the gradients do not
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        else:
            assert delta > 1e-5


def test_decoupled_weights_scale_their_terms(tiny_teacher):
    extra = ("data.resolution=8", "teacher.guidance_scale=2.0")
    base, data = _recipe(tiny_teacher, "digits/decoupled_dmd.yaml", *extra)
    batch = data.sample(4, torch.Generator().manual_seed(2))
    _train_critic(base, batch)
    grads = {}
    for dm, ca in ((1.0, 0.0), (0.0, 1.0), (2.0, 3.0)):
        rec, _ = _recipe(tiny_teacher, "digits/decoupled_dmd.yaml", *extra, f"recipe.dm_weight={dm}",
                         f"recipe.ca_weight={ca}")
        _copy_weights(base, rec)
        grads[(dm, ca)] = _generator_step(rec, batch, seed=5)[1]
    for a, b, c in zip(grads[(1.0, 0.0)], grads[(0.0, 1.0)], grads[(2.0, 3.0)]):
        torch.testing.assert_close(c, 2 * a + 3 * b, rtol=1e-4, atol=1e-6)


def _perturb(module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("adapters", [False, True])
def test_vsd_gradient_is_zero_with_the_lora_off(tiny_teacher, adapters):
    rec, data = _recipe(tiny_teacher, "digits/swiftbrush.yaml", "data.resolution=8", "teacher.guidance_scale=2.0",
                        "recipe.lora_rank=4", f"recipe.adapters={str(adapters).lower()}")
    cond = data.sample(4, torch.Generator().manual_seed(0)).cond
    batch = Batch(None, cond)  # image-free: no real images at all
    _perturb(rec.critic, 1)  # a fake score that differs from the teacher
    _perturb(rec.generator, 2)
    fake = rec.critic.denoiser
    _, on = _generator_step(rec, batch, seed=4)
    assert max(g.abs().max() for g in on) > 1e-6
    fake.adapter = None  # the LoRA off: the fake score is the teacher (CFG on both) and VSD has nothing to do
    loss, off = _generator_step(rec, batch, seed=4)
    assert loss.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in off)
    fake.adapter = "fake_score"
    with update_nets(rec, "critic") as nets:
        loss, logs = rec.critic_loss(nets, batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in rec.critic.parameters())
    assert all(p.grad is None for p in rec.generator.parameters())


def test_swiftbrush_label_dropout_uses_the_null_class(tiny_teacher):
    rec, data = _recipe(tiny_teacher, "digits/swiftbrush.yaml", "data.resolution=8", "recipe.fake_label_dropout=0.5")
    labels = torch.arange(2000) % 10
    torch.manual_seed(0)
    dropped = rec._dropped_labels({"class_labels": labels})["class_labels"]
    null = rec.teacher.model.config.num_class_embeds - 1
    share = (dropped == null).float().mean().item()
    assert 0.45 < share < 0.55 and torch.equal(dropped[dropped != null], labels[dropped != null])


@pytest.mark.parametrize("yaml,key,value", [("digits/fdistill.yaml", "recipe.gan", "false"),
                                            ("digits/swiftbrush.yaml", "recipe.gan", "true"),
                                            ("digits/fdistill.yaml", "recipe.divergence", "pearson"),
                                            ("digits/decoupled_dmd.yaml", "recipe.ca_min_t", "0.99")])
def test_bad_recipe_keys_are_named(tiny_teacher, yaml, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(yaml, tiny_overrides(tiny_teacher, "unused", f"{key}={value}"))
