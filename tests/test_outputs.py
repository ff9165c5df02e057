"""Output writers (discover.outputs): JSONL, COCO, CSV, VOC XML, and resuming each."""

from __future__ import annotations

import csv
import json
import os
import stat
import xml.etree.ElementTree as ET

import pytest
import torch

from discover.outputs import (
    CSV_FIELDS,
    FORMATS,
    OutputError,
    atomic_write,
    merge,
    open_writer,
    read_jsonl,
    read_jsonl_done,
    read_records,
    read_settings,
    result_record,
    settings_path,
    unique_stem,
)
from discover.pipeline import Detection, ImageResult


def rec(name: str, boxes=((10, 20, 50, 60),), scores=None, error=None, size=(100, 80)):
    boxes = [list(b) for b in boxes] if error is None else []
    scores = list(scores) if scores is not None else [0.5 + i for i in range(len(boxes))]
    return {
        "image": name,
        "width": size[0],
        "height": size[1],
        "boxes": boxes,
        "scores": scores if error is None else [],
        "seed": [1, 2] if boxes else None,
        "error": error,
    }


RECORDS = [
    rec("photos/a.jpg"),
    rec("photos/b.png", boxes=((0, 0, 100, 80), (5.5, 6.25, 20, 30)), scores=(0.9, 0.1)),
    rec("photos/c.jpg", error="empty file (0 bytes)", size=(None, None)),
    rec("photos/d.jpg", boxes=()),
]


def write_all(path, fmt, records, resume=False):
    with open_writer(path, fmt, resume=resume) as w:
        for r in records:
            w.write(r)
    return w


# ----------------------------------------------------------------------------- records


def test_result_record_from_an_image_result():
    det = Detection(
        box=(14.0, 28.5, 56.0, 70.0),
        score=1.23456789,
        seed=(2, 1),
        mask=torch.zeros(3, 4, dtype=torch.bool),
        patch_box=(1, 2, 4, 5),
    )
    res = ImageResult("x/y.jpg", [det], width=64, height=80)
    r = result_record(res, "y.jpg")
    assert r == {
        "image": "y.jpg",
        "width": 64,
        "height": 80,
        "boxes": [[14, 28.5, 56, 70]],
        "scores": [1.234568],
        "seed": [2, 1],
        "error": None,
    }
    assert all(isinstance(v, int) for v in (r["boxes"][0][0], r["boxes"][0][2]))
    failed = result_record(ImageResult("z.jpg", error="truncated image file"), "z.jpg")
    assert failed["boxes"] == [] and failed["seed"] is None
    assert failed["error"] == "truncated image file"
    json.dumps(failed)


def test_unknown_format_and_voc_on_a_file(tmp_path):
    assert set(FORMATS) == {"jsonl", "coco", "csv", "voc"}
    with pytest.raises(ValueError, match="unknown format"):
        open_writer(tmp_path / "x", "yaml")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="folder"):
        open_writer(tmp_path / "file", "voc")


# ----------------------------------------------------------------------------- jsonl


def test_jsonl_one_flushed_line_per_image(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    with open_writer(path, "jsonl") as w:
        for i, r in enumerate(RECORDS):
            w.write(r)
            # readable before the writer is closed: flushed as it goes
            assert [x["image"] for x in read_jsonl(path)] == [x["image"] for x in RECORDS[: i + 1]]
    assert read_jsonl(path) == RECORDS
    assert w.count == len(RECORDS) and w.done == {r["image"] for r in RECORDS}


def test_jsonl_resume_drops_a_torn_line_and_appends(tmp_path):
    path = tmp_path / "out.jsonl"
    write_all(path, "jsonl", RECORDS[:3])
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # the third line loses its end
    done, valid = read_jsonl_done(path)
    assert done == {"photos/a.jpg", "photos/b.png"}
    with open_writer(path, "jsonl", resume=True) as w:
        assert w.done == done
        for r in RECORDS[2:]:
            w.write(r)
    assert read_jsonl(path) == RECORDS  # no duplicate, nothing missing, all valid
    assert path.read_bytes().count(b"\n") == len(RECORDS)


def test_jsonl_without_resume_starts_over(tmp_path):
    path = tmp_path / "out.jsonl"
    write_all(path, "jsonl", RECORDS)
    before = path.read_text()
    with open_writer(path, "jsonl") as w:
        assert w.done == set()
    assert path.read_text() == before  # nothing written: the old output is untouched
    write_all(path, "jsonl", RECORDS[:1])
    assert [r["image"] for r in read_jsonl(path)] == ["photos/a.jpg"]  # replaced


# ----------------------------------------------------------------------------- coco


def _check_coco(data, records):
    assert set(data) >= {"images", "annotations", "categories"}
    assert data["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    images = {im["file_name"]: im for im in data["images"]}
    assert list(images) == [r["image"] for r in records]
    assert len({im["id"] for im in data["images"]}) == len(records)
    anns = data["annotations"]
    assert len({a["id"] for a in anns}) == len(anns)
    for r in records:
        im = images[r["image"]]
        assert (im["width"], im["height"]) == (r["width"], r["height"])
        mine = [a for a in anns if a["image_id"] == im["id"]]
        assert len(mine) == len(r["boxes"])
        for a, box, score in zip(mine, r["boxes"], r["scores"], strict=True):
            x0, y0, x1, y1 = box
            assert a["category_id"] == 1
            assert a["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
            assert a["area"] == pytest.approx((x1 - x0) * (y1 - y0), abs=0.01)
            assert a["score"] == score


def test_coco_results_and_images(tmp_path):
    path = tmp_path / "out.json"
    with open_writer(path, "coco") as w:
        assert not path.exists()  # nothing is created before the first record...
        w.write(RECORDS[0])
        # ... and from then on it is valid: a run that dies early leaves a readable file
        assert [im["file_name"] for im in json.loads(path.read_text())["images"]] == [
            "photos/a.jpg"
        ]
        for r in RECORDS[1:]:
            w.write(r)
    data = json.loads(path.read_text())
    _check_coco(data, RECORDS)


def test_coco_output_loads_in_pycocotools(tmp_path):
    coco = pytest.importorskip("pycocotools.coco")
    path = tmp_path / "out.json"
    write_all(path, "coco", RECORDS)
    data = json.loads(path.read_text())
    whole = coco.COCO(str(path))  # the file itself reads as a COCO dataset
    assert len(whole.getImgIds()) == len(RECORDS) and len(whole.getAnnIds()) == 3
    gt = coco.COCO()
    gt.dataset = {"images": data["images"], "categories": data["categories"], "annotations": []}
    gt.createIndex()
    dets = gt.loadRes(data["annotations"])  # the results list, as COCOeval takes it
    by_name = {im["file_name"]: im["id"] for im in data["images"]}
    per_image = {name: len(dets.getAnnIds(imgIds=[i])) for name, i in by_name.items()}
    assert per_image == {"photos/a.jpg": 1, "photos/b.png": 2, "photos/c.jpg": 0, "photos/d.jpg": 0}
    ann = dets.loadAnns(dets.getAnnIds(imgIds=[by_name["photos/a.jpg"]]))[0]
    assert ann["bbox"] == [10, 20, 40, 40] and ann["category_id"] == 1 and ann["score"] == 0.5


def test_coco_resume(tmp_path):
    path = tmp_path / "out.json"
    with open_writer(path, "coco") as w:
        for r in RECORDS[:2]:
            w.write(r)
    with open_writer(path, "coco", resume=True) as w:
        assert w.done == {"photos/a.jpg", "photos/b.png"}
        for r in RECORDS[2:]:
            w.write(r)
    _check_coco(json.loads(path.read_text()), RECORDS)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot resume"):
        open_writer(path, "coco", resume=True)


# ----------------------------------------------------------------------------- csv


def _csv_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_csv_one_row_per_box(tmp_path):
    path = tmp_path / "out.csv"
    write_all(path, "csv", RECORDS)
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == CSV_FIELDS
    rows = _csv_rows(path)
    assert [r["image"] for r in rows] == [
        "photos/a.jpg",
        "photos/b.png",
        "photos/b.png",
        "photos/c.jpg",
        "photos/d.jpg",
    ]
    a, b1, b2, c, d = rows
    assert (a["x0"], a["y0"], a["x1"], a["y1"], a["score"]) == ("10", "20", "50", "60", "0.5")
    assert (a["seed_row"], a["seed_col"], a["error"]) == ("1", "2", "")
    assert (b2["x0"], b2["y0"], b2["score"]) == ("5.5", "6.25", "0.1")
    assert c["error"] == "empty file (0 bytes)" and c["x0"] == "" and c["width"] == ""
    assert d["x0"] == "" and d["error"] == ""


def test_csv_resume_after_a_torn_row(tmp_path):
    path = tmp_path / "out.csv"
    write_all(path, "csv", RECORDS[:2])
    path.write_bytes(path.read_bytes()[:-5])  # the second box row of b.png is torn
    with open_writer(path, "csv", resume=True) as w:
        # b.png still has a complete first row: it counts as done (rows of one image are
        # written in one go, so only an external cut can split them)
        assert w.done == {"photos/a.jpg", "photos/b.png"}
        for r in RECORDS[2:]:
            w.write(r)
    rows = _csv_rows(path)
    assert [r["image"] for r in rows] == [
        "photos/a.jpg",
        "photos/b.png",
        "photos/c.jpg",
        "photos/d.jpg",
    ]


def test_csv_resume_from_a_torn_header_writes_the_header(tmp_path):
    path = tmp_path / "out.csv"
    path.write_text("image,wid")
    with open_writer(path, "csv", resume=True) as w:
        assert w.done == set()
        w.write(RECORDS[0])
    assert [r["image"] for r in _csv_rows(path)] == ["photos/a.jpg"]
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="cannot resume"):
        open_writer(path, "csv", resume=True)


# ----------------------------------------------------------------------------- voc


def _voc(path):
    root = ET.parse(path).getroot()
    boxes = [
        [int(o.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
        for o in root.findall("object")
    ]
    return root, boxes


def test_voc_one_xml_per_image(tmp_path):
    out = tmp_path / "voc"
    write_all(out, "voc", RECORDS)
    assert sorted(p.name for p in out.glob("*.xml")) == [
        "photos__a.xml",
        "photos__b.xml",
        "photos__c.xml",
        "photos__d.xml",
    ]
    root, boxes = _voc(out / "photos__a.xml")
    assert root.findtext("filename") == "photos/a.jpg"
    assert (root.findtext("size/width"), root.findtext("size/height")) == ("100", "80")
    assert boxes == [[11, 21, 50, 60]]  # [x0, x1) 0-based -> 1-based inclusive
    assert root.find("object").findtext("name") == "object"
    _, boxes = _voc(out / "photos__b.xml")
    assert boxes == [[1, 1, 100, 80], [7, 7, 20, 30]]
    root, boxes = _voc(out / "photos__c.xml")
    assert root.findtext("error") == "empty file (0 bytes)" and boxes == []


def test_voc_names_never_collide(tmp_path):
    out = tmp_path / "voc"
    records = [rec("a.jpg"), rec("a.png", boxes=((1, 1, 2, 2),)), rec("sub/a.jpg")]
    write_all(out, "voc", records)
    names = {ET.parse(p).getroot().findtext("filename"): p.name for p in out.glob("*.xml")}
    assert names == {"a.jpg": "a.xml", "a.png": "a.png.xml", "sub/a.jpg": "sub__a.xml"}
    # resume knows which stem belongs to which image
    with open_writer(out, "voc", resume=True) as w:
        assert w.done == {"a.jpg", "a.png", "sub/a.jpg"}
        w.write(rec("a.bmp"))
    assert ET.parse(out / "a.bmp.xml").getroot().findtext("filename") == "a.bmp"
    assert ET.parse(out / "a.xml").getroot().findtext("filename") == "a.jpg"


def test_voc_resume_rewrites_an_image_torn_from_the_index(tmp_path):
    out = tmp_path / "voc"
    write_all(out, "voc", RECORDS[:2])
    index = out / "index.jsonl"
    index.write_bytes(index.read_bytes()[:-3])
    with open_writer(out, "voc", resume=True) as w:
        assert w.done == {"photos/a.jpg"}
        for r in RECORDS[1:]:
            w.write(r)
    assert [r["image"] for r in read_jsonl(index)] == [r["image"] for r in RECORDS]
    assert len(list(out.glob("*.xml"))) == len(RECORDS)


def test_unique_stem():
    used: dict[str, str] = {}
    assert unique_stem("x/../y/a.jpg", used) == "x__y__a"
    assert unique_stem("/abs/b.JPG", used) == "abs__b"
    assert unique_stem("a.jpg", used) == "a"
    assert unique_stem("a.jpg", used) == "a"  # same image, same stem
    assert unique_stem("a.png", used) == "a.png"
    used["a.tif"] = "other"
    assert unique_stem("a.tif", used) == "a.tif-2"
    assert unique_stem("c.d/.jpg", {}) == "c.d__"


# ----------------------------------------------------------------------------- modes


def _written_files(out, fmt):
    files = sorted(out.iterdir()) if fmt == "voc" else [out, settings_path(out, fmt)]
    assert settings_path(out, fmt) in files and len(files) >= 2
    return files


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_new_outputs_get_the_usual_mode_under_the_umask(tmp_path, fmt, umask, mode):
    """COCO and VOC (written through a temporary file) used to get 0600 whatever the
    umask, JSONL and CSV 0644: every file, the settings sidecar too, is 0666 - umask."""
    out = tmp_path / ("voc" if fmt == "voc" else f"out.{fmt}")
    saved = os.umask(umask)
    try:
        with open_writer(out, fmt, settings={"model": "m"}) as w:
            for r in RECORDS:
                w.write(r)
    finally:
        os.umask(saved)
    for f in _written_files(out, fmt):
        assert stat.S_IMODE(f.stat().st_mode) == mode, (f.name, oct(f.stat().st_mode))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_replaced_output_keeps_its_mode(tmp_path, fmt):
    out = tmp_path / ("voc" if fmt == "voc" else f"out.{fmt}")
    with open_writer(out, fmt, settings={"model": "m"}) as w:
        w.write(RECORDS[0])
    before = _written_files(out, fmt)
    for f in before:
        f.chmod(0o640)
    saved = os.umask(0o022)
    try:
        with open_writer(out, fmt, settings={"model": "m"}) as w:
            for r in RECORDS:
                w.write(r)
    finally:
        os.umask(saved)
    for f in _written_files(out, fmt):
        # replaced files keep their mode; new ones (VOC's index is started anew) do not
        expected = 0o640 if f in before and f.name != "index.jsonl" else 0o644
        assert stat.S_IMODE(f.stat().st_mode) == expected, (f.name, oct(f.stat().st_mode))


def test_atomic_write_modes(tmp_path):
    target = tmp_path / "f.json"
    saved = os.umask(0o027)
    try:
        atomic_write(target, "{}")
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        target.chmod(0o604)
        atomic_write(target, "[]")  # replaced: the old mode is kept
        assert stat.S_IMODE(target.stat().st_mode) == 0o604 and target.read_text() == "[]"
    finally:
        os.umask(saved)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left


# ----------------------------------------------------------------------------- merging


def test_merge_keeps_the_settings_and_where_names_start(tmp_path, monkeypatch):
    """A merge used to nest the whole sidecar inside ``settings`` (so a --resume after a
    torchrun merge saw other settings) and to record the merging process's directory."""
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir()
    later.mkdir()
    out = tmp_path / "r.jsonl"
    parts = [tmp_path / f"r.jsonl.part{i}-of-2" for i in range(2)]
    monkeypatch.chdir(first)
    for part, records in zip(parts, (RECORDS[:2], RECORDS[2:]), strict=True):
        with open_writer(part, "jsonl", settings={"model": "m", "k": 1}) as w:
            for r in records:
                w.write(r)
    monkeypatch.chdir(later)
    assert merge(out, "jsonl", parts) == len(RECORDS)
    sidecar = read_settings(out, "jsonl")
    assert sidecar["settings"] == {"model": "m", "k": 1}
    assert sidecar["cwd"] == str(first)
    resumed = open_writer(out, "jsonl", resume=True)
    assert resumed.previous_settings["settings"] == {"model": "m", "k": 1}
    assert resumed.base_cwd == str(first)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_keeps_the_sidecar_as_written(tmp_path, monkeypatch, fmt):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    part = tmp_path / f"r.{fmt}.part0-of-2"
    with open_writer(part, fmt, settings={"model": "m", "method": "lost"}) as w:
        w.sidecar_extra = {"viz": "/some/viz"}
        w.write(RECORDS[0])
    written = read_settings(part, fmt)
    monkeypatch.chdir(tmp_path)  # the merge runs elsewhere
    merge(tmp_path / f"r.{fmt}", fmt, [part])
    merged = read_settings(tmp_path / f"r.{fmt}", fmt)
    assert merged == written  # not nested inside a second sidecar
    assert merged["settings"] == {"model": "m", "method": "lost"}
    assert merged["cwd"] == str(run_dir) and merged["viz"] == "/some/viz"


def test_read_records_guesses_every_default_output_name(tmp_path):
    for fmt in FORMATS:  # the names discover boxes writes without --out
        out = tmp_path / ("results" if fmt == "voc" else f"results.{fmt}")
        write_all(out, fmt, RECORDS)
        assert [r["image"] for r in read_records(out)] == [r["image"] for r in RECORDS], fmt
    with pytest.raises(OutputError, match="use --format"):
        read_records(tmp_path / "results.txt")
