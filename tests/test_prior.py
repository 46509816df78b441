"""Prior over VQ codes: config validation, causality, KV cache == full recomputation,
sampling filters, overfitting one batch, save/load, class dropout and PNG generation."""

from __future__ import annotations


import pytest
import torch

from galray.config import ConfigError, from_dict
from galray.models.checkpoint import load_model, save_model
from galray.models.prior import Prior, PriorConfig
from galray.models.sampling import (SamplingConfig, choose_next, filter_logits, guide, sample,
                                    sample_kv, sample_naive)
from galray.train.loop import set_lr
from galray.train.prior_loop import PriorTrainConfig, drop_labels, lr_at, make_optimizer, train_step

TINY = PriorConfig(vocab_size=32, num_classes=3, seq_len=16, d_model=32, n_layers=2, n_heads=4, dropout=0.0)


def tiny_model(seed: int = 0, **overrides) -> Prior:
    torch.manual_seed(seed)
    cfg = PriorConfig(**{**TINY.__dict__, **overrides})
    return Prior(cfg).double().eval()


# -- config --------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,field", [
    ("n_heads", 5, "n_heads"),  # does not divide d_model
    ("vocab_size", 1, "vocab_size"),
    ("class_dropout", 1.5, "class_dropout"),
    ("dropout", -0.1, "dropout"),
])
def test_config_rejects_bad_values(key, value, field):
    with pytest.raises(ConfigError) as err:
        from_dict(PriorConfig, {**TINY.__dict__, key: value})
    assert err.value.field == field


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ConfigError) as err:
        from_dict(SamplingConfig, {"top_p": 0.0})
    assert err.value.field == "top_p"
    with pytest.raises(ConfigError):
        from_dict(SamplingConfig, {"top_k": -1})


# -- model ---------------------------------------------------------------------------------

def test_forward_shapes_and_tied_weights():
    m = tiny_model()
    codes = torch.randint(0, 32, (3, 16))
    out = m(codes, torch.tensor([0, 1, 3]))
    assert out.logits.shape == (3, 16, 32)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert m.head.weight is m.tok_emb.weight
    untied = tiny_model(tie_weights=False)
    assert untied.head.weight is not untied.tok_emb.weight
    with torch.no_grad():  # and not merely different objects sharing storage
        untied.head.weight.add_(1.0)
    assert not torch.equal(untied.head.weight, untied.tok_emb.weight)


def test_prediction_of_code_t_ignores_codes_t_and_later():
    m = tiny_model()
    codes = torch.randint(0, 32, (2, 16))
    labels = torch.tensor([0, 2])
    changed = codes.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 32
    a, b = m(codes, labels).logits, m(changed, labels).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])  # logits of codes 0..7 see codes < 7 only
    assert not torch.allclose(a[:, 8:], b[:, 8:])
    # ...and the class token matters
    assert not torch.allclose(a, m(codes, torch.tensor([1, 3])).logits)


def test_kv_cache_logits_match_full_forward():
    m = tiny_model()
    codes = torch.randint(0, 32, (4, 16))
    labels = torch.tensor([0, 1, 2, 3])
    full = m(codes, labels).logits
    cache = m.new_cache(4)
    steps = [m.prefill(labels, cache)] + [m.decode_step(codes[:, i], cache) for i in range(15)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=0, atol=1e-10)
    with pytest.raises(ValueError):
        m.decode_step(codes[:, 15], cache)  # the last code is never an input


def test_naive_next_logits_match_full_forward():
    m = tiny_model()
    codes = torch.randint(0, 32, (2, 16))
    labels = torch.tensor([1, 3])
    full = m(codes, labels).logits
    for t in (0, 5, 15):
        torch.testing.assert_close(m.next_logits_naive(labels, codes[:, :t]), full[:, t], rtol=0, atol=1e-10)


# -- sampling ------------------------------------------------------------------------------

def test_filters_known_answers():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]], dtype=torch.float64))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # nucleus: 0.5 < 0.6 keep, 0.5+0.2 >= 0.6 stop after the second
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.45)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, top_p=0.86)) == [True, True, True, True, False]
    # top-k then top-p on the renormalised survivors: 0.5/0.85 < 0.7 <= 0.7/0.85
    assert kept(filter_logits(logits, top_k=3, top_p=0.7)) == [True, True, False, False, False]
    # order must not matter: shuffle the codes
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert kept(filter_logits(logits[:, perm], top_p=0.6)) == [False, True, False, False, True]
    # temperature: a low one sharpens towards the argmax
    p = filter_logits(logits, temperature=0.1).softmax(-1)
    assert p[0, 0] > 0.99
    # greedy
    assert choose_next(logits[:, perm], SamplingConfig(temperature=0.0)).tolist() == [1]


def test_guide_formula():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(guide(torch.cat([cond, uncond]), 2.5), uncond + 2.5 * (cond - uncond))
    torch.testing.assert_close(guide(torch.cat([cond, uncond]), 1.0), cond)


@pytest.mark.parametrize("scfg", [
    SamplingConfig(cfg_scale=3.0, temperature=0.9, top_k=12, top_p=0.8),  # everything on
    SamplingConfig(cfg_scale=1.0, temperature=1.2),  # plain conditional
])
def test_kv_sampling_gives_the_same_tokens_as_naive(scfg):
    m = tiny_model(seed=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])  # includes a null-class (unconditional) row
    a = sample_naive(m, labels, scfg, torch.Generator().manual_seed(7))
    b = sample_kv(m, labels, scfg, torch.Generator().manual_seed(7))
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, b)
    # the generator drives the draws: another seed gives other tokens
    c = sample_kv(m, labels, scfg, torch.Generator().manual_seed(8))
    assert not torch.equal(b, c)
    # and sample() dispatches to the two paths
    assert torch.equal(sample(m, labels, scfg, torch.Generator().manual_seed(7), use_cache=False), a)


def test_sampling_respects_top_k_and_restores_training_mode():
    m = tiny_model(seed=2)
    m.train()
    scfg = SamplingConfig(top_k=1)  # top-1 == greedy
    labels = torch.tensor([0, 2])
    a = sample_kv(m, labels, scfg, torch.Generator().manual_seed(0), num_tokens=10)
    b = sample_kv(m, labels, SamplingConfig(temperature=0.0), num_tokens=10)
    assert torch.equal(a, b)
    assert m.training


def test_bad_labels_are_refused():
    m = tiny_model()
    with pytest.raises(ValueError):
        sample_kv(m, torch.tensor([4]))  # num_classes + 1 does not exist


# -- training ------------------------------------------------------------------------------

def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Prior(PriorConfig(vocab_size=64, num_classes=8, seq_len=16, d_model=64, n_layers=2,
                              n_heads=4, dropout=0.0, class_dropout=0.0))
    codes = torch.randint(0, 64, (8, 16))
    labels = torch.arange(8)  # one class per row, so code 0 is predictable from the class alone
    tcfg = PriorTrainConfig(steps=150, lr=3e-3, warmup_steps=10, weight_decay=0.0)
    opt = make_optimizer(model, tcfg)
    first = train_step(model, opt, {"codes": codes, "label": labels}, tcfg)
    for step in range(1, tcfg.steps):
        set_lr(opt, lr_at(step, tcfg))
        stats = train_step(model, opt, {"codes": codes, "label": labels}, tcfg)
    assert first["loss"] > 3.5  # about log(64) = 4.16 at the start
    assert stats["loss"] < 0.02, stats
    assert stats["acc"] == 1.0
    # The trained model reproduces a training sequence greedily, with the KV cache.
    out = sample_kv(model, labels[:2], SamplingConfig(temperature=0.0))
    assert torch.equal(out, codes[:2])


def test_drop_labels_rate():
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(labels, 0.1, null_class=5, generator=torch.Generator().manual_seed(0))
    frac = (dropped == 5).float().mean().item()
    assert 0.09 < frac < 0.11
    assert set(dropped.unique().tolist()) == {0, 5}
    assert torch.equal(drop_labels(labels, 0.0, 5), labels)


def test_make_optimizer_counts_tied_weight_once():
    m = tiny_model()
    opt = make_optimizer(m, PriorTrainConfig())
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(m.parameters()))


# -- save / load ---------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    m = tiny_model()
    save_model(m, tmp_path / "prior")
    back = load_model(Prior, tmp_path / "prior").double().eval()
    assert back.cfg == m.cfg
    assert back.head.weight is back.tok_emb.weight
    codes, labels = torch.randint(0, 32, (2, 16)), torch.tensor([0, 3])
    torch.testing.assert_close(back(codes, labels).logits, m(codes, labels).logits)


# -- generate ------------------------------------------------------------------------------

def test_generate_grid_writes_png(tmp_path):
    vq = pytest.importorskip("galray.models.vqvae")
    from PIL import Image

    from galray.cli import main
    from galray.stages.generate import generate_grid

    torch.manual_seed(0)
    vcfg = vq.VQVAEConfig(image_size=16, channels=(8, 8), latent_size=4, code_dim=8, codebook_size=32,
                          kmeans_init=False)
    save_model(vq.VQVAE(vcfg).eval(), tmp_path / "vq")
    prior = Prior(PriorConfig(vocab_size=32, num_classes=3, seq_len=16, d_model=32, n_layers=1, n_heads=2))
    save_model(prior, tmp_path / "prior")
    kw = dict(n=5, cfg_scale=2.0, temperature=1.0, top_k=10, top_p=0.9, seed=0, device="cpu")
    out = generate_grid(tmp_path / "prior", tmp_path / "vq", tmp_path / "g" / "grid.png", label=None, **kw)
    img = Image.open(out)
    assert img.size == (3 * 16, 2 * 16) and img.mode == "RGB"  # 5 images on a 3 x 2 grid
    # same seed, same picture; another label, another picture
    again = generate_grid(tmp_path / "prior", tmp_path / "vq", tmp_path / "again.png", **kw)
    assert Image.open(again).tobytes() == img.tobytes()
    other = generate_grid(tmp_path / "prior", tmp_path / "vq", tmp_path / "other.png", label=-1, **kw)
    assert Image.open(other).tobytes() != img.tobytes()
    # the CLI: the same settings as flags give the same picture
    assert main(["generate", "--prior", str(tmp_path / "prior"), "--vqvae", str(tmp_path / "vq"), "--output",
                 str(tmp_path / "cli.png"), "--n", "5", "--cfg-scale", "2", "--top-k", "10", "--top-p", "0.9"]) == 0
    assert Image.open(tmp_path / "cli.png").tobytes() == img.tobytes()
    # a prior whose vocabulary does not match the codebook is refused
    save_model(Prior(PriorConfig(vocab_size=64, num_classes=3, seq_len=16, d_model=32, n_layers=1, n_heads=2)),
               tmp_path / "prior64")
    with pytest.raises(ValueError):
        generate_grid(tmp_path / "prior64", tmp_path / "vq", tmp_path / "bad.png", **kw)


def test_image_grid_layout():
    from galray.stages.generate import image_grid

    imgs = torch.stack([torch.full((3, 2, 2), v) for v in (-1.0, 0.0, 1.0)])
    grid = image_grid(imgs)  # 2 x 2 cells, the last one blank
    assert grid.shape == (4, 4, 3) and grid.dtype.name == "uint8"
    assert grid[0, 0, 0] == 0 and grid[0, 2, 0] == 128 and grid[2, 0, 0] == 255 and grid[2, 2, 0] == 0
