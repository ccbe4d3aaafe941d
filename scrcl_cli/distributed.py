"""Multi-process training under torchrun: the process's place, its device and the process group.

torchrun starts one process per device and tells each where it stands through WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `detect` reads them. The gradient averaging itself is
torch's `DistributedDataParallel` (`training.fit_distributed`); nothing here reimplements a
collective. torch is imported inside the functions, so `detect` costs nothing.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np

from .config import DIST_BACKENDS, DIST_TIMEOUT_S
from .errors import ScrclError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The variables torchrun sets in every process it starts.
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = "Launch with: torchrun --nproc_per_node N -m scrcl_cli train ... --distributed"


@dataclass(frozen=True)
class DistEnv:
    """This process's place among the training processes.

    rank: 0 .. world_size - 1 (rank 0 writes every output); local_rank: its index on its node,
    which picks its GPU; timeout_s: how long a collective may wait for the other processes;
    backend_choice: one of config.DIST_BACKENDS ("auto": nccl between GPUs, gloo between CPU processes).
    """

    rank: int
    world_size: int
    local_rank: int
    timeout_s: float = DIST_TIMEOUT_S
    backend_choice: str = "auto"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(
    environ: Mapping[str, str] | None = None, *, timeout_s: float = DIST_TIMEOUT_S, backend_choice: str = "auto"
) -> DistEnv | None:
    """The DistEnv torchrun's variables describe, or None outside torchrun (none of them set).

    A partial or malformed set (e.g. RANK without WORLD_SIZE) is a ScrclError, not a guess.
    """
    env = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_VARS if k in env]
    if not present:
        return None
    missing = [k for k in TORCHRUN_VARS if k not in env]
    if missing:
        raise ScrclError(f"{', '.join(present)} set but {', '.join(missing)} not: not a torchrun environment", LAUNCH_HINT)
    try:
        world, rank, local = (int(env[k]) for k in TORCHRUN_VARS)
    except ValueError:
        values = ", ".join(f"{k}={env[k]!r}" for k in TORCHRUN_VARS)
        raise ScrclError(f"torchrun variables are not integers ({values})", LAUNCH_HINT) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ScrclError(f"inconsistent torchrun variables WORLD_SIZE={world} RANK={rank} LOCAL_RANK={local}", LAUNCH_HINT)
    if backend_choice not in DIST_BACKENDS:
        raise ScrclError(f"unknown process-group backend {backend_choice!r}", f"Use one of {', '.join(DIST_BACKENDS)}")
    return DistEnv(rank=rank, world_size=world, local_rank=local, timeout_s=timeout_s, backend_choice=backend_choice)


def backend(device: torch.device, choice: str = "auto") -> str:
    """The process group's backend: `choice`, or for "auto" nccl between GPUs and gloo between
    CPU processes. nccl needs a GPU per process; gloo also runs on GPU tensors, so processes that
    share a GPU (a correctness check on a one-GPU machine) use gloo."""
    if choice == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if choice == "nccl" and device.type != "cuda":
        raise ScrclError(
            "the nccl backend needs GPUs, and this run is on the CPU", "Use --dist-backend gloo (or auto) with --device cpu"
        )
    return choice


def local_device(device: torch.device, env: DistEnv) -> torch.device:
    """This process's device: GPU LOCAL_RANK on a CUDA node, else the CPU.

    With the gloo backend, more processes than GPUs share them (process i on GPU i mod count):
    nccl refuses two processes on one GPU, gloo does not.
    """
    import torch

    name = backend(device, env.backend_choice)  # an impossible choice fails before any work
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if env.local_rank < count:
        return torch.device("cuda", env.local_rank)
    if name == "gloo" and count > 0:
        shared = torch.device("cuda", env.local_rank % count)
        log.warning("process LOCAL_RANK=%d shares %s with another process (gloo backend)", env.local_rank, shared)
        return shared
    raise ScrclError(
        f"process LOCAL_RANK={env.local_rank} has no GPU of its own: {count} CUDA device(s) visible",
        "Start at most one process per GPU (torchrun --nproc_per_node <number of GPUs>), "
        "or add --dist-backend gloo to let processes share GPUs",
    )


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device) -> Iterator[None]:
    """Join the default process group for the duration of the block, and always leave it.

    The timeout bounds every wait: a process whose peer failed or stopped raises after
    `env.timeout_s` instead of hanging (under torchrun the launcher also stops the others as soon
    as one exits with an error).
    """
    import torch
    import torch.distributed as dist

    missing = [k for k in RENDEZVOUS_VARS if k not in os.environ]
    if missing:
        raise ScrclError(f"{', '.join(missing)} not set: the processes cannot find each other", LAUNCH_HINT)
    name = backend(device, env.backend_choice)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        name,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=env.timeout_s),
        # binds an nccl process to its GPU from the start; gloo takes no device
        device_id=device if name == "nccl" else None,
    )
    log.info("process %d of %d joined the %s process group on %s", env.rank, env.world_size, name, device)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()  # no barrier: the peers may be the ones that failed
        raise
    # A DistributedDataParallel wrapper can sit in a reference cycle (it does in a fresh process
    # with torch 2.13), so it outlives the training function until a garbage collection, which
    # could come after the group is gone or during interpreter shutdown; its reducer then
    # releases gloo work on a destroyed group, and the process can abort ("terminate called
    # without an active exception", seen in CI). Collect it here, while the group is alive.
    gc.collect()
    # Rank 0 still embeds every cell after the last step while the others are done: on success no
    # rank leaves before all are done, so none tears down its connections under rank 0's work.
    dist.barrier()
    dist.destroy_process_group()


def digest(*arrays: np.ndarray) -> int:
    """A 63-bit fingerprint of the bytes, shapes and dtypes of `arrays`."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def check_same(fingerprints: dict[str, int], device: torch.device) -> None:
    """Raise ScrclError unless every process computed the same `fingerprints` (name -> `digest`).

    Every process builds the graphs itself from the same input; this proves they agree before
    any process trains on them, instead of training silently on different graphs.
    """
    import torch
    import torch.distributed as dist

    names = sorted(fingerprints)
    mine = torch.tensor([fingerprints[k] for k in names], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for rank, theirs in enumerate(every):
        differ = [k for k, a, b in zip(names, mine.tolist(), theirs.tolist()) if a != b]
        if differ:
            raise ScrclError(
                f"process {rank} built a different {', '.join(differ)} than process {dist.get_rank()}",
                "Give every process the same input file, package version and options",
            )
