"""Distributed runs: sharding, part merging, and real 2-process gloo runs on loopback.

The multi-process tests launch ``python -m torch.distributed.run`` (torchrun) on
127.0.0.1 with a random-init ViT-S/14 checkpoint and compare the merged outputs with a
single-process run of the same command, image for image.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fixtures_voc import write_jpeg, write_voc_tree

from discover.distributed import (
    DistContext,
    DistributedError,
    find_parts,
    merge_files,
)
from discover.outputs import open_writer, read_jsonl

REPO = Path(__file__).resolve().parents[1]
MODEL = "vit_small_patch14_reg4_dinov2"
N_IMAGES = 32


# -- records and merging (in process) ------------------------------------------------------
def _records() -> list[dict]:
    recs = []
    for i, name in enumerate(["z/last.jpg", "b.png", "a/x.jpg", "c.jpg", "a.jpg", "d d.jpg"]):
        boxes = [[i, 2, 30.5 + i, 40.25]] if i != 3 else []
        if i == 1:
            boxes.append([0, 0, 10, 12])
        recs.append(
            {
                "image": name,
                "width": 64 + i,
                "height": 48,
                "boxes": boxes,
                "scores": [round(0.5 + 0.1 * k + i / 7, 6) for k in range(len(boxes))],
                "seed": [1, i] if boxes else None,
                "error": 'no object found: empty, "quoted"' if i == 3 else None,
            }
        )
    return recs


def _write(path: Path, fmt: str, records: list[dict], resume: bool = False) -> None:
    with open_writer(path, fmt, resume=resume) as w:
        for rec in records:
            w.write(rec)


def _snapshot(path: Path, fmt: str) -> dict[str, bytes]:
    if fmt == "voc":
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return {path.name: path.read_bytes()}


def test_shard_is_disjoint_sorted_and_balanced() -> None:
    items = [f"img{i:02d}" for i in (5, 3, 9, 0, 7, 1, 8, 2, 6, 4)] + ["img03"]
    done = {"img07", "img00"}
    shards = [DistContext(rank=r, world_size=3).shard(items, key=str, done=done) for r in range(3)]
    assert shards[0] == ["img01", "img04", "img08"]  # sorted, done dropped, every 3rd
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(set(items) - done) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # alone: input order kept (duplicates too), done still dropped
    assert DistContext().shard(items, key=str, done=done) == [x for x in items if x not in done]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "coco", "voc"])
@pytest.mark.parametrize("resumed", [False, True])
def test_merge_equals_single_writer(tmp_path: Path, fmt: str, resumed: bool) -> None:
    recs = _records()
    ordered = sorted(recs, key=lambda r: r["image"])
    single = tmp_path / "single" / ("out" if fmt == "voc" else f"out.{fmt}")
    _write(single, fmt, ordered)

    out = tmp_path / "merged" / single.name
    rest = recs
    if resumed:  # an earlier merge already holds two images; a part repeats one of them
        _write(out, fmt, ordered[:2])
        rest = [r for r in recs if r not in ordered[:2]] + [ordered[1]]
    for r in range(2):
        ctx = DistContext(rank=r, world_size=2)
        _write(ctx.part_path(out), fmt, ctx.shard(rest, key=lambda x: x["image"]))
    # a part of an earlier run with another world size, holding a duplicate
    _write(DistContext(rank=2, world_size=3).part_path(out), fmt, [ordered[3]])
    assert len(find_parts(out)) == 3

    assert merge_files(out, fmt) == len(recs)
    assert find_parts(out) == []
    assert _snapshot(out, fmt) == _snapshot(single, fmt)


def test_merge_keeps_parts_when_a_reported_image_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    part = DistContext(rank=1, world_size=2).part_path(out)
    _write(part, "jsonl", _records()[:2])
    report = {"rank": 1, "part": str(part), "images": ["b.png", "not/here.jpg"]}
    with pytest.raises(DistributedError, match="shared"):
        merge_files(out, "jsonl", [report])
    assert part.exists() and not out.exists()


def test_prepare_alone_cleans_or_resumes_parts(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    recs = _records()
    p0 = DistContext(rank=0, world_size=2).part_path(out)
    _write(p0, "jsonl", recs[:2])
    with open(p0, "a") as f:
        f.write('{"image": "torn.jpg", "wid')  # a rank killed mid-line
    _write(DistContext(rank=1, world_size=2).part_path(out), "jsonl", recs[2:3])
    _write(out.with_name("xr.jsonl.part0-of-2"), "jsonl", recs[3:4])  # not ours: kept

    ctx = DistContext()
    done = ctx.prepare_output(out, "jsonl", resume=True)
    assert done == {r["image"] for r in recs[:3]}
    _write(out, "jsonl", recs[4:])  # what the single process does for the rest
    ctx.merge_outputs(out, "jsonl")
    assert [r["image"] for r in read_jsonl(out)] == sorted(
        r["image"] for r in recs if r is not recs[3]
    )
    assert find_parts(out) == [] and out.with_name("xr.jsonl.part0-of-2").exists()

    _write(DistContext(rank=0, world_size=2).part_path(out), "jsonl", recs[:1])
    ctx = DistContext()
    assert ctx.prepare_output(out, "jsonl", resume=False) == set()
    assert find_parts(out) == []
    ctx.merge_outputs(out, "jsonl")  # nothing to merge: the writer's output stays
    assert len(read_jsonl(out)) == len(recs) - 1


def test_from_env_alone_and_launcher_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    ctx = DistContext.from_env("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend) == (0, 1, True, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DistributedError, match="torchrun"):
        DistContext.from_env("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(DistributedError, match="GPU"):
        DistContext.from_env("cuda")


# -- real multi-process runs ------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with images, a VOC tree and a random-init checkpoint (cwd of every run)."""
    import timm

    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=0)
    torch.save(model.state_dict(), root / "ck.pth")
    for i in range(N_IMAGES):
        size = (56 + 14 * (i % 4), 56 + 14 * (i % 3))
        box = (4 + i % 9, 6, 30 + i % 20, 40)
        write_jpeg(root / "imgs" / f"im{(i * 7) % N_IMAGES:03d}.jpg", size, [box], seed=i)
    write_voc_tree(root / "voc")
    return root


COMMON = ["--model", MODEL, "--checkpoint", "ck.pth", "--threads", "1", "--workers", "1"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cwd: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"]
    cmd += ["--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1"]
    cmd += ["--master-port", str(_free_port()), *args]
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _alone(cwd: Path, *args: str) -> None:
    """A single-process run in this process (same code path as ``discover ...``)."""
    from discover.cli import app

    old_cwd, old_threads = Path.cwd(), torch.get_num_threads()
    os.chdir(cwd)
    try:
        app(list(args), standalone_mode=False)
    finally:
        os.chdir(old_cwd)
        torch.set_num_threads(old_threads)


def _by_image(path: Path) -> dict[str, dict]:
    recs = read_jsonl(path)
    by = {r["image"]: r for r in recs}
    assert len(by) == len(recs), "duplicate image"
    return by


@pytest.fixture(scope="module")
def single_boxes(work: Path) -> dict[str, dict]:
    _alone(work, "boxes", "imgs", "--out", "single.jsonl", *COMMON)
    return _by_image(work / "single.jsonl")


def test_torchrun_boxes_equal_single_process(work: Path, single_boxes: dict) -> None:
    _torchrun(work, "-m", "discover.cli", "boxes", "imgs", "--out", "two.jsonl", *COMMON)
    merged = _by_image(work / "two.jsonl")
    assert merged == single_boxes and len(merged) == N_IMAGES
    names = [r["image"] for r in read_jsonl(work / "two.jsonl")]
    assert names == sorted(names)
    assert find_parts(work / "two.jsonl") == []


def test_torchrun_eval_script_equal_single_process(work: Path) -> None:
    args = ["--dataset", "voc07", "--root", "voc/VOCdevkit", *COMMON]
    _alone(work, "eval", *args, "--out", "ev1")
    _torchrun(work, str(REPO / "scripts" / "eval_voc.py"), *args, "--out", "ev2")
    one = json.loads((work / "ev1" / "summary.json").read_text())
    two = json.loads((work / "ev2" / "summary.json").read_text())
    for key in ("evaluated", "correct", "corloc", "object_recall"):
        assert one[key] == two[key], key
    assert sorted(map(tuple, one["failures"])) == sorted(map(tuple, two["failures"]))
    assert one["evaluated"] == 7 and two["settings"]["world_size"] == 2
    assert _by_image(work / "ev2" / "boxes.jsonl") == _by_image(work / "ev1" / "boxes.jsonl")
    assert not list((work / "ev2").glob("*.part*"))


def test_killed_rank_then_resume_completes(work: Path, single_boxes: dict) -> None:
    out = work / "killed.jsonl"
    port = str(_free_port())
    args = [sys.executable, "-m", "discover.cli", "boxes", "imgs", "--out", out.name, *COMMON]
    procs = []
    for rank in range(2):  # what torchrun does, by hand, to kill one rank
        env = _env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            REGDISCOVER_DIST_TIMEOUT="10",  # how long rank 0 waits for rank 1's report
        )
        procs.append(
            subprocess.Popen(
                args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        )
    # Once its part file exists, rank 1 runs in 10 ms slices (SIGCONT ... SIGSTOP) until
    # the file holds its first window of 8 results; it dies there, half way through.
    rank1 = procs[1]
    part1 = DistContext(rank=1, world_size=2).part_path(out)
    deadline = time.monotonic() + 240
    try:
        while not (part1.exists() and len(read_jsonl(part1)) >= 8):
            assert rank1.poll() is None, rank1.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "rank 1 never got going"
            if part1.exists():
                rank1.send_signal(signal.SIGCONT)
                time.sleep(0.01)
                rank1.send_signal(signal.SIGSTOP)
            else:
                time.sleep(0.01)
        assert rank1.poll() is None
    finally:
        rank1.kill()
        rank1.wait()
    _, err0 = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 2, err0.decode()[-2000:]
    said = " ".join(err0.decode().split())  # rich wraps long lines
    assert "rank 1 was lost" in said and "--resume" in said
    assert not out.exists()  # nothing merged
    kept = [r["image"] for p in find_parts(out) for r in read_jsonl(p)]
    assert len(kept) == len(set(kept)) and 16 + 8 <= len(kept) < N_IMAGES

    viz = work / "viz_resume"
    _torchrun(
        work, "-m", "discover.cli", "boxes", "imgs", "--out", out.name, "--resume",
        "--viz", viz.name, *COMMON,
    )  # fmt: skip
    assert _by_image(out) == single_boxes  # no duplicate, nothing missing
    assert len(list(viz.glob("*.png"))) == N_IMAGES - len(kept)  # only the missing ones redone
    assert len(read_jsonl(viz / "index.jsonl")) == N_IMAGES - len(kept)  # every rank's line
    assert find_parts(out) == []
