"""`dpgen audit RUN_DIR`: privacy probes on a finished run (thin wiring; the work is
`dpgen.probes.stage.audit_stage`)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a finished run directory (checkpoints, ledger, cohort)")
    p.add_argument("--cohort", default=None, metavar="PATH",
                   help="probe this MedMNIST-layout .npz instead of the run's cohort (memorization only)")
    p.add_argument("--overfit-control", dest="overfit_control", action="store_true", default=True,
                   help="also attack a non-DP model fine-tuned on a small private subset (default: on)")
    p.add_argument("--no-overfit-control", dest="overfit_control", action="store_false",
                   help="skip the non-DP overfit control")
    p.add_argument("--overfit-images", type=int, default=None, help="size of the overfit control's private subset (default 32)")
    p.add_argument("--overfit-steps", type=int, default=None, help="Adam steps of the overfit control (default 300)")
    p.add_argument("--attack-targets", type=int, default=None, metavar="N",
                   help="gradient-inversion targets against the classifier (default 4; the diffusion loss gets min(2, N))")
    p.add_argument("--inversion-iterations", type=int, default=None, help="Adam iterations per inversion (default 300)")
    p.add_argument("--no-memorization", action="store_true", help="skip the memorization probe")
    p.add_argument("--no-membership", action="store_true", help="skip membership inference")
    p.add_argument("--no-reconstruction", action="store_true", help="skip the reconstruction probes")
    p.add_argument("--no-features", action="store_true",
                   help="pixel space only (no public-encoder feature space for memorization)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice of the probes (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the summary")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_audit(args) -> int:
    from dpgen.rundir import RunDir

    for name in ("attack_targets", "overfit_images", "overfit_steps", "inversion_iterations"):
        v = getattr(args, name)
        if v is not None and v < 1:
            print(f"dpgen: error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    rd = RunDir.open(args.run_dir)  # before torch: a wrong path answers at once
    config = rd.load_config()
    from dpgen.probes.stage import AuditOptions, audit_stage, format_summary

    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    opts = AuditOptions(memorization=not args.no_memorization, membership=not args.no_membership,
                        reconstruction=not args.no_reconstruction, overfit_control=args.overfit_control,
                        feature_extractor=None if args.no_features else "public-encoder")
    if args.attack_targets is not None:
        opts.attack_targets = args.attack_targets
        opts.diffusion_inversion_targets = min(opts.diffusion_inversion_targets, args.attack_targets)
    if args.overfit_images is not None:
        opts.overfit.n_images = args.overfit_images
    if args.overfit_steps is not None:
        opts.overfit.steps = args.overfit_steps
    if args.inversion_iterations is not None:
        opts.inversion.iterations = args.inversion_iterations
    results = audit_stage(config, rd, device=args.device, progress=not args.no_progress, options=opts,
                          cohort_path=args.cohort, seed=args.seed)
    print(json.dumps(results, indent=2) if args.json else format_summary(results))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "audit", help="privacy probes (memorization, membership inference, reconstruction) on a finished run; "
                      "results and figures go to RUN/internal/audit/")
    add_arguments(p)
    p.set_defaults(func=cmd_audit)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m dpgen.probes.commands RUN_DIR ...` (same as `dpgen audit`)."""
    from dpgen.cli import main as cli_main

    return cli_main(["audit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
