"""codec dataset: many clips -> latent files + index.parquet, resumable, local and Ray engines.

A folder of tiny clips in subfolders plus one broken file is encoded by each engine (local in
this process, local with 2 worker processes, Ray Data with 2 actors on a local 2-CPU cluster that
this module starts and stops): a run interrupted after its first clip, then rerun, finishes only
what is missing; every good clip is then ``ok`` and bit-identical to ``codec encode``, the broken
one ``failed`` with its message; a further rerun writes nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import moving_square_frames, tiny_model_file, write_clip

from codec.cli import main
from codec.dataset import EncodeSettings, find_clips, run_dataset
from codec.dataset.work import KEY_FIELD, is_complete
from codec.latents import LatentReader
from codec.models import load_model, weights_digest

pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install -e '.[ray]')")

ROOT = Path(__file__).resolve().parents[1]
GOOD = ("a/one.mp4", "b/c/two.mp4", "three.mp4")  # compared with codec encode
EXTRA = tuple(f"s{i % 2}/c{i}.mp4" for i in range(5))
BROKEN = "b/broken.mp4"
ENGINES = [("local", 1), ("local", 2), ("ray", 2)]


@pytest.fixture(scope="module", autouse=True)
def _reference_kernels():
    """Worker processes and Ray actors inherit the environment, not conftest's force_reference():
    make them run the torch references too (not Triton's CPU interpreter)."""
    old = os.environ.get("CODEC_KERNELS")
    os.environ["CODEC_KERNELS"] = "reference"
    yield
    if old is None:
        del os.environ["CODEC_KERNELS"]
    else:
        os.environ["CODEC_KERNELS"] = old


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    for i, rel in enumerate(GOOD):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_clip(root / rel, moving_square_frames(5 - (i == 2), 48, 64, seed=i))
    for i, rel in enumerate(EXTRA):  # enough clips that a run stopped after one has work left
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_clip(root / rel, moving_square_frames(4, 32, 48, seed=10 + i))
    (root / BROKEN).write_bytes(b"this is not a video " * 50)
    return root


@pytest.fixture(scope="module")
def reference(clips, tmp_path_factory) -> dict[str, Path]:
    """``codec encode`` of each good clip (the command, in this process)."""
    out = tmp_path_factory.mktemp("reference")
    refs = {}
    for rel in GOOD:
        refs[rel] = out / (rel.replace("/", "_") + ".safetensors")
        assert main(["encode", str(clips / rel), "-o", str(refs[rel]), "--quiet"]) == 0
    return refs


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    # Actors must import this checkout's codec, whatever is installed.
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "CODEC_KERNELS": "reference"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def engine(request):
    name, workers = request.param
    if name == "ray":
        request.getfixturevalue("ray_cluster")
    return name, workers


def index(outdir: Path) -> dict[str, dict]:
    return {r["source"]: r for r in pq.read_table(outdir / "index.parquet").to_pylist()}


def mtimes(outdir: Path) -> dict[str, int]:
    return {str(p.relative_to(outdir)): p.stat().st_mtime_ns for p in outdir.rglob("*.safetensors")}


def assert_same_as_encode(latents: Path, reference: Path) -> None:
    with LatentReader(latents) as got, LatentReader(reference) as want:
        got.verify()
        assert torch.equal(got.read().view(torch.uint8), want.read().view(torch.uint8))
        assert torch.equal(got.pts, want.pts)
        extra = {k: v for k, v in got.metadata.items() if k not in want.metadata}
        assert set(extra) == {KEY_FIELD}
        # The checksum covers the metadata too, so the key makes it differ; everything else is equal.
        same = [k for k in want.metadata if k != "checksum"]
        assert {k: got.metadata[k] for k in same} == {k: want.metadata[k] for k in same}


def assert_complete(outdir: Path, reference: dict[str, Path]) -> dict[str, dict]:
    rows = index(outdir)
    assert set(rows) == {*GOOD, *EXTRA, BROKEN}
    for rel in EXTRA:
        assert rows[rel]["status"] == "ok" and is_complete(outdir / rows[rel]["latents"], rows[rel]["key"])
    for rel in GOOD:
        row = rows[rel]
        assert row["status"] == "ok" and row["error"] == "", row
        latents = outdir / row["latents"]
        assert row["latents"] == rel.removesuffix(".mp4") + ".safetensors"
        assert_same_as_encode(latents, reference[rel])
        with LatentReader(latents) as r:
            assert r.metadata[KEY_FIELD] == row["key"]
            assert row["shape"] == list(r.shape) and row["frames"] == r.num_frames == r.shape[0]
        assert row["fps"] == 25.0
    bad = rows[BROKEN]
    assert bad["status"] == "failed" and "broken.mp4: not a readable video file" in bad["error"]
    assert "\n" not in bad["error"] and not (outdir / "b" / "broken.safetensors").exists()
    assert not list(outdir.rglob("*.partial"))
    return rows


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("engine", ENGINES, indirect=True, ids=[f"{n}{w}" for n, w in ENGINES])
def test_interrupted_run_is_completed_by_a_rerun_and_a_further_rerun_writes_nothing(engine, clips, reference,
                                                                                     tmp_path):
    name, workers = engine
    out = tmp_path / "out"

    def stop_after_first(row):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_dataset([clips], out, EncodeSettings(), engine=name, workers=workers, on_row=stop_after_first)
    assert len(index(out)) == 1  # written on the way out: the clip that finished
    done_before = mtimes(out)
    good = len(GOOD) + len(EXTRA)
    assert len(done_before) < good, "the interruption came too late to test anything"

    s = run_dataset([clips], out, EncodeSettings(), engine=name, workers=workers)
    assert (s.clips, s.reused, s.encoded, s.failed) == (good + 1, len(done_before), good - len(done_before), 1)
    after = mtimes(out)
    assert {k: after[k] for k in done_before} == done_before  # kept, not rewritten
    first = assert_complete(out, reference)
    assert [r["reused"] for r in first.values()].count(True) == len(done_before)

    s = run_dataset([clips], out, EncodeSettings(), engine=name, workers=workers)
    assert (s.encoded, s.reused, s.failed, s.frames) == (0, good, 1, 0)
    assert mtimes(out) == after
    again = assert_complete(out, reference)
    assert all(again[rel]["reused"] and again[rel]["key"] == first[rel]["key"] for rel in GOOD + EXTRA)


def test_ray_retries_a_clip_whose_actor_died(ray_cluster, clips, reference, tmp_path, monkeypatch):
    import dataset_actors

    import codec.dataset.ray_engine as ray_engine

    monkeypatch.setattr(ray_engine, "RayClipEncoder", dataset_actors.DiesOnce)
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(clips / GOOD[0], folder / "one.mp4")
    (folder / "one.mp4.die-once").touch()
    s = run_dataset([folder], tmp_path / "out", EncodeSettings(), engine="ray", workers=1)
    assert not (folder / "one.mp4.die-once").exists(), "the actor never died: nothing was tested"
    assert (s.encoded, s.failed) == (1, 0)
    assert_same_as_encode(tmp_path / "out" / "one.safetensors", reference[GOOD[0]])


def test_changed_options_damaged_files_and_partials_are_redone(clips, reference, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    for rel in GOOD:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clips / rel, folder / rel)
    clips = folder
    run_dataset([clips], out, EncodeSettings())
    one, two, three = (out / r.removesuffix(".mp4") for r in GOOD)
    one, two, three = (p.with_suffix(".safetensors") for p in (one, two, three))
    key = index(out)[GOOD[0]]["key"]
    # Damage one file (a latent byte flipped) and leave a partial file beside another.
    data = bytearray(one.read_bytes())
    data[-50] ^= 0xFF
    one.write_bytes(data)
    assert not is_complete(one, key)
    shutil.copy(two, two.with_name(f".{two.name}.partial"))
    two.unlink()
    before = mtimes(out)
    s = run_dataset([clips], out, EncodeSettings())
    assert (s.encoded, s.reused) == (2, 1)
    assert mtimes(out)[str(three.relative_to(out))] == before[str(three.relative_to(out))]
    assert_same_as_encode(one, reference[GOOD[0]])
    assert_same_as_encode(two, reference[GOOD[1]])
    # Other options: another key, every clip encoded again with them.
    s = run_dataset([clips], out, EncodeSettings(end=3))
    assert (s.encoded, s.reused, s.frames) == (3, 0, 9)
    rows = index(out)
    assert rows[GOOD[0]]["key"] != key and rows[GOOD[0]]["shape"][0] == 3


def test_files_of_older_coder_rules_are_redone(monkeypatch):
    """The same settings under other tiling/cache rules (an older version) give another key."""
    from codec.dataset import work

    now = work.ClipEncoder("unused", EncodeSettings()).options
    monkeypatch.setattr(work, "CODER_RULES", work.CODER_RULES - 1)
    assert work.ClipEncoder("unused", EncodeSettings()).options != now


def test_weights_digest_follows_the_weights(tmp_path):
    model = load_model("default")
    a = weights_digest(model)
    assert a == weights_digest(load_model("default"))
    assert weights_digest(model.to(memory_format=torch.channels_last)) == a  # layout does not count
    other = load_model(str(tiny_model_file(tmp_path / "tiny.safetensors")))
    assert weights_digest(other) != a


def test_sources_folders_and_manifests(clips, tmp_path):
    found = find_clips([clips])
    assert [c.rel for c in found] == sorted([*GOOD, *EXTRA, BROKEN])  # folders searched recursively
    (clips / "b" / "notes.txt").write_text("not a clip")  # ignored in folders (not a video suffix)
    assert len(find_clips([clips])) == len(found)
    (clips / "b" / "notes.txt").unlink()
    listing = tmp_path / "list.txt"
    listing.write_text(f"# clips\n{clips / GOOD[0]}\n\n{clips / GOOD[1]}\n")
    rels = [c.rel for c in find_clips([listing])]  # outside the manifest's folder: full path kept
    assert rels == [str(clips / GOOD[0]).lstrip("/"), str(clips / GOOD[1]).lstrip("/")]
    inside = clips / "list.csv"
    inside.write_text("path,caption\nb/c/two.mp4,a square\nthree.mp4,another\n")
    assert [c.rel for c in find_clips([inside])] == ["b/c/two.mp4", "three.mp4"]
    inside.unlink()
    table = tmp_path / "list.parquet"
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.table({"path": [str(clips / GOOD[2])]}), table)
    assert [c.path for c in find_clips([table])] == [str(clips / GOOD[2])]
    pq.write_table(pa.table({"file": ["x.mp4"]}), table)
    with pytest.raises(ValueError, match="expected a 'path' column"):
        find_clips([table])
    with pytest.raises(ValueError, match="no such folder or manifest"):
        find_clips([tmp_path / "missing"])
    (tmp_path / "x" / "a").mkdir(parents=True)
    shutil.copy(clips / GOOD[0], tmp_path / "x" / "a" / "one.webm")
    with pytest.raises(ValueError, match="would both be written to a/one.safetensors"):
        find_clips([clips, tmp_path / "x"])


def test_cli_dataset(clips, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["dataset", str(clips), "-o", str(out), "--end", "2", "--quiet"]) == 1  # one clip failed
    assert "8 encoded, 0 kept, 1 failed; 16 frames" in capsys.readouterr().out
    assert {r["shape"][0] for r in index(out).values() if r["status"] == "ok"} == {2}
    good = tmp_path / "good.txt"
    good.write_text("\n".join(str(clips / r) for r in GOOD))
    assert main(["dataset", str(good), "-o", str(tmp_path / "o2"), "--end", "2", "--quiet"]) == 0
    assert main(["dataset", str(clips), "-o", str(out), "--address", "x:1"]) == 2
    assert "--address joins a Ray cluster; it needs --engine ray" in capsys.readouterr().err
