"""Generator families end to end on real data (tiny models): pixel diffusion with attributes,
latent diffusion (2D and 3D), conditional GAN; the errors users hit with bad input."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

import dpgen
from dpgen.config import ConfigError, config_from_dict, load_config
from dpgen.privacy.ledger import PrivacyLedger
from tests.conftest import REPO, TINY

FAST = {"pretrain": {"steps": 3, "batch_size": 8, "checkpoint_every": 3},
        "finetune": {"steps": 3, "batch_size": 24, "physical_batch_size": 12, "checkpoint_every": 3},
        "sample": {"num_images": 6, "steps": 3, "batch_size": 4, "class_counts": {"mode": "uniform"}}}


def _tiny(**sections) -> dict:
    raw = copy.deepcopy(TINY)
    for key, val in {**FAST, **sections}.items():
        if isinstance(val, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **val}
        else:
            raw[key] = val
    return raw


def _run(tmp_path_factory, name: str, raw: dict) -> Path:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    dpgen.run(config_from_dict(raw), run_dir, progress=False)
    return run_dir


def _check_private_path(run_dir: Path, trains: str) -> PrivacyLedger:
    """The privacy path every family keeps: plan -> preflight passed -> complete -> artifacts."""
    ledger = PrivacyLedger(run_dir / "privacy" / "ledger.jsonl")
    kinds = [e["kind"] for e in ledger.entries()]
    assert kinds.index("dp_plan") < kinds.index("preflight") < kinds.index("dp_progress") < kinds.index("dp_complete")
    pre = ledger.latest("preflight", mechanism="dp_sgd:finetune")
    assert pre["passed"] and pre["max_relative_error"] < 1e-4 and trains in pre["trains"]
    s = ledger.summary(1e-5)
    assert 0 < s.epsilon <= 8.0 and s.within_target
    assert ledger.latest("artifact", name="cohort") is not None
    assert (run_dir / "cohort" / "cohort.npz").is_file()
    return ledger


# ----------------------------------------------------------------------------- latent diffusion 2D


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    raw = _tiny(
        model={**TINY["model"], "generator": "latent_diffusion", "channels": [16, 32]},
        autoencoder={"channels": [8, 16], "latent_channels": 2, "norm_num_groups": 8,
                     "pretrain": {"steps": 3, "batch_size": 8}},
        finetune={**FAST["finetune"], "trainable": "attention"},
        sample={**FAST["sample"], "sampler": "dpmsolver++"},
    )
    return _run(tmp_path_factory, "latent", raw)


def test_latent_diffusion_end_to_end(latent_run):
    ledger = _check_private_path(latent_run, "latent diffusion UNet")
    pre = ledger.latest("preflight")
    assert pre["input_shapes"]["x0"] == [2, 14, 14]  # the preflight ran on latents: what DP-SGD trains on
    plan = ledger.latest("dp_plan")
    assert plan["trainable"]["mode"] == "attention"
    assert plan["trainable"]["trainable_parameters"] < plan["trainable"]["total_parameters"] / 2
    art = ledger.latest("artifact", name="finetune_weights")
    assert art["privacy_source"] == {"kind": "dp", "mechanisms": ["dp_sgd:finetune"],
                                     "note": "the autoencoder saw public data only"}
    with np.load(latent_run / "cohort" / "cohort.npz") as z:
        assert z["train_images"].shape == (6, 28, 28)


def test_generate_reproduces_bit_for_bit(latent_run):
    gen = dpgen.load(latent_run, device="cpu")
    assert type(gen).__name__ == "LatentDiffusionGenerator" and gen.latent_shape == (2, 14, 14)
    for sampler in ("dpmsolver++", "ddpm"):
        a = gen.generate(labels=[0, 1, 1], seed=5, steps=3, sampler=sampler)
        b = gen.generate(labels=[0, 1, 1], seed=5, steps=3, sampler=sampler)
        c = gen.generate(labels=[0, 1, 1], seed=6, steps=3, sampler=sampler)
        assert a.images.shape == (3, 1, 28, 28) and torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    with pytest.raises(ValueError, match="label 2 does not exist"):
        gen.generate(labels=[2], steps=2)
    with pytest.raises(ValueError, match="trained without attributes"):
        gen.generate(labels=[0], attributes={"age": [50]}, steps=2)


def test_sample_cohort_streams_and_matches_generate(latent_run, tmp_path):
    gen = dpgen.load(latent_run, device="cpu")
    out = gen.sample_cohort(tmp_path / "c", labels=[0, 1, 0, 1, 1], seed=2, steps=2, batch_size=2)
    imgs, labels = gen.generate(labels=[0, 1, 0, 1, 1], seed=2, steps=2, batch_size=2)
    with np.load(out["npz"]) as z:
        assert np.array_equal(z["train_images"], dpgen.data.from_model_range(imgs)[:, 0])
        assert z["train_labels"][:, 0].tolist() == [0, 1, 0, 1, 1]
    assert not list((tmp_path / "c").glob(".*partial*"))  # the memmap is gone


# ----------------------------------------------------------------------------- cGAN


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    raw = _tiny(model={"generator": "cgan", "gan": {"latent_dim": 16, "generator_channels": [32, 16, 8],
                                                     "discriminator_channels": [8, 16, 32]}})
    raw["finetune"] = {**raw["finetune"], "generator_steps": 3}  # free generator steps between DP steps
    return _run(tmp_path_factory, "cgan", raw)


def test_cgan_private_discriminator_and_post_processing(gan_run):
    ledger = _check_private_path(gan_run, "discriminator")
    source = ledger.latest("artifact", name="generator_weights")["privacy_source"]
    assert source["kind"] == "post_processing" and source["mechanisms"] == ["dp_sgd:finetune"]
    cohort = ledger.latest("artifact", name="cohort")["privacy_source"]
    assert cohort["kind"] == "post_processing" and cohort["mechanisms"][0] == "dp_sgd:finetune"
    assert len([e for e in ledger.entries() if e["kind"] == "dp_plan"]) == 1  # one mechanism: D only
    gen = dpgen.load(gan_run, device="cpu")
    a, la = gen.generate(labels=[0, 1, 1, 0], seed=1)
    b, _ = gen.generate(labels=[0, 1, 1, 0], seed=1)
    assert a.shape == (4, 1, 28, 28) and torch.equal(a, b) and la.tolist() == [0, 1, 1, 0]
    with pytest.raises(ValueError, match="guidance"):
        gen.generate(labels=[0], guidance_scale=2.0)


def test_gan_discriminator_step_keeps_generator_out_of_dp():
    """The G update runs with D's hooks off: no per-sample gradients, D's .grad untouched."""
    from dpgen.models.gan import ConditionalGAN, GANSpec
    from dpgen.privacy.engine import DPSGD, PrivacyUnits, step_generator
    from dpgen.training.common import EMA
    from dpgen.training.families.gan import generator_step
    from dpgen.training.objectives import DiscriminatorObjective

    spec = GANSpec(2, 1, 2, [1, 8, 8], latent_dim=8, generator_channels=[16, 8], discriminator_channels=[8, 16])
    gan = ConditionalGAN(spec)
    obj = DiscriminatorObjective(gan.generator, spec)
    dp = DPSGD(gan.discriminator, torch.optim.SGD(gan.discriminator.parameters(), lr=0.1), noise_multiplier=0.0,
               max_grad_norm=1.0, expected_batch_size=4)
    units = PrivacyUnits.from_subjects(None, 6)
    x, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.randint(0, 2, (6,))
    dp.step(units.physical_chunks(np.arange(6), 3),
            lambda c, rows, k: obj.draw_rows({"x": x[rows], "labels": y[rows]}, step_generator(0, 0, str(c))),
            obj.loss, 1, torch.Generator().manual_seed(0))
    g_before = [p.detach().clone() for p in gan.generator.parameters()]
    dp.gsm.disable_hooks()
    generator_step(obj, dp.gsm, gan.generator, torch.optim.SGD(gan.generator.parameters(), lr=0.1),
                   EMA(gan.generator, 0.0), spec, 4, torch.Generator().manual_seed(1), "cpu")
    dp.gsm.enable_hooks()
    for p in gan.discriminator.parameters():
        assert p.grad is None and getattr(p, "grad_sample", None) is None
    assert any(not torch.equal(a, b) for a, b in zip(g_before, gan.generator.parameters()))


def test_gan_fakes_paired_with_private_rows_do_not_mix_rows():
    """With batch norm in the generator (the default), a fake drawn in training mode depends on the
    labels of the other rows of the batch: removing one private unit would move every other unit's
    loss. DP fine-tuning draws fakes in eval mode and refuses training mode."""
    from dpgen.models.gan import ConditionalGAN, GANSpec
    from dpgen.training.objectives import DiscriminatorObjective

    spec = GANSpec(2, 1, 2, [1, 8, 8], latent_dim=8, generator_channels=[16, 8], discriminator_channels=[8, 16],
                   generator_norm="batch")
    gan = ConditionalGAN(spec)
    x, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 0, 0, 1, 1, 1])

    def fakes(obj, labels):
        return obj.draw_rows({"x": x[:len(labels)], "labels": labels}, torch.Generator().manual_seed(0))["fake"]

    public = DiscriminatorObjective(gan.generator, spec)  # pretraining: batch statistics, rows mix
    assert not torch.allclose(fakes(public, y)[0], fakes(public, torch.tensor([0, 1, 1, 1, 1, 1]))[0])
    private = DiscriminatorObjective(gan.generator, spec, private_rows=True)
    with pytest.raises(RuntimeError, match="eval mode"):
        fakes(private, y)
    gan.generator.eval()
    assert torch.equal(fakes(private, y)[0], fakes(private, torch.tensor([0, 1, 1, 1, 1, 1]))[0])


def test_standing_batch_stats_match_the_generators_current_weights():
    """Running statistics gathered along the raw weights' path do not fit EMA weights; standing
    statistics recomputed for the current weights make eval mode behave like training mode."""
    from dpgen.models.gan import ConditionalGAN, GANSpec
    from dpgen.training.families.gan import standing_batch_stats

    torch.manual_seed(0)
    spec = GANSpec(2, 1, 2, [1, 8, 8], latent_dim=8, generator_channels=[16, 8], discriminator_channels=[8, 16],
                   generator_norm="batch")
    G = ConditionalGAN(spec).generator
    for m in G.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)  # stale statistics
            m.running_var.fill_(0.01)
    z, y = torch.randn(256, 8), torch.arange(256) % 2

    def spread(mode):
        getattr(G, mode)()
        with torch.no_grad():
            return G(z, y).std(0).mean().item()

    stale, batch = spread("eval"), spread("train")
    standing_batch_stats(G, spec, seed=0, device="cpu")
    assert not G.training
    assert abs(spread("eval") - batch) < 0.15 * batch < abs(stale - batch)


def test_mode_seeking_term_penalises_a_generator_that_ignores_its_latent():
    """MSGAN's term (finetune.generator_mode_seeking) reads fakes only; it must cost a collapsed
    generator (same image for every latent) far more than one whose images move with z."""
    from dpgen.models.gan import ConditionalGAN, GANSpec
    from dpgen.training.objectives import DiscriminatorObjective

    torch.manual_seed(0)
    spec = GANSpec(2, 1, 2, [1, 8, 8], latent_dim=8, generator_channels=[16, 8], discriminator_channels=[8, 16],
                   generator_norm="batch")
    gan = ConditionalGAN(spec)
    obj = DiscriminatorObjective(gan.generator, spec)
    cond = {"labels": torch.arange(16) % 2}

    def loss(weight):
        return obj.generator_loss(gan.discriminator, cond, torch.Generator().manual_seed(1), weight).item()

    plain, varied = loss(0.0), loss(1.0)
    with torch.no_grad():
        gan.generator.fc.weight[:, :spec.latent_dim].zero_()  # input [z, label embedding]: z no longer counts
    collapsed = loss(1.0) - loss(0.0)
    assert 0 < varied - plain < 100 < collapsed


# ----------------------------------------------------------------------------- 3D


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    raw = _tiny(
        data={"public": {"source": "adrenalmnist3d", "split": "val", "max_images": 16},
              "private": {"source": "adrenalmnist3d", "max_images": 16}, "num_classes": 2, "spatial_dims": 3},
        model={"generator": "latent_diffusion", "channels": [8, 16], "attention_levels": [False, True],
               "num_head_channels": 8, "norm_num_groups": 4, "num_train_timesteps": 50},
        autoencoder={"channels": [4, 8], "latent_channels": 2, "norm_num_groups": 4,
                     "pretrain": {"steps": 2, "batch_size": 4}},
        pretrain={"steps": 2, "batch_size": 4, "checkpoint_every": 2},
        finetune={"steps": 2, "batch_size": 8, "physical_batch_size": 8, "checkpoint_every": 2},
        sample={"num_images": 4, "steps": 2, "batch_size": 4, "class_counts": {"mode": "uniform"}},
    )
    return _run(tmp_path_factory, "vol", raw)


@pytest.fixture(scope="module")
def gan_volume_run(tmp_path_factory):
    raw = _tiny(
        data={"public": {"source": "adrenalmnist3d", "split": "val", "max_images": 16},
              "private": {"source": "adrenalmnist3d", "max_images": 16}, "num_classes": 2, "spatial_dims": 3},
        model={"generator": "cgan", "gan": {"latent_dim": 8, "generator_channels": [16, 8, 4],
                                             "discriminator_channels": [4, 8, 16], "norm_num_groups": 4}},
        pretrain={"steps": 2, "batch_size": 4, "checkpoint_every": 2},
        finetune={"steps": 2, "batch_size": 8, "physical_batch_size": 8, "checkpoint_every": 2},
        sample={"num_images": 4, "steps": 2, "batch_size": 4, "class_counts": {"mode": "uniform"}},
    )
    return _run(tmp_path_factory, "ganvol", raw)


def test_3d_cohort_written_as_npz_and_nifti(volume_run):
    import nibabel as nib

    ledger = _check_private_path(volume_run, "latent diffusion UNet")
    assert ledger.latest("preflight")["input_shapes"]["x0"] == [2, 14, 14, 14]
    with np.load(volume_run / "cohort" / "cohort.npz") as z:
        assert z["train_images"].shape == (4, 28, 28, 28)
        first = z["train_images"][0]
    rows = list(csv.DictReader(open(volume_run / "cohort" / "labels.csv")))
    assert len(rows) == 4 and set(rows[0]) == {"image", "label"}
    vol = np.asarray(nib.load(volume_run / "cohort" / rows[0]["image"]).dataobj)
    assert vol.shape == (28, 28, 28) and np.array_equal(vol, first)


# ----------------------------------------------------------------------------- attributes


@pytest.fixture(scope="module")
def attribute_folder(tmp_path_factory):
    """BreastMNIST images as PNGs with a labels CSV holding two continuous attributes."""
    from PIL import Image

    from tests.conftest import data_dir

    root = tmp_path_factory.mktemp("attrs")
    with np.load(data_dir() / "breastmnist.npz") as z:
        images, labels = z["train_images"][:40], z["train_labels"][:40, 0]
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "age", "brightness"])
        for i, (im, lab) in enumerate(zip(images, labels)):
            Image.fromarray(im).save(root / f"{i}.png")
            w.writerow([f"{i}.png", int(lab), 30 + (i * 7) % 50, f"{im.mean() / 2.55:.2f}"])
    return root


@pytest.fixture(scope="module")
def attribute_run(tmp_path_factory, attribute_folder):
    raw = _tiny(
        data={**TINY["data"], "private": {"source": str(attribute_folder)},
              "attributes": {"age": {"min": 18, "max": 90}, "brightness": {"min": 0, "max": 100}}},
        finetune={**FAST["finetune"], "trainable": "attention+conditioning"},
        sample={**FAST["sample"], "attributes": {"mode": "dp_histogram", "bins": 5}, "guidance_scale": 2.0},
    )
    return _run(tmp_path_factory, "attr", raw)


def test_attribute_conditioning(attribute_run):
    ledger = _check_private_path(attribute_run, "diffusion UNet")
    assert "unet.class_embedding" in ledger.latest("dp_plan")["trainable"]["modules"]
    with np.load(attribute_run / "cohort" / "cohort.npz") as z:
        attrs, names = z["train_attributes"], list(z["attribute_names"])
    assert names == ["age", "brightness"] and attrs.shape == (6, 2)
    assert (attrs[:, 0] >= 18).all() and (attrs[:, 0] <= 90).all()
    assert "DP attribute histograms" in ledger.latest("artifact", name="cohort")["attributes_source"]
    release = ledger.latest("dp_release", name="gaussian:attribute_histogram")
    assert np.asarray(release["values"]).shape == (2, 5) and release["event"]["sigma"] == pytest.approx(20 / 2 ** 0.5)
    assert release["event"] in ledger.latest("dp_plan")["other_events"]  # planned with DP-SGD's budget

    from dpgen.pipeline import cohort_attributes

    cfg = config_from_dict({**config_from_dict(_tiny()).to_dict(),
                            "data": {**TINY["data"], "attributes": {"age": {"min": 18, "max": 90}}},
                            "sample": {"attributes": {"mode": "uniform"}}})
    vals, source = cohort_attributes(cfg, 50, seed=0)
    assert source.startswith("uniform") and 18 <= min(vals["age"]) and max(vals["age"]) <= 90

    gen = dpgen.load(attribute_run, device="cpu")
    s = gen.generate(labels=[0, 1], attributes={"age": [40, 70], "brightness": 50}, seed=0, steps=2, guidance_scale=2)
    again = gen.generate(labels=[0, 1], attributes=np.array([[40, 50], [70, 50]]), seed=0, steps=2, guidance_scale=2)
    assert torch.equal(s.images, again.images)
    # the attributes reach the network (compared before sampling's clamp, which a barely
    # trained model may saturate)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([10, 10]), torch.tensor([0, 1])
    space, mask = gen.attribute_space, torch.ones(2)
    with torch.no_grad():
        e1 = gen.model(x, t, y, space.normalize(torch.tensor([[40.0, 50], [70, 50]])), mask)
        e2 = gen.model(x, t, y, space.normalize(torch.tensor([[20.0, 50], [20, 50]])), mask)
    assert not torch.equal(e1, e2)
    assert s.attributes.tolist() == [[40, 50], [70, 50]]
    with pytest.raises(ValueError, match=r"'age' = 120 is outside the trained range \[18, 90\]"):
        gen.generate(labels=[0], attributes={"age": 120, "brightness": 50}, steps=2)
    with pytest.raises(ValueError, match="'weight' is not one this generator was trained on"):
        gen.generate(labels=[0], attributes={"age": 40, "brightness": 50, "weight": 3}, steps=2)
    with pytest.raises(ValueError, match="label 7 does not exist"):
        gen.generate(labels=[7], steps=2)


def test_attribute_config_errors(tiny_raw):
    tiny_raw["data"]["attributes"] = {"age": {"min": 18, "max": 90}}
    tiny_raw["sample"]["attributes"] = {"mode": "fixed", "values": {"age": 95}}
    with pytest.raises(ConfigError, match=r"sample.attributes.values.age = 95 is outside data.attributes.age"):
        config_from_dict(tiny_raw)
    tiny_raw["data"]["attributes"] = {"age": {"min": 90, "max": 18}}
    with pytest.raises(ConfigError, match="max > min"):
        config_from_dict(tiny_raw)


# ----------------------------------------------------------------------------- bad input


def test_latent_shape_errors(tiny_raw):
    from dpgen.models.latent import latent_spec_from_config as build_spec

    tiny_raw["model"].update({"generator": "latent_diffusion", "channels": [16, 32]})
    tiny_raw["autoencoder"] = {"channels": [8, 8, 8, 8], "norm_num_groups": 8}  # 28 / 8: not a whole grid
    with pytest.raises(ValueError, match=r"divisible by 8; images of shape \(28, 28\) cannot be encoded"):
        build_spec(config_from_dict(tiny_raw), (1, 28, 28))
    tiny_raw["autoencoder"] = {"channels": [8, 8, 8], "norm_num_groups": 8, "latent_shape": [4, 7, 7]}
    with pytest.raises(ValueError, match=r"can only produce latents of shape \[3, 7, 7\]"):
        build_spec(config_from_dict(tiny_raw), (1, 28, 28))
    tiny_raw["autoencoder"] = {"channels": [8, 8, 8], "norm_num_groups": 8}  # 7x7 latents, UNet halves once
    spec = build_spec(config_from_dict(tiny_raw), (1, 28, 28))
    from dpgen.models import LatentDiffusion

    with pytest.raises(ValueError, match=r"divisible by 2; got \(7, 7\)"):
        LatentDiffusion(spec)
    from dpgen.models import AutoencoderSpec, DiffusionSpec, LatentDiffusionSpec

    with pytest.raises(ValueError, match=r"UNet expects latents of shape \(3, 8, 8\), but the autoencoder produces \(3, 7, 7\)"):
        LatentDiffusionSpec(DiffusionSpec(2, 3, 2, image_shape=[3, 8, 8]),
                            AutoencoderSpec(2, 1, [1, 28, 28], channels=[8, 8, 8], norm_num_groups=8), 1.0)


def test_lora_errors_and_merge():
    from dpgen.models import ConditionalDiffusion, DiffusionSpec
    from dpgen.models.lora import merge_lora
    from dpgen.privacy.engine import make_conv_inputs_contiguous, preflight
    from dpgen.training.objectives import DiffusionObjective
    from dpgen.training.trainable import select_trainable

    spec = DiffusionSpec(2, 1, 2, channels=[8, 16], attention_levels=[False, True], num_head_channels=8,
                         norm_num_groups=4, num_train_timesteps=50, image_shape=[1, 8, 8])
    model = ConditionalDiffusion(spec)
    with pytest.raises(ValueError, match=r"lora_targets = \['to_qq'\]: LoRA target\(s\) \['to_qq'\] match no nn.Linear"):
        select_trainable(model, "lora", lora_targets=["to_qq"])
    info = select_trainable(model, "lora", lora_rank=2, lora_targets=["to_q", "to_v"])
    layers = info["lora_layers"]
    assert len(layers) >= 6 and all(n.endswith((".to_q", ".to_v")) for n in layers)
    assert info["trainable_parameters"] < 0.05 * info["total_parameters"]
    make_conv_inputs_contiguous(model)
    obj = DiffusionObjective(model, 0.1)
    g = torch.Generator().manual_seed(0)
    from dpgen.privacy.dpsgd import preflight_copy

    probe, n_zero = preflight_copy(model, g)  # LoRA `up` starts at zero: perturbed for the check
    assert n_zero >= len(layers)
    report = preflight(probe, obj.loss, obj.preflight_batch(3, g))
    assert report.passed and all(n.endswith((".down.weight", ".up.weight")) for n in report.errors)
    assert min(report.errors.values()) >= 0 and report.max_relative_error < 1e-6
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith((".up.weight", ".down.weight")):
                p.add_(0.1)
    batch = obj.preflight_batch(2, torch.Generator().manual_seed(1))
    before = obj.loss(model, batch)
    assert merge_lora(model) == len(layers)
    torch.testing.assert_close(obj.loss(model, batch), before)
    assert not any(n.endswith((".down.weight", ".up.weight")) for n, _ in model.named_parameters())


def test_trainable_config_errors(tiny_raw):
    tiny_raw["model"]["attention_levels"] = [False, False]
    tiny_raw["finetune"]["trainable"] = "attention"
    with pytest.raises(ConfigError, match="no attention level"):
        config_from_dict(tiny_raw)
    tiny_raw["model"]["generator"] = "cgan"
    with pytest.raises(ConfigError, match="cgan discriminator does not have"):
        config_from_dict(tiny_raw)


def test_generator_settings_only_for_the_cgan(tiny_raw):
    tiny_raw["finetune"]["generator_steps"] = 4
    with pytest.raises(ConfigError, match="apply to the cGAN.s"):
        config_from_dict(tiny_raw)
    tiny_raw["model"]["generator"] = "cgan"
    assert config_from_dict(tiny_raw).finetune.generator_steps == 4
    tiny_raw["finetune"].update(generator_mode_seeking=1.0, batch_size=1, physical_batch_size=1)
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        config_from_dict(tiny_raw)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(path):
    if "\nsites:" in (REPO / path).read_text():  # a federation (dpgen federated): its own schema
        from dpgen.federated.config import load_federation

        fed = load_federation(REPO / path)
        assert fed.sites and all(s.privacy.epsilon > 0 for s in fed.sites.values())
        return
    cfg = load_config(REPO / path)
    from dpgen.models.registry import FAMILIES

    assert cfg.privacy.epsilon > 0 and cfg.model.generator in FAMILIES


def test_cli_lora_target_without_layers_fails_before_training(tmp_path, tiny_raw, capsys):
    import yaml

    from dpgen.cli import main

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_raw))
    code = main(["run", str(p), "finetune.trainable=lora", "finetune.lora_targets=[nope]", "--run-dir",
                 str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "finetune.lora_targets = ['nope']" in err and "match no nn.Linear layer" in err and "to_q" in err
    assert not (tmp_path / "run" / "checkpoints" / "pretrain.safetensors").exists()


# ----------------------------------------------------------------------------- every command, every family


FAMILY_RUNS = {"latent_run": ("latent_diffusion", 2), "gan_run": ("cgan", 2), "volume_run": ("latent_diffusion", 3),
               "gan_volume_run": ("cgan", 3)}  # pixel diffusion 2D: tests/test_release.py's finished run


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core box: one thread is several times faster
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fixture", list(FAMILY_RUNS))
def test_every_command_on_every_family(fixture, request, tmp_path, capsys, one_thread):
    """load, evaluate, audit (the family's own membership attack and inversion target), report,
    release (3D: a bundle that reads back as a folder source, volumes unchanged) and sweep."""
    import json
    import shutil

    from dpgen.cli import main
    from dpgen.data import load_dataset
    from dpgen.data.medmnist import medmnist_to_channel_first
    from dpgen.report.release import verify_bundle

    family, dims = FAMILY_RUNS[fixture]
    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(fixture), run)  # the module's run stays as it was
    gen = dpgen.load(run, device="cpu")
    assert gen.family == family
    out = gen.generate(labels=[0, 1], seed=0, steps=2)
    assert out.images.shape[2:] == (28,) * dims

    quick = ["--no-progress", "--device", "cpu"]
    assert main(["evaluate", str(run), "--seeds", "1", "--epochs", "1", "--encoder-epochs", "1", *quick]) == 0
    ev = json.loads((run / "internal" / "evaluation" / "evaluation.json").read_text())
    assert ev["utility"]["rows"]["synthetic"]["roc_auc"]["mean"] is not None
    assert main(["audit", str(run), "--overfit-images", "4", "--overfit-steps", "3", "--attack-targets", "1",
                 "--inversion-iterations", "3", *quick]) == 0
    probes = json.loads((run / "internal" / "audit" / "probes.json").read_text())
    mm = probes["membership"]
    assert mm["family"] == family and mm["dp_model"]["primary"] == "reference"
    assert set(mm["dp_model"]["scores"]) == ({"discriminator", "reference"} if family == "cgan" else {"loss", "reference"})
    assert "overfit_control" in mm
    target = {"cgan": "discriminator_loss", "latent_diffusion": "latent_diffusion_loss"}[family]
    assert any(t.startswith(target) for t in probes["reconstruction"]["targets"])
    capsys.readouterr()

    assert main(["report", str(run), "--no-pdf"]) == 0
    assert "internal checklist" in capsys.readouterr().out
    assert main(["release", str(run), str(tmp_path / "bundle")]) == 0
    assert verify_bundle(tmp_path / "bundle") == []
    with np.load(run / "cohort" / "cohort.npz") as z:
        cohort = medmnist_to_channel_first(z["train_images"], "cohort")
    if dims == 3:  # the bundle read back as a folder source gives the cohort's volumes, axes and all
        from dpgen.config import DataSource

        back = load_dataset(DataSource(source=str(tmp_path / "bundle")))
        assert back.images.shape == cohort.shape and np.array_equal(back.images, cohort)

    assert main(["sweep", str(run / "config.yaml"), "--epsilons", "4", "--run-dir", str(tmp_path / "sweep"),
                 "--eval-seeds", "1", "--eval-epochs", "1", "--encoder-epochs", "1", *quick]) == 0
    sweep = json.loads((tmp_path / "sweep" / "internal" / "sweep.json").read_text())
    assert sweep["runs"][0]["evaluated"] and sweep["points"][0]["tstr_auc"] is not None


def test_nifti_round_trip_and_one_axis_convention(tmp_path):
    """dpgen.data.nifti: what is written (the cohort writer, the release) reads back unchanged,
    as nibabel's voxel array in the array's own axis order (no transposes anywhere)."""
    import nibabel as nib

    from dpgen.data.folder import load_folder
    from dpgen.data.nifti import read_nifti, write_nifti

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (1, 5, 6, 7), dtype=np.uint8)
    rgb = rng.integers(0, 256, (3, 5, 6, 7), dtype=np.uint8)
    for name, vol in (("grey.nii.gz", grey), ("rgb.nii.gz", rgb), ("plain.nii", grey)):
        write_nifti(tmp_path / name, vol)
        assert np.array_equal(read_nifti(tmp_path / name), vol)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "grey.nii.gz").dataobj), grey[0])  # (D, H, W) as stored
    assert np.array_equal(np.asarray(nib.load(tmp_path / "rgb.nii.gz").dataobj), np.moveaxis(rgb, 0, -1))
    (tmp_path / "labels.csv").write_text("image,label\ngrey.nii.gz,0\nplain.nii,1\n")
    assert np.array_equal(load_folder(tmp_path).images, np.stack([grey, grey]))
    with pytest.raises(ValueError, match="PNG"):
        write_nifti(tmp_path / "x.nii.gz", rng.integers(0, 256, (3, 8, 8), dtype=np.uint8))


# ----------------------------------------------------------------------------- public data of another shape


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """BreastMNIST colourised to RGB and enlarged to 32x32: a private set of another shape than
    the public PneumoniaMNIST (grey, 28x28)."""
    from PIL import Image

    from tests.conftest import data_dir

    root = tmp_path_factory.mktemp("rgb")
    rows = ["image,label,split"]
    with np.load(data_dir() / "breastmnist.npz") as z:
        for split, n in (("train", 48), ("val", 16), ("test", 16)):
            for i, (im, lab) in enumerate(zip(z[f"{split}_images"][:n], z[f"{split}_labels"][:n, 0])):
                g = np.asarray(Image.fromarray(im).resize((32, 32), Image.BILINEAR), dtype=np.float32)
                rgb = np.stack([g, 0.8 * g + 20, 0.6 * g + 40], -1).clip(0, 255).astype(np.uint8)
                Image.fromarray(rgb).save(root / f"{split}{i}.png")
                rows.append(f"{split}{i}.png,{int(lab)},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_grey_public_data_fitted_to_an_rgb_private_set(tmp_path, rgb_folder, one_thread):
    import json

    raw = _tiny(data={**TINY["data"], "private": {"source": str(rgb_folder), "split_column": "split"}},
                model={**TINY["model"], "channels": [16, 32]})
    with pytest.raises(Exception, match=r"data.public.transform"):  # without it: refused, with the key to set
        dpgen.run(config_from_dict(raw), tmp_path / "refused", progress=False, device="cpu")
    raw["data"]["public"]["transform"] = {"resize": True, "channels": True}
    run = tmp_path / "run"
    dpgen.run(config_from_dict(raw), run, progress=False, device="cpu")
    with np.load(run / "cohort" / "cohort.npz") as z:
        assert z["train_images"].shape == (6, 32, 32, 3)
    manifest = json.loads((run / "manifest.json").read_text())
    t = manifest["datasets"]["public/train"]["transform"]
    assert t["from"] == [1, 28, 28] and t["to"] == [3, 32, 32] and len(t["steps"]) == 2
    assert "transform" not in manifest["datasets"]["private/train"]  # the private data is used as it is

    raw["data"]["private"]["transform"] = {"resize": True}
    with pytest.raises(ConfigError, match="only the public data is transformed"):
        config_from_dict(raw)


def test_public_transform_maps():
    from dpgen.data.transform import LUMA, convert_channels, resize

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    rgb = convert_channels(grey, 3)
    assert rgb.dtype == np.uint8 and np.array_equal(rgb[:, 1], grey[:, 0])
    back = convert_channels(rgb, 1)
    assert np.abs(back.astype(int) - grey.astype(int)).max() <= 1 and abs(sum(LUMA) - 1) < 1e-9
    small = resize(grey, (4, 4))  # shrinking: area averages
    assert small.shape == (2, 1, 4, 4) and small[0, 0, 0, 0] == round(grey[0, 0, :2, :2].mean())
    vol = rng.random((1, 1, 4, 4, 4)).astype(np.float32)
    assert resize(vol, (6, 6, 6)).shape == (1, 1, 6, 6, 6)
