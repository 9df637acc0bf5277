"""Sampling a labeled cohort from a trained generator.

`dpgen.load(run_dir)` returns a `DiffusionGenerator`; `.generate(n, labels=..., seed=...)`
gives tensors and `.save_cohort(path, ...)` writes files. Batches come from per-batch seeded
generators, so the same (seed, labels, batch size) reproduces a cohort bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dpgen.data.cohort import write_class_grids, write_cohort_npz
from dpgen.data.dataset import from_model_range
from dpgen.models import ConditionalDiffusion, DiffusionSpec
from dpgen.models.diffusion import make_sample_scheduler
from dpgen.privacy.engine import step_generator
from dpgen.training.common import load_weights, resolve_device


class DiffusionGenerator:
    def __init__(self, model: ConditionalDiffusion, info: dict | None = None, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.spec: DiffusionSpec = model.spec
        self.info = info or {}
        self.device = torch.device(device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device="auto") -> "DiffusionGenerator":
        weights, spec, info = load_weights(Path(path))
        model = ConditionalDiffusion(DiffusionSpec(**spec))
        model.load_state_dict(weights)
        return cls(model, info, resolve_device(device))

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def _check_labels(self, labels) -> torch.Tensor:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise ValueError(
                f"label {int(bad[0])} does not exist: this generator knows classes 0..{self.num_classes - 1}"
            )
        return labels

    @torch.no_grad()
    def generate(
        self,
        n: int | None = None,
        labels=None,
        seed: int = 0,
        sampler: str = "ddim",
        steps: int = 50,
        guidance_scale: float = 1.0,
        batch_size: int = 256,
        progress: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1], shape (n, C, *spatial), and their labels.

        `labels`: one label per image; default: classes in turn. `guidance_scale` 1 is the
        plain conditional model; > 1 is classifier-free guidance towards the label.
        """
        if labels is None:
            if n is None:
                raise ValueError("give n or labels")
            labels = torch.arange(n) % self.num_classes
        labels = self._check_labels(labels)
        if n is not None and n != len(labels):
            raise ValueError(f"n={n} but {len(labels)} labels given")
        out = []
        scheduler = make_sample_scheduler(self.spec, sampler)
        bar = tqdm(total=len(labels), desc="sample", disable=not progress, dynamic_ncols=True)
        for b, start in enumerate(range(0, len(labels), batch_size)):
            y = labels[start:start + batch_size].to(self.device)
            g = step_generator(seed, b, "sample")
            x = torch.randn((len(y), *self.spec.image_shape), generator=g).to(self.device)
            scheduler.set_timesteps(steps)
            null = torch.full_like(y, self.spec.num_classes)
            for t in scheduler.timesteps:
                tt = torch.full((len(y),), int(t), device=self.device, dtype=torch.long)
                eps = self.model(x, tt, y)
                if guidance_scale != 1.0:
                    eps_u = self.model(x, tt, null)
                    eps = eps_u + guidance_scale * (eps - eps_u)
                x = scheduler.step(eps, t, x, generator=g if sampler == "ddpm" else None).prev_sample
            out.append(x.clamp(-1, 1).cpu())
            bar.update(len(y))
        bar.close()
        return torch.cat(out), labels

    def save_cohort(self, folder: str | Path, images: torch.Tensor, labels: torch.Tensor,
                    class_names: list[str] | None = None) -> dict:
        folder = Path(folder)
        arr = from_model_range(images)
        lab = labels.cpu().numpy()
        npz = write_cohort_npz(folder / "cohort.npz", arr, lab)
        grids = write_class_grids(folder, arr, lab, class_names)
        return {"npz": str(npz), "grids": [str(g) for g in grids], "n": len(lab),
                "class_counts": {int(k): int((lab == k).sum()) for k in np.unique(lab)}}


def load(run_dir: str | Path, device: str = "auto", stage: str | None = None) -> DiffusionGenerator:
    """The generator of a finished run (fine-tuned weights, else pretrained)."""
    ck = Path(run_dir) / "checkpoints"
    names = [f"{stage}.safetensors"] if stage else ["finetune.safetensors", "pretrain.safetensors"]
    for name in names:
        if (ck / name).is_file():
            return DiffusionGenerator.from_checkpoint(ck / name, device=device)
    raise FileNotFoundError(f"{run_dir}: no trained generator (looked for {', '.join(names)} in {ck})")
