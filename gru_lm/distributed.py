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

import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gru_lm.errors import GruLmError
from gru_lm.supervisor import Supervisor
from gru_lm.utils import atomic_write_text, flatten


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


LAUNCHER = "GRU_LM_LAUNCHER_PID"  # set by launch() and compare --jobs: the process whose death
# ends its children (a worker, a member)
PR_SET_PDEATHSIG = 1


def die_with_launcher() -> None:
    """A process started by `gru-lm train --nproc` gets SIGTERM when its launcher dies, even
    by kill -9 (Linux's parent-death signal): it saves a checkpoint and stops, instead of
    training on unseen and holding the run's lock. No-op elsewhere."""
    pid = os.environ.get(LAUNCHER)
    if not pid:
        return
    try:
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


def start(world: World) -> None:
    """Join the process group: gloo for CPU tensors and for the objects handed between
    processes (the decisions, the checkpoint process 0 read), nccl for CUDA tensors where
    there is CUDA. It is joined before anything is read, so that process 0 can hand on what
    it read from the run folder."""
    import torch
    import torch.distributed as dist

    if not world.active or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ:
        raise GruLmError("WORLD_SIZE > 1 but MASTER_ADDR is not set; start distributed "
                         "training with torchrun (or gru-lm train --nproc N)")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    # torchrun keeps its store across restarts: keys written by the processes of an earlier
    # attempt (gloo's addresses) must not be read by this one, so each attempt has its own.
    store, _, _ = next(dist.rendezvous("env://", rank=world.rank, world_size=world.size))
    store = dist.PrefixStore(f"gru-lm/attempt-{elastic_env().restart_count}", store)
    dist.init_process_group(backend=backend, store=store, rank=world.rank,
                            world_size=world.size)
    global _WATCH
    watch = Watch(world.rank)
    peers = gather(world, watch.address)
    watch.begin(dict(enumerate(peers)))
    _WATCH = watch


def set_timeout(world: World, seconds: float) -> None:
    """Bound every later collective by `seconds` (train.collective_timeout_s): gloo's own
    timeout, 30 minutes unless told, after which the collective raises (timed_out)."""
    import datetime

    import torch.distributed as dist

    if not (world.active and dist.is_initialized()):
        return
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds))
    if _WATCH is not None:
        _WATCH.timeout_s = seconds


LEAVE_WAIT_S = 30.0  # how long a process waits for the others to close their group


def stop(world: World, together: bool = False) -> None:
    """Leave the process group; `together`: every process met at the end (a barrier), so
    they leave it together. A process whose peer had already exited could abort in gloo's
    teardown ("terminate called without an active exception", exit 250; CI saw it now and
    then in the two-process tests), so: what still holds the group (a DDP model's reducer,
    in a reference cycle) is collected while every peer is alive, each process closes its
    group, and none exits before all have closed theirs (a count in the rendezvous store,
    which outlives the group). After a lost peer nobody waits."""
    import torch.distributed as dist

    if not (world.active and dist.is_initialized()):
        return
    global _WATCH
    if _WATCH is not None:
        _WATCH.close()
        _WATCH = None
    store = dist.distributed_c10d._get_default_store()
    gc.collect()
    dist.destroy_process_group()
    if not together:
        return
    try:
        store.add(LEFT_KEY, 1)
        deadline = time.monotonic() + LEAVE_WAIT_S
        while store.add(LEFT_KEY, 0) < world.size and time.monotonic() < deadline:
            time.sleep(0.02)
    except (RuntimeError, OSError):  # (the store's host saw everyone out and left first)
        pass


LEFT_KEY = "gru-lm/closed"  # how many processes have closed their group


# ---------------------------------------------------------------- a peer that does not answer

WARN_AFTER_S = 60.0  # inside one collective this long (at most half the timeout): say so
REPEAT_S = 300.0  # and again this often while the wait lasts
PING_S = 5.0  # a peer whose watch has not answered in this long is taken for frozen


class Watch:
    """What this process waits for. The main thread says which collective it is inside
    (`waiting`); when one lasts longer than `warn_after_s`, a thread asks every peer's watch,
    over TCP, where it is, and writes one line to stderr naming the peers that do not answer:
    a process stopped (SIGSTOP, Ctrl-Z), swapping, or on a machine that hung, whose threads
    stand still. Gloo gives no word before its own timeout (train.collective_timeout_s) ends
    the wait. The listener answers the others' questions with this process' position."""

    def __init__(self, rank: int, timeout_s: float = 1800.0, out=None) -> None:
        self.rank, self.timeout_s, self.step = rank, timeout_s, 0
        self.inside: tuple[str, float] | None = None  # (what, since: time.monotonic())
        self.left_in = ""  # the wait a collective failed in
        self.silent: list[str] = []  # the peers that did not answer, as "rank R on HOST"
        self.asked = False  # whether the peers were asked during a wait
        self.peers: dict[int, tuple[str, str, int]] = {}  # rank: (host, ip, port)
        self.out = out if out is not None else sys.stderr
        self._closed = threading.Event()
        ip = _outward_ip()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.bind((ip or "", 0))
        self._server.listen(64)
        self._server.settimeout(0.5)
        host = socket.gethostname()
        self.address = (host, ip or host, self._server.getsockname()[1])
        self._threads: list[threading.Thread] = []

    @property
    def warn_after_s(self) -> float:
        return min(WARN_AFTER_S, self.timeout_s / 2)

    def begin(self, peers: dict[int, tuple[str, str, int]]) -> None:
        """Start answering and watching; `peers`: every process' `address`, by rank."""
        self.peers = {r: (a[0], a[1], int(a[2])) for r, a in peers.items() if r != self.rank}
        for target in (self._answer, self._watch):
            t = threading.Thread(target=target, daemon=True, name=f"gru-lm {target.__name__}")
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        self._closed.set()
        for t in self._threads:
            t.join(timeout=2)
        self._server.close()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        outer, self.inside = self.inside, (what, time.monotonic())
        if outer is None:  # (what the peers said in an earlier wait says nothing of this one)
            self.asked, self.silent = False, []
        try:
            yield
        except BaseException:
            self.left_in = self.where(what)
            raise
        finally:
            self.inside = outer

    def where(self, what: str) -> str:
        return f"{what}, at step {self.step}" if self.step else f"{what}, before the first step"

    def position(self) -> str:
        inside = self.inside
        if inside is None:
            return f"rank {self.rank}: at step {self.step}, outside any collective"
        return (f"rank {self.rank}: inside {self.where(inside[0])} for "
                f"{time.monotonic() - inside[1]:.0f} s")

    def _answer(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(self.position().encode() + b"\n")
                except OSError:
                    pass

    def ask(self) -> list[str]:
        """The peers that do not answer within PING_S, as "rank R on HOST"."""
        if not self.peers:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(self.peers))) as pool:
            answers = dict(zip(self.peers, pool.map(_ask, self.peers.values()), strict=True))
        return [f"rank {r} on {self.peers[r][0]}" for r, said in answers.items() if not said]

    def _watch(self) -> None:
        said_for, next_at = None, 0.0
        while not self._closed.wait(1.0):
            inside = self.inside
            if inside is None:
                continue
            waited = time.monotonic() - inside[1]
            if waited < self.warn_after_s or (inside is said_for and time.monotonic() < next_at):
                continue
            silent = self.ask()
            said_for, next_at = inside, time.monotonic() + REPEAT_S
            if self.inside is not inside:  # (it ended while the peers were asked)
                continue
            self.asked, self.silent = True, silent
            if not silent:  # (every peer is alive: a slow one, process 0's final evaluation)
                continue
            try:
                self.out.write(
                    f"warning: process {self.rank} is waiting for {', '.join(silent)}: no "
                    f"answer for {waited:.0f} s inside {self.where(inside[0])} (stopped by "
                    "SIGSTOP or Ctrl-Z, swapping, or its machine hung?); the run stops when "
                    f"the wait reaches train.collective_timeout_s={self.timeout_s:g}\n")
                self.out.flush()
            except (OSError, ValueError):
                pass


def _ask(address: tuple[str, str, int]) -> str:
    """What a peer's watch says of itself; "" when it does not answer."""
    try:
        with socket.create_connection(address[1:], timeout=PING_S) as conn:
            return conn.recv(1024).decode(errors="replace").strip()
    except OSError:
        return ""


def _outward_ip() -> str | None:
    """The address of this host's interface toward the rendezvous (MASTER_ADDR), the one the
    other processes reach it by; None if there is no IPv4 route to it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), 9))  # (no packet is sent)
            return s.getsockname()[0]
    except OSError:
        return None


_WATCH: Watch | None = None  # this process' watch, while it is in a process group


@contextlib.contextmanager
def waiting(what: str) -> Iterator[None]:
    """Mark the code inside as waiting in a collective (`what`, e.g. "a barrier")."""
    if _WATCH is None:
        yield
        return
    with _WATCH.waiting(what):
        yield


def at_step(step: int) -> None:
    """The step the waits are said to be at."""
    if _WATCH is not None:
        _WATCH.step = step


def timed_out(e: BaseException) -> bool:
    """Whether a collective failed because its wait reached the timeout (gloo's words)."""
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def no_answer(world: World) -> str:
    """A collective timed out: what was waited for, how long, and for whom, in words."""
    w = _WATCH
    where = w.left_in if w is not None and w.left_in else "a collective"
    limit = f"train.collective_timeout_s={w.timeout_s if w is not None else 1800:g} s"
    if w is not None and w.asked and not w.silent:
        return (f"process {world.rank} waited {limit} inside {where} for the other processes, "
                "which answer but did not come: they are slower than that allows (raise "
                "train.collective_timeout_s)")
    who = ", ".join(w.silent) if w is not None and w.silent else "another process"
    return (f"process {world.rank} had no answer from {who} for {limit} inside {where}: a "
            "process of this training is frozen (stopped by SIGSTOP or Ctrl-Z, swapping, or "
            "its machine hung), or slower than that allows (raise train.collective_timeout_s)")


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.active:
        with waiting("a barrier"):
            dist.barrier()


def broadcast(world: World, obj: Any) -> Any:
    """Rank 0's `obj`, on every rank."""
    import torch.distributed as dist

    if not world.active:
        return obj
    box = [obj]
    with waiting("a broadcast from process 0"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    import torch.distributed as dist

    if not world.active:
        return [obj]
    out: list[Any] = [None] * world.size
    with waiting("a gather"):
        dist.all_gather_object(out, obj)
    return out


def agree_max(world: World, values: list[float]):
    """The element-wise maximum of `values` over all ranks (a float64 tensor)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if world.active:
        with waiting("the all-reduce that starts each step"):
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


def from_main(world: World, fn: Callable[[], Any]) -> Any:
    """fn() run by process 0 alone and its result handed to every process: what only process
    0's node has (the run folder) is read once. A GruLmError it raises is raised by every
    process, silent on all but process 0 (which says it)."""
    if not world.active:
        return fn()
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except GruLmError as e:
            error = e
    result, message = broadcast(world, (result, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise _silent(GruLmError(message))
    return result


def _silent(e: GruLmError) -> GruLmError:
    e.silent = True
    return e


def node_rank() -> int:
    """This process' node in a torchrun job (GROUP_RANK), 0 outside one."""
    try:
        return int(os.environ.get("GROUP_RANK", "0"))
    except ValueError:
        return 0


def check_same_corpus(world: World, corpus) -> None:
    """Refuse, before the first step, a process whose corpus is not process 0's text (another
    file, another version of it, another preprocessing): every node reads its own copy."""
    if not world.active:
        return
    mine = {"fingerprint": corpus.fingerprint(), "source": str(corpus.source),
            "host": socket.gethostname(), "node": node_rank()}
    everyone = gather(world, mine)
    first = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs["fingerprint"] != first["fingerprint"]:
            e = GruLmError(
                f"node {theirs['node']} (host {theirs['host']}, process {rank}) reads "
                f"{theirs['source']}, whose tokens differ from those process 0 reads "
                f"({first['source']} on node {first['node']}): every node needs the same "
                "corpus file and data settings; copy node 0's file there and start again")
            raise e if world.is_main else _silent(e)


# Settings that are local by nature: where this node finds or writes its files, its threads
# and device. Every other key of a config must be the same on every process of a training.
LOCAL_KEYS = ("data.path", "data.cache_dir", "train.threads", "train.device",
              "train.init_from", "train.tensorboard", "run.name", "run.runs_dir")


def flat_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dict as {dotted key: value}, without the LOCAL_KEYS."""
    return {k: v for k, v in flatten(raw).items() if k not in LOCAL_KEYS}


def check_same_settings(world: World, settings: dict[str, Any], what: str = "has") -> None:
    """Refuse, before the first step, a process whose settings (flat_settings of its config)
    differ from process 0's, in one line naming the key, both values and the node: a
    training whose processes disagree would deadlock (max_steps), or train what no file
    records (lr). Every process raises; process 0 alone says it."""
    if not world.active:
        return

    def show(values: dict[str, Any], key: str) -> str:
        text = f"{key}={values[key]!r}" if key in values else f"{key} unset"
        return text if len(text) <= 80 else text[:79] + "…"

    mine = {"settings": settings, "host": socket.gethostname(), "node": node_rank()}
    everyone = gather(world, mine)
    first = everyone[0]
    for rank, theirs in enumerate(everyone):
        a, b = first["settings"], theirs["settings"]
        differ = [k for k in sorted(set(a) | set(b))
                  if (k in a, a.get(k)) != (k in b, b.get(k))]
        if differ:
            key = differ[0]
            more = f" (and {len(differ) - 1} other setting(s))" if len(differ) > 1 else ""
            e = GruLmError(
                f"node {theirs['node']} (host {theirs['host']}, process {rank}) {what} "
                f"{show(b, key)} where process 0 (node {first['node']}) {what} "
                f"{show(a, key)}{more}: every process of a "
                "training needs the same settings (all but "
                f"{', '.join(LOCAL_KEYS)}); start every node with the same config and overrides")
            raise e if world.is_main else _silent(e)


@dataclass(frozen=True)
class Elastic:
    """What torchrun says of restarts: how many it may make, and which this start is."""

    max_restarts: int = 0
    restart_count: int = 0
    run_id: str = ""


def elastic_env() -> Elastic:
    try:
        return Elastic(int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0),
                       int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
                       os.environ.get("TORCHELASTIC_RUN_ID", ""))
    except ValueError:
        return Elastic()


LAUNCH_MARK = ".launch.json"  # in a run folder: the torchrun launch that created it


def _launch_identity() -> dict[str, Any]:
    """This torchrun launch, as process 0 sees it: the rendezvous id, the host and the agent
    (the parent process, with its start time, so that a reused pid is not taken for it)."""
    agent = os.getppid()
    try:
        started = Path(f"/proc/{agent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = ""
    return {"run_id": elastic_env().run_id, "host": socket.gethostname(), "agent": agent,
            "agent_started": started}


def mark_launch(run_path) -> None:
    """Under torchrun with restarts allowed: record in a new run's folder which launch
    created it, so that only a restart of this launch continues it."""
    if elastic_env().max_restarts > 0:
        atomic_write_text(Path(run_path) / LAUNCH_MARK, json.dumps(_launch_identity()) + "\n")


def launched_here(run_path) -> bool:
    """Whether the run folder was created by this torchrun launch (before a restart)."""
    try:
        mark = json.loads((Path(run_path) / LAUNCH_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return mark == _launch_identity()


def mean(world: World, t):
    """The mean of tensor `t` over all ranks, in place."""
    import torch.distributed as dist

    if world.active:
        with waiting("the all-reduce of the losses"):
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
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), LAUNCHER: str(os.getpid())}
    ranks = Supervisor(kill_on_signal=False)  # (a rank may save for long after a Ctrl-C)
    stderr = _ForwardOnce()
    try:
        # (passed on from before the first process starts: none of them misses a Ctrl-C)
        with ranks.forwarding():
            for r in range(nproc):
                child = ranks.start(f"rank {r}", [sys.executable, "-m", "gru_lm", *args],
                                    env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                    stderr=subprocess.PIPE, preexec_fn=_hold_signals)
                stderr.pump(child.process.stderr)
            while ranks.running:
                ranks.reap()
                # One failed: stop the rest. After a Ctrl-C or SIGTERM every process stops by
                # itself at the same step boundary (a step, a checkpoint), so none is cut short.
                if ranks.stopped_by is None and ranks.failed():
                    time.sleep(2)  # (those stopping for the same reason exit by themselves)
                    ranks.terminate()
                    break
                time.sleep(0.1)
    finally:
        stderr.join()
    codes = [c.code for c in sorted(ranks.ended, key=lambda c: c.started)]
    return next((c for c in codes if c), 0)


def _hold_signals() -> None:
    """In a worker between fork and exec: SIGINT and SIGTERM wait (blocked, kept pending)
    until gru_lm.utils.record_signals_early can record them; a Ctrl-C while Python starts
    would otherwise be a KeyboardInterrupt traceback from an import."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


class _ForwardOnce:
    """The processes' stderr lines copied to ours, each distinct line once: an error that
    every process meets (a bad corpus, a peer that died) is said once, not once a process."""
    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def pump(self, stream) -> None:
        """Copy `stream` (a process's stderr) in a thread of its own until it closes."""
        t = threading.Thread(target=self._copy, args=(stream,), daemon=True)
        t.start()
        self.threads.append(t)

    def _copy(self, stream) -> None:
        for line in iter(stream.readline, b""):
            with self.lock:
                if line in self.seen:
                    continue
                self.seen.add(line)
                try:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()
                except (OSError, ValueError, AttributeError):
                    pass
        stream.close()

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=5)
