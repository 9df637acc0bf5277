"""Sampling a labeled cohort from a trained generator.

`dpgen.load(run_dir)` returns the generator of a run (a `DiffusionGenerator`,
`LatentDiffusionGenerator` or `GANGenerator`: the generator the family registry,
dpgen.models.registry, names for the family stored in the checkpoint); `.generate(n, labels=..., attributes=..., seed=...)` gives tensors,
`.save_cohort(folder, images, labels)` writes them, and `.sample_cohort(folder, ...)` generates
and streams batches to disk (cohorts larger than memory).

Reproducibility: every image i has its own noise stream, seeded from (seed, i), used for its
starting noise and for any stochastic sampler step. So the same seed, labels and attributes
give the same cohort bit for bit on the same device and batch size, and the noise an image
gets does not depend on the batch it falls in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from dpgen.data.cohort import CohortWriter, write_class_grids, write_cohort_npz
from dpgen.data.dataset import from_model_range
from dpgen.data.nifti import write_nifti
from dpgen.core.device import resolve_device
from dpgen.core.seeding import step_generator
from dpgen.models.conditioning import AttributeSpace
from dpgen.models.diffusion import SAMPLERS, make_sample_scheduler
from dpgen.models.latent import LatentDiffusion
from dpgen.models.registry import build_from_checkpoint, family
from dpgen.rundir import RunDir

CPU_BATCH = 256


class Samples(tuple):
    """(images, labels), as a tuple, with `.attributes` (raw values, or None) alongside."""

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor, attributes: torch.Tensor | None = None):
        obj = super().__new__(cls, (images, labels))
        obj.attributes = attributes
        return obj

    @property
    def images(self) -> torch.Tensor:
        return self[0]

    @property
    def labels(self) -> torch.Tensor:
        return self[1]


def image_generators(seed: int, start: int, n: int) -> list[torch.Generator]:
    return [step_generator(seed, i, "sample") for i in range(start, start + n)]


def _randn(shape, gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


class Generator:
    """What every family shares: condition checks, batching, per-image seeds, cohort files."""

    family = "?"

    def __init__(self, model: torch.nn.Module, spec, info: dict | None = None, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.spec = spec
        self.info = info or {}
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device="auto") -> "Generator":
        gen = from_checkpoint(path, device)
        if cls is not Generator and not isinstance(gen, cls):
            raise ValueError(f"{path} holds a {gen.family!r} generator, not a {cls.family!r} one")
        return gen

    # ------------------------------------------------------------------ what it knows
    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.spec.image_shape)

    @property
    def attribute_space(self) -> AttributeSpace:
        return self.spec.attributes

    @property
    def attribute_names(self) -> list[str]:
        return list(self.attribute_space.names)

    def _check_labels(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise ValueError(
                f"label {int(bad[0])} does not exist: this generator knows classes 0..{self.num_classes - 1}"
            )
        return labels

    def _conditions(self, n, labels, attributes) -> tuple[torch.Tensor, torch.Tensor | None]:
        if labels is None:
            if n is None:
                raise ValueError("give n or labels")
            labels = torch.arange(n) % self.num_classes
        labels = self._check_labels(labels)
        if n is not None and n != len(labels):
            raise ValueError(f"n={n} but {len(labels)} labels given")
        attrs = None
        if attributes is not None:
            attrs = self.attribute_space.check(attributes, len(labels))
        return labels, attrs

    def resolve_batch_size(self, batch_size: int | str, guidance_scale: float = 1.0) -> int:
        """'auto': fill the GPU (measured on a small batch); CPU_BATCH on a CPU."""
        if batch_size != "auto":
            return int(batch_size)
        if self.device.type != "cuda":
            return CPU_BATCH
        probe = 4
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.no_grad():
            self._sample_batch(torch.zeros(probe, dtype=torch.long), None, image_generators(0, 0, probe), "ddim", 1,
                               guidance_scale)
        per_image = max(1, (torch.cuda.max_memory_allocated(self.device) - base) / probe)
        free, _ = torch.cuda.mem_get_info(self.device)
        return int(max(probe, min(4096, 0.7 * free / per_image)))

    # ------------------------------------------------------------------ sampling
    def iter_batches(self, labels: torch.Tensor, attributes: torch.Tensor | None, *, seed: int, sampler: str, steps: int,
                     guidance_scale: float, batch_size: int | str, progress: bool = False
                     ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields (start index, images in [-1, 1] on the CPU) batch by batch."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        bs = self.resolve_batch_size(batch_size, guidance_scale)
        normed = None if attributes is None else self.attribute_space.normalize(attributes)
        bar = tqdm(total=len(labels), desc="sample", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(labels), bs):
            y = labels[start:start + bs]
            a = None if normed is None else normed[start:start + bs]
            gens = image_generators(seed, start, len(y))
            with torch.no_grad():
                x = self._sample_batch(y, a, gens, sampler, steps, guidance_scale)
            bar.update(len(y))
            yield start, x.clamp(-1, 1).cpu()
        bar.close()

    def generate(self, n: int | None = None, labels=None, attributes=None, seed: int = 0, sampler: str = "ddim",
                 steps: int = 50, guidance_scale: float = 1.0, batch_size: int | str = 256,
                 progress: bool = False) -> Samples:
        """Images in [-1, 1], shape (n, C, *spatial), their labels (and `.attributes`).

        `labels`: one per image (default: classes in turn). `attributes`: a dict
        {name: value or list of n values} or an (n, A) array, within the trained ranges;
        default: unspecified. `guidance_scale` 1 is the plain conditional model; > 1 is
        classifier-free guidance towards the condition (diffusion families).
        """
        labels, attrs = self._conditions(n, labels, attributes)
        out = [x for _, x in self.iter_batches(labels, attrs, seed=seed, sampler=sampler, steps=steps,
                                               guidance_scale=guidance_scale, batch_size=batch_size, progress=progress)]
        images = torch.cat(out) if out else torch.zeros((0, *self.image_shape))
        return Samples(images, labels, attrs)

    def _sample_batch(self, labels, attributes, gens, sampler, steps, guidance_scale) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ files
    def _nifti_default(self, nifti: bool | None) -> bool:
        return len(self.image_shape) == 4 if nifti is None else bool(nifti)

    def save_cohort(self, folder: str | Path, images: torch.Tensor, labels: torch.Tensor,
                    class_names: list[str] | None = None, attributes: torch.Tensor | None = None,
                    nifti: bool | None = None) -> dict:
        """Write tensors from `generate` as a cohort (npz + grids; NIfTI + labels.csv for 3D)."""
        if isinstance(images, Samples):
            images, labels, attributes = images[0], images[1], images.attributes
        folder = Path(folder)
        arr = from_model_range(images)
        lab = torch.as_tensor(labels).cpu().numpy()
        attrs = None if attributes is None else torch.as_tensor(attributes).cpu().numpy()
        writer = CohortWriter(folder, len(lab), arr.shape[1:], self.attribute_names if attrs is not None else None,
                              self._nifti_default(nifti), class_names)
        writer.write(0, arr, lab, attrs)
        return writer.close()

    def sample_cohort(self, folder: str | Path, n: int | None = None, labels=None, attributes=None, *, seed: int = 0,
                      sampler: str = "ddim", steps: int = 50, guidance_scale: float = 1.0,
                      batch_size: int | str = 256, class_names: list[str] | None = None, nifti: bool | None = None,
                      progress: bool = False) -> dict:
        """Generate and stream a cohort to `folder` batch by batch (memory: one batch)."""
        labels, attrs = self._conditions(n, labels, attributes)
        lab = labels.numpy()
        raw = None if attrs is None else attrs.numpy()
        writer = CohortWriter(Path(folder), len(lab), self.image_shape, self.attribute_names if raw is not None else None,
                              self._nifti_default(nifti), class_names)
        for start, x in self.iter_batches(labels, attrs, seed=seed, sampler=sampler, steps=steps,
                                          guidance_scale=guidance_scale, batch_size=batch_size, progress=progress):
            b = len(x)
            writer.write(start, from_model_range(x), lab[start:start + b], None if raw is None else raw[start:start + b])
        return writer.close()


def _denoise(unet, spec, shape, labels, attributes, gens, sampler, steps, guidance_scale, device) -> torch.Tensor:
    """Reverse diffusion for one batch (pixels or latents), classifier-free guided."""
    scheduler = make_sample_scheduler(spec, sampler)  # fresh per batch: multistep solvers keep history
    scheduler.set_timesteps(steps)
    y = labels.to(device)
    x = _randn(shape, gens).to(device)
    null = torch.full_like(y, spec.num_classes)
    kw, kw_null = {}, {}
    if spec.attribute_names:
        b = len(y)
        if attributes is None:
            kw = {"attributes": torch.zeros(b, len(spec.attribute_names), device=device),
                  "attr_mask": torch.zeros(b, device=device)}
        else:
            kw = {"attributes": attributes.to(device), "attr_mask": torch.ones(b, device=device)}
        kw_null = {"attributes": torch.zeros_like(kw["attributes"]), "attr_mask": torch.zeros(b, device=device)}
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((len(y),), int(t), device=device, dtype=torch.long)
        xin = scheduler.scale_model_input(x, t)
        eps = unet(xin, tt, y, **kw)
        if guidance_scale != 1.0:
            eps_u = unet(xin, tt, null, **kw_null)
            eps = eps_u + guidance_scale * (eps - eps_u)
        x = scheduler.step(eps, t, x, generator=gens if sampler == "ddpm" else None).prev_sample
    return x


class DiffusionGenerator(Generator):
    family = "diffusion"

    def _sample_batch(self, labels, attributes, gens, sampler, steps, guidance_scale):
        return _denoise(self.model, self.spec, self.spec.image_shape, labels, attributes, gens, sampler, steps,
                        guidance_scale, self.device)


class LatentDiffusionGenerator(Generator):
    family = "latent_diffusion"

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.spec.unet.image_shape)

    def _sample_batch(self, labels, attributes, gens, sampler, steps, guidance_scale):
        model: LatentDiffusion = self.model
        z = _denoise(model.unet, self.spec.unet, self.latent_shape, labels, attributes, gens, sampler, steps,
                     guidance_scale, self.device)
        return model.decode(z)


class GANGenerator(Generator):
    family = "cgan"

    def _sample_batch(self, labels, attributes, gens, sampler, steps, guidance_scale):
        if guidance_scale != 1.0:
            raise ValueError("guidance_scale applies to diffusion models; a cGAN samples without guidance (1.0)")
        g = self.model.generator
        z = _randn((self.spec.latent_dim,), gens).to(self.device)
        y = labels.to(self.device)
        a = m = None
        if attributes is not None:
            a, m = attributes.to(self.device), torch.ones(len(y), device=self.device)
        return g(z, y, a, m)


def from_checkpoint(path: str | Path, device="auto") -> Generator:
    """The generator a weights file describes (safetensors + spec; never unpickles)."""
    name, model, spec, info = build_from_checkpoint(Path(path))
    return family(name).generator_class(model, spec, info, resolve_device(device))


def load(run_dir: str | Path, device: str = "auto", stage: str | None = None) -> Generator:
    """The generator of a run: its DP fine-tuned weights.

    A run whose fine-tuning has not run yet holds only the public pretrained model; loading it
    is an error unless asked for explicitly with `stage="pretrain"` (a run configured with
    `finetune.steps: 0` has the pretrained model as its generator and loads it by default).
    `stage="finetune"` or `"pretrain"` loads that checkpoint."""
    rd = RunDir(Path(run_dir))
    weights = {"finetune": rd.finetune_weights, "pretrain": rd.pretrain_weights}
    if stage is not None:
        if stage not in weights:
            raise ValueError(f"stage={stage!r}: choose 'finetune' (the DP fine-tuned generator) or 'pretrain' "
                             f"(the public pretrained one)")
        if not weights[stage].is_file():
            raise FileNotFoundError(f"{run_dir}: no {stage} checkpoint ({weights[stage]} is missing)")
        return from_checkpoint(weights[stage], device=device)
    if rd.finetune_weights.is_file():
        return from_checkpoint(rd.finetune_weights, device=device)
    if not rd.root.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if rd.pretrain_weights.is_file():
        done = _completed(rd).get("finetune")
        if isinstance(done, dict) and not done.get("steps"):  # finetune.steps: 0 -- the run's generator is public
            return from_checkpoint(rd.pretrain_weights, device=device)
        raise FileNotFoundError(
            f"{run_dir} has no DP fine-tuned generator yet, only the public pretrained one: run `dpgen finetune "
            f"{run_dir}` first (or, for the public model on purpose, dpgen.load(run_dir, stage='pretrain'))"
        )
    if rd.config_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no trained generator yet (its pretraining has not finished); finish the "
                                f"run first: dpgen run {rd.config_path} --run-dir {rd.root} --resume")
    raise FileNotFoundError(f"{run_dir}: no trained generator (no checkpoints/); not a dpgen run directory?")


def _completed(rd: RunDir) -> dict:
    try:
        state = rd.state()
    except (OSError, ValueError):
        return {}
    return state.get("completed") or {} if isinstance(state, dict) else {}


__all__ = ["Generator", "DiffusionGenerator", "LatentDiffusionGenerator", "GANGenerator", "Samples", "load",
           "from_checkpoint", "write_class_grids", "write_cohort_npz", "write_nifti"]
