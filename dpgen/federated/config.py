"""The federation's config: one YAML file with the coordinator's part and every site's part.

The coordinator reads `data` (public data and the label/image schema), `model`, `pretrain`,
`sample` and `coordinator`; a site reads only `coordinator.address` and `sites.NAME`, so on
separate machines each hospital can keep a file that holds just its own section (the other
sections may then be left out, see `load_site_config`).

    name: federated_breast
    seed: 0
    data: {public: {source: pneumoniamnist}, num_classes: 2, image_shape: [1, 28, 28]}
    model: {...}            # as in a dpgen run config
    pretrain: {...}         # public pretraining on the coordinator (no privacy cost)
    sample: {...}           # the cohort, sampled by the coordinator from the final global model
    coordinator: {address: 127.0.0.1:9092, rounds: 3, min_sites: 2, secure_aggregation: {...}}
    sites:
      hospital_a:
        data: {source: breastmnist, split: train}   # any dpgen data source
        rows: [0, 300]                               # optional: a slice of it (demo splits)
        privacy: {epsilon: 8, delta: 1.0e-5, public_unit_count: 300}  # own budget; q = batch / public count
        finetune: {rounds: 3, local_steps: 10, batch_size: 64, ...}

Every number that decides weighting or scheduling (expected batch sizes, rounds, local steps)
is configuration, never a count of private data.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from dpgen.config import (
    ConfigError, DataSource, ModelConfig, PretrainConfig, PrivacyConfig, RunConfig, SampleConfig, _format_validation_error,
    _Section, apply_overrides, config_from_dict,
)

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PublicData(_Section):
    """What the coordinator holds: public data and the schema every site must match."""

    public: DataSource | None = None
    num_classes: int = Field(gt=0)
    class_names: list[str] | None = None
    public_labels: Literal["use", "ignore"] = "ignore"
    # The global model's input shape (C, H, W) or (C, D, H, W): public schema. Default: the
    # public data's shape. A site whose images have another shape is refused.
    image_shape: list[int] | None = None


class SecureAggregationConfig(_Section):
    """Flower's SecAgg+ (SecAggPlusWorkflow on the coordinator, secaggplus_mod at the sites):
    the coordinator receives only masked vectors and unmasks the weighted sum of the updates.

    `num_shares`: into how many shares a site's secret keys are split (an int > 2, or a fraction
    of the round's sites). `reconstruction_threshold`: shares needed to rebuild a secret (an int,
    or a fraction of num_shares; at least 2). A larger threshold protects a site against a
    coordinator colluding with more sites, but tolerates fewer dropouts: a round survives a
    site dropping out only if every remaining site still has `threshold` live neighbours.
    `clipping_range`: every entry of a (weight-scaled) update must lie in [-r, r] before it is
    quantized to `quantization_range` levels; larger entries are clipped (the sites report
    the largest entry of their update, see the coordinator's ledger)."""

    enabled: bool = True
    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.67
    clipping_range: float = Field(default=1.0, gt=0)
    quantization_range: int = Field(default=2**22, gt=0)


class CoordinatorConfig(_Section):
    # host:port of the SuperLink (Flower's coordinator process): the sites connect here.
    address: str = "127.0.0.1:9092"
    rounds: int = Field(default=3, gt=0)
    # A round is aggregated only if at least this many sites sent an update (SecAgg+ needs 2).
    min_sites: int = Field(default=2, gt=0)
    # What the sites' DP-SGD trains (the same for every site).
    trainable: Literal["all", "attention", "attention+conditioning"] = "all"
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)
    # How long to wait for min_sites sites to be connected before a round.
    wait_for_sites_s: float = Field(default=600.0, gt=0)
    # A failed round (too few updates) is retried this many times before the coordinator stops.
    round_retries: int = Field(default=2, ge=0)
    # Per-stage reply timeout; None waits until every site replied or Flower declared it
    # unavailable (its heartbeat stopped: about a minute after a site dies).
    stage_timeout_s: float | None = Field(default=None, gt=0)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port")
        return v


class SiteFinetune(_Section):
    """A site's DP-SGD schedule. Its privacy plan covers `rounds` x `local_steps` steps as one
    Poisson-subsampled Gaussian composition at sample rate batch_size / N_site."""

    rounds: int = Field(gt=0)  # rounds this site takes part in (and budgets for)
    local_steps: int = Field(gt=0)  # DP-SGD steps per round
    batch_size: int = Field(gt=0)  # expected logical batch: also this site's public FedAvg weight
    physical_batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=1e-3, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    noise_multiplicity: int = Field(default=1, gt=0)
    grad_sample_mode: Literal["hooks", "functorch"] = "hooks"
    # Checkpoint (and ledger progress) every this many local steps; default: once per round.
    checkpoint_every: int | None = Field(default=None, gt=0)
    # Refuse to join if the calibrated noise multiplier exceeds this: the budget is then too
    # small for the planned rounds (at sigma 20 the noise on a batch-16 mean gradient is 1.25x
    # the clipping norm: the updates would be mostly noise). None: no limit.
    max_noise_multiplier: float | None = Field(default=20.0, gt=0)

    @model_validator(mode="after")
    def _sizes(self) -> "SiteFinetune":
        if self.physical_batch_size > self.batch_size:
            raise ValueError(f"physical_batch_size={self.physical_batch_size} is larger than "
                             f"batch_size={self.batch_size}")
        return self


class SiteConfig(_Section):
    data: DataSource
    # A slice [start, stop) of the source's rows (used by the demo to split one dataset into
    # sites; a real site points `data` at its own files).
    rows: tuple[int, int] | None = None
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    finetune: SiteFinetune
    # Refuse any round whose update would reach the coordinator unmasked.
    require_secure_aggregation: bool = True
    # Stop if the coordinator cannot be reached for this long (Flower's SuperNode retries).
    connect_timeout_s: float = Field(default=600.0, gt=0)

    @field_validator("rows")
    @classmethod
    def _rows(cls, v):
        if v is not None and not 0 <= v[0] < v[1]:
            raise ValueError("must be [start, stop) with 0 <= start < stop")
        return v

    @field_validator("privacy")
    @classmethod
    def _finite(cls, v: PrivacyConfig) -> PrivacyConfig:
        if v.epsilon == float("inf"):
            raise ValueError("epsilon = inf (a non-private site) is not allowed in a federation")
        return v


class FederationConfig(_Section):
    name: str = "federation"
    seed: int = 0  # public seed (pretraining, sampling); sites draw their own secret seeds
    data: PublicData
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    coordinator: CoordinatorConfig = Field(default_factory=CoordinatorConfig)
    sites: dict[str, SiteConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _checks(self) -> "FederationConfig":
        if self.model.generator != "diffusion":
            raise ValueError(f"model.generator = {self.model.generator!r}: federated fine-tuning supports "
                             f"'diffusion' (pixel space) only")
        if self.sample.class_counts.mode == "dp_histogram":
            raise ValueError("sample.class_counts.mode = 'dp_histogram' needs one private label histogram; in a "
                             "federation use 'uniform' or 'fixed'")
        if self.sample.attributes.mode != "none":
            raise ValueError("sample.attributes: federated runs have no conditioning attributes")
        for name in self.sites:
            if not SITE_NAME.match(name):
                raise ValueError(f"site name {name!r}: use letters, digits, '_', '-', '.' (at most 64)")
        sa = self.coordinator.secure_aggregation
        if sa.enabled and self.coordinator.min_sites < 2:
            raise ValueError("coordinator.min_sites must be >= 2 with secure aggregation (a sum of one update "
                             "is that update)")
        if self.data.class_names is not None and len(self.data.class_names) != self.data.num_classes:
            raise ValueError(f"data.class_names has {len(self.data.class_names)} names for "
                             f"data.num_classes={self.data.num_classes}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def coordinator_part(self) -> "FederationConfig":
        """What the coordinator keeps (its run directory's config.yaml): everything but the sites'
        sections, which name the sites' data (and, for the demo's slices, their sizes)."""
        return self.model_copy(update={"sites": {}})

    def site_file(self, name: str) -> dict:
        """A site's own config file: the coordinator's address and its own section only."""
        return {"name": self.name, "coordinator": {"address": self.coordinator.address},
                "sites": {name: self.sites[name].model_dump(mode="json")}}


def _read_yaml(path: str | Path) -> dict:
    from dpgen.config import read_config_yaml

    return read_config_yaml(path)


def federation_from_dict(raw: dict) -> FederationConfig:
    try:
        return FederationConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, raw)) from None


def load_federation(path: str | Path, overrides: list[str] | None = None) -> FederationConfig:
    return federation_from_dict(apply_overrides(_read_yaml(path), overrides or []))


class SiteFile(_Section):
    """What a site needs from the federation file: the coordinator's address and its section."""

    name: str
    address: str
    site: SiteConfig

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_site_config(path: str | Path, site: str, overrides: list[str] | None = None) -> SiteFile:
    """The site's section of a federation file. Only `coordinator.address` and `sites.NAME`
    are read, so a hospital's own file may hold nothing else."""
    raw = apply_overrides(_read_yaml(path), overrides or [])
    sites = raw.get("sites") or {}
    if site not in sites:
        known = ", ".join(sites) or "none"
        raise ConfigError(f"config error: sites.{site}: no such site in {path} (sites: {known})")
    address = (raw.get("coordinator") or {}).get("address", CoordinatorConfig().address)
    try:
        CoordinatorConfig(address=address)
        cfg = SiteConfig.model_validate(sites[site])
    except ValidationError as err:
        lines = _format_validation_error(err, sites[site] if "address" not in str(err) else raw).splitlines()
        prefix = "config error: " if "address" in str(err) else f"config error: sites.{site}."
        raise ConfigError("\n".join(ln.replace("config error: ", prefix, 1) for ln in lines)) from None
    return SiteFile(name=str(raw.get("name", Path(path).stem)), address=address, site=cfg)


# ----------------------------------------------------------------------------- dpgen run configs


def coordinator_run_config(fed: FederationConfig, image_shape: list[int]) -> RunConfig:
    """The dpgen RunConfig the coordinator pretrains and samples with. It has no private data:
    `data.private` names the public source only because the schema requires a source; nothing
    reads it (the image shape comes from `data.image_shape`)."""
    placeholder = fed.data.public.model_dump() if fed.data.public else {"source": "none"}
    raw = {
        "name": fed.name, "seed": fed.seed,
        "data": {"public": fed.data.public.model_dump() if fed.data.public else None, "private": placeholder,
                 "num_classes": fed.data.num_classes, "class_names": fed.data.class_names,
                 "public_labels": fed.data.public_labels},
        "model": fed.model.model_dump(), "pretrain": fed.pretrain.model_dump(),
        "finetune": {"trainable": fed.coordinator.trainable, "batch_size": 1, "physical_batch_size": 1},
        "sample": fed.sample.model_dump(),
    }
    return config_from_dict(raw)


def coordinator_sample_config(fed: FederationConfig, rd) -> RunConfig:
    """The RunConfig `dpgen sample` uses on a coordinator's run directory (the image shape the
    pretraining recorded)."""
    shape = (rd.state()["completed"].get("pretrain") or {}).get("image_shape") or fed.data.image_shape
    if not shape:
        raise ConfigError(f"{rd.root}: the coordinator has not pretrained yet (no image shape recorded)")
    return coordinator_run_config(fed, list(shape))


def read_federation(root: str | Path) -> FederationConfig | None:
    """The federation config of a coordinator's run directory, or None when ROOT/config.yaml is
    not one (an ordinary run, a site, no config)."""
    path = Path(root) / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None
    if not (isinstance(raw, dict) and isinstance(raw.get("coordinator"), dict) and "sites" in raw):
        return None
    return federation_from_dict(raw)


def site_run_config(site_name: str, site: SiteConfig, *, model: dict, num_classes: int, trainable: str) -> RunConfig:
    """The RunConfig a site's DP-SGD runs under: the coordinator's model, the site's data,
    schedule and budget. `finetune.steps` is the whole plan (rounds x local steps). Its seed is
    public (the preflight's random inputs); every random choice that touches the site's data
    comes from the secret seed in the site's internal/secrets.json (dpgen.privacy.randomness)."""
    ft = site.finetune
    raw = {
        "name": site_name, "seed": 0,
        "data": {"private": site.data.model_dump(), "num_classes": num_classes},
        "model": copy.deepcopy(model),
        "finetune": {"steps": ft.rounds * ft.local_steps, "batch_size": ft.batch_size,
                     "physical_batch_size": ft.physical_batch_size, "lr": ft.lr, "max_grad_norm": ft.max_grad_norm,
                     "noise_multiplicity": ft.noise_multiplicity, "ema_decay": 0.0,
                     "checkpoint_every": ft.checkpoint_every or ft.local_steps,
                     "grad_sample_mode": ft.grad_sample_mode, "trainable": trainable},
        "privacy": site.privacy.model_dump(),
        "sample": {"class_counts": {"mode": "uniform"}},
    }
    return config_from_dict(raw)
