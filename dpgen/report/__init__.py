"""The release review: the shareable bundle (`release`), the review pages (`html`), the checklist.

    from dpgen.report import release, write_report, verify_bundle
    release("runs/quick", "bundle/")        # images + labels.csv + .npz + dataset card + SHA256SUMS
    write_report("runs/quick")              # report/report.html (shareable) + internal/review/review.html

Modules: `runinfo` (reads a run directory defensively), `disclosure` (what anything shared may
say about privacy), `checklist` (pass/warn/fail checks; the shareable subset), `release` (the
bundle and its typed allow-list), `card` (the dataset card), `figures`, `html` (the shareable
report and the internal review), `commands` (the `dpgen release|report|sweep` subcommands). The
sweep lives in `dpgen.sweep`.
"""

from dpgen.report.checklist import CHECKS, checklist, membership_auc_limit, overall, shareable_checklist
from dpgen.report.html import render_internal, render_shareable, write_report
from dpgen.report.release import ReleaseError, allow_list, release, verify_bundle
from dpgen.report.runinfo import RunInfo, load_run

__all__ = ["CHECKS", "checklist", "shareable_checklist", "overall", "membership_auc_limit", "release", "verify_bundle",
           "allow_list", "ReleaseError", "write_report", "render_shareable", "render_internal", "RunInfo", "load_run"]
