"""galray's own encoder: views, losses, invariance, freezing, overfitting a batch, checkpoints and the
embed backbones that load them, the job config and a tune plan."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from galray.config import ConfigError, from_dict
from galray.models.augment import AugmentConfig, gaussian_blur, random_view
from galray.models.checkpoint import load_model, save_model
from galray.models.encoder import (BACKBONE_WEIGHTS_NAME, EncoderConfig, SurveyEncoder, d4_views, normalize_images,
                                   save_backbone_weights)
from galray.models.encoder_losses import dirichlet_multinomial_nll, nt_xent
from galray.train import encoder_loop
from galray.train.config import TrainJob

# A CPU-sized encoder: galray's pico ConvNeXt at 32 px (its smallest: the last stage is 1x1).
TINY = {"backbone": "galray_convnext_pico", "image_size": 32, "proj_hidden": 32, "proj_dim": 16}


def _encoder(**changes) -> SurveyEncoder:
    torch.manual_seed(0)
    return SurveyEncoder(EncoderConfig(**{**TINY, **changes}))


def _galaxies(n: int = 16, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (n, 3, size, size) simulated cutouts, their class labels)."""
    from galray.data.galsim_survey import SimConfig, render_batch

    b = render_batch(range(n), SimConfig(size=size))
    return torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(b["label"]).long()


# --- views and losses ------------------------------------------------------------------------------

def test_identity_view_is_sky_subtracted_input_and_views_are_seeded():
    x = torch.rand(4, 3, 16, 16)
    off = AugmentConfig(rotate=False, flip=False, zoom=(1.0, 1.0), shift=0.0, blur_max=0.0, gamma=(1.0, 1.0), tau=0.0,
                        brightness=0.0, noise_max=0.0, noise_rel=0.0)
    expect = x - x.flatten(2).median(dim=2).values[:, :, None, None]
    torch.testing.assert_close(random_view(x, off, torch.Generator().manual_seed(0)), expect, atol=1e-5, rtol=0)
    a = random_view(x, AugmentConfig(), torch.Generator().manual_seed(3))
    b = random_view(x, AugmentConfig(), torch.Generator().manual_seed(3))
    c = random_view(x, AugmentConfig(), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_blur_keeps_flux_and_zero_sigma_is_identity():
    x = torch.zeros(2, 1, 31, 31)
    x[:, :, 15, 15] = 1.0
    out = gaussian_blur(x, torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(out[0], x[0])
    assert out[1].sum().item() == pytest.approx(1.0, abs=1e-4) and out[1].max() < 0.1


def test_relative_noise_follows_each_image_own_sky():
    g = torch.Generator().manual_seed(0)
    sky = torch.tensor([0.01, 0.05])[:, None, None, None]
    x = 0.3 + sky * torch.randn(2, 1, 64, 64, generator=g)
    only_noise = AugmentConfig(rotate=False, flip=False, zoom=(1.0, 1.0), shift=0.0, blur_max=0.0, gamma=(1.0, 1.0),
                               tau=0.0, brightness=0.0, noise_max=0.0, noise_rel=1.0)
    added = random_view(x, only_noise, torch.Generator().manual_seed(1)) - (x - x.flatten(2).median(2).values[..., None, None])
    ratio = added.flatten(1).std(1) / sky.flatten()
    assert torch.allclose(ratio[0], ratio[1], rtol=0.15) and 0 < ratio[0] < 1.1, ratio  # U(0, 1) sky sigmas each
    flat = torch.full((2, 1, 16, 16), 0.3)  # no sky noise: no noise added
    torch.testing.assert_close(random_view(flat, only_noise, g), torch.zeros_like(flat))


def test_asinh_input_scale_reads_signal_to_noise_and_drops_gain_and_offset():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = torch.exp(-((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / 8.0)
    noise = 0.01 * torch.randn(1, 3, 32, 32, generator=g)
    faint, bright = 0.1 + 0.05 * blob + noise, 0.1 + 0.5 * blob + noise
    for mode in ("asinh", "peak"):  # a survey's gain and sky level drop out either way
        torch.testing.assert_close(normalize_images(0.5 * faint + 0.2, mode), normalize_images(faint, mode),
                                   atol=1e-4, rtol=1e-4)
    # Known answer: the centre pixel, in units of ASINH_SOFTENING x the frame's noise, asinh-stretched.
    y = bright - bright.flatten(2).median(2).values[..., None, None]
    from galray.models.augment import sky_sigma
    expect = torch.asinh(y[0, :, 16, 16] / (2.0 * sky_sigma(y).mean()))
    torch.testing.assert_close(normalize_images(bright)[0, :, 16, 16], expect)
    # The same galaxy at 10x the signal-to-noise is read brighter (peak scaling would give both the same peak).
    assert normalize_images(bright)[0, :, 16, 16].mean() > normalize_images(faint)[0, :, 16, 16].mean() + 1.5


def test_nt_xent_known_answers():
    z = torch.eye(8)  # 8 orthogonal directions: each view's twin is identical, the rest orthogonal
    assert nt_xent(z, z, temperature=0.05).item() < 1e-6
    # All views the same direction: the positive is no better than the 2n - 2 negatives.
    ones = torch.ones(8, 4)
    assert nt_xent(ones, ones, temperature=0.5).item() == pytest.approx(math.log(15), rel=1e-5)


def test_dirichlet_multinomial_matches_scipy():
    from scipy.stats import dirichlet_multinomial

    alpha = torch.tensor([[2.0, 5.0, 1.5, 3.0, 4.0]])
    counts = torch.tensor([[3.0, 7.0, 1.0, 0.0, 6.0]])
    expect = -(dirichlet_multinomial.logpmf([3, 7, 1], [2.0, 5.0, 1.5], 11)
               + dirichlet_multinomial.logpmf([0, 6], [3.0, 4.0], 6))
    assert dirichlet_multinomial_nll(alpha, counts, (3, 2)).item() == pytest.approx(expect, rel=1e-5)
    # A question nobody answered contributes nothing.
    assert dirichlet_multinomial_nll(alpha, torch.tensor([[0.0, 0, 0, 0, 6]]), (3, 2)).item() == pytest.approx(
        -dirichlet_multinomial.logpmf([0, 6], [3.0, 4.0], 6), rel=1e-5)


# --- the model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["last", "stages"])
def test_embedding_is_exactly_rotation_and_flip_invariant(pool):
    x = torch.rand(3, 3, 32, 32)
    enc = _encoder(pool=pool).eval()
    assert enc.embed(x[:1]).shape[1] == (256 if pool == "last" else 32 + 64 + 128 + 256 + 256)
    with torch.no_grad():
        ref = enc.embed(x)
        for view in d4_views(x)[1:]:
            torch.testing.assert_close(enc.embed(view), ref, atol=1e-5, rtol=1e-4)
        plain = _encoder(invariant=False).eval()
        assert not torch.allclose(plain.embed(torch.rot90(x, 1, (2, 3))), plain.embed(x), atol=1e-4)


def test_finetune_blocks_freeze_the_backbone_from_the_start():
    def trainable(blocks: int) -> set[str]:
        enc = _encoder(finetune_blocks=blocks, num_classes=3, proj_dim=0)
        return {n.rsplit(".", 1)[0].split(".blocks")[0].split(".downsample")[0]
                for n, p in enc.backbone.named_parameters() if p.requires_grad}

    # timm's coarse groups of the pico ConvNeXt, from the end: the final norm, stage 3, stage 2, ...
    assert trainable(0) == set()
    assert trainable(1) == {"head.norm"}
    assert trainable(2) == {"head.norm", "stages.3"}
    assert all(p.requires_grad for p in _encoder().backbone.parameters())


def test_selfsup_loss_falls_and_finetune_overfits_one_batch():
    x, labels = _galaxies(16, 32)
    enc = _encoder()
    cfg = encoder_loop.EncoderTrainConfig(steps=40, lr=3e-3, warmup_steps=2, log_every=5)
    hist = encoder_loop.train(enc, [{"pixels": x}], cfg)
    assert np.mean([h["loss"] for h in hist[-2:]]) < 0.8 * hist[0]["loss"], hist
    clf = _encoder(num_classes=int(labels.max()) + 1, proj_dim=0)
    cfg = encoder_loop.EncoderTrainConfig(mode="finetune", steps=60, lr=3e-3, warmup_steps=2, log_every=10,
                                          augment=AugmentConfig(rotate=False, flip=False, zoom=(1.0, 1.0), shift=0.0,
                                                                blur_max=0.0, tau=0.0, brightness=0.0, noise_max=0.0,
                                                                noise_rel=0.0, gamma=(1.0, 1.0)))
    encoder_loop.train(clf, [{"pixels": x, "label": labels}], cfg)
    ev = encoder_loop.evaluate(clf, [{"pixels": x, "label": labels}])
    assert ev.metrics["val_acc"] == 1.0, ev


def test_checkpoint_round_trip_and_embed_backbones(tmp_path):
    from galray.models.backbones import BackboneConfig, create_backbone, to_model_input

    enc = _encoder().eval()
    save_model(enc, tmp_path)
    save_backbone_weights(enc, tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = enc.embed(x)
        torch.testing.assert_close(load_model(SurveyEncoder, tmp_path).eval().embed(x), ref)
        # `galray embed --model encoder:CKPT`: the encoder's own embedding from plain [0, 1] pixels.
        bb = create_backbone(BackboneConfig(name=f"encoder:{tmp_path}"))
        torch.testing.assert_close(bb.model(to_model_input(x, bb.preprocessing)), ref)
        # `--model galray_convnext_pico --weights backbone.safetensors`: the bare backbone.
        bare = create_backbone(BackboneConfig(name="galray_convnext_pico", weights=str(tmp_path / BACKBONE_WEIGHTS_NAME)))
        torch.testing.assert_close(bare.model(enc.normalize(x)), enc.backbone(enc.normalize(x)))


def test_job_config_names_the_bad_field():
    base = {"kind": "encoder", "input": "cutouts", "name": "e"}
    with pytest.raises(ConfigError, match="encoder.model.num_classes"):
        from_dict(TrainJob, {**base, "encoder": {"train": {"mode": "finetune"}}})
    with pytest.raises(ConfigError, match="encoder.model.num_classes"):
        from_dict(TrainJob, {**base, "encoder": {"model": {"num_classes": 3}}})
    with pytest.raises(ConfigError, match="encoder.vote_columns"):
        from_dict(TrainJob, {**base, "encoder": {"train": {"mode": "finetune"}, "model": {"vote_groups": [2, 3]},
                                                 "vote_columns": ["a", "b"]}})
    with pytest.raises(ConfigError, match="encoder.preset"):
        from_dict(TrainJob, {**base, "encoder": {"preset": "huge"}})
    job = from_dict(TrainJob, {**base, "encoder": {"preset": "pico", "train": {"mode": "finetune"},
                                                   "model": {"num_classes": 4}}})
    assert job.encoder.model_config().proj_dim == 0 and job.train_config().mode == "finetune"



def test_tune_plans_an_encoder_campaign_on_its_validation_loss(tmp_path):
    from galray.stages.tune import TuneJob, plan

    job = {"kind": "encoder", "input": "/tmp/nowhere", "name": "e", "storage_path": str(tmp_path),
           "scaling": {"num_workers": 1}, "encoder": {"preset": "pico"},
           "tune": {"space": {"encoder.train.temperature": {"grid": [0.1, 0.2]}, "encoder.train.lr": {
               "loguniform": [1e-4, 1e-2]}}, "trials": 4}}
    p = plan(from_dict(TuneJob, job))
    assert (p.metric, p.mode, p.trials) == ("val_loss", "min", 4)
    with pytest.raises(ConfigError) as err:  # the data is built once per campaign: its keys are not searchable
        plan(from_dict(TuneJob, {**job, "tune": {"space": {"encoder.model.image_size": {"grid": [32, 64]}}}}))
    assert "image_size" in str(err.value)
