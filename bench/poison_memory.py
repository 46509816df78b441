"""Peak memory of an ingest unit with a decompression bomb among 1,000 normal cutouts (issue 14).

One ingest unit (one Ray task, one shard) holds ``shard_rows`` files; here all 1,000 normal
cutouts (128 px PNGs) are one unit, and the bomb is a PNG of a filled ellipse on black declaring
150 megapixels (about 170 kB on disk). Each variant runs in a fresh Python process that plans,
probes and converts the unit exactly as an ingest task does (``galray.data.formats``), without
Ray, so its peak RSS (``getrusage``) is the task's:

- ``clean``: the 1,000 files; the baseline, measured in the same run;
- ``bomb``: the same plus the bomb, default limits (the bomb is an errors row naming the limit);
- ``bomb_unlimited``: the same with the limits raised out of the way (what the bomb costs a worker
  without them: galray before issue 14, PIL warning only).

    python bench/poison_memory.py --quick --json bench/out/poison_memory.json

Keys: files, bomb_megapixels, bomb_file_kb, peak_rss_clean_mb, peak_rss_bomb_mb,
peak_rss_bomb_unlimited_mb, ratio_bomb (target <= 1.2), ratio_bomb_unlimited, rows_errored_bomb.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys
from galray.data.formats import CutoutPolicy, FitsConfig, ReadContext, convert_unit, image_spec, plan_units, probe
from galray.data.limits import DecodeLimits
from galray.storage import StorageConfig

src, unlimited = sys.argv[1], sys.argv[2] == "1"
limits = DecodeLimits(max_pixels=10**12, max_decoded_bytes=1 << 40) if unlimited else DecodeLimits()
policy = CutoutPolicy(size=64)
plan = plan_units("images", src, StorageConfig(), 100_000, None, limits)
probe("images", src, StorageConfig(), plan, policy, FitsConfig(), limits)
ctx = ReadContext(format="images", src=src, storage=StorageConfig(), spec=image_spec("images", 64, (), FitsConfig()),
                  policy=policy, fits=FitsConfig(), limits=limits)
ok = err = 0
for unit in plan.units:
    table, errors = convert_unit(unit, ctx)
    ok, err = ok + table.num_rows, err + len(errors)
print(json.dumps({"rows_out": ok, "rows_errored": err,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _normal_png(rng: np.random.Generator, side: int = 128) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[:side, :side]
    blob = 180 * np.exp(-((yy - side / 2) ** 2 + (xx - side / 2) ** 2) / (side * 2))
    image = np.clip(blob[..., None] + rng.integers(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(megapixels: float) -> bytes:
    """A filled ellipse on black: compresses ~1000x, as the issue's 170 kB, 150 MP files."""
    from PIL import Image, ImageDraw

    side = int((megapixels * 1e6) ** 0.5)
    Image.MAX_IMAGE_PIXELS = None  # this process makes the bomb; the ingest under test reads it
    im = Image.new("L", (side, side))
    ImageDraw.Draw(im).ellipse((side // 5, side // 4, 4 * side // 5, 3 * side // 4), fill=255)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _run(src: Path, unlimited: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), "1" if unlimited else "0"], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the same 1,000 files (the figure needs them)")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    files, megapixels = 1000, 150.0
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        clean, bombed = Path(tmp, "clean"), Path(tmp, "bomb")
        clean.mkdir()
        bombed.mkdir()
        for i in range(files):
            data = _normal_png(rng)
            (clean / f"g{i:05d}.png").write_bytes(data)
            (bombed / f"g{i:05d}.png").write_bytes(data)
        bomb = _bomb_png(megapixels)
        (bombed / "g00500x.png").write_bytes(bomb)  # in the middle of the sorted order, after the probe
        base = _run(clean, False)
        with_bomb = _run(bombed, False)
        unlimited = _run(bombed, True)
    assert base["rows_errored"] == 0 and with_bomb["rows_errored"] == 1, (base, with_bomb)
    figures = {"files": files, "bomb_megapixels": megapixels, "bomb_file_kb": round(len(bomb) / 1024, 1),
               "peak_rss_clean_mb": round(base["peak_rss_mb"], 1), "peak_rss_bomb_mb": round(with_bomb["peak_rss_mb"], 1),
               "peak_rss_bomb_unlimited_mb": round(unlimited["peak_rss_mb"], 1),
               "ratio_bomb": round(with_bomb["peak_rss_mb"] / base["peak_rss_mb"], 3),
               "ratio_bomb_unlimited": round(unlimited["peak_rss_mb"] / base["peak_rss_mb"], 3),
               "rows_errored_bomb": with_bomb["rows_errored"], "rows_errored_bomb_unlimited": unlimited["rows_errored"]}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
