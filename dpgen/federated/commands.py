"""`dpgen federated coordinator|site|demo|report`: thin wrappers over dpgen.federated.

Flower is an optional dependency (`pip install -e ".[federated]"`); without it the commands
exist and say how to install it.
"""

from __future__ import annotations

import json

from dpgen.config import ConfigError


def _need_flower() -> None:
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise ConfigError('federated runs need Flower: pip install -e ".[federated]"') from None


def _fail(err: Exception) -> int:
    import sys

    print(f"dpgen: error: {err}", file=sys.stderr)
    return 2


def cmd_coordinator(args) -> int:
    _need_flower()
    from dpgen.federated.coordinator import FederationError, run_coordinator

    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir DIR (the coordinator run to continue)")
    try:
        summary = run_coordinator(args.config, args.run_dir, args.overrides, resume=args.resume,
                                  overwrite=args.overwrite, device=args.device, progress=not args.no_progress,
                                  bind_host=args.bind_host)
    except FederationError as err:
        return _fail(err)
    from dpgen.federated.record import format_guarantees

    print(format_guarantees(summary["sites"]))
    print(f"coordinator run directory: {summary['run_dir']}")
    return 0


def cmd_site(args) -> int:
    _need_flower()
    from dpgen.federated.site import SiteError, run_site

    try:
        facts = run_site(args.config, args.site, args.run_dir, args.overrides, runtime_port=args.runtime_port,
                         device=args.device)
    except SiteError as err:
        return _fail(err)
    print(json.dumps(facts, indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    _need_flower()
    from dpgen.federated.demo import run_demo

    summary = run_demo(args.config, args.run_dir, args.overrides, resume=args.resume, overwrite=args.overwrite,
                       device=args.device)
    return 0 if summary["coordinator_exit"] == 0 else 2


def cmd_report(args) -> int:
    from pathlib import Path

    from dpgen.federated.record import federated_state, format_guarantees, per_site_guarantees

    if not (Path(args.run_dir) / "privacy" / "ledger.jsonl").is_file():
        return _fail(FileNotFoundError(f"{args.run_dir}: no privacy ledger (not a coordinator run directory?)"))
    state = federated_state(args.run_dir)
    if state is None:
        return _fail(ValueError(f"{args.run_dir}: its ledger records no federation (not a coordinator run "
                                f"directory?); `dpgen privacy report` reads an ordinary run's or a site's ledger"))
    rows = per_site_guarantees(args.run_dir)
    if args.json:
        print(json.dumps({"sites": rows, "rounds": [r.round for r in state.rounds],
                          "finished": state.finished is not None, "problems": state.problems()}, indent=2))
    else:
        print(format_guarantees(rows))
        for p in state.problems():
            print(f"  PROBLEM: {p}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("federated", help="federated DP fine-tuning across sites on Flower (extra: federated)",
                       description="Several sites fine-tune one generator with their own DP-SGD and budgets; "
                                   "the coordinator aggregates with Flower (SecAgg+ by default).")
    fsub = p.add_subparsers(dest="federated_command", required=True)

    def common(q, run_dir_required=False):
        q.add_argument("config", help="federation YAML (see configs/federated_breast.yaml)")
        q.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        q.add_argument("--run-dir", required=run_dir_required, help="run directory")
        q.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")

    q = fsub.add_parser("coordinator", help="pretrain on public data, run the rounds (Flower SuperLink + "
                                            "ServerApp), sample the cohort")
    common(q)
    q.add_argument("--resume", action="store_true", help="continue from the last completed round")
    q.add_argument("--overwrite", action="store_true", help="delete --run-dir first")
    q.add_argument("--no-progress", action="store_true")
    q.add_argument("--bind-host", default=None, help="interface the SuperLink listens on (default: the host of "
                                                     "coordinator.address; 0.0.0.0 for all)")
    q.set_defaults(func=cmd_coordinator)

    q = fsub.add_parser("site", help="one site: its DP-SGD rounds on its own data (Flower SuperNode + ClientApp)")
    common(q)
    q.add_argument("--site", required=True, help="the site's name (a key of `sites` in CONFIG)")
    q.add_argument("--runtime-port", type=int, default=None, help="local port of the SuperNode's runtime API "
                                                                   "(default: a free one)")
    q.set_defaults(func=cmd_site)

    q = fsub.add_parser("demo", help="a coordinator and every site of CONFIG as processes on 127.0.0.1")
    common(q, run_dir_required=True)
    q.add_argument("--resume", action="store_true")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_demo)

    q = fsub.add_parser("report", help="the per-site guarantees a coordinator run directory records")
    q.add_argument("run_dir")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_report)
