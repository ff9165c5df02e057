"""A consensus of methods: run several discovery methods on the same graph and keep
what they agree on.

Each member (LOST, TokenCut, deep spectral, FOUND by default) proposes one object. Then:

- ``mode="box"``: the proposal whose box overlaps the others most (the largest sum of
  IoUs with the other proposals; the first member among equals) is the answer, with its
  own mask: a medoid of the proposals, robust to one member going astray;
- ``mode="mask"``: every patch counts the members whose mask holds it; the patches
  with at least ``quorum`` votes form the object, and its largest 4-connected component
  gives the box.

A member that finds nothing (``EmptyGraphError``) simply does not vote; when none finds
anything the consensus raises it too. ``center``, ``gram_bias``, ``tau`` and ``bkg_th``
are passed to the members that have them.

Score: the mean IoU of the answer's box with the other proposals (how much the members
agree), in ``[0, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

import discover.methods.base as base
from discover.boxes import mask_box, pairwise_iou

__all__ = ["VoteParams", "VoteResult", "vote"]

_SHARED = ("center", "gram_bias", "tau", "bkg_th")


@dataclass(frozen=True)
class VoteParams(base.Params):
    members: str = "lost,tokencut,spectral,found"
    """Comma-separated method names."""
    mode: str = "box"
    """``box`` (the medoid proposal) or ``mask`` (patch votes)."""
    quorum: int = 2
    """``mode="mask"``: votes a patch needs."""
    center: bool = True
    """Passed to the members that centre features."""
    gram_bias: float | str = 0.0
    tau: float = 0.2
    bkg_th: float = 0.3

    def validate(self) -> None:
        names = [m.strip() for m in self.members.split(",") if m.strip()]
        if len(names) < 2:
            raise ValueError(f"members must name at least two methods, got {self.members!r}")
        if "vote" in names:
            raise ValueError("a vote cannot be its own member")
        if self.mode not in ("box", "mask"):
            raise ValueError(f"mode must be 'box' or 'mask', got {self.mode!r}")
        if not 1 <= int(self.quorum) <= len(names):
            raise ValueError(f"quorum must be in [1, {len(names)}], got {self.quorum}")

    def member_names(self) -> list[str]:
        return [m.strip() for m in self.members.split(",") if m.strip()]


@dataclass(frozen=True, eq=False)
class VoteResult:
    """``seed``, ``mask``, ``box``, ``score`` of the consensus; ``proposals`` maps each
    member that found something to its result; ``chosen`` names the member whose
    proposal won (``mode="box"``) or is ``"votes"``."""

    seed: int
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float
    proposals: dict[str, Any]
    chosen: str


def vote(
    feats: Tensor,
    grid: base.Grid,
    *,
    exclude: base.Mask = None,
    cls_attention: Tensor | None = None,
    **params: Any,
) -> VoteResult:
    """The consensus of several methods on one image (see the module docstring)."""
    h, w, exclude = base.check_inputs(feats, grid, exclude)
    p = VoteParams.build(params, "vote")
    proposals: dict[str, Any] = {}
    for name in p.member_names():
        m = base.get_method(name)
        given = {k: getattr(p, k) for k in _SHARED if k in m.params.names()}
        try:
            proposals[name] = m(
                feats, (h, w), m.params.build(given, name), exclude=exclude,
                cls_attention=cls_attention,
            )  # fmt: skip
        except base.EmptyGraphError:
            continue
    if not proposals:
        raise base.EmptyGraphError("vote: no member found an object")
    names = list(proposals)
    boxes = torch.tensor([proposals[n].box for n in names], dtype=torch.float64)
    iou = pairwise_iou(boxes, boxes)
    agreement = (iou.sum(dim=1) - 1.0) / max(len(names) - 1, 1)
    if p.mode == "box":
        best = int(torch.argmax(agreement))  # the first among equals
        chosen = proposals[names[best]]
        return VoteResult(
            int(chosen.seed), chosen.mask, tuple(chosen.box), float(agreement[best]),
            proposals, names[best],
        )  # fmt: skip
    votes = sum(proposals[n].mask.to(torch.int32).cpu() for n in names)
    region = (votes >= int(p.quorum)).numpy()
    if exclude is not None:
        region &= ~exclude.reshape(h, w).cpu().numpy()
    labels, _ = scipy.ndimage.label(region)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    if counts.max() == 0:
        raise base.EmptyGraphError(f"vote: no patch has {p.quorum} votes")
    component = torch.from_numpy(labels == int(np.argmax(counts))).to(feats.device)
    box = mask_box(component)
    others = pairwise_iou(torch.tensor([box], dtype=torch.float64), boxes)[0]
    flat_votes = torch.where(component.reshape(-1), votes.reshape(-1).to(feats.device), -1)
    return VoteResult(
        int(torch.argmax(flat_votes)), component, box, float(others.mean()), proposals, "votes"
    )


base.register(
    base.Method(
        "vote",
        vote,
        VoteParams,
        needs=frozenset({"cls_attention"}),
        summary="Consensus of LOST, TokenCut, deep spectral and FOUND",
    )
)
