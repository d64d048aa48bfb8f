"""Child processes supervised together: `train --nproc` (one process a rank) and
`compare --jobs` (one process a member) start, stop and reap theirs through this one class.

A Ctrl-C or SIGTERM that reaches the parent is forwarded once to every running child (each
saves at its next step boundary and stops); when the parent stops them itself (terminate: a
peer failed, or an error), one still running STOP_GRACE_S later is killed (one held in a
rendezvous by a peer that is gone), and so is one after a forwarded signal where the
supervisor was made with kill_on_signal; every child is reaped before the parent goes on,
and one that failed is named by its own name ("rank 1", "lstm-s2").
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

STOP_GRACE_S = 60  # how long a stopped child may take to save before it is killed
STOPPING = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Child:
    """One supervised process: its name, the process, and when it started."""

    name: str
    process: subprocess.Popen
    started: float = field(default_factory=time.perf_counter)
    after_stop: bool = False  # it ended after a stop (a signal, or terminate)

    @property
    def code(self) -> int | None:
        """Its exit status (None while it runs)."""
        return self.process.poll()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class Supervisor:
    """The children of one command: started, stopped together, reaped."""

    def __init__(self, grace_s: float | None = None, kill_on_signal: bool = True):
        """grace_s: STOP_GRACE_S unless given; kill_on_signal: whether a child still running
        grace_s after a forwarded Ctrl-C or SIGTERM is killed (compare's members), or left
        to finish saving however long it takes (train --nproc's ranks: one may be in a long
        evaluation or checkpoint; they are killed only after terminate())."""
        self.grace_s = STOP_GRACE_S if grace_s is None else grace_s
        self.kill_on_signal = kill_on_signal
        self.running: dict[str, Child] = {}
        self.ended: list[Child] = []
        self.stopped_by: int | None = None  # the first signal that stopped them
        self._kill_at: float | None = None  # time.monotonic() past which the rest are killed

    def start(self, name: str, argv: list[str], **popen: object) -> Child:
        """Start `argv` as the child `name` (popen: subprocess.Popen's keyword arguments). A
        child started after a stop gets that signal at once, so none misses a Ctrl-C."""
        assert name not in self.running, f"a child named {name!r} runs already"
        child = Child(name, subprocess.Popen(argv, **popen))  # type: ignore[call-overload]
        self.running[name] = child
        if self.stopped_by is not None:
            child.process.send_signal(self.stopped_by)
        return child

    def stop(self, signum: int, _frame: object = None) -> None:
        """A signal handler: `signum` once to every running child; with kill_on_signal, the
        first one starts the grace period after which reap() kills those still running."""
        if self.stopped_by is None:
            self.stopped_by = signum
            if self.kill_on_signal:
                self._kill_at = time.monotonic() + self.grace_s
        for child in self.running.values():
            if child.code is None:
                child.process.send_signal(signum)

    def reap(self) -> list[Child]:
        """The children that ended since the last call (kept in `ended` too); one still
        running past the grace period is killed."""
        done = []
        for name, child in list(self.running.items()):
            if child.code is None:
                if self._kill_at is not None and time.monotonic() > self._kill_at:
                    child.process.kill()
                continue
            del self.running[name]
            child.after_stop = self.stopped_by is not None
            done.append(child)
        self.ended += done
        return done

    def wait(self, poll_s: float = 0.1) -> None:
        """Reap until no child runs."""
        while self.running:
            self.reap()
            if self.running:
                time.sleep(poll_s)

    def terminate(self) -> None:
        """SIGTERM to every running child (each saves and stops), then wait for them all,
        killing any still running grace_s from now."""
        self.stop(signal.SIGTERM)
        self._kill_at = time.monotonic() + self.grace_s
        self.wait()

    def failed(self) -> list[Child]:
        """The children that ended with a non-zero status, in the order they were started."""
        return [c for c in sorted(self.ended, key=lambda c: c.started) if c.code]

    @contextlib.contextmanager
    def forwarding(self) -> Iterator[Supervisor]:
        """SIGINT and SIGTERM forwarded to the children while the block runs (from before
        the first one starts); on leaving, by an error too, no child is left running."""
        old = {s: signal.signal(s, self.stop) for s in STOPPING}
        try:
            yield self
        finally:
            try:
                if self.running:
                    self.terminate()
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)
