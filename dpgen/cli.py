"""The `dpgen` command. Thin: parses arguments and calls the stage functions.

Fast where it can be: `dpgen --help`, `dpgen --version`, a bad argument, a bad config or a
refused run directory answer without importing torch, Opacus or MONAI. The subcommands other
packages own (privacy, evaluate, audit, release, report, sweep) are registered only when they
are invoked; `dpgen --help` lists them from LAZY_COMMANDS.

Every bad input gets one line on stderr, `dpgen: error: ...`, and exit code 2 (never a
traceback; set DPGEN_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

from dpgen import __version__


class Parser(argparse.ArgumentParser):
    """argparse with dpgen's error style: one line on stderr, exit code 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"dpgen: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v}: must be at least 1")
    return v


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check_device(device) -> str | None:
    if isinstance(device, str) and not _DEVICE.fullmatch(device):
        return f"argument --device: {device!r} is not a device dpgen can use (auto, cpu, cuda, cuda:N, mps)"
    return None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto: CUDA when available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--run-dir", help="run directory (default: runs/<config name>-<time>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --run-dir (same config)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete --run-dir first (only a run directory dpgen wrote)")


def _announce(as_json: bool):
    """Where a run says what it is doing: stdout (stderr is for errors), or stderr when stdout is
    JSON for a script."""
    def log(line: str) -> None:
        print(f"dpgen: {line}", file=sys.stderr if as_json else sys.stdout, flush=True)

    return log


def _print_summary(summary: dict, as_json: bool) -> None:
    from dpgen.pipeline import format_summary
    from dpgen.rundir import to_jsonable

    if as_json:
        print(json.dumps(to_jsonable(summary), indent=2, allow_nan=False))
    else:
        print(format_summary(summary))


def cmd_run(args, stages=None) -> int:
    from dpgen.config import ConfigError, load_config
    from dpgen.rundir import check_run_dir, default_run_dir

    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir DIR (the run to continue)")
    # The cheap checks first (config, run directory): their errors come before torch is loaded.
    config = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config.name)
    check_run_dir(run_dir, resume=args.resume, overwrite=args.overwrite, protect=[args.config])
    from dpgen.data import check_sources

    check_sources(config.data)
    args.resume_command = " ".join(
        ["dpgen", args.command, shlex.quote(args.config), *map(shlex.quote, args.overrides), "--run-dir",
         shlex.quote(str(run_dir)), "--resume"]
        + ([f"--device {shlex.quote(args.device)}"] if args.device != "auto" else [])
        + (["--no-progress"] if args.no_progress else []))
    args.started_run_dir = run_dir

    from dpgen.pipeline import STAGES, run

    _single_process_only(args.command)
    summary = run(
        args.config, run_dir, overrides=args.overrides, resume=args.resume, overwrite=args.overwrite,
        device=args.device, progress=not args.no_progress, stages=stages or STAGES, log=_announce(args.json),
    )
    _print_summary(summary, args.json)
    return 0


def _single_process_only(command: str) -> None:
    from dpgen.config import ConfigError
    from dpgen.distributed import launched_distributed

    if launched_distributed():
        raise ConfigError(
            f"`dpgen {command}` runs in one process; only `dpgen finetune RUN_DIR` runs distributed "
            f"(torchrun / accelerate launch). Run `dpgen pretrain` first, launch the fine-tune on several "
            f"processes, then `dpgen sample RUN_DIR`"
        )


def _open_run(path: str):
    """(config, RunDir) of an existing run directory, or a RunDirError that says what `path` is."""
    from dpgen.rundir import RunDir

    rd = RunDir.open(path)
    return rd.load_config(), rd


def cmd_stage(args) -> int:
    """`dpgen finetune RUN_DIR` / `dpgen sample RUN_DIR`: one stage on an existing run.

    `dpgen finetune` joins a torch.distributed process group when a launcher started it on
    several processes (dpgen.distributed); rank 0 writes and prints."""
    config, rd = _open_run(args.run_dir)
    args.started_run_dir = rd.root
    from dpgen.distributed import init_from_env, shutdown
    from dpgen.pipeline import STAGE_FUNCS
    from dpgen.privacy.ledger import PrivacyLedger

    device = args.device
    if args.command == "finetune":
        w, device = init_from_env(device)
    else:
        _single_process_only(args.command)
        w = None
    had_cohort = rd.is_done("sample")
    ok = False
    t0 = time.time()
    try:
        kwargs = {}
        if args.command == "sample":
            kwargs = {"num_images": args.num_images, "seed": args.seed, "name": args.name, "overwrite": args.overwrite}
        result = STAGE_FUNCS[args.command](config, rd, device=device, progress=not args.no_progress, **kwargs)
        result["seconds"] = round(time.time() - t0, 1)
        ok = True
    finally:
        if w is not None and w.distributed:
            shutdown(wait=ok)  # a failed rank must not wait for the others
    if w is None or w.is_main:
        summary = {"run_dir": str(rd.root), "stages": {args.command: result}, "target_epsilon": config.privacy.epsilon}
        ledger = PrivacyLedger(rd.ledger_path)
        summary["privacy"] = ledger.summary(config.privacy.delta).to_dict() if ledger.path.is_file() else None
        _print_summary(summary, args.json)
        if not args.json and args.command == "sample" and Path(result.get("cohort", rd.cohort)) != rd.cohort:
            print(f"note: a new cohort beside the run's own (cohort/cohort.npz, which evaluate, audit and release "
                  f"use); evaluate or audit it with --cohort {shlex.quote(str(Path(result['cohort']) / 'cohort.npz'))}")
        elif not args.json and args.command == "sample" and had_cohort:
            print("note: the run's cohort was replaced (--overwrite); results of an earlier `dpgen evaluate`, "
                  "`dpgen audit` or `dpgen report` describe the previous one: run them again")
    return 0


# name: (module whose `register(subparsers)` adds it, the line `dpgen --help` shows). Imported only
# when the command is run: their packages load torch and more. tests/test_cli.py checks that these
# lines match what the modules register.
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "privacy": ("dpgen.privacy.commands",
                "privacy accounting: calibrate sigma, report a run's ledger, reconstruction bounds, audit"),
    "evaluate": ("dpgen.evaluation.commands",
                 "fidelity (with real-vs-real references) and downstream utility of a cohort"),
    "audit": ("dpgen.probes.commands",
              "privacy probes (memorization, membership inference, reconstruction) on a finished run; "
              "results and figures go to RUN/internal/audit/"),
    "release": ("dpgen.report.commands", "write the shareable bundle of a finished run (and nothing else)"),
    "report": ("dpgen.report.commands", "write the release review: RUN/report/report.html (shareable, + PDF with "
               "chromium) and RUN/internal/review/review.html (internal)"),
    "sweep": ("dpgen.report.commands", "privacy-utility sweep: one public pretraining, one DP fine-tune per epsilon"),
}


def build_parser(command: str | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The `dpgen` parser. `lazy`: register only `command`'s module fully (the other lazy
    commands are listed by name and help line); else every command."""
    parser = Parser(prog="dpgen", description="Differentially private synthetic medical-imaging cohorts.")
    parser.add_argument("--version", action="version", version=f"dpgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="pretrain -> DP finetune -> sample, in one run directory")
    _config_args(p)
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pretrain", help="non-private pretraining on the public data (starts a run directory)")
    _config_args(p)
    _common(p)
    p.set_defaults(func=lambda a: cmd_run(a, stages=("pretrain",)))

    p = sub.add_parser("finetune", help="DP-SGD fine-tuning on the private data (continues an interrupted one)")
    p.add_argument("run_dir")
    _common(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("sample", help="sample a labeled synthetic cohort (a finished run: a new one beside it)")
    p.add_argument("run_dir")
    p.add_argument("--num-images", type=_positive_int, default=None, help="cohort size (default: sample.num_images)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: sample.seed)")
    p.add_argument("--name", default=None,
                   help="write the cohort to RUN/cohort/NAME/ (default for a run that has its cohort: a time stamp)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run's cohort (RUN/cohort/cohort.npz), or with --name that cohort")
    _common(p)
    p.set_defaults(func=cmd_stage)

    wanted = LAZY_COMMANDS[command][0] if command in LAZY_COMMANDS else None
    registered: set[str] = set()
    for name, (module, help_line) in LAZY_COMMANDS.items():
        if name in registered:
            continue
        if lazy and module != wanted:
            sub.add_parser(name, help=help_line, add_help=False)
            registered.add(name)
            continue
        before = set(sub.choices)
        importlib.import_module(module).register(sub)
        registered |= set(sub.choices) - before
    return parser


def _guard_release(args) -> None:
    """`release --overwrite` replaces only a bundle dpgen wrote (never a run's folder, the current
    directory, or a folder holding the run)."""
    if not (getattr(args, "overwrite", False) and getattr(args, "out", None)):
        return
    from dpgen.rundir import RunDirError, overwrite_refusal

    def is_bundle(p: Path) -> bool:  # dpgen.report.release: CHECKSUMS, CARD_JSON
        return (p / "SHA256SUMS").is_file() and (p / "dataset_card.json").is_file()

    why = overwrite_refusal(args.out, kind="release bundle", recognise=is_bundle,
                            protect=[args.run_dir] if args.run_dir else [], flag="OUT")
    if why:
        raise RunDirError(f"--overwrite refused: {why}")


def _guard_privacy_report(args) -> None:
    """A missing ledger is an input error (exit 2), with what to do next."""
    from dpgen.rundir import RunDir, RunDirError, is_run_dir

    rd = RunDir(Path(args.run_dir))
    if rd.ledger_path.is_file():
        return
    if not rd.root.is_dir():
        raise RunDirError(f"{rd.root}: no such run directory")
    if not is_run_dir(rd.root):
        raise RunDirError(f"{rd.root} is not a dpgen run directory (no privacy/ledger.jsonl, no config.yaml)")
    raise RunDirError(f"{rd.root} has no privacy ledger yet: no DP stage has run (continue the run: "
                      f"dpgen finetune {shlex.quote(str(rd.root))})")


GUARDS = {("release", None): _guard_release, ("privacy", "report"): _guard_privacy_report}

# Errors that are the user's input, by (module, class): looked up only if the module was
# imported (an exception cannot be an instance of a class that was never loaded).
_USER_ERRORS = (
    ("dpgen.config", "ConfigError"), ("dpgen.data.dataset", "DataError"), ("dpgen.rundir", "RunDirError"),
    ("dpgen.privacy.engine", "PrivacyError"), ("dpgen.report.release", "ReleaseError"),
    ("dpgen.evaluation.features", "EvaluationError"),
)

_OS_HINTS = {
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write to",
    errno.EPERM: "operation not permitted; choose a location you can write to",
    errno.ENOSPC: "the disk is full; free space or choose another location",
    errno.EDQUOT: "disk quota exceeded; free space or choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
}


def user_error(err: BaseException) -> str | None:
    """The one-line message for an error caused by the user's input or machine, else None (a bug)."""
    for module, name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(err, cls):
            return str(err)
    if isinstance(err, OSError):
        if err.filename is None:
            return str(err)
        hint = _OS_HINTS.get(err.errno or 0)
        where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
        return f"{where}: {err.strerror or err}" + (f" ({hint})" if hint else "")
    return None


def _interrupted(args) -> str:
    """What to type next after Ctrl-C: the real command, on its own line."""
    root = getattr(args, "started_run_dir", None)
    if args.command in ("run", "pretrain") and root is not None:
        from dpgen.rundir import RunDir, is_run_dir

        if is_run_dir(root) and RunDir(root).has_progress():
            return f"dpgen: interrupted. Continue this run with:\n  {args.resume_command}"
        return "dpgen: interrupted before anything was saved; start again with the same command"
    if args.command == "finetune" and root is not None:
        return f"dpgen: interrupted. Continue the fine-tuning with:\n  dpgen finetune {shlex.quote(str(root))}"
    if args.command == "sample" and root is not None:
        return "dpgen: interrupted; no cohort was written. Sample again with the same command"
    if args.command == "sweep":
        where = args.run_dir or "SWEEP_DIR (the sweep directory printed above)"
        return f"dpgen: interrupted. Continue the sweep with the same command and: --resume --run-dir {where}"
    return "dpgen: interrupted"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command is the first word that is not an option (dpgen's own options take no value).
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command, lazy=True)
    # Overrides may come before or after options (`run cfg --run-dir d a.b=1`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    bad_device = _check_device(getattr(args, "device", None))
    if bad_device:
        print(f"dpgen: error: {bad_device} (see `dpgen {args.command} --help`)", file=sys.stderr)
        return 2
    try:
        guard = GUARDS.get((args.command, getattr(args, "privacy_command", None)))
        if guard is not None:
            guard(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("\n" + _interrupted(args), file=sys.stderr)
        return 130
    except Exception as err:
        msg = user_error(err)
        if msg is None or os.environ.get("DPGEN_DEBUG"):
            raise
        print(f"dpgen: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
