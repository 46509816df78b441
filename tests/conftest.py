"""Shared fixtures: a real S3 server (moto, over HTTP on 127.0.0.1) and one local Ray per session."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# Ray workers inherit the driver's environment at ray.init: keep them quiet and single-threaded
# so 2-core CI machines are not oversubscribed.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# Credentials never travel to Ray workers (galray.storage): like a cluster node, the session's Ray workers
# find them in the environment they inherit when Ray starts. moto's test server accepts any; no EC2
# metadata lookups (seconds of timeouts) when a test leaves them out on purpose.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Runs that tests do not point anywhere (embed's default tracking) go to a scratch sqlite store,
    never to an mlflow.db in the working copy."""
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    yield os.environ["MLFLOW_TRACKING_URI"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, endpoint
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("moto server exited at start")
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start in 30 s")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def new_bucket(self) -> str:
        name = f"galray-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (accepts any credentials)."""
    proc, endpoint = _start_moto()
    yield S3Server(endpoint, "testing", "testing")
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def s3_auth_server():
    """A moto server that checks credentials: one IAM user with full access; others are refused."""
    import boto3

    # The first 3 requests (create user, key, policy) run unauthenticated; every later one is checked.
    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="galray")
    key = iam.create_access_key(UserName="galray")["AccessKey"]
    iam.put_user_policy(UserName="galray", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point the standard AWS variables at the test server; yields a fresh bucket name."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_server.new_bucket()


@dataclass(frozen=True)
class MlflowServer:
    uri: str
    """http://127.0.0.1:PORT"""
    bucket: str
    """The S3 test server's bucket holding the server's artifacts, under ``mlflow/``."""


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """`mlflow server` on 127.0.0.1, as a cluster shares one: a sqlite backend and its artifacts on the S3
    test server (``--artifacts-destination``: clients log artifacts through the server and never see S3).
    Used by tests/test_mlflow_server.py (an embed job) and tests/test_train.py (a 2-worker training run)."""
    import signal

    bucket = s3_server.new_bucket()
    port = _free_port()
    db = tmp_path_factory.mktemp("mlflow-server") / "mlflow.db"
    env = {**os.environ, **s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    log = db.with_name("server.log")
    # its own session: `mlflow server` runs uvicorn in a child process; the teardown ends the whole group
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination",
                             f"s3://{bucket}/mlflow", "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield MlflowServer(f"http://127.0.0.1:{port}", bucket)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # its job consumers (huey) may outlive a SIGTERM
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs ~10 s)."""
    import ray

    from galray.session import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `galray ...` in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "galray.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


# --- headless Chromium (Debian's chromium + chromium-driver, the same apt version) ---------------------

CHROMIUM = Path("/usr/lib/chromium/chromium")  # the real binary; /usr/bin/chromium is a wrapper script
CHROMIUM_MISSING = "headless Chromium not installed: apt-get install -y chromium chromium-driver (.ci/run does it " \
                   "when it runs as root with apt)"

# Scroll every image into view (lazy images below the fold load only near the viewport), wait until each has
# loaded or failed (10 s at most), and report its decoded width. Selenium waits for the returned promise.
CHECK_IMAGES = """return (async () => {
  const imgs = [...document.images];
  for (const im of imgs) { im.scrollIntoView({block: 'center'}); await new Promise(r => requestAnimationFrame(r)); }
  const done = im => im.complete ? Promise.resolve() : new Promise(r => {
      im.addEventListener('load', r, {once: true}); im.addEventListener('error', r, {once: true}); });
  await Promise.race([Promise.all(imgs.map(done)), new Promise(r => setTimeout(r, 10000))]);
  window.scrollTo(0, 0);
  await new Promise(r => requestAnimationFrame(r));
  return imgs.map(im => ({alt: im.alt, naturalWidth: im.naturalWidth}));
})()"""


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """A headless Chromium driven by Selenium through Debian's chromedriver (no download: the driver is given)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if not CHROMIUM.exists() or driver_path is None:
        pytest.skip(CHROMIUM_MISSING)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                 "--window-size=1280,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


def render_page(driver, html: Path, screenshot: Path) -> tuple[list[dict], float]:
    """Open ``html``, load every image, save a screenshot; returns (images' alt and naturalWidth, the
    screenshot's grey-level standard deviation: 0 for a blank page)."""
    from PIL import Image, ImageStat

    driver.get(html.resolve().as_uri())
    images = driver.execute_script(CHECK_IMAGES)
    driver.save_screenshot(str(screenshot))
    with Image.open(screenshot) as im:
        return images, ImageStat.Stat(im.convert("L")).stddev[0]


def write_cutouts(uri: str, shards: int, rows: int, storage=None) -> list[str]:
    """A cutout store of random 32 px g/r/z uint8 images (ids obj-00000, ...) at ``uri``; returns its ids."""
    import numpy as np

    from galray.data.shards import ImageSpec, make_table, shard_name, write_table
    from galray.storage import arrow_filesystem

    spec = ImageSpec(shape=(32, 32, 3), bands=("g", "r", "z"))
    rng = np.random.default_rng(0)
    fs, root = arrow_filesystem(uri, storage)
    ids: list[str] = []
    for s in range(shards):
        shard = [f"obj-{s * rows + i:05d}" for i in range(rows)]
        write_table(make_table({"object_id": np.array(shard, dtype=object),
                                "image": rng.integers(0, 256, (rows, 32, 32, 3), np.uint8)}, spec),
                    fs, f"{root}/{shard_name(s)}")
        ids += shard
    return ids


@dataclass(frozen=True)
class RayHead:
    """A `ray start --head` of this test session: its dashboard (Jobs API) and the environment of its clients."""

    dashboard: str
    """http://127.0.0.1:PORT: `ray job submit --address`, JobSubmissionClient, `ray list --address`."""
    client_env: dict[str, str]
    """Token authentication as Ray sets it (RAY_AUTH_MODE=token and the cluster's token), nothing else secret."""
    session_dir: Path
    """The head's session folder: every log Ray writes for it lies under <session_dir>/logs."""
    node_secret: str
    """The S3 secret the head's node holds in its environment (a stand-in for an instance role)."""


def registered_steps(snapshot: str | None) -> set[int]:
    """Steps of the checkpoints Ray Train's controller has registered, from the text of the
    ``checkpoint_manager_snapshot.json`` it rewrites in the run folder after each one (None: not written
    yet). A checkpoint's files can be in storage before the controller has it, and a restart resumes only
    from a registered one."""
    return {int(m) for m in re.findall(r"step-(\d{8})", snapshot or "")}


def _kill_processes_under(marker: str) -> None:
    """SIGKILL the processes whose command line names ``marker`` (a temp folder only the fixture's Ray uses):
    the fixture's own Ray, never another Ray on the machine, and no `ray stop`."""
    import signal

    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def own_ports() -> list[str]:
    """`ray start` options for the ports it would otherwise take at fixed defaults (Ray Client 10001, the
    dashboard agent 52365), which another Ray on the machine may hold."""
    return [f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}"]


def start_ray_head(cmd: list[str], env: dict[str, str], marker: str, attempts: int = 3) -> None:
    """`ray start --head ...`, retried: Ray gives a new raylet 30 s (hard-coded) to register with the GCS and
    its dashboard a bounded start, which a loaded machine can miss; a failed attempt's processes are killed
    before the next."""
    for attempt in range(attempts):
        start = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        if start.returncode == 0:
            return
        _kill_processes_under(marker)
        if attempt == attempts - 1:
            errors = [line for line in start.stderr.splitlines() if " INFO " not in line and " DEBUG " not in line]
            raise RuntimeError("ray start failed:\n" + "\n".join(errors[-40:]))


@pytest.fixture(scope="session")
def ray_head(s3_auth_server):
    """A real Ray head on this machine with the dashboard on 127.0.0.1 and token authentication, its node
    holding the S3 test server's credentials in its environment, as a cloud node holds an instance role."""
    import tempfile

    pytest.importorskip("aiohttp_cors", reason="the Jobs API needs ray[default] (the test extra installs it)")
    token = uuid.uuid4().hex
    temp = Path(tempfile.mkdtemp(prefix="grh", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    node_env = {**os.environ, **client_env, **s3_auth_server.env()}
    node_env.pop("RAY_ADDRESS", None)
    dashboard_port, gcs_port = _free_port(), _free_port()
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` CLI of this interpreter
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        start_ray_head([*ray_cli, "start", "--head", f"--port={gcs_port}", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--num-cpus=2",
                        *own_ports(), f"--temp-dir={temp}", "--disable-usage-stats"], node_env, str(temp))
        # The Jobs API answers before the node's job agent has registered ("No available agent to submit
        # job, please try again later"): wait for a no-op job to be accepted.
        deadline = time.time() + 240
        while True:
            probe = subprocess.run([*ray_cli, "job", "submit", "--no-wait", "--address", dashboard, "--",
                                    "python", "-c", "pass"], env={**os.environ, **client_env},
                                   capture_output=True, text=True, timeout=120)
            if probe.returncode == 0:
                break
            if time.time() > deadline:
                raise RuntimeError(f"the Ray head's Jobs API did not accept a job: {probe.stderr[-2000:]}")
            time.sleep(3)
        yield RayHead(dashboard, {**client_env, "RAY_ADDRESS": dashboard}, temp / "session_latest",
                      s3_auth_server.secret_key)
    finally:
        _kill_processes_under(str(temp))
