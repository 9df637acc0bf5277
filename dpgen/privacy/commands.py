"""``dpgen privacy``: calibrate noise, read a run's privacy ledger, bound reconstruction, audit.

These commands exist so that privacy numbers can be checked *without* training:
a data owner can ask what sigma a budget implies, what a finished run actually
spent (recomputed from its ledger, not copied from a log), and what an epsilon
means as a reconstruction risk.  ``audit`` is the exception that trains: a small canary model
through dpgen's one DP-SGD loop, tested against the claimed trade-off curve (see
:mod:`dpgen.privacy.audit`).  Every subcommand has ``--json`` for scripts.

The lead's ``dpgen/cli.py`` calls :func:`register` with its subparsers; each leaf
parser sets ``func`` to a handler ``handler(args) -> int`` (exit code).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

__all__ = ["register", "cmd_calibrate", "cmd_report", "cmd_bound", "cmd_audit"]


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if math.isnan(v):
        raise argparse.ArgumentTypeError("must not be NaN")
    return v


def _dump(obj) -> str:
    # inf is written as the JSON extension Infinity (what Python's json reads back)
    return json.dumps(obj, indent=2, default=str)


def _error(cmd: str, msg: str, code: int = 2) -> int:
    print(f"dpgen privacy {cmd}: error: {msg}", file=sys.stderr)
    return code


def cmd_calibrate(args) -> int:
    """Print the smallest sigma meeting the budget, with a PLD and RDP cross-check."""
    from dpgen.privacy import accounting

    try:
        sigma = accounting.calibrate_sigma(
            args.epsilon, args.delta, args.sample_rate, args.steps, accountant=args.accountant
        )
        if sigma == 0.0:
            eps_pld = eps_rdp = math.inf
        else:
            event = accounting.poisson_gaussian_event(sigma, args.sample_rate, args.steps)
            eps_pld = accounting.epsilon([event], args.delta, "pld")
            eps_rdp = accounting.epsilon([event], args.delta, "rdp")
    except ValueError as err:
        return _error("calibrate", str(err))
    result = {
        "sigma": sigma,
        "target_epsilon": args.epsilon,
        "delta": args.delta,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "accountant": args.accountant,
        "epsilon_pld": eps_pld,
        "epsilon_rdp": eps_rdp,
    }
    if args.json:
        print(_dump(result))
        return 0
    if sigma == 0.0:
        print("target epsilon is inf: non-private run, sigma = 0 (no noise)")
        return 0
    print(f"sigma (noise multiplier) = {sigma:.6g}")
    print(
        f"  for epsilon <= {args.epsilon:g} at delta = {args.delta:g}, q = {args.sample_rate:g}, "
        f"T = {args.steps} steps (calibrated with {args.accountant})"
    )
    print(f"  epsilon (PLD) = {eps_pld:.4f}")
    print(f"  epsilon (RDP) = {eps_rdp:.4f}  (looser cross-check)")
    return 0


def cmd_report(args) -> int:
    """Print what a run spent, recomputed from RUN_DIR/privacy/ledger.jsonl."""
    from dpgen.privacy.ledger import PrivacyLedger, format_ledger, ledger_path

    path = ledger_path(args.run_dir)
    if not path.is_file():
        return _error("report", f"no privacy ledger at {path} (not a run directory, or no DP stage has run yet)")
    ledger = PrivacyLedger(path)
    entries = ledger.entries()
    try:
        summary = ledger.summary(args.delta)
    except ValueError as err:
        return _error("report", f"{path}: {err}" + (" (pass --delta)" if "delta" in str(err) else ""))
    if args.json:
        print(_dump({"summary": summary.to_dict(), "entries": entries}))
        return 0
    print(format_ledger(summary))
    if not args.brief:
        print()
        print(format_ledger(entries))
    return 0


def cmd_bound(args) -> int:
    """Print the reconstruction-robustness bound(s) for a DP-SGD configuration."""
    from dpgen.privacy import bounds

    methods = ("tight", "gdp") if args.method == "both" else (args.method,)
    try:
        results = {m: bounds.rero_bound(args.sigma, args.sample_rate, args.steps, args.kappa, method=m) for m in methods}
    except ValueError as err:
        return _error("bound", str(err))
    if args.json:
        print(_dump(results if args.method == "both" else results[args.method]))
        return 0
    print(
        f"reconstruction robustness for sigma = {args.sigma:g}, q = {args.sample_rate:g}, "
        f"T = {args.steps}, attacker prior kappa = {args.kappa:g}:"
    )
    for m, r in results.items():
        if m == "tight":
            print(f"  tight (PLD, certified upper bound): P[success] <= {r['bound']:.4g}  (+/- {r['tolerance']:.2g})")
        else:
            print(f"  gdp (CLT closed form, approximate):  P[success] ~ {r['bound']:.4g}  (mu = {r['mu']:.4g})")
    return 0


def cmd_audit(args) -> int:
    """Audit the one DP-SGD loop with canaries: exit 0 PASS, 1 FAIL (violation), 2 error,
    3 INCONCLUSIVE (this audit cannot show a violation of the claim asked about)."""
    from dpgen.data import DataError
    from dpgen.privacy import audit
    from dpgen.privacy.engine import PrivacyError

    try:
        result = audit.run_audit(
            variant=args.variant, epsilon=args.epsilon, delta=args.delta, m=args.canaries, steps=args.steps,
            seed=args.seed, method=args.method, sample_rate=args.sample_rate, unit=args.unit, guesses=args.guesses,
            noise_multiplicity=args.noise_multiplicity, grad_sample_mode=args.grad_sample_mode,
            confidence=args.confidence, dataset=args.dataset, n_real=args.n_real,
        )
    except (ValueError, DataError, PrivacyError) as err:
        return _error("audit", str(err))
    print(_dump(result) if args.json else audit.format_audit(result))
    return AUDIT_EXIT[result["verdict"]]


#: Exit codes of `dpgen privacy audit` by verdict.
AUDIT_EXIT = {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}
# The audit's choices (dpgen.privacy.audit.METHODS / VARIANTS / UNITS), spelled out so that
# building the parser does not import torch (tests/test_audit.py checks that they agree).
AUDIT_METHODS = ("tradeoff", "one_run")
AUDIT_VARIANTS = ("real", "no_noise", "no_clipping", "noise_third", "full_batch", "row_units")
AUDIT_UNITS = ("image", "subject")


def register(subparsers) -> None:
    """Add the ``privacy`` command and its subcommands to ``subparsers``."""
    p = subparsers.add_parser(
        "privacy",
        help="privacy accounting: calibrate sigma, report a run's ledger, reconstruction bounds, audit",
        description="Privacy accounting tools (no training needed), and an empirical audit of DP-SGD.",
    )
    sub = p.add_subparsers(dest="privacy_command", metavar="{calibrate,report,bound,audit}", required=True)

    c = sub.add_parser("calibrate", help="smallest DP-SGD noise multiplier for a target epsilon")
    c.add_argument("--epsilon", type=_float, required=True, help="target epsilon (inf = non-private)")
    c.add_argument("--delta", type=_float, required=True, help="target delta (well below 1/N)")
    c.add_argument("--sample-rate", type=_float, required=True, help="Poisson sampling rate q = batch / N")
    c.add_argument("--steps", type=int, required=True, help="number of DP-SGD steps T")
    c.add_argument("--accountant", choices=("pld", "rdp"), default="pld", help="accountant used to calibrate (default pld)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_calibrate)

    r = sub.add_parser("report", help="print the privacy ledger of a run directory")
    r.add_argument("run_dir", help="run directory (reads RUN_DIR/privacy/ledger.jsonl)")
    r.add_argument("--delta", type=_float, default=None, help="delta (default: the plan's)")
    r.add_argument("--brief", action="store_true", help="summary only, without the entry list")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bound", help="reconstruction-robustness bound for DP-SGD")
    b.add_argument("--sigma", type=_float, required=True, help="noise multiplier")
    b.add_argument("--sample-rate", type=_float, required=True, help="Poisson sampling rate q")
    b.add_argument("--steps", type=int, required=True, help="number of steps T")
    b.add_argument("--kappa", type=_float, required=True, help="attacker's prior success probability")
    b.add_argument("--method", choices=("tight", "gdp", "both"), default="both")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=cmd_bound)

    a = sub.add_parser(
        "audit",
        help="canary audit of the DP-SGD loop against the claimed epsilon (exit 1 = violation)",
        description="Trains a small model with gradient canaries through dpgen's one DP-SGD loop (the planner "
        "calibrates sigma to --epsilon) and tests whether the canaries reveal more than the claimed mechanism "
        "allows. --method tradeoff (default): every canary coordinate is read after every step, turned into the "
        "likelihood-ratio statistic of the claim, and TPR at FPR is compared with the claimed trade-off curve "
        "(Clopper-Pearson bounds); it can fail at epsilon 10. --method one_run: Steinke, Nasr & Jagielski 2023 "
        "(final weights only); it cannot certify more than about 3.7 (m = 1000, 200 guesses, 99% confidence) and "
        "says so. The variants other "
        "than real hand the loop a broken plan (no noise, sigma/3, no clipping, q = 1, rows as units) while the "
        "claim stays the calibrated one: they should FAIL. Exit codes: 0 PASS, 1 FAIL, 2 error, 3 INCONCLUSIVE "
        "(the audit cannot show a violation of this claim: a pass would be no evidence).",
    )
    a.add_argument("--method", choices=AUDIT_METHODS, default="tradeoff", help="tradeoff (default) or one_run")
    a.add_argument("--epsilon", type=_float, default=10.0, help="claimed epsilon; sigma is calibrated to it (default 10)")
    a.add_argument("--delta", type=_float, default=1e-5, help="delta (default 1e-5)")
    a.add_argument("--variant", choices=AUDIT_VARIANTS, default="real",
                   help="real = the loop as shipped; the others break it on purpose (default real)")
    a.add_argument("--unit", choices=AUDIT_UNITS, default="image",
                   help="privacy unit: image, or subject (2 rows per subject, canaries too) (default image)")
    a.add_argument("--canaries", type=int, default=1000, help="number of canaries m (default 1000)")
    a.add_argument("--guesses", type=int, default=100,
                   help="one_run only: canaries guessed in, and as many out (default 100)")
    a.add_argument("--steps", type=int, default=40, help="DP-SGD steps T (default 40)")
    a.add_argument("--sample-rate", type=_float, default=0.25, help="Poisson sampling rate q (default 0.25)")
    a.add_argument("--noise-multiplicity", type=int, default=1, help="draws K per row (default 1)")
    a.add_argument("--grad-sample-mode", choices=("hooks", "functorch"), default="hooks")
    a.add_argument("--confidence", type=_float, default=0.99,
                   help="confidence level: a loop that keeps its claim FAILs with probability at most 1 - this "
                   "(default 0.99)")
    a.add_argument("--dataset", default="breastmnist", help="real images trained beside the canaries (default breastmnist)")
    a.add_argument("--n-real", type=int, default=128, help="how many real images (default 128)")
    a.add_argument("--seed", type=int, default=0, help="the auditor's public seed (canaries, split); the engine's "
                   "sampling and noise always come from fresh secret randomness")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.set_defaults(func=cmd_audit)
