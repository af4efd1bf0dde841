"""bitpit from asyncio: ``await bitpit.adownload(url)`` (download()'s twin:
its result and errors; a cancelled task stops the download at once and the
same call resumes it), ``await d`` (wait()'s answer; a cancelled wait
leaves the download running), ``d.events()`` (the signals, in the
callbacks' order, in the loop's thread, ending when wait() would return,
leaving no listener behind), and the loop's health: never blocked for more
than a millisecond by bitpit, no thread left, no noise from asyncio."""
import asyncio
import functools
import gc
import io
import logging
import os
import re
import threading
import time
import warnings

import pytest

import bitpit
from conftest import DATA, OFFSET, bitpit_threads, sidecar_of


class AsyncioLog(logging.Handler):
    """Keeps the records of the 'asyncio' logger (from WARNING, or every
    one in debug mode)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self, level=logging.WARNING):
        return [r.getMessage() for r in self.records if r.levelno >= level]


NOISE = re.compile(r'Task was destroyed|Event loop is closed|never awaited|'
                   r'Exception in callback|exception was never retrieved')


def run(main, *args, debug=False, capfd=None):
    """``asyncio.run(main(*args))`` with the 'asyncio' logger and the
    RuntimeWarnings recorded; fails on any noise in them (and on standard
    error, with ``capfd``). Returns ``(result, log)``."""
    log = AsyncioLog()
    logger = logging.getLogger('asyncio')
    level = logger.level
    logger.addHandler(log)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always', RuntimeWarning)
            result = asyncio.run(main(*args), debug=debug)
    finally:
        logger.removeHandler(log)
        logger.setLevel(level)
    noise = [m for m in log.messages(logging.ERROR) if NOISE.search(m)]
    noise += [str(w.message) for w in caught if NOISE.search(str(w.message))]
    assert not noise, noise
    if capfd is not None:
        err = capfd.readouterr().err
        assert not NOISE.search(err), err
    return result, log


def alive(prefix='bitpit-'):
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


async def bytes_sent_reach(server, path, count, timeout=10):
    """Until the server has sent ``count`` body bytes of ``path``, waited
    for off the event loop."""
    assert await asyncio.to_thread(server.wait_sent, count, path, timeout), \
        'the server sent too little'


def callbacks_of(d):
    """How many callbacks and watchers are registered with ``d``."""
    d.listen('url-changed', print)  # makes sure the registry exists
    d.unlisten('url-changed', print)
    watchers = d._changed.watchers if d._changed is not None else []
    return sum(len(bitpit._registrations(c)) for c in d._emitter_callbacks.values()) + \
        len(watchers)


# ---------------------------------------------------------------------------
# adownload: download()'s result and errors
# ---------------------------------------------------------------------------

def test_adownload_returns_what_download_returns(server, tmp_path, capsys):
    url = server.add('/get/f.bin', DATA, headers={
        'Content-Disposition': 'attachment; filename="report.pdf"'})
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    options = dict(dir_path=True, content_disposition=True, connections=2, progress=True)
    expected = bitpit.download(url, tmp_path / 'a', **options)
    path, _ = run(functools.partial(bitpit.adownload, url, tmp_path / 'b', **options))
    assert (expected.name, path.name) == ('report.pdf', 'report.pdf')
    assert path.parent == tmp_path / 'b' and path.read_bytes() == DATA
    assert capsys.readouterr().err == ''      # progress only on a terminal
    sink = io.BytesIO()
    assert run(bitpit.adownload, url, sink)[0] is sink and sink.getvalue() == DATA


def test_adownload_raises_what_download_raises(server, tmp_path):
    busy = server.add('/busy', b'', status=503)
    cases = [(server.url('/missing'), {}), (busy, {}),
             ('ftp://127.0.0.1/f', {}), (server.url('/f'), {'connections': 0})]
    for url, options in cases:
        with pytest.raises(Exception) as expected:
            bitpit.download(url, tmp_path / 'f.bin', **options)
        with pytest.raises(expected.type) as raised:
            run(functools.partial(bitpit.adownload, url, tmp_path / 'f.bin', **options))
        assert str(raised.value) == str(expected.value)
        assert getattr(raised.value, 'status', None) == getattr(expected.value, 'status', None)
    with pytest.raises(bitpit.HTTPStatusError) as raised:
        run(bitpit.adownload, server.url('/missing'), tmp_path / 'f.bin')
    assert raised.value.status == 404 and not raised.value.retryable


def test_adownload_waits_through_restarts(server, tmp_path):
    url = server.add('/f', DATA, status=503, status_times=2)
    path, _ = run(functools.partial(bitpit.adownload, url, tmp_path / 'f.bin',
                                    restart_wait=0.05))
    assert path.read_bytes() == DATA
    assert [r.path for r in server.requests] == ['/f'] * 3


def test_many_adownloads_at_once(server, tmp_path):
    urls = [server.add('/{}'.format(i), DATA[:50000 + i]) for i in range(20)]

    async def main():
        return await asyncio.gather(*(bitpit.adownload(url, tmp_path / str(i))
                                      for i, url in enumerate(urls)))
    paths, _ = run(main)
    assert [p.read_bytes() for p in paths] == [DATA[:50000 + i] for i in range(20)]


# ---------------------------------------------------------------------------
# adownload: cancelled, then resumed
# ---------------------------------------------------------------------------

def test_cancelling_adownload_stops_it_at_once_and_the_same_call_resumes(
        server, tmp_path, capfd):
    url = server.add('/f', DATA, throttle=1000000)
    target = tmp_path / 'f.bin'
    seen = {}

    async def main():
        task = asyncio.ensure_future(bitpit.adownload(url, target))
        await bytes_sent_reach(server, '/f', OFFSET)
        seen['cancelled_at'] = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        seen['raised_after'] = time.monotonic() - seen['cancelled_at']
        seen['threads'] = alive('bitpit-download') + alive('bitpit-loop')
    run(main, capfd=capfd)
    cancelled_at = seen['cancelled_at']
    assert server.bytes_sent('/f', since=cancelled_at + 0.1) == 0   # stopped within 0.1 s
    assert seen['threads'] == [] and seen['raised_after'] < 1.0
    held = target.stat().st_size
    assert sidecar_of(target).exists()
    assert OFFSET <= held <= server.bytes_sent('/f') < len(DATA)
    assert target.read_bytes()[:held] == DATA[:held]

    server.add('/f', DATA)
    path, _ = run(bitpit.adownload, url, target)
    assert path.read_bytes() == DATA and not sidecar_of(target).exists()
    assert server.requests[-1].headers['Range'] == 'bytes={}-'.format(held)


def test_cancelling_adownload_during_a_restart_wait_leaves_no_timer(server, tmp_path):
    url = server.add('/f', DATA, status=503)

    async def main():
        task = asyncio.ensure_future(bitpit.adownload(url, tmp_path / 'f.bin',
                                                      restart_wait=30))
        while not alive('bitpit-restart'):
            await asyncio.sleep(0.01)  # no event tells a restart is scheduled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    run(main)
    assert bitpit_threads() == [] and len(server.requests) == 1


def test_asyncio_run_ends_cleanly_with_adownloads_still_running(server, tmp_path, capfd):
    """asyncio.run() cancels what its coroutine left running: every
    download stops at once, its thread ends, and nothing is said about it."""
    count = 8
    urls = [server.add('/{}'.format(i), DATA, throttle=200000) for i in range(count)]
    ended = []

    async def main():
        for i, url in enumerate(urls):
            asyncio.ensure_future(bitpit.adownload(url, tmp_path / str(i)))
        for i in range(count):
            await bytes_sent_reach(server, '/{}'.format(i), 10000)
        ended.append(time.monotonic())   # asyncio.run() cancels them now
    run(main, capfd=capfd)
    assert server.bytes_sent(since=ended[0] + 0.1) == 0
    assert alive('bitpit-download') == [] and alive('bitpit-loop') == []
    assert all(sidecar_of(tmp_path / str(i)).exists() for i in range(count))


def test_many_adownloads_cancelled_at_once_all_stop_within_100ms(server, tmp_path):
    """A time-out over 40 downloads, some not yet started: each stops (or
    never starts), all within 0.1 s, and no thread is left."""
    count = 40
    urls = [server.add('/{}'.format(i), DATA, throttle=100000) for i in range(count)]
    seen = {}

    async def main():
        tasks = [asyncio.ensure_future(bitpit.adownload(url, tmp_path / str(i)))
                 for i, url in enumerate(urls)]
        await asyncio.to_thread(server.wait_requests, 5)
        seen['cancelled_at'] = time.monotonic()
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        assert all(task.cancelled() for task in tasks)
        seen['threads'] = alive('bitpit-download') + alive('bitpit-loop')
    run(main)
    assert seen['threads'] == []
    assert server.bytes_sent(since=seen['cancelled_at'] + 0.1) == 0
    assert len(server.requests) <= count


def test_a_cancel_while_the_starter_starts_touches_no_other_adownload(server, tmp_path):
    url = server.add('/f', DATA)

    async def main():
        first = asyncio.ensure_future(bitpit.adownload(url, tmp_path / 'a'))
        second = asyncio.ensure_future(bitpit.adownload(url, tmp_path / 'b'))
        await asyncio.sleep(0)       # both wait for the loop's starter thread
        first.cancel()
        return await second
    path, _ = run(main)
    assert path.read_bytes() == DATA


# ---------------------------------------------------------------------------
# await d
# ---------------------------------------------------------------------------

def test_await_a_downloader_gives_what_wait_gives(server, tmp_path):
    url = server.add('/f', DATA)

    async def main(d):
        d.start()
        return await d
    d = bitpit.Downloader(url, tmp_path / 'f.bin')
    assert run(main, d)[0] is True and d.wait(0) is True
    d = bitpit.Downloader(server.url('/missing'), tmp_path / 'g.bin')
    assert run(main, d)[0] is False and d.wait(0) is False and d.state == 'fatal-error'

    async def unstarted(d):
        return await d
    assert run(unstarted, bitpit.Downloader(url, tmp_path / 'h.bin'))[0] is False


def test_cancelling_await_d_ends_only_the_waiting(server, tmp_path):
    url = server.add('/f', DATA, throttle=2000000)
    d = bitpit.Downloader(url, tmp_path / 'f.bin')

    async def wait_for(d):
        return await d

    async def main():
        d.start()
        task = asyncio.ensure_future(wait_for(d))
        await asyncio.sleep(0)     # its first step: it waits now
        assert len(d._changed.watchers) == 1 and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert d._changed.watchers == []
        assert d.is_alive and d.state != 'complete'
        return await d
    assert run(main)[0] is True
    assert (tmp_path / 'f.bin').read_bytes() == DATA


# ---------------------------------------------------------------------------
# d.events()
# ---------------------------------------------------------------------------

def record_callbacks(d):
    """Every signal ``d``'s callbacks get, as ``(signal, args after the
    emitter)``, in the order they get them."""
    calls = []
    for signal in d.__signals__:
        d.listen(signal, lambda d, *args, signal=signal: calls.append((signal, args)))
    return calls


async def collect(d, start=True):
    events, threads = [], set()
    stream = d.events()
    if start:
        d.start()
    async for signal, args in stream:
        events.append((signal, args))
        threads.add(threading.get_ident())
    return events, threads


def test_events_come_in_the_callbacks_order_through_restarts(server, tmp_path):
    url = server.add('/f', DATA, status=503, status_times=1)
    d = bitpit.Downloader(url, tmp_path / 'f.bin', restart_wait=0.05, update_period=0.02)
    calls = record_callbacks(d)
    (events, threads), _ = run(collect, d)
    assert events == calls
    assert threads == {threading.get_ident()}   # the loop's thread
    states = [args[0] for signal, args in events if signal == 'state-changed'] + [d.state]
    assert states == ['pause', 'start', 'error', 'start', 'download', 'complete']
    assert events[-1][0] == 'state-changed'      # ends after the state-changed to complete
    assert ('restart-time-changed', ()) in events and ('size-changed', ()) in events


def test_events_end_when_wait_would_return(server, tmp_path):
    d = bitpit.Downloader(server.url('/missing'), tmp_path / 'f.bin', restart_wait=0)
    (events, _), _ = run(collect, d)
    assert events[-1] == ('state-changed', ('start',)) and d.state == 'fatal-error'

    url = server.add('/slow', DATA, stall_after=1000)
    d = bitpit.Downloader(url, tmp_path / 'g.bin', timeout=30)

    async def stopped(d):
        stream = d.events()
        d.start()
        await asyncio.to_thread(server.wait_stalled, 1)
        await asyncio.to_thread(d.stop)
        return [item async for item in stream]
    events, _ = run(stopped, d)
    assert events[-2:] == [('speed-changed', ()), ('state-changed', ('download',))]
    assert d.state == 'pause'

    async def finished(d):   # already complete: nothing more comes
        return [item async for item in d.events()]
    complete = bitpit.Downloader(server.add('/f', DATA), tmp_path / 'h.bin')
    assert complete.wait(0) is False
    complete.start()
    assert complete.wait(10)
    assert run(finished, complete)[0] == []


def test_events_leave_no_listener_behind(server, tmp_path):
    url = server.add('/f', DATA, throttle=2000000)
    d = bitpit.Downloader(url, tmp_path / 'f.bin', update_period=0.02)
    before = callbacks_of(d)

    async def main():
        stream = d.events()                       # ended by aclose()
        assert callbacks_of(d) > before
        await stream.aclose()
        assert callbacks_of(d) == before
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        stream = d.events()                       # dropped in the middle
        d.start()
        async for signal, args in stream:
            break
        del stream
        gc.collect()
        assert callbacks_of(d) == before
        events = [item async for item in d.events()]   # ended by the download
        assert callbacks_of(d) == before
        return events
    events, _ = run(main)
    assert events[-1] == ('state-changed', ('download',)) and d.state == 'complete'


def test_events_after_the_loop_closed_are_dropped_quietly(server, tmp_path, capfd):
    d = bitpit.Downloader(server.add('/f', DATA), tmp_path / 'f.bin')
    before = callbacks_of(d)
    kept = []

    async def main():
        kept.append(d.events())      # never iterated, never closed
    run(main)
    d.rate_limit = 0                 # a signal, and nowhere to hand it
    d.start()
    assert d.wait(10)
    assert callbacks_of(d) == before
    assert 'Event loop is closed' not in capfd.readouterr().err


# ---------------------------------------------------------------------------
# the event loop is never blocked
# ---------------------------------------------------------------------------

BITPIT_HANDLE = re.compile(r"^<(Handle (?P<callback>\S+)\(.* created at .*bitpit\.py:\d+|"
                           r"Task \w+ name='(?P<task>bitpit-[^']*)'.*|"
                           r"Task \w+ name='[^']*' coro=<(?P<coro>adownload\(\) "
                           r"(running|done, defined) at \S+bitpit\.py:\d+)>.*)>$", re.S)


class HandleClock:
    """While installed, times every callback the loop runs: its wall time
    and its thread's CPU time. What a callback spent waiting (for a lock,
    a thread, the disk, the network: blocked) is the difference; debug
    mode's own bookkeeping and a slow machine's computing are CPU time, and
    are not waiting. ``waits``: ``[(handle as the loop names it, seconds
    waited)]`` of the callbacks slower than ``slow_callback_duration``;
    ``timed``: how many callbacks it timed in all."""

    def __init__(self):
        self.waits = []
        self.timed = 0
        self._run = asyncio.events.Handle._run

    def __enter__(self):
        clock, run = self, self._run
        format_handle = asyncio.base_events._format_handle

        def timed(handle):
            wall, cpu = time.perf_counter(), time.thread_time()
            run(handle)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            clock.timed += 1
            if wall >= handle._loop.slow_callback_duration:
                clock.waits.append((format_handle(handle), wall - cpu))
        asyncio.events.Handle._run = timed
        return self

    def __exit__(self, *exc_info):
        asyncio.events.Handle._run = self._run


def bitpit_waits(waits):
    """Of ``HandleClock.waits``, bitpit's callbacks (made in bitpit.py), the
    steps of adownload() (each named by the line it stopped at) and the
    test's tasks that call bitpit (named bitpit-...): ``{callback: the
    longest it waited}``."""
    found = {}
    for handle, waited in waits:
        match = BITPIT_HANDLE.match(handle)
        if match:
            name = match.group('callback') or match.group('task') or match.group('coro')
            found[name] = max(found.get(name, 0), waited)
    return found


async def grow_default_executor(loop, workers=4):
    """Give the loop a default executor of ``workers`` threads, all started
    now: an executor starts each from the loop's thread, the first time it
    needs it."""
    import concurrent.futures
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(workers))
    barrier = threading.Barrier(workers)
    await asyncio.gather(*(loop.run_in_executor(None, barrier.wait, 10)
                           for _ in range(workers)))


def test_bitpit_never_blocks_the_loop_for_a_millisecond(server, tmp_path):
    """In debug mode the loop names every callback that takes longer than
    ``slow_callback_duration`` (1 ms). On this kind of machine many take
    that long computing (debug mode's bookkeeping, a gather's wake-up, a
    slow VM): what blocking means is waiting, so each slow callback's wait
    is measured, its wall time less its thread's CPU time (``HandleClock``).
    A bitpit callback fails the test when it waited more than 1 ms in every
    run (up to 6: a wait for the GIL or the CPU comes and goes; a call that
    blocks, such as a join or a thread's start, comes every time). What is
    not bitpit's does not count, and the garbage collector is off during
    the runs. On a machine whose load is well above its CPUs nothing can
    be judged: the test is skipped there."""
    urls = [server.add('/{}'.format(i), DATA[:60000], throttle=300000) for i in range(3)]

    async def follow(d):
        await asyncio.get_running_loop().run_in_executor(None, d.start)
        return [item async for item in d.events()] + [await d]

    async def cancelled(round_no):
        url = server.add('/stopped{}'.format(round_no), DATA, throttle=300000)
        task = asyncio.ensure_future(bitpit.adownload(url, tmp_path / 's{}'.format(round_no)))
        await bytes_sent_reach(server, '/stopped{}'.format(round_no), 30000)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def main(round_no):
        loop = asyncio.get_running_loop()
        await grow_default_executor(loop)
        loop.slow_callback_duration = 0.001
        d = bitpit.Downloader(urls[0], tmp_path / 'd{}'.format(round_no), update_period=0.05)
        tasks = [loop.create_task(follow(d), name='bitpit-follow'),
                 loop.create_task(cancelled(round_no))]
        tasks += [loop.create_task(bitpit.adownload(url, tmp_path / '{}-{}'.format(round_no, i)))
                  for i, url in enumerate(urls[1:])]
        return await asyncio.gather(*tasks)

    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    if load > 4:
        pytest.skip('{:.1f} runnable threads per CPU: a machine this busy holds any thread up '
                    'for milliseconds, bitpit or not'.format(load))
    bitpit.download(urls[0], tmp_path / 'warm')  # bitpit's lazy imports, done once
    blocked, rounds = None, 0
    gc.collect()
    gc.disable()
    try:
        while blocked is None or blocked and rounds < 6:
            with HandleClock() as clock:
                (followed, *_), _ = run(main, rounds, debug=True)
            assert followed[-1] is True and followed[-2][0] == 'state-changed'
            assert clock.timed, 'the clock saw no callback run'
            found = {name: waited for name, waited in bitpit_waits(clock.waits).items()
                     if waited > 0.001}
            blocked = found if blocked is None else {
                name: max(waited, found[name]) for name, waited in blocked.items()
                if name in found}
            rounds += 1
    finally:
        gc.enable()
    assert not blocked, 'waited more than 1 ms in each of {} runs: {}'.format(rounds, blocked)
