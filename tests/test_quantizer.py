"""VectorQuantizer: lookup contract, straight-through gradients, EMA / k-means / restarts, and
codebook synchronisation across two gloo ranks."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from galray.config import ConfigError, from_dict
from galray.models.quantizer import QuantizerConfig, VectorQuantizer


def _q(**kw) -> VectorQuantizer:
    base = dict(dim=8, codebook_size=16, kmeans_iters=3)
    base.update(kw)
    return VectorQuantizer(QuantizerConfig(**base))


@pytest.mark.parametrize("factorized_dim", [None, 4])
@pytest.mark.parametrize("shape", ["BDHW", "BND"])
def test_eval_output_is_codebook_lookup_of_indices(factorized_dim, shape):
    torch.manual_seed(0)
    q = _q(factorized_dim=factorized_dim)
    q.train()
    q(torch.randn(4, 8, 5, 5))  # k-means init + one EMA step, so the codebook is data-driven
    q.eval()
    z = torch.randn(3, 8, 4, 6) if shape == "BDHW" else torch.randn(3, 7, 8)
    with torch.no_grad():
        out = q(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == ((3, 4, 6) if shape == "BDHW" else (3, 7))
    assert out.indices.dtype == torch.long
    looked_up = q.lookup(out.indices)  # (..., D)
    if shape == "BDHW":
        looked_up = looked_up.permute(0, 3, 1, 2)
    torch.testing.assert_close(out.quantized, looked_up, rtol=0, atol=0)


def test_indices_are_nearest_codes_known_answer():
    q = _q(dim=2, codebook_size=3, kmeans_init=False)
    with torch.no_grad():
        q.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    q.eval()
    z = torch.tensor([[[1.0, 1.0], [9.0, -1.0], [-1.0, 8.0], [6.0, 0.0]]])  # (B=1, N=4, D=2)
    out = q(z)
    assert out.indices.tolist() == [[0, 1, 2, 1]]


def test_straight_through_gradients_reach_encoder():
    torch.manual_seed(0)
    encoder = nn.Conv2d(3, 8, 3, padding=1)
    q = _q()
    q.train()
    x = torch.randn(2, 3, 6, 6)
    out = q(encoder(x))
    # A loss on the quantized output alone (no commitment term) must still train the encoder.
    (out.quantized ** 2).sum().backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    # Straight-through: d quantized / d z is the identity.
    z = torch.randn(2, 5, 8, requires_grad=True)
    q(z).quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_commitment_gradient_pulls_encoder_output_to_code():
    q = _q(dim=2, codebook_size=2, kmeans_init=False, beta=0.5)
    with torch.no_grad():
        q.embed.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    q.eval()
    z = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    out = q(z)
    out.loss.backward()
    # loss = beta * mean((z - e0)^2) over D=2 elements -> grad = beta * 2 * (z - e0) / 2
    torch.testing.assert_close(z.grad, torch.tensor([[[0.5, 0.0]]]))
    torch.testing.assert_close(out.loss, torch.tensor(0.25))


def test_ema_with_zero_decay_moves_codes_to_cluster_means():
    q = _q(dim=2, codebook_size=2, kmeans_init=False, decay=0.0, dead_code_fraction=0.0, eps=1e-9)
    with torch.no_grad():
        q.embed.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    q.train()
    z = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [9.0, 9.0], [11.0, 12.0]]])
    q(z)
    torch.testing.assert_close(q.embed, torch.tensor([[0.5, 1.5], [10.0, 10.5]]), rtol=1e-5, atol=1e-5)


def test_no_codebook_change_in_eval_mode():
    q = _q()
    q.train()
    q(torch.randn(2, 8, 4, 4))
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(2, 8, 4, 4) * 5)
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_kmeans_init_finds_clusters():
    torch.manual_seed(0)
    centres = torch.randn(8, 8) * 10
    z = centres[torch.arange(8).repeat(64)] + 0.01 * torch.randn(512, 8)  # 8 tight clusters
    q = _q(codebook_size=8, kmeans_iters=10, decay=0.99)
    q.train()
    out = q(z[None])
    assert out.utilisation == 1.0  # every code has a cluster of its own
    dist = torch.cdist(q.embed, centres).min(dim=1).values
    assert dist.max() < 0.1


def test_dead_codes_are_restarted_onto_data():
    torch.manual_seed(0)
    q = _q(kmeans_init=False, dead_code_fraction=0.5, decay=0.5)
    with torch.no_grad():
        q.embed.mul_(0).add_(100.0)  # every code far away: the first picks up all data
        q.embed[0] = 0.0
    q.train()
    z = torch.randn(1, 256, 8)
    for _ in range(5):
        q(z)
    assert int(q.restarts) > 0
    q.eval()
    out = q(z)
    assert out.utilisation > 0.5  # restarted codes now sit among the data and are used
    assert torch.cdist(q.embed, z[0]).min(dim=1).values.max() < 3.0


def test_factorized_codes_are_unit_norm_and_low_dim():
    q = _q(dim=16, factorized_dim=4)
    q.train()
    q(torch.randn(2, 16, 4, 4))
    assert q.embed.shape == (16, 4)
    torch.testing.assert_close(q.embed.norm(dim=1), torch.ones(16))
    assert q.lookup(torch.tensor([0, 3])).shape == (2, 16)


def test_config_is_validated_with_field_names():
    with pytest.raises(ConfigError) as err:
        QuantizerConfig(decay=1.5)
    assert err.value.field == "decay"
    with pytest.raises(ConfigError) as err:
        from_dict(QuantizerConfig, {"codebook_sizes": 3})
    assert err.value.field == "codebook_sizes"
    with pytest.raises(ConfigError):
        from_dict(QuantizerConfig, {"restart_sampling": "sometimes"})


# ---- distributed: two gloo ranks, different data, one codebook ----------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch.manual_seed(rank)  # different random initial codebooks on the two ranks
    # Built BEFORE the process group exists: syncing must still happen (decided at call time).
    quantizers = {
        "kmeans": _q(dim=8, codebook_size=32, dead_code_fraction=0.5, decay=0.8),
        "random_init_factorized": _q(dim=8, codebook_size=32, factorized_dim=4, kmeans_init=False,
                                     dead_code_fraction=0.5, decay=0.8),
    }
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(100 + rank)
        for q in quantizers.values():
            q.train()
            for step in range(6):
                # Different data per rank, and a shifting distribution so codes die and restart.
                z = torch.randn(2, 8, 4, 4, generator=gen) * (1 + rank) + step * 3.0
                q(z)
        state = {f"{name}.{k}": v for name, q in quantizers.items() for k, v in q.state_dict().items()}
        torch.save(state, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_keep_identical_codebooks(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    s0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    s1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in ("kmeans", "random_init_factorized"):
        assert int(s0[f"{name}.restarts"]) > 0, f"{name}: the test must exercise a dead-code restart"
        assert int(s0[f"{name}.step"]) == 6
        for buf in ("embed", "embed_avg", "cluster_size", "restarts"):
            key = f"{name}.{buf}"
            assert torch.equal(s0[key], s1[key]), f"{key} differs between ranks"
