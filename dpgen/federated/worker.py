"""The site's warm worker: requests from Flower's per-message ClientApp processes to the
long-lived `dpgen federated site` process.

Flower runs a ClientApp in a fresh process for every message (four per SecAgg+ round).
Importing torch, MONAI and Opacus in each costs seconds to tens of seconds on a busy
machine, so the site's work (planning, DP-SGD rounds, completion) happens in the site
launcher, which keeps them loaded; the ClientApp only relays. The channel is a loopback TCP
connection authenticated with a random key (multiprocessing.connection's HMAC challenge)
kept in the site's internal/worker.json; messages are a JSON header and a safetensors blob,
never pickles.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Callable

import numpy as np

WORKER_FILE = Path("internal") / "worker.json"
Handler = Callable[[str, dict, dict | None], tuple[dict, dict | None]]


class WorkerError(RuntimeError):
    """The site's worker refused or failed a request (the message says why)."""


def _pack(header: dict, arrays: dict | None) -> tuple[bytes, bytes]:
    from safetensors.numpy import save

    blob = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}) if arrays else b""
    return json.dumps(header, default=str).encode(), blob


def _unpack(head: bytes, blob: bytes) -> tuple[dict, dict | None]:
    from safetensors.numpy import load

    return json.loads(head.decode()), (dict(load(blob)) if blob else None)


class WorkerServer:
    """Serves one request at a time (Flower hands a SuperNode one message at a time)."""

    def __init__(self, site_root: Path, handler: Handler):
        self.path = Path(site_root) / WORKER_FILE
        self.handler = handler
        key = secrets.token_bytes(32)
        self.listener = Listener(("127.0.0.1", 0), authkey=key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"port": self.listener.address[1], "authkey": key.hex(), "pid": os.getpid()}, f)
        self._thread = threading.Thread(target=self._serve, name="dpgen-site-worker", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> "WorkerServer":
        self._thread.start()
        return self

    def _serve(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:  # closed
                return
            except Exception:  # noqa: BLE001 - a failed handshake (wrong key): ignore that caller
                continue
            with conn:
                try:
                    op_header, blob = conn.recv_bytes(), conn.recv_bytes()
                    header, arrays = _unpack(op_header, blob)
                    op = header.pop("op")
                    try:
                        reply, out = self.handler(op, header, arrays)
                        conn.send_bytes(_pack({"ok": True, **reply}, None)[0])
                        conn.send_bytes(_pack({}, out)[1])
                    except Exception as err:  # noqa: BLE001 - the reason goes back to the coordinator
                        conn.send_bytes(_pack({"ok": False, "error": str(err), "type": type(err).__name__}, None)[0])
                        conn.send_bytes(b"")
                except (EOFError, OSError):
                    continue

    def close(self) -> None:
        try:
            self.listener.close()
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass


def call(site_root: str | Path, op: str, header: dict, arrays: dict | None = None) -> tuple[dict, dict | None]:
    """Send a request to the site's worker and wait for its answer (however long training takes)."""
    path = Path(site_root) / WORKER_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        raise WorkerError(f"no dpgen site worker for {site_root} (start the site with `dpgen federated site`)") from None
    try:
        conn = Client(("127.0.0.1", int(info["port"])), authkey=bytes.fromhex(info["authkey"]))
    except OSError as err:
        raise WorkerError(f"the dpgen site worker of {site_root} is not running ({err})") from None
    with conn:
        head, blob = _pack({"op": op, **header}, arrays)
        conn.send_bytes(head)
        conn.send_bytes(blob)
        try:
            reply, _ = _unpack(conn.recv_bytes(), b"")
            _, out = _unpack(b"{}", conn.recv_bytes())
        except EOFError:
            raise WorkerError(f"the dpgen site worker of {site_root} stopped during '{op}'") from None
    if not reply.pop("ok"):
        raise WorkerError(reply["error"])
    return reply, out
