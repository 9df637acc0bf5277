"""Patient-level privacy end to end: with subject IDs the unit of privacy is the subject."""

import numpy as np
import yaml
from PIL import Image

import dpgen
from dpgen.config import DataSource
from dpgen.data import load_dataset
from dpgen.privacy.ledger import PrivacyLedger


def _subject_folder(root, n_subjects=20, per_subject=3):
    """Real BreastMNIST images grouped as if several came from one patient."""
    ds = load_dataset(DataSource(source="breastmnist"))
    rows = ["image,label,patient_id"]
    for s in range(n_subjects):
        for j in range(per_subject):
            i = s * per_subject + j
            Image.fromarray(ds.images[i, 0]).save(root / f"img{i}.png")
            rows.append(f"img{i}.png,{ds.labels[i]},P{s:03d}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")


def test_subject_ids_make_the_subject_the_unit(tmp_path, tiny_raw):
    folder = tmp_path / "private"
    folder.mkdir()
    _subject_folder(folder)
    tiny_raw["data"]["private"] = {"source": str(folder), "subject_column": "patient_id"}
    tiny_raw["finetune"].update({"batch_size": 8, "physical_batch_size": 7, "steps": 4})
    tiny_raw["privacy"]["public_unit_count"] = 20  # the published number of patients, not of images
    tiny_raw["sample"].update({"num_images": 4})
    cfg = tmp_path / "subj.yaml"
    cfg.write_text(yaml.safe_dump(tiny_raw))
    dpgen.run(cfg, tmp_path / "run", progress=False)
    ledger = PrivacyLedger(tmp_path / "run" / "privacy" / "ledger.jsonl")
    plan = ledger.latest("dp_plan")
    assert plan["unit"] == "per subject" and plan["n_units"] == 20
    assert plan["sample_rate"] == 8 / 20  # Poisson sampling over subjects, not the 60 images
    assert ledger.latest("dp_complete")["unit"] == "per subject"
    assert ledger.summary(1e-5).unit == "per subject"
    hist = ledger.latest("dp_release", name="gaussian:label_histogram")
    assert hist["unit"] == "per subject"
    with np.load(tmp_path / "run" / "cohort" / "cohort.npz") as z:
        assert len(z["train_labels"]) == 4


def test_without_ids_the_unit_is_the_image(tmp_path, tiny_raw):
    folder = tmp_path / "private"
    folder.mkdir()
    _subject_folder(folder, n_subjects=10)
    from dpgen.privacy.engine import PrivacyUnits

    ds = load_dataset(DataSource(source=str(folder)))
    assert ds.subjects is None
    assert PrivacyUnits.from_subjects(ds.subjects, len(ds)).kind == "per image"
