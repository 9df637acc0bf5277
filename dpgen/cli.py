"""The `dpgen` command. Thin: parses arguments and calls the stage functions."""

from __future__ import annotations

import argparse
import json
import sys

from dpgen.config import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --run-dir")
    p.add_argument("--overwrite", action="store_true", help="delete --run-dir first")


def cmd_run(args, stages=None) -> int:
    from dpgen.pipeline import STAGES, format_summary, run

    _single_process_only(args.command)
    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir DIR (the run to continue)")
    summary = run(
        args.config, args.run_dir, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite,
        device=args.device, progress=not args.no_progress, stages=stages or STAGES,
    )
    print(format_summary(summary))
    return 0


def _single_process_only(command: str) -> None:
    from dpgen.distributed import launched_distributed

    if launched_distributed():
        raise ConfigError(
            f"`dpgen {command}` runs in one process; only `dpgen finetune RUN_DIR` runs distributed "
            f"(torchrun / accelerate launch). Run `dpgen pretrain` first, launch the fine-tune on several "
            f"processes, then `dpgen sample RUN_DIR`"
        )


def cmd_stage(args) -> int:
    """`dpgen finetune RUN_DIR` / `dpgen sample RUN_DIR`: one stage on an existing run.

    `dpgen finetune` joins a torch.distributed process group when a launcher started it on
    several processes (dpgen.distributed); rank 0 writes and prints."""
    from dpgen.distributed import init_from_env, shutdown
    from dpgen.pipeline import STAGE_FUNCS, open_run

    device = args.device
    if args.command == "finetune":
        w, device = init_from_env(device)
    else:
        _single_process_only(args.command)
        w = None
    ok = False
    try:
        config, rd = open_run(args.run_dir)
        kwargs = {}
        if args.command == "sample":
            kwargs = {"num_images": args.num_images, "seed": args.seed}
        result = STAGE_FUNCS[args.command](config, rd, device=device, progress=not args.no_progress, **kwargs)
        ok = True
    finally:
        if w is not None and w.distributed:
            shutdown(wait=ok)  # a failed rank must not wait for the others
    if w is None or w.is_main:
        print(json.dumps(result, indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpgen", description="Differentially private synthetic medical-imaging cohorts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="pretrain -> DP finetune -> sample, in one run directory")
    _config_args(p)
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pretrain", help="non-private pretraining on the public data (starts a run directory)")
    _config_args(p)
    _common(p)
    p.set_defaults(func=lambda a: cmd_run(a, stages=("pretrain",)))

    p = sub.add_parser("finetune", help="DP-SGD fine-tuning on the private data")
    p.add_argument("run_dir")
    _common(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("sample", help="sample a labeled synthetic cohort")
    p.add_argument("run_dir")
    p.add_argument("--num-images", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    _common(p)
    p.set_defaults(func=cmd_stage)

    from dpgen.privacy import commands as privacy_commands

    privacy_commands.register(sub)
    for name, module in EXTRA_COMMANDS:
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)
    return parser


# Later stages register themselves here (module with a `register(subparsers)` function).
EXTRA_COMMANDS: list[tuple[str, str]] = [
    ("evaluate", "dpgen.evaluation.commands"),
    ("audit", "dpgen.probes.commands"),
    ("release", "dpgen.report.commands"),
    ("federated", "dpgen.federated.commands"),
]


def main(argv: list[str] | None = None) -> int:
    from dpgen.data import DataError
    from dpgen.privacy.engine import PrivacyError
    from dpgen.rundir import RunDirError

    parser = build_parser()
    # Overrides may come before or after options (`run cfg --run-dir d a.b=1`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, DataError, RunDirError, PrivacyError, FileNotFoundError) as err:
        print(f"dpgen: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpgen: interrupted; continue with --resume --run-dir DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
