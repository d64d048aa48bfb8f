"""The one supervisor of child processes (train --nproc, compare --jobs): a signal forwarded
once to every child, a grace period then a kill, every child reaped, failures by name."""

from __future__ import annotations

import os
import signal
import sys
import time

from gru_lm.supervisor import Supervisor

# A child that counts the SIGINTs it gets, writes the count when it gets SIGTERM or after
# `wait` seconds, and exits with `code`.
CHILD = """
import signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
open(sys.argv[1] + ".up", "w").close()
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end and not got:
    time.sleep(0.01)
time.sleep(0.2)  # (a second signal, were one sent, would arrive now)
open(sys.argv[1], "w").write(" ".join(str(s) for s in got))
sys.exit(int(sys.argv[3]))
"""
# A child that ignores SIGINT (says so in a file once it does) and sleeps a minute.
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "open(sys.argv[1] + '.up', 'w').close(); time.sleep(60)")


def _child(pool: Supervisor, tmp_path, name: str, wait: float = 30, code: int = 0):
    out = tmp_path / name
    pool.start(name, [sys.executable, "-c", CHILD, str(out), str(wait), str(code)],
               start_new_session=True)
    return out


def _until_up(*outs) -> None:
    deadline = time.monotonic() + 30
    while not all(os.path.exists(f"{o}.up") for o in outs):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_signal_reaches_every_child_once_and_all_are_reaped(tmp_path):
    pool = Supervisor()
    outs = [_child(pool, tmp_path, f"member-{k}") for k in range(2)]
    _until_up(*outs)
    with pool.forwarding():
        os.kill(os.getpid(), signal.SIGINT)  # (a Ctrl-C at this process: handled, forwarded)
        pool.wait(0.01)
    assert pool.stopped_by == signal.SIGINT and not pool.running
    assert [o.read_text() for o in outs] == [str(int(signal.SIGINT))] * 2  # once each
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_child_past_the_grace_period_is_killed(tmp_path):
    pool = Supervisor(grace_s=0.3)
    pool.start("stubborn", [sys.executable, "-c", STUBBORN, str(tmp_path / "s")])
    _until_up(tmp_path / "s")  # (it ignores SIGINT from now on)
    started = time.monotonic()
    pool.stop(signal.SIGINT)
    pool.wait(0.05)
    assert time.monotonic() - started < 10
    assert [c.code for c in pool.ended] == [-signal.SIGKILL] and pool.ended[0].after_stop


def test_without_kill_on_signal_a_child_saves_as_long_as_it_needs_until_terminated(tmp_path):
    """train --nproc: after a Ctrl-C a rank may take longer than the grace period to save
    (an evaluation, a checkpoint of a big model): it is not killed for it; only when the
    launcher stops the ranks itself (terminate) does the grace period count."""
    pool = Supervisor(grace_s=0.2, kill_on_signal=False)
    pool.start("rank 0", [sys.executable, "-c", STUBBORN, str(tmp_path / "r")])
    _until_up(tmp_path / "r")
    pool.stop(signal.SIGINT)
    deadline = time.monotonic() + 1.0  # five grace periods
    while time.monotonic() < deadline:
        assert not pool.reap()  # still running: not killed
        time.sleep(0.05)
    started = time.monotonic()
    pool.terminate()  # SIGTERM is not ignored: it ends at once
    assert time.monotonic() - started < 10 and [c.code for c in pool.ended] == [-signal.SIGTERM]


def test_failures_are_named_in_start_order_and_leaving_stops_the_rest(tmp_path):
    pool = Supervisor()
    with pool.forwarding():
        _child(pool, tmp_path, "rank 0", wait=0, code=3)
        _child(pool, tmp_path, "rank 1", wait=0, code=0)
        slow = _child(pool, tmp_path, "rank 2", wait=30, code=0)
        _until_up(slow)
        while len(pool.ended) < 2:
            pool.reap()
            time.sleep(0.01)
    # leaving the block stopped the child still running (SIGTERM), and reaped it
    assert not pool.running and slow.read_text() == str(int(signal.SIGTERM))
    assert [c.name for c in pool.failed()] == ["rank 0"] and pool.failed()[0].code == 3


def test_a_child_started_after_a_stop_gets_the_signal(tmp_path):
    pool = Supervisor()
    pool.stop(signal.SIGTERM)  # (before any child: nothing to forward to yet)
    started = time.monotonic()
    out = _child(pool, tmp_path, "late")
    pool.wait(0.01)
    assert time.monotonic() - started < 20  # it stopped instead of waiting its 30 s
    # (killed by it before its handler was set, or handled it)
    assert pool.ended[0].code == -signal.SIGTERM or out.read_text() == str(int(signal.SIGTERM))
