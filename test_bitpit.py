"""Tests of bitpit's core: helpers, Emitter, TokenBucket and Downloader.

Every download runs against the local server of conftest.py on 127.0.0.1.
Waiting is done on signals (threading.Event) with a deadline, never by
sleeping.
"""
import datetime
import io
import logging
import os
import subprocess
import sys
import threading
import time

import pytest

import bitpit
from conftest import DATA, HERE, LOGO, Recorder, download, run_program

# ---------------------------------------------------------------------------
# human_readable and helpers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('n, expected', [
    (10102, (9.865234375, 'KB')), (999, (999, 'B')), (1000, (0.9765625, 'KB')),
    (0, (0, 'B')), (None, (None, None)), (-10102, (-9.865234375, 'KB')),
    (1024 ** 3, (1.0, 'GB')), (999 * 1024 ** 2, (999.0, 'MB')), (5 * 1024 ** 4, (5.0, 'TB')),
])
def test_human_readable(n, expected):
    assert bitpit.human_readable(n) == expected


def test_human_readable_digits():
    assert bitpit.human_readable(10102, digits=5) == (10102, 'B')
    assert bitpit.human_readable(2 ** 100)[1] == 'YB'


@pytest.mark.parametrize('text, value', [
    ('2048', 2048), ('100k', 102400), ('0.5m', 524288), ('1M', 1048576), ('0', 0)])
def test_parse_rate(text, value):
    assert bitpit._parse_rate(text) == value


@pytest.mark.parametrize('text', ['', 'fast', '1x', '-5', '1 k b'])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError):
        bitpit._parse_rate(text)


def test_public_surface():
    for name in ('Emitter', 'Downloader', 'Manager', 'human_readable', 'main', '__version__',
                 'Error', 'HTTPStatusError', 'NetworkError', 'IntegrityError'):
        assert hasattr(bitpit, name)
    assert issubclass(bitpit.HTTPStatusError, bitpit.Error)
    assert issubclass(bitpit.StalledError, bitpit.NetworkError)
    assert issubclass(bitpit.InvalidURLError, ValueError)


# ---------------------------------------------------------------------------
# Emitter
# ---------------------------------------------------------------------------

class Thing(bitpit.Emitter):
    __signals__ = ('ping', 'pong')


def test_emitter_calls_with_emit_then_listen_args():
    calls = []
    t = Thing()
    t.listen('ping', lambda *a, **k: calls.append((a, k)), 'x', key=1)
    t.emit('ping', 'a', 'b')
    assert calls == [(('a', 'b', 'x'), {'key': 1})]


def test_emitter_twice_registered_called_twice_and_unlisten_once():
    calls = []
    t = Thing()
    f = calls.append
    t.listen('ping', f)
    t.listen('ping', f)
    t.emit('ping', 1)
    assert calls == [1, 1]
    t.unlisten('ping', f)
    t.emit('ping', 2)
    assert calls == [1, 1, 2]
    t.unlisten('ping', f)
    with pytest.raises(ValueError):
        t.unlisten('ping', f)


def test_emitter_unlisten_matches_args():
    t = Thing()
    f = print
    t.listen('ping', f, 1)
    with pytest.raises(ValueError):
        t.unlisten('ping', f, 2)
    t.unlisten('ping', f, 1)


def test_emitter_unknown_signal_is_key_error():
    t = Thing()
    for call in (lambda: t.listen('nope', print), lambda: t.unlisten('nope', print),
                 lambda: t.emit('nope')):
        with pytest.raises(KeyError):
            call()


@pytest.mark.allow_error_log(r'^callback .* for signal .* raised$')
def test_emitter_callback_exception_is_logged_and_others_run(caplog):
    calls = []
    t = Thing()

    def bad(*args):
        raise RuntimeError('boom')
    t.listen('ping', bad)
    t.listen('ping', calls.append)
    with caplog.at_level(logging.ERROR, logger='bitpit'):
        t.emit('ping', 7)
    assert calls == [7]
    assert any('boom' in (r.exc_text or '') or r.exc_info for r in caplog.records)


def test_emitter_listen_and_unlisten_inside_callback():
    t = Thing()
    calls = []

    def once(*args):
        calls.append('once')
        t.unlisten('ping', once)
        t.listen('ping', calls.append)
    t.listen('ping', once)
    t.emit('ping', 1)
    t.emit('ping', 2)
    assert calls == ['once', 2]


def test_emitter_thread_safety():
    t = Thing()
    count = []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        for _ in range(500):
            t.listen('pong', count.append)
            t.emit('ping')
            t.unlisten('pong', count.append)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    t.emit('pong', 1)
    assert count == []


def test_emitter_subclass_without_super_init():
    class Lazy(bitpit.Emitter):
        __signals__ = ('x',)

        def __init__(self):
            pass
    calls = []
    lazy = Lazy()
    lazy.listen('x', calls.append)
    lazy.emit('x', 3)
    assert calls == [3]


# ---------------------------------------------------------------------------
# TokenBucket
# ---------------------------------------------------------------------------

def test_token_bucket_unlimited_grants_everything():
    bucket = bitpit._TokenBucket(0)
    assert bucket.acquire(10 ** 9, lambda: False) == 10 ** 9


def test_token_bucket_paces_and_never_bursts_more_than_a_tenth_of_a_second():
    bucket = bitpit._TokenBucket(100000)
    start = time.monotonic()
    total = 0
    while total < 50000:
        granted = bucket.acquire(65536, lambda: False)
        assert granted <= 10000
        total += granted
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 1.0


def wait_until_blocked(bucket, timeout=5):
    """Return once a thread is blocked in ``bucket.acquire()``.

    A waiter puts its turn in ``bucket._waiters`` while holding
    ``bucket._lock`` and lets go of that lock only inside
    ``Condition.wait``; so seeing the queue non-empty while holding the lock
    means the waiter is waiting. The bucket offers no event for this, so the
    queue is polled, bounded by ``timeout``, with a tiny pause between looks
    (the pause is not the synchronisation, the check under the lock is)."""
    deadline = time.monotonic() + timeout
    while True:
        with bucket._lock:
            if bucket._waiters:
                return
        assert time.monotonic() < deadline, 'no thread blocked in acquire() in time'
        time.sleep(0.001)


def test_token_bucket_rate_change_wakes_waiter():
    bucket = bitpit._TokenBucket(1)          # one byte per second
    bucket.acquire(1, lambda: False)
    got = []
    waiter = threading.Thread(target=lambda: got.append(bucket.acquire(1000, lambda: False)))
    waiter.start()
    wait_until_blocked(bucket)
    acted = time.monotonic()
    bucket.rate = 0
    waiter.join(2)
    assert got == [1000]
    # left alone, the waiter would wake by itself in about a second
    assert time.monotonic() - acted < 0.5, 'the rate change did not wake the waiter'


def test_token_bucket_cancel():
    bucket = bitpit._TokenBucket(1)
    bucket.acquire(1, lambda: False)
    cancelled = threading.Event()
    got = []
    waiter = threading.Thread(target=lambda: got.append(bucket.acquire(1000, cancelled.is_set)))
    waiter.start()
    wait_until_blocked(bucket)
    acted = time.monotonic()
    cancelled.set()
    bucket.wake()
    waiter.join(2)
    assert got == [0]
    # left alone, the waiter would wake by itself in about a second
    assert time.monotonic() - acted < 0.5, 'wake() did not wake the waiter'


# ---------------------------------------------------------------------------
# Downloader: construction and properties
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('url', ['ftp://example.com/x', 'file:///etc/passwd', 'data:,hi',
                                 'http://', 'not a url', 'http://host:99999/x'])
def test_bad_url_is_value_error(url):
    with pytest.raises(ValueError):
        bitpit.Downloader(url)


def test_chunk_size_must_be_positive(tmp_path):
    d = bitpit.Downloader('http://127.0.0.1:1/x', path=tmp_path / 'x')
    assert d.chunk_size >= 64 * 1024
    for bad in (0, -1):
        with pytest.raises(ValueError):
            d.chunk_size = bad
    with pytest.raises(ValueError):
        bitpit.Downloader('http://127.0.0.1:1/x', path=tmp_path / 'x', chunk_size=0)


def test_initial_properties(tmp_path):
    d = bitpit.Downloader('http://127.0.0.1:1/x', path=tmp_path / 'x')
    assert d.state == 'pause'
    assert (d.size, d.downloaded, d.remaining, d.speed) == (-1, 0, -1, 0)
    assert d.ratio == -1.0 and d.percentage == -100.0 and d.eta is None
    assert d.bar(width=8) == '????????' and d.bar(width=4, unknown='-') == '----'
    assert d.human_size == (-1, 'B') and d.human_speed == (0, 'B/s')
    assert not d.is_alive and not d.is_restarting and d.restart_time is None
    assert d.last_exception is None
    assert d.path == tmp_path / 'x'


def test_dir_path_and_default_path(tmp_path, monkeypatch):
    d = bitpit.Downloader('http://h/a/b/r%C3%A9sum%C3%A9.pdf?x=1', path=tmp_path, dir_path=True)
    assert d.path == tmp_path / 'résumé.pdf'
    monkeypatch.chdir(tmp_path)
    assert bitpit.Downloader('http://h/dir/').path == tmp_path / 'index.html'
    assert bitpit.Downloader('http://h/x.bin').path == tmp_path / 'x.bin'


@pytest.mark.parametrize('segment', ['..', '.', '%2e%2e', '..%2f..%2fetc%2fpasswd',
                                     'a%5c..%5cb', '%00evil', 'x%0d%0ay', '...'])
def test_name_from_url_never_escapes(tmp_path, segment):
    d = bitpit.Downloader('http://h/base/' + segment, path=tmp_path, dir_path=True)
    assert d.path.parent == tmp_path
    assert d.path.name not in ('', '.', '..')
    assert '/' not in d.path.name and '\\' not in d.path.name and '\x00' not in d.path.name


def test_rate_limit_property_and_signal(tmp_path):
    d = bitpit.Downloader('http://127.0.0.1:1/x', path=tmp_path / 'x', rate_limit=2048)
    seen = []
    d.listen('rate-limit-changed', lambda d: seen.append(d.rate_limit))
    assert d.human_rate_limit == (2.0, 'KB/s')
    d.rate_limit = 100 * 1024
    assert d.human_rate_limit == (100.0, 'KB/s') and seen == [102400]
    d.rate_limit = -5
    assert d.rate_limit == 0


def test_bar():
    d = bitpit.Downloader('http://127.0.0.1:1/x', path=io.BytesIO())
    d._size, d._downloaded = 100, 25
    assert d.bar(width=8) == '==      '
    assert d.bar(width=10, char='-') == '--        '
    d._downloaded = 100
    assert d.bar(width=5) == '=====' and d.ratio == 1.0
    d._size, d._downloaded = 0, 0
    assert d.ratio == 1.0 and d.percentage == 100.0 and d.remaining == 0


# ---------------------------------------------------------------------------
# Downloader: downloading
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


def test_download_into_file_object_is_not_closed(server):
    server.add('/data.bin', DATA)
    sink = io.BytesIO()
    d, _ = download(server.url('/data.bin'), sink)
    assert d.state == 'complete' and not sink.closed and sink.getvalue() == DATA


def test_empty_file(server, tmp_path):
    server.add('/empty', b'')
    d, _ = download(server.url('/empty'), tmp_path / 'empty')
    assert d.state == 'complete' and d.size == 0 and d.ratio == 1.0
    assert (tmp_path / 'empty').read_bytes() == b''


def test_resume_partial_file_with_range(server, tmp_path):
    server.add('/data.bin', DATA)
    target = tmp_path / 'data.bin'
    target.write_bytes(DATA[:300000])
    d = bitpit.Downloader(server.url('/data.bin'), path=target)
    assert d.downloaded == 300000
    d.start()
    d.join(30)
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert server.requests[-1].headers['Range'] == 'bytes=300000-'


def test_resume_of_complete_file_416_is_complete(server, tmp_path):
    server.add('/data.bin', DATA)
    target = tmp_path / 'data.bin'
    target.write_bytes(DATA)
    d, rec = download(server.url('/data.bin'), target)
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert d.size == len(DATA)
    assert 'download' not in [new for _, new in rec.states]


def test_update_size_sends_head(server, tmp_path):
    server.add('/data.bin', DATA)
    d = bitpit.Downloader(server.url('/data.bin'), path=tmp_path / 'x')
    sizes = []
    d.listen('size-changed', lambda d: sizes.append(d.size))
    d.update_size()
    assert d.size == len(DATA) and sizes == [len(DATA)]
    assert [r.method for r in server.requests] == ['HEAD']
    assert not (tmp_path / 'x').exists()


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


def test_stop_is_prompt_while_server_is_silent(server, tmp_path):
    server.add('/stall', DATA, stall_after=1000)
    d = bitpit.Downloader(server.url('/stall'), path=tmp_path / 'stall', timeout=30,
                          update_period=0.02)
    rec = Recorder(d)
    d.start()
    rec.wait_for(lambda: d.downloaded >= 1000)
    began = time.monotonic()
    d.stop()
    took = time.monotonic() - began
    assert d.state == 'pause' and not d.is_alive
    assert took < 0.3, 'stop() took {:.3f} s'.format(took)


def test_stop_is_prompt_before_headers(server, tmp_path):
    server.add('/stall', DATA, stall_before_headers=True)
    d = bitpit.Downloader(server.url('/stall'), path=tmp_path / 'stall', timeout=30)
    rec = Recorder(d)
    d.start()
    rec.wait_state('start')
    server.wait_stalled(1)
    began = time.monotonic()
    d.stop()
    assert time.monotonic() - began < 0.3
    assert d.state == 'pause' and not d.is_alive


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


def test_stall_timeout_is_error(server, tmp_path):
    server.add('/stall', DATA, stall_after=1000)
    d = bitpit.Downloader(server.url('/stall'), path=tmp_path / 'stall', timeout=0.5)
    rec = Recorder(d)
    began = time.monotonic()
    d.start()
    rec.wait_state('error', 'fatal-error')
    assert time.monotonic() - began < 0.5 + 0.5 + 0.5
    d.join(5)
    assert d.state == 'error'
    assert isinstance(d.last_exception, bitpit.StalledError)
    assert (tmp_path / 'stall').stat().st_size == 1000


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


# ---------------------------------------------------------------------------
# Downloader: errors and restarts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('status', [404, 403, 410, 501])
def test_permanent_status_is_fatal_and_not_restarted(server, tmp_path, status):
    server.add('/gone', b'', status=status)
    d, rec = download(server.url('/gone'), tmp_path / 'gone', restart_wait=0)
    assert d.state == 'fatal-error'
    assert isinstance(d.last_exception, bitpit.HTTPStatusError)
    assert d.last_exception.status == status
    assert not d.is_restarting and d.restart_time is None
    assert not (tmp_path / 'gone').exists()


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


def test_stop_cancels_scheduled_restart(server, tmp_path):
    server.add('/flaky', b'', status=502)
    d = bitpit.Downloader(server.url('/flaky'), path=tmp_path / 'flaky', restart_wait=60)
    rec = Recorder(d)
    d.start()
    rec.wait_state('error')
    d.join(5)
    assert d.is_restarting
    d.stop()
    assert not d.is_restarting and d.restart_time is None


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
# rate limiting
# ---------------------------------------------------------------------------

def test_rate_limit_is_accurate_on_a_small_file(server, tmp_path):
    server.add('/logo.png', LOGO)
    d = bitpit.Downloader(server.url('/logo.png'), path=tmp_path / 'logo.png',
                          rate_limit=2048, chunk_size=1024)
    rec = Recorder(d)
    d.start()
    rec.wait_state('start')
    began = time.monotonic()
    d.join(30)
    elapsed = time.monotonic() - began
    assert d.state == 'complete' and (tmp_path / 'logo.png').read_bytes() == LOGO
    assert 10102 / 2048 * 0.98 <= elapsed <= 10102 / 2048 * 1.05, elapsed


def test_rate_limit_change_applies_mid_download(server, tmp_path):
    server.add('/data.bin', DATA)
    d = bitpit.Downloader(server.url('/data.bin'), path=tmp_path / 'data.bin', rate_limit=20000,
                          update_period=0.02)
    rec = Recorder(d)
    d.start()
    rec.wait_for(lambda: d.downloaded > 0)
    began = time.monotonic()
    d.rate_limit = 0
    d.join(30)
    assert d.state == 'complete' and time.monotonic() - began < 10
    # and the other way round: a limit set mid-download slows it at once
    server.add('/paced.bin', DATA, throttle=1000000)
    d2 = bitpit.Downloader(server.url('/paced.bin'), path=tmp_path / 'd2', update_period=0.02)
    rec2 = Recorder(d2)
    d2.rate_limit = 0
    d2.start()
    rec2.wait_state('download')
    d2.rate_limit = 50000
    at = d2.downloaded
    began = time.monotonic()
    rec2.wait_for(lambda: d2.downloaded - at >= 50000 or d2.state == 'complete')
    d2.stop()
    assert d2.state == 'pause', 'the new limit did not slow the download'
    assert time.monotonic() - began >= 0.7


# ---------------------------------------------------------------------------
# 1.2.0 programs, unchanged
# ---------------------------------------------------------------------------

TUTORIAL_FINAL = '''
import bitpit
import pathlib

def on_anything_changed(downloader, old_state=None):
    state = downloader.state
    size = '{:0.2f} {}'.format(*downloader.human_size)
    downloaded = '{:0.2f} {}'.format(*downloader.human_downloaded)
    speed = '{:0.2f} {}'.format(*downloader.human_speed)
    bar = downloader.bar(width=10, char='-')
    percentage = int(downloader.percentage)
    eta = downloader.eta
    text = '\\r{} | {} | {} | {} [{}] {}% {}'.format(
            state,
            size,
            downloaded,
            speed,
            bar,
            percentage,
            eta
        )
    print(text.ljust(79), end='', flush=True)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(
        url,
        path=pathlib.Path.home() / 'Desktop' / 'logo.png',
        restart_wait=30,
        rate_limit=2048,
        timeout=60,
        chunk_size=1024
    )

#listen to everything
dl.listen('size-changed', on_anything_changed)
dl.listen('speed-changed', on_anything_changed)
dl.listen('state-changed', on_anything_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
'''

TUTORIAL_STAGE = '''
import bitpit

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

def on_state_changed(downloader, old_state):
    print('The state changed to:', downloader.state)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url, restart_wait=30)

#listen to signals
dl.listen('size-changed', on_size_changed)
dl.listen('speed-changed', on_speed_changed)
dl.listen('state-changed', on_state_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
'''

QUICK_GUIDE = '''
import bitpit

#will download this
url = URL
d = bitpit.Downloader(url) #downloader instance

d.listen(
        'state-changed',
        lambda var, old_state: print('download state:', var.state)
    )
d.listen(
        'speed-changed',
        lambda var: print('download speed:', *var.human_speed)
    )
d.listen('speed-changed', lambda var: print(int(var.percentage), '%'))
d.listen(
        'size-changed',
        lambda var: print('total file size:', *var.human_size)
    )
d.start()
d.join()
'''

REFERENCE_EXAMPLE = '''
import bitpit

#will download this
url = URL
d = bitpit.Downloader(url) #downloader instance

d.listen('state-changed', lambda var: print('download state:', var.state))
d.listen('speed-changed', lambda var: print('download speed:', *var.human_speed))
d.listen('speed-changed', lambda var: print(int(var.percentage), '%'))
d.listen('size-changed', lambda var: print('total file size:', *var.human_size))
d.start()
d.join()
'''


def test_tutorial_final_program_runs_unchanged(server, tmp_path):
    server.add('/static/img/python-logo.png', LOGO)
    (tmp_path / 'Desktop').mkdir()
    began = time.monotonic()
    result = run_program(TUTORIAL_FINAL, server.url('/static/img/python-logo.png'),
                         tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'Desktop' / 'logo.png').read_bytes() == LOGO
    out = result.stdout
    assert 'Download has started.' in out
    assert 'complete | 9.87 KB | 9.87 KB | 0.00 B/s [----------] 100%' in out
    assert 'download | 9.87 KB |' in out and 'KB/s [' in out
    assert time.monotonic() - began >= 4.5   # 2048 B/s for 10102 bytes
    assert result.stderr == ''


def test_tutorial_restart_program_runs_unchanged(server, tmp_path):
    server.add('/static/img/python-logo.png', LOGO)
    result = run_program(TUTORIAL_STAGE, server.url('/static/img/python-logo.png'),
                         tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'python-logo.png').read_bytes() == LOGO
    assert 'The file size is 10102' in result.stdout
    assert 'The state changed to: complete' in result.stdout
    assert 'The speed is 0 B/s' in result.stdout


def test_program_without_join_waits_for_scheduled_restart(server, tmp_path):
    """With restart_wait set, the process ends only when the download is
    complete: an error's restart timer keeps it alive (it is not a daemon)."""
    server.add('/static/img/python-logo.png', LOGO, status=503)
    source = TUTORIAL_STAGE.replace('restart_wait=30', 'restart_wait=1')
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(HERE))
    proc = subprocess.Popen([sys.executable, '-c', source.replace(
        'URL', repr(server.url('/static/img/python-logo.png')))], cwd=str(tmp_path), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if 'The state changed to: error' in line:
                break
        server.add('/static/img/python-logo.png', LOGO)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.rstrip().endswith('The state changed to: complete')
    assert (tmp_path / 'python-logo.png').read_bytes() == LOGO


def test_quick_guide_program(server, tmp_path):
    server.add('/static/img/python-logo.png', LOGO)
    result = run_program(QUICK_GUIDE, server.url('/static/img/python-logo.png'),
                         tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'total file size: 9.865234375 KB' in result.stdout
    assert 'download state: complete' in result.stdout
    assert (tmp_path / 'python-logo.png').read_bytes() == LOGO


def test_reference_example_program(server, tmp_path):
    """The reference's example registers a one-argument state-changed
    callback; its TypeError is reported on stderr and the download goes on."""
    server.add('/static/img/python-logo.png', LOGO)
    result = run_program(REFERENCE_EXAMPLE, server.url('/static/img/python-logo.png'),
                         tmp_path, tmp_path)
    assert result.returncode == 0
    assert 'total file size: 9.865234375 KB' in result.stdout
    assert 'TypeError' in result.stderr
    assert (tmp_path / 'python-logo.png').read_bytes() == LOGO


def test_command_line_downloads_into_current_directory(server, tmp_path):
    server.add('/files/a.bin', DATA)
    result = subprocess.run([sys.executable, str(HERE / 'bitpit.py'), server.url('/files/a.bin')],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'a.bin').read_bytes() == DATA
    server.add('/missing', b'', status=404)
    result = subprocess.run([sys.executable, '-m', 'bitpit', server.url('/missing')],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=str(HERE)))
    assert result.returncode != 0


def test_retries_count_only_attempts_without_progress(server, tmp_path):
    server.add('/cut', DATA, truncate_at=300000)
    d = bitpit.Downloader(server.url('/cut'), path=tmp_path / 'cut', restart_wait=0, retries=1)
    rec = Recorder(d)
    d.start()
    rec.wait_state('complete', 'fatal-error', timeout=20)
    assert d.state == 'complete' and (tmp_path / 'cut').read_bytes() == DATA
    assert len(server.requests) == 4


# The tutorial's other stages, verbatim but for the URL. (name, program,
# where the file lands, lines the output must hold)
TUTORIAL_STAGES = [
    ('download a file', '''
import bitpit

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'python-logo.png', []),
    ('file size', '''
import bitpit

def on_size_changed(downloader):
    print('The file size is', *downloader.human_size)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url)

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'python-logo.png', ['The file size is 9.865234375 KB']),
    ('speed', '''
import bitpit

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url)

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#print speed periodically
dl.listen('speed-changed', on_speed_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'python-logo.png', ['The file size is 10102', 'The speed is 0 B/s']),
    ('state', '''
import bitpit

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

def on_state_changed(downloader, old_state):
    print('The state changed to:', downloader.state)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url)

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#print speed periodically
dl.listen('speed-changed', on_speed_changed)

#print state
dl.listen('state-changed', on_state_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'python-logo.png', ['The state changed to: start', 'The state changed to: complete']),
    ('path and rate limit', '''
import bitpit
import pathlib

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

def on_state_changed(downloader, old_state):
    print('The state changed to:', downloader.state)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(
        url,
        path=pathlib.Path.home() / 'Desktop' / 'logo.png',
        restart_wait=30,
        rate_limit=2048
    )

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#print speed periodically
dl.listen('speed-changed', on_speed_changed)

#print state
dl.listen('state-changed', on_state_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'Desktop/logo.png', ['The speed is 1.99', 'The state changed to: complete']),
    ('additional tuning', '''
import bitpit
import pathlib

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

def on_state_changed(downloader, old_state):
    print('The state changed to:', downloader.state)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(
        url,
        path=pathlib.Path.home() / 'Desktop' / 'logo.png',
        restart_wait=30,
        rate_limit=2048,
        timeout=60,
        chunk_size=1024
    )

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#print speed periodically
dl.listen('speed-changed', on_speed_changed)

#print state
dl.listen('state-changed', on_state_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'Desktop/logo.png', ['The file size is 10102', 'The state changed to: complete']),
]


@pytest.mark.parametrize('name, source, landing, expected', TUTORIAL_STAGES,
                         ids=[stage[0] for stage in TUTORIAL_STAGES])
def test_tutorial_stage_runs_unchanged(server, tmp_path, name, source, landing, expected):
    server.add('/static/img/python-logo.png', LOGO)
    (tmp_path / 'Desktop').mkdir()
    result = run_program(source, server.url('/static/img/python-logo.png'), tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    assert (tmp_path / landing).read_bytes() == LOGO
    # the program prints on two threads at once: its own line may land inside
    # a callback's, as it would for any user of 1.2.0
    lines = result.stdout.replace('Download has started.\n', '').splitlines()
    assert 'Download has started.' in result.stdout
    for line in expected:
        assert any(line in printed for printed in lines), (line, result.stdout)


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
