"""`galray neighbours`: exact cosine nearest neighbours of one galaxy over an embedding store (local and S3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from galray.data.neighbours import QueryError, nearest_neighbours
from galray.data.shards import shard_name, write_table
from galray.data.stores import embedding_table
from galray.storage import StorageConfig, arrow_filesystem

from conftest import run_cli

D = 12


def _store(uri: str, rows_per_shard: tuple[int, ...], storage: StorageConfig | None = None,
           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An embedding store of clustered random vectors (so neighbours mean something), several shards."""
    rng = np.random.default_rng(seed)
    n = sum(rows_per_shard)
    centres = rng.normal(size=(8, D))
    x = (centres[rng.integers(0, 8, n)] + 0.3 * rng.normal(size=(n, D))).astype(np.float32)
    ids = np.array([f"gal-{i:05d}" for i in rng.permutation(n)], dtype=object)
    fs, root = arrow_filesystem(uri, storage)
    start = 0
    for s, rows in enumerate(rows_per_shard):
        write_table(embedding_table(ids[start:start + rows], x[start:start + rows], {"embedding_dim": D}),
                    fs, f"{root}/{shard_name(s)}")
        start += rows
    return ids, x


def _reference(ids: np.ndarray, x: np.ndarray, query: str, k: int) -> list[str]:
    """scikit-learn's brute-force cosine neighbours (the query itself dropped)."""
    nn = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(x)
    q = int(np.flatnonzero(ids == query)[0])
    _, idx = nn.kneighbors(x[q:q + 1])
    return [str(ids[i]) for i in idx[0] if i != q][:k]


def test_matches_brute_force_cosine_across_shards_and_small_batches(tmp_path):
    uri = str(tmp_path / "emb")
    ids, x = _store(uri, (300, 1, 257))
    for query in (ids[0], ids[300], ids[-1]):
        # batch_rows 50: the k best are merged across many batches and the three files
        got = nearest_neighbours(uri, str(query), k=15, batch_rows=50)
        assert [n.object_id for n in got.neighbours] == _reference(ids, x, str(query), 15)
        assert got.rows_searched == len(ids)
        sims = [n.similarity for n in got.neighbours]
        assert sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
        q = x[ids == query][0]
        best = x[ids == got.neighbours[0].object_id][0]
        assert got.neighbours[0].similarity == pytest.approx(q @ best / np.linalg.norm(q) / np.linalg.norm(best),
                                                             abs=1e-5)


def test_zero_and_nan_embeddings_are_left_out_and_counted(tmp_path):
    uri = str(tmp_path / "emb")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, D)).astype(np.float32)
    x[3] = 0.0
    x[7, 2] = np.nan
    ids = np.array([f"g{i:03d}" for i in range(40)], dtype=object)
    fs, root = arrow_filesystem(uri)
    write_table(embedding_table(ids, x, {"embedding_dim": D}), fs, f"{root}/{shard_name(0)}")
    got = nearest_neighbours(uri, "g000", k=50)
    assert got.rows_unusable == 2
    assert {n.object_id for n in got.neighbours} == {str(i) for i in ids} - {"g000", "g003", "g007"}
    with pytest.raises(QueryError, match="g003.*zero or not finite"):
        nearest_neighbours(uri, "g003", k=5)


def test_cli_over_s3_and_clear_errors(s3_server, tmp_path):
    bucket = s3_server.new_bucket()
    storage = StorageConfig(endpoint_url=s3_server.endpoint, access_key_id=s3_server.access_key,
                            secret_access_key=s3_server.secret_key)
    uri = f"s3://{bucket}/emb"
    ids, x = _store(uri, (120, 80), storage, seed=2)
    query = str(ids[17])
    proc = run_cli("neighbours", "--embeddings", uri, "--id", query, "--k", "7", "--json", env=s3_server.env(),
                   timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["query"] == query and out["rows_searched"] == 200
    assert [n["object_id"] for n in out["neighbours"]] == _reference(ids, x, query, 7)
    # The printed table: a header and one line a neighbour, in rank order.
    proc = run_cli("neighbours", "--embeddings", uri, "--id", query, "--k", "3", env=s3_server.env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("nearest 3 of 200 rows to " + query)
    assert [ln.split()[1] for ln in lines[2:]] == _reference(ids, x, query, 3)

    proc = run_cli("neighbours", "--embeddings", uri, "--id", "no-such-galaxy", env=s3_server.env(), timeout=120)
    assert proc.returncode == 2 and "id" in proc.stderr and "no-such-galaxy" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("neighbours", "--embeddings", str(tmp_path / "empty"), "--id", query, timeout=120)
    assert proc.returncode == 1 and "no embedding files" in proc.stderr, proc.stderr
    proc = run_cli("neighbours", "--embeddings", uri, "--id", query, "--k", "0", env=s3_server.env(), timeout=120)
    assert proc.returncode == 2 and "k" in proc.stderr
