"""The release review: the shareable bundle (`release`), the review page (`html`), the checklist.

    from dpgen.report import release, write_report, verify_bundle
    release("runs/quick", "bundle/")        # images + labels.csv + .npz + dataset card + SHA256SUMS
    write_report("runs/quick")              # runs/quick/report/report.html (+ .pdf with chromium)

Modules: `runinfo` (reads a run directory defensively), `checklist` (pass/warn/fail checks),
`release` (the bundle and its allow-list), `card` (the dataset card), `figures`, `html` (the
report), `commands` (the `dpgen release|report|sweep` subcommands). The sweep lives in
`dpgen.sweep`.
"""

from dpgen.report.checklist import CHECKS, checklist, membership_auc_limit, overall
from dpgen.report.html import render, write_report
from dpgen.report.release import ReleaseError, allow_list, release, verify_bundle
from dpgen.report.runinfo import RunInfo, load_run

__all__ = ["CHECKS", "checklist", "overall", "membership_auc_limit", "release", "verify_bundle", "allow_list",
           "ReleaseError", "write_report", "render", "RunInfo", "load_run"]
