"""Running under ``torchrun``: rank detection, deterministic sharding, part files, merging.

The same commands work alone and under ``torchrun --nproc-per-node P [--nnodes M ...]``:

- :meth:`DistContext.from_env` reads torch's launcher variables (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the process
  group: NCCL when the device is CUDA (each process then uses ``cuda:$LOCAL_RANK``), gloo
  otherwise. The few small messages of the protocol below travel through the
  rendezvous key-value store (the one torchrun's agent or rank 0 serves). Without
  ``WORLD_SIZE > 1`` it is a plain single-process context and starts nothing.
- :meth:`DistContext.prepare_output` runs once at the start: rank 0 removes the leftovers
  of an earlier run (without ``--resume``) or lists every image already present in the
  final output or in ANY part file (with ``--resume``), and tells the other ranks.
- :meth:`DistContext.shard` drops those images, sorts the rest by name and gives rank
  ``r`` every ``world_size``-th one starting at ``r``; each rank writes its share to its
  own part file (``OUT.part{r}-of-{w}``, a folder for VOC) as it goes.
- :meth:`DistContext.merge_outputs` runs once at the end: every rank reports the images
  it wrote and rank 0 waits for all the reports (the only wait of the run), then merges
  the final output (when resuming, its old content too) and every part file into the
  final output, sorted by image name, and deletes the parts (the format's own reader and
  merger, :mod:`discover.outputs`). ``discover eval`` then scores the merged
  ``boxes.jsonl`` on rank 0 (:meth:`discover.evaluate.EvalRun.score_merged`), so the
  CorLoc is that of the union of the shards.

A rank that dies leaves its part file valid up to its last finished image. Under
torchrun the agent then stops the other ranks at once; otherwise rank 0 gives up waiting
for the missing report after ``$REGDISCOVER_DIST_TIMEOUT`` seconds (default 1800, also
the process-group timeout), and a rank waiting for rank 0 fails at once when rank 0's
store is gone. Either way nothing is merged and every part is kept; the same command
with ``--resume`` then redoes only the images found in no part and no output, with any
number of processes.
"""

from __future__ import annotations

import atexit
import json
import os
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from discover.errors import RegdiscoverError, first_line
from discover.outputs import FORMATS, MissingImages, OutputError, merge, remove_output, writer_class

if TYPE_CHECKING:
    pass

T = TypeVar("T")

TIMEOUT_ENV = "REGDISCOVER_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(RegdiscoverError):
    """The process group cannot start, a rank was lost, or the parts cannot be merged."""


@dataclass
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None
    """``nccl`` / ``gloo`` once a process group was started by :meth:`from_env`."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    _store: Any = field(default=None, repr=False, compare=False)
    _owns_group: bool = field(default=False, repr=False, compare=False)
    _merge_needed: bool = field(default=False, repr=False, compare=False)
    _step: int = field(default=0, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set-up -------------------------------------------------------------------------
    @classmethod
    def from_env(cls, device: str = "cpu") -> DistContext:
        """Read torchrun's environment and join the process group; alone when it is absent.

        ``device`` ``cuda`` (or ``cuda:N``) becomes ``cuda:$LOCAL_RANK``: one GPU per
        process. The group uses NCCL on CUDA and gloo otherwise, with a timeout of
        ``$REGDISCOVER_DIST_TIMEOUT`` seconds (default 1800), which also bounds every
        wait of the merge protocol.

        Raises:
            DistributedError: inconsistent launcher variables, no CUDA device for this
                local rank, or the process group cannot be formed.
        """
        world = _env_int("WORLD_SIZE", 1)
        if world <= 1:
            return cls(device=device)
        rank = _env_int("RANK", None)
        if rank is None or not 0 <= rank < world:
            raise DistributedError(f"RANK must be in 0..{world - 1} when WORLD_SIZE={world}")
        local_rank = _env_int("LOCAL_RANK", rank)
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise DistributedError(
                f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch with torchrun"
            )
        timeout_s = _timeout_s()

        import torch
        import torch.distributed as tdist

        if not tdist.is_available():
            raise DistributedError("this torch build has no torch.distributed")
        backend = "gloo"
        if device == "cuda" or device.startswith("cuda:"):
            n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if local_rank >= n_gpu:
                raise DistributedError(
                    f"local rank {local_rank} needs its own GPU but {n_gpu} are visible: "
                    "use --nproc-per-node <= the number of GPUs"
                )
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        timeout = timedelta(seconds=timeout_s)
        owns = False
        try:
            if tdist.is_initialized():  # a caller's group: share its store
                store = tdist.distributed_c10d._get_default_store()
            else:  # what init_process_group("env://") does, keeping the store
                store, _, _ = next(tdist.rendezvous("env://", rank, world, timeout=timeout))
                store.set_timeout(timeout)
                tdist.init_process_group(
                    backend,
                    store=tdist.PrefixStore("default_pg", store),
                    rank=rank,
                    world_size=world,
                    timeout=timeout,
                )
                owns = True
        except (RuntimeError, ValueError) as e:
            raise DistributedError(
                f"rank {rank}: cannot join the process group: {first_line(e)}"
            ) from e
        # Restarts under torchrun share the agent's store: keep their keys apart.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        sync = tdist.PrefixStore(f"regdiscover/{attempt}", store)
        ctx = cls(rank, world, local_rank, device, backend, timeout_s, sync, owns)
        atexit.register(ctx.close)
        return ctx

    def close(self) -> None:
        """Leave the process group (if this context started it); safe to call twice."""
        if not self._owns_group:
            return
        self._owns_group = False
        import torch.distributed as tdist

        if tdist.is_initialized():
            try:
                tdist.destroy_process_group()
            except RuntimeError:  # pragma: no cover - a lost peer; we are leaving anyway
                pass

    # -- sharding -----------------------------------------------------------------------
    def part_path(self, out: Path) -> Path:
        """Where this rank writes: the output itself when running alone."""
        if self.world_size == 1:
            return out
        return out.with_name(f"{out.name}.part{self.rank}-of-{self.world_size}")

    def shard(
        self, items: Sequence[T], key: Callable[[T], str], done: Collection[str] | None = None
    ) -> list[T]:
        """This rank's share of the ``items`` whose ``key`` is not in ``done``.

        Alone: those items in their input order. Distributed: deduplicated by ``key``,
        sorted by ``key``, and every ``world_size``-th one starting at ``rank``, so the
        ranks' shares are disjoint, cover everything and balance the work left.
        """
        todo = [it for it in items if key(it) not in done] if done else list(items)
        if self.world_size == 1:
            return todo
        unique = {key(it): it for it in reversed(todo)}  # first occurrence wins
        ordered = [unique[k] for k in sorted(unique)]
        return ordered[self.rank :: self.world_size]

    def prepare_output(self, out: Path, fmt: str, *, resume: bool = False) -> set[str]:
        """Start a run writing ``out``; returns the images to skip (already done).

        Without ``resume``, part files left by an earlier run are deleted (and, when
        distributed, the final output, which is only written at the merge). With
        ``resume`` the images of every part file (any world size) are returned, plus,
        when distributed, those of the final output; alone the output itself is left to
        the writer's own resume. Distributed, rank 0 does the file work and broadcasts
        the result: call this on every rank.

        Raises:
            DistributedError: the output cannot be read or cleaned (on every rank).
        """
        out = Path(out)
        payload: tuple[str, Any] = ("ok", ([], False))
        if self.is_main:
            try:
                done, merge = self._scan(out, fmt, resume)
                payload = ("ok", (sorted(done), merge))
            except (OSError, ValueError, RegdiscoverError) as e:
                payload = ("error", f"cannot prepare output {out}: {first_line(e)}")
        if self.world_size > 1:
            payload = self._broadcast(payload)
        if payload[0] == "error":
            raise DistributedError(payload[1])
        done_list, self._merge_needed = payload[1]
        return set(done_list)

    def _scan(self, out: Path, fmt: str, resume: bool) -> tuple[set[str], bool]:
        """Rank 0's file work for :meth:`prepare_output`: (images done, merge at the end)."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        if self.world_size > 1:
            if fmt == "voc" and out.exists() and not out.is_dir():
                raise ValueError(f"--format voc writes a folder of XML files; {out} is a file")
            if fmt != "voc" and out.is_dir():
                raise ValueError(f"{out} is a folder")
        parts = find_parts(out)
        if not resume:
            for p in parts:
                remove_output(p, fmt)
            if self.world_size > 1:
                remove_output(out, fmt)
            return set(), self.world_size > 1
        done: set[str] = set()
        sources = [*parts, out] if self.world_size > 1 else parts
        for src in sources:
            done.update(writer_class(fmt).read(src).entries)
        return done, self.world_size > 1 or bool(parts)

    # -- merging ------------------------------------------------------------------------
    def merge_outputs(
        self, out: Path, fmt: str, extra: dict[str, Any] | None = None
    ) -> list[dict[str, Any]] | None:
        """Wait for every rank, then rank 0 merges the parts into ``out`` (sorted by image).

        Alone, only parts found by :meth:`prepare_output` are merged (a resumed
        distributed run); otherwise it does nothing. Leaves the process group. Every
        rank's report carries ``extra`` (e.g. its CorLoc counts).

        Returns:
            On rank 0 after a merge, the reports of every rank (``rank``, ``part``,
            ``images`` and ``extra``'s keys); ``None`` when nothing was merged and on the
            other ranks.

        Raises:
            DistributedError: a rank was lost or a part is missing; the parts are kept.
        """
        out = Path(out)
        try:
            if not self._merge_needed:
                return None
            reports = self._reports(out, fmt, extra or {})
            if not self.is_main:
                return None
            merge_files(out, fmt, reports)
            return reports
        finally:
            self.close()

    def _reports(self, out: Path, fmt: str, extra: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's report (rank, its part, the images in it); the final wait."""
        if self.world_size == 1:
            return [{"rank": 0, **extra}]
        part = self.part_path(out)
        try:
            images = sorted(writer_class(fmt).read(part).entries)
        except (OSError, ValueError) as e:
            raise DistributedError(
                f"rank {self.rank}: cannot read back {part}: {first_line(e)}"
            ) from e
        mine = {"rank": self.rank, "part": str(part), "images": images, **extra}
        return self._gather(mine)

    # -- exchanges ----------------------------------------------------------------------
    # Small JSON messages go through the rendezvous key-value store rather than gloo
    # object collectives: a gloo collective leaves work on the group's C++ threads that
    # may still be releasing Python tensors while the interpreter shuts down (SIGABRT
    # at exit, seen in about one run in ten once a library such as timm keeps the
    # default group alive past destroy_process_group). Store reads wait at most
    # ``timeout_s`` and fail at once when the store's host is gone.
    def _gather(self, obj: Any) -> list[Any]:
        """Rank 0 gets every rank's ``obj`` (in rank order); other ranks get their own."""
        key = self._next_key()
        self._put(f"{key}/{self.rank}", obj)
        if not self.is_main:
            return [obj]
        return [obj] + [self._get(f"{key}/{r}", r) for r in range(1, self.world_size)]

    def _broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        key = self._next_key()
        if self.is_main:
            self._put(key, obj)
            return obj
        return self._get(key, 0)

    def _next_key(self) -> str:
        self._step += 1
        return f"step{self._step}"

    def _put(self, key: str, obj: Any) -> None:
        try:
            self._store.set(key, json.dumps(obj))
        except RuntimeError as e:
            raise self._lost(e, None) from e

    def _get(self, key: str, src: int) -> Any:
        try:
            return json.loads(self._store.get(key))
        except RuntimeError as e:
            raise self._lost(e, src) from e

    def _lost(self, e: BaseException, src: int | None) -> DistributedError:
        who = "another rank" if src is None else f"rank {src}"
        return DistributedError(
            f"rank {self.rank}: {who} was lost or did not finish within {self.timeout_s:g} s "
            f"({first_line(e)}); the images already finished are kept in the part files: run "
            "the same command again with --resume to do only the rest"
        )


# -- part files -----------------------------------------------------------------------------
def find_parts(out: Path) -> list[Path]:
    """Existing part files (or folders) of ``out`` from any world size, in (world, rank) order."""
    out = Path(out)
    pattern = re.compile(re.escape(out.name) + r"\.part(\d+)-of-(\d+)")
    try:
        found = [
            (int(m.group(2)), int(m.group(1)), p)
            for p in out.parent.iterdir()
            if (m := pattern.fullmatch(p.name))
        ]
    except FileNotFoundError:
        return []
    return [p for _, _, p in sorted(found)]


def merge_files(out: Path, fmt: str, reports: Iterable[dict[str, Any]] = ()) -> int:
    """Merge ``out`` (if present) and all its part files into ``out``, then delete the parts
    (:func:`discover.outputs.merge`). ``reports`` (from the ranks) name the images each
    rank has written; if one of them is not found, nothing is replaced or deleted.
    Returns the number of images in the merged output.

    Raises:
        DistributedError: a reported image is not in any part (e.g. an output folder
            that is not shared between the nodes), or a part cannot be read.
    """
    reports = list(reports)
    required = [name for rep in reports for name in rep.get("images", ())]
    try:
        return merge(Path(out), fmt, find_parts(Path(out)), required)
    except MissingImages as e:
        rep = next(r for r in reports if e.names[0] in r.get("images", ()))
        raise DistributedError(
            f"{len(e.names)} image(s) written by rank {rep['rank']} to {rep.get('part')} are "
            f"not visible to rank 0 (e.g. {e.names[0]}): the output folder must be on a "
            "filesystem shared by every node; the parts are kept"
        ) from None
    except (OSError, OutputError) as e:
        raise DistributedError(f"cannot merge into {out}: {first_line(e)}") from e


# -- helpers --------------------------------------------------------------------------------
def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {raw!r}") from None


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise DistributedError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value
