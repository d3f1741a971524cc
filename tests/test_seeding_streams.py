"""distill.base.seeding's streams: scoped seeds make a scored rollout a function of the network and its seed."""

import torch

from distill.base.seeding import seeded, seeded_renoising, step_seed


def test_seeded_fixes_the_block_and_puts_the_process_stream_back():
    torch.manual_seed(7)
    expected_after = torch.randn(4)
    torch.manual_seed(7)
    with seeded(3):
        inside = torch.randn(4)
    after = torch.randn(4)
    torch.manual_seed(123)  # whatever the process drew before does not reach inside the block
    with seeded(3):
        again = torch.randn(4)
    assert torch.equal(inside, again)
    assert torch.equal(after, expected_after)


def test_renoising_stream_is_fixed_by_the_seed_and_is_not_the_starting_noise():
    start = torch.randn(4, generator=torch.Generator().manual_seed(5))
    with seeded_renoising(5):
        first = torch.randn(4)
    with seeded_renoising(5):
        second = torch.randn(4)
    with seeded_renoising(6):
        other = torch.randn(4)
    assert torch.equal(first, second)
    assert not torch.equal(first, start)  # re-noising with the starting noise itself would undo the step
    assert not torch.equal(first, other)


def test_step_seeds_differ_across_every_argument():
    seeds = {step_seed(s, t, r, k) for s in range(3) for t in range(3) for r in range(3) for k in range(2)}
    assert len(seeds) == 3 * 3 * 3 * 2
    assert all(0 <= x < 1 << 63 for x in seeds)
