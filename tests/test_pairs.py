"""The teacher ODE pair store: round trip, resume after kill -9 mid-shard (final store byte-identical), shards by
process under `accelerate launch`, streaming reads; and the regression losses against their formulas."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import REPO, subprocess_env, tiny_overrides

from distill.base.errors import ConfigError
from distill.data.digits import digits_split
from distill.data.pairs import (
    MANIFEST,
    PairDataset,
    PairsConfig,
    PairStore,
    RegressionConfig,
    generate_from_config,
    pseudo_huber_c,
    read_manifest,
    regression_loss,
    shard_name,
    shard_seed,
)
from distill.models.denoiser import load_denoiser
from distill.models.sampling import sample
from distill.training.preflight import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

REFLOW_YAML = REPO / "recipes" / "digits/reflow.yaml"
SMALL = ("recipe.pairs.num_pairs=10", "recipe.pairs.shard_size=4", "recipe.pairs.num_steps=3",
         "recipe.pairs.batch_size=3", "recipe.pairs.progress_bar=false", "recipe.pairs.seed=5")


def pairs_config(teacher: Path, store: Path, *extra: str):
    return load_config(REFLOW_YAML, tiny_overrides(teacher, store.parent / "run", f"recipe.pairs.path={store}",
                                                   *SMALL, *extra))


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def reference_store(tiny_teacher, tmp_path_factory):
    """A store made in one uninterrupted run, in this process."""
    store = tmp_path_factory.mktemp("pairs") / "store"
    generate_from_config(pairs_config(tiny_teacher, store))
    return store


# ---------------------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------------------


def test_store_holds_the_teacher_ode_of_its_noise(reference_store, tiny_teacher):
    store = PairStore(reference_store, verify=True)
    assert [r["count"] for r in store.shards] == [4, 4, 2] and len(store) == 10
    manifest = read_manifest(reference_store)
    assert manifest["complete"] and manifest["spec"]["num_steps"] == 3 and manifest["spec"]["labels"] == "train"
    teacher = load_denoiser(tiny_teacher, prediction="edm")  # as the config says
    train_labels = set(digits_split("train", 8)[1].tolist())
    for i, shard in enumerate(store):
        g = torch.Generator().manual_seed(shard_seed(5, i))
        n = shard["noise"].shape[0]
        assert torch.equal(shard["noise"], torch.randn((n, 1, 8, 8), generator=g))  # from (seed, shard) only
        labels = shard["cond.class_labels"]
        assert set(labels.tolist()) <= train_labels and labels.dtype == torch.int64
        want = sample(teacher, {"class_labels": labels}, shard["noise"], num_steps=3)
        torch.testing.assert_close(shard["sample"], want, atol=1e-5, rtol=1e-5)
        assert shard["sample"].std() > 0.01


def test_labels_follow_the_train_half(tiny_teacher, tmp_path):
    """labels=train resamples the train half's labels (its histogram), uniform does not look at them."""
    cfg = pairs_config(tiny_teacher, tmp_path / "s", "recipe.pairs.num_pairs=4000", "recipe.pairs.shard_size=4000",
                       "recipe.pairs.num_steps=1", "recipe.pairs.batch_size=4000")
    from distill.data.pairs import draw_conditions

    train = digits_split("train", 8)[1]
    got = draw_conditions(train, 10, 20000, "train", torch.Generator().manual_seed(0))["class_labels"]
    want = torch.bincount(train, minlength=10).double() / len(train)
    assert (torch.bincount(got, minlength=10).double() / 20000 - want).abs().max() < 0.01
    uni = draw_conditions(None, 10, 20000, "uniform", torch.Generator().manual_seed(0))["class_labels"]
    assert (torch.bincount(uni, minlength=10).double() / 20000 - 0.1).abs().max() < 0.01
    assert cfg.recipe.pairs.labels == "train"


def test_dataset_streams_shards_with_an_lru(reference_store):
    data = PairDataset(reference_store, cache_shards=1)
    store = PairStore(reference_store)
    rows = {}
    for shard in store:
        for j in range(shard["noise"].shape[0]):
            rows[shard["noise"][j].sum().item()] = (shard["sample"][j], shard["cond.class_labels"][j])
    g = torch.Generator().manual_seed(0)
    seen_shards = set()
    for _ in range(12):
        batch = data.sample(5, g)
        assert batch.images.shape == batch.noise.shape == (5, 1, 8, 8) and batch.cond["class_labels"].shape == (5,)
        for j in range(5):  # every row is one stored (noise, sample, label) triple, kept together
            sample_j, label_j = rows[batch.noise[j].sum().item()]
            assert torch.equal(batch.images[j], sample_j) and batch.cond["class_labels"][j] == label_j
        assert len(data.store._cache) == 1
        seen_shards.add(next(iter(data.store._cache)))
    assert seen_shards == {0, 1, 2}
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(data.sample(4, g1).noise, PairDataset(reference_store).sample(4, g2).noise)


def test_incomplete_or_foreign_store_is_refused(reference_store, tiny_teacher, tmp_path):
    with pytest.raises(FileNotFoundError, match="distill pairs"):
        PairStore(tmp_path / "nothing")
    partial = tmp_path / "partial"
    partial.mkdir()
    manifest = json.loads((reference_store / MANIFEST).read_text())
    del manifest["shards"]["2"]
    manifest["complete"] = False
    (partial / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="incomplete"):
        PairStore(partial)
    # The same folder with another spec is never resumed or mixed.
    with pytest.raises(ConfigError, match="num_steps: 3 in the store, 4 now"):
        generate_from_config(pairs_config(tiny_teacher, reference_store, "recipe.pairs.num_steps=4"))


def test_cli_pairs_reports_a_config_without_pairs(tmp_path, capsys):
    from distill.cli import main

    assert main(["pairs", str(REPO / "recipes" / "digits/dmd2.yaml")]) == 2
    assert "recipe.pairs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Kill -9 mid-shard, then resume
# ---------------------------------------------------------------------------------------------------------------

# Makes the store of the test config, but once shard 0 is written, the next teacher call (inside shard 1) writes
# a marker and sleeps: the parent kills the process there with SIGKILL.
KILLED_CHILD = r"""
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from distill.training.preflight import load_config
from distill.data import pairs

cfg = load_config(sys.argv[1], sys.argv[3:])
marker = Path(sys.argv[2])
written = []
real_make_shard = pairs.make_shard

def make_shard(teacher, pc, index, *args, **kwargs):
    if written:  # a shard is on disk: stop in the middle of the next one, half its teacher calls done
        calls = []
        def hook(*_):
            calls.append(1)
            if len(calls) == 2:
                tmp = marker.with_suffix(".tmp")  # renamed into place: the parent never reads it half-written
                tmp.write_text(str(index))
                tmp.rename(marker)
                time.sleep(600)
        teacher.model.register_forward_hook(hook)
    return real_make_shard(teacher, pc, index, *args, **kwargs)

real_record = pairs._record_shards
def record(root, spec, indices):
    out = real_record(root, spec, indices)
    written.extend(indices)
    return out

pairs.make_shard, pairs._record_shards = make_shard, record
pairs.generate_from_config(cfg)
"""


def test_kill_mid_shard_then_resume_gives_the_identical_store(reference_store, tiny_teacher, tmp_path):
    store = tmp_path / "store"
    cfg_args = tiny_overrides(tiny_teacher, tmp_path / "run", f"recipe.pairs.path={store}", *SMALL)
    marker = tmp_path / "in_shard"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(REFLOW_YAML), str(marker), *cfg_args],
                            env=subprocess_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the child never reached shard 1"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert marker.read_text() == "1"
    # Killed inside shard 1: shard 0 is complete and recorded, nothing else is.
    on_disk = sorted(p.name for p in store.iterdir() if p.suffix == ".safetensors")
    assert on_disk == [shard_name(0)]
    assert list(read_manifest(store)["shards"]) == ["0"] and not read_manifest(store)["complete"]
    shard0 = (store / shard_name(0)).read_bytes()
    # A kill during a write leaves only a temporary file: simulate one (garbage), which the rerun must ignore.
    (store / f".tmp-999-{shard_name(1)}").write_bytes(b"\x00garbage")

    made = []
    cfg = load_config(REFLOW_YAML, cfg_args)
    from distill.data import pairs as pairs_module

    real = pairs_module.make_shard
    pairs_module.make_shard = lambda teacher, pc, index, *a, **k: made.append(index) or real(teacher, pc, index, *a, **k)
    try:
        generate_from_config(cfg)
    finally:
        pairs_module.make_shard = real
    assert made == [1, 2]  # shard 0 was not redone
    assert (store / shard_name(0)).read_bytes() == shard0
    assert files(store) == files(reference_store)  # byte-identical shards and manifest
    assert not list(store.glob(".tmp-*"))
    # Rerunning a complete store does nothing.
    pairs_module.make_shard = lambda *a, **k: pytest.fail("a complete store was regenerated")
    try:
        generate_from_config(cfg)
    finally:
        pairs_module.make_shard = real


def test_shard_written_but_not_recorded_is_recorded_on_resume(reference_store, tmp_path, tiny_teacher):
    """A kill between a shard's rename and the manifest update: the shard is complete and is kept."""
    store = tmp_path / "store"
    store.mkdir()
    for name, data in files(reference_store).items():
        (store / name).write_bytes(data)
    manifest = json.loads((store / MANIFEST).read_text())
    del manifest["shards"]["1"]
    manifest["complete"] = False
    (store / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    from distill.data import pairs as pairs_module

    real = pairs_module.make_shard
    pairs_module.make_shard = lambda *a, **k: pytest.fail("a shard on disk was regenerated")
    try:
        generate_from_config(pairs_config(tiny_teacher, store))
    finally:
        pairs_module.make_shard = real
    assert files(store) == files(reference_store)


# ---------------------------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------------------------


def test_two_processes_write_their_own_shards_into_one_manifest(reference_store, tiny_teacher, tmp_path):
    from test_distributed import launch

    store = tmp_path / "store"
    overrides = tiny_overrides(tiny_teacher, tmp_path / "run", f"recipe.pairs.path={store}", *SMALL)
    # Each rank logs the shards it makes (shard i belongs to rank i % 2).
    launch(str(REPO / "tests" / "pairs_rank_log.py"), str(tmp_path / "log"), str(REFLOW_YAML), *overrides)
    made = {r: json.loads((tmp_path / "log" / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert made == {0: [0, 2], 1: [1]}
    # The same store as one process makes, one manifest: the same files, the same manifest but for the shards'
    # hashes, each shard's metadata byte for byte, the pairs equal to float rounding. Not bitwise: the ranks start
    # with OMP_NUM_THREADS=1 while this process set its threads at run time, and on some CPUs (an AMD EPYC here)
    # oneDNN then rounds the teacher's convolutions differently in the last bits.
    ours, theirs = files(store), files(reference_store)
    assert sorted(ours) == sorted(theirs)
    unhashed = [json.loads(m[MANIFEST]) for m in (ours, theirs)]
    for manifest in unhashed:
        for shard in manifest["shards"].values():
            del shard["sha256"]
    assert unhashed[0] == unhashed[1]
    for name in sorted(n for n in ours if n.endswith(".safetensors")):
        a, b = safe_open(store / name, "pt"), safe_open(reference_store / name, "pt")
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()), name
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-5, atol=1e-6, msg=f"{name}/{key}")
    assert PairStore(store, verify=True).spec["num_shards"] == 3


# ---------------------------------------------------------------------------------------------------------------
# Regression losses against their formulas
# ---------------------------------------------------------------------------------------------------------------


def test_l2_regression_is_the_mean_squared_error():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    got = regression_loss(pred, target, "l2")
    want = torch.tensor([sum((pred[i] - target[i]).flatten().tolist()[k] ** 2 for k in range(16)) / 16 for i in range(3)])
    torch.testing.assert_close(got, want)


def test_pseudo_huber_matches_its_formula_and_limits():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    c = 0.3
    d = (pred - target).flatten(1)
    want = torch.tensor([math.sqrt(float(d[i] @ d[i]) + c * c) - c for i in range(4)])
    torch.testing.assert_close(regression_loss(pred, target, "pseudo_huber", c), want)
    # Default c is iCT's 0.00054 sqrt(d), d = 18 here.
    assert pseudo_huber_c(18) == pytest.approx(0.00054 * math.sqrt(18))
    torch.testing.assert_close(regression_loss(pred, target, "pseudo_huber"),
                               regression_loss(pred, target, "pseudo_huber", 0.00054 * math.sqrt(18)))
    # Small residual: ||d||^2 / (2c) (L2-like); large residual: ||d|| - c (L1-like in the norm).
    tiny = 1e-3 * d[:1].reshape(1, 2, 3, 3)
    sq = float((tiny.flatten() ** 2).sum())
    assert regression_loss(tiny, torch.zeros_like(tiny), "pseudo_huber", 10.0).item() == pytest.approx(sq / 20, rel=1e-3)
    big = 1e3 * d[:1].reshape(1, 2, 3, 3)
    assert regression_loss(big, torch.zeros_like(big), "pseudo_huber", 0.1).item() == pytest.approx(
        math.sqrt(float((big.flatten() ** 2).sum())) - 0.1, rel=1e-5)
    # Its gradient is d / sqrt(||d||^2 + c^2).
    p = pred.clone().requires_grad_(True)
    regression_loss(p, target, "pseudo_huber", c).sum().backward()
    norm = (d.pow(2).sum(1, keepdim=True) + c * c).sqrt()
    torch.testing.assert_close(p.grad.flatten(1), d / norm)


class HalfL1(torch.nn.Module):
    """A stand-in perceptual network: takes 3-channel images, returns (N, 1, 1, 1) like LPIPS."""

    def forward(self, x, y):
        assert x.shape[1] == 3 and y.shape[1] == 3
        return 0.5 * (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)


def make_half_l1():
    return HalfL1()


def test_perceptual_hook_loads_a_user_network():
    cfg = RegressionConfig(loss="perceptual", perceptual_network="test_pairs:make_half_l1")
    pred, target = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(cfg.distance()(pred, target), 0.5 * (pred - target).abs().flatten(1).mean(1))
    with pytest.raises(ConfigError, match="perceptual_network"):
        RegressionConfig(loss="perceptual", perceptual_network="no_such_module:LPIPS").distance()
    from distill.config import validate_section

    with pytest.raises(ConfigError, match="perceptual_network"):
        validate_section(RegressionConfig, {"loss": "perceptual"}, "recipe.regression")


def test_pairs_config_declares_ranges():
    from distill.config import validate_section

    for bad, key in [({"num_pairs": 0}, "num_pairs"), ({"shard_size": 0}, "shard_size"),
                     ({"num_steps": 0}, "num_steps"), ({"solver": "rk4"}, "solver"), ({"labels": "all"}, "labels")]:
        with pytest.raises(ConfigError, match=f"recipe.pairs.{key}"):
            validate_section(PairsConfig, bad, "recipe.pairs")
