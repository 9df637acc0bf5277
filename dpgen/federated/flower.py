"""Starting Flower's own processes (SuperLink, SuperNode, `flwr run`) and the Flower App.

dpgen does not implement a protocol: the coordinator is Flower's SuperLink plus a ServerApp,
a site is Flower's SuperNode plus a ClientApp, and a run is submitted with Flower's `flwr run`.
This module only builds their command lines and environment:

- FLWR_HOME per process tree, inside the run directory's internal/flower/ (Flower keeps its
  CLI config, installed apps and state there, never in ~/.flwr);
- telemetry and update checks off (FLWR_TELEMETRY_ENABLED=0, FLWR_DISABLE_UPDATE_CHECK=1):
  hospitals' machines should not call home, and the machines may be offline;
- runtime dependency installation off: the apps import the dpgen installed at each site;
- the SuperExec's task poll at 0.2 s instead of 1 s (FLWR_SUPEREXEC_TASK_POLL_INTERVAL);
- the venv's bin/ first on PATH (Flower starts `flower-superexec` by name);
- on Linux the Flower process gets SIGTERM when the dpgen launcher dies (no orphans).

The Flower App (FAB) that `flwr run` ships is two shim modules written next to a
pyproject.toml: `server.py` imports dpgen.federated.coordinator's ServerApp and `client.py`
imports dpgen.federated.site's ClientApp. The code that runs is the dpgen installed at each
site; the shim is what travels (see README: trust assumptions).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

NODE_SITE = "dpgen-site"
NODE_RUN_DIR = "dpgen-run-dir"
RUN_CONFIG_RUN_DIR = "dpgen-run-dir"
RECORD = "dpgen"  # the ConfigRecord dpgen's own messages use
APP_NAME = "dpgen-federated"

_PYPROJECT = """\
# Written by dpgen: the Flower App `flwr run` submits. The code that runs is dpgen's
# (dpgen.federated.coordinator / dpgen.federated.site), imported from each machine's install.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "{version}"
description = "dpgen federated DP fine-tuning (shim)"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "dpgen"

[tool.flwr.app.components]
serverapp = "dpgen_federated_app.server:app"
clientapp = "dpgen_federated_app.client:app"

[tool.flwr.app.config]
{run_dir_key} = ""
"""

# `app = ...` as an assignment: `flwr run` checks the attribute by reading the module's AST.
_SERVER = '"""dpgen coordinator (ServerApp): the code is dpgen.federated.coordinator."""\n' \
          "from dpgen.federated import coordinator\n\napp = coordinator.server_app\n"
_CLIENT = '"""dpgen site (ClientApp): the code is dpgen.federated.site."""\n' \
          "from dpgen.federated import site\n\napp = site.client_app\n"


def write_app(directory: Path) -> Path:
    """The Flower App directory `flwr run` builds its FAB from."""
    from dpgen import __version__

    pkg = directory / "dpgen_federated_app"
    pkg.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(
        _PYPROJECT.format(name=APP_NAME, version=__version__, run_dir_key=RUN_CONFIG_RUN_DIR))
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text(_SERVER)
    (pkg / "client.py").write_text(_CLIENT)
    return directory


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Every Flower process and the apps it starts use one thread unless told otherwise.
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, env.get("DPGEN_THREADS", "1"))
    pythonpath = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    here = str(Path(__file__).resolve().parents[2])  # the dpgen checkout this code runs from
    if (Path(here) / "dpgen").is_dir() and here not in pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([here, *pythonpath])
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


def executable(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        from dpgen.config import ConfigError

        raise ConfigError(f"`{name}` not found: install Flower with `pip install -e \".[federated]\"`")
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def die_with_parent_kwargs() -> dict:
    return {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}


def start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab", buffering=0)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            **die_with_parent_kwargs())


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM (Flower's processes then leave the federation cleanly), SIGKILL if it hangs."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(address: str, timeout: float = 0.5) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    import re

    try:
        text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace")).splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])
