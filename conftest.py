"""Shared test tools: the local test servers, fixtures and helpers.

Test modules import helpers from here (``from conftest import ...``; pytest
puts the rootdir on ``sys.path``), never from another test module.

Fixtures
--------
``server``
    A started :class:`FixtureServer` on ``127.0.0.1`` (ephemeral port), closed
    at teardown.
``make_server``
    Factory ``make_server(host='127.0.0.1') -> FixtureServer`` for tests that
    need more than one server.  ``host='localhost'`` binds 127.0.0.1 but
    builds URLs with the host name ``localhost`` (a *different host name* for
    a client, e.g. for cross-host redirects).  Every server made is closed at
    teardown.
``proxy``
    A :class:`ForwardingProxy` (HTTP forwarding and CONNECT) on 127.0.0.1.
``certificate``, ``https_url``
    A self-signed certificate for 127.0.0.1 (module scope) and the URL of an
    HTTPS server using it that serves :data:`HTTPS_DATA`.
Autouse, for every test: the hygiene check (see :func:`_check_hygiene`),
no ambient proxy, a fresh connection pool.

Helpers
-------
``DATA``, ``LOGO``, ``HERE``, ``ETAG``, ``OFFSET``, ``HTTPS_DATA``;
:class:`Recorder`, :func:`download`, :func:`fetch`, :func:`run_until`,
:func:`partial_file`, :func:`sidecar_of`, :func:`bitpit_threads`,
:func:`raw`, :func:`http_date`, :func:`basic`, :func:`run_program`;
:func:`file_looks` (records every look at a file in a block);
:func:`private_workers` (a worker pool of a test's own);
:func:`fenced_blocks` (the fenced code blocks of a document).

Typical use::

    def test_resume(server):
        server.add('/f.bin', b'x' * 1000, truncate_at=400, truncate_once=True)
        url = server.url('/f.bin')
        ...
        assert server.requests[-1].headers['Range'] == 'bytes=400-'

The server is stdlib only (``http.server.ThreadingHTTPServer``), speaks
HTTP/1.1 with keep-alive, and never blocks teardown: stalled handlers are
released, open connections are shut down, threads are joined with a bound.
"""

import base64
import builtins
import contextlib
import datetime
import email.utils
import hashlib
import http.server
import json
import logging
import os
import pathlib
import random
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import bitpit

__all__ = ['FixtureServer', 'Resource', 'RequestRecord', 'ForwardingProxy',
           'DATA', 'LOGO', 'HERE', 'ETAG', 'OFFSET', 'HTTPS_DATA',
           'Recorder', 'download', 'fetch', 'run_until', 'partial_file', 'sidecar_of',
           'bitpit_threads', 'raw', 'read_head', 'http_date', 'basic', 'run_program',
           'FENCE', 'fenced_blocks']

#: sentinel: compute the ETag from the data
_AUTO = object()

#: errors that just mean "the client went away"; handled silently
_DISCONNECT_ERRORS = (BrokenPipeError, ConnectionResetError,
                      ConnectionAbortedError, socket.timeout, TimeoutError)

_RANGE_RE = re.compile(r'^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$', re.IGNORECASE)

#: largest single write when nothing asks for smaller pieces
_PIECE = 256 * 1024


class RequestRecord:
    """One request received by the server.

    Attributes: ``method`` ('GET', 'HEAD', ...), ``path`` (as sent, with any
    query string), ``headers`` (an ``http.client.HTTPMessage``, i.e. an
    ``email.message.Message``: ``headers['range']`` / ``headers.get('If-Range')``
    are case-insensitive, missing -> ``None``), ``conn`` (1-based number of
    the TCP connection it arrived on, to check keep-alive reuse) and
    ``time`` (``time.monotonic()`` at arrival).
    """

    __slots__ = ('method', 'path', 'headers', 'conn', 'time')

    def __init__(self, method, path, headers, conn, when):
        self.method = method
        self.path = path
        self.headers = headers
        self.conn = conn
        self.time = when

    def __repr__(self):
        extra = ''.join(' {}={!r}'.format(k, self.headers[k])
                        for k in ('Range', 'If-Range') if self.headers.get(k))
        return '<{} {} conn={}{}>'.format(self.method, self.path, self.conn, extra)


class Resource:
    """A registered resource (see :meth:`FixtureServer.add` for the options).

    Replaced as a whole by a new ``add`` on the same path, which also resets
    its counters (``truncate_once``, ``status_times``).
    """

    def __init__(self, data, etag=_AUTO, last_modified=None, status=None,
                 status_times=None, headers=None, ignore_range=False,
                 ignore_if_range=False,
                 range_shift=0, wrong_total=None, bare_416=False,
                 status_200_with_range=False, truncate_at=None, truncate_once=False, chunked=False,
                 stall_after=None, stall_before_headers=False, throttle=None,
                 throttle_conn=None, range_faults=None,
                 drop_probability=0.0, change_probability=0.0, seed=None,
                 content_length=None, content_type='application/octet-stream',
                 max_concurrent=None, throttle_piece=None, digest=None):
        self.data = bytes(data)
        self.auto_etag = etag is _AUTO
        if self.auto_etag:
            etag = _etag_of(self.data)
        self.etag = etag
        self.last_modified = last_modified
        self.status = status
        self.status_times = status_times
        self.headers = dict(headers or {})
        self.ignore_range = ignore_range
        self.ignore_if_range = ignore_if_range
        self.range_shift = range_shift
        self.wrong_total = wrong_total
        self.bare_416 = bare_416
        self.status_200_with_range = status_200_with_range
        self.truncate_at = truncate_at
        self.truncate_once = truncate_once
        self.chunked = chunked
        self.stall_after = stall_after
        self.stall_before_headers = stall_before_headers
        self.throttle = throttle
        self.throttle_conn = dict(throttle_conn or {})
        # first byte of a Range -> {'status': S} or {'cut': N}, with 'times'
        self.range_faults = {first: dict(fault, times=fault.get('times', 1))
                             for first, fault in (range_faults or {}).items()}
        self.drop_probability = drop_probability
        self.change_probability = change_probability
        self.rng = random.Random(seed)
        self.content_length = content_length
        self.content_type = content_type
        self.max_concurrent = max_concurrent
        self.throttle_piece = throttle_piece
        self.digest = None if digest is None else _DigestGate(**digest)
        # counters, guarded by lock
        self.lock = threading.Lock()
        self.serving = 0            # GETs being answered now, for max_concurrent
        self.refused = 0            # GETs max_concurrent turned away
        self.requests_seen = 0      # GET + HEAD, for status_times
        self.bodies_sent = 0        # GET responses, for truncate_once

    def current(self, get):
        """``(data, etag)`` to serve now.  For a GET, first draw whether the
        content changes (``change_probability``): new random bytes, length
        within +-25 %, and a new ETag if it is automatic."""
        with self.lock:
            if get and self.change_probability and \
                    self.rng.random() < self.change_probability:
                size = len(self.data)
                size = max(1, size + self.rng.randint(-size // 4, size // 4))
                self.data = self.rng.randbytes(size)
                if self.auto_etag:
                    self.etag = _etag_of(self.data)
            return self.data, self.etag

    def enter(self):
        """Count a GET being answered; ``False`` (not counted) when
        ``max_concurrent`` are already."""
        with self.lock:
            if self.max_concurrent is not None and self.serving >= self.max_concurrent:
                self.refused += 1
                return False
            self.serving += 1
            return True

    def leave(self):
        with self.lock:
            self.serving -= 1

    def fault_for(self, range_header):
        """The fault planned for a GET with this Range (counted), or None."""
        match = _RANGE_RE.match(range_header or '')
        if not match or not match.group(1):
            return None
        with self.lock:
            fault = self.range_faults.get(int(match.group(1)))
            if fault is None or fault['times'] <= 0:
                return None
            fault['times'] -= 1
            return fault

    def chaos(self):
        """Draw this response's misbehaviour: ``(ignore_range, cut_fraction,
        pause_seconds)``; ``cut_fraction`` is None (no cut) or in [0, 1)."""
        p = self.drop_probability
        if not p:
            return False, None, 0.0
        with self.lock:
            rng = self.rng
            if rng.random() >= p:
                return False, None, 0.0
            ignore = rng.random() < 0.3
            cut = rng.random()
            pause = rng.uniform(0.0, 0.3) if rng.random() < 0.5 else 0.0
            return ignore, cut, pause


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, handler, owner):
        self.owner = owner
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        # runs on the accept thread: count the connection right away
        self.owner._connection_opened(request)
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, _DISCONNECT_ERRORS) or self.owner._closed.is_set():
            return
        self.owner.errors.append(exc)
        traceback.print_exc()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'bitpit-test/1.0'
    #: socket timeout for idle keep-alive reads and blocked writes
    timeout = 30

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    # -- plumbing ---------------------------------------------------------

    def setup(self):
        super().setup()
        self.owner = self.server.owner
        self.conn_id = self.owner._register_thread(self.request)

    def handle(self):
        try:
            super().handle()
        except _DISCONNECT_ERRORS:
            self.close_connection = True
        except OSError:
            # e.g. socket shut down by teardown, or EPIPE variants
            self.close_connection = True

    def finish(self):
        try:
            super().finish()
        except (OSError, ValueError):
            pass
        finally:
            self.owner._connection_closed(self.request)

    def do_GET(self):
        self.owner._get_started()
        self._entered = None  # the resource whose max_concurrent counts this GET
        try:
            self._serve(head=False)
        finally:
            if self._entered is not None:
                self._entered.leave()
            self.owner._get_finished()

    def do_HEAD(self):
        self._serve(head=True)

    # -- responses --------------------------------------------------------

    def _serve(self, head):
        owner = self.owner
        owner._record(self)
        res = owner._lookup(self.path)
        if res is None:
            return self._simple(404, b'not found\n', head)
        if callable(res):  # add_raw
            try:
                res(self)
                self.wfile.flush()
            finally:
                self.close_connection = True
            return
        if res.digest is not None:
            gate = res.digest
            refusal = gate.check(self.command, self.path, self.headers.get(gate.asked_header))
            if refusal is not None:
                return self._simple(refusal[0], b'authenticate\n', head, refusal[1])
        with res.lock:
            res.requests_seen += 1
            n_request = res.requests_seen
            if not head:
                res.bodies_sent += 1
            n_body = res.bodies_sent

        if res.status is not None and (res.status_times is None
                                       or n_request <= res.status_times):
            return self._forced_status(res, head)

        if not head:
            if not res.enter():
                return self._simple(503, b'busy\n', head)
            self._entered = res
        fault = None if head else res.fault_for(self.headers.get('Range'))
        if fault is not None and 'status' in fault:
            return self._simple(fault['status'], b'fault\n', head)

        data, etag = res.current(get=not head)
        if self._not_modified(res, etag):
            return self._simple(304, b'', head, {'ETag': etag} if etag else {})
        ignore, cut_frac, pause = (False, None, 0.0) if head else res.chaos()
        total = len(data)
        status, start, end, content_range = 200, 0, total - 1, None
        rng = None if (res.ignore_range or ignore) else \
            self._requested_range(res, etag, total)
        if rng == 'unsatisfiable':
            shown = total if res.wrong_total is None else res.wrong_total
            return self._simple(416, b'', head, {} if res.bare_416 else
                                {'Content-Range': 'bytes */{}'.format(shown)})
        if rng is not None:
            start, end = rng
            if res.range_shift:
                start = min(max(0, start - res.range_shift), max(total - 1, 0))
                end = max(end, start)
            shown = total if res.wrong_total is None else res.wrong_total
            content_range = 'bytes {}-{}/{}'.format(start, end, shown)
            status = 200 if res.status_200_with_range else 206
        body = memoryview(data)[start:end + 1]

        headers = {'Content-Type': res.content_type, 'Accept-Ranges': 'bytes'}
        if res.chunked:
            headers['Transfer-Encoding'] = 'chunked'
        else:
            headers['Content-Length'] = str(len(body))
        if res.content_length is not None:
            headers['Content-Length'] = str(res.content_length)
        if etag is not None:
            headers['ETag'] = etag
        if res.last_modified is not None:
            headers['Last-Modified'] = res.last_modified
        if content_range is not None:
            headers['Content-Range'] = content_range
        headers = _merge(headers, res.headers)

        if res.stall_before_headers:
            owner._stall()
            self.close_connection = True
            return
        self._send_head(status, headers)
        if head:
            return
        if res.content_length is not None:
            self.close_connection = True  # framing is unreliable after this

        cut = None
        if res.truncate_at is not None and (not res.truncate_once or n_body == 1):
            if res.truncate_at < len(body):
                cut = res.truncate_at
        if fault is not None and 'cut' in fault:
            cut = fault['cut']
        if cut_frac is not None:
            chaos_cut = int(cut_frac * len(body))
            cut = chaos_cut if cut is None else min(cut, chaos_cut)
        self._write_body(body, res, cut=cut, pause=pause)

    def _not_modified(self, res, etag):
        """Whether a conditional request (If-None-Match, else
        If-Modified-Since) finds the resource unchanged: a 304."""
        tags = self.headers.get('If-None-Match')
        if tags is not None:
            return etag is not None and (tags.strip() == '*' or etag in
                                         [t.strip() for t in tags.split(',')])
        since = self.headers.get('If-Modified-Since')
        if since is None or res.last_modified is None:
            return False
        try:
            return (email.utils.parsedate_to_datetime(res.last_modified) <=
                    email.utils.parsedate_to_datetime(since))
        except (TypeError, ValueError):
            return False

    def _requested_range(self, res, etag, total):
        """``(start, end)`` inclusive, ``'unsatisfiable'`` or ``None`` (serve
        the whole body: no Range, unparsable/multi Range, failed If-Range)."""
        value = self.headers.get('Range')
        if not value:
            return None
        if_range = self.headers.get('If-Range')
        if if_range is not None and not res.ignore_if_range:
            if_range = if_range.strip()
            etag_ok = (etag is not None and not if_range.startswith('W/')
                       and if_range == etag)
            date_ok = res.last_modified is not None and if_range == res.last_modified
            if not (etag_ok or date_ok):
                return None
        m = _RANGE_RE.match(value)
        if not m or (not m.group(1) and not m.group(2)):
            return None
        first, last = m.group(1), m.group(2)
        if not first:  # suffix: bytes=-N
            n = int(last)
            if n == 0 or total == 0:
                return 'unsatisfiable'
            return max(0, total - n), total - 1
        start = int(first)
        end = int(last) if last else total - 1
        if last and end < start:
            return None
        if start >= total:
            return 'unsatisfiable'
        return start, min(end, total - 1)

    def _forced_status(self, res, head):
        status = res.status
        if status < 200 or status in (204, 304):
            body, headers = b'', {}
        else:
            body = res.data or _reason(status).encode() + b'\n'
            headers = {'Content-Type': 'text/plain', 'Content-Length': str(len(body))}
        self._send_head(status, _merge(headers, res.headers))
        if not head and body:
            self.wfile.write(body)

    def _simple(self, status, body, head, extra=None):
        headers = {'Content-Type': 'text/plain', 'Content-Length': str(len(body))}
        self._send_head(status, _merge(headers, extra or {}))
        if not head and body:
            self.wfile.write(body)

    def _send_head(self, status, headers):
        self.send_response(status, _reason(status))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _write_body(self, body, res, cut=None, pause=0.0):
        """Write ``body`` honouring chunked/throttle/stall_after/``cut``.

        ``cut``: close the connection after that many body bytes (after an
        optional ``pause``).  Stalling waits for ``release()``/teardown, then
        closes the connection.
        """
        owner = self.owner
        total = len(body)
        stall_at = res.stall_after
        rate = res.throttle_conn.get(self.conn_id, res.throttle)
        rate = rate if rate and rate > 0 else None
        piece = max(1, min(_PIECE, int(rate // 50))) if rate else _PIECE
        if rate and res.throttle_piece:
            piece = res.throttle_piece
        t0 = time.monotonic()
        pos = 0
        while True:
            if stall_at is not None and pos >= stall_at:
                owner._stall()
                self.close_connection = True
                return
            if cut is not None and pos >= cut:
                if pause:
                    owner._closed.wait(pause)
                self.close_connection = True
                return
            if pos >= total:
                break
            stop = min(total, pos + piece)
            if stall_at is not None:
                stop = min(stop, stall_at)
            if cut is not None:
                stop = min(stop, cut)
            chunk = body[pos:stop]
            if res.chunked:
                self.wfile.write(b'%x\r\n' % len(chunk) + bytes(chunk) + b'\r\n')
            else:
                self.wfile.write(chunk)
            owner._sent(self.path, self.conn_id, len(chunk))
            pos = stop
            if rate:
                delay = t0 + pos / rate - time.monotonic()
                if delay > 0 and owner._closed.wait(delay):
                    self.close_connection = True
                    return
        if res.chunked:
            self.wfile.write(b'0\r\n\r\n')


_DIGEST_PARAM_RE = re.compile(r'([A-Za-z0-9*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)')
_DIGEST_HASHLIB = {'MD5': 'md5', 'SHA-256': 'sha256'}


class _DigestGate:
    """HTTP Digest authentication (RFC 7616) in front of a resource, checked
    with hashlib here, independently of bitpit. A request without a right
    answer gets 401 (407 for ``proxy=True``) and a challenge; one answering
    an old nonce gets ``stale=true``. The nonce changes after
    ``stale_after`` requests answered it (``None``: never). A nonce-count
    used twice with one nonce is refused (a replay). ``lock`` guards the
    nonce, its uses and the counts seen; any handler thread."""

    def __init__(self, user, password, realm='bitpit test', algorithm='MD5', qop='auth',
                 stale_after=None, proxy=False):
        self.user, self.password, self.realm = user, password, realm
        self.algorithm, self.qop, self.stale_after = algorithm, qop, stale_after
        self.status = 407 if proxy else 401
        self.asked_header = 'Proxy-Authorization' if proxy else 'Authorization'
        self.challenge_header = 'Proxy-Authenticate' if proxy else 'WWW-Authenticate'
        self.lock = threading.Lock()
        self.nonces = []            # every nonce given, the current one last
        self.uses = 0               # requests the current nonce let through
        self.counts_seen = set()    # (nonce, nc)
        self.stale_sent = 0
        self._new_nonce()

    def _new_nonce(self):
        self.nonces.append(os.urandom(16).hex())
        self.uses = 0

    def _hash(self, text):
        name = _DIGEST_HASHLIB[self.algorithm.upper().replace('-SESS', '')]
        return hashlib.new(name, text.encode('utf-8')).hexdigest()

    def expected(self, method, params):
        """The response a client with the right password sends."""
        ha1 = self._hash('{}:{}:{}'.format(self.user, self.realm, self.password))
        if self.algorithm.upper().endswith('-SESS'):
            ha1 = self._hash('{}:{}:{}'.format(ha1, params['nonce'], params['cnonce']))
        ha2 = self._hash('{}:{}'.format(method, params['uri']))
        if self.qop:
            return self._hash(':'.join([ha1, params['nonce'], params['nc'], params['cnonce'],
                                        params['qop'], ha2]))
        return self._hash(':'.join([ha1, params['nonce'], ha2]))

    def check(self, method, target, authorization):
        """``None`` to let the request through, else ``(status, headers)``."""
        with self.lock:
            stale = False
            if authorization and authorization.startswith('Digest '):
                verdict = self._verdict(method, target, authorization[7:])
                if verdict == 'ok':
                    self.uses += 1
                    if self.stale_after is not None and self.uses >= self.stale_after:
                        self._new_nonce()  # the next request finds it stale
                    return None
                stale = verdict == 'stale'
                self.stale_sent += stale
            challenge = 'Digest realm="{}", nonce="{}", opaque="o-{}", algorithm={}'.format(
                self.realm, self.nonces[-1], self.realm, self.algorithm)
            if self.qop:
                challenge += ', qop="{}"'.format(self.qop)
            if stale:
                challenge += ', stale=true'
            return self.status, {self.challenge_header: challenge}

    def _verdict(self, method, target, text):
        params = {name.lower(): value[1:-1].replace('\\"', '"') if value.startswith('"')
                  else value for name, value in _DIGEST_PARAM_RE.findall(text)}
        needed = ['username', 'realm', 'nonce', 'uri', 'response', 'algorithm']
        if self.qop:
            needed += ['qop', 'nc', 'cnonce']
        if any(name not in params for name in needed) or params['uri'] != target or \
                params['username'] != self.user or params['realm'] != self.realm or \
                params['algorithm'] != self.algorithm or \
                params.get('opaque') != 'o-' + self.realm:
            return 'bad'
        if self.qop and (params['qop'] != 'auth' or not re.fullmatch('[0-9a-f]{8}', params['nc'])):
            return 'bad'
        if params['response'] != self.expected(method, params):
            return 'bad'
        if params['nonce'] != self.nonces[-1]:
            return 'stale' if params['nonce'] in self.nonces else 'bad'
        if self.qop:
            if (params['nonce'], params['nc']) in self.counts_seen:
                return 'bad'
            self.counts_seen.add((params['nonce'], params['nc']))
        return 'ok'


def _peer_closed(sock):
    """Whether the client closed ``sock`` (its end of file is there to read),
    looked at without reading and without waiting, whatever another thread
    does with it meanwhile."""
    try:
        probe = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return True
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b''
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        probe.close()


def _etag_of(data):
    return '"{}"'.format(hashlib.sha256(data).hexdigest()[:20])


def _reason(status):
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return 'Status {}'.format(status)


def _merge(defaults, extra):
    """Headers ``defaults`` overridden case-insensitively by ``extra``; a
    value of ``None`` in ``extra`` removes the header."""
    out = dict(defaults)
    for name, value in extra.items():
        for key in [k for k in out if k.lower() == name.lower()]:
            del out[key]
        if value is not None:
            out[name] = str(value)
    return out


class FixtureServer:
    """A local HTTP/1.1 test server with scriptable resources.

    Attributes (all safe to read from any thread):

    ``host``, ``port``, ``base_url``
        ``base_url`` is ``'http://HOST:PORT'``.
    ``requests``
        A *copy* (list) of :class:`RequestRecord` for every request received,
        in arrival order (recorded before the response is sent).
    ``connections``
        Number of TCP connections accepted so far.
    ``max_open``
        Most TCP connections open at once so far (a connection counts from
        its accept until the client closed it or the server did).
    ``max_concurrent``
        Largest number of GET responses in progress at the same time (across
        all connections) seen so far; ``active`` is the current number.
    ``stalled``
        Number of handlers currently stalled (see ``stall_after``).
    ``errors``
        Unexpected handler exceptions (bugs, not client disconnects).
    """

    #: longest a stalled handler waits for release() before giving up
    stall_limit = 60.0

    def __init__(self, host='127.0.0.1'):
        self.host = host
        bind = '127.0.0.1' if host == 'localhost' else host
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = threading.Event()
        self._resources = {}
        self._requests = []
        self._sockets = {}              # open connection socket -> number
        self._threads = []
        self._release_gen = 0
        self._sent_log = []             # (monotonic time, path, conn, bytes) per write
        self.connections = 0
        self._open_now = set()          # connections open, as the last accept saw them
        self.max_open = 0
        self.active = 0
        self.max_concurrent = 0
        self.stalled = 0
        self.errors = []
        self._httpd = _Server((bind, 0), _Handler, self)
        self.port = self._httpd.server_address[1]
        self.base_url = 'http://{}:{}'.format(host, self.port)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={'poll_interval': 0.05},
            name='fixture-server-{}'.format(self.port), daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------

    def url(self, path='/'):
        """``'http://HOST:PORT' + path``."""
        return self.base_url + path

    def add(self, path, data=b'', **options):
        """Register (or replace) the resource at ``path``; returns its URL.

        Replacing a resource gives it a new automatic ETag if the data
        changed, and resets its counters.  Options (combinable):

        ``etag=`` ETag header value (quotes included); default: a hash of the
            data; ``None``: no ETag header.
        ``last_modified=`` Last-Modified header string (default: none).
            Conditional GETs are answered 304 when ``If-None-Match`` names
            the ETag, or (without it) ``If-Modified-Since`` is not before
            ``last_modified``.
        ``content_type=`` default ``'application/octet-stream'``.
        ``headers={...}`` extra response headers; they override defaults
            case-insensitively and a ``None`` value removes a default header
            (e.g. ``{'Accept-Ranges': None}``).
        ``status=`` force this status (no Range processing); body is ``data``
            or, if empty, a short reason text (none for 1xx/204/304).
        ``status_times=N`` with ``status``: only the first N requests (GET or
            HEAD) get the forced status; later ones are served normally.
        ``ignore_range=True`` always 200 with the whole body.
        ``ignore_if_range=True`` honour Range even when If-Range does not
            match (a server that does not implement If-Range).
        ``range_shift=K`` a range answer starts K bytes earlier than asked
            (negative: later), clamped to the data; Content-Range describes
            what is actually sent.
        ``wrong_total=T`` Content-Range total reported as T (206 and 416).
        ``bare_416=True`` a 416 without Content-Range (no size told).
        ``status_200_with_range=True`` answer a range request with status 200
            but a matching Content-Range and only the requested bytes.
        ``truncate_at=N`` headers announce the full length, but the
            connection is closed after N bytes of *this response's* body (a
            resume from offset X gets bytes X..X+N-1, then is cut again).
        ``truncate_once=True`` with truncate_at: only the first GET is cut.
        ``chunked=True`` Transfer-Encoding: chunked, no Content-Length.
        ``stall_after=N`` after N body bytes (0 = right after the headers)
            stop sending and wait for :meth:`release` or teardown (at most
            ``stall_limit`` s), then close the connection.
        ``stall_before_headers=True`` the same, before the status line.
        ``throttle=B`` pace the body at about B bytes/s, from the start of
            each response (no burst).
        ``throttle_piece=N`` with a throttle: write the body N bytes at a
            time (default: a fiftieth of a second's worth), e.g. 1 KiB
            trickles or 64 KiB bursts at the same average rate.
        ``throttle_conn={N: B}`` pace the bodies sent on the server's N-th
            TCP connection (1-based, see ``RequestRecord.conn``) at B bytes/s
            instead.
        ``range_faults={FIRST: fault}`` a GET whose ``Range`` starts at byte
            FIRST gets a fault instead of its answer: ``{'status': 503}``
            answers that status, ``{'cut': N}`` closes the connection after N
            body bytes; ``'times'`` (default 1) how many such GETs get it.
        ``drop_probability=p``, ``seed=`` chaos: each GET, with probability
            p, misbehaves: it is cut (connection closed) at a random point of
            its body, and independently with probability 0.5 pauses < 0.3 s
            before the cut, with probability 0.3 ignores Range (200 whole
            body).  All draws come from ``random.Random(seed)`` under a lock.
        ``change_probability=q`` (with ``seed=``) chaos: before each GET, with
            probability q, the content changes: new random bytes (length
            within +-25 %) and, unless ``etag=`` was given, a new ETag.
            :meth:`content` tells what the resource holds now.
        ``max_concurrent=N`` a GET that comes while N others of this
            resource are being answered gets 503 (a per-client connection
            cap, as many download hosts have).
        ``digest={'user': U, 'password': P, ...}`` demand HTTP Digest
            authentication (see :class:`_DigestGate` for ``realm``,
            ``algorithm`` ('MD5', 'SHA-256', or either with '-sess'),
            ``qop`` ('auth', or None for RFC 2069), ``stale_after`` and
            ``proxy``): a request without a right answer gets 401 (407 with
            ``proxy=True``, the resource's path then being the absolute URL
            a proxy is asked for). :meth:`digest_gate` gives its state.
        ``content_length=`` Content-Length header sent as this string
            instead (the real body is sent regardless; the connection is then
            closed).
        """
        res = Resource(data, **options)
        with self._lock:
            self._resources[path] = res
        return self.url(path)

    def add_raw(self, path, func):
        """Serve ``path`` with ``func(handler)``: it gets the
        ``BaseHTTPRequestHandler`` and writes raw bytes to ``handler.wfile``
        itself (request line/headers already parsed: ``handler.headers``,
        ``handler.command``).  The connection is closed after ``func``
        returns.  Returns the URL."""
        with self._lock:
            self._resources[path] = func
        return self.url(path)

    def redirect(self, path, location, status=302):
        """Make ``path`` answer ``status`` with ``Location: location`` (used
        verbatim: pass ``server.url('/x')`` for an absolute URL or ``'/x'``
        for a relative one).  Returns the URL of ``path``."""
        return self.add(path, b'', status=status, headers={'Location': location})

    def content(self, path):
        """The bytes ``path`` serves now (``None`` if not a plain resource)."""
        res = self._lookup(path)
        return None if res is None or callable(res) else res.current(get=False)[0]

    def digest_gate(self, path):
        """The :class:`_DigestGate` of ``path`` (its nonces, ``stale_sent``)."""
        return self._lookup(path).digest

    def refused(self, path):
        """How many GETs of ``path`` its ``max_concurrent`` turned away."""
        return self._lookup(path).refused

    def remove(self, path):
        """Forget ``path`` (it answers 404 again)."""
        with self._lock:
            self._resources.pop(path, None)

    @property
    def requests(self):
        with self._lock:
            return list(self._requests)

    def requests_for(self, path, method=None):
        """Records for ``path`` (exact, query included), optionally only one
        method, e.g. ``server.requests_for('/f', 'HEAD') == []``."""
        return [r for r in self.requests
                if r.path == path and (method is None or r.method == method)]

    def bytes_sent(self, path=None, since=0.0, until=float('inf'), conn=None):
        """Body bytes written between the monotonic times ``since`` and
        ``until`` (only for ``path`` and on connection ``conn``, if given)."""
        with self._lock:
            return sum(n for when, where, number, n in self._sent_log
                       if since <= when < until and (path is None or where == path)
                       and (conn is None or number == conn))

    def last_sent(self, path=None):
        """The monotonic time of the last body bytes written (of ``path``),
        ``None`` before any."""
        with self._lock:
            return max((when for when, where, _, _ in self._sent_log
                        if path is None or where == path), default=None)

    def release(self):
        """Let every currently stalled handler finish (it closes its
        connection without sending more).  Later stalls stall again."""
        with self._cond:
            self._release_gen += 1
            self._cond.notify_all()

    def wait_requests(self, n=1, timeout=5.0, path=None):
        """Wait until at least ``n`` requests (to ``path`` if given) have been
        received; returns bool (False on time-out)."""
        def count():
            if path is None:
                return len(self._requests)
            return sum(1 for r in self._requests if r.path == path)
        deadline = time.monotonic() + timeout
        with self._cond:
            while count() < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_sent(self, n, path=None, timeout=5.0):
        """Wait until at least ``n`` body bytes (of ``path``, if given) were
        written; returns bool (False on time-out)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while sum(m for _, where, _, m in self._sent_log
                      if path is None or where == path) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_stalled(self, n=1, timeout=5.0):
        """Wait until at least ``n`` handlers are stalled; returns bool."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.stalled < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self, timeout=2.0):
        """Stop the server: release stalls, stop accepting, shut down open
        connections, join threads (bounded by ``timeout`` overall)."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        # shutdown() waits for serve_forever to notice; bound that wait too
        stopper = threading.Thread(target=self._httpd.shutdown, daemon=True)
        stopper.start()
        wake_serve_forever(self._httpd)
        stopper.join(timeout)
        with self._lock:
            socks = list(self._sockets)
            threads = list(self._threads)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return '<FixtureServer {}>'.format(self.base_url)

    # -- internals (called from handler threads) --------------------------

    def _lookup(self, path):
        with self._lock:
            res = self._resources.get(path)
            if res is None and '?' in path:
                res = self._resources.get(path.split('?', 1)[0])
            return res

    def _record(self, handler):
        rec = RequestRecord(handler.command, handler.path, handler.headers,
                            handler.conn_id, time.monotonic())
        with self._cond:
            self._requests.append(rec)
            self._cond.notify_all()

    def _sent(self, path, conn, n):
        with self._lock:
            self._sent_log.append((time.monotonic(), path, conn, n))
            self._cond.notify_all()  # for wait_sent

    def _connection_opened(self, sock):
        # a client that closes a connection and opens another at once is
        # seen by the accept before the old connection's handler reads its
        # end: look at the others' ends now
        with self._lock:
            others = list(self._open_now)
        ended = [other for other in others if _peer_closed(other)]
        with self._lock:
            self.connections += 1
            self._sockets[sock] = self.connections
            self._open_now.difference_update(ended)
            self._open_now.add(sock)
            self.max_open = max(self.max_open, len(self._open_now))

    def _register_thread(self, sock):
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(threading.current_thread())
            return self._sockets.get(sock, 0)

    def _connection_closed(self, sock):
        with self._lock:
            self._sockets.pop(sock, None)
            self._open_now.discard(sock)

    def _get_started(self):
        with self._lock:
            self.active += 1
            self.max_concurrent = max(self.max_concurrent, self.active)

    def _get_finished(self):
        with self._lock:
            self.active -= 1

    def _stall(self):
        deadline = time.monotonic() + self.stall_limit
        with self._cond:
            gen = self._release_gen
            self.stalled += 1
            self._cond.notify_all()
            try:
                while self._release_gen == gen and not self._closed.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self.stalled -= 1


def wake_serve_forever(httpd):
    """Wake the ``serve_forever`` of ``httpd`` (a socketserver) now rather
    than at its next poll (50 ms, at every test's teardown): its listening
    socket, shut down, reads as ready, and the accept fails, which
    ``serve_forever`` ignores. Then it sees the ``shutdown()`` requested
    (until then it may go round a few times)."""
    try:
        httpd.socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # a platform that refuses it: the poll ends the loop


@pytest.fixture
def make_server():
    """Factory fixture: ``make_server(host='127.0.0.1') -> FixtureServer``.
    All servers made are closed at teardown."""
    made = []

    def factory(host='127.0.0.1'):
        srv = FixtureServer(host)
        made.append(srv)
        return srv

    yield factory
    for srv in made:
        srv.close()


@pytest.fixture
def server(make_server):
    """A started :class:`FixtureServer` on 127.0.0.1 (ephemeral port)."""
    return make_server()


def _background_checkers(items):
    """The ``CHECKERS`` (see test_typing.py) of the test modules of ``items``."""
    modules = {getattr(item, 'module', None) for item in items}
    return [module.CHECKERS for module in modules if hasattr(module, 'CHECKERS')]


def pytest_collection_finish(session):
    """Start the checkers of a run that holds their tests now, niced, so
    that they use the core the test process leaves idle while the other
    tests run. Not in an xdist worker: every worker collects every test,
    but runs only some (a check starts there when its test asks)."""
    if session.config.option.collectonly or hasattr(session.config, 'workerinput'):
        return
    for checkers in _background_checkers(session.items):
        checkers.start()


def pytest_sessionfinish(session):
    """End the checkers (those a failure or ``-x`` left running)."""
    for checkers in _background_checkers(session.items):
        checkers.close()


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'allow_error_log(pattern): the test deliberately makes bitpit log at '
        'ERROR; records whose message matches the regular expression pattern (re.search) '
        'are allowed by the hygiene check, any other ERROR record still fails the test')


#: how long, in all, the hygiene check waits for threads a test left running
HYGIENE_JOIN = 2.0


class _ErrorRecords(logging.Handler):
    """Keeps every record of ERROR or above that reaches it."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(autouse=True)
def _check_hygiene(request):
    """The hygiene check, for every test: fail it when, during the test and
    its fixtures' teardown,

    (a) a thread raised an uncaught exception (``threading.excepthook``);
    (b) the 'bitpit' logger emitted a record at ERROR or above, unless the
        test acknowledges it with ``@pytest.mark.allow_error_log(pattern)``
        and the message matches ``pattern``;
    (c) a non-daemon thread it started is still alive after a join bounded
        by HYGIENE_JOIN seconds in all (the failure names the threads).

    Autouse fixtures are set up in name order, so this one is set up first
    and its checks run after every other fixture has been torn down.
    """
    allowed = []
    for marker in request.node.iter_markers('allow_error_log'):
        if len(marker.args) != 1:
            raise TypeError('allow_error_log takes one pattern, e.g. '
                            "@pytest.mark.allow_error_log('callback .* raised')")
        allowed.append(re.compile(marker.args[0]))
    crashes = []
    errors = _ErrorRecords()
    logger = logging.getLogger('bitpit')
    level = logger.level
    if logger.getEffectiveLevel() > logging.ERROR:
        logger.setLevel(logging.ERROR)
    logger.addHandler(errors)
    before = set(threading.enumerate())
    runs_before = set(bitpit._Run.live)
    old_hook = threading.excepthook
    threading.excepthook = crashes.append
    try:
        yield
        problems = []
        left = threads_left(before, HYGIENE_JOIN)
        if left:
            problems.append('non-daemon threads left running after {} s: {}'.format(
                HYGIENE_JOIN, ', '.join(left)))
        runs = [r for r in list(bitpit._Run.live) if r not in runs_before]
        if runs:  # (their threads ended: a run no worker will end)
            problems.append('{} run(s) of a download left alive'.format(len(runs)))
        for crash in crashes:
            name = crash.thread.name if crash.thread is not None else '<unknown>'
            problems.append('uncaught exception in thread {}:\n{}'.format(
                name, ''.join(traceback.format_exception(
                    crash.exc_type, crash.exc_value, crash.exc_traceback))))
        for record in errors.records:
            message = record.getMessage()
            if not any(pattern.search(message) for pattern in allowed):
                text = '{} logged at {}: {}'.format(record.name, record.levelname, message)
                if record.exc_info:
                    text += '\n' + ''.join(traceback.format_exception(*record.exc_info))
                problems.append(text)
        if problems:
            pytest.fail('hygiene check failed:\n' + '\n'.join(problems), pytrace=False)
    finally:
        threading.excepthook = old_hook
        logger.removeHandler(errors)
        logger.setLevel(level)


def threads_left(before, wait):
    """The names of the non-daemon threads not in ``before`` still alive
    after a join bounded by ``wait`` seconds in all, and of bitpit's
    workers still at a task then (one that waited for work when ``before``
    was taken may have taken up a task since): the hygiene check's (c)."""
    deadline = time.monotonic() + wait
    # bitpit's workers wait a moment for more work once their task is
    # done: a waiting one is no leftover, one still at a task is
    quiet = bitpit._WORKERS.wait_quiet(wait)
    idle = bitpit._Workers.IDLE_NAME
    started = [t for t in threading.enumerate() if not t.daemon and t.name != idle
               and (t not in before or not quiet and t.name.startswith(BITPIT_WORKERS))]
    for thread in started:
        join_started(thread, max(0.0, deadline - time.monotonic()))
    return [t.name for t in started if t.is_alive() and t.name != idle]


def join_started(thread, timeout):
    """``thread.join(timeout)``, also for a thread that is still being
    started, which ``threading.enumerate()`` lists and ``join`` refuses (a
    worker that bitpit starts for a task while a busy one, coming back,
    takes that task first)."""
    deadline = time.monotonic() + timeout
    if thread._started.wait(timeout):
        thread.join(max(0.0, deadline - time.monotonic()))


@pytest.fixture(autouse=True)
def _no_ambient_proxy(monkeypatch):
    """Tests talk to 127.0.0.1 directly, whatever proxy the machine sets;
    the proxy tests set their own. A manager's downloads share what the
    environment and .netrc said for a second: not from an earlier test."""
    for name in AMBIENT_PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.setattr(bitpit, '_SHARED_LOOKUPS',
                        bitpit._HostLookups(-bitpit._SHARED_LOOKUP_SECONDS))


@pytest.fixture(autouse=True)
def _fresh_connection_pool():
    """No test reuses a keep-alive connection of an earlier test's server
    (a new server may get the same port)."""
    yield
    bitpit._POOL.clear()


# ---------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------

HERE = pathlib.Path(__file__).resolve().parent
#: the environment's proxy settings, lower case (bitpit reads either case)
AMBIENT_PROXY_VARIABLES = ('http_proxy', 'https_proxy', 'all_proxy', 'no_proxy')
DATA = bytes(range(256)) * 4096 + b'tail'          # 1 MiB + 4 bytes
LOGO = os.urandom(10102)                           # the tutorial's 10102-byte file
OFFSET = 300000                      # where partial files of DATA stop
ETAG = '"v1"'
HTTPS_DATA = bytes(range(256)) * 2048 + b'end'     # what https_url serves: 512 KiB + 3


# ---------------------------------------------------------------------------
# helpers: downloading and waiting
# ---------------------------------------------------------------------------

class Recorder:
    """Collects a downloader's signals and lets a test wait for a state."""

    def __init__(self, d):
        self.d = d
        self.states = []
        self.speeds = []
        self.sizes = []
        self.cond = threading.Condition()
        d.listen('state-changed', self._on_state)
        d.listen('speed-changed', self._on_speed)
        d.listen('size-changed', lambda d: self.sizes.append(d.size))

    def _on_state(self, d, old):
        with self.cond:
            self.states.append((old, d.state))
            self.cond.notify_all()

    def _on_speed(self, d):
        with self.cond:
            self.speeds.append((time.monotonic(), d.speed, d.state))
            self.cond.notify_all()

    def wait_state(self, *states, timeout=10):
        """Wait until the downloader has entered one of ``states``."""
        with self.cond:
            ok = self.cond.wait_for(lambda: any(new in states for _, new in self.states),
                                    timeout)
        assert ok, 'no state in {} within {} s; saw {}'.format(states, timeout, self.states)

    def wait_for(self, predicate, timeout=10):
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), 'condition not met in time'


ENDS = ('complete', 'error', 'fatal-error', 'pause')


def join_attempt(d, rec, timeout=30):
    """Wait until ``d``'s first attempt has ended, then join its thread. A
    restart due at once may already run the next attempt, so ``is_alive``
    alone cannot tell a hang; the hygiene check finds a thread left over."""
    rec.wait_state(*ENDS, timeout=timeout)
    d.join(timeout)


def download(url, path, **kwargs):
    """Download ``url`` to ``path`` until its first attempt ends;
    ``(downloader, Recorder)``."""
    d = bitpit.Downloader(url, path=path, **kwargs)
    rec = Recorder(d)
    d.start()
    join_attempt(d, rec)
    return d, rec


def fetch(url, path, **kwargs):
    """``download``, for a test that needs only the downloader."""
    return download(url, path, **kwargs)[0]


def run_until(d, rec, *states, timeout=10):
    """Start ``d`` and wait until it enters one of ``states``; then join."""
    d.start()
    rec.wait_state(*states, timeout=timeout)
    d.join(5)


def partial_file(tmp_path, url=None, validator=None, size=None, name='f.bin'):
    """A file holding ``DATA[:OFFSET]``, with a sidecar if ``url`` is given."""
    target = tmp_path / name
    target.write_bytes(DATA[:OFFSET])
    if url is not None:
        sidecar = target.with_name(name + '.bitpit')
        sidecar.write_text(json.dumps({'url': url, 'validator': validator, 'size': size}))
    return target


def landed(path):
    """Bytes written to the file at ``path`` so far: its data extents
    (``SEEK_DATA``/``SEEK_HOLE``), since a file whose space was reserved
    has its full size from the start; 0 while it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if not hasattr(os, 'SEEK_DATA'):
            return size
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


def sidecar_of(target):
    return target.with_name(target.name + '.bitpit')


@contextlib.contextmanager
def file_looks(monkeypatch):
    """Record every look at a file in the block (``os.access``,
    ``os.stat``, ``os.lstat``, ``os.open``, ``open`` and ``_FileStore``'s
    ``load`` and ``load_unshared``): yields the list it appends ``(name,
    args)`` to."""
    calls = []

    def recording(name, real):
        def record(*args, **kwargs):
            calls.append((name, args))
            return real(*args, **kwargs)
        return record
    with monkeypatch.context() as patch:
        for owner, name in ((os, 'access'), (os, 'stat'), (os, 'lstat'), (os, 'open'),
                            (builtins, 'open'), (bitpit._FileStore, 'load'),
                            (bitpit._FileStore, 'load_unshared')):
            patch.setattr(owner, name, recording(name, getattr(owner, name)))
        yield calls


# names of bitpit's workers at a task: a download's signals, its file's disk work
BITPIT_WORKERS = ('bitpit-download', 'bitpit-save', 'bitpit-prepare', 'bitpit-finish')
BITPIT_THREADS = BITPIT_WORKERS + ('bitpit-loop', 'bitpit-restart', 'bitpit-manager')


def private_workers(monkeypatch, idle_seconds=60):
    """A pool of bitpit's own workers for one test (``bitpit._WORKERS``
    until it ends), whose workers wait ``idle_seconds`` for their next
    task, so that which worker takes one, and when an idle one ends, is up
    to the test. It is not hooked to the interpreter's shutdown: the test
    closes it (``close()``, then ``wait_quiet``)."""
    pool = bitpit._Workers()
    pool.IDLE_SECONDS = idle_seconds
    pool._hooked = True
    monkeypatch.setattr(bitpit, '_WORKERS', pool)
    return pool


def bitpit_threads(wait=1.0):
    """bitpit's loop, download, restart and manager threads (and workers
    at a task) still alive after joining them for at most ``wait`` seconds
    in all (a restart timer that just fired may still be returning);
    ``wait=0``: those alive right now."""
    deadline = time.monotonic() + wait
    bitpit._WORKERS.wait_quiet(wait)  # a worker's task ends, not its thread
    threads = [t for t in threading.enumerate() if t.name.startswith(BITPIT_THREADS)]
    for thread in threads:
        join_started(thread, max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive() and t.name.startswith(BITPIT_THREADS)]


def read_head(sock):
    """The bytes received on ``sock`` up to a request's blank line (and
    what came with them), or ``None`` if it closed before."""
    head = b''
    while b'\r\n\r\n' not in head:
        data = sock.recv(65536)
        if not data:
            return None
        head += data
    return head


def raw(text):
    """An add_raw handler that writes ``text`` (str or bytes) and closes."""
    data = text.encode('latin-1') if isinstance(text, str) else text
    return lambda handler: handler.wfile.write(data)


def http_date(seconds_from_now):
    """``(HTTP-date string, naive local datetime)`` of now + the seconds."""
    when = datetime.datetime.now(datetime.timezone.utc) + \
        datetime.timedelta(seconds=seconds_from_now)
    return email.utils.format_datetime(when, usegmt=True), \
        datetime.datetime.fromtimestamp(int(when.timestamp()))


def basic(user, password):
    """The Authorization value of HTTP Basic authentication."""
    return 'Basic ' + base64.b64encode('{}:{}'.format(user, password).encode()).decode()


def run_program(source, url, cwd, home, timeout=30):
    """Run the Python program ``source`` (its ``URL`` replaced by ``url``)
    in a new interpreter that imports this bitpit, with ``HOME=home``."""
    return subprocess.run(**program(source, url, cwd, home), capture_output=True, text=True,
                          timeout=timeout)


def start_program(source, url, cwd, home, stdout, stderr):
    """Start what :func:`run_program` runs, its output going to the open
    files ``stdout`` and ``stderr``, and return at once: the ``Popen``."""
    return subprocess.Popen(**program(source, url, cwd, home), stdout=stdout, stderr=stderr)


def program(source, url, cwd, home):
    """The ``subprocess`` arguments (args, cwd, env) of :func:`run_program`:
    the environment without the machine's proxy settings, as every test's
    (``_no_ambient_proxy``), also when a module's fixture, set up before
    that, starts a program."""
    env = {name: value for name, value in os.environ.items()
           if name.lower() not in AMBIENT_PROXY_VARIABLES}
    env.update(HOME=str(home), PYTHONPATH=str(HERE))
    return {'args': [sys.executable, '-c', source.replace('URL', repr(url))],
            'cwd': str(cwd), 'env': env}


# ---------------------------------------------------------------------------
# the documents' fenced blocks
# ---------------------------------------------------------------------------

FENCE = re.compile(r'^(`{3,})([^\n`]*)\n(.*?)^\1[ \t]*$', re.M | re.S)


def fenced_blocks(path):
    """``(line, language, code)`` of every fenced block of ``path``; the
    language of a ```python elsewhere block is ``python-elsewhere``."""
    text = path.read_text(encoding='utf-8')
    for match in FENCE.finditer(text):
        info = match.group(2).split()
        line = text.count('\n', 0, match.start()) + 1
        language = info[0] if info else ''
        if info[1:] == ['elsewhere']:
            language += '-elsewhere'
        yield line, language, match.group(3)


# ---------------------------------------------------------------------------
# a forwarding proxy
# ---------------------------------------------------------------------------

class ForwardingProxy:
    """A small HTTP proxy on 127.0.0.1: absolute-form GETs are forwarded,
    CONNECT opens a tunnel. ``seen`` records each request line and its
    Proxy-Authorization."""

    def __init__(self):
        self.seen = []
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.url = 'http://127.0.0.1:{}'.format(self.listener.getsockname()[1])
        self.threads = []
        self.sockets = []
        self.closing = False
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, client):
        try:
            self._forward(client)
        except _DISCONNECT_ERRORS:
            pass                # the client or the server went away
        except OSError:
            if not self.closing:
                raise

    def _forward(self, client):
        self.sockets.append(client)
        with client:
            client.settimeout(10)
            head = read_head(client)
            if head is None:
                return
            head, _, rest = head.partition(b'\r\n\r\n')
            lines = head.decode('latin-1').split('\r\n')
            method, target, version = lines[0].split(' ')
            headers = dict(line.split(': ', 1) for line in lines[1:])
            self.seen.append((method, target, headers.get('Proxy-Authorization')))
            if method == 'CONNECT':
                host, port = target.rsplit(':', 1)
                upstream = socket.create_connection((host, int(port)), timeout=10)
                self.sockets.append(upstream)
                client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
            else:
                parts = target.split('/', 3)
                host, _, port = parts[2].partition(':')
                upstream = socket.create_connection((host, int(port or 80)), timeout=10)
                self.sockets.append(upstream)
                kept = [line for line in lines[1:] if not line.lower().startswith(
                    ('proxy-', 'connection'))]
                request = '\r\n'.join(['{} /{} {}'.format(method, parts[3] if len(parts) > 3
                                                          else '', version)] + kept +
                                      ['Connection: close', '', ''])
                upstream.sendall(request.encode('latin-1') + rest)
            with upstream:
                self._relay(client, upstream)

    def _relay(self, a, b):
        sockets = [a, b]
        while not self.closing:
            readable, _, _ = select.select(sockets, [], [], 10)
            if not readable:
                return
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                (b if sock is a else a).sendall(data)

    def close(self):
        """Stop accepting, end the relays (a kept-alive tunnel would hold
        its thread until the relay's 10 s time-out) and join the threads."""
        self.closing = True
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def proxy():
    """A started :class:`ForwardingProxy`, closed at teardown."""
    p = ForwardingProxy()
    yield p
    p.close()


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made with the openssl
    command: returns (cert_file, key_file)."""
    openssl = shutil.which('openssl')
    if openssl is None:
        pytest.skip('the openssl command is needed to make a test certificate')
    folder = tmp_path_factory.mktemp('tls')
    cert, key = folder / 'cert.pem', folder / 'key.pem'
    subprocess.run([openssl, 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
                    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
                    '-keyout', str(key), '-out', str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class _TLSHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', str(len(HTTPS_DATA)))
        self.end_headers()
        self.wfile.write(HTTPS_DATA)

    def log_message(self, *args):
        pass


@pytest.fixture
def https_url(certificate):
    """The URL of an HTTPS server (the ``certificate``) serving HTTPS_DATA."""
    cert, key = certificate
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _TLSHandler)
    httpd.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05},
                              daemon=True)
    thread.start()
    yield 'https://127.0.0.1:{}/secure.bin'.format(httpd.server_address[1])
    wake_serve_forever(httpd)
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


class TLSPeer:
    """A scripted TLS server on 127.0.0.1 that misbehaves on purpose, one
    connection at a time: each accepted connection takes the next of the
    behaviours given to ``script()`` (then ``'ok'``):

    ``'ok'``               a normal answer with ``HTTPS_DATA`` (ranges honoured)
    ``'handshake-eof'``    reads the ClientHello, then closes: an EOF in the
                           handshake
    ``'handshake-reset'``  reads the ClientHello, then resets the connection
    ``'stall'``            accepts and never answers the handshake
    ``'garbage'``          sends half of the body, then raw bytes that are no
                           TLS record
    ``'eof-mid-body'``     sends half of the body, then closes the TCP
                           connection without a TLS close_notify

    ``context`` is the server's ``ssl.SSLContext`` (tests may restrict its
    versions); ``handled`` lists the behaviours of the connections so far,
    ``asked`` the first byte each request asked for (0 without ``Range``)."""

    def __init__(self, certificate):
        cert, key = certificate
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert), str(key))
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._script = []
        self.handled = []
        self.asked = []
        self._closed = threading.Event()
        self._sockets = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name='tls-peer')
        self._thread.start()

    def url(self, path='/f'):
        return 'https://127.0.0.1:{}{}'.format(self.port, path)

    def script(self, *behaviours):
        with self._lock:
            self._script.extend(behaviours)

    def wait_handled(self, n, timeout=5.0):
        """Wait until ``n`` connections were accepted; bool."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.handled) >= n, timeout)

    def _accept(self):
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                behaviour = self._script.pop(0) if self._script else 'ok'
                self.handled.append(behaviour)
                self._sockets.append(conn)
                self._changed.notify_all()
            threading.Thread(target=self._serve, args=(conn, behaviour), daemon=True).start()

    def _serve(self, conn, behaviour):
        try:
            if behaviour == 'stall':
                self._closed.wait(30)
                return
            if behaviour in ('handshake-eof', 'handshake-reset'):
                conn.recv(4096)
                if behaviour == 'handshake-reset':
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b'\x01\x00\x00\x00\x00\x00\x00\x00')
                return
            tls = self.context.wrap_socket(conn, server_side=True)
            request = b''
            while b'\r\n\r\n' not in request:
                chunk = tls.recv(4096)
                if not chunk:
                    return
                request += chunk
            start = 0
            match = re.search(rb'(?i)\r\nrange: bytes=(\d+)-', request)
            with self._lock:
                self.asked.append(int(match.group(1)) if match else 0)
            if match and behaviour == 'ok':
                start = int(match.group(1))
            body = HTTPS_DATA[start:]
            status = '206 Partial Content' if start else '200 OK'
            head = 'HTTP/1.1 {}\r\nContent-Length: {}\r\nETag: "tls"\r\n'.format(
                status, len(body))
            if start:
                head += 'Content-Range: bytes {}-{}/{}\r\n'.format(
                    start, len(HTTPS_DATA) - 1, len(HTTPS_DATA))
            tls.sendall(head.encode() + b'Connection: close\r\n\r\n')
            if behaviour == 'ok':
                tls.sendall(body)
                tls.close()
                return
            tls.sendall(body[:len(body) // 2])
            if behaviour == 'garbage':
                raw = socket.socket(fileno=os.dup(tls.fileno()))
                raw.sendall(b'\x17\x03\x03\x00\x20' + b'\x00' * 32 + b'not tls at all')
                raw.close()
                self._closed.wait(2)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self._closed.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.close()
            except OSError:
                pass
        self._thread.join(2)


@pytest.fixture
def tls_peer(certificate):
    """A started :class:`TLSPeer`, closed at teardown."""
    peer = TLSPeer(certificate)
    yield peer
    peer.close()
