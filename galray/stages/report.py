"""`galray report`: one self-contained HTML page from an analysis, also logged to MLflow.

``--run`` names the analysis either as a folder (local or ``s3://``) that `galray analyze` wrote, or as
the MLflow run id of that analysis (its folder is an artifact of the run, under ``analysis/``). The
page (:mod:`galray.analysis.report`: pictures first, PNGs embedded, thumbnails loaded lazily) goes to
``--output``, default ``report.html`` inside a local analysis folder (``./report-<run>.html``
otherwise), and is logged to the analysis run as the artifact ``report/report.html``.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from galray.analysis.report import ANALYSIS_ARTIFACTS, SECTIONS, SUMMARY_NAME, SectionBuilder, build_sections, load_inputs, page
from galray.config import check
from galray.stages.summary import FieldsSummary
from galray.storage import StorageConfig, arrow_filesystem, exists, is_s3, join, write_text
from galray.tracking import Tracker, TrackingConfig

STAGE = "report"
REPORT_NAME = "report.html"
REPORT_ARTIFACTS = "report"


@dataclass(frozen=True)
class ReportJob:
    """`galray report`: which analysis, where the page goes."""

    run: str = ""
    """The analysis: a folder of `galray analyze` (local or s3://) or the MLflow run id of one."""
    output: str | None = None
    """HTML file (local or s3://); default report.html in a local analysis folder, else ./report-<run>.html."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Object-storage settings."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Where the analysis run is found (run ids) and the page is logged."""

    def __post_init__(self) -> None:
        check(bool(self.run), "run", "an analysis folder or the MLflow run id of an analysis is required")


@dataclass(frozen=True)
class ReportSummary(FieldsSummary):
    """What `galray report` prints."""

    output: str
    sections: list[str]
    images: int
    bytes: int
    mlflow_run_id: str | None
    """The run the page was logged to (None: not logged)."""
    seconds: float

    def format(self) -> str:
        logged = f"; logged to MLflow run {self.mlflow_run_id}" if self.mlflow_run_id else ""
        return (f"report: {len(self.sections)} sections ({', '.join(self.sections)}), {self.images} images, "
                f"{self.bytes / 1e6:.1f} MB -> {self.output}{logged}")


def _is_folder(run: str, storage: StorageConfig) -> bool:
    if is_s3(run) or run.startswith("file://"):
        return exists(join(run, SUMMARY_NAME), storage)
    return Path(run).is_dir()


def fetch_analysis(job: ReportJob, into: Path) -> tuple[Path, str | None]:
    """A local copy of the analysis (the folder itself when local) and the run id it came from, if any."""
    import pyarrow.fs as pafs

    if _is_folder(job.run, job.storage):
        if not is_s3(job.run):
            return Path(job.run.removeprefix("file://")), None
        fs, root = arrow_filesystem(job.run, job.storage)
        pafs.copy_files(root, str(into), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return into, None
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = job.tracking.resolved_uri()
    try:
        local = mlflow.artifacts.download_artifacts(run_id=job.run, artifact_path=ANALYSIS_ARTIFACTS,
                                                    dst_path=str(into), tracking_uri=uri)
    except MlflowException as err:
        raise FileNotFoundError(f"{job.run} is neither an analysis folder nor an MLflow run with an analysis in "
                                f"{uri}: {str(err).splitlines()[0]}") from None
    return Path(local), job.run


def report(job: ReportJob, sections: tuple[SectionBuilder, ...] = SECTIONS) -> ReportSummary:
    """Render the analysis ``job.run`` into one HTML file and log it to the analysis's MLflow run."""
    t0 = time.perf_counter()
    job = dataclasses.replace(job, storage=job.storage.resolved(), tracking=job.tracking.resolved())
    with tempfile.TemporaryDirectory() as tmp:
        folder, run_id = fetch_analysis(job, Path(tmp) / "analysis")
        inputs = load_inputs(folder)
        built = build_sections(inputs, sections)
        html = page(inputs, built)
        output = job.output or (str(folder / REPORT_NAME) if run_id is None and not is_s3(job.run)
                                else f"report-{run_id or 'analysis'}.html")
        if is_s3(output):
            write_text(output, html, job.storage)
        else:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(html, encoding="utf-8")
        run_id = run_id or inputs.summary.get("mlflow_run_id")
        logged = None
        if run_id and job.tracking.enabled:
            logged = _log(job.tracking, run_id, html, Path(tmp))
    return ReportSummary(output=output, sections=[b.id for b in built], images=html.count("<img "),
                         bytes=len(html.encode()),
                         mlflow_run_id=logged, seconds=round(time.perf_counter() - t0, 2))


def _log(tracking: TrackingConfig, run_id: str, page: str, tmp: Path) -> str | None:
    """Log the page to ``run_id`` as ``report/report.html``; None when this tracking store lacks the run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(tracking_uri=tracking.uri).get_run(run_id)
    except MlflowException:
        return None
    path = tmp / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    Tracker(tracking, run_id=run_id).log_artifact(path, REPORT_ARTIFACTS)
    return run_id
