"""The method contract (discover.methods): plug-in registration, parameters, defaults.

A method that lives only in this file is registered with one call and then used from
``Discoverer`` and from the ``discover`` command line, like a built-in.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import MODEL, save, scene

from discover.boxes import mask_box
from discover.methods import (
    INPUTS,
    EmptyGraphError,
    Method,
    Params,
    check_inputs,
    get_method,
    method_names,
    register,
    unregister,
)
from discover.outputs import read_jsonl
from discover.pipeline import Discoverer


@dataclass(frozen=True)
class CornerParams(Params):
    size: int = 2
    corner: str = "top-left"

    def validate(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.corner not in ("top-left", "bottom-right"):
            raise ValueError(f"corner must be top-left or bottom-right, got {self.corner!r}")


@dataclass(frozen=True, eq=False)
class _Result:
    seed: int
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float


SEEN: list[dict] = []


def corner(feats, grid, *, exclude=None, cls_attention, **params):
    """A square of ``size`` patches in a corner; records the attention it was given."""
    h, w, exclude = check_inputs(feats, grid, exclude)
    p = CornerParams.build(params, "_corner")
    SEEN.append({"attention": tuple(cls_attention.shape), "params": p})
    mask = torch.zeros(h, w, dtype=torch.bool)
    s = min(p.size, h, w)
    if p.corner == "top-left":
        mask[:s, :s] = True
    else:
        mask[h - s :, w - s :] = True
    if exclude is not None:
        mask &= ~exclude.reshape(h, w).cpu()
    if not bool(mask.any()):
        raise EmptyGraphError("corner already taken")
    seed = int(torch.nonzero(mask.reshape(-1))[0])
    return _Result(seed, mask, mask_box(mask), 1.0)


@pytest.fixture
def corner_method():
    m = register(
        Method(
            "_corner",
            corner,
            CornerParams,
            needs=frozenset({"cls_attention"}),
            defaults={"dinov2": {"size": 3}},
        )
    )
    SEEN.clear()
    yield m
    unregister("_corner")


def test_a_test_method_works_from_discoverer(backbone, corner_method):
    assert "_corner" in method_names() and get_method("_corner") is corner_method
    img = scene(140, 112, (0, 0, 14, 14))  # 10 x 8 patches
    res = Discoverer(backbone=backbone, method="_corner").process(img)
    assert res.ok, res.error
    # the calibrated default of the family (size 3 for dinov2) applies
    assert res.detections[0].box == (0, 0, 42, 42)
    heads = backbone.num_heads
    assert SEEN[-1]["attention"] == (heads, 80)  # [heads, patches]: registers split off
    res = Discoverer(backbone=backbone, method="_corner", size=1, corner="bottom-right")
    det = res.process(img).detections[0]
    assert det.box == (126, 98, 140, 112)
    with pytest.raises(ValueError, match="invalid options for _corner.*k_patches"):
        Discoverer(backbone=backbone, method="_corner", k_patches=3)
    with pytest.raises(ValueError, match="size must be >= 1"):
        Discoverer(backbone=backbone, method="_corner", size=0)


def test_a_test_method_works_from_the_cli(
    tmp_path, run_cli, fast_models, checkpoint, corner_method
):
    save(tmp_path / "a.png", scene(140, 112, (0, 0, 14, 14)))
    out = tmp_path / "r.jsonl"
    args = ["boxes", tmp_path / "a.png", "--model", MODEL, "--checkpoint", checkpoint]
    code, _, err = run_cli(*args, "--out", out, "--method", "_corner", "-p", "size=2")
    assert code == 0, err
    assert read_jsonl(out)[0]["boxes"] == [[0, 0, 28, 28]]
    assert SEEN[-1]["params"] == CornerParams(size=2)
    for bad, needle in [(["-p", "size=two"], "size must be an integer"),
                        (["-p", "wings=2"], "has no parameter 'wings'"),
                        (["-p", "size"], "KEY=VALUE"),
                        (["--tau", "0.3"], "--tau: _corner has no parameter 'tau'")]:  # fmt: skip
        code, _, err = run_cli(*args, "--out", out, "--method", "_corner", *bad)
        assert code == 2 and needle in err, (bad, err)


def test_registry_refuses_a_second_method_of_the_same_name(corner_method):
    with pytest.raises(ValueError, match="registered already"):
        register(Method("_corner", corner, CornerParams))
    with pytest.raises(ValueError, match="unknown inputs"):
        Method("_x", corner, CornerParams, needs=frozenset({"telepathy"}))
    with pytest.raises(ValueError, match="unknown keys"):
        Method("_x", corner, CornerParams, defaults={"dino": {"wings": 1}})
    assert set(INPUTS) == {"cls_attention"}


def test_defaults_apply_key_by_key():
    found = get_method("found")
    params, feature = found.resolve("dinov2", {"center": True})
    assert (params.bkg_th, params.center) == (0.5, True)  # the calibrated threshold stays
    assert feature == {"features": "queries"}
    params, _ = found.resolve("dinov2", {"bkg_th": 0.2, "center": None})
    assert (params.bkg_th, params.center) == (0.2, False)  # explicit wins; None = default
    lost = get_method("lost")
    assert lost.resolve("dinov2", {})[1] == {"features": "tokens"}
    params, feature = lost.resolve("dino", {"gram_bias": "auto"})
    assert params == lost.params()  # the reference, where nothing is calibrated
    assert feature == {}


def test_params_parse_text_by_field_type():
    lost = get_method("lost").params
    assert lost.parse("k_patches", "50") == 50
    assert lost.parse("gram_bias", "-0.5") == -0.5 and lost.parse("gram_bias", "p10") == "p10"
    assert lost.parse("center", "yes") is True and lost.parse("center", "0") is False
    with pytest.raises(ValueError, match="true or false"):
        lost.parse("center", "maybe")
    with pytest.raises(ValueError, match="integer"):
        lost.parse("k_patches", "1.5")
    with pytest.raises(ValueError, match="unknown parameter"):
        lost.parse("tau", "0.2")
    tc = get_method("tokencut").params
    assert tc.parse("tau", "0.3") == 0.3
    with pytest.raises(ValueError, match="finite"):
        tc.parse("tau", "nan")
    for bad in ({"tau": 0.0}, {"tau": 1.0}, {"eps": 0}, {"solver": "magic"}):
        with pytest.raises(ValueError):
            tc(**bad)


def test_no_import_cycle_inside_the_package():
    """Every import between discover's modules, lazy ones included, forms no cycle."""
    root = Path(__file__).resolve().parents[1] / "discover"
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m].update(n for n in names if n in mods and n != m)
    assert graph["discover.pipeline"] >= {"discover.methods", "discover.backbone"}  # sanity
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, " -> ".join([*path, m, n])
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
