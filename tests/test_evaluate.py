"""CorLoc evaluation runs (discover.evaluate, ``discover eval``, scripts/eval_voc.py) on
the tiny VOC tree of ``fixtures_voc`` with the random-init checkpoint: the files written,
the summary, failures, --limit, --resume, --no-hard, Ctrl-C and missing datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CLI_METHOD_OPTS, MODEL
from fixtures_voc import write_voc_tree

from discover.corloc import is_correct
from discover.outputs import read_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "dataset",
    "model",
    "split_size",
    "evaluated",
    "correct",
    "corloc",
    "object_recall",
    "failures",
    "settings",
    "time_s",
    "images_per_s",
}


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> dict:
    return write_voc_tree(tmp_path_factory.mktemp("voc"), "2007")


def eval_args(voc: dict, out: Path, checkpoint: str, *extra: str) -> list:
    return [
        "eval",
        "--dataset",
        "voc07",
        "--root",
        voc["devkit"],
        "--out",
        out,
        "--model",
        MODEL,
        "--checkpoint",
        checkpoint,
        *CLI_METHOD_OPTS,
        *extra,
    ]


def check_corloc(summary: dict, records: list[dict], voc: dict) -> None:
    """The summary's numbers follow from the stored boxes (top box, IoU >= 0.5)."""
    correct = 0
    for r in records:
        gt = voc["expected"].get(r["image"])
        if r["error"] is None and r["boxes"] and gt is not None:
            correct += is_correct(np.asarray(r["boxes"][0]), gt["boxes"])
    assert summary["correct"] == correct
    assert summary["evaluated"] == len(records)
    assert summary["corloc"] == pytest.approx(100.0 * correct / len(records), abs=1e-3)


def test_eval_script_end_to_end(voc, checkpoint, tmp_path, full_run):
    """The real script, in a fresh process, loading the checkpoint file itself."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    args = [str(a) for a in eval_args(voc, out, checkpoint, "--threads", "1")[1:]]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval_voc.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out / "boxes.jsonl")
    assert [r["image"] for r in records if r["error"] is None] == [
        i for i in voc["ids"] if i not in voc["malformed"]
    ]
    [bad] = [r for r in records if r["image"] in voc["malformed"]]
    assert "cannot parse" in bad["error"] and bad["boxes"] == []
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["dataset"] == "voc07" and summary["model"] == MODEL
    assert summary["split_size"] == len(voc["ids"]) == summary["evaluated"]
    assert summary["settings"]["checkpoint"] == checkpoint
    assert summary["settings"]["method"] == "lost" and summary["settings"]["limit"] is None
    assert summary["settings"]["max_size"] is None  # eval: the native size (the protocol)
    assert summary["time_s"] > 0 and summary["images_per_s"] > 0
    assert [f[0] for f in summary["failures"]] == voc["malformed"]
    check_corloc(summary, records, voc)
    assert f"voc07: CorLoc {summary['corloc']:.2f}" in proc.stderr
    assert "warning: 000031: cannot parse" in proc.stderr
    # the weights read from the file are those of the in-process model: same answers
    assert records == full_run[1]
    assert summary["corloc"] == full_run[0]["corloc"]


_FULL: dict[str, tuple[dict, list]] = {}


@pytest.fixture
def full_run(voc, checkpoint, tmp_path_factory, run_cli, fast_models) -> tuple[dict, list]:
    """Summary and records of a plain in-process run over the whole tree (run once)."""
    if "run" not in _FULL:
        out = tmp_path_factory.mktemp("full")
        code, _, err = run_cli(*eval_args(voc, out, checkpoint))
        assert code == 0, err
        _FULL["run"] = (
            json.loads((out / "summary.json").read_text()),
            read_jsonl(out / "boxes.jsonl"),
        )
    return _FULL["run"]


def test_eval_in_process_summary(full_run, voc):
    summary, records = full_run
    assert summary["evaluated"] == len(voc["ids"])
    check_corloc(summary, records, voc)


def test_eval_limit(voc, checkpoint, tmp_path, run_cli, fast_models):
    code, _, err = run_cli(*eval_args(voc, tmp_path, checkpoint, "--limit", "3"))
    assert code == 0, err
    records = read_jsonl(tmp_path / "boxes.jsonl")
    assert sorted(r["image"] for r in records) == sorted(voc["ids"][:3])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["evaluated"] == 3 and summary["split_size"] == len(voc["ids"])
    assert summary["settings"]["limit"] == 3


def test_eval_resume_skips_done_images_and_gives_the_same_corloc(
    voc, checkpoint, tmp_path, run_cli, fast_models, full_run, monkeypatch
):
    import discover.pipeline

    summary, records = full_run
    boxes = tmp_path / "boxes.jsonl"
    lines = [json.dumps(r) + "\n" for r in records]
    boxes.write_text("".join(lines[:3]) + lines[3][:20])  # three done, one torn
    ran: list[str] = []
    real_run = discover.pipeline.Discoverer.run

    def counting(self, paths):
        paths = list(paths)
        ran.extend(Path(p).stem for p in paths)
        return real_run(self, paths)

    monkeypatch.setattr(discover.pipeline.Discoverer, "run", counting)
    code, _, err = run_cli(*eval_args(voc, tmp_path, checkpoint, "--resume"))
    assert code == 0, err
    done = {r["image"] for r in records[:3]}
    assert not done & set(ran)  # the model did not see them again
    assert set(ran) == {i for i in voc["ids"] if i not in done and i not in voc["malformed"]}
    again = read_jsonl(boxes)
    assert sorted(r["image"] for r in again) == sorted(voc["ids"])  # no duplicate
    resumed = json.loads((tmp_path / "summary.json").read_text())
    for key in ("corloc", "correct", "evaluated", "object_recall"):
        assert resumed[key] == summary[key], key
    assert sorted(map(tuple, resumed["failures"])) == sorted(map(tuple, summary["failures"]))


def test_eval_ctrl_c_keeps_the_done_images(
    voc, checkpoint, tmp_path, run_cli, fast_models, full_run, interrupt_run
):
    interrupt_run(2)
    code, _, err = run_cli(*eval_args(voc, tmp_path, checkpoint))
    assert code == 130
    assert "interrupted" in err and "--resume" in err
    kept = read_jsonl(tmp_path / "boxes.jsonl")
    assert len(kept) == 2 + len(voc["malformed"])  # two images and the failed annotation
    assert not (tmp_path / "summary.json").exists()
    interrupt_run(None)
    code, _, err = run_cli(*eval_args(voc, tmp_path, checkpoint, "--resume"))
    assert code == 0, err
    assert json.loads((tmp_path / "summary.json").read_text())["corloc"] == full_run[0]["corloc"]


def test_eval_no_hard(voc, checkpoint, tmp_path, run_cli, fast_models):
    code, _, err = run_cli(*eval_args(voc, tmp_path, checkpoint, "--no-hard"))
    assert code == 0, err
    records = read_jsonl(tmp_path / "boxes.jsonl")
    ids = {r["image"] for r in records}
    assert ids == set(voc["ids"]) - set(voc["all_hard"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["split_size"] == len(voc["ids"]) - len(voc["all_hard"])
    assert summary["settings"]["no_hard"] is True
    assert summary["evaluated"] == len(ids)


def test_eval_missing_or_bad_dataset_is_a_one_line_error(voc, tmp_path, run_cli):
    missing = tmp_path / "nowhere" / "VOCdevkit"
    code, _, err = run_cli("eval", "--dataset", "voc07", "--root", missing, "--out", tmp_path)
    assert code == 2
    assert err.strip() == f"error: dataset root not found: {missing}"
    code, _, err = run_cli("eval", "--dataset", "voc12", "--root", voc["devkit"])
    assert code == 2 and "VOC2012" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("eval", "--dataset", "voc99", "--root", voc["devkit"])
    assert code == 2 and "unknown dataset" in err and "Traceback" not in err
    code, _, err = run_cli(
        "eval", "--dataset", "coco20k", "--root", voc["devkit"], "--no-hard", "--coco-list", "x"
    )
    assert code == 2 and "no_hard" in err


def test_eval_output_folder_that_is_a_file(voc, tmp_path, run_cli):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli(
        "eval", "--dataset", "voc07", "--root", voc["devkit"], "--out", tmp_path / "file"
    )
    assert code == 2
    assert err.startswith("error: cannot create output folder") and str(tmp_path / "file") in err
