"""Per-host connection caps: Manager(max_per_host=N) keeps at most N
connections open at once to one (scheme, host, port) over all of its
downloads, idle kept-alive ones included, as the server counts them; a
freed slot goes to the download that has waited longest."""

import subprocess
import sys
import threading
import time

import pytest

import bitpit
from conftest import DATA, HERE, Recorder

MiB = 1024 * 1024
FILE = bytes(range(256)) * (10 * 1024) + b'end'  # 2.5 MiB: split over 4 connections


def wait_queue(manager, server, length, timeout=5):
    """Wait until ``length`` connection threads wait for a slot to ``server``."""
    slots = manager._host_slots
    host = ('http', '127.0.0.1', server.port)
    with slots._cond:
        assert slots._cond.wait_for(lambda: len(slots._queues.get(host, ())) >= length,
                                    timeout), 'nobody waits for a slot'


def run_all(manager, downloads, timeout=20):
    recorders = [Recorder(d) for d in downloads]
    for d in downloads:
        manager.add(d)
    manager.start()
    for d in downloads:
        assert d.wait(timeout), (d, d.last_exception)
    manager.stop()
    for d in downloads:
        d.join(5)
    return recorders


def test_a_cap_of_2_over_5_downloads_of_4_connections(server, tmp_path):
    urls = [server.add('/f{}.bin'.format(i), FILE, throttle=16 * MiB) for i in range(5)]
    m = bitpit.Manager(max_per_host=2)
    downloads = [bitpit.Downloader(url, tmp_path / 'f{}.bin'.format(i), connections=4)
                 for i, url in enumerate(urls)]
    run_all(m, downloads)
    for i in range(5):
        assert (tmp_path / 'f{}.bin'.format(i)).read_bytes() == FILE
    assert server.max_open == 2, server.max_open
    # the downloads were split: more requests than files, on at most 2 connections
    assert len(server.requests) > 5


def test_a_segmented_download_runs_on_the_cap(server, tmp_path):
    data = DATA * 5  # in 4 parts without a cap
    url = server.add('/f.bin', data, throttle=16 * MiB)
    m = bitpit.Manager(max_per_host=2)
    run_all(m, [bitpit.Downloader(url, tmp_path / 'f.bin', connections=4)])
    assert (tmp_path / 'f.bin').read_bytes() == data
    assert server.max_open == 2
    assert len(server.requests) > 2  # in pieces, over both connections
    assert len({r.conn for r in server.requests}) >= 2


def test_a_freed_slot_goes_to_the_longest_waiting(server, tmp_path):
    for name in 'abc':
        server.add('/{}.bin'.format(name), DATA, throttle=8 * MiB)
    m = bitpit.Manager(max_per_host=1)
    first, second, third = (bitpit.Downloader(server.url('/{}.bin'.format(name)),
                                              tmp_path / name) for name in 'abc')
    m.add(first)
    m.start()
    assert server.wait_requests(1, path='/a.bin')
    m.add(second)
    wait_queue(m, server, 1)
    m.add(third)
    wait_queue(m, server, 2)
    for d in (first, second, third):
        assert d.wait(10), d.last_exception
    m.stop()
    starts = {name: server.requests_for('/{}.bin'.format(name))[0].time for name in 'abc'}
    assert starts['a'] < starts['b'] < starts['c']
    assert server.max_open == 1
    assert (tmp_path / 'c').read_bytes() == DATA


def waiting_for_a_slot(server, tmp_path, **options):
    """A manager with ``max_per_host=1`` whose slot a stalled download
    holds, and a second download (with ``options``) waiting for it:
    ``(manager, holder, waiting, its Recorder)``."""
    server.add('/held.bin', DATA, stall_after=0)
    url = server.add('/f.bin', DATA)
    m = bitpit.Manager(max_per_host=1)
    holder = m.add(bitpit.Downloader(server.url('/held.bin'), tmp_path / 'held'))
    m.start()
    assert server.wait_stalled()
    waiting = m.add(bitpit.Downloader(url, tmp_path / 'f', **options))
    rec = Recorder(waiting)
    wait_queue(m, server, 1)
    return m, holder, waiting, rec


def test_stop_ends_a_download_waiting_for_a_slot(server, tmp_path):
    m, holder, waiting, rec = waiting_for_a_slot(server, tmp_path)
    m.stop()
    began = time.monotonic()
    waiting.stop()
    took = time.monotonic() - began
    assert waiting.state == 'pause' and not waiting.is_alive
    assert took < 0.1, took
    assert rec.states[-1] == ('start', 'pause')
    holder.stop()
    server.release()
    assert server.requests_for('/f.bin') == []
    assert m._host_slots._open[('http', '127.0.0.1', server.port)] == 0


def test_a_download_waiting_for_a_slot_says_its_speed(server, tmp_path):
    """A download waiting for a slot says the speed every period
    meanwhile."""
    m, holder, waiting, rec = waiting_for_a_slot(server, tmp_path, update_period=0.05)
    since = time.monotonic()
    rec.wait_for(lambda: sum(1 for when, _, _ in rec.speeds if when > since) >= 4)
    m.stop()
    waiting.stop()
    holder.stop()
    server.release()
    assert server.requests_for('/f.bin') == [] and waiting.state == 'pause'


def test_a_slow_callback_holds_no_slot_another_download_waits_for(server, tmp_path):
    """A callback on a download thread holds up that download only: the
    host slot its connection took goes to another download meanwhile,
    once the body it was for has come."""
    small = bytes(range(256)) * 40
    urls = [server.add('/a', small), server.add('/b', small)]
    m = bitpit.Manager(max_per_host=1)
    entered, release = threading.Event(), threading.Event()

    def slow(d, old):
        if d.state == 'download':
            entered.set()
            release.wait(10)
    a = bitpit.Downloader(urls[0], tmp_path / 'a')
    a.listen('state-changed', slow)
    m.add(a)
    m.start()
    assert entered.wait(10)
    b = m.add(bitpit.Downloader(urls[1], tmp_path / 'b'))
    try:
        assert b.wait(2), 'the other download waited for the slow callback'
    finally:
        release.set()
        assert a.wait(10)
        m.stop()


def test_hosts_are_capped_each_on_its_own(make_server, tmp_path):
    one, two = make_server(), make_server()
    urls = [srv.add('/f{}.bin'.format(i), FILE, throttle=16 * MiB)
            for srv in (one, two) for i in range(2)]
    m = bitpit.Manager(max_per_host=1)
    downloads = [bitpit.Downloader(url, tmp_path / 'f{}.bin'.format(i), connections=2)
                 for i, url in enumerate(urls)]
    run_all(m, downloads)
    assert one.max_open == 1 and two.max_open == 1
    for i in range(4):
        assert (tmp_path / 'f{}.bin'.format(i)).read_bytes() == FILE


def test_max_per_host_is_checked():
    assert bitpit.Manager().max_per_host == 0
    assert bitpit.Manager(max_per_host=3).max_per_host == 3
    with pytest.raises(ValueError):
        bitpit.Manager(max_per_host=-1)
    with pytest.raises(TypeError):
        bitpit.Manager(max_per_host='2')


def test_the_command_caps_hosts(server, tmp_path):
    urls = [server.add('/f{}.bin'.format(i), FILE, throttle=16 * MiB) for i in range(3)]
    result = subprocess.run([sys.executable, str(HERE / 'bitpit.py'), '-q', '-x', '3',
                             '--max-per-host', '2'] + urls, cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result
    assert server.max_open == 2
    for i in range(3):
        assert (tmp_path / 'f{}.bin'.format(i)).read_bytes() == FILE


def test_a_question_of_size_under_a_cap_of_1(server, tmp_path):
    # a 416 without the size: the size is asked with a second request while
    # the first one's connection would hold the only slot
    url = server.add('/f.bin', DATA, bare_416=True)
    (tmp_path / 'f.bin').write_bytes(DATA)
    m = bitpit.Manager(max_per_host=1)
    d = bitpit.Downloader(url, tmp_path / 'f.bin')
    run_all(m, [d], timeout=10)
    assert d.state == 'complete'
    assert [r.headers['Range'] for r in server.requests_for('/f.bin')] == [
        'bytes={}-'.format(len(DATA)), 'bytes=0-0']
