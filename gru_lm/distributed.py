"""Distributed data parallel with PyTorch's own engine, under torchrun.

`torchrun --nproc_per_node N -m gru_lm train --config ...` starts N processes that each read
RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE from the environment. Each owns rows
rank*B ... (rank+1)*B of the batch that one process with batch N*B would use (BatchLoader's
`part`), carries its own hidden state, and DistributedDataParallel averages the gradients,
so N processes train as one with the combined batch. Every rank evaluates the same weights on
the same data, so every decision (best checkpoint, early stopping) is the same everywhere
without messages; rank 0 alone prints and writes files. What differs per rank (the carried
state, the random streams) is gathered into rank 0's checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gru_lm.errors import GruLmError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def world_from_env() -> World:
    """The process' place in a torchrun job; a single process outside one."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    except ValueError:
        raise GruLmError("RANK, WORLD_SIZE, LOCAL_RANK or LOCAL_WORLD_SIZE is not an integer; "
                         "start distributed training with torchrun") from None
    if size < 1 or not 0 <= rank < size:
        raise GruLmError(f"RANK={rank} WORLD_SIZE={size} is not a valid place in a job; start "
                         "distributed training with torchrun")
    return World(rank, size, local_rank, max(1, local_size))


LAUNCHER = "GRU_LM_LAUNCHER_PID"  # set by launch(): the process whose death ends the workers
PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """A process started by `gru-lm train --nproc` gets SIGTERM when its launcher dies, even
    by kill -9 (Linux's parent-death signal): it saves a checkpoint and stops, instead of
    training on unseen and holding the run's lock. No-op elsewhere."""
    import signal

    pid = os.environ.get(LAUNCHER)
    if not pid:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the launcher's own handlers must do
        return
    if str(os.getppid()) != pid:  # it died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


def lost_peer(e: BaseException) -> bool:
    """Whether a collective failed because another process went away (gloo or nccl)."""
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "peer"))


def start(world: World, device_type: str) -> None:
    """Join the process group: gloo on the CPU, nccl on CUDA."""
    import torch.distributed as dist

    if not world.active or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise GruLmError("WORLD_SIZE > 1 but MASTER_ADDR is not set; start distributed "
                         "training with torchrun (or gru-lm train --nproc N)")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)


def stop(world: World) -> None:
    import torch.distributed as dist

    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.active:
        dist.barrier()


def broadcast(world: World, obj: Any) -> Any:
    """Rank 0's `obj`, on every rank."""
    import torch.distributed as dist

    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    import torch.distributed as dist

    if not world.active:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def agree_max(world: World, values: list[float]):
    """The element-wise maximum of `values` over all ranks (a float64 tensor)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def agree_on_stop(world: World, elapsed_s: float, signals: list[int]) -> tuple[float, int]:
    """What every rank decides at a step boundary: the largest elapsed time, and the signal
    to stop on (the largest number any rank had caught, 0 for none). Only the agreed value
    may decide: a signal that arrives after this collective is seen by this rank alone, and
    is kept in `signals` for the next boundary."""
    if not world.active:
        return elapsed_s, max(signals, default=0)
    agreed = agree_max(world, [elapsed_s, max(signals, default=0)])
    return float(agreed[0]), int(agreed[1])


def mean(world: World, t):
    """The mean of tensor `t` over all ranks, in place."""
    import torch.distributed as dist

    if world.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world.size
    return t


def wrap(world: World, model, device):
    """`model` under DistributedDataParallel (gradients averaged over ranks), or itself."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def launch(nproc: int, args: list[str]) -> int:
    """Run `gru-lm ARGS` in `nproc` processes on this machine, with the environment torchrun
    would give them (env:// rendezvous on 127.0.0.1). Ctrl-C and SIGTERM are passed on; when
    one process fails the others are stopped. Returns the first failing exit status (rank 0's
    first), else 0."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), LAUNCHER: str(os.getpid())}
    procs: list[subprocess.Popen] = []
    forwarded: list[int] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # (passed on from before the first process starts: none of them misses a Ctrl-C)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    pumps = []
    try:
        for r in range(nproc):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gru_lm", *args],
                env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE,
                preexec_fn=_hold_signals))
        if forwarded:  # a signal came while they were being started
            forward(forwarded[-1], None)
        pumps = _forward_once([p.stderr for p in procs])
        while any(p.poll() is None for p in procs):
            # One failed: stop the rest. After a Ctrl-C or SIGTERM every process stops by
            # itself at the same step boundary (a step, a checkpoint), so none is cut short.
            if not forwarded and any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2)  # (those stopping for the same reason exit by themselves)
                _stop(procs)
                break
            time.sleep(0.1)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for t in pumps:
            t.join(timeout=5)
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c), 0)


def _hold_signals() -> None:
    """In a worker between fork and exec: SIGINT and SIGTERM wait (blocked, kept pending)
    until gru_lm.utils.record_signals_early can record them; a Ctrl-C while Python starts
    would otherwise be a KeyboardInterrupt traceback from an import."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


STOP_GRACE_S = 60  # how long a stopped process may take to save before it is killed


def _stop(procs) -> None:
    """SIGTERM to the processes still running (each records it and stops at its next step
    boundary), then SIGKILL to any that has not stopped within STOP_GRACE_S (one held in a
    rendezvous by a peer that is gone)."""
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _forward_once(streams) -> list:
    """Copy the processes' stderr lines to ours, each distinct line once: an error that
    every process meets (a bad corpus, a peer that died) is said once, not once a process."""
    import sys
    import threading

    seen: set[bytes] = set()
    lock = threading.Lock()

    def pump(stream) -> None:
        for line in iter(stream.readline, b""):
            with lock:
                if line in seen:
                    continue
                seen.add(line)
                try:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()
                except (OSError, ValueError, AttributeError):
                    pass
        stream.close()

    threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    return threads
