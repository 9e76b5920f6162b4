"""COG fetch costs on a loopback mirror laid out like the published one.

Builds (in a temporary folder) the index at the real one's shape (sorted by zone then year,
~120 MB, ~113 k rows) and tiles stored as published (64 int8 bands band by band, 1024²
ZSTD blocks, ~0.6 MB per band per block; 2048² px instead of 8192² to save disk), serves
them on 127.0.0.1, and fetches square areas of 1, 10 and 100 km² from a fresh cache each.
Prints, per area: index bytes read, tile bytes read, the estimate printed before the
fetch, and seconds. Run: ``python bench/bench_fetch.py`` (or ``make bench``).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from cog_mirror import TILE, write_index, write_tile  # noqa: E402
from range_server import PREFIX, RangeServer  # noqa: E402

from alphaearth_height.plugin.core.aoi import AreaOfInterest  # noqa: E402
from alphaearth_height.plugin.core.fetch import estimate, fetch  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="aeh_bench_fetch_") as tmp:
        root = Path(tmp)
        left, bottom = 400_000.0, 5_000_000.0
        tile = write_tile(root, 2020, 32630, left, bottom, 21, "bench30", 6.0)
        rows = write_index(root / PREFIX / "aef_index.csv", [tile.row])
        index_size = (root / PREFIX / "aef_index.csv").stat().st_size
        print(f"mirror: index {index_size / 1e6:.1f} MB ({rows:,} rows); tile {TILE}² px, "
              f"{tile.path.stat().st_size / 1e6:.1f} MB, 1024² blocks")
        print(f"{'area':>8} {'index read':>12} {'tile read':>11} {'estimate':>10} {'est/read':>9} {'seconds':>8}")
        for km2 in (1, 10, 100):
            side = math.sqrt(km2) * 1000
            x0, y0 = left + 1_530, bottom + 2_270  # off the block lattice, as an area usually is
            aoi = AreaOfInterest(x0, y0, x0 + side, y0 + side, "EPSG:32630")
            cache = root / f"cache{km2}"
            with RangeServer(root, lifetime=1800) as srv:
                base = f"{srv.url}/{PREFIX}"
                start = time.monotonic()
                info = estimate(aoi, 2020, "cog", cache_dir=cache, base_url=base, status=lambda m: None)
                fetch(aoi, 2020, "cog", root / f"out{km2}.tif", cache_dir=cache, base_url=base,
                      status=lambda m: None)
                seconds = time.monotonic() - start
                served = dict(srv.log.bytes_served)
            index_read = served.get(f"/{PREFIX}/aef_index.csv", 0)
            tiles_read = sum(n for p, n in served.items() if p.endswith(".tiff"))
            print(f"{km2:>5} km² {index_read / 1e6:>9.2f} MB {tiles_read / 1e6:>8.1f} MB "
                  f"{info['download_bytes'] / 1e6:>7.1f} MB {info['download_bytes'] / max(1, tiles_read):>9.2f} "
                  f"{seconds:>8.1f}")
        print(f"(index read: {100 * index_read / index_size:.1f} % of the index for the last area; "
              "estimate and fetch together, 127.0.0.1)")


if __name__ == "__main__":
    main()
