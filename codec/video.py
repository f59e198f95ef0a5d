"""Video files in and out: probe, a streaming frame reader and a streaming H.264 writer (PyAV).

Frames are always ``(T, H, W, 3) uint8 RGB`` numpy arrays (full range, 0..255).

Colour: decoding converts YUV to RGB with the matrix and range the stream is tagged with
(BT.709, BT.601, full or limited range; untagged streams are treated like ffmpeg does:
BT.601, limited range), with accurate rounding and full horizontal chroma interpolation.
swscale's fast default path darkens frames by about 1-2 levels on average; this one matches
a float reference conversion to about 0.01 levels of mean. Writing converts RGB to
BT.709 limited-range YUV (centre-sited 4:2:0 chroma) and tags the stream accordingly, so a
write/read round trip has no colour shift (mean error per channel < 0.05 levels).
"""

from __future__ import annotations

import heapq
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

__all__ = ["VideoInfo", "FrameBatch", "FrameReader", "VideoWriter", "probe_video"]

_SWS_FLAGS = Interpolation.BILINEAR | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
_BT709 = 1  # AVCOL_SPC_BT709 / AVCOL_PRI_BT709 / AVCOL_TRC_BT709
_RANGE_LIMITED = 1  # AVCOL_RANGE_MPEG


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream.

    num_frames is exact when ``num_frames_exact``: an mp4/mov sample count that agrees with
    duration x fps (other containers' counts, e.g. an AVI header, can be stale). Otherwise it is
    an estimate, the smaller of the container's count and duration x fps, or None when neither
    is known. duration is in seconds. rotation: degrees counter-clockwise in (-180, 180] from
    the stream's display matrix (0 when it has none), the angle players turn the frames by.
    """

    path: str
    width: int
    height: int
    fps: Fraction
    time_base: Fraction
    num_frames: int | None
    num_frames_exact: bool
    duration: float | None
    codec: str
    pix_fmt: str
    rotation: int = 0


@dataclass
class FrameBatch:
    """frames: (T, H, W, 3) uint8 RGB; pts: (T,) int64 in ``VideoInfo.time_base`` units;
    indices: (T,) int64, position of each frame among all decoded frames (0-based)."""

    frames: np.ndarray
    pts: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)


def _open_input(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise ValueError(f"{path}: no such file (expected a video file)")
    if not path.is_file():
        raise ValueError(f"{path}: expected a video file, got a directory or special file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (expected a video file)")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise ValueError(f"{path}: not a readable video file ({e.strerror or e})") from e
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):
        container.close()
        raise ValueError(f"{path}: expected a video, got a still image ({fmt} format)")
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: expected a video stream, the file has none ({fmt} format)")
    return container


def _info(path: Path, container) -> VideoInfo:
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx is None:
        raise ValueError(f"{path}: FFmpeg has no decoder for the video stream's codec "
                         f"({container.format.name} format); convert it to a common codec first")
    try:
        ctx.open()
    except av.FFmpegError as e:
        raise ValueError(f"{path}: FFmpeg cannot open a decoder for the video stream's codec "
                         f"{ctx.name} ({e.strerror or e})") from None
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise ValueError(f"{path}: the video stream states no frame rate")
    fps = Fraction(rate)
    time_base = Fraction(stream.time_base) if stream.time_base else 1 / fps
    duration = None
    if stream.duration:
        duration = float(stream.duration * time_base)
    elif container.duration:
        duration = container.duration / av.time_base
    num_frames, exact = _stated_frames(container.format.name, stream.frames, duration, fps)
    return VideoInfo(
        path=str(path), width=ctx.width, height=ctx.height, fps=fps, time_base=time_base,
        num_frames=num_frames, num_frames_exact=exact, duration=duration,
        codec=ctx.codec.canonical_name, pix_fmt=ctx.pix_fmt or "unknown",
        rotation=_first_frame_rotation(container, stream),
    )


def _stated_frames(format_name: str, counted: int, duration: float | None,
                   fps: Fraction) -> tuple[int | None, bool]:
    """(frame count, exact) from what the container states. Only an mp4/mov sample table that
    agrees with duration x fps is taken as exact; any other count (an AVI header, a Matroska
    tag) may be stale, so the estimate is the smaller of the statements."""
    timed = round(duration * fps) if duration else 0
    mp4 = bool({"mov", "mp4"} & set(format_name.split(",")))
    if counted > 0 and mp4 and (not timed or abs(counted - timed) <= 1):
        return counted, True
    known = [n for n in (counted, timed) if n > 0]
    return (min(known) if known else None), False


def _first_frame_rotation(container, stream) -> int:
    """The display-matrix rotation FFmpeg attaches to decoded frames (0 when none). Damaged
    data is left for the reader to report, with its frame index."""
    try:
        frame = next(container.decode(stream), None)
    except av.FFmpegError:
        return 0
    degrees = int(frame.rotation) % 360 if frame is not None else 0
    return degrees - 360 if degrees > 180 else degrees


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's geometry, rate and length from its header; the first frame is decoded
    for its display rotation (and to show that FFmpeg can decode the stream at all)."""
    path = Path(path)
    with _open_input(path) as container:
        return _info(path, container)


_DONE = object()


class FrameReader:
    """Decode ``path`` in a background thread and yield :class:`FrameBatch` es.

    Frames with index ``start <= i < end`` and ``(i - start) % stride == 0`` are kept, where ``i``
    counts decoded frames from 0 (frames before ``start`` are decoded, not converted). At most
    ``queue_size`` batches of ``batch`` frames wait in memory. Errors in the decoder thread
    (corrupt or truncated data) are raised to the consumer as ValueError naming the file and
    frame index, after the good frames before it. Iterating again decodes again from the start.
    Use as a context manager, or call close(), to stop the decoder thread when stopping early.

    Nothing is lost silently: a frame the decoder flags as damaged raises; so does a clip that
    decodes to its end more than one frame and 2% short of what its container states (up to
    ``end``): FFmpeg reads a file cut on a packet boundary without an error. With
    ``allow_short`` such a clip warns instead, and ``missing_frames`` (of the last complete
    pass) says how many frames were missing. pts are strictly increasing presentation times
    (see :class:`_PresentationClock`).
    """

    def __init__(self, path: str | os.PathLike, start: int = 0, end: int | None = None,
                 stride: int = 1, batch: int = 8, queue_size: int = 4, threads: bool = True,
                 allow_short: bool = False):
        self.path = Path(path)
        for name, value, low in (("start", start, 0), ("stride", stride, 1), ("batch", batch, 1),
                                 ("queue_size", queue_size, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{self.path}: expected {name} to be an integer >= {low}, got {value!r}")
        if end is not None and (not isinstance(end, (int, np.integer)) or end <= start):
            raise ValueError(f"{self.path}: expected end to be None or an integer > start={start}, "
                             f"got {end!r}")
        self.start, self.end, self.stride = int(start), end, int(stride)
        self.batch, self.queue_size, self.threads = int(batch), int(queue_size), threads
        self.allow_short, self.missing_frames = bool(allow_short), 0
        self.info = probe_video(self.path)
        self._stops: list[tuple[threading.Event, threading.Thread]] = []

    def __iter__(self) -> Iterator[FrameBatch]:
        stop = threading.Event()
        q: queue.Queue = queue.Queue(maxsize=self.queue_size)
        worker = threading.Thread(target=self._run, args=(q, stop), daemon=True,
                                  name=f"FrameReader({self.path.name})")
        self._stops.append((stop, worker))
        worker.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Notice):
                    warnings.warn(str(item), stacklevel=2)
                    continue
                yield item
        finally:
            stop.set()
            worker.join()
            self._stops.remove((stop, worker))

    def close(self) -> None:
        """Stop every decoder thread of this reader and wait for them."""
        for stop, _ in list(self._stops):
            stop.set()
        for _, worker in list(self._stops):
            worker.join()

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, q: queue.Queue, stop: threading.Event) -> None:
        try:
            for item in self._decode(stop):
                if not self._put(q, item, stop):
                    return
            self._put(q, _DONE, stop)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(q, e, stop)

    def _decode(self, stop: threading.Event) -> Iterator[FrameBatch]:
        info, sws = self.info, VideoReformatter()
        frames, pts, indices, error, ended = [], [], [], None, False
        with _open_input(self.path) as container:
            stream = container.streams.video[0]
            if self.threads:
                stream.thread_type = "AUTO"
            rebuild = bool(stream.codec_context.has_b_frames) and _packets_lack_presentation_times(self.path)
            clock = _PresentationClock(info.fps, info.time_base, rebuild)
            decoded = _decode_packets(container, stream, clock)
            index = -1
            while not stop.is_set():
                try:
                    frame, t = next(decoded)
                except StopIteration:
                    ended = True
                    break
                except (av.FFmpegError, _CorruptPacket) as e:  # raised after the good frames
                    error = ValueError(f"{self.path}: corrupt or truncated video data at frame index "
                                       f"{index + 1} ({getattr(e, 'strerror', None) or e})")
                    break
                index += 1
                if self.end is not None and index >= self.end:
                    break
                if frame.is_corrupt:  # concealed decoding errors: the picture is not the source's
                    error = ValueError(f"{self.path}: corrupt video data at frame index {index} "
                                       f"(the decoder flagged the frame as damaged)")
                    break
                if index < self.start or (index - self.start) % self.stride:
                    continue
                rgb = sws.reformat(frame, width=info.width, height=info.height, format="rgb24",
                                   interpolation=_SWS_FLAGS)
                frames.append(rgb.to_ndarray())
                pts.append(t)
                indices.append(index)
                if len(frames) == self.batch:
                    yield _batch(frames, pts, indices)
                    frames, pts, indices = [], [], []
        if frames and not stop.is_set():
            yield _batch(frames, pts, indices)
        if error is not None:
            raise error
        if clock.repaired:
            yield _Notice(f"{self.path}: {clock.repaired} frames had time stamps out of order; each was "
                          f"placed one frame after the previous one")
        self.missing_frames = 0
        if ended:
            self.missing_frames, notice = self._missing(index + 1)
            if notice:
                yield notice

    def _missing(self, decoded: int) -> tuple[int, _Notice | None]:
        """Frames the container states (up to ``end``) that did not decode: an error unless
        ``allow_short``. Counts from duration x fps are off by a frame or so, hence the slack."""
        stated, exact = self.info.num_frames, self.info.num_frames_exact
        if stated is None:
            return 0, None
        expected = stated if self.end is None else min(self.end, stated)
        missing = expected - decoded
        if missing <= 1 + expected // 50:
            return 0, None
        asked = "" if expected == stated else f", up to end={self.end}"
        msg = (f"{self.path}: the video ends early (truncated or damaged): {decoded} frames decode, "
               f"expected {expected}{asked} (the container states {stated}"
               f"{'' if exact else ', estimated'})")
        if not self.allow_short:
            raise ValueError(f"{msg}; pass --allow-short (allow_short=True) to keep the frames that decode")
        return missing, _Notice(f"{msg}; kept the {decoded} frames that decode (allow_short)")


class _CorruptPacket(Exception):
    pass


class _Notice(str):
    """A warning from the decoder thread, issued in the consumer's thread."""


def _packets_lack_presentation_times(path: Path, limit: int = 64) -> bool:
    """True when none of the first ``limit`` packets has a pts that differs from its dts (pts
    copied from dts by a remux, or none at all): then the pts carry only decode order."""
    with _open_input(path) as container:  # a separate pass: demuxing without decoding is cheap
        seen = 0
        for packet in container.demux(container.streams.video[0]):
            if not packet.size:
                continue
            if packet.pts is not None and packet.pts != packet.dts:
                return False
            seen += 1
            if seen == limit:
                break
    return True


class _PresentationClock:
    """Strictly increasing presentation times, in the stream's time base, for the frames a
    decoder returns (in presentation order).

    ``rebuild``: the decoder reorders frames (B-frames) but the packets carry decode-order times
    only (pts copied from dts, or none), so a frame's own pts is another frame's time. Then the
    k-th frame out gets the k-th smallest packet time, which for one frame per packet is the
    source's timing (same frame count, rate and duration). Otherwise the frame's own pts is
    used. Either way a missing pts becomes one frame after the previous; a pts not after the
    previous is moved there too and counted in ``repaired``.
    """

    def __init__(self, fps: Fraction, time_base: Fraction, rebuild: bool):
        self.step = max(1, round(1 / (fps * time_base)))  # ticks per frame
        self.rebuild, self.repaired = rebuild, 0
        self._pending: list[int] = []  # packet times not yet given to a frame (a heap)
        self._last: int | None = None

    def packet(self, packet: av.Packet) -> None:
        time = packet.pts if packet.pts is not None else packet.dts
        if self.rebuild and packet.size and not packet.is_discard and time is not None:
            heapq.heappush(self._pending, time)

    def frame(self, frame: av.VideoFrame) -> int:
        time = frame.pts
        if self.rebuild:
            time = heapq.heappop(self._pending) if self._pending else None
        if time is None:
            time = 0 if self._last is None else self._last + self.step
        elif self._last is not None and time <= self._last:
            time = self._last + self.step
            self.repaired += 1
        self._last = time
        return time


def _decode_packets(container, stream, clock: _PresentationClock) -> Iterator[tuple[av.VideoFrame, int]]:
    """(frame, presentation time) in order. At a packet the demuxer flags corrupt (a short read:
    the file is truncated) the decoder is flushed, so every good frame comes out, then
    _CorruptPacket is raised. This matters with frame threading, whose decoder reports no such
    errors itself."""
    for packet in container.demux(stream):
        if packet.is_corrupt:
            for frame in stream.decode(None):
                yield frame, clock.frame(frame)
            raise _CorruptPacket("the demuxer read a short or damaged packet")
        clock.packet(packet)
        for frame in stream.decode(packet):
            yield frame, clock.frame(frame)


def _rotation(value, path: Path) -> int:
    """A display rotation in degrees (an integer; any whole turn means none)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{path}: expected rotation in whole degrees, got {value!r}")
    return int(value)


def _batch(frames, pts, indices) -> FrameBatch:
    return FrameBatch(np.stack(frames), np.asarray(pts, np.int64), np.asarray(indices, np.int64))


class VideoWriter:
    """Stream RGB frames into an H.264 file (libx264, BT.709 limited-range yuv420p).

    ``fps`` is stored as the stream rate; pts are in ``time_base`` (default ``1/fps``) and,
    when not given, are frame number x (1/fps). yuv420p needs an even width and height: odd
    sizes are padded by repeating the last row/column, so the file is up to one pixel larger
    than the frames (the caller crops on reading). ``lossless=True`` uses libx264rgb with
    qp 0 (RGB stored directly, any size, no padding): frames read back bit-exactly; few
    players other than ffmpeg play it.

    ``rotation`` (degrees counter-clockwise, as :attr:`VideoInfo.rotation`) is stored as the
    stream's display matrix, so players turn the frames the way the source's players did.

    Containers may store a finer time base than asked (mp4 keeps an integer timescale, e.g.
    1/30000 for 1001/30000); pts are then rescaled exactly and the frame rate is unchanged.

    The file is written to ``.<stem>.partial<suffix>`` beside ``path`` and renamed on a clean
    close; if the ``with`` block raises, the partial file is deleted.
    """

    SUFFIXES = (".mp4", ".mkv", ".mov")  # containers that take H.264 and play widely
    MAX_SIZE = 16384  # px, width or height (after odd-size padding): x264's limit

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: Fraction | int | str,
                 crf: int = 18, preset: str = "medium", lossless: bool = False,
                 time_base: Fraction | None = None, rotation: int = 0):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise ValueError(f"{self.path}: expected an existing output folder, "
                             f"{self.path.parent} does not exist")
        if self.path.suffix.lower() not in self.SUFFIXES:
            raise ValueError(f"{self.path}: libx264 video goes into {', '.join(self.SUFFIXES)} files, "
                             f"got {self.path.suffix or 'no suffix'!r}")
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, (int, np.integer)) or not 1 <= value <= self.MAX_SIZE:
                raise ValueError(f"{self.path}: expected {name} to be an integer from 1 to {self.MAX_SIZE} "
                                 f"(the most x264 encodes), got {value!r}")
        try:
            self.fps = Fraction(fps)
        except (TypeError, ValueError, ZeroDivisionError):
            self.fps = Fraction(-1)
        if self.fps <= 0:
            raise ValueError(f"{self.path}: expected fps to be a positive rational, got {fps!r}")
        if not 0 <= crf <= 51:
            raise ValueError(f"{self.path}: expected crf in 0..51, got {crf!r}")
        self.width, self.height, self.lossless = int(width), int(height), lossless
        self.rotation = _rotation(rotation, self.path)
        self.time_base = Fraction(time_base) if time_base is not None else 1 / self.fps
        self._pad = (0, 0) if lossless else (self.height % 2, self.width % 2)
        self._tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self._count, self._last_pts = 0, None
        self._sws = VideoReformatter()
        try:
            self._container = av.open(str(self._tmp), "w")
        except (av.FFmpegError, ValueError) as e:
            raise ValueError(f"{self.path}: cannot write a video here ({e})") from e
        try:
            codec = "libx264rgb" if lossless else "libx264"
            s = self._stream = self._container.add_stream(codec, rate=self.fps)
            s.width, s.height = self.width + self._pad[1], self.height + self._pad[0]
            s.pix_fmt = "rgb24" if lossless else "yuv420p"
            s.time_base = self.time_base
            s.codec_context.time_base = self.time_base
            if self.rotation % 360:
                s.set_display_rotation(self.rotation)
            # swscale's RGB -> 4:2:0 averages chroma at the centre of each 2x2 block: tag it so
            # (chromaloc=1), else readers assume left siting and colours shift by half a pixel.
            opts = {"qp": "0"} if lossless else {"crf": str(crf), "x264-params": "chromaloc=1"}
            s.options = {**opts, "preset": preset}
            if not lossless:
                ctx = s.codec_context
                ctx.colorspace = ctx.color_primaries = ctx.color_trc = _BT709
                ctx.color_range = _RANGE_LIMITED
            s.codec_context.open()  # now, so that settings x264 refuses fail before any work
        except av.FFmpegError as e:
            self._abort()
            raise ValueError(f"{self.path}: libx264 refused the settings ({self.width}x{self.height}, "
                             f"preset {preset!r}, crf {crf}): {' '.join(str(e).split())}") from None
        except BaseException:
            self._abort()
            raise

    def write(self, frames: np.ndarray, pts: np.ndarray | list[int] | None = None) -> None:
        """frames: (T, H, W, 3) or (H, W, 3) uint8 RGB; pts: (T,) increasing ints in time_base."""
        if self._container is None:
            raise ValueError(f"{self.path}: the video writer is closed")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        want = (self.height, self.width, 3)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != want:
            raise ValueError(f"{self.path}: expected frames (T, {want[0]}, {want[1]}, 3) uint8 RGB, "
                             f"got {frames.shape} {frames.dtype}")
        if pts is None:
            step = 1 / (self.fps * self.time_base)
            pts = [round((self._count + i) * step) for i in range(len(frames))]
        pts = [int(p) for p in np.asarray(pts).reshape(-1)]
        if len(pts) != len(frames):
            raise ValueError(f"{self.path}: expected {len(frames)} pts, got {len(pts)}")
        for image, p in zip(frames, pts):
            if self._last_pts is not None and p <= self._last_pts:
                raise ValueError(f"{self.path}: expected increasing pts, got {p} after {self._last_pts}")
            self._last_pts = p
            self._encode(image, p)
        self._count += len(frames)

    def _encode(self, image: np.ndarray, pts: int) -> None:
        if any(self._pad):
            image = np.pad(image, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        if not self.lossless:
            frame = self._sws.reformat(frame, format="yuv420p", dst_colorspace="ITU709",
                                       src_color_range="JPEG", dst_color_range="MPEG",
                                       interpolation=_SWS_FLAGS)
        frame.pts, frame.time_base = pts, self.time_base
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder, close the file and move it to its final name."""
        if self._container is None:
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
            self._container = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        container, self._container = self._container, None
        try:
            if container is not None:
                container.close()
        except Exception:  # e.g. the disk is full: the trailer cannot be written, the file goes anyway
            pass
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()
