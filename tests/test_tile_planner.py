"""The tile planner: fewest computed pixels for the asked overlap within the memory budget."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import moving_square_frames

from codec.coder import CoderOptions, FrameDecoder, FrameEncoder
from codec.models import build
from codec.models.config import preset
from codec.tiling import LATENT_MIN_TILE, TileLayout, activation_bytes, best_grid, plan_tiles


def sd15():
    """The real SD 1.x config, without building the 80M-parameter network (the planner reads the config)."""
    cfg = preset("sd15")
    return SimpleNamespace(config=cfg, downscale=cfg.downscale, device=torch.device("cpu"))


def seams(starts: list[int], tile: int) -> list[int]:
    """Overlap of each pair of neighbouring tiles along one axis."""
    return [a + tile - b for a, b in zip(starts, starts[1:])]


def check_layout(lay: TileLayout, overlap: int) -> None:
    """Tiles cover the canvas, in order, every seam overlapping by at least ``overlap``."""
    th, tw = lay.tile_hw
    for starts, t, size in ((lay.ys, th, lay.height), (lay.xs, tw, lay.width)):
        assert starts[0] == 0 and starts[-1] + t == size
        assert all(overlap <= s < t for s in seams(starts, t))


def brute_force(height: int, width: int, overlap: int, fits, smallest: int) -> int:
    """Least covered latent pixels over every tile height and width (sides >= ``smallest`` or the
    whole axis) whose tile ``fits``, counting tiles with the layout's own rule."""
    best = None
    for th in range(1, height + 1):
        for tw in range(1, width + 1):
            if not all(t == size or (t >= smallest and t > overlap) for t, size in ((th, height), (tw, width))):
                continue
            if fits(th, tw):
                covered = TileLayout(height, width, (th, tw), overlap).covered
                best = covered if best is None else min(best, covered)
    return best


@pytest.mark.parametrize("height,width,overlap,max_area", [
    (12, 20, 2, 60), (12, 20, 2, 100), (17, 9, 3, 70), (30, 7, 4, 60), (25, 40, 5, 300), (9, 9, 0, 20),
])
def test_best_grid_covers_the_fewest_pixels(height, width, overlap, max_area):
    smallest = overlap + LATENT_MIN_TILE
    th, tw = best_grid(height, width, overlap, max_area, smallest, max(height, width))
    lay = TileLayout(height, width, (th, tw), overlap)
    check_layout(lay, overlap)
    assert th * tw <= max_area
    assert lay.covered == brute_force(height, width, overlap, lambda a, b: a * b <= max_area, smallest)


def test_best_grid_says_when_nothing_fits():
    """30x7 with overlap 4: the width is one 7 px tile, a tiled height needs 8 px tiles: 56 > 50."""
    assert best_grid(30, 7, 4, 50, 8, 30) is None
    assert brute_force(30, 7, 4, lambda a, b: a * b <= 50, 8) is None


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("height,width,part", [(96, 160, 0.3), (136, 64, 0.6), (200, 120, 0.45), (320, 200, 0.15)])
def test_plan_covers_the_fewest_pixels_within_the_budget(height, width, part, decode):
    """End to end through the real estimate: no tile size fits the budget (``part`` of what a
    whole frame needs) with fewer computed pixels."""
    model, f = build("taesd", width=8), 8
    budget = int(part * activation_bytes(model, height * width, torch.float32, decode))
    plan = plan_tiles(model, height, width, budget, torch.float32, decode=decode)
    assert plan.tile_hw is not None  # these budgets force tiling
    lay = plan.layout(height, width, f)
    o = plan.overlap // f
    check_layout(lay, o)

    def fits(th, tw):
        return activation_bytes(model, th * tw * f * f, torch.float32, decode) <= budget

    assert fits(*lay.tile_hw) and plan.batch * activation_bytes(model, plan.tile_hw[0] * plan.tile_hw[1],
                                                                 torch.float32, decode) <= budget
    assert lay.covered == brute_force(height // f, width // f, o, fits, o + LATENT_MIN_TILE)


SIZES = [(1080, 1920), (2160, 3840), (720, 1280), (96, 4000)]


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("gib", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_sd15_plans_fit_cover_and_overlap_no_more_than_asked(height, width, gib, dtype):
    """Every seam overlaps by at least the asked overlap and, summed over an axis, by at most one
    latent pixel more per seam (the old rule overlapped 456 px where 192 were asked at 1080p)."""
    model, f = sd15(), 8
    for decode in (False, True):
        plan = plan_tiles(model, height, width, gib << 30, dtype, decode=decode)
        if plan.tile_hw is None:
            continue
        lay = plan.layout(height, width, f)
        o = plan.overlap // f
        check_layout(lay, o)
        th, tw = lay.tile_hw
        assert activation_bytes(model, th * tw * f * f, dtype, decode) <= gib << 30
        for starts, t in ((lay.ys, th), (lay.xs, tw)):
            assert sum(seams(starts, t)) <= (len(starts) - 1) * (o + 1)


def test_waste_at_1080p_is_lower_than_the_old_rule():
    """The issue's example: 1080p, 768 px tiles, 192 px overlap. The old rule spread 768 px
    tiles evenly (TileLayout with one int tile still does); the planner, given the same budget
    (one 768x768 tile) and overlap, or --tile 768 as the largest side, computes fewer pixels."""
    model, f, h, w = sd15(), 8, 1080, 1920
    budget = activation_bytes(model, 768 * 768, torch.float16, decode=True)
    before = TileLayout(h // f, w // f, 768 // f, 192 // f)
    assert seams(before.ys, 768 // f) == [456 // f]  # the figure: two rows over 1080 px
    # Unasked, the overlap is what the former planner asked: a quarter of its 768 px tile (1024 does not fit).
    assert plan_tiles(model, h, w, budget, torch.float16, decode=True).overlap == 192
    for kwargs in (dict(), dict(tile=768)):
        plan = plan_tiles(model, h, w, budget, torch.float16, decode=True, overlap=192, **kwargs)
        after = plan.layout(h, w, f)
        print(f"1080p {kwargs}: waste {before.waste:.3f} before, {after.waste:.3f} after ({plan.tile_hw} px)")
        assert after.waste < before.waste
        assert max(plan.tile_hw) <= 768 or not kwargs


def test_a_given_tile_is_the_largest_side():
    """--tile keeps its tile count per axis and shrinks the tiles to what the overlap needs;
    whole frames when they fit and no --tile is given."""
    model, f = build("taesd", width=8), 8
    assert plan_tiles(model, 96, 160, 1 << 30, torch.float32, decode=False).tile_hw is None
    plan = plan_tiles(model, 720, 1280, 1 << 30, torch.float32, decode=False, tile=256, overlap=64)
    old = TileLayout(90, 160, 32, 8)  # the former fixed 256 px tiles
    lay = plan.layout(720, 1280, f)
    check_layout(lay, 8)
    assert (len(lay.ys), len(lay.xs)) == (len(old.ys), len(old.xs))
    assert max(plan.tile_hw) <= 256 and lay.covered < old.covered


def test_non_square_tiles_match_untiled_and_cache_exactly():
    """A budget that forces non-square tiles on a wide frame: the tiled KL model with global
    norm (no attention) still matches the untiled one as closely as the square tiles of
    test_tiling_cache do, both ways; the exact tile cache stays bit-identical to no cache."""
    from test_tiling_cache import kl_small

    model = kl_small(attention=False)
    h, w = 64, 192
    frames = moving_square_frames(2, h, w)
    whole = CoderOptions(cache="off")
    z0 = FrameEncoder(model, h, w, whole)(frames)
    x0 = FrameDecoder(model, h, w, whole)(z0).float()
    budget = activation_bytes(model, 64 * 96, torch.float32, decode=True)
    errors = {}
    for norm in ("tile", "global"):
        opts = CoderOptions(cache="off", max_memory=budget, norm=norm, overlap=32)  # test_tiling_cache's overlap
        enc, dec = FrameEncoder(model, h, w, opts), FrameDecoder(model, h, w, opts)
        for coder in (enc, dec):
            th, tw = coder.layout.tile_hw
            assert len(coder.layout) > 1 and th != tw and coder.global_norm == (norm == "global")
        errors[norm] = (rel(enc(frames), z0), rel(dec(z0).float(), x0))
    print(f"non-square tiles {enc.layout.tile_hw}/{dec.layout.tile_hw}: relative error encode/decode {errors}")
    # test_tiling_cache's tolerance for square tiles: global norm removes 90% of the per-tile error.
    assert errors["global"][0] < 0.1 * errors["tile"][0] and errors["global"][1] < 0.1 * errors["tile"][1]
    exact = FrameEncoder(model, h, w, CoderOptions(cache="exact", max_memory=budget, norm="tile", overlap=32))
    off = FrameEncoder(model, h, w, CoderOptions(cache="off", max_memory=budget, norm="tile", overlap=32))
    still = moving_square_frames(1, h, w).repeat(3, 0)
    assert torch.equal(exact(still), off(still)) and exact.stats.hit_rate > 0.6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_run_report_shows_the_waste(tmp_path, capsys):
    """`codec encode` prints the plan's waste factor, and the run report records it."""
    from helpers import tiny_model_file, write_clip

    from codec.cli import main
    from codec.models import load_model
    from codec.pipeline import encode_video

    clip = write_clip(tmp_path / "clip.mp4", moving_square_frames(2, 64, 96))
    model_file = tiny_model_file(tmp_path / "tiny.safetensors")
    opts = CoderOptions(tile=32, overlap=16)
    waste = FrameEncoder(load_model(model_file), 64, 96, opts).layout.waste
    assert waste > 1.0
    report = encode_video(clip, tmp_path / "a.safetensors", str(model_file), options=opts)
    assert report.tile_waste == pytest.approx(waste)
    assert main(["encode", str(clip), "-o", str(tmp_path / "b.safetensors"), "--model", str(model_file),
                 "--tile", "32", "--overlap", "16"]) == 0
    assert f"waste {waste:.2f}x" in capsys.readouterr().out
