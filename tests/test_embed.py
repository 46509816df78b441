"""`galray embed`: backbones, safe weights, preprocessing, and the Ray Data pipeline end to end.

Pipeline tests run at 32 px on a few shards of 6-8 rows and share one local Ray (``ray_session``):
the S3/resume test with timm's tiny ``test_convnext`` on PNG bytes (the decoding path), the
actor-kill test with ``galray_pool_linear`` on a uint8 tensor store (the zero-copy fast path a
GPU node runs). The rest run without Ray.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from galray.config import ConfigError, from_dict
from galray.data.cutouts import CutoutError, encode_png
from galray.data.preprocess import ImagePlan, PreprocessConfig, plan_for, prepare_block, prepare_image
from galray.data.shards import ERRORS_DIR, ImageSpec, list_parquet, make_table, shard_name, write_table
from galray.data.stores import EMBEDDING_COLUMN, exact_batches, read_blocks, read_embeddings
from galray.models.backbones import (BackboneConfig, BackboneError, UnsafeWeightsError, create_backbone,
                                     embedding_dim, load_weights_file, to_model_input)
from galray.stages.embed import EmbedJob, ShardEmbedder, embed_dataset, embed_store
from galray.stages.pool import ActorPoolConfig
from galray.storage import arrow_filesystem
from galray.tracking import TrackingConfig

SIZE = 32
MODEL = "test_convnext"
FAST = BackboneConfig("galray_pool_linear", pretrained=False, input_size=SIZE)  # costs nothing: the pipeline's own path


def _write_store(uri: str, shards: int = 3, rows: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """A uint8 HWC store at the model's input size; returns {object_id: image}."""
    spec = ImageSpec(shape=(SIZE, SIZE, 3), bands=("g", "r", "z"))
    rng = np.random.default_rng(seed)
    fs, root = arrow_filesystem(uri)
    out = {}
    for s in range(shards):
        ids = np.array([f"obj-{s * rows + i:05d}" for i in range(rows)], dtype=object)
        images = rng.integers(0, 256, (rows, *spec.shape), dtype=np.uint8)
        write_table(make_table({"object_id": ids, "image": images, "ra": rng.uniform(0, 360, rows)}, spec),
                    fs, f"{root}/{shard_name(s)}")
        out.update(zip(ids, images))
    return out


def _write_png_store(uri: str, bad: set[str], shards: int = 3, rows: int = 8) -> dict[str, np.ndarray]:
    """A store of PNG bytes at the model's size, corrupt for the ids in ``bad``; returns {id: image} of the good
    rows, decoded here with PIL directly (independently of galray's preprocessing)."""
    rng = np.random.default_rng(1)
    fs, root = arrow_filesystem(uri)
    good = {}
    for s in range(shards):
        ids = [f"png-{s * rows + i:05d}" for i in range(rows)]
        blobs = [b"\x89PNG\r\n\x1a\n truncated" if i in bad else encode_png(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))
                 for i in ids]
        write_table(pa.table({"object_id": ids, "image": pa.array(blobs, pa.binary())}), fs, f"{root}/{shard_name(s)}")
        good.update({i: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for i, b in zip(ids, blobs) if i not in bad})
    return good


def _reference(images_NHWC: np.ndarray, weights: Path) -> np.ndarray:
    """The model applied directly: [0, 1], test_convnext's mean/std 0.5, no resize at the native size."""
    model = create_backbone(BackboneConfig(MODEL, weights=str(weights), input_size=SIZE)).model
    x = torch.from_numpy(images_NHWC).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        return model((x - 0.5) / 0.5).numpy()


def _output_ids(uri: str) -> list[str]:
    fs, root = arrow_filesystem(uri)
    return [i for f in list_parquet(fs, root) for i in pq.read_table(f.path, filesystem=fs).column("object_id").to_pylist()]


# --- backbones and weights (no Ray) ---------------------------------------------------------------

def test_weights_load_safely_and_malicious_pickle_is_refused(tmp_path):
    torch.manual_seed(1)
    src = create_backbone(BackboneConfig(MODEL, pretrained=False, input_size=SIZE))
    state = {k: v.clone() for k, v in src.model.state_dict().items()}
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = src.model(to_model_input(x, src.preprocessing))
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        b = create_backbone(BackboneConfig(MODEL, weights=str(tmp_path / name), input_size=SIZE))
        with torch.no_grad():
            assert torch.allclose(b.model(to_model_input(x, b.preprocessing)), want, atol=1e-6)
        assert b.weights_id.startswith("sha256:") and len(b.weights_id) == 7 + 64

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeWeightsError, match="refusing to load .*evil.pt"):
        load_weights_file(tmp_path / "evil.pt")
    with pytest.raises(UnsafeWeightsError):
        create_backbone(BackboneConfig(MODEL, weights=str(tmp_path / "evil.pt")))
    assert not marker.exists()

    save_file({"stem.0.weight": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))  # wrong shape
    with pytest.raises(BackboneError, match="does not fit"):
        create_backbone(BackboneConfig(MODEL, weights=str(tmp_path / "wrong.safetensors")))
    save_file({"stem.0.weight": state["stem.0.weight"]}, str(tmp_path / "wrong.safetensors"))  # most keys missing
    with pytest.raises(BackboneError, match="does not fit"):
        create_backbone(BackboneConfig(MODEL, weights=str(tmp_path / "wrong.safetensors")))
    with pytest.raises(BackboneError, match="unknown model"):
        create_backbone(BackboneConfig("no_such_model_xyz", pretrained=False))


def test_random_init_is_the_same_in_every_replica():
    a = create_backbone(BackboneConfig(MODEL, pretrained=False)).model.state_dict()
    torch.manual_seed(123)  # the caller's RNG state must not matter
    b = create_backbone(BackboneConfig(MODEL, pretrained=False)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_euclid_mae_vit_is_registered_with_mean_pooled_tokens():
    b = create_backbone(BackboneConfig("mwalmsley/euclid_encoder_mae_zoobot_vit_small_patch8_224", pretrained=False))
    m = b.model
    assert (m.embed_dim, m.patch_embed.patch_size, len(m.blocks), m.num_features) == (384, (8, 8), 12, 384)
    assert b.preprocessing.input_size == 224 and b.preprocessing.mean is None  # Zoobot: plain [0, 1]
    tokens = torch.randn(2, m.num_prefix_tokens + 28 * 28, 384)
    with torch.no_grad():
        pooled = m.forward_head(tokens)
        assert torch.allclose(pooled, m.fc_norm(tokens[:, m.num_prefix_tokens:].mean(1)), atol=1e-5)
    # Zoobot encoders resolve offline to their timm architecture (640-d for convnext_nano), also headless.
    z = create_backbone(BackboneConfig("hf_hub:mwalmsley/zoobot-encoder-convnext_nano", pretrained=False))
    assert z.model.num_features == 640 and z.preprocessing.mean is None and z.model.num_classes == 0


def test_vqvae_checkpoint_backbone_gives_pooled_latents(tmp_path):
    vqvae_mod = pytest.importorskip("galray.models.vqvae")
    from galray.models.checkpoint import save_model

    cfg = vqvae_mod.VQVAEConfig(image_size=16, latent_size=4, channels=(8, 8), code_dim=8, codebook_size=16,
                                kmeans_init=False)
    vq = vqvae_mod.VQVAE(cfg).eval()
    save_model(vq, tmp_path / "ckpt")
    b = create_backbone(BackboneConfig(f"vqvae:{tmp_path / 'ckpt'}"))
    assert b.preprocessing.input_size == 16 and embedding_dim(b) == 8
    x01 = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(b.model(to_model_input(x01, b.preprocessing)), vq.embed(x01 * 2 - 1), atol=1e-5)


def test_preprocessing_paths_and_errors():
    # uint8 HWC -> uint8 CHW at the model size
    plan = ImagePlan("image", "tensor", "HWC", size=16, in_chans=3, float_input=False)
    out = prepare_image(np.full((40, 30, 3), 7, np.uint8), plan)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8 and (out == 7).all()
    # float flux CHW (4 bands) -> colour rendering for a 3-channel backbone; an all-NaN cutout is an error
    schema = make_table({"object_id": np.array(["a"], object), "image": np.ones((1, 4, 20, 20), np.float32)},
                        ImageSpec(shape=(4, 20, 20), layout="CHW", dtype="float32")).schema
    fplan = plan_for(schema, size=16, in_chans=3)
    assert fplan.float_input and fplan.pixel_dtype == np.uint8
    flux = np.random.default_rng(0).normal(size=(2, 4, 20, 20)).astype(np.float32)
    flux[1] = np.nan
    table = make_table({"object_id": np.array(["a", "b"], object), "image": flux},
                       ImageSpec(shape=(4, 20, 20), layout="CHW", dtype="float32"))
    block = prepare_block(table, fplan)
    assert block.pixels.shape == (2, 3, 16, 16) and block.layout == "NCHW"
    assert block.errors[0].as_py() is None and "NaN" in block.errors[1].as_py()
    # encoded bytes: a truncated PNG is a CutoutError with a reason
    eplan = ImagePlan("image", "encoded", "HWC", size=16, in_chans=3, float_input=False)
    assert prepare_image(encode_png(np.zeros((8, 8, 3), np.uint8)), eplan).shape == (3, 16, 16)
    with pytest.raises(CutoutError, match="decode|truncated"):
        prepare_image(b"\x89PNG\r\n\x1a\n broken", eplan)


def test_prepare_block_passes_stored_tensors_through_without_a_copy_and_equals_prepare_image():
    """uint8 HWC at the model's size: the block's pixels are a view of the Parquet read's buffer (NHWC),
    equal to prepare_image row by row; any other plan (a crop) takes the per-row path, same values."""
    spec = ImageSpec(shape=(16, 16, 3), bands=("g", "r", "z"))
    images = np.random.default_rng(3).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    table = make_table({"object_id": np.array([f"o{i}" for i in range(5)], object), "image": images}, spec)
    plan = plan_for(table.schema, size=16, in_chans=3)
    fast = prepare_block(table, plan)
    assert plan.passes_through and fast.layout == "NHWC" and fast.errors.null_count == 5
    buffer = table.column("image").chunk(0).storage.values.buffers()[1]
    assert fast.pixels.ctypes.data == buffer.address  # zero-copy
    want = np.stack([prepare_image(im, plan) for im in images])
    np.testing.assert_array_equal(fast.pixels.transpose(0, 3, 1, 2), want)
    cropped = plan_for(table.schema, size=16, in_chans=3, prep=PreprocessConfig(crop_fraction=0.5))
    slow = prepare_block(table, cropped)
    assert not cropped.passes_through and slow.layout == "NCHW"
    np.testing.assert_array_equal(slow.pixels, np.stack([prepare_image(im, cropped) for im in images]))


def test_compiled_inference_equals_eager_with_padded_and_chunked_batches():
    """torch.compile (fixed batch shape) gives the eager model's embeddings for short, exact and long batches."""
    from galray.models.inference import InferenceModel

    b = create_backbone(BackboneConfig(MODEL, pretrained=False, input_size=SIZE))
    eager = InferenceModel(b.model, b.preprocessing, batch_size=4)
    compiled = InferenceModel(b.model, b.preprocessing, batch_size=4, compile=True)
    pixels = torch.randint(0, 256, (11, 3, SIZE, SIZE), dtype=torch.uint8)
    with torch.inference_mode():
        want = b.model(to_model_input(pixels, b.preprocessing))
    for n in (1, 3, 4, 11):  # eager (under 3/4 of a batch); padded to 4; exact; cut into 4 + 4 + 3 (padded)
        torch.testing.assert_close(eager(pixels[:n]), want[:n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(pixels[:n]), want[:n], rtol=1e-4, atol=1e-4)
    assert compiled.compiled and not eager.compiled
    nhwc = pixels.permute(0, 2, 3, 1).contiguous()  # channels-last pixels (a passed-through tensor store)
    torch.testing.assert_close(eager(nhwc, "NHWC"), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled(nhwc[:3], "NHWC"), want[:3], rtol=1e-4, atol=1e-4)


def test_exact_batches_recut_row_groups_into_full_batches(tmp_path):
    """Parquet batches end at row groups; the re-cut gives full batches and one short tail, rows in order;
    read_blocks does it on a file (read ahead in a thread), keeping the schema metadata, then ``then``."""
    sizes, start, batches = (5, 3, 10, 1), 0, []
    for n in sizes:
        batches.append(pa.record_batch({"i": pa.array(range(start, start + n))}))
        start += n
    out = list(exact_batches(iter(batches), 4))
    assert [t.num_rows for t in out] == [4, 4, 4, 4, 3]
    assert [v for t in out for v in t.column("i").to_pylist()] == list(range(19))
    assert [t.num_rows for t in exact_batches(iter(batches[:1]), 8)] == [5]

    table = pa.Table.from_batches(batches).replace_schema_metadata({"k": "v"})
    pq.write_table(table, tmp_path / "s.parquet", row_group_size=5)
    fs, root = arrow_filesystem(str(tmp_path))
    got = list(read_blocks(fs, f"{root}/s.parquet", ["i"], 4, then=lambda t: (t.schema.metadata, t.column("i"))))
    assert [len(c) for _, c in got] == [4, 4, 4, 4, 3] and all(m == {b"k": b"v"} for m, _ in got)
    assert [v for _, c in got for v in c.to_pylist()] == list(range(19))


def test_steady_rate_excludes_start_up_and_ramp():
    from galray.stages.summary import StageSummary, SteadyRate

    now = [100.0]
    rate = SteadyRate(t0=100.0, total=400, clock=lambda: now[0])
    assert rate.startup_s is None and rate.rows_per_s is None
    # 30 s start-up; one replica alone at first (16 rows in 5 s); from 100 rows (a quarter) on, 20 rows/s
    for t, rows in ((130.0, 16), (135.0, 32), (136.0, 100), (141.0, 200), (151.0, 400)):
        now[0] = t
        rate.update(rows)
    assert rate.startup_s == 30.0 and rate.rows_per_s == 20.0
    assert rate.window_s == (36.0, 51.0)  # from the arrival that completed the first quarter to the last
    line = StageSummary("embed", 400, 400, 0, 51.0, startup_s=rate.startup_s, steady_rows_per_s=rate.rows_per_s).format()
    assert "start-up 30.0 s, then 20.0 rows/s" in line
    no_total = SteadyRate(t0=0.0, clock=lambda: now[0])
    for t, rows in ((10.0, 10), (12.0, 30)):
        now[0] = t
        no_total.update(rows)
    assert no_total.rows_per_s == 10.0


def test_config_is_validated():
    with pytest.raises(ConfigError, match="batch_size"):
        EmbedJob(input="a", output="b", backbone=BackboneConfig(MODEL), batch_size=0)
    with pytest.raises(ConfigError, match="output"):
        EmbedJob(input="a", output="a/", backbone=BackboneConfig(MODEL))
    with pytest.raises(ConfigError, match="block_rows"):
        EmbedJob(input="a", output="b", backbone=BackboneConfig(MODEL), block_rows=0)
    with pytest.raises(ConfigError, match="preprocess_actors"):  # the preprocessing pool is gone: a stale key fails
        from_dict(EmbedJob, {"input": "a", "output": "b", "backbone": {"name": MODEL}, "preprocess_actors": 2})
    with pytest.raises(ConfigError, match="backbone.name"):
        EmbedJob(input="a", output="b")
    with pytest.raises(ConfigError, match="pool.actors"):
        from_dict(EmbedJob, {"input": "a", "output": "b", "backbone": {"name": MODEL}, "pool": {"actors": -1}})


# --- the pipeline (one shared local Ray) ----------------------------------------------------------

def test_s3_pipeline_equals_direct_model_writes_errors_and_resumes(s3_env, ray_session, tmp_path):
    """S3 in and out: embeddings equal the model applied directly, ids are the input's minus the
    errored ones (no duplicates), and after one output is deleted a rerun recomputes only that shard."""
    bad = {"png-00003", "png-00017"}
    src, dst = f"s3://{s3_env}/cutouts", f"s3://{s3_env}/embeddings"
    images = _write_png_store(src, bad)
    torch.manual_seed(7)  # weights unlike the seeded random init, passed to the actors as a file
    model = create_backbone(BackboneConfig(MODEL, pretrained=False, input_size=SIZE)).model
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    weights = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(weights))

    tracking = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="embed-test")
    summary = embed_dataset(src, dst, MODEL, weights=str(weights), input_size=SIZE, batch_size=5, block_rows=3,
                            actors=1, tracking=tracking)
    assert (summary.rows_in, summary.rows_out, summary.rows_errored, summary.skipped_shards) == (24, 22, 2, 0)
    assert 0 < summary.startup_s < summary.seconds and summary.steady_rows_per_s > 0
    # The run is in MLflow: settings as params, the summary's figures as metrics.
    client = mlflow.MlflowClient(tracking_uri=tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("embed-test").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["galray.stage"] == "embed"
    assert run.data.params["backbone.name"] == MODEL and run.data.params["output"] == dst
    m = run.data.metrics
    assert (m["rows_in"], m["rows_out"], m["rows_errored"], m["actors"], m["embedding_dim"]) == (24, 22, 2, 1, 64)
    assert m["rows_per_s"] > 0 and m["replayed_shards"] == 0
    ids, emb, meta = read_embeddings(dst)
    assert len(ids) == len(set(ids)) and set(ids) == set(images) - bad
    np.testing.assert_allclose(emb, _reference(np.stack([images[i] for i in ids]), weights), rtol=1e-4, atol=1e-5)
    assert meta["model"] == MODEL and meta["weights"].startswith("sha256:") and meta["embedding_dim"] == 64
    assert meta["preprocessing"]["model_input"]["input_size"] == SIZE and meta["galray_version"]
    fs, root = arrow_filesystem(dst)
    assert pq.read_schema(f"{root}/shard-00001.parquet", filesystem=fs).field(EMBEDDING_COLUMN).type == \
        pa.list_(pa.float32(), 64)
    errors = pa.concat_tables(pq.read_table(f.path, filesystem=fs) for f in list_parquet(fs, f"{root}/{ERRORS_DIR}"))
    assert set(errors.column("object_id").to_pylist()) == bad
    assert set(errors.column("stage").to_pylist()) == {"embed"}
    assert all("decode" in r or "truncated" in r for r in errors.column("reason").to_pylist())
    assert all(s.startswith(f"{src}/shard-") for s in errors.column("source_file").to_pylist())

    # Delete one output (a shard with an errored row): a rerun recomputes that shard only, identically,
    # and leaves the others untouched.
    before = {f.base_name: f.mtime_ns for f in list_parquet(fs, root)}
    old = pq.read_table(f"{root}/shard-00002.parquet", filesystem=fs)
    fs.delete_file(f"{root}/shard-00002.parquet")
    again = embed_dataset(src, dst, MODEL, weights=str(weights), input_size=SIZE, batch_size=5, actors=1)
    assert (again.rows_in, again.rows_out, again.rows_errored, again.skipped_shards) == (8, 7, 1, 2)
    after = {f.base_name: f.mtime_ns for f in list_parquet(fs, root)}
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in after if k != "shard-00002.parquet")
    new = pq.read_table(f"{root}/shard-00002.parquet", filesystem=fs)
    assert new.column("object_id").equals(old.column("object_id"))
    np.testing.assert_allclose(np.stack(new.column(EMBEDDING_COLUMN).to_numpy(zero_copy_only=False)),
                               np.stack(old.column(EMBEDDING_COLUMN).to_numpy(zero_copy_only=False)), atol=1e-6)
    assert sorted(_output_ids(dst)) == sorted(ids)
    assert pq.read_table(f"{root}/{ERRORS_DIR}/shard-00002.parquet", filesystem=fs).column("object_id").to_pylist() \
        == ["png-00017"]


def test_killed_replica_still_gives_exactly_once_output_on_the_fast_path(tmp_path, ray_session):
    """SIGKILL the model replica in the middle of a shard (galray_pool_linear on a uint8 tensor store:
    the zero-copy path): Ray restarts it and re-runs the call it held, which rewrites that shard
    whole; every row comes out exactly once, equal to the model applied directly, and a shard's
    repeated id is an errors row."""
    images = _write_store(str(tmp_path / "in"), shards=4, rows=6)
    fs, root = arrow_filesystem(str(tmp_path / "in"))
    ids = [f"obj-{i:05d}" for i in range(24, 27)] + ["obj-00024"]
    write_table(make_table({"object_id": np.array(ids, object),
                            "image": np.stack([images["obj-00000"]] * 4)}, ImageSpec(shape=(SIZE, SIZE, 3))),
                fs, f"{root}/{shard_name(4)}")
    images.update({i: images["obj-00000"] for i in ids})
    pids = tmp_path / "pids"

    class SlowEmbedder(ShardEmbedder):  # defined here, so Ray ships it by value to the actor
        def embed_pixels(self, pixels, layout):
            with open(pids, "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(0.25)  # keeps a shard in progress long enough to kill the actor inside it
            return super().embed_pixels(pixels, layout)

    killed: list[int] = []

    def kill_first():
        deadline = time.time() + 240
        while time.time() < deadline:
            if pids.exists() and len(pids.read_text().split()) >= 2:  # the second block of the first shard
                pid = int(pids.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first, daemon=True)
    killer.start()
    job = EmbedJob(input=str(tmp_path / "in"), output=str(tmp_path / "out"), backbone=FAST, batch_size=2,
                   block_rows=2, pool=ActorPoolConfig(actors=1), tracking=TrackingConfig(enabled=False))
    summary = embed_store(job, embedder_cls=SlowEmbedder)
    killer.join(5)
    assert len(killed) == 1 and len({int(p) for p in pids.read_text().split()}) >= 2, "the actor was not replaced"
    assert (summary.rows_in, summary.rows_out, summary.rows_errored) == (28, 27, 1)
    out_ids, emb, _ = read_embeddings(str(tmp_path / "out"))
    assert len(out_ids) == len(set(out_ids)) and set(out_ids) == set(images)
    model = create_backbone(FAST)
    x = torch.from_numpy(np.stack([images[i] for i in out_ids])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        want = model.model(to_model_input(x, model.preprocessing)).numpy()
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-5)
    (err,) = pq.read_table(tmp_path / "out" / ERRORS_DIR / "shard-00004.parquet").to_pylist()
    assert err["object_id"] == "obj-00024" and "duplicate" in err["reason"]


def test_gpus_requested_without_gpus_fail_at_once(tmp_path, ray_session):
    _write_store(str(tmp_path / "in"), shards=1, rows=2)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="num_gpus: .*no GPUs"):
        embed_dataset(str(tmp_path / "in"), str(tmp_path / "out"), MODEL, pretrained=False, num_gpus=1)
    assert time.perf_counter() - t0 < 60
    assert not list((tmp_path / "out").glob("*.parquet"))
