"""Feature extractors for fidelity metrics, and streaming feature extraction.

Three kinds, one interface (`FeatureExtractor`: a name that goes into every metric label, and a
module mapping model-range images (N, C, *spatial) in [-1, 1] to features (N, D)):

- "public-encoder" (default, offline): a small GroupNorm CNN that dpgen trains on the *public*
  dataset (its labels, plus which of 4 rotations was applied: a cheap self-supervised task that
  keeps the penultimate features from collapsing onto the two-class decision direction). Public
  data only, so it costs no privacy. It is cached in RUN/evaluation/public_encoder.safetensors
  (`RunDir.public_encoder_file`)
  and its metrics are labeled "FD[public-encoder]" etc. so nobody mistakes them for Inception
  FID: the numbers are comparable between runs that use the same public data, not with
  published FIDs. A fixed seed makes the encoder the same for every run of the same public data.
  Where the public data cannot train it (no public source, or 2D public data for 3D private
  data), a randomly initialised encoder with a fixed seed is used and labeled "random-encoder".
- "inception": torchmetrics' InceptionV3 (torch-fidelity's FID network) from a local weights file;
  needs the optional extra (`pip install dpgen[inception]`) and never downloads anything.
- any torch module the caller passes (`FeatureExtractor.from_module(module, name)`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dpgen.config import PublicTransform
from dpgen.data import ImageDataset, load_dataset, to_model_range
from dpgen.data.transform import fit_to_shape
from dpgen.evaluation.nets import CNNSpec, SmallCNN
from dpgen.rundir import RunDir, load_tensors, save_tensors_atomic

ENCODER_VERSION = 2  # bump when the architecture or recipe changes: cached encoders are retrained
ENCODER_SEED = 0
ENCODER_EPOCHS = 6
ENCODER_BATCH = 128
ENCODER_LR = 2e-3
ROTATIONS = 4


class EvaluationError(ValueError):
    """An evaluation problem phrased for the user (missing extra, bad weights file, ...)."""


@dataclass
class FeatureExtractor:
    name: str  # goes into every metric label: FD[<name>]
    module: nn.Module
    description: str = ""
    feature_dim: int | None = None
    info: dict = field(default_factory=dict)

    @classmethod
    def from_module(cls, module: nn.Module, name: str = "custom", description: str = "") -> "FeatureExtractor":
        """Any torch module mapping (N, C, *spatial) floats in [-1, 1] to (N, D) features."""
        if not isinstance(module, nn.Module):
            raise EvaluationError(f"a feature extractor must be a torch.nn.Module, got {type(module).__name__}")
        if name in ("inception", "public-encoder", "random-encoder", "real-classifier"):
            raise EvaluationError(f"name {name!r} is reserved for dpgen's own extractors; name your module differently")
        return cls(name=name, module=module, description=description or f"user-supplied module {type(module).__name__}")

    def label(self, metric: str) -> str:
        return f"{metric}[{self.name}]"

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "feature_dim": self.feature_dim,
                "is_inception": self.name == "inception", **self.info}


class _EncoderFeatures(nn.Module):
    def __init__(self, net: SmallCNN):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


# ----------------------------------------------------------------------------- extraction


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "features",
    intensity_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Features of images (N, C, *spatial), streamed in batches; float64 (N, D) on CPU.

    Images are mapped to [-1, 1] exactly as `ImageDataset.model_tensor` does (uint8: /255; float
    images: the source's fixed `intensity_range`). Only one batch is in float form at a time,
    so memory stays flat for large cohorts.
    """
    module = extractor.module.to(device).eval()
    n = len(images)
    out = []
    bar = tqdm(total=n, desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for start in range(0, n, batch_size):
        x = to_model_range(images[start:start + batch_size], intensity_range).to(device)
        f = module(x)
        if f.ndim != 2 or f.shape[0] != len(x):
            raise EvaluationError(
                f"feature extractor {extractor.name!r} returned shape {tuple(f.shape)} for a batch of {len(x)} "
                f"images; expected ({len(x)}, D)"
            )
        out.append(f.detach().double().cpu())
        bar.update(len(x))
    bar.close()
    feats = torch.cat(out)
    if not torch.isfinite(feats).all():
        raise EvaluationError(f"feature extractor {extractor.name!r} produced NaN or inf features")
    extractor.feature_dim = feats.shape[1]
    return feats


# ----------------------------------------------------------------------------- public encoder


def _rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each image by k*90 degrees in its last two axes (volumes: in-plane)."""
    out = x.clone()
    for r in range(1, ROTATIONS):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out


def _encoder_spec(image_shape: tuple[int, ...], num_public_classes: int) -> CNNSpec:
    dims = len(image_shape) - 1
    widths = [32, 64, 128] if dims == 2 else [16, 32, 64]
    return CNNSpec(in_channels=image_shape[0], num_classes=num_public_classes * ROTATIONS, spatial_dims=dims,
                   widths=widths, feature_dim=64)


def train_public_encoder(
    public: ImageDataset,
    image_shape: tuple[int, ...],
    epochs: int = ENCODER_EPOCHS,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = ENCODER_SEED,
) -> tuple[SmallCNN, dict]:
    """Train the encoder on (public label, rotation) pairs; returns the net and a training record.
    `public` holds images of `image_shape` (dpgen.data.transform.fit_to_shape fits them)."""
    if tuple(public.image_shape) != tuple(image_shape):
        raise EvaluationError(f"public images of shape {public.image_shape} for an encoder of {tuple(image_shape)}")
    k_pub = int(public.labels.max()) + 1
    spec = _encoder_spec(image_shape, k_pub)
    torch.manual_seed(seed)
    net = SmallCNN(spec).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=ENCODER_LR)
    g = torch.Generator().manual_seed(seed)
    n = len(public)
    labels = torch.as_tensor(public.labels)
    steps_per_epoch = max(1, math.ceil(n / ENCODER_BATCH))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ENCODER_LR, total_steps=epochs * steps_per_epoch)
    bar = tqdm(total=epochs * steps_per_epoch, desc="public encoder", disable=not progress, dynamic_ncols=True, leave=False)
    net.train()
    correct = seen = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        correct = seen = 0
        for i in range(steps_per_epoch):
            idx = perm[i * ENCODER_BATCH:(i + 1) * ENCODER_BATCH]
            x = to_model_range(public.images[idx.numpy()], public.intensity_range)
            rot = torch.randint(0, ROTATIONS, (len(idx),), generator=g)
            x = _rotate(x, rot)
            y = labels[idx] * ROTATIONS + rot
            logits = net(x.to(device))
            loss = F.cross_entropy(logits, y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1).cpu() == y).sum())
            seen += len(idx)
            bar.update(1)
    bar.close()
    net.eval()
    record = {"public_dataset": public.name, "public_split": public.split, "public_n": n,
              "public_sha256": public.fingerprint, "epochs": epochs, "seed": seed, "task": "public label x rotation",
              "final_train_accuracy": correct / max(seen, 1), "version": ENCODER_VERSION}
    return net, record


def _random_encoder(image_shape: tuple[int, ...], why: str) -> FeatureExtractor:
    torch.manual_seed(ENCODER_SEED)
    net = SmallCNN(_encoder_spec(image_shape, 1)).eval()
    return FeatureExtractor(
        name="random-encoder", module=_EncoderFeatures(net),
        description=f"randomly initialised GroupNorm CNN (seed {ENCODER_SEED}); {why}",
        info={"trained_on": None, "note": why},
    )


def public_encoder(config, rd, image_shape: tuple[int, ...], device="cpu", progress: bool = True,
                   epochs: int = ENCODER_EPOCHS) -> FeatureExtractor:
    """The default extractor: trained on the public dataset, cached in RUN/evaluation/."""
    image_shape = tuple(int(s) for s in image_shape)
    spec_src = config.data.public
    if spec_src is None:
        return _random_encoder(image_shape, "the config has no public dataset to train an encoder on")
    public = load_dataset(spec_src)
    if public.spatial_dims != len(image_shape) - 1:
        return _random_encoder(
            image_shape, f"the public data {public.name} is {public.spatial_dims}D but the private data is "
            f"{len(image_shape) - 1}D, so no encoder can be trained on it"
        )
    # The encoder sees the private shape: the public images fitted as data.public.transform says
    # (its interpolation), and fully (channels and size) when the config sets no transform.
    public = fit_to_shape(public, image_shape, spec_src.transform or PublicTransform(resize=True, channels=True))
    path = RunDir(Path(rd.root)).public_encoder_file
    want = {"version": ENCODER_VERSION, "public_sha256": public.fingerprint, "image_shape": list(image_shape),
            "epochs": epochs, "public_transform": public.transform}
    net = record = None
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        try:
            record = json.loads(meta.get("record", "{}"))
            spec = CNNSpec(**json.loads(meta["spec"]))
        except (KeyError, TypeError, ValueError):
            record = None
        if record is not None and all(record.get(k) == v for k, v in want.items()):
            net = SmallCNN(spec)
            net.load_state_dict(load_tensors(path))
            net.eval()
        else:
            record = None
    if net is None:
        net, record = train_public_encoder(public, image_shape, epochs=epochs, device=device, progress=progress)
        record["image_shape"] = list(image_shape)
        record["public_transform"] = public.transform
        net = net.cpu()
        save_tensors_atomic(path, net.state_dict(),
                            metadata={"spec": json.dumps(net.spec.to_dict()), "record": json.dumps(record)})
    return FeatureExtractor(
        name="public-encoder", module=_EncoderFeatures(net),
        description=(f"GroupNorm CNN trained by dpgen on the public dataset {public.name} ({public.split}, "
                     f"n={len(public)}; task: label x rotation); penultimate-layer features. Not Inception."),
        info={"trained_on": f"{public.name}/{public.split}", "path": str(path.relative_to(rd.root)),
              "train_accuracy": record.get("final_train_accuracy")},
    )


# ----------------------------------------------------------------------------- the classes' space


def classifier_extractor(model: nn.Module) -> FeatureExtractor:
    """The penultimate features of a classifier trained on the private data (`dpgen evaluate`'s
    ceiling row). Unlike the public encoder it knows the private classes: it is the space in which
    controls made from real images (blurred, lesion masked, one class only, classes swapped) all
    score clearly worse than real (benchmarks/fidelity_controls.py). Internal: fitted to private
    data without DP, like every evaluation number."""
    if not hasattr(model, "features"):
        raise EvaluationError(f"a classifier feature space needs a model with .features(x), got {type(model).__name__}")
    return FeatureExtractor(
        name="real-classifier", module=_EncoderFeatures(model),
        description="penultimate features of the non-private classifier trained on the private train split "
                    "(utility row 'real', seed 0, best epoch on private val); knows the classes; internal",
        info={"trained_on": "private train (internal: no DP)"})


# ----------------------------------------------------------------------------- Inception


class _InceptionFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise EvaluationError("Inception features exist for 2D images only; use the public encoder for volumes")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise EvaluationError(f"Inception takes grey or RGB images, got {x.shape[1]} channels")
        u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.net(u8).reshape(len(x), -1)


def inception_extractor(weights_path: str | Path | None) -> FeatureExtractor:
    """torchmetrics' FID InceptionV3 from a local weights file (torch-fidelity's
    pt_inception-2015-12-05 file). Nothing is downloaded."""
    if not weights_path:
        raise EvaluationError(
            "--feature-extractor inception needs --inception-weights PATH: the local InceptionV3 weights file "
            "torch-fidelity uses (pt_inception-2015-12-05-6726825d.pth); dpgen never downloads weights"
        )
    weights_path = Path(weights_path).expanduser()
    if not weights_path.is_file():
        raise EvaluationError(f"--inception-weights {weights_path}: no such file")
    try:
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ImportError("torch-fidelity is not installed")
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(weights_path))
    except Exception as err:  # ImportError, or a torchvision build that does not match torch
        raise EvaluationError(
            f"Inception FID is unavailable ({type(err).__name__}: {err}). It needs the optional extra "
            f"`pip install 'dpgen[inception]'` (torch-fidelity and a torchvision build that matches your torch; "
            f"the PyPI torchvision wheel is a CUDA build that breaks a CPU-only torch). The default "
            f"--feature-extractor public-encoder works offline."
        ) from None
    return FeatureExtractor(
        name="inception", module=_InceptionFeatures(net),
        description=f"InceptionV3 pool features (torchmetrics/torch-fidelity, weights {weights_path.name})",
        info={"weights": str(weights_path)},
    )


def build_extractor(kind, config, rd, image_shape, device="cpu", progress=True, inception_weights=None,
                    encoder_epochs: int = ENCODER_EPOCHS) -> FeatureExtractor:
    """'public-encoder' | 'inception' | a FeatureExtractor | an nn.Module."""
    if isinstance(kind, FeatureExtractor):
        return kind
    if isinstance(kind, nn.Module):
        return FeatureExtractor.from_module(kind)
    if kind in (None, "public-encoder"):
        return public_encoder(config, rd, image_shape, device=device, progress=progress, epochs=encoder_epochs)
    if kind == "inception":
        return inception_extractor(inception_weights)
    raise EvaluationError(f"unknown feature extractor {kind!r}; use public-encoder, inception or pass a torch module")


__all__ = [
    "FeatureExtractor", "EvaluationError", "extract_features", "public_encoder", "inception_extractor",
    "build_extractor", "train_public_encoder", "classifier_extractor",
]
