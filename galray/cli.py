"""`galray <verb>`: the command line. Each verb parses its options and calls one library function.

Every verb that runs a job takes ``--config FILE`` (YAML) and ``--set a.b=c`` overrides on top of
its own flags; ``--print-config`` shows the resolved config (secrets redacted) and exits.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any, Callable, Sequence

from galray import __version__
from galray.config import ConfigError, dumps, load

EPILOG_S3 = textwrap.dedent("""\
    Storage: URIs may be local paths, file:// or s3://bucket/prefix. S3 settings come from
    --set storage.endpoint_url=... etc., or the standard variables AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.""")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="FILE", help="YAML file with the job's settings (flags and --set win over it)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting by its dotted name, e.g. --set sim.psf_fwhm=1.1 (repeatable)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def _flags(**pairs: Any) -> dict[str, Any]:
    """Nested dict from ``{"a.b": v}`` pairs, leaving out flags that were not given."""
    out: dict[str, Any] = {}
    for key, value in pairs.items():
        if value is None:
            continue
        node = out
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def _report_stage(summary: Any, output: str) -> int:
    """Print a row-reading stage's summary line and where its errored rows went."""
    print(summary.format())
    if summary.rows_errored:
        print(f"errored rows (object_id, stage, reason, source_file): {output.rstrip('/')}/_errors/")
    return 0


def _job_config(cls: type, args: argparse.Namespace, base: dict[str, Any]) -> Any:
    cfg = load(cls, args.config, args.overrides, base=base)
    if args.print_config:
        print(dumps(cfg), end="")
        raise SystemExit(0)
    return cfg


# --- verbs -------------------------------------------------------------------------------------

def cmd_simulate(args: argparse.Namespace) -> int:
    from galray.stages.simulate import SimulateJob, format_summary, simulate_survey

    job = _job_config(SimulateJob, args, _flags(**{
        "n": args.n, "out": args.out, "shard_rows": args.shard_rows, "preview": args.preview,
        "overwrite": args.overwrite or None, "sim.size": args.size, "sim.seed": args.seed}))
    print(format_summary(simulate_survey(job)))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from galray.stages.sample import SampleJob, write_sample

    job = _job_config(SampleJob, args, _flags(**{"source": args.source, "out": args.out, "xdf.size": args.size}))
    s = write_sample(job)
    print(f"cut {s['rows']:,} real galaxies from the Hubble XDF into {s['out']} "
          f"({s['bytes'] / 1e6:.1f} MB, {s['seconds']:.1f} s)")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from galray.stages.ingest import IngestJob, ingest

    job = _job_config(IngestJob, args, _flags(**{
        "format": args.format, "src": args.src, "out": args.out, "catalog": args.catalog,
        "id_column": args.id_column, "shard_rows": args.shard_rows, "overwrite": args.overwrite or None,
        "cutout.size": args.size, "cutout.crop_fraction": args.crop_fraction, "fits.mode": args.fits_mode}))
    return _report_stage(ingest(job), job.out)


def cmd_info(args: argparse.Namespace) -> int:
    from galray.data.store import dump_summary_json, store_summary

    summary = store_summary(args.uri)
    print(dump_summary_json(summary) if args.json else summary.format())
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from galray.stages.embed import EmbedJob, embed_store

    job = _job_config(EmbedJob, args, _flags(**{
        "input": args.input, "output": args.output, "model": args.model, "weights": args.weights,
        "pretrained": False if args.random_init else None, "input_size": args.input_size,
        "crop_fraction": args.crop_fraction, "batch_size": args.batch_size, "actors": args.actors,
        "num_gpus": args.num_gpus, "overwrite": args.overwrite or None, "compile": args.compile or None,
        "torch_threads": args.torch_threads, "tracking.uri": args.tracking_uri,
        "tracking.enabled": False if args.no_tracking else None}))
    return _report_stage(embed_store(job), job.output)


def cmd_generate(args: argparse.Namespace) -> int:
    from galray.stages.generate import generate_grid

    out = generate_grid(args.prior, args.vqvae, args.out, n=args.n, label=args.label, cfg_scale=args.cfg_scale,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(f"wrote {args.n} generated galaxies to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from galray.train.config import TrainJob
    from galray.train.launch import fit, summary_json

    job = _job_config(TrainJob, args, _flags(**{
        "kind": args.kind, "data": args.data, "name": args.name, "storage_path": args.storage_path,
        "steps": args.steps, "batch_size": args.batch_size, "checkpoint_every": args.checkpoint_every,
        "max_failures": args.max_failures, "scaling.num_workers": args.workers,
        "scaling.use_gpu": True if args.gpu else None, "tracking.uri": args.tracking_uri}))
    summary = fit(job)
    print(summary_json(summary) if args.json else summary.format())
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from galray.stages.encode import EncodeJob, encode_store

    job = _job_config(EncodeJob, args, _flags(**{
        "input": args.input, "vqvae": args.vqvae, "output": args.output, "batch_size": args.batch_size,
        "actors": args.actors, "num_gpus": args.num_gpus, "label_column": args.label_column,
        "overwrite": args.overwrite or None}))
    return _report_stage(encode_store(job), job.output)


def cmd_demo(args: argparse.Namespace) -> int:
    from galray.stages.demo import DemoConfig, run_demo

    cfg = _job_config(DemoConfig, args, _flags(out=args.out, n=args.n, size=args.size, seed=args.seed,
                                               steps=args.steps))
    run_demo(cfg)
    return 0


# --- parser ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galray",
        description="galray: galaxy survey cutouts to embeddings, sparse features and image tokens, on Ray.\n"
                    "Start with `galray demo`; every verb has --help.",
        formatter_class=_Formatter, epilog=EPILOG_S3)
    parser.add_argument("--version", action="version", version=f"galray {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)

    p = sub.add_parser("simulate", help="render a simulated survey (GalSim) into a cutout store",
                       formatter_class=_Formatter, epilog=EPILOG_S3, description=textwrap.dedent("""\
        Render 3-band (g, r, z) colour galaxies with GalSim, with a PSF, sky noise, random
        background stars and faint neighbours, into a sharded Parquet cutout store. Families:
        smooth round, cigar, edge-on disk with/without bulge, spiral (2-4 arms), barred spiral,
        ring, merger, disturbed/clumpy and star. Every row carries its ground truth (class,
        bulge fraction, Sersic index, size, axis ratio, angle, arms, pitch, bar, flux, colour,
        redshift). The same seed gives byte-identical output; existing shards are skipped, so
        an interrupted run resumes."""))
    p.add_argument("--n", type=int, help="number of galaxies [config default: 2000]")
    p.add_argument("--size", type=int, help="cutout size in pixels [config default: 64]")
    p.add_argument("--seed", type=int, help="random seed; fixes the output byte for byte [config default: 0]")
    p.add_argument("--out", help="output store URI (folder, file:// or s3://bucket/prefix) "
                                 "[config default: galray-data/sim]")
    p.add_argument("--shard-rows", type=int, help="rows per Parquet shard [config default: 1000]")
    p.add_argument("--preview", metavar="PNG", help="also write a montage PNG with one row per class")
    p.add_argument("--overwrite", action="store_true", help="re-render shards that already exist")
    _add_config_args(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("sample", help="write a store of real galaxies from a bundled image (no download)",
                       formatter_class=_Formatter, epilog=EPILOG_S3, description=textwrap.dedent("""\
        xdf: the Hubble eXtreme Deep Field colour image that scikit-image ships. Sources are
        detected with SEP (background-subtracted, deblended), each is cut out in a box scaled
        to its half-light radius (edge-padded at the border) and resized to --size. Rows keep
        SEP's measurements: x, y, a, b, axis ratio, position angle, half-light radius, flux,
        peak, S/N, area, box size and the fraction of the box outside the image."""))
    p.add_argument("source", choices=["xdf"], help="which real image to cut")
    p.add_argument("--out", help="output store URI [config default: galray-data/xdf]")
    p.add_argument("--size", type=int, help="cutout size in pixels [config default: 64]")
    _add_config_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("ingest", help="read survey cutouts (image folders, Galaxy10 HDF5, Galaxy Zoo Parquet, "
                                      "FITS) into a cutout store",
                       formatter_class=_Formatter, epilog=EPILOG_S3, description=textwrap.dedent("""\
        Stream survey cutouts, as they ship, into a sharded Parquet cutout store with Ray Data:
          images       a folder/prefix of PNG/JPEG (sub-folders too); object id = file stem
          galaxy10-h5  the Galaxy10 DECaLS file: images, ans (-> label, class_name), ra, dec,
                       redshift, pxscale; object id = row index
          gz-parquet   Galaxy Zoo's Hugging Face layout: image struct {bytes}, id_str, label columns
          fits         one file per cutout: one image extension per band, or a (C, H, W) cube
        Colour inputs are stored as uint8 HWC; FITS as float32 CHW flux (--fits-mode flux) or an
        arcsinh/percentile uint8 rendering (--fits-mode rgb; see fits.stretch.* for its settings).
        Every cutout is checked (decodable, not truncated, not all NaN or blank, aspect within
        cutout.max_aspect, unique id: the first in sorted order wins), centre-cropped to a square,
        cut to --crop-fraction and resized to --size (default: the native size of the first
        readable input, so same-sized inputs are stored unresampled). Rows that fail go to
        OUT/_errors/ with object_id, stage, reason and source_file; valid + errored = input, and
        the job still finishes (exit 0). Shards are deterministic: a rerun skips finished ones."""))
    p.add_argument("src", metavar="SRC", help="input: a folder, file or s3:// prefix")
    p.add_argument("--format", choices=["images", "galaxy10-h5", "gz-parquet", "fits"],
                   help="input format (required unless the --config file sets it)")
    p.add_argument("--out", help="output store URI [config default: galray-data/ingest]")
    p.add_argument("--catalog", metavar="FILE", help="CSV/TSV/Parquet catalog joined on the object id; "
                                                     "its columns are carried into the store")
    p.add_argument("--id-column", metavar="NAME", help="id column of the catalog and of gz-parquet input "
                                                       "[default: object_id for catalogs, id_str for gz-parquet]")
    p.add_argument("--size", type=int, help="output side in pixels [default: native size of the first input]")
    p.add_argument("--crop-fraction", type=float, help="central fraction of each side kept before resizing "
                                                       "[config default: 1.0]")
    p.add_argument("--fits-mode", choices=["flux", "rgb"], help="FITS: float32 flux or uint8 arcsinh rendering "
                                                                "[config default: flux]")
    p.add_argument("--shard-rows", type=int, help="input rows per task and shard [config default: 1000]")
    p.add_argument("--overwrite", action="store_true", help="delete existing shards and errors and redo all")
    _add_config_args(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="summarise a cutout store: rows, image shape, columns, labels, bytes",
                       formatter_class=_Formatter, epilog=EPILOG_S3,
                       description="Print rows, shards, bytes, the image column's shape, dtype and layout, "
                                   "every column with its type, counts for label-like columns, and the number "
                                   "of rows in the errors output. Reads Parquet footers and label columns only.")
    p.add_argument("uri", help="store URI: folder, file:// or s3://bucket/prefix")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("embed", help="embed a cutout store with a backbone (timm, Zoobot, Euclid MAE, VQ-VAE)",
                       formatter_class=_Formatter, epilog=EPILOG_S3, description=textwrap.dedent("""\
        Stream a cutout store through a fixed pool of model replicas (Ray Data) into an embedding
        store: one Parquet file per input shard (object_id, embedding as fixed-size float32 list,
        provenance in the file metadata), rows that fail to decode or preprocess under _errors/.
        CPU tasks decode, stretch, crop and resize; each actor loads the model once and runs it
        under inference_mode (bf16 autocast and channels_last on GPU). Finished shards are skipped,
        so an interrupted run resumes, and no row is ever written twice.
        Models: any timm name (pretrained from the hub when online), hf_hub:owner/repo,
        local-dir:/path/to/hub_copy, Zoobot encoders (hf_hub:mwalmsley/zoobot-encoder-convnext_nano),
        the Euclid MAE ViT (mwalmsley/euclid_encoder_mae_zoobot_vit_small_patch8_224), or galray's
        VQ-VAE encoder (vqvae:/path/to/checkpoint_dir). --weights loads a local safetensors file or a
        tensor-only .pt; a pickle that would run code is refused.
        The run is recorded in MLflow (settings, rows done and rows/s as it goes, the summary);
        --no-tracking turns that off.
        Memory stays flat however large the store: at most inflight_batches (default 8) batches of
        pixels per replica wait in Ray's object store (--set inflight_batches=N). Preprocessing runs
        in a pool of long-lived CPU actors that grows up to the CPUs the replicas leave
        (--set preprocess_actors=N caps it). The summary line gives the start-up (workers, model
        load, compilation) apart from the steady rows/s.
        On a CPU-only machine, several single-threaded replicas beat one multi-threaded one, e.g.
        on 2 cores: --actors 2 --torch-threads 1 --set cpus_per_actor=0.75 --set preprocess_cpus=0.5;
        add --compile for large stores."""))
    p.add_argument("--input", help="cutout store URI (folder, file:// or s3://bucket/prefix)")
    p.add_argument("--output", help="embedding store URI (folder, file:// or s3://bucket/prefix)")
    p.add_argument("--model", help="backbone name, e.g. convnext_nano or hf_hub:mwalmsley/zoobot-encoder-convnext_nano")
    p.add_argument("--weights", metavar="FILE", help="local weights file (safetensors or tensor-only .pt)")
    p.add_argument("--random-init", action="store_true",
                   help="random weights instead of the hub's pretrained ones (benchmarks, offline smoke tests)")
    p.add_argument("--input-size", type=int, help="model input side in pixels [default: the model's native size]")
    p.add_argument("--crop-fraction", type=float, help="keep this central fraction before resizing [config default: 1.0]")
    p.add_argument("--batch-size", type=int, help="images per forward pass [config default: 64]")
    p.add_argument("--actors", type=int, help="model replicas [config default: 0 = one per GPU, or CPUs/2 on CPU]")
    p.add_argument("--num-gpus", type=float, help="GPUs per replica; fails at once if the cluster has none "
                                                  "[config default: 0]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model in each replica: faster forward passes after a one-off compile "
                        "(tens of seconds per replica); worth it for large stores")
    p.add_argument("--torch-threads", type=int, help="torch threads per replica on CPU [default: its CPUs]")
    p.add_argument("--overwrite", action="store_true", help="recompute shards whose output already exists")
    p.add_argument("--tracking-uri", help="MLflow tracking URI [default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db]")
    p.add_argument("--no-tracking", action="store_true", help="do not record the run in MLflow")
    _add_config_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("generate", help="sample galaxy images from a trained prior and VQ-VAE into a PNG grid",
                       formatter_class=_Formatter, description=textwrap.dedent("""\
        Sample code grids from the class-conditional transformer prior (KV-cached: one step per
        token; the conditional and unconditional passes of classifier-free guidance run as one
        batch), decode them with the VQ-VAE and write one PNG grid. Checkpoint folders hold
        config.json + model.safetensors, as `galray train` writes them."""))
    p.add_argument("--prior", required=True, metavar="DIR", help="prior checkpoint folder")
    p.add_argument("--vqvae", required=True, metavar="DIR", help="VQ-VAE checkpoint folder (same codebook size)")
    p.add_argument("--out", required=True, metavar="PNG", help="output PNG path")
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--label", type=int, default=None,
                   help="class index to generate; -1 for unconditional (default: cycle through the classes)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale: 1 is plain conditional, >1 sharpens the class (default 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely codes; 0 keeps all (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 keeps all (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train the SAE, VQ-VAE or prior data-parallel with Ray Train, tracked in MLflow",
                       formatter_class=_Formatter, epilog=EPILOG_S3, description=textwrap.dedent("""\
        Data-parallel training (Ray Train TorchTrainer, DDP: gloo on CPU, NCCL on GPU) of
          sae    a Matryoshka BatchTopK SAE on an embedding store (`galray embed`)
          vqvae  a VQ-VAE on a cutout store
          prior  a class-conditional transformer prior on a code store (`galray encode`)
        --batch-size is per worker: the global batch is batch_size x workers (the learning rate
        is scaled with it only with --set scale_lr=true). Objects go to the validation split by
        crc32(object_id) (--set val_fraction=0.05). Checkpoints (model, optimizer, step, config;
        the SAE's normalisation and threshold) go to STORAGE_PATH/NAME every --checkpoint-every
        steps and at the end; rerunning the same --name and --storage-path resumes from the
        latest one, and up to --max-failures worker failures are recovered from it. One MLflow
        run per training run (tracking URI: --tracking-uri, else MLFLOW_TRACKING_URI, else
        sqlite:///mlflow.db): flattened config as params, step metrics, the checkpoint,
        config.json and figures as artifacts; the model is registered as galray-KIND (or
        tracking.register_model). Model settings: --set sae.model.k=32, --set vqvae.model.codebook_size=512,
        --set prior.model.n_layers=8, ... (see jobs/configs/*.yaml)."""))
    p.add_argument("kind", choices=["sae", "vqvae", "prior"], help="what to train")
    p.add_argument("--data", help="input store URI: embeddings (sae), cutouts (vqvae) or codes (prior)")
    p.add_argument("--name", help="run name; the same name and storage path resume the run")
    p.add_argument("--storage-path", help="where checkpoints go (folder or s3://bucket/prefix) "
                                          "[config default: galray-runs]")
    p.add_argument("--steps", type=int, help="optimizer steps in total [config default: 1000]")
    p.add_argument("--batch-size", type=int, help="rows per worker per step [config default: 256]")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints [config default: 500]")
    p.add_argument("--workers", type=int, help="data-parallel workers [config default: 2]")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (scaling.use_gpu)")
    p.add_argument("--max-failures", type=int, help="worker failures to recover from [config default: 0]")
    p.add_argument("--tracking-uri", help="MLflow tracking URI [default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db]")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("encode", help="turn a cutout store into VQ-VAE code sequences (the prior's data)",
                       formatter_class=_Formatter, epilog=EPILOG_S3, description=textwrap.dedent("""\
        Encode every cutout with a trained VQ-VAE (a `galray train vqvae` checkpoint folder:
        config.json + model.safetensors) into a code store: one Parquet file per input shard,
        with object_id, codes (h*w int16 codes in raster order) and label (the input's label
        column, else -1); the grid and codebook size are in the file metadata. Images get the
        same preprocessing as in training (square crop, resize to the model's image size; flux
        is stretched to colour). A fixed pool of actors each holds the model once and takes
        whole shards. Rows that fail go to OUTPUT/_errors/; valid + errored = input. Finished
        shards are skipped, so a rerun resumes."""))
    p.add_argument("--input", help="cutout store URI")
    p.add_argument("--vqvae", metavar="CKPT_DIR", help="VQ-VAE checkpoint folder (local or s3://)")
    p.add_argument("--output", help="code store URI")
    p.add_argument("--batch-size", type=int, help="images per forward pass [config default: 64]")
    p.add_argument("--actors", type=int, help="encoder actors [default: GPUs / num_gpus, or CPUs / 2]")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor [config default: 0]")
    p.add_argument("--label-column", help="input column copied to `label` [config default: label]")
    p.add_argument("--overwrite", action="store_true", help="recompute shards whose output exists")
    _add_config_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("demo", help="run the pipeline end to end on a small simulated survey",
                       formatter_class=_Formatter, description=textwrap.dedent("""\
        The quickstart, offline, on a CPU: simulate a small survey with GalSim (and a montage),
        train a VQ-VAE on it with Ray Train, embed every cutout with its encoder (Ray Data),
        train a sparse autoencoder on the embeddings, encode code grids, train the
        class-conditional prior and sample new galaxies from it. Every training is an MLflow
        run in OUT/mlflow.db. Takes a few minutes on 2 cores; everything goes under --out.
        --set stages=[simulate] (or any prefix of the stages) stops early."""))
    p.add_argument("--out", help="output folder [config default: galray-demo]")
    p.add_argument("--n", type=int, help="number of simulated galaxies [config default: 500]")
    p.add_argument("--size", type=int, help="cutout size in pixels [config default: 64]")
    p.add_argument("--seed", type=int, help="random seed [config default: 0]")
    p.add_argument("--steps", type=int, help="optimizer steps of each training [config default: 150]")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as err:
        print(f"galray {args.verb}: config error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a clear one-line message for the errors people can fix
        from galray.storage import StorageError

        if isinstance(err, (StorageError, FileNotFoundError)):
            print(f"galray {args.verb}: error: {err}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
