"""DP-SGD with dpgen's per-unit gradient engine and Opacus' optimizer, with the checks that
make the guarantee true.

- Per-unit gradients ("hooks" mode, `DPGradSampleModule`, the default): what DP-SGD clips is
  one gradient per privacy unit (a subject when subject IDs exist, else an image): the
  gradient of the unit's loss averaged over its rows and its K noise draws (DPDM's noise
  multiplicity). The engine computes exactly that, layer by layer, with no per-row gradient
  in between: Conv/Linear/GroupNorm layers run as autograd Functions whose backward writes
  per-unit gradients (a conv's is one grouped convolution backward with the units folded into
  the channel groups), autograd never computes the batch weight gradient DP-SGD throws away,
  and there are no module backward hooks. On the CPU, when a pass holds one row per unit, wide
  convs on small maps are ghost-clipped instead (`_ghost_conv_grads`): per-unit norms from Gram
  matrices, the clipped sum as one weighted batch weight gradient, no per-unit gradient in
  memory. Other layers get Opacus' per-row samplers through a tensor hook. "functorch" and
  "opacus" modes use Opacus' GradSampleModule (per-row gradients, summed per unit after each
  pass).
- Passes (`DPSGD.step`): the units of a physical chunk are regrouped so that one
  forward/backward pass holds whole units with all their K draws (max_rows / (rows x K) units
  each), so per-unit work is done once per unit and step, not once per draw, and the per-unit
  buffer is (units per pass) x parameters: memory does not grow with K.
- Clipping, noise, step: Opacus' DPOptimizer (DistributedDPOptimizer in a distributed run),
  with the per-unit norms the engine took while each gradient was in cache (`_PerUnitClip`).
- `preflight`: compares the engine's gradients with per-sample autograd on the real model and
  loss, in float64, per row and per unit (2 rows per unit), before any private data is
  touched (for a ghost-clipped conv: its per-unit norms, a weighted sum and its materialised
  per-unit gradients). Opacus' own hooks
  ("opacus" mode) give silently wrong conv per-sample gradients when a conv input is
  channels-last (after diffusers' attention, inside MONAI's AutoencoderKL);
  `make_conv_inputs_contiguous` is their fix, and the preflight is the proof, for whatever
  model is being trained and whichever mode.
- Speed: benchmarks/dp_overhead.py and benchmarks/RESULTS.md (ratios to a non-private step of
  the quickstart UNet, the latent UNet and the cGAN discriminator, measured alone on a 2-core
  CPU; step memory flat in K).
- Steps are deterministic functions of (secret seed, step): the Poisson sample, the per-row
  draws and the DP noise come from per-step generators of the mechanism's secret streams
  (`dpgen.privacy.randomness`), which `dpgen.privacy.dpsgd.DPSGDLoop` hands to `DPSGD.step`.
  A run killed and resumed from its last checkpoint recomputes exactly the same steps. The
  noise generator lives on the parameters' device (Opacus draws the noise there).
"""
from __future__ import annotations

import contextlib
import copy
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
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


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    if "_dpgen_engine" in vars(module) or not any(p.requires_grad for p in module.parameters(recurse=False)):
        return None  # dpgen's engine reads any layout; a frozen conv has no per-sample gradient
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def make_conv_inputs_contiguous(model: nn.Module) -> nn.Module:
    """Give every conv a contiguous (channels-first) input.

    Opacus' conv grad sampler unfolds the *stored* activation; a channels-last activation
    makes it compute per-sample gradients of the wrong layout (measured: 96% relative error)
    while training runs normally. A forward pre-hook costs one copy where the input was not
    contiguous and nothing elsewhere. It copies only for the convs Opacus' samplers read (in
    "opacus" and "functorch" modes; frozen convs and the convs dpgen's own engine handles, which
    reshapes whatever layout it gets, are left alone).
    """
    for m in model.modules():
        if isinstance(m, _CONV) and not getattr(m, "_dpgen_contiguous", False):
            m.register_forward_pre_hook(_contiguous_input)
            m._dpgen_contiguous = True
    return model


# ----------------------------------------------------------------------------- per-unit gradients
#
# What DP-SGD clips is one gradient per privacy unit: the gradient of the unit's loss averaged
# over its rows and its K draws. dpgen's engine ("hooks" mode) computes exactly that, layer by
# layer, without materialising one gradient per row first:
#
# - A forward pass sees the rows of several units in *slot-major* order: row s * m + u is slot
#   s (one of the unit's rows x draws) of unit u, for m units and S slots each (a `_Layout`).
#   The unit's gradient of a layer is then the sum over its S rows of the rows' gradients, and
#   for a convolution that sum is one grouped convolution backward with the m units folded into
#   the channel groups and the S slots as its batch: (S, m * C, ...) is a free view of the
#   (S * m, C, ...) activation. With K draws of a unit in one pass, the per-unit work is done
#   once per unit instead of once per draw, and the per-unit buffer is m x parameters, not
#   rows x parameters.
# - Conv, Linear and GroupNorm run as autograd Functions (`_ConvUnits`, ...) whose backward
#   returns the input gradient, writes the per-unit parameter gradients to `p.grad_sample`, and
#   returns None for the parameters: autograd never computes the batch weight gradient DP-SGD
#   would throw away, and there are no module backward hooks (Opacus' hooks cost ~28 ms of
#   Python per quickstart step).
# - Other layers with trainable parameters (Embedding, LayerNorm, ...) get Opacus' per-row
#   sampler (or functorch) from a tensor hook on their output, summed over slots.
# The preflight checks every layer of the real model against per-sample autograd, per row
# (S = 1) and per unit (S = 2), in float64.


@dataclass(frozen=True)
class _Layout:
    slots: int  # S: rows per unit in this pass (the unit's rows x the draws of this pass)
    units: int  # m

    @property
    def rows(self) -> int:
        return self.slots * self.units


def _add_grad_sample(p: torch.Tensor, g: torch.Tensor) -> None:
    """Store a per-unit gradient, with its per-unit squared norms taken now, while it is in
    cache (the clipping reads them: `_PerUnitClip`). A second contribution (a layer called twice,
    e.g. a GAN discriminator on real and fake rows; draws of one unit spread over several
    passes) is added out of place (`g` may alias autograd's buffers), and the sum's norms are
    left to the clipping."""
    cur = getattr(p, "grad_sample", None)
    if cur is None:
        if not hasattr(g, "_dpgen_weighted_sum"):  # (a ghost stand-in brings its own norms)
            g._dpgen_sq_norms = torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1).square()
        p.grad_sample = g
    else:
        p.grad_sample = _materialised(cur) + _materialised(g)


def _materialised(gs: torch.Tensor) -> torch.Tensor:
    """The per-unit gradients themselves, also for a ghost stand-in (`_ghost_conv_grads`)."""
    make = getattr(gs, "_dpgen_materialise", None)
    return gs if make is None else make()


# Whether engines built from now on ghost-clip (False: per-unit conv gradients always materialised,
# to compare the two on a model). Each engine keeps the value it was built with (`_Engine.ghost`),
# so that training runs the path its preflight checked.
GHOST_CONVS = True


def _ghost_is_cheaper(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, padding, lay: _Layout) -> bool:
    """Clip this conv's per-unit gradients without materialising them (`_ghost_conv_grads`)?

    Only when the pass holds one row per unit (per-image units at K = 1, or one-row units and
    one-draw passes otherwise). With T output positions, I = in channels x kernel size and O out
    channels, materialising costs T I O per unit plus writing, norming and summing (m, O, I)
    floats; ghost costs the output-gradient Gram (T^2 O) and the patch Gram (`_patch_gram`:
    P^2 x in channels for P padded input pixels, and m P^2 memory). Taken where I O >= 2 T (I + O)
    (measured on CPU: a 7x7 map with 128 channels, not with 64; not on 14x14) and the pixel Gram
    costs no more than materialising (a strided patchify conv on a large map would not).
    On the CPU only: the rounding margin of `_ghost_conv_grads` bounds a sum of products computed
    in the tensors' dtype, which a GPU's convolution need not be (TF32, FFT or Winograd kernels).
    """
    if (not layer._dpgen_engine.ghost or lay.slots != 1 or layer.groups != 1 or g.ndim != 4
            or g.device.type != "cpu"):
        return False
    positions, fan_in, c_out = g.shape[2] * g.shape[3], layer.weight.numel() // layer.weight.shape[0], g.shape[1]
    pixels = (x.shape[2] + 2 * padding[0]) * (x.shape[3] + 2 * padding[1])
    return (fan_in * c_out >= 2 * positions * (fan_in + c_out)
            and pixels * pixels * x.shape[1] <= positions * fan_in * c_out
            and _ghost_rounding(len(g) * positions, g.dtype) < 0.01)


def _ghost_rounding(products: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u): a sum of n products computed in `dtype` (unit roundoff u), in
    any order, is off by at most gamma_n x the sum of the products' magnitudes."""
    n_u = (products + 2) * torch.finfo(dtype).eps / 2  # (+2: the clip-factor product and the cast)
    return n_u / (1 - n_u) if n_u < 1 else float("inf")


def _patch_gram(layer: nn.Module, x: torch.Tensor, padding, out_hw) -> torch.Tensor:
    """(m, T, T) Gram matrices of each row's input patches (x_t . x_t' for output positions t,
    t'), without unfolding: the patch of t covers the padded pixels t * stride + offset, so the
    Gram is the sum over kernel offsets of shifted blocks of the (P, P) Gram of the padded
    pixels. One (P x C) product per row instead of an unfold to (I = C x kernel size, T) and a
    (T x I) product: less work, and torch's CPU unfold was the slowest part."""
    (ph, pw), (sh, sw), (dh, dw), (kh, kw), (ho, wo) = padding, layer.stride, layer.dilation, layer.kernel_size, out_hw
    xp = (F.pad(x, (pw, pw, ph, ph)) if ph or pw else x).double()
    m, _, hp, wp = xp.shape
    flat = xp.reshape(m, xp.shape[1], hp * wp)
    pixels = torch.bmm(flat.transpose(1, 2), flat).view(m, hp, wp, hp, wp)
    # The sum over the kh x kw offsets of the shifted blocks pixels[:, r, c, r, c]. One kernel
    # axis at a time takes kw + kh adds instead of kh x kw (1.64 vs 2.21 ms on a 7x7 map with
    # 128 channels, 32 rows), but the first axis' adds run on blocks that still span the other
    # axis' padded pixels: on a strided layer that can be more work than the direct sum. The
    # plan whose adds touch the fewest elements is taken.
    rows = [slice(i * dh, i * dh + sh * (ho - 1) + 1, sh) for i in range(kh)]
    cols = [slice(j * dw, j * dw + sw * (wo - 1) + 1, sw) for j in range(kw)]
    every = slice(None)
    plans = [  # (elements added, stages: each a list of (row offsets, column offsets) blocks)
        (kh * kw * (ho * wo) ** 2, [[(r, c) for r in rows for c in cols]]),
        (kw * (hp * wo) ** 2 + kh * (ho * wo) ** 2, [[(every, c) for c in cols], [(r, every) for r in rows]]),
        (kh * (ho * wp) ** 2 + kw * (ho * wo) ** 2, [[(r, every) for r in rows], [(every, c) for c in cols]]),
    ]
    gram = pixels
    for blocks in min(plans, key=lambda plan: plan[0])[1]:
        gram = _shifted_sum(gram, blocks)
    return gram.reshape(m, ho * wo, ho * wo)


def _shifted_sum(t: torch.Tensor, blocks: list[tuple[slice, slice]]) -> torch.Tensor:
    """The sum of the blocks t[:, r, c, r, c] of a (m, h, w, h, w) pixel Gram, for (r, c) in `blocks`."""
    out = t[:, blocks[0][0], blocks[0][1], blocks[0][0], blocks[0][1]].clone()
    for r, c in blocks[1:]:
        out.add_(t[:, r, c, r, c])
    return out


def _ghost_conv_grads(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, padding, lay: _Layout) -> torch.Tensor:
    """Per-unit weight gradients of a 2D conv with one row per unit, by book-keeping ghost
    clipping (Li et al. 2022; Bu et al. 2023): unit u's gradient is sum_t g_t x_t^T over the
    output positions t (x_t the input patch of t), so its squared norm is
    sum_{t,t'} (x_t . x_t') (g_t . g_t'), from two T x T Gram matrices (`_patch_gram`); and the
    clipped sum sum_u c_u grad_u is one batch weight gradient with row u's output gradient
    scaled by c_u, taken when the clip factors are known. Returns an empty (units, 0) tensor carrying the
    squared norms, that weighted sum and a way to materialise the gradients (when a second
    contribution must be added: `_add_grad_sample`). The preflight checks the norms and a
    weighted sum against per-sample autograd."""
    # The norm is not computed from the gradient that is summed: the Grams give the exact norm
    # (in float64, far below the rounding of the sum), while the clipped sum is one convolution
    # backward in g's dtype, whose rounding can, where positions cancel, be large next to the
    # unit's true norm. So the norm the clipping reads is the true norm plus a bound on that
    # rounding: gamma_n x sum_t |g_t| |x_t| (`_ghost_rounding`, n = units x positions products per
    # weight), and c_u x (the unit's summed gradient) stays within the clipping norm. (1e-4 of
    # that sum for 64 units on a 7x7 map in float32; 1e-13 in the float64 preflight.)
    gf = g.reshape(len(g), g.shape[1], -1).double()  # (m, O, T)
    gram_x, gram_g = _patch_gram(layer, x, padding, g.shape[2:]), torch.bmm(gf.transpose(1, 2), gf)
    sq = (gram_x * gram_g).sum((1, 2)).clamp_(min=0)  # (a sum of products: a zero norm can round below 0)
    spread = (gram_x.diagonal(dim1=1, dim2=2) * gram_g.diagonal(dim1=1, dim2=2)).clamp_(min=0).sqrt().sum(1)
    margin = _ghost_rounding(len(g) * gram_x.shape[1], g.dtype) * spread
    sq = (sq.sqrt() + margin).square().to(g.dtype)
    versions = (x._version, g._version)

    def unchanged() -> None:
        # The norms were taken now, the sum is taken at the optimizer step: both must see the
        # same activations and output gradients.
        if (x._version, g._version) != versions:
            raise PrivacyError(f"the input or output gradient of {type(layer).__name__} changed in place between "
                               "the backward pass and the clipping; the clipping norms would not match the gradients")

    def weighted_sum(c: torch.Tensor) -> torch.Tensor:
        unchanged()
        return torch.ops.aten.convolution_backward(
            g * c.to(g).view(-1, 1, 1, 1), x, layer.weight.to(g.dtype), None, list(layer.stride), list(padding),
            list(layer.dilation), False, [0, 0], 1, (False, True, False))[1].contiguous()  # (x may be channels-last)

    def materialise() -> torch.Tensor:
        unchanged()
        return _conv_unit_weight_grad(layer, x, g, padding, lay)

    stand_in = g.new_zeros((lay.units, 0))
    stand_in._dpgen_sq_norms = sq
    stand_in._dpgen_weighted_sum = weighted_sum
    stand_in._dpgen_materialise = materialise
    return stand_in


def _per_unit_outer(gs: torch.Tensor, xs: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """sum_s g[s, u] @ x[s, u]^T for (S, m, O, T) and (S, m, I, T) views -> (m, O, I)."""
    if lay.slots == 1:
        return torch.bmm(gs[0], xs[0].transpose(1, 2))
    out = torch.bmm(gs[0], xs[0].transpose(1, 2))
    for s in range(1, lay.slots):
        out.baddbmm_(gs[s], xs[s].transpose(1, 2))
    return out


def _conv_unit_weight_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor, padding, lay: _Layout) -> torch.Tensor:
    """Per-unit weight gradients of a convolution: (m, *weight.shape)."""
    w_shape = layer.weight.shape
    dims = x.ndim - 2
    c_in, c_out = x.shape[1], g.shape[1]
    if (layer.groups == 1 and all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.stride)
            and all(p == 0 for p in padding)):
        # 1x1 convolution: a (batched) matrix product; the grouped-convolution backward of a
        # 1x1 kernel takes a slow per-group path on CPU.
        xs = x.reshape(lay.slots, lay.units, c_in, -1)
        gs = g.reshape(lay.slots, lay.units, c_out, -1)
        return _per_unit_outer(gs, xs, lay).view(lay.units, *w_shape)
    m = lay.units
    if w_shape[0] == layer.groups and dims != 2:
        # One output channel per group in 1D and 3D: one plain weight gradient per unit over its slots.
        xs, gs = x.reshape(lay.slots, m, *x.shape[1:]), g.reshape(lay.slots, m, *g.shape[1:])
        return torch.stack([torch.ops.aten.convolution_backward(
            gs[:, u], xs[:, u], x.new_empty(w_shape), None, list(layer.stride), list(padding), list(layer.dilation),
            False, [0] * dims, layer.groups, (False, True, False))[1] for u in range(m)])
    gx, xx = g.reshape(lay.slots, m * c_out, *g.shape[2:]), x.reshape(lay.slots, m * c_in, *x.shape[2:])
    if w_shape[0] == layer.groups:
        # One output channel per group (a UNet's output conv): the grouped backward takes a
        # slow path on CPU for channels-first tensors. On channels-last copies it beats one
        # plain weight gradient per unit (32 -> 1 channels at 28x28, 32 units: 6.4 -> 2.3 ms).
        gx, xx = gx.contiguous(memory_format=torch.channels_last), xx.contiguous(memory_format=torch.channels_last)
    grad_w = torch.ops.aten.convolution_backward(
        gx, xx,
        x.new_empty((m * w_shape[0], *w_shape[1:])),  # only the shape is read
        None, list(layer.stride), list(padding), list(layer.dilation), False, [0] * dims,
        m * layer.groups, (False, True, False),
    )[1]
    return grad_w.view(m, *w_shape)


def _conv_unit_grads(layer: nn.Module, items: list) -> None:
    """Per-unit weight and bias gradients of a conv from its (x, g, padding, layout) of one or
    more calls in the pass. Calls of one slot each (K = 1) with the same units are concatenated
    (their slots follow each other, still slot-major) and computed as one: a GAN discriminator
    run on the real and the fake rows pays one grouped convolution per layer, not two, and a
    grouped convolution over 2 slots costs about what one over 1 slot does. With more slots
    per call the copies would cost more than the call they save."""
    groups: dict = {}
    for i, (x, g, padding, lay) in enumerate(items):
        groups.setdefault((padding, lay.units) if lay.slots == 1 else i, []).append((x, g, lay.slots, padding, lay.units))
    for calls in groups.values():
        padding, units = calls[0][3], calls[0][4]
        if len(calls) == 1:
            x, g, slots = calls[0][:3]
        else:
            x, g, slots = torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls]), sum(c[2] for c in calls)
        lay = _Layout(slots, units)
        if layer.weight.requires_grad:
            grads = _ghost_conv_grads if _ghost_is_cheaper(layer, x, g, padding, lay) else _conv_unit_weight_grad
            _add_grad_sample(layer.weight, grads(layer, x.to(g.dtype), g, padding, lay))
        if layer.bias is not None and layer.bias.requires_grad:
            _add_grad_sample(layer.bias, g.reshape(lay.slots, lay.units, g.shape[1], -1).sum((0, 3)))


class _ConvUnits(torch.autograd.Function):
    """conv(x, w, b) whose backward gives x its gradient and w, b their per-unit gradients
    (after the last backward call of the layer in the pass: see `_conv_unit_grads`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, padding, lay, engine):
        ctx.layer, ctx.padding, ctx.lay, ctx.engine = layer, padding, lay, engine
        ctx.save_for_backward(x, weight)
        engine.pending[layer] = engine.pending.get(layer, 0) + 1
        return torch.ops.aten.convolution(x, weight, bias, list(layer.stride), list(padding), list(layer.dilation),
                                          False, [0] * (x.ndim - 2), layer.groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer, padding, lay, engine = ctx.layer, ctx.padding, ctx.lay, ctx.engine
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                g, x, weight.to(g.dtype), None, list(layer.stride), list(padding), list(layer.dilation), False,
                [0] * (x.ndim - 2), layer.groups, (True, False, False),
            )[0]
        left = engine.pending.pop(layer, 1) - 1
        items = engine.stash.pop(layer, []) + [(x, g, padding, lay)]
        if left > 0:  # the layer's other calls of this pass are still to come
            engine.pending[layer], engine.stash[layer] = left, items
        else:
            _conv_unit_grads(layer, items)
        return gx, None, None, None, None, None, None


class _LinearUnits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, lay):
        ctx.layer, ctx.lay = layer, lay
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer, lay = ctx.layer, ctx.lay
        gx = g.matmul(weight.to(g.dtype)) if ctx.needs_input_grad[0] else None
        m = lay.units
        gs = g.reshape(lay.slots, m, -1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            xs = x.to(g.dtype).reshape(lay.slots, m, -1, x.shape[-1])
            if lay.slots > 1 and xs.shape[2] == 1:  # (slots x 1) rows per unit: one product on small copies
                gw = torch.bmm(gs.permute(1, 3, 0, 2).reshape(m, g.shape[-1], lay.slots),
                               xs.permute(1, 0, 2, 3).reshape(m, lay.slots, x.shape[-1]))
            else:  # sum over slots of (units x sequence) products, on views
                gw = torch.bmm(gs[0].transpose(1, 2), xs[0])
                for s in range(1, lay.slots):
                    gw.baddbmm_(gs[s].transpose(1, 2), xs[s])
            _add_grad_sample(layer.weight, gw)
        if ctx.needs_input_grad[2]:
            _add_grad_sample(layer.bias, gs.sum((0, 2)))
        return gx, None, None, None, None


class _GroupNormUnits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer, lay):
        n, c = x.shape[:2]
        hw = x[0, 0].numel()
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, layer.num_groups, layer.eps)
        ctx.layer, ctx.lay, ctx.dims = layer, lay, (n, c, hw)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w, mean, rstd = ctx.saved_tensors
        layer, lay, (n, c, hw) = ctx.layer, ctx.lay, ctx.dims
        x, g = x.contiguous(), g.contiguous()  # (copies only of a channels-last x or g)
        # The kernel run on the rows folded into the channels (1 x n*C with n*G groups: the
        # same normalisation) returns the input gradient and the per-row gamma and beta
        # gradients in one pass over x and g.
        need = list(ctx.needs_input_grad[:3])
        gamma = None if w is None else w.to(g.dtype).repeat(n)
        gx, dw, db = torch.ops.aten.native_group_norm_backward(
            g.view(1, n * c, hw), x.view(1, n * c, hw), mean.view(1, -1), rstd.view(1, -1), gamma, 1, n * c, hw,
            n * layer.num_groups, need)
        if need[1]:
            _add_grad_sample(layer.weight, dw.view(lay.slots, lay.units, c).sum(0))
        if need[2]:
            _add_grad_sample(layer.bias, db.view(lay.slots, lay.units, c).sum(0))
        gx = gx.view(x.shape) if need[0] else None
        return gx, None, None, None, None


def _explicit_padding(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Numeric, symmetric padding for a conv (padding modes and "same"/"valid" made explicit)."""
    dims = x.ndim - 2
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), (0,) * dims
    if not isinstance(layer.padding, str):
        return x, tuple(layer.padding)
    if layer.padding == "valid":
        return x, (0,) * dims
    total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]  # "same"
    left = [t // 2 for t in total]
    if all(t == 2 * le for t, le in zip(total, left)):
        return x, tuple(left)
    pads = []
    for t, le in zip(reversed(total), reversed(left)):
        pads += [le, t - le]
    return F.pad(x, pads), (0,) * dims


def _conv_forward(self, x):
    eng: _Engine = self._dpgen_engine
    if not eng.active:
        return type(self).forward(self, x)
    x, padding = _explicit_padding(self, x)
    return _ConvUnits.apply(x, self.weight, self.bias, self, padding, eng.layout(x.shape[0]), eng)


def _linear_forward(self, x):
    eng: _Engine = self._dpgen_engine
    if not eng.active:
        return type(self).forward(self, x)
    return _LinearUnits.apply(x, self.weight, self.bias, self, eng.layout(x.shape[0]))


def _group_norm_forward(self, x):
    eng: _Engine = self._dpgen_engine
    if not eng.active:
        return type(self).forward(self, x)
    return _GroupNormUnits.apply(x, self.weight, self.bias, self, eng.layout(x.shape[0]))


_FORWARDS = {
    nn.Conv1d: _conv_forward, nn.Conv2d: _conv_forward, nn.Conv3d: _conv_forward,
    nn.Linear: _linear_forward, nn.GroupNorm: _group_norm_forward,
}


class _Engine:
    """What the patched layers read at forward time (whether to compute per-unit gradients,
    the layout of the pass) and the bookkeeping of layers called more than once in a pass. A
    plain object, so that it is no submodule of any layer."""

    def __init__(self):
        self.enabled = True
        self.ghost = GHOST_CONVS  # ghost-clip where cheaper (`_ghost_is_cheaper`), fixed when built
        self.current: _Layout | None = None
        self.pending: dict = {}  # conv -> its forward calls in this pass whose backward has not run
        self.stash: dict = {}  # conv -> (x, g, padding, layout) of its calls waiting for the others

    @property
    def active(self) -> bool:
        return self.enabled and torch.is_grad_enabled()

    def layout(self, rows: int) -> _Layout:
        lay = self.current
        if lay is None:
            return _Layout(1, rows)
        if lay.rows != rows:
            raise RuntimeError(f"a layer saw {rows} rows in a pass laid out as {lay.slots} x {lay.units} "
                               "(the model must keep the batch dimension: one output row per input row)")
        return lay

    def flush(self) -> None:
        """Per-unit gradients of calls whose siblings never came back (an output the loss did
        not use), then a clean slate for the next pass."""
        for layer, items in self.stash.items():
            _conv_unit_grads(layer, items)
        self.reset()

    def reset(self) -> None:
        self.pending, self.stash = {}, {}


class DPGradSampleModule(nn.Module):
    """dpgen's per-unit gradient engine ("hooks" mode): wraps a model; after a backward pass
    every trainable parameter's `grad_sample` holds one gradient per unit of the pass's layout
    (`with gsm.layout_of(slots, units):`; by default every row is its own unit).

    Conv{1,2,3}d, Linear and GroupNorm layers (exact types) get a patched `forward` running an
    autograd Function (see above); any other layer with trainable parameters of its own gets
    Opacus' per-row sampler for its type (functorch where Opacus has none) from a tensor hook.
    `disable_hooks()` runs the plain layers (a GAN generator's update through the
    discriminator); `_close()` removes everything.
    """

    def __init__(self, m: nn.Module):
        super().__init__()
        self._module = m
        self._engine = _Engine()
        self._patched: list[tuple[nn.Module, dict]] = []
        self._handles = []
        for mod in m.modules():
            if not any(p.requires_grad for p in mod.parameters(recurse=False)):
                continue
            fwd = _FORWARDS.get(type(mod))
            if fwd is not None:
                # (a deep copy of a model wrapped before carries the old attributes: replaced)
                self._patched.append((mod, {k: vars(mod)[k] for k in ("forward", "_dpgen_engine") if k in vars(mod)}))
                mod._dpgen_engine = self._engine
                mod.forward = types.MethodType(fwd, mod)
            else:
                self._handles.append(mod.register_forward_hook(self._capture))

    @property
    def hooks_enabled(self) -> bool:
        return self._engine.enabled

    def disable_hooks(self) -> None:
        self._engine.enabled = False

    def enable_hooks(self) -> None:
        self._engine.enabled = True

    @contextmanager
    def layout_of(self, slots: int, units: int):
        """One pass (forward and backward) over rows laid out slot-major: row s * units + u
        belongs to unit u. Per-unit gradients are complete when the block ends."""
        eng = self._engine
        prev, eng.current = eng.current, _Layout(slots, units)
        eng.reset()
        try:
            yield
            eng.flush()
        finally:
            eng.current = prev
            eng.reset()

    def _capture(self, module: nn.Module, inputs: tuple, output) -> None:
        if not self._engine.active or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        acts = [a.detach() if isinstance(a, torch.Tensor) else a for a in inputs]
        lay = self._engine.layout(output.shape[0])
        output.register_hook(lambda g: _sample_generic(module, acts, g, lay))

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def _close(self) -> None:
        for mod, prev in self._patched:
            for k in ("forward", "_dpgen_engine"):
                if k in vars(mod):
                    delattr(mod, k)
            for k, v in prev.items():
                setattr(mod, k, v)
        for h in self._handles:
            h.remove()
        self._patched, self._handles = [], []
        for p in self._module.parameters():
            if hasattr(p, "grad_sample"):
                p.grad_sample = None


def _sample_generic(module: nn.Module, acts: list, g: torch.Tensor, lay: _Layout) -> None:
    sampler = GradSampleModule.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient)
    for p, gs in sampler(module, acts, g).items():
        if p.requires_grad:
            _add_grad_sample(p, gs.reshape(lay.slots, lay.units, *gs.shape[1:]).sum(0))


GRAD_SAMPLE_MODES = ("hooks", "functorch", "opacus")


def make_grad_sample_module(model: nn.Module, mode: str) -> nn.Module:
    """"hooks": dpgen's per-unit engine (the default); "functorch": Opacus' per-row gradients by
    functorch; "opacus": Opacus' own hooks and samplers (kept to compare with, and to show the
    channels-last trap the preflight catches)."""
    if mode == "hooks":
        return DPGradSampleModule(model)
    if mode in ("functorch", "opacus"):
        return GradSampleModule(model, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
    raise ValueError(f"unknown grad_sample_mode {mode!r}; choose one of {', '.join(GRAD_SAMPLE_MODES)}")


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
    """The engine's per-sample gradients vs. per-sample autograd, on copies of `model`.

    `batch` should be random data of the private data's shape (the check spends no privacy).
    Runs in float64 so that a failure means a wrong gradient, not rounding. In "hooks" mode
    the per-unit path is checked too: the rows laid out as 2 slots x n/2 units (what a pass
    over several draws or rows of a unit looks like) must give each unit the sum of its two
    rows' autograd gradients.
    """
    base = copy.deepcopy(model).double().train()
    batch = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()}
    n = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    names = [name for name, p in base.named_parameters() if p.requires_grad]

    def engine_grads(slots: int, units: int) -> dict[str, torch.Tensor]:
        gsm = make_grad_sample_module(copy.deepcopy(base), mode)
        rows = _rows(batch, slice(0, slots * units)) if slots * units < n else batch
        if isinstance(gsm, DPGradSampleModule):
            with gsm.layout_of(slots, units):
                loss_fn(gsm, rows).sum().backward()  # (per-unit gradients complete at the end of the block)
        else:
            loss_fn(gsm, rows).sum().backward()
        out = {}
        for name, p in gsm._module.named_parameters():
            gs = getattr(p, "grad_sample", None)
            if p.requires_grad and gs is not None:
                gs = torch.cat(gs) if isinstance(gs, list) else gs
                ghost = getattr(gs, "_dpgen_weighted_sum", None)
                # A ghost-clipped conv has no per-unit gradients to compare: what the clipping
                # reads from it is checked instead, the per-unit squared norms and a weighted
                # sum (unit u weighted u + 1, so that a unit given another's weight shows), and
                # the per-unit gradients it materialises when a unit's draws span two passes.
                out[name] = gs if ghost is None else (
                    gs._dpgen_sq_norms, ghost(torch.arange(1.0, len(gs) + 1)), gs._dpgen_materialise())
        gsm._close()
        return out

    checks = [(engine_grads(1, n), 1)]
    if mode == "hooks" and n >= 2:
        checks.append((engine_grads(2, n // 2), 2))

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
        errors[name] = 0.0
        for grads, slots in checks:
            r = stacked[name]
            if slots > 1:  # unit u = rows u and units + u
                units = n // slots
                r = r[: slots * units].view(slots, units, *r.shape[1:]).sum(0)
            g = grads.get(name)
            if isinstance(g, tuple):  # ghost-clipped: per-unit squared norms, a weighted sum, materialised
                sq, weighted, materialised = g
                ref_sq = r.flatten(1).square().sum(1)
                ref_weighted = (torch.arange(1.0, len(r) + 1, dtype=r.dtype).view(-1, *[1] * (r.ndim - 1)) * r).sum(0)
                shapes_ok = (sq.shape == ref_sq.shape and weighted.shape == ref_weighted.shape
                             and materialised.shape == r.shape)
                # (each unit's norm on its own: one unit's wrong norm must not hide among the others)
                err = float("inf") if not shapes_ok else max(
                    ((sq - ref_sq).abs() / ref_sq.clamp(min=max(floor ** 2, 1e-300))).max().item(),
                    (weighted - ref_weighted).norm().item() / max(ref_weighted.norm().item(), floor, 1e-300),
                    (materialised - r).norm().item() / max(r.norm().item(), floor, 1e-300))
            elif g is None or g.shape != r.shape:
                err = float("inf")
            else:
                err = (g - r).norm().item() / max(r.norm().item(), floor, 1e-300)
            errors[name] = max(errors[name], err)
    failed = [k for k, v in errors.items() if not v <= tolerance]
    return PreflightReport(
        mode=mode, max_relative_error=max(errors.values()) if errors else 0.0, errors=errors, failed=failed,
        tolerance=tolerance, batch_size=n,
    )


def require_preflight(report: PreflightReport) -> None:
    if not report.passed:
        layers = sorted({name.rsplit(".", 1)[0] for name in report.failed})
        raise PrivacyError(
            f"per-sample gradient preflight failed ({report.mode} mode): the engine's per-sample gradients differ "
            f"from autograd by up to {report.max_relative_error:.3g} (tolerance {report.tolerance:g}) in "
            f"{len(layers)} layer(s): {', '.join(layers[:8])}{' ...' if len(layers) > 8 else ''}. "
            f"Clipping would act on wrong norms and the DP guarantee would not hold; refusing to train. "
            f"Try finetune.grad_sample_mode=functorch."
        )


# ----------------------------------------------------------------------------- sampling


# Subject-ID cells that mean "unknown": rows holding them are not one patient.
_MISSING_IDS = frozenset({"", "nan", "none", "null", "na", "n/a", "-", "?", "unknown"})


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
        ids = np.asarray([str(v).strip() for v in subjects], dtype=object)  # 'p1 ' is patient 'p1'
        missing = [i for i, (raw, v) in enumerate(zip(subjects, ids)) if raw is None
                   or (isinstance(raw, float) and np.isnan(raw)) or v.lower() in _MISSING_IDS]
        if missing:
            # Rows without an ID would be merged into one "subject": adding or removing one of
            # those patients would then change a unit instead of adding or removing one.
            raise PrivacyError(
                f"{len(missing)} private row(s) have no subject ID (rows {', '.join(map(str, missing[:5]))}"
                f"{', ...' if len(missing) > 5 else ''}); fill them in, or leave the subject column out to protect "
                f"each image as its own unit")
        _, inverse = np.unique(ids.astype(str), return_inverse=True)
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


class _PerUnitClip:
    """Opacus' clip_and_accumulate (per-unit norms over all parameters, clip factor
    min(1, C / (norm + 1e-6)), clipped sum), with the squared norms the engine took when it
    wrote each per-unit gradient (where that gradient is final) and the clipped sum as one
    vector-matrix product per parameter; and Opacus' scale_grad with its divisor computed once.
    """

    def scale_grad(self):
        # Opacus 1.6 evaluates `accumulated_iterations` (a pass over every parameter) once per
        # parameter: quadratic in the parameter count (183^2 checks per quickstart step; the
        # step went from 1.40x to 1.36x a non-private one). Same division, divisor taken once.
        if self.loss_reduction == "mean":
            divisor = self.expected_batch_size * self.accumulated_iterations
            for p in self.params:
                p.grad /= divisor

    def clip_and_accumulate(self):
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        m = len(samples[0])
        if m == 0:
            clip = torch.zeros((0,), device=samples[0].device)
        else:
            sq = None
            for gs in samples:
                s = getattr(gs, "_dpgen_sq_norms", None)
                if s is None:
                    s = torch.linalg.vector_norm(gs.reshape(m, gs[0].numel()), dim=1).square()
                s = s.to(samples[0].device)
                sq = s if sq is None else sq + s
            clip = (self.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for p, gs in zip(self.params, samples):
            _check_processed_flag(p.grad_sample)
            weighted_sum = getattr(gs, "_dpgen_weighted_sum", None)
            if weighted_sum is not None:  # a ghost-clipped conv: sum_u clip_u grad_u without grad_u
                clipped = weighted_sum(clip).to(p.dtype).view(p.shape)
                p.summed_grad = clipped if p.summed_grad is None else p.summed_grad.add_(clipped)
                _mark_as_processed(p.grad_sample)
                continue
            flat = gs.to(p.dtype).reshape(m, p.numel())
            c = clip.to(flat)
            if p.summed_grad is None:
                p.summed_grad = (c @ flat).view(p.shape)
            else:  # later unit batches of the step: accumulate in place
                p.summed_grad.view(-1).addmv_(flat.t(), c)
            _mark_as_processed(p.grad_sample)


class _DPOptimizer(_PerUnitClip, DPOptimizer):
    pass


class _DistributedDPOptimizer(_PerUnitClip, DistributedDPOptimizer):
    pass


def _pass_plan(rows_per_unit: np.ndarray, k_draws: int, max_rows: int) -> list[tuple[np.ndarray, list[range]]]:
    """Group a chunk's units into *unit batches* and each unit batch's draws into passes.

    Returns [(units, [draws of each pass])]. The units of a unit batch have the same number of
    rows r, so that a pass over them is a regular (slots x units) layout with r x (draws of the
    pass) slots. As many units as fit in `max_rows` rows with all their K draws go together
    (one pass, one per-unit gradient per unit); a unit whose r x K rows do not fit gets passes
    of as many draws as fit, and its gradient is accumulated over them before clipping.
    """
    plan = []
    for r in np.unique(rows_per_unit):
        units = np.flatnonzero(rows_per_unit == r)
        if r * k_draws <= max_rows:
            n_batches = -(-len(units) // max(1, max_rows // (r * k_draws)))
            draws = [range(k_draws)]
        else:
            n_batches = len(units)
            per = max(1, max_rows // r)
            draws = [range(a, min(k_draws, a + per)) for a in range(0, k_draws, per)]
        plan += [(b, draws) for b in np.array_split(units, n_batches)]
    return plan


def _fold_grad_samples(params: list[nn.Parameter], slots: int, units: int, acc: dict) -> None:
    """Opacus' per-row gradients of the last pass (slot-major rows) -> per-unit sums, added to `acc`."""
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        gs = torch.cat(gs) if isinstance(gs, list) else gs
        folded = gs.view(slots, units, *gs.shape[1:]).sum(0) if slots > 1 else gs
        acc[p] = folded if p not in acc else acc[p] + folded
        p.grad_sample = None


def _concat_rows(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    return {k: (torch.cat([p[k] for p in parts]) if isinstance(v, torch.Tensor) and v.ndim > 0 else v)
            for k, v in parts[0].items()}


class DPSGD:
    """One DP-SGD step = Poisson sample of units -> physical chunks -> K draws each ->
    per-unit gradients -> Opacus clipping, noise and optimizer step.

    Passes: the units of a chunk are regrouped so that each forward/backward pass holds whole
    units with all their K draws (about max_rows / (rows x K) units of rows x K rows each, never
    more rows than the biggest chunk), so the per-unit gradient of a unit is computed once per
    step, not once per draw ("hooks" mode computes it directly; "functorch" and "opacus" modes
    compute per-row gradients and sum them per unit after each pass).
    """

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

        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"unknown grad_sample_mode {grad_sample_mode!r}; choose one of {', '.join(GRAD_SAMPLE_MODES)}")
        make_conv_inputs_contiguous(model)
        self.model = model
        self.world = world()
        if self.world.distributed:
            # Opacus' distributed path: DPDDP broadcasts rank 0's weights; the optimizer adds
            # the noise on rank 0 only and all-reduces the clipped sums (dpgen.distributed).
            model = DPDDP(model)
        self.gsm = make_grad_sample_module(model, grad_sample_mode)
        self.per_unit = isinstance(self.gsm, DPGradSampleModule)
        # loss_reduction="mean": Opacus divides the noised sum by the *expected* batch size
        # (a fixed number, as the analysis of Poisson sampling requires); in a distributed run
        # by each rank's expected share, and by the world size in the all-reduce.
        optimizer_cls = _DistributedDPOptimizer if self.world.distributed else _DPOptimizer
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
        """Run one logical step; returns the mean training loss of the rows seen (rows x draws).

        `make_batch(i, rows, k)` is called once per chunk and draw, with the chunk's rows; the
        passes take their rows from these batches (every tensor of a batch with a first
        dimension is indexed by row, as in the preflight).
        """
        K = noise_multiplicity
        self.optimizer.generator = noise_generator
        self.optimizer.zero_grad(set_to_none=True)
        if not chunks:  # an empty Poisson sample is still a step: noise only
            for p in self.params:
                p.grad_sample = torch.zeros((0,) + p.shape, dtype=p.dtype, device=p.device)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        max_rows = max(len(rows) for rows, _, _ in chunks)
        work = []
        for i, (rows, group, n_groups) in enumerate(chunks):
            group = np.asarray(group)
            order = np.argsort(group, kind="stable")
            counts = np.bincount(group, minlength=n_groups)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            for units, draws in _pass_plan(counts, K, max_rows):
                if counts[units[0]] == 0:
                    continue
                # positions in the chunk of each unit's rows: (units, r)
                pos = np.stack([order[starts[u]:starts[u] + counts[u]] for u in units])
                work.append((i, rows, pos, draws))
        total, count = None, 0
        batches, batches_of = None, None
        for w, (i, rows, pos, draws) in enumerate(work):
            if batches_of != i:  # the K draws of the chunk's rows, kept while its units are processed
                batches = None
                batches, batches_of = [make_batch(i, rows, k) for k in range(K)], i
            units, r = pos.shape
            idx = pos.T.reshape(-1)  # slot-major: the unit's j-th row, then the next unit
            whole = len(idx) == len(rows) and bool((idx == np.arange(len(rows))).all())
            idx_t = None if whole else torch.as_tensor(idx)
            acc = {}
            for ks in draws:
                batch = _concat_rows([batches[k] if whole else _rows(batches[k], idx_t) for k in ks])
                slots = r * len(ks)
                with self.gsm.layout_of(slots, units) if self.per_unit else contextlib.nullcontext():
                    losses = loss_fn(self.gsm, batch)
                    # Each unit's gradient is the mean over its rows and its K draws.
                    (losses.sum() / (K * r)).backward()
                if not self.per_unit:
                    _fold_grad_samples(self.params, slots, units, acc)
                s = losses.detach().sum()
                total = s if total is None else total + s
                count += len(losses)
            for p in self.params:
                if not self.per_unit:
                    p.grad_sample = acc.get(p)
                if getattr(p, "grad_sample", None) is None:  # a parameter this loss does not reach
                    p.grad_sample = torch.zeros((units,) + p.shape, dtype=p.dtype, device=p.device)
            if w < len(work) - 1:
                self.optimizer.signal_skip_step(do_skip=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total.item() / max(count, 1)

    def close(self) -> nn.Module:
        """Remove the engine's hooks and return the plain model."""
        self.gsm._close()
        return self.model
