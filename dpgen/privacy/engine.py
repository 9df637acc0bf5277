"""DP-SGD on Opacus' parts, with the checks that make the guarantee true.

What this module adds on top of Opacus (GradSampleModule + DPOptimizer), and why:

- `preflight`: compares Opacus' per-sample gradients with per-sample autograd on the real
  model and loss, before any private data is touched. Opacus' hooks give silently wrong conv
  per-sample gradients when a conv input is channels-last (after diffusers' attention, inside
  MONAI's AutoencoderKL); `make_conv_inputs_contiguous` is the fix and the preflight is the
  proof, for whatever model is being trained.
- Privacy units and noise multiplicity: each logical batch is a Poisson sample of *units*
  (subjects when subject IDs exist, else images). Every row (image x draw) gets a group id,
  and per-sample gradients are folded into one gradient per unit before Opacus clips them,
  so a subject with many images, or an image with K (timestep, noise) draws, contributes one
  clipped gradient. Folding happens after every backward pass, so memory scales with the
  physical batch, never with batch x K.
- Speed (`DPGradSampleModule`): conv per-sample gradients come from one grouped convolution
  backward instead of Opacus' unfold + per-sample matmul, and in hooks mode autograd no
  longer computes the conv weights' batch gradient that DP-SGD throws away; fresh per-sample
  gradients are handed to Opacus without its zero-fill-and-copy (`_owning`). Measured on the
  quickstart UNet (batch 32, 2 CPU threads): a DP step costs 1.55x a non-private one
  (benchmarks/dp_overhead.py, benchmarks/RESULTS.md). The preflight checks this path.
- Steps are deterministic functions of (secret seed, step): the Poisson sample, the per-row
  draws and the DP noise come from per-step generators of the mechanism's secret streams
  (`dpgen.privacy.randomness`), which `dpgen.privacy.dpsgd.DPSGDLoop` hands to `DPSGD.step`.
  A run killed and resumed from its last checkpoint recomputes exactly the same steps. The
  noise generator lives on the parameters' device (Opacus draws the noise there).
"""

from __future__ import annotations

import copy
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.grad_sample.conv import compute_conv_grad_sample as _opacus_conv_grad_sample
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from dpgen.privacy.randomness import new_secret_seed, step_generator  # noqa: F401  (re-exported)

# loss_fn(model, batch) -> per-row losses of shape (B,). `batch` holds every random input
# already drawn, so the same rows give the same losses in the batched and one-by-one passes.
LossFn = Callable[[nn.Module, dict], torch.Tensor]

PREFLIGHT_TOLERANCE = 1e-4
# Opacus' hooks fire on module outputs when the input needs no grad; harmless, but noisy.
warnings.filterwarnings("ignore", message="Full backward hook is firing")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class PrivacyError(RuntimeError):
    """Training would not have the privacy guarantee it claims: refuse to run."""


# ----------------------------------------------------------------------------- model fixes


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def make_conv_inputs_contiguous(model: nn.Module) -> nn.Module:
    """Give every conv a contiguous (channels-first) input.

    Opacus' conv grad sampler unfolds the *stored* activation; a channels-last activation
    makes it compute per-sample gradients of the wrong layout (measured: 96% relative error)
    while training runs normally. A forward pre-hook costs one copy where the input was not
    contiguous and nothing elsewhere.
    """
    for m in model.modules():
        if isinstance(m, _CONV) and not getattr(m, "_dpgen_contiguous", False):
            m.register_forward_pre_hook(_contiguous_input)
            m._dpgen_contiguous = True
    return model


# ----------------------------------------------------------------------------- per-sample gradients


def _conv_grad_sample(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample conv gradients as one grouped convolution backward (the batch folded into groups).

    Opacus' conv sampler materialises the unfolded input (im2col, k^d times the activation)
    and multiplies it per sample: measured on the quickstart UNet on CPU, more than half of
    the extra time of a DP step. With the batch folded into the channel groups, the weight
    gradient of one convolution *is* the stack of per-sample weight gradients, and the
    convolution backend computes it without the unfold copy (2-5x faster per 2D layer, 4-13x
    per 3D layer). The preflight checks it against autograd like any other sampler. Anything
    else goes to Opacus' sampler unchanged: string padding, non-zero padding modes, empty
    batches, and non-contiguous (channels-last) inputs, which `make_conv_inputs_contiguous`
    (always installed by DPSGD) is what makes right, and which the preflight is there to catch.
    """
    x = activations[0]
    n = x.shape[0]
    if n == 0 or isinstance(layer.padding, str) or layer.padding_mode != "zeros" or not x.is_contiguous():
        return _opacus_conv_grad_sample(layer, activations, backprops)
    x = x.to(backprops.dtype)
    ret = {}
    w = layer.weight
    if w.requires_grad:
        dims = x.ndim - 2
        size = (n * w.shape[0], *w.shape[1:])
        grad_w = torch.ops.aten.convolution_backward(
            backprops.reshape(1, n * backprops.shape[1], *backprops.shape[2:]),
            x.reshape(1, n * x.shape[1], *x.shape[2:]),
            backprops.new_empty(1).expand(size),  # only the shape is read
            None, list(layer.stride), list(layer.padding), list(layer.dilation), False, [0] * dims,
            n * layer.groups, (False, True, False),
        )[1]
        ret[w] = grad_w.view(n, *w.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, backprops.shape[1], -1).sum(dim=2)
    return ret


_CONV_SAMPLED = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_forward_weights_detached(self: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias):
    return type(self)._conv_forward(self, x, weight.detach(), None if bias is None else bias.detach())


def _owning(sampler):
    """Wrap a grad sampler so that a fresh, full-batch per-sample gradient becomes the
    parameter's `_current_grad_sample` as it is. Opacus would first allocate a zero buffer of
    the same size and copy the gradient into it (a fill and a copy of batch x parameters
    floats per parameter and backward pass: ~25 ms of a 0.43 s quickstart DP step). Anything
    else (a partial batch, a second pass over a tied parameter, a tensor sharing memory with
    the layer's activations or output gradients) goes back to Opacus' own accumulation."""

    def owning_sampler(layer: nn.Module, activations, backprops: torch.Tensor) -> dict:
        out = sampler(layer, activations, backprops)
        shared = {t.untyped_storage().data_ptr() for t in (*activations, backprops) if isinstance(t, torch.Tensor)}
        rest = {}
        for p, gs in out.items():
            if (p.requires_grad and not hasattr(p, "_current_grad_sample") and gs.shape[0] == layer.max_batch_len
                    and gs._base is None and gs.untyped_storage().data_ptr() not in shared):
                p._current_grad_sample = gs
            else:
                rest[p] = gs
        return rest

    return owning_sampler


class DPGradSampleModule(GradSampleModule):
    """Opacus' GradSampleModule with dpgen's conv sampler (hooks mode; functorch unchanged).

    A subclass, not `register_grad_sampler`, so Opacus' global registry stays as shipped.

    In hooks mode the convs' weights are also taken out of autograd's graph: DP-SGD never
    uses the batch gradient autograd would compute for them (their per-sample gradients come
    from the sampler, from activations and output gradients alone), and on CPU that batch
    weight gradient is a sizeable part of a UNet's backward pass. So that every conv still
    gets its output gradient, floating-point inputs that do not require grad are made to
    (`x + leaf` with a zero leaf: same values; inputs that already require grad are left alone,
    so a GAN's generator still gets its gradient through the discriminator). `_close` undoes both.
    """

    GRAD_SAMPLERS = {t: _owning(f) for t, f in
                     {**GradSampleModule.GRAD_SAMPLERS, **{c: _conv_grad_sample for c in _CONV_SAMPLED}}.items()}

    def __init__(self, m: nn.Module, **kwargs):
        super().__init__(m, **kwargs)
        self._detached_convs = []
        if not kwargs.get("force_functorch", False):
            for mod in self._module.modules():
                if (type(mod) in _CONV_SAMPLED and "_conv_forward" not in vars(mod)
                        and any(p.requires_grad for p in mod.parameters(recurse=False))):
                    mod._conv_forward = types.MethodType(_conv_forward_weights_detached, mod)
                    self._detached_convs.append(mod)

    @staticmethod
    def _grad_input(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and not a.requires_grad:
            return a + torch.zeros((), dtype=a.dtype, device=a.device, requires_grad=True)
        return a

    def forward(self, *args, **kwargs):
        if self._detached_convs and self.hooks_enabled and torch.is_grad_enabled():
            args = tuple(self._grad_input(a) for a in args)
            kwargs = {k: self._grad_input(v) for k, v in kwargs.items()}
        return super().forward(*args, **kwargs)

    def _close(self):
        for mod in self._detached_convs:
            del mod._conv_forward
        self._detached_convs = []
        super()._close()


def validate_model(model: nn.Module) -> None:
    """Opacus' validator: BatchNorm and other layers that mix samples are refused."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise PrivacyError(
            "model has layers DP-SGD cannot train: "
            + "; ".join(str(e) for e in errors[:5])
            + " (use GroupNorm instead of BatchNorm)"
        )


# ----------------------------------------------------------------------------- preflight


@dataclass
class PreflightReport:
    mode: str
    max_relative_error: float
    errors: dict[str, float] = field(default_factory=dict)  # parameter -> relative error
    failed: list[str] = field(default_factory=list)
    tolerance: float = PREFLIGHT_TOLERANCE
    batch_size: int = 0
    zero_parameters_perturbed: int = 0  # all-zero parameters given random values for the check
    input_shapes: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        worst = sorted(self.errors.items(), key=lambda kv: -kv[1])[:5]
        return {
            "mode": self.mode, "passed": self.passed, "tolerance": self.tolerance,
            "max_relative_error": self.max_relative_error, "failed_parameters": self.failed,
            "worst": dict(worst), "batch_size": self.batch_size, "dtype": "float64",
            "zero_parameters_perturbed": self.zero_parameters_perturbed, "input_shapes": self.input_shapes,
        }


def _rows(batch: dict, idx) -> dict:
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}


def preflight(
    model: nn.Module,
    loss_fn: LossFn,
    batch: dict,
    mode: str = "hooks",
    tolerance: float = PREFLIGHT_TOLERANCE,
) -> PreflightReport:
    """Opacus per-sample gradients vs. per-sample autograd, on copies of `model`.

    `batch` should be random data of the private data's shape (the check spends no privacy).
    Runs in float64 so that a failure means a wrong gradient, not rounding.
    """
    base = copy.deepcopy(model).double().train()
    batch = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}
    n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    names = [name for name, p in base.named_parameters() if p.requires_grad]

    gsm = DPGradSampleModule(copy.deepcopy(base), batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
    loss_fn(gsm, batch).sum().backward()
    opacus_grads = {}
    for name, p in gsm._module.named_parameters():
        if p.requires_grad:
            gs = p.grad_sample
            opacus_grads[name] = torch.cat(gs) if isinstance(gs, list) else gs
    gsm._close()

    ref = {name: [] for name in names}
    for i in range(n):
        single = copy.deepcopy(base)
        loss_fn(single, _rows(batch, slice(i, i + 1))).sum().backward()
        for name, p in single.named_parameters():
            if p.requires_grad:
                ref[name].append(p.grad.clone() if p.grad is not None else torch.zeros_like(p))
    # Relative error per parameter, with the denominator floored at 1e-6 of the whole
    # gradient's norm: some parameters have a true gradient of zero up to rounding (an
    # attention key bias shifts every logit of a query equally, and softmax ignores that),
    # where a pure relative error would compare rounding noise with rounding noise.
    stacked = {name: torch.stack(ref[name]) for name in names}
    floor = 1e-6 * torch.sqrt(sum(r.pow(2).sum() for r in stacked.values())).item()
    errors = {}
    for name in names:
        r = stacked[name]
        g = opacus_grads.get(name)
        if g is None or g.shape != r.shape:
            errors[name] = float("inf")
            continue
        errors[name] = (g - r).norm().item() / max(r.norm().item(), floor, 1e-300)
    failed = [k for k, v in errors.items() if not v <= tolerance]
    return PreflightReport(
        mode=mode, max_relative_error=max(errors.values()) if errors else 0.0, errors=errors, failed=failed,
        tolerance=tolerance, batch_size=n,
    )


def require_preflight(report: PreflightReport) -> None:
    if not report.passed:
        layers = sorted({name.rsplit(".", 1)[0] for name in report.failed})
        raise PrivacyError(
            f"per-sample gradient preflight failed ({report.mode} mode): Opacus' per-sample gradients differ "
            f"from autograd by up to {report.max_relative_error:.3g} (tolerance {report.tolerance:g}) in "
            f"{len(layers)} layer(s): {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}. "
            f"Clipping would act on wrong norms and the DP guarantee would not hold; refusing to train. "
            f"Try finetune.grad_sample_mode=functorch."
        )


# ----------------------------------------------------------------------------- sampling


@dataclass
class PrivacyUnits:
    """Maps units of privacy (subjects or images) to rows of the dataset."""

    unit_of_row: np.ndarray  # (N_rows,) unit index of each image
    rows_of_unit: list[np.ndarray]
    kind: str  # "per subject" | "per image"

    @classmethod
    def from_subjects(cls, subjects: np.ndarray | None, n_rows: int) -> "PrivacyUnits":
        if subjects is None:
            idx = np.arange(n_rows)
            return cls(unit_of_row=idx, rows_of_unit=[np.array([i]) for i in idx], kind="per image")
        _, inverse = np.unique(np.asarray(subjects).astype(str), return_inverse=True)
        rows = [np.flatnonzero(inverse == u) for u in range(inverse.max() + 1)]
        return cls(unit_of_row=inverse, rows_of_unit=rows, kind="per subject")

    def __len__(self) -> int:
        return len(self.rows_of_unit)

    def poisson_sample(self, sample_rate: float, generator: torch.Generator) -> np.ndarray:
        """Each unit independently with probability `sample_rate` (what the accountant assumes)."""
        mask = torch.rand(len(self), generator=generator) < sample_rate
        return np.flatnonzero(mask.numpy())

    def physical_chunks(self, units: np.ndarray, max_rows: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Split sampled units into chunks of at most `max_rows` rows, never splitting a unit.

        Returns (rows, group index of each row within the chunk, number of groups). A unit
        bigger than `max_rows` gets a chunk of its own (clipping needs all of it at once).
        """
        chunks, cur_rows, cur_groups, g = [], [], [], 0
        for u in units:
            r = self.rows_of_unit[u]
            if cur_rows and sum(map(len, cur_rows)) + len(r) > max_rows:
                chunks.append((np.concatenate(cur_rows), np.concatenate(cur_groups), g))
                cur_rows, cur_groups, g = [], [], 0
            cur_rows.append(r)
            cur_groups.append(np.full(len(r), g))
            g += 1
        if cur_rows:
            chunks.append((np.concatenate(cur_rows), np.concatenate(cur_groups), g))
        return chunks


# ----------------------------------------------------------------------------- DP-SGD step


def _fold_grad_samples(params: list[nn.Parameter], group: torch.Tensor, n_groups: int) -> None:
    """Sum the rows of the latest backward pass into one per-sample gradient per group.

    When every row is its own group (one image per unit) the rows are used as they are;
    otherwise a one-hot (groups x rows) matrix product does the sum (index_add_ on CPU is
    an order of magnitude slower for wide rows).
    """
    identity = n_groups == len(group) and bool((group == torch.arange(len(group))).all())
    onehot = None
    for p in params:
        gs = p.grad_sample
        if gs is None:
            continue
        acc, new = (gs[0], gs[1:]) if isinstance(gs, list) else (None, [gs])
        rows = torch.cat(new) if len(new) > 1 else new[0]
        if identity:
            folded = rows
        else:
            if onehot is None or onehot.dtype != rows.dtype or onehot.device != rows.device:
                onehot = torch.zeros(n_groups, len(group), dtype=rows.dtype, device=rows.device)
                onehot[group.to(rows.device), torch.arange(len(group), device=rows.device)] = 1
            folded = (onehot @ rows.reshape(len(group), -1)).view((n_groups,) + rows.shape[1:])
        p.grad_sample = folded if acc is None else acc.add_(folded)


class DPSGD:
    """One DP-SGD step = Poisson sample of units -> physical chunks -> K draws each ->
    per-unit gradients -> Opacus clipping, noise and optimizer step."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        grad_sample_mode: str = "hooks",
    ):
        from dpgen.distributed import world

        make_conv_inputs_contiguous(model)
        self.model = model
        self.world = world()
        if self.world.distributed:
            # Opacus' distributed path: DPDDP broadcasts rank 0's weights; the optimizer adds
            # the noise on rank 0 only and all-reduces the clipped sums (dpgen.distributed).
            model = DPDDP(model)
        self.gsm = DPGradSampleModule(
            model, batch_first=True, loss_reduction="sum", force_functorch=grad_sample_mode == "functorch"
        )
        # loss_reduction="mean": Opacus divides the noised sum by the *expected* batch size
        # (a fixed number, as the analysis of Poisson sampling requires); in a distributed run
        # by each rank's expected share, and by the world size in the all-reduce.
        optimizer_cls = DistributedDPOptimizer if self.world.distributed else DPOptimizer
        self.optimizer = optimizer_cls(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(1.0, expected_batch_size) / self.world.size,
            loss_reduction="mean",
        )
        self.params = [p for p in self.gsm.parameters() if p.requires_grad]

    def step(
        self,
        chunks: list[tuple[np.ndarray, np.ndarray, int]],
        make_batch: Callable[[int, np.ndarray, int], dict],
        loss_fn: LossFn,
        noise_multiplicity: int,
        noise_generator: torch.Generator,
    ) -> float:
        """Run one logical step; returns the mean training loss of the rows seen."""
        self.optimizer.generator = noise_generator
        self.optimizer.zero_grad(set_to_none=True)
        total, count = 0.0, 0
        if not chunks:  # an empty Poisson sample is still a step: noise only
            for p in self.params:
                p.grad_sample = torch.zeros((0,) + p.shape, dtype=p.dtype, device=p.device)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        for i, (rows, group, n_groups) in enumerate(chunks):
            group_t = torch.as_tensor(group)
            # Each unit's gradient is the mean over its rows and its K draws.
            rows_per_group = torch.bincount(group_t, minlength=n_groups).float()
            weight = 1.0 / (noise_multiplicity * rows_per_group[group_t])
            for k in range(noise_multiplicity):
                batch = make_batch(i, rows, k)
                losses = loss_fn(self.gsm, batch)
                (losses * weight.to(losses.device)).sum().backward()
                _fold_grad_samples(self.params, group_t, n_groups)
                total += losses.detach().sum().item()
                count += len(rows)
            last = i == len(chunks) - 1
            if not last:
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total / max(count, 1)

    def close(self) -> nn.Module:
        """Remove Opacus' hooks and return the plain model."""
        self.gsm._close()
        return self.model
