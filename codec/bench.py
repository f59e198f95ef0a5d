"""``codec bench``: per-frame latency of our encode and decode against the usual loop, same frames.

What is timed (in-process; the clip is decoded into host memory first, untimed, and both sides
get the same uint8 frames, so video decoding costs neither side anything):

- encode, per call of ``chunk`` frames (default 1): uint8 frames (n, H, W, 3) in host memory ->
  model -> latents on the host -> written to a latent file (``LatentWriter``, float16).
  Ours: ``FrameEncoder`` (tiles, cache, kernels). Baseline: numpy -> tensor -> [-1, 1] ->
  ``AutoencoderTiny/KL.encode`` -> ``(z - shift) * scaling`` -> the same writer.
  Baselines: ``diffusers`` (the same weights in diffusers' AutoencoderTiny/KL), ``torch`` (our own
  model called frame by frame in plain PyTorch: kernels forced to their references, no batching,
  tiling, cache or threads: the loop a user of a model diffusers lacks would write), ``auto``
  (diffusers where it has the model and is installed, else torch) or ``none``.
- decode, per call: float16 latents in host memory (each side decodes the latents it wrote) ->
  model -> uint8 frames -> ``VideoWriter.write`` (libx264). Ours: ``FrameDecoder``; baseline:
  ``decode`` -> ``(x / 2 + 0.5).clamp(0, 1) * 255`` rounded -> the same writer.

The baseline always goes frame by frame, as users write it. The two sides alternate call by call
(ours, baseline, ours, ...) so drifts in background load hit both alike. On CUDA the clock is read
after ``torch.cuda.synchronize()``. Warm-up calls run first on fresh coders and are not timed;
memory is measured over them, each side alone (ours before the baseline model exists).
Before any time is reported, the decoded frames of both sides are compared (PSNR, dB): below
``min_psnr`` it fails with ValueError "outputs disagree".
"""

from __future__ import annotations

import logging
import platform
import re
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from kernels import force_reference

from . import __version__
from .coder import CoderOptions, FrameDecoder, FrameEncoder, round_up
from .latents import LatentWriter
from .models import Autoencoder
from .quality import psnr
from .stages import now, peak_host_mb
from .video import FrameReader, VideoWriter

MIN_PSNR = 30.0  # dB: least agreement between our decoded frames and the baseline's
BASELINES = ("auto", "diffusers", "torch", "none")


# ---- the two sides -------------------------------------------------------------------------

class OursCoder:
    """Our FrameEncoder/FrameDecoder pair for one clip size (fresh cache state)."""

    def __init__(self, model: Autoencoder, height: int, width: int, options: CoderOptions | None):
        self.enc = FrameEncoder(model, height, width, options)
        self.dec = FrameDecoder(model, height, width, options)

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, C, h, w) float16 latents on the host."""
        return self.enc(frames).to("cpu", torch.float16)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(n, C, h, w) float16 host latents -> (n, H, W, 3) uint8 frames."""
        return self.dec(latents.float()).cpu().numpy()


class BaselineCoder:
    """Frame by frame through ``encode_raw``/``decode_raw``: (N,3,H,W) in [-1, 1] -> raw latents
    and back, in ``dtype`` on the model's device (a diffusers ``net``, or our model in plain torch)."""

    def __init__(self, encode_raw, decode_raw, model: Autoencoder, height: int, width: int, dtype: torch.dtype,
                 net: torch.nn.Module | None = None):
        self.encode_raw, self.decode_raw, self.model, self.dtype = encode_raw, decode_raw, model, dtype
        self.net = net
        self.height, self.width = height, width
        self.f = model.downscale

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.model.device)
        x = x.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1
        pad_h, pad_w = round_up(self.height, self.f) - self.height, round_up(self.width, self.f) - self.width
        if pad_h or pad_w:  # edge-replicate to the model's factor, as ours does (crop after decoding)
            x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        m = self.model
        z = self.encode_raw(x)
        return ((z - m.shift_factor) * m.scaling_factor).to("cpu", torch.float16)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        m = self.model
        z = latents.to(self.model.device, self.dtype) / m.scaling_factor + m.shift_factor
        x = self.decode_raw(z)[:, :, :self.height, :self.width]
        x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()


class _GraftedPool(torch.nn.Module):
    """A diffusers AutoencoderTinyBlock with TAEF2's middle-block GroupNorm branch in front:
    ``block(x + pool(x))``, pool = conv1x1 -> GroupNorm(4) -> ReLU -> conv1x1 (plain torch, as in
    madebyollin/taesd). diffusers' AutoencoderTiny has no such branch."""

    def __init__(self, block: torch.nn.Module, pool):
        super().__init__()
        n4, n = pool.expand.weight.shape[:2]
        self.block = block
        self.pool = torch.nn.Sequential(torch.nn.Conv2d(n, n4, 1, bias=False), torch.nn.GroupNorm(4, n4),
                                        torch.nn.ReLU(), torch.nn.Conv2d(n4, n, 1, bias=False))
        for i, src in ((0, pool.expand), (1, pool.norm), (3, pool.project)):
            self.pool[i].load_state_dict(src.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x + self.pool(x))


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ValueError("--baseline diffusers needs diffusers: pip install diffusers "
                         "(or pip install -e '.[dev]'), or pass --baseline none") from None
    return diffusers


def diffusers_twin(model: Autoencoder, dtype: torch.dtype):
    """(diffusers model with ``model``'s weights on its device in ``dtype``, a note on what differs).

    Tiny family: ``AutoencoderTiny`` (our ``encoder.N`` = its ``encoder.layers.N``, our
    ``decoder.N`` = its ``decoder.layers.N-1``); a middle-block GroupNorm branch (TAEF2) is
    grafted on since diffusers has none. KL family: ``AutoencoderKL`` with the same config.
    """
    cfg, note = model.config, "same weights, same config"
    if not has_diffusers_twin(model):
        raise ValueError(f"{model.name}: diffusers has no AutoencoderTiny with pixel-shuffle resampling, so there "
                         "is no same-weights baseline; use --baseline torch, or a TAESD-layout model such as taef2")
    diffusers = _diffusers()
    if model.family == "tiny":
        w = (cfg.width,) * 4
        net = diffusers.AutoencoderTiny(encoder_block_out_channels=w, decoder_block_out_channels=w,
                                        latent_channels=cfg.latent_channels,
                                        scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor)
        state, pools = {}, []
        for k, v in model.state_dict().items():
            m = re.match(r"(encoder|decoder)\.(\d+)\.(.*)", k)
            if m is None:  # not a TAESD layer (no such tensors today): the strict load below decides
                continue
            part, idx, rest = m.group(1), m.group(2), m.group(3)
            j = int(idx) - (part == "decoder")
            if rest.startswith("pool."):
                pools.append((part, int(idx), j))
            else:
                state[f"{part}.layers.{j}.{rest}"] = v
        net.load_state_dict(state, strict=True)
        for part, idx, j in sorted(set(pools)):
            layers = getattr(net, part).layers
            layers[j] = _GraftedPool(layers[j], getattr(model, part)[idx].pool)
        if pools:
            note = ("AutoencoderTiny has no middle-block GroupNorm: the branch is grafted on in plain torch "
                    "(block(x + pool(x)), as madebyollin/taesd)")
    else:
        n = len(cfg.block_out_channels)
        net = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
            block_out_channels=cfg.block_out_channels, down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups, use_quant_conv=cfg.use_quant_conv,
            use_post_quant_conv=cfg.use_post_quant_conv, mid_block_add_attention=cfg.mid_block_add_attention,
            scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor, force_upcast=cfg.force_upcast)
        net.load_state_dict(model.state_dict(), strict=True)
        note += "; encode takes latent_dist.mode()"
        if cfg.force_upcast and dtype == torch.float16:
            dtype = torch.float32
            note += "; force_upcast: the baseline runs in float32, as diffusers pipelines do"
    quiet = logging.getLogger("diffusers")  # silence its advice on casting with .to()
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        net = net.to(model.device, dtype).eval()
    finally:
        quiet.setLevel(level)
    return net, dtype, note


def has_diffusers_twin(model: Autoencoder) -> bool:
    """Whether diffusers has this architecture (every KL model; tiny models of the TAESD layout)."""
    return model.family != "tiny" or model.config.resample == "nearest"


def resolve_baseline(kind: str, model: Autoencoder) -> str:
    """``auto`` -> ``diffusers`` where diffusers has the model and imports, else ``torch``."""
    if kind not in BASELINES:
        raise ValueError(f"--baseline must be one of {', '.join(BASELINES)}, got {kind!r}")
    if kind != "auto":
        return kind
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return "torch"
    return "diffusers" if has_diffusers_twin(model) else "torch"


def make_baseline(kind: str, model: Autoencoder, height: int, width: int):
    """(BaselineCoder or None, description) for a resolved ``kind``."""
    if kind == "none":
        return None, None
    if kind == "torch":
        def encode_raw(x):
            with force_reference():
                return model._encode_raw(x, sample=False, generator=None)

        def decode_raw(z):
            with force_reference():
                return model._decode_raw(z)

        desc = (f"our model in plain PyTorch {str(model.dtype).removeprefix('torch.')}, frame by frame "
                "(kernels forced to their references; no batching, tiling, cache or threads)")
        return BaselineCoder(encode_raw, decode_raw, model, height, width, model.dtype), desc
    net, dtype, note = diffusers_twin(model, model.dtype)
    if model.family == "tiny":
        encode_raw = lambda x: net.encode(x).latents
    else:
        encode_raw = lambda x: net.encode(x).latent_dist.mode()
    desc = f"diffusers {type(net).__name__} {str(dtype).removeprefix('torch.')}, frame by frame; {note}"
    return BaselineCoder(encode_raw, lambda z: net.decode(z).sample, model, height, width, dtype, net), desc


# ---- measuring ------------------------------------------------------------------------------

@dataclass
class _Side:
    coder: object
    ms: dict[str, list[float]] = field(default_factory=lambda: {"encode": [], "decode": []})
    cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {"encode": [], "decode": []})
    latents: list[torch.Tensor] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    peak_host_mb: float | None = None
    peak_device_mb: float | None = None
    seconds: dict[str, float] = field(default_factory=lambda: {"encode": 0.0, "decode": 0.0})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm(coder, frames: np.ndarray, device: torch.device) -> tuple[float | None, float | None]:
    """Run ``frames`` through a fresh coder, untimed; (peak RSS MiB, peak device MiB), None without frames."""
    if len(frames) == 0:
        return None, None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(len(frames)):
        coder.decode(coder.encode(frames[i:i + 1]))
    _sync(device)
    dev = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return peak_host_mb(), dev


def _stats(ms: list[float], cpu_ms: list[float], seconds: float) -> dict:
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(np.mean(ms)),
            "fps": len(ms) / seconds if seconds > 0 else 0.0, "latency_ms": [round(v, 3) for v in ms],
            "cpu_p50_ms": float(np.percentile(cpu_ms, 50)), "cpu_ms": [round(v, 3) for v in cpu_ms]}


def bench_clip(frames: np.ndarray, model: Autoencoder, *, options: CoderOptions | None = None,
               baseline: str = "auto", warmup: int = 2, chunk: int = 1, fps: Fraction | int = 25,
               verify: bool = True, min_psnr: float = MIN_PSNR, crf: int = 18, x264_preset: str = "medium",
               clip: str = "frames") -> dict:
    """Time our streaming encode/decode of ``frames`` against the baseline (module docstring).

    frames: (T, H, W, 3) uint8 RGB in host memory, T >= 1. Returns the report dict (see
    ``bench/README.md``); per-frame latencies in ms are under ``ours/baseline.encode.latency_ms``.
    Raises ValueError "outputs disagree: X dB" when the decoded frames of the two sides differ by
    more than ``min_psnr`` allows (unless ``verify`` is False).
    """
    if not isinstance(model, Autoencoder):  # a Wan video VAE codes groups of frames through its causal caches
        raise ValueError(f"codec bench times image VAEs, and the model {model.name} is a video VAE ({model.family} "
                         "family): time it with codec encode and codec decode, which report per-frame latency")
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected frames (T, H, W, 3) uint8, got {getattr(frames, 'shape', type(frames))}")
    if len(frames) == 0 or warmup < 0 or chunk < 1:
        raise ValueError(f"expected frames >= 1, warmup >= 0, chunk >= 1; got {len(frames)}, {warmup}, {chunk}")
    baseline = resolve_baseline(baseline, model)
    if baseline == "diffusers":
        _diffusers()  # fail before any work when it is missing
    device = model.device
    t, h, w = frames.shape[:3]
    warm_frames = frames[np.arange(warmup) % t]

    ours = _Side(OursCoder(model, h, w, options))
    ours.peak_host_mb, ours.peak_device_mb = _warm(OursCoder(model, h, w, options), warm_frames, device)
    base_coder, base_desc = make_baseline(baseline, model, h, w)
    sides = [ours]
    if base_coder is not None:
        base = _Side(base_coder)
        base.peak_host_mb, base.peak_device_mb = _warm(base_coder, warm_frames, device)
        sides.append(base)

    f = model.downscale
    plan = ours.coder.enc.plan
    with tempfile.TemporaryDirectory(prefix="codec-bench-") as tmp:
        meta = {"model_id": model.name, "family": model.family, "scaling_factor": model.scaling_factor,
                "shift_factor": model.shift_factor, "fps": Fraction(fps), "time_base": 1 / Fraction(fps),
                "source_width": w, "source_height": h, "pad_bottom": round_up(h, f) - h,
                "pad_right": round_up(w, f) - w}
        shape = (model.latent_channels, round_up(h, f) // f, round_up(w, f) // f)
        _run_encode(sides, frames, chunk, device, tmp, shape, meta)
        _run_decode(sides, chunk, device, tmp, w, h, fps, crf, x264_preset)

    outputs = [np.concatenate(s.frames) for s in sides]
    report = {
        "device": device_name(device), "versions": versions(), "clip": clip,
        "model": {"name": model.name, "family": model.family, "source": model.source,
                  "dtype": str(model.dtype).removeprefix("torch.")},
        "size": [w, h], "frames": t, "warmup": warmup, "chunk": chunk,
        "options": {"tile": plan.tile, "tile_hw": plan.tile_hw, "overlap": plan.overlap, "batch": plan.batch,
                    "tile_waste": ours.coder.enc.layout.waste,
                    "norm": "global" if ours.coder.enc.global_norm else "tile",
                    "cache": (options or CoderOptions()).cache},
        "timed": TIMED, "memory": MEMORY, "baseline_impl": base_desc,
        "ours": _summary(ours), "baseline": _summary(sides[1]) if len(sides) > 1 else None,
        "ratio": None, "agreement_psnr_db": None, "agreement_mean_psnr_db": None, "latent_rel_err": None,
        "verified": False,
    }
    enc_hits, dec_hits = ours.coder.enc.stats, ours.coder.dec.stats
    report["ours"].update(cache_hit_rate=(enc_hits.hits + dec_hits.hits) / max(1, enc_hits.tiles + dec_hits.tiles),
                          cache_hit_rate_encode=enc_hits.hit_rate, cache_hit_rate_decode=dec_hits.hit_rate)
    if len(sides) > 1:
        agree = np.atleast_1d(psnr(outputs[0], outputs[1]))
        a, b = (torch.cat(s.latents).double() for s in sides)
        report.update(agreement_psnr_db=float(agree.min()), agreement_mean_psnr_db=float(agree.mean()),
                      latent_rel_err=float((a - b).norm() / b.norm().clamp_min(1e-30)))
        if verify and agree.min() < min_psnr:
            raise ValueError(f"outputs disagree: {agree.min():.2f} dB between our decoded frames and the "
                             f"baseline's (at least {min_psnr:g} dB expected; --no-verify to time anyway)")
        report["verified"] = verify
        o, bl = report["ours"], report["baseline"]
        report["ratio"] = {f"{k}_p50": o[k]["p50_ms"] / bl[k]["p50_ms"] for k in ("encode", "decode")}
        for k in ("encode", "decode"):
            mine, theirs = np.array(o[k]["latency_ms"]), np.array(bl[k]["latency_ms"])
            report["ratio"].update({f"{k}_p95": o[k]["p95_ms"] / bl[k]["p95_ms"],
                                    f"{k}_cpu_p50": o[k]["cpu_p50_ms"] / bl[k]["cpu_p50_ms"],
                                    f"{k}_min": float(mine.min() / theirs.min()),
                                    f"{k}_paired_median": float(np.median(mine / theirs))})
    return report


TIMED = ("encode: uint8 frames in host memory -> latents on the host written to a latent file (fp16); "
         "decode: fp16 latents in host memory -> uint8 frames written to a libx264 VideoWriter; "
         "per call of `chunk` frames (baseline: 1), sides alternating call by call, warm-up excluded, "
         "clock read after CUDA synchronize; cpu_ms = process CPU time of the call (all threads)")
MEMORY = ("peaks over the warm-up calls, each side alone (ours first, before the baseline model exists): "
          "peak_device_mb = torch.cuda.max_memory_allocated (CUDA only); peak_host_mb = the process's "
          "ru_maxrss so far, so the baseline's is max(ours, baseline); null without warm-up")


def _run_encode(sides, frames, chunk, device, tmp, shape, meta) -> None:
    writers = [LatentWriter(Path(tmp, f"{i}.safetensors"), shape, torch.float16, meta) for i in range(len(sides))]

    def step(i: int, a: int, b: int) -> None:
        z = sides[i].coder.encode(frames[a:b])
        writers[i].write(z, range(a, b))
        sides[i].latents.append(z)

    try:
        _alternate(sides, chunk, len(frames), device, step, "encode")
    finally:
        for writer in writers:
            writer.close()


def _run_decode(sides, chunk, device, tmp, w, h, fps, crf, x264_preset) -> None:
    writers = [VideoWriter(Path(tmp, f"{i}.mp4"), w, h, fps, crf=crf, preset=x264_preset) for i in range(len(sides))]
    latents = [torch.cat(s.latents) for s in sides]

    def step(i: int, a: int, b: int) -> None:
        out = sides[i].coder.decode(latents[i][a:b])
        writers[i].write(out)
        sides[i].frames.append(out)

    try:
        _alternate(sides, chunk, len(latents[0]), device, step, "decode")
    finally:
        for writer in writers:
            writer.close()


def _alternate(sides, chunk: int, n: int, device, step, stage: str) -> None:
    """``step(i, a, b)`` over frames [0, n): side 0 in calls of ``chunk`` frames, the baseline
    in calls of 1, taking turns (a side waits while it is ahead of the other). Per frame, the
    call's wall time (ms, clock read after a CUDA synchronize) and the process CPU time it took
    (ms, all threads of this process) go to ``side.ms[stage]`` and ``side.cpu_ms[stage]``."""
    sizes = [chunk] + [1] * (len(sides) - 1)
    pos = [0] * len(sides)
    while min(pos) < n:
        for i, size in enumerate(sizes):
            if pos[i] >= n or pos[i] > min(pos):
                continue
            a, b = pos[i], min(n, pos[i] + size)
            _sync(device)
            t0, c0 = now(), time.process_time()
            step(i, a, b)
            _sync(device)
            took, cpu = now() - t0, time.process_time() - c0
            sides[i].ms[stage].extend([took * 1000] * (b - a))
            sides[i].cpu_ms[stage].extend([cpu * 1000] * (b - a))
            sides[i].seconds[stage] += took
            pos[i] = b


def _summary(s: _Side) -> dict:
    return {**{k: _stats(s.ms[k], s.cpu_ms[k], s.seconds[k]) for k in ("encode", "decode")},
            "peak_device_mb": s.peak_device_mb, "peak_host_mb": s.peak_host_mb, "cache_hit_rate": None}


def device_name(device: torch.device) -> str:
    """'cuda:0 NVIDIA H100 80GB HBM3' or 'cpu <model name> (N threads)'."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu {cpu} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    import av

    try:
        import diffusers
        dv = diffusers.__version__
    except ImportError:
        dv = None
    return {"codec": __version__, "git": _git_commit(), "torch": torch.__version__, "diffusers": dv,
            "av": av.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def _git_commit() -> str | None:
    """The checkout's commit, '+dirty' with uncommitted changes; None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


# ---- output ---------------------------------------------------------------------------------

def format_table(r: dict) -> str:
    """A short plain-text table of a bench_clip report."""
    w, h = r["size"]
    lines = [f"{r['clip']} {w}x{h}, {r['frames']} frames (+{r['warmup']} warm-up), {r['model']['name']} "
             f"{r['model']['dtype']} on {r['device']}",
             f"{'':<18}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'fps':>8}"]
    for stage in ("encode", "decode"):
        for side in ("ours", "baseline"):
            if r[side] is None:
                continue
            s = r[side][stage]
            lines.append(f"{stage + ' ' + side:<18}{s['p50_ms']:>10.1f}{s['p95_ms']:>10.1f}{s['p99_ms']:>10.1f}"
                         f"{s['fps']:>8.2f}")
    if r["ratio"]:
        q = r["ratio"]
        lines.append(f"ratio ours/baseline p50: encode {q['encode_p50']:.3f}, decode {q['decode_p50']:.3f} "
                     f"(min: {q['encode_min']:.3f}, {q['decode_min']:.3f}; paired median: "
                     f"{q['encode_paired_median']:.3f}, {q['decode_paired_median']:.3f}; CPU time p50: "
                     f"{q['encode_cpu_p50']:.3f}, {q['decode_cpu_p50']:.3f})")
        lines.append(f"agreement: least PSNR {r['agreement_psnr_db']:.2f} dB, latent rel. error "
                     f"{r['latent_rel_err']:.2e}")
    o = r["ours"]
    mem = f"peak host {o['peak_host_mb'] or 0:.0f} MiB" + (f", device {o['peak_device_mb']:.0f} MiB"
                                                      if o["peak_device_mb"] is not None else "")
    lines.append(f"ours: cache hits {100 * o['cache_hit_rate']:.1f}%, {mem}")
    return "\n".join(lines)


def plot_latency(path: str | Path, r: dict, title: str | None = None) -> None:
    """PNG: per-frame latency over the clip, ours and the baseline, encode above decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for ax, stage in zip(axes, ("encode", "decode")):
        for side, style in (("ours", "-"), ("baseline", "--")):
            if r[side] is not None:
                ax.plot(r[side][stage]["latency_ms"], style, marker=".", lw=1, label=side)
        ax.set_ylabel(f"{stage} ms/frame")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    axes[0].set_title(title or f"{r['clip']} {r['size'][0]}x{r['size'][1]}, {r['model']['name']}, {r['device']}")
    axes[1].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_frames(path: str | Path, count: int) -> tuple[np.ndarray, Fraction]:
    """The first ``count`` frames of a video, (T, H, W, 3) uint8, and its fps."""
    reader = FrameReader(path, end=count, batch=8)
    with reader:
        frames = [b.frames for b in reader]
    if not frames:
        raise ValueError(f"{path}: no frames")
    return np.concatenate(frames), Fraction(reader.info.fps)


# ---- command line ---------------------------------------------------------------------------

def add_parser(subparsers):
    from .cli_args import add_coder_args, add_model_args, add_x264_preset_arg, int_at_least

    p = subparsers.add_parser("bench", help="per-frame latency against the usual frame loop, same frames and weights")
    p.add_argument("input", help="a video; its first --frames frames are decoded into memory first")
    add_model_args(p)
    p.add_argument("--frames", type=int_at_least(1), default=16, help="timed frames (default 16)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed warm-up frames run first (default 2)")
    p.add_argument("--chunk", type=int_at_least(1), default=1, help="frames per call on our side (default 1)")
    p.add_argument("--baseline", default="auto", choices=BASELINES,
                   help="compare against: diffusers (same weights), torch (our model, plain frame loop), none; "
                        "auto (default): diffusers where it has the model, else torch")
    p.add_argument("--no-verify", action="store_true", help="report times even when outputs disagree (default: off)")
    p.add_argument("--min-psnr", type=float, default=MIN_PSNR, help="agreement needed, dB (default %(default)s)")
    add_x264_preset_arg(p)
    p.add_argument("--json", default=None, help="write the report here (default: none)")
    p.add_argument("--plot", default=None, help="write a PNG of per-frame latency here (default: none)")
    add_coder_args(p)
    return p


def run(args) -> int:
    """``codec bench`` with parsed arguments (the command checked the output paths already)."""
    from .cli_args import load, setup

    frames, fps = read_frames(args.input, args.frames)
    device, dtype, options = setup(args)
    model = load(args, device, dtype)
    r = bench_clip(frames, model, options=options, baseline=args.baseline, warmup=args.warmup, chunk=args.chunk,
                   fps=fps, verify=not args.no_verify, min_psnr=args.min_psnr, x264_preset=args.x264_preset,
                   clip=Path(args.input).name)
    print(format_table(r))
    if args.json:
        from .pipeline import write_json

        write_json(args.json, r)
    if args.plot:
        plot_latency(args.plot, r)
    return 0
