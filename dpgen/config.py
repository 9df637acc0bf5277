"""Typed schema of a run config, YAML loading and `key.sub=value` overrides.

A config describes one run end to end (data, model, pretraining, DP fine-tuning, sampling).
Every field is validated up front so that a bad value stops the run with one line that
names the key, the value and what is allowed, instead of a stack trace an hour later.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem, phrased for the user (one line: key, value, what is allowed)."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PublicTransform(_Section):
    """How the public images are fitted to the private images' shape before anything trains on
    them (`data.public.transform`). Fixed maps: the private data contributes only its shape
    (channels and size, which size the model anyway), never a statistic of its content, and
    it is never transformed itself. What was done is recorded in the manifest.

    - `resize`: resample to the private spatial size (MONAI `Resize`); `interpolation`: `auto`
      (area averaging when shrinking, bi/trilinear when enlarging), `area`, `linear` or `nearest`.
    - `channels`: grey -> RGB by repeating the grey channel, RGB -> grey by luminance
      (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B).
    """

    resize: bool = False
    interpolation: Literal["auto", "area", "linear", "nearest"] = "auto"
    channels: bool = False


class DataSource(_Section):
    """Where a dataset comes from.

    `source` is a path (.npz, a folder with a labels CSV, a labels CSV) or a MedMNIST name
    (e.g. "breastmnist") resolved in $DPGEN_DATA_DIR, then the cache directory.
    """

    source: str
    split: str = "train"
    labels_csv: str | None = None  # folder sources: CSV relative to the folder
    image_column: str = "image"
    label_column: str = "label"
    subject_column: str | None = None  # the unit of privacy when given
    split_column: str | None = None
    attribute_columns: list[str] = Field(default_factory=list)
    max_images: int | None = Field(default=None, gt=0)  # a fixed-size prefix (tests, quick runs)
    # Float images (NIfTI, DICOM): a fixed intensity window [low, high] mapped to the model's
    # range, e.g. a CT window. Without it each image is min-max scaled on its own (a per-record
    # map; a dataset-wide statistic of private data would leak).
    intensity_range: tuple[float, float] | None = None
    # Public data only: fit the images to the private shape (see PublicTransform).
    transform: PublicTransform | None = None


class AttributeRange(_Section):
    """The fixed range of a conditioning attribute: public knowledge or a clinical convention
    chosen by the user, never a statistic of the private data. Values are mapped to [-1, 1]
    with it (private values outside it are clipped), and sampling refuses values outside it."""

    min: float
    max: float

    @model_validator(mode="after")
    def _order(self) -> "AttributeRange":
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.max > self.min):
            raise ValueError(f"attribute range [{self.min:g}, {self.max:g}] must be finite with max > min")
        return self


class DataConfig(_Section):
    public: DataSource | None = None
    private: DataSource
    # Label space of the private task. It is schema, not data: fixed by the user (or by the
    # dataset's published metadata), never counted from the private labels.
    num_classes: int = Field(gt=0)
    class_names: list[str] | None = None
    # Continuous conditioning attributes: CSV column name -> fixed range (see AttributeRange).
    # Read from the sources' labels CSV (folder sources); empty: label-conditional only.
    attributes: dict[str, AttributeRange] = Field(default_factory=dict)
    # Do the public labels name the private classes (the same label space, e.g. another site's
    # images of the same task)? "use": pretraining is conditioned on them. "ignore" (default):
    # pretraining learns the public images unconditionally (the null label) and every class
    # embedding starts from the null one, so DP fine-tuning learns the private classes from an
    # unconditional model. Measured on the quickstart: PneumoniaMNIST's label 1 (pneumonia,
    # brighter images) taught "class 1 = brighter", which 120 DP steps did not undo (TSTR AUC
    # 0.43); with "ignore" it was 0.59.
    public_labels: Literal["use", "ignore"] = "ignore"
    # What the config is sized for: 2 (images, the default) or 3 (volumes). Checked against the
    # data before training: a 2D config given 3D volumes would otherwise build a 3D pixel-space
    # UNet (slow, and not what the config's sizes were chosen for) without a word.
    spatial_dims: Literal[2, 3] = 2

    @model_validator(mode="after")
    def _private_untransformed(self) -> "DataConfig":
        if self.private.transform is not None:
            raise ValueError("data.private.transform: only the public data is transformed (fitted to the private "
                             "images' shape); the private data is used as it is. Move the key to data.public")
        return self


class GANConfig(_Section):
    """Architecture of `model.generator: cgan` (DCGAN-style, 2D or 3D)."""

    latent_dim: int = Field(default=64, gt=0)
    # Generator: channels per grid, coarsest first; the grid doubles between entries.
    generator_channels: list[int] = Field(default_factory=lambda: [128, 64, 32])
    # Discriminator: channels per grid, finest first; stride-2 convs between entries.
    discriminator_channels: list[int] = Field(default_factory=lambda: [32, 64, 128])
    norm_num_groups: int = Field(default=8, gt=0)
    # Normalisation in the generator (never private: it may mix the rows of a batch). "batch"
    # (DCGAN's) keeps the public pretraining from collapsing to one image; "group" did
    # (benchmarks/RESULTS.md). The discriminator always uses GroupNorm (per-sample gradients).
    generator_norm: Literal["batch", "group"] = "batch"

    @model_validator(mode="after")
    def _groups(self) -> "GANConfig":
        for key in ("generator_channels", "discriminator_channels"):
            chans = getattr(self, key)
            if not chans:
                raise ValueError(f"model.gan.{key} must not be empty")
            for c in chans:
                if c <= 0 or c % min(self.norm_num_groups, c):
                    raise ValueError(f"model.gan.{key} entry {c} must be positive and divisible by "
                                     f"model.gan.norm_num_groups={self.norm_num_groups}")
        return self


class ModelConfig(_Section):
    # The generator family, one of dpgen.models.registry.FAMILIES: diffusion (pixel space, small
    # images); latent_diffusion (UNet on the latents of an autoencoder trained on public data,
    # section `autoencoder`); cgan (conditional GAN whose discriminator alone sees private data,
    # section `model.gan`).
    generator: str = "diffusion"
    channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    num_res_blocks: int = Field(default=1, gt=0)
    num_head_channels: int = Field(default=32, gt=0)
    norm_num_groups: int = Field(default=16, gt=0)
    num_train_timesteps: int = Field(default=1000, gt=0)
    # What the diffusion UNet predicts: the noise ("epsilon"), v = sqrt(a) noise - sqrt(1 - a) x0
    # ("v_prediction") or the clean image ("sample"). v-prediction is the default: measured on the
    # quickstart, an epsilon model's clean-image estimate at the first sampling steps (t near T)
    # was worse than the mean image and ~30% of its samples stayed noise; v's was not.
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    # Probability of replacing the label by the "null" class in training (classifier-free
    # guidance needs an unconditional model too).
    cond_drop_prob: float = Field(default=0.1, ge=0, lt=1)
    gan: GANConfig = Field(default_factory=GANConfig)

    @field_validator("generator")
    @classmethod
    def _known_family(cls, v: str) -> str:
        from dpgen.models.registry import family

        family(v)  # raises ValueError naming the known families
        return v

    @model_validator(mode="after")
    def _levels_match(self) -> "ModelConfig":
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"model.attention_levels has {len(self.attention_levels)} entries but model.channels "
                f"has {len(self.channels)}; give one attention flag per level"
            )
        for c in self.channels:
            if c <= 0 or c % self.norm_num_groups:
                raise ValueError(
                    f"model.channels entry {c} must be positive and divisible by "
                    f"model.norm_num_groups={self.norm_num_groups}"
                )
        return self


class AutoencoderPretrain(_Section):
    steps: int = Field(default=1000, ge=0)
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=5e-4, gt=0)
    checkpoint_every: int = Field(default=250, gt=0)


class AutoencoderFinetune(_Section):
    """`frozen` (default): the public autoencoder is used as is. `dp`: it is fine-tuned on the
    private data with DP-SGD, a second mechanism in the same ledger: it is calibrated to spend
    `epsilon_fraction` of privacy.epsilon on its own, then the UNet's noise is calibrated so
    that both (and any DP label histogram) compose (PLD) to at most privacy.epsilon."""

    mode: Literal["frozen", "dp"] = "frozen"
    steps: int = Field(default=50, ge=0)
    batch_size: int = Field(default=64, gt=0)
    physical_batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    epsilon_fraction: float = Field(default=0.25, gt=0, lt=1)
    ema_decay: float = Field(default=0.0, ge=0, lt=1)
    checkpoint_every: int = Field(default=25, gt=0)


class AutoencoderConfig(_Section):
    """The autoencoder of `model.generator: latent_diffusion` (MONAI AutoencoderKL)."""

    channels: list[int] = Field(default_factory=lambda: [32, 64])
    latent_channels: int = Field(default=3, gt=0)
    num_res_blocks: int = Field(default=1, gt=0)
    norm_num_groups: int = Field(default=16, gt=0)
    attention: bool = False
    kl_weight: float = Field(default=1e-6, ge=0)
    # l1 (the latent-diffusion default) or mse (better for sparse binary masks)
    reconstruction_loss: Literal["l1", "mse"] = "l1"
    # Optional: the latent shape you expect (C, *spatial); checked against what the
    # autoencoder produces for the private images.
    latent_shape: list[int] | None = None
    pretrain: AutoencoderPretrain = Field(default_factory=AutoencoderPretrain)
    finetune: AutoencoderFinetune = Field(default_factory=AutoencoderFinetune)

    @model_validator(mode="after")
    def _groups(self) -> "AutoencoderConfig":
        if not self.channels:
            raise ValueError("autoencoder.channels must not be empty")
        for c in self.channels:
            if c <= 0 or c % self.norm_num_groups:
                raise ValueError(f"autoencoder.channels entry {c} must be positive and divisible by "
                                 f"autoencoder.norm_num_groups={self.norm_num_groups}")
        if self.finetune.physical_batch_size > self.finetune.batch_size:
            raise ValueError("autoencoder.finetune.physical_batch_size is larger than autoencoder.finetune.batch_size")
        return self


class PretrainConfig(_Section):
    steps: int = Field(default=2000, ge=0)
    batch_size: int = Field(default=64, gt=0)
    lr: float = Field(default=2e-4, gt=0)
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    checkpoint_every: int = Field(default=500, gt=0)


class FinetuneConfig(_Section):
    steps: int = Field(default=200, ge=0)
    # Expected (logical) batch size; the Poisson sample rate is batch_size / N_units.
    batch_size: int = Field(default=64, gt=0)
    # What fits in memory at once; a logical batch is split into physical ones.
    physical_batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=1e-4, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    # K draws of (timestep, noise) per private image, averaged before clipping (DPDM).
    noise_multiplicity: int = Field(default=1, gt=0)
    ema_decay: float = Field(default=0.99, ge=0, lt=1)
    checkpoint_every: int = Field(default=50, gt=0)
    grad_sample_mode: Literal["hooks", "functorch"] = "hooks"
    # What DP-SGD updates (the rest stays at its public-pretrained value). Fewer trainable
    # parameters: less noise in total. `attention`: the UNet's attention blocks;
    # `attention+conditioning`: plus the label/attribute embedding; `lora`: low-rank
    # adapters on the Linear layers named in `lora_targets`. cgan: `all` or `lora`.
    trainable: Literal["all", "attention", "attention+conditioning", "lora"] = "all"
    lora_rank: int = Field(default=4, gt=0)
    lora_alpha: float | None = Field(default=None, gt=0)  # default: the rank (scale 1)
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "out_proj"])
    # cgan: learning rate of the (non-private) generator updates; default finetune.lr.
    generator_lr: float | None = Field(default=None, gt=0)
    # cgan: generator updates after each DP step of the discriminator. They read only the DP
    # discriminator and public randomness (post-processing), so more of them cost no privacy.
    generator_steps: int = Field(default=1, ge=1)
    # cgan: weight of MSGAN's mode-seeking term in those updates (0 = off); also post-processing.
    generator_mode_seeking: float = Field(default=0.0, ge=0)


class PrivacyConfig(_Section):
    """The run's one privacy budget, covering every mechanism whose outputs may be released.

    `neighbouring` is the relation epsilon is for. "add_remove" (default): neighbouring data
    sets differ by one unit added or removed; it requires that the number of private units N
    stays secret, so nothing shareable states N or a quantity it follows from (the sample
    rate, sigma, the exact spent epsilon). "replace_one": data sets of the same size differ in
    one unit; N is public and the card states it (for the same noise, epsilon is about twice
    the add/remove one).

    `public_unit_count` is the number of units the Poisson sample rates are computed from
    (q = expected batch / public_unit_count). Under add_remove it is required: were q (and
    the sigma calibrated from it) computed from the true N, a data set with one more unit would
    run a different mechanism, which the accountant does not cover. Give a figure you are
    willing to publish (e.g. N rounded); the true N stays secret and only changes the realised
    batch sizes. Under replace_one it defaults to N.
    """

    epsilon: float = 10.0
    delta: float = 1e-5
    accountant: Literal["pld", "rdp"] = "pld"
    neighbouring: Literal["add_remove", "replace_one"] = "add_remove"
    public_unit_count: int | None = Field(default=None, gt=0)

    @field_validator("epsilon")
    @classmethod
    def _eps(cls, v: float) -> float:
        if not (v > 0) or math.isnan(v):
            raise ValueError("must be > 0 (use .inf for a non-private run)")
        return v

    @field_validator("delta")
    @classmethod
    def _delta(cls, v: float) -> float:
        if not (0 < v < 1):
            raise ValueError("must be in the open interval (0, 1)")
        return v

    @model_validator(mode="after")
    def _rdp_relation(self) -> "PrivacyConfig":
        if self.accountant == "rdp" and self.neighbouring != "add_remove":
            raise ValueError("privacy.accountant = 'rdp' supports only neighbouring = 'add_remove' (dp-accounting "
                             "has no replace-one RDP for Poisson subsampling); use 'pld'")
        return self


class ClassCounts(_Section):
    """How many images of each class the cohort holds.

    - "uniform": the same number per class (public: no data used).
    - "fixed": `counts`, fixed by the user.
    - "dp_histogram": the private label histogram released through the Gaussian mechanism
      (noise std `histogram_sigma`, sensitivity 1); its cost is composed into the ledger.
    """

    mode: Literal["uniform", "fixed", "dp_histogram"] = "uniform"
    counts: dict[int, int] | None = None
    histogram_sigma: float = Field(default=20.0, gt=0)

    @model_validator(mode="after")
    def _counts(self) -> "ClassCounts":
        if self.mode == "fixed":
            if not self.counts:
                raise ValueError("sample.class_counts.counts is required when mode is 'fixed'")
            for k, v in self.counts.items():
                if v < 0:
                    raise ValueError(f"sample.class_counts.counts[{k}] = {v}: must be >= 0")
        return self


class AttributeSampling(_Section):
    """Which attributes the cohort's images are generated with (never the private table).

    - "none": attributes left unspecified (the model's attribute-dropped mode); the cohort
      holds no attribute columns.
    - "fixed": `values`, given by the user: one value per attribute, or a list of
      `num_images` values.
    - "uniform": independent uniform draws in each attribute's fixed range.
    - "public": rows of the public dataset's attribute columns, drawn with replacement.
    - "dp_histogram": each attribute's histogram (`bins` equal bins over its fixed range) of
      the private data, released with the Gaussian mechanism (noise std `histogram_sigma`
      per bin; a unit's rows add up to at most 1 per attribute, so the L2 sensitivity is
      sqrt(#attributes)); its cost is composed into the budget before sigma is calibrated.
      Attributes are drawn independently from their noisy marginals (uniform within a bin).
    """

    mode: Literal["none", "fixed", "uniform", "public", "dp_histogram"] = "none"
    values: dict[str, float | list[float]] | None = None
    bins: int = Field(default=10, gt=0)
    histogram_sigma: float = Field(default=20.0, gt=0)


class SampleConfig(_Section):
    num_images: int = Field(default=500, gt=0)
    class_counts: ClassCounts = Field(default_factory=ClassCounts)
    attributes: AttributeSampling = Field(default_factory=AttributeSampling)
    sampler: Literal["ddim", "ddpm", "dpmsolver++"] = "ddim"
    steps: int = Field(default=50, gt=0)
    # Images per batch; "auto" fills the GPU (256 on CPU). A cohort depends on the seed, not
    # on the batch size: every image has its own noise stream.
    batch_size: int | Literal["auto"] = 256
    guidance_scale: float = Field(default=1.0, ge=0)
    seed: int = 0
    # Also write every image as NIfTI (+ labels.csv); default: for 3D volumes only.
    nifti: bool | None = None

    @field_validator("batch_size")
    @classmethod
    def _bs(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be > 0 or 'auto'")
        return v


class RunConfig(_Section):
    name: str = "run"
    seed: int = 0
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    @model_validator(mode="after")
    def _cross(self) -> "RunConfig":
        if self.finetune.physical_batch_size > self.finetune.batch_size:
            # Not an error in DP terms, but it means the user mixed up the two sizes.
            raise ValueError(
                f"finetune.physical_batch_size={self.finetune.physical_batch_size} is larger than "
                f"finetune.batch_size={self.finetune.batch_size}; the physical batch is a slice of the logical one"
            )
        if self.data.class_names is not None and len(self.data.class_names) != self.data.num_classes:
            raise ValueError(
                f"data.class_names has {len(self.data.class_names)} names for data.num_classes={self.data.num_classes}"
            )
        self._check_families()
        self._check_attributes()
        if self.finetune.steps == 0:
            for key, mode in (("sample.class_counts.mode", self.sample.class_counts.mode),
                              ("sample.attributes.mode", self.sample.attributes.mode)):
                if mode == "dp_histogram":
                    raise ValueError(
                        f"{key} = 'dp_histogram' needs the DP histogram the finetune stage releases, but "
                        f"finetune.steps = 0 (no fine-tuning); use another mode (e.g. uniform)"
                    )
        counts = self.sample.class_counts.counts
        if counts:
            bad = [k for k in counts if not 0 <= k < self.data.num_classes]
            if bad:
                raise ValueError(
                    f"sample.class_counts.counts names class {bad[0]}, but classes are 0..{self.data.num_classes - 1}"
                )
        return self

    def _check_families(self) -> None:
        from dpgen.models.registry import family

        family(self.model.generator).check_config(self)

    def _check_attributes(self) -> None:
        names = list(self.data.attributes)
        mode = self.sample.attributes.mode
        if mode != "none" and not names:
            raise ValueError(f"sample.attributes.mode = {mode!r} but data.attributes names no attribute")
        values = self.sample.attributes.values
        if mode == "fixed":
            if not values:
                raise ValueError("sample.attributes.values is required when sample.attributes.mode is 'fixed'")
            unknown = sorted(set(values) - set(names))
            if unknown:
                raise ValueError(f"sample.attributes.values names {unknown[0]!r}, which is not in data.attributes ({', '.join(names)})")
            missing = [n for n in names if n not in values]
            if missing:
                raise ValueError(f"sample.attributes.values lacks attribute {missing[0]!r}")
            for name, v in values.items():
                vs = v if isinstance(v, list) else [v]
                if isinstance(v, list) and len(v) != self.sample.num_images:
                    raise ValueError(f"sample.attributes.values.{name} has {len(v)} values for sample.num_images={self.sample.num_images}")
                r = self.data.attributes[name]
                bad = [x for x in vs if not r.min <= x <= r.max]
                if bad:
                    raise ValueError(f"sample.attributes.values.{name} = {bad[0]:g} is outside data.attributes.{name} = [{r.min:g}, {r.max:g}]")
        for role in ("public", "private"):
            src = getattr(self.data, role)
            if src is not None and src.attribute_columns and names:
                missing = [n for n in names if n not in src.attribute_columns]
                if missing and role == "private":
                    raise ValueError(f"data.attributes names {missing[0]!r}, which data.private.attribute_columns does not list")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ----------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, raw: dict[str, Any]) -> str:
    """One line per problem: `key = value: what is allowed`."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) if loc else "<config>"
        value: Any = raw
        for p in e["loc"]:
            try:
                value = value[p]
            except (KeyError, IndexError, TypeError):
                value = "<missing>"
                break
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = ".".join(loc[:-1]) or "top level"
            msg = f"unknown key in {parent}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        if loc:
            lines.append(f"config error: {key} = {value!r}: {msg}")
        else:
            lines.append(f"config error: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`finetune.steps=100` -> (["finetune", "steps"], 100). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    return parts, yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides or []:
        parts, value = parse_override(text)
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {} if node.get(p) is None else node[p]
                if not isinstance(node[p], dict):
                    raise ConfigError(f"override {text!r}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, raw)) from None


def read_config_yaml(path: str | Path) -> dict:
    """The mapping a YAML config file holds (its `name` defaulting to the file's stem); one-line
    ConfigErrors for a missing file, a folder, invalid YAML or a non-mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML file (e.g. configs/quickstart.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    raw.setdefault("name", path.stem)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    return config_from_dict(apply_overrides(read_config_yaml(path), overrides or []))
