"""Shared fixtures. Tests run on real MedMNIST subsets found through $DPGEN_DATA_DIR
(CI sets it to ../shared/data); nothing is downloaded."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_SHARED = REPO.parent / "shared" / "data"
if not os.environ.get("DPGEN_DATA_DIR") and _SHARED.is_dir():
    os.environ["DPGEN_DATA_DIR"] = str(_SHARED)
os.environ.setdefault("DPGEN_OFFLINE", "1")  # tests never download
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {
    "name": "tiny",
    "seed": 0,
    "data": {
        "public": {"source": "pneumoniamnist", "max_images": 256},
        "private": {"source": "breastmnist", "max_images": 96},
        "num_classes": 2,
        "class_names": ["malignant", "normal_benign"],
    },
    "model": {"channels": [16, 32], "attention_levels": [False, True], "num_head_channels": 16,
              "norm_num_groups": 8, "num_train_timesteps": 100},
    "pretrain": {"steps": 6, "batch_size": 16, "checkpoint_every": 3},
    "finetune": {"steps": 6, "batch_size": 24, "physical_batch_size": 12, "checkpoint_every": 2},
    "privacy": {"epsilon": 8.0, "delta": 1e-5, "public_unit_count": 96},
    "sample": {"num_images": 12, "steps": 4, "batch_size": 8, "class_counts": {"mode": "dp_histogram"}},
}


def data_dir() -> Path:
    return Path(os.environ["DPGEN_DATA_DIR"])


@pytest.fixture
def tiny_raw() -> dict:
    return copy.deepcopy(TINY)


@pytest.fixture
def tiny_config(tiny_raw):
    from dpgen.config import config_from_dict

    return config_from_dict(tiny_raw)
