"""A site (one hospital): its run directory, its Flower ClientApp and its launcher.

`dpgen federated site CONFIG --site NAME` (`run_site`):
1. opens the site's run directory (a restarted site continues it; another config is refused),
2. registers the site's privacy plan in its own ledger, or refuses with the reason (budget too
   small for the planned rounds, batch larger than the data, ...) before connecting anywhere,
3. starts its worker (dpgen.federated.worker: this process, with torch and the data loaded,
   does the site's work) and Flower's SuperNode, which connects to the coordinator's SuperLink
   and runs the ClientApp below for every message, each in a fresh process that only relays
   the request to the worker,
4. waits until the coordinator says the federation is over (or the site refused, or the
   coordinator cannot be reached for `connect_timeout_s`), then stops the SuperNode.

The site's run directory:

    SITE/
      config.yaml           the site's section of the federation file + the coordinator address
      manifest.json         versions, git commit, the private data's fingerprint (never data)
      state.json            what the site is doing (waiting, round r, finished, refused)
      privacy/ledger.jsonl  the site's own ledger (it states N, q, sigma: stays at the site): plan,
                            preflight, progress, per-round entries (fed_round_start /
                            fed_round_done), completion and bound
      checkpoints/          the current round's training state (resume within a round)
      logs/                 Flower's log, TensorBoard
      internal/             never leaves the site: its secret seed (internal/secrets.json, 0600: every
                            Poisson sample, per-row draw and noise of its DP-SGD), the per-step
                            sampled counts, training curves, the updates it sent (internal/rounds/),
                            Flower's home

Messages (all from the coordinator; the ClientApp never initiates anything). What crosses the
wire from the site is exactly this, and none of it depends on the site's number of private
units N (under add/remove neighbours N is secret: no N, sample rate, noise multiplier or exact
epsilon; a site whose relation is replace_one also reports its exact replace-one epsilon):
- `query.status`: may the site take round r of a model with this public schema? Replies
  {site, accept, reason, fatal, rounds_affordable, plan: SitePlanFacts (unit, budget epsilon,
  delta, relation, accountant, rounds, local steps, planned steps, expected batch size, clipping
  norm, noise draws), progress: SiteProgressFacts (steps done / allocated / planned, rounds done,
  within budget yes/no, noisy yes/no, preflight passed yes/no, complete yes/no)}. A refusal's
  reason is the site's own sentence; an unexpected error is sent as its type only.
- `train` (through Flower's `secaggplus_mod`): the four SecAgg+ stages (public keys, encrypted
  key shares, the masked update vector, shares for unmasking); in the third the site runs its
  DP-SGD round (dpgen.federated.local_training) and the mod masks the update. The reply also
  carries num_examples = the site's configured expected batch size (its public FedAvg weight)
  and {site, progress: SiteProgressFacts, replayed, secagg_clipped_entries}. A train message
  without SecAgg+ is refused unless `require_secure_aggregation: false`.
- `query.finish`: the federation is over; the site writes its completion entry, replies its
  final SiteProgressFacts and stops.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dpgen.federated import flower
from dpgen.federated.config import SiteFile, load_site_config

client_app = ClientApp()


# ----------------------------------------------------------------------------- run directory


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_site_dir(root: Path, site_file: SiteFile, site_name: str):
    """Create the site's run directory, or continue it with the same config."""
    from dpgen.federated.local_training import SiteRun
    from dpgen.rundir import RunDir, RunDirError, _git_commit, versions, write_json_atomic, write_text_atomic

    rd = RunDir(Path(root).resolve())
    new = {"site_name": site_name, **site_file.to_dict()}
    if rd.config_path.is_file():
        old = yaml.safe_load(rd.config_path.read_text())
        if old != new:
            diff = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
            raise RunDirError(f"{rd.root} holds site {old.get('site_name')!r} with another config ({', '.join(diff)}); "
                              f"a site's privacy plan cannot change: use another --run-dir")
    else:
        if rd.root.exists() and any(rd.root.iterdir()):
            raise RunDirError(f"{rd.root} exists and is not a dpgen site run directory")
        rd.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(rd.config_path, yaml.safe_dump(new, sort_keys=False))
    manifest = rd.read_json(rd.manifest_path) or {"created": _now()}
    manifest.update(updated=_now(), role="federated site", site=site_name, versions=versions(),
                    git_commit=_git_commit(), argv=sys.argv)
    write_json_atomic(rd.manifest_path, manifest)
    return SiteRun(site_name, site_file, rd.root)


def open_site_run(root: str | Path):
    """The SiteRun of an existing site directory (what every ClientApp process does)."""
    from dpgen.federated.local_training import SiteRun
    from dpgen.rundir import RunDirError

    root = Path(root)
    path = root / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{root} is not a dpgen site run directory (no config.yaml)")
    raw = yaml.safe_load(path.read_text())
    name = raw.pop("site_name")
    return SiteRun(name, SiteFile.model_validate(raw), root)


def site_state(root: Path) -> dict:
    try:
        return json.loads((Path(root) / "state.json").read_text()).get("federated_site", {})
    except (OSError, ValueError):
        return {}


def set_site_state(site, status: str, **info) -> None:
    from dpgen.rundir import write_json_atomic

    path = site.root / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        state = {"completed": {}}
    state["federated_site"] = {"status": status, "time": _now(), **info}
    write_json_atomic(path, state)


# ----------------------------------------------------------------------------- the site's work


class SiteService:
    """What the site does for each request, in the long-lived site process (dpgen's DP-SGD
    through dpgen.federated.local_training). The ClientApp processes relay to it."""

    def __init__(self, site, device: str = "cpu"):
        self.site = site
        self.device = device

    def __call__(self, op: str, req: dict, arrays: dict | None) -> tuple[dict, dict | None]:
        """Handle one request. An error goes back to the coordinator as the site's own refusal
        sentence, or else as its type only: its message may name private paths or figures (an
        exact epsilon, a data size), so it is printed here, in the site's log."""
        from dpgen.federated import local_training as lt

        if os.environ.get("DPGEN_FED_DEBUG"):
            print(f"[dpgen site {self.site.name}] {time.strftime('%H:%M:%S')} request {op}", flush=True)
        try:
            return self._handle(op, req, arrays)
        except lt.SiteRefusal:
            raise
        except Exception as err:  # noqa: BLE001
            print(f"[dpgen site {self.site.name}] '{op}' failed: {type(err).__name__}: {err}", flush=True)
            raise RuntimeError(f"site {self.site.name}: '{op}' failed ({type(err).__name__}; see the site's "
                               f"log)") from None

    def _handle(self, op: str, req: dict, arrays: dict | None) -> tuple[dict, dict | None]:
        from dpgen.federated import arrays as warrays
        from dpgen.federated import local_training as lt

        site = self.site
        if op == "status":
            st = lt.site_status(site, req["schema"], int(req["round"]))
            if st["accept"] and not req.get("secure_aggregation", True) and site.config.require_secure_aggregation:
                st.update(accept=False, fatal=True,
                          reason=f"site {site.name}: the coordinator runs without secure aggregation and "
                                 f"sites.{site.name}.require_secure_aggregation is true")
            if not st["accept"] and st["fatal"]:
                set_site_state(site, "refused", reason=st["reason"])
            elif st["accept"] and site_state(site.root).get("status") == "starting":
                set_site_state(site, "connected", federation=req.get("federation"))
            return st, None
        if op == "train":
            gm = lt.GlobalModel.from_vector(req["schema"], (arrays or {})["global"])
            round_index = int(req["round"])
            if gm.fingerprint != req["global_sha256"]:
                raise ValueError(f"site {site.name}: the global weights of round {round_index} arrived corrupted")
            set_site_state(site, "training", round=round_index)
            result = lt.local_round(site, gm, round_index, device=self.device)
            set_site_state(site, "waiting", last_round=round_index)
            reply = {"site": site.name, "progress": result.facts.model_dump(mode="json"), "replayed": result.replayed}
            return reply, {"update": warrays.flatten(result.update, gm.train_names)}
        if op == "finish":
            facts = lt.finish_site(site, req.get("reason", "the federation finished")).model_dump(mode="json")
            set_site_state(site, "finished", reason=req.get("reason"), facts=facts)
            return facts, None
        raise ValueError(f"unknown request {op!r}")


# ----------------------------------------------------------------------------- the ClientApp


def _site_root(context: Context) -> str:
    run_dir = context.node_config.get(flower.NODE_RUN_DIR)
    if not run_dir:
        raise RuntimeError(f"this SuperNode was started without --node-config {flower.NODE_RUN_DIR}=...; "
                           f"start sites with `dpgen federated site`")
    return str(run_dir)


def _reply(msg: Message, payload: dict) -> Message:
    return Message(RecordDict({flower.RECORD: ConfigRecord({"json": json.dumps(payload, default=str)})}), reply_to=msg)


def _payload(msg: Message) -> dict:
    return json.loads(msg.content.config_records[flower.RECORD]["json"])


@client_app.query("status")
def status(msg: Message, context: Context) -> Message:
    from dpgen.federated import worker

    reply, _ = worker.call(_site_root(context), "status", _payload(msg))
    return _reply(msg, reply)


@client_app.query("finish")
def finish(msg: Message, context: Context) -> Message:
    from dpgen.federated import worker

    reply, _ = worker.call(_site_root(context), "finish", _payload(msg))
    return _reply(msg, reply)


def _secure_aggregation_gate(msg: Message, context: Context, call_next) -> Message:
    """Train messages go through Flower's secaggplus_mod; without SecAgg+ they are refused
    unless the site allows it (then the coordinator sees this site's update in the clear)."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    site = open_site_run(_site_root(context))
    if site.config.require_secure_aggregation:
        raise PermissionError(f"site {site.name}: refusing a training round without secure aggregation "
                              f"(sites.{site.name}.require_secure_aggregation is true)")
    return call_next(msg, context)


def _secagg_scale(context: Context) -> tuple[float, float] | None:
    """(clipping_range, max_weight) of the SecAgg+ round in progress, if any."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    st = context.state.config_records.get(RECORD_KEY_STATE)
    if st is None or "clipping_range" not in st:
        return None
    return float(st["clipping_range"]), float(st["max_weight"])


@client_app.train(mods=[_secure_aggregation_gate])
def train(msg: Message, context: Context) -> Message:
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from dpgen.federated import worker

    root = _site_root(context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    cfg = fitins.config
    schema = json.loads(str(cfg["dpgen.schema"]))
    (vector,) = parameters_to_ndarrays(fitins.parameters)  # the global weights as one vector
    reply, update = worker.call(root, "train", {"schema": schema, "round": int(cfg["dpgen.round"]),
                                                "global_sha256": str(cfg["dpgen.global_sha256"])}, {"global": vector})
    arrs = [update["update"]]  # this site's update as one vector (train_names order)
    scale = _secagg_scale(context)
    if scale is not None:
        # SecAgg+ clips every entry of (weight / max_weight) * update to [-r, r]: report how
        # many entries of this update that cut (a function of the DP update only).
        r, max_weight = scale
        w = _batch_size(root)
        reply["secagg_clipped_entries"] = int(sum(int((np.abs(u) * (w / max_weight) > r).sum()) for u in arrs))
    # Everything this site sends the coordinator in a round: the (masked) update vector, its
    # public FedAvg weight (num_examples = its configured expected batch size) and `reply`:
    # its name, SiteProgressFacts (steps and yes/no facts, no N, q, sigma or add/remove epsilon),
    # whether it replayed a computed update, and the SecAgg+ clipped-entry count.
    fitres = FitRes(status=Status(code=Code.OK, message="ok"), parameters=ndarrays_to_parameters(arrs),
                    num_examples=_batch_size(root),
                    metrics={"dpgen.site": str(reply.get("site")), "dpgen.facts": json.dumps(reply, default=str)})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _batch_size(root: str) -> int:
    """The site's public FedAvg weight: its configured expected batch size."""
    return int(open_site_run(root).config.finetune.batch_size)


# ----------------------------------------------------------------------------- the launcher


REPLY_GRACE_S = 10.0  # after its last reply (finish, or a refusal) the site stays connected this long


class SiteError(RuntimeError):
    """The site stopped without finishing: refused, or the coordinator unreachable."""


def run_site(config_path: str | Path, site_name: str, run_dir: str | Path | None = None,
             overrides: list[str] | None = None, *, runtime_port: int | None = None, device: str = "cpu",
             poll_s: float = 1.0, log=print) -> dict:
    """Run one site until the federation is over. Returns the site's final privacy facts."""
    from dpgen.federated import local_training as lt
    from dpgen.federated.worker import WorkerServer

    site_file = load_site_config(config_path, site_name, overrides)
    root = Path(run_dir) if run_dir else Path("runs") / f"{site_file.name}-site-{site_name}"
    site = open_site_dir(root, site_file, site_name)
    if site_state(site.root).get("status") == "finished":
        log(f"site {site_name}: already finished ({site.root}); nothing to do")
        return lt.progress_facts(site).model_dump(mode="json")
    ds = lt.load_site_data(site)
    site.rd.record_datasets({f"private/{ds.split}": ds.info()})
    try:
        plan = lt.plan_site(site)
    except lt.SiteRefusal as err:
        set_site_state(site, "refused", reason=str(err))
        raise SiteError(str(err)) from None
    f = plan.facts
    log(f"site {site_name}: plan epsilon {f.target_epsilon:g} (delta {f.delta:g}, {f.unit}, "
        f"{f.neighbouring.replace('_', '/')} neighbours) over {f.rounds} round(s) x {f.local_steps} DP-SGD steps, "
        f"expected batch {f.expected_batch_size}; run directory {site.root}")
    set_site_state(site, "starting", coordinator=site_file.address)
    lt.limit_threads()
    server = WorkerServer(site.root, SiteService(site, device)).start()

    home = site.rd.internal / "flower"
    env = flower.flower_env(home)
    port = runtime_port or flower.free_port()
    cmd = [flower.executable("flower-supernode"), "--insecure", "--superlink", site_file.address,
           "--port", str(port), "--max-wait-time", str(site.config.connect_timeout_s),
           "--node-config", f'{flower.NODE_SITE}="{site_name}" {flower.NODE_RUN_DIR}="{site.root}"']
    log_path = site.rd.logs / "flower_supernode.log"
    proc = flower.start(cmd, env, log_path)
    log(f"site {site_name}: Flower SuperNode (pid {proc.pid}) connecting to {site_file.address}; log {log_path}")

    def _stop(signum, _frame):
        flower.stop(proc)
        raise KeyboardInterrupt

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    ended_at = None
    try:
        while True:
            st = site_state(site.root)
            if st.get("status") in ("finished", "refused"):
                # The state is set while the reply (final facts, or the refusal the coordinator
                # records) is on its way: keep the SuperNode up a little so that it is delivered.
                ended_at = ended_at or time.time()
                if time.time() - ended_at > REPLY_GRACE_S:
                    if st["status"] == "finished":
                        log(f"site {site_name}: federation finished; stopping")
                        return lt.progress_facts(site).model_dump(mode="json")
                    raise SiteError(st.get("reason") or f"site {site_name} refused to take part")
            rc = proc.poll()
            if rc is not None:
                tail = flower.log_tail(log_path)
                if "connect" in tail.lower() or "connection" in tail.lower():
                    raise SiteError(f"site {site_name}: the coordinator at {site_file.address} could not be reached "
                                    f"for {site.config.connect_timeout_s:g} s (Flower SuperNode exited with code {rc}); "
                                    f"start the coordinator or check coordinator.address. Last log lines:\n{tail}")
                raise SiteError(f"site {site_name}: Flower SuperNode exited with code {rc}. Last log lines:\n{tail}")
            time.sleep(poll_s)
    finally:
        flower.stop(proc)
        server.close()
        for s, h in old.items():
            signal.signal(s, h)
