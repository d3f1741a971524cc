"""The cost of sCM's JVP on CPU, as ratios measured in one run on the shipped digits teacher (batch 64, 16x16):

* a full sCM generator update (target with one JVP + the student's forward/backward + optimizer) against the
  same update with the target's JVP replaced by a plain forward of the stop-gradient student (no tangent);
* the exact JVP (forward AD, attention through the JVP kernel's CPU path) against the central finite
  difference (three forwards), each timed alone.

    OMP_NUM_THREADS=1 python scripts/bench_jvp_step.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from distill.training.preflight import load_config
from distill.training.trainer import Trainer


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return sorted(best)[len(best) // 2]  # median


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("digits/scm.yaml", ["run.output_dir=/tmp/bench_jvp_step", f"data.batch_size={args.batch_size}",
                                          "trainer.progress_bar=false"])
    trainer = Trainer(cfg)
    recipe = trainer.recipe
    import distill.recipes.scm as scm

    real_jvp = scm.jvp

    def no_tangent(fn, primals, tangents, method="exact", eps=0.0):
        with torch.no_grad():
            out = fn(*primals)
        return out, torch.zeros_like(out)

    def step():
        trainer.train_step()

    with_jvp = timed(step, args.repeats)
    scm.jvp = no_tangent
    try:
        without = timed(step, args.repeats)
    finally:
        scm.jvp = real_jvp

    batch = trainer.dataset.sample(args.batch_size, torch.Generator().manual_seed(0))
    student = recipe.export_model(recipe.generator)
    sd = recipe.sigma_data
    t = scm.sample_trigflow_time(args.batch_size, cfg.recipe, sd, torch.device("cpu"))
    x_t = torch.cos(t)[:, None, None, None] * batch.images + torch.sin(t)[:, None, None, None] * sd * torch.randn_like(batch.images)
    dxt = scm.teacher_velocity(recipe.teacher, x_t, t, batch.cond, sd)
    F = scm.trigflow_view(student, student.process, batch.cond, sd)
    cs = torch.cos(t) * torch.sin(t)
    tangents = (cs[:, None, None, None] * dxt, cs)
    exact = timed(lambda: real_jvp(F, (x_t, t), tangents, method="exact"), args.repeats)
    fd = timed(lambda: real_jvp(F, (x_t, t), tangents, method="finite_difference", eps=5e-4), args.repeats)
    plain = timed(lambda: torch.no_grad()(F)(x_t, t), args.repeats)

    print(f"CPU, 1 thread, batch {args.batch_size}, 16x16 digits teacher (median of {args.repeats}):")
    print(f"  sCM update with the JVP            {with_jvp * 1e3:8.1f} ms")
    print(f"  same update, target without tangent {without * 1e3:8.1f} ms   ratio {with_jvp / without:.2f}x")
    print(f"  exact JVP (forward AD + kernel)     {exact * 1e3:8.1f} ms")
    print(f"  finite-difference JVP (3 forwards)  {fd * 1e3:8.1f} ms   exact/FD {exact / fd:.2f}x")
    print(f"  plain forward (no grad)             {plain * 1e3:8.1f} ms   exact/forward {exact / plain:.2f}x")


if __name__ == "__main__":
    main()
