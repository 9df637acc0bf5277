"""`dpgen report`: a self-contained HTML page whose checklist renders in headless chromium.

The run comes from tests/test_release.py's `finished_run` (a real tiny run, built once per session).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from dpgen.cli import main
from dpgen.report.checklist import CHECKS, checklist, membership_auc_limit
from dpgen.report.html import CHROMIUM_FLAGS, INTERNAL_HTML, REPORT_HTML, chromium, find_chromium, render, write_report
from dpgen.report.runinfo import load_run
from tests.test_release import finished_run

CHECK_IDS = [c for c, _ in CHECKS]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.getbasetemp())


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run_copy"
    shutil.copytree(run_dir, dst)
    return dst


def _rows(html_text: str) -> dict[str, str]:
    return dict(re.findall(r'<tr data-check="([a-z_]+)" data-status="(pass|warn|fail)"', html_text))


# ----------------------------------------------------------------------------- chromium


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium); "
                    "the headless render test needs a real browser")
def test_report_renders_in_headless_chromium(run_dir):
    result = write_report(run_dir, pdf=True)
    html_path = run_dir / REPORT_HTML
    assert result["html"] == str(html_path) and html_path.is_file()
    # the browser's DOM after parsing and layout, not our string
    res = chromium(["--dump-dom"], html_path.resolve().as_uri(), timeout=120)
    dom = res.stdout
    assert res.returncode == 0 and "</html>" in dom, res.stderr[-500:]
    rows = _rows(dom)
    assert list(rows) == CHECK_IDS, rows
    assert rows["preflight"] == "pass" and rows["epsilon"] == "pass"
    for cid in CHECK_IDS:  # each row shows its status and a one-line reason
        m = re.search(rf'<tr data-check="{cid}" data-status="(\w+)"><td>[^<]+</td><td><span class="status \1">\1</span></td><td>([^<]+)</td>', dom)
        assert m and len(m.group(2)) > 10, cid
    for section in ("Privacy guarantee", "Samples", "Privacy-utility", "Utility and fidelity", "Probes and theoretical limits"):
        assert f"<h2>{section}</h2>" in dom or f">{section}</h2>" in dom, section
    # PDF printed by the same browser
    assert result["pdf"] and Path(result["pdf"]).read_bytes()[:5] == b"%PDF-"
    # a screenshot: the page lays out to something non-trivial
    shot = run_dir / "report" / "shot.png"
    res = chromium(["--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}"], html_path.resolve().as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
    shot.unlink()
    assert "--disable-background-networking" in CHROMIUM_FLAGS and "--no-sandbox" in CHROMIUM_FLAGS


def test_report_is_self_contained_and_shows_no_private_image(run_dir, monkeypatch):
    import dpgen.data

    config = load_run(run_dir).config
    asked = []
    real = dpgen.data.load_dataset

    def spy(spec, *a, **k):
        asked.append(spec.source)
        return real(spec, *a, **k)

    monkeypatch.setattr(dpgen.data, "load_dataset", spy)
    html_text = render(load_run(run_dir), internal=False)
    assert config.data.private.source not in asked  # the releasable page never loads private data
    assert config.data.public.source in asked  # ... but shows public examples
    assert "Real <b>public</b> examples" in html_text
    # no external resources: every src is a data URI, no scripts, no links out
    srcs = re.findall(r'\bsrc="([^"]*)"', html_text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in html_text and "<link" not in html_text and not re.search(r'href="https?:', html_text)
    assert "default-src 'none'" in html_text  # CSP: the browser fetches nothing
    assert "internal/" not in "".join(re.findall(r'alt="([^"]*)"', html_text))

    asked.clear()
    internal = render(load_run(run_dir), internal=True)
    assert config.data.private.source in asked and "real PRIVATE" in internal and "INTERNAL" in internal


def test_internal_version_is_written_under_internal_only(run_copy):
    result = write_report(run_copy, pdf=False, internal=True)
    assert Path(result["internal_html"]) == run_copy / INTERNAL_HTML
    assert "real PRIVATE" not in (run_copy / REPORT_HTML).read_text()
    assert {p.name for p in (run_copy / "report").iterdir()} <= {"report.html", "report.pdf"}  # no internal page there


def test_report_cli_and_missing_metrics_are_warnings(run_copy, capsys):
    for rel in ("metrics/evaluation.json", "metrics/probes_summary.json"):
        (run_copy / rel).unlink(missing_ok=True)
    assert main(["report", str(run_copy), "--no-pdf"]) == 0
    out = capsys.readouterr().out
    assert "checklist: WARN" in out and "PDF not requested" in out
    rows = _rows((run_copy / REPORT_HTML).read_text())
    assert rows == {"preflight": "pass", "epsilon": "pass", "near_copies": "warn", "membership": "warn", "utility": "warn"}


# ----------------------------------------------------------------------------- the checklist


def _write(run: Path, rel: str, obj) -> None:
    (run / rel).parent.mkdir(parents=True, exist_ok=True)
    (run / rel).write_text(json.dumps(obj))


def _status(run: Path) -> dict[str, dict]:
    return {i["id"]: i for i in checklist(load_run(run))}


def test_checklist_reads_probe_verdicts(run_copy):
    eps = load_run(run_copy).epsilon
    limit = membership_auc_limit(eps, 1e-5)
    _write(run_copy, "metrics/probes_summary.json", {
        "contains_private_images": False,
        "memorization": {"pixel": {"near_copy_fraction": 0.0, "flagged": False}, "features": {"flagged": False}},
        "membership": {"attack": "loss threshold", "auc": {"mean": 0.51, "std": 0.01}},
    })
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "pass" and st["membership"]["status"] == "pass"
    assert f"{limit:.4g}" in st["membership"]["reason"]

    _write(run_copy, "metrics/probes_summary.json", {
        "contains_private_images": False,
        "memorization": {"pixel": {"flagged": True, "p_value": 1e-5}, "features": {"flagged": False}},
        "membership": {"auc": 0.9, "dp_limit": 0.7},
    })
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "fail" and "pixel.flagged" in st["near_copies"]["reason"]
    assert st["membership"]["status"] == "fail" and "0.7" in st["membership"]["reason"]

    _write(run_copy, "metrics/probes_summary.json", {"near_copies": {"n_near_copies": 3}, "mia": {"roc_auc": 0.5}})
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "fail" and st["membership"]["status"] == "pass"

    _write(run_copy, "metrics/probes_summary.json", {"checks": {
        "near_copies": {"status": "warn", "reason": "inconclusive: too few held-out images"},
        "membership": {"status": "pass", "reason": "AUC 0.50 <= 0.73"}}})
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "warn" and st["near_copies"]["reason"].startswith("inconclusive")
    assert st["membership"]["status"] == "pass"

    (run_copy / "metrics" / "probes_summary.json").write_text("{not json")
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "warn" and "unreadable" in st["near_copies"]["reason"]


def test_checklist_utility_against_the_dp_sgd_baseline(run_copy):
    ev = {"utility": {"rows": {
        "real": {"roc_auc": {"mean": 0.89, "std": 0.01}},
        "dp_real": {"roc_auc": {"mean": 0.73, "std": 0.02}},
        "synthetic": {"roc_auc": {"mean": 0.80, "std": 0.02}}}}}
    _write(run_copy, "metrics/evaluation.json", ev)
    assert _status(run_copy)["utility"]["status"] == "pass"
    ev["utility"]["rows"]["synthetic"]["roc_auc"]["mean"] = 0.74
    _write(run_copy, "metrics/evaluation.json", ev)
    assert _status(run_copy)["utility"]["status"] == "warn"  # above, within the seed spread
    ev["utility"]["rows"]["synthetic"]["roc_auc"]["mean"] = 0.70
    _write(run_copy, "metrics/evaluation.json", ev)
    u = _status(run_copy)["utility"]
    assert u["status"] == "fail" and "does not beat" in u["reason"]
    _write(run_copy, "metrics/evaluation.json", {"fidelity": {}})
    assert _status(run_copy)["utility"]["status"] == "warn"


def test_membership_auc_limit():
    assert membership_auc_limit(1e-9, 0.0) == pytest.approx(0.5, abs=1e-6)
    e1 = math.exp(1)
    assert membership_auc_limit(1.0, 0.0) == pytest.approx(e1 / (1 + e1), abs=1e-6)  # pure DP: e^eps / (1 + e^eps)
    vals = [membership_auc_limit(e, 1e-5) for e in (0.5, 1, 3, 10)]
    assert vals == sorted(vals) and vals[-1] < 1
    assert membership_auc_limit(math.inf, 1e-5) == 1.0 and membership_auc_limit(None, 1e-5) is None


def _probes_layout(flagged=False, auc=0.528, auc_ci=(0.44, 0.61), tpr_ci=(0.0, 0.10), caught=True) -> dict:
    """The layout `dpgen audit` writes to metrics/probes_summary.json (trimmed to what the review reads)."""
    space = {"synthetic": {"n": 12, "near_copies": 3 if flagged else 0, "near_copy_fraction": 0.25 if flagged else 0.0},
             "held_out": {"n": 78, "near_copies": 8, "near_copy_fraction": 0.10},
             "comparison": {"near_copies": {"p_value_excess": 1e-4 if flagged else 1.0, "flagged": flagged}}}
    attack = {"n_members": 78, "n_non_members": 78, "auc": auc, "auc_ci": list(auc_ci),
              "tpr_at_fpr": {"1%": {"fpr": 0.01, "tpr": 0.04, "ci": list(tpr_ci)}}}
    return {
        "kind": "privacy_probes_summary", "contains_private_images": False, "internal": False,
        "memorization": {"flagged": flagged, "n_train": 96, "spaces": {"pixel": space},
                         "verdict": ("MEMORIZATION: more near-copies of training images than an independent real sample shows"
                                     if flagged else "no more near-copies than an independent real sample (held-out reference) shows")},
        "membership": {"attack": "denoising-error", "primary_score": "reference",
                       "dp_limits": {"per_fpr": {"1%": {"fpr": 0.01, "eps_delta": 0.9997, "mechanism_pld": 0.123}},
                                     "auc_eps_delta": 0.9997},
                       "dp_model": {"loss": attack, "reference": attack},
                       "overfit_control": {"scores": {"reference": {"auc": 0.99, "auc_ci": [0.97, 1.0]}}, "caught": caught,
                                           "caught_criterion": "the overfit model's AUC interval lies entirely above the DP model's",
                                           "n_images": 32, "steps": 300}},
        "reconstruction": {"targets": {"classifier": {
            "attack_bound": {"bound": 0.52, "kappa": 0.1},
            "conditions": {"no_noise": {"identification_by_gradient": {"success_rate": 1.0}},
                           "run_noise": {"identification_by_gradient": {"success_rate": 0.31, "success_ci": [0.27, 0.36],
                                                                        "prior_kappa": 0.1}}}}}},
    }


def test_checklist_and_probe_rows_read_dpgen_audit_layout(run_copy, tmp_path):
    from dpgen.report.checklist import probe_rows
    from dpgen.report.release import release

    _write(run_copy, "metrics/probes_summary.json", _probes_layout())
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "pass" and "0/12 synthetic near-copies vs 8/78 held-out" in st["near_copies"]["reason"]
    assert st["membership"]["status"] == "pass"  # the control (AUC 0.99, no DP) is not the DP model's AUC
    assert "catches a non-DP overfit control" in st["membership"]["reason"]
    rows = {r["probe"]: r for r in probe_rows(load_run(run_copy))}
    assert rows["membership inference: TPR at 1% FPR (reference attack)"]["status"] == "pass"
    assert "0.123" in rows["membership inference: TPR at 1% FPR (reference attack)"]["limit"]
    assert rows["reconstruction attack: classifier (gradient matching)"]["status"] == "pass"
    assert rows["attack power: non-DP overfit control"]["status"] == "pass"

    # the card carries the rows and the aggregate fields; the report shows them
    card = release(run_copy, tmp_path / "bundle")["card"]
    assert card["probes"]["status"] == "run" and card["probes"]["summary"]["memorization.flagged"] is False
    assert "reconstruction attack: classifier" in (tmp_path / "bundle" / "dataset_card.md").read_text()
    assert "attack power: non-DP overfit control" in render(load_run(run_copy))

    _write(run_copy, "metrics/probes_summary.json", _probes_layout(flagged=True, caught=False))
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "fail" and st["near_copies"]["reason"].startswith("MEMORIZATION")
    assert st["membership"]["status"] == "warn" and "little power" in st["membership"]["reason"]

    _write(run_copy, "metrics/probes_summary.json", _probes_layout(auc=0.99995, auc_ci=(0.99990, 1.0)))
    assert _status(run_copy)["membership"]["status"] == "fail"
    _write(run_copy, "metrics/probes_summary.json", _probes_layout(tpr_ci=(0.2, 0.4)))
    m = _status(run_copy)["membership"]
    assert m["status"] == "fail" and "EXCEEDS the run's DP-SGD limit" in m["reason"]

    layout = _probes_layout()
    layout["memorization"]["flagged"] = None
    layout["memorization"]["verdict"] = "no reference: verdict needs a held-out split"
    _write(run_copy, "metrics/probes_summary.json", layout)
    assert _status(run_copy)["near_copies"]["status"] == "warn"


def test_internal_figures_listed_in_metrics_are_not_embedded(run_copy):
    import base64

    from dpgen.report.figures import grid_png

    png = grid_png(__import__("numpy").zeros((2, 1, 8, 8), dtype="uint8"))
    (run_copy / "internal" / "audit").mkdir(parents=True, exist_ok=True)
    (run_copy / "internal" / "audit" / "closest_pairs.png").write_bytes(png)
    ev = json.loads((run_copy / "metrics" / "evaluation.json").read_text()) if (run_copy / "metrics" / "evaluation.json").is_file() else {}
    ev["figures"] = ["internal/audit/closest_pairs.png", "../outside.png"]
    _write(run_copy, "metrics/evaluation.json", ev)
    _write(run_copy, "metrics/probes_summary.json", {**_probes_layout(), "figures": ["internal/audit/closest_pairs.png"]})
    b64 = base64.b64encode(png).decode()
    assert b64 not in render(load_run(run_copy), internal=False)
    assert b64 in render(load_run(run_copy), internal=True)
