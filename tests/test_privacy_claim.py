"""The privacy claim, earned end to end (issue 11): each test fails on the bug it guards against.

- which units take part in a DP-SGD step comes from a secret seed in internal/, never from the
  public config seed; a unit's inclusion is Bernoulli(q) whatever the other units are;
- secrets are written 0600;
- the reconstruction bound is for the composition of every released mechanism;
- the noise generator lives on the parameters' device (a CUDA run used to crash at step one).
"""

from __future__ import annotations

import copy
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

import dpgen
from dpgen.config import config_from_dict
from dpgen.privacy.dpsgd import sample_units
from dpgen.privacy.engine import PrivacyUnits
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.privacy.randomness import SecretStreams, read_secret, step_generator
from dpgen.rundir import RunDir
from dpgen.training.dp import SampledCounts, run_secret

Q = 0.3


def _tiny_run(tiny_raw, path, **finetune):
    raw = {**tiny_raw, "pretrain": {**tiny_raw["pretrain"], "steps": 2},
           "finetune": {**tiny_raw["finetune"], **finetune}, "sample": {**tiny_raw["sample"], "num_images": 4}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dpgen.run(config_from_dict(raw), path, progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    return path


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two fine-tunes of the same config (same public config seed 0)."""
    from tests.conftest import TINY

    import copy

    root = tmp_path_factory.mktemp("claim")
    return [_tiny_run(copy.deepcopy(TINY), root / name) for name in ("a", "b")]


def test_same_config_seed_samples_different_units(two_runs):
    a, b = (SampledCounts.read(r / "internal" / "sampling" / "dp_sgd_finetune.jsonl") for r in two_runs)
    assert sorted(a) == sorted(b) == list(range(6))  # every step recorded, in internal/ only
    assert [a[s] for s in range(6)] != [b[s] for s in range(6)]


def test_the_poisson_masks_follow_the_secret_not_the_config_seed(two_runs):
    run = two_runs[0]
    config = RunDir(run).load_config()
    plan = PrivacyLedger.for_run(run).latest("dp_plan")
    units = PrivacyUnits.from_subjects(None, plan["n_units"])
    recorded = SampledCounts.read(run / "internal" / "sampling" / "dp_sgd_finetune.jsonl")
    secret = SecretStreams(read_secret(RunDir(run).internal))
    from_secret = [len(sample_units(units, plan["sample_rate"], secret, s)) for s in range(6)]
    assert from_secret == [recorded[s] for s in range(6)]
    # what anyone could compute from the manifest's public seed is not what happened
    public = [len(units.poisson_sample(plan["sample_rate"], step_generator(config.seed, s, "poisson")))
              for s in range(6)]
    assert public != from_secret
    manifest = json.loads((run / "manifest.json").read_text())
    assert str(secret.secret_seed) not in json.dumps(manifest) and str(secret.secret_seed) not in (run / "config.yaml").read_text()
    assert str(secret.secret_seed) not in (run / "privacy" / "ledger.jsonl").read_text()


def test_secrets_are_written_0600(two_runs):
    mode = stat.S_IMODE(os.stat(two_runs[0] / "internal" / "secrets.json").st_mode)
    assert mode == 0o600


def test_removing_one_unit_leaves_every_other_units_inclusion_law_unchanged(tmp_path):
    """Over many runs of the same config, each unit is sampled with probability q, independently of the
    others, whether or not unit 7 is in the data: the law the accountant's subsampling analysis assumes.
    With the public config seed the same config always sampled the same units (frequencies 0 or 1), and
    removing a unit shifted the inclusion of every unit after it."""
    n, runs, step = 20, 400, 3
    full, without = PrivacyUnits.from_subjects(None, n), PrivacyUnits.from_subjects(None, n - 1)
    inc_full, inc_without = np.zeros((runs, n)), np.zeros((runs, n - 1))
    for r in range(runs):
        secret = run_secret(RunDir(tmp_path / f"run{r}"))  # what fine-tuning uses: a secret per run directory
        inc_full[r, sample_units(full, Q, secret, step)] = 1
        inc_without[r, sample_units(without, Q, secret, step)] = 1
    sd = math.sqrt(Q * (1 - Q) / runs)
    for inc in (inc_full, inc_without):
        assert np.all(np.abs(inc.mean(0) - Q) < 5 * sd)  # each unit: Bernoulli(q)
        pair = (inc[:, :, None] * inc[:, None, :]).mean(0)[np.triu_indices(inc.shape[1], 1)]
        assert np.all(np.abs(pair - Q * Q) < 5 * math.sqrt(Q * Q * (1 - Q * Q) / runs))  # pairwise independent


def test_add_remove_runs_the_same_mechanism_on_neighbouring_data_sets(tiny_raw):
    """Under add/remove the sample rate and sigma must not depend on N: with q = batch / N a data set
    with one more unit ran another mechanism (sigma 1.498 vs 1.496 on the quickstart), which the
    accountant does not cover and which an observer of the noise scale can tell apart."""
    from dpgen.privacy.engine import PrivacyError
    from dpgen.training.dp import DPSettings, histogram_events, plan_mechanism

    def plan(raw, n):
        config = config_from_dict(raw)
        return plan_mechanism(config, DPSettings.from_finetune(config.finetune), PrivacyUnits.from_subjects(None, n),
                              mechanism="dp_sgd:finetune", budget=config.privacy.epsilon,
                              other_events=histogram_events(config), trains="test")

    a, b = plan(tiny_raw, 96), plan(tiny_raw, 97)
    assert (a.sigma, a.sample_rate) == (b.sigma, b.sample_rate)
    assert a.sample_rate == 24 / 96 and a.public_unit_count == 96 and a.n_units == 96 and b.n_units == 97
    without = copy.deepcopy(tiny_raw)
    del without["privacy"]["public_unit_count"]
    with pytest.raises(PrivacyError, match="public_unit_count"):
        plan(without, 96)
    without["privacy"]["neighbouring"] = "replace_one"  # N public: q from it
    assert plan(without, 96).sample_rate == 24 / 96 and plan(without, 97).sample_rate == 24 / 97


def test_rows_without_a_subject_id_are_refused():
    """Empty IDs used to become one merged "subject": several patients clipped as one unit."""
    from dpgen.privacy.engine import PrivacyError

    assert len(PrivacyUnits.from_subjects(np.array(["p1", "p1", "p2"], dtype=object), 3)) == 2
    assert len(PrivacyUnits.from_subjects(np.array(["p1", "p1 ", "p2"], dtype=object), 3)) == 2
    for missing in ("", None, float("nan"), "nan", "NA", "N/A", "null", " - "):
        with pytest.raises(PrivacyError, match="no subject ID"):
            PrivacyUnits.from_subjects(np.array(["p1", missing, "p2", missing], dtype=object), 4)


def test_latent_with_dp_autoencoder_bound_covers_both_mechanisms(tiny_raw, tmp_path):
    """A run with two DP-SGD mechanisms (the UNet and the autoencoder): one budget, composed; the
    reconstruction bound is for the composition, larger than either mechanism's alone."""
    from dpgen.privacy.bounds import rero_bound_events

    tiny_raw["model"].update({"generator": "latent_diffusion", "channels": [16, 32]})
    tiny_raw["autoencoder"] = {"channels": [8, 16], "latent_channels": 2, "norm_num_groups": 8,
                               "pretrain": {"steps": 2, "batch_size": 8},
                               "finetune": {"mode": "dp", "steps": 2, "batch_size": 24, "physical_batch_size": 12,
                                            "checkpoint_every": 2}}
    tiny_raw["finetune"]["trainable"] = "attention"
    run = _tiny_run(tiny_raw, tmp_path / "latent")
    ledger = PrivacyLedger.for_run(run)
    s = ledger.summary()
    assert set(s.release_mechanisms) == {"dp_sgd:finetune", "dp_sgd:autoencoder", "gaussian:label_histogram"}
    assert s.within_target and s.target_epsilon == 8.0 and s.epsilon <= 8.0
    bound = ledger.latest("bound")
    assert sorted(bound["mechanisms"]) == sorted(s.release_mechanisms)
    kappa = bound["bound"]["kappa"]
    for name in ("dp_sgd:finetune", "dp_sgd:autoencoder"):
        alone = ledger.latest("dp_complete", mechanism=name)["event"]
        assert bound["bound"]["bound"] > rero_bound_events([alone], kappa)["bound"]


def test_noise_generator_lives_on_the_parameters_device():
    secret = SecretStreams(123)
    g = secret.noise(5, "cpu")
    assert g.device.type == "cpu"
    # the same draws every time (resume), different per step
    assert torch.equal(torch.randn(3, generator=secret.noise(5)), torch.randn(3, generator=g))
    assert not torch.equal(torch.randn(3, generator=secret.noise(5)), torch.randn(3, generator=secret.noise(6)))
    assert "123" not in repr(secret)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")


@pytest.mark.gpu
@gpu
def test_dp_steps_of_breast_eps10_run_on_cuda(tmp_path):
    """A few DP-SGD steps of configs/breast_eps10.yaml's model on CUDA: Opacus draws the noise with
    the generator it is given on the parameters' device (a CPU generator used to raise here)."""
    from dpgen.config import load_config

    cfg = load_config("configs/breast_eps10.yaml", ["pretrain.steps=2", "finetune.steps=3", "finetune.checkpoint_every=3",
                                                     "sample.num_images=8", "sample.steps=2", "sample.batch_size=8"])
    summary = dpgen.run(cfg, tmp_path / "gpu", device="cuda", progress=False)
    assert summary["stages"]["finetune"]["steps"] == 3 and summary["privacy"]["within_target"]


def test_a_run_refuses_private_data_that_changed_since_it_started(tiny_config, tmp_path):
    """Resuming recomputes steps from the same secret draws; on other data the same noise could be
    differenced against what the first attempt already shared."""
    from dpgen.data.dataset import DataError

    rd = RunDir.create(tmp_path / "run", tiny_config)
    rd.record_datasets({"private/train": {"n": 96, "sha256": "a" * 64}, "public/train": {"sha256": "c" * 64}})
    rd.record_datasets({"private/train": {"n": 96, "sha256": "a" * 64}, "public/train": {"sha256": "d" * 64}})
    with pytest.raises(DataError, match="private data changed"):
        rd.record_datasets({"private/train": {"n": 96, "sha256": "b" * 64}})
