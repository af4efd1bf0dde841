"""What a small file costs: the system calls bitpit makes for a body that
comes in one read, counted by wrapping the ``os``, ``select`` and
``socket`` functions that make them. A call that a small file does not
need (a free-space check, an fstat of a file whose size the store knows,
a file object around its descriptor, a settimeout of a connection
parked a moment ago, a second look at a file taken as it is)
must not come back unnoticed; and what stays promised (the mtime, the
removal of a sidecar left there) still happens."""
import builtins
import gc
import os
import pathlib
import select
import socket
import threading
import time
import urllib.parse
import weakref

import pytest

import bitpit
from conftest import DATA, Recorder, fetch, run_program, run_until

SMALL = DATA[:10240]


class Calls:
    """The calls of the wrapped functions made by bitpit's own threads (not
    the test server's), by name; of those given a path, the ones for a
    path in ``directory`` only."""

    def __init__(self, monkeypatch, directory):
        self.names = []
        self.directory = str(directory)
        for module, name in [(os, 'access'), (os, 'stat'), (os, 'fstat'), (os, 'statvfs'),
                             (os, 'geteuid'), (os, 'unlink'), (os, 'utime'), (select, 'poll'),
                             (socket.socket, 'settimeout')]:
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))
        # bitpit's open() (a file object of the file, or of its sidecar)
        monkeypatch.setattr(bitpit, 'open', self._wrap('open', builtins.open), raising=False)
        # before Python 3.11, pathlib calls the os.stat it took at its import
        accessor = getattr(pathlib, '_NormalAccessor', None)
        if accessor is not None and 'stat' in vars(accessor):
            monkeypatch.setattr(accessor, 'stat',
                                staticmethod(self._wrap('stat', vars(accessor)['stat'])))

    def _wrap(self, name, real):
        def wrapper(*args, **kwargs):
            path = args[0] if args and isinstance(args[0], (str, os.PathLike)) else None
            if threading.current_thread().name.startswith('bitpit-') and (
                    path is None or os.fspath(path).startswith(self.directory)):
                self.names.append(name)
            made = real(*args, **kwargs)
            return Looks(self, made) if name == 'poll' else made
        return wrapper

    def note(self, name):
        if threading.current_thread().name.startswith('bitpit-'):
            self.names.append(name)

    def take(self):
        """The calls since the last ``take``, by name: how many of each."""
        names, self.names = self.names, []
        return {name: names.count(name) for name in set(names)}


class Looks:
    """A poll object whose looks (``poll``) are counted as ``look``."""

    def __init__(self, calls, poller):
        self._calls = calls
        self._poller = poller

    def register(self, *args):
        self._poller.register(*args)

    def poll(self, *args):
        self._calls.note('look')
        return self._poller.poll(*args)


def test_a_small_file_makes_only_the_calls_it_needs(server, tmp_path, monkeypatch):
    urls = [server.add('/f{}'.format(i), SMALL, last_modified='Mon, 07 Dec 2026 07:00:00 GMT')
            for i in range(3)]
    calls = Calls(monkeypatch, tmp_path)
    d = fetch(urls[0], tmp_path / 'f0')
    assert d.state == 'complete'
    first = calls.take()
    for i, url in enumerate(urls[1:], 1):  # over the connection the first one parked
        assert fetch(url, tmp_path / 'f{}'.format(i)).state == 'complete'
    later = calls.take()
    for name in ('statvfs', 'geteuid', 'open'):
        assert name not in first and name not in later, name
    # the look for the target when the attempt begins, and for a sidecar
    # left there when it ends: each an access that finds nothing, not a
    # stat or an unlink that fails; a file made new (O_EXCL) where it found
    # nothing is regular and empty: no fstat of its opening
    assert first.get('access') == 2 and later.get('access') == 4
    for name in ('stat', 'fstat', 'unlink'):
        assert name not in first and name not in later, name
    assert later.get('utime') == 2  # the mtime of Last-Modified, still
    # the pool's look at the connection before each reuse, by a poll object
    # that the connection keeps (the waits for the receives are the loop's
    # selector's, unseen here)
    assert later.get('look') == 2 and later.get('poll') == 1 and 'settimeout' not in later
    assert len(server.requests) == 3 and server.connections == 1
    for i in range(3):
        target = tmp_path / 'f{}'.format(i)
        assert target.read_bytes() == SMALL and target.stat().st_mtime == 1796626800
        assert not target.with_name(target.name + '.bitpit').exists()


def test_a_file_made_after_the_look_is_opened_as_it_is(server, tmp_path, monkeypatch):
    """Where the attempt's look found nothing, the file is made new; one
    that another program made meanwhile is opened as it is, and looked at:
    its bytes beyond the body are cut, not left behind it."""
    target = tmp_path / 'f.bin'
    open_store = bitpit._FileStore.open

    def open_after_another(store, *args, **kwargs):
        target.write_bytes(b'x' * (2 * len(SMALL)))
        open_store(store, *args, **kwargs)
    monkeypatch.setattr(bitpit._FileStore, 'open', open_after_another)
    d = fetch(server.add('/f', SMALL), target)
    assert d.state == 'complete' and target.read_bytes() == SMALL


def _open_here(path):
    """Whether this process holds a descriptor of the file at ``path``."""
    found = []
    for fd in os.listdir('/proc/self/fd'):
        try:
            found.append(os.readlink('/proc/self/fd/' + fd))
        except OSError:
            pass  # (the listing's own, closed since)
    return str(path) in found


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='needs /proc')
def test_the_file_is_closed_whether_it_is_complete_or_not(server, tmp_path):
    """A complete file is closed by its finish (the attempt's close then
    has nothing to do), a partial one by that close: no descriptor is
    left on either."""
    d = fetch(server.add('/f', SMALL), tmp_path / 'f')
    assert d.state == 'complete' and not _open_here(tmp_path / 'f')
    d = fetch(server.add('/g', DATA, truncate_at=1000), tmp_path / 'g', restart_wait=-1)
    assert d.state != 'complete' and d.downloaded == 1000 and not _open_here(tmp_path / 'g')


@pytest.mark.parametrize('before', ['missing', 'empty'])
def test_a_sidecar_left_beside_no_bytes_still_goes_when_it_completes(server, tmp_path, before):
    """A small file's sidecar is never written, but one an earlier run left
    (beside a file since removed or emptied) is removed all the same: left
    beside the complete file, it would make it look partial, with its
    ranges, to the next start. So the unlink of a sidecar that is seldom
    there stays."""
    target = tmp_path / 'f.bin'
    if before == 'empty':
        target.write_bytes(b'')
    sidecar = tmp_path / 'f.bin.bitpit'
    sidecar.write_text('{"version": 2, "url": "x", "size": -1, "held": [], "validators": {}}')
    d = fetch(server.add('/f', SMALL), target)
    assert d.state == 'complete' and target.read_bytes() == SMALL
    assert not sidecar.exists()


def test_a_file_fetched_before_is_not_looked_at_again_when_a_run_finds_it_whole(
        server, tmp_path, monkeypatch):
    """A run again over files it fetched before (``if_exists='resume'``)
    finds each whole (a 416): the load's look at the file and for its
    sidecar is all. A sidecar that the load saw was not there is not
    removed, and a file that the answer gives no date nor ETag for is
    not looked at again to be stamped."""
    url = server.add('/f', SMALL, last_modified='Mon, 07 Dec 2026 07:00:00 GMT')
    target = tmp_path / 'f'
    assert fetch(url, target).state == 'complete'
    calls = Calls(monkeypatch, tmp_path)
    d = fetch(url, target)
    assert d.state == 'complete' and d.downloaded == len(SMALL)
    again = calls.take()
    # the file (whether it is there, its size); its sidecar's look
    assert again.get('access') == again.get('stat') == again.get('open') == 1
    assert 'unlink' not in again and 'utime' not in again
    assert server.requests[-1].headers['Range'] == 'bytes={}-'.format(len(SMALL))
    assert target.read_bytes() == SMALL and target.stat().st_mtime == 1796626800


def test_a_download_is_one_task_for_the_workers_however_many_its_connections(
        server, tmp_path, monkeypatch):
    """A download's connections, and its run, are steps on the loop's one
    thread, however many connections there are: the workers make its
    signals' calls only."""
    names = []
    run = bitpit._WORKERS.run

    def counted(target, name):
        names.append(name)
        return run(target, name)
    monkeypatch.setattr(bitpit._WORKERS, 'run', counted)
    assert fetch(server.add('/small', SMALL), tmp_path / 'small').state == 'complete'
    assert names and set(names) == {'bitpit-download'}
    del names[:]
    big = DATA * 3  # a part of a split file is 1 MiB at least
    url = server.add('/big', big, throttle=8 * 1024 * 1024)
    d = fetch(url, tmp_path / 'big', connections=3)
    assert d.state == 'complete' and (tmp_path / 'big').read_bytes() == big
    assert names and set(names) == {'bitpit-download'}
    assert len({r.conn for r in server.requests_for('/big')}) >= 3  # (a race may add one)


def test_the_connection_pool_looks_at_a_parked_connection(server, tmp_path, monkeypatch):
    """A connection is polled before it is handed out, however short a
    time ago it was parked: the server may have closed it, or sent bytes
    that no request asked for."""
    urls = [server.add('/f{}'.format(i), SMALL) for i in range(2)]
    assert fetch(urls[0], tmp_path / 'f0').state == 'complete'
    looks = []
    quiet = bitpit._quiet

    def counted(conn):
        looks.append(quiet(conn))
        return looks[-1]
    monkeypatch.setattr(bitpit, '_quiet', counted)
    assert fetch(urls[1], tmp_path / 'f1').state == 'complete'
    assert looks == [True] and server.connections == 1


def test_the_connection_pool_keeps_no_key_with_no_connection(server, tmp_path):
    """A key (a server as seen by one Manager's host slots, say) whose last
    idle connection was taken, evicted or expired goes with it: a process
    that makes many managers does not grow the pool for ever."""
    before = len(bitpit._POOL._idle)
    managers = [bitpit.Manager(max_per_host=2) for _ in range(3)]
    for i, manager in enumerate(managers):
        d = manager.add(bitpit.Downloader(server.add('/m{}'.format(i), SMALL),
                                          tmp_path / 'm{}'.format(i)))
        manager.start()
        assert d.wait(30)
        manager.stop()
    assert len(bitpit._POOL._idle) == before + 3  # one parked connection each
    bitpit._POOL.evict(lambda key: key[5] is managers[0]._host_slots)
    key = next(key for key in bitpit._POOL._idle if key[5] is managers[1]._host_slots)
    bitpit._close_connection(bitpit._POOL.get(key))
    assert len(bitpit._POOL._idle) == before + 1



class Parked:
    """A connection as the pool keeps it: closed, and when (monotonic)."""
    release_slot = None
    closed_at = None

    def close(self):
        self.closed_at = time.monotonic()


def test_the_connection_pool_closes_connections_idle_too_long_at_the_next_put():
    """A put closes the idle connections of every key parked
    ``MAX_IDLE_SECONDS`` ago or more (the pool looks for them only once
    the oldest is due, not at every put), and none parked since: puts
    that come more often than that do not put the sweep off."""
    pool = bitpit._ConnectionPool()
    pool.MAX_IDLE_SECONDS = 0.1
    parked = []  # (connection, monotonic before its put, after it)
    deadline = time.monotonic() + 10
    while True:
        conn, before = Parked(), time.monotonic()
        pool.put(('http', 'h', len(parked), None, 0, None), conn)
        parked.append((conn, before, time.monotonic()))
        if before - parked[0][2] > pool.MAX_IDLE_SECONDS or time.monotonic() > deadline:
            break
        time.sleep(pool.MAX_IDLE_SECONDS / 4)  # (puts more often than the expiry)
    last_put_ended = parked[-1][2]
    first = parked[0][0]
    assert first.closed_at is not None  # the last put came after it was due
    for conn, before, after in parked:
        if last_put_ended - before < pool.MAX_IDLE_SECONDS:  # not due at any put yet
            assert conn.closed_at is None
    left = {key[2] for key in pool._idle}
    assert left == {i for i, (conn, _, _) in enumerate(parked) if conn.closed_at is None}
    pool.clear()


def test_an_attempt_is_freed_when_it_ends_not_by_the_collector(server, tmp_path, monkeypatch):
    """A small file's attempt (its transfer, its pump, its planner) is
    freed as the download lets go of it: the collector of cycles, which
    costs CPU in proportion to what it finds, has nothing of it to find."""
    attempts = []
    start = bitpit._Transfer.start

    def recording_start(transfer):
        attempts.append(weakref.ref(transfer))
        start(transfer)
    monkeypatch.setattr(bitpit._Transfer, 'start', recording_start)
    gc.collect()
    gc.disable()
    try:
        d = fetch(server.add('/f', SMALL), tmp_path / 'f')
        assert d.state == 'complete' and len(attempts) == 1
        d.join(10)
        assert attempts[0]() is None
    finally:
        gc.enable()


def test_a_small_file_draws_no_token_makes_one_condition_and_is_not_looked_at(
        server, tmp_path, monkeypatch):
    """With no rate limit, a small file's reads draw no token from a bucket;
    its transfer makes no condition (it has no lock; its run waits for the
    transfer's news on the loop, as its connection does); and its transfer is not looked at
    (min_speed, more connections, a sidecar to save), which comes a period
    after the start. Under a rate limit, each read draws its tokens."""
    made, drawn, looked = [], [], []
    condition_init = threading.Condition.__init__
    acquire = bitpit._TokenBucket.acquire_steps
    check_min_speed = bitpit._Transfer._check_min_speed

    def counted_condition(condition, *args, **kwargs):
        if threading.current_thread().name.startswith('bitpit-'):
            made.append(condition)
        condition_init(condition, *args, **kwargs)

    def counted_acquire(bucket, *args, **kwargs):
        drawn.append(bucket)
        return acquire(bucket, *args, **kwargs)

    def counted_check_min_speed(transfer, now):  # (the look's first work)
        looked.append(transfer)
        check_min_speed(transfer, now)
    monkeypatch.setattr(threading.Condition, '__init__', counted_condition)
    monkeypatch.setattr(bitpit._TokenBucket, 'acquire_steps', counted_acquire)
    monkeypatch.setattr(bitpit._Transfer, '_check_min_speed', counted_check_min_speed)
    d = fetch(server.add('/f', SMALL), tmp_path / 'f')
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == SMALL
    # (an Event makes one too: the loop's thread's, when it starts)
    made = [c for c in made if not isinstance(c._lock, type(threading.Lock()))]
    assert (len(made), drawn, looked) == (0, [], [])
    d = fetch(server.add('/g', SMALL), tmp_path / 'g', rate_limit=10 ** 9)
    assert d.state == 'complete' and (tmp_path / 'g').read_bytes() == SMALL
    assert drawn


def test_a_file_taken_as_it_is_is_looked_at_once(server, tmp_path, monkeypatch):
    """``if_exists='skip'`` of a complete file: its attempt stats it once and
    looks for its sidecar once; what that load found tells the rest."""
    target = tmp_path / 'f.bin'
    target.write_bytes(SMALL)
    calls = Calls(monkeypatch, tmp_path)
    d = fetch(server.add('/f', SMALL), target, if_exists='skip')
    assert d.state == 'complete' and d.downloaded == d.size == len(SMALL)
    assert not server.requests
    assert calls.take() == {'access': 1, 'stat': 1, 'open': 1}


def test_a_request_goes_out_in_one_write_and_its_small_answer_in_one_receive(
        server, tmp_path, monkeypatch):
    """On a reused connection a request is one write, not the socket's
    ``sendall``; and a 10 KiB body that came with its head (a receive of
    64 KiB, where http.client's reader takes 8 KiB) is handed out in one
    read, with no receive but the head's."""
    urls = [server.add('/f{}'.format(i), SMALL) for i in range(2)]
    assert fetch(urls[0], tmp_path / 'f0').state == 'complete'
    calls = Calls(monkeypatch, tmp_path)
    for owner, name in [(socket.socket, 'sendall'), (os, 'write')]:
        monkeypatch.setattr(owner, name, calls._wrap(name, getattr(owner, name)))
    assert fetch(urls[1], tmp_path / 'f1').state == 'complete'
    taken = calls.take()
    assert taken.get('write') == 1 and 'sendall' not in taken
    assert (tmp_path / 'f1').read_bytes() == SMALL and server.connections == 1

    ours, theirs = socket.socketpair()
    receives = []
    for name in ('recv', 'recv_into'):
        receive = getattr(socket.socket, name)
        monkeypatch.setattr(socket.socket, name, lambda self, size, receive=receive:
                            receives.append(size) or receive(self, size))
    with ours, theirs:
        theirs.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 10240\r\n\r\n' + SMALL)
        response = bitpit._Response(ours, method='GET')
        response.begin()
        view = memoryview(bytearray(len(SMALL)))
        assert bitpit._drive_here(response.readinto_steps(view)) == len(SMALL) and view == SMALL
        response.close()
    assert len(receives) == 1


def test_a_url_is_split_once_when_it_is_set(server, tmp_path, monkeypatch):
    """A download splits its URL when it is given or set again, and takes
    its file's name, its request's target and the host it connects to from
    that: not by splitting it again when the download is made or when it
    starts (long after, among thousands queued, urllib's cache of splits
    has dropped it). (By urlsplit, or, for a URL of an origin seen
    before, by bitpit's own split.)"""
    urls = [server.add('/d/a%20b.bin', SMALL), server.add('/d/%C3%BC.bin', SMALL)]
    splits = []
    urlsplit, known_address = urllib.parse.urlsplit, bitpit._known_address
    monkeypatch.setattr(urllib.parse, 'urlsplit', lambda url, *args, **kwargs: (
        splits.append(url) if url in urls else None) or urlsplit(url, *args, **kwargs))

    def counted_known_address(url):
        address = known_address(url)
        if address is not None and url in urls:
            splits.append(url)
        return address
    monkeypatch.setattr(bitpit, '_known_address', counted_known_address)
    d = bitpit.Downloader(urls[0], tmp_path, dir_path=True)
    assert splits == urls[:1] and d.path == tmp_path / 'a b.bin'
    d.url = urls[1]  # its name and its requests follow
    assert splits == urls and d.path == tmp_path / 'ü.bin'
    run_until(d, Recorder(d), 'complete')
    assert splits == urls and (tmp_path / 'ü.bin').read_bytes() == SMALL
    assert [r.path for r in server.requests] == ['/d/%C3%BC.bin']


LAZY_MODULES = ('ssl', 'http.client', 'datetime', 'email')
IMPORTS_OF_A_DOWNLOAD = '''
import sys, bitpit
imported = [name for name in LAZY if name in sys.modules]
manager = bitpit.Manager(max_running=2, dir_path=True)
downloads = [manager.add(URL + str(n)) for n in range(3)]
manager.start()
assert all(d.wait(20) for d in downloads), [(d.state, d.last_exception) for d in downloads]
manager.stop_all()
print(imported, [name for name in LAZY if name in sys.modules])
'''


def test_plain_http_downloads_import_no_tls_nor_http_client(server, tmp_path):
    """``import bitpit`` costs little more than the modules it needs
    (socket, select...): ssl, http.client, datetime and email (two
    thirds of the import before) are imported where they are used, and
    small files over plain HTTP, dated by Last-Modified, use none."""
    for n in range(3):
        server.add('/f{}'.format(n), SMALL, last_modified='Wed, 29 Feb 2012 07:28:00 GMT')
    source = IMPORTS_OF_A_DOWNLOAD.replace('LAZY', repr(LAZY_MODULES))
    result = run_program(source, server.url('/f'), tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split('\n')[0] == '[] []'
    assert (tmp_path / 'f2').read_bytes() == SMALL
    assert (tmp_path / 'f2').stat().st_mtime == 1330500480
