"""The coordinator: public pretraining, the federated rounds (a Flower ServerApp), sampling.

`dpgen federated coordinator CONFIG --run-dir DIR` (`run_coordinator`):
1. creates (or with --resume continues) the coordinator's run directory,
2. pretrains the generator on the public data (no privacy cost),
3. starts Flower's SuperLink on `coordinator.address` and submits the run with `flwr run`;
   the ServerApp (`server_app` below, in a process the SuperLink starts) runs the rounds,
4. samples the cohort from the final global model.

One round of the ServerApp (`Coordinator.round`):
- waits until `min_sites` sites are connected, asks every new site whether it takes the round
  (`query.status`: public plan facts, its image shape checked against the model's);
- runs Flower's SecAggPlusWorkflow (or, with secure aggregation off, the plain fit workflow)
  with a FedAvg strategy that sends the global weights to the accepting sites and weights
  their updates by their configured expected batch sizes (public), never by data counts;
  with SecAgg+ the coordinator receives masked vectors and unmasks only the weighted sum;
- if at least `min_sites` updates were aggregated: global += weighted mean update, checkpoint,
  ledger entries (each contributing site's reported progress, the round), state; otherwise
  the round is recorded as failed and retried (`round_retries`) with the sites still there.
  A site that drops out mid-round leaves the round to the others if SecAgg+ can still unmask
  (every remaining site keeps `reconstruction_threshold` live neighbours) and at least
  `min_sites` updates came in; else the round is retried when sites are back.
- at the end every site is told the federation is over (`query.finish`): each writes its
  completion entry, and its final facts go to the coordinator's ledger.

Resume: rounds are committed by the `fed_round` ledger entry after their checkpoint; a
restarted coordinator (--resume) continues from the last committed round's checkpoint. Sites
continue from their own ledgers (a round retried from the same global weights is replayed
from the site's saved update or its checkpoint, at no new privacy cost).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import timeit
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from dpgen.federated import arrays, flower, record
from dpgen.privacy import schema
from dpgen.federated.config import FederationConfig, federation_from_dict, load_federation

server_app = ServerApp()
FEDERATED_FINETUNE = "dp_sgd:federated_finetune"  # = dpgen.privacy.mechanisms.FEDERATED_FINETUNE
AUDIT_ENV = "DPGEN_FED_AUDIT_RECEIVED"  # keep a copy of every message the ServerApp receives
POLL_S = 0.25


class FederationError(RuntimeError):
    """The federation could not go on (too few sites, rounds failing, ...)."""


def _log(msg: str) -> None:
    print(f"[dpgen coordinator] {time.strftime('%H:%M:%S')} {msg}", flush=True)


# ----------------------------------------------------------------------------- Flower pieces


class AuditingGrid(Grid):
    """Flower's Grid with a shorter reply poll (Flower's own sleeps 3 s between pulls) and,
    with DPGEN_FED_AUDIT_RECEIVED=1, a copy of everything the ServerApp receives in
    internal/received/ (for checking that with SecAgg+ no individual update arrives)."""

    def __init__(self, grid: Grid, audit_dir: Path | None):
        self._grid = grid
        self._audit_dir = audit_dir
        self._count = 0
        self._lock = threading.Lock()
        self.stages: list[tuple[str, list[int], list[int]]] = []  # (type, sent to, answered without error)

    # delegation of Grid's abstract interface
    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs):
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        msgs = list(self._grid.pull_messages(message_ids))
        for m in msgs:
            self._audit(m)
        return msgs

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        t0 = time.time()
        ids = set(self.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        out: list[Message] = []
        while ids and (end is None or time.time() < end):
            got = list(self.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if ids:
                time.sleep(POLL_S)
        kinds = {m.metadata.message_type for m in messages}
        self.stages.append(("/".join(sorted(kinds)), [m.metadata.dst_node_id for m in messages],
                            [m.metadata.src_node_id for m in out if not m.has_error()]))
        if os.environ.get("DPGEN_FED_DEBUG"):
            _log(f"debug: {len(messages)} {'/'.join(sorted(kinds))} message(s): {len(out)} replies in "
                 f"{time.time() - t0:.1f} s")
        return out

    def _audit(self, msg: Message) -> None:
        if self._audit_dir is None:
            return
        from flwr.common import bytes_to_ndarray

        with self._lock:
            self._count += 1
            n = self._count
        out: dict[str, np.ndarray] = {}
        meta = {"src_node_id": msg.metadata.src_node_id, "message_type": msg.metadata.message_type,
                "group_id": msg.metadata.group_id, "error": str(msg.error) if msg.has_error() else None,
                "arrays": [], "config": {}}
        if msg.has_content():
            for rname, rec in msg.content.array_records.items():
                for key, arr in rec.items():
                    out[f"array/{rname}/{key}"] = arr.numpy()
                    meta["arrays"].append(f"{rname}/{key}")
            for rname, rec in msg.content.config_records.items():
                for key, val in rec.items():
                    vals = val if isinstance(val, list) else [val]
                    meta["config"][f"{rname}/{key}"] = type(val).__name__
                    for i, v in enumerate(vals):
                        if isinstance(v, bytes):
                            try:
                                out[f"bytes/{rname}/{key}/{i}"] = bytes_to_ndarray(v)
                            except Exception:  # noqa: BLE001 - keys, ciphertexts: not arrays
                                pass
        self._audit_dir.mkdir(parents=True, exist_ok=True)
        np.savez(self._audit_dir / f"{n:05d}.npz", **out)
        (self._audit_dir / f"{n:05d}.json").write_text(json.dumps(meta, default=str))


def _strategy_class():
    from flwr.common import FitIns, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    class SiteFedAvg(FedAvg):
        """FedAvg over the accepting sites of this round, weighted by num_examples = each site's
        configured expected batch size (public); never samples, never evaluates."""

        def __init__(self):
            super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1, min_evaluate_clients=0,
                             min_available_clients=1, accept_failures=True)
            self.selected: set[int] = set()
            self.fit_config: dict = {}
            self.outcome = None

        def configure_fit(self, server_round, parameters, client_manager):
            proxies = [p for p in client_manager.all().values() if p.node_id in self.selected]
            return [(p, FitIns(parameters, dict(self.fit_config))) for p in proxies]

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_fit(self, server_round, results, failures):
            self.outcome = {"results": [(p.node_id, r.num_examples, dict(r.metrics)) for p, r in results],
                            "failures": [str(f if isinstance(f, BaseException) else f[1].status.message)
                                         for f in failures], "delta": None}
            if not results:
                return None, {}
            params, _ = super().aggregate_fit(server_round, results, [])
            if params is not None:
                self.outcome["delta"] = parameters_to_ndarrays(params)
            return params, {}

    return SiteFedAvg


# ----------------------------------------------------------------------------- the ServerApp


class Coordinator:
    def __init__(self, run_dir: Path, grid: Grid, context: Context):
        from dpgen.federated import local_training as lt
        from dpgen.rundir import RunDir

        self.rd = RunDir(Path(run_dir))
        self.fed: FederationConfig = federation_from_dict(yaml.safe_load(self.rd.config_path.read_text()))
        self.ledger = lt.ledger(self.rd.root)
        audit = self.rd.internal / "received" if os.environ.get(AUDIT_ENV) == "1" else None
        self.grid = AuditingGrid(grid, audit)
        self.context = context
        self.node_site: dict[int, str] = {}  # node id -> site name (from its status reply)
        self.node_status: dict[int, dict] = {}
        self.excluded: dict[int, str] = {}  # node id -> why it takes no more rounds
        self.plans: dict[str, dict] = {e["site"]: e["plan"] for e in self._entries("fed_site_plan")}
        self.done_sites: set[str] = set()  # sites that take no more rounds (plan used up, or refused)

    # ---- ledger / state
    def _entries(self, kind: str) -> list[dict]:
        return [e for e in self.ledger.entries() if e.get("kind") == kind]

    def _append(self, entry) -> None:
        self.ledger.append(entry.entry() if hasattr(entry, "entry") else entry)

    def _set_state(self, **info) -> None:
        from dpgen.rundir import write_json_atomic

        st = self.rd.state()
        st.setdefault("federated", {}).update(info)
        write_json_atomic(self.rd.state_path, st)

    def committed_rounds(self) -> list[dict]:
        return [e for e in self._entries("fed_round") if (self.rd.root / e["checkpoint"]).is_file()]

    def load_model(self):
        from dpgen.federated import local_training as lt

        done = self.committed_rounds()
        path = self.rd.root / done[-1]["checkpoint"] if done else self.rd.pretrain_weights
        return lt.load_global(path, self.fed), (done[-1]["round"] if done else 0)

    # ---- sites
    def _send(self, node_ids: list[int], message_type: str, payload: dict, round_index: int,
              timeout: float | None) -> list[Message]:
        msgs = [Message(content=RecordDict({flower.RECORD: ConfigRecord({"json": json.dumps(payload)})}),
                        dst_node_id=nid, message_type=message_type, group_id=str(round_index)) for nid in node_ids]
        return list(self.grid.send_and_receive(msgs, timeout=timeout))

    def _query_new(self, nodes: list[int], gm, round_index: int) -> None:
        new = [n for n in nodes if n not in self.node_status and n not in self.excluded]
        if not new:
            return
        payload = {"schema": gm.schema(), "round": round_index, "federation": self.fed.name,
                   "secure_aggregation": self.fed.coordinator.secure_aggregation.enabled}
        replies = {m.metadata.src_node_id: m for m in self._send(new, "query.status", payload, round_index, 120.0)}
        for nid in new:
            m = replies.get(nid)
            if m is None or m.has_error():
                why = "no reply to the status query" if m is None else f"error: {m.error.reason}"
                _log(f"node {nid}: {why}; not a dpgen site or not ready, asking again next round")
                continue
            st = json.loads(m.content.config_records[flower.RECORD]["json"])
            name = st["site"]
            for other, oname in list(self.node_site.items()):
                if oname == name and other != nid:  # the site restarted: its old node is gone
                    self.excluded[other] = f"site {name} reconnected as node {nid}"
            self.node_site[nid] = name
            self.node_status[nid] = st
            self._check_plan(name, st["plan"], round_index, nid)
            if not st["accept"]:
                self.excluded[nid] = st["reason"]
                self.done_sites.add(name)  # budget used up, or it can never join (fatal)
                self._append(schema.FedSiteRefusedEntry(site=name, round=round_index, reason=st["reason"],
                                                   fatal=bool(st.get("fatal"))))
                _log(f"site {name} does not take round {round_index}: {st['reason']}")

    def _check_plan(self, name: str, plan: dict, round_index: int, nid: int) -> None:
        facts = schema.SitePlanFacts.model_validate(plan)
        if name not in self.plans:
            self.plans[name] = facts.model_dump(mode="json")
            self._append(schema.FedSitePlanEntry(site=name, first_round=round_index, plan=facts))
            _log(f"site {name} joined: epsilon {facts.target_epsilon:g}, delta {facts.delta:g}, {facts.unit}, "
                 f"{facts.rounds} round(s) x {facts.local_steps} steps, expected batch {facts.expected_batch_size}")
            return
        old = schema.SitePlanFacts.model_validate(self.plans[name]).model_dump(mode="json")
        if old != facts.model_dump(mode="json"):
            reason = (f"site {name} reports another plan than when it joined ({old} -> {facts.model_dump()}); a "
                      f"site's plan cannot change: it is refused")
            self.excluded[nid] = reason
            self.done_sites.add(name)
            self._append(schema.FedSiteRefusedEntry(site=name, round=round_index, reason=reason, fatal=True))
            _log(reason)

    def _can_take(self, nid: int) -> bool:
        st = self.node_status.get(nid)
        if st is None or nid in self.excluded:
            return False
        prog = st.get("progress", {})
        left = int(prog.get("planned_steps", 0)) - int(prog.get("steps_allocated", 0))
        return left >= int(st["plan"]["local_steps"])

    # ---- a round
    def _exhausted(self, name: str) -> bool:
        """The site cannot take another round (its plan is used up, as it last reported)."""
        if name in self.done_sites:
            return True
        for nid, site in self.node_site.items():
            st = self.node_status.get(nid)
            if site == name and st is not None and "reconnected as node" not in self.excluded.get(nid, ""):
                prog = st.get("progress", {})
                if int(prog.get("planned_steps", 0)) - int(prog.get("steps_allocated", 0)) < int(st["plan"]["local_steps"]):
                    return True
        return False

    def _takers(self, gm, round_index: int) -> list[int] | None:
        """Nodes that take this round (at least min_sites), waiting for sites to connect; None
        when every site that joined has used up its plan (the federation ends early)."""
        c = self.fed.coordinator
        end = time.time() + c.wait_for_sites_s
        shown = None
        while True:
            live = [n for n in self.grid.get_node_ids() if n not in self.excluded]
            self._query_new(live, gm, round_index)
            takers = [n for n in live if self._can_take(n)]
            if len(takers) >= c.min_sites:
                return takers
            if self.plans and round_index > 1 and all(self._exhausted(s) for s in self.plans):
                return None
            state = (len(live), len(takers))
            if state != shown:
                _log(f"round {round_index}: {len(takers)} site(s) can take it, coordinator.min_sites is "
                     f"{c.min_sites}; {len(live)} connected; waiting ({self._exclusions()})")
                shown = state
            if time.time() > end:
                raise FederationError(f"round {round_index}: only {len(takers)} site(s) could take it within "
                                      f"{c.wait_for_sites_s:g} s (coordinator.min_sites {c.min_sites}); "
                                      f"{self._exclusions()}; continue later with --resume")
            time.sleep(1.0)

    def round(self, gm, round_index: int):
        c = self.fed.coordinator
        for attempt in range(1, c.round_retries + 2):
            takers = self._takers(gm, round_index)
            if takers is None:
                return None
            new = self._fit(gm, round_index, takers, attempt)
            if new is not None:
                return new
        raise FederationError(f"round {round_index} failed {c.round_retries + 1} time(s); see the fed_round_failed "
                              f"entries in {self.ledger.path}; continue later with --resume")

    def _exclusions(self) -> str:
        if not self.excluded:
            return "no site refused"
        return "; ".join(f"{self.node_site.get(n, n)}: {why}" for n, why in self.excluded.items())

    def _fit(self, gm, round_index: int, takers: list[int], attempt: int):
        import flwr.compat.common.recorddict_compat as compat
        from flwr.common import ndarrays_to_parameters
        from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
        from flwr.server.compat.app_utils import start_update_client_manager_thread
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
        from flwr.server.workflow.default_workflows import default_fit_workflow

        from dpgen.federated import local_training as lt

        c, sa = self.fed.coordinator, self.fed.coordinator.secure_aggregation
        names = [self.node_site[n] for n in takers]
        weights = {self.node_site[n]: int(self.node_status[n]["plan"]["expected_batch_size"]) for n in takers}
        strategy = _strategy_class()()
        strategy.selected = set(takers)
        fp = gm.fingerprint
        strategy.fit_config = {"dpgen.schema": json.dumps(gm.schema()), "dpgen.round": round_index,
                               "dpgen.global_sha256": fp, "dpgen.federation": self.fed.name}
        ctx = LegacyContext(context=self.context, config=ServerConfig(num_rounds=round_index), strategy=strategy,
                            client_manager=SimpleClientManager())
        self.grid.stages = []
        thread, stop, ready = start_update_client_manager_thread(self.grid, ctx.client_manager)
        ready.wait()
        ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: round_index, Key.START_TIME: timeit.default_timer()})
        ctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([gm.vector()]), keep_input=True)  # one vector: see arrays.flatten
        sa_facts = schema.SecureAggregationFacts(enabled=sa.enabled)
        _log(f"round {round_index} (attempt {attempt}): training at {', '.join(names)}"
             f"{' with SecAgg+' if sa.enabled else ' WITHOUT secure aggregation'}")
        try:
            if sa.enabled:
                max_weight = float(max(weights.values()))
                sa_facts = schema.SecureAggregationFacts(
                    enabled=True, protocol="SecAgg+ (flwr.server.workflow.SecAggPlusWorkflow)",
                    num_shares=sa.num_shares, reconstruction_threshold=sa.reconstruction_threshold,
                    clipping_range=sa.clipping_range, quantization_range=sa.quantization_range, max_weight=max_weight)
                SecAggPlusWorkflow(num_shares=sa.num_shares, reconstruction_threshold=sa.reconstruction_threshold,
                                   max_weight=max_weight, clipping_range=sa.clipping_range,
                                   quantization_range=sa.quantization_range, timeout=c.stage_timeout_s)(self.grid, ctx)
            else:
                default_fit_workflow(self.grid, ctx)
        finally:
            stop.set()
            thread.join(timeout=10)

        out = strategy.outcome or {"results": [], "failures": ["secure aggregation halted before aggregation"],
                                   "delta": None}
        contributed = [self.node_site.get(nid, str(nid)) for nid, _, _ in out["results"]]
        stages = [{"messages": kind, "sent": [self.node_site.get(n, str(n)) for n in sent],
                   "answered": [self.node_site.get(n, str(n)) for n in ok]}
                  for kind, sent, ok in self.grid.stages if kind == "train"]
        if out["delta"] is None and stages:
            # no aggregate: who still sent its (masked) update, i.e. answered the update stage
            contributed = stages[min(2, len(stages) - 1) if sa.enabled else -1]["answered"]
        dropped = [s for s in names if s not in contributed]
        if out["delta"] is None or len(out["results"]) < c.min_sites:
            reason = (f"{len(out['results'])} update(s) aggregated, coordinator.min_sites is {c.min_sites}"
                      + (f"; dropped out: {', '.join(dropped)}" if dropped else ""))
            if sa.enabled and out["delta"] is None:
                reason += ("; SecAgg+ halted: with a site gone, the others lacked the reconstruction threshold's live "
                           "neighbours to unmask the sum" + (" (with 2 sites both must stay)" if len(names) == 2 else ""))
            self._append(schema.FedRoundFailedEntry(round=round_index, attempt=attempt, reason=reason, selected=names,
                                               contributed=contributed, failures=out["failures"], stages=stages))
            _log(f"round {round_index} failed: {reason}")
            for nid in takers:  # ask them again next attempt (a site may have restarted)
                if self.node_site.get(nid) in dropped:
                    self.node_status.pop(nid, None)
            return None

        # Commit: checkpoint, the sites' reported facts, the round entry, state.
        delta = arrays.unflatten(out["delta"][0], gm.train_names, gm.shapes)
        new_weights = dict(gm.weights)
        for n in gm.train_names:
            new_weights[n] = (gm.weights[n] + delta[n]).astype(gm.weights[n].dtype)
        new = gm.with_weights(new_weights)
        ck = self.rd.checkpoints / f"global_round_{round_index:04d}.safetensors"
        lt.save_global(ck, new, {"stage": "federated round", "round": round_index, "sites": contributed,
                                 "privacy_mechanisms": [FEDERATED_FINETUNE]})
        for nid, _, metrics in out["results"]:
            reply = json.loads(str(metrics.get("dpgen.facts", "{}")))  # what the site sent: see site.train
            name = self.node_site.get(nid, str(metrics.get("dpgen.site")))
            progress = schema.SiteProgressFacts.model_validate(reply["progress"])
            self._append(schema.FedSiteProgressEntry(
                site=name, round=round_index, progress=progress,
                secagg_clipped_entries=reply.get("secagg_clipped_entries"), replayed=bool(reply.get("replayed"))))
            st = self.node_status.get(nid)
            if st is not None:
                st["progress"] = progress.model_dump(mode="json")
        self._append(schema.FedRoundEntry(
            round=round_index, attempt=attempt, sites=contributed,
            weights={s: weights[s] for s in contributed}, secure_aggregation=sa_facts, dropped=dropped,
            global_before=fp, global_after=new.fingerprint, checkpoint=str(ck.relative_to(self.rd.root)),
            checkpoint_sha256=_sha256(ck)))
        self._set_state(rounds_done=round_index)
        _log(f"round {round_index} aggregated from {', '.join(contributed)}"
             + (f" (dropped: {', '.join(dropped)})" if dropped else ""))
        return new

    # ---- the whole run
    def run(self) -> None:
        from dpgen.federated import local_training as lt

        lt.limit_threads()
        gm, done = self.load_model()
        rounds = self.fed.coordinator.rounds
        if done:
            _log(f"resuming after round {done} of {rounds}")
        self._set_state(status="running", rounds=rounds, rounds_done=done, error=None)
        for r in range(done + 1, rounds + 1):
            new = self.round(gm, r)
            if new is None:
                _log(f"no site can take round {r}: the federation ends after round {r - 1}")
                break
            gm = new
        self.finish(gm)

    def finish(self, gm) -> None:
        from dpgen.federated import local_training as lt

        done = self.committed_rounds()
        last = done[-1]["round"] if done else 0
        if not done:
            raise FederationError("no round was aggregated; nothing to release")
        nodes = [n for n in self.grid.get_node_ids()
                 if n in self.node_site and "reconnected as node" not in self.excluded.get(n, "")]
        reason = f"the federation finished after round {last}"
        replies = self._send(nodes, "query.finish", {"reason": reason}, last + 1, 120.0) if nodes else []
        confirmed = {}
        for m in replies:
            if not m.has_error():
                facts = json.loads(m.content.config_records[flower.RECORD]["json"])
                confirmed[facts["site"]] = facts
        last_progress = {e["site"]: e["progress"] for e in self._entries("fed_site_progress")}
        for site in self.plans:
            facts = confirmed.get(site) or last_progress.get(site)
            self._append(schema.FedSiteFinalEntry(
                site=site, confirmed=site in confirmed,
                progress=schema.SiteProgressFacts.model_validate(facts) if facts else None))
        path = self.rd.finetune_weights
        contributors = sorted({s for e in done for s in e["sites"]})
        lt.save_global(path, gm, {"stage": "federated finetune", "rounds": last, "sites": contributors,
                                  "privacy_mechanisms": [FEDERATED_FINETUNE]})
        if self.ledger.latest("fed_finished") is None:
            self._append(schema.FedFinishedEntry(rounds=last, sites=contributors,
                                                 checkpoint=str(path.relative_to(self.rd.root))))
        if self.ledger.latest("artifact", name="finetune_weights") is None:
            # DP for each contributing site (its own guarantee); no single epsilon
            self._append(schema.ArtifactEntry(
                name="finetune_weights", path=self.rd.rel(self.rd.finetune_weights),
                privacy_source=schema.PrivacySource(kind="dp", mechanisms=(FEDERATED_FINETUNE,),
                                                    note="per-site guarantees: the sites' fed_site_final entries")))
        self._set_state(status="finished", rounds_done=last)
        self.rd.mark_done("federated", {"rounds": last, "sites": sorted(self.plans)})
        _log(f"finished after round {last}: {record.format_guarantees(record.per_site_guarantees(self.rd.root))}")


def _sha256(path: Path) -> str:
    from dpgen.core.files import sha256_file

    return sha256_file(path)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = Path(str(context.run_config.get(flower.RUN_CONFIG_RUN_DIR, "")))
    if not run_dir.is_dir():
        raise FederationError(f"the ServerApp needs run config {flower.RUN_CONFIG_RUN_DIR}=<coordinator run dir>; "
                              f"start it with `dpgen federated coordinator`")
    coord = Coordinator(run_dir, grid, context)
    try:
        coord.run()
    except Exception as err:
        coord._set_state(status="failed", error=f"{type(err).__name__}: {err}")
        raise


# ----------------------------------------------------------------------------- the launcher


def _bind(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def run_coordinator(config_path: str | Path, run_dir: str | Path | None = None, overrides: list[str] | None = None,
                    *, resume: bool = False, overwrite: bool = False, device: str = "cpu", progress: bool = False,
                    bind_host: str | None = None, log=print) -> dict:
    """Pretrain, run the federated rounds on Flower, sample. Returns a summary."""
    from dpgen.federated import local_training as lt
    from dpgen.rundir import RunDir, default_run_dir

    fed = load_federation(config_path, overrides)
    if fed.data.public is not None:
        from dpgen.config import ConfigError
        from dpgen.data import DataError, resolve_source

        try:
            resolve_source(fed.data.public.source)
        except DataError as err:
            raise ConfigError(f"config error: data.public.source = {fed.data.public.source!r}: {err}") from None
    # The coordinator keeps no site's section (they name the sites' data): a federation file that
    # holds them (one file for a whole demo) is read for the coordinator's part only.
    fed = fed.coordinator_part()
    rd = RunDir.create(run_dir or default_run_dir(fed.name), fed, resume=resume, overwrite=overwrite)
    lt.limit_threads()
    summary: dict = {"run_dir": str(rd.root)}

    # 1. public pretraining
    if not rd.is_done("pretrain"):
        t0 = time.time()
        shape = lt.public_image_shape(fed)
        log(f"coordinator: public pretraining ({fed.pretrain.steps} steps) -> {rd.checkpoints}")
        gm = lt.pretrain_global(fed, rd, shape, device=device, progress=progress)
        rd.mark_done("pretrain", {"steps": fed.pretrain.steps, "image_shape": shape, "seconds": round(time.time() - t0, 1)})
        lt.ledger(rd.root).append(schema.ArtifactEntry(
            name="pretrain_weights", path=rd.rel(rd.pretrain_weights),
            privacy_source=schema.PrivacySource(kind="public"), trainable=gm.trainable,
            train_tensors=len(gm.train_names)))

    # 2. the rounds, on Flower
    if not rd.is_done("federated"):
        _run_flower(fed, rd, bind_host=bind_host, log=log)
    summary["federated"] = rd.state()["completed"].get("federated")

    # 3. the cohort, from the final global model
    if not rd.is_done("sample"):
        summary["sample"] = sample_cohort(fed, rd, device=device, progress=progress)
    summary["sites"] = record.per_site_guarantees(rd.root)
    return summary


def _run_flower(fed: FederationConfig, rd, *, bind_host: str | None, log) -> None:
    home = rd.internal / "flower"
    env = flower.flower_env(home)
    host, port = _bind(fed.coordinator.address)
    host = bind_host or host
    if flower.port_open(f"{host}:{port}"):
        raise FederationError(f"{host}:{port} is already in use (another coordinator?); change coordinator.address")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "dpgen"\n\n[superlink.dpgen]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        if host in ("0.0.0.0", "127.0.0.1", "localhost", "::") else
        f'[superlink]\ndefault = "dpgen"\n\n[superlink.dpgen]\naddress = "{host}:{port}"\ninsecure = true\n')
    app = flower.write_app(home / "app")
    link_log = rd.logs / "flower_superlink.log"
    link = flower.start([flower.executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                         "--host", host, "--port", str(port), "--database", str(home / "superlink.db")],
                        env, link_log)
    log(f"coordinator: Flower SuperLink (pid {link.pid}) on {host}:{port}; sites connect to {fed.coordinator.address}")
    try:
        end = time.time() + 60
        while not flower.port_open(f"127.0.0.1:{port}" if host in ("0.0.0.0", "::") else f"{host}:{port}"):
            if link.poll() is not None or time.time() > end:
                raise FederationError(f"the Flower SuperLink did not start:\n{flower.log_tail(link_log)}")
            time.sleep(0.3)
        run_log = rd.logs / "flower_run.log"
        cmd = [flower.executable("flwr"), "run", str(app), "dpgen", "--stream",
               "--run-config", f'{flower.RUN_CONFIG_RUN_DIR}="{rd.root.resolve()}"']
        with open(run_log, "ab", buffering=0) as out:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=str(app), **flower.die_with_parent_kwargs())
            for line in proc.stdout:  # the ServerApp's log, streamed by `flwr run --stream`
                out.write(line)
                text = line.decode(errors="replace").rstrip()
                if "[dpgen coordinator]" in text or "ERROR" in text:
                    log(text)
            rc = proc.wait()
        st = rd.state().get("federated", {})
        if not rd.is_done("federated"):
            err = st.get("error") or f"`flwr run` exited with code {rc} before the rounds finished"
            raise FederationError(f"federated rounds did not finish: {err}. Log: {run_log}; continue with --resume")
    finally:
        flower.stop(link)


def sample_cohort(fed: FederationConfig, rd, *, device="cpu", progress=False, **kwargs) -> dict:
    """The cohort from the final global model: `dpgen sample`'s own stage on the coordinator's
    run config (post-processing of `dp_sgd:federated_finetune`; its ledger artifact says so)."""
    from dpgen.federated.config import coordinator_sample_config
    from dpgen.pipeline import sample_stage

    return sample_stage(coordinator_sample_config(fed, rd), rd, device=device, progress=progress, **kwargs)
