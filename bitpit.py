#!/usr/bin/env python3
"""bitpit: event-driven HTTP(S) downloads with resume, rate limits and a manager.

One file, standard library only. The outline of this file is its table of
contents:

    helpers      human_readable, _parse_rate, file names, header parsing
    errors       Error and its subclasses
    emitter      Emitter, the signal base class
    timing       _TokenBucket (rate limits) and the shared speed ticker
    http         connections, the connection pool, requests and redirects
    downloader   Downloader: one URL, one thread, one attempt state machine
    manager      Manager: many downloads, one total rate limit
    command line main() and the ``bitpit`` command

Typical use::

    import bitpit
    d = bitpit.Downloader('https://example.com/file.iso', rate_limit=2**20)
    d.listen('state-changed', lambda d, old: print(d.state))
    d.start()
    d.join()
"""

from __future__ import annotations

import base64
import collections
import datetime
import email.utils
import hashlib
import heapq
import io
import itertools
import json
import logging
import netrc
import os
import pathlib
import re
import select
import socket
import ssl
import stat
import sys
import threading
import time
import http.client
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

__version__ = '2.0.0'
__all__ = [
    'Emitter', 'Downloader', 'Manager', 'human_readable', 'main',
    'Error', 'HTTPStatusError', 'NetworkError', 'StalledError', 'TLSError',
    'ProtocolError', 'RedirectError', 'IntegrityError', 'FileError',
    'InvalidURLError',
]

_log = logging.getLogger('bitpit')

_DEFAULT_CHUNK_SIZE = 256 * 1024
_MAX_REDIRECTS = 10
_RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_RETRY_AFTER = 24 * 3600.0
_ACTIVE_STATES = ('start', 'download')         # an attempt under way
_FINISHED_STATES = ('complete', 'fatal-error')  # nothing more will happen
_DEFAULT_NAME = 'index.html'
_SIDECAR_SUFFIX = '.bitpit'


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

_SUFFIXES = ('B', 'KB', 'MB', 'GB', 'TB', 'PB', 'EB', 'ZB', 'YB')


def human_readable(n: Optional[float], digits: int = 3
                   ) -> Tuple[Optional[float], Optional[str]]:
    """Return ``(number, suffix)`` with ``n`` bytes scaled by powers of 1024.

    ``n`` is divided by 1024 while the integer part of ``abs(n)`` has more
    than ``digits`` decimal digits. ``None`` gives ``(None, None)``.
    """
    if n is None:
        return None, None
    for suffix in _SUFFIXES[:-1]:
        if len(str(int(abs(n)))) <= digits:
            return n, suffix
        n /= 1024
    return n, _SUFFIXES[-1]


_RATE_RE = re.compile(r'^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgG]?)\s*$')
_RATE_UNITS = {'': 1, 'k': 1024, 'm': 1024 ** 2, 'g': 1024 ** 3}


def _parse_rate(text: Union[str, int, float]) -> int:
    """Parse a rate such as ``2048``, ``100k``, ``0.5m`` or ``1M`` into bytes
    per second. Raises ``ValueError`` for anything else."""
    if isinstance(text, (int, float)):
        return int(text)
    match = _RATE_RE.match(text)
    if not match:
        raise ValueError('invalid rate {!r}: use a number of bytes per second, '
                         'optionally with k or m (e.g. 100k, 0.5m)'.format(text))
    return int(float(match.group(1)) * _RATE_UNITS[match.group(2).lower()])


_UNSAFE_NAME_CHARS = re.compile(r'[\x00-\x1f\x7f/\\]')


def _safe_filename(name: str, default: str = _DEFAULT_NAME) -> str:
    """Return ``name`` made safe to use as one file name inside a directory.

    Path separators, NUL and control characters become ``_``; an empty name
    or one made only of dots (``.``, ``..``) becomes ``default``.
    """
    name = _UNSAFE_NAME_CHARS.sub('_', name).strip()
    if not name.strip('.'):
        return default
    return _fit_name(name, '')


def _fit_name(stem: str, suffix: str) -> str:
    """``stem + suffix`` with ``stem`` shortened so that the name fits the
    255 bytes a file name may have."""
    while len((stem + suffix).encode('utf-8', 'surrogateescape')) > 255 and stem:
        stem = stem[:-1]
    return stem + suffix


def _filename_from_url(url: str) -> str:
    """The percent-decoded last segment of the URL's path, made safe."""
    path = urllib.parse.urlsplit(url).path
    return _safe_filename(urllib.parse.unquote(path.rsplit('/', 1)[-1]))


_DISPOSITION_EXT = re.compile(
    r"""filename\*\s*=\s*([\w!#$%&+^`{}~-]+)'[^']*'([^;\s]+)""", re.I)
_DISPOSITION_PLAIN = re.compile(
    r"""(?:^|;)\s*filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))""", re.I)


def _filename_from_disposition(value: Optional[str]) -> Optional[str]:
    """The file name a ``Content-Disposition`` header asks for, made safe, or
    ``None``. ``filename*=UTF-8''...`` wins over ``filename=``."""
    if not value:
        return None
    match = _DISPOSITION_EXT.search(value)
    if match:
        try:
            name = urllib.parse.unquote(match.group(2), encoding=match.group(1),
                                        errors='strict')
        except (LookupError, UnicodeDecodeError):
            name = None
        if name:
            return _safe_filename(name.rsplit('/', 1)[-1].rsplit('\\', 1)[-1])
    match = _DISPOSITION_PLAIN.search(value)
    if match:
        name = match.group(1)
        name = re.sub(r'\\(.)', r'\1', name) if name is not None else match.group(2)
        name = name.rsplit('/', 1)[-1].rsplit('\\', 1)[-1]
        if name:
            return _safe_filename(name)
    return None


_CONTENT_RANGE_RE = re.compile(r'^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$', re.I)
_UNSATISFIED_RANGE_RE = re.compile(r'^\s*bytes\s+\*/(\d+)\s*$', re.I)


def _parse_content_range(value: str) -> Tuple[int, int, Optional[int]]:
    """Parse ``bytes FIRST-LAST/TOTAL`` into ``(first, last, total)``;
    ``total`` is ``None`` for ``*``. Raises ``ProtocolError`` if malformed."""
    match = _CONTENT_RANGE_RE.match(value)
    if not match:
        raise ProtocolError('malformed Content-Range: {!r}'.format(value[:100]))
    first, last = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == '*' else int(match.group(3))
    if last < first or (total is not None and last >= total):
        raise ProtocolError('impossible Content-Range: {!r}'.format(value[:100]))
    return first, last, total


def _parse_content_length(response: http.client.HTTPResponse) -> Optional[int]:
    """The response's ``Content-Length`` as an int, ``None`` if absent or the
    body is chunked. Raises ``ProtocolError`` for a malformed or
    contradictory value."""
    values = response.msg.get_all('Content-Length') or []
    if not values or response.chunked:
        return None
    lengths = set()
    for value in values:
        for part in value.split(','):
            part = part.strip()
            if not part.isdigit():
                raise ProtocolError('malformed Content-Length: {!r}'.format(value[:100]))
            lengths.add(int(part))
    if len(lengths) != 1:
        raise ProtocolError('conflicting Content-Length values: {}'.format(values))
    return lengths.pop()


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` value (seconds or an HTTP date),
    or ``None`` if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _parse_checksum(checksum: Optional[str]) -> Optional[Tuple[str, str]]:
    if checksum is None:
        return None
    algorithm, _, digest = str(checksum).partition(':')
    algorithm = algorithm.strip().lower()
    digest = digest.strip().lower()
    try:
        hashlib.new(algorithm)
    except (ValueError, TypeError):
        raise ValueError('unknown checksum algorithm in {!r}'.format(checksum)) from None
    if not re.fullmatch(r'[0-9a-f]+', digest) or \
            len(digest) != 2 * hashlib.new(algorithm).digest_size:
        raise ValueError('malformed checksum {!r}: expected ALGORITHM:HEX'.format(checksum))
    return algorithm, digest


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

class Error(Exception):
    """Base class of every error bitpit reports.

    ``retryable`` tells whether another attempt may succeed: retryable errors
    put a download in state ``error`` (and restart it when ``restart_wait >=
    0``); the others end it in ``fatal-error``. ``__cause__`` holds the
    underlying ``OSError``/``http.client`` exception, if any.
    """
    retryable = False


class HTTPStatusError(Error):
    """The server answered with an error status (``.status``, ``.reason``).

    408, 425, 429, 500, 502, 503 and 504 are retryable. ``retry_after`` is the
    delay in seconds the server asked for with ``Retry-After``, or ``None``.
    """

    def __init__(self, status: int, reason: str = '', url: str = '',
                 retry_after: Optional[float] = None):
        super().__init__('HTTP {} {} for {}'.format(status, reason, url).strip())
        self.status = status
        self.reason = reason
        self.url = url
        self.retry_after = retry_after
        self.retryable = status in _RETRYABLE_STATUSES


class NetworkError(Error):
    """The connection failed: refused, reset, unreachable, name not found."""
    retryable = True


class StalledError(NetworkError):
    """No byte arrived for ``timeout`` seconds."""


class TLSError(NetworkError):
    """The TLS handshake failed, e.g. an untrusted certificate. Not retryable."""
    retryable = False


class ProtocolError(Error):
    """The server's answer was malformed or broke its own promises (a short
    body, a bad ``Content-Range``, an invalid status line)."""
    retryable = True


class RedirectError(ProtocolError):
    """A redirect loop, too many redirects, or a redirect to an unsupported
    URL."""
    retryable = False


class IntegrityError(Error):
    """The downloaded bytes do not match the expected checksum."""


class FileError(Error):
    """The local file could not be opened or written (its cause is the
    ``OSError``). The bytes already on disk are kept."""


class InvalidURLError(Error, ValueError):
    """The URL is malformed or its scheme is not ``http`` or ``https``."""


def _check_url(url: str) -> urllib.parse.SplitResult:
    """Return the split URL if it is an absolute http(s) URL with a host,
    else raise ``InvalidURLError``."""
    if not isinstance(url, str):
        raise InvalidURLError('URL must be a str, not {}'.format(type(url).__name__))
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # validates the port
    except ValueError as exc:
        raise InvalidURLError('malformed URL {!r}: {}'.format(url, exc)) from exc
    if parts.scheme.lower() not in ('http', 'https'):
        raise InvalidURLError('unsupported URL scheme in {!r}: only http and https'
                              .format(url))
    if not parts.hostname or any(c in url for c in '\r\n\x00 '):
        raise InvalidURLError('malformed URL {!r}'.format(url))
    return parts


class _Stopped(Exception):
    """Raised inside the download thread when ``stop()`` was called."""


# ---------------------------------------------------------------------------
# emitter
# ---------------------------------------------------------------------------

class Emitter:
    """Base class for objects with signals.

    A subclass names its signals in the class attribute ``__signals__``.
    ``listen``, ``unlisten`` and ``emit`` are safe from any thread, also from
    inside a callback while a signal is being emitted.
    """
    __signals__: Tuple[str, ...] = ()

    def _registry(self) -> Tuple[threading.Lock, Dict[str, list]]:
        try:
            return self._emitter_lock, self._emitter_callbacks
        except AttributeError:
            with _EMITTER_INIT_LOCK:
                if '_emitter_callbacks' not in self.__dict__:
                    self._emitter_lock = threading.Lock()
                    self._emitter_callbacks = {s: [] for s in self.__signals__}
            return self._emitter_lock, self._emitter_callbacks

    def _callbacks(self, signal: str) -> Tuple[threading.Lock, list]:
        lock, callbacks = self._registry()
        try:
            return lock, callbacks[signal]
        except KeyError:
            raise KeyError('{} has no signal {!r}'.format(type(self).__name__, signal)) from None

    def listen(self, signal: str, func: Callable, *args: Any, **kwargs: Any) -> None:
        """Call ``func(*emit_args, *args, **kwargs)`` whenever ``signal`` is
        emitted. Raises ``KeyError`` for an unknown signal."""
        lock, callbacks = self._callbacks(signal)
        with lock:
            callbacks.append((func, args, kwargs))

    def unlisten(self, signal: str, func: Callable, *args: Any, **kwargs: Any) -> None:
        """Remove one registration of ``func`` with these ``args`` and
        ``kwargs``. Raises ``KeyError`` for an unknown signal, ``ValueError``
        if there is no such registration."""
        lock, callbacks = self._callbacks(signal)
        with lock:
            callbacks.remove((func, args, kwargs))

    def emit(self, signal: str, *args: Any) -> None:
        """Call every callback registered for ``signal``, in order. A callback
        that raises is logged with its traceback and the others still run.
        Raises ``KeyError`` for an unknown signal."""
        lock, callbacks = self._callbacks(signal)
        with lock:
            snapshot = list(callbacks)
        for func, listen_args, listen_kwargs in snapshot:
            try:
                func(*args, *listen_args, **listen_kwargs)
            except Exception:
                _log.exception('callback %r for signal %r raised', func, signal)


_EMITTER_INIT_LOCK = threading.Lock()


# ---------------------------------------------------------------------------
# timing: token bucket and speed ticker
# ---------------------------------------------------------------------------

class _TokenBucket:
    """A smooth rate limiter that any number of threads may draw from.

    Tokens (bytes) accrue at ``rate`` per second up to a depth of
    ``BURST_SECONDS`` worth, so no more than about a tenth of a second of
    traffic is ever released at once. Waiting threads are served in the
    order they came, so one that just read cannot starve the others. A rate
    ``<= 0`` means unlimited. Changing ``rate`` takes effect at once, also
    for threads already waiting.
    """
    BURST_SECONDS = 0.1

    def __init__(self, rate: float = 0):
        self._lock = threading.Lock()
        self._waiters: 'collections.deque[threading.Condition]' = collections.deque()
        self._rate = 0.0
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self.rate = rate

    @property
    def rate(self) -> float:
        """Bytes per second; ``<= 0`` means unlimited. Any thread."""
        return self._rate

    @rate.setter
    def rate(self, value: float) -> None:
        with self._lock:
            self._refill()
            self._rate = max(0.0, float(value))
            self._tokens = min(self._tokens, self._depth())
            self._notify_all()

    def _depth(self) -> float:
        return max(self._rate * self.BURST_SECONDS, 1.0)

    def _refill(self) -> None:
        now = time.monotonic()
        if self._rate > 0:
            self._tokens = min(self._depth(),
                               self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def _notify_all(self) -> None:
        for turn in self._waiters:
            turn.notify()

    def drain(self) -> None:
        """Empty the bucket, so the next bytes are paced from now on."""
        with self._lock:
            self._refill()
            self._tokens = 0.0

    def acquire(self, want: int, cancelled: Callable[[], bool]) -> int:
        """Block until some bytes may be read and return how many (at most
        ``want``, at least 1); ``want`` at once when unlimited. Returns 0 as
        soon as ``cancelled()`` is true after a ``wake()``. Any thread."""
        with self._lock:
            if self._rate <= 0:
                return 0 if cancelled() else want
            turn = threading.Condition(self._lock)
            self._waiters.append(turn)
            try:
                while not cancelled():
                    if self._rate <= 0:
                        return want
                    if self._waiters[0] is not turn:
                        turn.wait()  # until the threads ahead are served
                        continue
                    self._refill()
                    grant = max(1, min(want, int(self._depth())))
                    if self._tokens >= grant:
                        self._tokens -= grant
                        return grant
                    turn.wait((grant - self._tokens) / self._rate)
                return 0
            finally:
                self._waiters.remove(turn)
                if self._waiters:
                    self._waiters[0].notify()

    def refund(self, unused: int) -> None:
        """Give back tokens that were acquired but not used."""
        if unused > 0:
            with self._lock:
                self._refill()
                self._tokens = min(self._depth(), self._tokens + unused)
                if self._waiters:
                    self._waiters[0].notify()

    def wake(self) -> None:
        """Wake every waiting thread so it re-checks ``cancelled()``."""
        with self._lock:
            self._notify_all()


class _Ticker:
    """One daemon thread that calls ``_tick()`` on each registered object every
    ``period()`` seconds, for the speed-changed signal. Waiting is done on a
    condition until the earliest due time."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: List[Tuple[float, int, Any]] = []
        self._tokens: Dict[int, int] = {}
        self._counter = itertools.count()
        self._thread: Optional[threading.Thread] = None

    def add(self, target: Any, period: float) -> None:
        """Start ticking ``target`` (``target._tick()`` every ``period`` s,
        re-read from ``target.update_period`` after each tick)."""
        with self._cond:
            token = next(self._counter)
            self._tokens[id(target)] = token
            entry = (time.monotonic() + max(period, 0.01), token, target)
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name='bitpit-ticker',
                                                daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()  # it is the earliest due: wake the ticker sooner

    def remove(self, target: Any) -> None:
        """Stop ticking ``target``; a tick already running may still finish."""
        with self._cond:
            self._tokens.pop(id(target), None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._heap:
                        self._thread = None
                        return
                    due, token, target = self._heap[0]
                    if self._tokens.get(id(target)) != token:
                        heapq.heappop(self._heap)
                        continue
                    delay = due - time.monotonic()
                    if delay <= 0:
                        break
                    self._cond.wait(delay)
                heapq.heappop(self._heap)
                period = max(float(target.update_period), 0.01)
                heapq.heappush(self._heap, (max(due + period, time.monotonic()), token, target))
            try:
                target._tick()
            except Exception:
                _log.exception('speed update of %r failed', target)


_TICKER = _Ticker()


# ---------------------------------------------------------------------------
# http: connections, pool, requests with redirects
# ---------------------------------------------------------------------------

class _AbortableMixin:
    """A connection whose socket can be shut down from another thread, also
    while it is still connecting, so that ``stop()`` takes effect at once.
    ``cancelled`` is checked around the connect, which closes the window
    between an ``abort()`` and the socket's creation."""
    connecting_socket: Optional[socket.socket] = None
    cancelled: Callable[[], bool] = staticmethod(lambda: False)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # http.client sets this per instance, hiding any method of that name
        self._create_connection = self._abortable_connect

    def _abortable_connect(self, address, timeout, source_address=None):
        host, port = address
        last_error: Optional[OSError] = None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(
                host, port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            self.connecting_socket = sock
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                if self.cancelled():
                    raise OSError('download stopped')
                sock.connect(sockaddr)
                if self.cancelled():
                    raise OSError('download stopped')
                return sock
            except OSError as exc:
                last_error = exc
                sock.close()
        raise last_error or OSError('no address found for {}'.format(host))

    def abort(self) -> None:
        """Shut the connection down; a thread blocked on it wakes at once.
        Any thread."""
        for sock in (getattr(self, 'sock', None), self.connecting_socket):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except (OSError, ValueError):
                    pass


class _HTTPConnection(_AbortableMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_AbortableMixin, http.client.HTTPSConnection):
    pass


_ConnectionKey = Tuple[str, str, int, Optional[Tuple[str, str, int]], int]


class _ConnectionPool:
    """Idle keep-alive connections, by scheme, host, port and proxy, so that
    many downloads from one server do not each pay for a new connection."""
    MAX_IDLE_PER_KEY = 64
    MAX_IDLE_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: Dict[_ConnectionKey, List[Tuple[float, http.client.HTTPConnection]]] = {}

    def get(self, key: _ConnectionKey) -> Optional[http.client.HTTPConnection]:
        """An idle connection for ``key`` that can carry a new request, or
        ``None``. The ones idle too long or not quiet are closed."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                since, conn = idle.pop()
            if time.monotonic() - since < self.MAX_IDLE_SECONDS and _quiet(conn):
                return conn
            conn.close()

    def clear(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, conn in connections:
                conn.close()

    def put(self, key: _ConnectionKey, conn: http.client.HTTPConnection) -> None:
        """Keep ``conn`` for reuse (its last response must be fully read),
        and close the connections of any host that were idle too long."""
        now = time.monotonic()
        expired = []
        with self._lock:
            for idle in self._idle.values():
                while idle and now - idle[0][0] >= self.MAX_IDLE_SECONDS:
                    expired.append(idle.pop(0)[1])
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.MAX_IDLE_PER_KEY:
                idle.append((now, conn))
            else:
                expired.append(conn)
        for old in expired:
            old.close()


_POOL = _ConnectionPool()


def _quiet(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle connection has nothing to read. If it has, the server
    closed it or sent bytes no request asked for (say the rest of a body
    longer than its Content-Length), which the next request would take for
    its response."""
    try:
        if hasattr(select, 'poll'):
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            return not poller.poll(0)
        return not select.select([conn.sock], [], [], 0)[0]
    except (OSError, ValueError, TypeError):
        return False


def _proxy_for(parts: urllib.parse.SplitResult, proxy: Optional[str]
               ) -> Optional[urllib.parse.SplitResult]:
    """The proxy to use for this URL: ``proxy`` if given (``''`` for none),
    else the environment's ``http_proxy``/``https_proxy``/``no_proxy``."""
    if proxy is None:
        proxy = _environment_proxy(parts.scheme.lower(), parts.hostname or '')
    return _parse_proxy(proxy) if proxy else None


def _environment_proxy(scheme: str, host: str) -> str:
    """``http_proxy``/``https_proxy`` unless ``no_proxy`` exempts ``host``,
    with urllib's rules (lower case first; no upper-case ``HTTP_PROXY`` in a
    CGI script). Looks up only these names: ``urllib.request.getproxies()``
    decodes the whole environment, which costs more than a small download."""
    environ = os.environ
    no_proxy = environ.get('no_proxy') or environ.get('NO_PROXY')
    if no_proxy and urllib.request.proxy_bypass_environment(host, {'no': no_proxy}):
        return ''
    name = scheme + '_proxy'
    proxy = environ.get(name)
    if proxy is None and not (scheme == 'http' and 'REQUEST_METHOD' in environ):
        proxy = environ.get(name.upper())
    return proxy or ''


def _parse_proxy(proxy: str) -> urllib.parse.SplitResult:
    """Split an ``http://[user:pass@]host:port`` proxy URL (the scheme may be
    left out). Raises ``InvalidURLError`` for anything else."""
    if '://' not in proxy:
        proxy = 'http://' + proxy
    try:
        parts = urllib.parse.urlsplit(proxy)
        parts.port  # validates the port
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() != 'http' or not parts.hostname:
        raise InvalidURLError('unsupported proxy {!r}: use http://host:port'.format(proxy))
    return parts


def _netrc_credentials(host: str) -> Optional[Tuple[str, str]]:
    """Login and password for ``host`` from ``$NETRC`` or ``~/.netrc``, as
    curl's ``--netrc-optional`` reads them; ``None`` when there is none."""
    try:
        entry = netrc.netrc(os.environ.get('NETRC') or None).authenticators(host)
    except FileNotFoundError:
        return None
    except (OSError, netrc.NetrcParseError) as exc:
        _log.warning('ignoring .netrc: %s', exc)
        return None
    if entry is None:
        return None
    login, _, password = entry
    return login or '', password or ''


def _proxy_headers(proxy: urllib.parse.SplitResult) -> Dict[str, str]:
    """``Proxy-Authorization`` for a proxy URL with credentials, else none."""
    if not proxy.username:
        return {}
    return {'Proxy-Authorization': _basic_auth(urllib.parse.unquote(proxy.username),
                                               urllib.parse.unquote(proxy.password or ''))}


def _basic_auth(user: str, password: str) -> str:
    token = '{}:{}'.format(user, password).encode('utf-8')
    return 'Basic ' + base64.b64encode(token).decode('ascii')


def _body_reader(response: http.client.HTTPResponse) -> Callable[[memoryview], int]:
    """A ``readinto`` for the response body that returns as soon as some bytes
    arrived (one receive), rather than waiting for the buffer to fill, so
    progress, stall detection and rate limiting see bytes as they come. The
    caller never asks for more than the announced length."""
    if response.fp is None:  # http.client closes empty bodies at once
        return lambda view: 0
    if response.chunked:
        def read_chunked(view: memoryview) -> int:
            data = response.read1(len(view))
            view[:len(data)] = data
            return len(data)
        return read_chunked

    # BufferedReader.readinto1 into a view larger than its own buffer copies
    # what it holds and then blocks in another receive. So while it may hold
    # bytes (after the headers, or after a read smaller than its buffer), ask
    # for at most one buffer's worth, which empties it without blocking.
    readinto1 = response.fp.readinto1
    buffer_size = io.DEFAULT_BUFFER_SIZE
    may_hold_bytes = True

    def read_plain(view: memoryview) -> int:
        nonlocal may_hold_bytes
        if may_hold_bytes and len(view) > buffer_size:
            view = view[:buffer_size]
        may_hold_bytes = len(view) < buffer_size
        return readinto1(view)
    return read_plain


def _status_error(response: http.client.HTTPResponse, url: str) -> HTTPStatusError:
    """The error for an error answer, with the ``Retry-After`` delay of a 429
    or 503 (at most a day: a longer one is taken for a day)."""
    retry_after = None
    if response.status in (429, 503):
        retry_after = _parse_retry_after(response.getheader('Retry-After'))
        if retry_after is not None:
            retry_after = min(retry_after, _MAX_RETRY_AFTER)
    return HTTPStatusError(response.status, response.reason, url, retry_after)


def _network_error(exc: BaseException) -> Error:
    """The bitpit error for an exception raised by the network or a parser."""
    if isinstance(exc, Error):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TLSError('TLS certificate not trusted: {}'.format(exc.verify_message or exc))
    if isinstance(exc, ssl.SSLError):
        return TLSError('TLS error: {}'.format(exc))
    if isinstance(exc, socket.timeout):
        return StalledError('no data received within the time-out')
    if isinstance(exc, http.client.HTTPException):
        return ProtocolError('bad HTTP response: {!r}'.format(exc))
    return NetworkError('network error: {}'.format(exc))


class _Request:
    """One HTTP request of a download, following redirects.

    An ``abortable`` request makes its connection the one the downloader's
    ``stop()`` shuts down, and ends with ``_Stopped`` once a stop is under
    way. Download thread (or, not abortable, the caller's)."""

    def __init__(self, downloader: Downloader, method: str, offset: int,
                 abortable: bool = True):
        self.downloader = downloader
        self.method = method
        self.offset = offset
        self.abortable = abortable
        self._cancelled = downloader._stop_event.is_set if abortable else _never
        self.url = downloader.url
        self.key: Optional[_ConnectionKey] = None
        self.connection: Optional[Any] = None
        self.response: Optional[http.client.HTTPResponse] = None
        self._connect(self.url)

    def _connect(self, url: str) -> None:
        parts = _check_url(url)
        d = self.downloader
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == 'https' else 80)
        proxy = _proxy_for(parts, d.proxy)
        proxy_id = (proxy.hostname, proxy.port or 80) if proxy else None
        self.key = (scheme, parts.hostname, port, proxy_id, id(d.ssl_context))
        connection = _POOL.get(self.key)
        self.reused = connection is not None
        if connection is None:
            connection = self._new_connection(scheme, parts.hostname, port, proxy)
        else:
            connection.timeout = d.timeout
            connection.cancelled = self._cancelled
            if connection.sock is not None:
                connection.sock.settimeout(d.timeout)
        self._use(connection)

    def _use(self, connection: Any) -> None:
        self.connection = connection
        if self.abortable:
            try:
                self.downloader._use_connection(connection)
            except _Stopped:
                self.connection = None
                connection.close()
                raise

    def _new_connection(self, scheme: str, host: str, port: int,
                        proxy: Optional[urllib.parse.SplitResult]) -> Any:
        d = self.downloader
        connect_host, connect_port = (proxy.hostname, proxy.port or 80) if proxy else (host, port)
        if scheme == 'https':
            context = d.ssl_context or _default_ssl_context()
            conn = _HTTPSConnection(connect_host, connect_port, timeout=d.timeout,
                                    context=context)
            if proxy:
                conn.set_tunnel(host, port, headers=_proxy_headers(proxy))
        else:
            conn = _HTTPConnection(connect_host, connect_port, timeout=d.timeout)
        conn.via_proxy = bool(proxy) and scheme == 'http'
        conn.proxy_parts = proxy
        conn.cancelled = self._cancelled
        return conn

    def _headers(self, url: str, first_host: str) -> Dict[str, str]:
        d = self.downloader
        parts = urllib.parse.urlsplit(url)
        headers = {'User-Agent': 'bitpit/' + __version__}
        headers.update((name, value) for name, value in d.headers.items()
                       if name.lower() != 'accept-encoding')
        # never a compressed body: byte ranges must mean file bytes, and CDNs
        # ignore Range when compression is allowed
        headers['Accept-Encoding'] = 'identity'
        if self.offset > 0:
            headers['Range'] = 'bytes={}-'.format(self.offset)
            if d._validator:
                headers['If-Range'] = d._validator
        same_host = (parts.hostname or '').lower() == first_host
        if not same_host:  # the caller's secrets are for the first host only
            for name in list(headers):
                if name.lower() in ('authorization', 'cookie'):
                    del headers[name]
        if not any(name.lower() == 'authorization' for name in headers):
            credentials = self._credentials(parts, same_host)
            if credentials is not None:
                headers['Authorization'] = _basic_auth(*credentials)
        conn = self.connection
        if getattr(conn, 'via_proxy', False):
            headers.update(_proxy_headers(conn.proxy_parts))
        return headers

    def _credentials(self, parts: urllib.parse.SplitResult, same_host: bool
                     ) -> Optional[Tuple[str, str]]:
        """User and password for this URL: from the URL itself, else the
        ``auth`` option (first host only), else ``.netrc``."""
        if parts.username is not None:
            return (urllib.parse.unquote(parts.username),
                    urllib.parse.unquote(parts.password or ''))
        if self.downloader.auth is not None:
            return tuple(self.downloader.auth) if same_host else None
        return _netrc_credentials(parts.hostname or '')

    def send(self) -> http.client.HTTPResponse:
        """Send the request, follow redirects, return the final response
        (status not 3xx). Raises a ``bitpit.Error``."""
        first_host = (urllib.parse.urlsplit(self.url).hostname or '').lower()
        seen = {self.url}
        for _ in range(_MAX_REDIRECTS + 1):
            response = self._exchange(self.url, first_host)
            location = response.getheader('Location')
            if response.status not in _REDIRECT_STATUSES or not location:
                self.response = response
                return response
            target = urllib.parse.urljoin(self.url, location.strip())
            try:
                _check_url(target)
            except InvalidURLError as exc:
                raise RedirectError('refusing redirect to {!r}: {}'.format(target, exc)) from exc
            if target in seen:
                raise RedirectError('redirect loop at {}'.format(target))
            seen.add(target)
            self._drain_and_release(response)
            self.url = target
            self._connect(target)
        raise RedirectError('more than {} redirects from {}'.format(_MAX_REDIRECTS,
                                                                     self.downloader.url))

    def _exchange(self, url: str, first_host: str) -> http.client.HTTPResponse:
        """One request and its response headers on the current connection,
        retried once on a fresh connection if a reused one turns out dead."""
        while True:
            conn = self.connection
            parts = urllib.parse.urlsplit(url)
            if getattr(conn, 'via_proxy', False):
                target = url
            else:
                target = parts.path or '/'
                if parts.query:
                    target += '?' + parts.query
            try:
                conn.request(self.method, target, headers=self._headers(url, first_host))
                return conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                if self._cancelled():
                    raise _Stopped from exc
                if self.reused and isinstance(exc, (http.client.RemoteDisconnected,
                                                    ConnectionResetError, BrokenPipeError)):
                    conn.close()
                    self.reused = False
                    scheme, host, port = self.key[0], self.key[1], self.key[2]
                    self._use(self._new_connection(scheme, host, port, conn.proxy_parts))
                    continue
                raise _network_error(exc) from exc

    def _drain_and_release(self, response: http.client.HTTPResponse) -> None:
        """Finish a small redirect body so the connection can be reused."""
        try:
            length = _parse_content_length(response)
            if length is not None and length <= 65536:
                response.read()
                self.close(reuse=not response.will_close)
                return
        except (OSError, http.client.HTTPException, Error):
            pass
        self.close(reuse=False)

    def close(self, reuse: bool) -> None:
        """Return the connection to the pool if ``reuse`` and the response was
        read to its end; else close it. Idempotent."""
        conn, self.connection = self.connection, None
        if conn is None:
            return
        if self.abortable:
            self.downloader._use_connection(None)
            # checked after letting go of it: a stop() that got hold of the
            # connection before may be shutting it down right now
            reuse = reuse and not self.downloader._stop_event.is_set()
        if reuse and self._response_done(conn):
            _POOL.put(self.key, conn)
        else:
            conn.close()

    def _response_done(self, conn: Any) -> bool:
        response = self.response
        return (conn.sock is not None and
                (response is None or (response.isclosed() and not response.will_close)))


_SSL_CONTEXT: Optional[ssl.SSLContext] = None


def _never() -> bool:
    return False


def _default_ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


# ---------------------------------------------------------------------------
# downloader
# ---------------------------------------------------------------------------

_PathLike = Union[str, 'os.PathLike[str]', io.BufferedIOBase]


class Downloader(Emitter):
    """Download one URL to a file in a thread of its own.

    ``path`` is a file path (``str`` or anything ``pathlib.Path`` accepts) or
    a binary file object, which is written to and never closed. With
    ``dir_path=True`` (or ``path=None``) ``path`` is a directory and the
    file name comes from the URL. A file that already holds data is resumed
    with a ``Range`` request.

    Signals: ``state-changed (downloader, old_state)``, ``size-changed``,
    ``speed-changed``, ``url-changed``, ``path-changed``,
    ``restart-time-changed``, ``rate-limit-changed`` (each ``(downloader)``).
    Callbacks run on the download thread, except ``speed-changed`` while
    downloading, which runs on bitpit's ticker thread.
    """
    __signals__ = ('state-changed', 'size-changed', 'speed-changed', 'url-changed',
                   'path-changed', 'restart-time-changed', 'rate-limit-changed')

    def __init__(self, url: str, path: Optional[_PathLike] = None, dir_path: bool = False,
                 rate_limit: float = 0, timeout: float = 10, update_period: float = 1,
                 restart_wait: float = -1, chunk_size: int = _DEFAULT_CHUNK_SIZE, *,
                 retries: Optional[int] = None, content_disposition: bool = False,
                 checksum: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                 auth: Optional[Tuple[str, str]] = None, proxy: Optional[str] = None,
                 ssl_context: Optional[ssl.SSLContext] = None):
        _check_url(url)
        self._lock = threading.RLock()
        self._url = url
        self._state = 'pause'
        self._size = -1
        self._downloaded = 0
        self._received = 0
        self._speed: float = 0
        self._tick_stamp = 0.0
        self._tick_received = 0
        self._last_exception: Optional[BaseException] = None
        self._failures = 0
        self._retry_after: Optional[float] = None
        self._validator: Optional[str] = None
        self._thread: Optional[threading.Thread] = None
        self._attempt_over = False
        self._regular_file = False
        self._restarts_itself = True
        self._stop_event = threading.Event()
        self._connection: Optional[_AbortableMixin] = None
        self._restart_timer: Optional[threading.Timer] = None
        self._restart_time: Optional[datetime.datetime] = None
        self._dir: Optional[pathlib.Path] = None
        self._path: Union[pathlib.Path, io.BufferedIOBase]
        self._set_path_value(path, dir_path)
        self._bucket = _TokenBucket()
        self._shared_buckets: Tuple[_TokenBucket, ...] = ()
        self._rate_limit = 0.0
        self.rate_limit = rate_limit
        self.timeout = timeout
        self.update_period = update_period
        self.chunk_size = chunk_size
        self._restart_wait = restart_wait
        self.retries = retries
        self.content_disposition = content_disposition
        self._checksum = _parse_checksum(checksum)
        self.headers = dict(headers or {})
        self.auth = auth
        if proxy:
            _parse_proxy(proxy)
        self.proxy = proxy
        self.ssl_context = ssl_context
        self._load_local_state()

    def __repr__(self) -> str:
        return '<bitpit.Downloader {} {} {}/{}>'.format(
            self._url, self._state, self._downloaded, self._size)

    # -- configuration -----------------------------------------------------

    def _set_path_value(self, path: Optional[_PathLike], dir_path: bool) -> None:
        if path is None:
            path, dir_path = os.getcwd(), True
        if hasattr(path, 'write'):
            if dir_path:
                raise ValueError('dir_path=True needs a directory path, not a file object')
            self._dir, self._path = None, path
            return
        path = pathlib.Path(path).expanduser()
        if dir_path:
            self._dir, self._path = path, path / _filename_from_url(self._url)
        else:
            self._dir, self._path = None, path

    @property
    def url(self) -> str:
        """The URL to download. Setting it while running raises
        ``RuntimeError``."""
        return self._url

    @url.setter
    def url(self, value: str) -> None:
        _check_url(value)
        with self._lock:
            self._ensure_not_running('url')
            self._url = value
            if self._dir is not None:
                self._path = self._dir / _filename_from_url(value)
            self._load_local_state()
        self.emit('url-changed', self)

    @property
    def path(self) -> Union[pathlib.Path, io.BufferedIOBase]:
        """Where the bytes go: a ``pathlib.Path`` or the file object. Setting
        it while running raises ``RuntimeError``."""
        return self._path

    @path.setter
    def path(self, value: _PathLike) -> None:
        with self._lock:
            self._ensure_not_running('path')
            self._set_path_value(value, False)
            self._load_local_state()
        self.emit('path-changed', self)

    def _ensure_not_running(self, what: str) -> None:
        if self.is_alive and not self._attempt_over:
            raise RuntimeError('cannot change {} while the download is running'.format(what))

    @property
    def chunk_size(self) -> int:
        """Most bytes per network read and file write; next start."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        if int(value) <= 0:
            raise ValueError('chunk_size must be positive, not {!r}'.format(value))
        self._chunk_size = int(value)

    @property
    def rate_limit(self) -> float:
        """Bytes per second, ``<= 0`` for unlimited. Takes effect at once."""
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: float) -> None:
        self._rate_limit = value if value > 0 else 0
        self._bucket.rate = self._rate_limit
        self.emit('rate-limit-changed', self)

    @property
    def human_rate_limit(self) -> Tuple[Optional[float], Optional[str]]:
        """``rate_limit`` for people, e.g. ``(100.0, 'KB/s')``."""
        return _per_second(self._rate_limit)

    @property
    def restart_wait(self) -> float:
        """Seconds before an automatic restart after ``error``; negative:
        never. Setting it while a restart is scheduled reschedules it."""
        return self._restart_wait

    @restart_wait.setter
    def restart_wait(self, value: float) -> None:
        self._restart_wait = value
        if self.is_restarting:
            if value >= 0:
                self.restart(value)
            else:
                self._cancel_restart()

    @property
    def restart_time(self) -> Optional[datetime.datetime]:
        """When the scheduled restart happens, or ``None``."""
        return self._restart_time

    # -- progress ------------------------------------------------------------

    @property
    def state(self) -> str:
        """``pause``, ``start``, ``download``, ``error``, ``fatal-error`` or
        ``complete``."""
        return self._state

    @property
    def size(self) -> int:
        """Total bytes, ``-1`` if unknown."""
        return self._size

    @property
    def downloaded(self) -> int:
        """Bytes held so far, resumed bytes included."""
        return self._downloaded

    @property
    def remaining(self) -> int:
        """``size - downloaded``, ``-1`` if the size is unknown."""
        size = self._size
        return -1 if size < 0 else max(size - self._downloaded, 0)

    @property
    def speed(self) -> float:
        """Bytes per second over the last ``update_period``; 0 when not
        downloading."""
        return self._speed

    @property
    def ratio(self) -> float:
        """``downloaded / size``: 1.0 for an empty file, -1.0 if unknown."""
        size = self._size
        if size < 0:
            return -1.0
        if size == 0:
            return 1.0
        return self._downloaded / size

    @property
    def percentage(self) -> float:
        """``100 * ratio``."""
        return 100 * self.ratio

    @property
    def eta(self) -> Optional[datetime.timedelta]:
        """Time left at the current speed, ``None`` if unknown."""
        remaining, speed = self.remaining, self._speed
        if remaining == 0:
            return datetime.timedelta(0)
        if remaining < 0 or speed <= 0:
            return None
        return datetime.timedelta(seconds=remaining / speed)

    @property
    def human_size(self) -> Tuple[Optional[float], Optional[str]]:
        """``size`` for people, e.g. ``(9.865234375, 'KB')``."""
        return human_readable(self._size)

    @property
    def human_downloaded(self) -> Tuple[Optional[float], Optional[str]]:
        """``downloaded`` for people."""
        return human_readable(self._downloaded)

    @property
    def human_remaining(self) -> Tuple[Optional[float], Optional[str]]:
        """``remaining`` for people."""
        return human_readable(self.remaining)

    @property
    def human_speed(self) -> Tuple[Optional[float], Optional[str]]:
        """``speed`` for people, e.g. ``(2.0, 'KB/s')``."""
        return _per_second(self._speed)

    @property
    def is_alive(self) -> bool:
        """Whether the download thread is running."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def is_restarting(self) -> bool:
        """Whether a restart is scheduled."""
        return self._restart_timer is not None

    @property
    def last_exception(self) -> Optional[BaseException]:
        """The error of the last failed attempt (a ``bitpit.Error``), or
        ``None``."""
        return self._last_exception

    def bar(self, width: int = 30, char: str = '=', unknown: str = '?') -> str:
        """A progress bar of exactly ``width`` characters: ``int(width *
        ratio)`` copies of ``char`` then spaces; ``width`` copies of
        ``unknown`` when the ratio is unknown."""
        ratio = self.ratio
        if ratio < 0:
            return (unknown * width)[:width]
        filled = int(width * min(ratio, 1.0))
        return (char * filled)[:filled] + ' ' * (width - filled)

    # -- control ---------------------------------------------------------------

    def start(self) -> None:
        """Start the download thread and return at once. No-op if it is
        running; cancels a scheduled restart. Any thread."""
        self._cancel_restart()
        finishing = self._thread
        if finishing is not None and self._attempt_over:
            if finishing is threading.current_thread():
                self.restart(0)  # called from a final callback: start once it ends
                return
            finishing.join()  # it is only emitting its final signals
            self._cancel_restart()  # one it scheduled meanwhile
        with self._lock:
            if self.is_alive:
                return
            self._attempt_over = False
            self._stop_event.clear()
            self._thread = threading.Thread(target=self._run, daemon=False,
                                            name='bitpit-download')
            self._thread.start()

    def stop(self) -> None:
        """Stop the download (state ``pause``) and wait for its thread to end,
        unless called from that thread or the attempt is already over (the
        thread then only emits its last signals). No-op if not running;
        cancels a scheduled restart, and keeps a failing attempt from
        scheduling one. Any thread."""
        self._cancel_restart()
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return
            self._stop_event.set()
            finishing = self._attempt_over
            connection = self._connection
        if finishing:
            # The thread only emits its last signals: the stop need not wait
            # for it (a callback of it may be what called stop; waiting could
            # deadlock), only keep it from scheduling a restart.
            self._cancel_restart()
            return
        if connection is not None:
            connection.abort()
        for bucket in self._buckets():
            bucket.wake()
        if thread is not threading.current_thread():
            thread.join()
            self._cancel_restart()  # one the thread scheduled before it saw the stop

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the download thread ends (any reason)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def restart(self, wait: Optional[float] = None) -> None:
        """Schedule ``start()`` in ``wait`` seconds (default
        ``restart_wait``) and return. Any thread. A wait longer than a thread
        can wait (``threading.TIMEOUT_MAX``) is shortened to that."""
        self._schedule_restart(wait, automatic=False)

    def _schedule_restart(self, wait: Optional[float], automatic: bool) -> None:
        """Install the restart timer. An ``automatic`` one (after an error)
        is not installed once a stop is under way or a restart is already
        scheduled (by a callback), decided in the same locked step."""
        wait = self._restart_wait if wait is None else wait
        wait = min(max(0.0, wait), threading.TIMEOUT_MAX)
        timer = threading.Timer(wait, self._restart_due)
        timer.daemon = False
        timer.name = 'bitpit-restart'
        with self._lock:
            if automatic and (self._stop_event.is_set() or self._restart_timer is not None):
                return
            old, self._restart_timer = self._restart_timer, timer
            self._restart_time = datetime.datetime.now() + datetime.timedelta(seconds=wait)
        if old is not None:
            old.cancel()
        timer.start()
        self.emit('restart-time-changed', self)

    def _restart_due(self) -> None:
        with self._lock:
            if self._restart_timer is not threading.current_thread():
                return
            self._restart_timer = None
            self._restart_time = None
        self.emit('restart-time-changed', self)
        self.start()

    def _cancel_restart(self) -> None:
        with self._lock:
            timer, self._restart_timer = self._restart_timer, None
            self._restart_time = None
        if timer is not None:
            timer.cancel()
            self.emit('restart-time-changed', self)

    def update_size(self) -> None:
        """Refresh ``size`` with a HEAD request (blocks; raises a
        ``bitpit.Error`` on failure)."""
        request = _Request(self, 'HEAD', offset=0, abortable=False)
        try:
            response = request.send()
            if response.status >= 300:
                raise _status_error(response, request.url)
            length = _parse_content_length(response)
            response.close()
        finally:
            request.close(reuse=False)
        if length is not None:
            self._set_size(length)

    # -- internal: local state ----------------------------------------------

    def _buckets(self) -> Tuple[_TokenBucket, ...]:
        return (self._bucket,) + self._shared_buckets

    @property
    def _sidecar(self) -> Optional[pathlib.Path]:
        """The file beside a partial download that remembers its validator;
        ``None`` for file objects."""
        if isinstance(self._path, pathlib.Path):
            return self._path.with_name(self._path.name + _SIDECAR_SUFFIX)
        return None

    def _load_local_state(self) -> None:
        """Read how much is already on disk and what the sidecar remembers."""
        self._downloaded = self._local_size()
        self._size = -1
        self._validator = None
        sidecar = self._sidecar
        if sidecar is None or self._downloaded == 0:
            return
        try:
            with open(sidecar, encoding='utf-8') as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return
        if isinstance(saved, dict) and saved.get('url') == self._url:
            validator = saved.get('validator')
            self._validator = validator if isinstance(validator, str) else None
            size = saved.get('size')
            if isinstance(size, int) and size >= self._downloaded:
                self._size = size

    def _local_size(self) -> int:
        """Bytes already held: the size of a regular file (0 for a missing
        one or a device), the end of a seekable stream, else what was
        written to it."""
        target = self._path
        if isinstance(target, pathlib.Path):
            try:
                status = target.stat()
            except OSError:
                return 0
            return status.st_size if stat.S_ISREG(status.st_mode) else 0
        try:
            if target.seekable():
                return target.seek(0, io.SEEK_END)
        except (OSError, ValueError):
            pass
        return self._downloaded

    def _save_sidecar(self) -> None:
        """Remember the URL, validator and size beside a partial regular file
        (not beside a device such as /dev/full, nor for a file object)."""
        sidecar = self._sidecar
        if sidecar is None or not self._regular_file:
            return
        record = json.dumps({'url': self._url, 'validator': self._validator,
                             'size': self._size}).encode('utf-8')
        try:
            fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, record)
            finally:
                os.close(fd)
        except OSError as exc:
            _log.warning('cannot write %s: %s', sidecar, exc)

    def _remove_sidecar(self) -> None:
        sidecar = self._sidecar
        if sidecar is not None:
            try:
                sidecar.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                _log.warning('cannot remove %s: %s', sidecar, exc)

    # -- internal: signals and progress ----------------------------------------

    def _set_state(self, state: str) -> None:
        old, self._state = self._state, state
        if old != state:
            self.emit('state-changed', self, old)

    def _set_size(self, size: int) -> None:
        if size != self._size:
            self._size = size
            self.emit('size-changed', self)

    def _tick(self) -> None:
        """Recompute ``speed`` and emit ``speed-changed``. Called by the
        ticker thread every ``update_period`` while the attempt runs."""
        with self._lock:
            if self._attempt_over:
                return
            now = time.monotonic()
            received = self._received
            elapsed = now - self._tick_stamp
            if elapsed > 0:
                self._speed = (received - self._tick_received) / elapsed
            self._tick_stamp, self._tick_received = now, received
        self.emit('speed-changed', self)

    # -- internal: the download thread -------------------------------------------

    def _use_connection(self, connection: Optional[_AbortableMixin]) -> None:
        """Make ``connection`` the one ``stop()`` aborts; raise ``_Stopped``
        if a stop is already under way. Download thread."""
        with self._lock:
            if connection is not None and self._stop_event.is_set():
                raise _Stopped
            self._connection = connection

    def _run(self) -> None:
        """The download thread: one attempt, from ``start`` to its end state."""
        self._tick_stamp, self._tick_received = time.monotonic(), self._received
        received_before = self._received
        self._set_state('start')
        _TICKER.add(self, self.update_period)
        retry_after = None
        try:
            self._attempt()
            final, self._failures = 'complete', 0
        except _Stopped:
            final = 'pause'
        except BaseException as exc:
            if self._stop_event.is_set():
                final = 'pause'
            else:
                error = exc if isinstance(exc, Error) else _unexpected(exc)
                self._last_exception = error
                # ``retries`` counts failures in a row: progress breaks the row
                self._failures = 1 if self._received > received_before else self._failures + 1
                final = 'error' if error.retryable else 'fatal-error'
                if final == 'error' and self.retries is not None \
                        and self._failures > self.retries:
                    final = 'fatal-error'
                retry_after = getattr(error, 'retry_after', None)
                _log.info('%s: %s', self._url, error)
        finally:
            _TICKER.remove(self)
            with self._lock:
                self._attempt_over = True
                self._speed = 0
            self._retry_after = retry_after
        self.emit('speed-changed', self)
        self._set_state(final)
        if final == 'error' and self._restarts_itself and self._restart_wait >= 0:
            self._schedule_restart(max(self._restart_wait, retry_after or 0), automatic=True)

    def _attempt(self) -> None:
        """Download until every byte is held; raise on failure or stop.

        This is the one state machine of a download: ask for the bytes from
        the local offset on, check the answer against what was asked, write
        the body where it belongs, and ask again while the server sent less
        than the rest of the file."""
        self._bucket.drain()
        file = None
        hasher = None
        hashed_to = -1      # bytes of the file the hasher has seen
        try:
            while True:
                offset = self._downloaded = self._local_size()
                if offset == 0:
                    self._validator = None
                request = _Request(self, 'GET', offset)
                try:
                    response = request.send()
                    plan = self._plan(request, response, offset, renamable=file is None)
                    if plan is None:
                        break
                    write_at, expected_end = plan
                    if file is None:
                        file = self._open_file()
                    self._prepare_write(file, write_at)
                    if self._checksum is not None and write_at != hashed_to:
                        hasher = self._hash_prefix(file, write_at)
                    self._set_state('download')
                    self._read_body(response, file, write_at, expected_end, hasher)
                    hashed_to = self._downloaded
                    request.close(reuse=True)
                finally:
                    request.close(reuse=False)
                if self._size < 0 or self._downloaded >= self._size:
                    break
            self._finish(file, hasher)
        finally:
            if file is not None and file is not self._path:
                file.close()

    def _plan(self, request: '_Request', response: http.client.HTTPResponse,
              offset: int, renamable: bool) -> Optional[Tuple[int, Optional[int]]]:
        """Check the answer to a request from ``offset`` and return
        ``(write_at, expected_end)`` for its body, or ``None`` when the file
        is already complete. Raises for an error answer. ``renamable``: no
        file is open yet, so Content-Disposition may still name it.
        Download thread."""
        status = response.status
        if status == 416 and offset > 0:
            match = _UNSATISFIED_RANGE_RE.match(response.getheader('Content-Range') or '')
            total = int(match.group(1)) if match else None
            if total is None and self._size >= 0:
                total = self._size
            changed = self._change_in(response, total, etag_only=True) or (
                total is not None and total != offset and
                'it has {} bytes, the local file {}'.format(total, offset))
            if changed:
                self._restart_from_zero()
                raise ProtocolError('the file changed on the server: {}'.format(changed))
            self._set_size(offset)
            return None
        if status >= 300:
            raise _status_error(response, request.url)

        length = _parse_content_length(response)
        content_range = response.getheader('Content-Range')
        if status == 206 or (status == 200 and offset > 0 and content_range):
            if not content_range:
                raise ProtocolError('206 answer without Content-Range')
            first, last, total = _parse_content_range(content_range)
            if status == 200 and (first != offset or (total is not None and last != total - 1)):
                if first != 0 or (total is not None and last != total - 1):
                    raise ProtocolError('200 answer with Content-Range {!r}: neither the whole '
                                        'file nor the range asked for'.format(content_range))
                return self._plan_from_zero(response, length, renamable)
            if first > offset or last < offset:
                # starting later leaves a hole; ending earlier brings nothing
                raise ProtocolError('server sent bytes {}-{} but bytes from {} were asked '
                                    'for'.format(first, last, offset))
            changed = self._change_in(response, total)
            if changed:
                self._restart_from_zero()
                raise ProtocolError('the file changed on the server: {}'.format(changed))
            if length is not None and length != last - first + 1:
                raise ProtocolError('Content-Length {} disagrees with Content-Range {}'
                                    .format(length, content_range))
            self._remember_validator(response, keep_old=True)
            if total is not None:
                self._set_size(total)
            return first, last + 1
        if status == 200:
            return self._plan_from_zero(response, length, renamable)
        raise ProtocolError('unexpected status {} {}'.format(status, response.reason))

    def _plan_from_zero(self, response: http.client.HTTPResponse, length: Optional[int],
                        renamable: bool) -> Tuple[int, Optional[int]]:
        """The server sent the whole file: write it from byte 0 (under the
        Content-Disposition name if asked for, unless another file has it)."""
        self._remember_validator(response)
        self._set_size(length if length is not None else -1)
        if self.content_disposition and self._dir is not None and renamable:
            name = _filename_from_disposition(response.getheader('Content-Disposition'))
            if name and name != self._path.name:
                if (self._dir / name).exists():
                    _log.info('%s: not naming it %s: that file exists', self._url, name)
                else:
                    self._path = self._dir / name
                    self.emit('path-changed', self)
        return 0, length

    def _restart_from_zero(self) -> None:
        """Empty a partial file that no longer matches the server, so that the
        next attempt starts over instead of mixing two versions."""
        _log.info('%s: the file changed on the server, starting over', self._url)
        self._validator = None
        self._set_size(-1)
        try:
            if isinstance(self._path, pathlib.Path):
                with open(self._path, 'r+b') as f:
                    f.truncate(0)
            elif _seekable(self._path):
                self._path.seek(0)
                self._path.truncate(0)
            else:
                raise FileError('the file changed on the server, and {!r} cannot be '
                                'rewound to start over'.format(self._path))
        except OSError as exc:
            raise FileError('cannot truncate {}: {}'.format(self._path, exc)) from exc
        self._downloaded = 0

    def _change_in(self, response: http.client.HTTPResponse, total: Optional[int],
                   etag_only: bool = False) -> Optional[str]:
        """How an answer about the file shows that the server's file is no
        longer the one the local bytes came from (another size, another
        validator: a server that ignores ``If-Range`` answers so), or
        ``None``. ``etag_only`` for a 416, whose Last-Modified may be that of
        an error page."""
        if total is not None and self._size >= 0 and total != self._size:
            return 'it has {} bytes, not {}'.format(total, self._size)
        held = self._validator
        if held is None:
            return None
        name = 'ETag' if held.startswith('"') else 'Last-Modified'
        if etag_only and name != 'ETag':
            return None
        current = response.getheader(name)
        if current is not None and current != held:
            return '{} {} instead of {}'.format(name, current, held)
        return None

    def _remember_validator(self, response: http.client.HTTPResponse,
                            keep_old: bool = False) -> None:
        """Keep the response's strong ETag (quoted; weak ones start with
        ``W/``), else its Last-Modified, to send as ``If-Range``. With
        ``keep_old`` (a partial answer of the same file), an answer that has
        neither leaves the remembered one."""
        etag = response.getheader('ETag')
        validator = etag if etag and etag.startswith('"') else \
            response.getheader('Last-Modified')
        if validator is not None or not keep_old:
            self._validator = validator

    def _open_file(self) -> Any:
        target = self._path
        if not isinstance(target, pathlib.Path):
            return target
        try:
            file = open(target, 'r+b' if target.exists() else 'w+b', buffering=0)
            self._regular_file = stat.S_ISREG(os.fstat(file.fileno()).st_mode)
            return file
        except OSError as exc:
            raise FileError('cannot open {}: {}'.format(target, exc)) from exc

    def _prepare_write(self, file: Any, write_at: int) -> None:
        """Position ``file`` at ``write_at`` and drop what lies after it."""
        try:
            if _seekable(file):
                if file.seek(0, io.SEEK_END) > write_at:
                    file.truncate(write_at)
                file.seek(write_at)
            elif write_at != self._downloaded:
                raise FileError('cannot rewind {!r}: it is not seekable'.format(file))
            self._downloaded = write_at
        except OSError as exc:
            raise FileError('cannot write {}: {}'.format(self._path, exc)) from exc

    def _hash_prefix(self, file: Any, length: int) -> Any:
        """A hasher fed with the first ``length`` bytes already in ``file``."""
        hasher = hashlib.new(self._checksum[0])
        if length == 0:
            return hasher
        if isinstance(self._path, pathlib.Path):
            source = open(self._path, 'rb')
        elif _seekable(file) and getattr(file, 'readable', lambda: False)():
            source = file
        else:
            raise FileError('cannot verify the checksum of a resumed stream')
        try:
            source.seek(0)
            left = length
            while left:
                block = source.read(min(left, 1 << 20))
                if not block:
                    break
                hasher.update(block)
                left -= len(block)
        finally:
            if source is file:
                file.seek(length)
            else:
                source.close()
        return hasher

    def _read_body(self, response: http.client.HTTPResponse, file: Any, position: int,
                   expected_end: Optional[int], hasher: Optional[Any]) -> None:
        """Copy the body into ``file`` from ``position``, paced by the token
        buckets. Raises on a short body.

        Bytes are received into one reused buffer and written when it is
        full, when the body ends, or when the attempt stops or fails (so
        nothing received is lost). A body that fits in the buffer is thus
        written once and is never a partial file on disk; a longer one gets
        its sidecar before its first write."""
        chunk = self._chunk_size
        view = memoryview(bytearray(chunk if expected_end is None
                                    else max(1, min(chunk, expected_end - position))))
        chunk = len(view)
        buckets = self._buckets()
        cancelled = self._stop_event.is_set
        read_into = _body_reader(response)
        filled = 0          # bytes in the buffer, not yet written
        first_write = True

        def flush() -> None:
            nonlocal filled, first_write
            data, filled = view[:filled], 0
            if first_write:
                first_write = False
                if expected_end is None or position < expected_end:
                    self._save_sidecar()
            rest = data
            try:
                # An unbuffered file may write less than asked, as when the
                # disk fills up: writing the rest then raises the OSError.
                while rest:
                    written = file.write(rest)
                    if written is None:  # a file object that does not count
                        break
                    if not written:
                        raise FileError('short write to {}: {} of {} bytes'.format(
                            self._path, len(data) - len(rest), len(data)))
                    rest = rest[written:]
            except OSError as exc:
                raise FileError('cannot write {}: {}'.format(self._path, exc)) from exc
            if hasher is not None:
                hasher.update(data)

        try:
            while True:
                room = chunk - filled
                if expected_end is not None:
                    room = min(room, expected_end - position)
                if room <= 0:
                    if filled < chunk:
                        break  # the whole body is in
                    flush()
                    continue
                granted = room
                for bucket in buckets:
                    granted = bucket.acquire(granted, cancelled)
                    if not granted:
                        raise _Stopped
                got = read_into(view[filled:filled + granted])
                if granted > got:
                    for bucket in buckets:
                        bucket.refund(granted - got)
                if not got:
                    break
                filled += got
                position += got
                self._downloaded = position
                self._received += got
                if cancelled():
                    raise _Stopped
        except (OSError, http.client.HTTPException) as exc:
            if cancelled():
                raise _Stopped from exc
            raise _network_error(exc) from exc
        finally:
            if filled:
                flush()
        if expected_end is not None and position < expected_end:
            raise ProtocolError('connection closed after {} of {} bytes'.format(
                position, expected_end))
        response.close()
        if self._size < 0:
            self._set_size(position)

    def _finish(self, file: Any, hasher: Optional[Any]) -> None:
        """Check the finished file against the checksum and forget its
        sidecar. Raises ``IntegrityError`` on a mismatch (the file is kept)."""
        if self._checksum is not None:
            if hasher is None:
                hasher = self._hash_prefix(file if file is not None else self._path,
                                           self._downloaded)
            algorithm, expected = self._checksum
            actual = hasher.hexdigest()
            if actual != expected:
                self._remove_sidecar()
                raise IntegrityError('{} checksum mismatch for {}: expected {}, got {}'
                                     .format(algorithm, self._path, expected, actual))
        self._remove_sidecar()


def _seekable(file: Any) -> bool:
    try:
        return file.seekable()
    except (AttributeError, ValueError, OSError):
        return False


def _per_second(n: float) -> Tuple[Optional[float], Optional[str]]:
    number, suffix = human_readable(n)
    return number, suffix + '/s'


def _unexpected(exc: BaseException) -> Error:
    _log.error('unexpected error', exc_info=exc)
    error = Error('unexpected error: {!r}'.format(exc))
    error.__cause__ = exc
    return error


# ---------------------------------------------------------------------------
# manager
# ---------------------------------------------------------------------------

class Manager(Emitter):
    """Run many downloads: at most ``max_running`` at once, oldest first,
    under one total ``rate_limit`` shared by all of them.

    The total limit is work-conserving: one ``_TokenBucket`` serves every
    running download, so bandwidth a slow download cannot use goes to the
    others. A download's own ``rate_limit`` still caps it. The manager takes
    over restarts of its downloads: one that stopped (``error`` or
    ``pause``) is started again after ``restart_wait`` seconds;
    ``complete`` and ``fatal-error`` downloads never are.

    Signals: ``add (manager, downloader)``, ``remove (manager, downloader)``,
    ``property-changed (manager, name)``.
    """
    __signals__ = ('add', 'remove', 'property-changed')

    def __init__(self, max_running: int = 0, rate_limit: float = 0,
                 restart_wait: float = 30, **kwargs: Any):
        self._cond = threading.Condition(threading.Lock())
        self._downloads: List[Downloader] = []
        self._starting: set = set()
        self._stopped_at: Dict[Downloader, float] = {}
        self._bucket = _TokenBucket(rate_limit)
        self._max_running = max_running
        self._rate_limit = rate_limit
        self._restart_wait = restart_wait
        self._kwargs = dict(kwargs)
        self._thread: Optional[threading.Thread] = None
        self._started = False
        self._replan = False

    # -- properties ------------------------------------------------------------

    def _set_property(self, name: str, value: Any) -> None:
        with self._cond:
            setattr(self, '_' + name, value)
        self.emit('property-changed', self, name)
        self.update()

    @property
    def max_running(self) -> int:
        """Most downloads running at once; ``<= 0``: no limit."""
        return self._max_running

    @max_running.setter
    def max_running(self, value: int) -> None:
        self._set_property('max_running', value)

    @property
    def rate_limit(self) -> float:
        """Total bytes per second over all running downloads; ``<= 0``:
        none. Takes effect at once."""
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: float) -> None:
        self._bucket.rate = value
        self._set_property('rate_limit', value)

    @property
    def restart_wait(self) -> float:
        """Seconds a stopped download waits before the manager starts it
        again."""
        return self._restart_wait

    @restart_wait.setter
    def restart_wait(self, value: float) -> None:
        self._set_property('restart_wait', value)

    @property
    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for the ``Downloader`` that ``add(url)`` makes."""
        return self._kwargs

    @kwargs.setter
    def kwargs(self, value: Dict[str, Any]) -> None:
        self._set_property('kwargs', dict(value))

    @property
    def downloads(self) -> List[Downloader]:
        """A copy of the list of added downloads, oldest first."""
        with self._cond:
            return list(self._downloads)

    # -- control ----------------------------------------------------------------

    def add(self, d: Union[str, Downloader]) -> Downloader:
        """Add a URL (made into ``Downloader(url, **kwargs)``) or a
        ``Downloader``; return the downloader. Emits ``add``."""
        if not isinstance(d, Downloader):
            d = Downloader(d, **self._kwargs)
        with self._cond:
            if d in self._downloads:
                return d
            self._downloads.append(d)
        d._restarts_itself = False
        d._cancel_restart()
        d._shared_buckets = (self._bucket,)
        d.listen('state-changed', self._on_state_changed)
        self.emit('add', self, d)
        self.update()
        return d

    def remove(self, d: Downloader) -> None:
        """Forget ``d`` (a running download is not stopped). Emits
        ``remove``; ``ValueError`` if it was not added."""
        with self._cond:
            self._downloads.remove(d)
            self._starting.discard(d)
            self._stopped_at.pop(d, None)
        d.unlisten('state-changed', self._on_state_changed)
        d._shared_buckets = ()
        d._restarts_itself = True
        self.emit('remove', self, d)
        self.update()

    def start(self) -> None:
        """Start the manager thread. It runs while there is work: until
        ``stop()`` or until every download is complete or fatal."""
        with self._cond:
            self._started = True
        self.update()

    def stop(self) -> None:
        """Stop the manager thread (downloads keep running: see
        ``stop_all``). Waits for the thread unless called from it."""
        with self._cond:
            self._started = False
            # detached: a start() from now on gets a thread of its own, and
            # this one ends at its next look, whatever start() does meanwhile
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def stop_all(self) -> None:
        """Pause every running download; the manager keeps running."""
        for d in self.downloads:
            d.stop()

    def update(self) -> None:
        """Ask the manager thread to re-plan now: which downloads to start
        or stop. Any thread; never blocks on the network."""
        with self._cond:
            self._replan = True
            if self._started and self._thread is None:
                self._thread = threading.Thread(target=self._run, name='bitpit-manager')
                self._thread.start()
            self._cond.notify_all()

    def _on_state_changed(self, d: Downloader, old_state: str) -> None:
        """Note when a download stopped and re-plan if that freed a slot.
        Runs on the download's thread."""
        state = d.state
        if state in _ACTIVE_STATES:
            return  # a download getting under way frees no slot
        with self._cond:
            self._starting.discard(d)
            if state in ('error', 'pause'):
                self._stopped_at[d] = time.monotonic()
            self._replan = True
            self._cond.notify_all()

    # -- the manager thread ----------------------------------------------------

    def _run(self) -> None:
        """Re-plan whenever notified, or when the next restart becomes due.
        Ends when stopped (or replaced by a newer thread after a stop), or
        when every download is finished. The manager thread."""
        me = threading.current_thread()
        wait: Optional[float] = None
        while True:
            with self._cond:
                if self._started and not self._replan and self._thread is me:
                    self._cond.wait(wait)
                if self._thread is not me:
                    return  # stopped: stop() has detached this thread
                if not self._started:
                    self._thread = None
                    return
                self._replan = False
                to_stop, to_start, wait = self._plan()
                if not (to_stop or to_start or self._unfinished()):
                    self._thread = None
                    return
            for d in to_stop:
                d.stop()
            for d in to_start:
                d.start()

    def _unfinished(self) -> bool:
        return any(d.state not in _FINISHED_STATES for d in self._downloads)

    def _plan(self) -> Tuple[List[Downloader], List[Downloader], Optional[float]]:
        """Decide, under the lock, which downloads to stop and start, and how
        long until the next restart becomes due (``None``: none pending)."""
        now = time.monotonic()
        limit = self._max_running if self._max_running > 0 else len(self._downloads)
        running = [d for d in self._downloads
                   if d in self._starting or d.state in _ACTIVE_STATES]
        to_stop = running[limit:]
        running = set(running)
        free = limit - len(running)
        to_start: List[Downloader] = []
        wait: Optional[float] = None
        for d in self._downloads:
            if free <= 0:
                break
            if d in running or d.state in _FINISHED_STATES:
                continue
            stopped_at = self._stopped_at.get(d)
            delay = 0.0
            if stopped_at is not None:
                delay = max(self._restart_wait, d._retry_after or 0) - (now - stopped_at)
            if delay > 0:
                wait = delay if wait is None else min(wait, delay)
                continue
            to_start.append(d)
            self._starting.add(d)
            free -= 1
        return to_stop, to_start, wait


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

_CLI_RESTART_WAIT = 5
_CLI_RETRIES = 5
_CLI_TIMEOUT = 10
_CLI_REFRESH = 0.25  # seconds between two redraws of the live table
_CLI_SPEED_PERIOD = 0.5  # seconds over which the speeds shown are measured
_EXIT_OK, _EXIT_FAILED, _EXIT_USAGE, _EXIT_INTERRUPTED = 0, 1, 2, 130

_CLI_EPILOG = """\
RATE is in bytes per second, optionally with k (KiB) or m (MiB):
2048, 100k, 0.5m, 1M. 0 means no limit.

examples:
  bitpit https://example.com/a.iso https://example.com/b.iso
      download two files into the current directory
  bitpit -r 1m -m 2 -d downloads -i urls.txt
      the URLs listed in urls.txt, two at a time, 1 MiB/s in total,
      into the directory downloads
  bitpit -o debian.iso https://example.com/debian-12.7.0-amd64-netinst.iso
      choose the file's name
  grep iso list.txt | bitpit -q -i -
      URLs from standard input; print nothing but errors
  bitpit --checksum sha256:9f86d081884c7d65... https://example.com/a.iso
      fail (exit 1) unless the file has this SHA-256 digest
  bitpit -H 'Authorization: Bearer TOKEN' --proxy http://proxy:3128 URL
      send a header with every request, through a proxy

A file that already exists is resumed, not downloaded again: after an
interruption (Ctrl-C), run the same command again. Two URLs with the same
file name are saved as name.ext, name.1.ext, ...

exit status: 0 every download complete, 1 a download failed,
2 usage error, 130 interrupted.
"""


def main(urls: List[str], rate_limit: Union[str, float] = '0', max_running: int = 5) -> int:
    """Download every URL into the current directory, at most
    ``max_running`` at a time under one total ``rate_limit`` (bytes per
    second, or a string such as ``'100k'`` or ``'0.5m'``), and show their
    progress on standard output. Return the exit status: 0 when every
    download completed, 1 when one failed, 130 when interrupted (the partial
    files stay and are resumed next time). Raises ``ValueError`` for an
    invalid rate or URL."""
    if isinstance(urls, str):
        urls = [urls]
    rate = _parse_rate(rate_limit)
    urls = list(dict.fromkeys(urls))
    for url in urls:
        _check_url(url)
    return _download_all(_assign_paths(urls, None), rate_limit=rate,
                         max_running=max_running, restart_wait=_CLI_RESTART_WAIT,
                         downloader_kwargs={'timeout': _CLI_TIMEOUT,
                                            'retries': _CLI_RETRIES},
                         quiet=False)


def _build_parser() -> Any:
    """The ``bitpit`` command's argument parser: every option is declared
    here; ``_downloader_kwargs`` turns the per-download ones into
    ``Downloader`` arguments."""
    import argparse

    def rate(text: str) -> int:
        try:
            return _parse_rate(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def number(convert: Callable[[str], Any], positive: bool = False) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            try:
                value = convert(text)
            except ValueError:
                raise argparse.ArgumentTypeError('not a number: {!r}'.format(text)) from None
            if not 0 <= value < float('inf') or (positive and value == 0):
                raise argparse.ArgumentTypeError('must be {}: {!r}'.format(
                    'more than 0' if positive else '0 or more', text))
            return value
        return parse

    parser = argparse.ArgumentParser(
        prog='bitpit', epilog=_CLI_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Download URLs over HTTP(S), several at a time, under one\n'
                    'total rate limit, resuming partial files.')
    parser.add_argument('urls', nargs='*', metavar='URL',
                        help='an http:// or https:// URL to download')
    parser.add_argument('-r', '--rate-limit', metavar='RATE', type=rate, default=0,
                        help='total bytes per second over all downloads '
                             '(default: no limit)')
    parser.add_argument('-m', '--max-running', metavar='N', type=number(int), default=5,
                        help='downloads running at once, 0 for no limit '
                             '(default: %(default)s)')
    parser.add_argument('-d', '--dir', metavar='DIR',
                        help='save the files in DIR, created if missing '
                             '(default: the current directory)')
    parser.add_argument('-o', '--output', metavar='FILE',
                        help='save the one URL as FILE (inside DIR with -d)')
    parser.add_argument('-i', '--input-file', metavar='FILE', action='append', default=[],
                        help='read URLs from FILE, one a line, - for standard input; '
                             'blank lines and # comments are skipped (repeatable)')
    parser.add_argument('--restart-wait', metavar='S', type=number(float),
                        default=_CLI_RESTART_WAIT,
                        help='seconds before retrying a failed download '
                             '(default: %(default)s)')
    parser.add_argument('--retries', metavar='N', type=number(int), default=_CLI_RETRIES,
                        help='retry a failing download at most N times in a row, '
                             'then give up (default: %(default)s)')
    parser.add_argument('--timeout', metavar='S', type=number(float, positive=True),
                        default=_CLI_TIMEOUT,
                        help='seconds without receiving a byte before an attempt '
                             'fails (default: %(default)s)')
    parser.add_argument('--checksum', metavar='ALG:HEX',
                        help='verify the download (one URL) against this digest, e.g. '
                             'sha256:9f86d0...; any hashlib algorithm')
    parser.add_argument('-H', '--header', metavar="'NAME: VALUE'", action='append', default=[],
                        help='send this header with every request (repeatable)')
    parser.add_argument('--user-agent', metavar='TEXT',
                        help='the User-Agent header (default: bitpit/VERSION)')
    parser.add_argument('--user', metavar='USER:PASSWORD',
                        help='HTTP Basic credentials (default: from the URL, else ~/.netrc); '
                             'never sent to another host after a redirect')
    parser.add_argument('--proxy', metavar='URL',
                        help='use this HTTP proxy, http://[user:pass@]host:port; \'\' for none '
                             '(default: http_proxy, https_proxy, no_proxy)')
    parser.add_argument('--cacert', metavar='FILE',
                        help='trust the CA certificates in this PEM file for HTTPS')
    parser.add_argument('-q', '--quiet', action='store_true',
                        help='print nothing but errors (on standard error)')
    parser.add_argument('--version', action='version', version='%(prog)s ' + __version__)
    return parser


def _downloader_kwargs(parser: Any, args: Any, url_count: int) -> Dict[str, Any]:
    """The ``Downloader`` keyword arguments the parsed options ask for; a
    usage error (``parser.error``) for a malformed one."""
    kwargs: Dict[str, Any] = {'timeout': args.timeout, 'retries': args.retries}
    headers = {}
    for header in args.header:
        name, colon, value = header.partition(':')
        if not colon or not name.strip() or any(c in header for c in '\r\n\0'):
            parser.error("-H takes 'Name: value', not {!r}".format(header))
        headers[name.strip()] = value.strip()
    if args.user_agent is not None:
        headers['User-Agent'] = args.user_agent
    if headers:
        kwargs['headers'] = headers

    def check(option: str, parse: Callable[[str], Any], value: str) -> None:
        try:
            parse(value)
        except ValueError as exc:  # InvalidURLError included
            parser.error('{}: {}'.format(option, exc))

    if args.checksum is not None:
        if url_count != 1:
            parser.error('--checksum takes one URL, not {}'.format(url_count))
        check('--checksum', _parse_checksum, args.checksum)
        kwargs['checksum'] = args.checksum
    if args.proxy is not None:
        if args.proxy:
            check('--proxy', _parse_proxy, args.proxy)
        kwargs['proxy'] = args.proxy
    if args.user is not None:
        user, colon, password = args.user.partition(':')
        if not colon:
            parser.error('--user takes USER:PASSWORD')
        kwargs['auth'] = (user, password)
    if args.cacert is not None:
        try:
            kwargs['ssl_context'] = ssl.create_default_context(cafile=args.cacert)
        except (OSError, ssl.SSLError) as exc:
            parser.error('--cacert: cannot load {}: {}'.format(args.cacert, exc))
    return kwargs


def _cli(argv: Optional[List[str]] = None) -> int:
    """The ``bitpit`` command: parse ``argv`` (default ``sys.argv[1:]``),
    download, and return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_intermixed_args(argv)
        jobs = _cli_jobs(parser, args, _cli_urls(parser, args))
        downloader_kwargs = _downloader_kwargs(parser, args, len(jobs))
    except SystemExit as exc:  # --help, --version or a usage error
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or _EXIT_OK
        return _EXIT_USAGE
    if not jobs:
        if not args.quiet:
            print('bitpit: no URL to download', file=sys.stderr)
        return _EXIT_OK
    for directory in {path.parent for _, path in jobs}:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print('bitpit: cannot create directory {}: {}'.format(directory, exc),
                  file=sys.stderr)
            return _EXIT_FAILED
    return _download_all(jobs, rate_limit=args.rate_limit, max_running=args.max_running,
                         restart_wait=args.restart_wait,
                         downloader_kwargs=downloader_kwargs, quiet=args.quiet)


_INPUT_COMMENT_RE = re.compile(r'(?:^|\s)#')


def _cli_urls(parser: Any, args: Any) -> List[str]:
    """The URLs of the arguments, then of each ``-i`` file, each once.
    A usage error (``parser.error``) for no URL at all, an unreadable file
    or an invalid URL."""
    if not args.urls and not args.input_file:
        parser.error('no URL given: name URLs, or a file of URLs with -i FILE')
    found = [(url, '') for url in args.urls]
    for name in args.input_file:
        try:
            if name == '-':
                text = sys.stdin.read()
            else:
                with open(name, encoding='utf-8-sig') as f:
                    text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error('cannot read {}: {}'.format(name, exc))
        for number, line in enumerate(text.splitlines(), 1):
            url = _INPUT_COMMENT_RE.split(line, 1)[0].strip()
            if url:
                where = 'standard input' if name == '-' else name
                found.append((url, '{} line {}'.format(where, number)))
    for url, where in found:
        try:
            _check_url(url)
        except InvalidURLError as exc:
            parser.error('{} ({})'.format(exc, where) if where else str(exc))
    return list(dict.fromkeys(url for url, _ in found))


def _cli_jobs(parser: Any, args: Any, urls: List[str]) -> List[Tuple[str, pathlib.Path]]:
    """Pair each URL with the file it is saved to (``-d``, ``-o``)."""
    if not urls or args.output is None:
        return _assign_paths(urls, args.dir)
    if len(urls) != 1:
        parser.error('-o/--output takes one URL, not {}: use -d DIR for several'
                     .format(len(urls)))
    output = pathlib.Path(args.output).expanduser()
    if args.dir:
        output = pathlib.Path(args.dir).expanduser() / output
    if output.is_dir():
        parser.error('-o/--output: {} is a directory: use -d DIR'.format(args.output))
    return [(urls[0], output)]


def _assign_paths(urls: List[str], directory: Optional[str]
                  ) -> List[Tuple[str, pathlib.Path]]:
    """Pair each URL with a file in ``directory`` (default: the current
    one) named after the URL. A name an earlier URL of the list already
    took gets a number: ``name.1.ext``, ``name.2.ext``... A file that
    exists on disk is not avoided: it is resumed."""
    base = pathlib.Path(directory).expanduser() if directory else pathlib.Path()
    taken = set()
    jobs = []
    for url in urls:
        name = _filename_from_url(url)
        stem, ext = _split_extension(name)
        number = 0
        while name.casefold() in taken:
            number += 1
            name = _fit_name(stem, '.{}{}'.format(number, ext))
        taken.add(name.casefold())
        jobs.append((url, base / name))
    return jobs


def _split_extension(name: str) -> Tuple[str, str]:
    """``('name', '.ext')``; ``.tar.gz`` and the like count as one
    extension; a name without one (or a dot file) gives ``(name, '')``."""
    stem, _, ext = name.rpartition('.')
    if not stem.strip('.'):
        return name, ''
    if stem.lower().endswith('.tar') and stem[:-4].strip('.'):
        return stem[:-4], stem[-4:] + '.' + ext
    return stem, '.' + ext


class _Event:
    """A state change as it happened, for the plain log lines."""
    __slots__ = ('downloader', 'state', 'error', 'downloaded', 'size')

    def __init__(self, downloader: Downloader, state: str,
                 error: Optional[BaseException], downloaded: int, size: int):
        self.downloader = downloader
        self.state = state
        self.error = error
        self.downloaded = downloaded
        self.size = size


def _download_all(jobs: List[Tuple[str, pathlib.Path]], *, rate_limit: float,
                  max_running: int, restart_wait: float,
                  downloader_kwargs: Dict[str, Any], quiet: bool) -> int:
    """Run every ``(url, path)`` through one ``Manager`` until each is
    complete or fatal, showing the progress; return the exit status. On
    ``KeyboardInterrupt`` pause everything (the partial files resume next
    time) and return 130."""
    cond = threading.Condition()
    events: List[_Event] = []

    def state_changed(d: Downloader, old: str) -> None:
        # On the download thread, which alone changes the state: the
        # snapshot is what this state change was.
        event = _Event(d, d.state, d.last_exception, d.downloaded, d.size)
        with cond:
            events.append(event)
            cond.notify_all()

    kwargs = {'update_period': _CLI_SPEED_PERIOD}
    kwargs.update(downloader_kwargs)
    downloads: List[Downloader] = []
    progress = _Progress(downloads, quiet)
    manager = Manager(max_running=max_running, rate_limit=rate_limit,
                      restart_wait=restart_wait)
    try:
        for url, path in jobs:
            d = Downloader(url, path, **kwargs)
            d.listen('state-changed', state_changed)
            downloads.append(d)
        for d in downloads:
            manager.add(d)
        manager.start()
        while True:
            with cond:
                finished = all(d.state in _FINISHED_STATES for d in downloads)
                if not finished and not events:
                    # Woken by every state change. The time-out only paces
                    # the live table, and otherwise lets Ctrl-C through on
                    # systems where a plain wait cannot be interrupted.
                    cond.wait(progress.wait_time())
                    finished = all(d.state in _FINISHED_STATES for d in downloads)
                batch = events[:]
                del events[:]
            progress.report(batch)
            if finished:
                break
        manager.stop()
        for d in downloads:
            d.join()
        progress.close()
        failed = any(d.state != 'complete' for d in downloads)
        return _EXIT_FAILED if failed else _EXIT_OK
    except KeyboardInterrupt:
        _pause_all(manager)
        progress.close(interrupted=True)
        return _EXIT_INTERRUPTED
    except BaseException:
        _pause_all(manager)  # leave no download thread running behind
        raise
    finally:
        for d in downloads:
            d.unlisten('state-changed', state_changed)


def _pause_all(manager: Manager) -> None:
    """Stop the manager and pause its downloads, even if Ctrl-C is pressed
    again meanwhile."""
    while True:
        try:
            manager.stop()
            manager.stop_all()
            return
        except KeyboardInterrupt:
            continue


class _Progress:
    """What the command line shows, from the main thread: on a terminal a
    table redrawn in place; otherwise one line per state change and a
    summary; with ``quiet`` only the failures, on standard error."""

    def __init__(self, downloads: List[Downloader], quiet: bool):
        self.downloads = downloads
        self.quiet = quiet
        self.live = not quiet and _isatty(sys.stdout) and _enable_ansi(sys.stdout)
        self.drawn = 0  # lines of the table now on the screen
        self.next_draw = 0.0

    def wait_time(self) -> float:
        """How long the main thread may wait for a state change."""
        if self.live:
            return max(0.01, self.next_draw - time.monotonic())
        return 0.5

    def report(self, batch: List[_Event]) -> None:
        """Show these state changes, and redraw the table when it is due."""
        if self.live:
            if time.monotonic() >= self.next_draw:
                self.draw()
            return
        for event in batch:
            if not self.quiet:
                _write(sys.stdout, _plain_line(event))
            elif event.state == 'fatal-error':
                _write(sys.stderr, _plain_line(event))

    def close(self, interrupted: bool = False) -> None:
        """The last words: final table or summary, failures, interruption."""
        if self.live:
            self.draw()
            for d in self.downloads:
                if d.state == 'fatal-error':
                    _write(sys.stderr, _plain_line(_Event(d, d.state, d.last_exception,
                                                          d.downloaded, d.size)))
        elif not self.quiet and not interrupted:
            _write(sys.stdout, _summary(self.downloads))
        if interrupted:
            paused = sum(d.state not in _FINISHED_STATES for d in self.downloads)
            _write(sys.stderr, 'bitpit: interrupted; {} unfinished download{} paused: run '
                               'the same command again to resume\n'
                   .format(paused, '' if paused == 1 else 's'))

    def draw(self) -> None:
        """Rewrite the table over its previous copy: back to its first line,
        each line cleared to its end, anything below a shorter table erased.
        Lines are kept shorter than the terminal so that none wraps."""
        import shutil
        columns, lines = shutil.get_terminal_size()
        width = max(columns - 1, 20)
        shown, hidden = _visible_rows(self.downloads, max(lines - 2, 1))
        rows = [_table_row(d, width) for d in shown]
        if hidden:
            rows.append('... and {} more'.format(hidden))
        rows.append(_fit(_summary(self.downloads).rstrip('\n'), width))
        text = '\r\x1b[{}A'.format(self.drawn) if self.drawn else '\r'
        text += ''.join(row + '\x1b[K\n' for row in rows) + '\x1b[J'
        _write(sys.stdout, text)
        self.drawn = len(rows)
        self.next_draw = time.monotonic() + _CLI_REFRESH


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _enable_ansi(stream: Any) -> bool:
    """Whether the terminal understands ANSI escapes (switched on in a
    Windows console)."""
    if os.name != 'nt':
        return True
    try:
        import ctypes
        import msvcrt
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = msvcrt.get_osfhandle(stream.fileno())  # type: ignore[attr-defined]
        mode = ctypes.c_uint32()
        if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            return False
        return bool(kernel32.SetConsoleMode(handle, mode.value | 0x0004))
    except Exception:
        return False


def _write(stream: Any, text: str) -> None:
    """Write and flush; characters the stream cannot encode are replaced,
    and a closed stream (e.g. a pipe to ``head``) is ignored."""
    try:
        try:
            stream.write(text)
        except UnicodeEncodeError:
            encoding = getattr(stream, 'encoding', None) or 'ascii'
            stream.write(text.encode(encoding, 'replace').decode(encoding))
        stream.flush()
    except (OSError, ValueError):
        pass


def _printable(text: str) -> str:
    """``text`` with control and format characters (escapes, bidi marks)
    replaced by ``?``, so that a name cannot drive the terminal."""
    import unicodedata
    return ''.join('?' if unicodedata.category(c)[0] == 'C' else c for c in text)


def _cell_width(char: str) -> int:
    import unicodedata
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in 'WF' else 1


def _fit(text: str, width: int, middle: bool = False) -> str:
    """``text`` cut to at most ``width`` terminal cells, at its end or, with
    ``middle``, in its middle (keeping a file name's extension)."""
    if sum(map(_cell_width, text)) <= width:
        return text
    if width <= 2:
        middle = False

    def take(chars: Any, room: int) -> str:
        kept = []
        for c in chars:
            room -= _cell_width(c)
            if room < 0:
                break
            kept.append(c)
        return ''.join(kept)

    if not middle:
        return take(text, width)
    head = take(text, (width - 2 + 1) // 2)
    tail = take(reversed(text), (width - 2) // 2)[::-1]
    return head + '..' + tail


def _name(d: Downloader) -> str:
    path = d.path
    return _printable(path.name if isinstance(path, pathlib.Path) else repr(path))


def _human(n: float, per_second: bool = False) -> str:
    number, suffix = human_readable(n)
    text = '{} {}'.format(int(number), suffix) if suffix == 'B' else \
        '{:.1f} {}'.format(number, suffix)
    return text + '/s' if per_second else text


def _human_eta(eta: Optional[datetime.timedelta]) -> str:
    if eta is None:
        return '?'
    seconds = int(eta.total_seconds())
    return '{}:{:02}:{:02}'.format(seconds // 3600, seconds // 60 % 60, seconds % 60)


def _error_text(error: Optional[BaseException]) -> str:
    return _printable(str(error)) if error is not None else 'unknown error'


def _plain_line(event: _Event) -> str:
    """One log line for a state change: state, file name, details."""
    d, state, downloaded = event.downloader, event.state, event.downloaded
    size = _human(event.size) if event.size >= 0 else 'size unknown'
    if state == 'start':
        detail = d.url if downloaded == 0 else 'resuming at {}: {}'.format(
            _human(downloaded), d.url)
    elif state == 'download':
        detail = size if downloaded == 0 else 'from {} of {}'.format(
            _human(downloaded), size)
    elif state == 'complete':
        detail = _human(downloaded)
    elif state in ('error', 'fatal-error'):
        detail = _error_text(event.error)
        if state == 'error':
            detail += ' (will retry)'
    else:
        detail = '{} of {}'.format(_human(downloaded), size)
    return '{:<11} {}  {}\n'.format(state, _name(d), _printable(detail))


def _summary(downloads: List[Downloader]) -> str:
    """``running N | completed N / N``, then failures and total speed."""
    running = sum(d.state in _ACTIVE_STATES for d in downloads)
    completed = sum(d.state == 'complete' for d in downloads)
    failed = sum(d.state == 'fatal-error' for d in downloads)
    text = 'running {} | completed {} / {}'.format(running, completed, len(downloads))
    if failed:
        text += ' | failed {}'.format(failed)
    if running:
        text += ' | ' + _human(sum(d.speed for d in downloads), per_second=True)
    return text + '\n'


_ROW_RANK = {'download': 0, 'start': 0, 'error': 1, 'fatal-error': 2, 'pause': 3,
             'complete': 4}


def _visible_rows(downloads: List[Downloader], room: int) -> Tuple[List[Downloader], int]:
    """The downloads that fit in ``room`` lines (running ones first, then
    failed, waiting, complete; in their order) and how many are left out.
    A left-out count takes a line of its own."""
    if len(downloads) <= room:
        return downloads, 0
    room = max(room - 1, 0)
    order = sorted(range(len(downloads)),
                   key=lambda i: (_ROW_RANK.get(downloads[i].state, 3), i))
    chosen = sorted(order[:room])
    return [downloads[i] for i in chosen], len(downloads) - len(chosen)


def _table_row(d: Downloader, width: int) -> str:
    """``s  speed  downloaded  percent [bar]  eta  name``, at most ``width``
    cells; the bar shrinks or goes on a narrow terminal, the name is cut in
    its middle."""
    state = d.state
    running = state in _ACTIVE_STATES
    speed = _human(d.speed, per_second=True) if running else ''
    percent = '?' if d.ratio < 0 else '{}%'.format(int(min(d.percentage, 100)))
    eta = _human_eta(d.eta) if running else ''
    left = '{} {:>10} {:>9} {:>4} '.format(state[0], speed, _human(d.downloaded), percent)
    room = width - len(left) - 9  # the eta column and its space
    bar_width = min(30, room - 14)  # leave the name at least 12 cells
    if bar_width >= 8:
        left += '[' + d.bar(bar_width) + '] '
        room -= bar_width + 3
    left += '{:>8} '.format(eta)
    name = _fit(_name(d), max(room, 1), middle=True)
    if state in ('error', 'fatal-error'):
        name += ' - ' + _error_text(d.last_exception)
    return _fit(left + name, width)


if __name__ == '__main__':
    sys.exit(_cli())
