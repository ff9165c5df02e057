"""Running under ``torchrun``: rank detection, deterministic sharding, part files, merging.

Single-process runs use the same code with ``world_size == 1`` (no process group, the
part file is the output itself).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "cpu") -> DistContext:
        """Read torchrun's environment; single process when it is absent."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        raise NotImplementedError("distributed runs are not supported yet")

    def part_path(self, out: Path) -> Path:
        """Where this rank writes: the output itself when running alone."""
        if self.world_size == 1:
            return out
        return out.with_name(f"{out.name}.part{self.rank}-of-{self.world_size}")

    def shard(self, items: Sequence[T], key: Callable[[T], str]) -> list[T]:
        """This rank's share of ``items``: sorted by ``key``, every world_size-th one."""
        if self.world_size == 1:
            return list(items)
        ordered = sorted(items, key=key)
        return ordered[self.rank :: self.world_size]

    def merge_outputs(self, out: Path, fmt: str) -> None:  # pragma: no cover - see issue 12
        raise NotImplementedError
