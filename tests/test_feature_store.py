"""The feature store's sparse columns (`galray features`): CSR rows strongest first, their round trip
through Parquet, and the streaming top-J scan against a brute-force one (pure numpy / pyarrow, no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from galray.data.shards import write_table
from galray.data.stores import feature_table, read_features, sparse_codes, sparse_rows, top_activating
from galray.storage import arrow_filesystem


def _random_codes(n: int, f: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, f), np.float32)
    for i in range(n):
        active = rng.choice(f, size=rng.integers(0, 2 * k), replace=False)
        codes[i, active] = rng.random(len(active)).astype(np.float32) + 0.01
    return codes


def test_sparse_rows_round_trip_strongest_first(tmp_path):
    codes = _random_codes(300, 40, 5, 0)
    off, idx, val = sparse_codes(codes)
    for i in range(0, 300, 37):
        row_v = val[off[i]:off[i + 1]]
        assert np.all(np.diff(row_v) <= 0)  # strongest first
        dense = np.zeros(40, np.float32)
        dense[idx[off[i]:off[i + 1]]] = row_v
        assert np.array_equal(dense, codes[i])
    fs, root = arrow_filesystem(str(tmp_path / "feat"))
    ids = [f"g{i:04d}" for i in range(300)]
    cat = pa.table({"label": np.arange(300) % 3})
    for s, sl in enumerate((slice(0, 120), slice(120, 300))):
        t = feature_table(ids[sl], off[sl.start:sl.stop + 1] - off[sl.start], idx[off[sl.start]:off[sl.stop]],
                          val[off[sl.start]:off[sl.stop]], cat.slice(sl.start, sl.stop - sl.start),
                          {"producer": "galray features", "n_latents": 40})
        write_table(t, fs, f"{root}/shard-{s:05d}.parquet")
    table, meta = read_features(str(tmp_path / "feat"), max_rows=250)
    assert table.num_rows == 250 and meta["n_latents"] == 40
    o2, i2, v2 = sparse_rows(table)
    assert np.array_equal(o2, off[:251]) and np.array_equal(i2, idx[:off[250]]) and np.array_equal(v2, val[:off[250]])
    assert table.column("label").to_pylist() == list(np.arange(250) % 3)


def test_top_activating_equals_a_brute_force_scan_across_files_and_batches(tmp_path):
    codes = _random_codes(900, 30, 4, 1)
    ids = np.array([f"g{i:04d}" for i in range(900)])
    fs, root = arrow_filesystem(str(tmp_path / "feat"))
    for s in range(3):
        sl = slice(300 * s, 300 * (s + 1))
        off, idx, val = sparse_codes(codes[sl])
        write_table(feature_table(list(ids[sl]), off, idx, val, None, {}), fs, f"{root}/shard-{s:05d}.parquet")
    for n in (25, 5):  # n=5: a batch of 64 rows holds more hits of a latent than n, so only its n best may enter
        found = top_activating(str(tmp_path / "feat"), [3, 17, 29], n=n, batch_rows=64)  # many batches per file
        for j in (3, 17, 29):
            order = np.argsort(-codes[:, j], kind="stable")[:n]
            order = order[codes[order, j] > 0]
            assert [oid for _, oid, _ in found[j]] == list(ids[order])
            assert np.allclose([v for v, _, _ in found[j]], codes[order, j])
            assert {p.rsplit("/", 1)[-1] for _, oid, p in found[j]} <= {f"shard-{s:05d}.parquet" for s in range(3)}
