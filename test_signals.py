"""A download's signals: its run's steps post the calls on the loop, and a
signal worker (``_Signals``) makes each run's calls in the order posted,
one at a time, every one of them, whatever the loop and the workers do
meanwhile."""
import logging
import os
import sys
import threading
import time

import pytest

import bitpit
from conftest import private_workers


def test_a_call_posted_as_the_worker_empties_the_runs_queue_is_still_made():
    """The loop posts a call while the run still has one to make, and its
    thread is switched out before the call is in the run's queue: meanwhile
    the worker makes the one left, finds the queue empty and lets the run
    go. The call posted must still be handed to a worker, and made (else
    the run's later calls, its ``_end_run`` too, wait for ever)."""
    signals = bitpit._Signals()
    run = bitpit._Run()
    inside, go = threading.Event(), threading.Event()
    made = []

    class SwitchedOut(list):
        """The run's queue, whose next append comes after the worker is done."""
        armed = False

        def append(self, item):
            if self.armed:
                self.armed = False
                go.set()  # the worker makes 'first', finds none left, lets the run go
                assert bitpit._WORKERS.wait_quiet(5)
            super().append(item)

    def hold():
        inside.set()
        go.wait(5)

    run.calls = SwitchedOut()
    signals.post(run, hold)
    signals.post(run, made.append, 'first')
    signals.hand()
    assert inside.wait(5)  # the worker makes hold(); 'first' waits in the queue
    run.calls.armed = True
    signals.post(run, made.append, 'second')  # (the loop sees 'first' still there)
    signals.hand()
    assert bitpit._WORKERS.wait_quiet(5)
    assert made == ['first', 'second']
    run.done()  # (a run of its own, never spawned: it ends here)


def test_with_every_worker_held_up_the_loop_looks_again_later_not_at_once(
        server, tmp_path, monkeypatch):
    """Every signal worker is held up by a slow callback (here the one that
    ``MAX_WORKERS`` allows) while another download's signals wait: the loop
    looks again for a worker now and then, it does not spin at full speed
    until one is free. Once the callback returns, the signals follow."""
    monkeypatch.setattr(bitpit._Signals, 'MAX_WORKERS', 1)
    rounds = []
    hand = bitpit._SIGNALS.hand

    def counted(idle):
        rounds.append(None)
        return hand(idle)
    monkeypatch.setattr(bitpit._LOOP, '_after_round', counted)
    held, release = threading.Event(), threading.Event()

    def slow(d, old):
        if d.state == 'start':
            held.set()
            release.wait(10)
    a = bitpit.Downloader(server.add('/a', b'a' * 1000), path=tmp_path / 'a')
    a.listen('state-changed', slow)
    b = bitpit.Downloader(server.add('/b', b'b' * 1000), path=tmp_path / 'b')
    try:
        a.start()
        assert held.wait(10)
        b.start()
        assert not b.join(0.3) and b.is_alive  # its signals wait for the worker
        looked = len(rounds)
    finally:
        release.set()
    assert b.wait(10) and a.wait(10)
    b.join(10)
    a.join(10)
    # a few rounds move both files; at most one look every SPILL besides
    assert looked < 100, '{} rounds of the loop in 0.3 s'.format(looked)


def attempts_over(monkeypatch):
    """An event set once a run's attempt is over on the loop (its steps
    post its last call, ``_end_run``), whatever its signals given so far."""
    over = threading.Event()
    post = bitpit._SIGNALS.post

    def watched(run, call, *args):
        post(run, call, *args)
        if getattr(call, '__name__', '') == '_end_run':
            over.set()
    monkeypatch.setattr(bitpit._SIGNALS, 'post', watched)
    return over


def test_a_start_from_an_early_callback_does_nothing_though_the_attempt_is_over(
        server, tmp_path, monkeypatch):
    """The loop runs ahead of the signals: a small file's attempt may be
    over before its worker gives the run's first signal. A ``start()``
    from a callback of that signal is one while the download runs, from
    the point of view of its callbacks: it does nothing (only one from the
    last ``state-changed`` starts the download again)."""
    over = attempts_over(monkeypatch)
    url = server.add('/f', b'f' * 1000)
    d = bitpit.Downloader(url, path=tmp_path / 'f')
    states, restarts = [], []

    def on_state(d, old):
        states.append(d.state)
        if d.state == 'start':
            assert over.wait(5)
            d.start()
    d.listen('state-changed', on_state)
    d.listen('restart-time-changed', lambda d: restarts.append(d.restart_time))
    d.start()
    assert d.wait(10)
    d.join(10)
    assert (states, restarts) == (['start', 'download', 'complete'], [])
    assert not d.is_restarting and len(server.requests_for('/f')) == 1


def test_a_callback_that_calls_sys_exit_ends_its_call_only(server, tmp_path, caplog):
    """``sys.exit()`` in a callback ends what the thread was doing there, as
    in any thread, with no word; but the worker is no thread of the
    download's own: the run's other calls are still made (it ends, and
    ``join()`` returns), and the worker is free for other downloads."""
    url = server.add('/f', b'f' * 1000)
    states = []

    def exits(d, old):
        states.append(d.state)
        if d.state == 'start':
            sys.exit(3)
    d = bitpit.Downloader(url, path=tmp_path / 'f')
    d.listen('state-changed', exits)
    d.start()
    d.join(5)
    assert not d.is_alive and d.state == 'complete' and states[-1] == 'complete'
    assert bitpit._WORKERS.wait_quiet(5)
    assert bitpit._SIGNALS._delivering == 0, 'a worker is counted as delivering for ever'
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_no_thread_for_a_signal_worker_now_is_tried_again_not_the_loops_end(
        server, tmp_path, monkeypatch):
    """No thread to be had for a signal worker (too many threads, for a
    moment): the loop, which starts the workers, goes on moving every
    download, and starts one a moment later; the signals then come."""
    pool = private_workers(monkeypatch)  # (no waiting worker to take the task)
    start = threading.Thread.start
    refused = []

    def refuse_once(thread):
        if thread.name == 'bitpit-download' and not refused:
            refused.append(thread)
            raise RuntimeError("can't start new thread")
        start(thread)
    monkeypatch.setattr(threading.Thread, 'start', refuse_once)
    try:
        d = bitpit.Downloader(server.add('/f', b'f' * 1000), path=tmp_path / 'f')
        d.start()
        assert d.wait(5) and refused
        d.join(5)
        assert not d.is_alive
    finally:
        pool.close()
        assert pool.wait_quiet(10)


def test_the_path_changes_as_its_signal_is_given_not_before(server, tmp_path, monkeypatch):
    """A name chosen by the download (here Content-Disposition's) is set as
    its worker gives ``path-changed``, as the state and the size are with
    theirs: a callback of an earlier signal sees the path that was, though
    the loop, ahead, already writes to the new one."""
    over = attempts_over(monkeypatch)
    url = server.add('/get/f.bin', b'f' * 1000,
                     headers={'Content-Disposition': 'attachment; filename=x.bin'})
    d = bitpit.Downloader(url, path=tmp_path, dir_path=True, content_disposition=True)
    seen = []

    def on_state(d, old):
        if d.state == 'start':
            assert over.wait(5)
        seen.append((d.state, d.path.name))
    d.listen('state-changed', on_state)
    d.listen('path-changed', lambda d: seen.append(('path-changed', d.path.name)))
    d.start()
    assert d.wait(10)
    d.join(10)
    assert seen == [('start', 'f.bin'), ('path-changed', 'x.bin'), ('download', 'x.bin'),
                    ('complete', 'x.bin')]


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='no fork on this system')
def test_a_callback_that_forks_leaves_the_child_one_worker_delivering(server, tmp_path):
    """A callback may fork: in the child, its worker goes on with the
    run's calls, and is the one worker counted as delivering there; when
    it is done, none is (else the child's signals would wait for a spill)."""
    reader, writer = os.pipe()

    def report():  # (a thread of the child's: it reports, and ends the child)
        quiet = bitpit._WORKERS.wait_quiet(5)
        os.write(writer, repr((quiet, bitpit._SIGNALS._delivering)).encode())
        os._exit(0)

    def forks(d, old):
        if d.state == 'start':
            delivering = bitpit._SIGNALS._delivering
            pid = os.fork()
            if pid == 0:
                if delivering != 1 or bitpit._SIGNALS._delivering != 1:
                    os.write(writer, b'counted %d' % bitpit._SIGNALS._delivering)
                    os._exit(0)
                threading.Thread(target=report).start()
                return  # its worker goes on, in the child
            os.waitpid(pid, 0)
    d = bitpit.Downloader(server.add('/f', b'f' * 1000), path=tmp_path / 'f')
    d.listen('state-changed', forks)
    d.start()
    assert d.wait(10)
    d.join(10)
    os.close(writer)
    with os.fdopen(reader) as child:
        assert child.read() == repr((True, 0))


def test_a_run_let_go_by_its_worker_is_taken_up_by_another_at_once():
    """A worker makes a run's calls, finds none left and lets the run go;
    before it is out of the run's context, the loop posts another call and
    a second worker (free again after a slow callback) takes the run up.
    That worker must make the call in the run's context (which the first
    one must have left: a context is entered by one thread at a time),
    not fail and leave the run's calls, its ``_end_run`` too, for ever."""
    signals = bitpit._Signals()
    run = bitpit._Run()
    made, failed = [], []
    real_lock = signals._lock

    def second_worker():
        with real_lock:
            signals._delivering += 1
        try:
            signals._deliver()
        except BaseException as exc:
            failed.append(exc)

    class LetGo:
        """The signals' lock, which gives way to the loop and a second
        worker as the first worker lets the run go."""
        armed = True

        def __enter__(self):
            real_lock.acquire()

        def __exit__(self, *exc_info):
            real_lock.release()
            if self.armed and not run.queued:
                self.armed = False
                signals.post(run, made.append, 'second')
                signals.hand()  # (the first worker is counted: no worker is started)
                other = threading.Thread(target=second_worker)
                other.start()
                other.join(5)

    signals._lock = LetGo()
    signals.post(run, made.append, 'first')
    signals.hand()
    assert bitpit._WORKERS.wait_quiet(5)
    assert failed == [] and made == ['first', 'second']
    assert signals._delivering == 0 and not run.queued and run.thread is None
    run.done()  # (a run of its own, never spawned: it ends here)


def test_a_run_whose_last_call_was_made_is_not_taken_up_again():
    """A run posts its last call while a worker still makes an earlier one;
    the worker makes both (the run ends) before the loop hands the run
    again. The run must not be queued again: a worker that took up a run
    already done failed, and stayed counted as delivering, so every later
    hand waited ``SPILL`` for another worker (runs of 3,000 small files
    took 1.3-3.5 s instead of 0.7)."""
    signals = bitpit._Signals()
    run = bitpit._Run()
    inside, go = threading.Event(), threading.Event()

    def hold():
        inside.set()
        go.wait(5)
    signals.post(run, hold)
    signals.hand()
    assert inside.wait(5)
    signals.post(run, run.done)  # (its last call: _end_run's run.done())
    go.set()
    assert bitpit._WORKERS.wait_quiet(5) and not run.is_alive()
    signals.hand()  # (the loop's next round, with the run posted to)
    assert bitpit._WORKERS.wait_quiet(5)
    assert signals._delivering == 0 and not signals._ready


def test_join_waits_for_the_runs_last_call_and_a_callback_cannot_join_its_own(
        server, tmp_path):
    """A run has no lock of its own: ``join`` waits on its download's
    condition, which the run's last call wakes. Joined from outside while
    its last callback still runs, it waits (a timed join returns with the
    run alive); once the callback returns, it ends. Joined from its own
    callback, it raises ``RuntimeError`` rather than wait for itself."""
    d = bitpit.Downloader(server.add('/j', b'j' * 1000), path=tmp_path / 'j')
    in_callback, release = threading.Event(), threading.Event()
    raised = []

    def last(d, old):
        if d.state == 'complete':
            try:
                d.join(5)
            except RuntimeError as exc:
                raised.append(exc)
            in_callback.set()
            release.wait(5)
    d.listen('state-changed', last)
    d.start()
    assert in_callback.wait(5)
    d.join(0.05)
    assert d.is_alive
    release.set()
    began = time.monotonic()
    d.join(5)
    assert not d.is_alive and len(raised) == 1
    assert time.monotonic() - began < 2.5  # woken by the run's end, not its timeout
