"""Time whole-model encode and decode per frame on CUDA: ours against diffusers, eager and compiled.

    python bench/gpu_models.py [--reps 20] [--budget 420] [--out bench/results | --stem PATH]
                               [--taef2-weights DIR]
    python bench/gpu_models.py --smoke      # CPU, tiny shapes, fp32, no graphs: checks the code paths

Cases (batch 1, fp16): SD 1.x widths (``build("sd15")``, random weights, GroupNorm affines
randomized) at 512x512 and 1920x1080; the tiny family at 1920x1080 twice: ``taesd``-shaped with 32
latent channels (what diffusers' ``AutoencoderTiny`` can hold: TAEF2's GroupNorm ``pool`` branches
do not exist there, so this is the tiny baseline) and ``taef2`` itself (ours only; its real weights
from ``--taef2-weights``, default ``../shared/data/weights``, which bench/gpu_all.sh points at the
carried ``bench/gpu_data/weights``; random weights when absent, recorded in the notes).

Variants per case and direction:
- ``ours``: ``accelerate(model, cuda_graphs=True)`` (channels_last, cuDNN benchmark, one CUDA
  graph per shape), Triton kernels; timed through the public ``encode``/``decode``.
- ``ours-torch-kernels``: the same inside ``kernels.force_reference()`` (A/B of the kernels;
  its graphs are captured separately).
- ``diffusers-eager``: ``AutoencoderKL``/``AutoencoderTiny`` fp16 with the same weights, NCHW.
- ``diffusers-compiled``: the same, channels_last, encoder and decoder through ``torch.compile``
  (``--compile-mode``, default "default"), in a child process killed after ``--compile-cap``
  seconds (recorded as skipped) so a slow compile cannot eat the run.

Before timing, outputs are checked against the fp32 diffusers model (TF32 off), by
``rel = ||out - truth|| / ||truth||``: ours must satisfy ``rel <= 2 * rel(diffusers fp16) + 1e-3``
(without a diffusers twin, the fp32 model with torch kernels is the truth and ``rel <= 1e-2``);
compiled diffusers must be within 1e-2 of eager diffusers fp16. A failed check is recorded and the
variant is not timed; the exit status is then 1.

Times: median of CUDA-event timings after warm-up. Peak memory: ``torch.cuda.max_memory_allocated``
after a reset, over the variant's check, warm-up and timed calls (graph capture included; weights
included). cuDNN benchmark mode is on for every variant (``accelerate`` sets it process-wide).
Targets (issue 15, H200, fp16, per frame, batch 1): SD 1.x widths at 1080p encode <= 28 ms and
decode <= 50 ms; the tiny model at 1080p <= 4 ms each way (taef2-1080p, and taesd32-1080p, the
shape diffusers can hold); each marked met or MISSED in the table (only on CUDA).
Writes ``bench/results/gpu-models-<device>-<date>.json`` and ``.md`` (or ``--stem``.json/.md;
rewritten after every case, so a run cut short keeps what it measured) and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from timing import no_tf32, sync, time_ms  # noqa: E402  (bench/timing.py, beside this script)

import kernels  # noqa: E402
from codec.bench import has_diffusers_twin  # noqa: E402
from codec.models import build, load_model  # noqa: E402
from codec.models.accel import accelerate, accelerated, deaccelerate  # noqa: E402

try:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its fp16 cast advice on every .to()
except Exception as e:  # noqa: BLE001 - any import failure means "no baseline"
    diffusers, DIFFUSERS_ERROR = None, f"{type(e).__name__}: {e}"
else:
    DIFFUSERS_ERROR = None

TAEF2_WEIGHTS = ROOT.parent / "shared" / "data" / "weights"
SEED = 1234
ABS_SLACK = 1e-3  # the bound on ours: rel <= 2 * rel(diffusers fp16) + ABS_SLACK
NO_TWIN_BOUND = 1e-2
COMPILED_BOUND = 1e-2
TARGETS_MS = {  # (case, op): issue 15's per-frame target for ours, ms on an H200
    ("sd15-1080p", "encode"): 28.0,
    ("sd15-1080p", "decode"): 50.0,
    ("taef2-1080p", "encode"): 4.0,
    ("taef2-1080p", "decode"): 4.0,
    ("taesd32-1080p", "encode"): 4.0,
    ("taesd32-1080p", "decode"): 4.0,
}


@dataclass
class Case:
    name: str
    preset: str
    height: int
    width: int
    overrides: dict = field(default_factory=dict)
    reps: int = 20
    compile_priority: int | None = None  # order of the compiled-diffusers children (None: skip)


def gpu_cases() -> list[Case]:
    return [
        Case("sd15-512", "sd15", 512, 512, reps=30, compile_priority=2),
        Case("sd15-1080p", "sd15", 1080, 1920, compile_priority=0),
        Case("taesd32-1080p", "taesd", 1080, 1920, dict(latent_channels=32), reps=30, compile_priority=1),
        Case("taef2-1080p", "taef2", 1080, 1920, reps=30),
        Case("default-1080p", "default", 1080, 1920, reps=30),  # the built-in model: ours only
    ]


def smoke_cases() -> list[Case]:
    kl = dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1)
    return [
        Case("sd15-512", "sd15", 32, 48, kl, reps=3, compile_priority=0),
        Case("taesd32-1080p", "taesd", 32, 48, dict(latent_channels=32, width=8), reps=3, compile_priority=1),
        Case("taef2-1080p", "taef2", 32, 48, dict(width=8), reps=3),
        Case("default-1080p", "default", 32, 48, reps=3),
    ]


# ---- models -------------------------------------------------------------------------------------

def randomize_norms(module: torch.nn.Module, seed: int) -> None:
    """Default init leaves GroupNorm at identity; random affines exercise the kernels' affine path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


def make_ours(case: Case, weights: pathlib.Path) -> tuple[torch.nn.Module, str]:
    """fp32 CPU model for a case and where its weights came from (deterministic: children rebuild it).
    ``weights``: the folder that may hold taef2_encoder.pth / taef2_decoder.pth."""
    if case.preset == "default":
        return load_model("default"), "the built-in default model (codec/weights/default.safetensors)"
    if case.preset == "taef2" and not case.overrides and weights.is_dir() and any(weights.glob("taef2_*")):
        return load_model(weights), f"real taef2 weights from {weights}"
    torch.manual_seed(SEED)
    model = build(case.preset, **case.overrides)
    randomize_norms(model, SEED)
    why = f" ({weights} has no taef2 weights)" if case.preset == "taef2" and not case.overrides else ""
    return model, f"random weights, GroupNorm affines randomized{why}"


def make_reference(model: torch.nn.Module) -> torch.nn.Module | None:
    """diffusers model holding ``model``'s weights (fp32, CPU), or None (no diffusers, or no such model)."""
    if diffusers is None:
        return None
    cfg = model.config
    if cfg.family == "kl":
        n = len(cfg.block_out_channels)
        ref = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
            block_out_channels=tuple(cfg.block_out_channels), down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups, use_quant_conv=cfg.use_quant_conv,
            use_post_quant_conv=cfg.use_post_quant_conv, mid_block_add_attention=cfg.mid_block_add_attention,
            scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor)
        ref.load_state_dict(model.state_dict(), strict=True)
        return ref.eval()
    if cfg.midblock_groupnorm or not has_diffusers_twin(model):  # TAEF2's pool branches, pixel shuffle
        return None
    ref = diffusers.AutoencoderTiny(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        encoder_block_out_channels=(cfg.width,) * 4, decoder_block_out_channels=(cfg.width,) * 4)
    state = {}
    for key, value in model.state_dict().items():
        part, index, rest = key.split(".", 2)
        index = int(index) - (part == "decoder")  # our decoder's layer 0 is the Clamp
        state[f"{part}.layers.{index}.{rest}"] = value
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def reference_calls(ref, model):
    """encode/decode of the diffusers model in ours' conventions (scaled latents)."""
    sf, shift = model.scaling_factor, model.shift_factor
    if model.family == "kl":
        enc = lambda x: (ref.encode(x).latent_dist.mode() - shift) * sf
    else:
        enc = lambda x: (ref.encode(x).latents - shift) * sf
    dec = lambda z: ref.decode(z / sf + shift).sample
    return {"encode": enc, "decode": dec}


def inputs(model, case: Case, dev, dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(SEED + 1)
    f = model.downscale
    x = torch.rand(1, 3, case.height, case.width, generator=g) * 2 - 1
    z = torch.randn(1, model.latent_channels, case.height // f, case.width // f, generator=g)
    return {"encode": x.to(dev, dtype), "decode": z.to(dev, dtype)}


# ---- measuring ----------------------------------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def peak_memory(dev, record: dict):
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        if dev.type == "cuda":
            sync(dev)
            record["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30


def measure(rows: list, case: Case, op: str, variant: str, fn, truth, bound, dev, reps: int, **extra) -> dict:
    """Check ``fn()`` against ``truth`` within ``bound``, then time it; append and return the row."""
    row = dict(case=case.name, op=op, variant=variant, **extra)
    rows.append(row)
    try:
        with peak_memory(dev, row):
            out = fn()
            sync(dev)
            row["rel_err"] = rel_err(out, truth)
            row["bound"] = bound
            del out
            if not row["rel_err"] <= bound:
                row["status"] = "FAIL check"
                print(f"  {case.name} {op} {variant}: rel err {row['rel_err']:.3g} > bound {bound:.3g}; not timed")
                return row
            row["ms"], times = time_ms(fn, dev, reps)
            row["ms_min"], row["reps"] = min(times), len(times)
        row["status"] = "ok"
        peak = f"  peak {row['peak_gib']:.2f} GiB" if "peak_gib" in row else ""
        print(f"  {case.name:<14} {op:<6} {variant:<20} {row['ms']:9.3f} ms  rel {row['rel_err']:.2e}{peak}",
              flush=True)
    except Exception as e:  # noqa: BLE001 - one broken variant must not end the run
        row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        print(f"  {case.name} {op} {variant}: {row['status']}")
    return row


# ---- one case, in this process ------------------------------------------------------------------

def run_case(case: Case, args, dev, dtype, rows: list, notes: list) -> None:
    print(f"\n== {case.name}: {case.preset} {case.width}x{case.height} {str(dtype).removeprefix('torch.')}", flush=True)
    model, source = make_ours(case, args.taef2_weights)
    notes.append(f"{case.name}: {source}")
    ref = make_reference(model)
    if ref is None:
        why = DIFFUSERS_ERROR or "no diffusers counterpart (TAEF2 pool branches, or the pixel-shuffle layout)"
        notes.append(f"{case.name}: no diffusers baseline: {why}")
    ins = inputs(model, case, dev, dtype)
    # Truth: fp32, TF32 off; diffusers when it can hold the model, else ours with torch kernels.
    truth = {}
    with torch.no_grad(), no_tf32(), kernels.force_reference():
        base = ref if ref is not None else copy.deepcopy(model)
        base.to(dev)
        calls = reference_calls(base, model) if ref is not None else {"encode": base.encode, "decode": base.decode}
        for op in ("encode", "decode"):
            truth[op] = calls[op](ins[op].float())
            sync(dev)
        if ref is None:
            del base
    # Ours: half precision, accelerated.
    model = model.to(dev, dtype)
    accelerate(model, cuda_graphs=not args.smoke)
    graphs = bool(accelerated(model)) and accelerated(model)["_encode_raw"].runner is not None
    ours = {"encode": lambda: model.encode(ins["encode"]), "decode": lambda: model.decode(ins["decode"])}
    ref_calls = None
    twin_err = {}
    if ref is not None:
        ref.to(dev, dtype)
        ref_calls = reference_calls(ref, model)
        with torch.no_grad():
            for op in ("encode", "decode"):
                twin_err[op] = rel_err(ref_calls[op](ins[op]), truth[op])
    for op in ("encode", "decode"):
        bound = 2 * twin_err[op] + ABS_SLACK if op in twin_err else NO_TWIN_BOUND
        with torch.no_grad():
            row = measure(rows, case, op, "ours", ours[op], truth[op], bound, dev, case.reps,
                          cuda_graphs=graphs, kernels="triton" if dev.type == "cuda" else "torch")
            if graphs and row["status"].startswith("error"):  # capture broke: time it without graphs
                notes.append(f"{case.name} {op}: CUDA graphs failed ({row['status']}); timed without graphs")
                accelerate(model, cuda_graphs=False)
                measure(rows, case, op, "ours-no-graphs", ours[op], truth[op], bound, dev, case.reps)
                accelerate(model, cuda_graphs=True)
            with kernels.force_reference():
                measure(rows, case, op, "ours-torch-kernels", ours[op], truth[op], bound, dev, case.reps,
                        cuda_graphs=graphs, kernels="torch")
            if ref_calls is not None:
                x = ins[op]
                measure(rows, case, op, "diffusers-eager", lambda f=ref_calls[op], x=x: f(x), truth[op],
                        float("inf"), dev, case.reps)
    deaccelerate(model)  # drops the graphs; the caller collects the rest


# ---- compiled diffusers, in a child process -----------------------------------------------------

def child_main(args) -> int:
    """Compile the diffusers twin of one case, check it against eager fp16, time it; JSON rows out."""
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    case = {c.name: c for c in (smoke_cases() if args.smoke else gpu_cases())}[args.child]
    out_path = pathlib.Path(args.child_out)
    model, _ = make_ours(case, args.taef2_weights)
    ref = make_reference(model)
    if ref is None:
        raise SystemExit(f"{case.name}: no diffusers twin ({DIFFUSERS_ERROR or 'TAEF2 pool branches'})")
    torch.backends.cudnn.benchmark = True
    ref.to(dev, dtype)
    ins = inputs(model, case, dev, dtype)
    calls = reference_calls(ref, model)
    with torch.no_grad():
        eager = {op: calls[op](ins[op]) for op in ("encode", "decode")}
    ref.to(memory_format=torch.channels_last)
    kw = dict(backend=args.compile_backend, dynamic=False)
    if args.compile_backend == "inductor":
        kw["mode"] = args.compile_mode
    ref.encoder.compile(**kw)
    ref.decoder.compile(**kw)
    rows = []
    for op in ("encode", "decode"):
        row = dict(case=case.name, op=op, variant="diffusers-compiled", compile=kw)
        rows.append(row)
        with torch.no_grad(), peak_memory(dev, row):
            t0 = time.perf_counter()
            out = calls[op](ins[op])
            sync(dev)
            row["compile_s"] = time.perf_counter() - t0
            row["rel_err"], row["bound"] = rel_err(out, eager[op]), COMPILED_BOUND
            row["rel_err_vs"] = "diffusers-eager fp16"
            if row["rel_err"] <= COMPILED_BOUND:
                row["ms"], times = time_ms(lambda f=calls[op], x=ins[op]: f(x), dev, case.reps)
                row["ms_min"], row["reps"], row["status"] = min(times), len(times), "ok"
            else:
                row["status"] = "FAIL check"
        out_path.write_text(json.dumps(rows))  # after each op: a kill keeps what was done
        print(f"  child {case.name} {op}: compile {row['compile_s']:.1f} s, {row.get('ms', float('nan')):.3f} ms, "
              f"rel {row['rel_err']:.2e}", flush=True)
    return 0


def run_child(case: Case, args, cap: float, rows: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "rows.json"
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", case.name, "--child-out", str(out),
               "--compile-mode", args.compile_mode, "--compile-backend", args.compile_backend,
               "--taef2-weights", str(args.taef2_weights)]
        if args.smoke:
            cmd.append("--smoke")
        print(f"\n== {case.name}: compiled diffusers in a child, cap {cap:.0f} s", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, start_new_session=True)
        status = None

        def kill_child(signum, frame):  # the parent itself stopped (e.g. by timeout): take the child along
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, kill_child)
        try:
            proc.wait(timeout=cap)
            if proc.returncode != 0:
                status = f"error: child exited {proc.returncode}"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child and its compile workers
            proc.wait()
            status = f"skipped: over the {cap:.0f} s compile cap"
        finally:
            signal.signal(signal.SIGTERM, previous)
        got = json.loads(out.read_text()) if out.exists() else []
        for row in got:
            row["child_wall_s"] = time.perf_counter() - t0
        rows.extend(got)
        for op in ("encode", "decode"):
            if not any(r["op"] == op for r in got):
                rows.append(dict(case=case.name, op=op, variant="diffusers-compiled",
                                 status=status or "error: no result", cap_s=cap))


# ---- report -------------------------------------------------------------------------------------

def summarize(rows: list, targets: bool = True) -> list[dict]:
    """Per case and op: each variant's ms, the ratios, and the targets (not in smoke runs)."""
    out = []
    keys = list(dict.fromkeys((r["case"], r["op"]) for r in rows))
    for case, op in keys:
        ms = {r["variant"]: r.get("ms") for r in rows if (r["case"], r["op"]) == (case, op) and r.get("ms")}
        peak = {r["variant"]: r.get("peak_gib") for r in rows if (r["case"], r["op"]) == (case, op)}
        s = dict(case=case, op=op, ms=ms, peak_gib=peak)
        o = ms.get("ours")
        for base, key in (("diffusers-eager", "ours/eager"), ("diffusers-compiled", "ours/compiled"),
                          ("ours-torch-kernels", "ours/torch-kernels")):
            s[key] = o / ms[base] if o and ms.get(base) else None
        if targets and (case, op) in TARGETS_MS:
            limit = TARGETS_MS[(case, op)]
            verdict = "not measured" if o is None else "met" if o <= limit else "MISSED"
            s["target"] = f"<= {limit:g} ms: {verdict}"
        out.append(s)
    return out


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def table(summary: list[dict]) -> list[str]:
    head = ["case", "op", "ours ms", "torch-kern ms", "diff eager ms", "diff compiled ms", "ours/eager",
            "ours/compiled", "ours/torch-kern", "ours GiB", "eager GiB", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        m, p = s["ms"], s["peak_gib"]
        cells = [s["case"], s["op"], fmt(m.get("ours")), fmt(m.get("ours-torch-kernels")),
                 fmt(m.get("diffusers-eager")), fmt(m.get("diffusers-compiled")), fmt(s["ours/eager"], ".2f"),
                 fmt(s["ours/compiled"], ".2f"), fmt(s["ours/torch-kernels"], ".2f"), fmt(p.get("ours"), ".2f"),
                 fmt(p.get("diffusers-eager"), ".2f"), s.get("target", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(path_stem: pathlib.Path, meta: dict, rows: list, notes: list) -> None:
    summary = summarize(rows, targets=not meta["smoke"])
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    path_stem.with_suffix(".json").write_text(
        json.dumps(dict(meta=meta, notes=notes, summary=summary, results=rows), indent=2, default=str))
    bad = [r for r in rows if r.get("status") not in ("ok",) and not str(r.get("status", "")).startswith("skipped")]
    md = [f"# Model encode/decode per frame: {meta['device']}", "",
          f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, diffusers {meta['diffusers']}, "
          f"CUDA {meta['cuda']}, cuDNN {meta['cudnn']}; {meta['dtype']}, batch 1; median of "
          f"{'perf_counter (smoke run: CPU, not a measurement)' if meta['smoke'] else 'CUDA-event'} timings "
          f"after warm-up; peak = max_memory_allocated (weights included).", "",
          *table(summary), "", "Notes:", *[f"- {n}" for n in notes],
          *(["", "Problems:", *[f"- {r['case']} {r['op']} {r['variant']}: {r.get('status')}" for r in bad]]
            if bad else [])]
    path_stem.with_suffix(".md").write_text("\n".join(md) + "\n")


def versions() -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    return dict(torch=torch.__version__, triton=tv, diffusers=getattr(diffusers, "__version__", None),
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                python=platform.python_version())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=None, help="timed calls per variant (default: per case)")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds for the whole run; compiled children are capped to what is left")
    parser.add_argument("--compile-cap", type=float, default=180.0, help="seconds per compiled-diffusers child")
    parser.add_argument("--compile-mode", default="default",
                        help='torch.compile mode, e.g. "max-autotune-no-cudagraphs"')
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-diffusers children")
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="folder for the JSON and MD (default bench/results; --smoke: a temporary folder)")
    parser.add_argument("--stem", type=pathlib.Path, default=None,
                        help="write STEM.json and STEM.md instead (overrides --out)")
    parser.add_argument("--taef2-weights", type=pathlib.Path, default=TAEF2_WEIGHTS,
                        help="folder with taef2_encoder.pth/taef2_decoder.pth (default %(default)s)")
    parser.add_argument("--compile-min", type=float, default=45.0,
                        help="seconds of the budget a compiled-diffusers child needs to be started")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32, no graphs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args)
    t_start = time.perf_counter()
    if args.smoke:
        dev, dtype = torch.device("cpu"), torch.float32
        if args.compile_backend == "inductor":
            args.compile_backend = "eager"  # the child's code path, without a CPU inductor compile
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_models: no CUDA device present; this benchmark only runs on a GPU "
                             "(use --smoke for a CPU check of the code paths)")
        dev, dtype = torch.device("cuda"), torch.float16
    cases = smoke_cases() if args.smoke else gpu_cases()
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    for c in cases:
        c.reps = args.reps or c.reps
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    meta = dict(device=device_name, **versions(), dtype=str(dtype).removeprefix("torch."), batch=1,
                smoke=args.smoke, compile_mode=args.compile_mode, compile_backend=args.compile_backend,
                budget_s=args.budget, compile_cap_s=args.compile_cap, cudnn_benchmark=True,
                check_bound=f"ours rel <= 2 * rel(diffusers fp16) + {ABS_SLACK} vs diffusers fp32 (TF32 off); "
                            f"no twin: <= {NO_TWIN_BOUND}; compiled vs eager fp16 <= {COMPILED_BOUND}",
                date=datetime.datetime.now().isoformat(timespec="seconds"))
    out_dir = args.out or (pathlib.Path(tempfile.mkdtemp(prefix="gpu-models-smoke-")) if args.smoke
                           else ROOT / "bench" / "results")
    slug = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    suffix = "-smoke" if args.smoke else ""
    stem = args.stem or out_dir / f"gpu-models-{slug}-{datetime.date.today().isoformat()}{suffix}"
    rows: list[dict] = []
    notes: list[str] = []
    if diffusers is None:
        notes.append(f"diffusers not importable ({DIFFUSERS_ERROR}): no baselines")
    notes.append("diffusers-compiled: channels_last, encoder and decoder torch.compile'd, "
                 f"backend {args.compile_backend}, mode {args.compile_mode}, dynamic=False")
    notes.append("tiny baseline: diffusers AutoencoderTiny has no TAEF2 pool branches, so the tiny ratio is "
                 "taesd-shaped with 32 latent channels (taesd32-1080p); taef2-1080p is ours only")
    for case in cases:
        run_case(case, args, dev, dtype, rows, notes)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write_report(stem, meta, rows, notes)
    if not args.no_compile and diffusers is not None:
        for case in sorted((c for c in cases if c.compile_priority is not None), key=lambda c: c.compile_priority):
            left = args.budget - (time.perf_counter() - t_start) - 10
            if left < args.compile_min:
                status = f"skipped: {left:.0f} s of the budget left (a compile needs {args.compile_min:.0f} s or more)"
                print(f"\n== {case.name}: compiled diffusers {status}", flush=True)
                rows += [dict(case=case.name, op=op, variant="diffusers-compiled", status=status)
                         for op in ("encode", "decode")]
                continue
            run_child(case, args, min(args.compile_cap, left), rows)
            write_report(stem, meta, rows, notes)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["kernel_fallbacks"] = kernels.unusable_kernels()  # ours ran as torch references if any
    for name, why in meta["kernel_fallbacks"].items():
        notes.append(f"FALLBACK: kernels.{name} ran its torch reference here ({why})")
    write_report(stem, meta, rows, notes)
    print(f"\n{device_name}, {meta['dtype']}, batch 1 (ms per frame); wall {meta['wall_s']:.0f} s")
    print("\n".join(table(summarize(rows, targets=not args.smoke))))
    print(f"\nwrote {stem.with_suffix('.json')} and .md")
    failed = [r for r in rows if str(r.get("status", "")).startswith(("FAIL", "error"))]
    for r in failed:
        print(f"problem: {r['case']} {r['op']} {r['variant']}: {r['status']}")
    return 1 if failed or meta["kernel_fallbacks"] else 0


if __name__ == "__main__":
    sys.exit(main())
