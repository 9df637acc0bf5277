"""`dpgen sweep`: one public pretraining shared by a DP fine-tune per epsilon, evaluated, drawn as a curve."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from dpgen.cli import main
from dpgen.config import ConfigError
from dpgen.privacy.ledger import PrivacyLedger
from dpgen.sweep import eps_dirname, parse_epsilons
from tests.test_release import small_raw


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core box: one thread is several times faster
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(small_raw()))
    sweep_dir = root / "sweep"
    # uniform class counts: a noisy DP histogram of 12 images can leave a class with one image,
    # too few for the evaluation (and the override checks that overrides reach every run)
    args = ["sweep", str(cfg), "sample.class_counts.mode=uniform", "--epsilons", "2,inf", "--run-dir", str(sweep_dir),
            "--no-progress", "--device", "cpu"]
    args += ["--eval-seeds", "1", "--eval-epochs", "1", "--encoder-epochs", "1"]
    assert main(args) == 0
    return cfg, sweep_dir


def test_sweep_shares_pretraining_and_fine_tunes_once_per_epsilon(swept):
    _, d = swept
    assert sorted(p.name for p in d.iterdir()) == ["eps_2", "eps_inf", "internal", "pretrain"]
    assert sorted(p.name for p in (d / "internal").iterdir()) == ["curve.png", "sweep.json"]  # evaluation: internal
    shared = d / "pretrain" / "checkpoints" / "pretrain.safetensors"
    for name in ("eps_2", "eps_inf"):
        run = d / name
        w = run / "checkpoints" / "pretrain.safetensors"
        assert w.read_bytes() == shared.read_bytes()
        assert os.path.samefile(w, shared) or w.stat().st_nlink == 1  # a hard link where the filesystem allows
        state = json.loads((run / "state.json").read_text())["completed"]
        assert state["pretrain"]["shared_from"] == "../pretrain/checkpoints/pretrain.safetensors"
        assert {"pretrain", "finetune", "sample"} <= set(state)
        assert not (run / "logs" / "pretrain").exists()  # the public pretraining ran once, in pretrain/
        assert (run / "cohort" / "cohort.npz").is_file()
        assert "mode: uniform" in (run / "config.yaml").read_text()
    assert (d / "pretrain" / "logs" / "pretrain").is_dir()
    assert not (d / "pretrain" / "privacy" / "ledger.jsonl").exists()  # public pretraining spends nothing

    # epsilon 2: DP within target; inf: non-private (sigma 0, clipping kept)
    s2 = PrivacyLedger.for_run(d / "eps_2").summary()
    assert s2.within_target and 0 < s2.epsilon <= 2
    sinf = PrivacyLedger.for_run(d / "eps_inf").summary()
    assert sinf.non_private and math.isinf(sinf.epsilon)
    plan = PrivacyLedger.for_run(d / "eps_inf").latest("dp_plan")
    assert plan["sigma"] == 0 and plan["max_grad_norm"] > 0


def test_sweep_writes_results_and_draws_the_curve(swept):
    _, d = swept
    res = json.loads((d / "internal" / "sweep.json").read_text())
    assert res["epsilons"] == [2.0, "inf"]
    assert [r["run_dir"] for r in res["runs"]] == ["eps_2", "eps_inf"]
    png = (d / "internal" / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    from PIL import Image

    with Image.open(d / "internal" / "curve.png") as im:
        assert im.width > 400 and im.height > 200
    assert res["evaluation"] == "run"
    for r in res["runs"]:
        p = r["point"]
        assert r["evaluated"] and (d / r["run_dir"] / "internal" / "evaluation" / "evaluation.json").is_file()
        for key in ("tstr_auc", "dp_sgd_auc", "ceiling_auc", "fd", "fd_real"):
            assert p[key] is not None, (r["run_dir"], key)
        assert 0 <= p["tstr_auc"] <= 1 and 0 <= p["dp_sgd_auc"] <= 1
    assert res["ceiling_auc"] is not None
    # one public feature encoder for the whole curve (trained once on public data, shared)
    enc = [d / r / "evaluation" / "public_encoder.safetensors" for r in ("eps_2", "eps_inf")]
    assert enc[0].read_bytes() == enc[1].read_bytes()
    assert res["runs"][0]["point"]["fd_real"] == pytest.approx(res["runs"][1]["point"]["fd_real"])


def test_sweep_resume_skips_finished_work_and_refuses_to_overwrite(swept, capsys):
    cfg, d = swept
    before = (d / "eps_2" / "privacy" / "ledger.jsonl").read_bytes()
    base = ["sweep", str(cfg), "sample.class_counts.mode=uniform", "--epsilons", "2,inf", "--run-dir", str(d),
            "--no-progress", "--device", "cpu"]
    assert main(base) == 2  # exists: needs --resume or --overwrite
    assert "already exists" in capsys.readouterr().err
    t0 = time.time()
    assert main([*base, "--resume"]) == 0
    assert time.time() - t0 < 60  # nothing trained again
    assert (d / "eps_2" / "privacy" / "ledger.jsonl").read_bytes() == before  # nothing re-spent
    res = json.loads((d / "internal" / "sweep.json").read_text())
    assert all("finetune_s" in r["timing"] for r in res["runs"])  # the first pass's timings are kept


def test_internal_review_of_a_sweep_run_shows_the_curve(swept):
    from dpgen.report.html import render_internal, render_shareable
    from dpgen.report.runinfo import load_run

    _, d = swept
    assert "From the privacy-utility sweep this run belongs to (sweep/internal/sweep.json)" in render_internal(
        load_run(d / "eps_2"))
    assert "privacy-utility sweep" not in render_shareable(load_run(d / "eps_2"))


def test_repeats_fine_tune_each_epsilon_with_its_own_secret(tmp_path):
    """--repeats 2: two DP fine-tunes of one epsilon, each its own run directory and secret seed."""
    from dpgen.privacy.randomness import read_secret
    from dpgen.training.dp import SampledCounts

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small_raw()))
    d = tmp_path / "s"
    assert main(["sweep", str(cfg), "sample.class_counts.mode=uniform", "--epsilons", "4", "--repeats", "2",
                 "--run-dir", str(d), "--no-evaluate", "--no-progress", "--device", "cpu"]) == 0
    runs = [d / "eps_4", d / "eps_4_rep2"]
    assert all((r / "cohort" / "cohort.npz").is_file() for r in runs)
    assert read_secret(runs[0] / "internal") != read_secret(runs[1] / "internal")
    counts = [SampledCounts.read(r / "internal" / "sampling" / "dp_sgd_finetune.jsonl") for r in runs]
    assert counts[0].keys() == counts[1].keys()
    res = json.loads((d / "internal" / "sweep.json").read_text())
    assert res["repeats"] == 2 and [p["repeats"] for p in res["points"]] == [2]
    assert [r["run_dir"] for r in res["runs"]] == ["eps_4", "eps_4_rep2"]


def test_aggregate_point_is_mean_and_std_over_fine_tunes():
    from dpgen.sweep import aggregate_point

    p = aggregate_point(10.0, [{"tstr_auc": 0.6, "dp_sgd_auc": 0.7, "fd": 1.0}, {"tstr_auc": 0.8, "dp_sgd_auc": 0.7,
                                                                                  "fd": 3.0}])
    assert p["tstr_auc"] == pytest.approx(0.7) and p["tstr_std"] == pytest.approx(0.1414, abs=1e-4)
    assert p["dp_sgd_std"] == 0.0 and p["fd"] == 2.0 and p["repeats"] == 2
    assert aggregate_point(1.0, [{"tstr_auc": 0.5, "tstr_std": 0.02}])["tstr_std"] == 0.02  # one run: seed spread


def test_parse_epsilons():
    assert parse_epsilons("1,3,10,inf") == [1.0, 3.0, 10.0, math.inf]
    assert parse_epsilons("inf, 0.5 ,∞,3") == [0.5, 3.0, math.inf]
    assert eps_dirname(math.inf) == "eps_inf" and eps_dirname(0.5) == "eps_0.5" and eps_dirname(10.0) == "eps_10"
    for bad in ("0", "-1", "abc", "", "nan"):
        with pytest.raises(ConfigError):
            parse_epsilons(bad)


def test_sweep_cli_reports_bad_epsilons(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(small_raw()))
    assert main(["sweep", str(cfg), "--epsilons", "1,zero", "--run-dir", str(tmp_path / "s")]) == 2
    assert "--epsilons" in capsys.readouterr().err
    assert not Path(tmp_path / "s").exists()
