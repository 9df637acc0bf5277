"""`dpgen release`: the bundle holds the cohort, its card and checksums, and nothing private.

One real tiny run (public pretrain -> DP fine-tune -> sample -> evaluate -> audit, on the real
MedMNIST files) is built once per test session by `finished_run` and copied for the tests that
tamper with it.
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
    CARD_JSON, CARD_MD, CHECKSUMS, ReleaseError, allow_list, release, source_problems, verify_bundle,
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


def tiny_audit_options():
    from dpgen.probes import AuditOptions
    from dpgen.probes.membership import LossAttackOptions
    from dpgen.probes.reconstruction import InversionOptions

    return AuditOptions(encoder_epochs=1, overfit_control=False, attack_targets=1, diffusion_inversion_targets=0,
                        loss_attack=LossAttackOptions(timestep_fractions=(0.3, 0.7), draws=1, n_boot=100),
                        inversion=InversionOptions(iterations=20, identification_trials=30, pool_size=16))


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

    from dpgen.evaluation import evaluate_stage
    from dpgen.probes import audit_stage

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs on a shared 2-core box: one thread is several times faster
    try:
        cfg = config_from_dict(small_raw())
        dpgen.run(cfg, run_dir, progress=False, device="cpu")
        evaluate_stage(cfg, RunDir(run_dir), device="cpu", progress=False, options=tiny_eval_options())
        audit_stage(cfg, RunDir(run_dir), device="cpu", progress=False, options=tiny_audit_options())
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


def _numbers(node, out: list) -> list:
    if isinstance(node, dict):
        for v in node.values():
            _numbers(v, out)
    elif isinstance(node, list):
        for v in node:
            _numbers(v, out)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        out.append(float(node))
    return out


def _bundle_text(out: Path) -> str:
    from safetensors import safe_open

    text = [p.read_text() for p in out.rglob("*") if p.suffix in (".md", ".json", ".csv") or p.name == CHECKSUMS]
    for p in out.rglob("*.safetensors"):
        with safe_open(str(p), framework="pt") as f:
            text.append(json.dumps(f.metadata()))
    return "\n".join(text)


def dpgen_loads(path: Path) -> bool:
    """A shipped weights file rebuilds its network with dpgen (family and spec in the metadata)."""
    from dpgen.models.registry import build_from_checkpoint

    return build_from_checkpoint(path)[1] is not None


def _appears(x: float, text: str) -> str | None:
    """x to 3 significant digits (trailing zeros kept: 7.997 -> "8.00"), or to 4, found in text as a number."""
    import re

    spellings = {f"{x:#.3g}".rstrip("."), f"{x:#.4g}".rstrip(".")}
    for spelled in spellings:
        if re.search(rf"(?<![\d.]){re.escape(spelled)}(?!\.?\d)", text):
            return spelled
    return None


def test_no_evaluation_or_probe_figure_and_no_private_quantity_in_the_bundle(run_dir, tmp_path):
    """Every number dpgen evaluate and dpgen audit computed on the private data stays internal; so does
    N (add/remove neighbours) and what it follows from (sample rate, sigma, the exact spent epsilon)."""
    import yaml

    out = tmp_path / "bundle"
    release(run_dir, out, include_weights=True)
    text = _bundle_text(out)
    public = set(_numbers(yaml.safe_load((run_dir / "config.yaml").read_text()), []))  # user choices may appear
    private = []
    for rel in ("internal/evaluation/evaluation.json", "internal/audit/probes_summary.json", "internal/audit/probes.json"):
        nums = _numbers(json.loads((run_dir / rel).read_text()), [])
        assert nums, rel
        private += [x for x in nums if math.isfinite(x) and not float(x).is_integer() and x not in public
                    and 1e-3 < abs(x) and round(abs(x), 3) not in (0.5, 1.0)]
    summary = PrivacyLedger.for_run(run_dir).summary()
    plan = PrivacyLedger.for_run(run_dir).latest("dp_plan")
    private += [summary.epsilon, summary.epsilon_rdp, summary.epsilon_replace_one, plan["sigma"]]
    found = {x: _appears(x, text) for x in private}
    leaked = {x: f for x, f in found.items() if f}
    assert not leaked, f"private figures in the bundle: {leaked}"
    # N and the sample rate: not as numbers of the card
    card = json.loads((out / CARD_JSON).read_text())
    card_numbers = set(_numbers(card, []))
    assert summary.n_units not in card_numbers and plan["sample_rate"] not in card_numbers
    assert card["privacy"]["n_units"] is None and all(m["sample_rate"] is None for m in card["privacy"]["mechanisms"])


def test_card_states_the_guarantee_exactly(run_dir, tmp_path):
    out = tmp_path / "bundle"
    release(run_dir, out)
    card = json.loads((out / CARD_JSON).read_text())
    p = card["privacy"]
    # add/remove: the stated epsilon is the budget the accountant guarantees, never the N-dependent exact figure
    assert p["neighbouring"] == "add_remove" and p["epsilon"] == 8.0 and "budget" in p["epsilon_kind"]
    assert p["delta"] == 1e-5 and p["unit"] == "per image" and "add/remove" in p["meaning"]
    assert p["n_units"] is None and p["epsilon_add_remove"] is None and p["mechanism_limits"] is None
    assert "N" in p["not_stated"] and "replace-one" in p["not_stated"]
    assert any("TRAINING split" in c for c in p["covers"])
    assert any("validation and test" in c for c in p["does_not_cover"])
    mech = {m["name"]: m for m in p["mechanisms"]}
    assert set(mech) == {"dp_sgd:finetune"} and mech["dp_sgd:finetune"]["steps"] == 2
    assert mech["dp_sgd:finetune"]["sigma"] is None and mech["dp_sgd:finetune"]["sample_rate"] is None
    assert 0.5 < p["limits"]["membership_auc"] <= 1
    assert card["how_it_was_made"]["public_pretraining"]["data"] == "pneumoniamnist"
    assert "breastmnist" not in json.dumps(card)  # the private data is not named
    assert card["intended_uses"] and card["known_limits"]
    assert {i["id"] for i in card["checklist"]["items"]} == {"preflight", "epsilon"}
    assert "probes" not in card and "utility" not in card
    left = {i["path"]: i["reason"] for i in card["left_out"]}
    for rel in ("internal/", "manifest.json", "privacy/", "checkpoints/", "summary.json", "logs/"):
        assert rel in left, rel
    assert left["internal/"].startswith("internal")
    # no name inside a folder: TensorBoard file names carry start times, host and pid (a timing side channel)
    assert all(p.count("/") <= 1 and (p.endswith("/") or "/" not in p) for p in left), sorted(left)
    assert "tfevents" not in (out / "dataset_card.json").read_text() and "secrets.json" not in (out / CARD_MD).read_text()
    md = (out / CARD_MD).read_text()
    for heading in ("## Privacy guarantee", "## How it was made", "## Intended uses", "## Known limits",
                    "## Left out of this bundle", "## Release checklist"):
        assert heading in md
    assert "ε ≤ 8" in md and "add/remove" in md and "per image" in md and "`internal/" in md


def test_replace_one_run_states_n_and_both_figures(tmp_path):
    """With neighbouring: replace_one the data holder treats N as public: sigma is calibrated for
    replace-one neighbours, and the card states N, the exact epsilon and the add/remove figure."""
    import dpgen
    from dpgen.config import config_from_dict

    raw = small_raw()
    raw["privacy"]["neighbouring"] = "replace_one"
    run = tmp_path / "ro"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dpgen.run(config_from_dict(raw), run, progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    summary = PrivacyLedger.for_run(run).summary()
    assert summary.neighbouring == "replace_one" and summary.epsilon == summary.epsilon_replace_one <= 8.0
    assert summary.epsilon_add_remove < summary.epsilon and summary.epsilon_rdp is None
    card = release(run, tmp_path / "bundle")["card"]
    p = card["privacy"]
    assert p["neighbouring"] == "replace_one" and p["n_units"] == 96
    assert p["epsilon"] == pytest.approx(summary.epsilon) and p["epsilon_add_remove"] == pytest.approx(
        summary.epsilon_add_remove)
    assert p["mechanism_limits"]["reconstruction"]["kappa"] == pytest.approx(1 / 96)
    assert p["mechanisms"][0]["sigma"] == pytest.approx(PrivacyLedger.for_run(run).latest("dp_plan")["sigma"])
    assert "replace-one" in p["meaning"] and p["not_stated"] is None


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
    for inside in (run_dir / "internal" / "bundle", run_dir / "cohort"):  # never into the run's own folders
        with pytest.raises(ReleaseError, match="inside the run directory"):
            release(run_dir, inside, overwrite=True)
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with pytest.raises(ReleaseError, match="not a bundle dpgen wrote"):
        release(run_dir, other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "years of work"


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
    _refused(run_copy, tmp_path / "bundle", "EXCEEDS the budget")


def test_refuses_a_two_mechanism_run_over_its_one_budget(run_copy, tmp_path):
    """Every plan carries the run's budget; a second mechanism's cost is composed into it (an over-budget
    two-plan run used to pass as 'no single target' and was released)."""
    ledger = PrivacyLedger.for_run(run_copy)
    plan = dict(ledger.latest("dp_plan"))
    for k in ("seq", "time"):
        plan.pop(k)
    ev = {"type": "poisson_gaussian", "sigma": 0.3, "sample_rate": plan["sample_rate"], "steps": 200}
    ledger.append({**plan, "mechanism": "dp_sgd:autoencoder", "sigma": 0.3, "planned_steps": 200})
    ledger.append({"kind": "preflight", "mechanism": "dp_sgd:autoencoder", "mode": "hooks", "passed": True,
                   "max_relative_error": 0.0})
    ledger.append({"kind": "dp_complete", "mechanism": "dp_sgd:autoencoder", "steps_done": 200, "event": ev,
                   "sigma": 0.3, "sample_rate": plan["sample_rate"], "max_grad_norm": 1.0, "unit": "per image"})
    assert load_run(run_copy).privacy.epsilon > 8.0
    _refused(run_copy, tmp_path / "bundle", "EXCEEDS the budget")


def test_refuses_a_ledger_it_cannot_read(run_copy, tmp_path):
    """A prose privacy source written into the ledger by hand: the typed reading fails, so does the release."""
    with open(run_copy / "privacy" / "ledger.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "artifact", "name": "cohort", "path": "cohort/cohort.npz",
                             "privacy_source": "dp_sgd:finetune (non-private, sigma 0)", "seq": 999}) + "\n")
    _refused(run_copy, tmp_path / "bundle", "cannot be read")


def test_refuses_non_private_run(run_copy, tmp_path):
    ledger = PrivacyLedger.for_run(run_copy)
    plan = ledger.latest("dp_plan")
    ledger.append({"kind": "dp_complete", "mechanism": plan["mechanism"], "steps_done": 2,
                   "event": {"type": "poisson_gaussian", "sigma": 0.0, "sample_rate": plan["sample_rate"], "steps": 2},
                   "sigma": 0.0, "sample_rate": plan["sample_rate"], "max_grad_norm": 1.0, "unit": "per image"})
    _refused(run_copy, tmp_path / "bundle", "NOT differentially private")


def test_delta_at_least_one_over_n_is_refused_before_training(tiny_config, tmp_path):
    """delta = 0.02 with 96 images: a mechanism meeting (eps, 0.02)-DP may publish an image outright."""
    import dpgen
    from dpgen.privacy.engine import PrivacyError

    cfg = tiny_config.model_copy(deep=True)
    cfg.privacy.delta = 0.02
    with pytest.raises(PrivacyError, match="not below 1/N"):
        dpgen.run(cfg, tmp_path / "r", progress=False, device="cpu")
    ledger = PrivacyLedger.for_run(tmp_path / "r")
    assert ledger.latest("dp_plan") is None  # nothing planned, nothing trained


def test_refuses_failed_preflight(run_copy, tmp_path):
    PrivacyLedger.for_run(run_copy).append({
        "kind": "preflight", "mechanism": "dp_sgd:finetune", "mode": "hooks", "passed": False, "tolerance": 1e-4,
        "max_relative_error": 0.3, "failed_parameters": ["unet.conv_in.conv.weight"]})
    _refused(run_copy, tmp_path / "bundle", "preflight FAILED.*conv_in")


def test_refuses_unfinished_run(run_copy, tmp_path):
    state = json.loads((run_copy / "state.json").read_text())
    del state["completed"]["sample"]
    (run_copy / "state.json").write_text(json.dumps(state))
    _refused(run_copy, tmp_path / "bundle", "not finished: stage 'sample'")
    assert main(["release", str(run_copy), str(tmp_path / "bundle")]) == 2


def test_refuses_when_ledger_does_not_allow_list_the_cohort(run_copy, tmp_path):
    # a cohort that names an internal mechanism (the evaluation's DP classifiers) is not releasable
    PrivacyLedger.for_run(run_copy).append({"kind": "artifact", "name": "cohort", "path": "cohort/cohort.npz",
                                            "privacy_source": {"kind": "post_processing",
                                                               "mechanisms": ["dp_sgd:evaluation_baseline"]}})
    _refused(run_copy, tmp_path / "bundle", "does not allow-list cohort/cohort.npz.*internal mechanism")


# ----------------------------------------------------------------------------- the allow-list


def test_internal_and_non_dp_artifacts_are_left_out_with_reasons(run_copy, tmp_path):
    ledger = PrivacyLedger.for_run(run_copy)
    (run_copy / "internal" / "audit" / "nn_grid.png").write_bytes(b"private nearest neighbours")
    (run_copy / "extra").mkdir()
    (run_copy / "extra" / "raw_counts.json").write_text('{"malignant": 42}')
    post = {"kind": "post_processing", "mechanisms": ["dp_sgd:finetune"]}
    ledger.append({"kind": "artifact", "name": "nn_grid", "path": "internal/audit/nn_grid.png", "privacy_source": post})
    # a DP source whose mechanism never completed (a plan and nothing else) is not enough
    ledger.append({"kind": "artifact", "name": "raw_counts", "path": "extra/raw_counts.json",
                   "privacy_source": {"kind": "dp", "mechanisms": ["dp_sgd:autoencoder"]}})
    ledger.append({"kind": "artifact", "name": "escape", "path": "../outside.txt", "privacy_source": {"kind": "public"}})
    allowed, refused = allow_list(load_run(run_copy))
    assert set(allowed) == {"cohort/cohort.npz", "checkpoints/finetune.safetensors"}
    reasons = {r["path"]: r["reason"] for r in refused}
    assert "under internal/" in reasons["internal/audit/nn_grid.png"]
    assert "no completed entry" in reasons["extra/raw_counts.json"]
    assert "leaves the run directory" in reasons["../outside.txt"]

    out = tmp_path / "bundle"
    result = release(run_copy, out)
    left = {i["path"]: i["reason"] for i in result["left_out"]}
    assert "internal/audit/nn_grid.png" in left and "extra/raw_counts.json" in left and "../outside.txt" in left
    assert not any(p.name in ("nn_grid.png", "raw_counts.json") for p in out.rglob("*"))
    assert b"private nearest neighbours" not in b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_source_problems_decide_on_typed_fields(run_dir):
    """Adversarial sources against a finished run's ledger: only complete, noisy, release-scope
    mechanisms within the budget make a source releasable."""
    from dpgen.privacy.schema import PrivacySource

    s = load_run(run_dir).privacy
    ok = [PrivacySource(kind="dp", mechanisms=("dp_sgd:finetune",)), PrivacySource(kind="public"),
          PrivacySource(kind="user")]
    assert all(source_problems(x, s) == [] for x in ok)
    bad = {("dp_sgd:autoencoder",): "no completed entry", ("gaussian:label_histogram",): "no completed entry",
           ("dp_sgd:evaluation_baseline",): "internal mechanism"}
    for mechs, why in bad.items():
        assert any(why in p for p in source_problems(PrivacySource(kind="post_processing", mechanisms=mechs), s))


def test_include_weights_ships_the_dp_weights_only(run_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "bundle"
    result = release(run_dir, out, include_weights=True)
    assert "weights/finetune.safetensors" in result["files"]
    shipped, original = load_file(out / "weights" / "finetune.safetensors"), load_file(run_dir / "checkpoints" / "finetune.safetensors")
    assert shipped.keys() == original.keys() and all(torch.equal(shipped[k], original[k]) for k in shipped)
    with safe_open(str(out / "weights" / "finetune.safetensors"), framework="pt") as f:
        info = json.loads(f.metadata()["info"])
    assert "privacy" not in info and info["privacy_mechanisms"] == ["dp_sgd:finetune"]  # no sigma, q, exact epsilon
    assert dpgen_loads(out / "weights" / "finetune.safetensors")
    assert not any("pretrain" in f or "_state" in f for f in result["files"])
    assert verify_bundle(out) == []


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
    assert np.array_equal(back, vols[1])  # dpgen.data.nifti: the cohort's axes are the voxel axes, in order
    card = json.loads((out / CARD_JSON).read_text())
    assert card["dataset"]["dims"] == "3D" and card["dataset"]["image_format"].startswith("NIfTI")
    assert verify_bundle(out) == []


def test_release_cli_prints_the_checklist_and_left_out(run_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["release", str(run_dir), str(out)]) == 0
    text = capsys.readouterr().out
    assert "release bundle:" in text and "Epsilon within the budget" in text and "internal/" in text
    assert main(["release", "--verify", str(out)]) == 0
    assert main(["release", str(run_dir), str(out)]) == 2  # not empty any more
    assert "not empty" in capsys.readouterr().err
    assert math.isfinite(json.loads((out / CARD_JSON).read_text())["privacy"]["epsilon"])


def test_config_from_another_dpgen_version_is_read_as_written(run_copy, tmp_path):
    import yaml

    raw = yaml.safe_load((run_copy / "config.yaml").read_text())
    raw["data"]["private"]["a_key_from_a_newer_dpgen"] = 1
    (run_copy / "config.yaml").write_text(yaml.safe_dump(raw))
    card = release(run_copy, tmp_path / "bundle")["card"]
    assert card["dataset"]["class_names"] == ["malignant", "normal_benign"]
    assert verify_bundle(tmp_path / "bundle") == []


def test_an_add_remove_plan_without_a_public_unit_count_is_not_released(run_copy, tmp_path):
    """q = batch / N makes the mechanism depend on N: a run planned that way (before
    privacy.public_unit_count existed) must not be released with the add/remove guarantee."""
    ledger = run_copy / "privacy" / "ledger.jsonl"
    text = ledger.read_text()
    assert '"public_unit_count": 96' in text
    ledger.write_text(text.replace('"public_unit_count": 96', '"public_unit_count": null'))
    with pytest.raises(ReleaseError, match="public unit count"):
        release(run_copy, tmp_path / "bundle")
