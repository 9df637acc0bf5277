"""`dpgen federated demo CONFIG --run-dir DIR`: a coordinator and every site of CONFIG as
separate processes on this machine (127.0.0.1), exactly as on separate machines, only closer.

    DIR/                   the coordinator's run directory (global checkpoints, ledger with the
                           sites' reported facts, cohort/)
    DIR/federation.yaml    the coordinator's config (no site's section; the port chosen here)
    DIR/sites/NAME.yaml    each site's own file: the coordinator's address and its section
    DIR/sites/NAME/        each site's own run directory (its ledger, secrets, updates)
    DIR/logs/demo_*.log    each process's output (demo_site_NAME.log belongs to that site)

DIR/sites/ belongs to the sites: the coordinator reads nothing there, and `dpgen release DIR`
lists it as one left-out folder without reading it.

Each process is in its own process group (a test can kill one site, all of it). A site that
refuses to take part (budget too small, another image size) stops with its reason and the
federation goes on if `coordinator.min_sites` sites remain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dpgen.federated import flower, record
from dpgen.federated.config import federation_from_dict, load_federation


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dpgen.cli", "federated", *args]


def start_process(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab", buffering=0)
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env or os.environ.copy(), start_new_session=True)


def stop_group(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def prepare(config_path: str | Path, run_dir: str | Path, overrides: list[str] | None = None, *,
            resume: bool = False, overwrite: bool = False) -> tuple[Path, object]:
    """Create DIR (the coordinator's run directory), DIR/federation.yaml (the coordinator's part,
    with a free port) and DIR/sites/NAME.yaml (each site's own file: the address and its section),
    as on separate machines: the coordinator's files hold no site's section."""
    from dpgen.rundir import RunDir

    root = Path(run_dir).resolve()
    fed_file = root / "federation.yaml"
    fed = load_federation(config_path, overrides)
    if resume and fed_file.is_file():
        # keep the address the sites of this demo already know
        fed.coordinator.address = federation_from_dict(yaml.safe_load(fed_file.read_text())).coordinator.address
    else:
        fed.coordinator.address = f"127.0.0.1:{flower.free_port()}"
    RunDir.create(root, fed.coordinator_part(), resume=resume, overwrite=overwrite)
    fed_file.write_text(yaml.safe_dump(fed.coordinator_part().to_dict(), sort_keys=False))
    (root / "sites").mkdir(exist_ok=True)
    for name in fed.sites:
        (root / "sites" / f"{name}.yaml").write_text(yaml.safe_dump(fed.site_file(name), sort_keys=False))
    return root, fed


def run_demo(config_path: str | Path, run_dir: str | Path, overrides: list[str] | None = None, *,
             resume: bool = False, overwrite: bool = False, device: str = "cpu", log=print,
             timeout_s: float | None = None) -> dict:
    root, fed = prepare(config_path, run_dir, overrides, resume=resume, overwrite=overwrite)
    fed_file = root / "federation.yaml"
    env = os.environ.copy()
    env.setdefault("DPGEN_THREADS", "1")
    coord_log = root / "logs" / "demo_coordinator.log"
    coord = start_process(_cli("coordinator", str(fed_file), "--run-dir", str(root), "--resume", "--device", device,
                               "--no-progress"), coord_log, env)
    log(f"demo: coordinator (pid {coord.pid}) on {fed.coordinator.address}, run directory {root}")
    sites = {}
    for name in fed.sites:
        sites[name] = start_process(
            _cli("site", str(root / "sites" / f"{name}.yaml"), "--site", name, "--run-dir", str(root / "sites" / name),
                 "--device", device),
            root / "logs" / f"demo_site_{name}.log", env)
        log(f"demo: site {name} (pid {sites[name].pid}), run directory {root / 'sites' / name}")

    def _stop(signum, _frame):
        for p in [coord, *sites.values()]:
            stop_group(p)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.time()
    shown = 0

    def echo() -> None:  # the coordinator's progress lines, as they come
        nonlocal shown
        try:
            lines = coord_log.read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in lines[shown:]:
            if line.startswith(("coordinator:", "[dpgen coordinator]")) and "debug:" not in line:
                log(line)
        shown = len(lines)

    try:
        while coord.poll() is None:
            if timeout_s is not None and time.time() - t0 > timeout_s:
                raise TimeoutError(f"demo: still running after {timeout_s:g} s")
            echo()
            time.sleep(1.0)
        echo()
        # the sites stop on the coordinator's finish message; after a failure they would wait
        end = time.time() + (60 if coord.returncode == 0 else 5)
        while any(p.poll() is None for p in sites.values()) and time.time() < end:
            time.sleep(0.5)
    finally:
        for p in [coord, *sites.values()]:
            stop_group(p)
        for s, h in old.items():
            signal.signal(s, h)

    summary = {"run_dir": str(root), "coordinator_exit": coord.returncode,
               "sites_exit": {n: p.returncode for n, p in sites.items()}}
    for name, p in sites.items():
        if p.returncode:
            log(f"demo: site {name} stopped with code {p.returncode}: "
                f"{flower.log_tail(root / 'logs' / f'demo_site_{name}.log', 3)}")
    if coord.returncode:
        log(f"demo: the coordinator stopped with code {coord.returncode}:\n"
            f"{flower.log_tail(root / 'logs' / 'demo_coordinator.log', 12)}")
    summary["sites"] = record.per_site_guarantees(root)
    log(record.format_guarantees(summary["sites"]))
    return summary
