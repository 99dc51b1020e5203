"""Tiled frames on the CPU engine: time per megapixel, and what cutting and stitching cost, same run.

    python -m pytest benchmarks/test_tiling_speed.py --benchmark-columns=median,iqr,rounds

The default model (efficientnet_lite2, random flow weights: speed does not depend on them) trained on
256x256 tiles at the frames' own scale (--tile-scale 1, overlap 0.25), built for the CPU with
`--backend auto`. Frames of 0.3, 0.5 (a 1130x460 BSD strip), 1 and 5 megapixels go through
Engine.score: tiles cut natively from the uint8 frame, all of a frame's tiles in one engine call,
the maps stitched and resized back to the frame. "plain" sends as many uint8 frames of the tile's
size through the same engine call (native preprocessing, one batch, maps and scores back): the
difference is what cutting and stitching cost.
benchmarks/NOTES.md has the table (ms per megapixel = median / megapixels).
"""

import numpy as np
import pytest
import torch

from engine.common.geometry import tile_grid

FRAMES = {"640x480": (480, 640), "1130x460": (460, 1130), "1280x800": (800, 1280), "2592x1944": (1944, 2592)}
TILE, SCALE, OVERLAP = (256, 256), 1.0, 0.25


@pytest.fixture(scope="module")
def tiled_engine(tmp_path_factory):
    import engine
    from benchmarks.stages import build_default_engine
    from train.model import FlowConfig
    path = build_default_engine(tmp_path_factory.mktemp("tiling"),
                                FlowConfig(input_size=TILE, tile_scale=SCALE, tile_overlap=OVERLAP))
    eng = engine.load(path, torch.get_num_threads())
    yield eng
    eng.close()


def _frame(hw):
    return np.random.default_rng(0).integers(0, 256, size=(*hw, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", FRAMES)
def test_tiled_frame(benchmark, tiled_engine, name):
    hw = FRAMES[name]
    _, starts = tile_grid(hw, SCALE, TILE, OVERLAP)
    benchmark.group = f"{name} ({hw[0] * hw[1] / 1e6:.2f} MP, {len(starts)} tiles)"
    benchmark.extra_info.update(megapixels=hw[0] * hw[1] / 1e6, tiles=len(starts),
                                engine=f"{tiled_engine.backend_name} {tiled_engine.precision}")
    frame = _frame(hw)
    result = benchmark.pedantic(tiled_engine.score, args=([frame],), rounds=3, warmup_rounds=1)[0]
    assert result.anomaly_map.shape == hw and np.isfinite(result.score)


@pytest.mark.parametrize("name", FRAMES)
def test_plain_batch_of_as_many_tiles(benchmark, tiled_engine, name):
    hw = FRAMES[name]
    _, starts = tile_grid(hw, SCALE, TILE, OVERLAP)
    benchmark.group = f"{name} ({hw[0] * hw[1] / 1e6:.2f} MP, {len(starts)} tiles)"
    benchmark.extra_info.update(megapixels=hw[0] * hw[1] / 1e6, tiles=len(starts))
    tiles = [_frame(TILE) for _ in starts]
    tiled_engine.tiling, tiling = None, tiled_engine.tiling  # the same engine, each tile as a whole frame
    try:
        benchmark.pedantic(tiled_engine.score, args=(tiles,), rounds=3, warmup_rounds=1)
    finally:
        tiled_engine.tiling = tiling
