"""Federated DP fine-tuning: several sites, one generator, each site's own DP-SGD and budget.

The engine is Flower (the `federated` extra): the coordinator is Flower's SuperLink plus a
ServerApp, a site is Flower's SuperNode plus a ClientApp, aggregation is Flower's SecAgg+.

    config.py          the federation YAML (coordinator part, one section per site)
    local_training.py  the ONE adapter onto dpgen's training and privacy code (a site's plan, its
                       rounds as parts of that plan on the one DP-SGD loop, its completion,
                       pretraining, weights files, ledgers)
    coordinator.py     pretraining -> Flower rounds (ServerApp) -> cohort; `run_coordinator`
    site.py            the site's run directory, its ClientApp, its launcher `run_site`
    worker.py          the site process serves the ClientApp processes Flower starts per message
    flower.py          Flower's processes and app bundle (commands, environment)
    record.py          the coordinator's ledger read back per site (the entries themselves are
                       typed in dpgen/privacy/schema.py)
    demo.py            coordinator + all sites as processes on 127.0.0.1
    arrays.py          weights on the wire (one flat vector), fingerprints, files
    commands.py        `dpgen federated coordinator|site|demo|report`

Importing this package does not import Flower; the submodules that need it do.
"""
