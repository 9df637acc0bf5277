"""`dpgen release`: the bundle holds the cohort, its card and checksums, and no internal file.

One real tiny run (public pretrain -> DP fine-tune -> sample -> evaluate, on the real MedMNIST
files) is built once per test session by `finished_run` and copied for the tests that tamper with it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from dpgen.cli import main
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.report.release import (
    CARD_JSON, CARD_MD, CHECKSUMS, ReleaseError, allow_list, classify_source, release, verify_bundle,
)
from dpgen.report.runinfo import load_run

# A tiny config: a few steps of everything (this is a test of the release machinery, not of quality).
SMALL = {"pretrain": {"steps": 2, "batch_size": 16, "checkpoint_every": 2},
         "finetune": {"steps": 2, "batch_size": 24, "physical_batch_size": 12, "checkpoint_every": 2},
         "sample": {"num_images": 12, "steps": 2, "batch_size": 12, "class_counts": {"mode": "uniform"}}}

def small_raw() -> dict:
    from tests.conftest import TINY

    raw = copy.deepcopy(TINY)
    for k, v in SMALL.items():
        raw[k].update(copy.deepcopy(v))
    return raw


def tiny_eval_options():
    from dpgen.evaluation.stage import EvalOptions
    from dpgen.evaluation.utility import UtilityOptions

    return EvalOptions(encoder_epochs=1, fidelity_repeats=2, kid_subsets=5,
                       utility_options=UtilityOptions(seeds=1, epochs=1, synthetic_epochs=1, dp_epochs=1, finetune_epochs=1))


def finished_run(base: Path) -> Path:
    """A finished, evaluated tiny run; built once per session (later calls return the same directory).

    The directory itself is the cache (test modules may be imported under two names, so a module
    global would not be shared): `base/release_run.built` marks a complete build.
    """
    run_dir, marker = base / "release_run", base / "release_run.built"
    if marker.is_file():
        return run_dir
    if run_dir.exists():  # a build interrupted earlier in this session
        shutil.rmtree(run_dir)
    import dpgen
    from dpgen.config import config_from_dict
    from dpgen.rundir import RunDir

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs on a shared 2-core box: one thread is several times faster
    try:
        cfg = config_from_dict(small_raw())
        dpgen.run(cfg, run_dir, progress=False, device="cpu")
        try:
            from dpgen.evaluation import evaluate_stage
        except ImportError:
            evaluate_stage = None
        if evaluate_stage is not None:
            evaluate_stage(cfg, RunDir(run_dir), device="cpu", progress=False, options=tiny_eval_options())
    finally:
        torch.set_num_threads(threads)
    marker.write_text("ok\n")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.getbasetemp())


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run_copy"
    shutil.copytree(run_dir, dst)
    return dst


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the bundle


def test_bundle_has_cohort_card_checksums_and_no_internal_file(run_dir, tmp_path):
    out = tmp_path / "bundle"
    result = release(run_dir, out)
    files = set(result["files"])
    assert {"labels.csv", "cohort.npz", CARD_MD, CARD_JSON, CHECKSUMS} <= files
    pngs = sorted(f for f in files if f.startswith("images/"))
    assert len(pngs) == 12 and all(f.endswith(".png") for f in pngs)
    assert files == {"labels.csv", "cohort.npz", CARD_MD, CARD_JSON, CHECKSUMS, *pngs}  # nothing else

    # checksums: every file but SHA256SUMS itself, and sha256sum -c agrees
    listed = {line.split("  ", 1)[1] for line in (out / CHECKSUMS).read_text().splitlines()}
    assert listed == files - {CHECKSUMS}
    assert verify_bundle(out) == []
    if shutil.which("sha256sum"):
        res = subprocess.run(["sha256sum", "--strict", "-c", CHECKSUMS], cwd=out, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr

    # no internal file, nor any other run file, went in byte for byte
    internal_hashes = {_sha(p) for p in (run_dir / "internal").rglob("*") if p.is_file()}
    assert internal_hashes  # the run does have internal files (the DP-noise seed at least)
    assert not internal_hashes & {_sha(p) for p in out.rglob("*") if p.is_file()}
    assert not any("internal" in f for f in files)

    # the images: exactly the run's cohort, also through labels.csv as a dpgen folder source
    from dpgen.data.folder import load_folder

    with np.load(run_dir / "cohort" / "cohort.npz") as z, np.load(out / "cohort.npz") as b:
        assert np.array_equal(z["train_images"], b["train_images"]) and np.array_equal(z["train_labels"], b["train_labels"])
        ds = load_folder(out)
        assert np.array_equal(ds.images[:, 0], z["train_images"]) and np.array_equal(ds.labels, z["train_labels"][:, 0])


def test_card_states_guarantee_probes_utility_uses_limits_and_left_out(run_dir, tmp_path):
    out = tmp_path / "bundle"
    release(run_dir, out)
    card = json.loads((out / CARD_JSON).read_text())
    ledger = PrivacyLedger.for_run(run_dir).summary()
    p = card["privacy"]
    assert p["epsilon"] == pytest.approx(ledger["epsilon"]) and p["delta"] == 1e-5 and p["unit"] == "per image"
    assert p["epsilon_rdp"] == pytest.approx(ledger["epsilon_rdp"]) and p["within_target"] is True
    b = p["reconstruction_bound"]
    assert 0 < b["bound"] < 1 and b["kappa"] == pytest.approx(1 / 96) and b["gdp_bound"] is not None
    assert 0.5 < p["membership_auc_limit"] <= 1
    assert card["how_it_was_made"]["dp_finetuning"]["steps"] == 2
    assert card["how_it_was_made"]["public_pretraining"]["data"] == "pneumoniamnist"
    assert card["intended_uses"] and card["known_limits"]
    assert {i["id"] for i in card["checklist"]["items"]} == {"preflight", "epsilon", "near_copies", "membership", "utility"}
    assert set(card["probes"]) >= {"near_copies", "membership", "status"}
    if (run_dir / "metrics" / "evaluation.json").is_file():
        rows = card["utility"]["rows"]
        assert {"real", "dp_real", "synthetic"} <= set(rows) and all(0 <= r["roc_auc"] <= 1 for r in rows.values())
    left = {i["path"]: i["reason"] for i in card["left_out"]}
    for rel in ("internal/secrets.json", "manifest.json", "privacy/ledger.jsonl", "checkpoints/finetune.safetensors",
                "summary.json"):
        assert rel in left, rel
    assert left["internal/secrets.json"].startswith("internal")
    md = (out / CARD_MD).read_text()
    for heading in ("## Privacy guarantee", "## Probe results", "## Utility next to its baselines", "## Intended uses",
                    "## Known limits", "## Left out of this bundle", "## Release checklist"):
        assert heading in md
    assert f"ε = {p['epsilon']:.4g}" in md and "per image" in md and "internal/secrets.json" in md


def test_verify_detects_modified_missing_and_extra_files(run_dir, tmp_path):
    out = tmp_path / "bundle"
    release(run_dir, out)
    assert verify_bundle(out) == []
    (out / "labels.csv").write_text((out / "labels.csv").read_text() + "images/99999.png,0,x\n")
    (out / "extra.txt").write_text("not released")
    (out / "images" / "00000.png").unlink()
    problems = "\n".join(verify_bundle(out))
    assert "labels.csv: checksum mismatch" in problems
    assert "extra.txt: not covered" in problems
    assert "images/00000.png: listed but missing" in problems
    assert main(["release", "--verify", str(out)]) == 1


def test_out_must_be_new_or_empty_unless_overwrite(run_dir, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    release(run_dir, out)  # empty folder: fine
    with pytest.raises(ReleaseError, match="not empty"):
        release(run_dir, out)
    (out / "stale.txt").write_text("old")
    release(run_dir, out, overwrite=True)
    assert not (out / "stale.txt").exists() and verify_bundle(out) == []
    with pytest.raises(ReleaseError, match="run directory"):
        release(run_dir, run_dir.parent, overwrite=True)  # would delete the run
    with pytest.raises(ReleaseError, match="internal"):
        release(run_dir, run_dir / "internal" / "bundle")


# ----------------------------------------------------------------------------- refusals


def _refused(run: Path, out: Path, match: str) -> None:
    with pytest.raises(ReleaseError, match=match):
        release(run, out)
    assert not out.exists()


def test_refuses_epsilon_above_target(run_copy, tmp_path):
    ledger = PrivacyLedger.for_run(run_copy)
    plan = ledger.latest("dp_plan")
    # the ledger says more steps were taken than planned: the spent epsilon now exceeds the target
    ledger.append({"kind": "dp_progress", "mechanism": plan["mechanism"], "steps_done": 50,
                   "event": {"type": "poisson_gaussian", "sigma": plan["sigma"], "sample_rate": plan["sample_rate"], "steps": 50}})
    _refused(run_copy, tmp_path / "bundle", "EXCEEDS the target")


def test_refuses_non_private_run(run_copy, tmp_path):
    ledger = PrivacyLedger.for_run(run_copy)
    plan = ledger.latest("dp_plan")
    ledger.append({"kind": "dp_complete", "mechanism": plan["mechanism"], "steps_done": 2,
                   "event": {"type": "poisson_gaussian", "sigma": 0.0, "sample_rate": plan["sample_rate"], "steps": 2}})
    _refused(run_copy, tmp_path / "bundle", "NOT differentially private")


def test_refuses_failed_preflight(run_copy, tmp_path):
    PrivacyLedger.for_run(run_copy).append({
        "kind": "preflight", "mechanism": "dp_sgd:finetune", "mode": "hooks", "passed": False, "tolerance": 1e-4,
        "max_relative_error": 0.3, "failed_parameters": ["unet.conv_in.conv.weight"]})
    _refused(run_copy, tmp_path / "bundle", "preflight did not pass.*conv_in")


def test_refuses_unfinished_run(run_copy, tmp_path):
    state = json.loads((run_copy / "state.json").read_text())
    del state["completed"]["sample"]
    (run_copy / "state.json").write_text(json.dumps(state))
    _refused(run_copy, tmp_path / "bundle", "not finished: stage 'sample'")
    assert main(["release", str(run_copy), str(tmp_path / "bundle")]) == 2


def test_refuses_when_ledger_does_not_allow_list_the_cohort(run_copy, tmp_path):
    PrivacyLedger.for_run(run_copy).append({"kind": "artifact", "name": "cohort", "path": "cohort/cohort.npz",
                                            "privacy_source": "private data (non-DP)"})
    _refused(run_copy, tmp_path / "bundle", "does not allow-list cohort/cohort.npz")


# ----------------------------------------------------------------------------- the allow-list


def test_internal_and_non_dp_artifacts_are_left_out_with_reasons(run_copy, tmp_path):
    ledger = PrivacyLedger.for_run(run_copy)
    (run_copy / "internal" / "audit").mkdir(parents=True)
    (run_copy / "internal" / "audit" / "nn_grid.png").write_bytes(b"private nearest neighbours")
    (run_copy / "metrics").mkdir(exist_ok=True)
    (run_copy / "metrics" / "raw_counts.json").write_text('{"malignant": 42}')
    ledger.append({"kind": "artifact", "name": "nn_grid", "path": "internal/audit/nn_grid.png",
                   "privacy_source": "post-processing of dp_sgd:finetune"})
    ledger.append({"kind": "artifact", "name": "raw_counts", "path": "metrics/raw_counts.json",
                   "privacy_source": "private data (non-DP)"})
    ledger.append({"kind": "artifact", "name": "escape", "path": "../outside.txt", "privacy_source": "public data"})
    allowed, refused = allow_list(load_run(run_copy))
    assert set(allowed) == {"cohort/cohort.npz", "checkpoints/finetune.safetensors"}
    reasons = {r["path"]: r["reason"] for r in refused}
    assert "under internal/" in reasons["internal/audit/nn_grid.png"]
    assert "not DP" in reasons["metrics/raw_counts.json"]
    assert "leaves the run directory" in reasons["../outside.txt"]

    out = tmp_path / "bundle"
    result = release(run_copy, out)
    left = {i["path"]: i["reason"] for i in result["left_out"]}
    assert "internal/audit/nn_grid.png" in left and "metrics/raw_counts.json" in left and "../outside.txt" in left
    md = (out / CARD_MD).read_text()
    assert "nn_grid.png" in md and "raw_counts.json" in md
    assert not any(p.name in ("nn_grid.png", "raw_counts.json") for p in out.rglob("*"))
    assert b"private nearest neighbours" not in b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_include_weights_ships_the_dp_weights_only(run_dir, tmp_path):
    out = tmp_path / "bundle"
    result = release(run_dir, out, include_weights=True)
    assert "weights/finetune.safetensors" in result["files"]
    assert _sha(out / "weights" / "finetune.safetensors") == _sha(run_dir / "checkpoints" / "finetune.safetensors")
    assert not any("pretrain" in f or "_state" in f for f in result["files"])
    assert verify_bundle(out) == []


@pytest.mark.parametrize("source,ok", [
    ("dp_sgd:finetune", True), ("post-processing of dp_sgd:finetune", True), ("public data", True),
    ("public data only (no fine-tuning)", True), ("gaussian_histogram", True), ("user-fixed", True),
    ("private data (non-DP)", False), ("post-processing of private data (non-DP)", False), (None, False),
    ("internal", False), ("something else", False),
])
def test_classify_source(source, ok):
    assert classify_source(source)[0] is ok


def test_3d_cohort_is_released_as_nifti(run_copy, tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    vols = rng.integers(0, 256, size=(4, 6, 7, 8), dtype=np.uint8)  # MedMNIST 3D layout (N, D, H, W)
    labels = np.array([[0], [1], [1], [0]], dtype=np.uint8)
    with open(run_copy / "cohort" / "cohort.npz", "wb") as f:
        np.savez_compressed(f, train_images=vols, train_labels=labels)
    out = tmp_path / "bundle3d"
    result = release(run_copy, out)
    niis = sorted(f for f in result["files"] if f.startswith("images/"))
    assert len(niis) == 4 and all(f.endswith(".nii.gz") for f in niis)
    back = np.asarray(nib.load(str(out / niis[1])).dataobj)
    assert np.array_equal(np.transpose(back, (2, 1, 0)), vols[1])
    card = json.loads((out / CARD_JSON).read_text())
    assert card["dataset"]["dims"] == "3D" and card["dataset"]["image_format"].startswith("NIfTI")
    assert verify_bundle(out) == []


def test_release_cli_prints_the_checklist_and_left_out(run_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["release", str(run_dir), str(out)]) == 0
    text = capsys.readouterr().out
    assert "release bundle:" in text and "Epsilon within target" in text and "internal/secrets.json" in text
    assert main(["release", "--verify", str(out)]) == 0
    assert main(["release", str(run_dir), str(out)]) == 2  # not empty any more
    assert "not empty" in capsys.readouterr().err
    assert math.isfinite(json.loads((out / CARD_JSON).read_text())["privacy"]["epsilon"])


def test_bundle_inside_the_run_directory_is_not_listed_as_left_out(run_copy):
    out = run_copy / "release"
    result = release(run_copy, out)
    assert not any(i["path"].startswith(("release", ".release")) for i in result["left_out"])
    result = release(run_copy, out, overwrite=True)  # the second time the old bundle is inside the run too
    assert not any(i["path"].startswith(("release", ".release")) for i in result["left_out"])
    assert verify_bundle(out) == []


def test_config_from_another_dpgen_version_is_read_as_written(run_copy, tmp_path):
    import yaml

    raw = yaml.safe_load((run_copy / "config.yaml").read_text())
    raw["data"]["private"]["a_key_from_a_newer_dpgen"] = 1
    (run_copy / "config.yaml").write_text(yaml.safe_dump(raw))
    card = release(run_copy, tmp_path / "bundle")["card"]
    assert "does not validate" in card["how_it_was_made"]["config_note"]
    assert card["dataset"]["class_names"] == ["malignant", "normal_benign"]
    assert verify_bundle(tmp_path / "bundle") == []
