"""What every embedding source provides to the fetch engine."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..aoi import AreaOfInterest
from ..cancel import CancelFn
from ..rasters import Grid
from .network import StatusFn, log_status
from .tiling import output_grid


class EmbeddingSource:
    """A source of AEF embeddings read tile by tile on any grid.

    ``read`` returns float32 (64, h, w) embeddings with NaN where there is no data;
    it may run in several threads at once, up to ``workers``.
    """

    name = ""
    tile_size = 512
    workers = 1
    cacheable = True
    status_sink: Optional[StatusFn] = None  # what the source is waiting for; None: the log

    def status(self, message: str) -> None:
        """Tell the user what is happening (index download, retries, waits)."""
        (self.status_sink or log_status)(message)

    def inputs(self) -> tuple[str, ...]:
        """Local files the output must not overwrite."""
        return ()

    def grid_for(self, aoi: AreaOfInterest, grid: Optional[Grid]) -> Grid:
        return output_grid(aoi, grid)

    def extent(self) -> Optional[Grid]:
        """The data's own grid where the source knows its edge (a local raster), else None."""
        return None

    def prepare(self, aoi: AreaOfInterest, grid: Grid, year: int, cancel: Optional[CancelFn]) -> None:
        """Work done once before the tiles (log in, find the files covering the area)."""

    def read(self, tile: Grid, cancel: Optional[CancelFn]) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        """Written into the output's SOURCE tag."""
        return self.name

    def estimate(self, aoi: AreaOfInterest, grid: Grid, year: int, tiles: int) -> dict:
        """Source-specific parts of the size estimate (requests, bytes downloaded); offline."""
        return {}

    def coverage(self, grid: Grid, year: int, cancel: Optional[CancelFn] = None) -> dict:
        """Parts of the estimate that need the network (the COG files under the area)."""
        return {}

    def close(self) -> None:
        """Release open files or sessions."""
