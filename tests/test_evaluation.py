"""Tests for dpgen.evaluation: metric maths, sanity on real data, bad input, the four utility rows.

Real MedMNIST files come from $DPGEN_DATA_DIR (default ../shared/data). Epochs, seeds and the
public encoder's training are shrunk so the whole file runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dpgen.config import config_from_dict
from dpgen.data import DataError, load_npz
from dpgen.data.cohort import write_cohort_npz
from dpgen.evaluation import fidelity as F
from dpgen.evaluation.features import EvaluationError, FeatureExtractor, extract_features, public_encoder
from dpgen.evaluation.inputs import check_cohort
from dpgen.evaluation.stage import EvalOptions, evaluate_stage, format_summary
from dpgen.evaluation.utility import ROWS, UtilityOptions, classification_metrics
from dpgen.rundir import RunDir

DATA = Path(os.environ.get("DPGEN_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA / "breastmnist.npz").is_file(), reason=f"no MedMNIST files in {DATA}")
ENCODER_EPOCHS = 2  # tests only; the default is larger


@pytest.fixture(scope="module", autouse=True)
def _env():
    """Data directory for the module; one torch thread (small convs on a shared 2-core box
    run much faster single-threaded than oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPGEN_DATA_DIR", str(DATA))
        mp.setenv("DPGEN_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


def tiny_options(**utility) -> EvalOptions:
    u = dict(seeds=1, epochs=2, synthetic_epochs=2, dp_epochs=1, finetune_epochs=1)
    u.update(utility)
    return EvalOptions(encoder_epochs=ENCODER_EPOCHS, fidelity_repeats=3, kid_subsets=10,
                       utility_options=UtilityOptions(**u))


def breast_config(**data) -> object:
    raw = {"name": "evaltest", "seed": 0,
           "data": {"public": {"source": "pneumoniamnist"}, "private": {"source": "breastmnist"}, "num_classes": 2,
                    "class_names": ["malignant", "normal_benign"], **data}}
    return config_from_dict(raw)


# ----------------------------------------------------------------------------- metric maths


def prdc_reference(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """Brute force, following clovaai/generative-evaluation-prdc line by line."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    d_rr, d_ff, d_rf = dist(real, real), dist(fake, fake), dist(real, fake)
    r_rad = np.partition(d_rr, k, axis=1)[:, k]  # k+1-th smallest, the point itself included
    f_rad = np.partition(d_ff, k, axis=1)[:, k]
    precision = (d_rf < r_rad[:, None]).any(axis=0).mean()
    recall = (d_rf < f_rad[None, :]).any(axis=1).mean()
    density = (1.0 / k) * (d_rf < r_rad[:, None]).sum(axis=0).mean()
    coverage = (d_rf.min(axis=1) < r_rad).mean()
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("n_real,n_fake,dim,k,chunk,shift", [
    (60, 45, 8, 5, 7, 0.0), (40, 90, 3, 3, 1024, 0.5), (30, 30, 16, 5, 4, 2.0), (25, 70, 2, 1, 9, 0.2),
])
def test_prdc_matches_bruteforce(n_real, n_fake, dim, k, chunk, shift):
    rng = np.random.default_rng(n_real + n_fake)
    real = rng.normal(size=(n_real, dim))
    fake = rng.normal(size=(n_fake, dim)) * 1.3 + shift
    got = F.prdc(real, fake, k=k, chunk=chunk)
    want = prdc_reference(real, fake, k)
    for m in want:
        assert got[m] == pytest.approx(want[m], abs=1e-12), m


def test_diversity_flags_a_collapsed_cohort():
    """Mode collapse (a few images repeated) is precise, so precision does not catch it; the
    diversity ratio does: ~1 for another draw of the real distribution, ~0 for one mode."""
    from scipy.spatial.distance import pdist

    rng = np.random.default_rng(3)
    real, other = rng.normal(size=(300, 8)), rng.normal(size=(200, 8))
    collapsed = real[:1] + rng.normal(size=(200, 8)) * 0.05  # nearly one image repeated
    assert F.mean_pairwise_distance(real) == pytest.approx(pdist(real).mean(), rel=1e-9)
    assert F.fidelity_metrics(real, other)["diversity"] == pytest.approx(1.0, abs=0.05)
    out = F.fidelity_metrics(real, collapsed)
    assert out["precision"] > 0.9 and out["diversity"] < 0.1


def test_frechet_distance_matches_closed_form():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 1.0
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert F.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)
    assert F.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, _ = F.kernel_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = F.kernel_distance(a, b + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 0.05 and shifted > 10 * max(abs(same), 1e-3)
    # deterministic for a fixed seed
    assert F.kernel_distance(a, b, 5, 100, seed=3) == F.kernel_distance(a, b, 5, 100, seed=3)


def test_compare_to_reference_matches_sizes():
    rng = np.random.default_rng(2)
    real, cohort, ref = rng.normal(size=(200, 4)), rng.normal(size=(1000, 4)), rng.normal(size=(80, 4))
    out = F.compare_to_reference(real, cohort, ref, repeats=4, kid_subsets=5)
    assert out["n_matched"] == 80 and out["draws"] == {"cohort": 4, "reference": 1}
    for m in F.METRICS:
        row = out["metrics"][m]
        assert row["cohort"] is not None and row["real_vs_real"] is not None and row["cohort_full"] is not None
    assert out["metrics"]["FD"]["real_vs_real_std"] == 0.0


def test_classification_metrics():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
    y = np.array([0, 0, 1, 1, 1])
    m = classification_metrics(probs, y, 2)
    assert m["roc_auc"] == pytest.approx(1.0)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["recall_per_class"] == [1.0, pytest.approx(2 / 3)]
    assert m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    p3 = np.eye(3)[[0, 1, 2, 2]] * 0.8 + 0.2 / 3
    m3 = classification_metrics(p3, np.array([0, 1, 2, 1]), 3)
    assert 0 <= m3["roc_auc"] <= 1 and m3["recall_per_class"] == [1.0, 0.5, 1.0]
    one = classification_metrics(np.tile([0.2, 0.8], (4, 1)), np.array([0, 1, 1, 1]), 2)
    assert one["single_class_predictions"] and one["balanced_accuracy"] == 0.5


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    """A run dir whose public encoder is trained once (public data only) and reused by copies."""
    if not (DATA / "pneumoniamnist.npz").is_file():
        pytest.skip(f"no MedMNIST files in {DATA}")
    root = tmp_path_factory.mktemp("encoder_run")
    config = breast_config()
    rd = RunDir.create(root / "run", config)
    extractor = public_encoder(config, rd, (1, 28, 28), progress=False, epochs=ENCODER_EPOCHS)
    return config, rd, extractor


def new_run(tmp_path, encoder_run, config=None, cohort=None) -> RunDir:
    """A fresh run dir with the cached public encoder copied in and a cohort of real images."""
    _, enc_rd, _ = encoder_run
    config = config or breast_config()
    rd = RunDir.create(tmp_path / "run", config)
    (rd.root / "evaluation").mkdir(parents=True, exist_ok=True)
    shutil.copy(enc_rd.root / "evaluation" / "public_encoder.safetensors", rd.root / "evaluation")
    if cohort is None:
        val = load_npz(DATA / "breastmnist.npz", "val")
        cohort = (val.images, val.labels)
    write_cohort_npz(rd.cohort / "cohort.npz", *cohort)
    return rd


@needs_data
def test_real_cohort_scores_near_reference_and_noise_far(encoder_run):
    _, _, extractor = encoder_run
    assert extractor.name == "public-encoder"
    split = {s: load_npz(DATA / "breastmnist.npz", s) for s in ("train", "val", "test")}
    feats = {s: extract_features(extractor, d.images, progress=False) for s, d in split.items()}
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 1, 28, 28), dtype=np.uint8)
    f_noise = extract_features(extractor, noise, progress=False)

    real_val = F.compare_to_reference(feats["train"], feats["val"], feats["test"], kid_subsets=10)["metrics"]
    real_test = F.compare_to_reference(feats["train"], feats["test"], feats["test"], kid_subsets=10)["metrics"]
    noisy = F.compare_to_reference(feats["train"], f_noise, feats["test"], kid_subsets=10)["metrics"]
    # a cohort of held-out real images (val) scores like the real-vs-real reference
    ref_fd = real_val["FD"]["real_vs_real"]
    assert real_val["FD"]["cohort"] < 2.0 * ref_fd + 3 * real_val["FD"]["real_vs_real_std"]
    for m in ("precision", "recall", "coverage"):
        assert abs(real_val[m]["cohort"] - real_val[m]["real_vs_real"]) < 0.15, m
    assert abs(real_val["density"]["cohort"] - real_val["density"]["real_vs_real"]) < 0.3
    # a cohort made of the reference images themselves reproduces the reference exactly
    assert real_test["FD"]["cohort"] == pytest.approx(real_test["FD"]["real_vs_real"])
    # noise is far worse on every metric: the metrics can fail
    assert noisy["FD"]["cohort"] > 20 * noisy["FD"]["real_vs_real"]
    assert noisy["KID"]["cohort"] > 20 * max(abs(noisy["KID"]["real_vs_real"]), 1e-3)
    for m in ("precision", "density", "coverage"):
        assert noisy[m]["cohort"] < 0.1 < noisy[m]["real_vs_real"], m


# ----------------------------------------------------------------------------- bad input


def _npz(path: Path, images: np.ndarray, labels: np.ndarray, split: str = "train"):
    np.savez(path, **{f"{split}_images": images, f"{split}_labels": labels.reshape(-1, 1)})
    return load_npz(path, split, name=path.stem)


def test_cohort_mismatch_errors_name_both_sides(tmp_path):
    rng = np.random.default_rng(0)
    real = _npz(tmp_path / "realdata.npz", rng.integers(0, 255, (20, 28, 28), dtype=np.uint8), np.arange(20) % 2)

    def err(images, labels, k=2):
        cohort = _npz(tmp_path / "cohort.npz", images, labels)
        with pytest.raises(DataError) as e:
            check_cohort(cohort, real, k, ["malignant", "benign"])
        msg = str(e.value)
        assert str(tmp_path / "cohort.npz") in msg and "realdata" in msg, msg
        return msg

    lab = np.arange(10) % 2
    msg = err(rng.integers(0, 255, (10, 28, 28, 3), dtype=np.uint8), lab)
    assert "3-channel" in msg and "1-channel" in msg
    msg = err(rng.integers(0, 255, (10, 32, 32), dtype=np.uint8), lab)
    assert "32x32" in msg and "28x28" in msg
    msg = err(rng.integers(0, 255, (10, 28, 28, 28), dtype=np.uint8), lab)
    assert "3D" in msg and "2D" in msg
    msg = err(rng.integers(0, 255, (10, 28, 28), dtype=np.uint8), np.arange(10) % 3)
    assert "label(s) [2]" in msg and "classes 0..1" in msg
    msg = err(rng.integers(0, 255, (10, 28, 28), dtype=np.uint8), np.zeros(10, dtype=int))
    assert "no images of class 1 (benign)" in msg


@needs_data
def test_missing_test_split_fails_before_any_training(tmp_path, encoder_run, monkeypatch):
    z = np.load(DATA / "breastmnist.npz")
    src = tmp_path / "notest.npz"
    np.savez(src, **{k: z[k] for k in ("train_images", "train_labels", "val_images", "val_labels")})
    rd = new_run(tmp_path, encoder_run, config=breast_config(private={"source": str(src)}))
    import dpgen.evaluation.stage as stage

    def boom(*a, **k):
        raise AssertionError("training started although the test split is missing")

    monkeypatch.setattr(stage, "train_rows", boom)
    monkeypatch.setattr(stage, "build_extractor", boom)
    with pytest.raises(DataError, match="'test' split") as e:
        evaluate_stage(rd.load_config(), rd, progress=False, options=tiny_options())
    assert "notest.npz" in str(e.value) and "cohort.npz" in str(e.value)


@needs_data
def test_missing_cohort_and_bad_cohort_via_cli(tmp_path, encoder_run, capsys):
    from dpgen.cli import main

    rd = new_run(tmp_path, encoder_run)
    (rd.cohort / "cohort.npz").unlink()
    assert main(["evaluate", str(rd.root), "--no-progress"]) == 2
    assert "no cohort at" in capsys.readouterr().err
    bad = tmp_path / "rgb.npz"
    np.savez(bad, train_images=np.zeros((6, 28, 28, 3), np.uint8), train_labels=(np.arange(6) % 2).reshape(-1, 1))
    assert main(["evaluate", str(rd.root), "--cohort", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "rgb.npz" in err and "breastmnist" in err and "3-channel" in err and "1-channel" in err


@needs_data
def test_inception_without_extra_or_weights_is_a_clear_error(tmp_path, encoder_run, capsys):
    from dpgen.cli import main

    rd = new_run(tmp_path, encoder_run)
    assert main(["evaluate", str(rd.root), "--feature-extractor", "inception", "--no-utility", "--no-progress"]) == 2
    assert "--inception-weights" in capsys.readouterr().err
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not weights")
    rc = main(["evaluate", str(rd.root), "--feature-extractor", "inception", "--inception-weights", str(weights),
               "--no-utility", "--no-progress"])
    if rc == 2:  # no torch-fidelity here (the usual case), or the weights file is unusable
        err = capsys.readouterr().err
        assert "Inception FID is unavailable" in err and "dpgen[inception]" in err


# ----------------------------------------------------------------------------- the stage


@needs_data
def test_evaluate_writes_fidelity_with_references_and_four_rows(tmp_path, encoder_run, monkeypatch):
    """A tiny run dir (cohort = real BreastMNIST val images, a ledger with one DP-SGD event):
    fidelity beside its references, the four utility rows, honest composed epsilon, and the
    private test split read once, after every classifier is trained."""
    from dpgen.privacy import accounting
    from dpgen.privacy.ledger import PrivacyLedger

    rd = new_run(tmp_path, encoder_run)
    event = {"type": "poisson_gaussian", "sigma": 2.0, "sample_rate": 0.2, "steps": 50}
    ledger = PrivacyLedger(rd.ledger_path)
    ledger.append({"kind": "dp_plan", "mechanism": "dp_sgd:finetune", "unit": "per image", "n_units": 546,
                   "delta": 1e-5, "target_epsilon": 10.0, "sigma": 2.0, "sample_rate": 0.2,
                   "expected_batch_size": 109.2, "planned_steps": 50, "max_grad_norm": 1.0,
                   "epsilon_planned_pld": 1.0})
    ledger.append({"kind": "dp_complete", "mechanism": "dp_sgd:finetune", "steps_done": 50, "event": event,
                   "sigma": 2.0, "sample_rate": 0.2, "max_grad_norm": 1.0, "unit": "per image"})
    cohort_eps = accounting.epsilon([event], 1e-5)

    import dpgen.evaluation.inputs as inputs
    import dpgen.evaluation.stage as stage

    log = []
    real_load, real_train = inputs.load_dataset, stage.train_rows
    monkeypatch.setattr(inputs, "load_dataset", lambda spec, split=None, **k: log.append(("load", split)) or real_load(spec, split, **k))

    def train_logged(*a, **k):
        log.append(("train", "start"))
        out = real_train(*a, **k)
        log.append(("train", "end"))
        return out

    monkeypatch.setattr(stage, "train_rows", train_logged)
    config = rd.load_config()
    metrics = evaluate_stage(config, rd, device="cpu", progress=False, options=tiny_options(seeds=2))

    # the private test split: read exactly once, after all training
    assert log.count(("load", "test")) == 1
    assert log.index(("load", "test")) > log.index(("train", "end"))

    saved = json.loads((rd.root / "internal" / "evaluation" / "evaluation.json").read_text())
    assert not (rd.root / "metrics").exists()  # computed on private data without DP: internal only
    assert saved["cohort"]["n"] == 78
    fidelity = saved["fidelity"]
    assert fidelity["feature_extractor"]["name"] == "public-encoder"
    for key in ("FD[public-encoder]", "KID[public-encoder]", "precision[public-encoder]", "recall[public-encoder]",
                "density[public-encoder]", "coverage[public-encoder]"):
        for group in [fidelity["overall"], *fidelity["per_class"].values()]:
            row = group["metrics"][key]
            assert isinstance(row["cohort"], float) and isinstance(row["real_vs_real"], float), key
    assert set(fidelity["per_class"]) == {"malignant", "normal_benign"}

    rows = saved["utility"]["rows"]
    assert list(rows) == list(ROWS)
    for name, row in rows.items():
        assert 0.0 <= row["roc_auc"]["mean"] <= 1.0 and row["roc_auc"]["n"] == 2, name
        assert set(row["recall_per_class"]) == {"malignant", "normal_benign"}
        assert len(row["per_seed"]) == 2
    assert rows["real"]["privacy"]["epsilon"] == "inf"
    budget = config.privacy.epsilon
    assert cohort_eps < budget  # this cohort spent a share of the budget: room for a split
    assert rows["dp_real"]["privacy"]["epsilon"] == pytest.approx(budget, rel=2e-3)  # the baseline spends it all
    assert rows["synthetic"]["privacy"]["epsilon"] == pytest.approx(cohort_eps)
    ft = rows["synthetic_then_dp_real"]["privacy"]
    assert ft["budget"] == "split"  # cohort + classifier fine-tune compose to the baseline's epsilon
    assert ft["epsilon"] == pytest.approx(budget, rel=2e-3) and ft["epsilon"] <= budget
    assert ft["epsilon"] > max(ft["epsilon_cohort"], ft["epsilon_classifier_finetune"])
    assert saved["protocol"]["selection"]["dp_real"].startswith("none")
    cmp_ = saved["utility"]["comparison"]
    assert cmp_["synthetic_minus_dp_real"] == pytest.approx(rows["synthetic"]["roc_auc"]["mean"] - rows["dp_real"]["roc_auc"]["mean"])

    for fig in saved["figures"]:
        assert (rd.root / fig).is_file() and fig.startswith("internal/evaluation/")
    # every DP classifier trained on private data is in the ledger, as an internal mechanism
    from dpgen.privacy.ledger import PrivacyLedger

    internal = {e["mechanism"]: e for e in PrivacyLedger(rd.ledger_path).entries() if e["kind"] == "dp_internal"}
    assert set(internal) == {"dp_sgd:evaluation_baseline", "dp_sgd:evaluation_finetune"}
    assert internal["dp_sgd:evaluation_baseline"]["repeats"] == 2
    assert internal["dp_sgd:evaluation_baseline"]["outputs"] == "internal/evaluation/evaluation.json"
    summary = PrivacyLedger(rd.ledger_path).summary()
    assert summary.epsilon == pytest.approx(cohort_eps)  # composed into nothing released
    text = format_summary(metrics)
    assert "FD[public-encoder]" in text and "real vs real" in text and "DP-SGD" in text


@needs_data
def test_cli_json_reuses_cached_encoder_and_takes_a_custom_module(tmp_path, encoder_run, capsys, monkeypatch):
    from dpgen.cli import main
    import dpgen.evaluation.features as features

    rd = new_run(tmp_path, encoder_run)

    def no_training(*a, **k):
        raise AssertionError("the cached public encoder should have been reused")

    monkeypatch.setattr(features, "train_public_encoder", no_training)
    args = ["evaluate", str(rd.root), "--json", "--no-utility", "--no-progress", "--encoder-epochs", str(ENCODER_EPOCHS)]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert "FD[public-encoder]" in out["fidelity"]["overall"]["metrics"] and "utility" not in out

    module = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16))
    opts = tiny_options()
    opts.utility = False
    metrics = evaluate_stage(rd.load_config(), rd, progress=False, options=opts,
                             feature_extractor=FeatureExtractor.from_module(module, "mine"), write=False)
    assert "FD[mine]" in metrics["fidelity"]["overall"]["metrics"]
    assert metrics["fidelity"]["feature_extractor"]["feature_dim"] == 16


def test_feature_extractor_name_is_required_to_be_distinct():
    with pytest.raises(EvaluationError, match="reserved"):
        FeatureExtractor.from_module(nn.Identity(), "inception")


@needs_data
def test_volumes_run_end_to_end_with_a_volumetric_classifier(tmp_path):
    """3D: adrenal volumes (no 3D public data here: a fixed random encoder, named as such)."""
    if not (DATA / "adrenalmnist3d.npz").is_file():
        pytest.skip("no adrenalmnist3d.npz")
    config = config_from_dict({"name": "vol", "data": {"private": {"source": "adrenalmnist3d", "max_images": 40},
                                                       "num_classes": 2, "spatial_dims": 3}})
    rd = RunDir.create(tmp_path / "run", config)
    val = load_npz(DATA / "adrenalmnist3d.npz", "val").subset(40)
    write_cohort_npz(rd.cohort / "cohort.npz", val.images, val.labels)
    metrics = evaluate_stage(config, rd, progress=False, options=tiny_options(epochs=1, synthetic_epochs=1))
    assert metrics["fidelity"]["feature_extractor"]["name"] == "random-encoder"
    assert "FD[random-encoder]" in metrics["fidelity"]["overall"]["metrics"]
    assert list(metrics["utility"]["rows"]) == list(ROWS)
    spec = metrics["utility"]["options"]
    assert spec["widths_3d"]


@needs_data
def test_rgb_five_classes_run_end_to_end(tmp_path):
    """RGB private data with 5 classes (random images; shape handling only): the grey public
    encoder is adapted to 3 channels, ROC-AUC is macro one-vs-rest."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 20), ("test", 30)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 5).reshape(-1, 1).astype(np.uint8)
    np.savez(tmp_path / "rgb5.npz", **arrays)
    config = config_from_dict({"name": "rgb", "data": {
        "public": {"source": "pneumoniamnist", "max_images": 256}, "private": {"source": str(tmp_path / "rgb5.npz")},
        "num_classes": 5}})
    rd = RunDir.create(tmp_path / "run", config)
    write_cohort_npz(rd.cohort / "cohort.npz", arrays["val_images"].transpose(0, 3, 1, 2),
                     arrays["val_labels"][:, 0])
    opts = tiny_options(epochs=1, synthetic_epochs=1)
    opts.encoder_epochs = 1
    metrics = evaluate_stage(config, rd, progress=False, options=opts)
    assert metrics["cohort"]["image_shape"] == [3, 28, 28]
    assert len(metrics["fidelity"]["per_class"]) == 5
    for row in metrics["utility"]["rows"].values():
        assert 0.0 <= row["roc_auc"]["mean"] <= 1.0 and len(row["recall_per_class"]) == 5


def test_class_signal_sees_a_cohort_that_lost_its_classes():
    """The diagnostic applies real-data classifiers to the cohort: right classes score high, a cohort
    whose labels no longer match its images scores low."""
    from dpgen.data import ImageDataset
    from dpgen.evaluation.utility import TrainedRows, class_signal

    class Brightness(torch.nn.Module):  # stands in for a classifier trained on real data: class 1 = bright
        def forward(self, x):
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([-m, m], 1) * 10

    g = torch.Generator().manual_seed(0)
    dark, bright = torch.rand(20, 1, 8, 8, generator=g) * 0.3, 0.7 + torch.rand(20, 1, 8, 8, generator=g) * 0.3
    images = (torch.cat([dark, bright]) * 255).to(torch.uint8).numpy()
    labels = np.array([0] * 20 + [1] * 20)
    trained = TrainedRows(models={"real": [Brightness(), Brightness()]}, records={"real": [{}, {}]}, info={})
    def ds(y):
        return ImageDataset(images, y, name="cohort", path="cohort.npz", split="train", fingerprint="-")

    good = class_signal(trained, ds(labels), 2, ["a", "b"])
    lost = class_signal(trained, ds(1 - labels), 2, ["a", "b"])
    assert good["accuracy_per_class"]["a"]["mean"] == 1.0 and good["balanced_accuracy"]["mean"] == 1.0
    assert lost["balanced_accuracy"]["mean"] == 0.0
    assert class_signal(TrainedRows(models={}, records={}, info={}), ds(labels), 2) is None


def test_real_classifier_space_scores_every_control_worse_than_real_images():
    """Issue 13: a blurred cohort that had lost its classes scored nearly real in the public
    encoder's space, which is blind to a set of one class only. evaluate's second space, the
    ceiling classifier's features, must see every control made from real BreastMNIST test images
    (blur, central lesion masked, one class only, classes swapped): FD at least 2x that of the
    unmodified test images, both against the private train split at the same n (per class for
    the swap)."""
    from dpgen.config import DataSource
    from dpgen.data import load_dataset
    from dpgen.evaluation.controls import control_sets
    from dpgen.evaluation.features import classifier_extractor, extract_features
    from dpgen.evaluation.utility import UtilityOptions, train_real_classifier

    src = DataSource(source="breastmnist")
    train, val, test = (load_dataset(src, split=s) for s in ("train", "val", "test"))
    model, _ = train_real_classifier(train.model_tensor(), torch.as_tensor(train.labels),
                                     (val.model_tensor(), val.labels), num_classes=2, seed=0,
                                     opts=UtilityOptions(epochs=20))
    space = classifier_extractor(model)
    f_train = extract_features(space, train.images, progress=False)
    f_test = extract_features(space, test.images, progress=False)

    def fd_ratio(real, cohort, reference):
        fd = F.compare_to_reference(real, cohort, reference, repeats=3, kid_subsets=5)["metrics"]["FD"]
        return fd["cohort"] / fd["real_vs_real"]

    for name, (imgs, labels) in control_sets(test.images, test.labels, ["malignant", "normal_benign"]).items():
        f_set = extract_features(space, imgs, progress=False)
        if "per class" in name:
            ratio = max(fd_ratio(f_train[train.labels == c], f_set[labels == c], f_test[test.labels == c])
                        for c in (0, 1))
        else:
            ratio = fd_ratio(f_train, f_set, f_test)
        assert ratio >= 2, (name, ratio)
