"""`dpgen report`: a shareable page (nothing private) and the data holder's internal review.

The run comes from tests/test_release.py's `finished_run` (a real tiny run, evaluated and audited,
built once per session).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from dpgen.cli import main
from dpgen.report.checklist import CHECKS, SHAREABLE, checklist, membership_auc_limit
from dpgen.report.html import CHROMIUM_FLAGS, chromium, find_chromium, render_internal, render_shareable, write_report
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
def test_report_renders_in_headless_chromium(run_copy):
    result = write_report(run_copy, pdf=True)
    html_path = run_copy / "report" / "report.html"
    assert result["html"] == str(html_path) and html_path.is_file()
    # the browser's DOM after parsing and layout, not our string
    res = chromium(["--dump-dom"], html_path.resolve().as_uri(), timeout=120)
    dom = res.stdout
    assert res.returncode == 0 and "</html>" in dom, res.stderr[-500:]
    rows = _rows(dom)
    assert list(rows) == list(SHAREABLE) and rows == {"preflight": "pass", "epsilon": "pass"}
    for cid in SHAREABLE:  # each row shows its status and a one-line reason
        m = re.search(rf'<tr data-check="{cid}" data-status="(\w+)"><td>[^<]+</td><td><span class="status \1">\1</span></td><td>([^<]+)</td>', dom)
        assert m and len(m.group(2)) > 10, cid
    for section in ("Privacy guarantee", "Samples", "How it was made", "Known limits"):
        assert f">{section}</h2>" in dom, section
    # the internal review renders too, with every check
    res = chromium(["--dump-dom"], (run_copy / "internal" / "review" / "review.html").resolve().as_uri(), timeout=120)
    assert list(_rows(res.stdout)) == CHECK_IDS
    # PDF printed by the same browser
    assert result["pdf"] and Path(result["pdf"]).read_bytes()[:5] == b"%PDF-"
    shot = run_copy / "report" / "shot.png"
    res = chromium(["--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}"], html_path.resolve().as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert "--disable-background-networking" in CHROMIUM_FLAGS and "--no-sandbox" in CHROMIUM_FLAGS


def test_shareable_page_reads_nothing_private_and_is_self_contained(run_dir, monkeypatch):
    import dpgen.data
    import dpgen.report.runinfo as runinfo

    info = load_run(run_dir)
    config = info.config
    asked = []
    real = dpgen.data.load_dataset

    def spy(spec, *a, **k):
        asked.append(spec.source)
        return real(spec, *a, **k)

    monkeypatch.setattr(dpgen.data, "load_dataset", spy)
    # the shareable page must not depend on the evaluation or the probes: hide them from it
    info.evaluation = info.probes = None
    html_text = render_shareable(info)
    assert config.data.private.source not in asked  # never loads private data
    assert config.data.public.source in asked and "Real <b>public</b> examples" in html_text
    srcs = re.findall(r'\bsrc="([^"]*)"', html_text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in html_text and "<link" not in html_text and not re.search(r'href="https?:', html_text)
    assert "default-src 'none'" in html_text  # CSP: the browser fetches nothing
    def strip_time(t):
        return re.sub(r"Generated [^ ]+ by", "", t)

    assert strip_time(render_shareable(load_run(run_dir))) == strip_time(html_text)

    asked.clear()
    internal = render_internal(load_run(run_dir), private_examples=True)
    assert config.data.private.source in asked and "real PRIVATE" in internal and "INTERNAL" in internal


def test_shareable_page_holds_no_private_figure_or_local_path(run_dir, monkeypatch, tmp_path):
    """No evaluation or probe figure, no N, no local path, even when the public data is not found."""
    from tests.test_release import _appears

    monkeypatch.setenv("DPGEN_DATA_DIR", str(tmp_path / "nowhere"))
    notes: list[str] = []
    html_text = render_shareable(load_run(run_dir), notes)
    assert str(tmp_path) not in html_text and "/tmp/" not in html_text and "/work/" not in html_text
    assert notes and "DPGEN_DATA_DIR" in notes[0]  # the detail goes to the console only
    assert "were not available" in html_text
    ev = json.loads((run_dir / "internal" / "evaluation" / "evaluation.json").read_text())
    aucs = [r["roc_auc"]["mean"] for r in ev["utility"]["rows"].values() if r["roc_auc"]["mean"] is not None]
    assert aucs and not [a for a in aucs if _appears(a, html_text) and not float(a).is_integer()]
    assert str(load_run(run_dir).privacy.n_units) not in re.sub(r"<img[^>]*>", "", html_text)


def test_report_writes_the_shareable_page_and_the_internal_review(run_copy, capsys):
    assert main(["report", str(run_copy), "--no-pdf"]) == 0
    out = capsys.readouterr().out
    assert "shareable release review" in out and "internal review (never share)" in out
    shareable = (run_copy / "report" / "report.html").read_text()
    internal = (run_copy / "internal" / "review" / "review.html").read_text()
    assert _rows(shareable) == {"preflight": "pass", "epsilon": "pass"}
    assert list(_rows(internal)) == CHECK_IDS
    assert "real PRIVATE" not in shareable and "INTERNAL" in internal and "INTERNAL" not in shareable
    assert {p.name for p in (run_copy / "report").iterdir()} <= {"report.html", "report.pdf"}


def test_missing_evaluation_and_probes_are_warnings_of_the_internal_review(run_copy, capsys):
    for rel in ("internal/evaluation/evaluation.json", "internal/audit/probes_summary.json"):
        (run_copy / rel).unlink(missing_ok=True)
    assert main(["report", str(run_copy), "--no-pdf"]) == 0
    assert "internal checklist: WARN" in capsys.readouterr().out
    rows = _rows((run_copy / "internal" / "review" / "review.html").read_text())
    assert rows == {"preflight": "pass", "epsilon": "pass", "delta": "pass", "near_copies": "warn",
                    "membership": "warn", "utility": "warn"}


# ----------------------------------------------------------------------------- the checklist


def _write(run: Path, rel: str, obj) -> None:
    (run / rel).parent.mkdir(parents=True, exist_ok=True)
    (run / rel).write_text(json.dumps(obj))


def _status(run: Path) -> dict[str, dict]:
    return {i["id"]: i for i in checklist(load_run(run))}


PROBES = "internal/audit/probes_summary.json"
EVALUATION = "internal/evaluation/evaluation.json"


def test_checklist_utility_against_the_dp_sgd_baseline(run_copy):
    ev = {"utility": {"rows": {
        "real": {"roc_auc": {"mean": 0.89, "std": 0.01}},
        "dp_real": {"roc_auc": {"mean": 0.73, "std": 0.02}},
        "synthetic": {"roc_auc": {"mean": 0.80, "std": 0.02}}}}}
    _write(run_copy, EVALUATION, ev)
    assert _status(run_copy)["utility"]["status"] == "pass"
    ev["utility"]["rows"]["synthetic"]["roc_auc"]["mean"] = 0.74
    _write(run_copy, EVALUATION, ev)
    assert _status(run_copy)["utility"]["status"] == "warn"  # above, within the seed spread
    ev["utility"]["rows"]["synthetic"]["roc_auc"]["mean"] = 0.70
    _write(run_copy, EVALUATION, ev)
    u = _status(run_copy)["utility"]
    assert u["status"] == "fail" and "does not beat" in u["reason"]
    _write(run_copy, EVALUATION, {"fidelity": {}})
    assert _status(run_copy)["utility"]["status"] == "warn"


def test_membership_auc_limit():
    assert membership_auc_limit(1e-9, 0.0) == pytest.approx(0.5, abs=1e-6)
    e1 = math.exp(1)
    assert membership_auc_limit(1.0, 0.0) == pytest.approx(e1 / (1 + e1), abs=1e-6)  # pure DP: e^eps / (1 + e^eps)
    vals = [membership_auc_limit(e, 1e-5) for e in (0.5, 1, 3, 10)]
    assert vals == sorted(vals) and vals[-1] < 1
    assert membership_auc_limit(math.inf, 1e-5) == 1.0


def _probes_layout(flagged=False, auc=0.528, auc_ci=(0.44, 0.61), tpr=0.04, tpr_ci=(0.0, 0.10), caught=True) -> dict:
    """The layout `dpgen audit` writes to internal/audit/probes_summary.json (trimmed to what the review reads)."""
    space = {"synthetic": {"n": 12, "near_copies": 3 if flagged else 0, "near_copy_fraction": 0.25 if flagged else 0.0},
             "held_out": {"n": 78, "near_copies": 8, "near_copy_fraction": 0.10},
             "comparison": {"near_copies": {"p_value_excess": 1e-4 if flagged else 1.0, "flagged": flagged}}}
    attack = {"n_members": 78, "n_non_members": 78, "auc": auc, "auc_ci": list(auc_ci),
              "tpr_at_fpr": {"1%": {"fpr": 0.01, "tpr": tpr, "ci": list(tpr_ci)}}}
    return {
        "kind": "privacy_probes_summary", "contains_private_images": False, "internal": True,
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


def test_checklist_reads_the_dpgen_audit_layout(run_copy):
    from dpgen.report.html import probe_rows

    _write(run_copy, PROBES, _probes_layout())
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "pass" and "0/12 synthetic near-copies vs 8/78 held-out" in st["near_copies"]["reason"]
    assert st["membership"]["status"] == "pass"  # the control (AUC 0.99, no DP) is not the DP model's AUC
    assert "catches a non-DP overfit control" in st["membership"]["reason"] and "AUC 0.528" in st["membership"]["reason"]
    rows = {r[0]: r for r in probe_rows(load_run(run_copy))}
    assert "0.123" in rows["membership inference: TPR at 1% FPR (reference attack)"][2]
    assert "reconstruction attack: classifier" in rows and "attack power: non-DP overfit control" in rows

    _write(run_copy, PROBES, _probes_layout(flagged=True, caught=False))
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "fail" and st["near_copies"]["reason"].startswith("MEMORIZATION")
    assert st["membership"]["status"] == "warn" and "little power" in st["membership"]["reason"]

    layout = _probes_layout()
    layout["memorization"]["flagged"] = None
    _write(run_copy, PROBES, layout)
    assert _status(run_copy)["near_copies"]["status"] == "warn"
    (run_copy / PROBES).write_text("{not json")
    st = _status(run_copy)
    assert st["near_copies"]["status"] == "warn" and "unreadable" in st["near_copies"]["reason"]


def test_membership_row_can_fail_at_large_epsilon(run_copy):
    """The row compares TPR at 1% FPR with the composed mechanisms' limit (0.123 here), which an attack
    can exceed; the AUC limit at this epsilon is ~1 and could never fail."""
    _write(run_copy, PROBES, _probes_layout(auc=0.99, auc_ci=(0.98, 1.0), tpr=0.3, tpr_ci=(0.2, 0.4)))
    m = _status(run_copy)["membership"]
    assert m["status"] == "fail" and "EXCEEDS the limit" in m["reason"] and "AUC 0.99" in m["reason"]
    _write(run_copy, PROBES, _probes_layout(tpr=0.15, tpr_ci=(0.05, 0.25)))
    assert _status(run_copy)["membership"]["status"] == "warn"  # above, but within the interval


def test_internal_figures_only_in_the_internal_review(run_copy):
    import base64

    from dpgen.report.figures import grid_png

    png = grid_png(__import__("numpy").zeros((2, 1, 8, 8), dtype="uint8"))
    (run_copy / "internal" / "audit" / "closest_pairs.png").write_bytes(png)
    b64 = base64.b64encode(png).decode()
    assert b64 not in render_shareable(load_run(run_copy))
    assert b64 in render_internal(load_run(run_copy))
