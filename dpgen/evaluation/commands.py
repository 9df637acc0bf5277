"""`dpgen evaluate RUN_DIR`: fidelity and downstream utility of a run's cohort (thin wiring)."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory with a cohort (RUN/cohort/cohort.npz)")
    p.add_argument("--cohort", default=None, metavar="PATH",
                   help="evaluate this MedMNIST-layout .npz (train_images/train_labels) instead of the run's cohort")
    p.add_argument("--feature-extractor", choices=("public-encoder", "inception"), default="public-encoder",
                   help="features for fidelity metrics (default: a CNN dpgen trains on the public data; offline)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="local InceptionV3 weights (torch-fidelity's pt_inception-2015-12-05 file) for --feature-extractor inception")
    p.add_argument("--encoder-epochs", type=int, default=None,
                   help="training epochs of the public encoder (default 6; part of its cache key)")
    p.add_argument("--seeds", type=int, default=None, help="classifier seeds per utility row (default 3)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of the real and DP-SGD classifiers (default 40; fine-tuning uses half)")
    p.add_argument("--target-epsilon", type=float, default=None, metavar="E",
                   help="compare the DP rows at E (default: the run's budget): the DP-SGD baseline spends E, the "
                        "synthetic-pretrain + DP fine-tune row composes with the cohort to E (a split budget)")
    p.add_argument("--no-utility", action="store_true", help="fidelity only (no classifiers)")
    p.add_argument("--no-fidelity", action="store_true", help="downstream utility only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is much faster on a busy machine)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the summary")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_evaluate(args) -> int:
    from dpgen.rundir import RunDir

    rd = RunDir.open(args.run_dir)  # before torch: a wrong path answers at once
    config = rd.load_config()
    if args.no_fidelity and args.no_utility:
        print("dpgen: error: --no-fidelity and --no-utility leave nothing to evaluate", file=sys.stderr)
        return 2
    if args.epochs is not None and args.epochs < 1:
        print("dpgen: error: --epochs must be >= 1", file=sys.stderr)
        return 2
    from dpgen.evaluation.features import EvaluationError
    from dpgen.evaluation.stage import EvalOptions, evaluate_stage, format_summary

    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    opts = EvalOptions(fidelity=not args.no_fidelity, utility=not args.no_utility)
    if args.encoder_epochs is not None:
        opts.encoder_epochs = max(1, args.encoder_epochs)
    if args.epochs is not None:
        u = opts.utility_options
        u.epochs = u.dp_epochs = u.synthetic_epochs = args.epochs
        u.finetune_epochs = max(1, args.epochs // 2)
    try:
        metrics = evaluate_stage(
            config, rd, device=args.device, progress=not args.no_progress, cohort_path=args.cohort,
            feature_extractor=args.feature_extractor, inception_weights=args.inception_weights, seeds=args.seeds,
            options=opts, target_epsilon=args.target_epsilon,
        )
    except EvaluationError as err:
        print(f"dpgen: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2) if args.json else format_summary(metrics))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("evaluate", help="fidelity (with real-vs-real references) and downstream utility of a cohort")
    add_arguments(p)
    p.set_defaults(func=cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m dpgen.evaluation.commands RUN_DIR ...` (same as `dpgen evaluate`)."""
    from dpgen.cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
