"""End to end on real data: a tiny config through pretrain -> DP finetune -> sample."""

import json

import numpy as np
import pytest
import torch
import yaml

import dpgen
from dpgen.cli import main
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.rundir import RunDirError


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("e2e")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    run_dir = root / "run"
    code = main(["run", str(cfg_path), "--run-dir", str(run_dir), "--no-progress"])
    assert code == 0
    return cfg_path, run_dir


def test_run_directory_holds_everything(finished_run):
    _, run_dir = finished_run
    for rel in ["config.yaml", "manifest.json", "state.json", "summary.json", "privacy/ledger.jsonl",
                "checkpoints/pretrain.safetensors", "checkpoints/finetune.safetensors", "cohort/cohort.npz"]:
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "logs" / "pretrain").glob("events.out.tfevents*"))  # TensorBoard (public)
    # curves of private batches are not DP: internal/
    assert list((run_dir / "internal" / "logs" / "finetune").glob("events.out.tfevents*"))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["versions"]["opacus"] != "not installed"
    assert manifest["seeds"] == {"run": 0, "sample": 0}
    fps = manifest["datasets"]
    assert len(fps["private/train"]["sha256"]) >= 64 and "images" not in json.dumps(fps)


def test_cohort_has_requested_size_and_counts(finished_run):
    _, run_dir = finished_run
    with np.load(run_dir / "cohort" / "cohort.npz") as z:
        images, labels = z["train_images"], z["train_labels"]
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8 and labels.shape == (12, 1)
    ledger = PrivacyLedger(run_dir / "privacy" / "ledger.jsonl")
    cohort = ledger.latest("artifact", name="cohort")
    assert sum(cohort["class_counts"].values()) == 12
    assert {int(k): v for k, v in cohort["class_counts"].items()} == {
        int(k): int((labels[:, 0] == int(k)).sum()) for k in cohort["class_counts"]
    }
    assert cohort["class_counts_source"].startswith("DP label histogram")
    assert list((run_dir / "cohort").glob("grid_class*.png"))


def test_ledger_epsilon_within_target(finished_run):
    _, run_dir = finished_run
    ledger = PrivacyLedger(run_dir / "privacy" / "ledger.jsonl")
    s = ledger.summary(1e-5)
    assert 0 < s.epsilon <= 8.0 and s.within_target and s.neighbouring == "add_remove"
    assert s.epsilon_rdp >= s.epsilon  # PLD is tighter
    assert s.epsilon_replace_one > s.epsilon  # the same events for replace-one neighbours
    plan = ledger.latest("dp_plan")
    assert plan["sample_rate"] == pytest.approx(24 / 96) and plan["unit"] == "per image"
    assert ledger.latest("preflight")["passed"] is True
    done = ledger.latest("dp_complete")
    assert done["steps_done"] == 6 and done["epsilon_pld"] <= 8.0
    names = {e["name"] for e in ledger.entries() if e["kind"] in ("artifact", "dp_release")}
    assert {"finetune_weights", "cohort", "gaussian:label_histogram"} <= names
    cohort = ledger.latest("artifact", name="cohort")["privacy_source"]
    assert cohort == {"kind": "post_processing", "mechanisms": ["dp_sgd:finetune", "gaussian:label_histogram"], "note": ""}


def test_second_run_refuses_to_overwrite(finished_run, capsys):
    cfg_path, run_dir = finished_run
    before = (run_dir / "privacy" / "ledger.jsonl").read_bytes()
    assert main(["run", str(cfg_path), "--run-dir", str(run_dir), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run_dir / "privacy" / "ledger.jsonl").read_bytes() == before


def test_resume_of_a_finished_run_skips_stages(finished_run):
    cfg_path, run_dir = finished_run
    summary = dpgen.run(cfg_path, run_dir, resume=True, progress=False)
    assert all("skipped" in st for st in summary["stages"].values())


def test_resume_with_changed_config_is_refused(finished_run):
    cfg_path, run_dir = finished_run
    with pytest.raises(RunDirError, match="config differs"):
        dpgen.run(cfg_path, run_dir, overrides=["privacy.epsilon=20"], resume=True, progress=False)


def test_generate_is_reproducible_and_checks_labels(finished_run):
    _, run_dir = finished_run
    gen = dpgen.load(run_dir, device="cpu")
    a, la = gen.generate(labels=[0, 1, 1], seed=3, steps=3)
    b, lb = gen.generate(labels=[0, 1, 1], seed=3, steps=3)
    c, _ = gen.generate(labels=[0, 1, 1], seed=4, steps=3)
    assert a.shape == (3, 1, 28, 28) and torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="label 5 does not exist"):
        gen.generate(labels=[5], steps=2)


def test_sample_command_reproduces_the_cohort(finished_run, tmp_path):
    """`dpgen sample` with the same seed writes the same cohort bit for bit (beside the run's own:
    a finished run's cohort is never replaced without --overwrite)."""
    _, run_dir = finished_run
    with np.load(run_dir / "cohort" / "cohort.npz") as z:
        first = z["train_images"].copy()
    assert main(["sample", str(run_dir), "--name", "again", "--no-progress"]) == 0
    with np.load(run_dir / "cohort" / "again" / "cohort.npz") as z:
        assert np.array_equal(z["train_images"], first)


def test_public_labels_of_another_task_are_ignored(finished_run, tiny_raw):
    """PneumoniaMNIST's labels do not name BreastMNIST's classes: pretraining is unconditional
    and every class embedding starts from the null one."""
    from dpgen.config import config_from_dict
    from dpgen.data import load_dataset
    from dpgen.models.conditioning import AttributeSpace
    from dpgen.core.checkpoints import load_checkpoint
    from dpgen.training.families.shared import public_rows

    _, run_dir = finished_run
    _, tensors, _, info = load_checkpoint(run_dir / "checkpoints" / "pretrain.safetensors")
    (key,) = info["classes_start_unconditional"]
    emb = tensors[key]
    assert emb.shape[0] == 3 and torch.equal(emb[0], emb[2]) and torch.equal(emb[1], emb[2])

    public = load_dataset(config_from_dict(tiny_raw).data.public)
    assert set(public.labels.tolist()) == {0, 1}
    ignored = public_rows(public, 2, AttributeSpace([], []), use_labels=False)["labels"]
    used = public_rows(public, 2, AttributeSpace([], []), use_labels=True)["labels"]
    assert (ignored == 2).all() and torch.equal(used, torch.as_tensor(public.labels))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_fails_before_the_run_directory_exists(tmp_path, tiny_raw, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    assert main(["run", str(cfg), "--device", "cuda", "--run-dir", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
