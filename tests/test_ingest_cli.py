"""`galray ingest` as a user runs it: corrupt files in the input, exit 0, a summary line with the counts
(with the previous release's --out, which still works)."""

from __future__ import annotations

import numpy as np
from conftest import run_cli

from galray.data.cutouts import encode_png


def test_cli_ingest_images_with_corrupt_files(tmp_path):
    src = tmp_path / "cutouts"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        (src / f"gal{i}.png").write_bytes(encode_png(img))
    (src / "zero.png").write_bytes(b"")
    (src / "junk.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (src / "catalog.csv").write_text("object_id,morph\ngal0,spiral\ngal1,elliptical\ngal2,spiral\n")
    out = tmp_path / "store"
    proc = run_cli("ingest", "--format", "images", str(src), "--out", str(out), "--size", "16",
                   "--catalog", str(src / "catalog.csv"), timeout=240)
    # everything is written, and 2 of 5 errored is over the default max_error_fraction (0.1): exit 3
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "5 rows in, 3 out, 2 errored" in proc.stdout and "more than max_error_fraction 0.1" in proc.stderr
    assert "--out is deprecated" in proc.stderr and "use --output" in proc.stderr  # the old spelling still works
    info = run_cli("info", str(out), timeout=60)
    assert info.returncode == 0 and "3 in" in info.stdout and "spiral: 2" in info.stdout
    assert "errors   2 row(s)" in info.stdout
