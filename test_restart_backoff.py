"""Restarts that back off: the wait before the n-th restart in a row is drawn
between restart_wait and min(restart_wait * 2**(n-1), restart_wait_max),
timed from the server's own log of when each attempt's request came."""

import random
import subprocess
import sys

import pytest

import bitpit
from conftest import DATA, HERE, Recorder

BASE = 0.05
# what an attempt itself takes on a loaded machine, between the restart
# timer's end and the request reaching the server
OVERHEAD = 0.25


class _Fixed:
    """A stand-in for the random draws: always ``value``."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


@pytest.fixture
def draws(monkeypatch):
    """Make every drawn wait fall at ``value`` of the way to its bound."""
    def fix(value):
        monkeypatch.setattr(bitpit, '_RESTART_RANDOM', _Fixed(value))
    return fix


def intervals(server, path):
    times = [r.time for r in server.requests_for(path)]
    return [b - a for a, b in zip(times, times[1:])]


def run_to_fatal(url, tmp_path, **kwargs):
    d = bitpit.Downloader(url, tmp_path / 'f.bin', **kwargs)
    rec = Recorder(d)
    d.start()
    rec.wait_state('fatal-error', 'complete', timeout=15)
    d.join(5)
    return d


def test_the_bounds_double_from_restart_wait_up_to_the_cap():
    highs = [bitpit._backed_off(1.0, None, n, 1.0) for n in range(1, 8)]
    assert highs == [1, 2, 4, 8, 10, 10, 10]            # the default cap: 10 x
    assert [bitpit._backed_off(1.0, None, n, 0.0) for n in range(1, 8)] == [1.0] * 7
    assert bitpit._backed_off(2.0, 5.0, 3, 0.5) == 3.5  # halfway from 2 to min(8, 5)
    assert bitpit._backed_off(2.0, 1.0, 3, 0.9) == 2.0  # a cap below the base: the base
    assert bitpit._backed_off(1.0, None, 10 ** 6, 1.0) == 10  # no overflow


def test_waits_grow_from_the_servers_log(server, tmp_path, draws):
    draws(0.999)  # each wait at its upper bound: 0.05, 0.1, 0.2, 0.4, 0.4
    url = server.add('/busy.bin', DATA, status=503)
    d = run_to_fatal(url, tmp_path, restart_wait=BASE, restart_wait_max=8 * BASE, retries=5)
    assert d.state == 'fatal-error'
    gaps = intervals(server, '/busy.bin')
    assert len(gaps) == 5
    for n, gap in enumerate(gaps, 1):
        high = min(BASE * 2 ** (n - 1), 8 * BASE) * 0.999
        assert high <= gap < high + OVERHEAD, (n, gaps)


def test_real_draws_stay_within_their_bounds(server, tmp_path):
    bitpit._RESTART_RANDOM = random.Random(7)  # reproducible, but the real draws
    try:
        url = server.add('/busy.bin', DATA, status=503)
        run_to_fatal(url, tmp_path, restart_wait=BASE, retries=6)
    finally:
        bitpit._RESTART_RANDOM = random.Random()
    gaps = intervals(server, '/busy.bin')
    assert len(gaps) == 6
    for n, gap in enumerate(gaps, 1):
        assert BASE <= gap < min(BASE * 2 ** (n - 1), 10 * BASE) + OVERHEAD, (n, gaps)
    # drawn anew each time: not all at one end
    assert max(gaps[2:]) - min(gaps[2:]) > 0.01, gaps


def test_an_attempt_that_received_bytes_starts_the_row_again(server, tmp_path, draws):
    draws(0.999)
    # every answer is cut after 1000 bytes: each attempt received some
    url = server.add('/cut.bin', DATA, truncate_at=1000, headers={'Accept-Ranges': None},
                     etag=None)
    d = bitpit.Downloader(url, tmp_path / 'f.bin', restart_wait=0.2, retries=None)
    rec = Recorder(d)
    d.start()
    assert server.wait_requests(5, timeout=10, path='/cut.bin')
    d.stop()
    rec.wait_state('pause')
    gaps = intervals(server, '/cut.bin')[:4]
    # always the first restart's wait (0.2), never the second's (0.4)
    assert all(0.2 <= gap < 0.4 for gap in gaps), gaps


def test_retry_after_replaces_the_drawn_wait(server, tmp_path, draws):
    draws(0.999)  # drawn waits would be 0.1, 0.2, 0.4 ... 1.0
    url = server.add('/busy.bin', DATA, status=503, headers={'Retry-After': '0'})
    run_to_fatal(url, tmp_path, restart_wait=0.1, retries=4)
    gaps = intervals(server, '/busy.bin')
    assert len(gaps) == 4
    assert all(0.1 <= gap < 0.2 for gap in gaps), gaps  # never less than restart_wait


def test_under_a_manager_its_restart_wait_is_the_base(server, tmp_path, draws):
    draws(0.999)
    url = server.add('/busy.bin', DATA, status=503)
    m = bitpit.Manager(restart_wait=BASE, retries=4, restart_wait_max=4 * BASE)
    d = m.add(bitpit.Downloader(url, tmp_path / 'f.bin', retries=4, restart_wait_max=4 * BASE,
                                restart_wait=30))
    rec = Recorder(d)
    m.start()
    rec.wait_state('fatal-error', timeout=15)
    m.stop()
    d.join(5)
    gaps = intervals(server, '/busy.bin')
    assert len(gaps) == 4
    for n, gap in enumerate(gaps, 1):
        high = min(BASE * 2 ** (n - 1), 4 * BASE) * 0.999
        assert high <= gap < high + OVERHEAD, (n, gaps)


def test_restart_wait_max_is_checked():
    for bad in (-1, float('inf'), 2e6):
        with pytest.raises(ValueError):
            bitpit.Downloader('http://h/f', restart_wait_max=bad)
    with pytest.raises(TypeError):
        bitpit.Downloader('http://h/f', restart_wait_max='1')
    d = bitpit.Downloader('http://h/f', restart_wait_max=3)
    assert d.restart_wait_max == 3
    d.restart_wait_max = None
    assert d.restart_wait_max is None


def test_the_command_backs_off(server, tmp_path):
    url = server.add('/busy.bin', DATA, status=503)
    result = subprocess.run(
        [sys.executable, str(HERE / 'bitpit.py'), '--restart-wait', str(BASE),
         '--restart-wait-max', '0.2', '--retries', '4', '-q', url],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result
    gaps = intervals(server, '/busy.bin')
    assert len(gaps) == 4
    for n, gap in enumerate(gaps, 1):
        assert BASE <= gap < min(BASE * 2 ** (n - 1), 0.2) + OVERHEAD, (n, gaps)


def test_the_commands_default_waits_add_up_to_at_most_25_s():
    args = bitpit._build_parser().parse_args(['http://h/f'])
    highs = [bitpit._backed_off(args.restart_wait, args.restart_wait_max, n, 1.0)
             for n in range(1, args.retries + 1)]
    assert highs == [1, 2, 4, 8, 10]
