"""bitpit's threads: every download's attempt and connections run as
steps on one loop thread, and a download's signals are given by pooled
workers (its download thread), which wait a moment for their next task
under the name ``bitpit-idle`` and then end; the interpreter's shutdown
ends the waiting ones at once but waits for the work under way, and a
forked child starts with no worker of its parent's. A slow callback holds
up no transfer, and another download's signals for 50 ms at most."""
import contextvars
import decimal
import gc
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
import weakref

import pytest

import bitpit
from conftest import DATA, bitpit_threads, private_workers, run_program, threads_left


def _download_threads(server, path):
    """The threads that gave a whole download's signals (its download
    threads: one after another, never two at once)."""
    threads = set()
    d = bitpit.Downloader(server.url('/data.bin'), path=path)
    d.listen('state-changed', lambda d, old: threads.add(threading.current_thread()))
    d.start()
    assert d.wait(30) and d.state == 'complete'
    d.join(5)
    assert threads
    return threads


def test_a_download_after_another_gives_its_signals_on_waiting_workers(server, tmp_path):
    server.add('/data.bin', DATA)
    first = _download_threads(server, tmp_path / 'a.bin')
    # its signals are given: its workers wait for the next ones, renamed
    assert all(t.is_alive() and t.name == bitpit._Workers.IDLE_NAME for t in first)
    waiting = {t for t in threading.enumerate() if t.name == bitpit._Workers.IDLE_NAME}
    second = _download_threads(server, tmp_path / 'b.bin')
    assert second <= waiting, 'a thread started for a second download\'s signals'
    assert (tmp_path / 'b.bin').read_bytes() == DATA
    assert bitpit_threads() == []


def test_a_waiting_worker_ends_after_its_wait(server, tmp_path):
    server.add('/data.bin', DATA)
    for thread in _download_threads(server, tmp_path / 'a.bin'):
        thread.join(bitpit._Workers.IDLE_SECONDS + 10)
        assert not thread.is_alive()


def test_a_task_runs_under_its_name_and_is_alive_until_it_returns():
    release, began = threading.Event(), threading.Event()
    seen = []

    def task():
        seen.append(threading.current_thread().name)
        began.set()
        release.wait(10)

    running = bitpit._WORKERS.run(task, 'bitpit-download')
    assert began.wait(10)
    assert running.is_alive()
    release.set()
    assert bitpit._WORKERS.wait_quiet(10)
    assert not running.is_alive() and seen == ['bitpit-download']


@pytest.mark.allow_error_log('bitpit-connection ended with an unexpected error')
def test_a_task_that_raises_is_logged_and_its_worker_goes_on():
    def broken():
        raise RuntimeError('a bug')

    bitpit._WORKERS.run(broken, 'bitpit-connection')
    assert bitpit._WORKERS.wait_quiet(10)
    after = bitpit._WORKERS.run(lambda: None, 'bitpit-connection')
    assert bitpit._WORKERS.wait_quiet(10)
    assert not after.is_alive()


def test_the_interpreter_waits_for_a_download_but_not_for_waiting_workers(
        server, tmp_path):
    """The main thread ends while the download runs: the program waits for
    it, as for the thread it once had, and then exits although its worker
    would wait far longer for a next task."""
    server.add('/data.bin', DATA, throttle=len(DATA) * 4)  # about a quarter second
    program = (
        'import bitpit\n'
        'bitpit._Workers.IDLE_SECONDS = 600\n'
        'bitpit.Downloader(URL, path="out.bin").start()\n')
    done = run_program(program, server.url('/data.bin'), tmp_path, tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 'out.bin').read_bytes() == DATA


def _child_download(url, path, result):
    d = bitpit.Downloader(url, path=path)
    d.start()
    result.put(d.wait(30))
    d.join(5)


@pytest.mark.skipif('fork' not in multiprocessing.get_all_start_methods(),
                    reason='no fork on this system')
def test_a_forked_child_starts_with_workers_of_its_own(server, tmp_path):
    server.add('/data.bin', DATA)
    _download_threads(server, tmp_path / 'parent.bin')  # the parent has a waiting worker
    context = multiprocessing.get_context('fork')
    result = context.Queue()
    child = context.Process(target=_child_download,
                            args=(server.url('/data.bin'), tmp_path / 'child.bin', result))
    child.start()
    try:
        assert result.get(timeout=30) is True
    finally:
        child.join(30)
    assert child.exitcode == 0
    assert (tmp_path / 'child.bin').read_bytes() == DATA
    # nor with the idle connections of its parent's pool, whose sockets it
    # holds: a request of the child's on one would share a TCP connection
    # with the parent's next request, each process reading answers the
    # other asked for
    parent, child_request = server.requests_for('/data.bin')
    assert child_request.conn != parent.conn


@pytest.fixture
def pool(monkeypatch):
    """A pool of bitpit's own for one test, whose workers wait long for
    their next task; closed at teardown."""
    pool = private_workers(monkeypatch)
    yield pool
    pool.close()
    assert pool.wait_quiet(10)


def test_a_download_that_ended_is_started_and_joined_from_another_on_its_worker(
        pool, server, tmp_path):
    """A callback of download B may start or join download A, whose
    attempt is over, as from any thread, though B runs on the worker that
    ran A's attempt."""
    server.add('/data.bin', DATA)
    first = bitpit.Downloader(server.url('/data.bin'), path=tmp_path / 'a.bin')
    ran_on = []  # its download thread: its worker
    first.listen('state-changed', lambda d, old: ran_on.append(threading.current_thread()))
    first.start()
    assert first.wait(30)
    first.join(10)
    worker, = set(ran_on)
    assert pool.wait_quiet(10)
    # a small download runs on one worker: two tasks at once make a second
    hold, taken = threading.Event(), [threading.Event(), threading.Event()]
    for event in taken:
        pool.run(lambda event=event: (event.set(), hold.wait(30)), 'bitpit-connection')
    assert all(event.wait(10) for event in taken)
    hold.set()
    assert pool.wait_quiet(10)
    for _ in range(50):  # keep every waiting worker but first's busy
        release, taken_up = threading.Event(), threading.Event()
        blocker = pool.run(lambda release=release, taken_up=taken_up: (
            taken_up.set(), release.wait(30)), 'bitpit-connection')
        assert taken_up.wait(10)  # (its worker is set before it runs)
        if blocker.thread is not worker:
            break
        release.set()
        assert pool.wait_quiet(10)
    else:
        pytest.fail("the first download's worker took every blocker")
    seen = []

    def on_state(d, old):
        if d.state == 'complete' and not seen:
            seen.append(threading.current_thread() is worker)
            try:
                first.join(5)
            except RuntimeError as e:
                seen.append(e)
            first.start()  # at once, not by a restart timer

    restarts = []
    first.listen('restart-time-changed', lambda d: restarts.append(d.restart_time))
    try:
        second = bitpit.Downloader(server.url('/data.bin'), path=tmp_path / 'b.bin')
        second.listen('state-changed', on_state)
        second.start()
        assert second.wait(30)
        second.join(10)
        assert first.wait(30)
        first.join(10)
    finally:
        release.set()
    assert (seen, restarts) == ([True], [])


_SEEN_BY: 'contextvars.ContextVar[str]' = contextvars.ContextVar('seen_by')


def test_a_task_starts_with_a_fresh_context_as_a_new_thread_would(pool):
    """A callback that sets a context variable (a decimal context, say)
    does not change what the next task on its worker sees: each task
    starts with the empty context a new thread starts with."""
    def first():
        _SEEN_BY.set('first')
        decimal.getcontext().prec = 3

    def second():
        seen.append((_SEEN_BY.get(None), decimal.getcontext().prec))

    pool.run(first, 'bitpit-download')
    assert pool.wait_quiet(10)  # its worker waits: it takes the next task
    seen = []
    pool.run(second, 'bitpit-download')
    assert pool.wait_quiet(10)
    fresh = []
    thread = threading.Thread(target=lambda: fresh.append(decimal.getcontext().prec))
    thread.start()
    thread.join(10)
    assert seen == [(None, fresh[0])]


def test_a_task_whose_thread_cannot_start_is_not_run_later(pool, monkeypatch):
    """No thread to be had (too many, or the interpreter finalizing): the
    caller gets the error, and the task does not run later on a worker
    started for another one, as a thread that failed to start never ran."""
    ran = []

    def refuse(thread):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, 'start', refuse)
        with pytest.raises(RuntimeError):
            pool.run(lambda: ran.append('refused'), 'bitpit-download')
    assert pool.wait_quiet(0), 'a task is left waiting for a worker'
    pool.run(lambda: ran.append('later'), 'bitpit-download')
    assert pool.wait_quiet(10)
    assert ran == ['later']


def test_the_hygiene_check_names_a_task_left_on_a_worker_older_than_the_test(pool):
    """A worker that waited when a test began may take up a task of the
    test and still be at it when the test ends: a leftover, though the
    test did not start its thread."""
    pool.run(lambda: None, 'bitpit-download')
    assert pool.wait_quiet(10)  # its worker waits: it takes the next task
    before = set(threading.enumerate())
    release = threading.Event()
    pool.run(lambda: release.wait(30), 'bitpit-download')
    try:
        assert threads_left(before, 0.05) == ['bitpit-download']
    finally:
        release.set()
        assert pool.wait_quiet(10)


def _child_sees(task, thread, result):
    result.put((task.is_alive(), thread.is_alive(), bitpit._WORKERS.wait_quiet(0)))
    thread.join()  # at once, as the thread has ended there
    result.put('joined')


@pytest.mark.skipif('fork' not in multiprocessing.get_all_start_methods(),
                    reason='no fork on this system')
def test_in_a_forked_child_the_parents_tasks_have_ended_as_its_threads_have():
    """Only the forking thread goes on in a child: a task that ran in the
    parent is not alive there, as a thread of the parent's is not, and
    the child's workers are quiet."""
    release = threading.Event()
    task = bitpit._WORKERS.run(lambda: release.wait(30), 'bitpit-download')
    thread = threading.Thread(target=release.wait, args=(30,))
    thread.start()
    context = multiprocessing.get_context('fork')
    result = context.Queue()
    child = context.Process(target=_child_sees, args=(task, thread, result))
    child.start()
    try:
        assert result.get(timeout=30) == (False, False, True)
        assert result.get(timeout=30) == 'joined'
    finally:
        release.set()
        child.join(30)
        if child.is_alive():
            child.kill()
        assert bitpit._WORKERS.wait_quiet(10)
        thread.join(10)
    assert child.exitcode == 0


def _child_sees_download(d, result):
    result.put(d.is_alive)
    d.join()  # at once: its run ended with the parent's loop and workers
    result.put('joined')


@pytest.mark.skipif('fork' not in multiprocessing.get_all_start_methods(),
                    reason='no fork on this system')
def test_in_a_forked_child_a_download_the_parent_runs_is_not_alive(server, tmp_path):
    """A download's run is steps on the parent's loop and calls for its
    workers, none of which the child has: there it has ended, as the
    download thread it replaces would have, and joining it returns."""
    url = server.add('/data.bin', DATA, stall_after=0)
    d = bitpit.Downloader(url, path=tmp_path / 'out.bin')
    d.start()
    try:
        assert server.wait_requests(1, timeout=10)
        context = multiprocessing.get_context('fork')
        result = context.Queue()
        child = context.Process(target=_child_sees_download, args=(d, result))
        child.start()
        try:
            assert result.get(timeout=30) is False
            assert result.get(timeout=30) == 'joined'
        finally:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join(5)
        assert child.exitcode == 0
    finally:
        d.stop()



@pytest.mark.skipif(not hasattr(os, 'fork'), reason='no fork on this system')
def test_in_a_forked_child_joining_a_run_of_the_parents_needs_no_lock_it_held(
        server, tmp_path):
    """In a child, a download the parent ran has ended: joining it returns
    at once, even when a thread of the parent's (gone in the child) held
    the download's lock as the process forked (the loop ending an
    attempt, a worker its run): the join of an ended run takes no lock."""
    d = bitpit.Downloader(server.add('/f', DATA, stall_after=0), path=tmp_path / 'f')
    held, release = threading.Event(), threading.Event()

    def hold():
        with d._lock:
            held.set()
            release.wait(10)
    holder = threading.Thread(target=hold)
    d.start()
    reader, writer = os.pipe()
    try:
        assert server.wait_requests(1, timeout=10)
        holder.start()
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: it reports, and never returns
            try:
                d.join(1)
                os.write(writer, b'joined')
            finally:
                os._exit(0)
        os.close(writer)
        ready, _, _ = select.select([reader], [], [], 5)
        answer = os.read(reader, 100) if ready else b''
        if not answer:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert answer == b'joined'
    finally:
        os.close(reader)
        release.set()
        holder.join(10)
        d.stop()

@pytest.mark.skipif(not hasattr(os, 'fork'), reason='no fork on this system')
def test_a_task_that_forks_goes_on_running_in_the_child():
    """A callback may fork: in the child its own task is still under way
    (and ends, there too, when it returns)."""
    ready = threading.Event()
    reader, writer = os.pipe()
    mine = []

    def forking():
        ready.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: it reports, and never returns
            task, = mine
            seen = (task.is_alive(), task.thread is threading.current_thread(),
                    bitpit._WORKERS.wait_quiet(0))
            os.write(writer, repr(seen).encode())
            os._exit(0)
        os.waitpid(pid, 0)

    mine.append(bitpit._WORKERS.run(forking, 'bitpit-download'))
    ready.set()
    assert bitpit._WORKERS.wait_quiet(30)
    os.close(writer)
    with os.fdopen(reader) as child:
        assert child.read() == repr((True, True, False))


def test_a_task_that_calls_sys_exit_ends_quietly_as_a_thread_does(caplog):
    """``sys.exit()`` in a callback ends the download thread, as in any
    thread, with no word: it is not a bug to log."""
    exits = bitpit._WORKERS.run(lambda: sys.exit(3), 'bitpit-download')
    assert bitpit._WORKERS.wait_quiet(10)
    assert not exits.is_alive()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_download_that_ended_is_freed_when_dropped_with_no_cycle_to_collect(
        server, tmp_path):
    """A thread drops its target once it ran: a download that ended and
    that no one holds any more is freed at once, not by the collector of
    cycles (nor once its worker has run something else)."""
    server.add('/data.bin', DATA)
    gc.collect()
    gc.disable()
    try:
        d = bitpit.Downloader(server.url('/data.bin'), path=tmp_path / 'out.bin')
        d.start()
        assert d.wait(30)
        d.join(10)
        dropped = weakref.ref(d)
        del d
        assert dropped() is None
    finally:
        gc.enable()


# -- download threads: the signal workers ------------------------------------------

def test_a_slow_callback_holds_up_only_its_own_downloads_signals(server, tmp_path):
    """A callback that blocks holds up the later signals of its download,
    not another download's: a second worker takes up the signals that
    waited behind it (after 50 ms), and the first download's come after
    its callback returned, in order."""
    release, blocked, b_done = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def slow(d, old):
        seen.append(('a', old, d.state))
        if d.state == 'start':
            blocked.set()
            release.wait(20)

    def quick(d, old):
        seen.append(('b', old, d.state))
        if d.state == 'complete':
            b_done.set()
    a = bitpit.Downloader(server.add('/a', DATA), path=tmp_path / 'a')
    b = bitpit.Downloader(server.add('/b', DATA), path=tmp_path / 'b')
    a.listen('state-changed', slow)
    b.listen('state-changed', quick)
    try:
        a.start()
        assert blocked.wait(10)
        b.start()
        assert b_done.wait(10), 'the second download\'s signals waited for the first\'s callback'
        assert b.wait(10) and a.is_alive and ('a', 'start', 'download') not in seen
    finally:
        release.set()
    assert a.wait(10)
    a.join(10)
    b.join(10)
    assert [(old, new) for who, old, new in seen if who == 'a'] == [
        ('pause', 'start'), ('start', 'download'), ('download', 'complete')]
    assert (tmp_path / 'a').read_bytes() == DATA == (tmp_path / 'b').read_bytes()


def test_a_callback_never_holds_up_a_transfer_its_own_included(server, tmp_path):
    """While the callback of a download's ``start`` blocks, the loop moves
    the whole file: the server sends every byte (more than socket buffers
    hold) before the callback returns; the signals come after it, in
    order."""
    data = os.urandom(24 * 1024 * 1024)
    url = server.add('/big', data)
    sent_all, states = threading.Event(), []

    def on_state(d, old):
        states.append(d.state)
        if d.state == 'start' and server.wait_sent(len(data), '/big', timeout=20):
            sent_all.set()
    d = bitpit.Downloader(url, path=tmp_path / 'big')
    d.listen('state-changed', on_state)
    d.start()
    assert d.wait(30)
    d.join(10)
    assert sent_all.is_set(), 'the transfer waited for the callback'
    assert states == ['start', 'download', 'complete']
    assert (tmp_path / 'big').read_bytes() == data


def test_each_run_gives_its_signals_in_a_fresh_context(server, tmp_path):
    """What one download's callback sets in a context variable, another
    download's callbacks (on the same worker) do not see, nor does its own
    next run's: each run's signals start in an empty context, as in a new
    thread."""
    seen = []

    def set_it(d, old):
        seen.append(_SEEN_BY.get(None))
        _SEEN_BY.set(d.url)
    first = bitpit.Downloader(server.add('/one', DATA), path=tmp_path / 'one')
    second = bitpit.Downloader(server.add('/two', DATA), path=tmp_path / 'two')
    first.listen('state-changed', set_it)
    second.listen('state-changed', set_it)
    for d in (first, second, first):
        d.start()
        assert d.wait(10)
        d.join(10)
    # each run's first signal saw nothing, its later ones saw its own (the
    # last run finds the file complete: start, then complete)
    assert seen == [None, first.url, first.url, None, second.url, second.url,
                    None, first.url]


def test_a_start_with_no_thread_to_be_had_raises_and_leaves_the_download_startable(
        server, tmp_path, monkeypatch):
    """No thread for the loop (too many threads): ``start()`` raises as
    ``Thread.start`` does, and the download is left as it was, not running
    (``wait()`` returns at once) and startable later."""
    bitpit._LOOP.join(10)  # (the loop of an earlier test has ended)
    d = bitpit.Downloader(server.add('/f', DATA), path=tmp_path / 'f')
    live = set(bitpit._Run.live)

    def refuse(thread):
        raise RuntimeError("can't start new thread")
    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, 'start', refuse)
        with pytest.raises(RuntimeError):
            d.start()
    assert not d.is_alive and d.wait(0) is False and d.state == 'pause'
    assert set(bitpit._Run.live) <= live  # (no run of its own left alive)
    d.start()
    assert d.wait(10) and (tmp_path / 'f').read_bytes() == DATA
    d.join(10)


def test_a_download_whose_workers_cannot_start_still_ends_and_signals(
        server, tmp_path, monkeypatch):
    """Python 3.12.0 to 3.12.2 refuse a new thread once the main thread has
    ended, though the program still waits for its downloads: the loop
    cannot start a worker then. It makes their calls itself, late, rather
    than die with every download it drives (and their files, and their
    signals)."""
    url = server.add('/data.bin', DATA)
    d = bitpit.Downloader(url, path=tmp_path / 'out.bin')
    states = []
    d.listen('state-changed', lambda d, old: states.append(d.state))

    def no_thread(target, name):
        raise RuntimeError("can't create new thread at interpreter shutdown")
    monkeypatch.setattr(bitpit._WORKERS, 'run', no_thread)
    d.start()
    d.join(10)
    assert not d.is_alive and states == ['start', 'download', 'complete']
    assert (tmp_path / 'out.bin').read_bytes() == DATA
