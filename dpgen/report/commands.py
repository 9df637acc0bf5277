"""`dpgen release`, `dpgen report`, `dpgen sweep` (thin wiring; see release.py, html.py, dpgen/sweep.py)."""

from __future__ import annotations

import json
import sys


def _err(msg: str) -> int:
    print(f"dpgen: error: {msg}", file=sys.stderr)
    return 2


def cmd_release(args) -> int:
    if args.verify:
        from dpgen.report.release import verify_bundle

        problems = verify_bundle(args.verify)
        if problems:
            print("\n".join(f"FAILED: {p}" for p in problems))
            return 1
        print(f"{args.verify}: every file matches SHA256SUMS")
        return 0
    if not args.run_dir or not args.out:
        return _err("usage: dpgen release RUN_DIR OUT  (or: dpgen release --verify OUT)")
    from dpgen.rundir import RunDir

    RunDir.open(args.run_dir)  # before torch: a wrong path answers at once
    from dpgen.report.release import ReleaseError, format_release, release

    try:
        result = release(args.run_dir, args.out, overwrite=args.overwrite, include_weights=args.include_weights)
    except ReleaseError as err:
        return _err(str(err))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "card"}, indent=2, default=str))
    else:
        print(format_release(result))
    return 0


def cmd_report(args) -> int:
    from dpgen.rundir import RunDir

    RunDir.open(args.run_dir)  # before torch: a wrong path answers at once
    from dpgen.report.html import format_report, write_report

    result = write_report(args.run_dir, pdf=not args.no_pdf, private_examples=args.private_examples)
    print(json.dumps(result, indent=2, default=str) if args.json else format_report(result))
    return 0


def _eval_options(args):
    if args.no_evaluate or (args.eval_seeds is None and args.eval_epochs is None and args.encoder_epochs is None):
        return None
    from dpgen.evaluation.stage import EvalOptions

    opts = EvalOptions()
    if args.encoder_epochs is not None:
        opts.encoder_epochs = max(1, args.encoder_epochs)
    u = opts.utility_options
    if args.eval_seeds is not None:
        u.seeds = max(1, args.eval_seeds)
    if args.eval_epochs is not None:
        u.epochs = u.dp_epochs = u.synthetic_epochs = max(1, args.eval_epochs)
        u.finetune_epochs = max(1, args.eval_epochs // 2)
    return opts


def cmd_sweep(args) -> int:
    from dpgen.config import ConfigError
    from dpgen.sweep import format_sweep, parse_epsilons, sweep

    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir DIR (the sweep to continue)")
    if args.threads:
        import torch

        torch.set_num_threads(max(1, args.threads))
    eps = parse_epsilons(args.epsilons)
    result = sweep(args.config, eps, args.run_dir, overrides=args.overrides, device=args.device,
                   progress=not args.no_progress, evaluate=not args.no_evaluate, eval_options=_eval_options(args),
                   repeats=args.repeats,
                   resume=args.resume, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(format_sweep(result))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("release", help="write the shareable bundle of a finished run (and nothing else)")
    p.add_argument("run_dir", nargs="?", help="a finished run directory")
    p.add_argument("out", nargs="?", help="the bundle folder (must not exist, or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--include-weights", action="store_true", help="also ship the DP fine-tuned generator weights")
    p.add_argument("--verify", metavar="OUT", help="check a bundle's files against its SHA256SUMS and exit")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_release)

    p = subparsers.add_parser("report", help="write the release review: RUN/report/report.html (shareable, + PDF with "
                                             "chromium) and RUN/internal/review/review.html (internal)")
    p.add_argument("run_dir")
    p.add_argument("--no-pdf", action="store_true", help="skip the PDF even if chromium is installed")
    p.add_argument("--private-examples", action="store_true",
                   help="show real PRIVATE images per class in the internal review (never share it)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("sweep", help="privacy-utility sweep: one public pretraining, one DP fine-tune per epsilon")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--epsilons", required=True, help="comma-separated, e.g. 1,3,10,inf (inf = non-private)")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="DP fine-tunes per epsilon, each with its own secret seed; figures are mean ± std over them "
                        "(default 1)")
    p.add_argument("--run-dir", help="sweep directory (default: runs/<config name>-sweep-<time>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --run-dir")
    p.add_argument("--overwrite", action="store_true", help="replace --run-dir")
    p.add_argument("--no-evaluate", action="store_true", help="skip the evaluation stage (the curve stays empty)")
    p.add_argument("--eval-seeds", type=int, default=None, help="classifier seeds per utility row (evaluation default)")
    p.add_argument("--eval-epochs", type=int, default=None, help="classifier epochs (evaluation default)")
    p.add_argument("--encoder-epochs", type=int, default=None, help="public encoder epochs (evaluation default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is often fastest on a busy machine)")
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_sweep)
