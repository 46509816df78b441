"""The one place where a URI becomes a filesystem: local paths, ``file://`` and ``s3://``.

pyarrow (and so Ray Data, which takes a ``filesystem=``) gets a ``pyarrow.fs.FileSystem``;
code that needs a file-like object (h5py, astropy, PIL) gets an fsspec/s3fs filesystem.
Both are configured from the same :class:`StorageConfig`, or from the standard AWS variables:
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION`` / ``AWS_REGION``.

Credentials never leave the process that resolved them: they are excluded from reprs, redacted when
configs are dumped (``galray.config.SECRET_KEYS``), and left out when a :class:`StorageConfig` or an S3
filesystem is pickled (Ray task arguments, ``train_loop_config``, the object store). Each Ray worker
resolves its own from its node's environment, AWS profile or instance role; on a laptop Ray's workers
inherit the environment of the process that started Ray. The password of a ``user:password@`` URI is
redacted in every error message.
No Ray import here, so this module is safe everywhere.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from galray.config import SECRET_KEYS, check, redact_uri


class StorageError(RuntimeError):
    """Storage is unreachable, a bucket is missing, or access is denied. The message says which (URI passwords
    redacted)."""

    def __init__(self, message: str):
        super().__init__(redact_uri(message))


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage settings. Every field left empty falls back to the standard AWS variable."""

    endpoint_url: str | None = None
    """S3 endpoint, e.g. ``http://127.0.0.1:9000`` for MinIO/moto; default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL."""
    region: str | None = None
    """Region; default AWS_DEFAULT_REGION / AWS_REGION, else us-east-1."""
    access_key_id: str | None = field(default=None, repr=False)
    """Access key; default AWS_ACCESS_KEY_ID (or the AWS credential chain)."""
    secret_access_key: str | None = field(default=None, repr=False)
    """Secret key; default AWS_SECRET_ACCESS_KEY."""
    session_token: str | None = field(default=None, repr=False)
    """Session token for temporary credentials; default AWS_SESSION_TOKEN."""
    anonymous: bool = False
    """Unsigned requests, for public buckets."""
    max_attempts: int = 10
    """Attempts per request, with AWS's standard backoff: rides out 503 SlowDown and dropped connections."""
    connect_timeout_s: float = 10.0
    """Seconds to wait for a connection."""
    request_timeout_s: float = 60.0
    """Seconds to wait for a response."""

    def __post_init__(self) -> None:
        check(self.max_attempts >= 1, "max_attempts", "must be at least 1")
        check(self.connect_timeout_s > 0, "connect_timeout_s", "must be positive")
        check(self.request_timeout_s > 0, "request_timeout_s", "must be positive")
        if self.endpoint_url is not None:
            check(urlparse(self.endpoint_url).scheme in ("http", "https"), "endpoint_url",
                  f"must start with http:// or https://, got {self.endpoint_url!r}")

    def resolved(self) -> "StorageConfig":
        """A copy with the endpoint and region taken from the environment filled in, and no credentials.

        Ray-layer code resolves on the driver and passes the result to its tasks (worker processes do
        not see variables set in the driver after Ray started); credentials never travel that way: each
        worker resolves its own (:meth:`resolved_credentials`: its node's environment, profile or role).
        """
        return dataclasses.replace(self, endpoint_url=self.resolved_endpoint(), region=self.resolved_region(),
                                   **{k: None for k in _SECRET_FIELDS})

    def __reduce__(self):
        # Pickled (a Ray task argument, an object in Ray's object store, a train_loop_config): without
        # credentials, so they are never stored, spilled to disk or shown; the receiver resolves its own.
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _SECRET_FIELDS}
        return _rebuild_storage, (state,)

    # Resolved values: config first, then the environment.
    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    def resolved_region(self) -> str:
        return self.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"

    def resolved_credentials(self) -> tuple[str | None, str | None, str | None]:
        return (
            self.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
            self.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
            self.session_token or os.environ.get("AWS_SESSION_TOKEN"),
        )


_SECRET_FIELDS = tuple(f.name for f in dataclasses.fields(StorageConfig) if f.name in SECRET_KEYS)


def _rebuild_storage(state: dict) -> StorageConfig:
    return StorageConfig(**state)


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme, path)`` where path is what the filesystem takes: ``bucket/key`` for S3, absolute for local."""
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        return "s3", f"{parsed.netloc}{parsed.path}".rstrip("/")
    if uri.startswith("file://"):
        return "file", str(Path(urlparse(uri).path).resolve())
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return "file", str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, keeping its scheme."""
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def _endpoint_parts(endpoint: str) -> tuple[str, str]:
    parsed = urlparse(endpoint)
    return parsed.scheme or "https", parsed.netloc or parsed.path


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem with AWS standard retries, keeping ``max_attempts`` when pickled.

    pyarrow's own pickling (``S3FileSystem.__reduce__``, checked on pyarrow 25) leaves the retry
    strategy out (apache/arrow GH-47348), so the copy that Ray ships to its tasks silently fell back to
    pyarrow's default of 3 attempts: the configured retries held on the driver only.
    tests/test_flaky_storage.py holds this.
    """

    def __init__(self, *, max_attempts: int, **kwargs):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **kwargs)
        self.max_attempts = max_attempts

    def __reduce__(self):
        _, (kwargs,) = super().__reduce__()  # pyarrow's settings dict, everything but the retry strategy
        kwargs.pop("retry_strategy", None)  # in case a later pyarrow pickles it after all
        # Never the credentials (pyarrow pickles them in clear): the copy in a Ray worker (Ray Data's
        # filesystem=, Ray Train's storage_filesystem=) finds its own through AWS's default chain.
        for key in ("access_key", "secret_key", "session_token"):
            kwargs.pop(key, None)
        return _rebuild_s3, (kwargs, self.max_attempts)


def _rebuild_s3(kwargs: dict, max_attempts: int) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts=max_attempts, **kwargs)


def arrow_filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path)`` for ``uri``; pass both to pyarrow.parquet or Ray Data."""
    cfg = cfg or StorageConfig()
    scheme, path = split_uri(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), path
    key, secret, token = cfg.resolved_credentials()
    kwargs: dict = dict(
        region=cfg.resolved_region(),
        connect_timeout=cfg.connect_timeout_s,
        request_timeout=cfg.request_timeout_s,
        max_attempts=cfg.max_attempts,
    )
    endpoint = cfg.resolved_endpoint()
    if endpoint:
        kwargs["scheme"], kwargs["endpoint_override"] = _endpoint_parts(endpoint)
    if cfg.anonymous:
        kwargs["anonymous"] = True
    elif key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=token)
    return RetryingS3FileSystem(**kwargs), path


def fsspec_filesystem(uri: str, cfg: StorageConfig | None = None):
    """``(fsspec filesystem, path)`` for libraries that want file objects (h5py, astropy, PIL)."""
    import fsspec

    cfg = cfg or StorageConfig()
    scheme, path = split_uri(uri)
    if scheme == "file":
        return fsspec.filesystem("file"), path
    import s3fs

    key, secret, token = cfg.resolved_credentials()
    fs = s3fs.S3FileSystem(
        anon=cfg.anonymous,
        key=None if cfg.anonymous else key,
        secret=None if cfg.anonymous else secret,
        token=None if cfg.anonymous else token,
        endpoint_url=cfg.resolved_endpoint(),
        client_kwargs={"region_name": cfg.resolved_region()},
        config_kwargs={
            "retries": {"max_attempts": cfg.max_attempts, "mode": "standard"},
            "connect_timeout": cfg.connect_timeout_s,
            "read_timeout": cfg.request_timeout_s,
        },
        skip_instance_cache=True,
    )
    return fs, path


def _explain(uri: str, cfg: StorageConfig, err: Exception) -> StorageError:
    """Turn a deep pyarrow/AWS error into one sentence a person can act on (no credentials in it)."""
    text = str(err)
    endpoint = cfg.resolved_endpoint() or "AWS S3"
    low = text.lower()
    if "access_denied" in low or "accessdenied" in low or "invalidaccesskeyid" in low or "signaturedoesnotmatch" in low \
            or "forbidden" in low or "403" in low:
        return StorageError(
            f"access denied to {uri} at {endpoint}: check the credentials (AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY or storage.access_key_id / storage.secret_access_key)")
    if "nosuchbucket" in low or "no_such_bucket" in low or "bucket does not exist" in low:
        return StorageError(f"bucket of {uri} does not exist at {endpoint}")
    if "curl" in low or "connect" in low or "resolve" in low or "network" in low:
        return StorageError(f"cannot reach {endpoint} for {uri}: is the endpoint right and the server up?")
    return StorageError(f"storage error for {uri} at {endpoint}: {text.splitlines()[0] if text else type(err).__name__}")


def check_access(uri: str, cfg: StorageConfig | None = None, *, must_exist: bool = False) -> tuple[pafs.FileSystem, str]:
    """Fail fast, with a clear message, if ``uri`` cannot be used: missing bucket, bad credentials, no path.

    Returns the same ``(filesystem, path)`` as :func:`arrow_filesystem`.
    """
    cfg = cfg or StorageConfig()
    fs, path = arrow_filesystem(uri, cfg)
    try:
        if isinstance(fs, pafs.S3FileSystem):
            bucket = path.split("/", 1)[0]
            info = fs.get_file_info(bucket)
            if info.type == pafs.FileType.NotFound:
                raise StorageError(f"bucket {bucket!r} does not exist at {cfg.resolved_endpoint() or 'AWS S3'} "
                                   f"(needed for {uri})")
            # HeadBucket can succeed anonymously on some servers; listing proves the credentials work.
            fs.get_file_info(pafs.FileSelector(bucket, recursive=False, allow_not_found=True))
        if must_exist and fs.get_file_info(path).type == pafs.FileType.NotFound:
            raise StorageError(f"{uri} does not exist")
    except StorageError:
        raise
    except OSError as err:
        raise _explain(uri, cfg, err) from None
    return fs, path


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = arrow_filesystem(uri, cfg)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_text(uri: str, text: str, cfg: StorageConfig | None = None) -> None:
    fs, path = arrow_filesystem(uri, cfg)
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str, cfg: StorageConfig | None = None) -> str:
    fs, path = arrow_filesystem(uri, cfg)
    with fs.open_input_stream(path) as f:
        return f.read().decode()
