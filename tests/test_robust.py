"""Nothing lost, nothing unbounded (issue 16), through the command line: decompression
bombs under --max-size in every command, runs that fail before their first image, resume
from anywhere, settings kept with the output, bad options, Ctrl-C at start-up.

Commands run in-process through ``discover.cli.main`` (``run_cli``); ``fast_models``
hands out the session model instead of building it again from the checkpoint file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CLI_METHOD_OPTS, MODEL, save, scene, write_lying_png
from fixtures_voc import write_voc_tree

from discover.outputs import read_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECT = (42, 28, 98, 84)


def model_args(checkpoint: str) -> list[str]:
    return ["--model", MODEL, "--checkpoint", checkpoint, "--device", "cpu", *CLI_METHOD_OPTS]


def one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, err)
    return lines[0]


# ----------------------------------------------------------------------- decompression bombs


def test_boxes_refuses_a_png_bomb_under_max_size(
    tmp_path, run_cli, fast_models, checkpoint, no_big_decode
):
    imgs = tmp_path / "imgs"
    write_lying_png(imgs / "bomb.png", 37000, 37000)
    save(imgs / "good.png", scene(140, 112, RECT))
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(
        "boxes", imgs, "--out", out, "--max-size", "140", *model_args(checkpoint)
    )
    assert code == 0, err
    bomb, good = read_jsonl(out)
    assert bomb["error"].startswith("too large: 37000x37000"), bomb
    assert "--max-size does not help" in bomb["error"]
    assert good["error"] is None and good["boxes"] == [list(RECT)]
    assert no_big_decode == []  # refused from the header: nothing was decoded


def test_eval_refuses_a_png_bomb_under_max_size(
    tmp_path, run_cli, fast_models, checkpoint, no_big_decode
):
    voc = write_voc_tree(tmp_path / "data", "2007")
    victim = voc["ids"][1]
    write_lying_png(voc["voc_dir"] / "JPEGImages" / f"{victim}.jpg", 37000, 37000)
    out = tmp_path / "eval"
    code, _, err = run_cli(
        "eval",
        "--dataset",
        "voc07",
        "--root",
        voc["devkit"],
        "--out",
        out,
        "--max-size",
        "112",
        *model_args(checkpoint),
    )
    assert code == 0, err
    by_id = {r["image"]: r for r in read_jsonl(out / "boxes.jsonl")}
    assert by_id[victim]["error"].startswith("too large: 37000x37000")
    failures = dict(map(tuple, json.loads((out / "summary.json").read_text())["failures"]))
    assert "too large" in failures[victim]
    assert no_big_decode == []


def test_inspect_advises_max_size_only_where_it_helps(
    tmp_path, run_cli, fast_models, checkpoint, huge_jpeg, no_big_decode
):
    imgs = tmp_path / "imgs"
    write_lying_png(imgs / "png120.png", 11000, 11000)  # 121 MP, a PNG: decoded whole
    (imgs / "jpeg400.jpg").symlink_to(huge_jpeg)  # 400 MP, a JPEG: decoded at 1/8 scale
    save(imgs / "good.png", scene(140, 112, RECT))
    args = ["inspect", imgs, "--model", MODEL, "--checkpoint", checkpoint]

    code, _, err = run_cli(*args, "--out", tmp_path / "native")
    assert code == 0, err
    warnings = {ln.split(":")[1].strip(): ln for ln in err.splitlines() if "warning" in ln}
    assert set(warnings) == {f"{imgs}/png120.png", f"{imgs}/jpeg400.jpg"}, err
    assert "pass --max-size to downscale it" in warnings[f"{imgs}/jpeg400.jpg"]
    assert "pass --max-size" not in warnings[f"{imgs}/png120.png"]
    assert "--max-size does not help" in warnings[f"{imgs}/png120.png"]

    code, _, err = run_cli(*args, "--max-size", "224", "--out", tmp_path / "small")
    assert code == 0, err
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and "png120.png" in warned[0], err  # the JPEG is read now
    assert "pass --max-size" not in warned[0] and "too large: 11000x11000" in warned[0]
    assert len(list((tmp_path / "small").glob("*.png"))) == 2  # jpeg400 and good
    assert no_big_decode == []


# ------------------------------------------------------------- failed starts keep the output


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of an output (a folder for voc) and its settings sidecar, by name."""
    files = sorted(out.rglob("*")) if out.is_dir() else [out]
    sidecar = out.with_name(out.name + ".settings.json")
    files += [sidecar] if sidecar.exists() else []
    return {p.name: p.read_bytes() for p in files if p.is_file()}


def _no_network(monkeypatch) -> None:
    """timm's hub download fails as it does without a network (and without a cache)."""
    import timm

    real = timm.create_model

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("[Errno -3] Temporary failure in name resolution")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "coco", "voc"])
def test_a_run_that_fails_before_its_first_image_keeps_the_output(
    tmp_path, run_cli, fast_models, checkpoint, monkeypatch, fmt
):
    imgs = tmp_path / "photos"
    save(imgs / "a.png", scene(140, 112, RECT))
    save(imgs / "b.png", scene(140, 112, RECT))
    out = tmp_path / ("keep" if fmt == "voc" else f"keep.{fmt}")
    code, _, err = run_cli("boxes", imgs, "--out", out, "--format", fmt, *model_args(checkpoint))
    assert code == 0, err
    before = _snapshot(out)
    assert len(before) >= 2  # the output and its settings (and the XMLs)
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    _no_network(monkeypatch)
    causes = {
        "the default model needs a network": ([], "cannot download the weights"),
        "a bad --checkpoint": (["--model", MODEL, "--checkpoint", text], "it is a text file"),
        "--device tpu": ([*model_args(checkpoint), "--device", "tpu"], "'tpu'"),
    }
    viz = tmp_path / "viz"
    for cause, (args, needle) in causes.items():
        code, _, err = run_cli("boxes", imgs, "--out", out, "--format", fmt, "--viz", viz, *args)
        assert code == 2, (cause, err)
        one_error_line(err, needle)
        assert _snapshot(out) == before, cause  # not emptied, not touched
        assert not viz.exists(), cause  # nor anything else created


def test_an_eval_that_fails_before_its_first_image_keeps_the_output(
    tmp_path, run_cli, fast_models, checkpoint, monkeypatch
):
    voc = write_voc_tree(tmp_path / "data", "2007")
    out = tmp_path / "eval"
    base = ["eval", "--dataset", "voc07", "--root", voc["devkit"], "--out", out, "--limit", "2"]
    code, _, err = run_cli(*base, *model_args(checkpoint))
    assert code == 0, err
    before = _snapshot(out)
    assert {"boxes.jsonl", "summary.json"} <= set(before)
    _no_network(monkeypatch)
    for args, needle in [
        ([], "cannot download the weights"),
        ([*model_args(checkpoint), "--device", "tpu"], "'tpu'"),
        (["--model", MODEL, "--checkpoint", tmp_path / "gone.pth"], "checkpoint not found"),
    ]:
        code, _, err = run_cli(*base, *args)
        assert code == 2, err
        one_error_line(err, needle)
        assert _snapshot(out) == before


# ---------------------------------------------------------------------- resume from anywhere


def _photos(folder: Path, n: int) -> list[Path]:
    return [save(folder / f"{i}.png", scene(140, 112, RECT)) for i in range(n)]


def _resume_line(err: str) -> str:
    [line] = [ln for ln in err.splitlines() if ln.startswith("resume:")]
    return line


def test_resume_from_another_working_directory(
    tmp_path, run_cli, fast_models, checkpoint, interrupt_run, monkeypatch
):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    _photos(work / "photos", 7)
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    interrupt_run(3)
    code, _, err = run_cli("boxes", "photos", "--out", "r.jsonl", *model_args(checkpoint))
    assert code == 130, err
    interrupt_run(None)
    monkeypatch.chdir(elsewhere)
    args = ["boxes", "../work/photos", "--out", "../work/r.jsonl", "--resume"]
    code, _, err = run_cli(*args, *model_args(checkpoint))
    assert code == 0, err
    assert _resume_line(err).startswith("resume: 3 done, 4 to go")
    names = [r["image"] for r in read_jsonl(work / "r.jsonl")]
    # one record per image, every name from the same place: the first run's directory
    assert names == [f"photos/{i}.png" for i in range(7)]
    sidecar = json.loads((work / "r.jsonl.settings.json").read_text())
    assert sidecar["cwd"] == str(work)
    # a third directory: still nothing to redo (the sidecar kept where names start)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        "boxes", "work/photos", "--out", "work/r.jsonl", "--resume", *model_args(checkpoint)
    )
    assert code == 0, err
    assert _resume_line(err).startswith("resume: 7 done, 0 to go")
    assert len(read_jsonl(work / "r.jsonl")) == 7


def test_resume_with_an_absolute_path_or_through_a_symlinked_folder(
    tmp_path, run_cli, fast_models, checkpoint, interrupt_run, chdir_tmp
):
    _photos(tmp_path / "photos", 7)
    (tmp_path / "link").symlink_to(tmp_path / "photos", target_is_directory=True)
    interrupt_run(2)
    code, _, err = run_cli("boxes", "photos", "--out", "r.jsonl", *model_args(checkpoint))
    assert code == 130, err
    interrupt_run(None)
    resume = ["--out", "r.jsonl", "--resume", *model_args(checkpoint)]
    code, _, err = run_cli("boxes", tmp_path / "photos", *resume)  # absolute this time
    assert code == 0, err
    assert _resume_line(err).startswith("resume: 2 done, 5 to go")
    code, _, err = run_cli("boxes", "link", *resume)  # the same folder through a link
    assert code == 0, err
    assert _resume_line(err).startswith("resume: 7 done, 0 to go")
    records = read_jsonl(tmp_path / "r.jsonl")
    assert len(records) == 7
    assert len({Path(r["image"]).resolve() for r in records}) == 7  # no image twice


def test_two_links_to_one_file_are_two_images(tmp_path, run_cli, fast_models, checkpoint):
    photos = tmp_path / "photos"
    save(photos / "a.png", scene(140, 112, RECT))
    (photos / "alias.png").symlink_to(photos / "a.png")
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli("boxes", photos, "--out", out, *model_args(checkpoint))
    assert code == 0, err
    assert [Path(r["image"]).name for r in read_jsonl(out)] == ["a.png", "alias.png"]
    code, _, err = run_cli("boxes", photos, "--out", out, "--resume", *model_args(checkpoint))
    assert code == 0 and _resume_line(err).startswith("resume: 2 done, 0 to go"), err


# ------------------------------------------------------------------ settings kept with output


def _sidecar(out: Path, fmt: str) -> Path:
    return out / "settings.json" if fmt == "voc" else out.with_name(out.name + ".settings.json")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "coco", "voc"])
def test_resume_refuses_other_settings_unless_allowed(
    tmp_path, run_cli, fast_models, checkpoint, fmt
):
    photos = _photos(tmp_path / "photos", 3)
    out = tmp_path / ("voc" if fmt == "voc" else f"r.{fmt}")
    common = ["--out", out, "--format", fmt, *model_args(checkpoint)]
    code, _, err = run_cli("boxes", *photos[:2], *common, "--k-patches", "100")
    assert code == 0, err
    sidecar = json.loads(_sidecar(out, fmt).read_text())
    assert sidecar["format"] == "regdiscover.settings/1"
    assert sidecar["settings"]["method_params"]["k_patches"] == 100
    if fmt == "coco":  # COCO's own info holds them too
        info = json.loads(out.read_text())["info"]
        assert info["settings"] == sidecar["settings"]
    before = _snapshot(out)

    code, _, err = run_cli("boxes", photos[0].parent, *common, "--k-patches", "50", "--resume")
    assert code == 2
    line = one_error_line(err, f"--resume: {out} was written with other settings")
    assert "method_params" in line and "'k_patches': 100" in line and "'k_patches': 50" in line
    assert "--allow-settings-change" in line
    assert _snapshot(out) == before  # refused before anything was written

    code, _, err = run_cli("boxes", photos[0].parent, *common, "--k-patches", "100", "--resume")
    assert code == 0, err  # the same settings: resumed
    assert _resume_line(err).startswith("resume: 2 done, 1 to go")

    save(photos[0].parent / "3.png", scene(140, 112, RECT))
    code, _, err = run_cli(
        "boxes", photos[0].parent, *common, "--k-patches", "50", "--resume",
        "--allow-settings-change",
    )  # fmt: skip
    assert code == 0, err
    assert "warning: resume: settings changed (method_params); mixing them as asked" in err
    from discover.outputs import read_records

    assert sorted(Path(r["image"]).name for r in read_records(out, fmt)) == [
        f"{i}.png" for i in range(4)
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "voc"])
def test_a_corrupt_line_in_the_middle_keeps_the_records_after_it(
    tmp_path, run_cli, fast_models, checkpoint, fmt, monkeypatch
):
    import discover.pipeline

    photos = _photos(tmp_path / "photos", 4)
    out = tmp_path / ("voc" if fmt == "voc" else "r.jsonl")
    args = ["boxes", photos[0].parent, "--out", out, "--format", fmt, *model_args(checkpoint)]
    code, _, err = run_cli(*args)
    assert code == 0, err
    lines_file = out / "index.jsonl" if fmt == "voc" else out
    lines = lines_file.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    lines[1] = '{"image": "photos/1.png", "wid\x00 garbage\n'  # a damaged line, not the last
    lines_file.write_text("".join(lines))

    ran: list[str] = []
    real_run = discover.pipeline.Discoverer.run

    def counting(self, paths):
        paths = list(paths)
        ran.extend(Path(p).name for p in paths)
        return real_run(self, paths)

    monkeypatch.setattr(discover.pipeline.Discoverer, "run", counting)
    code, _, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert _resume_line(err).startswith("resume: 3 done, 1 to go")
    assert "1 unreadable line(s) skipped" in _resume_line(err)
    assert ran == ["1.png"]  # 2.png and 3.png, after the damaged line, were kept
    from discover.outputs import read_records

    assert sorted(Path(r["image"]).name for r in read_records(out, fmt)) == [
        f"{i}.png" for i in range(4)
    ]


def test_eval_resume_refuses_other_settings_unless_allowed(
    tmp_path, run_cli, fast_models, checkpoint
):
    voc = write_voc_tree(tmp_path / "data", "2007")
    out = tmp_path / "eval"
    base = ["eval", "--dataset", "voc07", "--root", voc["devkit"], "--out", out]
    code, _, err = run_cli(*base, "--limit", "2", *model_args(checkpoint))
    assert code == 0, err
    assert json.loads((out / "boxes.jsonl.settings.json").read_text())["settings"]["layer"] == 11
    before = _snapshot(out)
    code, _, err = run_cli(*base, "--resume", *model_args(checkpoint), "--k-patches", "50")
    assert code == 2
    one_error_line(err, "--resume:", "other settings", "--allow-settings-change")
    assert _snapshot(out) == before
    code, _, err = run_cli(
        *base, "--resume", "--allow-settings-change", *model_args(checkpoint), "--k-patches", "50"
    )
    assert code == 0, err
    assert "settings changed (method_params)" in err
    assert len(read_jsonl(out / "boxes.jsonl")) == len(voc["ids"])


# ------------------------------------------------------------------ --min-score drops, goes on


def test_min_score_drops_a_weak_object_and_keeps_searching(
    tmp_path, run_cli, fast_models, checkpoint, monkeypatch
):
    """Three objects found in turn, the middle one weak: --min-score used to stop the
    search there and lose the third. A scripted method fixes what is found."""
    import torch

    from discover.boxes import mask_box
    from discover.methods import Method, Params
    from discover.methods import base as methods_base

    regions = [((0, 3), (0, 3), 2.0), ((3, 5), (4, 7), 0.1), ((5, 8), (7, 10), 1.0)]

    class Found:
        def __init__(self, mask: torch.Tensor, score: float) -> None:
            self.mask, self.score, self.box = mask, score, mask_box(mask)
            self.seed = int(torch.nonzero(mask.reshape(-1))[0])

    def scripted(feats, grid, *, exclude=None, **params):
        h, w = grid
        taken = torch.zeros(h * w, dtype=torch.bool) if exclude is None else exclude
        for (r0, r1), (c0, c1), score in regions:  # the first region not found yet
            mask = torch.zeros(h, w, dtype=torch.bool)
            mask[r0:r1, c0:c1] = True
            if not (mask.reshape(-1) & taken.reshape(-1).cpu()).any():
                return Found(mask, score)
        raise methods_base.EmptyGraphError("nothing left")

    monkeypatch.setitem(methods_base._REGISTRY, "_three", Method("_three", scripted, Params))
    save(tmp_path / "a.png", scene(140, 112, RECT))  # 8 x 10 patches of 14 px
    out = tmp_path / "r.jsonl"
    model = ["--model", MODEL, "--checkpoint", checkpoint, "--method", "_three"]
    code, _, err = run_cli(
        "boxes", tmp_path / "a.png", "--out", out, *model, "--max-objects", "3",
        "--min-score", "0.5",
    )  # fmt: skip
    assert code == 0, err
    [rec] = read_jsonl(out)
    assert rec["boxes"] == [[0, 0, 42, 42], [98, 70, 140, 112]]  # first and third
    assert rec["scores"] == [2.0, 1.0]
    code, _, err = run_cli("boxes", tmp_path / "a.png", "--out", out, *model, "--max-objects", "3")
    assert code == 0, err
    assert len(read_jsonl(out)[0]["boxes"]) == 3  # without --min-score the weak one stays


# ------------------------------------------------------------------------------ bad options

_BAD_RUN_OPTIONS = [
    (["--device", "tpu"], "'tpu'"),
    (["--device", "mps"], "device 'mps'"),
    (["--device", "cuda:3"], "device 'cuda:3'"),
    (["--method", "tokencut", "--tau", "0"], "--tau"),
    (["--method", "tokencut", "--tau", "1"], "--tau"),
    (["--method", "tokencut", "--tau", "1.5"], "--tau"),
    (["--threads", "0"], "--threads"),
    (["--threads", "-2"], "--threads"),
    (["--workers", "0"], "--workers"),
    (["--max-size", "5"], "--max-size 5 is smaller than one 14-pixel patch"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-objects", "0"], "--max-objects must be >= 1"),
    (["--max-patches", "-1"], "--max-patches must be >= 0"),
    (["--min-score", "nan"], "--min-score"),
    (["--k-patches", "0"], "--k-patches"),
    (["--gram-bias", "lots"], "--gram-bias"),
    (["--features", "nope"], "features"),
    (["--precision", "fp8"], "precision"),
    (["--bogus"], "No such option: --bogus"),
]


def _no_work(monkeypatch) -> list[str]:
    """Record any attempt to list images or build a model: a bad option must stop first."""
    import discover.backbone
    import discover.runs

    work: list[str] = []

    def spy(name, real):
        def record(*args, **kwargs):
            work.append(name)
            return real(*args, **kwargs)

        return record

    monkeypatch.setattr(
        discover.runs, "iter_image_paths", spy("list", discover.runs.iter_image_paths)
    )
    monkeypatch.setattr(discover.backbone, "create_vit", spy("model", discover.backbone.create_vit))
    return work


@pytest.mark.parametrize(
    ("args", "needle"), _BAD_RUN_OPTIONS, ids=[" ".join(a) for a, _ in _BAD_RUN_OPTIONS]
)
def test_boxes_bad_options_are_one_line_before_any_work(
    tmp_path, run_cli, monkeypatch, args, needle
):
    import torch

    if args == ["--device", "cuda:3"] and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    save(tmp_path / "a.png", scene(28, 28, (0, 0, 14, 14)))
    work = _no_work(monkeypatch)
    out = tmp_path / "r.jsonl"
    code, stdout, err = run_cli("boxes", tmp_path / "a.png", "--out", out, "--model", MODEL, *args)
    assert code == 2, err
    one_error_line(err, needle)
    assert stdout == "" and work == [] and not out.exists() and not _sidecar(out, "jsonl").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    _BAD_RUN_OPTIONS[:10],
    ids=[" ".join(a) for a, _ in _BAD_RUN_OPTIONS[:10]],
)
def test_eval_bad_options_are_one_line_before_any_work(
    tmp_path, run_cli, monkeypatch, args, needle
):
    # the dataset is missing too: the option's error must come first
    work = _no_work(monkeypatch)
    out = tmp_path / "eval"
    code, _, err = run_cli(
        "eval",
        "--dataset",
        "voc07",
        "--root",
        tmp_path / "none",
        "--out",
        out,
        "--model",
        MODEL,
        *args,
    )
    assert code == 2, err
    one_error_line(err, needle)
    assert work == [] and not out.exists()


def test_out_dash_and_unknown_format_are_refused(tmp_path, run_cli, monkeypatch):
    work = _no_work(monkeypatch)
    for args, needle in [
        (["--out", "-"], "--out -: writing to standard output is not supported"),
        (["--format", "xml"], "--format must be one of jsonl, coco, csv, voc"),
    ]:
        code, stdout, err = run_cli("boxes", tmp_path / "nothing-here", *args)
        assert code == 2, err
        one_error_line(err, needle)
        assert stdout == "" and not (tmp_path / "-").exists()
    assert work == []


@pytest.mark.parametrize("command", ["inspect", "find-registers"])
def test_inspect_and_find_registers_map_errors_the_same_way(
    tmp_path, run_cli, monkeypatch, command, checkpoint
):
    work = _no_work(monkeypatch)
    out = tmp_path / "out"
    missing = tmp_path / "no photos"
    base = [command, missing, "--out", out, "--model", MODEL]
    import torch

    cases = [
        (["--device", "tpu"], "'tpu'"),
        (["--max-size", "5"], "--max-size 5 is smaller than one 14-pixel patch"),
        (["--threshold", "lots"], "--threshold must be"),
    ]
    if torch.cuda.device_count() <= 3:
        cases.append((["--device", "cuda:3"], "device 'cuda:3'"))
    cases.append(([], f"no such file or folder: {missing}"))
    for args, needle in cases:
        code, stdout, err = run_cli(*base, *args)
        assert code == 2, (args, err)
        one_error_line(err, needle)
        assert stdout == "" and not out.exists()
    assert work == ["list"]  # only the last one got as far as listing images
    save(tmp_path / "a.png", scene(28, 28, (0, 0, 14, 14)))
    code, _, err = run_cli(
        command,
        tmp_path / "a.png",
        "--out",
        out,
        "--model",
        MODEL,
        "--checkpoint",
        tmp_path / "gone.pth",
    )
    assert code == 2
    one_error_line(err, "checkpoint not found")
    assert not out.exists()


# ------------------------------------------------------------------- Ctrl-C while starting


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["boxes", "eval", "inspect", "find-registers"])
def test_ctrl_c_while_the_model_loads_is_one_line_exit_130(
    tmp_path, run_cli, monkeypatch, command, checkpoint
):
    import discover.backbone

    save(tmp_path / "a.png", scene(28, 28, (0, 0, 14, 14)))
    voc = write_voc_tree(tmp_path / "data", "2007") if command == "eval" else None
    out = tmp_path / "out"
    out.mkdir()
    (out / "boxes.jsonl").write_text('{"image": "kept"}\n')
    before = _snapshot(out)
    monkeypatch.setattr(discover.backbone, "create_vit", _ctrl_c)
    args = {
        "boxes": ["boxes", tmp_path / "a.png", "--out", out / "boxes.jsonl"],
        "eval": ["eval", "--dataset", "voc07", "--root", voc and voc["devkit"], "--out", out],
        "inspect": ["inspect", tmp_path / "a.png", "--out", out],
        "find-registers": ["find-registers", tmp_path / "a.png", "--out", out / "n.json"],
    }[command]
    code, stdout, err = run_cli(*args, "--model", MODEL, "--checkpoint", checkpoint)
    assert code == 130
    assert err.strip() == "interrupted" and stdout == ""
    assert _snapshot(out) == before  # nothing written, nothing emptied


def test_ctrl_c_while_a_command_imports_its_modules(tmp_path, run_cli, monkeypatch):
    """The commands import torch & co. inside: a Ctrl-C there used to print a traceback."""
    import sys

    class CtrlCOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == "discover.runs":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "discover.runs")
    monkeypatch.setattr(sys, "meta_path", [CtrlCOnImport(), *sys.meta_path])
    save(tmp_path / "a.png", scene(28, 28, (0, 0, 14, 14)))
    code, stdout, err = run_cli("boxes", tmp_path / "a.png", "--out", tmp_path / "r.jsonl")
    assert code == 130
    assert err.strip() == "interrupted" and stdout == ""
    assert not (tmp_path / "r.jsonl").exists()


def test_ctrl_c_while_the_command_line_itself_starts(tmp_path):
    """A Ctrl-C while ``discover.cli`` imports (typer, rich) ends as one line, 130: the
    console script's ``from discover.cli import main`` exits instead of a traceback."""
    import os
    import subprocess
    import sys

    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def ctrl_c(name, *args, **kwargs):\n"
        "    if name == 'typer':\n"
        "        raise KeyboardInterrupt\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = ctrl_c\n"
        "from discover.cli import main\n"
        "main()\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code, "boxes", "x"], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "interrupted\n" and proc.stdout == ""


def test_the_command_line_imports_no_torch_before_a_command_runs():
    """What makes --help fast and a Ctrl-C at start-up catchable: torch is imported
    inside the commands, not by ``import discover.cli``."""
    import os
    import subprocess
    import sys

    heavy = "('torch', 'timm', 'cv2', 'numpy')"
    code = f"import sys, discover.cli; print(sorted(m for m in {heavy} if m in sys.modules))"
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------ what eval warns about


def test_eval_warns_about_bad_ground_truth_boxes_and_names_missing_files(
    tmp_path, run_cli, fast_models, checkpoint
):
    voc = write_voc_tree(tmp_path / "data", "2007")
    flagged, missing = voc["ids"][0], voc["ids"][2]
    xml = voc["voc_dir"] / "Annotations" / f"{flagged}.xml"
    outside = (
        "<object><name>kite</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>500</xmax>"
        "<ymax>20</ymax></bndbox></object></annotation>"
    )
    xml.write_text(xml.read_text().replace("</annotation>", outside))
    jpeg = voc["voc_dir"] / "JPEGImages" / f"{missing}.jpg"
    jpeg.unlink()
    out = tmp_path / "eval"
    code, _, err = run_cli("eval", "--dataset", "voc07", "--root", voc["devkit"], "--out", out,
                           *model_args(checkpoint))  # fmt: skip
    assert code == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    [gt] = [w for w in warnings if "ground-truth" in w]
    assert gt.startswith("warning: 1 ground-truth box(es) in 1 image(s) are inverted or reach")
    assert f"the first: {flagged}: {flagged}.xml: object " in gt and "(kite) reaches outside" in gt
    assert f"warning: {missing}: file not found ({jpeg})" in warnings  # names the file
    summary = json.loads((out / "summary.json").read_text())
    [[image_id, issue]] = summary["ground_truth_issues"]
    assert image_id == flagged and "xmax 500" in issue
    assert "1 ground-truth boxes flagged" in err.strip().splitlines()[-1]
    # the box is kept, as LOST keeps it: the image is scored against it like any other
    assert summary["evaluated"] == len(voc["ids"])


# ------------------------------------------------------------------ what the terminal shows


def test_a_newline_in_a_file_name_keeps_the_warning_on_one_line(tmp_path, run_cli, fast_models,
                                                               checkpoint):  # fmt: skip
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "two\nlines.png").write_bytes(b"")
    (photos / "carriage\rreturn.png").write_bytes(b"")
    save(photos / "good.png", scene(140, 112, RECT))
    code, _, err = run_cli("boxes", photos, "--out", tmp_path / "r.jsonl", *model_args(checkpoint))
    assert code == 0, err
    lines = err.splitlines()
    assert f"warning: {photos}/two\\nlines.png: empty file (0 bytes)" in lines
    assert f"warning: {photos}/carriage\\rreturn.png: empty file (0 bytes)" in lines
    assert "\r" not in err.replace("\r\n", "\n").split("boxing")[0]
    # the output keeps the real names
    names = {Path(r["image"]).name for r in read_jsonl(tmp_path / "r.jsonl")}
    assert names == {"two\nlines.png", "carriage\rreturn.png", "good.png"}


def test_boxing_one_image_prints_its_boxes(tmp_path, run_cli, fast_models, checkpoint):
    image = save(tmp_path / "a.png", scene(140, 112, RECT))
    code, stdout, err = run_cli("boxes", image, "--out", tmp_path / "r.jsonl",
                                *model_args(checkpoint))  # fmt: skip
    assert code == 0, err
    [rec] = read_jsonl(tmp_path / "r.jsonl")
    lines = [ln for ln in err.splitlines() if ln.startswith(image.as_posix())]
    assert lines == [f"{image.as_posix()}: {list(RECT)} ({rec['scores'][0]:.2f})"]
    assert err.strip().splitlines()[-1].startswith("1 images, 1 boxes, 0 failures")
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    code, _, err = run_cli("boxes", bad, "--out", tmp_path / "r2.jsonl", *model_args(checkpoint))
    assert code == 0 and f"{bad.as_posix()}: empty file (0 bytes)" in err.splitlines()


def test_version(run_cli):
    from discover.version import __version__

    for flag in ("--version",):
        code, stdout, err = run_cli(flag)
        assert code == 0 and stdout == f"regdiscover {__version__}\n" and err == ""


def test_the_help_at_80_columns_shows_every_option_whole(run_cli, monkeypatch):
    """At 80 columns rich's help tables used to cut help texts and defaults off."""
    import typer

    from discover.cli import app

    monkeypatch.setenv("COLUMNS", "80")
    group = typer.main.get_command(app)
    for name in ("boxes", "eval", "inspect", "find-registers"):
        code, stdout, err = run_cli(name, "--help")
        assert code == 0, err
        assert max(len(line) for line in stdout.splitlines()) <= 80, name
        flat = " ".join(stdout.split())
        options = [p for p in group.commands[name].params if p.param_type_name == "option"]
        assert len(options) > 3
        for param in options:
            for opt in param.opts:
                assert opt in flat, (name, opt)
            assert " ".join(param.help.split()) in flat, (name, param.opts)
            if param.show_default and param.default not in (None, False):
                assert f"[default: {param.default}" in flat, (name, param.opts)
    code, stdout, _ = run_cli("boxes", "--help")
    assert "[default: jsonl]" in " ".join(stdout.split())
    assert "else fp32" in stdout  # --precision: see test_bf16_needs_native_support


def test_package_warnings_are_one_line(tmp_path, run_cli, fast_models, checkpoint, monkeypatch):
    import discover.backbone

    monkeypatch.setattr(discover.backbone, "cpu_supports_bf16", lambda: False)
    image = save(tmp_path / "a.png", scene(140, 112, RECT))
    code, _, err = run_cli("boxes", image, "--out", tmp_path / "r.jsonl", "--precision", "bf16",
                           *model_args(checkpoint))  # fmt: skip
    assert code == 0, err
    assert err.splitlines()[0] == "warning: this CPU has no native bf16 support; using fp32"
    assert "UserWarning" not in err
    settings = json.loads((tmp_path / "r.jsonl.settings.json").read_text())["settings"]
    assert settings["precision"] == "fp32"  # what ran, not what was asked


def test_resume_without_a_settings_file_warns(tmp_path, run_cli, fast_models, checkpoint):
    photos = _photos(tmp_path / "photos", 2)
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli("boxes", photos[0], "--out", out, *model_args(checkpoint))
    assert code == 0, err
    _sidecar(out, "jsonl").unlink()  # as an older version left it
    code, _, err = run_cli("boxes", photos[0].parent, "--out", out, "--resume",
                           *model_args(checkpoint))  # fmt: skip
    assert code == 0, err
    assert "warning: resume: " in err and "records no settings" in err
    assert _resume_line(err).startswith("resume: 1 done, 1 to go")
    assert _sidecar(out, "jsonl").exists()  # written again with the next record


def test_an_option_checked_against_the_model_still_writes_nothing(
    tmp_path, run_cli, fast_models, checkpoint
):
    photos = _photos(tmp_path / "photos", 1)
    out = tmp_path / "keep.jsonl"
    out.write_text('{"image": "kept"}\n')
    code, _, err = run_cli("boxes", photos[0], "--out", out, "--layer", "99",
                           *model_args(checkpoint))  # fmt: skip
    assert code == 2
    one_error_line(err, "99")
    assert out.read_text() == '{"image": "kept"}\n' and not _sidecar(out, "jsonl").exists()
