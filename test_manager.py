"""The download manager: its properties and signals, max_running, restarts
(also after Retry-After), stop and stop_all, the work-conserving total rate
limit, connection reuse and no thread left behind; against the local server."""
import pathlib
import ssl
import threading
import time

import pytest

import bitpit
from conftest import bitpit_threads

DATA = bytes(range(256)) * 1024        # 256 KiB


class Watcher:
    """Waits on the state changes of every download a manager has."""

    def __init__(self, manager):
        self.cond = threading.Condition()
        self.log = []
        manager.listen('add', self._on_add)
        for d in manager.downloads:
            self._on_add(manager, d)

    def _on_add(self, manager, d):
        d.listen('state-changed', self._on_state)

    def _on_state(self, d, old):
        with self.cond:
            self.log.append((time.monotonic(), d, old, d.state))
            self.cond.notify_all()

    def wait(self, predicate, timeout=20):
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), 'timed out; log: {}'.format(
                [(d.url.rsplit('/', 1)[-1], old, new) for _, d, old, new in self.log])


def all_in(downloads, *states):
    return lambda: all(d.state in states for d in downloads)


@pytest.fixture
def manager():
    managers = []

    def make(**kwargs):
        m = bitpit.Manager(**kwargs)
        managers.append(m)
        return m
    yield make
    for m in managers:
        m.stop()
        m.stop_all()


def start_manager(make, server, tmp_path, names, data=DATA, throttle=None, **kwargs):
    """Serve ``data`` at each of ``names``, add them to a started manager made
    with ``kwargs``; return the manager, a Watcher and the downloads."""
    for name in names:
        server.add(name, data, throttle=throttle)
    m = make(path=tmp_path, dir_path=True, **kwargs)
    watcher = Watcher(m)
    downloads = [m.add(server.url(name)) for name in names]
    m.start()
    return m, watcher, downloads


def test_properties_signals_and_kwargs(manager, tmp_path):
    m = manager(max_running=2, rate_limit=1000, restart_wait=5, path=tmp_path, dir_path=True)
    events = []
    m.listen('add', lambda m, d: events.append(('add', d)))
    m.listen('remove', lambda m, d: events.append(('remove', d)))
    m.listen('property-changed', lambda m, name: events.append(('property', name)))
    d = m.add('http://127.0.0.1:1/a.bin')
    assert isinstance(d, bitpit.Downloader) and d.path == tmp_path / 'a.bin'
    own = bitpit.Downloader('http://127.0.0.1:1/b.bin', path=tmp_path / 'b')
    assert m.add(own) is own
    downloads = m.downloads
    assert downloads == [d, own]
    downloads.clear()
    assert m.downloads == [d, own], 'downloads is a copy'
    m.max_running, m.rate_limit, m.restart_wait, m.kwargs = 3, 2000, 1, {'timeout': 3}
    assert (m.max_running, m.rate_limit, m.restart_wait, m.kwargs) == (3, 2000, 1, {'timeout': 3})
    assert m.add('http://127.0.0.1:1/c').timeout == 3
    m.remove(own)
    assert own not in m.downloads
    assert [e for e in events if e[0] == 'property'] == [
        ('property', 'max_running'), ('property', 'rate_limit'),
        ('property', 'restart_wait'), ('property', 'kwargs')]
    assert ('add', d) in events and ('remove', own) in events
    with pytest.raises(ValueError):
        m.remove(own)



# every option a manager's kwargs may hold but mirrors (rate_limit and
# restart_wait are the manager's own), none at its default
EVERY_OPTION = dict(
    timeout=3, update_period=0.5, chunk_size=4096,
    connections=3, retries=2, content_disposition=True, checksum='sha256:' + 'ab' * 32,
    headers={'X-Test': 'yes'}, auth=('user', 'secret'), proxy='http://127.0.0.1:1',
    ssl_context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), max_size=10 ** 6, min_speed=100,
    if_exists='rename', verify_digest=False, restart_wait_max=9)


def held(d):
    """Every slot of a downloader: what it holds (None: nothing yet, a slot
    that only its first start sets)."""
    return {name: getattr(d, name, None) for name in bitpit.Downloader.__slots__}


def is_value(value):
    return isinstance(value, (str, int, float, tuple, type(None), pathlib.PurePath))


def request_settings(settings):
    """What a downloader's requests are made with, as one value."""
    return (tuple(settings.headers.items()), settings.auth, settings.proxy,
            settings.ssl_context, settings.timeout)


def settings(held):
    """A downloader's other options, as one value."""
    return tuple(getattr(held, name) for name in bitpit._Settings.__slots__ if name != 'shared')


def test_add_url_makes_what_the_constructor_makes(tmp_path):
    kwargs = dict(EVERY_OPTION, path=tmp_path, dir_path=True)
    m = bitpit.Manager(**kwargs)
    urls = ['http://127.0.0.1:1/a.bin', 'http://127.0.0.1:1/b.bin']
    added = [held(m.add(url)) for url in urls]
    made = [held(m.add(bitpit.Downloader(url, **kwargs))) for url in urls]
    for name in bitpit.Downloader.__slots__:
        ours, theirs = [a[name] for a in added], [b[name] for b in made]
        if name == '_requests':  # the model's, shared (read-only); alike
            assert ours[0] is ours[1]
            assert {request_settings(s) for s in ours + theirs} == {request_settings(ours[0])}
        elif name == '_settings':  # the model's, shared (copied when set); alike
            assert ours[0] is ours[1] and ours[0].shared
            assert {settings(s) for s in ours + theirs} == {settings(ours[0])}
        elif is_value(theirs[0]):
            assert ours == theirs, name
        else:  # an object of each download's own, or one they share
            assert type(ours[0]) is type(theirs[0]), name
            assert (ours[0] is ours[1]) == (theirs[0] is theirs[1]), name
            if isinstance(theirs[0], (dict, list)):
                assert ours == theirs, name
    # (a path in the directory is held as text, its Path made when read)
    assert added[0]['_path'] == str(tmp_path / 'a.bin')
    assert m.downloads[0].path == tmp_path / 'a.bin'


def test_add_url_follows_kwargs_changed_in_place_and_the_working_directory(
        tmp_path, monkeypatch):
    m = bitpit.Manager(mirrors=['http://127.0.0.1:1/m', 'http://127.0.0.1:1/b'])
    assert m.add('http://127.0.0.1:1/b').mirrors == ('http://127.0.0.1:1/m',)
    m.kwargs = {}
    (tmp_path / 'there').mkdir()
    monkeypatch.chdir(tmp_path)
    assert m.add('http://127.0.0.1:1/a').path == tmp_path / 'a'
    monkeypatch.chdir(tmp_path / 'there')
    d = m.add('http://127.0.0.1:1/b')
    assert d.path == tmp_path / 'there' / 'b' and d.timeout == 10
    m.kwargs['timeout'] = 4
    assert m.add('http://127.0.0.1:1/c').timeout == 4
    m.kwargs['headers'] = {'X-One': '1'}
    assert m.add('http://127.0.0.1:1/c1').headers == {'X-One': '1'}
    m.kwargs['headers']['X-Two'] = '2'
    assert m.add('http://127.0.0.1:1/c2').headers == {'X-One': '1', 'X-Two': '2'}
    m.kwargs['timeout'] = -1
    with pytest.raises(ValueError, match='timeout'):
        m.add('http://127.0.0.1:1/d')
    with pytest.raises(bitpit.InvalidURLError):
        bitpit.Manager().add('ftp://127.0.0.1/e')

def test_a_setter_on_a_download_added_by_url_changes_that_download_only(server, tmp_path):
    """The downloads that add(url) makes share their requests' settings,
    made once from the kwargs: a setter gives its download settings of its
    own, and the headers read from one are a copy, changed in place for
    none of them."""
    m = bitpit.Manager(path=tmp_path, dir_path=True, headers={'X-Test': 'kw'}, timeout=5)
    first, second, third = [m.add(server.add('/s{}'.format(i), DATA)) for i in range(3)]
    first.headers = {'X-Test': 'own'}
    second.timeout = 7
    third.headers['X-Test'] = 'in place'
    assert [(d.headers['X-Test'], d.timeout) for d in (first, second, third)] == \
        [('own', 5), ('kw', 7), ('kw', 5)]
    for d in (first, second, third):
        d.start()
        d.join(5)
    assert [server.requests_for('/s{}'.format(i))[0].headers['X-Test']
            for i in range(3)] == ['own', 'kw', 'kw']


def test_an_option_set_on_a_download_added_by_url_changes_that_download_only(tmp_path):
    """The downloads that add(url) makes share their other options too,
    made once from the kwargs: a setter gives its download options of its
    own."""
    m = bitpit.Manager(path=tmp_path, dir_path=True, retries=2, chunk_size=4096)
    first, second = m.add('http://127.0.0.1:1/a'), m.add('http://127.0.0.1:1/b')
    first.retries = 5
    first.if_exists = 'skip'
    second.chunk_size = 1000
    second.restart_wait = 3
    third = m.add('http://127.0.0.1:1/c')
    assert [(d.retries, d.chunk_size, d.restart_wait, d.if_exists)
            for d in (first, second, third)] == \
        [(5, 4096, -1, 'skip'), (2, 1000, 3, 'resume'), (2, 4096, -1, 'resume')]


def test_two_setters_at_once_each_keep_the_others_change(monkeypatch):
    """A setter replaces the download's request settings whole: one that
    runs while another is making its replacement waits for it, and loses
    nothing of it (nor it of this one)."""
    d = bitpit.Downloader('http://127.0.0.1/f', timeout=5)
    inside, go, progress = threading.Event(), threading.Event(), threading.Event()
    header_sets = bitpit._header_sets

    def blocking_header_sets(headers):  # (the headers setter's replacement)
        inside.set()
        assert go.wait(5)
        return header_sets(headers)

    class SeenLock:  # (the timeout setter says when it reaches the lock)
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            progress.set()
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    monkeypatch.setattr(bitpit, '_header_sets', blocking_header_sets)
    setting_headers = threading.Thread(target=setattr, args=(d, 'headers', {'X-A': 'a'}))
    setting_headers.start()
    assert inside.wait(5)
    d._lock = SeenLock(d._lock)
    setting_timeout = threading.Thread(
        target=lambda: (setattr(d, 'timeout', 7), progress.set()))
    setting_timeout.start()
    assert progress.wait(5)  # (at the lock, or done without one)
    go.set()
    setting_headers.join(5)
    setting_timeout.join(5)
    assert (d.headers, d.timeout) == ({'X-A': 'a'}, 7)


def test_max_running_is_never_exceeded_and_oldest_run_first(manager, server, tmp_path):
    m, watcher, downloads = start_manager(manager, server, tmp_path,
                                          ['/f{}'.format(i) for i in range(8)],
                                          throttle=2 * 1024 * 1024, max_running=3)
    watcher.wait(all_in(downloads, 'complete'))
    assert server.max_concurrent <= 3
    assert server.max_concurrent == 3
    starts = [d for _, d, old, new in watcher.log if new == 'start']
    # the three oldest start first (their threads may signal in another order)
    assert set(starts[:3]) == set(downloads[:3]) and set(starts) == set(downloads)
    for i, d in enumerate(downloads):
        assert (tmp_path / 'f{}'.format(i)).read_bytes() == DATA


def test_the_plan_starts_the_oldest_waiting_whether_queued_again_or_added(tmp_path):
    """Downloads added wait in the order they were added, and one queued
    again (paused, failed) waits by its own turn, before those added after
    it: the plan starts the oldest of all (white box: the queue, under the
    lock; nothing started, no request made)."""
    m = bitpit.Manager(max_running=2, path=tmp_path, dir_path=True)
    downloads = [m.add('http://127.0.0.1:9/q{}'.format(i)) for i in range(5)]
    with m._lock:
        assert m._plan()[1] == downloads[:2]
        for d in downloads[1::-1]:  # both paused, the younger first
            m._running.pop(d)
            m._track(d, 'pause')
        m._max_running = 3
        assert m._plan()[1] == downloads[:3]
        for d in downloads[2::-1]:  # all three paused: before the two still waiting
            m._running.pop(d)
            m._track(d, 'pause')
        m._max_running = 5
        assert m._plan()[1] == downloads
        assert not m._queue and not m._in_turn and not m._queued


def test_a_removed_download_leaves_the_queue_whether_waiting_in_turn_or_again(tmp_path):
    """remove() forgets a waiting download wherever it waits: among those
    added (in turn) or those queued again (a pause); the queue keeps no
    entry of it (which would keep it alive), and added again it waits by
    its new turn (white box, as above: nothing started)."""
    m = bitpit.Manager(max_running=1, path=tmp_path, dir_path=True)
    downloads = [m.add('http://127.0.0.1:9/r{}'.format(i)) for i in range(4)]
    with m._lock:
        assert m._plan()[1] == downloads[:1]
        m._running.pop(downloads[0])
        m._track(downloads[0], 'pause')  # queued again, out of turn
    for d in downloads[:2]:
        m.remove(d)
    assert [d for _, d in [*m._in_turn, *m._queue]] == downloads[2:]
    assert m._queued == set(downloads[2:])
    m.add(downloads[0])
    m.max_running = 4
    with m._lock:
        assert m._plan()[1] == [downloads[2], downloads[3], downloads[0]]
        assert not m._queue and not m._in_turn and not m._queued


def test_lowering_max_running_stops_newest_and_resumes_later(manager, server, tmp_path):
    m, watcher, downloads = start_manager(manager, server, tmp_path,
                                          ['/s{}'.format(i) for i in range(3)],
                                          throttle=100000, max_running=3, restart_wait=0)
    watcher.wait(all_in(downloads, 'download'))
    m.max_running = 1
    watcher.wait(lambda: [d.state for d in downloads].count('pause') == 2)
    assert downloads[0].state == 'download'
    m.max_running = 0
    watcher.wait(all_in(downloads, 'complete'))
    assert not m._open, 'a finished download is no longer timed for a restart'
    for i in range(3):
        assert (tmp_path / 's{}'.format(i)).read_bytes() == DATA
    resumed = [r for r in server.requests if r.headers['Range']]
    assert {r.path for r in resumed} == {'/s1', '/s2'}


def test_failed_download_restarts_after_restart_wait(manager, server, tmp_path):
    server.add('/flaky', DATA, status=503, status_times=2)
    m = manager(restart_wait=0.4, path=tmp_path, dir_path=True)
    watcher = Watcher(m)
    d = m.add(server.url('/flaky'))
    m.start()
    watcher.wait(all_in([d], 'complete'))
    errors = [t for t, _, _, new in watcher.log if new == 'error']
    starts = [t for t, _, _, new in watcher.log if new == 'start']
    assert len(errors) == 2 and len(starts) == 3 and not m._open
    assert starts[1] - errors[0] >= 0.38 and starts[2] - errors[1] >= 0.38
    assert (tmp_path / 'flaky').read_bytes() == DATA


def test_download_added_by_url_unwatched_is_restarted_by_manager(manager, server, tmp_path):
    """A download that add(url) makes with nobody listening to the
    manager's 'add' (joined on a shorter way) is still the manager's: it
    tells the manager its error, and the manager starts it again."""
    server.add('/flaky', DATA, status=503, status_times=1)
    m = manager(restart_wait=0.05, path=tmp_path, dir_path=True)
    d = m.add(server.url('/flaky'))
    states = []
    d.listen('state-changed', lambda d, old: states.append(d.state))
    m.start()
    assert d.wait(5) and d.state == 'complete'
    assert states.count('error') == 1 and states.count('start') == 2
    assert m.downloads == [d] and not m._queue and not m._in_turn and not m._open
    assert (tmp_path / 'flaky').read_bytes() == DATA


def test_retry_after_is_honoured_by_manager(manager, server, tmp_path):
    server.add('/busy', DATA, status=429, status_times=1, headers={'Retry-After': '1'})
    m = manager(restart_wait=0, path=tmp_path, dir_path=True)
    watcher = Watcher(m)
    d = m.add(server.url('/busy'))
    m.start()
    watcher.wait(all_in([d], 'complete'))
    error_at = next(t for t, _, _, new in watcher.log if new == 'error')
    restart_at = [t for t, _, _, new in watcher.log if new == 'start'][1]
    assert restart_at - error_at >= 0.95


def test_complete_and_fatal_are_never_restarted(manager, server, tmp_path):
    server.add('/ok', DATA)
    server.add('/missing', b'', status=404)
    m = manager(restart_wait=0, path=tmp_path, dir_path=True)
    watcher = Watcher(m)
    ok, missing = m.add(server.url('/ok')), m.add(server.url('/missing'))
    m.start()
    watcher.wait(lambda: ok.state == 'complete' and missing.state == 'fatal-error')
    m.update()
    # the manager thread ends by itself once nothing is left to do
    thread = m._thread
    if thread is not None:
        thread.join(5)
    assert m._thread is None
    assert len(server.requests_for('/ok')) == 1 and len(server.requests_for('/missing')) == 1


def test_stop_all_pauses_running_downloads(manager, server, tmp_path):
    m, watcher, downloads = start_manager(manager, server, tmp_path, ['/p0', '/p1'],
                                          throttle=64 * 1024, restart_wait=60)
    watcher.wait(all_in(downloads, 'download'))
    m.stop_all()
    assert all(d.state == 'pause' and not d.is_alive for d in downloads)
    assert m._thread is not None and m._thread.is_alive(), 'manager keeps running'
    m.stop()
    assert m._thread is None
    assert not bitpit_threads(wait=0)


def test_total_rate_limit_is_work_conserving(manager, server, tmp_path):
    """Four downloads share 800 KB/s; one is capped by its server at 50 KB/s,
    so the other three must share the remaining 750 KB/s."""
    big = bytes(8 * 1024 * 1024)
    for i in range(3):
        server.add('/fast{}'.format(i), big)
    server.add('/slow', big, throttle=50000)
    total = 800000
    m = manager(max_running=4, rate_limit=total, path=tmp_path, dir_path=True,
                update_period=0.1)
    watcher = Watcher(m)
    downloads = [m.add(server.url('/fast{}'.format(i))) for i in range(3)]
    downloads.append(m.add(server.url('/slow')))
    m.start()
    watcher.wait(all_in(downloads, 'download'))
    time.sleep(0.5)  # measure the steady state, not the ramp-up
    before, began = [d.downloaded for d in downloads], time.monotonic()
    time.sleep(2.0)
    elapsed = time.monotonic() - began
    rates = [(d.downloaded - b) / elapsed for d, b in zip(downloads, before)]
    m.stop()
    m.stop_all()
    assert 0.9 * total <= sum(rates) <= 1.05 * total, sum(rates) / total
    # served in turn: no fast download starves while another takes it all
    fair_share = (total - 50000) / 3
    assert all(rate > 0.6 * fair_share for rate in rates[:3]), rates


@pytest.mark.parametrize('piece, connections', [(1024, 1), (64 * 1024, 4)],
                         ids=['1KiB-trickle-x1', '64KiB-bursts-x4'])
def test_total_rate_limit_hands_on_every_unused_byte(manager, server, tmp_path,
                                                     piece, connections):
    """Under a total limit, what a slow member cannot take goes to the
    others to the byte: every whole second after the first, all of them
    together receive the limit (within 3 %), whether the slow one's server
    trickles 1 KiB writes or sends 64 KiB bursts, on one connection or
    several per download."""
    total = 2 * 1024 * 1024
    for i in range(3):
        server.add('/fast{}'.format(i), bytes(16 * 1024 * 1024))
    server.add('/slow', bytes(4 * 1024 * 1024), throttle=128 * 1024, throttle_piece=piece)
    m = manager(max_running=4, rate_limit=total, path=tmp_path, dir_path=True,
                connections=connections)
    watcher = Watcher(m)
    downloads = [m.add(server.url('/fast{}'.format(i))) for i in range(3)]
    downloads.append(m.add(server.url('/slow')))
    m.start()
    watcher.wait(all_in(downloads, 'download'))
    began = time.monotonic()
    samples = []
    for second in range(4):
        time.sleep(max(0.0, began + second - time.monotonic()))
        samples.append((time.monotonic(), sum(d.downloaded for d in downloads)))
    m.stop_all()
    shares = [(b - a) / (t2 - t1) / total for (t1, a), (t2, b) in zip(samples[1:], samples[2:])]
    assert all(0.97 <= share <= 1.03 for share in shares), shares
    assert all(d.state == 'pause' for d in downloads)  # none ran out of bytes


def test_total_rate_limit_serves_a_download_thread_beside_connection_threads(
        manager, server, tmp_path):
    """A download thread that reads its own connection leaves the total
    limit's queue whenever its download is due for its signals (here every
    50 ms): it comes back where it stood, so the connection threads of a
    split file, which never leave it, do not pass it over and over: it
    gets its turn as one of the seven readers (about a seventh)."""
    server.add('/big', bytes(8 * 1024 * 1024))
    server.add('/small', bytes(1024 * 1024))
    m = manager(max_running=2, rate_limit=1000000, path=tmp_path, dir_path=True)
    big = m.add(bitpit.Downloader(server.url('/big'), tmp_path / 'big', connections=6))
    m.start()
    # its probe's connection and five more, which share the file out
    assert server.wait_requests(6, path='/big')
    small = m.add(bitpit.Downloader(server.url('/small'), tmp_path / 'small',
                                    update_period=0.05))
    assert server.wait_requests(1, path='/small')
    time.sleep(0.2)  # both under way
    before = big.downloaded, small.downloaded
    time.sleep(0.6)
    got = big.downloaded - before[0], small.downloaded - before[1]
    m.stop()
    m.stop_all()
    assert got[1] >= 0.07 * sum(got), got  # a seventh is 0.14; passed over, 0.02


def test_individual_rate_limit_still_caps_a_download(manager, server, tmp_path):
    server.add('/a', bytes(4 * 1024 * 1024))
    m = manager(rate_limit=10 * 1024 * 1024, path=tmp_path, dir_path=True)
    d = bitpit.Downloader(server.url('/a'), path=tmp_path / 'a', rate_limit=100000,
                          update_period=0.1)
    watcher = Watcher(m)
    m.add(d)
    m.start()
    watcher.wait(all_in([d], 'download'))
    began, at = time.monotonic(), d.downloaded
    time.sleep(1.0)
    rate = (d.downloaded - at) / (time.monotonic() - began)
    m.stop()
    d.stop()
    assert rate < 130000


def test_connections_are_reused(manager, server, tmp_path):
    for i in range(30):
        server.add('/small{}'.format(i), bytes([i]) * 10240)
    m = manager(max_running=5, path=tmp_path, dir_path=True)
    watcher = Watcher(m)
    downloads = [m.add(server.url('/small{}'.format(i))) for i in range(30)]
    m.start()
    watcher.wait(all_in(downloads, 'complete'))
    assert server.connections <= 10
    for i in range(30):
        assert (tmp_path / 'small{}'.format(i)).read_bytes() == bytes([i]) * 10240


def test_no_thread_left_after_stop(manager, server, tmp_path):
    m, watcher, downloads = start_manager(manager, server, tmp_path,
                                          ['/t{}'.format(i) for i in range(10)],
                                          throttle=512 * 1024, max_running=4)
    watcher.wait(lambda: sum(d.state == 'download' for d in downloads) == 4)
    assert len([t for t in bitpit_threads(wait=0) if t.name == 'bitpit-download']) <= 4
    m.stop()
    m.stop_all()
    assert not bitpit_threads(wait=0)


def test_stop_then_start_again(manager, server, tmp_path):
    m, watcher, downloads = start_manager(manager, server, tmp_path, ['/r0'],
                                          throttle=100000)
    watcher.wait(all_in(downloads, 'download'))
    old = m._thread
    m.stop()
    assert m._thread is None and not old.is_alive()
    assert downloads[0].state == 'download', 'stopping the manager leaves downloads alone'
    downloads[0].stop()
    m.restart_wait = 0
    m.start()
    assert m._thread is not old
    watcher.wait(all_in(downloads, 'complete'))
    assert (tmp_path / 'r0').read_bytes() == DATA


def test_wait_ends_for_a_paused_download_once_its_manager_stopped(manager, server, tmp_path):
    """A manager restarts its downloads only while it runs: after ``stop()``
    and ``stop_all()``, a paused download's ``wait()`` returns ``False``
    (it used to wait for a restart that could no longer come)."""
    m, watcher, (d,) = start_manager(manager, server, tmp_path, ['/w'],
                                     throttle=64 * 1024, restart_wait=60)
    watcher.wait(all_in([d], 'download'))
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(d.wait(20)))
    waiter.start()
    m.stop()
    m.stop_all()
    waiter.join(5)
    assert waited == [False] and d.state == 'pause'


def test_a_manager_whose_thread_ended_still_restarts_what_fails_later(
        manager, server, tmp_path):
    """Once every download was complete, the manager's thread ended by
    itself; the manager is still started, so a download restarted by hand
    that fails is restarted by the manager (it waited for ever before:
    the manager counted as restarting, with no thread to do it)."""
    url = server.add('/f', DATA)
    m = manager(restart_wait=0.05, path=tmp_path, dir_path=True)
    d = m.add(url)
    m.start()
    assert d.wait(10)
    assert bitpit_threads() == []                    # the manager's thread ended
    server.add('/f', DATA, status=503, status_times=1)
    d.restart(0)
    assert d.wait(10) and (tmp_path / 'f').read_bytes() == DATA
    # the first download's GET, the 503, and the manager's restart
    assert [r.method for r in server.requests_for('/f')].count('GET') >= 3


def test_the_manager_plans_before_a_downloads_callbacks(manager, server, tmp_path):
    """The manager learns of a state change before the download's
    callbacks run, even those listened to before it was added: a slow
    callback of a download that ended does not hold up the next one's
    start."""
    for name in ('/first', '/next'):
        server.add(name, b'x' * 1000)
    m = manager(max_running=1, path=tmp_path, dir_path=True)
    first = bitpit.Downloader(server.url('/first'), tmp_path, dir_path=True)
    next_started = threading.Event()
    seen = []

    def on_first(d, old):
        if d.state == 'complete':  # the next one starts meanwhile
            seen.append(next_started.wait(5))
    first.listen('state-changed', on_first)
    m.add(first)
    m.add(server.url('/next')).listen('state-changed', lambda d, old: next_started.set())
    m.start()
    assert first.wait(10)
    first.join(10)
    assert seen == [True]


@pytest.mark.allow_error_log(r'^the manager of .* failed to note its state')
def test_a_manager_that_fails_to_note_a_state_is_logged_and_the_download_goes_on(
        manager, server, tmp_path, monkeypatch):
    """The manager is told of a state change as a callback would be: if
    that fails, it is logged and the download and its callbacks go on."""
    def fail(self, d, old_state, state):
        raise RuntimeError('no note')
    monkeypatch.setattr(bitpit.Manager, '_on_state_changed', fail)
    url = server.add('/noted', DATA)
    m = manager(path=tmp_path, dir_path=True)
    d = m.add(url)
    states = []
    d.listen('state-changed', lambda d, old: states.append(d.state))
    d.start()
    assert d.wait(10)
    d.join(10)
    assert states == ['start', 'download', 'complete']
    assert (tmp_path / 'noted').read_bytes() == DATA


def test_an_add_callback_may_remove_the_download(manager, server, tmp_path):
    """A callback of ``add`` runs before the download waits for its turn:
    one that removes it leaves nothing of it in the manager."""
    url = server.add('/gone', DATA)
    m = manager(path=tmp_path, dir_path=True)
    m.listen('add', lambda m, d: m.remove(d))
    m.start()
    d = m.add(url)
    assert m.downloads == [] and d.state == 'pause' and not d.is_alive
    assert m._queue == [] and not m._in_turn and m._open == {}
    assert server.requests_for('/gone') == []


def test_wait_ends_for_a_download_paused_before_its_manager_stopped(manager, server, tmp_path):
    """A download paused by ``stop_all()`` waits for the manager's restart;
    ``stop()`` ends that wait at once: the manager wakes the waiters of the
    downloads it would have restarted."""
    m, watcher, (d,) = start_manager(manager, server, tmp_path, ['/p'],
                                     throttle=64 * 1024, restart_wait=60)
    watcher.wait(all_in([d], 'download'))
    m.stop_all()
    assert d.state == 'pause'
    waited = []
    waiter = threading.Thread(target=lambda: waited.append(d.wait(20)))
    waiter.start()
    deadline = time.monotonic() + 5
    while not (d._changed and d._changed._condition and d._changed._condition._waiters):
        assert time.monotonic() < deadline, 'the waiter never waited'
        time.sleep(0.001)  # (wait() gives no event of its own)
    m.stop()
    waiter.join(5)
    assert waited == [False]


class RestartedDownloader(bitpit.Downloader):
    """A download that tells when it is started again (by its manager)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starts = 0
        self.restarted = threading.Event()

    def start(self):
        self.starts += 1
        if self.starts > 1:
            self.restarted.set()
        super().start()


def stop_in_a_callback(m, d, act, state='error', stop=None, wait=0.25):
    """Have ``d``'s first ``state`` callback (listened before ``add``) run
    ``act()`` once the manager started ``d`` again, if it does while the
    callback runs (``wait`` s at most); return whether ``act`` returned
    within 2 s, as seen by the callback. ``act`` runs in a thread of its
    own, so that a wait for this callback's end cannot hang the suite.
    ``stop(d)``, if given, is called once the manager started ``d``."""
    done = []

    def on_state(d, old):
        if d.state != state or done:
            return
        d.restarted.wait(wait)  # (without the defect, nothing starts it meanwhile)
        actor = threading.Thread(target=act)
        actor.start()
        actor.join(2)
        done.append(not actor.is_alive())
        done.append(actor)
    d.listen('state-changed', on_state)
    m.add(d)
    m.start()
    if stop is not None:
        stop(d)
    d.wait(10)
    d.join(10)
    done[1].join(5)
    return done[0]


def test_an_error_callback_may_stop_the_manager(manager, server, tmp_path):
    """The manager learns of a download's error after its callbacks: one
    of them may stop the manager (which waits for its thread), while the
    manager would restart the download at once (restart_wait=0), which
    waits for the download thread's callbacks to end. With the manager told
    first, the two waited for each other for ever."""
    url = server.add('/e', DATA, status=503)
    m = manager(restart_wait=0)
    d = RestartedDownloader(url, tmp_path / 'e')
    assert stop_in_a_callback(m, d, m.stop), 'stop() waited for the callback'
    assert d.state == 'error' and d.starts == 1  # the stopped manager restarted nothing
    assert len(server.requests_for('/e')) == 1


def test_an_error_callback_may_remove_the_download(manager, server, tmp_path):
    """A download that a callback of its error removed from its manager is
    not restarted by that manager: it restarts by itself only (here never:
    its own restart_wait is -1)."""
    url = server.add('/e', DATA, status=503)
    m = manager(restart_wait=0)
    d = RestartedDownloader(url, tmp_path / 'e')
    assert stop_in_a_callback(m, d, lambda: m.remove(d))
    assert m.downloads == [] and d.state == 'error'
    assert d.starts == 1 and len(server.requests_for('/e')) == 1


def test_a_pause_callback_may_stop_the_manager(manager, server, tmp_path):
    """The manager learns of a download's pause after its callbacks too:
    one of them may stop the manager, while the manager would start the
    paused download again at once (restart_wait=0), which waits for the
    download thread's callbacks to end."""
    url = server.add('/p', DATA, throttle=64 * 1024)
    m = manager(restart_wait=0)
    d = RestartedDownloader(url, tmp_path / 'p')
    downloading = threading.Event()
    d.listen('state-changed', lambda d, old: d.state == 'download' and downloading.set())

    def stop(d):
        assert downloading.wait(5)
        d.stop()  # (waits about a second at most for the callback)
    assert stop_in_a_callback(m, d, m.stop, 'pause', stop, wait=0.1), \
        'stop() waited for the callback'
    assert d.state == 'pause' and d.starts == 1  # the stopped manager restarted nothing


def test_a_download_added_to_two_managers_frees_its_slot_in_both(manager, server, tmp_path):
    """bitpit 1.2.0: a manager re-plans "when the state of any added
    download changes". A download added to two managers is reported to
    both: the first, which ran it, starts its next one once it ended (it
    waited for ever when only the last manager was told)."""
    for name in ('/both', '/next'):
        server.add(name, b'x' * 1000)
    first = manager(max_running=1, path=tmp_path, dir_path=True)
    second = manager(path=tmp_path, dir_path=True)
    both = first.add(server.url('/both'))
    later = first.add(server.url('/next'))
    second.add(both)  # (which restarts it now, and is not started: wait() would not wait)
    ended = threading.Event()
    both.listen('state-changed', lambda d, old: d.state == 'complete' and ended.set())
    first.start()
    assert ended.wait(10)
    assert later.wait(5)


def test_a_download_that_one_of_its_two_managers_lets_go_keeps_the_others_limit(
        manager, server, tmp_path):
    """A download in two managers is limited by the last one's total
    (it restarts it, and gives it its limit and slots); when the first
    manager removes it, the second's limit still holds. (It ran
    unlimited: leaving one manager dropped every manager's limit.)"""
    data = bytes(range(256)) * 80  # 20 KiB
    url = server.add('/both', data)
    first = manager(path=tmp_path / 'a')
    second = manager(rate_limit=40000, path=tmp_path / 'b')
    d = first.add(url)
    second.add(d)
    first.remove(d)
    began = time.monotonic()
    second.start()
    assert d.wait(10) and d.state == 'complete'
    # 4 KB of burst, then 16 KB at 40 KB/s: 0.4 s at least (the server's
    # log cannot tell: the socket's buffers take 20 KB at once)
    took = time.monotonic() - began
    assert took >= 0.3, 'done in {:.3f} s'.format(took)


def test_a_download_its_caller_starts_counts_as_running_as_it_starts(
        manager, server, tmp_path):
    """A queued download started by its caller, not by the manager's plan,
    counts towards ``max_running`` from its ``start``, which the manager
    is told before the callbacks: a plan made then starts no other one.
    (A ``download`` after it tells the manager nothing it needs.) Once it
    ends, the manager starts the next."""
    first, second = (server.add(name, DATA[:1000]) for name in ('/first', '/second'))
    m = manager(max_running=1, path=tmp_path, dir_path=True)
    queued, started = m.add(first), m.add(second)
    plans = []

    def plan_at_its_start(d, old):
        if d.state == 'start':
            with m._lock:
                plans.append(m._plan())
    started.listen('state-changed', plan_at_its_start)
    started.start()
    assert started.wait(10)
    assert plans == [([], [], None)] and queued.state == 'pause'
    m.start()
    assert queued.wait(10)
    assert [r.path for r in server.requests] == ['/second', '/first']


def test_a_start_of_the_managers_own_plan_is_not_told_back_to_it(manager, server, tmp_path):
    """The manager counts a download its plan starts as running before it
    starts it: the download's start is not told back to it (its end is),
    and the mark that says so goes once it counts it running no longer.
    A download in a second manager tells both; a caller's start is told."""
    urls = [server.add('/o{}'.format(i), DATA[:1000]) for i in range(3)]
    m = manager(max_running=1, path=tmp_path, dir_path=True)
    other = manager(path=tmp_path, dir_path=True)
    notes = []
    for name, manager_ in (('m', m), ('other', other)):
        def note(d, old, state, name=name, told=manager_._on_state_changed):
            notes.append((name, d.url.rsplit('/', 1)[1], state))
            told(d, old, state)
        manager_._on_state_bound = note
        manager_._joined = ((note,), manager_._joined[1])
        manager_._plan_notes = manager_._joined[0]
    own, shared, by_caller = (m.add(url) for url in urls)
    other.add(shared)  # (which restarts it now, and is not started: wait() would not wait)
    ended = threading.Event()
    shared.listen('state-changed', lambda d, old: d.state == 'complete' and ended.set())
    by_caller.start()
    assert by_caller.wait(10)
    m.start()
    assert own.wait(10) and ended.wait(10)
    assert [n for n in notes if n[1] == 'o0'] == [('m', 'o0', 'complete')]
    assert [n for n in notes if n[1] == 'o1'] == [
        ('m', 'o1', 'start'), ('other', 'o1', 'start'),
        ('m', 'o1', 'complete'), ('other', 'o1', 'complete')]
    assert [n for n in notes if n[1] == 'o2'] == [('m', 'o2', 'start'), ('m', 'o2', 'complete')]
    assert all(d._planned_by is None for d in (own, shared, by_caller))


def test_a_manager_joined_as_its_other_manager_starts_a_download_counts_it(
        server, tmp_path, monkeypatch):
    """A manager that takes a download over between another's start of it
    (the only one it was in, which counted it running by its plan) and
    the run's ``start`` counts it running: it is told the start, as it
    joined before the download started as far as it could see (it found
    it paused), so its count (``max_running``) holds."""
    server.add('/f', b'x' * 1000, stall_after=10)
    a = bitpit.Manager(max_running=1, path=tmp_path, dir_path=True)
    d = a.add(server.url('/f'))
    b = bitpit.Manager(max_running=1)
    posting, joined = threading.Event(), threading.Event()
    post = bitpit._Signals.post

    def held_post(self, run, call, *args):
        if call == d._set_state and args[0] == 'start':
            posting.set()  # the run told its start: B joins before it is given
            joined.wait(5)
        post(self, run, call, *args)

    monkeypatch.setattr(bitpit._Signals, 'post', held_post)
    under_way = threading.Event()
    d.listen('state-changed', lambda d, old: d.state == 'download' and under_way.set())
    try:
        a.start()
        assert posting.wait(5)
        b.add(d)
        assert d.state == 'pause'  # (the start is still to be given)
        joined.set()
        assert under_way.wait(5)
        with b._lock:
            assert d in b._running
    finally:
        joined.set()
        a.stop()
        d.stop()
        server.release()
