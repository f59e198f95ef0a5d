"""Check every kernel on CUDA against its torch reference, then time it at realistic sizes.

    python bench/gpu_kernels.py [--reps 50] [--out bench/results] [--json PATH]
    TRITON_INTERPRET=1 python bench/gpu_kernels.py --smoke   # CPU: the checks only, tiny sizes

Kernels: group_norm (+SiLU, NCHW and NHWC), its split form (group_norm_stats on two halves,
merge_group_stats, group_norm_apply), rms_norm (+SiLU), upsample_conv3x3, frames_to_input,
output_to_frames, tile_change and blend_tiles. A kernel that fails its check is recorded and not
timed; the others go on (exit status 1).

Times are medians of CUDA-event timings after warm-up (compilation excluded). Bandwidth is the
minimum traffic of each call (bytes read + written once) over its time, next to the bandwidth
of ``torch.empty_like(x).copy_(x)`` on the same input, measured in the same run. Prints a table
and writes JSON (checks, timings, device and versions) to ``--json``, default
``bench/results/gpu-kernels-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import timing  # noqa: E402  (bench/timing.py, beside this script)

import kernels  # noqa: E402


def time_ms(fn, reps: int) -> float:
    """Median CUDA-event milliseconds of ``fn`` after 5 untimed calls."""
    return timing.time_ms(fn, torch.device("cuda"), reps, warmup=5)[0]


def copy_gbps(x: torch.Tensor, reps: int) -> float:
    ms = time_ms(lambda: torch.empty_like(x).copy_(x), reps)
    return 2 * x.numel() * x.element_size() / ms / 1e6


CHECKS: list[dict] = []  # every check of this run, in order (written to the JSON)


def check(name: str, got: torch.Tensor, want: torch.Tensor, truth=None, exact=False, factor=2.0,
          norm=False) -> bool:
    """Exact, or within ``factor`` times the reference's own error against ``truth`` (plus a tiny
    slack): the max abs error, or with ``norm`` the relative error ||a - truth|| / ||truth||."""
    if exact:
        ok = torch.equal(got, want)
        detail = "exact" if ok else f"{(got.float() - want.float()).abs().max().item()} off"
    elif truth is not None:
        truth = truth.double()
        if norm:
            err, ref_err = ((t.double() - truth).norm().item() / truth.norm().item() for t in (got, want))
            slack, what = 1e-6, "rel"
        else:
            err, ref_err = ((t.double() - truth).abs().max().item() for t in (got, want))
            slack, what = 1e-5, "err"
        ok = err <= factor * ref_err + slack
        detail = f"{what} {err:.3g} vs reference {ref_err:.3g} (bound {factor:g}x + {slack:g})"
    else:
        err = (got.float() - want.float()).abs().max().item()
        ok, detail = err <= 1e-4, f"max diff {err:.3g}"
    ok = ok and bool(torch.isfinite(got.float()).all())
    print(f"check {name:<52} {'ok ' if ok else 'FAIL'} {detail}", flush=True)
    CHECKS.append(dict(name=name, ok=ok, detail=detail))
    return ok


def cases(dev: torch.device, smoke: bool = False):
    """(name, input for the copy baseline, bytes moved, kernel call, baseline name, baseline call).

    Each case is checked against its reference first and yielded only when the check passed.
    ``smoke`` shrinks every size so the script's own logic can be run on the CPU under
    TRITON_INTERPRET=1.
    """
    gen = torch.Generator(device=dev).manual_seed(0)
    gn_shapes = [(1, 64, 5, 7)] if smoke else [(1, 512, 135, 240), (1, 128, 1080, 1920)]
    frame_sizes = [(9, 16, 16)] if smoke else [(1080, 1920, 1088), (2160, 3840, 2160)]
    n_tiles, tile, overlap = (4, 8, 2) if smoke else (64, 128, 64)
    for shape in gn_shapes:
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            x = torch.randn(shape, device=dev, generator=gen, dtype=torch.float16)
            x = x.contiguous(memory_format=fmt)
            w = torch.randn(shape[1], device=dev, dtype=torch.float16)
            b = torch.randn(shape[1], device=dev, dtype=torch.float16)
            out = kernels.group_norm(x, 32, w, b, act="silu")
            want = F.silu(F.group_norm(x, 32, w, b, 1e-6))
            truth = F.silu(F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6))
            if check(f"group_norm {shape} {fmt_name}", out, want, truth):
                yield (f"group_norm+silu {shape} fp16 {fmt_name}", x, 2 * x.nbytes,
                       lambda x=x, w=w, b=b: kernels.group_norm(x, 32, w, b, act="silu"),
                       "F.group_norm+F.silu", lambda x=x, w=w, b=b: F.silu(F.group_norm(x, 32, w, b, 1e-6)))
            # The split form global-norm tiling uses: statistics of two halves, merged, applied.
            halves = [h.contiguous(memory_format=fmt) for h in x.split((shape[2] + 1) // 2, dim=2)]  # two tiles
            stats = lambda x=x, halves=halves: kernels.merge_group_stats(  # noqa: E731
                [kernels.group_norm_stats(h, 32) for h in halves])
            count, mean, m2 = stats()
            rstd = torch.rsqrt(m2 / count + 1e-6)
            out = kernels.group_norm_apply(x, mean, rstd, 32, w, b, act="silu")
            if check(f"group_norm_stats+apply (2 halves) {shape} {fmt_name}", out, want, truth):
                yield (f"group_norm_stats 2 halves {shape} fp16 {fmt_name}", x, x.nbytes, stats,
                       "torch reference", lambda halves=halves: kernels.merge_group_stats(
                           [kernels.group_norm_stats(h, 32, reference=True) for h in halves]))
                yield (f"group_norm_apply+silu {shape} fp16 {fmt_name}", x, 2 * x.nbytes,
                       lambda x=x, m=mean, r=rstd, w=w, b=b: kernels.group_norm_apply(x, m, r, 32, w, b, act="silu"),
                       "torch reference", lambda x=x, m=mean, r=rstd, w=w, b=b: kernels.group_norm_apply(
                           x, m, r, 32, w, b, act="silu", reference=True))
    # rms_norm: the Wan family's norm, (N, C, T, H, W) with SiLU.
    shape = (1, 6, 2, 5, 7) if smoke else (1, 192, 4, 135, 240)
    x = torch.randn(shape, device=dev, generator=gen, dtype=torch.float16)
    gamma = (1 + 0.2 * torch.randn(shape[1], device=dev, generator=gen)).to(torch.float16)
    truth = F.silu(F.normalize(x.double(), dim=1, eps=1e-12) * shape[1] ** 0.5 * gamma.double().view(-1, 1, 1, 1))
    if check(f"rms_norm+silu {shape}", kernels.rms_norm(x, gamma, act="silu"),
             kernels.rms_norm(x, gamma, act="silu", reference=True), truth):
        yield (f"rms_norm+silu {shape} fp16", x, 2 * x.nbytes, lambda: kernels.rms_norm(x, gamma, act="silu"),
               "torch reference", lambda: kernels.rms_norm(x, gamma, act="silu", reference=True))
    # upsample_conv3x3: the SD decoder's first up convolution at 1080p output (135x240 -> 270x480).
    cin, h, w = (8, 5, 7) if smoke else (512, 135, 240)
    x = torch.randn(1, cin, h, w, device=dev, generator=gen, dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(cin, cin, 3, 3, device=dev, generator=gen) / (9 * cin) ** 0.5).to(torch.float16)
    bias = (0.1 * torch.randn(cin, device=dev, generator=gen)).to(torch.float16)
    folded = kernels.fold_weight(wt)
    with timing.no_tf32():  # an fp32 truth, not a TF32 one
        truth = kernels.upsample_conv3x3(x.float(), wt.float(), bias.float(), reference=True)
    # Folding sums 2-4 fp16 weights and rounds them once more: allow 4x the reference's own error.
    if check(f"upsample_conv3x3 1x{cin}x{h}x{w} nhwc", kernels.upsample_conv3x3(x, wt, bias, folded=folded),
             kernels.upsample_conv3x3(x, wt, bias, reference=True), truth, factor=4.0, norm=True):
        yield (f"upsample_conv3x3 1x{cin}x{h}x{w} fp16 nhwc", x, x.nbytes + 4 * x.nbytes,
               lambda: kernels.upsample_conv3x3(x, wt, bias, folded=folded),
               "interpolate+conv3x3", lambda: kernels.upsample_conv3x3(x, wt, bias, reference=True))
    for h, w, h2 in frame_sizes:
        frames = torch.randint(0, 256, (1, h, w, 3), device=dev, generator=gen, dtype=torch.uint8)
        call = lambda f=frames, s=(h2, w): kernels.frames_to_input(f, s, torch.float16, channels_last=True)
        ref = lambda f=frames, s=(h2, w): kernels.frames_to_input(
            f, s, torch.float16, channels_last=True, reference=True)
        if check(f"frames_to_input {w}x{h}", call(), ref(), exact=True):
            yield (f"frames_to_input {w}x{h}->{h2} fp16 nhwc", frames, frames.nbytes + 3 * h2 * w * 2,
                   call, "torch reference", ref)
        x = torch.rand(1, 3, h2, w, device=dev, generator=gen, dtype=torch.float16) * 2.2 - 1.1
        call = lambda x=x, h=h, w=w: kernels.output_to_frames(x, h, w)
        ref = lambda x=x, h=h, w=w: kernels.output_to_frames(x, h, w, reference=True)
        if check(f"output_to_frames {w}x{h}", call(), ref(), exact=True):
            yield (f"output_to_frames {w}x{h} fp16", x, x.nbytes + frames.nbytes, call, "torch reference", ref)
    a = torch.randint(0, 256, (n_tiles, 3, tile, tile), device=dev, generator=gen, dtype=torch.uint8)
    b = torch.randint(0, 256, (n_tiles, 3, tile, tile), device=dev, generator=gen, dtype=torch.uint8)
    got, want = kernels.tile_change(a, b), kernels.tile_change(a, b, reference=True)
    if check("tile_change max", got[0], want[0]) & check("tile_change mean", got[1], want[1]):
        yield (f"tile_change {n_tiles}x3x{tile}x{tile} uint8", a, 2 * a.nbytes, lambda: kernels.tile_change(a, b),
               "torch reference", lambda: kernels.tile_change(a, b, reference=True))
    # 1080p decode: 512-pixel tiles overlapping by 64 on a 1088 x 1920 canvas, 15 tiles.
    size, step, canvas = (512, 448, (1088, 1920)) if not smoke else (8, 6, (13, 20))
    ys = sorted({*range(0, canvas[0] - size, step), canvas[0] - size})
    xs = sorted({*range(0, canvas[1] - size, step), canvas[1] - size})
    origins = torch.tensor([[0, y, x] for y in ys for x in xs], device=dev)
    tiles = torch.randn(len(origins), 3, size, size, device=dev, generator=gen, dtype=torch.float16)
    window = kernels.ramp_window(size, size, size - step, size - step, device=dev)
    shape = (1, 3, *canvas)
    call = lambda: kernels.blend_tiles(tiles, origins, window, shape)
    ref = lambda: kernels.blend_tiles(tiles, origins, window, shape, reference=True)
    name = f"blend_tiles {len(origins)}x3x{size}x{size} fp16 -> {canvas[0]}x{canvas[1]}"
    nbytes = tiles.nbytes + 4 * 4 * canvas[0] * canvas[1]  # tiles read; numerator, weights written
    if check(name, call(), ref()):
        yield (name, tiles, nbytes, call, "torch reference", ref)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results")
    parser.add_argument("--json", type=pathlib.Path, default=None,
                        help="result file (default: <out>/gpu-kernels-<device>-<date>.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes; without CUDA, only run the checks on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    cpu_smoke = args.smoke and not torch.cuda.is_available()
    if not cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_kernels: no CUDA device present; this benchmark only runs on a GPU")
    if not cpu_smoke and not kernels.HAVE_TRITON:
        raise SystemExit("gpu_kernels: triton is not importable; nothing to measure")
    dev = torch.device("cpu" if cpu_smoke else "cuda")
    rows = []
    for name, x, nbytes, call, base_name, base in cases(dev, args.smoke):
        if cpu_smoke:  # the checks ran; CPU times are no figure of these kernels
            continue
        ms, base_ms = time_ms(call, args.reps), time_ms(base, args.reps)
        copy = copy_gbps(x, args.reps)
        gbps = nbytes / ms / 1e6
        rows.append(dict(kernel=name, ms=ms, baseline=base_name, baseline_ms=base_ms, speedup=base_ms / ms,
                         bytes=nbytes, gbps=gbps, copy_gbps=copy, of_copy=gbps / copy))
    if rows:
        print(f"\n{'kernel':<50}{'ms':>8}{'base ms':>9}{'x':>6}{'GB/s':>8}{'copy':>8}{'of copy':>9}  baseline")
    for r in rows:
        print(f"{r['kernel']:<50}{r['ms']:>8.3f}{r['baseline_ms']:>9.3f}{r['speedup']:>6.2f}"
              f"{r['gbps']:>8.0f}{r['copy_gbps']:>8.0f}{r['of_copy']:>9.0%}  {r['baseline']}")
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - recorded as missing
        triton_version = None
    device_name = "cpu (smoke: checks only)" if cpu_smoke else torch.cuda.get_device_name()
    # A kernel Triton could not build here ran (and was timed as) its reference: say so loudly.
    fallbacks = kernels.unusable_kernels()
    for name, why in fallbacks.items():
        print(f"FALLBACK: kernels.{name} ran its torch reference ({why}); its row is not a Triton figure")
    failed = [c["name"] for c in CHECKS if not c["ok"]]
    for name in failed:
        print(f"FAILED CHECK: {name} (not timed)")
    meta = dict(device=device_name, torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda, python=platform.python_version(), reps=args.reps,
                date=datetime.datetime.now().isoformat(timespec="seconds"), fallbacks=fallbacks,
                checks_passed=len(CHECKS) - len(failed), checks_failed=len(failed))
    slug = "".join(c if c.isalnum() else "-" for c in device_name.split(" (")[0]).strip("-").lower()
    path = args.json or args.out / f"gpu-kernels-{slug}-{datetime.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=meta, checks=CHECKS, results=rows), indent=2))
    print(f"\n{len(CHECKS) - len(failed)} of {len(CHECKS)} checks passed; wrote {path}")
    return 1 if fallbacks or failed else 0


if __name__ == "__main__":
    sys.exit(main())
