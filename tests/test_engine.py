"""The DP-SGD engine: the preflight catches wrong per-sample gradients, and one step equals
brute-force per-unit clipping (subjects and noise multiplicity included)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpgen.privacy.engine import (
    DPSGD, PrivacyError, PrivacyUnits, make_conv_inputs_contiguous, preflight, require_preflight, step_generator,
)


class ChannelsLastNet(nn.Module):
    """A conv fed a channels-last activation, as after diffusers' attention blocks or inside
    MONAI's AutoencoderKL: the case where Opacus' hooks are silently wrong."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.c2 = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x):
        h = self.norm(self.c1(x))
        h = h.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last memory layout
        return self.c2(torch.tanh(h))


def _mse(model, batch):
    return (model(batch["x"]) - batch["y"]).pow(2).flatten(1).mean(1)


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, 8, 8, generator=g), "y": torch.randn(n, 1, 8, 8, generator=g)}


def test_preflight_catches_channels_last_conv_and_the_fix_passes():
    # Opacus' own hooks ("opacus" mode) are silently wrong on a channels-last conv input
    model = ChannelsLastNet()
    bad = preflight(model, _mse, _batch(), mode="opacus")
    assert not bad.passed
    assert "c2.weight" in bad.failed and bad.max_relative_error > 0.1
    with pytest.raises(PrivacyError, match=r"preflight failed .* c2\b.*refusing to train"):
        require_preflight(bad)
    # dpgen's engine reshapes (copies) whatever layout it is given: exact without the fix
    assert preflight(model, _mse, _batch(), mode="hooks").max_relative_error < 1e-10
    make_conv_inputs_contiguous(model)
    for mode in ("opacus", "hooks", "functorch"):
        good = preflight(model, _mse, _batch(), mode=mode)
        assert good.passed, (mode, good.errors)
        assert good.max_relative_error < 1e-10


def test_preflight_catches_a_wrong_per_unit_gradient(monkeypatch):
    """A sampler that is right per row but wrong per unit (it ignores all but the first slot)
    is caught by the preflight's 2-slot check."""
    import dpgen.privacy.engine as engine

    right = engine._conv_unit_weight_grad

    def first_slot_only(layer, x, g, padding, lay):
        if lay.slots == 1:
            return right(layer, x, g, padding, lay)
        m = lay.units
        return right(layer, x[:m], g[:m], padding, engine._Layout(1, m))

    monkeypatch.setattr(engine, "_conv_unit_weight_grad", first_slot_only)
    report = preflight(ChannelsLastNet(), _mse, _batch())
    assert not report.passed and {"c1.weight", "c2.weight"} <= set(report.failed)
    assert "c1.bias" not in report.failed


def test_preflight_passes_the_shipped_diffusion_model():
    from dpgen.config import load_config
    from dpgen.models import ConditionalDiffusion, diffusion_spec_from_config
    from dpgen.training.objectives import DiffusionObjective
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs/quickstart.yaml")
    model = ConditionalDiffusion(diffusion_spec_from_config(cfg, (1, 28, 28)))
    make_conv_inputs_contiguous(model)
    obj = DiffusionObjective(model, 0.1)
    batch = obj.random_batch((1, 28, 28), 2, 3, torch.Generator().manual_seed(0))
    for mode in ("hooks", "functorch"):
        report = preflight(model, obj.loss, batch, mode=mode)
        assert report.passed, (mode, report.to_dict())


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 8 * 8, 64)

    def forward(self, x, label=None):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1)).view(-1, 1, 8, 8)


class Rich(nn.Module):
    """Every path of the engine: a conv called twice per row (like a GAN discriminator on real
    and fake rows), a conv with one output channel, a depthwise conv, a strided conv, a 1x1 conv,
    a frozen conv, a dilated conv, a 64 -> 64 conv on a channels-last 4x4 map and a strided
    reflect-padded one (both ghost-clipped when a pass holds one row per unit), GroupNorm, a
    Linear on a token sequence, an Embedding (Opacus' sampler through a tensor hook) and a
    LayerNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = nn.Conv2d(4, 1, 3, padding=1)  # one output channel
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.down = nn.Conv2d(4, 4, 4, stride=2, padding=1)
        self.frozen = nn.Conv2d(4, 4, 3, padding=1).requires_grad_(False)
        self.mix = nn.Conv2d(4, 6, 1)
        self.wide = nn.Conv2d(6, 64, 3, padding=2, dilation=2)
        self.deep = nn.Conv2d(64, 64, 3, padding=1)
        self.deep_strided = nn.Conv2d(64, 64, 3, stride=2, padding=1, padding_mode="reflect")
        self.narrow = nn.Conv2d(64, 6, 1)
        self.norm = nn.GroupNorm(2, 6)
        self.tokens = nn.Linear(6, 6)
        self.embed = nn.Embedding(3, 6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6 * 16, 64)

    def forward(self, x, label):
        h = torch.tanh(self.conv(x)) + 0.5 * torch.tanh(self.conv(x.flip(-1)))
        h = h * torch.sigmoid(self.gate(h)) + torch.tanh(self.depthwise(h))
        h = self.mix(self.frozen(torch.relu(self.down(h))))  # (B, 6, 4, 4)
        a = torch.tanh(self.wide(h)).contiguous(memory_format=torch.channels_last)
        s = torch.tanh(self.deep_strided(a)).repeat_interleave(2, -1).repeat_interleave(2, -2)  # (B, 64, 4, 4)
        h = h + self.narrow(torch.tanh(self.deep(a)) + s)  # (a position-dependent output gradient for both)
        t = self.norm(h).flatten(2).transpose(1, 2)  # (B, 16, 6): tokens
        t = self.ln(torch.tanh(self.tokens(t)) + self.embed(label)[:, None])
        return self.head(t.flatten(1)).view(-1, 1, 8, 8)


def _mse_labelled(model, batch):
    return (model(batch["x"], batch["label"]) - batch["y"]).pow(2).flatten(1).mean(1)


def _draw(data, labels, rows, g):
    """A diffusion-like random draw: the loss depends on noise drawn per row."""
    x = data[rows]
    noise = torch.randn(x.shape, generator=g)
    return {"x": x + 0.5 * noise, "y": noise, "label": labels[rows]}


def _brute_force_update(model, data, labels, units, chosen, K, C, expected, seed, step, max_rows):
    """Per unit: mean over its rows and K draws of autograd gradients, clipped to C; summed; / expected."""
    ref = copy.deepcopy(model)
    params = [p for p in ref.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    chunks = units.physical_chunks(chosen, max_rows)
    for ci, (rows, group, n_groups) in enumerate(chunks):
        draws = [_draw(data, labels, rows, step_generator(seed, step, f"{ci}:{k}")) for k in range(K)]
        for gi in range(n_groups):
            sel = np.flatnonzero(group == gi)
            ref.zero_grad()
            loss = sum(_mse_labelled(ref, {k: v[sel] for k, v in d.items()}).mean() for d in draws) / K
            loss.backward()
            grads = [p.grad.clone() for p in params]
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            factor = min(1.0, C / (norm.item() + 1e-6))
            for t, g in zip(total, grads):
                t += factor * g
    return [-t / expected for t in total]


SUBJECTS = {
    "images": None,
    "equal": np.repeat(np.arange(4), 3),  # 4 subjects x 3 images
    "mixed": np.repeat(np.arange(6), [1, 2, 3, 1, 2, 3]),  # units of 1, 2 and 3 rows in one chunk
}
CHOSEN = {"images": [0, 1, 4, 6, 7, 10], "equal": [0, 2, 3], "mixed": [0, 1, 2, 4, 5]}


@pytest.mark.parametrize("K,subjects,max_rows,mode,net", [
    (1, "images", 5, "hooks", Small),
    (3, "images", 5, "hooks", Small),  # 1 unit x 3 draws per pass
    (1, "equal", 5, "hooks", Small),
    (2, "equal", 5, "hooks", Small),  # a unit's 3 rows x 2 draws do not fit: draws over 2 passes
    (1, "images", 5, "hooks", Rich),  # one row per unit: ghost clipping where it is cheaper
    (2, "images", 1, "hooks", Rich),  # one row per pass: a ghost stand-in materialised to add the second draw
    (1, "mixed", 12, "hooks", Rich),  # ghost for the one-row units only
    (2, "images", 8, "hooks", Rich),  # 4 units x 2 draws per pass
    (4, "images", 8, "hooks", Rich),  # 2 units x 4 draws per pass
    (16, "images", 8, "hooks", Rich),  # 8 draws per pass, 2 passes per unit
    (2, "mixed", 12, "hooks", Rich),  # units of 1, 2, 3 rows in separate passes
    (3, "mixed", 4, "hooks", Rich),  # rows x draws over several passes
    (1, "images", 5, "functorch", Rich),
    (4, "images", 8, "functorch", Rich),
    (2, "mixed", 4, "functorch", Small),
    (4, "images", 8, "opacus", Small),
    (2, "mixed", 4, "opacus", Small),
])
def test_dp_step_equals_brute_force_per_unit_clipping(K, subjects, max_rows, mode, net):
    torch.manual_seed(0)
    n = 12
    data, labels = torch.randn(n, 1, 8, 8), torch.randint(0, 3, (n,))
    units = PrivacyUnits.from_subjects(SUBJECTS[subjects], n)
    assert units.kind == ("per image" if subjects == "images" else "per subject")
    model = net()
    C, expected, seed, step = 0.05, 5.0, 1, 7  # small C: clipping is active
    chosen = np.array(CHOSEN[subjects])
    update = _brute_force_update(model, data, labels, units, chosen, K, C, expected, seed, step, max_rows)

    dp_model = copy.deepcopy(model)
    trainable = [p for p in dp_model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    dp = DPSGD(dp_model, torch.optim.SGD(trainable, lr=1.0), noise_multiplier=0.0, max_grad_norm=C,
               expected_batch_size=expected, grad_sample_mode=mode)
    seen_units, seen_rows = [], []

    def loss_fn(m, batch):
        seen_rows.append(len(batch["x"]))
        seen_units.extend(
            p.grad_sample.shape[0] for p in dp.params if isinstance(getattr(p, "grad_sample", None), torch.Tensor)
        )
        return _mse_labelled(m, batch)

    chunks = units.physical_chunks(chosen, max_rows)
    dp.step(chunks, lambda ci, rows, k: _draw(data, labels, rows, step_generator(seed, step, f"{ci}:{k}")), loss_fn,
            K, torch.Generator().manual_seed(0))
    for b, p, u in zip(before, trainable, update):
        torch.testing.assert_close(p.detach() - b, u, rtol=1e-4, atol=1e-7)
    # Per-unit gradients only: never more than the units of a chunk, whatever K.
    assert max(seen_units, default=0) <= max(ng for _, _, ng in chunks)
    # A pass never holds more rows than the biggest physical chunk (unless one unit's rows do).
    biggest_unit = max(len(units.rows_of_unit[u]) for u in chosen)
    assert max(seen_rows) <= max(max(len(c[0]) for c in chunks), biggest_unit)
    assert sum(seen_rows) == K * sum(len(c[0]) for c in chunks)  # every row, every draw, once
    assert dp.close() is dp_model


def test_pass_plan_batches_whole_units_with_all_their_draws():
    from dpgen.privacy.engine import _pass_plan

    # 32 one-row units, K = 4, 32 rows per pass: 4 passes of 8 units x 4 draws
    plan = _pass_plan(np.ones(32, dtype=int), 4, 32)
    assert [len(u) for u, _ in plan] == [8] * 4 and all(d == [range(4)] for _, d in plan)
    # K = 1: one pass over the chunk
    assert [len(u) for u, _ in _pass_plan(np.ones(32, dtype=int), 1, 32)] == [32]
    # units bigger than the pass with their draws: one unit, draws split
    plan = _pass_plan(np.array([3, 3]), 4, 7)
    assert [list(u) for u, _ in plan] == [[0], [1]] and plan[0][1] == [range(0, 2), range(2, 4)]
    # 33 units: passes as even as possible (no pass of one unit at the end); mixed sizes never share a pass
    sizes = [len(u) for u, _ in _pass_plan(np.ones(33, dtype=int), 4, 32)]
    assert max(sizes) * 4 <= 32 and sum(sizes) == 33 and max(sizes) - min(sizes) <= 1
    plan = _pass_plan(np.array([1, 2, 1, 2]), 2, 8)
    assert sorted(sorted(u.tolist()) for u, _ in plan) == [[0, 2], [1, 3]]


def test_subjects_stay_whole_in_physical_chunks():
    subj = np.array(["a", "a", "a", "b", "c", "c", "d"])
    units = PrivacyUnits.from_subjects(subj, len(subj))
    chunks = units.physical_chunks(np.arange(len(units)), max_rows=3)
    for rows, group, n_groups in chunks:
        for gi in range(n_groups):
            assert len(set(subj[rows[group == gi]])) == 1
    assert sorted(np.concatenate([c[0] for c in chunks]).tolist()) == list(range(7))


def test_preflight_passes_every_engine_path():
    batch = {**_batch(6), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    for mode in ("hooks", "functorch"):
        report = preflight(Rich(), _mse_labelled, batch, mode=mode)
        assert report.passed and report.max_relative_error < 1e-9, (mode, report.to_dict())


def test_preflight_passes_the_shipped_gan_discriminator():
    from dpgen.config import load_config
    from dpgen.models import ConditionalGAN, gan_spec_from_config
    from dpgen.training.objectives import DiscriminatorObjective
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs/breast_cgan.yaml")
    gan = ConditionalGAN(gan_spec_from_config(cfg, (1, 28, 28)))
    obj = DiscriminatorObjective(gan.generator, gan.spec)
    batch = obj.preflight_batch(4, torch.Generator().manual_seed(0))
    report = preflight(gan.discriminator, obj.loss, batch, mode="hooks")
    assert report.passed and report.max_relative_error < 1e-9, report.to_dict()


def test_empty_poisson_sample_is_a_noise_only_step():
    model = Small()
    before = [p.detach().clone() for p in model.parameters()]
    dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=2.0, max_grad_norm=1.0,
               expected_batch_size=4)
    dp.step([], lambda *a: None, _mse, 1, torch.Generator().manual_seed(0))
    moved = torch.cat([(p.detach() - b).flatten() for b, p in zip(before, model.parameters())])
    # noise std sigma*C/expected = 0.5 per coordinate
    assert 0.4 < moved.std().item() < 0.6


def test_poisson_sampling_rate():
    units = PrivacyUnits.from_subjects(None, 1000)
    sizes = [len(units.poisson_sample(0.1, step_generator(0, s, "poisson"))) for s in range(200)]
    assert abs(np.mean(sizes) - 100) < 3 and np.std(sizes) > 5  # variable batch sizes: Poisson, not fixed


class Volumes(nn.Module):
    """3D convolutions on one-channel volumes (a 3D classifier's or encoder's layers): plain,
    strided, wider."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv3d(1, 2, 3, padding=1)
        self.down = nn.Conv3d(2, 3, 3, stride=2, padding=1)
        self.wide = nn.Conv3d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8, 64)

    def forward(self, x, label=None):
        h = torch.tanh(self.down(torch.tanh(self.first(x))))
        return self.head(torch.tanh(self.wide(h)).flatten(1)).view(-1, 1, 8, 8)


def test_preflight_passes_3d_convolutions():
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(5, 1, 4, 4, 4, generator=g), "y": torch.randn(5, 1, 8, 8, generator=g)}
    report = preflight(Volumes().double(), _mse, {k: v.double() for k, v in batch.items()}, mode="hooks")
    assert report.passed and report.max_relative_error < 1e-9, report.to_dict()


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, 1, 1), (4, 2, 1, 1), ((3, 1), 1, (1, 0), 1), (3, 1, 2, 2), (2, 3, 0, 1), (5, 2, 2, 1),
    # different stride, dilation and padding per axis (an axis given the other's would show)
    ((2, 3), (1, 2), (0, 1), (2, 1)), ((3, 2), (2, 1), (1, 2), (1, 2)), ((1, 3), (2, 1), (0, 1), 1),
    # ... and the staged plans of `_patch_gram`'s offset sum (the first case above takes columns
    # first, the others the direct sum): columns first, columns first, rows first, rows first
    ((3, 3), (1, 3), 1, 1), (3, 1, 1, (1, 2)), ((3, 3), (3, 1), 1, 1), ((4, 3), (3, 1), (1, 0), (2, 1)),
    (1, 1, 0, 1), (1, 2, 0, 1),  # 1x1 kernels (wide 1x1 convs can be ghost-clipped too)
])
def test_ghost_patch_gram_equals_the_gram_of_unfolded_patches(kernel, stride, padding, dilation):
    # Ghost clipping's per-unit norms stand on this Gram: wrong here means clipping by a wrong norm.
    from dpgen.privacy.engine import _patch_gram

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(4, 3, 9, 7, dtype=torch.float64)
    out_hw = layer.double()(x).shape[2:]
    torch.testing.assert_close(_patch_gram(layer, x, layer.padding, out_hw), _patch_gram_ref(layer, x, layer.padding, out_hw))


def test_ghost_norm_bounds_the_rounded_sum_it_clips():
    # The ghost norm is exact, the clipped sum is one float32 convolution backward: where a
    # unit's gradient cancels across positions (here, exactly zero before the inputs are rounded
    # to float32), the sum's rounding dwarfs the true norm. The norm the clipping reads must
    # still bound each unit's summed gradient, or c_u x (its gradient) could exceed the clip.
    from dpgen.privacy.engine import _ghost_conv_grads, _Layout

    gen = torch.Generator().manual_seed(0)
    layer = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    x = torch.randn(4, 8, 10, 10, generator=gen, dtype=torch.float64) * 30
    g = torch.randn(4, 16, 10, 10, generator=gen, dtype=torch.float64) * 30
    patches = F.unfold(x, 3, padding=1)  # (m, 72, 100): g's rows projected off their span
    g_flat = g.flatten(2)
    g_flat -= g_flat @ patches.transpose(1, 2) @ torch.linalg.solve(patches @ patches.transpose(1, 2), patches)
    x, g = x.float(), g_flat.view_as(g).float()
    stand_in = _ghost_conv_grads(layer, x, g, (1, 1), _Layout(1, 4))
    for u in range(4):
        summed = stand_in._dpgen_weighted_sum(torch.eye(4)[u])  # unit u alone, clip factor 1
        assert summed.norm() <= stand_in._dpgen_sq_norms[u].sqrt(), (u, summed.norm(), stand_in._dpgen_sq_norms[u])


def test_rich_model_has_ghost_clipped_convs(monkeypatch):
    # (the tests above cover ghost clipping only if Rich's convs really take that path)
    from dpgen.privacy import engine

    net, ghosted, real = Rich(), [], engine._ghost_conv_grads
    monkeypatch.setattr(engine, "_ghost_conv_grads", lambda layer, *a: ghosted.append(layer) or real(layer, *a))
    batch = {**_batch(6), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    assert preflight(net, _mse_labelled, batch, mode="hooks").passed
    ghosted = {repr(layer) for layer in ghosted}  # (the preflight works on copies of the model)
    assert repr(net.deep) in ghosted and repr(net.deep_strided) in ghosted


def test_preflight_catches_a_wrong_ghost_weighted_sum(monkeypatch):
    # Each unit's clip factor must reach that unit's rows: a sum with the factors permuted fails.
    from dpgen.privacy import engine

    real = engine._ghost_conv_grads

    def permuted(*a):
        stand_in = real(*a)
        right = stand_in._dpgen_weighted_sum
        stand_in._dpgen_weighted_sum = lambda c: right(c.flip(0))
        return stand_in

    monkeypatch.setattr(engine, "_ghost_conv_grads", permuted)
    batch = {**_batch(6), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    report = preflight(Rich(), _mse_labelled, batch, mode="hooks")
    assert not report.passed and any(name.startswith("deep") for name in report.failed), report.to_dict()


def test_preflight_catches_a_wrong_ghost_materialisation(monkeypatch):
    # (training materialises a ghost-clipped conv's per-unit gradients when a unit's draws span passes)
    from dpgen.privacy import engine

    real = engine._ghost_conv_grads

    def swapped(*a):
        stand_in = real(*a)
        right = stand_in._dpgen_materialise
        stand_in._dpgen_materialise = lambda: right().flip(0)  # each unit given another's gradient
        return stand_in

    monkeypatch.setattr(engine, "_ghost_conv_grads", swapped)
    batch = {**_batch(6), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    report = preflight(Rich(), _mse_labelled, batch, mode="hooks")
    assert not report.passed and any(name.startswith("deep") for name in report.failed), report.to_dict()


def test_preflight_catches_a_wrong_ghost_norm(monkeypatch):
    from dpgen.privacy import engine

    batch = {**_batch(6), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    monkeypatch.setattr(engine, "_patch_gram", lambda *a: 1.01 * _patch_gram_ref(*a))
    report = preflight(Rich(), _mse_labelled, batch, mode="hooks")
    assert not report.passed and any(name.startswith("deep") for name in report.failed), report.to_dict()


def _patch_gram_ref(layer, x, padding, out_hw):
    cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
    return cols.transpose(1, 2) @ cols
