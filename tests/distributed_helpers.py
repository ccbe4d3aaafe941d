"""A torchrun entry point for tests/test_distributed.py: one training process (or a stalled one).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_helpers.py train WORK [cpu|cuda]
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_helpers.py stall WORK

train: every process loads the pickled `TrainInputs` and `TrainConfig` from WORK/inputs.pkl,
trains with `training.fit_distributed` on the CPU or on CUDA, with the gloo backend either way
(so that two processes can share one GPU); rank 0, the one that gets the result, writes its final
state dict to WORK/state.pt and its loss log to WORK/losses.npy.
stall: rank 1 joins the process group, then sleeps instead of joining rank 0's all_reduce;
rank 0 must fail after the timeout (WORK/timeout_s) instead of waiting for it.
"""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from scrcl_cli import distributed
from scrcl_cli.training import fit_distributed


def train(work: Path, device_type: str = "cpu") -> None:
    with open(work / "inputs.pkl", "rb") as fh:
        inputs, config, batch_size = pickle.load(fh)
    env = distributed.detect(backend_choice="gloo")
    assert env is not None and env.world_size == 2
    device = distributed.local_device(torch.device(device_type), env)
    with distributed.process_group(env, device):
        result = fit_distributed(inputs, config, device=device, dist=env, batch_size=batch_size)
    assert (result is not None) == env.is_main
    if result is not None:
        torch.save({k: v.detach().cpu() for k, v in result.state.items()}, work / "state.pt")
        np.save(work / "losses.npy", result.losses)


def stall(work: Path) -> None:
    env = distributed.detect(timeout_s=float((work / "timeout_s").read_text()))
    assert env is not None
    with distributed.process_group(env, torch.device("cpu")):
        if env.rank == 1:
            time.sleep(120)
            return
        t = time.perf_counter()
        try:
            tdist.all_reduce(torch.ones(1))
        except Exception as exc:  # what a real process would see while its peer is stuck
            (work / "rank0_error.txt").write_text(f"{time.perf_counter() - t:.1f}\n{type(exc).__name__}: {exc}")
            raise


if __name__ == "__main__":
    {"train": train, "stall": stall}[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])
