"""The release review: the shareable bundle (`release`), the review pages (`html`), the checklist.

    from dpgen.report import write_report, verify_bundle
    from dpgen.report.release import release
    release("runs/quick", "bundle/")        # images + labels.csv + .npz + dataset card + SHA256SUMS
    write_report("runs/quick")              # report/report.html (shareable) + internal/review/review.html

Modules: `runinfo` (reads a run directory defensively), `disclosure` (what anything shared may
say about privacy), `checklist` (pass/warn/fail checks; the shareable subset), `release` (the
bundle and its typed allow-list), `card` (the dataset card), `figures`, `html` (the shareable
report and the internal review), `commands` (the `dpgen release|report|sweep` subcommands). The
sweep lives in `dpgen.sweep`.

Lazy: `dpgen --help` and the argument errors of `dpgen release|report|sweep` import `commands`
only. (`release` and `checklist` are modules of this package; their functions of the same name
are imported from them.)
"""

from dpgen.core.lazy import lazy_exports

_EXPORTS = {
    "CHECKS": "checklist", "shareable_checklist": "checklist", "overall": "checklist",
    "membership_auc_limit": "checklist",
    "render_internal": "html", "render_shareable": "html", "write_report": "html",
    "ReleaseError": "release", "allow_list": "release", "verify_bundle": "release",
    "RunInfo": "runinfo", "load_run": "runinfo",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
