"""Privacy probes on a tiny finished run, each shown able to fail.

- memorization: statistics with a held-out reference; a cohort that copies training images is
  flagged, held-out real images are not;
- membership inference: AUC, TPR at 1% / 0.1% FPR with bootstrap intervals and the DP limits;
  a non-DP model overfit on a tiny private subset is caught (clearly higher AUC than the DP model);
- reconstruction: gradient inversion succeeds without noise and fails with the run's noise,
  next to the reconstruction bound;
- the releasable summary holds no image and no per-record value.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from dpgen.probes import stats
from dpgen.probes.memorization import memorization_probe, nearest_neighbours

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


# ----------------------------------------------------------------------------- pure functions (fast)


def test_auc_and_tpr_known_values():
    m = np.array([0.9, 0.8, 0.7, 0.6])
    n = np.array([0.5, 0.4, 0.3, 0.2])
    assert stats.auc(m, n) == 1.0 and stats.auc(n, m) == 0.0
    assert stats.auc(np.ones(5), np.ones(5)) == 0.5  # ties count half
    assert stats.tpr_at_fpr(m, n, 0.01) == 1.0
    # one non-member above every member: at FPR 0 nothing, at FPR 1/4 everything
    n2 = np.array([0.95, 0.4, 0.3, 0.2])
    assert stats.tpr_at_fpr(m, n2, 0.0) == 0.0 and stats.tpr_at_fpr(m, n2, 0.25) == 1.0
    res = stats.attack_metrics(m, n2, n_boot=200)
    assert res["auc"] == pytest.approx(0.75) and res["auc_ci"][0] <= 0.75 <= res["auc_ci"][1]
    assert res["tpr_at_fpr"]["1%"]["resolution_note"]  # 4 non-members cannot resolve 1% FPR
    fpr, tpr = stats.roc_curve(m, n)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_dp_limits():
    # no privacy: nothing is excluded; tiny epsilon: TPR ~ FPR
    assert stats.eps_delta_tpr_limit(0.01, math.inf, 1e-5) == 1.0
    assert stats.eps_delta_tpr_limit(0.01, 1e-6, 0.0) == pytest.approx(0.01, rel=1e-4)
    assert stats.eps_delta_tpr_limit(0.01, 1.0, 1e-5) == pytest.approx(math.e * 0.01 + 1e-5)
    assert 0.5 < stats.eps_delta_auc_limit(1.0, 1e-5) < 0.75
    from dpgen.privacy import accounting

    event = {"type": "poisson_gaussian", "sigma": 1.0, "sample_rate": 0.05, "steps": 100}
    eps = accounting.epsilon([event], 1e-5, "pld")
    lim = stats.dp_tpr_limits(epsilon=eps, delta=1e-5, events=[event])
    for row in lim["per_fpr"].values():
        # the run's trade-off curve is tighter than its (eps, delta) summary, and above chance
        assert row["fpr"] <= row["mechanism_pld"] <= row["eps_delta"] + 1e-6 <= 1.0 + 1e-6
    # composed with a second mechanism the limit grows: limits are for everything released
    hist = {"type": "gaussian", "sigma": 2.0, "count": 1}
    both = stats.dp_tpr_limits(epsilon=accounting.epsilon([event, hist], 1e-5), delta=1e-5, events=[event, hist])
    for key, row in both["per_fpr"].items():
        assert row["mechanism_pld"] > lim["per_fpr"][key]["mechanism_pld"]


def test_nearest_neighbours_match_brute_force():
    g = torch.Generator().manual_seed(0)
    q, t = torch.rand(37, 50, generator=g), torch.rand(120, 50, generator=g)
    nb = nearest_neighbours(q, t, k=10, chunk=16)
    d = torch.cdist(q.double(), t.double())
    s, i = d.sort(1)
    assert torch.equal(nb.nn_index, i[:, 0])
    assert torch.allclose(nb.nn_dist, s[:, 0], atol=1e-9)
    assert torch.allclose(nb.ratio, s[:, 0] / (0.5 * s[:, :10].mean(1)), rtol=1e-5)
    qc, tc = q - q.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    corr = (qc / qc.norm(dim=1, keepdim=True)) @ (tc / tc.norm(dim=1, keepdim=True)).T
    assert torch.allclose(nb.max_corr, corr.max(1).values.double(), atol=1e-5)


def test_copies_are_flagged_and_held_out_images_are_not(tiny_config):
    """The memorization probe can fail: on real BreastMNIST images, a "cohort" of (slightly
    perturbed) training images is flagged; held-out real images are not, although BreastMNIST holds
    near-duplicates across its splits (which is why the verdict is relative to a held-out reference)."""
    from dpgen.data import load_dataset

    spec = tiny_config.data.private
    train, val = load_dataset(spec), load_dataset(spec, split="val")
    rng = np.random.default_rng(0)
    copies = np.clip(train.images[:30].astype(int) + rng.integers(-2, 3, train.images[:30].shape), 0, 255).astype(np.uint8)
    half = len(val) // 2
    res, _ = memorization_probe(copies, train.images, val.images[half:])
    pix = res["spaces"]["pixel"]
    assert pix["synthetic"]["near_copies"] == 30 and res["flagged"] is True
    assert pix["comparison"]["near_copies"]["flagged"] and pix["comparison"]["high_correlation"]["flagged"]
    res, _ = memorization_probe(val.images[:half], train.images, val.images[half:])
    assert res["flagged"] is False
    assert res["spaces"]["pixel"]["synthetic"]["near_copy_fraction"] < 0.5


def test_discriminator_attack_scores_members_higher():
    from dpgen.probes.membership import attack_results, discriminator_attack

    class MeanD(torch.nn.Module):  # "looks real" = bright, standing in for a memorizing discriminator
        def forward(self, x):
            return x.flatten(1).mean(1, keepdim=True)

    class ZeroD(torch.nn.Module):  # a reference that finds everything equally real
        def forward(self, x):
            return torch.zeros(len(x), 1)

    g = torch.Generator().manual_seed(0)
    members = torch.rand(40, 1, 8, 8, generator=g) + 0.5
    non_members = torch.rand(40, 1, 8, 8, generator=g)
    res = attack_results(discriminator_attack(MeanD(), members, non_members, reference=ZeroD()), n_boot=200)
    assert res["primary"] == "reference" and set(res["scores"]) == {"discriminator", "reference"}
    for r in res["scores"].values():
        assert r["auc"] > 0.95 and r["auc_ci"][0] > 0.9


# ----------------------------------------------------------------------------- a tiny finished run


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    from dpgen.cli import main
    from dpgen.probes import AuditOptions, audit_stage
    from dpgen.probes.membership import LossAttackOptions, OverfitOptions
    from dpgen.probes.reconstruction import InversionOptions
    from dpgen.rundir import RunDir
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("probes")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    run_dir = root / "run"
    assert main(["run", str(cfg_path), "--run-dir", str(run_dir), "--no-progress"]) == 0
    rd = RunDir(run_dir)
    config = rd.load_config()
    opts = AuditOptions(
        encoder_epochs=1,
        loss_attack=LossAttackOptions(timestep_fractions=OVERFIT_TIMESTEPS, draws=2, n_boot=1000),
        overfit=OverfitOptions(**OVERFIT),
        inversion=InversionOptions(iterations=200, identification_trials=300, pool_size=32),
        attack_targets=3, diffusion_inversion_targets=1, diffusion_inversion_iterations=100,
    )
    results = audit_stage(config, rd, device="cpu", progress=False, options=opts)
    return run_dir, results


# cheap settings for the tiny model (see the report of issue 6 for the measurements behind them)
OVERFIT_TIMESTEPS = (0.1, 0.3, 0.5, 0.7)
OVERFIT = {"n_images": 8, "steps": 700, "batch_size": 8, "lr": 3e-3}


def test_memorization_statistics_with_held_out_reference(audited):
    run_dir, res = audited
    m = res["memorization"]
    pix = m["spaces"]["pixel"]
    assert pix["synthetic"]["n"] == 12 and pix["held_out"]["n"] == 78
    for side in ("synthetic", "held_out"):
        for key in ("nn_distance", "carlini_ratio", "max_correlation"):
            assert pix[side][key]["median"] >= 0
    feat = [s for s in m["spaces"] if s.startswith("feature[")]
    assert feat, "feature-space statistics missing"
    assert m["flagged"] is False  # a DP model after 6 steps copies nothing
    for f in m["figures"]:
        assert (run_dir / f).is_file() and f.startswith("internal/audit/")


def test_membership_metrics_next_to_dp_limits(audited):
    _, res = audited
    mm = res["membership"]
    r = mm["dp_model"]["scores"]["reference"]
    assert r["n_members"] == r["n_non_members"] == 78  # equal sizes: val has 78 images
    assert r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
    for key in ("1%", "0.1%"):
        t = r["tpr_at_fpr"][key]
        assert 0 <= t["ci"][0] <= t["tpr"] <= t["ci"][1] <= 1
        lim = mm["dp_limits"]["per_fpr"][key]
        assert 0 < lim["mechanism_pld"] <= lim["eps_delta"] <= 1
    assert mm["dp_limits"]["epsilon"] == pytest.approx(res["privacy"]["epsilon"])
    assert 0.3 < r["auc"] < 0.7  # 6 DP steps: indistinguishable from chance
    for key in ("1%", "0.1%"):  # and within what DP allows (up to sampling error)
        assert r["tpr_at_fpr"][key]["ci"][0] <= mm["dp_limits"]["per_fpr"][key]["mechanism_pld"]


def test_non_dp_overfit_model_is_caught(audited):
    _, res = audited
    oc = res["membership"]["overfit_control"]
    assert oc["caught"], (oc["auc_overfit"], oc["auc_dp_model"])
    assert oc["auc_overfit"] >= oc["auc_dp_model"] + 0.2


def test_inversion_succeeds_without_noise_and_fails_with_the_runs_noise(audited):
    _, res = audited
    r = res["reconstruction"]
    clf = r["targets"]["classifier"]["conditions"]
    assert clf["no_noise"]["ssim_max"] > 0.5 and clf["no_noise"]["inversion_identified"] >= 1
    assert clf["run_noise"]["sigma"] == pytest.approx(res["privacy"]["sigma"])
    assert clf["run_noise"]["ssim_mean"] < 0.3
    for t in r["targets"].values():
        gi0 = t["conditions"]["no_noise"]["identification_by_gradient"]
        gi1 = t["conditions"]["run_noise"]["identification_by_gradient"]
        assert gi0["success_rate"] == 1.0  # noiseless gradients identify the target
        # with noise: at most the bound of the attacked release (up to sampling error)
        assert gi1["success_ci"][0] <= t["attack_bound"]["bound"]
    assert r["ledger_bound"]["bound"] > 0 and r["run_bound_at_candidate_prior"]["bound"] > 0


def test_summary_holds_aggregates_only_and_everything_stays_internal(audited):
    run_dir, res = audited
    summary_path = run_dir / "internal" / "audit" / "probes_summary.json"
    text = summary_path.read_text()
    s = json.loads(text)
    # no image, no per-record value; and still internal: computed on private data without DP
    assert s["contains_private_images"] is False and s["internal"] is True
    assert not (run_dir / "metrics").exists()
    assert len(text) < 40_000

    def walk(node, path="$"):
        if isinstance(node, dict):
            for k, v in node.items():
                assert k not in ("per_record", "nn_index", "reconstructions", "members", "non_members", "rows",
                                 "per_target", "images"), f"{path}.{k}"
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            # only intervals: [low, high]
            assert len(node) <= 2, f"{path} is a list of {len(node)} values"
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(s)
    # everything else marks itself internal and lives in internal/
    full = json.loads((run_dir / "internal" / "audit" / "probes.json").read_text())
    assert full["internal"] is True and full["contains_private_images"] is True and "per_record" in full
    assert {p.name for p in (run_dir / "internal" / "audit").glob("*.png")} >= {
        "closest_pairs_synthetic.png", "closest_pairs_held_out.png", "nn_distances.png", "roc.png",
        "reconstructions_classifier.png"}


def test_cli_audit_json(audited, tiny_config, tmp_path, capsys):
    """`dpgen audit RUN --json` (memorization only here, on a copying cohort given with --cohort)."""
    import shutil

    from dpgen.cli import main
    from dpgen.data import load_dataset
    from dpgen.data.cohort import write_cohort_npz

    run_dir = tmp_path / "run"
    shutil.copytree(audited[0], run_dir)  # leave the fixture's outputs alone
    train = load_dataset(tiny_config.data.private)
    cohort = tmp_path / "copies.npz"
    write_cohort_npz(cohort, train.images[:20], train.labels[:20])
    code = main(["audit", str(run_dir), "--cohort", str(cohort), "--json", "--no-progress", "--no-membership",
                 "--no-reconstruction", "--no-features"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memorization"]["flagged"] is True
    assert out["memorization"]["spaces"]["pixel"]["synthetic"]["near_copies"] == 20
    summary = json.loads((run_dir / "internal" / "audit" / "probes_summary.json").read_text())
    assert summary["contains_private_images"] is False and summary["memorization"]["flagged"] is True
