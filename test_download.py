"""A download's life: states, signals and properties of a full download,
file objects and empty files, update_size(), stop and start (also from
callbacks, also in a stall: promptly), stalls turned into errors, the
restart policy after an error (restart_wait and changing it, retries,
stop or start from a callback) and a refused connection."""
import datetime
import io
import logging
import socket
import threading
import time

import pytest

import bitpit
from conftest import DATA, Recorder, bitpit_threads, download, sidecar_of


# ---------------------------------------------------------------------------
# a complete download
# ---------------------------------------------------------------------------

def test_full_download_states_signals_and_properties(server, tmp_path):
    server.add('/data.bin', DATA)
    d, rec = download(server.url('/data.bin'), tmp_path / 'data.bin')
    assert (tmp_path / 'data.bin').read_bytes() == DATA
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']
    assert rec.states[0] == ('pause', 'start')
    assert rec.sizes == [len(DATA)]
    assert rec.speeds and rec.speeds[-1][1] == 0
    assert (d.size, d.downloaded, d.remaining, d.ratio, d.percentage) == \
        (len(DATA), len(DATA), 0, 1.0, 100.0)
    assert d.eta == datetime.timedelta(0) and d.speed == 0
    assert d.human_size == bitpit.human_readable(len(DATA))
    assert d.human_downloaded == d.human_size and d.human_remaining == (0, 'B')
    assert d.last_exception is None and not d.is_alive
    assert not (tmp_path / 'data.bin.bitpit').exists()
    methods = [r.method for r in server.requests]
    assert methods == ['GET'], 'one request per attempt, no HEAD'


def test_a_file_that_fails_its_check_at_its_end_still_signals_its_download_first(
        server, tmp_path):
    """What a small file's transfer tells at its end (its size, the start
    of its download) is given with the run's last call: a failure after
    the body came (a checksum that does not match) still signals them,
    before the failure, in order."""
    d, rec = download(server.add('/f', b'f' * 1000), tmp_path / 'f',
                      checksum='sha256:' + '0' * 64)
    assert [new for _, new in rec.states] == ['start', 'download', 'fatal-error']
    assert rec.sizes == [1000] and isinstance(d.last_exception, bitpit.IntegrityError)


def test_a_big_files_download_is_told_before_its_end_on_a_worker(
        server, tmp_path, monkeypatch):
    """A file that came whole before the run's first look at it (here: no
    look for 30 s) ends with disk work on a worker (read back for its
    checksum, its sidecar synced), which may take long: its ``download``
    state and size are told as the body is over, not held back until
    that work is done."""
    monkeypatch.setattr(bitpit, '_TEND_PERIOD', 30.0)
    data = DATA * 5  # (above _DISK_WORK_ON_LOOP: its end is a worker's)
    result, ending, release = bitpit._Transfer.result, threading.Event(), threading.Event()

    def slow_end(transfer):
        ending.set()
        release.wait(10)
        return result(transfer)
    monkeypatch.setattr(bitpit._Transfer, 'result', slow_end)
    d = bitpit.Downloader(server.add('/big', data), path=tmp_path / 'big', update_period=30)
    rec = Recorder(d)
    d.start()
    try:
        assert ending.wait(10)
        rec.wait_state('download', timeout=2)
        assert rec.sizes == [len(data)]
    finally:
        release.set()
        d.join(10)
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']


def test_download_into_file_object_is_not_closed(server):
    server.add('/data.bin', DATA)
    sink = io.BytesIO()
    d, _ = download(server.url('/data.bin'), sink)
    assert d.state == 'complete' and not sink.closed and sink.getvalue() == DATA


class _PathWithWrite:
    """An ``os.PathLike`` that also has a ``write`` (as some path classes do)."""

    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return str(self.path)

    def write(self, data):
        raise AssertionError('a path is opened, never written to as a file object')


def test_a_path_like_with_a_write_method_is_a_path(server, tmp_path):
    # it was taken for a file object, then for a path by the store, which
    # met a PathLike without pathlib's methods: AttributeError (mypy found it)
    server.add('/data.bin', DATA)
    d, _ = download(server.url('/data.bin'), _PathWithWrite(tmp_path / 'data.bin'))
    assert d.state == 'complete', d.last_exception
    assert d.path == tmp_path / 'data.bin' and d.path.read_bytes() == DATA


def test_empty_file(server, tmp_path):
    server.add('/empty', b'')
    d, _ = download(server.url('/empty'), tmp_path / 'empty')
    assert d.state == 'complete' and d.size == 0 and d.ratio == 1.0
    assert (tmp_path / 'empty').read_bytes() == b''


def test_update_size_sends_head(server, tmp_path):
    server.add('/data.bin', DATA)
    d = bitpit.Downloader(server.url('/data.bin'), path=tmp_path / 'x')
    sizes = []
    d.listen('size-changed', lambda d: sizes.append(d.size))
    d.update_size()
    assert d.size == len(DATA) and sizes == [len(DATA)]
    assert [r.method for r in server.requests] == ['HEAD']
    assert not (tmp_path / 'x').exists()


def test_update_size_after_stop_and_on_error_status(server, tmp_path):
    server.add('/f', DATA, throttle=100000)
    d = bitpit.Downloader(server.url('/f'), path=tmp_path / 'f', update_period=0.02)
    rec = Recorder(d)
    d.start()
    rec.wait_state('download')
    d.stop()
    d.update_size()
    assert d.size == len(DATA)
    server.add('/f', b'', status=404)
    with pytest.raises(bitpit.HTTPStatusError) as caught:
        d.update_size()
    assert caught.value.status == 404


@pytest.mark.allow_error_log(r'^callback .* for signal .* raised$')
def test_callback_that_raises_does_not_stop_download(server, tmp_path, caplog):
    server.add('/data.bin', DATA)
    d = bitpit.Downloader(server.url('/data.bin'), path=tmp_path / 'data.bin')

    def bad(*args):
        raise ValueError('callback bug')
    for signal in ('state-changed', 'size-changed', 'speed-changed'):
        d.listen(signal, bad)
    with caplog.at_level(logging.ERROR, logger='bitpit'):
        d.start()
        d.join(30)
    assert d.state == 'complete' and (tmp_path / 'data.bin').read_bytes() == DATA
    assert any(r.exc_info and 'callback bug' in str(r.exc_info[1]) for r in caplog.records)


# ---------------------------------------------------------------------------
# stop and start
# ---------------------------------------------------------------------------

def test_ten_stop_start_cycles_end_byte_identical(server, tmp_path):
    server.add('/slow.bin', DATA, throttle=500000)
    target = tmp_path / 'slow.bin'
    d = bitpit.Downloader(server.url('/slow.bin'), path=target, update_period=0.02)
    rec = Recorder(d)
    for cycle in range(10):
        d.start()
        rec.wait_for(lambda: d.downloaded > (cycle + 1) * 60000)
        d.stop()
        assert not d.is_alive
        assert d.state == 'pause'
    d.start()
    d.join(30)
    assert d.state == 'complete' and target.read_bytes() == DATA
    ranges = [r.headers.get('Range') for r in server.requests]
    assert ranges[0] is None and all(ranges[1:]) and len(ranges) == 11


def test_url_and_path_cannot_change_while_running(server, tmp_path):
    server.add('/stall', DATA, stall_after=0)
    d = bitpit.Downloader(server.url('/stall'), path=tmp_path / 'stall', timeout=30)
    rec = Recorder(d)
    changes = []
    d.listen('url-changed', lambda d: changes.append('url'))
    d.listen('path-changed', lambda d: changes.append('path'))
    d.start()
    rec.wait_state('download')
    with pytest.raises(RuntimeError):
        d.url = server.url('/other')
    with pytest.raises(RuntimeError):
        d.path = tmp_path / 'other'
    d.stop()
    d.url = server.url('/other')
    d.path = tmp_path / 'other'
    assert changes == ['url', 'path']
    assert d.url == server.url('/other') and d.path == tmp_path / 'other'


def test_stop_from_error_callback_cancels_the_restart(server, tmp_path):
    server.add('/flaky', b'', status=503)
    d = bitpit.Downloader(server.url('/flaky'), path=tmp_path / 'f', restart_wait=5)
    d.listen('state-changed', lambda d, old: d.state == 'error' and d.stop())
    d.start()
    d.join(10)
    assert d.state == 'error' and not d.is_restarting and d.restart_time is None


def test_start_from_final_callback_starts_again(server, tmp_path):
    server.add('/flaky', DATA, status=503, status_times=1)
    d = bitpit.Downloader(server.url('/flaky'), path=tmp_path / 'f')
    rec = Recorder(d)
    d.listen('state-changed', lambda d, old: d.state == 'error' and d.start())
    d.start()
    rec.wait_state('complete')
    assert (tmp_path / 'f').read_bytes() == DATA


# ---------------------------------------------------------------------------
# stalls
# ---------------------------------------------------------------------------

def test_speed_changed_keeps_coming_while_silent(server, tmp_path):
    server.add('/stall', DATA, stall_after=200000)
    d = bitpit.Downloader(server.url('/stall'), path=tmp_path / 'stall', timeout=30,
                          update_period=0.1)
    rec = Recorder(d)
    d.start()
    rec.wait_for(lambda: d.downloaded >= 200000)
    rec.wait_for(lambda: sum(1 for _, speed, _ in rec.speeds if speed == 0) >= 3)
    d.stop()
    in_download = [s for s in rec.speeds if s[2] == 'download']
    assert any(speed > 0 for _, speed, _ in in_download)
    assert in_download[-1][1] == 0
    assert rec.speeds[-1][1] == 0 and d.speed == 0


def test_a_slow_callback_is_not_taken_for_a_slow_server(server, tmp_path):
    """The download thread reads no byte while a callback runs: min_speed
    judges the server by the time the thread could read."""
    url = server.add('/f', DATA, throttle=1024 * 1024)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', timeout=0.5, min_speed=300000,
                          update_period=0.1)
    blocked = []

    def slow(d):
        if d.downloaded > 200000 and not blocked:
            blocked.append(d.downloaded)
            time.sleep(0.7)
    d.listen('speed-changed', slow)
    rec = Recorder(d)
    d.start()
    rec.wait_state('complete', 'error', 'fatal-error', timeout=20)
    d.join(10)
    assert blocked and d.state == 'complete', d.last_exception


STALLS = [{'stall_after': 1000}, {'stall_before_headers': True}, {'stall_after': 0}]
STALL_IDS = ['mid-body', 'before-headers', 'after-headers']


@pytest.mark.parametrize('stall', STALLS + [{'stall_after': 1000, 'chunked': True}],
                         ids=STALL_IDS + ['chunked-mid-body'])
def test_speed_changed_keeps_coming_in_every_wait_for_the_server(server, tmp_path, stall):
    """The download thread runs the first connection itself: wherever it
    waits for the server, it still says the speed every period (and a
    stop ends the wait at once)."""
    url = server.add('/f', DATA, **stall)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', timeout=30, update_period=0.05)
    rec = Recorder(d)
    d.start()
    assert server.wait_stalled(1, timeout=10)
    since = time.monotonic()
    rec.wait_for(lambda: sum(1 for when, _, _ in rec.speeds if when > since) >= 4)
    began = time.monotonic()
    d.stop()
    assert time.monotonic() - began < 0.5
    gaps = [b[0] - a[0] for a, b in zip(rec.speeds, rec.speeds[1:]) if a[0] > since]
    assert max(gaps) < 0.5, gaps
    assert d.state == 'pause' and d.speed == 0


@pytest.mark.parametrize('stall', STALLS, ids=STALL_IDS)
def test_stall_is_an_error_within_timeout(server, tmp_path, stall):
    url = server.add('/f', DATA, **stall)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', timeout=0.5)
    rec = Recorder(d)
    began = time.monotonic()
    d.start()
    rec.wait_state('error', 'fatal-error', timeout=5)
    took = time.monotonic() - began
    assert 0.45 <= took < 0.5 + 0.5, took
    d.join(1)
    assert not d.is_alive and bitpit_threads() == []
    assert d.state == 'error' and isinstance(d.last_exception, bitpit.StalledError)
    if stall.get('stall_after'):
        # the bytes before the stall are on disk
        assert (tmp_path / 'f.bin').stat().st_size == stall['stall_after']


@pytest.mark.parametrize('stall', STALLS, ids=STALL_IDS)
def test_stop_during_a_stall_is_prompt(server, tmp_path, stall):
    url = server.add('/f', DATA, **stall)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', timeout=30, update_period=0.02)
    rec = Recorder(d)
    d.start()
    assert server.wait_stalled(1)
    # mid-body: stop once the bytes before the stall are read, while bitpit waits for more
    rec.wait_for(lambda: d.downloaded >= stall.get('stall_after', 0))
    began = time.monotonic()
    d.stop()
    took = time.monotonic() - began
    assert took < 0.3, took      # the issue asks 0.1 s; this machine is noisy
    assert d.state == 'pause' and not d.is_alive and bitpit_threads() == []
    assert rec.states[-1][1] == 'pause' and d.last_exception is None


# ---------------------------------------------------------------------------
# errors and restarts
# ---------------------------------------------------------------------------

def test_transient_status_restarts_after_restart_wait(server, tmp_path):
    server.add('/flaky', b'', status=503)
    d = bitpit.Downloader(server.url('/flaky'), path=tmp_path / 'flaky', restart_wait=0.3)
    rec = Recorder(d)
    restart_times = []
    d.listen('restart-time-changed', lambda d: restart_times.append(d.restart_time))
    d.listen('state-changed', lambda d, old: d.state == 'error' and server.add('/flaky', DATA))
    d.start()
    rec.wait_state('complete', timeout=10)
    d.join(5)
    assert (tmp_path / 'flaky').read_bytes() == DATA
    assert isinstance(d.last_exception, bitpit.HTTPStatusError)
    assert d.last_exception.status == 503 and d.last_exception.retryable
    assert [new for _, new in rec.states][:3] == ['start', 'error', 'start']
    assert isinstance(restart_times[0], datetime.datetime) and restart_times[-1] is None
    assert d.restart_time is None and not d.is_restarting


def test_restart_waits_restart_wait(server, tmp_path):
    server.add('/flaky', b'', status=500)
    d = bitpit.Downloader(server.url('/flaky'), path=tmp_path / 'flaky', restart_wait=0.5)
    rec = Recorder(d)
    d.start()
    rec.wait_state('error')
    errored = time.monotonic()
    assert d.is_restarting
    assert d.restart_time > datetime.datetime.now()
    server.add('/flaky', DATA)
    rec.wait_state('complete', timeout=10)
    assert time.monotonic() - errored >= 0.45
    d.join(5)


def test_restart_wait_change_reschedules(server, tmp_path):
    server.add('/flaky', b'', status=504)
    d = bitpit.Downloader(server.url('/flaky'), path=tmp_path / 'flaky', restart_wait=60)
    rec = Recorder(d)
    d.start()
    rec.wait_state('error')
    d.join(5)
    first = d.restart_time
    server.add('/flaky', DATA)
    d.restart_wait = 0.1
    assert d.restart_time < first
    rec.wait_state('complete', timeout=10)
    d.join(5)


def test_connection_refused_is_retryable_network_error(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    d, rec = download('http://127.0.0.1:{}/x'.format(port), tmp_path / 'x')
    assert d.state == 'error'
    assert isinstance(d.last_exception, bitpit.NetworkError)
    assert isinstance(d.last_exception.__cause__, ConnectionRefusedError)
    assert not d.is_restarting


def test_retries_gives_up(server, tmp_path):
    server.add('/flaky', b'', status=500)
    d = bitpit.Downloader(server.url('/flaky'), path=tmp_path / 'f', restart_wait=0,
                          retries=2)
    rec = Recorder(d)
    d.start()
    rec.wait_state('fatal-error')
    assert [new for _, new in rec.states].count('error') == 2
    assert len(server.requests) == 3


# ---------------------------------------------------------------------------
# stop() in every phase; no background thread dies in silence
# ---------------------------------------------------------------------------

def test_stop_during_a_name_look_up_is_prompt(tmp_path, monkeypatch):
    """A resolver that hangs (an unreachable DNS server) cannot hold stop()."""
    looking, released = threading.Event(), threading.Event()
    real = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == 'hangs.invalid':
            looking.set()
            released.wait(10)
        return real(host, *args, **kwargs)
    monkeypatch.setattr(socket, 'getaddrinfo', hanging)
    d = bitpit.Downloader('http://hangs.invalid/f', path=tmp_path / 'f', timeout=30)
    rec = Recorder(d)
    d.start()
    rec.wait_state('start')
    assert looking.wait(5)
    began = time.monotonic()
    d.stop()
    try:
        assert time.monotonic() - began < 0.3
        assert d.state == 'pause' and bitpit_threads(wait=0) == []
    finally:
        released.set()


def test_stop_while_the_answers_head_is_half_read_is_prompt(server, tmp_path, monkeypatch):
    """A server that sends half a head and no more: bitpit, having read
    that half, waits for the rest (the answer's own wait, in its head's
    loop); a stop ends that wait at once."""
    released, fed = threading.Event(), threading.Event()

    def half_head(handler):
        handler.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Le')
        released.wait(10)
    url = server.add_raw('/half', half_head)
    feed = bitpit._HeadParser.feed

    def fed_half(parser, data):  # (tells when bitpit has read the half)
        head = feed(parser, data)
        if head is None:
            fed.set()
        return head
    monkeypatch.setattr(bitpit._HeadParser, 'feed', fed_half)
    d = bitpit.Downloader(url, path=tmp_path / 'f', timeout=30)
    d.start()
    try:
        assert fed.wait(5)
        began = time.monotonic()
        d.stop()
        assert time.monotonic() - began < 0.3  # (the issue asks 0.1 s; a noisy machine)
        assert d.state == 'pause' and bitpit_threads(wait=0) == []
    finally:
        released.set()


def test_a_stop_ends_an_attempts_pause_at_once_and_every_one_after():
    """The stop signal of an attempt (``_Cancel``): a pause lasts its time
    without a stop, ends as a stop comes from another thread, and once
    stopped lasts nothing and nothing more is taken to abort."""
    cancel = bitpit._Cancel()

    def pause(seconds):
        def steps():
            yield cancel.pause(time.monotonic() + seconds)
        bitpit._drive_here(steps())

    began = time.monotonic()
    pause(0.02)
    assert time.monotonic() - began >= 0.02 and not cancel.is_set()
    stopper = threading.Timer(0.05, cancel.cancel)
    stopper.start()
    pause(10)
    stopper.join()
    assert cancel.is_set() and time.monotonic() - began < 2
    pause(10)
    assert time.monotonic() - began < 2
    with pytest.raises(bitpit._Stopped):
        cancel.register(bitpit._EventAbort(threading.Event()))


def test_stop_returns_even_when_the_thread_is_stuck(server, tmp_path):
    """A callback that blocks holds the download thread: stop() gives up
    waiting after about a second, and the thread, when it goes on, ends
    without writing the file again."""
    url = server.add('/f', DATA, throttle=256 * 1024)
    target = tmp_path / 'f.bin'
    d = bitpit.Downloader(url, path=target, update_period=0.05)
    stuck, release = threading.Event(), threading.Event()

    def block(d):
        if d.downloaded >= 100000 and not stuck.is_set():
            stuck.set()
            release.wait(10)
    d.listen('speed-changed', block)
    d.start()
    assert stuck.wait(10)
    began = time.monotonic()
    d.stop()
    took = time.monotonic() - began
    assert 0.9 <= took < 1.5
    on_disk = target.read_bytes()
    sidecar = sidecar_of(target)
    saved = sidecar.read_bytes() if sidecar.exists() else None
    release.set()
    d.join(5)
    assert not d.is_alive and d.state == 'pause'
    assert target.read_bytes() == on_disk
    assert (sidecar.read_bytes() if sidecar.exists() else None) == saved
    assert DATA.startswith(on_disk[:d.downloaded])


def test_stop_racing_the_restart_timer_always_wins(server, tmp_path):
    url = server.add('/f', DATA, stall_after=0)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', timeout=30)
    for _ in range(50):
        d.restart(0)
        d.stop()
        d.join(5)
        assert not d.is_alive and not d.is_restarting, _
    assert d.state == 'pause' and bitpit_threads() == []


def test_a_stop_that_comes_as_the_attempt_makes_its_transfer_stops_it(
        server, tmp_path, monkeypatch):
    """The attempt publishes its transfer with no lock: a stop told while
    the transfer is being made (after the attempt's last look at the stop,
    before the transfer is in ``_transfer``, where the stop looks for it)
    finds none to stop, so the attempt, which looks at the stop after it
    published the transfer, must stop it itself: the run ends in ``pause``
    with no request made, not ``complete``."""
    url = server.add('/f', DATA)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin')
    buckets = bitpit.Downloader._buckets
    told = []

    def stop_told_meanwhile(self):
        told.append(self._begin_stop())  # (the half of stop() that never waits)
        return buckets(self)
    monkeypatch.setattr(bitpit.Downloader, '_buckets', stop_told_meanwhile)
    rec = Recorder(d)
    d.start()
    d.join(5)
    assert not d.is_alive and told and told[0] is not None, 'no stop found the run'
    assert [new for _, new in rec.states] == ['start', 'pause']
    assert server.requests_for('/f') == []


@pytest.mark.allow_error_log('^unexpected error$')
def test_an_exception_in_the_download_thread_ends_it_in_fatal_error(server, tmp_path,
                                                                     monkeypatch):
    url = server.add('/f', DATA)

    def broken(self):
        raise RuntimeError('a bug')
    monkeypatch.setattr(bitpit._Transfer, 'start', broken)
    d, rec = download(url, tmp_path / 'f.bin', restart_wait=0)
    assert [new for _, new in rec.states] == ['start', 'fatal-error']
    assert isinstance(d.last_exception, bitpit.Error)
    assert isinstance(d.last_exception.__cause__, RuntimeError)
    assert not d.is_restarting


@pytest.mark.allow_error_log("^a download's run ended in error$")
def test_a_bug_in_the_bookkeeping_at_the_end_of_a_run_still_ends_the_run(
        server, tmp_path, monkeypatch):
    """A bug past the attempt (whose own failures end it in fatal-error),
    in the run's bookkeeping at its end, is logged; the run still gives its
    last signals and ends, as the download thread it replaces did: join()
    and wait() return."""
    url = server.add('/f', b'f' * 1000)

    def broken(self):
        raise RuntimeError('a bug')
    monkeypatch.setattr(bitpit.Downloader, '_let_go', broken)
    d = bitpit.Downloader(url, path=tmp_path / 'f')
    rec = Recorder(d)
    d.start()
    d.join(5)
    assert not d.is_alive and d.wait(5)
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']


@pytest.mark.allow_error_log('^unexpected error$')
def test_an_exception_in_a_connection_thread_ends_the_download_in_fatal_error(
        server, tmp_path, monkeypatch, caplog):
    url = server.add('/f', DATA)

    def broken(*args):
        raise KeyError('a bug')
    monkeypatch.setattr(bitpit, '_pump_steps', broken)
    with caplog.at_level(logging.ERROR, logger='bitpit'):
        d, rec = download(url, tmp_path / 'f.bin', restart_wait=0)
    assert d.state == 'fatal-error' and isinstance(d.last_exception.__cause__, KeyError)
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert bitpit_threads() == []


@pytest.mark.allow_error_log('^unexpected error$')
def test_an_exception_in_the_restart_timer_ends_it_in_fatal_error(server, tmp_path,
                                                                   monkeypatch):
    url = server.add('/f', DATA)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin')
    rec = Recorder(d)
    real = bitpit.Downloader._start

    def broken(self, timer):
        if timer is not None:
            raise OSError('cannot start a thread')
        real(self, timer)
    monkeypatch.setattr(bitpit.Downloader, '_start', broken)
    d.restart(0)
    rec.wait_state('fatal-error')
    assert isinstance(d.last_exception.__cause__, OSError)
    assert not d.is_restarting


@pytest.mark.allow_error_log('^unexpected error$')
def test_an_exception_met_by_the_manager_thread_fails_that_download_only(
        server, tmp_path, monkeypatch):
    server.add('/a', DATA)
    server.add('/b', DATA)
    real = bitpit.Downloader._start

    def broken(self, timer):
        if self.url.endswith('/a'):
            raise MemoryError('no memory for a thread')
        real(self, timer)
    monkeypatch.setattr(bitpit.Downloader, '_start', broken)
    manager = bitpit.Manager(path=tmp_path, dir_path=True)
    a, b = manager.add(server.url('/a')), manager.add(server.url('/b'))
    done = threading.Event()
    b.listen('state-changed', lambda d, old: d.state == 'complete' and done.set())
    manager.start()
    assert done.wait(10)
    manager.stop()
    assert a.state == 'fatal-error' and isinstance(a.last_exception.__cause__, MemoryError)
    assert (tmp_path / 'b').read_bytes() == DATA
