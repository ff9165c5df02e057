from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fixtures_voc import write_coco20k, write_voc_tree

from discover.datasets import (
    DatasetError,
    Sample,
    coco_image_id,
    load_dataset,
    read_coco_list,
)
from discover.errors import RegdiscoverError

SHARED_COCO_LIST = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_20k_filenames.txt"
)


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_voc_tree(tmp_path_factory.mktemp("voc"), "2007", missing_xml=True)


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_coco20k(tmp_path_factory.mktemp("coco"))


def _by_id(ds) -> dict[str, Sample]:
    return {s.image_id: s for s in ds}


# ----------------------------------------------------------------------------- VOC


@pytest.mark.parametrize("which", ["devkit", "voc_dir", "parent"])
def test_voc_accepts_devkit_year_folder_or_parent(voc: dict, which: str) -> None:
    root = voc["devkit"].parent if which == "parent" else voc[which]
    ds = load_dataset("voc07", root)
    assert ds.root == voc["voc_dir"]
    assert ds.ids == voc["ids"]  # split-file order, not sorted
    assert ds.ids[:2] == ["000012", "000005"]
    assert len(ds) == len(voc["ids"])


def test_voc_boxes_classes_flags_match_hand_written_truth(voc: dict) -> None:
    ds = load_dataset("VOC07", str(voc["devkit"]))
    samples = _by_id(ds)
    for image_id, exp in voc["expected"].items():
        s = samples[image_id]
        assert s.error is None
        assert s.boxes.dtype == np.int64 and s.boxes.shape == (len(exp["classes"]), 4)
        np.testing.assert_array_equal(s.boxes, exp["boxes"])
        assert list(s.classes) == exp["classes"]
        assert s.difficult.tolist() == exp["difficult"]
        assert s.truncated.tolist() == exp["truncated"]
        assert (s.width, s.height) == voc["sizes"][image_id]
        assert s.path == voc["voc_dir"] / "JPEGImages" / f"{image_id}.jpg"
        assert s.path.is_file()


def test_voc_one_based_conversion_shifts_only_min_corner(voc: dict) -> None:
    samples = _by_id(load_dataset("voc07", voc["devkit"]))
    # xmin=1, ymin=1, xmax=50, ymax=40  ->  (0, 0, 50, 40)
    assert samples["000012"].boxes[0].tolist() == [0, 0, 50, 40]
    # a box covering a 72x72 image (1..72 inclusive) is exactly (0, 0, W, H)
    assert samples["000032"].boxes.tolist() == [[0, 0, 72, 72]]


def test_voc_float_coordinates_truncate_then_shift(voc: dict) -> None:
    s = _by_id(load_dataset("voc07", voc["devkit"]))["000017"]
    # "12.7" "3.5" "63.9" "96" -> int(float()) = 12, 3, 63, 96 -> (11, 2, 63, 96)
    assert s.boxes.tolist() == [[11, 2, 63, 96]]


def test_voc_part_boxes_ignored_and_missing_flags_read_as_zero(voc: dict) -> None:
    s = _by_id(load_dataset("voc07", voc["devkit"]))["000023"]
    assert s.boxes.tolist() == [[19, 4, 60, 60]]
    assert s.classes == ("person",)
    assert not s.difficult.any() and not s.truncated.any()


def test_voc_malformed_and_missing_xml_become_error_samples(voc: dict) -> None:
    ds = load_dataset("voc07", voc["devkit"])
    samples = _by_id(ds)
    bad = samples["000031"]
    assert bad.error is not None and "000031.xml" in bad.error
    assert bad.boxes.shape == (0, 4)
    missing = samples["000040"]
    assert missing.error is not None and "not found" in missing.error
    assert [i for i, _ in ds.errors] == ["000031", "000040"]
    # the other samples are unaffected
    assert all(samples[i].error is None for i in voc["expected"])


def test_voc_without_no_hard_keeps_every_image_and_box(voc: dict) -> None:
    ds = load_dataset("voc07", voc["devkit"])
    samples = _by_id(ds)
    assert ds.skipped == []
    assert len(samples["000009"].boxes) == 2  # all hard, still evaluated
    assert samples["000012"].classes == ("dog", "person")  # difficult person kept


def test_voc_no_hard_drops_hard_boxes_and_skips_all_hard_images(voc: dict) -> None:
    ds = load_dataset("voc07", voc["devkit"], no_hard=True)
    samples = _by_id(ds)
    assert voc["all_hard"] == ["000009"]
    assert "000009" not in samples
    assert ds.skipped == ["000009"]
    assert len(ds) == len(voc["ids"]) - 1
    assert ds.ids == [i for i in voc["ids"] if i != "000009"]
    # difficult person and truncated bottle removed
    assert samples["000012"].boxes.tolist() == [[0, 0, 50, 40]]
    assert samples["000012"].classes == ("dog",)
    assert samples["000005"].boxes.tolist() == [[4, 19, 60, 90]]
    assert samples["000005"].classes == ("car",)
    assert not samples["000005"].truncated.any()
    # images whose annotation could not be read are still listed (counted as failures)
    assert samples["000031"].error is not None


def test_voc12_reads_a_2012_tree_and_not_a_2007_one(tmp_path: Path, voc: dict) -> None:
    info = write_voc_tree(tmp_path, "2012")
    ds = load_dataset("voc12", info["devkit"])
    assert ds.name == "voc12" and ds.root == info["voc_dir"]
    assert ds.ids == info["ids"]
    with pytest.raises(DatasetError, match="VOC2012"):
        load_dataset("voc12", voc["devkit"])


def test_voc_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        load_dataset("voc07", missing)


def test_voc_missing_split_file_names_the_path(tmp_path: Path) -> None:
    info = write_voc_tree(tmp_path)
    split = info["voc_dir"] / "ImageSets" / "Main" / "trainval.txt"
    split.unlink()
    with pytest.raises(DatasetError, match="trainval.txt") as exc:
        load_dataset("voc07", info["devkit"])
    assert str(split) in str(exc.value)


def test_voc_missing_annotations_folder_names_it(tmp_path: Path) -> None:
    info = write_voc_tree(tmp_path)
    ann = info["voc_dir"] / "Annotations"
    for f in ann.iterdir():
        f.unlink()
    ann.rmdir()
    with pytest.raises(DatasetError, match="Annotations"):
        load_dataset("voc07", info["voc_dir"])


def test_dataset_error_is_a_package_error_and_bad_names_rejected(tmp_path: Path) -> None:
    assert issubclass(DatasetError, RegdiscoverError)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)


def test_sample_without_hard() -> None:
    s = Sample(
        "x",
        Path("x.jpg"),
        10,
        10,
        boxes=np.array([[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]], dtype=np.int64),
        classes=("a", "b", "c"),
        difficult=np.array([False, True, False]),
        truncated=np.array([False, False, True]),
    )
    kept = s.without_hard()
    assert kept.boxes.tolist() == [[0, 0, 1, 1]]
    assert kept.classes == ("a",)
    assert kept.hard.tolist() == [False]


# ----------------------------------------------------------------------------- COCO


def test_coco_selection_order_rounding_and_crowd_drop(coco: dict) -> None:
    ds = load_dataset("coco20k", coco["root"], coco_list=coco["list_file"])
    assert ds.name == "coco20k"
    assert ds.root == coco["images_dir"]
    assert ds.ids == coco["ids"] == ["123456", "42", "7", "314"]  # list order
    samples = _by_id(ds)
    assert "999" not in samples  # in the json, not in the list
    for image_id, exp in coco["expected"].items():
        s = samples[image_id]
        assert s.error is None
        np.testing.assert_array_equal(s.boxes, exp["boxes"])
        assert s.boxes.dtype == np.int64 and s.boxes.shape[1] == 4
        assert list(s.classes) == exp["classes"]
        assert (s.width, s.height) == coco["sizes"][image_id]
        assert s.path.is_file()
        assert not s.difficult.any() and not s.truncated.any()


def test_coco_half_to_even_rounding(coco: dict) -> None:
    samples = _by_id(load_dataset("coco20k", coco["root"], coco_list=coco["list_file"]))
    # bbox [10.5, 11.5, 20.0, 30.25]: 10.5 -> 10, 11.5 -> 12, 30.5 -> 30, 41.75 -> 42
    assert samples["123456"].boxes[0].tolist() == [10, 12, 30, 42]
    # bbox [11.5, 0, 39, 74.5]: 11.5 -> 12, 50.5 -> 50, 74.5 -> 74
    assert samples["7"].boxes.tolist() == [[12, 0, 50, 74]]


def test_coco_crowd_only_and_unannotated_images_are_kept_without_boxes(coco: dict) -> None:
    ds = load_dataset("coco20k", coco["root"], coco_list=coco["list_file"])
    samples = _by_id(ds)
    for image_id in coco["crowd_only"] + coco["no_annotations"]:
        assert samples[image_id].error is None
        assert samples[image_id].boxes.shape == (0, 4)
    assert len(samples["123456"].boxes) == 2  # the crowd box of this image is gone
    assert ds.skipped == []


def test_coco_root_may_be_the_images_folder_with_explicit_annotations(coco: dict) -> None:
    ds = load_dataset(
        "coco20k", coco["images_dir"], coco_list=coco["list_file"], ann_file=coco["ann_file"]
    )
    assert ds.ids == coco["ids"]
    # default lookup: <images>/../annotations/instances_train2014.json
    ds2 = load_dataset("coco20k", coco["images_dir"], coco_list=coco["list_file"])
    assert ds2.ids == coco["ids"]


def test_coco_list_without_prefix_and_unknown_id(tmp_path: Path, coco: dict) -> None:
    lst = tmp_path / "list.txt"
    lst.write_text("COCO_train2014_000000000007.jpg\n\nCOCO_train2014_000000000555.jpg\n")
    ds = load_dataset("coco20k", coco["root"], coco_list=lst)
    assert ds.ids == ["7", "555"]
    assert ds[0].error is None
    assert ds[1].error is not None and "555" in ds[1].error  # listed, but not in the json
    assert ds[1].boxes.shape == (0, 4)


def test_coco_missing_inputs_name_the_path(tmp_path: Path, coco: dict) -> None:
    with pytest.raises(DatasetError, match="coco_list"):
        load_dataset("coco20k", coco["root"])
    missing_list = tmp_path / "missing.txt"
    with pytest.raises(DatasetError, match=str(missing_list)):
        load_dataset("coco20k", coco["root"], coco_list=missing_list)
    missing_root = tmp_path / "nococo"
    with pytest.raises(DatasetError, match=str(missing_root)):
        load_dataset("coco20k", missing_root, coco_list=coco["list_file"])
    missing_ann = tmp_path / "instances.json"
    with pytest.raises(DatasetError, match=str(missing_ann)):
        load_dataset("coco20k", coco["root"], coco_list=coco["list_file"], ann_file=missing_ann)
    lonely = tmp_path / "lonely" / "train2014"
    lonely.mkdir(parents=True)
    with pytest.raises(DatasetError, match="instances_train2014.json"):
        load_dataset("coco20k", lonely, coco_list=coco["list_file"])


def test_coco_broken_json_is_a_dataset_error(tmp_path: Path, coco: dict) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json"):
        load_dataset("coco20k", coco["root"], coco_list=coco["list_file"], ann_file=bad)
    no_images = tmp_path / "noimages.json"
    no_images.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetError, match="noimages.json"):
        load_dataset("coco20k", coco["root"], coco_list=coco["list_file"], ann_file=no_images)


def test_coco_no_hard_is_rejected(coco: dict) -> None:
    with pytest.raises(ValueError, match="no_hard"):
        load_dataset("coco20k", coco["root"], coco_list=coco["list_file"], no_hard=True)


def test_coco_image_id_parsing() -> None:
    assert coco_image_id("COCO_train2014_000000123456.jpg") == 123456
    assert coco_image_id("train2014/COCO_train2014_000000000042.jpg\n") == 42
    with pytest.raises(ValueError):
        coco_image_id("train2014/readme.txt")


def test_read_coco_list_rejects_bad_lines(tmp_path: Path) -> None:
    lst = tmp_path / "l.txt"
    lst.write_text("COCO_train2014_000000000007.jpg\nnot-a-name.jpg\n")
    with pytest.raises(DatasetError, match=r"l\.txt:2"):
        read_coco_list(lst)
    lst.write_text("\n\n")
    with pytest.raises(DatasetError, match="empty"):
        read_coco_list(lst)


@pytest.mark.skipif(not SHARED_COCO_LIST.is_file(), reason="shared COCO20k list not present")
def test_real_coco20k_list() -> None:
    names = read_coco_list(SHARED_COCO_LIST)
    assert len(names) == 19817
    ids = [coco_image_id(n) for n in names]
    assert len(set(ids)) == 19817
    assert names[0] == "train2014/COCO_train2014_000000560992.jpg"
    assert ids[0] == 560992
    assert ids[-1] == 60554


def _voc_with_objects(root: Path, size: tuple[int, int], boxes: list[tuple[str, ...]]) -> Path:
    """A one-image VOC2007 tree whose XML holds ``boxes`` (xmin, ymin, xmax, ymax text)."""
    voc = root / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    objects = "".join(
        f"<object><name>o{i}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for i, b in enumerate(boxes)
    )
    (voc / "Annotations" / "000001.xml").write_text(
        f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>"
        f"{objects}</annotation>"
    )
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    return voc


def test_voc_boxes_inverted_or_outside_the_image_are_kept_and_flagged(tmp_path: Path) -> None:
    voc = _voc_with_objects(
        tmp_path,
        (100, 80),
        [
            ("1", "1", "100", "80"),  # the whole image: fine
            ("60", "10", "40", "30"),  # xmin > xmax
            ("10", "50", "20", "40"),  # ymin > ymax
            ("0", "5", "20", "30"),  # xmin 0: VOC is 1-based
            ("50", "5", "101", "30"),  # beyond the width
            ("5", "5", "20", "81"),  # beyond the height
        ],
    )
    ds = load_dataset("voc07", voc)
    [sample] = list(ds)
    assert sample.error is None and len(sample.boxes) == 6  # kept, as LOST keeps them
    assert sample.boxes[1].tolist() == [59, 9, 40, 30]  # converted as usual
    issues = ds.box_issues
    assert [image_id for image_id, _ in issues] == ["000001"] * 5
    texts = [text for _, text in issues]
    assert texts[0] == "000001.xml: object 1 (o1) is inverted (xmin 60 ymin 10 xmax 40 ymax 30)"
    assert "object 2 (o2) is inverted" in texts[1]
    for text, i in zip(texts[2:], (3, 4, 5), strict=True):
        assert f"object {i} (o{i}) reaches outside the 100x80 image" in text
    assert sample.without_hard().issues == sample.issues
    assert load_dataset("voc07", _voc_with_objects(tmp_path / "ok", (9, 9), [])).box_issues == []
