"""The DP-SGD engine: the preflight catches wrong per-sample gradients, and one step equals
brute-force per-unit clipping (subjects and noise multiplicity included)."""

import copy

import numpy as np
import pytest
import torch
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

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1)).view(-1, 1, 8, 8)


def _draw(data, rows, g):
    """A diffusion-like random draw: the loss depends on noise drawn per row."""
    x = data[rows]
    noise = torch.randn(x.shape, generator=g)
    return {"x": x + 0.5 * noise, "y": noise}


def _brute_force_update(model, data, units, chosen, K, C, expected, seed, step, max_rows):
    """Per unit: mean over its rows and K draws of autograd gradients, clipped to C; summed; / expected."""
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    total = [torch.zeros_like(p) for p in params]
    chunks = units.physical_chunks(chosen, max_rows)
    for ci, (rows, group, n_groups) in enumerate(chunks):
        draws = [_draw(data, rows, step_generator(seed, step, f"{ci}:{k}")) for k in range(K)]
        for gi in range(n_groups):
            sel = np.flatnonzero(group == gi)
            ref.zero_grad()
            loss = sum(_mse(ref, {k: v[sel] for k, v in d.items()}).mean() for d in draws) / K
            loss.backward()
            grads = [p.grad.clone() for p in params]
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            factor = min(1.0, C / (norm.item() + 1e-6))
            for t, g in zip(total, grads):
                t += factor * g
    return [-t / expected for t in total]


@pytest.mark.parametrize("K,subjects", [(1, False), (3, False), (1, True), (2, True)])
def test_dp_step_equals_brute_force_per_unit_clipping(K, subjects):
    torch.manual_seed(0)
    n = 12
    data = torch.randn(n, 1, 8, 8)
    subj = np.repeat(np.arange(4), 3) if subjects else None  # 4 subjects x 3 images
    units = PrivacyUnits.from_subjects(subj, n)
    assert units.kind == ("per subject" if subjects else "per image")
    model = Small()
    C, expected, seed, step, max_rows = 0.05, 5.0, 1, 7, 5  # small C: clipping is active
    chosen = np.array([0, 2, 3]) if subjects else np.array([0, 1, 4, 6, 7, 10])
    update = _brute_force_update(model, data, units, chosen, K, C, expected, seed, step, max_rows)

    dp_model = copy.deepcopy(model)
    before = [p.detach().clone() for p in dp_model.parameters()]
    opt = torch.optim.SGD(dp_model.parameters(), lr=1.0)
    dp = DPSGD(dp_model, opt, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=expected)
    seen_rows = []

    def loss_fn(m, batch):
        seen_rows.extend(
            p.grad_sample.shape[0] for p in dp.params if isinstance(getattr(p, "grad_sample", None), torch.Tensor)
        )
        return _mse(m, batch)

    chunks = units.physical_chunks(chosen, max_rows)
    dp.step(chunks, lambda ci, rows, k: _draw(data, rows, step_generator(seed, step, f"{ci}:{k}")), loss_fn, K,
            torch.Generator().manual_seed(0))
    for b, p, u in zip(before, dp.close().parameters(), update):
        torch.testing.assert_close(p.detach() - b, u, rtol=1e-4, atol=1e-7)
    # per-sample gradients are folded after every pass: never more rows than units in a chunk
    assert max(seen_rows, default=0) <= max(ng for _, _, ng in chunks)


def test_subjects_stay_whole_in_physical_chunks():
    subj = np.array(["a", "a", "a", "b", "c", "c", "d"])
    units = PrivacyUnits.from_subjects(subj, len(subj))
    chunks = units.physical_chunks(np.arange(len(units)), max_rows=3)
    for rows, group, n_groups in chunks:
        for gi in range(n_groups):
            assert len(set(subj[rows[group == gi]])) == 1
    assert sorted(np.concatenate([c[0] for c in chunks]).tolist()) == list(range(7))


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
