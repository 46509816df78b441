"""Matryoshka BatchTopK SAE: known answers, fast path == reference, planted-dictionary recovery."""

from __future__ import annotations

import dataclasses
import json
import socket
import time

import pytest
import torch

from galray.config import ConfigError, from_dict, to_dict
from galray.models.checkpoint import load_model, save_model
from galray.models.sae import (
    SAEConfig,
    SparseAutoencoder,
    batch_topk,
    dictionary_recovery,
    evaluate_sae,
    geometric_median,
    per_example_topk,
    planted_dictionary,
    sae_preset,
)
from galray.train.sae_loop import SAETrainConfig, lr_at, lr_factor, make_optimizer, sae_train_preset, train, train_step

# Planted problem of the issue: d=64, 256 unit-norm features, 8 active per sample, small noise,
# an SAE at 4x expansion (256 latents) with k=8. Feature frequencies fall as rank^-ZIPF, as real
# concept frequencies do, and Matryoshka groups give the frequent ones the first latents.
D, N_FEAT, K = 64, 256, 8
ZIPF = 1.0
GROUPS = (32, 32, 64, 128)
N_TRAIN, N_TEST = 32_768, 8192
TRAIN_STEPS = 4000


@pytest.fixture
def threads():
    """Tiny models run fastest single-threaded on a shared 2-core box (no oversubscription)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _fitted(cfg: SAEConfig, x: torch.Tensor) -> SparseAutoencoder:
    m = SparseAutoencoder(cfg)
    m.fit_normalization(x)
    m.init_from_sample(x)
    return m


# ----------------------------------------------------------------------------- config and purity
def test_config_validates_and_round_trips():
    with pytest.raises(ConfigError) as err:
        SAEConfig(d_in=8, group_sizes=(4, 4), k=9)
    assert err.value.field == "k"
    with pytest.raises(ConfigError) as err:
        from_dict(SAEConfig, {"d_in": 8, "group_sizes": [4, 0]})
    assert err.value.field == "group_sizes"
    with pytest.raises(ConfigError):
        from_dict(SAEConfig, {"d_in": 8, "bogus": 1})
    cfg = sae_preset("galray", 640)
    assert from_dict(SAEConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert cfg.k_aux_resolved == 320 and cfg.n_latents == 2048 and cfg.inference == "threshold"
    wu = sae_preset("wu2025", 640)
    assert (wu.group_sizes, wu.k, wu.l1_coeff, wu.aux_coeff, wu.inference) == (
        (64, 64, 128, 256, 512, 1024), 64, 1e-3, 0.03, "batchtopk")
    assert sae_preset("galray", 64, k=4).k == 4
    with pytest.raises(ValueError):
        sae_preset("nope", 64)
    wt = sae_train_preset("wu2025")
    assert (wt.lr, wt.batch_size, wt.epochs, wt.optimizer) == (1e-4, 256, 200.0, "adamw")
    with pytest.raises(ConfigError) as err:
        SAETrainConfig(optimizer="adam", weight_decay=0.1)
    assert err.value.field == "weight_decay"


# ----------------------------------------------------------------------------- known answers
def test_topk_selections_known_answer():
    acts = torch.tensor([[5.0, 4.0, 0.0, 0.0], [3.0, 0.5, 0.2, 0.1]])
    codes, smallest = batch_topk(acts, 2)  # keep the 4 largest of the batch: 5, 4, 3, 0.5
    assert torch.equal(codes, torch.tensor([[5.0, 4.0, 0.0, 0.0], [3.0, 0.5, 0.0, 0.0]]))
    assert smallest.item() == 0.5
    assert torch.equal(per_example_topk(acts, 1), torch.tensor([[5.0, 0, 0, 0], [3.0, 0, 0, 0]]))


def test_encode_uses_training_normalisation_and_threshold():
    cfg = SAEConfig(d_in=4, group_sizes=(2, 2), k=1, normalize="zscore", init_b_pre="zero")
    m = SparseAutoencoder(cfg)
    x_train = torch.tensor([[2.0, 10, 0, 0], [4.0, 30, 0, 0], [3.0, 20, 2, 2]])
    m.fit_normalization(x_train)
    assert torch.allclose(m.norm_mean_D, x_train.mean(0))
    assert torch.allclose(m.norm_std_D, x_train.std(0) + cfg.norm_eps)
    with torch.no_grad():  # latent j reads normalised input dimension j
        m.W_enc_FD.copy_(torch.eye(4))
        m.b_enc_F.zero_()
        m.threshold.fill_(0.5)
        m.threshold_updates.fill_(1)
    m.eval()
    x = torch.tensor([[4.0, 10, 0, 0]])
    expected_pre = (x - m.norm_mean_D) / m.norm_std_D
    codes = m.encode(x)
    assert torch.allclose(codes, torch.where(expected_pre > 0.5, expected_pre, torch.zeros(())))
    # Batch independence in threshold mode: a row's code does not change with its batch-mates.
    other = torch.randn(7, 4) * 10
    assert torch.equal(m.encode(torch.cat([x, other]))[:1], codes)
    # Threshold mode without a trained threshold refuses rather than silently returning dense codes.
    fresh = SparseAutoencoder(cfg)
    fresh.eval()
    with pytest.raises(RuntimeError):
        fresh.encode(x)


def test_geometric_median_known_answer():
    pts = torch.tensor([[0.0, 0], [2, 0], [0, 2], [2, 2], [1, 1]])
    assert torch.allclose(geometric_median(pts), torch.tensor([1.0, 1.0]), atol=1e-4)
    # Robust to an outlier, unlike the mean: it stays by the cluster.
    cluster = torch.randn(200, 3, generator=torch.Generator().manual_seed(0)) * 0.1
    pts = torch.cat([cluster, torch.tensor([[1000.0, 1000, 1000]])])
    assert geometric_median(pts).norm() < 0.1 < pts.mean(0).norm()


def test_fvu_is_one_with_empty_codes_and_mean_bias():
    x, _ = planted_dictionary(512, 16, 32, 3, seed=2)
    m = _fitted(SAEConfig(d_in=16, group_sizes=(8, 24), k=2, inference="topk"), x)
    with torch.no_grad():
        m.W_enc_FD.zero_()
        m.b_enc_F.fill_(-1.0)  # every activation is 0: the reconstruction is b_pre alone
        m.b_pre_D.copy_(m.normalize(x).mean(0))
    ev = evaluate_sae(m, x, batch_size=100)
    assert ev["fvu"] == pytest.approx(1.0, abs=1e-5)
    assert ev["fvu_prefix"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert ev["l0_mean"] == 0 and ev["dead_frac"] == 1.0


def test_decoder_geometry():
    x, _ = planted_dictionary(256, 16, 32, 3, seed=3)
    m = _fitted(SAEConfig(d_in=16, group_sizes=(16, 16), k=4), x)
    m.train()
    m(x).loss.backward()
    m.remove_parallel_grad()
    assert (m.W_dec_FD.grad * m.W_dec_FD).sum(1).abs().max() < 1e-6
    with torch.no_grad():
        m.W_dec_FD.mul_(torch.linspace(0.5, 2.0, 32)[:, None])
    m.normalize_decoder()
    assert torch.allclose(m.W_dec_FD.norm(dim=1), torch.ones(32), atol=1e-6)


# ----------------------------------------------------------------------------- fast path == reference
@pytest.mark.parametrize("aux_style", ["auxk", "wu2025"])
def test_gather_training_path_matches_dense_reference(aux_style):
    x, _ = planted_dictionary(600, 32, 64, 4, seed=0)
    base = SAEConfig(d_in=32, group_sizes=(16, 16, 32), k=4, l1_coeff=1e-3, aux_style=aux_style,
                     dead_after_samples=64)
    models, outs = {}, {}
    for impl in ("dense", "gather"):
        m = _fitted(dataclasses.replace(base, train_impl=impl), x)
        m.samples_since_fired_F[:20] = 1000  # 20 dead latents, so the aux loss is exercised
        m.train()
        out = m(x[:128])
        out.loss.backward()
        models[impl], outs[impl] = m, out
    a, b = outs["dense"], outs["gather"]
    assert a.aux_loss > 0
    for name in ("loss", "aux_loss", "l1", "prefix_fvu"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6), name
    assert torch.allclose(a.codes, b.codes, atol=1e-6) and torch.allclose(a.x_hat, b.x_hat, atol=1e-5)
    for (name, p), q in zip(models["dense"].named_parameters(), models["gather"].parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name
    for buf in ("threshold", "samples_since_fired_F"):
        assert torch.equal(getattr(models["dense"], buf), getattr(models["gather"], buf))


@pytest.mark.parametrize("impl", ["gather", "dense"])
def test_bf16_autocast_training_step(impl):
    x, _ = planted_dictionary(256, 32, 64, 4, seed=6)
    m = _fitted(SAEConfig(d_in=32, group_sizes=(16, 48), k=4, dead_after_samples=64, train_impl=impl), x)
    m.samples_since_fired_F[:10] = 1000
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x[:128])
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux_loss > 0
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_overfits_one_batch_and_trains_from_iterable(threads):
    x, _ = planted_dictionary(256, 16, 24, 2, seed=4)
    m = _fitted(SAEConfig(d_in=16, group_sizes=(8, 24), k=2, dead_after_samples=512), x)
    opt = make_optimizer(m, SAETrainConfig(lr=1e-2))
    m.train()
    first = train_step(m, opt, {"x": x}, SAETrainConfig(grad_clip=None))["fvu"].item()
    for _ in range(150):
        last = train_step(m, opt, {"x": x}, SAETrainConfig(grad_clip=1.0))["fvu"].item()
    assert last < 0.5 * first
    assert torch.allclose(m.W_dec_FD.norm(dim=1), torch.ones(32), atol=1e-5)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=64)
    with pytest.raises(ValueError):
        train(SparseAutoencoder(m.cfg), loader, SAETrainConfig(steps=2))
    hist = train(m, loader, SAETrainConfig(steps=10, log_every=5))
    assert [h["step"] for h in hist] == [5.0, 10.0] and not m.training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stats_data() -> tuple[SAEConfig, torch.Tensor]:
    x, _ = planted_dictionary(512, 16, 24, 2, seed=5)
    return SAEConfig(d_in=16, group_sizes=(8, 24), k=2, dead_after_samples=128), x


def _rank_rows(x: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """Rank ``rank``'s batch of step ``step``: different rows, and rank 1's scaled, so the ranks' BatchTopK cuts differ."""
    return x[(2 * step + rank) * 64:(2 * step + rank + 1) * 64] * (1.0 + rank)


def _stats_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    cfg, x = _stats_data()
    torch.manual_seed(0)
    m = _fitted(cfg, x)
    m.train()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for step in range(3):
            m(_rank_rows(x, rank, step))
        state = {k: v.clone() for k, v in m.state_dict().items()}
        m.calibrate_threshold(x[rank * 256:(rank + 1) * 256], batch_size=100)  # chunks that straddle nothing
        state["calibrated"] = m.threshold.clone()
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_statistics_and_calibration_under_torch_distributed(tmp_path):
    """Two gloo ranks with different data: the step's statistics (threshold EMA, dead-latent counter) are
    all-reduced, so both ranks hold the values computed from both ranks' batches; calibration gives the
    threshold of all ranks' rows together."""
    import torch.multiprocessing as mp

    mp.spawn(_stats_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    s0, s1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for buf in ("threshold", "threshold_updates", "samples_since_fired_F", "calibrated"):
        assert torch.equal(s0[buf], s1[buf]), buf

    # Reference by hand from the same (unchanged: forward only) weights: the mean of the two ranks' smallest
    # kept activations, EMA over steps; a latent's counter restarts when it fired on either rank.
    cfg, x = _stats_data()
    torch.manual_seed(0)
    ref = _fitted(cfg, x)
    thr, since = None, torch.zeros(cfg.n_latents, dtype=torch.long)
    with torch.no_grad():
        for step in range(3):
            cuts, fired = [], torch.zeros(cfg.n_latents, dtype=torch.bool)
            for rank in (0, 1):
                codes, smallest = batch_topk(ref.activations(ref.normalize(_rank_rows(x, rank, step))), cfg.k)
                cuts.append(float(smallest))
                fired |= (codes > 0).any(0)
            cut = sum(cuts) / 2
            thr = cut if thr is None else cfg.threshold_momentum * thr + (1 - cfg.threshold_momentum) * cut
            since = torch.where(fired, 0, since + 128)
    assert cuts[0] != pytest.approx(cuts[1], rel=0.05)  # the ranks really disagree
    assert float(s0["threshold"]) == pytest.approx(thr, rel=1e-5)
    assert int(s0["threshold_updates"]) == 3 and torch.equal(s0["samples_since_fired_F"], since)
    ref.calibrate_threshold(x[:512])
    assert float(s0["calibrated"]) == float(ref.threshold)


def test_calibration_puts_threshold_l0_at_k(threads):
    """train() ends by calibrating the threshold on recent training rows: threshold-mode L0 on held-out
    rows is k within 10%, where the running EMA alone is still far off after a short run."""
    x, _ = planted_dictionary(12_288, D, N_FEAT, K, noise=0.01, zipf=ZIPF, seed=3)
    cfg = sae_preset("galray", D, group_sizes=GROUPS, k=K, dead_after_samples=4096)
    torch.manual_seed(0)
    m = SparseAutoencoder(cfg)
    train(m, x[:8192], sae_train_preset("galray", steps=60, lr=5e-3, log_every=10**9))
    assert abs(evaluate_sae(m, x[8192:], mode="threshold")["l0_mean"] - K) <= 0.1 * K
    m.calibrate_threshold(x[:8192], target_l0=3 * K)  # the rule itself: L0 follows the target asked for
    assert abs(evaluate_sae(m, x[8192:], mode="threshold")["l0_mean"] - 3 * K) <= 0.1 * 3 * K


def test_lr_schedules():
    cfg = SAETrainConfig(warmup_frac=0.1, decay_frac=0.2, schedule="wsd")
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[79] == 1.0
    assert f[80] < 1.0 and f[99] == pytest.approx(0.0) and all(a >= b for a, b in zip(f[10:], f[11:]))
    cos = sae_train_preset("wu2025")
    c = [lr_factor(s, 100, cos) for s in range(100)]
    assert c[0] == 1.0 and c[-1] == pytest.approx(0.1, abs=1e-3)
    # lr_at is the learning rate LambdaLR(optimizer, lr_factor) gave each step, float for float.
    tcfg = SAETrainConfig(lr=3e-3, steps=100, warmup_frac=0.1, decay_frac=0.2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=tcfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 100, tcfg))
    for s in range(100):
        assert lr_at(s, tcfg) == opt.param_groups[0]["lr"]
        opt.step()
        sched.step()


# ----------------------------------------------------------------------------- planted dictionary
@pytest.fixture(scope="module")
def planted():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, feats = planted_dictionary(N_TRAIN + N_TEST, D, N_FEAT, K, noise=0.01, zipf=ZIPF, seed=1)
        cfg = sae_preset("galray", D, group_sizes=GROUPS, k=K, dead_after_samples=4096)
        model = SparseAutoencoder(cfg)
        t0 = time.process_time()  # CPU seconds of this process: other jobs on the box do not count
        train(model, x[:N_TRAIN], sae_train_preset("galray", steps=TRAIN_STEPS, lr=5e-3, log_every=10**9))
        seconds = time.process_time() - t0
    finally:
        torch.set_num_threads(old)
    return model, x[N_TRAIN:], feats, seconds


def test_planted_dictionary_recovered(planted):
    model, x_test, feats, seconds = planted
    assert seconds < 60
    ev = evaluate_sae(model, x_test, batch_size=256)  # default: threshold inference
    assert ev["fvu"] <= 0.12
    assert dictionary_recovery(model, feats)["recovered_frac"] >= 0.95
    assert ev["fvu_prefix"] == sorted(ev["fvu_prefix"], reverse=True)  # longer prefixes reconstruct better


def _prefix_fvu(model: SparseAutoencoder, x: torch.Tensor, n_latents: int) -> float:
    """FVU of the reconstruction from the first ``n_latents`` latents of the BatchTopK codes only."""
    with torch.no_grad():
        codes = model.encode(x, mode="batchtopk")
        codes[:, n_latents:] = 0
        x_hat = model.decode(codes)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_matryoshka_first_group_reconstructs_alone(threads):
    """The Matryoshka property, which a plain BatchTopK SAE lacks: the first group alone is a usable
    dictionary. Same data, width, k and steps; only the group split differs. Measured: first-32 FVU
    0.51 (Matryoshka) against 0.90 (plain), full-width FVU 0.140 against 0.139."""
    x, _ = planted_dictionary(12_288, D, N_FEAT, K, noise=0.01, zipf=ZIPF, seed=1)
    fvu = {}
    for name, groups in (("matryoshka", GROUPS), ("plain", (sum(GROUPS),))):
        torch.manual_seed(0)
        m = SparseAutoencoder(sae_preset("galray", D, group_sizes=groups, k=K, dead_after_samples=4096))
        train(m, x[:8192], sae_train_preset("galray", steps=1000, lr=5e-3, log_every=10**9))
        fvu[name] = (_prefix_fvu(m, x[8192:], GROUPS[0]), _prefix_fvu(m, x[8192:], sum(GROUPS)))
    assert fvu["matryoshka"][0] <= 0.75 * fvu["plain"][0], fvu
    assert fvu["matryoshka"][1] <= 1.1 * fvu["plain"][1], fvu  # the nesting costs little at full width


def test_threshold_inference_matches_batchtopk(planted):
    model, x_test, _, _ = planted
    thr = evaluate_sae(model, x_test, batch_size=256, mode="threshold")
    btk = evaluate_sae(model, x_test, batch_size=256, mode="batchtopk")
    assert abs(thr["l0_mean"] - K) <= 0.1 * K
    assert abs(thr["fvu"] - btk["fvu"]) <= 0.01
    assert thr["l0_p5"] <= thr["l0_p50"] <= thr["l0_p95"]


def test_few_dead_latents_at_4x(planted):
    model, x_test, _, _ = planted
    assert model.cfg.n_latents == 4 * D
    ev = evaluate_sae(model, x_test, batch_size=256)
    assert ev["dead_frac"] < 0.01
    assert sum(ev["density_log10_hist"]) == round((1 - ev["dead_frac"]) * model.cfg.n_latents)


def test_save_load_round_trip(planted, tmp_path):
    model, x_test, _, _ = planted
    save_model(model, tmp_path / "sae")
    loaded = load_model(SparseAutoencoder, tmp_path / "sae")
    assert loaded.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    model.eval()
    loaded.eval()
    assert torch.equal(loaded.encode(x_test[:512]), model.encode(x_test[:512]))
    assert torch.equal(loaded.decode(loaded.encode(x_test[:64])), model.decode(model.encode(x_test[:64])))
