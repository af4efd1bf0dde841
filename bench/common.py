"""Shared pieces of bitpit's benchmarks.

The scripts beside this file (``throughput.py``, ``many_small.py``,
``total_limit.py``, ``segmented.py``) only describe *what* they compare;
everything they have in common lives here:

    sizes        parse_size, fmt_size, KiB / MiB / GiB
    files        workspace (a temp dir removed at the end), make_file,
                 landed (the data extents of a file), file_sha256, remove
    tools        find_tool: locate curl / wget / aria2c / nginx, installing
                 them with apt-get when missing and allowed
    servers      PythonFileServer (http.server + socket.sendfile, Range,
                 keep-alive, optional per-path throttling and a byte log,
                 bytes_between), PacingFileServer (the same, every
                 connection paced strictly on its own), NginxServer (a
                 generated nginx.conf, one foreground process, optional
                 limit_rate), serve_files() which picks one
    contenders   Contender, Skipped, gather, bitpit_available,
                 DOWNLOADER_CODE, python_command, python_env, load_bitpit (the --bitpit under
                 test, copied and compiled once in the temp dir)
    running      run_measured (wall time and peak RSS of one child process),
                 PeriodicSampler (watch a run), run_interleaved (A B C,
                 B C A, ...), Outcome (medians)
    reporting    Goal, derive, median_of, ratio, report_contenders,
                 write_json, base_parser, run_main

Everything binds 127.0.0.1 only, every wait is bounded, and every temp dir
and server process is removed when a script ends (also on Ctrl-C / SIGTERM).
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import contextlib
import dataclasses
import email.utils
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import (Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence,
                    Set, Tuple, Union)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class BenchError(Exception):
    """A benchmark step failed (a contender's run, a server start, ...)."""


def note(message: str) -> None:
    """Print a progress or diagnostic line on stderr."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------

_UNITS = {'': 1, 'b': 1, 'k': KiB, 'kb': KiB, 'kib': KiB, 'm': MiB, 'mb': MiB,
          'mib': MiB, 'g': GiB, 'gb': GiB, 'gib': GiB}


def parse_size(text: str) -> int:
    """``'256M'`` -> 268435456. Suffixes k/m/g (binary: KiB, MiB, GiB),
    optionally followed by ``b`` or ``ib``; a bare number is bytes."""
    match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*', text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError('not a size: {!r} (e.g. 1G, 256M, 10k)'.format(text))
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def fmt_size(n: float) -> str:
    """``268435456`` -> ``'256.0 MiB'``."""
    for unit in ('B', 'KiB', 'MiB'):
        if abs(n) < 1024:
            return '{:.1f} {}'.format(n, unit) if unit != 'B' else '{} B'.format(int(n))
        n /= 1024
    return '{:.2f} GiB'.format(n)


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def workspace(parent: Optional[str] = None) -> Iterator[Path]:
    """A fresh temp dir (under ``parent`` or the system default) that is
    removed with everything in it when the block ends, however it ends."""
    path = Path(tempfile.mkdtemp(prefix='bitpit-bench-', dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_file(path: Path, size: int, *, sparse: bool = False, unique: bool = False) -> Path:
    """Create ``path`` holding ``size`` bytes of incompressible data (a random
    4 MiB block repeated), or a sparse file of zeros when ``sparse``.

    With ``unique``, every 4 KiB of the file starts with its own offset (8
    bytes, little-endian), so that no two 4 KiB pieces are alike: a byte
    range written at a wrong offset then always changes the file, even when
    the offset is wrong by a multiple of the repeated block."""
    with open(path, 'wb') as file:
        if sparse:
            file.truncate(size)
            return path
        block = os.urandom(min(size, 4 * MiB))
        written = 0
        while written < size:
            data = block[:size - written]
            if unique:
                data = bytearray(data)
                for at in range(0, len(data) - 7, 4 * KiB):
                    struct.pack_into('<Q', data, at, written + at)
            written += file.write(data)
    return path


def landed(path: Path) -> int:
    """The bytes of ``path``'s data extents (``SEEK_DATA`` / ``SEEK_HOLE``;
    the file system counts a written block, so inside a reserved file a
    partly written 4 KiB page counts whole); 0 while it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        total = position = 0
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after position
                break
            position = os.lseek(fd, start, os.SEEK_HOLE)
            total += position - start
        return total
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, in hex."""
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(4 * MiB), b''):
            digest.update(chunk)
    return digest.hexdigest()


def remove(path: Path) -> None:
    """Delete a file or a whole directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_and_sync(path: Path, warm: int = 0) -> None:
    """Delete ``path``, then flush the page cache's dirty pages to disk, so
    that no run pays for the write-back of an earlier run's gigabyte: on this
    kind of machine that alone moved a run's time by a factor of two. With
    ``warm``, then ``warm_page_cache(path.parent, warm)``."""
    remove(path)
    os.sync()
    if warm:
        warm_page_cache(path.parent, warm)


def warm_page_cache(directory: Path, size: int) -> None:
    """Write ``size`` bytes to a file in ``directory`` and delete it, so
    that the next process to fill that much page cache gets memory that was
    freed a moment ago.

    In a VM with free page reporting (virtio-balloon; this machine boots
    with ``page_reporting.page_reporting_order=11``), memory that stays free
    for about 2 s goes back to the host, and taking it back costs the guest
    dearly: ``dd`` wrote 1 GiB into the page cache in 0.37 s right after an
    earlier 1 GiB file was deleted, and in 2.1 to 2.8 s (all of it system
    time) when 3 s had passed. Which one a run got depended on how long the
    runs before it took. Writing and deleting a file first, outside the
    timing, gives every run the fast case. (Touching anonymous memory
    instead did not help.)"""
    block = bytes(MiB)
    fd, name = tempfile.mkstemp(prefix='warm-', dir=str(directory))
    try:
        with open(fd, 'wb', buffering=0) as file:
            for _ in range(-(-size // MiB)):
                file.write(block)
    finally:
        remove(Path(name))


def warm_size(size: int) -> int:
    """How much ``warm_page_cache`` writes before a run that writes
    ``size`` bytes: a little more than that."""
    return size + size // 8 + 64 * MiB


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0,
                  alive: Callable[[], bool] = lambda: True) -> bool:
    """Wait until something accepts connections on 127.0.0.1:``port``
    (``False`` after ``timeout`` s, or as soon as ``alive()`` is false)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------

_SBIN = '/usr/local/sbin:/usr/sbin:/sbin'
_apt_state = {'updated': False, 'tried': set()}


def _apt_get(*args: str, timeout: float = 600) -> bool:
    """Run ``apt-get -qq ARGS`` quietly; report the tail of its output on
    failure. Returns whether it succeeded."""
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    try:
        done = subprocess.run(['apt-get', '-qq', *args], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        note('  apt-get {}: {}'.format(' '.join(args), exc))
        return False
    if done.returncode != 0:
        tail = done.stdout.decode(errors='replace').strip().splitlines()[-3:]
        note('  apt-get {} failed: {}'.format(' '.join(args), ' / '.join(tail)))
    return done.returncode == 0


def find_tool(name: str, package: Optional[str] = None, install: bool = True) -> Optional[str]:
    """The path of the program ``name``, or ``None``.

    When it is missing, ``install`` is true, we are root and ``apt-get``
    exists, the Debian ``package`` (default: ``name``) is installed quietly
    first (with one ``apt-get update`` if the first try fails). Each package
    is tried at most once per process."""
    def which() -> Optional[str]:
        return shutil.which(name) or shutil.which(name, path=_SBIN)

    found = which()
    package = package or name
    if found or not install or package in _apt_state['tried']:
        return found
    _apt_state['tried'].add(package)
    if not hasattr(os, 'geteuid') or os.geteuid() != 0 or not shutil.which('apt-get'):
        return None
    note('{} not found: installing the {} package with apt-get ...'.format(name, package))
    if not _apt_get('install', '-y', '--no-install-recommends', package):
        if not _apt_state['updated']:
            _apt_state['updated'] = True
            _apt_get('update')
        _apt_get('install', '-y', '--no-install-recommends', package)
    found = which()
    note('  {}'.format('installed ' + found if found else name + ' is still unavailable'))
    return found


def command_output(*argv: str) -> str:
    """What a short command prints (stdout and stderr), ``''`` if it fails."""
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ''
    return done.stdout.decode(errors='replace')


def tool_version(path: str, option: str = '--version') -> str:
    """The first line a program prints for ``option``."""
    lines = command_output(path, option).strip().splitlines()
    return lines[0] if lines else '?'


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------

class _FileHandler(http.server.BaseHTTPRequestHandler):
    """GET and HEAD of the files in the server's docroot over HTTP/1.1 with
    keep-alive, ``Range: bytes=N-`` / ``bytes=N-M``, ``ETag`` / ``If-Range``,
    and bodies sent with ``socket.sendfile``. Paths listed in the server's
    ``rates`` are paced to that many bytes per second."""
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True
    server: 'PythonFileServer'

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base class
        pass

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _answer(self, status: int, headers: Dict[str, Any]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.end_headers()

    def _serve(self, send_body: bool) -> None:
        url_path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        file_path = (self.server.docroot / url_path.lstrip('/')).resolve()
        if self.server.docroot not in file_path.parents or not file_path.is_file():
            self._answer(404, {'Content-Length': 0})
            return
        stat = file_path.stat()
        size = stat.st_size
        etag = '"{:x}-{:x}"'.format(size, stat.st_mtime_ns)
        headers: Dict[str, Any] = {
            'Content-Type': 'application/octet-stream', 'Accept-Ranges': 'bytes', 'ETag': etag,
            'Last-Modified': email.utils.formatdate(stat.st_mtime, usegmt=True)}
        start, end, status = 0, size, 200
        match = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range', '').strip())
        if match and self.headers.get('If-Range', etag) == etag:
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
            if start >= size or start >= end:
                self._answer(416, dict(headers, **{'Content-Range': 'bytes */{}'.format(size),
                                                   'Content-Length': 0}))
                return
            status = 206
            headers['Content-Range'] = 'bytes {}-{}/{}'.format(start, end - 1, size)
        headers['Content-Length'] = end - start
        self._answer(status, headers)
        if send_body:
            with open(file_path, 'rb') as file:
                self._send_body(file, url_path, start, end - start)

    def _send_body(self, file: Any, url_path: str, offset: int, count: int) -> None:
        """``sendfile`` ``count`` bytes from ``offset`` in pieces, paced when
        ``url_path`` has a rate, logging each piece when the server logs."""
        rate = self.server.rates.get(url_path, 0)
        piece = (self.server.rate_piece or max(1, int(rate / 16))) if rate else self.server.piece
        began, sent = time.monotonic(), 0
        try:
            while sent < count:
                if rate:
                    delay = began + sent / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                done = self.connection.sendfile(file, offset + sent, min(piece, count - sent))
                if not done:
                    break
                sent += done
                self.server.record(url_path, done)
        except OSError:  # the client went away
            pass
        if sent < count:
            self.close_connection = True


class PythonFileServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP/1.1 file server on 127.0.0.1 (an ephemeral port), run
    in a background thread while used as a context manager.

    ``rates`` maps URL paths (``'/slow.bin'``) to bytes per second; ``piece``
    is the most bytes per ``sendfile`` call; a paced path is sent in pieces
    of ``rate_piece`` bytes (default a sixteenth of its rate), e.g. 64 KiB
    bursts or 1 KiB trickles at the same average rate; with ``log_bytes``
    every piece sent is logged as ``(monotonic time, url path, bytes)`` in
    ``sent_log``.
    """
    daemon_threads = True
    request_queue_size = 256
    kind = 'python'
    handler_class: type = _FileHandler

    def __init__(self, docroot: Path, rates: Optional[Dict[str, float]] = None,
                 piece: int = 8 * MiB, log_bytes: bool = False, rate_piece: int = 0):
        super().__init__(('127.0.0.1', 0), self.handler_class)
        self.docroot = Path(docroot).resolve()
        self.rates = dict(rates or {})
        self.piece = piece
        self.rate_piece = rate_piece
        self.log_bytes = log_bytes
        self.sent_log: List[Tuple[float, str, int]] = []
        self._thread: Optional[threading.Thread] = None

    @property
    def base_url(self) -> str:
        return 'http://127.0.0.1:{}/'.format(self.server_address[1])

    @property
    def description(self) -> str:
        return 'Python ThreadingHTTPServer (HTTP/1.1, socket.sendfile)'

    def url(self, name: str) -> str:
        """The URL of the file ``name`` in the docroot."""
        return self.base_url + urllib.parse.quote(name)

    def record(self, url_path: str, n: int) -> None:
        if self.log_bytes:
            self.sent_log.append((time.monotonic(), url_path, n))

    def __enter__(self) -> 'PythonFileServer':
        self._thread = threading.Thread(target=self.serve_forever, kwargs={'poll_interval': 0.1},
                                        name='bench-server', daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def bytes_between(log: Sequence[Tuple[float, str, int]], start: float, end: float,
                  path: Optional[str] = None) -> int:
    """Bytes logged by a ``PythonFileServer`` with ``start <= time < end``
    (only for ``path`` if given); ``log`` is in time order."""
    log = sorted(log)  # handler threads append concurrently
    times = [entry[0] for entry in log]
    lo, hi = bisect.bisect_left(times, start), bisect.bisect_left(times, end)
    return sum(n for _, p, n in log[lo:hi] if path is None or p == path)


class _PacedHandler(_FileHandler):
    """``_FileHandler`` with every *connection* paced on its own: at most
    ``server.rate_for(n)`` bytes per second, where ``n`` is the connection's
    number in the order the server accepted them since its last ``reset()``
    (1 = the first).

    The pace is a token bucket only ``1 / PacingFileServer.depth_per_s``
    (1/50 s) of the rate deep, which starts empty when the connection opens
    and persists across its keep-alive requests; time the connection spends
    idle or blocked adds no more credit than that depth. Bodies go out in
    pieces no larger than the depth (at most 16 KiB), each sent as soon as
    the bucket holds it. Unlike nginx's ``limit_rate``, no request starts
    with a second's worth of burst: N bytes take N / rate seconds."""
    server: 'PacingFileServer'

    def setup(self) -> None:
        super().setup()
        self.stats = self.server.opened(self.request)
        self.rate = self.stats['rate']
        self.depth = self.rate / self.server.depth_per_s  # in bytes
        self.piece = max(1, min(16 * KiB, int(self.depth)))
        self.empty_at = time.monotonic()  # the bucket is empty at this time

    def _send_body(self, file: Any, url_path: str, offset: int, count: int) -> None:
        self.stats['requests'] += 1
        sent = 0
        try:
            while sent < count:
                n = min(self.piece, count - sent)
                now = time.monotonic()
                self.empty_at = max(self.empty_at, now - self.depth / self.rate)
                ready = self.empty_at + n / self.rate  # when the bucket holds n bytes
                if ready > now:
                    time.sleep(ready - now)
                done = self.connection.sendfile(file, offset + sent, n)
                if not done:
                    break
                self.empty_at += done / self.rate
                sent += done
                self.stats['bytes'] += done
                self.server.record(url_path, done)
        except OSError:  # the client went away
            pass
        if sent < count:
            self.close_connection = True


class PacingFileServer(PythonFileServer):
    """``PythonFileServer`` that paces every connection strictly on its own
    (see ``_PacedHandler``), like a server with a per-connection cap.

    ``rate`` is bytes per second for every connection, or a function of
    the connection's number (1 = the first accepted since ``reset()``) that
    returns its rate, e.g. to make one connection slow. ``connections``
    maps each number to ``{'rate', 'requests', 'bytes'}`` (requests with
    a body, bytes of bodies sent); ``reset()`` forgets them, the byte log
    and the count, so that each run numbers its connections from 1."""
    depth_per_s = 50
    handler_class = _PacedHandler

    def __init__(self, docroot: Path, rate: Union[float, Callable[[int], float]],
                 log_bytes: bool = False):
        super().__init__(docroot, log_bytes=log_bytes)
        self.rate_for: Callable[[int], float] = rate if callable(rate) else lambda number: rate
        self.connections: Dict[int, Dict[str, Any]] = {}
        self._accepted: Dict[Any, int] = {}
        self._count = 0
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        return 'Python pacing server (HTTP/1.1, each connection paced on its own, no burst)'

    def get_request(self) -> Tuple[Any, Any]:
        """Accept a connection and number it, in accept order."""
        request, address = super().get_request()
        with self._lock:
            self._count += 1
            self._accepted[request] = self._count
        return request, address

    def opened(self, request: Any) -> Dict[str, Any]:
        """The stats entry of a connection that a handler starts to serve."""
        with self._lock:
            number = self._accepted.pop(request, 0)
            stats = {'rate': float(self.rate_for(number)), 'requests': 0, 'bytes': 0}
            self.connections[number] = stats
        return stats

    def reset(self) -> None:
        """Number the next connection 1 again; forget stats and byte log."""
        with self._lock:
            self._count = 0
            self._accepted.clear()
            self.connections = {}
            self.sent_log.clear()

    def traffic(self) -> Dict[str, int]:
        """Since the last ``reset()``: connections accepted, requests
        answered with a body, and body bytes sent."""
        with self._lock:
            stats = list(self.connections.values())
        return {'conns': len(stats), 'requests': sum(s['requests'] for s in stats),
                'bytes': sum(s['bytes'] for s in stats)}


class NginxServer:
    """nginx serving ``docroot`` on 127.0.0.1 with ``sendfile on``, from a
    generated nginx.conf in its own temp dir, as a foreground process (no
    daemon, no master process: one process, stopped when the block ends).

    With ``limit_rate`` (bytes per second), the server block gets
    ``limit_rate N;``: nginx paces each *request* on its own, and gives
    each one about a second's worth of credit at its start.
    ``location_rates`` (``{'/slow/': bytes per second}``) sets such a
    ``limit_rate`` in a ``location`` block of its own for the URLs under
    each prefix, the rest of the server unlimited. With
    ``log_requests``, nginx keeps an access log in its temp dir, which
    ``traffic()`` sums up and ``reset()`` empties. With ``tls`` (the paths
    of a certificate and its key, see ``make_certificate``), it serves
    HTTPS (``listen ... ssl``) and the access log also names each request's
    protocol and cipher (``tls_sessions()``). ``cpu_seconds()`` is the CPU
    time nginx used so far."""
    kind = 'nginx'
    _TEMP_PATHS = ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi')

    def __init__(self, docroot: Path, binary: str, limit_rate: Optional[int] = None,
                 log_requests: bool = False, tls: Optional[Tuple[Path, Path]] = None,
                 location_rates: Optional[Dict[str, int]] = None):
        self.docroot = Path(docroot).resolve()
        self.binary = binary
        self.limit_rate = limit_rate
        self.location_rates = dict(location_rates or {})
        self.log_requests = log_requests or tls is not None
        self.tls = tls
        self.version = tool_version(binary, '-v').rpartition('/')[2]
        self._build = command_output(binary, '-V')  # configure arguments
        self.port = 0
        self._prefix: Optional[Path] = None
        self._process: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        return '{}://127.0.0.1:{}/'.format('https' if self.tls else 'http', self.port)

    @property
    def description(self) -> str:
        if self.limit_rate:
            return 'nginx {} (sendfile on, limit_rate {}/s per request)'.format(
                self.version, fmt_size(self.limit_rate))
        if self.location_rates:
            return 'nginx {} (sendfile on, limit_rate per request {})'.format(
                self.version, ', '.join('{}/s under {}'.format(fmt_size(rate), prefix)
                                        for prefix, rate in self.location_rates.items()))
        return 'nginx {} ({}sendfile on)'.format(self.version, 'HTTPS, ' if self.tls else '')

    def url(self, name: str) -> str:
        """The URL of the file ``name`` in the docroot."""
        return self.base_url + urllib.parse.quote(name)

    def _config(self, prefix: Path) -> str:
        """A minimal nginx.conf that keeps every file nginx writes in ``prefix``."""
        temp_paths = '\n'.join(
            '        {0}_temp_path {1}/{0};'.format(name, prefix)
            for name in self._TEMP_PATHS
            if '--without-http_{}_module'.format(name) not in self._build)
        return '\n'.join([
            'daemon off;',
            'master_process off;',
            'worker_processes 1;',
            'pid {}/nginx.pid;'.format(prefix),
            'error_log {}/error.log warn;'.format(prefix),
            'events { worker_connections 4096; }',
            'http {',
            *(["    log_format bench '$connection $request_method $body_bytes_sent{}';".format(
                ' $ssl_protocol $ssl_cipher' if self.tls else ''),
                '    access_log {}/access.log bench;'.format(prefix)]
              if self.log_requests else ['    access_log off;']),
            '    sendfile on;',
            '    tcp_nopush on;',
            '    tcp_nodelay on;',
            '    keepalive_requests 100000;',
            '    types { }',
            '    default_type application/octet-stream;',
            temp_paths,
            '    server {',
            '        listen 127.0.0.1:{}{} backlog=4096;'.format(
                self.port, ' ssl' if self.tls else ''),
            *(['        ssl_certificate {};'.format(self.tls[0]),
               '        ssl_certificate_key {};'.format(self.tls[1]),
               # nginx before 1.23.4 leaves TLSv1.3 out by default
               '        ssl_protocols TLSv1.2 TLSv1.3;'] if self.tls else []),
            '        root {};'.format(self.docroot),
            *(['        limit_rate {};'.format(int(self.limit_rate))] if self.limit_rate else []),
            *('        location {} {{ limit_rate {}; }}'.format(prefix, int(rate))
              for prefix, rate in self.location_rates.items()),
            '    }',
            '}', ''])

    def _error_log_option(self) -> List[str]:
        """``-e FILE`` where nginx knows it (1.19.5+), so that it never opens
        the system's error log."""
        numbers = tuple(int(n) for n in re.findall(r'\d+', self.version)[:3])
        return ['-e', str(self._prefix / 'error.log')] if numbers >= (1, 19, 5) else []

    def __enter__(self) -> 'NginxServer':
        self._prefix = Path(tempfile.mkdtemp(prefix='bitpit-bench-nginx-'))
        try:
            for _ in range(5):  # another process may take the free port first
                self.port = free_port()
                conf = self._prefix / 'nginx.conf'
                conf.write_text(self._config(self._prefix))
                self._process = subprocess.Popen(
                    [self.binary, '-p', str(self._prefix), '-c', str(conf),
                     *self._error_log_option()],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL)
                if wait_for_port(self.port, 10, alive=lambda: self._process.poll() is None):
                    return self
                self._stop_process()
            log = (self._prefix / 'error.log')
            raise BenchError('nginx did not start: ' + (
                log.read_text(errors='replace')[-500:] if log.exists() else 'no error log'))
        except BaseException:
            self.__exit__()
            raise

    def reset(self) -> None:
        """Empty the access log (nginx appends to it)."""
        if self.log_requests and self._prefix is not None:
            (self._prefix / 'access.log').write_bytes(b'')

    def traffic(self) -> Dict[str, int]:
        """From the access log, since the last ``reset()``: connections
        used, GET requests, and body bytes sent. nginx writes a request's
        line when it has handed the last byte to the kernel."""
        lines = self._log_lines()
        gets = [fields for fields in lines if len(fields) >= 3 and fields[1] == 'GET']
        return {'conns': len({fields[0] for fields in lines}), 'requests': len(gets),
                'bytes': sum(int(fields[2]) for fields in gets)}

    def tls_sessions(self) -> List[str]:
        """From the access log, since the last ``reset()``: ``'PROTOCOL
        CIPHER'`` of each GET request (e.g. ``'TLSv1.3
        TLS_AES_256_GCM_SHA384'``), as OpenSSL names them."""
        return [' '.join(fields[3:5]) for fields in self._log_lines()
                if len(fields) >= 5 and fields[1] == 'GET']

    def _log_lines(self) -> List[List[str]]:
        log = self._prefix / 'access.log' if self._prefix is not None else None
        return [line.split() for line in log.read_text().splitlines()] \
            if self.log_requests and log and log.exists() else []

    def cpu_seconds(self) -> Optional[float]:
        """User + system CPU time of the nginx process so far (from
        ``/proc``, in clock ticks of 10 ms), or ``None``."""
        if self._process is None:
            return None
        try:
            fields = Path('/proc/{}/stat'.format(self._process.pid)).read_text() \
                .rpartition(')')[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')

    def _stop_process(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=5)
        self._process = None

    def __exit__(self, *exc_info: Any) -> None:
        self._stop_process()
        if self._prefix is not None:
            shutil.rmtree(self._prefix, ignore_errors=True)


def serve_files(docroot: Path, server: str = 'auto', install: bool = True,
                tls: Optional[Tuple[Path, Path]] = None, log_requests: bool = False
                ) -> Union[NginxServer, PythonFileServer]:
    """A context manager serving ``docroot``: nginx when ``server`` is
    ``'nginx'``, or ``'auto'`` and nginx is (or can be) installed; otherwise
    ``PythonFileServer``. The object has ``base_url``, ``url(name)``,
    ``kind`` and ``description``. With ``tls`` (certificate, key), nginx
    serves HTTPS; there is no Python fallback then. ``log_requests`` is
    passed to nginx (see ``NginxServer.traffic``)."""
    if server in ('auto', 'nginx') or tls:
        binary = find_tool('nginx', install=install)
        if binary:
            return NginxServer(docroot, binary, log_requests=log_requests, tls=tls)
        if server == 'nginx' or tls:
            raise BenchError('nginx is not installed')
        note('nginx unavailable: serving with the Python server instead')
    return PythonFileServer(docroot)


def make_certificate(directory: Path, install: bool = True) -> Tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (``subjectAltName
    IP:127.0.0.1``, an EC P-256 key, valid for 2 days) made with ``openssl
    req -x509`` in ``directory``: ``(cert.pem, key.pem)``. Clients trust it
    as their only CA (``ssl.create_default_context(cafile=cert)``, ``curl
    --cacert cert``)."""
    openssl = find_tool('openssl', install=install)
    if not openssl:
        raise BenchError('openssl is not installed: cannot make a certificate')
    cert, key = directory / 'cert.pem', directory / 'key.pem'
    try:
        done = subprocess.run(
            [openssl, 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
             '-nodes', '-keyout', str(key), '-out', str(cert), '-days', '2',
             '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=60)
    except subprocess.TimeoutExpired:
        raise BenchError('openssl req took over 60 s')
    if done.returncode != 0 or not cert.exists() or not key.exists():
        raise BenchError('openssl req failed: ' + done.stdout.decode(errors='replace')[-500:])
    return cert, key


# ---------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------

class Skipped(Exception):
    """A contender cannot run here (tool missing, bitpit not ready)."""


@dataclasses.dataclass
class RunResult:
    """What one child process did: wall time, peak RSS, exit code, output,
    and ``info``, the JSON object on the last line of its stdout if any.
    ``user_s`` and ``sys_s`` are its CPU time in user and kernel mode (from
    ``wait4``), ``cpu_seconds`` their sum; ``voluntary_switches`` counts
    the times one of its threads gave up the CPU to wait (a lock, a
    condition, I/O), ``involuntary_switches`` the times it was preempted."""
    seconds: float
    returncode: int
    max_rss_kib: int
    stdout: str
    stderr: str
    timed_out: bool
    info: Dict[str, Any]
    user_s: float = float('nan')
    sys_s: float = float('nan')
    voluntary_switches: int = 0
    involuntary_switches: int = 0

    @property
    def cpu_seconds(self) -> float:
        return self.user_s + self.sys_s

    def failure(self) -> str:
        """A one-paragraph account of a failed run."""
        how = 'timed out' if self.timed_out else 'exited with {}'.format(self.returncode)
        tail = (self.stderr.strip() or self.stdout.strip())[-1500:]
        return how + (':\n    ' + tail.replace('\n', '\n    ') if tail else '')


@dataclasses.dataclass
class Contender:
    """One tool under test.

    ``command`` is the child's argv; ``reset`` runs before and after each
    run (delete the outputs); ``check(result)`` raises ``BenchError`` when a
    run did not do the job and returns extra metrics for it. The default
    ``check`` requires exit status 0 and returns the child's ``info``.
    ``monitor``, if given, makes a context manager that is active while the
    child runs (e.g. a thread sampling its output files)."""
    name: str
    command: Sequence[str]
    timeout: float
    reset: Callable[[], None] = lambda: None
    check: Optional[Callable[[RunResult], Dict[str, Any]]] = None
    monitor: Optional[Callable[[], ContextManager[Any]]] = None
    env: Optional[Dict[str, str]] = None
    cwd: Optional[Path] = None


#: A bitpit contender: ``Downloader(url, path=out, **options)`` as a user
#: would write it, in a child: argv is url, out, timeout (s), options as
#: JSON (``connections``, ``mirrors``, ``rate_limit`` ...). It prints the
#: time of ``import bitpit`` and of the transfer as JSON.
DOWNLOADER_CODE = '''
import json, sys, time
began = time.perf_counter()
import bitpit
imported = time.perf_counter()
url, out, timeout, options = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
d = bitpit.Downloader(url, path=out, **options)
d.start()
d.join(timeout)
if d.is_alive:
    d.stop()
    sys.exit('bitpit: still running after {} s ({} of {} bytes)'.format(timeout, d.downloaded, d.size))
assert d.state == 'complete', 'state {!r}, last_exception {!r}'.format(d.state, d.last_exception)
done = time.perf_counter()
print(json.dumps({'import_s': imported - began, 'transfer_s': done - imported}))
'''

#: the interpreter of the Python contenders, made by ``plain_python()``
_plain_python: List[str] = []


def plain_python() -> str:
    """The Python the contenders run with: this one as a user's program
    would start it. Where this interpreter is no virtual environment of
    its own, that is the same Python in a virtual environment made for the
    benchmark (no pip, no packages), since a base installation's
    site-packages may run code at every start: on the machine these
    figures come from, a ``.pth`` file the sandbox writes there imports
    certifi, and with it half of ``importlib.resources``, ``zipfile`` and
    ``tempfile``: 80 ms of CPU a start, ten times bitpit's own import,
    which every Python contender paid and aria2c did not. A venv skips the
    base's site-packages and runs its own site, as a project's venv does.
    Made once per benchmark process, removed at its exit."""
    if not _plain_python:
        if sys.prefix != sys.base_prefix:  # a venv already: as given
            _plain_python.append(sys.executable)
        else:
            home = Path(tempfile.mkdtemp(prefix='bitpit-bench-python-'))
            atexit.register(shutil.rmtree, str(home), True)
            subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(home)],
                           check=True, stdin=subprocess.DEVNULL, timeout=120)
            _plain_python.append(str(home / 'bin' / 'python'))
    return _plain_python[0]


def python_command(code: str, *args: Any) -> List[str]:
    """argv running ``code`` with this Python (``plain_python()``),
    ``sys.argv[1:] == args``."""
    return [plain_python(), '-c', code, *(str(a) for a in args)]


def python_env(pycache: Optional[Path] = None, lib: Optional[Path] = None) -> Dict[str, str]:
    """The environment of Python children: the repo root (or the dir
    ``lib``) first on ``sys.path``, so ``import bitpit`` finds the repo's
    ``bitpit.py`` (or the one in ``lib``). Children must not run with the
    repo root as their working dir if ``lib`` is to win.

    With ``pycache`` (a dir in the workspace), bytecode is cached there
    even if ``PYTHONDONTWRITEBYTECODE`` is set: after the warm-up round
    bitpit is imported as an installed module would be, without being
    compiled again on every run, and the repo gets no ``__pycache__``."""
    path = os.environ.get('PYTHONPATH')
    first = str(REPO_ROOT if lib is None else lib)
    env = dict(os.environ, PYTHONPATH=first + (os.pathsep + path if path else ''))
    if pycache is not None:
        env.pop('PYTHONDONTWRITEBYTECODE', None)
        env['PYTHONPYCACHEPREFIX'] = str(pycache)
    return env


def bitpit_available(*names: str, env: Optional[Dict[str, str]] = None,
                     cwd: Optional[Path] = None) -> str:
    """Check that the repo's bitpit (or the one ``env`` finds, imported in
    ``cwd``) imports and has ``names`` (e.g. ``'Downloader'``); return
    ``'bitpit VERSION at PATH'`` or raise ``Skipped`` saying why not."""
    code = ('import json, sys, bitpit\n'
            'print(json.dumps({"file": bitpit.__file__, "version": getattr(bitpit, "__version__", "?"),'
            ' "missing": [n for n in sys.argv[1:] if not callable(getattr(bitpit, n, None))]}))')
    try:
        done = subprocess.run(python_command(code, *names), env=env or python_env(),
                              cwd=str(cwd or REPO_ROOT),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
    except subprocess.TimeoutExpired:
        raise Skipped('importing bitpit took over 60 s')
    if done.returncode != 0:
        lines = done.stderr.decode(errors='replace').strip().splitlines()
        raise Skipped('bitpit does not import yet: ' + (lines[-1] if lines else 'no message'))
    found = json.loads(done.stdout.decode().strip().splitlines()[-1])
    if found['missing']:
        raise Skipped('bitpit has no {} yet ({})'.format(', '.join(found['missing']),
                                                          found['file']))
    return 'bitpit {} at {}'.format(found['version'], found['file'])


@dataclasses.dataclass
class BitpitUnderTest:
    """The ``bitpit.py`` a benchmark measures (``--bitpit``): a copy in the
    workspace, so that editing the original during a run changes nothing,
    compiled there once before the first run. Python children run with
    ``env`` and any working dir in the workspace (not the repo root) import
    the copy. ``skip`` says why it cannot be measured (then ``require()``
    raises ``Skipped``)."""
    source: Path
    env: Dict[str, str]
    description: str = 'bitpit unavailable'
    skip: Optional[str] = None

    def require(self) -> str:
        """The description, or ``Skipped`` with the reason."""
        if self.skip:
            raise Skipped(self.skip)
        return self.description

    def env_with(self, **variables: str) -> Dict[str, str]:
        """``env`` with more variables (e.g. ``BITPIT_NO_SPLICE='1'``)."""
        return dict(self.env, **variables)


def describe_source(path: Path, copy: Optional[Path] = None) -> str:
    """Which version of a file was measured: the SHA-256 (first 12 hex
    digits) of its ``copy`` (or of itself) and, in a git work tree, the
    branch, the commit and whether the file has uncommitted changes."""
    text = 'sha256 ' + file_sha256(copy or path)[:12]
    where = str(path.resolve().parent)
    commit = command_output('git', '-C', where, 'log', '-1', '--format=%h').strip()
    if commit and re.fullmatch(r'[0-9a-f]{4,40}', commit):
        branch = command_output('git', '-C', where, 'rev-parse', '--abbrev-ref', 'HEAD').strip()
        dirty = command_output('git', '-C', where, 'status', '--porcelain', '--', path.name)
        text += ', git {}@{}{}'.format(branch, commit,
                                       ' + uncommitted changes' if dirty.strip() else '')
    return text


def load_bitpit(source: Union[str, Path], tmp: Path, *names: str,
                lib_name: str = 'lib') -> BitpitUnderTest:
    """Copy ``source`` to ``tmp/lib/bitpit.py`` (``lib_name`` instead of
    ``lib``, e.g. for ``--baseline``) and import it once in a child
    (which also compiles it into ``tmp/pycache``), checking it has
    ``names``. Never raises for a bad bitpit: the result's ``skip`` says
    what is wrong, and the contenders that need it are skipped."""
    source = Path(source)
    lib = tmp / lib_name
    lib.mkdir(exist_ok=True)
    env = python_env(pycache=tmp / 'pycache', lib=lib)
    found = BitpitUnderTest(source, env)
    if not source.is_file():
        found.skip = 'no such file: {}'.format(source)
        return found
    shutil.copyfile(source, lib / 'bitpit.py')
    identity = describe_source(source, lib / 'bitpit.py')
    try:
        description = bitpit_available(*names, env=env, cwd=tmp)
    except Skipped as exc:
        found.skip = '{} ({}, {})'.format(exc, source.resolve(), identity)
        return found
    found.description = '{} (copied from {}, {})'.format(description.rpartition(' at ')[0],
                                                          source.resolve(), identity)
    return found


def load_baseline(args: Any, tmp: Path, *names: str) -> Optional[BitpitUnderTest]:
    """The bitpit.py of ``--baseline`` (see ``base_parser``), loaded as
    ``load_bitpit`` loads the one under test; ``None`` without one."""
    if not args.baseline:
        return None
    return load_bitpit(args.baseline, tmp, *names, lib_name='baseline')


def gather(factories: Sequence[Tuple[str, Callable[[], Contender]]]
           ) -> Tuple[List[Contender], Dict[str, str]]:
    """Build the contenders; one that raises ``Skipped`` is left out and its
    reason noted. Returns (contenders, {name: reason skipped})."""
    contenders, skipped = [], {}
    for name, factory in factories:
        try:
            contenders.append(factory())
        except Skipped as exc:
            skipped[name] = str(exc)
            note('skipping {}: {}'.format(name, exc))
    return contenders, skipped


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------

#: Runs one command, then writes its wall time, exit status, peak RSS and
#: CPU time (user and system) as JSON to the file named by argv[2]. Linux
#: counts the memory a process had before exec in its peak RSS, so children
#: are spawned from this small process rather than from the benchmark itself
#: (27+ MiB): the floor of the measurement is this launcher's own size
#: (about 9.5 MiB, see rss_floor_mib()). The rusage that wait4 returns
#: covers the child and every descendant it waited for, all threads
#: included.
_LAUNCHER = '''
import json, os, sys, time
argv, report, cpus = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
if cpus:
    os.sched_setaffinity(0, cpus)
began = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - began
with open(report, 'w') as file:
    json.dump({'seconds': seconds, 'returncode': os.waitstatus_to_exitcode(status),
               'max_rss_kib': usage.ru_maxrss, 'user_s': usage.ru_utime,
               'sys_s': usage.ru_stime, 'voluntary_switches': usage.ru_nvcsw,
               'involuntary_switches': usage.ru_nivcsw}, file)
'''


#: The CPUs the measured clients run on, apart from the server's (see
#: pin_cpus); empty: not pinned.
_CLIENT_CPUS: Set[int] = set()


def pin_cpus() -> str:
    """Keep this process (and so the servers it starts) on the first CPU and
    every measured client on the others; return what was done.

    On a 2-core machine a client that the kernel happens to place on the
    server's core runs up to twice as slow, and stays so for several runs in
    a row: unpinned, the same program measured 0.45 s or 1.1 s at random,
    which no median of a few runs can tell apart from a real difference."""
    global _CLIENT_CPUS
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
    if len(cpus) < 2:
        return 'not pinned to CPUs (fewer than 2 available)'
    os.sched_setaffinity(0, {cpus[0]})
    _CLIENT_CPUS = set(cpus[1:])
    return 'server on CPU {}, measured clients on CPU {}'.format(
        cpus[0], ','.join(map(str, cpus[1:])))


def run_measured(command: Sequence[str], timeout: float, env: Optional[Dict[str, str]] = None,
                 cwd: Optional[Path] = None) -> RunResult:
    """Run one child to its end; measure its wall time, peak RSS and CPU
    time (user + system).

    The child is started by a small launcher (``_LAUNCHER``) in a session of
    its own, which times it from spawn to exit and reads its rusage with
    ``wait4``. After ``timeout`` seconds (or on Ctrl-C) the whole session is
    killed. Output goes to temp files, so a chatty child never blocks."""
    with tempfile.TemporaryDirectory(prefix='bitpit-bench-run-') as tmp:
        report = Path(tmp) / 'report.json'
        with open(Path(tmp) / 'stdout', 'w+b') as out, open(Path(tmp) / 'stderr', 'w+b') as err:
            launcher = subprocess.Popen(
                [sys.executable, '-S', '-I', '-c', _LAUNCHER, json.dumps(list(command)),
                 str(report), json.dumps(sorted(_CLIENT_CPUS))], stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                cwd=None if cwd is None else str(cwd), start_new_session=True)
            timed_out = False
            try:
                launcher.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:  # on a time-out or Ctrl-C, nothing of the run survives
                if launcher.returncode is None:
                    os.killpg(launcher.pid, signal.SIGKILL)
                    launcher.wait()
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors='replace')
            stderr = err.read().decode(errors='replace')
        measured = json.loads(report.read_text()) if report.exists() else {}
    info: Dict[str, Any] = {}
    lines = stdout.strip().splitlines()
    if lines:
        with contextlib.suppress(ValueError):
            parsed = json.loads(lines[-1])
            info = parsed if isinstance(parsed, dict) else {}
    return RunResult(seconds=measured.get('seconds', float('nan')),
                     returncode=measured.get('returncode', launcher.returncode or -1),
                     max_rss_kib=measured.get('max_rss_kib', 0), stdout=stdout, stderr=stderr,
                     timed_out=timed_out, info=info, user_s=measured.get('user_s', float('nan')),
                     sys_s=measured.get('sys_s', float('nan')),
                     voluntary_switches=measured.get('voluntary_switches', 0),
                     involuntary_switches=measured.get('involuntary_switches', 0))


def measured_children() -> List[int]:
    """The pids of the children that ``run_measured``'s launchers started
    and that still run, found through ``/proc`` (Linux; ``[]`` elsewhere).
    A thread can watch a run with it, e.g. with ``written_bytes``."""
    def children(pid: int) -> List[int]:
        found = []
        with contextlib.suppress(OSError):
            for task in os.listdir('/proc/{}/task'.format(pid)):
                with contextlib.suppress(OSError, ValueError):
                    with open('/proc/{}/task/{}/children'.format(pid, task)) as file:
                        found += [int(n) for n in file.read().split()]
        return found

    pids = []
    for launcher in children(os.getpid()):
        with contextlib.suppress(OSError):
            with open('/proc/{}/cmdline'.format(launcher), 'rb') as file:
                if b'posix_spawnp' not in file.read():
                    continue  # a server, not a launcher
            pids += children(launcher)
    return pids


def written_bytes(pid: int) -> Optional[int]:
    """The bytes that process ``pid`` (all its threads) has dirtied in the
    page cache so far: ``write_bytes`` of ``/proc/PID/io``, or ``None``.
    Unlike the size of its files this grows with every byte written, also
    into a file reserved at its full size in advance, and unlike ``wchar``
    it counts ``splice`` into a file too."""
    try:
        with open('/proc/{}/io'.format(pid)) as file:
            for line in file:
                key, _, value = line.partition(':')
                if key == 'write_bytes':
                    return int(value)
    except (OSError, ValueError):
        pass
    return None


@functools.lru_cache(maxsize=None)
def rss_floor_mib() -> float:
    """The peak RSS that ``run_measured`` reports for a program that uses
    (almost) nothing: values at this floor mean "at most this much"."""
    return run_measured(['true'], timeout=30).max_rss_kib / KiB


class PeriodicSampler:
    """While active (a context manager, e.g. a ``Contender``'s ``monitor``),
    a thread records ``(monotonic time, self.sample())`` in ``samples``
    every ``period`` s. Subclasses define ``sample()``, and ``started()``
    to forget what they learnt in an earlier run."""

    def __init__(self, period: float):
        self.period = period
        self.samples: List[Tuple[float, Any]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def sample(self) -> Any:
        raise NotImplementedError

    def started(self) -> None:
        """Called as a run starts, before the first sample."""

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            self.samples.append((now, self.sample()))
            self._stop.wait(self.period)

    def __enter__(self) -> 'PeriodicSampler':
        self.samples = []
        self.started()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name='sampler', daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclasses.dataclass
class Outcome:
    """The runs of one contender: one metrics dict per timed run, or the
    error that took it out of the race."""
    name: str
    runs: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    error: Optional[str] = None

    def median(self, key: str) -> Optional[float]:
        values = [run[key] for run in self.runs if run.get(key) is not None]
        return statistics.median(values) if values else None

    def to_json(self) -> Dict[str, Any]:
        keys = sorted({k for run in self.runs for k, v in run.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return {'runs': self.runs, 'median': {k: self.median(k) for k in keys},
                'error': self.error}


def run_interleaved(contenders: Sequence[Contender], runs: int, warmup: int = 1
                    ) -> Dict[str, Outcome]:
    """Run every contender ``warmup + runs`` times, interleaved and rotated
    (A B C, B C A, C A B, ...) so that no contender always follows the same
    one, each run in a fresh process; warm-up runs are not kept. A
    contender whose run fails is reported and dropped from later rounds."""
    outcomes = {c.name: Outcome(c.name) for c in contenders}
    for round_no in range(warmup + runs):
        label = 'warm-up' if round_no < warmup else 'run {}/{}'.format(round_no - warmup + 1, runs)
        shift = round_no % len(contenders)
        for contender in list(contenders[shift:]) + list(contenders[:shift]):
            outcome = outcomes[contender.name]
            if outcome.error:
                continue
            contender.reset()
            try:
                with contender.monitor() if contender.monitor else contextlib.nullcontext():
                    result = run_measured(contender.command, contender.timeout,
                                          env=contender.env, cwd=contender.cwd)
                if contender.check is not None:
                    extra = contender.check(result)
                elif result.returncode != 0 or result.timed_out:
                    raise BenchError(result.failure())
                else:
                    extra = result.info
            except BenchError as exc:
                outcome.error = '{} failed: {}'.format(label, exc)
                note('  {:<22} FAILED ({}): {}'.format(contender.name, label, exc))
                continue
            finally:
                contender.reset()
            metrics = dict(extra, seconds=result.seconds, peak_rss_mib=result.max_rss_kib / KiB,
                           cpu_seconds=result.cpu_seconds, user_s=result.user_s,
                           sys_s=result.sys_s, voluntary_switches=result.voluntary_switches,
                           involuntary_switches=result.involuntary_switches)
            note('  {:<22} {:<9} {:8.3f} s  CPU {:7.3f} s (user {:.3f}, sys {:.3f})  '
                 'peak RSS {:6.1f} MiB'.format(contender.name, label, result.seconds,
                                                result.cpu_seconds, result.user_s, result.sys_s,
                                                metrics['peak_rss_mib']))
            if round_no >= warmup:
                outcome.runs.append(metrics)
    return outcomes


# ---------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Goal:
    """A target a measured value should meet, e.g. ``bitpit / curl <= 0.8``."""
    label: str
    value: Optional[float]
    target: float
    at_most: bool = True
    unit: str = ''

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        return self.value <= self.target if self.at_most else self.value >= self.target

    def line(self) -> str:
        value = 'n/a' if self.value is None else '{:.3f}{}'.format(self.value, self.unit)
        verdict = {None: 'not measured', True: 'met', False: 'MISSED'}[self.met]
        return '{:<34} {:>12}   goal {} {}{}   {}'.format(
            self.label, value, '<=' if self.at_most else '>=', self.target, self.unit, verdict)

    def to_json(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), met=self.met)


def derive(outcomes: Dict[str, Outcome], key: str,
           compute: Callable[[Dict[str, Any]], float]) -> None:
    """Add the metric ``key`` = ``compute(run)`` to every run."""
    for outcome in outcomes.values():
        for run in outcome.runs:
            run[key] = compute(run)


def median_of(outcomes: Dict[str, Outcome], name: str, key: str) -> Optional[float]:
    """The median of ``key`` over the runs of contender ``name``, or ``None``."""
    return outcomes[name].median(key) if name in outcomes else None


def ratio(outcomes: Dict[str, Outcome], a: str, b: str, key: str = 'seconds') -> Optional[float]:
    """median(a) / median(b) of ``key``, or ``None`` if either is missing."""
    x, y = median_of(outcomes, a, key), median_of(outcomes, b, key)
    return x / y if x is not None and y else None


def best_ratio(outcomes: Dict[str, Outcome], a: str, b: str,
               key: str = 'seconds') -> Optional[float]:
    """min(a) / min(b) of ``key``: the ratio of the runs the machine
    disturbed least, or ``None`` if either is missing. Medians decide the
    goals; on a noisy machine this tells whether a gap is the code's."""
    def best(name: str) -> Optional[float]:
        outcome = outcomes.get(name)
        values = [run[key] for run in outcome.runs if run.get(key) is not None] \
            if outcome and not outcome.error else []
        return min(values) if values else None
    x, y = best(a), best(b)
    return x / y if x is not None and y else None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned first column, right-aligned others."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return '\n'.join('  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)


#: Report columns for CPU time (user + system, and each), to follow
#: ``('median s', 'seconds', ...)``: medians of what ``wait4`` gave per run.
CPU_COLUMNS = [('CPU s', 'cpu_seconds', '{:.3f}'), ('user s', 'user_s', '{:.3f}'),
               ('sys s', 'sys_s', '{:.3f}')]


def report_contenders(outcomes: Dict[str, Outcome], skipped: Dict[str, str],
                      columns: Sequence[Tuple[str, str, str]]) -> str:
    """A table of medians, one row per contender; ``columns`` lists
    (header, metric key, format). Failed and skipped contenders get a line
    saying why."""
    rows, notes = [], []
    for name, outcome in outcomes.items():
        if outcome.runs:
            rows.append([name] + [
                '-' if outcome.median(key) is None else fmt.format(outcome.median(key))
                for _, key, fmt in columns] + [len(outcome.runs)])
        if outcome.error:
            notes.append('{}: {}'.format(name, outcome.error))
    notes += ['{}: skipped, {}'.format(name, reason) for name, reason in skipped.items()]
    table = format_table(['contender'] + [h for h, _, _ in columns] + ['runs'], rows)
    return table + ''.join('\n' + line for line in notes)


def merge_sections(sections: Sequence[Any]) -> Tuple[Dict[str, Outcome], Dict[str, str],
                                                     List[Goal]]:
    """The outcomes, skips and goals of a script's sections (scenarios),
    for ``finish``: each section has ``name``, ``outcomes``, ``skipped``
    and ``goals``; contenders are named ``'SECTION: CONTENDER'``."""
    outcomes = {'{}: {}'.format(s.name, name): outcome
                for s in sections for name, outcome in s.outcomes.items()}
    skipped = {'{}: {}'.format(s.name, name): reason
               for s in sections for name, reason in s.skipped.items()}
    return outcomes, skipped, [goal for section in sections for goal in section.goals]


def finish(path: Optional[str], record: Dict[str, Any], outcomes: Dict[str, Any],
           skipped: Any, goals: List[Any]) -> int:
    """Write the run's ``record`` with its contenders, skips, goals and this
    machine to ``path`` as JSON (nothing if ``path`` is None), and return the
    script's exit status: 0 when every contender ran, else 1."""
    if path:
        data = dict(record, machine=machine_summary(),
                    contenders={name: o.to_json() for name, o in outcomes.items()},
                    skipped=skipped, goals=[goal.to_json() for goal in goals])
        Path(path).write_text(json.dumps(data, indent=2, default=str) + '\n')
        note('results written to {}'.format(path))
    return 0 if all(o.error is None for o in outcomes.values()) else 1


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError('not a positive integer: {!r}'.format(text))
    return int(text)


def base_parser(description: str, runs: int = 5, warmup: Optional[int] = 1,
                server: bool = True, baseline: bool = False) -> argparse.ArgumentParser:
    """The options the benchmarks share: --runs, --bitpit, --json,
    --no-install, --tmp, and unless turned off here --warmup and --server;
    with ``baseline``, --baseline too."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--bitpit', metavar='PATH', default=str(REPO_ROOT / 'bitpit.py'),
                        help="the bitpit.py to measure (default: the repo's, %(default)s)")
    if baseline:
        parser.add_argument('--baseline', metavar='PATH',
                            help='also measure this bitpit.py, as contender "... baseline", '
                                 'interleaved with the one under test (e.g. the engine before '
                                 'a change)')
    parser.add_argument('--runs', type=positive_int, default=runs,
                        help='timed runs of each contender (default %(default)s)')
    if warmup is not None:
        parser.add_argument('--warmup', type=int, default=warmup,
                            help='untimed rounds before the timed ones (default %(default)s)')
    if server:
        parser.add_argument('--server', choices=('auto', 'nginx', 'python'), default='auto',
                            help='auto (default): nginx when installed, else Python')
    parser.add_argument('--json', metavar='FILE', help='also write the results to FILE as JSON')
    parser.add_argument('--no-install', dest='install', action='store_false',
                        help='never apt-get install a missing tool, skip it instead')
    parser.add_argument('--tmp', metavar='DIR', help='where to make the temp dir')
    return parser


def add_file_set_options(parser: argparse.ArgumentParser, files: int, parallel: int,
                         timeout: float, parallel_help: str = 'downloads at a time') -> None:
    """The options of the benchmarks over many small files: --files,
    --file-size (10k), --parallel and --timeout (of one run)."""
    parser.add_argument('--files', type=int, default=files,
                        help='how many files (default %(default)s)')
    parser.add_argument('--file-size', type=parse_size, default=10 * KiB,
                        help='size of each file (default 10k)')
    parser.add_argument('--parallel', type=int, default=parallel,
                        help=parallel_help + ' (default %(default)s)')
    parser.add_argument('--timeout', type=float, default=timeout,
                        help='seconds before one run is killed (default %(default)s)')


def run_main(main: Callable[[], int]) -> int:
    """Run a benchmark's ``main()``: SIGTERM becomes SystemExit and Ctrl-C
    exits with 130 (after the ``with`` blocks removed temp dirs and stopped
    servers and children)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    note(pin_cpus())
    try:
        return main()
    except KeyboardInterrupt:
        note('interrupted')
        return 130


def machine_summary() -> Dict[str, Any]:
    """What the results were measured on."""
    return {'python': sys.version.split()[0], 'cpus': os.cpu_count(),
            'platform': sys.platform, 'date': time.strftime('%Y-%m-%d %H:%M:%S')}
