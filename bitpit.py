#!/usr/bin/env python3
"""bitpit: event-driven HTTP(S) downloads with resume, rate limits and a manager.

One file, standard library only. The outline of this file is its table of
contents; each layer uses only the layers above it:

    helpers      human_readable, rates and sizes, file names, URLs, headers
    errors       Error and its subclasses
    emitter      Emitter, the signal base class
    timing       _TokenBucket (rate limits)
    http         cancellation, connections, the pool, request options
                 (headers, credentials, cookies), requests with redirects,
                 and what an answer says about the file
    store        the target file, the byte ranges it holds, its sidecar
    transfer     one attempt over one or more connections and sources
    documents    checksum files and metalinks, which say what the file is
    downloader   Downloader: the public face of one download
    many machines  shard(), a split of a list of URLs; the manifest of the
                 downloads that ended
    manager      Manager: many downloads, one total rate limit
    command line main(), download()
    asyncio      adownload(), and what await d and d.events() use
    command line the ``bitpit`` command

Typical use::

    import bitpit
    path = bitpit.download('https://example.com/file.iso', connections=4)

or, event-driven::

    d = bitpit.Downloader('https://example.com/file.iso', rate_limit=2**20)
    d.listen('state-changed', lambda d, old: print(d.state))
    d.start()
    d.join()
"""

from __future__ import annotations

import bisect
import collections
import contextvars
import errno
import functools
import heapq
import io
import itertools
import math
import os
import random
import re
import select
import selectors
import socket
import stat
import sys
import _thread
import threading
import time
import types
import urllib.parse

# Modules that only some downloads need (ssl, http.client, datetime, json,
# hashlib, email.utils, netrc, base64, zlib, http.cookiejar, urllib.request,
# argparse, logging, pathlib, ...) are imported where they are first used:
# ``import bitpit`` costs little more than the socket and selector modules
# it needs (ssl and http.client were two thirds of it). typing is for
# annotations only; a path is told from a file object by ``os.PathLike``.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import datetime
    import http.client
    import pathlib
    import ssl
    from typing import (Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set,
                        Tuple, Union)
# typing.overload and typing.Generic, stood in for at run time: the last def
# of an overloaded function is the one that runs, and _Generic[_Value] is
# _Generic itself. (The checker's imports come second: there pyflakes looks
# for overload.)
if not TYPE_CHECKING:
    def overload(func):
        return func

    class _Generic:
        def __class_getitem__(cls, parameters):
            return cls
    _Value = None
else:
    import argparse
    import http.cookiejar
    import urllib.request
    from typing import BinaryIO, Mapping, NoReturn, TypeVar, overload
    from typing import Generic as _Generic
    _Value = TypeVar('_Value')  # what an _Option holds
    _T = TypeVar('_T')  # what steps give at their end

__version__ = '2.1.0'
__all__ = [
    'Emitter', 'Downloader', 'Manager', 'human_readable', 'main', 'download', 'adownload',
    'Error', 'HTTPStatusError', 'NetworkError', 'StalledError', 'TLSError',
    'ProtocolError', 'RedirectError', 'IntegrityError', 'FileError',
    'InvalidURLError',
    'shard',
]



class _Logger:
    """``logging.getLogger('bitpit')``, with logging imported at the first
    message (importing it costs more than half of http.client's import)."""

    def __getattr__(self, name: str) -> Any:
        import logging
        return getattr(logging.getLogger('bitpit'), name)


_log = _Logger()

_DEFAULT_CHUNK_SIZE = 256 * 1024
_MAX_CONNECTIONS = 32
_MIN_SPLIT = 1024 * 1024        # no range is split into parts smaller than this
_MAX_PIECE = 64 * 1024 * 1024   # most bytes one ranged request of a split file asks for
_RACE_BLOCK = 256 * 1024        # bytes a racing connection takes per request
_RATE_AGE = 0.1                 # seconds a request runs before its rate tells
_RACE_LATENCY = 0.02            # seconds a racing request costs beyond its bytes
_STALLED_READ = 0.25            # seconds without a byte before a read under way is raced
_FLUSH_AGE = 0.5                # seconds received bytes may wait in a buffer
# seconds of the probe's body that tell what limits it (Windows counts a
# thread's CPU time in ticks of 15.6 ms)
_JUDGE_FIRST = 0.05 if sys.platform == 'win32' else 0.01
_JUDGE_READ = 256 * 1024        # most bytes a read of the probe takes until then
_JUDGE_AGAIN = 0.25             # seconds between later looks while the CPU is the limit
_CPU_BOUND = 0.5                # share of a CPU from which a connection is bound by it ...
_CPU_BOUND_RATE = 64 * 1024 * 1024  # ... when it receives at least this many bytes a second
_UNKNOWN_END = 1 << 62          # the end of a range that only the body's end tells
_SIDECAR_PERIOD = 1.0           # seconds between two sidecar saves while bytes flow
_TEND_PERIOD = 0.25             # seconds between two looks of a download's run at its transfer
_MAX_REDIRECTS = 10
_RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# a request's answers that may lead to another exchange (_Request.send_steps)
_CHALLENGE_OR_REDIRECT = _REDIRECT_STATUSES | {401, 407}
_MAX_RETRY_AFTER = 24 * 3600.0
_ACTIVE_STATES = ('start', 'download')         # an attempt under way
_FINISHED_STATES = ('complete', 'fatal-error')  # nothing more will happen
_RESTARTABLE_STATES = ('error', 'pause')         # neither: may start again
_DEFAULT_NAME = 'index.html'
_SIDECAR_SUFFIX = '.bitpit'
_ROOM_CHECK_FROM = 64 * 1024     # bytes missing from which a file's room is checked
# most bytes of a file whose opening and end (which may read it back to
# check it, reserve its room, sync it) the loop makes itself (a hash of
# 4 MiB takes a few milliseconds); a worker makes a bigger one's
_DISK_WORK_ON_LOOP = 4 * 1024 * 1024
_NEWER_SUFFIX = '.bitpit-new'  # where if_exists='update' puts a new version


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class _Pattern:
    """A regular expression compiled at its first use, so that importing
    bitpit compiles none: ``_Pattern(r'...').fullmatch(text)``."""

    def __init__(self, pattern: str, flags: int = 0):
        self._source = pattern, flags

    def __getattr__(self, name: str) -> Any:
        compiled = re.compile(*self._source)
        for method in ('match', 'fullmatch', 'search', 'sub', 'split'):
            setattr(self, method, getattr(compiled, method))
        return getattr(compiled, name)


_SUFFIXES = ('B', 'KB', 'MB', 'GB', 'TB', 'PB', 'EB', 'ZB', 'YB')


@overload
def human_readable(n: float, digits: int = 3) -> Tuple[float, str]: ...
@overload
def human_readable(n: None, digits: int = 3) -> Tuple[None, None]: ...
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


_AMOUNT_RE = _Pattern(r'^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kKmMgG]?)\s*$')
_AMOUNT_UNITS = {'': 1, 'k': 1024, 'm': 1024 ** 2, 'g': 1024 ** 3}


def _parse_amount(text: Union[str, int, float], what: str = 'rate') -> float:
    """Parse an amount of bytes such as ``2048``, ``100k``, ``0.5m`` or
    ``1G`` (powers of 1024). Raises ``ValueError`` for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    match = _AMOUNT_RE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError('invalid {} {!r}: use a number of bytes, optionally with '
                         'k, m or g (e.g. 100k, 0.5m)'.format(what, text))
    return float(match.group(1)) * _AMOUNT_UNITS[match.group(2).lower()]


def _parse_rate(text: Union[str, int, float]) -> int:
    """A rate in bytes per second, e.g. ``100k``: 0 means no limit.
    ``ValueError`` for a malformed rate, and for one between 0 and 1 byte/s,
    which would otherwise silently mean "no limit"."""
    rate = _parse_amount(text, 'rate')
    if 0 < rate < 1:
        raise ValueError('invalid rate {!r}: a rate is 0 (no limit) or at least '
                         '1 byte/s'.format(text))
    return int(rate)


def _parse_size(text: Union[str, int, float]) -> int:
    """A size in bytes, e.g. ``10m``, ``1g``."""
    return int(_parse_amount(text, 'size'))


# -- option checks: each names the option it checks ----------------------------

_MAX_SECONDS = 1e6   # the longest time-out or period (11.6 days): poll() takes at
                     # most 2**31 ms, Windows' waits at most 2**32 ms


def _check_number(name: str, value: Any, positive: bool = False,
                  low: Optional[float] = None, high: Optional[float] = None) -> float:
    """``value`` if it is a finite real number (not a bool), else
    ``TypeError`` (not a number) or ``ValueError``; with ``positive``,
    ``ValueError`` unless it is more than 0; ``low`` and ``high`` bound it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError('{} must be a number, not {!r}'.format(name, value))
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError('{} must be a finite number, not {!r}'.format(name, value))
    if positive and not value > 0:
        raise ValueError('{} must be more than 0, not {!r}'.format(name, value))
    if low is not None and value < low:
        raise ValueError('{} must be at least {}, not {!r}'.format(name, low, value))
    if high is not None and value > high:
        raise ValueError('{} must be at most {:g}, not {!r}'.format(name, high, value))
    return value


def _check_int(name: str, value: Any, low: Optional[int] = None,
               high: Optional[int] = None) -> int:
    """``value`` if it is an ``int`` within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError('{} must be an int, not {!r}'.format(name, value))
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = 'at least {}'.format(low) if high is None else \
            'from {} to {}'.format(low, high)
        raise ValueError('{} must be {}, not {!r}'.format(name, bounds, value))
    return value


def _check_connections(value: Any) -> int:
    """``value`` if it is an ``int`` from 1 to 32, else ``ValueError`` (the
    SPEC's word for every other value, of any type)."""
    try:
        return _check_int('connections', value, 1, _MAX_CONNECTIONS)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _check_auth(auth: Any) -> Optional[Tuple[str, str]]:
    if auth is None:
        return None
    if not (isinstance(auth, (tuple, list)) and len(auth) == 2 and
            all(isinstance(part, str) for part in auth)):
        raise TypeError('auth must be a (user, password) pair of str, not {!r}'.format(auth))
    return auth[0], auth[1]


# -- file names ------------------------------------------------------------------

_UNSAFE_NAME_CHARS = _Pattern(r'[\x00-\x1f\x7f<>:"/\\|?*]')
_WINDOWS_DEVICE_RE = _Pattern(
    r'^(con|prn|aux|nul|com[0-9\u00b9\u00b2\u00b3]|lpt[0-9\u00b9\u00b2\u00b3])\s*(\.|$)',
    re.IGNORECASE)
# the letters a device name begins with, which ``re.IGNORECASE`` matches
# (no other character does): a name that begins with none is not matched
# against the pattern, a call that costs a third of ``_safe_filename``
_DEVICE_INITIALS = 'cpanlCPANL'
# a name, with the longest suffix bitpit adds (the sidecar of a new
# version, being replaced), stays within the 255 bytes file systems allow
_MAX_NAME_BYTES = 255 - len(_NEWER_SUFFIX + _SIDECAR_SUFFIX + '.tmp')


def _safe_filename(name: str, default: str = _DEFAULT_NAME) -> str:
    """``name`` made safe as one file name inside a directory, on every
    operating system: path separators, ``< > : " | ? *`` and control
    characters become ``_``, trailing dots and spaces go, a Windows device
    name (``CON``, ``nul.txt``, ``COM1``...) gets a ``_`` prefix, and the
    name is cut to ``_MAX_NAME_BYTES`` of UTF-8 keeping its extension (with
    the sidecar's suffix, within the 255 bytes file systems allow). An empty
    name or one made only of dots becomes ``default``."""
    name = _UNSAFE_NAME_CHARS.sub('_', name).strip().rstrip('. ')
    if not name:  # (empty, or only dots: no name ends with a dot now)
        return default
    if name[0] in _DEVICE_INITIALS and _WINDOWS_DEVICE_RE.match(name):
        name = '_' + name
    if 4 * len(name) <= _MAX_NAME_BYTES:  # it fits, at 4 bytes a character at most
        return name
    return _fit_name(*_split_extension(name))


def _fit_name(stem: str, suffix: str) -> str:
    """``stem + suffix`` with ``stem`` shortened so that the name fits in
    ``_MAX_NAME_BYTES`` (an absurd suffix is cut too)."""
    def size(text: str) -> int:
        return len(text.encode('utf-8', 'surrogateescape'))
    if size(stem + suffix) <= _MAX_NAME_BYTES:  # (most names: one encoding)
        return stem + suffix
    if size(suffix) > _MAX_NAME_BYTES // 2:
        stem, suffix = stem + suffix, ''
    room = _MAX_NAME_BYTES - size(suffix)
    while size(stem) > room:
        stem = stem[:-1]
    return stem.rstrip('. ') + suffix


def _split_extension(name: str) -> Tuple[str, str]:
    """``('name', '.ext')``; ``.tar.gz`` and the like count as one
    extension; a name without one (or a dot file) gives ``(name, '')``."""
    stem, _, ext = name.rpartition('.')
    if not stem.strip('.'):
        return name, ''
    if stem.lower().endswith('.tar') and stem[:-4].strip('.'):
        return stem[:-4], stem[-4:] + '.' + ext
    return stem, '.' + ext


_DISPOSITION_EXT = _Pattern(
    r"""filename\*\s*=\s*([\w!#$%&+^`{}~-]+)'[^']*'([^;\s]+)""", re.I)
_DISPOSITION_PLAIN = _Pattern(
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
        name = _header_text(name).rsplit('/', 1)[-1].rsplit('\\', 1)[-1]
        if name:
            return _safe_filename(name)
    return None


def _header_text(value: str) -> str:
    """A header value as the server meant it: http.client decodes header
    bytes as Latin-1, but servers send UTF-8 (names, ``Location``)."""
    try:
        return value.encode('latin-1').decode('utf-8')
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


# -- URLs --------------------------------------------------------------------------

_CONTROL_CHARS_RE = _Pattern(r'[\x00-\x1f\x7f]')  # C0 and DEL, in header values
# in a URL, C1 controls too (a header value may hold UTF-8 bytes as Latin-1)
_URL_CONTROL_CHARS_RE = _Pattern(r'[\x00-\x1f\x7f-\x9f]')
# what may stay as it is in a URL's path, query and fragment; the rest
# (spaces, non-ASCII characters as UTF-8 bytes) is percent-encoded
_URL_SAFE = "/%:@!$&'()*+,;=-._~?#[]"


if TYPE_CHECKING:
    _HostKey = Tuple[str, str, int]  # scheme, host, port
    # what an _Address takes from its URL's scheme and netloc: (host_key,
    # host_name, credentials, host_field)
    _OriginInfo = Tuple[_HostKey, str, Optional[Tuple[str, str]], str]


def _ascii_host(host: str) -> str:
    return host if host.isascii() else host.encode('idna').decode('ascii')


def _ascii_url(url: str, parts: urllib.parse.SplitResult) -> str:
    """``url`` (split: ``parts``) as sent on the wire: the host in IDNA,
    and spaces and non-ASCII characters of the rest percent-encoded as
    UTF-8, as browsers do. Assumes ``_check_url`` accepted it."""
    if url.isascii() and ' ' not in url:
        return url
    netloc = parts.netloc
    host = parts.hostname or ''
    if not host.isascii():
        userinfo, _, hostport = netloc.rpartition('@')
        hostport = hostport.lower().replace(host, _ascii_host(host), 1)
        netloc = (userinfo + '@' if userinfo else '') + hostport

    def encode(part: str) -> str:
        return urllib.parse.quote(part, safe=_URL_SAFE, errors='surrogateescape')
    return urllib.parse.urlunsplit((parts.scheme, netloc, encode(parts.path),
                                    encode(parts.query), encode(parts.fragment)))


def _url_credentials(parts: urllib.parse.SplitResult) -> Optional[Tuple[str, str]]:
    """The user and password written in a URL, or ``None``."""
    if parts.username is None:
        return None
    return (urllib.parse.unquote(parts.username),
            urllib.parse.unquote(parts.password or ''))


def _host_field(host_key: _HostKey) -> str:
    """The ``Host`` value of the requests to ``host_key``'s host on a
    connection to it (or a tunnel to it), as http.client's ``putrequest``
    makes it for each: the host (an IPv6 address in brackets), and its port
    unless the scheme's own."""
    scheme, host, port = host_key
    if ':' in host:
        host = '[' + host + ']'
    return host if port == (443 if scheme == 'https' else 80) else '{}:{}'.format(host, port)


# the _OriginInfo of each (scheme, netloc) checked (the same for every file of
# a server), so that a URL of a known origin is not checked or worked out
# again; emptied when full (any thread: two that race to one make the same)
_ORIGINS: 'Dict[Tuple[str, str], _OriginInfo]' = {}
_MAX_ORIGINS = 256
# the ``scheme://netloc`` text of each origin in ``_ORIGINS``, and its
# _OriginInfo: the address of a URL that begins with it and a ``/`` is
# worked out by ``_known_address``, without ``urlsplit`` (thousands of
# times for a manager's list of one server's files); emptied with
# ``_ORIGINS``
_ORIGIN_TEXTS: 'Dict[str, _OriginInfo]' = {}


def _check_origin(url: str, parts: urllib.parse.SplitResult) -> _OriginInfo:
    """The ``_OriginInfo`` of ``url`` (split: ``parts``) if its scheme is http
    or https and its netloc a host (in ASCII or IDNA) and a valid port,
    else ``InvalidURLError``; remembered in ``_ORIGINS``."""
    try:
        port = parts.port
    except ValueError as exc:
        raise InvalidURLError('malformed URL {!r}: {}'.format(url, exc)) from exc
    scheme = parts.scheme  # (in lower case: urlsplit makes it so)
    if scheme not in ('http', 'https'):
        raise InvalidURLError('unsupported URL scheme in {!r}: only http and https'
                              .format(url))
    host = parts.hostname
    if not host or any(c in host for c in ' %\\'):
        raise InvalidURLError('malformed URL {!r}'.format(url))
    try:
        host_key = (scheme, _ascii_host(host), port or (443 if scheme == 'https' else 80))
    except UnicodeError as exc:
        raise InvalidURLError('malformed host name in {!r}'.format(url)) from exc
    if len(_ORIGINS) >= _MAX_ORIGINS:
        _ORIGINS.clear()
        _ORIGIN_TEXTS.clear()
    origin = _ORIGINS[scheme, parts.netloc] = (host_key, host, _url_credentials(parts),
                                               _host_field(host_key))
    _ORIGIN_TEXTS[scheme + '://' + parts.netloc] = origin
    return origin


class _Address:
    """A URL ``_check_url`` accepted, and what the requests to it need of
    it, worked out once: the ``url`` as given and its ``path`` (which names
    the file); the ``(scheme, host, port)`` its requests connect to
    (``host_key``, the host in ASCII), the ``host_name`` (its
    ``hostname``, as ``.netrc`` and ``no_proxy`` name it), its request
    ``target`` (see ``_ascii_url``) and ``wire_url``, the absolute form a
    plain proxy is asked for (RFC 9112 3.2.2: without the credentials,
    which RFC 9110 4.2.4 keeps off the wire, and the fragment), the
    ``credentials`` written in it, and its ``Host`` field (``host_field``,
    see ``_host_field``). Read-only: any thread."""
    __slots__ = ('url', 'path', 'host_key', 'host_name', 'target', 'credentials', 'host_field')

    def __init__(self, url: str, path: str, origin: _OriginInfo, target: str):
        self.url, self.path = url, path
        self.host_key, self.host_name, self.credentials, self.host_field = origin
        self.target = target

    @property
    def wire_url(self) -> str:
        """Made when asked (only a request through a plain proxy asks):
        not for every address, which every download has."""
        return self.host_key[0] + '://' + self.host_field + self.target


def _address(url: str, parts: urllib.parse.SplitResult) -> _Address:
    """The ``_Address`` of ``url``, split: ``parts`` (its origin checked
    now, unless it was before)."""
    origin = _ORIGINS.get((parts.scheme, parts.netloc))
    if origin is None:  # (else the origin was checked: the same is valid again)
        origin = _check_origin(url, parts)
    ascii_url = _ascii_url(url, parts)
    wire = parts if ascii_url == url else urllib.parse.urlsplit(ascii_url)
    target = wire.path or '/'  # (for a URL without a query, its path itself)
    if wire.query:
        target += '?' + wire.query
    return _Address(url, parts.path, origin, target)


def _check_url(url: str) -> _Address:
    """The ``_Address`` of ``url`` if it is an absolute http(s) URL with a
    host, else ``InvalidURLError``. Spaces and non-ASCII characters are
    allowed (they are encoded when sent); control characters are not. The
    one place a URL is split: whoever needs a part of it takes it from
    the address."""
    if not isinstance(url, str):
        raise InvalidURLError('URL must be a str, not {}'.format(type(url).__name__))
    # (a printable URL has none: one quick pass, for most URLs)
    if not url.isprintable() and _URL_CONTROL_CHARS_RE.search(url):
        raise InvalidURLError('URL with control characters: {!r}'.format(url))
    address = _known_address(url)
    if address is not None:
        return address
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise InvalidURLError('malformed URL {!r}: {}'.format(url, exc)) from exc
    return _address(url, parts)


def _known_address(url: str) -> Optional[_Address]:
    """The ``_Address`` of a URL (without control characters) that begins
    with the text of a checked origin (see ``_ORIGIN_TEXTS``) and a ``/``
    and goes on the wire as it is (ASCII, no space: see ``_ascii_url``),
    worked out without ``urlsplit``; else ``None``. Its scheme and netloc
    are the origin's (what ``urlsplit`` makes of that text, whatever the
    URL it was found in), and the rest is split as ``urlsplit`` splits it:
    the fragment at the first ``#``, then the query at the first ``?``."""
    # (the text of every origin there is ``http://`` or ``https://`` and a
    # host: its first ``/`` after those is the one past the 8th character)
    end = url.find('/', 8)
    origin = _ORIGIN_TEXTS.get(url[:end]) if end > 0 else None
    if origin is None or not url.isascii() or ' ' in url:
        return None
    path = target = url[end:]  # (a path: at least '/')
    if '#' in target or '?' in target:  # (most URLs have neither: no partition to make)
        target = target.partition('#')[0]
        path, _, query = target.partition('?')
        if not query:
            target = path
    return _Address(url, path, origin, target)


def _filename_from_url(address: _Address) -> str:
    """The percent-decoded (UTF-8) last segment of the URL's path, made safe."""
    name = address.path.rpartition('/')[2]
    return _safe_filename(urllib.parse.unquote(name) if '%' in name else name)


def _redirect_target(base: str, location: str) -> _Address:
    """The absolute URL a ``Location`` header points to. Raw UTF-8 bytes
    in the header (decoded as Latin-1 by http.client) are taken as UTF-8.
    Raises ``RedirectError`` for a target bitpit does not follow."""
    raw = location.strip()
    try:
        raw = raw.encode('latin-1').decode('utf-8', 'surrogateescape')
    except UnicodeEncodeError:
        pass
    try:
        if _URL_CONTROL_CHARS_RE.search(raw):  # before urljoin, which drops tabs and newlines
            raise InvalidURLError('URL with control characters: {!r}'.format(raw))
        return _check_url(urllib.parse.urljoin(base, raw))
    except ValueError as exc:  # InvalidURLError, or one urljoin raised
        raise RedirectError('refusing redirect to {!r}: {}'.format(raw, exc)) from exc


def _same_trust(old: _Address, new: _Address) -> bool:
    """Whether credentials meant for ``old`` may go to ``new`` (requests'
    ``should_strip_auth``): the same host, scheme and port, or http to https
    on the same host with the default ports."""
    if old.host_name != new.host_name:
        return False
    # (a port not written in a URL is its scheme's default in its host_key)
    old_scheme, _, old_port = old.host_key
    new_scheme, _, new_port = new.host_key
    return (old_scheme, old_port, new_scheme, new_port) == ('http', 80, 'https', 443) or \
        (old_scheme == new_scheme and old_port == new_port)


# -- headers -------------------------------------------------------------------------

_DIGITS_RE = _Pattern(r'[0-9]+')
_CONTENT_RANGE_RE = _Pattern(r'^\s*bytes\s+([0-9]+)-([0-9]+)/([0-9]+|\*)\s*$', re.I)
_UNSATISFIED_RANGE_RE = _Pattern(r'^\s*bytes\s+\*/([0-9]+)\s*$', re.I)


def _parse_content_range(value: str) -> Tuple[int, int, Optional[int]]:
    """Parse ``bytes FIRST-LAST/TOTAL`` into ``(first, last, total)``;
    ``total`` is ``None`` for ``*``. Only ASCII digits count. Raises
    ``ProtocolError`` if malformed."""
    match = _CONTENT_RANGE_RE.match(value)
    if not match:
        raise ProtocolError('malformed Content-Range: {!r}'.format(value[:100]))
    first, last = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == '*' else int(match.group(3))
    if last < first or (total is not None and last >= total) or \
            max(last, total or 0) >= _UNKNOWN_END:
        raise ProtocolError('impossible Content-Range: {!r}'.format(value[:100]))
    return first, last, total


def _parse_content_length(response: _Response) -> Optional[int]:
    """The response's ``Content-Length`` as an int, ``None`` if absent or the
    body is chunked. Raises ``ProtocolError`` for a malformed or
    contradictory value (only ASCII digits count)."""
    # (a repeated field's values joined by ', ': one list of them either way)
    value = response.by_name.get('content-length')
    if value is None or response.chunked:
        return None
    if value.isdigit() and value.isascii():
        return int(value)  # the usual one
    lengths = set()
    for part in value.split(','):
        part = part.strip()
        if not _DIGITS_RE.fullmatch(part):
            raise ProtocolError('malformed Content-Length: {!r}'.format(value[:100]))
        lengths.add(int(part))
    if len(lengths) != 1:
        raise ProtocolError('conflicting Content-Length values: {}'.format(value))
    return lengths.pop()


def _parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds to wait from a ``Retry-After`` value (ASCII digits or an HTTP
    date), or ``None`` if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if _DIGITS_RE.fullmatch(value):
        return float(value)
    when = _parse_http_date(value)
    if when is None:
        return None
    return max(0.0, when - time.time())


_HTTP_DATE_RE = _Pattern(r'(?:[A-Za-z]{3}, )?([0-9]{2}) ([A-Za-z]{3}) ([0-9]{4}) '
                         r'([0-9]{2}):([0-9]{2}):([0-9]{2}) GMT')
_MONTHS = ('jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct', 'nov', 'dec')
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # (in a year that is not leap)
_DAYS_BEFORE_MONTH = tuple(sum(_MONTH_DAYS[:month]) for month in range(12))
_EPOCH_ORDINAL = 719163  # datetime.date(1970, 1, 1).toordinal()


def _parse_http_date(value: Optional[str]) -> Optional[float]:
    """An HTTP date (``Last-Modified``, ``Retry-After``) as a POSIX
    timestamp, or ``None`` if absent or unreadable. The date read last is
    kept: files published together share their ``Last-Modified``. Any
    thread."""
    global _LAST_HTTP_DATE
    if not value:
        return None
    known, when = _LAST_HTTP_DATE
    if value != known:
        when = _read_http_date(value)
        _LAST_HTTP_DATE = (value, when)
    return when


# (an HTTP date, its timestamp) read last; replaced whole (any thread)
_LAST_HTTP_DATE: Tuple[Optional[str], Optional[float]] = (None, None)


def _read_http_date(value: str) -> Optional[float]:
    """``_parse_http_date`` of a value, read: the form servers send (``Wed,
    21 Oct 2015 07:28:00 GMT``) here, others by ``email.utils``."""
    match = _HTTP_DATE_RE.fullmatch(value.strip())
    if match and match.group(2).lower() in _MONTHS:
        day, month, year, hour, minute, second = match.groups()
        return _utc_timestamp(int(year), _MONTHS.index(month.lower()), int(day), int(hour),
                              int(minute), int(second))
    import datetime
    import email.utils
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def _utc_timestamp(year: int, month: int, day: int, hour: int, minute: int,
                   second: int) -> Optional[float]:
    """The timestamp of a UTC date and time (``month`` from 0), as
    ``datetime`` makes it, without importing datetime; ``None`` for what
    datetime refuses (a year 0, a day not in its month, a second past 59)."""
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    month_days = _MONTH_DAYS[month] + (month == 1 and leap)
    if year < 1 or not 1 <= day <= month_days or hour > 23 or minute > 59 or second > 59:
        return None
    before = year - 1  # (years before it: their days, and their leap days)
    ordinal = before * 365 + before // 4 - before // 100 + before // 400 + \
        _DAYS_BEFORE_MONTH[month] + (month > 1 and leap) + day
    return float((ordinal - _EPOCH_ORDINAL) * 86400 + hour * 3600 + minute * 60 + second)


def _parse_checksum(checksum: Optional[str]) -> Optional[Tuple[str, str]]:
    """``'sha256:HEX'`` as ``('sha256', 'hex')``; ``ValueError`` for an
    unknown algorithm or a digest of the wrong form."""
    if checksum is None:
        return None
    import hashlib
    algorithm, _, digest = str(checksum).partition(':')
    algorithm = algorithm.strip().lower()
    digest = digest.strip().lower()
    try:
        size = hashlib.new(algorithm).digest_size
    except (ValueError, TypeError):
        raise ValueError('unknown checksum algorithm in {!r}'.format(checksum)) from None
    if not re.fullmatch(r'[0-9a-f]+', digest) or len(digest) != 2 * size:
        raise ValueError('malformed checksum {!r}: expected ALGORITHM:HEX'.format(checksum))
    return algorithm, digest


# what a server says of its file: digests (RFC 9530, RFC 3230) and its
# duplicates (RFC 6249)

_DIGEST_ALGORITHMS = {'sha-256': 'sha256', 'sha-512': 'sha512'}  # their hashlib names
_MAX_DUPLICATES = 16     # most mirrors one answer's Link header may add
_SF_ITEM = r'(?::[A-Za-z0-9+/=]*:|"(?:[^"\\]|\\.)*"|\?[01]|[^\s,;()"=]+)'
_SF_PARAMETERS = r'(?:\s*;\s*[a-z*][a-z0-9_.*-]*(?:=' + _SF_ITEM + r')?)*'
# one member of a structured-field dictionary (RFC 8941), then a comma or the end
_SF_MEMBER_RE = _Pattern(r'\s*([a-z*][a-z0-9_.*-]*)(?:=(' + _SF_ITEM + r'|\((?:\s*' +
                         _SF_ITEM + _SF_PARAMETERS + r')*\s*\)))?' + _SF_PARAMETERS +
                         r'\s*(,|$)')
_LINK_RE = _Pattern(r'\s*<([^>]*)>((?:\s*;\s*[^;,"]+(?:="[^"]*"|=[^;,]*)?)*)\s*(?:,|$)')
_LINK_PARAMETER_RE = _Pattern(r';\s*([^=;\s]+)\s*(?:=\s*(?:"([^"]*)"|([^;\s]*)))?')


def _structured_dictionary(value: str) -> Optional[Dict[str, str]]:
    """The members of an RFC 8941 dictionary field (each key's value as
    written, ``''`` for none), or ``None`` when it does not parse: such a
    field is ignored whole."""
    members: Dict[str, str] = {}
    position = 0
    while position < len(value) and value[position:].strip():
        match = _SF_MEMBER_RE.match(value, position)
        if match is None:
            return None
        members[match.group(1)] = match.group(2) or ''
        position = match.end()
        if match.group(3) == ',' and not value[position:].strip():
            return None  # a trailing comma
    return members


def _digest_value(field: str, algorithm: str, value: str) -> Optional[bytes]:
    """The digest ``value`` (base64) of ``algorithm`` (its name in the field,
    lower case) that ``field`` gave, or ``None`` (logged) for an unknown
    algorithm or a malformed value."""
    import base64
    import binascii
    import hashlib
    name = _DIGEST_ALGORITHMS.get(algorithm)
    if name is None:
        _log.debug('%s: ignoring the digest of unsupported algorithm %r', field, algorithm)
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        digest = b''
    if len(digest) != hashlib.new(name).digest_size:
        _log.warning('%s: ignoring a %s digest that is not base64 of the right length: %r',
                     field, algorithm, value[:100])
        return None
    return digest


# (in lower case) every field ``_server_digests`` may read
_DIGEST_FIELDS = frozenset(('repr-digest', 'content-digest', 'digest'))


def _server_digests(response: _Response, fields: Tuple[str, ...]
                    ) -> List[Tuple[str, str, bytes]]:
    """The digests of the file a response gives in ``fields``, as
    ``(field, hashlib algorithm, digest)``: ``Repr-Digest`` (RFC 9530),
    ``Content-Digest`` (RFC 9530; of the body), and the older ``Digest``
    (RFC 3230, which digests the whole file whatever range is sent, and
    which mirror redirectors send with their redirect, RFC 6249). sha-256
    and sha-512 only; anything malformed is ignored (and logged)."""
    found = []
    for field in [name for name in ('Repr-Digest', 'Content-Digest') if name in fields]:
        for value in response.headers.get_all(field) or ():
            members = _structured_dictionary(value)
            if members is None:
                _log.warning('ignoring a malformed %s field: %r', field, value[:200])
                continue
            for algorithm, item in members.items():
                if not (len(item) >= 2 and item[0] == item[-1] == ':'):
                    if algorithm in _DIGEST_ALGORITHMS:
                        _log.warning('%s: ignoring %s, which is not a byte sequence: %r',
                                     field, algorithm, item[:100])
                    continue
                digest = _digest_value(field, algorithm, item[1:-1])
                if digest is not None:
                    found.append((field, _DIGEST_ALGORITHMS[algorithm], digest))
    for value in (response.headers.get_all('Digest') or ()) if 'Digest' in fields else ():
        for part in value.split(','):
            algorithm, equals, item = part.strip().partition('=')
            if not equals:
                _log.warning('ignoring a malformed Digest field: %r', value[:200])
                continue
            digest = _digest_value('Digest', algorithm.strip().lower(), item.strip())
            if digest is not None:
                found.append(('Digest', _DIGEST_ALGORITHMS[algorithm.strip().lower()], digest))
    return found


def _duplicates(response: _Response, base: str) -> List[_Address]:
    """The http(s) URLs a response's ``Link: <URL>; rel=duplicate`` fields
    name (RFC 6249), relative ones resolved against ``base``, by their
    ``pri`` (lowest first), at most ``_MAX_DUPLICATES``."""
    found: List[Tuple[int, int, _Address]] = []
    for value in response.headers.get_all('Link') or ():
        position = 0
        while position < len(value) and value[position:].strip():
            match = _LINK_RE.match(value, position)
            if match is None or match.end() == position:
                _log.debug('ignoring the rest of a malformed Link field: %r', value[:200])
                break
            position = match.end()
            parameters = {name.lower(): quoted or bare for name, quoted, bare in
                          _LINK_PARAMETER_RE.findall(match.group(2))}
            if 'duplicate' not in (parameters.get('rel') or '').lower().split():
                continue
            try:
                address = _check_url(urllib.parse.urljoin(base, match.group(1).strip()))
            except (InvalidURLError, ValueError) as exc:
                _log.info('ignoring a duplicate the server names: %s', exc)
                continue
            priority = parameters.get('pri') or ''
            found.append((int(priority) if priority.isdigit() else 999999, len(found), address))
    return [address for _, _, address in sorted(found)[:_MAX_DUPLICATES]]


# headers bitpit sets itself: a caller may not give them
_CONTROLLED_HEADERS = frozenset({'range', 'if-range', 'accept-encoding', 'host',
                                 'content-length', 'transfer-encoding'})


def _check_headers(headers: Any) -> Dict[str, str]:
    """The caller's extra headers as a dict, checked: a mapping of str to
    str, no line breaks, none of the headers bitpit controls."""
    if headers is None:
        return {}
    if not hasattr(headers, 'items'):
        raise TypeError('headers must be a mapping of str to str, not {!r}'.format(headers))
    checked: Dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError('headers must map str to str, not {!r}: {!r}'.format(name, value))
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or \
                _CONTROL_CHARS_RE.search(value.replace('\t', ' ')):
            raise ValueError('invalid header {!r}: {!r}'.format(name, value))
        if name.lower() in _CONTROLLED_HEADERS:
            raise ValueError('headers: bitpit sets {} itself'.format(name))
        for old in [key for key in checked if key.lower() == name.lower()]:
            del checked[old]
        checked[name] = value
    return checked


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------

class Error(Exception):
    """Base class of every error bitpit reports.

    ``retryable`` tells whether another attempt may succeed: retryable errors
    put a download in state ``error`` (and restart it when ``restart_wait >=
    0``); the others end it in ``fatal-error``. ``__cause__`` holds the
    underlying exception, if any (an ``OSError``: ``ssl.SSLError``,
    ``http.client.RemoteDisconnected``, ...).
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
    """The connection failed: refused, reset, unreachable, name not found,
    or a TLS connection broken during its handshake or its body."""
    retryable = True


class StalledError(NetworkError):
    """No byte arrived for ``timeout`` seconds, or the transfer stayed
    slower than ``min_speed`` for that long."""


class TLSError(NetworkError):
    """TLS cannot work with this server: its certificate is not trusted, or
    no protocol version or cipher is common to both sides. Not retryable."""
    retryable = False


class ProtocolError(Error):
    """The server's answer was malformed or broke its own promises (a short
    body, a bad ``Content-Range``, an invalid status line); also a metalink
    refused (not retryable)."""
    retryable = True


class RedirectError(ProtocolError):
    """A redirect loop, too many redirects, or a redirect to an unsupported
    URL."""
    retryable = False


class IntegrityError(Error):
    """The downloaded bytes do not match the expected checksum (given, from
    a checksum file or a metalink) or the server's digest, a checksum file
    has no line for the file, or the body is larger than ``max_size``."""


class FileError(Error):
    """The local file could not be opened, reserved or written (its cause is
    the ``OSError``). The bytes already on disk are kept."""


class InvalidURLError(Error, ValueError):
    """The URL is malformed or its scheme is not ``http`` or ``https``."""


class _Stopped(Exception):
    """Raised inside bitpit's threads when ``stop()`` was called."""


# ---------------------------------------------------------------------------
# emitter
# ---------------------------------------------------------------------------

if TYPE_CHECKING:  # a signal's registrations: (func, args, kwargs)
    _Callbacks = Tuple[Tuple[Callable[..., object], Tuple[Any, ...], Dict[str, Any]], ...]
    # what the registry holds for a signal: its one callback, or them all
    _Registered = Union[Callable[..., object], '_Registrations']


class Emitter:
    """Base class for objects with signals.

    A subclass names its signals in the class attribute ``__signals__``.
    ``listen``, ``unlisten`` and ``emit`` are safe from any thread, also from
    inside a callback while a signal is being emitted.
    """
    __signals__: Tuple[str, ...] = ()
    # the registry is made at the first listen() and holds, for each signal
    # listened to, its callback itself while that is its only one and
    # takes no arguments of its own (most: a manager's thousands of
    # downloads, each listened to, keep one object each for it, the dict,
    # which the collector visits), else a _Registrations, a tuple of
    # (func, args, kwargs) called as one callback: emit() calls either
    # alike, with no look at which it is (three a small file). An
    # object nobody listens to costs nothing, and reads the class's empty
    # one, which nobody writes to. listen() and unlisten() replace a value,
    # never change one, under _EMITTER_LOCK (one for every emitter: they
    # are rare next to emit()), so that emit() calls what it reads without
    # a lock
    _emitter_callbacks: Mapping[str, _Registered] = types.MappingProxyType({})

    def _check_signal(self, signal: str) -> None:
        if signal not in self.__signals__:
            raise KeyError('{} has no signal {!r}'.format(type(self).__name__, signal))

    def listen(self, signal: str, func: Callable[..., object], *args: Any,
               **kwargs: Any) -> None:
        """Call ``func(*emit_args, *args, **kwargs)`` whenever ``signal`` is
        emitted. Raises ``KeyError`` for an unknown signal."""
        if signal not in self.__signals__:
            self._check_signal(signal)  # (raises)
        with _EMITTER_LOCK:
            callbacks = self._emitter_callbacks
            if not isinstance(callbacks, dict):  # the class's: none of its own yet
                self._emitter_callbacks = callbacks = {}
            registered = callbacks.get(signal)
            if registered is None and not args and not kwargs:
                callbacks[signal] = func
            else:
                callbacks[signal] = _Registrations(
                    signal, _registrations(registered) + ((func, args, kwargs),))

    def unlisten(self, signal: str, func: Callable[..., object], *args: Any,
                 **kwargs: Any) -> None:
        """Remove one registration of ``func`` with these ``args`` and
        ``kwargs``. Raises ``KeyError`` for an unknown signal, ``ValueError``
        if there is no such registration."""
        self._check_signal(signal)
        with _EMITTER_LOCK:
            callbacks = self._emitter_callbacks
            registered = list(_registrations(callbacks.get(signal)))
            registered.remove((func, args, kwargs))  # (none in the class's registry)
            assert isinstance(callbacks, dict)
            if registered:
                callbacks[signal] = _Registrations(signal, registered)
            else:
                del callbacks[signal]

    def emit(self, signal: str, *args: Any) -> None:
        """Call every callback registered for ``signal``, in order. A callback
        that raises is logged with its traceback and the others still run.
        Raises ``KeyError`` for an unknown signal."""
        registered = self._emitter_callbacks.get(signal)
        if registered is None:  # nobody listens: only the name to check
            if signal not in self.__signals__:
                self._check_signal(signal)  # (raises)
            return
        try:  # (one callback with no arguments of its own, or _Registrations)
            registered(*args)
        except Exception:
            _log.exception('callback %r for signal %r raised', registered, signal)


if TYPE_CHECKING:
    _RegistrationsBase = _Callbacks
else:
    _RegistrationsBase = tuple  # (typing is not imported to run)


class _Registrations(_RegistrationsBase):
    """The registrations of ``signal`` when it has more than one, or one
    with arguments of its own: ``(func, args, kwargs)`` tuples, called in
    order by a call to it (see ``Emitter``); a callback that raises is
    logged with its traceback and the others still run."""
    signal: str

    def __new__(cls, signal: str, registrations: Iterable[Tuple[
            Callable[..., object], Tuple[Any, ...], Dict[str, Any]]]) -> '_Registrations':
        self = super().__new__(cls, registrations)
        self.signal = signal
        return self

    def __call__(self, *args: Any) -> None:
        for func, listen_args, listen_kwargs in self:
            try:
                if listen_args or listen_kwargs:
                    func(*args, *listen_args, **listen_kwargs)
                else:  # most: no tuple and dict to build for the call
                    func(*args)
            except Exception:
                _log.exception('callback %r for signal %r raised', func, self.signal)


_EMITTER_LOCK = threading.Lock()
_NO_KWARGS: Dict[str, Any] = {}  # (never written to)


def _registrations(registered: Optional[_Registered]) -> _Callbacks:
    """A signal's registrations, as ``(func, args, kwargs)`` tuples, from
    what the registry holds for it (see ``Emitter``)."""
    if registered is None:
        return ()
    if not isinstance(registered, _Registrations):
        return ((registered, (), _NO_KWARGS),)
    return registered


# ---------------------------------------------------------------------------
# threads: workers that run one task after another
# ---------------------------------------------------------------------------

class _Task:
    """A function that a ``_Workers`` thread runs as a thread of its own
    would: ``is_alive`` answers as it would for that thread. ``thread`` is
    the worker running it, ``None`` until one takes it up. Both are
    dropped once it returned (``None``): ``target`` as a thread drops its
    own, so that what it holds is freed with no cycle to collect (a
    file's disk work holds its transfer); the worker, which whoever keeps
    the task would otherwise keep with it, and which may end long before
    it (a dead thread object holds 2 KB). Any thread."""
    __slots__ = ('target', 'name', 'thread', '_returned')

    def __init__(self, target: Callable[[], object], name: str):
        self.target: Optional[Callable[[], object]] = target
        self.name = name
        self.thread: Optional[threading.Thread] = None
        self._returned = False

    def is_alive(self) -> bool:
        """Whether it has not returned yet (also before a worker takes it up)."""
        return not self._returned

    def done(self) -> None:
        """It returned. Its worker."""
        assert not self._returned  # a task returns once
        self.target = self.thread = None
        self._returned = True


class _Workers:
    """Threads that run tasks (the signals of downloads, a sidecar save)
    one after another, so that each does not pay for a thread of its own:
    starting and joining a thread costs about 130 us of CPU here, handing a
    task to a waiting worker about 35 us. A worker is named after its task
    while it runs it, and ``IDLE_NAME`` while it waits for the next one; it
    ends after ``IDLE_SECONDS`` without one, and at once when the
    interpreter shuts down (it waits for the tasks under way, as it would
    for the threads they replace). ``_lock`` guards ``_tasks``,
    ``_waiting`` (workers waiting for a task), ``_busy`` (the tasks taken
    up and not returned) and ``_closing``; ``_cond`` is signalled when a task
    comes, ``_quiet`` when no task runs any more. Any thread may call
    ``run`` and ``wait_quiet``."""
    IDLE_SECONDS = 0.5
    IDLE_NAME = 'bitpit-idle'

    def __init__(self) -> None:
        self._hooked = False
        self._start_empty()

    def _start_empty(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._quiet = threading.Condition(self._lock)
        self._tasks: 'collections.deque[_Task]' = collections.deque()
        self._waiting = 0
        self._busy: Set[_Task] = set()
        self._closing = False

    def _after_fork(self) -> None:
        """Start empty in a forked child, where only the forking thread
        goes on: every task the parent had handed over has ended there,
        as every other thread has, but the forking thread's own (a
        callback that forks)."""
        mine = {task for task in self._busy if task.thread is threading.current_thread()}
        for task in itertools.chain(self._tasks, self._busy - mine):
            if task.is_alive():
                task.done()
        self._start_empty()
        self._busy = mine

    def run(self, target: Callable[[], object], name: str) -> _Task:
        """Run ``target`` on a waiting worker, or on a new one; raises
        ``RuntimeError`` as ``Thread.start`` does when there is none."""
        task = _Task(target, name)
        with self._lock:
            if not self._hooked:
                self._hook()
            self._tasks.append(task)
            if len(self._tasks) <= self._waiting:
                self._cond.notify()
                return task
        try:
            threading.Thread(target=self._work, name=name, daemon=False).start()
        except RuntimeError:  # no thread to be had: the task never runs
            with self._lock:
                if task not in self._tasks:
                    return task  # a worker done with its own took it up
                self._tasks.remove(task)
                if not self._busy and not self._tasks:
                    self._quiet.notify_all()
            raise
        return task

    def _hook(self) -> None:
        """Close when the interpreter shuts down: its idle workers would
        keep it waiting. ``threading._register_atexit`` (Python 3.9+,
        what ``concurrent.futures`` uses) runs before the interpreter joins
        its threads; without it, idle workers end after their wait. Under
        the lock."""
        self._hooked = True
        register = getattr(threading, '_register_atexit', None)
        if register is not None:
            try:
                register(self.close)
            except RuntimeError:  # already shutting down
                self._closing = True

    def close(self) -> None:
        """End the waiting workers now, and each busy one after its task."""
        with self._lock:
            self._closing = True
            self._cond.notify_all()

    def wait_quiet(self, timeout: Optional[float]) -> bool:
        """Wait at most ``timeout`` seconds until no task runs or waits;
        whether none does."""
        with self._lock:
            return self._quiet.wait_for(lambda: not self._busy and not self._tasks, timeout)

    def _work(self) -> None:
        """A worker: run tasks while there are any, then wait for more."""
        me = threading.current_thread()
        task: Optional[_Task] = None  # the one it last ran
        while True:
            with self._lock:
                if task is not None:
                    self._busy.remove(task)
                    if not self._busy and not self._tasks:
                        self._quiet.notify_all()
                if not self._tasks and not self._closing:
                    self._waiting += 1
                    if task is None:  # still named for the task it was started for
                        me.name = self.IDLE_NAME
                    deadline = time.monotonic() + self.IDLE_SECONDS
                    while not self._tasks and not self._closing:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    self._waiting -= 1
                if not self._tasks:
                    return
                task = self._tasks[0]
                self._busy.add(task)  # first: a fork never finds it in neither
                self._tasks.popleft()
            me.name = task.name
            task.thread = me
            target = task.target
            assert target is not None  # dropped once it returned
            try:
                # in the empty context a new thread starts with: what one
                # task's callbacks set (a decimal context...) is not the next's
                contextvars.Context().run(target)
            except SystemExit:  # it ends its thread, as threading has it
                pass
            except BaseException:  # a task's bug: say so, and go on
                _log.exception('%s ended with an unexpected error', task.name)
            finally:
                me.name = self.IDLE_NAME
                del target  # nor does the worker hold it while it waits
                task.done()


_WORKERS = _Workers()
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_WORKERS._after_fork)


def _run_or_here(target: Callable[[], object], name: str) -> None:
    """``_WORKERS.run(target, name)``, or ``target()`` on the calling
    thread (the loop's) when no thread can start: Python 3.12.0 to 3.12.2
    refuse one once the main thread has ended, while the loop still runs
    the downloads that the program waits for. Their work is then done on
    the loop, late, rather than lost with the loop's thread."""
    try:
        _WORKERS.run(target, name)
    except RuntimeError:
        target()


class _Run:
    """One run of a download (an attempt, from ``start`` to its end
    state): its steps run on the loop, and what it tells its callbacks
    (a state to set, a signal to emit) waits here, in ``calls``, for a
    signal worker, which makes those calls in the order posted, one at a
    time. While a worker makes them, it is the run's thread (``thread``,
    ``is_current``); the run is alive until its last call (``done``),
    which its download makes under its lock and tells its waiters of
    (``Downloader._join_run``): a run has no lock of its own to make
    (some 2,500 instructions a small file) nor to be joined on.
    ``queued`` says that a worker has it or will take it up, set and
    cleared under ``_Signals._lock``; ``since`` is when it was queued. Its
    calls run in ``context``, an empty one of its own, as a new thread's
    would. ``live`` holds the runs not done yet, which a forked child ends
    (``_Signals._after_fork``), as it has no thread of the parent's; any
    thread adds or discards (one operation on a set, atomic under the
    GIL)."""
    __slots__ = ('calls', 'queued', 'since', 'context', 'thread')
    live: Set['_Run'] = set()

    def __init__(self) -> None:
        # (a list: a deque costs some 1,300 instructions more to make, and
        # a run holds a few calls at a time; only its worker takes them):
        # each a function and the tuple of its arguments
        self.calls: List[Tuple[Callable[..., object], Tuple[Any, ...]]] = []
        self.queued = False
        self.since = 0.0
        self.context: Optional[contextvars.Context] = contextvars.Context()
        self.thread: Optional[threading.Thread] = None
        _Run.live.add(self)

    def is_alive(self) -> bool:
        """Whether its last call is still to be made."""
        return self.context is not None

    def is_current(self) -> bool:
        """Whether the calling thread is the worker making its calls."""
        return self.thread is threading.current_thread() and self.context is not None

    def done(self) -> None:
        """Its last call was made. Its worker, under its download's lock
        (or a forked child, where nobody waits for it)."""
        _Run.live.discard(self)  # (first: a stop woken by the end sees none live)
        # whoever still holds the run (a stop under way; its download
        # drops it as it ends) keeps nothing more of it
        self.thread = None
        self.calls.clear()
        self.context = None


class _Signals:
    """The signal workers: the threads that make the calls that runs
    post on the loop (``post``), so that no callback runs on the loop's
    thread. The loop hands what a round posted at once (``hand``, one
    lock); a worker takes up one run after another and makes each one's
    calls until none is left, so a download's calls are made in order and
    never two at once. One worker serves every download while their
    callbacks are quick; a run left waiting ``SPILL`` seconds (behind a
    callback that takes long) gets another worker, so a slow callback
    holds up its own download's signals, and others' for ``SPILL``
    seconds at most. Workers are ``_WORKERS`` tasks named
    ``bitpit-download``, each delivering while there is work. ``_lock``
    guards ``_ready`` (the runs queued, not taken up yet),
    ``_delivering`` (workers under way), ``_watched`` (the loop waits on
    ``_taken`` until none is queued) and each run's ``queued``. ``post``
    and ``hand``: the loop's thread."""
    SPILL = 0.05
    MAX_WORKERS = 32

    def __init__(self) -> None:
        self._after_fork()

    def _after_fork(self) -> None:
        """Start empty (in a forked child: its workers are gone, and so
        are the loop and the steps of every run, which has ended there as
        the thread it replaces would have; but the run whose call forked,
        still under way on the forking thread)."""
        me = threading.current_thread()
        delivering = 0  # the forking thread, if it is a worker making a call
        for run in list(_Run.live):
            if run.thread is not me:
                run.done()
            else:
                delivering = 1
        self._lock = threading.Lock()
        self._ready: 'collections.deque[_Run]' = collections.deque()
        self._taken = threading.Condition(self._lock)
        self._watched = False
        self._delivering = delivering
        self._posted: List[_Run] = []  # the loop's, since its last hand

    def post(self, run: _Run, call: Callable[..., object], *args: Any) -> None:
        """Have ``call(*args)`` made after the run's earlier calls. The run
        is handed again whatever its queue held: a worker may make the
        calls it saw there and let the run go before this one is in it
        (only ``hand``, under the lock, can tell whether a worker still
        has it)."""
        run.calls.append((call, args))
        # (as often as it posts: a run posts once in most rounds, and
        # ``hand`` queues it once whatever the list holds)
        self._posted.append(run)

    def hand(self, idle: bool = False) -> Optional[float]:
        """Hand the runs posted to since the last hand to the workers,
        starting one when none works or when a run waited ``SPILL``
        seconds; when to look again for a worker held up (``None``: no
        run waits for one, or ``MAX_WORKERS`` are under way). ``idle``:
        the loop has nothing else to do, so it waits here (``SPILL``
        seconds at most) until the workers took up every run, and ends at
        once if they did."""
        if not self._posted and not self._ready:  # (only the loop adds to either)
            return None
        posted, self._posted = self._posted, []
        now = time.monotonic()
        with self._lock:
            for run in posted:
                # (a run whose calls a worker made meanwhile, its last one
                # too, is not queued again: nothing is left of it to make)
                if not run.queued and run.calls:
                    run.queued = True
                    run.since = now
                    self._ready.append(run)
            if not self._ready:
                return None
            waited = now - self._ready[0].since
            start = not self._delivering or (
                waited >= self.SPILL and self._delivering < self.MAX_WORKERS)
            if start:
                self._delivering += 1
            elif self._delivering >= self.MAX_WORKERS:
                # no worker to add: the first one free takes the run up,
                # with no look of the loop's (which would come at once,
                # round after round, once the run waited SPILL)
                return None
        if start:
            try:
                _run_or_here(self._deliver, 'bitpit-download')
            except BaseException:
                with self._lock:
                    self._delivering -= 1
                raise
        if idle:
            deadline = now + self.SPILL
            with self._lock:
                self._watched = True
                while self._ready:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._taken.wait(left)
                self._watched = False
                if not self._ready:
                    return None
            return time.monotonic()  # at once: the next round gives another worker
        if start or waited >= self.SPILL:  # (every worker held up: look again a while later)
            return now + self.SPILL
        return now + self.SPILL - waited

    def _deliver(self) -> None:
        """A worker: take up the queued runs one after another and make
        each one's calls in its context, until none is queued. A run is
        let go (once out of its context, thread and all) in the lock
        section that takes up the next one: another worker may take it up
        as soon as it is not queued (a call posted after that queues it
        again)."""
        me = threading.current_thread()
        run: Optional[_Run] = None  # the one taken up
        try:
            while True:
                with self._lock:  # (a new one in a child that a call forked)
                    if run is not None and not run.calls:  # (else posted just now:
                        run.thread = None                  # made in this turn too)
                        run.queued = False
                        run = None
                    if run is None:
                        if not self._ready:
                            self._delivering -= 1
                            return
                        run = self._ready.popleft()
                        run.thread = me
                        if self._watched and not self._ready:
                            self._taken.notify()
                context = run.context
                assert context is not None  # (a run done is never queued again)
                context.run(self._make_calls, run)
        except BaseException:  # (a bug of bitpit's) not a worker counted for ever
            with self._lock:
                self._delivering -= 1
            raise

    @staticmethod
    def _make_calls(run: _Run) -> None:
        """Make the run's calls until none is left, in its context. (Only
        the worker that has the run takes calls from it: one it saw stays
        there until it takes it.) Static: a take-up makes no bound method
        to call it with."""
        calls = run.calls
        while calls:  # (not an IndexError to raise and catch at every take-up)
            call, args = calls.pop(0)
            try:
                call(*args)
            except SystemExit:
                # a callback's sys.exit() ends what it did, as in a thread;
                # the worker is not the download's own thread to end: the
                # run's calls, and the worker's, go on
                pass
            except BaseException:  # (a callback's own error is logged by emit)
                _log.exception('a signal call of a download raised')


_SIGNALS = _Signals()
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_SIGNALS._after_fork)


# ---------------------------------------------------------------------------
# steps: code that yields its waits
# ---------------------------------------------------------------------------
#
# A connection's code is a generator of steps: where it cannot go on, it
# yields a _Wait (for a socket, an event, until a deadline) and is resumed
# with whether what it waited for came before the deadline. Written once,
# the same steps run on a thread of their own (_drive_here: each wait a
# blocking one) and, with thousands of others, on one loop's thread
# (_LOOP). Their own code never blocks: it reads and writes sockets that
# do not block, and yields where they would.

class _Wait:
    """What steps wait for: until ``sock`` can be read (or, ``writing``,
    written), or ``event`` (a ``_Flag``) is set, or (neither
    given) only until the monotonic time ``until``; ``until`` ``None``: no
    deadline. Resumed with ``True`` when it came, ``False`` when the
    deadline came first (a time alone: always ``False``). Read-only."""
    __slots__ = ('sock', 'writing', 'until', 'event')

    def __init__(self, sock: Any, until: Optional[float], writing: bool = False,
                 event: Optional['_Flag'] = None):
        self.sock = sock
        self.writing = writing
        self.until = until
        self.event = event


if TYPE_CHECKING:
    from typing import Generator
    _Steps = Generator[_Wait, bool, _T]  # steps whose end gives a _T


def _deadline(timeout: Optional[float]) -> Optional[float]:
    """The monotonic time ``timeout`` seconds from now (``None``: none),
    a wait's ``until``."""
    return None if timeout is None else time.monotonic() + timeout


# -- the loop: one thread that drives the steps of every connection -----------------
#
# The same steps that _drive_here runs on a thread of their own run here by
# the thousand: every connection of every download (_LOOP).

class _Flag:
    """An event that steps wait for: on a ``_Loop``, any number of them at
    once (``wakers``: the wait of each, by its steps; setting it hands
    each to its loop, which resumes it), or on a thread of their own (``wait``, on a
    ``threading.Event`` made at the first such wait). Where only the loop
    waits, it costs no condition: a small file's transfer sets one
    twice. Any thread; a waker is added and removed by the loop's
    thread (a wait, not a function made for each: set() calls the
    steps' own loop)."""
    __slots__ = ('_set', 'wakers', '_event')

    def __init__(self) -> None:
        self._set = False
        self.wakers: Dict[_Driven, _Wait] = {}  # the waits of the steps that wait
        self._event: Optional[threading.Event] = None  # for threads that wait

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:  # (its waiters were woken when it was set)
            return
        self._set = True
        event = self._event
        if event is not None:
            event.set()
        if self.wakers:
            for driven, wait in list(self.wakers.items()):  # (a copy made under the GIL)
                driven.loop._hand(driven, wait)

    def clear(self) -> None:
        self._set = False
        event = self._event
        if event is not None:
            event.clear()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block the calling thread until it is set, ``timeout`` seconds at
        most; whether it is."""
        event = self._event
        if event is None:
            with _FLAG_EVENTS:
                event = self._event
                if event is None:
                    event = self._event = threading.Event()
        if self._set:  # (set before the event was there to be set)
            return True
        return event.wait(timeout)


_FLAG_EVENTS = threading.Lock()  # makes a _Flag's event for threads, once


class _Driven:
    """A generator of steps on a ``_Loop`` (``loop``), and what it waits
    for now. The loop's thread."""
    __slots__ = ('steps', 'done', 'loop', 'wait', 'flag', 'registered', 'fd', 'writing', 'scheduled')

    def __init__(self, steps: '_Steps[Any]',
                 done: Callable[[Any, Optional[BaseException]], object], loop: '_Loop'):
        self.steps = steps
        self.done = done
        self.loop = loop
        self.wait: Optional[_Wait] = None
        # the _Flag whose wakers hold it, while it waits for one: its waker
        # goes when it is resumed (by the flag or by its deadline)
        self.flag: Optional[_Flag] = None
        # the socket the loop's poller watches for it, if any, by the file
        # descriptor it had then, for reading or (``writing``) writing
        self.registered: Any = None
        self.fd = -1
        self.writing = False
        # the time of its live entry in the loop's heap of deadlines, if any:
        # a wait whose deadline is later than it keeps it (a connection
        # that reads often pushes nothing per read), an earlier one pushes
        # another, and the later entry goes stale
        self.scheduled: Optional[float] = None

    def __lt__(self, other: '_Driven') -> bool:
        """An order for the loop's heap of deadlines, for two entries whose
        times are equal (any will do, and it is called at such a tie
        only, where a count's next number in every entry costs each push)."""
        return id(self) < id(other)


class _Poller:
    """What the loop waits for sockets with: ``epoll`` where there is one
    (Linux), else the ``selectors`` module's best. Each watched file
    descriptor maps to the data ``select`` gives back when it is ready.
    With epoll (``keeps_idle``), the socket of steps that ended stays
    watched (``idle``) while it waits for reuse, so that the steps that
    take it up next (the next file's, over a keep-alive connection) cost
    no system call to watch it; should it turn readable meanwhile (the
    server's close), it is no longer watched. Idle, it is watched for no
    data (``None``, after ``unregister``) or, read by steps that ended
    (the loop's ``_finish`` makes no call here for them), for theirs:
    ``select`` gives that back, and its caller tells it that they ended
    (``let_go``). A socket closed while watched leaves epoll by
    itself, and its number may come back with another socket: each
    descriptor is known with the socket and the data it was registered
    for. But a registration is of the socket's open file, which a forked
    child holds too (multiprocessing's workers, say): one closed here then
    stays in epoll, ready for ever once its server closes, reported with
    its number, which another socket may have now; only a new epoll drops
    it (``_rebuild``, before the next wait). A stale one is known when
    reported (for no socket, or for an idle one closed), and is feared,
    once the process has forked (``forked``), when a socket turns out
    closed while watched. The loop's thread."""
    __slots__ = ('_epoll', '_selector', '_watched', '_stale', 'keeps_idle')
    forked = False  # set for good before a fork (so in the child too)

    def __init__(self) -> None:
        # by descriptor: (data, the socket, whether for writing); data None: idle
        self._watched: Dict[int, Tuple[Any, Any, bool]] = {}
        self._epoll = select.epoll() if hasattr(select, 'epoll') else None
        self._selector = selectors.DefaultSelector() if self._epoll is None else None
        self._stale = False  # whether epoll may hold a closed socket's registration
        self.keeps_idle = self._epoll is not None  # (see the class)

    @classmethod
    def note_fork(cls) -> None:
        """Before a fork: the sockets open now are the child's too. Any thread."""
        cls.forked = True

    def register(self, sock: Any, fd: int, writing: bool, data: Any) -> None:
        """Watch ``sock`` (its descriptor ``fd``) for reading (``writing``:
        for writing) for ``data``, or watch it so from now on; raises
        ``OSError`` or ``ValueError`` for a closed one."""
        watched = self._watched.get(fd)
        if self._epoll is not None:
            mask = select.EPOLLOUT if writing else select.EPOLLIN
            if watched is None:
                self._epoll.register(fd, mask)
            elif watched[1] is not sock or watched[2] != writing:
                try:
                    self._epoll.modify(fd, mask)
                except FileNotFoundError:  # its socket closed, the number taken again
                    self._epoll.register(fd, mask)
                    self._stale = self._stale or self.forked
        else:
            assert self._selector is not None  # (no epoll)
            events = selectors.EVENT_WRITE if writing else selectors.EVENT_READ
            if watched is None:
                self._selector.register(fd, events, data)
            else:
                self._selector.modify(fd, events, data)
        self._watched[fd] = (data, sock, writing)

    def unregister(self, fd: int, data: Any) -> None:
        """Stop watching ``fd`` for ``data``: with epoll, a socket still open
        stays watched for reading, idle; not if another registered the
        number since (its socket closed)."""
        watched = self._watched.get(fd)
        if watched is None or watched[0] is not data:
            return
        if self._epoll is not None and watched[1].fileno() == fd:
            if not watched[2]:
                self._watched[fd] = (None, watched[1], False)
                return
            # (for writing: a socket that waits for reuse has no
            # request under way, and is watched for reading again)
            try:
                self._epoll.modify(fd, select.EPOLLIN)
                self._watched[fd] = (None, watched[1], False)
                return
            except OSError:
                pass
        self._forget(fd)

    def let_go(self, fd: int, data: Any) -> None:
        """``fd``, idle, watched still for ``data`` (steps that ended),
        turned ready (the server's close, or bytes none asked for): no
        longer watched."""
        watched = self._watched.get(fd)
        if watched is not None and watched[0] is data and not self._forget(fd):
            self._stale = True  # (closed: a forked child's hold reported it)

    def _forget(self, fd: int) -> bool:
        """Stop watching ``fd``; whether it was watched still (not closed)."""
        del self._watched[fd]
        try:
            if self._epoll is not None:
                self._epoll.unregister(fd)
            else:
                assert self._selector is not None  # (no epoll)
                self._selector.unregister(fd)
        except (KeyError, ValueError, OSError):
            # closed meanwhile: epoll forgot it by itself, unless a forked
            # child holds it too
            self._stale = self._stale or self.forked
            return False
        return True

    def _rebuild(self) -> None:
        """Watch the open sockets watched now with a new epoll, which holds
        no registration of a socket closed while watched."""
        assert self._epoll is not None  # (only epoll keeps them)
        self._epoll.close()
        self._epoll = select.epoll()
        self._stale = False
        for fd, (data, sock, writing) in list(self._watched.items()):
            try:
                if sock.fileno() < 0:
                    raise ValueError('closed')
                self._epoll.register(fd, select.EPOLLOUT if writing else select.EPOLLIN)
            except (OSError, ValueError):  # closed: its steps find out at their next call
                del self._watched[fd]

    def select(self, timeout: Optional[float]) -> List[Any]:
        """The data of the descriptors ready within ``timeout`` seconds
        (``None``: however long it takes); an idle one that is ready is
        no longer watched."""
        if self._epoll is None:
            assert self._selector is not None  # (no epoll)
            return [key.data for key, _ in self._selector.select(timeout)]
        if self._stale:
            self._rebuild()
        ready = []
        for fd, _ in self._epoll.poll(-1 if timeout is None else timeout):
            watched = self._watched.get(fd)
            if watched is None:  # a closed socket's, left by a forked child's hold
                self._stale = True
            elif watched[0] is None:  # idle: the server's close, or bytes none asked for
                if not self._forget(fd):  # (closed: the same)
                    self._stale = True
            else:
                ready.append(watched[0])
        return ready

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
        else:
            assert self._selector is not None  # (no epoll)
            self._selector.close()
        self._watched.clear()


_WAKE_UP = object()  # what the loop's poller gives for its wake-up socket


class _Loop:
    """One thread, ``bitpit-loop``, that drives the steps of many
    connections: it waits for all their sockets at once (a ``_Poller``), for
    their events (``_Flag``s, whose setting wakes it) and for the earliest
    of their deadlines (a heap), and resumes each whose wait is over.
    ``spawn`` hands it steps from any thread; when they end,
    ``done(result, error)`` is called on the loop's thread, which must not
    wait. The thread starts at the first ``spawn`` and ends once nothing is
    left to drive. ``_lock`` guards ``_handed`` and ``_thread``; the rest is
    the loop thread's own. ``after_round`` (if given) is called on the
    loop's thread after each round of resumptions, so that what the steps
    left for other threads is handed over once a round, not once a step;
    it is told whether the loop is idle (nothing to drive: it may wait a
    moment then), returns when to call it again at the latest (``None``:
    at the next round, if any), and the thread does not end before it
    says ``None``."""

    def __init__(self, after_round: Optional[Callable[[bool], Optional[float]]] = None
                 ) -> None:
        self._after_round = after_round
        self._lock = threading.Lock()
        # steps to resume: (driven, None) new ones, (driven, wait) an event of theirs set
        self._handed: 'collections.deque[Tuple[_Driven, Optional[_Wait]]]' = \
            collections.deque()
        self._thread: Optional[threading.Thread] = None  # the one running, if any
        self._ident: Optional[int] = None  # its ident, while it runs
        self._last: Optional[threading.Thread] = None    # the one started last
        self._poller: Any = None
        self._deadlines: List[Tuple[float, _Driven]] = []
        self._stale = 0  # about how many of them are stale (ended, or replaced by earlier)
        self._driven = 0
        self._wake_in: Optional[socket.socket] = None   # made with the first thread
        self._wake_out: Optional[socket.socket] = None

    def _after_fork(self) -> None:
        """Start empty in a forked child, where the loop's thread, and the
        steps it drove, are gone."""
        self._lock = threading.Lock()
        self._handed.clear()
        self._thread = self._last = self._poller = self._ident = None
        self._deadlines = []
        self._stale = 0
        self._driven = 0
        for sock in (self._wake_in, self._wake_out):
            if sock is not None:
                sock.close()
        self._wake_in = self._wake_out = None

    def spawn(self, steps: '_Steps[Any]',
              done: Callable[[Any, Optional[BaseException]], object]) -> None:
        """Drive ``steps`` on the loop's thread. Any thread."""
        self._hand(_Driven(steps, done, self), None)

    def _hand(self, driven: _Driven, wait: Optional[_Wait]) -> None:
        """Resume ``driven`` on the loop's thread: new steps (``wait``
        ``None``), or steps whose event came (``wait``, if they still wait
        for it then). Starts the thread if none runs; raises
        ``RuntimeError`` as ``Thread.start`` does when none can start.
        Any thread."""
        if self._ident == threading.get_ident():
            # the loop's own thread (which alone takes what was handed), most
            # hands: it looks at what was handed before it waits
            self._handed.append((driven, wait))
            return
        with self._lock:
            # a wake-up is due when the first is handed since the loop took
            # what was handed: while more are left, the loop looks at them
            # before it waits (its own thread's), or a wake-up is under way
            # (another's), for a batch that a manager starts at once
            woken = bool(self._handed)
            self._handed.append((driven, wait))
            if self._thread is None:
                if self._wake_in is None:
                    self._wake_in, self._wake_out = socket.socketpair()
                    self._wake_in.setblocking(False)
                    self._wake_out.setblocking(False)
                thread = threading.Thread(target=self._run, name='bitpit-loop')
                try:
                    thread.start()
                except BaseException:
                    self._handed.pop()
                    raise
                self._thread = self._last = thread
                return
            if woken:
                return
            wake = self._wake_out
        assert wake is not None  # made with the thread
        try:
            wake.send(b'\0')
        except BlockingIOError:  # a wake-up is pending already
            pass

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the loop's thread ended (nothing left to drive)."""
        with self._lock:
            thread = self._last
        if thread is not None:
            thread.join(timeout)


    def _run(self) -> None:
        wake_in = self._wake_in
        assert wake_in is not None  # made before the thread started
        self._ident = threading.get_ident()
        poller = self._poller = _Poller()
        poller.register(wake_in, wake_in.fileno(), False, _WAKE_UP)
        try:
            while True:
                with self._lock:
                    handed = list(self._handed)
                    self._handed.clear()
                for driven, wait in handed:
                    if wait is None:
                        self._driven += 1
                        self._resume(driven, None)
                    elif driven.wait is wait:  # (else resumed already, by its deadline)
                        self._resume(driven, True)
                # what the last round left for other threads, and when to
                # look again whether they took it
                again = self._after_round(not self._driven) \
                    if self._after_round is not None else None
                if not self._driven:
                    del self._deadlines[:]  # every deadline left is stale
                    self._stale = 0
                    if again is None:
                        with self._lock:
                            if not self._handed:
                                # a spawn from now on starts another thread,
                                # which finds none of this one's state
                                self._thread = self._poller = self._ident = None
                                return
                        continue
                elif self._stale > 64 and self._stale * 2 > len(self._deadlines):
                    self._drop_stale()
                timeout = None
                if self._handed:  # (by the loop's own thread, in this round)
                    timeout = 0.0
                elif self._deadlines:
                    timeout = max(0.0, self._deadlines[0][0] - time.monotonic())
                if again is not None:
                    until_again = max(0.0, again - time.monotonic())
                    timeout = until_again if timeout is None else min(timeout, until_again)
                for driven in poller.select(timeout):
                    if driven is _WAKE_UP:
                        self._drain_wake_ups(wake_in)
                    elif driven.wait is not None and driven.wait.sock is not None:
                        self._resume(driven, True)
                    elif driven.wait is None:  # ended, its socket left idle (_finish)
                        poller.let_go(driven.fd, driven)
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    when, driven = heapq.heappop(self._deadlines)
                    if driven.scheduled != when:
                        self._stale -= 1
                        continue  # stale: its steps ended, or an earlier one was pushed
                    driven.scheduled = None
                    wait = driven.wait
                    if wait is None or wait.until is None:
                        continue  # ended, or waits without a deadline now
                    if wait.until > now:
                        self._schedule(driven, wait.until)
                    else:
                        self._resume(driven, False)
        finally:
            poller.close()
            with self._lock:
                if self._thread is threading.current_thread():  # (ended by a bug)
                    self._thread = self._poller = self._ident = None

    @staticmethod
    def _drain_wake_ups(wake_in: socket.socket) -> None:
        try:
            while wake_in.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _resume(self, driven: _Driven, ready: Optional[bool]) -> None:
        """Resume ``driven`` with ``ready`` and wait for what it yields
        next; at its end, tell ``done``."""
        flag = driven.flag
        if flag is not None:
            driven.flag = None
            flag.wakers.pop(driven, None)
        try:
            wait = driven.steps.send(ready)  # type: ignore[arg-type]  # (None starts them)
        except StopIteration as end:
            self._finish(driven, end.value, None)
            return
        except Exception as exc:
            self._finish(driven, None, exc)
            return
        driven.wait = wait
        sock = wait.sock
        # (most waits are for the socket watched already, as it was, or for
        # no socket with none watched: no call)
        if sock is not driven.registered or sock is not None and wait.writing != driven.writing:
            self._watch(driven, sock, wait)
        if sock is None and wait.event is not None:
            event = wait.event
            if not isinstance(event, _Flag):  # (a bug in the steps)
                driven.steps.close()
                self._finish(driven, None, TypeError(
                    'steps on a loop wait for a _Flag, not a threading.Event'))
                return
            event.wakers[driven] = wait
            driven.flag = event
            if event.is_set():  # (set before the waker was there)
                self._hand(driven, wait)
        until = wait.until
        if until is not None:
            scheduled = driven.scheduled
            if scheduled is None or until < scheduled:
                # (_schedule, inline: a call fewer for most waits)
                driven.scheduled = until
                if scheduled is not None:  # (the later entry goes stale)
                    self._stale += 1
                heapq.heappush(self._deadlines, (until, driven))

    def _watch(self, driven: _Driven, sock: Any, wait: _Wait) -> None:
        """Have the poller watch ``sock`` (``None``: none) for ``driven``'s
        ``wait``, in place of the socket it watched for it, if another."""
        if driven.registered is not None and driven.registered is not sock:
            self._unregister(driven)
        if sock is None:
            return
        try:
            if driven.registered is None:
                driven.fd = sock.fileno()
            self._poller.register(sock, driven.fd, wait.writing, driven)
            driven.registered, driven.writing = sock, wait.writing
        except (OSError, ValueError, KeyError):
            # a socket closed meanwhile (or shut down by a stop): the
            # steps find out at their next call on it
            self._hand(driven, wait)

    def _schedule(self, driven: _Driven, when: float) -> None:
        """Resume ``driven`` at ``when`` at the latest."""
        driven.scheduled = when
        heapq.heappush(self._deadlines, (when, driven))

    def _drop_stale(self) -> None:
        """Drop the stale entries of the heap of deadlines (their steps
        ended, or an earlier one was pushed): steps end long before their
        time-outs (a small file's in a millisecond, its deadline seconds
        later), and the heap would keep thousands, and their ended steps,
        for the collector to visit. Once a round, where they are more
        than half the heap (a look per round, not per stale entry)."""
        deadlines = self._deadlines
        deadlines[:] = [entry for entry in deadlines if entry[1].scheduled == entry[0]]
        heapq.heapify(deadlines)
        self._stale = 0

    def _unregister(self, driven: _Driven) -> None:
        """Stop watching the socket ``driven`` waited for (closed meanwhile,
        maybe) for it: with epoll, one still open stays watched, idle, for
        the steps that take it up next (``_Poller.unregister``)."""
        self._poller.unregister(driven.fd, driven)
        driven.registered = None

    def _finish(self, driven: _Driven, result: Any, error: Optional[BaseException]) -> None:
        registered = driven.registered
        # an open socket read with epoll stays watched, for the ended
        # steps: idle (see _Poller), with no call (the next file's steps
        # over the kept-alive connection watch it for themselves)
        if registered is not None and (driven.writing or not self._poller.keeps_idle or
                                       registered.fileno() != driven.fd):
            self._unregister(driven)
        if driven.scheduled is not None:
            self._stale += 1
        driven.wait = driven.scheduled = None
        self._driven -= 1
        try:
            driven.done(result, error)
        except Exception:  # a bug in bitpit: said, and the others go on
            _log.exception('the end of a connection on the loop raised')


# every connection's steps, on one thread from the first spawn to the last end
_LOOP = _Loop(after_round=_SIGNALS.hand)
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(before=_Poller.note_fork, after_in_child=_LOOP._after_fork)


def _on_worker_steps(call: Callable[[], _T], name: str) -> '_Steps[_T]':
    """Steps that have a ``_WORKERS`` worker named ``name`` make
    ``call()`` (disk work that may take long, which the loop's thread must
    not wait for), and give what it returns, or raise what it raised."""
    done = _Flag()
    outcome: Dict[str, Any] = {}

    def work() -> None:
        try:
            outcome['result'] = call()
        except BaseException as exc:  # handed to the waiting steps
            outcome['error'] = exc
        finally:
            done.set()

    _run_or_here(work, name)
    while not done.is_set():
        yield _Wait(None, None, event=done)
    if 'error' in outcome:
        raise outcome['error']
    return outcome['result']


# ---------------------------------------------------------------------------
# timing: token buckets
# ---------------------------------------------------------------------------

class _TokenBucket:
    """A smooth rate limiter that any number of connections may draw
    from, each with steps (``acquire_steps``) that yield their waits.

    Tokens (bytes) accrue at ``rate`` per second up to a depth of
    ``BURST_SECONDS`` worth, so no more than about a tenth of a second of
    traffic is ever released at once. Waiters are served in the order
    they came, so one that just read cannot starve the others. A rate
    ``<= 0`` means unlimited. Changing ``rate`` takes effect at once, also
    for waiters already waiting. ``_lock`` guards every field, and the
    events of the waiters' turns are set under it.
    """
    BURST_SECONDS = 0.1
    GRANT_SECONDS = 0.01
    GRANT_FLOOR = 8192

    def __init__(self, rate: float = 0):
        self._lock = threading.Lock()
        # a list, not a deque: a few waiters at most, and an empty deque
        # takes 760 bytes, which every download of a long queue would hold
        self._waiters: List[_Turn] = []  # in the order of their numbers
        self._arrivals = 0  # the number of the next thread to come
        self._rate = max(0.0, float(rate))  # (what the setter would do: no thread sees it yet)
        self._tokens = 0.0
        self._stamp = time.monotonic()

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

    def _grant(self) -> int:
        """The most one read may take: a hundredth of a second's worth (so
        bytes come smoothly, and every second counts exactly what the limit
        allows), but ``GRANT_FLOOR`` bytes where that is little, and never
        more than half the depth: the bucket never has to fill up before a
        grant, so no token is lost to the cap while the waiter wakes, or
        when a grant comes back unused."""
        return int(min(max(self._rate * self.GRANT_SECONDS, self.GRANT_FLOOR),
                       self._depth() / 2))

    def _refill(self) -> None:
        now = time.monotonic()
        if self._rate > 0:
            self._tokens = min(self._depth(),
                               self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def _notify_all(self) -> None:
        for turn in self._waiters:
            turn.wake()

    def drain(self) -> None:
        """Empty the bucket, so the next bytes are paced from now on. An
        unlimited one holds a byte at most, and paces from the moment a
        rate is set on it."""
        if self._rate <= 0:
            return
        with self._lock:
            self._refill()
            self._tokens = 0.0

    def acquire_steps(self, want: int, cancelled: Callable[[], bool]) -> '_Steps[int]':
        """Steps that wait until some bytes may be read and give how many
        (at most ``want``, at least 1); ``want`` at once when unlimited.
        They give 0 as soon as ``cancelled()`` is true after a ``wake()``.
        A waiter waits for its turn's event (set when what it waits for
        may have come: a rate change, a refund, the head of the queue
        leaving, ``wake()``) until its tokens are due. Any thread."""
        if self._rate <= 0:  # unlimited: no lock on the fast path
            return 0 if cancelled() else want
        lock = self._lock
        lock.acquire()
        try:
            turn = self._line_up()
            try:
                while not cancelled():
                    if self._rate <= 0:
                        return want
                    wake_at: Optional[float] = None  # (not the head: until it is)
                    if self._waiters[0] is turn:
                        self._refill()
                        grant = max(1, min(want, self._grant()))
                        if self._tokens >= grant:
                            self._tokens -= grant
                            return grant
                        wake_at = self._stamp + (grant - self._tokens) / self._rate
                    # (cleared under the lock: a setter changes what this
                    # waiter looks at under it, then sets the event)
                    event = turn.event
                    if event is None:
                        event = turn.event = _Flag()
                    elif event.is_set():
                        event.clear()
                    lock.release()
                    try:
                        yield _Wait(None, wake_at, False, event)  # (event: no keyword's dict)
                    finally:
                        lock.acquire()
                return 0
            finally:
                self._waiters.remove(turn)
                if self._waiters:
                    self._waiters[0].wake()
        finally:
            lock.release()

    def _line_up(self) -> '_Turn':
        """A place at the tail of the queue. Under the lock."""
        turn = _Turn(self._arrivals)
        self._arrivals += 1
        self._waiters.append(turn)
        return turn

    def refund(self, unused: int) -> None:
        """Give back tokens that were acquired but not used."""
        if unused > 0 and self._rate > 0:
            with self._lock:
                self._refill()
                self._tokens = min(self._depth(), self._tokens + unused)
                if self._waiters:
                    self._waiters[0].wake()

    def wake(self) -> None:
        """Wake every waiter so it re-checks ``cancelled()``."""
        with self._lock:
            self._notify_all()


class _Turn:
    """A waiter's place in a ``_TokenBucket``'s queue; the queue is served
    in the order of the places' ``number`` (the order the waiters came in).
    ``event``, made at its first wait (a waiter served at once needs
    none), is set when the waiter should look again. Under the bucket's
    lock."""
    __slots__ = ('number', 'event')

    def __init__(self, number: int):
        self.number = number
        self.event: Optional['_Flag'] = None

    def wake(self) -> None:
        if self.event is not None:
            self.event.set()


def _limited(buckets: Tuple[_TokenBucket, ...]) -> bool:
    """Whether any of ``buckets`` limits the rate now (asked before
    every read: a loop, not a generator, that reads each bucket's rate
    itself, not through its property)."""
    for bucket in buckets:
        if bucket._rate > 0:
            return True
    return False


class _Pacer:
    """Draws each read from several token buckets (a download's own limit,
    a manager's total) and gives every bucket back exactly what it granted
    but the read did not use. One per request of a connection, made at its
    first limited read (an unlimited one needs none)."""

    def __init__(self, buckets: Tuple[_TokenBucket, ...], cancelled: Callable[[], bool]):
        self.buckets = buckets
        self.cancelled = cancelled
        self._grants: List[int] = []

    def acquire_steps(self, want: int) -> '_Steps[int]':
        """Steps that give the bytes that may be read now (0: cancelled);
        they wait while limited. Unlimited, there is
        no need to ask (a read is not held back, nor stopped: the stop
        aborts it). Whatever ends them in a bucket's wait (0, or an
        exception thrown into them) gives the buckets before it back what
        they granted."""
        grants = self._grants
        del grants[:]
        try:
            for bucket in self.buckets:
                want = yield from bucket.acquire_steps(want, self.cancelled)
                if not want:
                    break
                grants.append(want)
        except BaseException:
            self.settle(0)
            raise
        if not want:
            self.settle(0)
        return want

    def settle(self, used: int) -> None:
        """The last read used ``used`` bytes: refund the rest of each grant."""
        for bucket, granted in zip(self.buckets, self._grants):
            bucket.refund(granted - used)
        del self._grants[:]


# ---------------------------------------------------------------------------
# http: cancellation, connections, pool, request options, requests, answers
# ---------------------------------------------------------------------------

class _Cancel:
    """The stop signal of an attempt: ``cancel()`` marks it and aborts
    everything registered with it (connections, name look-ups) at once,
    and sets the flag that its pauses wait for (``pause``). Any thread.

    ``_CANCEL_LOCK`` guards the mark's setting, the hand-over of the
    registrations to ``cancel()`` and the flag of the pauses, which the
    first ``pause()`` makes (an attempt that never pauses, as a small
    file's, needs none: an event costs ~2 us). ``register`` and
    ``unregister`` (one of each for every request) take no lock, which
    would cost more than the rest of each: each item goes into or out of
    the set ``_live`` in one step of the interpreter (a set's ``add`` and
    ``discard``), and ``register`` looks at the mark after its ``add``,
    while ``cancel()`` sets it before it takes the set: an item added as
    a cancel comes is in the set that ``cancel()`` aborts, or its
    ``register`` sees the mark, or both. ``cancel()`` aborts a copy of
    the set it took, made in one step: an ``add`` that still comes to
    that set after the copy is one that sees the mark."""
    __slots__ = ('_cancelled', '_pauses', '_live')

    def __init__(self) -> None:
        self._cancelled = False
        self._pauses: Optional[_Flag] = None
        self._live: set = set()

    def is_set(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with _CANCEL_LOCK:
            self._cancelled = True
            pauses = self._pauses
            live, self._live = self._live, set()
        if pauses is not None:
            pauses.set()
        for item in tuple(live):
            item.abort()

    def pause(self, until: float) -> _Wait:
        """The wait of steps that pause until the monotonic time ``until``,
        or less if ``cancel()`` comes first."""
        with _CANCEL_LOCK:
            if self._pauses is None:
                self._pauses = _Flag()
                if self._cancelled:
                    self._pauses.set()
            return _Wait(None, until, event=self._pauses)

    def register(self, item: Any) -> None:
        """Abort ``item`` (anything with ``abort()``) on ``cancel()``; raise
        ``_Stopped`` if that already happened."""
        self._live.add(item)
        if self._cancelled:
            self._live.discard(item)
            raise _Stopped

    def unregister(self, item: Any) -> bool:
        """Let ``item`` go; whether ``cancel()`` came, looked at after: one
        that took ``item`` before may be aborting it now."""
        self._live.discard(item)
        return self._cancelled


# guards what cancel() and pause() change of every _Cancel (see there)
_CANCEL_LOCK = threading.Lock()


_HAS_POLL = hasattr(select, 'poll')  # (not on Windows)


# ssl is imported by the first HTTPS connection's context (_default_ssl_context)
# or by a caller who makes their own (_as_ssl_context checks it): there is no
# TLS socket, and no error of ssl's, before. What looks for one asks whether
# ssl is imported at all, and an HTTP download never imports it.

def _is_tls(sock: Any) -> bool:
    """Whether ``sock`` is a TLS socket (``ssl.SSLSocket``)."""
    tls = sys.modules.get('ssl')
    return tls is not None and isinstance(sock, tls.SSLSocket)


def _tls_wants_write(exc: BaseException) -> Optional[bool]:
    """What a TLS socket waits for, told by the exception its call raised:
    ``False`` to read (``ssl.SSLWantReadError``), ``True`` to write
    (``ssl.SSLWantWriteError``); ``None`` for any other exception."""
    tls = sys.modules.get('ssl')
    if tls is None:
        return None
    if isinstance(exc, tls.SSLWantReadError):
        return False
    return True if isinstance(exc, tls.SSLWantWriteError) else None


def _would_block(exc: OSError) -> bool:
    """Whether ``exc``, raised by a call on a socket that does not block,
    says only that the call must wait (``BlockingIOError``, or TLS's
    ``SSLWantReadError`` and ``SSLWantWriteError``)."""
    return isinstance(exc, BlockingIOError) or _tls_wants_write(exc) is not None


def _ready(sock: Any, seconds: Optional[float] = 0.0, writing: bool = False) -> bool:
    """Whether ``sock`` has bytes (or its end) to read now, or within
    ``seconds`` (``None``: however long it takes); ``writing``: whether it
    takes bytes to send (a connect is done). ``True`` when that cannot be
    told."""
    if not writing and _is_tls(sock) and sock.pending():
        return True
    try:
        if _HAS_POLL:
            poller = select.poll()
            poller.register(sock, select.POLLOUT if writing else select.POLLIN)
            return bool(poller.poll(None if seconds is None else math.ceil(seconds * 1000)))
        if writing:  # (Windows tells a failed connect among the exceptions)
            _, writable, failed = select.select([], [sock], [sock], seconds)
            return bool(writable or failed)
        return bool(select.select([sock], [], [], seconds)[0])
    except (OSError, ValueError, TypeError):
        return True


# -- steps on a thread of their own ---------------------------------------------

def _block(wait: _Wait) -> bool:
    """Wait on the calling thread as ``wait`` says; whether it came."""
    seconds = None if wait.until is None else max(0.0, wait.until - time.monotonic())
    if wait.sock is not None:
        return _ready(wait.sock, seconds, writing=wait.writing)
    if wait.event is not None:
        return wait.event.wait(seconds)
    if seconds is None:
        raise ValueError('a wait for ever, with nothing to end it')
    time.sleep(seconds)
    return False


def _drive_here(steps: '_Steps[_T]') -> _T:
    """Run ``steps`` to their end on the calling thread, each wait a
    blocking one (``_block``); their result, or what they raise. What a
    wait raises (an interrupt) raises in the steps, where they waited. A
    cancel ends no steps by itself: it aborts their sockets and sets what
    they wait for, and the steps see to the rest, as they do on the loop.
    How a caller outside the loop (a metalink's or a checksum file's
    fetch, made by the caller's or the download's thread) runs steps."""
    resume: Callable[[Any], _Wait] = steps.send
    value: Any = None
    while True:
        try:
            wait = resume(value)
        except StopIteration as end:
            return end.value
        try:
            value, resume = _block(wait), steps.send
        except BaseException as exc:
            value, resume = exc, steps.throw


def _io_steps(call: Callable[..., _T], sock: Any, timeout: Optional[float], *args: Any,
              sending: bool = False) -> '_Steps[_T]':
    """``call(*args)``, a receive (a send: ``sending``) or a TLS handshake
    on ``sock`` (which does not block), made once it would no longer
    block: each time it would (``BlockingIOError``, or TLS's
    ``SSLWantReadError`` and ``SSLWantWriteError``), a wait for ``sock``
    to read or to write, of ``timeout`` seconds at most (``None``: no
    limit), after which ``socket.timeout`` is raised. Each wait has the
    whole time-out, not what the first one left: the time-out is a time
    without a byte, and a TLS handshake or record whose bytes come in
    pieces waits again after each."""
    writing: Optional[bool] = None  # the next wait's, if any
    while True:
        if writing is not None:
            if not (yield _Wait(sock, _deadline(timeout), writing)):
                raise socket.timeout('timed out')
        try:
            return call(*args)
        except BlockingIOError:
            writing = sending
        except OSError as exc:  # (TLS's SSLWantReadError and SSLWantWriteError are OSErrors)
            writing = _tls_wants_write(exc)
            if writing is None:
                raise
# what connect_ex says of a connect under way on a socket that does not block
_CONNECTING = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN,
               getattr(errno, 'WSAEWOULDBLOCK', -1)}


class _EventAbort:
    """Registers an event with a ``_Cancel``: cancelling sets it."""

    def __init__(self, event: '_Flag'):
        self.abort = event.set


def _resolve_steps(host: str, port: int, cancel: Optional[_Cancel], timeout: Optional[float]
                   ) -> '_Steps[List[Tuple[Any, ...]]]':
    """``socket.getaddrinfo`` for a TCP connection, in a way a stop can
    abandon: a name is looked up in a thread of its own (which, like a
    daemon, never holds up the interpreter's exit), which sets an event
    that the steps wait for, and so does a cancel. Addresses are used as
    they are."""
    try:
        socket.inet_pton(socket.AF_INET6 if ':' in host else socket.AF_INET, host)
    except (OSError, ValueError):
        pass
    else:  # an address: nothing to look up
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    done = _Flag()
    outcome: Dict[str, Any] = {}

    def look_up() -> None:
        try:
            outcome['addresses'] = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except Exception as exc:  # handed to the waiting steps
            outcome['error'] = exc
        done.set()

    waker = _EventAbort(done)
    if cancel is not None:
        cancel.register(waker)
    try:
        # a bare thread: threading.Thread.start would wait until it runs,
        # a block in steps that one loop drives with many others
        try:
            _thread.start_new_thread(look_up, ())
        except RuntimeError:  # no thread at the interpreter's shutdown (_run_or_here)
            look_up()
        if not (yield _Wait(None, _deadline(timeout), event=done)):
            raise socket.timeout('looking up {} took more than {} s'.format(host, timeout))
    finally:
        if cancel is not None:
            cancel.unregister(waker)
    if cancel is not None and cancel.is_set():
        raise _Stopped
    if 'error' in outcome:
        raise outcome['error']
    return outcome['addresses']


# -- response heads: bitpit's own parser, sans-I/O ----------------------------------
#
# http.client reads a response's header fields with the email package (a
# feed parser and policies: most of its cost per small file), and each of
# its look-ups walks every field, lowercasing each name. Here a head is
# parsed from bytes by code with no socket in it: tests feed it bytes in any
# cut, and any loop that receives bytes can drive it. ``_Response`` is
# one (it reads its answer's head so), and reads a chunked body, and a
# caller's reads of any body, with ``_BodyFraming``, sans-I/O too.

_MAX_HEAD_LINE = 65536   # most bytes of a line of a head, its CRLF included (http.client's)
_MAX_HEAD_FIELDS = 100   # most field lines in a head (http.client's)
_MAX_INTERIM_HEADS = 16  # most 1xx heads before the final one


# the repeated names of a head with none (most): read, never changed
_NONE_REPEATED: Dict[str, List[str]] = {}


class _Headers:
    """The header fields of a response, in the order received, duplicates
    kept; names are case-insensitive. It offers what http.client and
    bitpit call on ``response.headers`` (``response.msg``), an
    ``http.client.HTTPMessage`` in http.client: ``get`` (the first value),
    ``get_all``, ``[name]`` (the first value or ``None``), ``in``,
    ``items``/``keys``/``values`` (lists), iteration over the names,
    ``len``. ``by_name`` is a dict of each field's value by its name in
    lower case, a repeated field's values joined by ``', '`` (as
    ``HTTPResponse.getheader`` gives them): bitpit's own look-ups, by
    names it writes in lower case, take no call of their own, nor those
    of ``firsts``, the first value of each (the same dict where no name
    is repeated, as in most heads). The usual head's lines (each a field
    of a name of its own) are taken apart into fields only if asked for
    (``items`` and the like): none of bitpit's look-ups (``by_name``,
    ``firsts``, ``get_all``) needs them. Read-only; any thread (fields
    taken apart twice at once are the same)."""
    __slots__ = ('_lines', '_fields', 'by_name', 'firsts', '_repeated')

    def __init__(self, lines: List[str], last_values: Optional[Dict[str, str]] = None):
        """``lines``: the head's field lines (its status line left out),
        as ``_HeadParser._take_head`` split them; ``last_values``: where
        each line is a field of a name of its own, the value of each by its
        name in lower case, as ``_take_head`` took them (the very ``by_name`` and
        ``firsts``); else ``None``, and the lines are taken apart here
        (``_head_fields``, which raises ``ProtocolError``)."""
        self._lines = lines
        self._fields: Optional[List[Tuple[str, str]]] = None  # (made when first asked for)
        if last_values is not None:
            self.by_name = self.firsts = last_values
            self._repeated = _NONE_REPEATED
            return
        # (seldom: a name given more than once, a folded line, space before a colon)
        fields = self._fields = _head_fields(lines)
        by_name: Dict[str, str] = {}
        firsts: Dict[str, str] = {}
        repeated: Dict[str, List[str]] = {}  # the values of each name given more than once
        for name, value in fields:
            key = name.lower()
            if key in by_name:
                if key not in repeated:
                    repeated[key] = [by_name[key]]
                repeated[key].append(value)
                by_name[key] += ', ' + value
            else:
                by_name[key] = firsts[key] = value
        self.by_name = by_name
        self.firsts = firsts
        self._repeated = repeated

    def _all(self) -> List[Tuple[str, str]]:
        """The fields, ``(name, value)`` in the order received."""
        fields = self._fields
        if fields is None:
            fields = self._fields = _head_fields(self._lines)
        return fields

    def first(self, key: str) -> Optional[str]:
        """The first value of the field named ``key`` (in lower case), or ``None``."""
        return self.firsts.get(key)

    def get(self, name: str, default: Any = None) -> Any:
        value = self.first(name.lower())
        return default if value is None else value

    def get_all(self, name: str, failobj: Any = None) -> Any:
        key = name.lower()
        if key in self._repeated:
            return list(self._repeated[key])
        return [self.by_name[key]] if key in self.by_name else failobj

    def __getitem__(self, name: str) -> Optional[str]:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.by_name

    def items(self) -> List[Tuple[str, str]]:
        return list(self._all())

    def keys(self) -> List[str]:
        return [name for name, _ in self._all()]

    def values(self) -> List[str]:
        return [value for _, value in self._all()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._all())

    def message(self) -> http.client.HTTPMessage:
        """The fields as an ``http.client.HTTPMessage``, for code outside
        bitpit that expects one (a caller's cookie jar)."""
        import http.client
        message = http.client.HTTPMessage()
        for name, value in self._all():
            message[name] = value
        return message


def _header_tokens(value: str) -> Set[str]:
    """The comma-separated tokens of a field's ``value`` (its values
    joined by commas), in lower case if ``value`` is."""
    return {token.strip() for token in value.split(',')}


class _NoStatusLine(ProtocolError):
    """A head whose first line is no status line (http.client's
    ``BadStatusLine``): on a reused connection, likely bytes that an
    earlier answer sent beyond its body, before the answer to this request."""


def _head_error(what: str, line: str = '', status_line: bool = False) -> ProtocolError:
    """The error for a head that bitpit refuses: ``what`` is wrong, in
    ``line`` (a ``_NoStatusLine`` if that is its ``status_line``)."""
    if line:
        what += ': {!r}'.format(line if len(line) <= 80 else line[:80] + '...')
    return (_NoStatusLine if status_line else ProtocolError)('bad HTTP response head: ' + what)


def _head_fields(lines: List[str]) -> List[Tuple[str, str]]:
    """The fields ``(name, value)`` of a head's field ``lines``: a field
    a line (a name, its colon, its value without the spaces and tabs
    around it), a folded line joined to the field before it. Raises
    ``ProtocolError`` for a line that is not a field."""
    fields: List[Tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(':')
        if colon and name and ' ' not in name and '\t' not in name:
            value = value.strip(' \t')
        elif line[:1] in (' ', '\t'):  # obs-fold: more of the field before
            if not fields:
                raise _head_error('a folded line with no field before it', line)
            name, value = fields.pop()
            more = line.strip(' \t')
            value = value + ' ' + more if value and more else value or more
        else:
            # space before the colon is taken off, not refused: RFC 9112 bids
            # servers refuse it and proxies mend it, and bitpit is neither
            name = name.rstrip(' \t')
            if not colon or not name or ' ' in name or '\t' in name:
                raise _head_error('a header line that is not a field', line)
            value = value.strip(' \t')
        fields.append((name, value))
    return fields


def _status_line(line: str) -> Tuple[int, int, str]:
    """``(version, status, reason)`` of a status line, taken as http.client
    takes it but for a status of three ASCII digits."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith('HTTP/'):
        raise _head_error('a bad status line', line, status_line=True)
    version, code = parts[0], parts[1]
    if len(code) != 3 or not code.isascii() or not code.isdigit() or code[0] == '0':
        raise _head_error('a bad status code', line, status_line=True)
    if version in ('HTTP/1.0', 'HTTP/0.9'):
        number = 10
    elif version.startswith('HTTP/1.'):
        number = 11
    else:
        raise _head_error('an HTTP version bitpit does not speak', line)
    return number, int(code), parts[2].strip() if len(parts) > 2 else ''


# the status lines that most answers begin with, taken apart once (as
# _status_line takes them apart): a look-up in place of its calls
_USUAL_STATUS_LINES = {line: _status_line(line) for line in [
    version + ' ' + status for version in ('HTTP/1.1', 'HTTP/1.0') for status in (
        '200 OK', '206 Partial Content', '304 Not Modified', '416 Range Not Satisfiable',
        '416 Requested Range Not Satisfiable', '301 Moved Permanently', '302 Found',
        '303 See Other', '307 Temporary Redirect', '308 Permanent Redirect', '404 Not Found')]}


class _HeadParser:
    """Reads the head of one response from the bytes of its connection,
    fed in any cut: once the final head's blank line came (interim 1xx
    heads, such as 100 Continue, are read and skipped; a 101 is final),
    ``feed`` returns the head, which is the parser itself, and leaves the
    bytes after it, the start of the body, in ``rest`` (a view of them:
    they may be a whole small body). The head has ``version``, 10
    (HTTP/1.0 or 0.9) or 11 (HTTP/1.1 and later 1.x) as http.client
    numbers them, ``status``, ``reason``, its fields' ``by_name`` and
    ``firsts`` (as ``_Headers`` has them: bitpit's own look-ups), the
    fields as a ``_Headers`` (``headers``, also ``fields``), made when
    first asked for, and ``keep_alive()``: no object of its own, nor one
    for a ``_Response``, which is a parser (it reads its head so).
    Sans-I/O: it neither receives nor waits; its caller does. Raises
    ``ProtocolError`` for what http.client refuses (a line of more
    than 64 KiB, more than 100 field lines, a bad status line), as soon as
    the bytes tell, and for a line that is not a field or more than 16
    interim heads. One thread. (Its state starts as the class's: a head
    that comes whole, the usual one, sets none of it but the head's and
    ``rest``.)"""
    _buffer: Union[bytes, bytearray] = b''  # the bytes fed of a head not complete yet
    _searched = 0          # where in _buffer its blank line may start
    _lines = 0             # its line ends so far
    _line_start = 0        # where in _buffer its last line starts
    _interim = 0           # 1xx heads skipped
    rest = memoryview(b'')  # the bytes after the final head
    # the head's, set by _take_head (the last head's while the final one is to come)
    version = status = 0
    reason = ''
    by_name: Dict[str, str]
    firsts: Dict[str, str]
    _head_lines: List[str]              # its field lines, for its _Headers
    _headers: Optional[_Headers] = None  # (made when first asked for)

    def feed(self, data: bytes) -> Optional['_HeadParser']:
        """Take the next ``data`` of the connection; the final head (the
        parser) once complete, else ``None``."""
        stored = bool(self._buffer)  # (a bytearray then)
        if stored:
            self._buffer += data
        # the usual case, a whole head in one piece, is read without a copy
        buffer: Union[bytes, bytearray] = self._buffer if stored else data
        start, searched = 0, self._searched
        while True:
            # where the head ends: a blank line after the end of its last
            # line, each ended by CRLF or LF
            crlf = buffer.find(b'\n\r\n', start + searched)
            lf = buffer.find(b'\n\n', start + searched, len(buffer) if crlf < 0 else crlf + 1)
            if lf >= 0:
                end, after = lf, lf + 2
            elif crlf >= 0:
                end, after = crlf, crlf + 3
            else:
                break
            final = self._take_head(buffer[start:end])
            start, searched = after, 0
            if final:
                self.rest = memoryview(buffer)[start:]
                if stored:
                    self._buffer = b''
                return self
            self._interim += 1
            if self._interim > _MAX_INTERIM_HEADS:
                raise _head_error('more than {} interim (1xx) answers'
                                  .format(_MAX_INTERIM_HEADS))
        unread = max(start, len(buffer) - len(data))  # the bytes not looked at before
        if start:  # interim heads were taken: another head begins at start
            self._lines = self._line_start = 0
        self._lines += buffer.count(b'\n', unread)
        last = buffer.rfind(b'\n', unread)
        if last >= 0:
            self._line_start = last + 1 - start
        if start or not stored:
            self._buffer = bytearray(buffer[start:])
        self._check_unfinished()
        return None

    def _take_head(self, head: Union[bytes, bytearray]) -> bool:
        """Take the head whose bytes, its blank line left out, are
        ``head``: its status line and fields become the parser's; whether
        it is final (not an interim 1xx head, but for a 101). Lines end in
        CRLF or LF; a bare CR counts as a space; a folded line (obs-fold)
        continues the field before it, joined with a space; Latin-1, as
        http.client decodes it. Raises ``ProtocolError``."""
        text = head.decode('latin-1')
        # (in one pass where each line ends in CRLF or LF, as nearly all
        # do; the count of LFs tells where another end split a line: a CR
        # alone, or one of the ends that Unicode adds, which Latin-1 has;
        # but for one that ends the text, which splitlines drops, as it
        # drops the CR of a CRLF: a value's last byte then, as the count
        # cannot tell, and looked at by itself; '' too, a head with no
        # line at all)
        lines = text.splitlines()
        if len(lines) != text.count('\n') + 1 or text[-1:] in '\x0b\x0c\x1c\x1d\x1e\x85':
            if text[-1:] == '\r':  # the CR of the last line's CRLF
                text = text[:-1]
            lines = text.replace('\r\n', '\n').replace('\r', ' ').split('\n')
        status_line = lines.pop(0)  # (the field lines left: no copy of them)
        if len(lines) > _MAX_HEAD_FIELDS:
            raise _head_error('more than {} header lines'.format(_MAX_HEAD_FIELDS))
        if len(head) + 2 > _MAX_HEAD_LINE:
            for line in [status_line] + lines:
                if len(line) + 2 > _MAX_HEAD_LINE:  # Latin-1: a character a byte
                    raise _head_error('a line of more than {} bytes'.format(_MAX_HEAD_LINE),
                                      line)
        self.version, status, self.reason = _USUAL_STATUS_LINES.get(status_line) or \
            _status_line(status_line)
        self.status = status
        # the usual head, each line a field of a name of its own (a name with
        # no space or tab, its colon, its value), taken apart in the fewest
        # calls: each line's value by its name in lower case, all that _Headers
        # needs of it, and the names looked at all at once; any other head is
        # taken apart line by line (_head_fields), which says what is wrong
        last_values: Dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(':')
            if not colon:
                break
            last_values[name.lower()] = value.strip(' \t')
        else:
            names = '\n'.join(last_values)  # (no name holds a line end)
            if len(last_values) == len(lines) and '' not in last_values and \
                    ' ' not in names and '\t' not in names:
                self.by_name = self.firsts = last_values
                self._head_lines, self._headers = lines, None
                return status >= 200 or status == 101
        # (seldom: a name given more than once, a folded line, space before a colon)
        headers = self._headers = _Headers(lines)
        self.by_name, self.firsts = headers.by_name, headers.firsts
        return status >= 200 or status == 101

    @property
    def headers(self) -> _Headers:
        """The head's fields, made now if need be (for a caller's code, and
        bitpit's rarer look-ups, ``get_all`` of a challenge, a digest or a
        link: the usual ones read ``by_name`` and ``firsts``)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = _Headers(self._head_lines, self.by_name)
        return headers

    fields = headers

    def keep_alive(self) -> bool:
        """Whether the connection stays open after this answer, as its
        version and its ``Connection`` field (for HTTP/1.0 also
        ``Keep-Alive`` and ``Proxy-Connection``) tell."""
        by_name = self.by_name
        connection = by_name.get('connection', '').lower()
        if self.version == 11:
            # (a field with no 'close' in it has no such token: most are not split)
            return 'close' not in connection or 'close' not in _header_tokens(connection)
        return 'keep-alive' in _header_tokens(connection) or \
            bool(self.firsts.get('keep-alive')) or \
            'keep-alive' in _header_tokens(by_name.get('proxy-connection', '').lower())

    def _check_unfinished(self) -> None:
        """Refuse an unfinished head that is too long already, so that a
        hostile server cannot fill the memory; note where to search on."""
        size = len(self._buffer)
        if self._lines > _MAX_HEAD_FIELDS + 1:
            raise _head_error('more than {} header lines'.format(_MAX_HEAD_FIELDS))
        if size - self._line_start + 2 > _MAX_HEAD_LINE:
            line = self._buffer[self._line_start:self._line_start + 81].decode('latin-1')
            raise _head_error('a line of more than {} bytes'.format(_MAX_HEAD_LINE), line)
        # a blank line starts with the end of the line before it
        self._searched = max(0, size - 2)


class _BodyFraming:
    """Where a response's body ends, told from the bytes after its head,
    fed in any cut: ``Content-Length`` bytes (``length``), a chunked body
    (``chunked``: chunk sizes, data, trailer fields), or the bytes until
    the connection closes (neither). ``feed(data)`` returns the body's
    bytes in ``data`` (the chunks' framing taken off) and sets ``done`` at
    the body's end, leaving the bytes after it in ``rest``; ``closed()``
    says the connection ended, and raises ``ProtocolError`` if the body
    was cut short. Refuses a chunk size that is not hex and a line or a
    trailer longer than a head's (``_MAX_HEAD_LINE``,
    ``_MAX_HEAD_FIELDS``). Sans-I/O, like ``_HeadParser``. One thread."""
    __slots__ = ('chunked', 'left', 'done', 'rest', '_state', '_line', '_trailers', '_error')

    def __init__(self, length: Optional[int], chunked: bool = False):
        self.chunked = chunked
        self.left = None if chunked else length  # bytes of the body (of a chunk) to come
        self.done = not chunked and length == 0
        self.rest = b''
        self._state = 'size' if chunked else 'data'
        self._line = b''      # a framing line not complete yet
        self._trailers = 0    # trailer field lines read
        self._error: Optional[ProtocolError] = None  # found after bytes handed out

    def feed(self, data: bytes) -> List[bytes]:
        """The body's bytes in ``data``, in order (none once ``done``). A
        framing error after some of them is raised at the next call (or
        ``check``)."""
        self.check()
        if self.done:
            self.rest += data
            return []
        if not self.chunked:
            if self.left is None:  # to the connection's end
                return [data] if data else []
            body = data[:self.left]
            self.left -= len(body)
            if not self.left:
                self.done = True
                self.rest = data[len(body):]
            return [body] if body else []
        pieces: List[bytes] = []
        at, size = 0, len(data)
        while at < size and not self.done:
            if self._state == 'data':
                assert self.left is not None  # set with the state
                piece = data[at:at + self.left]
                at += len(piece)
                self.left -= len(piece)
                if piece:
                    pieces.append(piece)
                if not self.left:
                    self._state = 'data-end'
                continue
            end = data.find(b'\n', at)
            if end < 0:
                self._line += data[at:]
                if len(self._line) > _MAX_HEAD_LINE:
                    raise ProtocolError('bad chunked body: a line of more than {} bytes'
                                        .format(_MAX_HEAD_LINE))
                break
            line, self._line = self._line + data[at:end + 1], b''
            at = end + 1
            try:
                self._take_line(line)
            except ProtocolError as exc:
                if not pieces:
                    raise
                self._error = exc  # the bytes before it are handed out first
                break
        if self.done:
            self.rest = data[at:]
        return pieces

    def check(self) -> None:
        """Raise the framing error found after the bytes handed out, if
        any: before a receive, which might wait for bytes that will not
        come (a server that keeps the connection open)."""
        if self._error is not None:
            raise self._error

    def _take_line(self, line: bytes) -> None:
        """One framing line of a chunked body, its line end included."""
        if len(line) > _MAX_HEAD_LINE:
            raise ProtocolError('bad chunked body: a line of more than {} bytes'
                                .format(_MAX_HEAD_LINE))
        text = line.rstrip(b'\r\n')
        if self._state == 'data-end':
            if text:
                raise ProtocolError('bad chunked body: {!r} after a chunk'.format(text[:80]))
            self._state = 'size'
        elif self._state == 'size':
            digits = text.split(b';', 1)[0].strip()
            try:
                if not digits or digits.lstrip(b'0123456789abcdefABCDEF'):
                    raise ValueError
                self.left = int(digits, 16)
            except ValueError:
                raise ProtocolError('bad chunked body: chunk size {!r}'
                                    .format(text[:80])) from None
            self._state = 'data' if self.left else 'trailer'
        elif text:  # a trailer field: read and let go
            self._trailers += 1
            if self._trailers > _MAX_HEAD_FIELDS:
                raise ProtocolError('bad chunked body: more than {} trailer lines'
                                    .format(_MAX_HEAD_FIELDS))
        else:
            self.done = True

    def closed(self) -> None:
        """The connection ended: the end of a body read to it, or of a
        chunked body whose last chunk came (a trailer cut short loses
        nothing of the body: http.client takes it so); else
        ``ProtocolError`` unless the body was whole."""
        if self.done:
            return
        self.check()
        if self._state == 'trailer' or (not self.chunked and self.left is None):
            self.done = True
            return
        raise ProtocolError('connection closed before the end of the body')


# whether a socket is a file descriptor, which os.write takes (POSIX): a
# request is sent in one system call
_SOCKETS_ARE_FDS = os.name == 'posix'

# no bytes, as a buffer: a response's that holds none (read-only, shared)
_NO_BYTES = memoryview(b'')

# the most a response's receive takes (http.client's reader takes 8 KiB):
# its first brings the head and a small body whole, where 8 KiB would leave
# the rest of a 10 KiB file to a second receive (and the poll before it)
_FIRST_READ = 65536

_TLS_RECORD = 16384   # the most plaintext one TLS record carries
# the most a read of a body takes from the bytes that came with its head,
# and its first read from the socket (what http.client's reader receives
# at once), but for a body that came whole: the rest waits for the next
# read, so that a rate limit set on the download signal paces it
_BODY_STEP = 8192

# the final statuses whose answers have no body (a 101's connection is another protocol's)
_NO_BODY_STATUSES = frozenset({101, 204, 304})


class _Response(_HeadParser):
    """An answer: its head, read as a ``_HeadParser`` reads one (it is
    one), and its body, read through its framing (a length, chunks, or to
    the connection's end), as steps on its connection's socket, which need
    not block: each wait for bytes lasts ``timeout`` seconds at most
    (``None``: no limit). Its receives go into its own buffer, of
    ``_FIRST_READ`` bytes at most, whose bytes not taken yet are ``rest``
    (after the head: the body's first). The socket stays its connection's,
    which closes it once the answer is done with, never while one is read
    (see ``_Request.close``). The thread of its request. (What its head
    and its reads set starts as the class's.)

    Its steps: ``begin_steps`` reads the head; bitpit reads a body with
    ``readinto_steps``, into the caller's buffers, and a caller's code
    with ``read1_steps`` and ``read_steps`` (``_BodyFraming``, made at
    the first call: chunks as well). ``readinto_steps`` ends as soon as
    some bytes arrived (one receive), so progress, stall detection and
    rate limits see bytes as they come; the caller never asks for more
    than the announced length. Of a plain body, the bytes that came with
    the head are copied straight into the caller's buffer first (in one
    read if they are the whole body, else ``_BODY_STEP`` at a time);
    later reads go straight to the socket, so ``ready()`` can tell
    whether a read would wait, but for the receive of the body's last
    ``_FIRST_READ`` bytes, which goes into the buffer and shows whatever
    the server sent beyond the body. Over TLS, where one receive brings
    one record (16 KiB at most), a read goes on with the records that
    are already there, without waiting.

    It has what bitpit and a caller's cookie jar read of http.client's
    responses: ``status`` (``code``), ``reason``, ``version`` (10 or 11),
    ``fields`` (also ``headers`` and ``msg``, a ``_Headers`` made when
    first asked for: bitpit reads ``by_name``), ``getheader``,
    ``getheaders``, ``info()`` (an ``http.client.HTTPMessage``),
    ``chunked``, ``length`` (as http.client's, the bytes of the body not
    read yet, once ``readinto_steps`` reads it), ``will_close``,
    ``isclosed`` (``closed``) and ``close``, set and behaving as
    http.client's do, and ``begin`` and ``read``, the steps run on the
    calling thread."""
    rest = _NO_BYTES  # bytes received and not taken yet
    chunked = False
    length: Optional[int] = None
    will_close = True
    closed = False  # (as http.client's: the answer closed, or its body read to its end)
    _framing: Optional[_BodyFraming] = None  # read1's, made at its first call
    _unread = b''  # body bytes that read1 received and did not hand out
    _read = False  # whether readinto_steps read from the socket
    # whether to look for more TLS records after a read from the socket
    # (over TLS, with poll): found at the first such read, which a small
    # body, come with its head, never makes
    _tls: Optional[bool] = None
    _poll: Any = None  # over TLS: polls the socket for more records
    _error: Optional[BaseException] = None  # a receive's failure, after bytes

    def __init__(self, sock: Any, method: str = 'GET', timeout: Optional[float] = None):
        self._sock = sock
        self._method = method
        self.timeout = timeout

    @property
    def code(self) -> int:
        return self.status

    @property
    def msg(self) -> _Headers:
        return self.fields

    def begin_steps(self) -> '_Steps[None]':
        """Read the head, and set what the body is read by: a wait for
        bytes, then a receive, until the head is whole."""
        sock, timeout = self._sock, self.timeout
        while True:
            # a wait for bytes first, which are unlikely to be there yet
            # (an answer just asked for, the rest of its head): it saves the
            # receive that would fail
            if not (yield _Wait(sock, _deadline(timeout), False)):
                raise socket.timeout('timed out')
            try:  # (the usual receive, made here: no steps of their own)
                data = sock.recv(_FIRST_READ)
            except OSError as exc:
                if not _would_block(exc):
                    raise
                data = yield from _io_steps(sock.recv, sock, timeout, _FIRST_READ)
            if not data:
                import http.client  # (its error, as http.client's own reader raises it)
                received = self._buffer or self._interim  # (an unfinished head, interim ones)
                raise http.client.RemoteDisconnected(
                    'Remote end closed connection ' +
                    ('within the response head' if received else 'without response'))
            if self.feed(data) is not None:
                break
        firsts = self.firsts
        transfer = firsts.get('transfer-encoding')
        if transfer is not None:
            self.chunked = transfer.lower() == 'chunked'
        self.will_close = not self.keep_alive()
        if self.status in _NO_BODY_STATUSES or self._method == 'HEAD':
            self.length = 0
        elif not self.chunked:
            value = firsts.get('content-length')
            if value and value.isascii() and value.isdigit():
                self.length = int(value)
            else:
                self.will_close = True  # the body ends with the connection

    def begin(self) -> None:
        """``begin_steps`` run here."""
        _drive_here(self.begin_steps())

    def getheader(self, name: str, default: Any = None) -> Any:
        """The values of the field ``name`` joined by ``', '``, else ``default``."""
        value = self.by_name.get(name.lower())
        return default if value is None else value

    def getheaders(self) -> List[Tuple[str, str]]:
        return self.fields.items()

    def info(self) -> http.client.HTTPMessage:
        return self.fields.message()

    def readinto_steps(self, view: memoryview) -> '_Steps[int]':
        """Read at least one byte into ``view``; 0 at the body's end. A
        wait for bytes lasts the time-out at most (``socket.timeout``); a
        failure after bytes is raised at the next read."""
        if self.closed:  # the body read to its end, or the answer closed
            return 0
        if self.chunked:
            data = yield from self.read1_steps(len(view))
            view[:len(data)] = data
            return len(data)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        left = self.length
        rest = self.rest
        if not rest and left is not None and left < _FIRST_READ:
            if not left:
                return 0
            # the body's last receive goes into the buffer, which sees
            # whatever the server sent beyond it
            sock = self._sock
            data = yield from _io_steps(sock.recv, sock, self.timeout, _FIRST_READ)
            if not data:
                return 0  # the connection ended
            rest = self.rest = memoryview(data)
        held = len(rest)
        if held:
            # no more than the buffer holds: copied from it, no receive
            got = len(view)
            if left is None or held < left:  # a part of the body: a step at a time
                got = min(got, _BODY_STEP)
            elif held > left:  # bytes beyond the body: the next answer would begin with them
                self.will_close = True
            if got >= held:  # all of them (the usual: a small body, come with the head)
                view[:held] = rest
                self.rest = _NO_BYTES
                got = held
            else:
                view[:got] = rest[:got]
                self.rest = rest[got:]
        else:
            sock = self._sock
            got = yield from _io_steps(sock.recv_into, sock, self.timeout,
                                       view if self._read else view[:_BODY_STEP])
            self._read = True
            tls = self._tls
            if tls is None:
                tls = self._tls = _HAS_POLL and _is_tls(sock)
            if tls:
                if self._poll is None:
                    self._poll = select.poll()
                    self._poll.register(sock, select.POLLIN)
                got = self._more_records(view, got)
        if left is not None:
            self.length = left - got
        return got

    def _more_records(self, view: memoryview, got: int) -> int:
        """After ``got`` bytes of a TLS read, the records already received,
        while there is room for one. A failure waits for the next read, so
        that the bytes before it are not lost."""
        sock = self._sock
        try:
            while got and len(view) - got >= _TLS_RECORD and \
                    (sock.pending() or self._poll.poll(0)):
                more = sock.recv_into(view[got:])
                if not more:
                    break
                got += more
        except (OSError, ValueError) as exc:
            if _tls_wants_write(exc) is None:  # (else a record not whole yet: for the next read)
                self._error = exc
        return got

    def buffered(self) -> bool:
        """Whether bytes of a plain body wait in the buffer, or its first
        read (a step) is yet to come: a splice from the socket must come
        after."""
        return bool(self.rest) or not self._read

    def ready(self) -> bool:
        """Whether a read would return at once."""
        if self.rest or self.closed:
            return True
        if self._poll is not None:  # TLS, read straight from the socket
            return bool(self._sock.pending() or self._poll.poll(0))
        return _ready(self._sock)

    def wait_steps(self, until: Optional[float]) -> '_Steps[bool]':
        """Wait until a read would not wait for the network, or until the
        monotonic time ``until`` (``None``: no deadline); whether it would
        not. ``True`` at once when bytes are held, at the body's end, and
        for a chunked body, where bytes may be buffered."""
        if self.chunked or self.ready():
            return True
        return (yield _Wait(self._sock, until))

    def read1_steps(self, size: int = -1) -> '_Steps[bytes]':
        """Body bytes, at most ``size`` (``-1``: any number), from the
        buffer or else one receive; ``b''`` at the body's end (when the
        answer closes). Raises ``ProtocolError`` for a body cut short or
        badly framed."""
        while not self._unread:
            if self.closed:
                return b''
            framing = self._framing
            if framing is None:
                # (no body after a head that says there is none, chunked or not)
                framing = self._framing = _BodyFraming(self.length,
                                                       self.chunked and self.length != 0)
            if framing.done:
                self.close()
                return b''
            framing.check()  # (an error after the bytes handed out: no receive first)
            data, self.rest = bytes(self.rest), _NO_BYTES  # held bytes first
            if not data:  # (a receive's bytes as they came, not copied again)
                data = yield from _io_steps(self._sock.recv, self._sock, self.timeout,
                                            _FIRST_READ)
            if data:
                self._unread = b''.join(framing.feed(data))
                if framing.rest:  # the server sent more than the body
                    self.will_close = True
            else:
                framing.closed()  # the connection's end: the body's, or it was cut short
        if size < 0 or size >= len(self._unread):
            data, self._unread = self._unread, b''
        else:
            data, self._unread = self._unread[:size], self._unread[size:]
        if not self._unread and self._framing is not None and self._framing.done:
            self.close()  # its end read: the connection may carry another answer
        return data

    def read_steps(self, size: Optional[int] = None) -> '_Steps[bytes]':
        """The body's bytes, ``size`` at most (``None``: to its end)."""
        parts = []
        left = size
        while left is None or left > 0:
            data = yield from self.read1_steps(-1 if left is None else left)
            if not data:
                break
            parts.append(data)
            if left is not None:
                left -= len(data)
        return b''.join(parts)

    def read(self, size: Optional[int] = None) -> bytes:
        """``read_steps`` run here."""
        return _drive_here(self.read_steps(size))

    def isclosed(self) -> bool:
        """Whether the body was read to its end, or the answer closed."""
        return self.closed

    def close(self) -> None:
        """Let the buffer go; the socket stays its connection's. Bytes
        that it holds still (beyond a body that needed no read, an empty
        one's say: a read marks those beyond the bytes it takes) say that
        the server is out of step: the connection carries no other answer."""
        self.closed = True
        if self.rest:
            self.will_close = True
            self.rest = _NO_BYTES


def _field_lines(fields: Dict[str, str]) -> str:
    """The lines of ``fields`` in a request's head, each ended by CRLF, as
    http.client writes them (its ``putheader`` validates each field in a
    call of its own). A line break in a field's name or value, which would
    inject a field, raises ``ValueError`` as http.client does (stricter: no
    folded value either)."""
    text = ''.join([name + ': ' + value + '\r\n' for name, value in fields.items()])
    breaks = len(fields)  # (one count of each over the whole text)
    if text.count('\n') != breaks or text.count('\r') != breaks:
        bad = next(field for field in fields.items() if {'\r', '\n'} & set(''.join(field)))
        raise ValueError('Invalid header {!r}: {!r}'.format(*bad))
    return text


def _request_head(method: str, target: str, field_lines: str) -> bytes:
    """The bytes of an HTTP/1.1 request's head: its request line for
    ``target``, the ``field_lines`` (``_field_lines``) and the blank line
    that ends it, encoded as http.client encodes them (Latin-1). The method
    and the target are bitpit's own (``_check_url`` lets no control
    character or space into a target)."""
    # (one format, not five additions; 'latin1' is the spelling that
    # CPython's encode() takes to its own encoder, with no codec look-up)
    return ('%s %s HTTP/1.1\r\n%s\r\n' % (method, target, field_lines)).encode('latin1')


class _HTTPConnection:
    """A connection to a server (or to a plain proxy): what bitpit takes of
    http.client's ``HTTPConnection`` (its ``host``, ``port``, ``timeout``,
    ``sock`` and ``close``), without importing http.client. It connects
    (``connect_steps``) and sends (``send``, a plain call, then
    ``send_rest_steps`` for what it left) on a socket that does not block,
    then or after: its ``timeout`` bounds each of their waits (and its
    answers' waits). A ``_Cancel`` (or ``abort()``)
    shuts it down from another thread, in every phase: name look-up,
    connect, TLS handshake, request, body. The cancel is checked around the
    connect, which closes the window between an abort and the socket's
    creation. Made and used by one thread at a time (the loop's, or a
    caller's that drives steps itself); ``abort`` by any."""
    connecting_socket: Optional[socket.socket] = None
    cancel: Optional[_Cancel] = None
    via_proxy: bool                    # set by _Request: a plain proxy gets full URLs
    proxy_parts: Optional[urllib.parse.SplitResult]
    release_slot: Optional[Callable[[], None]] = None  # gives its host slot back
    # a poll object of its socket's, made at the pool's first look (_quiet):
    # a connection has one socket (a TLS one takes over the descriptor of the
    # raw one as it connects), and the pool gets it once connected
    idle_poll: Any = None
    sock: Any = None                   # the connected socket (a TLS one over HTTPS)

    def __init__(self, host: str, port: int, timeout: Optional[float]):
        self.host = host
        self.port = port
        self.timeout = timeout
        # whether sock is a TLS socket, set with it (an instance's own:
        # read for every request, in send and _quiet; a _Response, which
        # has only the socket, asks _is_tls at its first receive from it)
        self.tls = False
        self._abort_lock = threading.Lock()  # an abort, or a change of socket object
        self._aborted = False

    def close(self) -> None:
        """Close its socket, if any. The thread that uses it."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def connect_steps(self) -> '_Steps[None]':
        """What http.client's ``connect`` does, as steps: its audit event,
        the socket (``_create_connection_steps``), ``TCP_NODELAY``."""
        sys.audit('http.client.connect', self, self.host, self.port)
        self.sock = yield from self._create_connection_steps(
            (self.host, self.port), self.timeout)
        try:  # (http.client's: it may fail where TCP_NODELAY is missing)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            if exc.errno != errno.ENOPROTOOPT:
                raise

    def _create_connection_steps(self, address: Tuple[str, int], timeout: Optional[float]
                                 ) -> '_Steps[socket.socket]':
        """The connected socket, which does not block: to the first
        address of the host's that takes the connect."""
        host, port = address
        last_error: Optional[OSError] = None
        addresses = yield from _resolve_steps(host, port, self.cancel, timeout)
        for family, kind, proto, _, sockaddr in addresses:
            sock = socket.socket(family, kind, proto)
            self.connecting_socket = sock
            try:
                if self.cancel is not None and self.cancel.is_set():
                    raise OSError('download stopped')
                yield from self._connect_socket_steps(sock, sockaddr, timeout)
                if self.cancel is not None and self.cancel.is_set():
                    raise OSError('download stopped')
                return sock
            except OSError as exc:
                last_error = exc
                sock.close()
            except BaseException:  # (the steps closed, an interrupt)
                sock.close()
                raise
        raise last_error or OSError('no address found for {}'.format(host))

    def _connect_socket_steps(self, sock: socket.socket, address: Any,
                              timeout: Optional[float]) -> '_Steps[None]':
        """Connect ``sock`` without blocking, and wait until it is done."""
        sock.setblocking(False)
        error = sock.connect_ex(address)
        if error in _CONNECTING:
            if not (yield _Wait(sock, _deadline(timeout), writing=True)):
                raise socket.timeout('timed out')
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))

    def send(self, data: bytes) -> int:
        """The first write of ``data`` (a request's head), made at once: how
        many of its bytes the socket took (0: none yet). It takes a
        request's few hundred bytes whole nearly always (on POSIX, a plain
        socket's write is ``os.write``, one system call), so that a request
        needs no steps to send; ``send_rest_steps`` sends what it left."""
        sock = self.sock
        assert sock is not None  # (connect_steps set it)
        sys.audit('http.client.send', self, data)
        try:
            if _SOCKETS_ARE_FDS and not self.tls:
                return os.write(sock.fileno(), data)
            return sock.send(data)
        except OSError as exc:
            if not _would_block(exc):
                raise
            return 0  # (written by send_rest_steps, which waits when it must)

    def send_rest_steps(self, data: bytes, sent: int) -> '_Steps[None]':
        """Send the bytes of ``data`` that ``send`` left, after its first
        ``sent``: a wait for room whenever the socket takes no more,
        ``socket.timeout`` after the time-out without progress."""
        sock = self.sock
        rest: Any = data
        while sent < len(rest):
            rest = memoryview(rest)[sent:]
            sent = yield from _io_steps(sock.send, sock, self.timeout, rest, sending=True)

    def abort(self) -> None:
        """Shut the connection down; a thread blocked on it wakes at once.
        Any thread."""
        with self._abort_lock:
            self._aborted = True
            for sock in (self.sock, self.connecting_socket):
                if sock is not None:
                    try:
                        # socket.socket's own shutdown: SSLSocket.shutdown would
                        # drop its TLS state, and a read in another thread would
                        # then take the encrypted records for data
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except (OSError, ValueError, TypeError):
                        pass


class _HTTPSConnection(_HTTPConnection):
    """A TLS connection to a server, through a proxy's tunnel if it has one
    (``set_tunnel``)."""
    handshake_done = False
    # (host, port, the CONNECT's fields) of the server that a proxy's tunnel leads to
    tunnel: Optional[Tuple[str, int, Dict[str, str]]] = None

    def __init__(self, host: str, port: int, timeout: Optional[float],
                 context: ssl.SSLContext):
        super().__init__(host, port, timeout)
        self.context = context

    def set_tunnel(self, host: str, port: int, headers: Dict[str, str]) -> None:
        """Connect to ``host:port`` through a tunnel that this connection's
        proxy opens (``CONNECT``, with ``headers``), as http.client's
        ``set_tunnel`` has it."""
        self.tunnel = (host, port, headers)

    def connect_steps(self) -> '_Steps[None]':
        """Connect (through the proxy's tunnel, if any), then shake hands
        with ``self.sock`` already the TLS socket, so that ``abort()`` can
        shut it down during the handshake (http.client's own ``connect``
        hands the raw socket over to the TLS one mid-handshake)."""
        yield from super().connect_steps()
        tunnel = self.tunnel
        if tunnel is not None:
            yield from self._tunnel_steps(*tunnel)
        with self._abort_lock:  # the raw socket goes into the TLS one
            if self._aborted:
                raise OSError('download stopped')
            self.sock = self.context.wrap_socket(
                self.sock, server_hostname=self.host if tunnel is None else tunnel[0],
                do_handshake_on_connect=False)
            self.tls = True
        # the handshake: a wait for the server whenever it must answer first
        yield from _io_steps(self.sock.do_handshake, self.sock, self.timeout)
        self.handshake_done = True

    def _tunnel_steps(self, host: str, port: int, headers: Dict[str, str]) -> '_Steps[None]':
        """A proxy's tunnel (``set_tunnel``), opened as http.client's
        ``_tunnel`` opens it, as steps: ``CONNECT``, with a ``Host`` field
        as HTTP/1.1 asks (an IPv6 address in brackets), and the proxy's
        answer read by bitpit's ``_Response``. An answer other than 200 is
        an ``OSError``, as http.client has it."""
        authority = '{}:{}'.format('[{}]'.format(host) if ':' in host else host, port)
        fields = {'Host': authority}
        fields.update(headers)
        head = _request_head('CONNECT', authority, _field_lines(fields))
        yield from self.send_rest_steps(head, self.send(head))
        answer = _Response(self.sock, 'CONNECT', timeout=self.timeout)
        yield from answer.begin_steps()
        answer.close()
        if answer.status != 200:
            self.close()
            raise OSError('Tunnel connection failed: {} {}'.format(answer.status,
                                                                   answer.reason.strip()))


if TYPE_CHECKING:
    # scheme, host, port, proxy (host, port, user, password) or None, id of the
    # TLS context, the manager's _HostSlots or None (a manager's connections
    # are its own)
    _ConnectionKey = Tuple[str, str, int,
                           Optional[Tuple[str, int, Optional[str], Optional[str]]], int,
                           Optional['_HostSlots']]
    _AnyHTTPConnection = Union[_HTTPConnection, _HTTPSConnection]


def _close_connection(conn: Any) -> None:
    """Close ``conn``, and give back the host slot it holds, if any."""
    conn.close()
    release, conn.release_slot = getattr(conn, 'release_slot', None), None
    if release is not None:
        release()


class _ConnectionPool:
    """Idle keep-alive connections, by scheme, host, port, proxy and TLS
    context, so that many requests to one server do not each pay for a new
    connection. ``_lock`` guards ``_idle`` and ``_expiry``.

    Every idle connection is looked at (``_quiet``) before it is handed
    out, however short a time ago it was parked: bytes that came since are
    the server's close, or bytes an earlier answer sent beyond its body
    (``_Response`` sees those that came with its last receive only), which may
    be a whole answer that the next request would take for its own.
    ``_Request`` sends its request again on a new connection when the
    reused one turns out closed after that look, or answers with what is
    no status line."""
    MAX_IDLE_PER_KEY = 256
    MAX_IDLE_SECONDS = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: Dict[_ConnectionKey, List[Tuple[float, _AnyHTTPConnection]]] = {}
        # when the oldest idle connection, parked since, becomes too old
        # (or earlier: one taken since; 0 before any was parked, when the
        # next put sets it): no put looks for one before
        self._expiry = 0.0

    def get(self, key: _ConnectionKey) -> Optional[_AnyHTTPConnection]:
        """An idle connection for ``key`` that can carry a new request, or
        ``None``. The ones idle too long or not quiet are closed."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                since, conn = idle.pop()
                if not idle:  # no key is kept for nothing: keys come and go
                    del self._idle[key]
            if time.monotonic() - since < self.MAX_IDLE_SECONDS and _quiet(conn):
                return conn
            _close_connection(conn)

    def clear(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for _, conn in connections:
                _close_connection(conn)

    def put(self, key: _ConnectionKey, conn: _AnyHTTPConnection) -> None:
        """Keep ``conn`` for reuse (its last response must be fully read),
        and close the connections of any host that were idle too long."""
        now = time.monotonic()
        expired = []
        with self._lock:
            if now >= self._expiry:
                # conn's, unless one parked before it is still idle
                self._expiry = now + self.MAX_IDLE_SECONDS
                for old_key, idle in list(self._idle.items()):
                    while idle and now - idle[0][0] >= self.MAX_IDLE_SECONDS:
                        expired.append(idle.pop(0)[1])
                    if idle:
                        self._expiry = min(self._expiry, idle[0][0] + self.MAX_IDLE_SECONDS)
                    else:
                        del self._idle[old_key]
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.MAX_IDLE_PER_KEY:
                idle.append((now, conn))
            else:
                expired.append(conn)
        for old in expired:
            _close_connection(old)

    def count(self, match: Callable[[_ConnectionKey], bool]) -> int:
        """How many idle connections have a key that ``match`` accepts."""
        with self._lock:
            return sum(len(idle) for key, idle in self._idle.items() if match(key))

    def evict(self, match: Callable[[_ConnectionKey], bool]) -> None:
        """Close the oldest idle connection whose key ``match`` accepts, if any."""
        with self._lock:
            oldest = min(((idle[0][0], key) for key, idle in self._idle.items()
                          if idle and match(key)), key=lambda found: found[0], default=None)
            conn = None
            if oldest is not None:
                idle = self._idle[oldest[1]]
                conn = idle.pop(0)[1]
                if not idle:
                    del self._idle[oldest[1]]
        if conn is not None:
            _close_connection(conn)

    def _after_fork(self) -> None:
        """Start empty in a forked child: its parent's idle connections are
        its parent's still (a request on one would share its TCP
        connection with the parent's next one, each process reading
        answers the other asked for). Their descriptors are closed here,
        which leaves the connections open for the parent; no lock is
        taken that a thread of the parent's may have held at the fork."""
        idle, self._idle = self._idle, {}
        self._lock = threading.Lock()
        self._expiry = 0.0
        for connections in idle.values():
            for _, conn in connections:
                conn.release_slot = None  # (not given back: the slots' lock may be held)
                conn.close()


_POOL = _ConnectionPool()
if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_POOL._after_fork)


# -- per-host connection caps -------------------------------------------------------

class _SlotTicket:
    """A connection waiting for a slot; ``granted`` once it has one, and
    then ``event`` set (its cancel sets it too). ``granted`` is guarded by
    its ``_HostSlots``' lock."""
    __slots__ = ('granted', 'event')

    def __init__(self) -> None:
        self.granted = False
        self.event = _Flag()


class _HostSlots:
    """A manager's cap on the connections open at once to one (scheme, host,
    port), ``max_per_host``, over all of its downloads: a connection holds a
    slot from its opening to its closing, idle in the pool included.

    A connection takes a slot before it opens (``acquire_steps``): at
    once if one is free and nobody waits, else in turn, first come first
    served, its wait an event that its grant or its ``_Cancel`` sets.
    Closing the connection gives the slot back (``release``) to the
    longest waiter. A
    transfer asks ``spare`` before it starts one more connection; when there
    is none, its callback is called once a slot frees with nobody waiting.
    An idle pooled connection of the host is closed for a waiter.

    ``_cond`` guards ``_open``, ``_queues`` and ``_watchers``, and tells a
    longer queue to whoever watches it; nothing is called under it but a
    waiter's event. Callbacks run in the thread that closed a connection,
    which holds no lock (a transfer's sets a flag and wakes its steps,
    ``_Transfer._on_slot_freed``). Any thread."""

    def __init__(self, cap: int):
        self.cap = cap
        self._cond = threading.Condition(threading.Lock())
        self._open: Dict[_HostKey, int] = {}
        self._queues: Dict[_HostKey, 'collections.deque[_SlotTicket]'] = {}
        self._watchers: Dict[_HostKey, Dict[Callable[[], None], None]] = {}

    def _idle_here(self, host: _HostKey) -> Callable[[Any], bool]:
        """Whether a pool key is one of this manager's to ``host``."""
        return lambda key: key[:3] == host and key[5] is self

    def spare(self, host: _HostKey, freed: Callable[[], None]) -> bool:
        """Whether one more connection to ``host`` could open now (idle ones
        would be closed for it); if not, ``freed()`` is called once a slot
        frees with nobody waiting for it."""
        idle = _POOL.count(self._idle_here(host))
        with self._cond:
            if not self._queues.get(host) and self._open.get(host, 0) - idle < self.cap:
                return True
            self._watchers.setdefault(host, {})[freed] = None
            return False

    def acquire_steps(self, host: _HostKey, cancel: Optional[_Cancel]) -> '_Steps[None]':
        """Take a slot to ``host``, waiting in turn for one. Raises
        ``_Stopped`` when ``cancel`` comes first. Steps of a request,
        holding no lock."""
        with self._cond:
            queue = self._queues.setdefault(host, collections.deque())
            if not queue and self._open.get(host, 0) < self.cap:
                self._open[host] = self._open.get(host, 0) + 1
                return
            ticket = _SlotTicket()
            queue.append(ticket)
            self._cond.notify_all()  # for whoever watches the queue
        waker = _EventAbort(ticket.event)
        try:
            if cancel is not None:
                cancel.register(waker)
            _POOL.evict(self._idle_here(host))  # an idle one of ours: its slot is for us
            while not ticket.event.is_set():
                yield _Wait(None, None, event=ticket.event)
            with self._cond:
                if not ticket.granted:  # (a cancel set the event)
                    queue.remove(ticket)
                    raise _Stopped
        except BaseException:
            with self._cond:
                granted = ticket.granted
                if not granted and ticket in queue:
                    queue.remove(ticket)
            if granted:
                self.release(host)
            raise
        finally:
            if cancel is not None:
                cancel.unregister(waker)

    def release(self, host: _HostKey) -> None:
        """Give back a slot of a connection that closed: to the longest
        waiter, else free (and tell the transfers that want one)."""
        with self._cond:
            self._open[host] -= 1
            queue = self._queues.get(host)
            while queue and self._open[host] < self.cap:
                ticket = queue.popleft()
                ticket.granted = True
                ticket.event.set()
                self._open[host] += 1
            watchers = self._watchers.pop(host, {}) if not queue else {}
        for freed in watchers:
            freed()

    def parked(self, host: _HostKey) -> None:
        """A connection of ours to ``host`` went idle into the pool: close
        one for a waiter, if any (it may have looked before it was there)."""
        with self._cond:
            waiting = bool(self._queues.get(host))
        if waiting:
            _POOL.evict(self._idle_here(host))


def _quiet(conn: _AnyHTTPConnection) -> bool:
    """Whether an idle connection has nothing to read. If it has, the server
    closed it or sent bytes no request asked for (say the rest of a body
    longer than its Content-Length), which the next request would take for
    its response. Where there is ``poll``, a connection keeps the poll
    object of its socket (``idle_poll``) for the next look: a connection
    carries many requests, each looked at."""
    sock = conn.sock
    if sock is None:
        return False
    if not _HAS_POLL or (conn.tls and sock.pending()):
        return not _ready(sock)
    poller = conn.idle_poll
    if poller is None:
        poller = conn.idle_poll = select.poll()
        poller.register(sock, select.POLLIN)
    try:
        return not poller.poll(0)
    except (OSError, ValueError, TypeError):  # (as _ready: taken as not quiet)
        return False


def _environment_proxy(scheme: str, host: str) -> str:
    """``http_proxy``/``https_proxy`` unless ``no_proxy`` exempts ``host``,
    with urllib's rules (lower case first; no upper-case ``HTTP_PROXY`` in a
    CGI script). Looks up only these names, and each only when the ones
    before leave it open: ``urllib.request.getproxies()`` decodes the whole
    environment, which costs more than a small download."""
    environ = os.environ
    name = scheme + '_proxy'
    proxy = environ.get(name)
    if proxy is None:
        proxy = environ.get(name.upper())
        if proxy and scheme == 'http' and 'REQUEST_METHOD' in environ:
            proxy = None  # (a client's Proxy: header, in a CGI script)
    if not proxy:
        return ''
    no_proxy = environ.get('no_proxy') or environ.get('NO_PROXY')
    if no_proxy:
        # (undocumented, so the standard library's stubs lack it)
        from urllib.request import proxy_bypass_environment  # type: ignore  # not in stubs
        if proxy_bypass_environment(host, {'no': no_proxy}):
            return ''
    return proxy


def _parse_proxy(proxy: str) -> urllib.parse.SplitResult:
    """Split an ``http://[user:pass@]host:port`` proxy URL (the scheme may be
    left out). Raises ``InvalidURLError`` for anything else."""
    if not isinstance(proxy, str):
        raise TypeError('proxy must be a str, not {!r}'.format(proxy))
    if '://' not in proxy:
        proxy = 'http://' + proxy
    try:
        parts = urllib.parse.urlsplit(proxy)
        parts.port  # validates the port
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() != 'http' or not parts.hostname or \
            _CONTROL_CHARS_RE.search(proxy):
        raise InvalidURLError('unsupported proxy {!r}: use http://host:port'.format(proxy))
    return parts


def _netrc_credentials(host: str) -> Optional[Tuple[str, str]]:
    """Login and password for ``host`` from ``$NETRC`` or ``~/.netrc``, as
    curl's ``--netrc-optional`` reads them; ``None`` when there is none.
    The file is read again when it changed (its time or size)."""
    hosts = _read_netrc()
    entry = hosts.get(host) or hosts.get('default')
    if entry is None:
        return None
    login, _, password = entry
    return login or '', password or ''


if TYPE_CHECKING:
    _NetrcHosts = Mapping[str, Tuple[str, Optional[str], Optional[str]]]
# the .netrc read last: (its path, time and size), its hosts; replaced whole
# (any thread: one that races another reads the file again)
_NETRC: 'Tuple[Tuple[str, Optional[int], Optional[int]], _NetrcHosts]' = (('', None, None), {})


def _read_netrc() -> '_NetrcHosts':
    global _NETRC
    named = os.environ.get('NETRC')
    path = named or _default_netrc_path()
    key: Tuple[str, Optional[int], Optional[int]]  # the file's path, time and size
    try:
        status = os.stat(path)
        key = (path, status.st_mtime_ns, status.st_size)
    except OSError:
        key = (path, None, None)
    known, hosts = _NETRC
    if key == known:
        return hosts
    hosts = {}
    if key[1] is not None:
        import netrc
        try:  # (None: the default file, with netrc's permission check)
            hosts = netrc.netrc(named or None).hosts
        except (OSError, netrc.NetrcParseError) as exc:
            _log.warning('ignoring .netrc: %s', exc)
    _NETRC = (key, hosts)
    return hosts


def _default_netrc_path() -> str:
    """``~/.netrc``, as the netrc module finds it. On POSIX, worked out
    again only when ``$HOME`` changed: ``expanduser`` costs each download
    more than the ``stat`` of the file."""
    global _HOME_NETRC
    home = os.environ.get('HOME') if os.name == 'posix' else None
    if home is None:  # (expanduser asks the password database, or Windows' variables)
        return os.path.join(os.path.expanduser('~'), '.netrc')
    known_home, path = _HOME_NETRC
    if home != known_home:
        # posixpath.expanduser('~') with $HOME set, from the value read above
        path = os.path.join(home.rstrip('/') or '/', '.netrc')
        _HOME_NETRC = (home, path)
    return path


# ($HOME, the .netrc in it) of the last look-up; replaced whole (any thread)
_HOME_NETRC: Tuple[Optional[str], str] = (None, '')


# -- what the environment and .netrc say for a host, reused -------------------------

# how long the downloads of managers reuse a host's look-ups, in seconds
_SHARED_LOOKUP_SECONDS = 1.0


# what a look-up's dict gives for a key not looked up yet (None: found none)
_NOT_LOOKED_UP: Any = object()


class _HostLookups:
    """What the environment's proxy variables (``_environment_proxy``) and
    ``.netrc`` (``_netrc_credentials``) say for each host, looked up at
    the first request that needs it and reused: by the requests of one
    attempt (its ``_RequestOptions``), or by those of every download that
    managers run within a second (``_shared_lookups``): a look-up (up to 4
    environment variables and a ``stat``) costs more than the rest of a
    small file's request. ``made``: the monotonic time it was made at.
    ``routes`` keeps what the requests made with one set of settings
    take of them for an origin (``_Route``, by ``_RequestOptions.route``).
    Any thread: one that races another to a look-up makes the same."""
    __slots__ = ('made', '_proxies', '_netrc', 'routes')

    def __init__(self, made: float = 0.0):
        self.made = made
        self._proxies: Dict[Tuple[str, str], Optional[urllib.parse.SplitResult]] = {}
        self._netrc: Dict[str, Optional[Tuple[str, str]]] = {}
        self.routes: Dict[Tuple[_HostKey, str, _RequestSettings, Optional[_HostSlots]],
                          _Route] = {}

    def proxy(self, scheme: str, host: str) -> Optional[urllib.parse.SplitResult]:
        """The environment's proxy for a request by ``scheme`` (in lower
        case) to ``host`` (a URL's ``hostname``), or ``None``."""
        key = (scheme, host)
        found = self._proxies.get(key, _NOT_LOOKED_UP)
        if found is _NOT_LOOKED_UP:
            proxy = _environment_proxy(scheme, host)
            found = self._proxies[key] = _parse_proxy(proxy) if proxy else None
        return found

    def netrc(self, host: str) -> Optional[Tuple[str, str]]:
        """``.netrc``'s login and password for ``host``, or ``None``."""
        found = self._netrc.get(host, _NOT_LOOKED_UP)
        if found is _NOT_LOOKED_UP:
            found = self._netrc[host] = _netrc_credentials(host)
        return found


# the look-ups that the downloads of managers share: replaced whole by new
# ones once _SHARED_LOOKUP_SECONDS old (any thread)
_SHARED_LOOKUPS = _HostLookups(-_SHARED_LOOKUP_SECONDS)


def _shared_lookups() -> _HostLookups:
    """The look-ups that the downloads of managers share, made less than
    ``_SHARED_LOOKUP_SECONDS`` ago: a change of the environment or of
    ``.netrc`` shows in the requests of the downloads that a manager
    starts a second later."""
    global _SHARED_LOOKUPS
    lookups = _SHARED_LOOKUPS
    now = time.monotonic()
    if now - lookups.made >= _SHARED_LOOKUP_SECONDS:
        lookups = _SHARED_LOOKUPS = _HostLookups(now)
    return lookups


def _basic_auth(user: str, password: str) -> str:
    import base64
    token = '{}:{}'.format(user, password).encode('utf-8')
    return 'Basic ' + base64.b64encode(token).decode('ascii')


# -- HTTP Digest authentication (RFC 7616) --------------------------------------------

# the algorithms a Digest challenge may name, best first, and their hashlib names
_DIGEST_HASHES = {'SHA-512-256': 'sha512_256', 'SHA-256': 'sha256', 'MD5': 'md5'}
_DIGEST_STALE_ROUNDS = 2   # new nonces (stale=true) one request follows at most
# one item of an authentication header: an auth-param (name=value) or, alone,
# the scheme that begins a challenge
_AUTH_ITEM_RE = _Pattern(r'(?:^|[\s,])\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)'
                         r'(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*))?')
_QUOTED_PAIR_RE = _Pattern(r'\\(.)')

# where a challenge came from: (scheme, host, port) of an origin, or
# ('proxy', host, port) of a proxy
if TYPE_CHECKING:
    _AuthKey = Tuple[str, str, int]


def _challenges(values: List[str]) -> List[Tuple[str, Dict[str, str]]]:
    """The challenges of ``WWW-Authenticate`` (or ``Proxy-Authenticate``)
    header values: ``(scheme in lower case, {param in lower case: value})``,
    in their order."""
    found: List[Tuple[str, Dict[str, str]]] = []
    for value in values:
        # a folded line's break or another control character would make
        # the answer an invalid header: a space instead
        value = _CONTROL_CHARS_RE.sub(' ', value)
        for match in _AUTH_ITEM_RE.finditer(value):
            name, param = match.group(1), match.group(2)
            if param is None:
                found.append((name.lower(), {}))
            elif found:
                if param.startswith('"'):
                    param = _QUOTED_PAIR_RE.sub(r'\1', param[1:-1])
                found[-1][1].setdefault(name.lower(), param)
    return found


def _digest_hash(algorithm: str) -> Optional[Callable[[str], str]]:
    """``text -> hex digest`` for a Digest ``algorithm`` (without its
    ``-sess``), or ``None`` for one unknown here."""
    import hashlib
    name = _DIGEST_HASHES.get(algorithm.upper())
    if name is None or name not in hashlib.algorithms_available:
        return None
    return lambda text: hashlib.new(name, text.encode('utf-8')).hexdigest()


def _quote(text: str) -> str:
    return '"{}"'.format(text.replace('\\', '\\\\').replace('"', '\\"'))


class _DigestChallenge:
    """A Digest challenge a host or a proxy sent, and how many requests
    answered its nonce (``count``, the nonce-count of the last one).
    Guarded by its ``_DigestAuth``'s lock."""
    __slots__ = ('realm', 'nonce', 'opaque', 'algorithm', 'hash', 'session', 'qop',
                 'userhash', 'stale', 'count')

    def __init__(self, params: Dict[str, str]):
        algorithm = params.get('algorithm', 'MD5')
        self.session = algorithm.upper().endswith('-SESS')
        self.algorithm = algorithm
        self.hash = _digest_hash(algorithm[:-5] if self.session else algorithm)
        self.realm = params.get('realm', '')
        self.nonce = params.get('nonce', '')
        self.opaque = params.get('opaque')
        qops = [q.strip().lower() for q in params['qop'].split(',')] if 'qop' in params \
            else None
        # None: RFC 2069, no qop. 'auth-int' alone cannot be answered: it
        # would hash a request body, and '' says so
        self.qop = None if qops is None else ('auth' if 'auth' in qops else '')
        self.userhash = params.get('userhash', '').lower() == 'true'
        self.stale = params.get('stale', '').lower() == 'true'  # the nonce sent was old
        self.count = 0

    @property
    def usable(self) -> bool:
        return self.hash is not None and self.qop != '' and bool(self.nonce)

    @property
    def rank(self) -> int:
        """Its algorithm's place among ``_DIGEST_HASHES``: 0 is the best."""
        base = (self.algorithm[:-5] if self.session else self.algorithm).upper()
        return list(_DIGEST_HASHES).index(base) if base in _DIGEST_HASHES \
            else len(_DIGEST_HASHES)

    def answer(self, credentials: Tuple[str, str], method: str, uri: str) -> str:
        """The ``Authorization`` value of one more request with this nonce
        (a ``usable`` one)."""
        h = self.hash
        assert h is not None  # usable
        user, password = credentials
        self.count += 1
        cnonce = os.urandom(12).hex()
        ha1 = h('{}:{}:{}'.format(user, self.realm, password))
        if self.session:
            ha1 = h('{}:{}:{}'.format(ha1, self.nonce, cnonce))
        ha2 = h('{}:{}'.format(method, uri))
        nc = '{:08x}'.format(self.count)
        if self.qop:
            response = h(':'.join((ha1, self.nonce, nc, cnonce, self.qop, ha2)))
        else:
            response = h(':'.join((ha1, self.nonce, ha2)))
        if self.userhash:
            fields = ['username=' + _quote(h('{}:{}'.format(user, self.realm))),
                      'userhash=true']
        elif all(' ' <= c <= '~' for c in user):
            fields = ['username=' + _quote(user)]
        else:
            fields = ["username*=UTF-8''" + urllib.parse.quote(user, safe='')]
        fields += ['realm=' + _quote(self.realm), 'nonce=' + _quote(self.nonce),
                   'uri=' + _quote(uri), 'algorithm=' + self.algorithm,
                   'response=' + _quote(response)]
        if self.opaque is not None:
            fields.append('opaque=' + _quote(self.opaque))
        if self.qop:
            fields += ['qop=auth', 'nc=' + nc, 'cnonce=' + _quote(cnonce)]
        return 'Digest ' + ', '.join(fields)


class _DigestAuth:
    """The hosts and proxies that asked one download for Digest
    authentication, each with its latest challenge: the download answers
    them with Digest from then on, and never sends them Basic. Made at the
    first challenge (``_RequestOptions.digest_auth``: few downloads meet
    one), and kept across the download's attempts from then on. One slot,
    ``_asked``, ``None`` until a challenge is taken, and ``_DIGEST_LOCK``
    guards the ``_asked`` of all of them and the challenges' counts. Any
    thread."""
    __slots__ = ('_asked',)

    def __init__(self) -> None:
        self._asked: Optional[Dict[_AuthKey, _DigestChallenge]] = None

    def asked(self, key: _AuthKey) -> bool:
        with _DIGEST_LOCK:
            return self._asked is not None and key in self._asked

    def learn(self, key: _AuthKey, values: List[str]) -> Optional[_DigestChallenge]:
        """Take the best Digest challenge of an answer's header ``values``
        (the strongest algorithm known here) and return it; ``None`` when
        none can be answered (``key`` is still taken as asking for Digest
        if it offered one) or none is offered."""
        offered = [_DigestChallenge(params) for scheme, params in _challenges(values)
                   if scheme == 'digest']
        if not offered:
            return None
        chosen = min(offered, key=lambda c: (not c.usable, c.rank))
        with _DIGEST_LOCK:
            if self._asked is None:
                self._asked = {}
            known = self._asked.get(key)
            if known is not None and known.nonce == chosen.nonce:
                # the same nonce, sent again to another connection: its
                # count goes on (a count used twice is a replay)
                chosen.count = known.count
            self._asked[key] = chosen
        return chosen if chosen.usable else None

    def answer(self, key: _AuthKey, credentials: Tuple[str, str], method: str,
               uri: str) -> Optional[str]:
        """The ``Authorization`` (or ``Proxy-Authorization``) value of a
        request to ``key``; ``None`` when its challenge cannot be answered."""
        with _DIGEST_LOCK:
            assert self._asked is not None  # (asked() said so)
            challenge = self._asked[key]
            return challenge.answer(credentials, method, uri) if challenge.usable else None


# guards every _DigestAuth (a download that meets no Digest needs no lock of its own)
_DIGEST_LOCK = threading.Lock()


def _default_ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        import ssl
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


_SSL_CONTEXT: Optional[ssl.SSLContext] = None


class _Cookies:
    """The cookies of one download (or of a manager's downloads): the
    caller's ``http.cookiejar.CookieJar``, a Netscape ``cookies.txt`` file
    loaded into one, or else an in-memory jar made at the first
    ``Set-Cookie``. The jar locks itself; any thread."""
    __slots__ = ('jar',)  # (one for every download: small)

    def __init__(self, cookies: Union[None, str, os.PathLike[str],
                                      http.cookiejar.CookieJar] = None):
        self.jar: Optional[http.cookiejar.CookieJar] = None
        if cookies is None:
            return
        import http.cookiejar
        if isinstance(cookies, http.cookiejar.CookieJar):
            self.jar = cookies
        elif isinstance(cookies, (str, os.PathLike)):
            self.jar = _load_cookies_txt(cookies)
        else:
            raise TypeError('cookies must be an http.cookiejar.CookieJar or the path of '
                            'a cookies.txt file, not {!r}'.format(cookies))

    def header(self, url: str) -> Optional[str]:
        """The ``Cookie`` header the jar's rules send to ``url``, or ``None``."""
        if self.jar is None:
            return None
        request = _cookie_request(url)
        self.jar.add_cookie_header(request)
        return request.get_header('Cookie')

    def remember(self, response: _Response, url: str) -> None:
        """Keep the cookies ``response`` sets (its caller saw a
        ``Set-Cookie``: most answers have none), by the jar's rules."""
        if self.jar is None:
            import http.cookiejar
            self.jar = http.cookiejar.CookieJar()
        # (the jar reads only info() of what it is given)
        self.jar.extract_cookies(response, _cookie_request(url))  # type: ignore[arg-type]


def _cookie_request(url: str) -> urllib.request.Request:
    import urllib.request
    return urllib.request.Request(url)


def _load_cookies_txt(path: Union[str, 'os.PathLike[str]']) -> http.cookiejar.CookieJar:
    """A jar with the cookies of a Netscape ``cookies.txt`` file (as curl,
    wget, aria2 and browser extensions write it). Session cookies (expiry 0
    or empty) are kept, as curl does; expired ones and malformed lines are
    left out. Raises ``ValueError`` for an unreadable file."""
    import http.cookiejar
    jar = http.cookiejar.CookieJar()
    try:
        with open(path, encoding='utf-8', errors='replace') as file:
            lines = file.read().splitlines()
    except OSError as exc:
        raise ValueError('cannot read cookies file {}: {}'.format(path, exc)) from exc
    now = time.time()
    for line in lines:
        rest = {}
        if line.startswith('#HttpOnly_'):
            line, rest = line[len('#HttpOnly_'):], {'HttpOnly': ''}
        fields = line.split('\t')
        if line.startswith('#') or len(fields) != 7:
            continue
        domain, _, path_, secure, expires, name, value = fields
        if '.' not in domain.lstrip('.'):  # 'localhost': cookiejar sees it as 'localhost.local'
            domain += '.local'
        expiry = int(expires) if _DIGITS_RE.fullmatch(expires) else 0
        if expiry and expiry < now:
            continue
        jar.set_cookie(http.cookiejar.Cookie(
            0, name, value, None, False, domain, domain.startswith('.'),
            domain.startswith('.'), path_, True, secure == 'TRUE', expiry or None,
            not expiry, None, None, rest))
    return jar


_SECRET_HEADERS = ('authorization', 'cookie')  # (in lower case) the caller's secrets


class _GivenFields:
    """The fields that every request of a download sends to a trusted URL,
    or those to another: the ``fields`` by name, their ``names`` in lower
    case and their ``lines`` (``_field_lines``), made once for them all.
    Read-only: any thread."""
    __slots__ = ('fields', 'names', 'lines')

    def __init__(self, fields: Dict[str, str]):
        self.fields = fields
        self.names = frozenset(name.lower() for name in fields)
        self.lines = _field_lines(fields)

    def lines_without(self, names: frozenset[str]) -> str:
        """The lines of the fields but those whose name (in lower case) is
        one of ``names``."""
        return _field_lines({name: value for name, value in self.fields.items()
                             if name.lower() not in names})


if TYPE_CHECKING:
    # the fields of every request of a download: to a trusted URL, to
    # another, and the names (in lower case) of the caller's secrets given
    _HeaderSets = Tuple[_GivenFields, _GivenFields, frozenset[str]]


def _header_sets(headers: Dict[str, str]) -> '_HeaderSets':
    """The fields of every request of a download with the caller's
    ``headers``: to a trusted URL all of them, to another none of the
    caller's secrets; and the names of the secrets given. Read-only."""
    merged = {'user-agent': ('User-Agent', 'bitpit/' + __version__)}
    merged.update((name.lower(), (name, value)) for name, value in headers.items())
    # never a compressed body: byte ranges must mean file bytes, and CDNs
    # ignore Range when compression is allowed
    merged['accept-encoding'] = ('Accept-Encoding', 'identity')
    fields = list(merged.values())
    public = {name: value for name, value in fields if name.lower() not in _SECRET_HEADERS}
    return _GivenFields(dict(fields)), _GivenFields(public), \
        frozenset(merged) & frozenset(_SECRET_HEADERS)


# those of every download without headers of its own, made once
_PLAIN_HEADER_SETS = _header_sets({})
# the secrets given to a request to a URL that may not have them
_NO_SECRETS: frozenset[str] = frozenset()


class _RequestSettings:
    """What every request of a download is made with, whatever its URL:
    the caller's ``headers`` (checked) and the fields they make
    (``_header_sets``), ``auth``, ``proxy`` (the one given also parsed),
    ``ssl_context`` and ``timeout``, checked. Made once for a set of
    options: the downloads that a manager makes from its ``kwargs`` share
    their model's, and a setter gives its download one of its own
    (``replaced``), never changing one that another download may hold.
    Read-only: any thread."""
    __slots__ = ('headers', 'auth', 'proxy', 'ssl_context', 'timeout', 'trusted_fields',
                 'public_fields', 'secrets_given', 'parsed_proxy')

    def __init__(self, headers: Dict[str, str], auth: Optional[Tuple[str, str]],
                 proxy: Optional[str], ssl_context: Optional[ssl.SSLContext], timeout: float):
        self.headers = headers
        self.auth = auth
        self.proxy = proxy
        self.ssl_context = ssl_context
        self.timeout = timeout
        # (shared: a request copies the one it sends)
        self.trusted_fields, self.public_fields, self.secrets_given = \
            _header_sets(headers) if headers else _PLAIN_HEADER_SETS
        self.parsed_proxy = _parse_proxy(proxy) if proxy else None

    def replaced(self, name: str, value: Any) -> '_RequestSettings':
        """These settings but ``name`` (one of the first five), which is
        ``value`` (checked)."""
        values: Dict[str, Any] = {'headers': self.headers, 'auth': self.auth,
                                  'proxy': self.proxy, 'ssl_context': self.ssl_context,
                                  'timeout': self.timeout}
        values[name] = value
        return _RequestSettings(**values)


class _Route:
    """How the requests made with one ``_RequestSettings`` (and one
    manager's host slots, if any) go to one origin, worked out at the
    first of them and kept in the look-ups it takes (their ``routes``: a
    manager's downloads share it for a second, a download's attempt has
    its own): the ``proxy`` they go through (the one given, else the
    environment's; ``None``: none), the ``key`` of their connections in
    the pool, and the text of their heads after the request target (the
    version and ``Host``, ``host_line``, then the fields of every request
    of the settings: ``trusted_head`` to a URL that may have the caller's
    secrets, ``public_head`` to another). Read-only; any thread. (It holds
    no reference to its look-ups, which hold it: no cycle for the
    collector to find when an attempt's own are let go.)"""
    __slots__ = ('proxy', 'key', 'host_line', 'trusted_head', 'public_head')

    def __init__(self, lookups: _HostLookups, address: _Address, settings: _RequestSettings,
                 slots: Optional[_HostSlots]):
        scheme, host, port = address.host_key
        self.proxy = proxy = lookups.proxy(scheme, address.host_name) \
            if settings.proxy is None else settings.parsed_proxy  # (None for the given '')
        # (a tunnel, or a connection a proxy may have tied to whom it let
        # in, is reused only with the proxy credentials it was opened with)
        proxy_id = (proxy.hostname or '', proxy.port or 80, proxy.username, proxy.password) \
            if proxy else None
        self.key: _ConnectionKey = (scheme, host, port, proxy_id, id(settings.ssl_context),
                                    slots)
        self.host_line = host_line = 'HTTP/1.1\r\nHost: ' + address.host_field + '\r\n'
        self.trusted_head = host_line + settings.trusted_fields.lines
        self.public_head = host_line + settings.public_fields.lines


class _RequestOptions:
    """How every request of a download is made: its ``settings`` (shared,
    read-only), its own URL, its ``cookies`` and Digest state (``digest``)
    and its manager's host slots. Made from a downloader's settings at each
    start; requests only read it, but for the proxy and ``.netrc`` look-ups
    it keeps (``_HostLookups``: its own, or with ``shared_lookups`` those
    that the downloads of managers share for a second), and the cookies
    and the Digest state that it makes at the first need (most downloads
    meet neither: ``None`` until then), which ``keep(options)`` hands to
    its download at once (``Downloader._keep_learnt``: the download's own
    from then on, for its other requests under way and its next attempts;
    or it gives the one it made meanwhile, and a run's that made none yet
    is given those another's made: ``cookies`` and ``digest`` are written
    whole, and read at each use). Its requests run on one thread at a
    time (the loop's, or ``update_size``'s caller's), and take their
    ``route`` to an origin from the look-ups."""
    __slots__ = ('address', 'url', 'settings', 'cookies', 'digest', 'slots',
                 '_lookups', 'keep')  # (one made for every attempt: no dict)

    def __init__(self, address: _Address, settings: _RequestSettings,
                 cookies: Optional[_Cookies] = None, digest: Optional[_DigestAuth] = None,
                 slots: Optional[_HostSlots] = None, shared_lookups: bool = False,
                 keep: Optional[Callable[['_RequestOptions'], None]] = None):
        # the download's own URL, checked: auth and secrets are for its origin
        self.address = address
        self.url = address.url
        self.settings = settings
        self.cookies = cookies  # the caller's jar, or the download's own if a server set one
        self.digest = digest    # the download's hosts that asked for Digest, if one did
        self.slots = slots  # the manager's cap on connections per host, if any
        # what the environment and .netrc say for a host, looked up once
        # for all the requests these options make, or for a second
        self._lookups = _shared_lookups() if shared_lookups else _HostLookups()
        self.keep = keep

    def route(self, address: _Address) -> _Route:
        """The route of the requests to the origin of ``address``, found
        in the look-ups, or made now and kept there."""
        lookups = self._lookups
        key = (address.host_key, address.host_name, self.settings, self.slots)
        route = lookups.routes.get(key)
        if route is None:
            route = lookups.routes[key] = _Route(lookups, address, self.settings, self.slots)
        return route

    def remember_cookies(self, response: _Response, url: str) -> None:
        """Keep the cookies of ``response`` to ``url`` (it has a
        ``Set-Cookie``), in the download's own jar, made now if need be."""
        if self.cookies is None:
            self.cookies = _Cookies()
            if self.keep is not None:
                self.keep(self)
        self.cookies.remember(response, url)

    def digest_auth(self) -> _DigestAuth:
        """The download's Digest state, made now if need be (a host asked
        for Digest)."""
        if self.digest is None:
            self.digest = _DigestAuth()
            if self.keep is not None:
                self.keep(self)
        return self.digest

    def trusted(self, address: _Address) -> bool:
        """Whether the URL of ``address`` may get the caller's secrets:
        ``auth``, ``Authorization`` and ``Cookie`` headers."""
        return address.url == self.url or _same_trust(self.address, address)

    def credentials(self, host: str, own: Optional[Tuple[str, str]], trusted: bool
                    ) -> Optional[Tuple[str, str]]:
        """User and password for a request to ``host`` (its name in lower
        case): ``own`` (written in the URL it came from), else ``auth``
        where trusted, else ``.netrc`` (read once for the look-ups)."""
        if own is not None:
            return own
        auth = self.settings.auth
        if auth is not None and trusted:
            return auth
        return self._lookups.netrc(host)


def _status_error(response: _Response, url: str) -> HTTPStatusError:
    """The error for an error answer, with the ``Retry-After`` delay of a 429
    or 503 (at most a day: a longer one is taken for a day)."""
    retry_after = None
    if response.status in (429, 503):
        retry_after = _parse_retry_after(response.getheader('Retry-After'))
        if retry_after is not None:
            retry_after = min(retry_after, _MAX_RETRY_AFTER)
    return HTTPStatusError(response.status, response.reason, url, retry_after)


# TLS failures that another attempt cannot fix: the certificate, or no
# protocol version or cipher both sides accept
_TLS_FATAL_RE = _Pattern(r'CERT|VERSION|PROTOCOL|CIPHER|UNKNOWN_CA|HANDSHAKE_FAILURE|'
                           r'INSUFFICIENT_SECURITY|NO_SHARED', re.I)


def _network_error(exc: BaseException, handshake_done: bool = True) -> Error:
    """The bitpit error for an exception raised by the network or a parser.
    A TLS connection dropped or garbled (EOF, reset, a bad record) is a
    transient ``NetworkError``, like a reset; a certificate or a version
    mismatch during the handshake is a fatal ``TLSError``."""
    if isinstance(exc, Error):
        return exc
    tls = sys.modules.get('ssl')  # (not imported: no error of ssl's)
    if tls is not None and isinstance(exc, tls.SSLCertVerificationError):
        return TLSError('TLS certificate not trusted: {}'.format(exc.verify_message or exc))
    if tls is not None and isinstance(exc, tls.SSLError):
        reason = getattr(exc, 'reason', None) or ''
        transient = isinstance(exc, (tls.SSLEOFError, tls.SSLZeroReturnError,
                                     tls.SSLSyscallError)) or handshake_done
        if not transient and _TLS_FATAL_RE.search(reason):
            return TLSError('TLS handshake failed: {}'.format(exc))
        return NetworkError('TLS connection broken: {}'.format(exc))
    if isinstance(exc, socket.timeout):
        return StalledError('no data received within the time-out')
    if isinstance(exc, ConnectionError):  # RemoteDisconnected too: a close, not a lie
        return NetworkError('network error: {!r}'.format(exc))
    return NetworkError('network error: {}'.format(exc))


def _is_refusal(error: Error) -> bool:
    """Whether ``error`` is a server turning one more connection away: a
    429 or 503, or a refused connect."""
    if isinstance(error, HTTPStatusError):
        return error.status in (429, 503)
    return isinstance(error.__cause__, ConnectionRefusedError)


class _Request:
    """One HTTP request and the redirects it leads to.

    Transport: a kept-alive connection from the pool or a new one, retried
    once on a fresh connection when a reused one turns out dead. Redirect
    policy: at most ten hops, http and https only, no loops; the caller's
    secrets (``auth``, ``Authorization``, ``Cookie``) stop at the first hop
    that changes the origin (``_same_trust``). ``first``/``last`` ask for
    bytes ``first-`` or ``first-last`` (with ``If-Range: validator``);
    ``first=None`` asks for the whole file.
    ``cancel`` aborts the connection from another thread. Any thread.

    What a request has before it is sent is said once, here in the class;
    the lists of redirects and challenges are made by the first one."""

    route: Optional[_Route] = None  # to the origin of its URL (of the hop under way)
    connection: Optional[_AnyHTTPConnection] = None
    response: Optional[_Response] = None
    sock: Optional[socket.socket] = None
    reused = False
    # (URL, response) of each redirect followed, for what its headers say
    redirects: Sequence[Tuple[str, _Response]] = ()
    challenges: Optional[Dict[_AuthKey, int]] = None  # Digest challenges followed, by key

    def __init__(self, options: _RequestOptions, address: _Address, method: str = 'GET',
                 first: Optional[int] = None, last: Optional[int] = None,
                 validator: Optional[str] = None,
                 cancel: Optional[_Cancel] = None, extra: Optional[Dict[str, str]] = None):
        self.options = options
        self.method = method
        self.first = first
        self.last = last
        self.validator = validator
        self.cancel = cancel
        self.extra = extra  # more fields, if any
        self.url = address.url
        self.address = address
        self.trusted = address is options.address or options.trusted(address)
        self.own_credentials = address.credentials

    def send_steps(self) -> '_Steps[_Response]':
        """Send the request, follow redirects, return the final response
        (status not 3xx), as steps. Each exchange (a request and its
        response's head) is made on the current connection, and once again
        on a fresh one if a reused one turns out dead (``_dead_reused``).
        Raises a ``bitpit.Error`` or ``_Stopped``."""
        hops = 0
        while hops <= _MAX_REDIRECTS:
            if self.connection is None:
                self._take_idle()
                if self.connection is None:
                    yield from self._connect_steps()
            conn = self.connection
            assert conn is not None  # _connect_steps() or _use() set it, or raised
            try:
                # the request written and its answer made here, not by
                # http.client's request() and getresponse(), which check
                # and encode each part of the request in a call of its own
                # and keep a state of the connection that bitpit keeps
                # itself; and not in steps of their own, a layer that
                # every wait for the answer would resume
                head = self._head(self.address.wire_url if conn.via_proxy else
                                  self.address.target, conn)
                if conn.sock is None:
                    yield from conn.connect_steps()
                # the socket the body comes from; the connection keeps it,
                # also after an answer that ends with it (Connection:
                # close): close() closes such a connection, never pooled
                sock = self.sock = conn.sock
                sent = conn.send(head)
                if sent < len(head):
                    yield from conn.send_rest_steps(head, sent)
                response = _Response(sock, self.method, conn.timeout)
                yield from response.begin_steps()
            except (OSError, _NoStatusLine) as exc:
                self._dead_reused(conn, exc)
                continue  # on the fresh connection
            if 'set-cookie' in response.by_name:
                self.options.remember_cookies(response, self.url)
            status = response.status
            # (most answers are neither a challenge nor a redirect)
            location = None
            if status in _CHALLENGE_OR_REDIRECT:
                if (status == 401 or status == 407) and self._follow_challenge(response):
                    yield from self._drain_and_release_steps(response)
                    continue
                hops += 1
                if status in _REDIRECT_STATUSES:
                    location = response.getheader('Location')
            if not location:
                self.response = response
                return response
            address = _redirect_target(self.url, location)
            target = address.url
            if target == self.url or any(target == url for url, _ in self.redirects):
                raise RedirectError('redirect loop at {}'.format(target))
            self.redirects = [*self.redirects, (self.url, response)]
            yield from self._drain_and_release_steps(response)
            self.trusted = self.trusted and _same_trust(self.address, address)
            if address.credentials is not None or not self.trusted:
                self.own_credentials = address.credentials
            self.url, self.address = target, address
        raise RedirectError('more than {} redirects from {}'.format(_MAX_REDIRECTS, self.url))

    def send(self) -> _Response:
        """``send_steps`` run on the calling thread (``_drive_here``)."""
        return _drive_here(self.send_steps())

    def abort(self) -> None:
        """Shut the connection down from another thread."""
        connection = self.connection
        if connection is not None:
            connection.abort()

    def _take_idle(self) -> None:
        """The request's ``route`` (whose ``key`` its connections have in
        the pool) and an idle connection from the pool, taken into use if
        there is one. A plain call: only a new connection
        (``_connect_steps``) may wait, for its host's slot."""
        options = self.options
        route = self.route = options.route(self.address)
        connection = _POOL.get(route.key)
        self.reused = connection is not None
        if connection is not None:
            connection.timeout = options.settings.timeout  # (its socket does not block)
            self._use(connection)

    def _connect_steps(self) -> '_Steps[None]':
        """A new connection for the request (not connected yet), through
        its route's proxy, once the host's slot is taken."""
        scheme, host, port = host_key = self.address.host_key
        slots = self.options.slots
        if slots is not None:
            yield from slots.acquire_steps(host_key, self.cancel)
        assert self.route is not None  # (_take_idle set it)
        connection = self._new_connection(scheme, host, port, self.route.proxy)
        if slots is not None:
            connection.release_slot = functools.partial(slots.release, host_key)
        self._use(connection)

    def _use(self, connection: _AnyHTTPConnection) -> None:
        connection.cancel = self.cancel
        self.connection = connection
        if self.cancel is not None:
            try:
                self.cancel.register(connection)
            except _Stopped:
                self.connection = None
                _close_connection(connection)
                raise

    def _new_connection(self, scheme: str, host: str, port: int,
                        proxy: Optional[urllib.parse.SplitResult]) -> _AnyHTTPConnection:
        timeout = self.options.settings.timeout
        connect_host, connect_port = (proxy.hostname or '', proxy.port or 80) if proxy else \
            (host, port)
        conn: _AnyHTTPConnection
        if scheme == 'https':
            context = self.options.settings.ssl_context or _default_ssl_context()
            conn = _HTTPSConnection(connect_host, connect_port, timeout=timeout, context=context)
            if proxy:
                authorization = self._authorization(*self._auth_target(proxy), 'CONNECT',
                                                    '{}:{}'.format(host, port))
                conn.set_tunnel(host, port, headers={} if authorization is None else
                                {'Proxy-Authorization': authorization})
        else:
            conn = _HTTPConnection(connect_host, connect_port, timeout=timeout)
        conn.via_proxy = bool(proxy) and scheme == 'http'
        conn.proxy_parts = proxy
        return conn

    def _auth_target(self, proxy: Optional[urllib.parse.SplitResult]
                     ) -> Tuple[_AuthKey, Optional[Tuple[str, str]]]:
        """Whom a request authenticates to, the origin of its URL or the
        ``proxy``, and with what credentials."""
        if proxy is not None:
            return ('proxy', proxy.hostname or '', proxy.port or 80), _url_credentials(proxy)
        return self.address.host_key, self.options.credentials(
            self.address.host_name, self.own_credentials, self.trusted)

    def _authorization(self, key: _AuthKey, credentials: Optional[Tuple[str, str]],
                       method: str, target: str) -> Optional[str]:
        """The ``Authorization`` (for a proxy: ``Proxy-Authorization``) value
        of a request for ``target`` to ``key`` with ``credentials`` (see
        ``_auth_target``): Digest to a host or proxy that asked for it,
        else Basic; ``None`` without credentials."""
        if credentials is None:
            return None
        digest = self.options.digest
        if digest is not None and digest.asked(key):
            return digest.answer(key, credentials, method, target)
        return _basic_auth(*credentials)

    def _follow_challenge(self, response: _Response) -> bool:
        """Whether ``response``, a ``401`` or ``407`` (its caller looked), is a
        ``401`` (or a proxy's ``407``) with a Digest challenge to answer with
        another request: the first one of this request, or one saying that
        the nonce sent was stale."""
        connection = self.connection
        assert connection is not None  # it carried the response
        proxy = connection.proxy_parts if response.status == 407 and connection.via_proxy \
            else None
        if response.status != 401 and proxy is None:
            return False
        key, credentials = self._auth_target(proxy)
        if credentials is None:
            return False
        challenge = self.options.digest_auth().learn(key, response.fields.get_all(
            'WWW-Authenticate' if proxy is None else 'Proxy-Authenticate') or [])
        if challenge is None:
            return False
        if self.challenges is None:
            self.challenges = {}
        followed = self.challenges.get(key, 0)
        if followed and (not challenge.stale or followed > _DIGEST_STALE_ROUNDS):
            return False  # its answer was refused: a wrong password, say
        self.challenges[key] = followed + 1
        return True

    def _head(self, target: str, conn: _AnyHTTPConnection) -> bytes:
        """The head of a request for ``target`` on ``conn``: after its
        request line, the text its route made once for every request of
        its options to its origin (``Host`` first, where http.client puts
        it: to a plain proxy too, the URL's host and port, the port left out
        where it is the scheme's own; then the fields of every request of
        its options), then its own fields (a field of the caller's that the
        request sets itself, a condition or ``Proxy-Authorization``, left
        out of the first); Latin-1, as http.client encodes it. The method
        and the target are bitpit's own (``_check_url`` lets no control
        character or space into a target)."""
        options, route, trusted = self.options, self.route, self.trusted
        assert route is not None  # (_take_idle set it)
        secrets = options.settings.secrets_given if trusted else _NO_SECRETS
        own: Dict[str, str] = {}
        if self.first is not None:
            own['Range'] = 'bytes={}-{}'.format(self.first, '' if self.last is None else self.last)
            if self.validator:
                own['If-Range'] = self.validator
        if self.extra:
            own.update(self.extra)
            secrets = secrets.union(name.lower() for name in self.extra)
        if 'authorization' not in secrets:
            # (what _auth_target gives without a proxy, with one call less)
            credentials = options.credentials(self.address.host_name, self.own_credentials,
                                              trusted)
            if credentials is not None:
                authorization = self._authorization(self.address.host_key, credentials,
                                                    self.method, target)
                if authorization is not None:
                    own['Authorization'] = authorization
        if 'cookie' not in secrets and options.cookies is not None:
            cookie = options.cookies.header(self.url)
            if cookie:
                own['Cookie'] = cookie
        if conn.via_proxy:
            authorization = self._authorization(*self._auth_target(conn.proxy_parts),
                                                self.method, target)
            if authorization is not None:
                own['Proxy-Authorization'] = authorization
        rest = route.trusted_head if trusted else route.public_head
        if own:
            given = options.settings.trusted_fields if trusted else options.settings.public_fields
            replaced = given.names.intersection([name.lower() for name in own])
            if replaced:
                rest = route.host_line + given.lines_without(replaced)
            rest += _field_lines(own)
        # (one format, not five additions; 'latin1' is the spelling that
        # CPython's encode() takes to its own encoder, with no codec look-up)
        return ('%s %s %s\r\n' % (self.method, target, rest)).encode('latin1')

    def _dead_reused(self, conn: _AnyHTTPConnection, exc: BaseException) -> None:
        """After ``exc`` (an ``OSError`` or a ``_NoStatusLine``) in an
        exchange on ``conn``: a fresh connection in its place when it was a
        reused one that turned out dead (closed by the server meanwhile, or
        still holding bytes of an earlier answer: no status line), the first
        time; else raise the error, ``_Stopped`` after a cancel."""
        if self.cancel is not None and self.cancel.is_set():
            raise _Stopped from exc
        # (http.client's RemoteDisconnected is a ConnectionResetError)
        if not (self.reused and isinstance(exc, (_NoStatusLine, ConnectionResetError,
                                                 BrokenPipeError))):
            raise _network_error(exc, getattr(conn, 'handshake_done', True)) from exc
        release, conn.release_slot = getattr(conn, 'release_slot', None), None
        self.close(False)  # (conn is its connection)
        self.reused = False
        scheme, host, port = self.address.host_key
        fresh = self._new_connection(scheme, host, port, conn.proxy_parts)
        fresh.release_slot = release  # its host slot goes over to the new one
        self._use(fresh)

    def _drain_and_release_steps(self, response: _Response) -> '_Steps[None]':
        """Finish a small redirect (or challenge) body so the connection can
        be reused; else close the response, which may hold the socket."""
        reuse = False
        try:
            length = _parse_content_length(response)
            if length is not None and length <= 65536:
                yield from response.read_steps()
                reuse = not response.will_close
        except (OSError, Error):
            pass
        if not reuse:
            response.close()
        self.close(reuse)

    def close(self, reuse: bool) -> None:
        """Return the connection to the pool if ``reuse`` and the response was
        read to its end; else close it. Idempotent."""
        conn, self.connection = self.connection, None
        if conn is None:
            return
        if self.cancel is not None and self.cancel.unregister(conn):
            reuse = False  # a cancel that got hold of it may be shutting it down now
        response = self.response
        route = self.route
        if reuse and conn.sock is not None and route is not None and (
                response is None or (response.closed and not response.will_close)):
            conn.cancel = None
            _POOL.put(route.key, conn)
            if self.options.slots is not None:
                self.options.slots.parked(self.address.host_key)
        else:
            if response is not None:
                response.close()  # it may hold the socket: the slot is free once closed
            _close_connection(conn)
        self.response = None


# -- what an answer says about the file -------------------------------------------

class _Answer:
    """What a response says about the file, as ``_check_answer`` found it.

    ``kind``: ``'part'`` (bytes ``first`` to ``end``, exclusive, of the
    file follow; ``end`` is ``None`` when only the body's end tells),
    ``'whole'`` (the whole file follows from byte 0), ``'end'`` (nothing at
    or after the offset asked for: the file has ``total`` bytes) or
    ``'unchanged'`` (304: the copy the request described is current).
    ``total`` is the file's size if the answer tells it. ``validator`` is
    the strong ETag, else the Last-Modified date. ``encoding`` is the
    ``Content-Encoding`` if the body is not the file's own bytes, and
    ``keep_encoded`` whether those bytes are stored as they come. (What
    most answers leave as it is starts as the class's.)"""
    encoding: Optional[str] = None
    keep_encoded = False

    def __init__(self, kind: str, first: int, end: Optional[int], total: Optional[int],
                 response: _Response):
        self.kind = kind
        self.first = first
        self.end = end
        self.total = total
        fields = response.by_name
        self.etag = etag = fields.get('etag')
        self.last_modified = modified = fields.get('last-modified')
        self.validator = etag if etag and etag[0] == '"' else modified  # (a strong ETag first)
        encoding = fields.get('content-encoding')
        if encoding is not None:
            encoding = encoding.strip().lower()
            if encoding and encoding != 'identity':
                self.encoding = encoding

    def change_from(self, validator: Optional[str], total: Optional[int]) -> Optional[str]:
        """How this answer shows that the file is no longer the one that
        ``validator`` and ``total`` describe, or ``None``. A 416 is judged by
        its ETag alone: its Last-Modified may be an error page's."""
        if total is not None and self.total is not None and self.total != total:
            return 'it has {} bytes, not {}'.format(self.total, total)
        if validator is None:
            return None
        if validator.startswith('"'):
            name, current = 'ETag', self.etag
        elif self.kind == 'end':
            return None
        else:
            name, current = 'Last-Modified', self.last_modified
        if current is not None and current != validator:
            return '{} {} instead of {}'.format(name, current, validator)
        return None


def _check_answer(response: _Response, url: str, first: int) -> _Answer:
    """Check an answer to a request for the bytes from ``first`` on and say
    what it brings. Raises ``HTTPStatusError`` for an error status and
    ``ProtocolError`` for an answer that contradicts itself or the request.
    A pure function of the response."""
    status = response.status
    if status >= 300:
        if status == 304:
            return _Answer('unchanged', first, first, None, response)
        if status == 416:
            match = _UNSATISFIED_RANGE_RE.match(response.by_name.get('content-range', ''))
            total = int(match.group(1)) if match else None
            if first > 0 or total == 0:  # (bytes=0- of an empty file is a 416 too)
                return _Answer('end', first, first, total, response)
        raise _status_error(response, url)
    length = _parse_content_length(response)
    if length is not None and length >= _UNKNOWN_END:
        raise ProtocolError('absurd Content-Length: {}'.format(length))
    if status == 200 and not first:  # (its Content-Range, if any, not looked at)
        return _Answer('whole', 0, length, length, response)
    content_range = response.by_name.get('content-range')
    if status == 206 or (status == 200 and content_range):
        if not content_range:
            raise ProtocolError('206 answer without Content-Range')
        start, last, total = _parse_content_range(content_range)
        if status == 200 and (start != first or (total is not None and last != total - 1)):
            if start != 0 or (total is not None and last != total - 1):
                raise ProtocolError('200 answer with Content-Range {!r}: neither the whole '
                                    'file nor the range asked for'.format(content_range))
            return _Answer('whole', 0, length, length, response)
        if start > first or last < first:
            # starting later leaves a hole; ending earlier brings nothing
            raise ProtocolError('server sent bytes {}-{} but bytes from {} were asked '
                                'for'.format(start, last, first))
        if length is not None and length != last - start + 1:
            raise ProtocolError('Content-Length {} disagrees with Content-Range {}'
                                .format(length, content_range))
        return _Answer('part', start, last + 1, total, response)
    if status == 200:
        return _Answer('whole', 0, length, length, response)
    raise ProtocolError('unexpected status {} {}'.format(status, response.reason))


# ---------------------------------------------------------------------------
# store: the file, the byte ranges it holds, its sidecar
# ---------------------------------------------------------------------------

class _Superseded(Exception):
    """A write planned before the file started over from byte 0."""


_ETAG_ATTRIBUTE = b'user.bitpit.etag'  # (bytes: the name is not encoded again for each file)
# what the system offers the store, looked at once rather than for each
# file: whether os.utime takes a file descriptor (not on Windows);
# extended attributes (Linux), which os.setxattr always sets through one;
# pwrite and posix_fallocate (not on Windows)
_STAMP_BY_FD = os.utime in os.supports_fd
_XATTRS = hasattr(os, 'setxattr')
_PWRITE = hasattr(os, 'pwrite')
_FALLOCATE = hasattr(os, 'posix_fallocate')
# how the store opens a file: for writing and reading back, made where
# missing, and bytes as they are (O_BINARY: Windows only)
_STORE_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, 'O_BINARY', 0)
# and a new file's: made here, or not at all
_NEW_FILE_FLAGS = _STORE_FLAGS | os.O_EXCL


def _stamp(path: str, modified: Optional[float], etag: Optional[str],
           fd: Optional[int] = None) -> None:
    """Give a completed file the server's modification time, and remember
    the ETag that made it in an extended attribute where the file system
    has them (nothing is written beside the file: where there are none,
    ``if_exists='update'`` compares dates). Through ``fd``, the file's open
    descriptor, where given and the system takes one: the kernel does not
    look the path up again, twice."""
    file: Union[str, int] = fd if fd is not None and _STAMP_BY_FD else path
    try:
        if modified is not None:
            os.utime(file, (time.time(), modified))
    except (OSError, OverflowError, ValueError) as exc:
        _log.warning('cannot set the modification time of %s: %s', path, exc)
    if etag and _XATTRS:
        try:
            os.setxattr(file, _ETAG_ATTRIBUTE, etag.encode())  # (UTF-8)
        except OSError:
            pass  # no extended attributes here


def _stored_etag(path: pathlib.Path) -> Optional[str]:
    """The ETag ``_stamp`` remembered for ``path``, or ``None``."""
    try:
        return os.getxattr(path, _ETAG_ATTRIBUTE).decode('utf-8')
    except (AttributeError, OSError, UnicodeDecodeError):
        return None


class _Ranges:
    """Disjoint, sorted byte ranges ``[start, end)``, merged where they
    touch: ``pairs``, a tuple of ``(start, end)`` replaced whole at each
    change and never changed (its owner publishes it as it is, for other
    threads to read without a lock: no copy is made after each write);
    ``total`` is the number of bytes they cover. Not locked: its owner
    locks it."""
    __slots__ = ('pairs', 'total')

    def __init__(self, spans: Iterable[Tuple[int, int]] = ()):
        """Ranges that cover ``spans``, given in any order, overlapping
        or not: sorted first, so that they are merged in one pass (not
        added one at a time, each add copying the tuple)."""
        self.pairs: Tuple[Tuple[int, int], ...] = ()
        self.total = 0
        if spans:  # (a new store's: none)
            merged: List[Tuple[int, int]] = []
            total = 0
            for start, end in sorted(spans):
                if end <= start:
                    continue
                if merged and start <= merged[-1][1]:  # (touches or overlaps the last one)
                    last_start, last_end = merged[-1]
                    if end > last_end:
                        merged[-1] = (last_start, end)
                        total += end - last_end
                else:
                    merged.append((start, end))
                    total += end - start
            self.pairs, self.total = tuple(merged), total

    def add(self, start: int, end: int) -> int:
        """Cover ``[start, end)``; return how many bytes were not covered."""
        if end <= start:
            return 0
        pairs = self.pairs
        if not pairs:  # the usual case: a new file's first bytes
            self.pairs = ((start, end),)
        else:
            last_start, last_end = pairs[-1]
            if start == last_end:  # (bytes that follow on from the last range)
                self.pairs = pairs[:-1] + ((last_start, end),)
            elif start > last_end:
                self.pairs = pairs + ((start, end),)
            else:
                return self._merge(start, end)
        self.total += end - start
        return end - start

    def _merge(self, start: int, end: int) -> int:
        """``add`` of bytes that do not come after all the others. A range
        is found by its start: ``(n,)`` sorts before every range that
        starts at ``n``."""
        pairs = self.pairs
        i = bisect.bisect_left(pairs, (start,))  # the first range that starts at or after start
        if i and pairs[i - 1][1] >= start:
            i -= 1                               # (the one before reaches it)
        j = bisect.bisect_left(pairs, (end + 1,), i)  # past the last range that starts by end
        covered = 0
        if i < j:
            covered = sum(old_end - old_start for old_start, old_end in pairs[i:j])
            start, end = min(start, pairs[i][0]), max(end, pairs[j - 1][1])
        self.pairs = pairs[:i] + ((start, end),) + pairs[j:]
        added = end - start - covered
        self.total += added
        return added

    def gaps(self, size: int) -> List[Tuple[int, int]]:
        """The ranges of ``[0, size)`` not covered."""
        found = []
        position = 0
        for start, end in self.pairs:
            if start >= size:
                break
            if start > position:
                found.append((position, start))
            position = max(position, end)
        if position < size:
            found.append((position, size))
        return found

    def prefix(self) -> int:
        """Where the range that starts at byte 0 ends (0 if there is none)."""
        pairs = self.pairs
        return pairs[0][1] if pairs and pairs[0][0] == 0 else 0

    def covers(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` is covered whole."""
        pairs = self.pairs
        i = bisect.bisect_left(pairs, (start + 1,)) - 1  # the last range that starts by start
        return i >= 0 and pairs[i][1] >= end

    def remove(self, start: int, end: int) -> None:
        """Stop covering ``[start, end)``."""
        kept = []
        for old_start, old_end in self.pairs:
            kept += [(old_start, min(old_end, start)), (max(old_start, end), old_end)]
        _Ranges.__init__(self, kept)

    def clip(self, size: int) -> bool:
        """Forget everything at or after ``size``; whether there was any."""
        pairs = self.pairs
        if not pairs or pairs[-1][1] <= size:
            return False  # the common case: a size learnt before any byte
        _Ranges.__init__(self, [(start, min(end, size)) for start, end in pairs if start < size])
        return True


if TYPE_CHECKING:
    # what a file object given as ``path`` may be; the file it names or that object
    _BinaryFile = Union[BinaryIO, io.RawIOBase, io.BufferedIOBase]
    _Target = Union[pathlib.Path, _BinaryFile]
    # what a store is given: a target, or the text of a path in a
    # directory whose ``Path`` is not made (see ``_child_text``)
    _StoreTarget = Union[str, _Target]


def _as_path(path: Union[str, os.PathLike[str]]) -> pathlib.Path:
    """``path`` as a ``pathlib.Path``, ``~`` expanded."""
    if isinstance(path, str):
        parsed = _parsed_path(path)
        return parsed.expanduser() if '~' in path else parsed  # (most: no ~ to expand)
    import pathlib
    # a Path given is taken as it is (it never changes): a manager's
    # directory, given to each of its downloads, is one object for all
    given = path if type(path) is (pathlib.WindowsPath if os.name == 'nt' else
                                   pathlib.PosixPath) else pathlib.Path(path)
    return given.expanduser()


# how the text of a directory's path may end for a name to follow it
# without a separator: a root (``/``, ``C:\\``), or a Windows drive (``C:``)
_JOINS_BARE = ('\\', '/', ':') if os.name == 'nt' else '/'


# the last directory a name was put in, and what a name follows in it
# (see ``_text_before_child``): mostly one ``Path`` for thousands of
# downloads, a manager's, or that of one ``path`` text (``_parsed_path``
# gives the same ``Path`` for it). Replaced whole (any thread: two that
# race make the same)
_LAST_DIR: 'Tuple[Optional[pathlib.Path], str]' = (None, '')


def _child_text(directory: pathlib.Path, name: str) -> str:
    """``str(directory / name)``, for a ``name`` that ``_safe_filename``
    made (one part, no separator, not ``.``), without making that ``Path``:
    pathlib's ``/`` costs some 14,000 instructions and the new path's first
    ``str()`` 8,000 more, where a small file's whole download costs some
    500,000. What a name follows in the directory is worked out once for
    the directory given again and again (``str()`` of a ``Path`` is a
    Python call: 1,300 instructions, the look-up of its text 1,200 more)."""
    global _LAST_DIR
    last, before_child = _LAST_DIR
    if directory is not last:
        before_child = _text_before_child(str(directory))
        _LAST_DIR = (directory, before_child)
    return before_child + name


def _text_before_child(directory: str) -> str:
    """What a name follows in the directory whose path's text is
    ``directory``: that text and a separator (none after a root or a
    drive; nothing in ``.``, as pathlib writes no ``./``)."""
    if directory == '.':
        return ''
    return directory if directory.endswith(_JOINS_BARE) else directory + os.sep


@functools.lru_cache(maxsize=64)
def _parsed_path(text: str) -> pathlib.Path:
    """``pathlib.Path(text)``, parsed once for a text given again and again
    (a manager's directory, given to each of its downloads): the path of a
    text never changes, and a ``Path`` never changes either."""
    import pathlib
    return pathlib.Path(text)


def _local_size(target: _StoreTarget, fallback: int = 0) -> int:
    """Bytes in the target: the size of a regular file (0 for a missing one
    or a device), the end of a seekable stream, else ``fallback``."""
    if isinstance(target, (str, os.PathLike)):
        return _regular_size(_status(target))
    try:
        if target.seekable():
            return target.seek(0, io.SEEK_END)
    except (OSError, ValueError, AttributeError):
        pass
    return fallback


def _there(path: Union[str, pathlib.Path]) -> bool:
    """Whether anything is at ``path`` (a broken link is nothing). Asked of
    ``os.access``, whose no is a ``False`` where ``os.stat`` raises (an
    exception, its message decoded) and whose yes makes no
    ``stat_result``: a new file's target, and a sidecar that is not there,
    cost a fifth of a failed ``stat`` each."""
    return os.access(path, os.F_OK)


def _status(path: Union[str, pathlib.Path]) -> Optional[os.stat_result]:
    """``os.stat(path)``; ``None`` where it fails (nothing is there, say).
    Nothing there, as for a new file, is told without a failed ``stat``
    (see ``_there``)."""
    if not _there(path):
        return None
    try:
        return os.stat(path)
    except OSError:
        return None  # (removed meanwhile, or not to be looked at)


def _regular_size(status: Optional[os.stat_result]) -> int:
    """The size of a regular file; 0 for anything else, or nothing."""
    return status.st_size if status is not None and stat.S_ISREG(status.st_mode) else 0


def _sidecar_of(path: str) -> str:
    """The path of the sidecar of the file at ``path``, ``NAME.bitpit``
    beside it: a str, which the store only hands to ``os`` functions (a
    ``pathlib.Path`` would parse the name again, for each file)."""
    return path + _SIDECAR_SUFFIX


def _sync(fd: int) -> None:
    """``fsync``: the file's data and size reach the disk."""
    os.fsync(fd)


def _write_synced(path: str, text: str) -> None:
    """Write ``text`` into a new file at ``path``, and sync it."""
    with open(path, 'w', encoding='utf-8') as file:
        file.write(text)
        file.flush()
        _sync(file.fileno())


def _sync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where a
    directory cannot be opened, as on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse it for directories: nothing more to do
    finally:
        os.close(fd)


def _seekable(file: Any) -> bool:
    try:
        return file.seekable()
    except (AttributeError, ValueError, OSError):
        return False


def _splice(source: int, target: int, count: int, offset_dst: Optional[int] = None,
            flags: int = 0) -> int:
    """``os.splice``, which only Linux has, from Python 3.10 on (its callers
    check ``_SPLICE``); a type checker for 3.9 is told so."""
    if sys.version_info < (3, 10):
        raise OSError(errno.ENOSYS, 'os.splice needs Python 3.10')
    return os.splice(source, target, count, offset_dst=offset_dst, flags=flags)


def _seek_and_write(fd: int, data: memoryview, offset: int) -> int:
    """``os.pwrite`` where there is none (Windows)."""
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


# how the store writes at an offset into a regular file's descriptor
_pwrite = os.pwrite if _PWRITE else _seek_and_write


class _FileStore:
    """The target of a download: the file, the byte ranges of it that hold
    downloaded bytes, and the sidecar ``NAME.bitpit`` that remembers them,
    with the file's size and each source's validator, across attempts and
    processes.

    Any thread may call it; ``_lock`` guards everything, but at the end
    of an attempt: ``finish``, which its transfer's ``result`` calls once
    nothing else uses the store (its connections, their writes and piece
    checks, and its sidecar saves are over: ``join_steps`` waited for
    them; the run's steps wait for it in turn), takes no lock, nor does
    ``close`` of a file ``finish`` closed. Writes carry the
    epoch they were planned in: ``restart_from_zero()`` starts a new epoch,
    and a write of an older one is refused (``_Superseded``), so that bytes
    of two versions of the file never mix. The sidecar is on disk before any
    write leaves the file incomplete, so a file with holes is never taken
    for a complete one; it is replaced atomically."""
    # a store per download: slots make it with less work than a dict
    __slots__ = ('_lock', 'target', 'os_path', 'sidecar', 'is_path', 'found', 'url', 'held',
                 'size', 'validators', 'epoch', '_fd', '_file', '_position',
                 '_sidecar_on_disk', '_sidecar_current', '_extent', '_hasher', '_hashed_to',
                 'hash_with', 'digest', 'sealed', '_no_splice', '_sidecar_failed', '_dropped',
                 'read_back', 'snapshot')

    def __init__(self, target: _StoreTarget, url: str):
        self._lock = threading.Lock()
        # a Path, the text of a path (a download's in a directory, whose Path
        # is not made: ``_child_text``), or a file object; where a path
        # (and it stays one: ``rename`` gives another), that path as the
        # str that ``os`` functions take (a ``Path`` makes it again at each
        # call), and its sidecar's path. A file object is told by the
        # ``TypeError`` of ``fspath``: ``isinstance(target, os.PathLike)``,
        # an ABC's check, would cost three calls for each file
        self.target = target
        try:
            path = os.fspath(target)  # type: ignore[arg-type]
        except TypeError:
            self.os_path: Optional[str] = None
            self.sidecar: Optional[str] = None
            self.is_path = False
        else:
            self.os_path = path
            self.sidecar = _sidecar_of(path)
            self.is_path = True
        self.url = url
        self.held = _Ranges()
        self.epoch = 0
        # the open file: a regular file's descriptor, which the store
        # writes with ``pwrite``, without a file object (nor the ``fstat``
        # that ``io.FileIO`` makes of a descriptor); else a stream, the
        # caller's file object or another kind of file (a device...)
        self._fd = -1
        self._file: Any = None
        self._position = 0        # where a file object's stream stands
        self._extent = 0          # the open file's size, at most: what it had, wrote, reserved
        self._hasher: Any = None
        self._hashed_to = 0       # bytes from 0 the hasher has seen
        # an algorithm to hash a file with as it is written when no
        # checksum asks for one (the run gives it to a file's store only:
        # a file object is not read back), and the completed file's
        # ``(algorithm, hex digest)`` (a manager's manifest records it)
        self.hash_with: Optional[str] = None
        self._no_splice = False   # the file system refused a splice
        self._dropped = 0          # times held bytes were given up (a record older is wrong)
        self.read_back = False    # bytes are read back as they land: never spliced
        # ``held`` as pairs, published after each change of it, for other
        # threads to read without the lock (a write may hold it for as
        # long as the disk takes)
        self.snapshot: Tuple[Tuple[int, int], ...] = ()
        # the rest, the store's state that a load sets afresh, is set by
        # the first: a store is made with what its target holds read
        self.load_unshared()

    # -- what is on disk ---------------------------------------------------------

    def load(self) -> None:
        """Read what the target already holds: a partial file is held from
        0 to its size, unless its sidecar records the ranges. The sidecar's
        size and validators count only if it belongs to this URL."""
        with self._lock:
            self.load_unshared()

    def load_unshared(self) -> None:
        """``load`` without the lock: by the constructor, before any other
        thread can see the store, or under the lock. Nothing there (a new
        file's target, told by ``os.access``: see ``_there``) is told
        without a ``stat``, and no sidecar is looked for beside no bytes."""
        self.sealed = False       # set when a stop gave up waiting: no more writes
        self.size = -1
        self.validators: Dict[str, Optional[str]] = {}
        self.digest: Optional[Tuple[str, str]] = None
        # a sidecar the load found usable is on disk; one written since is
        # current until the next write; one that could not be written
        # leaves the file without holes
        self._sidecar_on_disk = self._sidecar_current = self._sidecar_failed = False
        path = self.os_path
        if path is None:  # a file object
            there, size = False, _local_size(self.target, self.held.total)
        elif not os.access(path, os.F_OK):
            there, size = False, 0
        else:
            try:
                there, size = True, _regular_size(os.stat(path))
            except OSError:  # (removed meanwhile, or not to be looked at)
                there, size = False, 0
        # what the load found: whether the target was there, and its
        # sidecar (``None``: not looked for, beside no bytes)
        if not size:
            self.found: Tuple[bool, Optional[bool]] = (there, None)
            if self.held.total:  # (else nothing was held, nor is there: no change)
                self.held = _Ranges()
                self.snapshot = ()
            return
        sidecar_there, saved = self._read_sidecar()
        self.found = (there, sidecar_there)
        self.held = _Ranges([(0, size)])
        if saved is not None:
            self._sidecar_on_disk = True
            self._take(saved, size)
        self.snapshot = self.held.pairs

    def _take(self, saved: Dict[str, Any], size: int) -> None:
        """What a sidecar says of a file of ``size`` bytes."""
        spans = saved.get('held')
        if spans is not None:
            self.held = _Ranges(spans)
            self.held.clip(size)
        if saved.get('url') != self.url:
            return
        if spans is None:  # the format of bitpit 2.0: one validator
            validator = saved.get('validator')
            self.validators = {self.url: validator} if isinstance(validator, str) else {}
        else:
            self.validators = {url: v for url, v in (saved.get('validators') or {}).items()
                               if isinstance(url, str) and isinstance(v, str)}
        total = saved.get('size')
        if isinstance(total, int) and not isinstance(total, bool) and \
                total >= (self.held.total if spans is not None else size):
            self.size = total

    def _read_sidecar(self) -> Tuple[bool, Optional[Dict[str, Any]]]:
        """Whether the sidecar is there, and what it says if it can be used."""
        sidecar = self.sidecar
        if sidecar is None:
            return False, None
        import json
        try:
            with open(sidecar, encoding='utf-8') as file:
                saved = json.load(file)
        except FileNotFoundError:
            return False, None
        except (OSError, ValueError):
            return True, None
        if not isinstance(saved, dict):
            return True, None
        spans = saved.get('held')
        if spans is not None and not (isinstance(spans, list) and all(
                isinstance(span, list) and len(span) == 2 and
                all(isinstance(n, int) and not isinstance(n, bool) for n in span) and
                0 <= span[0] < span[1] for span in spans)):
            return True, None
        return True, saved

    def taken_as_is(self) -> bool:
        """Whether the last ``load`` found the target there and no sidecar
        beside it: a file that ``if_exists`` takes as it is."""
        there, sidecar_there = self.found
        if there and sidecar_there is None and self.sidecar is not None:
            sidecar_there = _there(self.sidecar)  # (not looked for beside no bytes)
        return there and not sidecar_there

    def regular_target(self) -> bool:
        """Whether the target is (or will be created as) a regular file,
        which may be written out of order."""
        if self.os_path is None:
            return False
        try:
            return stat.S_ISREG(os.stat(self.os_path).st_mode)
        except FileNotFoundError:
            return True
        except OSError:
            return False

    # -- opening and reserving ------------------------------------------------------

    def rename(self, target: pathlib.Path) -> None:
        """Use another path (before anything is written)."""
        with self._lock:
            self.target = target
            self.os_path = os.fspath(target)
            self.sidecar = _sidecar_of(self.os_path)
            self.found = (False, None)  # the caller made sure nothing is there

    def open(self, checksum: Optional[str] = None,
             cancelled: Callable[[], bool] = lambda: False) -> None:
        """Open the file for writing (creating it), once. Where the last
        ``load`` found nothing there, a new file is made (``O_EXCL``),
        which is regular and empty without an ``fstat`` to say so; a file
        there (made meanwhile too) is opened as it is and looked at
        (``_open_existing``). With a checksum algorithm (or
        ``hash_with``), hash the bytes already held from byte 0 on
        (``_Stopped`` when ``cancelled()`` meanwhile)."""
        with self._lock:
            if self._fd >= 0 or self._file is not None:
                return
            path = self.os_path
            if path is None:  # the caller's file object
                self._file = self.target
                self._position = self.held.total
            elif self.found[0]:
                self._open_existing(path)
            else:
                try:
                    self._fd = os.open(path, _NEW_FILE_FLAGS, 0o666)
                    self._extent = 0
                except FileExistsError:
                    self._open_existing(path)
                except OSError as exc:
                    raise FileError('cannot open {}: {}'.format(path, exc)) from exc
            algorithm = checksum or self.hash_with
            if algorithm is not None:
                import hashlib
                self._hasher = hashlib.new(algorithm)
                self._hashed_to = 0
                self._hash_from_disk(self.held.prefix(), cancelled)

    def _open_existing(self, path: str) -> None:
        """Open the file at the target path, made where missing, for
        writing; a regular file by its descriptor, anything else (a device,
        a pipe) as a file object. Under the lock."""
        fd = -1
        try:
            fd = os.open(path, _STORE_FLAGS, 0o666)
            status = os.fstat(fd)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            raise FileError('cannot open {}: {}'.format(path, exc)) from exc
        self._extent = status.st_size
        if stat.S_ISREG(status.st_mode):
            self._fd = fd
        else:
            self._file = open(fd, 'r+b', buffering=0)

    def reserve(self, total: int, allocate: bool = True) -> None:
        """Make the file ``total`` bytes long with its space allocated, so that
        a disk too small fails now, with a ``FileError`` that says how much
        space is missing, rather than at 99 %. Silently skipped where the
        system or the file system cannot reserve space. Without
        ``allocate`` (a body so small that it gets no sidecar to record
        the holes of a reserved file), the disk's free space is checked
        instead; not for fewer than ``_ROOM_CHECK_FROM`` bytes, which come
        with the answer's head or right after it (a round trip), so that
        their one write tells as early that they do not fit. Such a small
        file's call looks at nothing, so it takes no lock."""
        if not allocate and total < _ROOM_CHECK_FROM:
            return  # (fewer bytes missing still, whatever the file holds)
        with self._lock:
            fd = self._fd
            if fd < 0:
                return  # (not a regular file)
            before = self._extent
            if before >= total or not _FALLOCATE:
                return  # no room to make, or no way to reserve it here
            if not allocate:
                if total - before >= _ROOM_CHECK_FROM:
                    self._check_room(total - before)
                return
            if not self._save_sidecar():
                return  # no record of the holes it would make
            try:
                self._extent = total  # (at most: a failure may have grown it)
                os.posix_fallocate(fd, 0, total)
            except (OverflowError, ValueError):
                return  # no file system takes that much: let the writes tell
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EFBIG, getattr(errno, 'EDQUOT', -1)):
                    return  # EOPNOTSUPP, EINVAL, ...: no reservation here
                try:
                    os.ftruncate(fd, before)
                    self._extent = before
                except OSError:
                    pass
                raise FileError('cannot reserve {} bytes for {}: {} ({})'.format(
                    total, self.target, self._shortage(total - before), exc.strerror)) from exc

    def _free_space(self) -> Optional[int]:
        """Bytes free on the file's disk for this process, if it can tell."""
        if self.os_path is None:
            return None
        try:
            status = os.statvfs(os.path.dirname(self.os_path) or os.curdir)
        except (OSError, AttributeError):  # (no statvfs on Windows)
            return None
        if not status.f_blocks:
            return None  # a file system that tells nothing (some FUSE ones)
        blocks = status.f_bfree if os.geteuid() == 0 else status.f_bavail
        return blocks * status.f_frsize

    def _check_room(self, needed: int) -> None:
        """``FileError`` now if the disk has less than ``needed`` bytes free."""
        free = self._free_space()
        if free is not None and free < needed:
            raise FileError('cannot write {} bytes to {}: {}'.format(
                needed, self.target, self._shortage(needed)))

    def _shortage(self, needed: int) -> str:
        free = self._free_space()
        if free is None:
            return '{} bytes are needed'.format(needed)
        if free >= needed:
            return '{} bytes are needed; the file size limit is lower'.format(needed)
        return '{} bytes are missing on the disk ({} needed, {} free)'.format(
            needed - free, needed, free)

    # -- writing ----------------------------------------------------------------------

    def write(self, offset: int, data: memoryview, epoch: int) -> None:
        """Write ``data`` at ``offset`` and count it held. Raises
        ``_Superseded`` for a write of an older epoch, ``FileError`` when the
        file cannot take it (what was written until then counts)."""
        with self._lock:
            if self.sealed:
                raise _Stopped
            if epoch != self.epoch:
                raise _Superseded
            end = offset + len(data)
            if not self._sidecar_on_disk and not self._completes(offset, end):
                self._before_writing(offset)
            try:
                self._write_all(offset, data)
            except OSError as exc:
                raise FileError('cannot write {}: {}'.format(self.target, exc)) from exc

    def _before_writing(self, start: int) -> None:
        """The sidecar goes on disk before the first write that leaves the
        file incomplete (the caller looked: none is on disk, and the write
        at ``start`` does leave it so). Without it, a write may only extend
        the bytes held from byte 0: a file with holes and no record of them
        would be taken for a complete one."""
        if self._fd < 0:
            return  # (a stream: written in order)
        if not self._sidecar_failed and self._save_sidecar():
            return
        self._sidecar_failed = True
        if start > self.held.prefix():
            raise FileError('cannot write {} out of order without its sidecar {}'.format(
                self.target, self.sidecar))

    def _write_all(self, offset: int, data: memoryview) -> None:
        """Write every byte of ``data`` at ``offset`` (mostly in one call),
        and count the bytes written as held (and hashed) once they landed,
        also when a failure cut the write short: what was written counts."""
        fd = self._fd
        written = 0
        try:
            written = _pwrite(fd, data, offset) if fd >= 0 else self._write_stream(offset, data)
            while written < len(data):  # (seldom: a write cut short, the rest)
                part = data[written:]
                n = _pwrite(fd, part, offset + written) if fd >= 0 else \
                    self._write_stream(offset + written, part)
                if not n:  # as when the disk fills up: the next write raises
                    raise FileError('short write to {}: {} of {} bytes'.format(
                        self.target, written, len(data)))
                written += n
        finally:
            if written:
                end = offset + written
                self.held.add(offset, end)
                self.snapshot = self.held.pairs
                if end > self._extent:
                    self._extent = end
                self._sidecar_current = False  # the ranges moved on
                if self._hasher is not None:
                    self._hash_written(offset, end, data)

    def _hash_written(self, start: int, end: int, data: memoryview) -> None:
        """Feed the hasher the bytes just written, ``data`` from ``start``
        to ``end``, where it stands at ``start``; if they replace bytes it
        saw, it starts again (the file is hashed from disk at its end)."""
        if start < self._hashed_to:
            import hashlib
            self._hasher, self._hashed_to = hashlib.new(self._hasher.name), 0
        elif start == self._hashed_to:
            self._hasher.update(data if end - start == len(data) else data[:end - start])
            self._hashed_to = end

    def splice_in(self, pipe: int, offset: int, count: int, epoch: int) -> None:
        """Move ``count`` bytes from the ``pipe`` into the file at
        ``offset`` without copying them through Python (``os.splice``) and
        count them held, like ``write``. Only for a regular file, and no
        checksum: the bytes are never seen."""
        with self._lock:
            if self.sealed:
                raise _Stopped
            if epoch != self.epoch:
                raise _Superseded
            if not self._sidecar_on_disk and not self._completes(offset, offset + count):
                self._before_writing(offset)
            fd = self._fd
            moved = 0
            try:
                while moved < count:
                    if self._no_splice:  # the file system refused: through Python
                        data = os.read(pipe, count - moved)
                        self._write_all(offset + moved, memoryview(data))
                        moved += len(data)
                        continue
                    try:
                        n = _splice(pipe, fd, count - moved, offset_dst=offset + moved)
                    except OSError as exc:
                        if exc.errno not in _NO_SPLICE_ERRORS:
                            raise
                        self._no_splice = True
                        continue
                    if not n:
                        raise FileError('short write to {}: {} of {} bytes'.format(
                            self.target, moved, count))
                    self.held.add(offset + moved, offset + moved + n)
                    self._extent = max(self._extent, offset + moved + n)
                    self._sidecar_current = False
                    self.snapshot = self.held.pairs
                    moved += n
            except OSError as exc:
                raise FileError('cannot write {}: {}'.format(self.target, exc)) from exc

    @property
    def spliceable(self) -> bool:
        """Whether bytes may go to the file by ``splice_in``."""
        return self._fd >= 0 and self._hasher is None and not self._no_splice and \
            not self.read_back

    def _completes(self, start: int, end: int) -> bool:
        """Whether writing ``[start, end)`` leaves every byte held: the
        bytes before it and after it are held already (as one range
        each, ranges being merged). A write of the whole file looks at no
        range, and no write lists the gaps."""
        size = self.size
        if size <= 0:
            return size == 0  # (an unknown size is never complete, nothing always is)
        return (start <= 0 or self.held.covers(0, min(start, size))) and \
            (end >= size or self.held.covers(end, size))

    def _write_stream(self, offset: int, data: memoryview) -> int:
        file = self._file
        if offset != self._position:
            if not _seekable(file):
                raise FileError('cannot rewind {!r}: it is not seekable'.format(file))
            file.seek(offset)
        written = file.write(data)
        if written is None:  # a file object that does not count
            written = len(data)
        self._position = offset + written
        return written

    def restart_from_zero(self) -> None:
        """Empty the file: its bytes belong to another version of it. Starts
        a new epoch; the sidecar goes (an empty file needs none)."""
        with self._lock:
            self.epoch += 1
            self._dropped += 1
            self.held = _Ranges()
            self.snapshot = self.held.pairs
            self.size = -1
            self._reset_hasher()
            target, path = self.target, self.os_path
            try:
                if self._fd >= 0:
                    os.ftruncate(self._fd, 0)
                    self._extent = self._position = 0
                elif not isinstance(target, (str, os.PathLike)):  # the caller's file object
                    if _seekable(target):
                        target.seek(0)
                        target.truncate(0)
                        self._extent = 0
                    elif self._position:
                        raise FileError('{!r} cannot be rewound to start over'.format(target))
                    self._position = 0
                elif self._file is None and path is not None and _there(path):
                    with open(path, 'r+b') as file:
                        file.truncate(0)
            except OSError as exc:
                raise FileError('cannot truncate {}: {}'.format(self.target, exc)) from exc
            self._remove_sidecar()

    def forget(self, start: int, end: int) -> None:
        """The bytes ``[start, end)`` are wrong: they are no longer held, and
        the sidecar says so at once."""
        with self._lock:
            self.held.remove(start, end)
            self._dropped += 1
            self.snapshot = self.held.pairs
            if start < self._hashed_to:
                self._reset_hasher()  # it saw them: the file is hashed again at its end
            self._sidecar_current = False
            if self._fd >= 0 and not self.sealed:
                self._save_sidecar()

    def piece_matches(self, start: int, end: int, algorithm: str, digest: str,
                      cancelled: Callable[[], bool]) -> bool:
        """Whether the bytes ``[start, end)`` on disk have this hex
        ``digest`` (``_Stopped`` when ``cancelled()`` meanwhile)."""
        import hashlib
        hasher = hashlib.new(algorithm)
        with self._lock:
            self._read_back(start, end, hasher.update, cancelled)
        return hasher.hexdigest() == digest

    def _reset_hasher(self) -> None:
        if self._hasher is not None:
            import hashlib
            self._hasher = hashlib.new(self._hasher.name)
            self._hashed_to = 0

    def set_size(self, total: int) -> None:
        """The file's size is ``total``: forget anything held beyond it."""
        with self._lock:
            self.size = total
            self._dropped += 1  # (a record made before has the old size)
            if self.held.total and self.held.clip(total):  # (a new file holds nothing)
                self.snapshot = self.held.pairs

    # -- the sidecar ------------------------------------------------------------------

    def save(self) -> None:
        """Write the sidecar if the file is incomplete and it changed. The
        bytes it records reach the disk first (``fsync``), then the new
        sidecar, both outside the lock, so that writes go on meanwhile (the
        loop makes every download's: one that waited for the lock would
        hold up them all); only its rename over the old one is made under
        it. The run, or a task it waits for before it closes the file."""
        with self._lock:
            if not self._unsaved():
                return
            record, dropped = self._sidecar_record(), self._dropped
            self._sidecar_current = True  # until the next write
        try:
            _sync(self._fd)  # (open: the caller closes it after this save)
        except OSError as exc:
            _log.warning('cannot sync %s: %s', self.target, exc)
            with self._lock:
                self._sidecar_current = False
            return
        sidecar = self.sidecar
        assert sidecar is not None  # (on disk: a regular file's)
        # a name of its own: the lock's holder may write the sidecar meanwhile
        new = sidecar + '.new'
        try:
            _write_synced(new, record)
            with self._lock:
                replaced = dropped == self._dropped and not self.sealed
                if replaced:
                    os.replace(new, sidecar)
                else:  # the record claims bytes given up since (another version's, a bad piece)
                    self._sidecar_current = False
            if replaced:
                _sync_directory(os.path.dirname(sidecar) or os.curdir)
            else:
                os.unlink(new)
        except OSError as exc:
            with self._lock:
                self._sidecar_not_written(exc)

    def unsaved(self) -> bool:
        """Whether ``save()`` has a sidecar to write. Any thread. Never
        before the sidecar is first on disk (a small file's never is): that
        flag alone tells it, without the lock, as the answer may be out of
        date the moment it is given either way. Nor while another thread
        holds the lock (a worker that opens the file may hash it under it
        for seconds, and the loop asks): it is asked again later."""
        if not self._sidecar_on_disk or not self._lock.acquire(blocking=False):
            return False
        try:
            return self._unsaved()
        finally:
            self._lock.release()

    def _unsaved(self) -> bool:
        return self._sidecar_on_disk and not self._sidecar_current and self._fd >= 0 \
            and not self.sealed and not self._completes(0, 0)

    def record(self) -> bool:
        """Make sure the sidecar is on disk; whether it is."""
        with self._lock:
            return self._sidecar_on_disk or (not self._sidecar_failed and self._save_sidecar())

    def _sidecar_record(self) -> str:
        import json
        return json.dumps({'version': 2, 'url': self.url, 'size': self.size,
                           'held': self.held.pairs, 'validators': self.validators})

    def _save_sidecar(self, record: Optional[str] = None) -> bool:
        """Replace the sidecar atomically and durably, so that after a crash
        or a power loss it never claims bytes that are not on the disk: the
        bytes it records are synced first (unless the caller did, and gives
        the ``record`` it made before), the new sidecar before it replaces
        the old, the directory after. ``False`` when that failed (logged
        once). Under the lock (or ``finish``'s: see the class)."""
        sidecar = self.sidecar
        if sidecar is None:
            return False  # a file object has none
        current = record is None  # else writes since the record may have moved on
        temporary = sidecar + '.tmp'
        try:
            if record is None:
                record = self._sidecar_record()
                if self.held.total and (self._fd >= 0 or self._file is not None):
                    _sync(self._fd if self._fd >= 0 else self._file.fileno())
            _write_synced(temporary, record)
            os.replace(temporary, sidecar)
            _sync_directory(os.path.dirname(sidecar) or os.curdir)
        except OSError as exc:
            self._sidecar_not_written(exc)
            return False
        self._sidecar_on_disk = True
        self._sidecar_current = self._sidecar_current or current
        return True

    def _sidecar_not_written(self, exc: OSError) -> None:
        """Writing the sidecar failed with ``exc``: said once. Under the lock
        (or ``finish``'s)."""
        if not self._sidecar_failed:
            _log.warning('cannot write %s: %s', self.sidecar, exc)
        self._sidecar_failed = True

    def _remove_sidecar(self) -> None:
        """Remove the sidecar, unless the store knows that there is none:
        the last ``load`` looked and found none, and none was written
        since (a complete file that was resumed, as a run again over files
        it fetched before finds them). Where it was not looked for (beside
        no bytes, as for a new file), one that an earlier run left may be
        there: it is looked for now (``os.access``, see ``_there``: a
        failed unlink costs more), and goes."""
        sidecar = self.sidecar
        if sidecar is None:
            return  # (a file object has none)
        if self._sidecar_on_disk:  # (written, or found: a sidecar current only while on disk)
            self._sidecar_on_disk = self._sidecar_current = False
        else:
            found = self.found[1]
            if found is False or found is None and not os.access(sidecar, os.F_OK):
                return
        try:
            os.unlink(sidecar)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning('cannot remove %s: %s', sidecar, exc)

    # -- the end ----------------------------------------------------------------------

    def finish(self, checksum: Optional[Tuple[str, str]], modified: Optional[float] = None,
               etag: Optional[str] = None, digests: Sequence[Tuple[str, str, bytes]] = ()
               ) -> None:
        """The download is complete: cut the file to its size, check the
        checksum and the server's ``digests`` (``(field, algorithm,
        digest)``, see ``_server_digests``), forget the sidecar, and give
        the file the server's modification time and ETag (``_stamp``); a
        regular file is then closed (``close()``, which follows, has
        nothing left to do: it takes no lock). Raises ``IntegrityError`` on
        a mismatch: the file is kept, with a sidecar that holds none of it
        (``_disown``). ``digest`` is then the file's, when a checksum or
        ``hash_with`` asked for one: what the hasher saw, and the bytes it
        did not see read from disk. Each of these is done only where this
        store has it to do: a file that holds more than its size, a
        hasher, digests, a sidecar. The end of an attempt, which nothing
        else uses the store at (see the class): without the lock, which
        would be a section more for every file, guarding nothing."""
        fd = self._fd
        if fd >= 0 and 0 <= self.size < self._extent:  # (reserved, or written, past it)
            self._cut_to_size(fd)
        if checksum is not None or self.hash_with is not None:
            self._check_hash(checksum)
        if digests:  # (seldom sent)
            self._check_digests(digests)
        self._remove_sidecar()
        path = self.os_path
        if path is None:
            return  # (a file object: not the store's to stamp)
        if fd >= 0:
            _stamp(path, modified, etag, fd)
            self._fd = -1  # (complete: nothing more to write, nor to cut back)
            os.close(fd)
        elif self._file is None and (modified is not None or etag) \
                and os.path.isfile(path):  # (nothing to stamp: no look at the file)
            _stamp(path, modified, etag)

    def _cut_to_size(self, fd: int) -> None:
        """Cut the open file back to its size, where it holds more (room
        reserved, or the bytes of a bigger version written). ``finish``'s."""
        try:
            if os.fstat(fd).st_size > self.size:
                os.ftruncate(fd, self.size)
                self._extent = self.size
        except OSError as exc:
            raise FileError('cannot truncate {}: {}'.format(self.target, exc)) from exc

    def _check_hash(self, checksum: Optional[Tuple[str, str]]) -> None:
        """The file's digest (``digest``), by the checksum's algorithm or
        ``hash_with``: what the hasher saw, and the bytes it did not see
        read from disk; ``IntegrityError`` if it is not the checksum's.
        ``finish``'s."""
        algorithm = checksum[0] if checksum is not None else self.hash_with
        assert algorithm is not None  # (finish looked)
        if self._hasher is None:
            import hashlib
            self._hasher = hashlib.new(algorithm)
        self._hash_from_disk(self.held.total)
        actual = self._hasher.hexdigest()
        if checksum is not None and actual != checksum[1]:
            self._disown()
            raise IntegrityError('{} checksum mismatch for {}: expected {}, got {}'
                                 .format(checksum[0], self.target, checksum[1], actual))
        self.digest = (self._hasher.name, actual)

    def _check_digests(self, digests: Sequence[Tuple[str, str, bytes]]) -> None:
        """Hash the file once for every algorithm of ``digests`` (one at
        least) and compare; ``IntegrityError`` on a mismatch. A stream that
        cannot be read back is not checked."""
        if not self.is_path and not (_seekable(self.target) and
                                     getattr(self.target, 'readable', lambda: False)()):
            _log.info('%s: cannot read the file back to check the server\'s digest', self.url)
            return
        import hashlib
        hashers = {algorithm: hashlib.new(algorithm) for _, algorithm, _ in digests}

        def update(block: bytes) -> None:
            for hasher in hashers.values():
                hasher.update(block)
        self._read_back(0, self.held.total, update)
        for field, algorithm, digest in digests:
            actual = hashers[algorithm].digest()
            if actual != digest:
                import base64
                self._disown()
                raise IntegrityError('{} {} mismatch for {}: the server says {}, the file has '
                                     '{}'.format(field, algorithm, self.target,
                                                 base64.b64encode(digest).decode(),
                                                 base64.b64encode(actual).decode()))

    def _disown(self) -> None:
        """The bytes do not match what they should be, and nobody can tell
        which are wrong: keep them, with a sidecar that holds none of them,
        so that the file is never taken for a complete one and a new start
        downloads it again."""
        if self.os_path is None or not os.path.isfile(self.os_path):
            return
        held, self.held = self.held, _Ranges()
        try:
            self._save_sidecar()
        finally:
            self.held = held

    def read_digest(self, algorithm: str) -> str:
        """The hex digest of the whole file, read from disk (for a file
        whose bytes did not pass through this store's hasher). Raises
        ``FileError``."""
        import hashlib
        with self._lock:
            self._hasher, self._hashed_to = hashlib.new(algorithm), 0
            self._hash_from_disk(_local_size(self.target))
            return self._hasher.hexdigest()

    def _hash_from_disk(self, end: int,
                        cancelled: Callable[[], bool] = lambda: False) -> None:
        """Feed the hasher the file's bytes from where it stands to ``end``."""
        def update(block: bytes) -> None:
            self._hasher.update(block)
            self._hashed_to += len(block)
        self._read_back(self._hashed_to, end, update, cancelled)

    def _read_back(self, start: int, end: int, consume: Callable[[bytes], None],
                   cancelled: Callable[[], bool] = lambda: False) -> None:
        """Read the file's bytes from ``start`` to ``end`` back, block by
        block, into ``consume`` (``_Stopped`` when ``cancelled()``)."""
        if end <= start:
            return
        source: _BinaryFile
        if isinstance(self.target, (str, os.PathLike)):
            source = open(self.target, 'rb')
        elif _seekable(self.target) and getattr(self.target, 'readable', lambda: False)():
            source = self.target
        else:
            raise FileError('cannot verify the checksum of a resumed stream')
        try:
            source.seek(start)
            left = end - start
            while left:
                if cancelled():
                    raise _Stopped
                block = source.read(min(left, 1 << 20))
                if not block:
                    break
                consume(block)
                left -= len(block)
        except OSError as exc:
            raise FileError('cannot read {} back: {}'.format(self.target, exc)) from exc
        finally:
            if source is self.target:
                source.seek(self._position)
            else:
                source.close()

    def close(self) -> None:
        """Close the file (never a caller's file object). A partial file that
        holds one range from byte 0 is cut back to it, giving up the space
        reserved beyond: it then looks like what it is, and resumes from its
        size even without its sidecar. The attempt's end (its transfer
        opened the file, and nothing opens it again before the next
        attempt): a file closed already, as ``finish`` closes a complete
        one, is told without the lock."""
        if self._fd < 0 and self._file is None:
            return
        with self._lock:
            fd, self._fd = self._fd, -1
            file, self._file = self._file, None
            if fd < 0:
                if file is not None and self.is_path:  # (a device, a pipe...)
                    file.close()
                return
            try:
                held = self.held.total
                if not self.sealed and self._extent > held and held == self.held.prefix() \
                        and os.fstat(fd).st_size > held:
                    os.ftruncate(fd, held)
            except OSError as exc:
                _log.warning('cannot cut %s back to %d bytes: %s', self.target, held, exc)
            finally:
                os.close(fd)



# ---------------------------------------------------------------------------
# transfer: one attempt over one or more connections and sources
# ---------------------------------------------------------------------------

_DECODABLE = ('gzip', 'x-gzip', 'deflate')
_GZIP_TYPES = ('application/gzip', 'application/x-gzip', 'application/x-tar+gzip',
               'application/tar+gzip')
_MAX_STREAK = 3          # transient failures in a row, without a byte, that bench a source
_RETRY_PAUSE = 0.25      # seconds before asking a source again, per failure in a row
_MAX_CHANGES = 3         # times an attempt may start over because the file changed
_MAX_BAD_PIECES = 2      # pieces that fail their hash after which a source is retired


class _DecodedBody:
    """The decoded bytes of a ``gzip`` or ``deflate`` body, read from
    ``body`` (a ``_Response``) of ``length`` encoded bytes (``None``: to its
    end). Each read decodes at most what the caller's buffer holds, so a
    small body that decodes to a huge one never fills the memory. Its
    reads and waits are steps, as ``_Response``'s."""

    def __init__(self, body: _Response, encoding: str, length: Optional[int]):
        import zlib
        self._zlib = zlib
        self._body = body
        self._encoding = encoding
        self._left = length
        # 47: a gzip or a zlib header, told apart by zlib; a deflate body
        # without a header (as some servers send it) is tried when that fails
        self._decoder = zlib.decompressobj(47)
        self._started = False
        self._input = b''            # encoded bytes not decoded yet
        self._output = b''           # decoded bytes not handed out yet
        self._raw = bytearray(64 * 1024)
        self._ended = False

    def readinto_steps(self, view: memoryview) -> '_Steps[int]':
        while not self._output:
            if self._ended:
                return 0
            if not self._input and not (yield from self._fill_steps()):
                continue
            try:
                self._output = self._decoder.decompress(self._input, len(view))
            except self._zlib.error as exc:
                if self._encoding != 'deflate' or self._started:
                    raise ProtocolError('bad {} body: {}'.format(self._encoding, exc)) from exc
                self._decoder = self._zlib.decompressobj(-15)
                continue
            self._started = True
            self._input = self._decoder.unconsumed_tail
            if self._decoder.eof and self._decoder.unused_data:
                # another gzip member follows (as `cat a.gz b.gz` makes)
                self._input = self._decoder.unused_data
                self._decoder = self._zlib.decompressobj(47)
        n = min(len(view), len(self._output))
        view[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def _fill_steps(self) -> '_Steps[bool]':
        """Read encoded bytes into ``_input``; at the end, take the decoder's
        last bytes. Whether there is input to decode."""
        want = len(self._raw) if self._left is None else min(len(self._raw), self._left)
        got = (yield from self._body.readinto_steps(memoryview(self._raw)[:want])) \
            if want else 0
        if got:
            if self._left is not None:
                self._left -= got
            self._input = bytes(self._raw[:got])
            return True
        self._ended = True
        self._output = self._decoder.flush()
        if not self._decoder.eof:
            raise ProtocolError('{} body cut short'.format(self._encoding))
        return False

    def ready(self) -> bool:
        return bool(self._output or self._input) or (not self._ended and self._body.ready())

    def wait_steps(self, until: Optional[float]) -> '_Steps[bool]':
        if self.ready() or self._ended:
            return True
        return (yield from self._body.wait_steps(until))


_SPLICE = hasattr(os, 'splice') and not os.environ.get('BITPIT_NO_SPLICE')
_NO_SPLICE_ERRORS = frozenset(getattr(errno, name) for name in
                              ('EINVAL', 'ENOSYS', 'EOPNOTSUPP', 'ENOTSUP', 'EXDEV')
                              if hasattr(errno, name)) if _SPLICE else frozenset()


class _SpliceRefused(Exception):
    """The system cannot splice this socket or file: read and write instead."""
_PIPE_SIZE = 1024 * 1024     # asked for the pipe of a splice (the kernel may give less)
_SPLICE_FROM = 1024 * 1024   # smaller bodies are not worth a pipe


class _Splice:
    """Moves a plain body from the socket to the file without copying it
    through Python: ``os.splice`` from the socket into a pipe, and from the
    pipe into the file at the offset (Linux, Python 3.10+). What the answer
    received with its head is written first. One per request of a
    connection; ``close()`` lets the pipe go."""

    def __init__(self, body: _Response, sock: socket.socket, store: _FileStore,
                 timeout: Optional[float]):
        self._body = body
        self._sock = sock
        self._store = store
        self._timeout = timeout
        self._pipe: Optional[Tuple[int, int]] = None
        self._scratch = memoryview(bytearray(io.DEFAULT_BUFFER_SIZE))

    def move_steps(self, offset: int, count: int, epoch: int) -> '_Steps[int]':
        """Steps that move up to ``count`` bytes of the body into the file
        at ``offset``, and give how many; 0 at its end. They raise
        ``socket.timeout`` after ``timeout`` seconds without a byte,
        ``_SpliceRefused`` where splicing cannot work."""
        if self._body.buffered():
            n = yield from self._body.readinto_steps(self._scratch[:count])
            if n:
                self._store.write(offset, self._scratch[:n], epoch)
            return n
        if self._pipe is None:
            self._pipe = os.pipe()
            try:
                import fcntl
                fcntl.fcntl(self._pipe[1], getattr(fcntl, 'F_SETPIPE_SZ', 1031), _PIPE_SIZE)
            except OSError:
                pass  # the default pipe (64 KiB) will do
        try:  # splice first, wait only when nothing is there: one call less
            n = yield from _io_steps(_splice, self._sock, self._timeout, self._sock.fileno(),
                                     self._pipe[1], count, None,
                                     getattr(os, 'SPLICE_F_MOVE', 1))
        except OSError as exc:  # (a time-out too, which has no errno)
            if exc.errno in _NO_SPLICE_ERRORS:
                raise _SpliceRefused from exc
            raise
        if n:
            self._store.splice_in(self._pipe[0], offset, n, epoch)
        return n

    def close(self) -> None:
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None


class _Source:
    """One URL the file can come from (its ``address``, checked), and what
    this attempt learned of it: its validator, the one it had before the
    file changed (``stale``), the error that retired it, and its transient
    failures in a row. The loop's thread's, like all of the transfer's
    state."""
    __slots__ = ('url', 'address', 'validator', 'stale', 'retired', 'streak', 'last_error',
                 'bad_pieces')

    def __init__(self, address: _Address, validator: Optional[str]):
        self.url = address.url
        self.address = address
        self.validator = validator
        self.stale: Optional[str] = None
        self.retired: Optional[Error] = None
        self.streak = 0
        self.last_error: Optional[Error] = None
        self.bad_pieces = 0  # pieces it sent that did not match their hash

    @property
    def usable(self) -> bool:
        return self.retired is None and self.streak < _MAX_STREAK


class _BadPieces(IntegrityError):
    """A source sent ``_MAX_BAD_PIECES`` pieces that do not match their
    hashes: it is retired (the others fetch those pieces again)."""


class _PieceHashes:
    """A metalink's piece hashes (``algorithm``, ``length``, hex
    ``digests``), and what the transfer knows of each piece: checked good,
    being checked, the bytes each source wrote into it, and the source that
    sent it wrong. The loop's thread's, like all of the transfer's state
    (a worker that opens a big file reads the pieces held before, but
    their results are applied on the loop: ``_Setup.pieces``)."""

    def __init__(self, algorithm: str, length: int, digests: List[str]):
        self.algorithm = algorithm
        self.length = length
        self.digests = digests
        self.epoch = 0  # the store's epoch these facts are of
        self.forget(0)

    def forget(self, epoch: int) -> None:
        """The file started over (a new ``epoch``): nothing is known of its
        pieces."""
        self.good: Set[int] = set()
        self.checking: Set[int] = set()
        self.writers: Dict[int, Dict[_Source, int]] = {}
        self.bad_from: Dict[int, _Source] = {}
        self.epoch = epoch

    def span(self, index: int, total: int) -> Tuple[int, int]:
        return index * self.length, min((index + 1) * self.length, total)

    def wrote(self, source: _Source, start: int, end: int) -> None:
        """``source`` wrote the bytes ``[start, end)``."""
        for index in range(start // self.length,
                           min((end - 1) // self.length + 1, len(self.digests))):
            part = min(end, (index + 1) * self.length) - max(start, index * self.length)
            counts = self.writers.setdefault(index, {})
            counts[source] = counts.get(source, 0) + part

    def due(self, held: _Ranges, start: int, end: int, total: int) -> List[int]:
        """The pieces within ``[start, end)``'s reach that ``held`` now
        covers and nobody checked yet; they are being checked from now."""
        found = []
        for index in range(start // self.length,
                           min((end - 1) // self.length + 1, len(self.digests))):
            if index not in self.good and index not in self.checking and \
                    held.covers(*self.span(index, total)):
                self.checking.add(index)
                found.append(index)
        return found

    def culprit(self, index: int) -> Optional[_Source]:
        """The source that wrote a piece found wrong, if one source wrote
        all of it: of a piece several wrote, nobody can tell which one
        spoilt it (a byte of the one that wrote least is enough). The count
        starts again for the bytes that come next."""
        counts = self.writers.pop(index, {})
        return next(iter(counts)) if len(counts) == 1 else None


class _Connection:
    """One connection of a transfer (steps on the loop), and the range of the file it
    fetches: ``[pos, end)``. ``pos`` advances as bytes land; ``end`` may
    shrink when another connection takes over the rest, even below
    ``reading_to``, the end of the read in progress, when a far faster
    connection races it (the bytes both get are the same). The loop's
    thread's, like all of the transfer's state (``_Transfer.downloaded``
    reads ``pos`` and ``pending`` from any thread).

    What a new connection starts with is said once, here in the class (its
    own values are set as they change): a small file's one connection
    changes few of them."""

    active = False                # holds a claim
    gone = False                  # it left the transfer (``_Transfer._leave``)
    pos = end = reading_to = 0
    last_end = -1                 # where its last claim ended: its continuation
    open_ended = False            # asks for ``pos-``, not ``pos-(end - 1)``
    epoch = 0
    superseded = False            # the file started over under it
    request: Optional[_Request] = None
    request_end = 0               # where its request's part of the claim ends
    job_began = 0.0               # when its request was sent
    job_bytes = 0                 # bytes its request brought
    last_bytes_at = 0.0           # when its request last brought some
    answered = False              # its request's answer was accepted
    last_rate = 0.0               # bytes per second of its last request
    buffer = memoryview(b'')      # (read-only) grown to what a body needs

    def __init__(self, number: int, source: _Source, chunk_size: int):
        self.number = number
        self.source = source
        self.chunk_size = chunk_size
        self.pending = 0              # bytes in its buffer, not yet written (read often)

    def rate(self, now: float) -> Optional[float]:
        """Bytes per second of its request so far; ``None`` while too young
        to tell."""
        seconds = now - self.job_began
        return self.job_bytes / seconds if self.job_began and seconds >= _RATE_AGE else None

    def left(self) -> int:
        """Bytes of its claim not received yet (its read in progress too)."""
        return max(0, self.end - self.pos - self.pending)


class _PieceSizer:
    """How many bytes a ranged request of a split file asks for. Pieces
    start at ``_MIN_SPLIT`` bytes and double while a bigger piece comes as
    fast as the smaller ones do now (on a fast link, fewer requests cost
    less), as long as many pieces are left (for a few, the requests cost
    little); one connection at a time tries the bigger size. A bigger piece
    that comes far slower than the smaller ones (a server that gives each
    request a burst, as nginx's ``limit_rate`` does) ends the growth; one
    only somewhat slower is tried again later. The loop's thread's, like
    all of the transfer's state."""

    def __init__(self) -> None:
        self.size = _MIN_SPLIT
        self.trial: Optional[_Connection] = None
        self.final = False
        self._rates: Dict[int, float] = {}  # piece size -> its recent rate

    def piece_for(self, conn: _Connection, missing: int) -> int:
        """The size of ``conn``'s next request, ``missing`` bytes being left."""
        if self.trial is None and not self.final and self.size < _MAX_PIECE and \
                self.size in self._rates and missing >= 32 * self.size:
            self.trial = conn
        return self.size * 2 if self.trial is conn else self.size

    def done(self, conn: _Connection, size: int, received: int, seconds: float) -> None:
        """``conn``'s request for ``size`` bytes brought ``received``."""
        if received < size:
            if self.trial is conn:
                self.trial = None  # cut short: try again later
            return
        rate = size / max(seconds, 1e-6)
        if self.trial is conn:
            self.trial = None
            usual = self._rates.get(self.size, 0.0)
            if rate >= usual / 2:
                self.size *= 2
            elif rate < usual / 8:
                self.final = True
        # An average of the latest pieces, not the best one ever: the rate of
        # each connection falls as more of them share the link.
        last = self._rates.get(size)
        self._rates[size] = rate if last is None else (last + rate) / 2


def _thread_cpu() -> Optional[float]:
    """CPU seconds the calling thread has used; ``None`` where the system
    cannot tell."""
    try:
        return time.thread_time()
    except (AttributeError, OSError):
        return None


class _LimitJudge:
    """Whether the probe's connection is held back by the link or by this
    machine's CPU: the share of a CPU its thread used, and the bytes it
    received, over its first ``_JUDGE_FIRST`` seconds of body, then over
    every ``_JUDGE_AGAIN`` seconds. A connection that keeps a CPU busy by
    itself (a fast local server) gets all that CPU can take; more
    connections would only share it, and lose some of it switching threads.
    (A thread busy with little coming in is busy with something else.)
    Only the probe's steps use it, between two reads, on the loop."""

    def __init__(self, now: float, cpu: float, received: int):
        self._since = now
        self._cpu = cpu
        self._received = received
        self.due = now + _JUDGE_FIRST
        self.judged = False  # no verdict yet: the probe reads little at a time

    def cpu_bound(self, now: float, received: int) -> Optional[bool]:
        """The verdict on the window that ends ``now``, ``received`` bytes
        having come in all; ``None`` before it is due."""
        if now < self.due:
            return None
        cpu = _thread_cpu() or 0.0
        seconds = now - self._since
        bound = cpu - self._cpu >= _CPU_BOUND * seconds and \
            received - self._received >= _CPU_BOUND_RATE * seconds
        self._since, self._cpu, self._received = now, cpu, received
        self.due = now + _JUDGE_AGAIN
        self.judged = True
        return bound


class _Setup:
    """What the probe's answer asks of the file, done by the probe's
    connection's steps, or for a big file by a worker that they wait for
    (it may take a while): open it (hashing what it already holds, for
    a checksum), check the metalink's pieces that it held before
    (``pieces``, found on the loop, each one's verdict in ``verdicts``),
    reserve its space (``_Transfer._prepare``, which touches nothing
    else of the transfer's); then, on the loop, apply the verdicts and
    share the rest out when it comes in parts (``segmented``, once a
    sidecar records them) (``_Transfer._body_starts``)."""
    __slots__ = ('reserve', 'segmented', 'pieces', 'verdicts')

    def __init__(self, reserve: Optional[int], segmented: bool):
        self.reserve = reserve
        self.segmented = segmented
        # the pieces held before to check (index, first byte, end), and
        # whether each is good
        self.pieces: Sequence[Tuple[int, int, int]] = ()
        self.verdicts: Sequence[bool] = ()


# -- the planner: which range each connection fetches next -----------------------

class _Planner:
    """Which range of the file each connection of a transfer fetches next.
    It owns the claims (each connection's ``[pos, end)``: it sets and cuts
    them, the pump advances ``pos`` as bytes land) and the state of the
    split: the file's size, whether it comes in ranged pieces and how big
    (``_PieceSizer``), the share-out, the judge of what limits the probe,
    the fastest rate so far (what a racer would make). It reads the store's
    held ranges and the connections' positions and touches neither sockets
    nor files, so a state fed to it tells what it decides.

    The loop's thread's, like all of the transfer's state: every method is
    called by the run's or a connection's steps, on the loop (``buckets``
    is replaced whole by ``_Transfer.add_bucket``, from any thread, and
    read once where it is read), and none takes a lock or waits.

    The state of a split starts as said here in the class (but for what
    every read looks at); a file that is never split (a small one) never
    sets it, nor makes a ``_PieceSizer`` (``split`` does)."""

    limit: Optional[_LimitJudge] = None    # what limits it: the probe's steps'
    _share_basis = (0, 0)         # where the probe began, and the bytes missing then
    pieces: Optional[_PieceSizer] = None  # the size of the pieces, from the first split
    best_rate = 0.0               # bytes per second of the fastest request so far

    def __init__(self, store: _FileStore, connections: List[_Connection], wanted: int,
                 buckets: Tuple[_TokenBucket, ...]):
        self.store = store
        self.connections = connections  # the transfer's live ones (the same list)
        self.connections_wanted = wanted
        self.buckets = buckets        # a race under a limit waits for a stall
        self.total: Optional[int] = store.size if store.size >= 0 else None
        self.segmented = False        # the file comes in ranged pieces
        self.judging: Optional[_Connection] = None  # the probe, until it is shared out

    def has_work(self) -> bool:
        """Whether a new connection would find a range to fetch."""
        return self._pick(None) is not None

    def _free(self) -> List[Tuple[int, int]]:
        """The missing ranges no connection has claimed."""
        taken = _Ranges(self.store.snapshot)
        for c in self.connections:
            if c.active:
                taken.add(c.pos, c.end)
        return taken.gaps(self.total if self.total is not None else _UNKNOWN_END)

    def _owner(self, start: int) -> Optional[_Connection]:
        """The connection whose claim ends where a free range starts: it
        continues into that range when its claim is done."""
        for c in self.connections:
            if c.active and c.end == start:
                return c
        return None

    def first_gap(self) -> Tuple[int, Optional[int]]:
        """The first range not held (``(total, total)`` when none is), for
        the probe; its end is ``None`` when the size is unknown."""
        held = self.store.snapshot
        if not held:  # a new file: all of it
            return 0, self.total
        end_of_file = self.total if self.total is not None else _UNKNOWN_END
        gaps = _Ranges(held).gaps(end_of_file)
        if not gaps:  # (only a known size can be held all through)
            return end_of_file, end_of_file
        start, end = gaps[0]
        return start, (end if end < _UNKNOWN_END else None)

    def claim(self, conn: _Connection, start: int, end: Optional[int],
              open_ended: bool = False) -> bool:
        """``conn`` fetches ``[start, end)`` (``end`` ``None``: to the end
        of the file)."""
        conn.pos = conn.reading_to = start
        conn.end = end if end is not None else (self.total if self.total is not None else _UNKNOWN_END)
        conn.open_ended = open_ended
        conn.epoch = self.store.epoch
        conn.active = True
        return True

    def choose(self, conn: _Connection) -> bool:
        """Claim for ``conn`` the range ``_pick`` finds, if any."""
        pick = self._pick(conn)
        if pick is None:
            return False
        start, end, shrunk = pick
        if shrunk is not None:
            shrunk.end = start
        return self.claim(conn, start, end, open_ended=self.total is None)

    def _pick(self, conn: Optional[_Connection]
              ) -> Optional[Tuple[int, Optional[int], Optional[_Connection]]]:
        """The range a free connection (``conn``, or a new one) fetches next,
        as ``(start, end, connection whose claim it cuts short)``: the rest
        of its own range, else a range nobody continues, else the upper half
        of the largest range left, else the last block of a far slower
        connection's range (a race), else ``None``. Without splitting, the
        first missing range."""
        free = self._free()
        if not self.segmented:
            if not free:
                return None
            start, end = free[0]
            return start, (end if self.total is not None else None), None
        last_end = conn.last_end if conn is not None else -1
        unowned = [(start, end) for start, end in free if not self._owner(start)]
        for start, end in unowned:
            if start == last_end:
                return start, end, None
        if unowned:
            start, end = unowned[0]
            return start, end, None
        regions: List[Tuple[int, int, int, Optional[_Connection]]] = \
            [(end - start, start, end, None) for start, end in free]
        regions += [(c.end - c.reading_to, c.reading_to, c.end, c)
                    for c in self.connections if c.active]
        if regions:
            size, start, end, owner = max(regions, key=lambda region: region[0])
            if size >= 2 * _MIN_SPLIT:
                middle = start + size // 2
                return middle, end, owner
        victim = self._race_victim(conn)
        if victim is None:
            return None
        for start, end in free:
            if start == victim.end:
                return max(start, end - _RACE_BLOCK), end, None
        # its last block beyond the read in progress, else the bytes that read
        # waits for (so that it never holds the file up): under a rate limit
        # only once it stalled, as the bytes that come twice count twice there
        if victim.reading_to < victim.end:
            floor = victim.reading_to
        elif time.monotonic() - victim.last_bytes_at >= _STALLED_READ or \
                not _limited(self.buckets):
            floor = victim.end - victim.left()
        else:
            return None
        start = max(floor, victim.end - _RACE_BLOCK)
        return (start, victim.end, victim) if start < victim.end else None

    def _race_victim(self, racer: Optional[_Connection]) -> Optional[_Connection]:
        """The connection a free one (``racer``, or a new one) should race: the
        one that would finish last, if it is far slower than the racer
        could be, and would take longer for what it has left than the
        racer for a block of it (twice over, and a request's latency)."""
        racer_speed = self._racer_speed(racer)
        if not racer_speed:
            return None
        now = time.monotonic()
        victim, latest = None, 0.0
        for c in self.connections:
            rate = c.rate(now) if c.active and c is not racer else None
            if rate is None or rate * 2 > racer_speed:
                continue
            left = self._left(c)
            finish = left / rate if rate > 0 else float('inf')
            if left > 0 and finish > 2 * min(left, _RACE_BLOCK) / racer_speed + _RACE_LATENCY \
                    and finish > latest:
                victim, latest = c, finish
        return victim

    def _racer_speed(self, racer: Optional[_Connection]) -> float:
        """How fast ``racer`` (or a new connection) would fetch a block: its
        last request's rate, else the fastest one's; 0 when none tells, or
        when the file is not split."""
        if not self.segmented:
            return 0.0
        return (racer.last_rate if racer is not None else 0.0) or self.best_rate

    def _left(self, c: _Connection) -> int:
        """Bytes ``c`` has yet to receive: its claim and the range it continues."""
        left = c.left()
        for start, end in self._free():
            if start == c.end:
                left += end - start
        return left

    def rate_due(self, racer: _Connection) -> Optional[float]:
        """When the youngest other request that might be raced and is still
        too young to tell its rate has run long enough; ``None`` when there
        is none (or no racer speed to compare it with). Those whose rate is
        known were judged already: the run looks at them again
        (``_keep_going``, four times a second)."""
        if not self._racer_speed(racer):
            return None
        now = time.monotonic()
        due = [c.job_began + _RATE_AGE for c in self.connections
               if c.active and c is not racer and c.job_began and c.left() > 0
               and c.job_began + _RATE_AGE > now]
        return min(due) if due else None

    def judge(self, probe: _Connection, now: float, received: int) -> bool:
        """Whether to share the file out now (``share_out``), ``received``
        bytes having come in all: once the probe's reads show that the link
        limits it; while the CPU does, the probe goes on alone (more
        connections would compete for CPU time, with the server too when it
        is local), judged again later. The probe's steps, between two
        reads."""
        assert self.limit is not None  # set with judging
        if self.limit.cpu_bound(now, received) is not False:
            return False
        self.judging = None
        probe.reading_to = probe.pos + probe.pending  # between reads: none under way
        return True

    def share_out(self, probe: _Connection) -> List[Tuple[int, int]]:
        """Split the bytes missing when the probe began into equal parts,
        one per connection: the probe keeps the first (or what it already
        got into), a new connection starts on each of the others, and parts
        left over go to whichever connection is free first. The probe's
        open-ended request ends after its first piece, or at once if it got
        further: like every piece, the next ones are asked for with a fresh
        request (a server that gives each request a burst gives it again).
        Returns the parts for new connections, in the order to start them.
        The probe's steps."""
        began, missing = self._share_basis
        assert self.pieces is not None  # made by split()
        parts = min(self.connections_wanted, max(1, missing // _MIN_SPLIT))
        share = -(-missing // parts)
        probe.end = max(probe.reading_to, min(probe.end, began + share))
        if probe.open_ended:
            probe.request_end = max(probe.reading_to, began + self.pieces.size)
            probe.open_ended = False  # its next requests ask for pieces
        probe.request_end = min(probe.request_end, probe.end)
        claims: List[Tuple[int, int]] = []
        live = len(self.connections)
        for start, end in self._free():
            while start < end and live + len(claims) < parts:
                claims.append((start, min(end, start + share)))
                start += share
        return claims

    def missing(self) -> int:
        """Bytes not held yet (once the size is known)."""
        assert self.total is not None
        return self.total - self.store.held.total

    def request_end(self, conn: _Connection) -> int:
        """Where ``conn``'s next request ends: after a piece of its claim
        when the file is split, else at the claim's end (no piece asked
        for, no sizer made: a file never split asks for its claims
        whole)."""
        if not self.segmented:
            return conn.end
        assert self.pieces is not None  # made by split()
        return min(conn.end, conn.pos + self.pieces.piece_for(conn, self.missing()))

    def done(self, conn: _Connection, first: int) -> None:
        """``conn``'s request from ``first`` ended now: its rate, what
        the piece sizer learns from it, and the end of its claim if it
        got all of it. (The clock is read only when the rate is worth
        knowing: a small file's request brings too few bytes to tell.)"""
        if conn.job_bytes >= 65536 or self.segmented:
            seconds = time.monotonic() - conn.job_began
            if conn.job_bytes >= 65536:  # a rate of a few bytes is mostly latency
                conn.last_rate = conn.job_bytes / max(seconds, 1e-6)
                self.best_rate = max(self.best_rate, conn.last_rate)
            if self.segmented and self.pieces is not None:  # (made by split())
                self.pieces.done(conn, conn.request_end - first, conn.job_bytes, seconds)
        if conn.pos >= conn.end:  # the claim is done
            conn.active = False
            conn.last_end = conn.pos

    def set_total(self, total: Optional[int]) -> None:
        """The file has ``total`` bytes (``None``: unknown): no claim goes
        past its end, but for a read under way."""
        self.total = total
        if total is not None:
            for c in self.connections:
                c.end = min(c.end, max(total, c.reading_to))

    def start_over(self) -> None:
        """The file starts over: its size is unknown and it is not split
        until the probe's answer says so again."""
        self.total = None
        self.segmented = False
        self.judging = None

    def split(self, probe: _Connection, received: int) -> bool:
        """The file comes in ranged pieces: the bytes missing now are shared
        out from ``probe``'s position, once its first reads tell what
        limits it (``judge``; ``received`` bytes came in all so far), or
        at once (``True``: ``share_out`` now) where the CPU time of a
        thread cannot be told. The probe's steps."""
        self.segmented = True
        if self.pieces is None:  # (a file that started over keeps what it learnt)
            self.pieces = _PieceSizer()
        self._share_basis = (probe.pos, self.missing())
        cpu = _thread_cpu()
        if cpu is None:  # no telling what limits it: share out now
            return True
        self.judging = probe  # its first reads tell
        self.limit = _LimitJudge(time.monotonic(), cpu, received)
        return False


# -- the pump: a connection's requests and their bodies into the file ----------

# The pump moves the bytes of a transfer: a request for a connection's
# claim, its answer judged by the transfer, its body read, paced and
# written into the file, as steps (``_fetch_steps``) that each
# connection's steps run on the loop (``_Transfer._serve_steps``); what
# the connections share (the claims, the file's size, the bytes received)
# is the loop's, like all of the transfer's state (see ``_Transfer``): it
# reads and changes it with no lock. It holds nothing of its own: its
# functions are given the transfer (an object of its own, made for every
# attempt, would only hold the transfer's fields, and refer back to it).

def _fetch_steps(transfer: '_Transfer', conn: _Connection) -> '_Steps[Optional[_Wait]]':
    """Steps: one request for ``conn``'s claim (a piece of it, when the
    file is split), and its body into the file. Once its claim is done,
    they give what ``_Transfer._next_for`` gives."""
    planner = transfer.planner
    source = conn.source
    first = conn.pos
    ranged = transfer.ranged and (first > 0 or planner.segmented or
                                  planner.connections_wanted > 1)
    if first >= conn.end and transfer.probed:  # others took all of it meanwhile
        conn.active = False
        conn.last_end = first
        return None
    conn.request_end = planner.request_end(conn)
    last = None if conn.open_ended or not ranged else conn.request_end - 1
    # (positional: keywords would cost the call a dict)
    request = _Request(transfer.options, source.address, 'GET',  # method
                       first if ranged else None,                 # first
                       last,                                      # last
                       source.validator if first > 0 else None,   # validator
                       transfer.cancel,                           # cancel
                       None if transfer.probed else transfer.conditions)  # extra
    probe = not transfer.probed
    conn.request = request
    conn.job_began, conn.job_bytes, conn.answered = time.monotonic(), 0, False
    conn.last_bytes_at = conn.job_began
    reuse = fetched = False
    try:
        response = yield from request.send_steps()
        answer = _check_answer(response, request.url, first)
        if answer.kind == 'end' and answer.total is None and probe and first > 0:
            request.close(False)  # its host slot may be the one the question needs
            answer.total = yield from _ask_size_steps(transfer, source)
        body_end, setup = transfer._accept(conn, answer, response, request)
        conn.answered = True
        if setup is not None:
            try:
                if max(transfer.store.held.total, setup.reserve or 0) > _DISK_WORK_ON_LOOP:
                    # opening a big file may hash what it holds, reserving
                    # its room write its sidecar and sync it
                    yield from _on_worker_steps(
                        functools.partial(transfer._prepare, setup), 'bitpit-prepare')
                else:
                    transfer._prepare(setup)
            finally:
                if setup.pieces:  # (what the check found, applied here, on the loop)
                    transfer._pieces_checked(None, setup.pieces, setup.verdicts)
            transfer._body_starts(conn, setup)
        if body_end is not None:
            reuse = yield from _pump_steps(transfer, conn, response, answer, body_end, request)
        fetched = True
    finally:
        if not fetched:
            conn.request = None
            request.close(False)
    try:
        conn.request = None
        planner.done(conn, first)
        # its claim done, its next one (or its end) is found now
        return None if conn.active else transfer._next_for(conn)
    finally:
        request.close(reuse)


def _ask_size_steps(transfer: '_Transfer', source: _Source) -> '_Steps[Optional[int]]':
    """Steps that give the size of the file at ``source``, or ``None``
    if it does not tell: asked with ``Range: bytes=0-0`` for a 416 that
    left it out, so that such a 416 can still say that a resumed file
    is whole."""
    request = _Request(transfer.options, source.address, 'GET', 0, 0,  # method, first, last
                       None, transfer.cancel)                          # validator, cancel
    try:
        response = yield from request.send_steps()
        return _check_answer(response, request.url, 0).total
    except HTTPStatusError:
        return None  # judged as the 416 itself
    finally:
        request.close(False)


def _pump_steps(transfer: '_Transfer', conn: _Connection, response: _Response,
                answer: _Answer, body_end: int, request: _Request) -> '_Steps[bool]':
    """Steps that copy the body into the file from ``conn.pos`` until
    the claim's end (re-read before every read: another connection may
    take over the rest), paced by the transfer's token buckets (read
    again before every read: a limit set meanwhile adds one), with a
    ``_Pacer`` made at the first limited read. Received bytes are
    written when the buffer is full, when they have waited
    ``_FLUSH_AGE`` seconds, before a read that may block or be paced
    (so a limited download lands as smoothly as it comes), at the end,
    and on any failure or stop (nothing received is lost). They give
    whether the connection can carry another request."""
    wanted = max(1, min(conn.end, conn.request_end, body_end) - conn.pos)
    want = min(conn.chunk_size, wanted)
    if len(conn.buffer) < want:
        conn.buffer = memoryview(bytearray(want))
    view = conn.buffer
    chunk = len(view)
    # a body that fits in the buffer is written in one go when it ends
    # (or is half a second old): a small file then needs no sidecar
    whole = wanted <= chunk
    sock = request.sock
    body: Any = response  # (which reads its own body)
    splice = None
    if answer.encoding is not None and not answer.keep_encoded:
        body = _DecodedBody(body, answer.encoding, _parse_content_length(response))
    elif _SPLICE and wanted >= _SPLICE_FROM and transfer.store.spliceable and \
            sock is not None and not _is_tls(sock) \
            and not response.chunked and body_end < _UNKNOWN_END and \
            (transfer.max_size is None or transfer.planner.total is not None):
        splice = _Splice(body, sock, transfer.store, transfer.options.settings.timeout)
        chunk = _PIPE_SIZE
    planner = transfer.planner
    max_size = transfer.max_size
    pacer: Optional[_Pacer] = None  # made at the first limited read
    got = 0                # bytes of the last read, not yet counted
    ended = False          # the body's end was read
    since = 0.0            # when the oldest byte in the buffer came
    try:
        while True:
            now = time.monotonic()
            if got:
                _count_read(transfer, conn, got, now)
                got = 0
            if planner.judging is conn:
                transfer._judge(conn, now)  # may cut its claim short
            start = conn.pos + conn.pending
            end = min(conn.end, conn.request_end, body_end)
            room = min(chunk - conn.pending, end - start)
            judging, limit = False, None
            if planner.segmented:  # (only a split file judges its probe, races)
                judging = planner.judging is conn
                limit = planner.limit  # set with judging, never unset
                if judging and limit is not None and not limit.judged:
                    # its part may be cut short at its current read's end
                    room = min(room, _JUDGE_READ)
                rate = conn.rate(now)
                if rate is not None:
                    # a slow connection reads little at a time (a
                    # twentieth of a second's worth), so that another one
                    # can take over all but its next read
                    room = min(room, max(16384, int(rate * 0.25)))
            conn.reading_to = start + max(room, 0)
            if room <= 0:
                if conn.pending:
                    _flush_buffer(transfer, conn)
                    if start < end:  # the buffer was full: read on
                        continue
                break  # at the end, which never moves further
            buckets = transfer.buckets  # (replaced whole when a limit is set)
            limited = _limited(buckets) if buckets else False
            granted = room
            if conn.pending or judging or limited:  # (none before a body's first read)
                if conn.pending and (limited or not (whole or body.ready()) or
                                     now - since >= _FLUSH_AGE):
                    # before a read that may block (but for a body that
                    # fits) or be paced (so bytes land as smoothly as they
                    # come), or when overdue
                    _flush_buffer(transfer, conn)
                    continue
                if conn.pending and whole and not limited and \
                        not (yield from body.wait_steps(since + _FLUSH_AGE)):
                    continue  # a stall: its bytes are overdue now, written at the next lap
                if judging and limit is not None and limit.due > time.monotonic() and \
                        not (yield from body.wait_steps(limit.due)):
                    continue  # no bytes until its verdict is due: judged now
                if limited:
                    if not (yield from body.wait_steps(time.monotonic() +
                                                       transfer.options.settings.timeout)):
                        # tokens are taken once bytes are there to use
                        # them: a slow socket never holds back what the
                        # others could read
                        raise socket.timeout('no data received within the time-out')
                    if pacer is None or pacer.buckets is not buckets:
                        pacer = _Pacer(buckets, transfer.cancel.is_set)
                    granted = yield from pacer.acquire_steps(room)
                    if not granted:
                        raise _Stopped
            if splice is not None:  # straight into the file
                try:
                    got = yield from splice.move_steps(start, granted, conn.epoch)
                except _SpliceRefused:
                    splice.close()
                    splice, chunk = None, len(view)
                    if pacer is not None:  # (else nothing was granted)
                        pacer.settle(0)
                    continue
                if pacer is not None:
                    pacer.settle(got)
                conn.pos += got
            else:
                # (the body's methods called, not bound first: three bound methods
                # cost a small file's one read more than a call each costs a big one's)
                got = yield from body.readinto_steps(view[conn.pending:conn.pending + granted])
                if pacer is not None:  # (else nothing was granted)
                    pacer.settle(got)
                if max_size is not None and start + got > max_size:
                    got = 0
                    raise _too_large(max_size, 'grew past it')
                conn.pending += got
            if transfer.cancel.is_set():
                raise _Stopped
            if conn.superseded:
                raise _Superseded
            if not got:
                ended = True
                break
            if start + got >= end and splice is None and not judging:
                # the read reached the end, which never moves further
                # (a small file's one read): its bytes are written and
                # counted now, with no lap more
                _flush_buffer(transfer, conn, received=got, at=time.monotonic())
                break
            if conn.pending == got:  # the buffer's first bytes (none from a splice)
                since = time.monotonic()
    except (OSError, ProtocolError) as exc:
        # (a ProtocolError: a body's framing, bitpit's since http.client's
        # IncompleteRead; its unused tokens go back all the same)
        if pacer is not None:
            pacer.settle(0)
        if transfer.cancel.is_set():
            raise _Stopped from exc
        if conn.superseded:
            raise _Superseded from exc
        raise _network_error(exc) from exc
    finally:
        if conn.pending:
            _flush_buffer(transfer, conn, quietly=True)
        if splice is not None:
            splice.close()
    position = conn.pos  # (only its own steps move it)
    if ended:
        if position < min(conn.end, conn.request_end, body_end):
            if body_end < _UNKNOWN_END:
                raise ProtocolError('connection closed after {} of {} bytes'.format(
                    position, body_end))
            transfer._set_total(position)  # the body's end is the file's end
            conn.end = position
    # reused only when read to its very end (a chunked body: its last
    # chunk too, the read of which closes the answer)
    done = position == body_end and (not response.chunked or response.isclosed())
    if done:
        response.close()
    return done


def _count_read(transfer: '_Transfer', conn: _Connection, got: int, now: float) -> None:
    """A read of ``conn`` brought ``got`` bytes at ``now``. Its steps."""
    conn.job_bytes += got
    conn.last_bytes_at = now
    transfer.received += got
    conn.source.streak = 0


def _flush_buffer(transfer: '_Transfer', conn: _Connection, quietly: bool = False,
                  received: int = 0, at: float = 0.0) -> None:
    """Write ``conn``'s buffer at ``conn.pos``. ``quietly``: on the way
    out of a failure, a write of a superseded epoch is dropped.
    ``received``: the bytes of its last read, counted (``_count_read``, read
    ``at``) with the write. The connection's steps."""
    pending = conn.pending
    try:
        transfer.store.write(conn.pos, conn.buffer[:pending], conn.epoch)
    except _Superseded:
        conn.pending = 0
        if not quietly:
            raise
        return
    except BaseException:
        conn.pending = 0  # what the write took is held; the rest is given up
        raise
    conn.pending = 0  # (before the position moves past them: see downloaded)
    conn.pos += pending
    if received:
        _count_read(transfer, conn, received, at)
    if transfer.piece_hashes is not None:
        transfer._check_pieces(conn, conn.pos - pending, conn.pos)


def _served(result: None, error: Optional[BaseException]) -> None:
    """The end of a connection's steps on the loop (``_Transfer._serve_steps``,
    whose own handlers end the attempt on any failure): an error here is a
    bug in their clean-up, said. The loop's thread."""
    if error is not None:
        _log.error('a connection ended in error', exc_info=error)


class _Transfer:
    """One attempt of a download: ask for the bytes not yet held, check each
    answer against what was asked, and write every body where it belongs,
    over up to ``connections`` connections spread over the sources.

    The first request is the probe (``Range: bytes=FIRST-``). Its answer
    says whether the file may be split: with a 206 and a known size, the
    probe's first hundredth of a second tells whether the link or the CPU
    limits it (``_LimitJudge``, in the probe's steps). Then the missing
    bytes are shared out in equal parts, fetched in ranged pieces, over
    ``connections`` connections if the link limits it; if the CPU does, the
    probe goes on alone, judged again every quarter of a second. A
    connection that finishes takes over the upper half of the largest range
    left, or, when nothing is left to split, races a far slower connection
    for the end of its range, block by block from the far end. Everything
    else (no range support, an unknown size, a file object) is the same
    engine with one connection. The probe's source is the reference: a
    change of the file there (or of a source's own validator) starts the
    file over; another source that disagrees is retired.

    The transfer coordinates: its ``_Planner`` decides which range each
    connection fetches, the pump (``_fetch_steps``) moves the bytes of each request,
    and the transfer judges the answers, starts and ends the connections
    and gives the verdict. Everything runs as steps on the loop: the
    download's run calls ``start``, ``wait_steps``, ``look``,
    ``join_steps`` and ``result``, each connection runs ``_serve_steps``,
    and none calls user code; ``stop()`` may come from any thread.

    Its state (the planner, the sources, the connections, the piece
    hashes, the events) is the loop's thread's alone, and has no lock:
    only the run's and the connections' steps read and change it. What
    comes from elsewhere changes no more than a flag, then wakes the
    loop's steps (``_wake``), which look at it:
    ``stop()`` (any thread) sets ``cancel``; a sidecar save on a worker
    clears ``saving`` (``_save``; only the run's ``look`` sets it, and
    only when clear); a host slot freed by another thread sets
    ``slot_freed`` (``_on_slot_freed``); ``add_bucket`` (any thread,
    under the download's lock) replaces ``buckets`` whole, which every
    reader reads once. The loop clears ``news`` and ``changed`` only
    before it looks at what they flag, so a flag set before its wake is
    seen by that look or by the next. (That holds by the GIL: the loop
    sees another thread's writes in the order they were made, and a
    flag, a tuple or a reference written whole; the look after a clear
    of ``work`` reads ``cancel`` again, ``_race_wait``.) A big file is
    opened, and the pieces it held before read (a bad one's bytes
    forgotten in the store), by a worker that the probe's steps wait
    for (``_prepare``), which changes nothing else of the transfer's
    but their ``_Setup``; the probe's steps apply what it found.
    ``downloaded`` (any thread) only reads. ``_wake`` sets ``news``,
    which the run waits for (``_report`` sets it alone, for an event),
    and ``work``, which a connection that waits for work waits for."""

    # more than 30 attributes: without slots, each transfer would make a dict
    # of its own (CPython shares the class's keys up to 30), 1.6 % of a small
    # file's instructions; a weak reference tells that it is freed at its end
    __slots__ = ('__weakref__', 'news', 'saving', 'store', 'options',
                 'sources', 'chunk_size', 'buckets', 'checksum', 'max_size', 'min_speed',
                 'rename_in', 'gzip_name', 'conditions', 'unchanged', 'file_dates',
                 'cancel', 'probed', 'prober', 'reference', 'ranged', 'ranges_work',
                 'changes', 'received', 'connections', 'planner',
                 'opened', 'events', 'work', 'slot_freed', 'complete',
                 'error', '_shown', '_next_look', '_next_save', '_samples',
                 'verify_digest', 'digests', 'expected_size', 'piece_hashes', 'changed')

    def __init__(self, store: _FileStore, addresses: List[_Address], options: _RequestOptions,
                 connections: int, chunk_size: int, buckets: Tuple[_TokenBucket, ...],
                 checksum: Optional[Tuple[str, str]], max_size: Optional[int],
                 min_speed: float, rename_in: Optional[pathlib.Path], gzip_name: bool,
                 conditions: Optional[Dict[str, str]] = None, verify_digest: bool = False,
                 expected_size: Optional[int] = None,
                 piece_hashes: Optional[Tuple[str, int, List[str]]] = None):
        self.news = _Flag()           # set by _wake() and _report(): something to do or to report
        self.changed = False          # set by _wake() but for events: something to do
        # a sidecar save handed to a worker runs: set by the run, cleared by
        # the save before it wakes the run (not its task's end, which may
        # come after that wake-up)
        self.saving = False
        self.store = store
        self.options = options
        self.sources = [_Source(address, store.validators.get(address.url))
                        for address in addresses]
        self.chunk_size = chunk_size
        # the download's own first, if it has a limit; replaced whole
        # (add_bucket) when one is set during the attempt
        self.buckets = buckets
        self.checksum = checksum
        self.max_size = max_size
        self.min_speed = min_speed
        self.rename_in = rename_in
        self.gzip_name = gzip_name          # the target's name ends in .gz or .tgz
        self.conditions = conditions        # If-None-Match/-Modified-Since of the probe
        self.unchanged = False              # the probe's answer was 304 Not Modified
        self.file_dates: Tuple[Optional[str], Optional[str]] = (None, None)  # ETag, date
        self.cancel = _Cancel()
        self.probed = False           # the first answer is in
        self.prober: Optional[_Connection] = None  # the connection probing now
        self.reference: Optional[_Source] = None   # the source the probe's answer came from
        self.ranged = True            # ranges may be asked for (not for an encoded body)
        self.ranges_work = False      # a source answered a range with its part
        self.changes = 0
        self.received = 0             # bytes received by every connection
        self.connections: List[_Connection] = []   # the live ones
        self.planner = _Planner(store, self.connections, connections, buckets)
        # set by _wake() for the connections that wait for work (a race due)
        self.work: Optional[_Flag] = None
        self.opened = 0               # connections opened
        self.events: List[Tuple[str, Any]] = []
        self.slot_freed = False       # a host slot freed since the last look for one
        self.complete = False
        self.error: Optional[BaseException] = None
        # the most bytes ``downloaded`` said, and of which epoch of the
        # store (none yet): a start over's new epoch starts from nothing
        self._shown: Tuple[int, int] = (-1, 0)
        # nothing to look at before a period has passed (a small file is
        # done by then), and no sidecar to save before a save's period:
        # its fsync would hold up the first bytes of a big file on a disk
        began = time.monotonic()
        self._next_look = began + _TEND_PERIOD
        self._next_save = began + _SIDECAR_PERIOD
        # (time, bytes received) of the last ``timeout`` seconds, for a min_speed
        self._samples: 'Optional[collections.deque[Tuple[float, int]]]' = \
            collections.deque() if min_speed else None
        self.verify_digest = verify_digest
        # the probe's answer's, to check (no list made while there are none)
        self.digests: Sequence[Tuple[str, str, bytes]] = ()
        self.expected_size = expected_size  # the size every source must have (a metalink's)
        # a metalink's piece hashes, checked as pieces land (in a file path only)
        self.piece_hashes: Optional[_PieceHashes] = None
        if piece_hashes and store.is_path:
            self.piece_hashes = _PieceHashes(*piece_hashes)
            store.read_back = True

    # -- the run's side ------------------------------------------------------------

    def start(self) -> None:
        """Start the probe's connection, on the loop, with its claim (its
        steps then ask for none). The run's steps, once, before any
        connection runs."""
        self._spawn(probe=not self.cancel.is_set())  # (else it ends at once)

    def wait_steps(self, until: float) -> '_Steps[bool]':
        """Wait until ``until`` for something to report or to do, and do
        it (``_keep_going``): not after a wake for events alone (a small
        file's size and start), which only the run's ``take_events`` takes,
        nor once finished. They give whether it is finished (a property
        that a small file's run would ask again). The run's steps."""
        news = self.news
        news.clear()  # (before the look: a change after it sets it again)
        if not self.events and not self.slot_freed and not self.finished:
            yield _Wait(None, until, False, news)  # (news: by position, no keyword's dict)
        finished = self.finished
        if (self.changed or not self.events) and not finished:
            self.changed = False
            self._keep_going()  # (nothing to do once it finished meanwhile)
            finished = self.finished
        return finished

    def take_events(self) -> List[Tuple[str, Any]]:
        """The events since the last call: ``('size', total)``, ``('path',
        target)``, ``('download', None)``, ``('restart', None)``. The run's
        steps, on the loop, which alone reports them too."""
        if not self.events:
            return []
        events, self.events = self.events, []
        return events

    @property
    def finished(self) -> bool:
        """Complete, failed or stopped, and no connection left."""
        return not self.connections and \
            (self.complete or self.error is not None or self.cancel.is_set())

    @property
    def downloaded(self) -> int:
        """Bytes held, including the ones still in connection buffers but
        for those held already (a racer's, when the one it raced wrote
        them first); it only grows (but for a start over). Any thread:
        the bytes held are those of the ranges published (``snapshot``),
        not ``held.total``, which a write counts before it publishes them
        while they are still in its connection's buffer (counted twice,
        by a reader in between). The most said is of the store's epoch
        read first: once a start over begins a new one, no read shows
        the old version's bytes (the most said, replaced whole, is
        another epoch's), even one found or kept by a read it came
        in the middle of."""
        epoch = self.store.epoch
        held = self.store.snapshot
        shown = 0
        for first, end in held:
            shown += end - first
        for c in list(self.connections):
            # (the position first: one found moved past a buffer's bytes is
            # found with the buffer cleared, which _flush_buffer does first)
            start, pending = c.pos, c.pending
            if pending and c.epoch == epoch:  # (else a version's that a start over dropped)
                shown += pending - sum(max(0, min(end, start + pending) - max(first, start))
                                       for first, end in held)
        total = self.planner.total
        if total is not None:  # two buffers may hold the same bytes of a race
            shown = min(shown, total)
        said_epoch, most = self._shown
        if said_epoch == epoch and most >= shown:
            return most
        self._shown = (epoch, shown)
        return shown

    def look(self, now: float) -> None:
        """Regular bookkeeping: ``min_speed``, more connections where they
        would help (a race), the sidecar. The run's steps, about four times
        a second."""
        if now < self._next_look:
            return
        self._next_look = now + _TEND_PERIOD
        self._check_min_speed(now)
        self._keep_going()
        if now >= self._next_save:
            self._next_save = now + _SIDECAR_PERIOD
            if not self.saving and self.store.unsaved():
                # the save's fsync of the bytes it records (long on a disk,
                # for a big file) must not hold up the loop
                self.saving = True
                _run_or_here(self._save, 'bitpit-save')

    def _save(self) -> None:
        """Save the sidecar, then wake the run (that waits for it to close
        the file). A worker."""
        try:
            self.store.save()
        finally:
            self.saving = False  # (before the wake, which join_steps looks after)
            self._wake()

    def _check_min_speed(self, now: float) -> None:
        """Fail the attempt (``StalledError``) when it received less than
        ``min_speed`` bytes per second over the last ``timeout`` seconds;
        never once every byte is held (its last ones may have landed since
        the transfer was last looked at)."""
        if not self.min_speed or self.complete or self._is_complete():
            return
        window = self.options.settings.timeout
        samples = self._samples
        assert samples is not None  # made with a min_speed
        samples.append((now, self.received))
        while len(samples) > 1 and samples[1][0] <= now - window:
            samples.popleft()
        since, received = samples[0]
        if now - since >= window and (self.received - received) / (now - since) < self.min_speed:
            self._end(StalledError('slower than {} bytes/s for {} s'.format(
                self.min_speed, window)))

    def add_bucket(self, bucket: _TokenBucket) -> None:
        """Draw from ``bucket`` too, before the others (a download's own
        limit, set during the attempt): every connection's next read does.
        Any thread, under the download's lock (so one at a time): the
        tuples are replaced whole, and each reader reads one once."""
        self.buckets = self.planner.buckets = (bucket,) + self.buckets

    def stop(self) -> None:
        """End every connection now: its request, a pause and a wait for
        tokens end at the cancel, and the run and the connections that
        wait for work wake to find it (``_wake``). Any thread."""
        self.cancel.cancel()
        for bucket in self.buckets:
            bucket.wake()
        self._wake()

    def result(self) -> None:
        """Once finished: return if every byte is held (after the checksum
        check), or raise the attempt's error (``_Stopped`` for a stop). The
        run's steps, after ``join_steps`` (no connection and no save is
        left to touch the file it closes)."""
        # the store's finish takes no lock on that ground alone: held here
        assert not self.connections and not self.saving, 'a result before join_steps'
        store = self.store
        try:
            if self.error is not None or not self.complete:
                store.save()  # what it holds, for the next attempt
                raise self.error if self.error is not None else _Stopped()
            if not self.unchanged:
                etag, date = self.file_dates
                store.finish(self.checksum, _parse_http_date(date), etag, self.digests)
        finally:
            store.close()

    def join_steps(self) -> '_Steps[None]':
        """Wait until no connection is left (after a stop, each ends at
        once) and no sidecar save runs: the file is closed after them. The
        run's steps."""
        news = self.news
        while self.connections or self.saving:
            news.clear()
            if self.connections or self.saving:
                yield _Wait(None, time.monotonic() + _TEND_PERIOD, False, news)  # (by position)

    # -- decisions, on the loop --------------------------------------------------------

    def _keep_going(self) -> None:
        """After a change: more connections where there is work for them; the
        verdict when no connection is left and the file is incomplete.
        The run's steps."""
        self.slot_freed = False
        if self.complete or self.error is not None or self.cancel.is_set():
            return
        live = len(self.connections)
        if not self.probed:
            if not live:
                self._spawn(probe=True)
            return
        if self._is_complete():
            self._complete(None)
            return
        planner = self.planner
        wanted = planner.connections_wanted if planner.segmented and planner.judging is None \
            else 1
        while live < wanted and planner.has_work():
            if not self._spawn():
                break
            live += 1
        if not live:
            self._end(self._verdict())

    def _spawn(self, claim: Optional[Tuple[int, int]] = None, probe: bool = False) -> bool:
        """Start a connection on the loop (with ``claim`` to fetch, or
        ``probe``: the probe's claim, else it asks for a range). The
        loop's thread."""
        conn = self._add_connection(claim, probe)
        if conn is None:
            return False
        try:
            _LOOP.spawn(self._serve_steps(conn), _served)
        except BaseException:  # no thread to drive it (the interpreter's end)
            self.connections.remove(conn)
            raise
        return True

    def _add_connection(self, claim: Optional[Tuple[int, int]] = None, probe: bool = False
                        ) -> Optional[_Connection]:
        """A new live connection (with ``claim`` to fetch, or ``probe``: the
        probe's, when no connection probes yet), its source the
        next usable one in turn; ``None`` when none is usable, or when the
        manager's cap on a host allows no more now."""
        usable = [s for s in self.sources if s.usable]
        if not usable:
            return None
        number = self.opened
        self.opened += 1
        source = usable[number % len(usable)]
        slots = self.options.slots
        if slots is not None and self.connections and \
                not slots.spare(source.address.host_key, self._on_slot_freed):
            self.opened -= 1
            return None  # one more connection would pass the manager's cap: later
        conn = _Connection(number, source, self.chunk_size)
        if claim is not None:
            self.planner.claim(conn, *claim)
        elif probe and self.prober is None:
            self._claim_probe(conn)
        self.connections.append(conn)
        return conn

    def _on_slot_freed(self) -> None:
        """A host slot this transfer wanted freed: look again for work for
        one more connection. Called by ``_HostSlots`` from the thread that
        closed a connection, any: a flag, then the wake (see the class)."""
        self.slot_freed = True
        self._wake()

    def _wake(self) -> None:
        """Wake the run, with something to do besides taking events
        (``changed``; an event alone sets ``news``, ``_report``), and the
        connections that wait for work. Any thread: what another changes
        it changes before (see the class)."""
        self.changed = True
        self.news.set()
        work = self.work
        if work is not None:
            work.set()

    def _end(self, error: BaseException) -> None:
        """The attempt fails with ``error``: stop the other connections."""
        if self.error is None:
            self.error = error
        self.stop()

    def _verdict(self) -> Error:
        """Why the file cannot be completed from any source: the error of
        the first source that failed permanently when all did, else the
        last transient one."""
        errors = [s.retired for s in self.sources if s.retired is not None]
        if len(errors) == len(self.sources) and all(not e.retryable for e in errors):
            return errors[0]
        transient = [s.last_error for s in self.sources if s.last_error is not None
                     and s.last_error.retryable]
        if transient:
            return transient[-1]
        return errors[-1] if errors else ProtocolError('the download stopped short')

    def _next_for(self, conn: _Connection) -> Optional[_Wait]:
        """``conn`` holds no claim (its steps call it only then): claim its
        next range, if there is one (``conn.active`` tells), else give the
        wait after which to ask again (``_race_wait``), else it leaves
        (``conn.gone``) in this look. A plain call, not steps: most
        answers need no wait. Its steps, on the loop."""
        # (again after a wait: a connection with no claim is never
        # superseded meanwhile)
        conn.superseded = False
        wait = None
        if not (self.complete or self.error is not None or self.cancel.is_set()):
            if self.probed and self._is_complete():
                self._complete(conn)
            elif conn.source.usable:
                if not self.probed:
                    if self.prober is None:
                        self._claim_probe(conn)
                elif self.planner.choose(conn):
                    if self.piece_hashes is not None:
                        self._avoid_bad_source(conn, conn.pos)
                else:
                    wait = self._race_wait(conn)
        if wait is None and not conn.active:
            self._leave(conn)
        return wait

    def _race_wait(self, conn: _Connection) -> Optional[_Wait]:
        """Nothing to claim for ``conn`` now, but a request too young to
        tell whether it is far slower may be worth racing in a moment: the
        wait for it (and for ``work``, set at any change), else ``None``.
        The loop's thread."""
        due = self.planner.rate_due(conn)
        if due is None:
            return None
        work = self.work
        if work is None:
            work = self.work = _Flag()
        else:
            work.clear()
        if self.cancel.is_set():  # a stop's wake came before the clear: no wait
            return None
        return _Wait(None, due + 0.001, False, work)  # (by position)

    def _claim_probe(self, conn: _Connection) -> None:
        """``conn`` probes: it claims the first gap, to the file's end."""
        self.prober = conn
        start, end = self.planner.first_gap()
        # (by position: with the * of the gap, a keyword would build a dict)
        self.planner.claim(conn, start, end, True)   # open_ended

    def _is_complete(self) -> bool:
        """Every byte is held (a read still under way only brings them
        again) and, with piece hashes, every piece passed its check (a bad
        one is fetched again; one just written is checked after its write),
        or the server said the file is unchanged."""
        if self.unchanged:
            return not any(c.active for c in self.connections)
        pieces = self.piece_hashes
        total = self.planner.total
        return total is not None and self.store.held.total >= total and \
            (pieces is None or len(pieces.good) >= len(pieces.digests))

    def _complete(self, caller: Optional[_Connection]) -> None:
        """The file is whole: end the connections still at work (a slow
        read that a race overtook, a pause before asking a source again)
        but ``caller``'s, the connection whose steps call it (if any), and
        the attempt with them."""
        self.complete = True
        if len(self.connections) > (caller is not None):  # (the caller is one of them)
            self.stop()
        elif caller is None:
            self._wake()
        # (else the caller's connection, the last one, wakes the run as it ends)

    # -- a connection's steps ----------------------------------------------------------

    def _serve_steps(self, conn: _Connection) -> '_Steps[None]':
        """A connection's steps, on the loop: fetch ranges until there is
        none left."""
        try:
            while not conn.gone:
                if not conn.active:  # (else the rest of its claim)
                    wait = self._next_for(conn)
                else:
                    try:
                        # (its claim done, it looks for the next in its last look)
                        wait = yield from _fetch_steps(self, conn)
                    except _Superseded:
                        conn.active = False
                        continue
                    except _Stopped:
                        if not self.cancel.is_set():  # a sealed file: nothing more to do
                            self._end(_Stopped())
                        break
                    except Error as error:
                        pause = self._failed(conn, error)
                        if pause is None:
                            break
                        if pause:  # ended at once by a stop, a failure or completion
                            yield self.cancel.pause(time.monotonic() + pause)
                        continue
                if wait is not None:
                    yield wait
        except Exception as exc:  # a bug: end the attempt, never die silently
            self._end(exc if isinstance(exc, Error) else _unexpected(exc))
        finally:
            if not conn.gone:
                self._leave(conn)

    def _leave(self, conn: _Connection) -> None:
        """``conn`` ends: it is no longer live, and the run looks. Its
        steps."""
        conn.active = False
        conn.gone = True
        if self.prober is conn:
            self.prober = None
        if self.planner.judging is conn:  # it ends unjudged: the others may start
            self.planner.judging = None
        self.connections.remove(conn)
        conn.buffer = memoryview(b'')
        self._wake()

    # -- the answers: what each says about the file, asked by the pump ----------------

    def _accept(self, conn: _Connection, answer: _Answer, response: _Response,
                request: _Request) -> Tuple[Optional[int], Optional[_Setup]]:
        """Judge ``answer`` for ``conn``'s claim and plan its body. Returns
        where the body ends (``_UNKNOWN_END`` when only its end tells;
        ``None`` when it brings nothing to write) and, for the probe's
        answer, what the file needs. Raises the error that fails the
        request; ``_Superseded`` when the file starts over."""
        source = conn.source
        asked = conn.pos
        if conn.superseded or conn.epoch != self.store.epoch:
            raise _Superseded
        if answer.kind == 'unchanged':
            if self.probed or not self.conditions:
                raise ProtocolError('304 Not Modified to a request that set no condition')
            self.probed, self.unchanged = True, True
            conn.end = conn.pos
            return None, None
        if answer.encoding is not None:
            self._decoding(conn, answer, response, request.url)
        known = self.planner.total
        if self.expected_size is not None and answer.total is not None and \
                answer.total != self.expected_size:
            error = ProtocolError('{} has {} bytes, not the {} the metalink says'.format(
                source.url, answer.total, self.expected_size))
            error.retryable = False
            raise error
        if answer.kind == 'end':
            return self._accept_end(conn, answer)
        if answer.validator is not None and answer.validator == source.stale:
            raise ProtocolError('{} still serves the version the download started '
                                'from'.format(source.url))
        change = answer.change_from(source.validator, known)
        if answer.kind == 'whole' and asked > 0:
            if change:
                self._change(conn, change, answer)
            elif any(s.usable for s in self.sources if s is not source):
                raise ProtocolError('{} ignores Range'.format(source.url))
            else:
                self.ranges_work = False  # not any more: the whole body goes on alone
                self._start_over(conn, 'the server ignores Range', answer)
        elif change:
            self._change(conn, change, None)
            raise _Superseded
        if answer.total is not None and self.max_size is not None and \
                answer.total > self.max_size:
            raise _too_large(self.max_size, 'announces {} bytes'.format(answer.total))
        self._learn(source, answer)
        if answer.kind == 'part':
            self.ranges_work = True
            if answer.first < conn.pos:
                conn.pos = conn.reading_to = answer.first  # rewrite the overlap
        if not self.probed and self.verify_digest and (
                request.redirects or not _DIGEST_FIELDS.isdisjoint(response.by_name)):
            # (most answers have no field to read and came by no redirect: no call)
            self._take_server_word(answer, response, request)
        setup = None if self.probed else self._plan(conn, answer, response)
        return (answer.end if answer.end is not None else _UNKNOWN_END), setup

    def _accept_end(self, conn: _Connection, answer: _Answer
                    ) -> Tuple[Optional[int], Optional[_Setup]]:
        """A 416: nothing at or after the offset asked for. The end of the
        file when the offset is its size; another file when the size it
        tells differs; a broken answer otherwise."""
        asked, known, total = conn.pos, self.planner.total, answer.total
        if total is None:
            if known is None and self.probed:
                total = asked  # asked for more of a file of unknown size: its end
            elif known is None or asked < known:
                raise ProtocolError('416 without the size of the file')
            else:
                total = known
        change = answer.change_from(conn.source.validator, known)
        if not change and total < asked:
            change = 'it has {} bytes, fewer than the {} held'.format(total, asked)
        if change:
            self._change(conn, change, None)
            raise _Superseded
        if asked < total:
            raise ProtocolError('416 for bytes {}- of a file of {} bytes'.format(asked, total))
        self._learn(conn.source, answer)
        if self.planner.total is None:
            self._set_total(total)
        conn.end = conn.pos
        if self.probed:
            return None, None
        self.probed = True
        self.reference = conn.source
        # an empty file still has to exist
        return None, _Setup(None, False) if total == 0 and not self.store.held.total else None

    def _change(self, conn: _Connection, why: str, answer: Optional[_Answer]) -> None:
        """``conn``'s source says the file is not the one the bytes held come
        from. From the source the file was probed on, or from the only
        source left, the file changed: start over. From another source while
        others are left, that source has another file (perhaps a newer one
        that the others will serve too, and then say so): it is retired."""
        source = conn.source
        if self.probed and source is not self.reference and \
                any(s.usable for s in self.sources if s is not source):
            raise ProtocolError('{} has another file: {}'.format(source.url, why))
        self._start_over(conn, why, answer)

    def _decoding(self, conn: _Connection, answer: _Answer,
                  response: _Response, url: str) -> None:
        """An encoded body (a server that compresses although asked not to):
        its bytes are decoded while streaming, unless the encoded bytes are
        what was asked for (a ``.gz`` name, a gzip type). Decoded, it has
        no size until its end and no usable ranges: a range of it starts
        the file over."""
        gzip_type = (response.getheader('Content-Type') or '').split(';')[0].strip().lower()
        if answer.encoding in ('gzip', 'x-gzip') and (self.gzip_name or
                                                      gzip_type in _GZIP_TYPES):
            answer.keep_encoded = True
            return
        if answer.encoding not in _DECODABLE:
            error = ProtocolError('{} answered with Content-Encoding {}, which bitpit '
                                  'cannot decode'.format(url, answer.encoding))
            error.retryable = False
            raise error
        self.ranged = False
        if answer.kind == 'part':
            self._start_over(conn, 'the server encodes the body ({})'.format(
                answer.encoding), None)
            raise _Superseded
        answer.end = answer.total = None

    def _take_server_word(self, answer: _Answer, response: _Response,
                          request: _Request) -> None:
        """The probe's answer: the digests it gives, to check when the file
        is complete (none for a body decoded on the way: they digest the
        bytes sent), else the ``Digest`` of the last redirect that led to
        it and gives one (as mirror redirectors send it); and the
        duplicates that the answer giving the digest names become sources
        too. Asked by ``_accept`` only for an answer that has a digest
        field or came by a redirect (none are kept from before: a start
        over forgets them). A connection's steps."""
        if answer.encoding is not None and not answer.keep_encoded:
            return
        whole = answer.kind == 'whole' or (answer.kind == 'part' and answer.first == 0 and
                                           answer.total is not None and
                                           answer.end == answer.total)
        fields = ('Repr-Digest', 'Content-Digest', 'Digest') if whole else \
            ('Repr-Digest', 'Digest')
        answers = [(request.url, response, fields)] + \
            [(url, redirect, ('Digest',)) for url, redirect in reversed(request.redirects)]
        for url, said, names in answers:
            self.digests = _server_digests(said, names)
            if self.digests:
                break
        else:
            return
        known = {source.url for source in self.sources}
        for duplicate in _duplicates(said, url):
            if duplicate.url not in known:
                _log.info('%s: %s serves it too', self.options.url, duplicate.url)
                self.sources.append(_Source(duplicate, self.store.validators.get(duplicate.url)))
                known.add(duplicate.url)

    def _learn(self, source: _Source, answer: _Answer) -> None:
        """Remember the source's validator (a partial answer without one
        keeps the old)."""
        if answer.validator is not None or answer.kind == 'whole':
            source.validator = answer.validator
            self.store.validators[source.url] = answer.validator

    def _plan(self, conn: _Connection, answer: _Answer, response: _Response
              ) -> _Setup:
        """The probe's answer is in: the file's size and name, and whether it
        comes in parts (and the pieces held before to check). Opening,
        reserving and sharing out are ``_prepare``'s and
        ``_body_starts``'s."""
        self.probed = True
        self.reference = conn.source
        self.file_dates = (answer.etag, answer.last_modified)
        rename_in = self.rename_in
        if rename_in is not None and self.store.held.total:
            rename_in = None  # (before the size is set): a file begun before keeps its name
        if answer.kind == 'whole' or answer.total is not None:
            self._set_total(answer.total)
        if rename_in is not None and self.store.os_path is not None:
            name = _filename_from_disposition(response.getheader('Content-Disposition'))
            if name and name != os.path.basename(self.store.os_path):
                if (rename_in / name).exists():
                    _log.info('%s: not naming it %s: that file exists', conn.source.url, name)
                else:
                    self.store.rename(rename_in / name)
                    self._report('path', self.store.target)
        total = self.planner.total
        # a whole answer splits too where ranges worked before: the new
        # version of a file that changed under a split transfer
        segmented = (self.planner.connections_wanted > 1 and
                     (answer.kind == 'part' or self.ranges_work) and
                     total is not None and self.store.regular_target() and
                     self.ranged and self.planner.missing() >= 2 * _MIN_SPLIT)
        setup = _Setup(total, segmented)
        if self.piece_hashes is not None and total is not None:
            # those held before, looked for in the ranges held alone: a big
            # file's pieces may be 200,000 (0.2 s of the loop's time to look
            # at each), a new file holds none
            held = self.store.snapshot
            if held:
                setup.pieces = self._pieces_due(None, held)
        return setup

    def _prepare(self, setup: _Setup) -> None:
        """Open the file, check the pieces it held before (``setup.pieces``:
        their verdicts, which the probe's steps apply, in
        ``setup.verdicts``), reserve its room, and tell whether its rest
        may be shared out (``setup.segmented``; ``_body_starts`` shares
        it): the probe's connection's steps, or a worker they wait for.
        It changes the store (which has a lock of its own: it opens the
        file, forgets a bad piece's bytes, reserves its room) and
        ``setup``, and nothing else of the transfer's (the rest is the
        loop's)."""
        self.store.open(self.checksum[0] if self.checksum else None, self.cancel.is_set)
        if setup.pieces:
            setup.verdicts = self._read_pieces(setup.pieces)
        if setup.reserve is not None:
            # a body of one read needs no sidecar: only the room is checked
            self.store.reserve(setup.reserve, allocate=setup.reserve -
                               self.store.held.total > self.chunk_size)
        # parts are written out of order: only with a sidecar to record them
        setup.segmented = setup.segmented and self.store.record()

    def _body_starts(self, conn: _Connection, setup: _Setup) -> None:
        """The probe's body starts, its file prepared (``_prepare``): the
        run is told ('download'), and the rest is shared out where the
        file comes in parts. The probe's steps, before its body's first
        read (the pump's first look finds its claim as the share-out left
        it)."""
        self._report('download', None)
        if setup.segmented and not conn.superseded and self.planner.split(conn, self.received):
            self._share_out(conn)

    def _judge(self, probe: _Connection, now: float) -> None:
        """Share the file out once the probe's reads show that the link
        limits it (``_Planner.judge``). The probe's steps, between two
        reads."""
        if self.planner.judge(probe, now, self.received):
            _log.debug('%s: the link limits one connection; sharing out', self.options.url)
            self._share_out(probe)

    def _share_out(self, probe: _Connection) -> None:
        """Start a connection on each part of the file that
        ``_Planner.share_out`` gives, while the host's slots allow. The
        probe's steps."""
        for claim in self.planner.share_out(probe):
            if not self._spawn(claim):
                return

    def _report(self, kind: str, value: Any) -> None:
        """An event for the run, which is woken for the first one it has not
        taken yet: it takes them all at once (``wait_steps`` finds them
        after it clears ``news``), so a small file's size and start cost
        one wake, and nothing more to do. Only the run is woken (``news``,
        not ``_wake``): an event gives a connection that waits for work
        none to do. A connection's steps, on the loop."""
        events = self.events
        events.append((kind, value))
        if len(events) == 1:
            self.news.set()

    def _set_total(self, total: Optional[int]) -> None:
        self.planner.set_total(total)
        if total is not None:
            self.store.set_size(total)
        self._report('size', -1 if total is None else total)

    def _start_over(self, conn: _Connection, why: str, answer: Optional[_Answer]) -> None:
        """The file changed (or its bytes cannot be ranged): empty it and
        start again from byte 0 in this attempt, with ``answer``'s body if
        it is the whole new file. Other connections drop their claims."""
        self.changes += 1
        if self.changes > _MAX_CHANGES:
            raise ProtocolError('the file keeps changing on the server: {}'.format(why))
        _log.info('%s: %s; starting over', conn.source.url, why)
        for source in self.sources:
            if source is not conn.source:
                source.stale, source.validator = source.validator, None
        conn.source.validator = answer.validator if answer is not None else None
        self.store.restart_from_zero()
        self.store.validators = {conn.source.url: conn.source.validator}
        self.planner.start_over()
        self.probed = False
        self.reference = None
        self.digests = ()  # the old version's: the new probe's answer gives its own
        for other in self.connections:
            if other is not conn and other.active:
                other.superseded = True
                other.end = other.reading_to
                if other.request is not None:
                    other.request.abort()
        self._report('restart', None)
        conn.epoch = self.store.epoch
        conn.pos = conn.reading_to = 0
        conn.end = conn.request_end = _UNKNOWN_END
        conn.open_ended = True  # its body, if it brought the new file, is the probe's
        self.prober = conn if answer is not None else None

    def _failed(self, conn: _Connection, error: Error) -> Optional[float]:
        """A request of ``conn`` failed: retire or bench its source, and say
        whether ``conn`` goes on (with another source, or the same one after
        a pause: the seconds it waits first) or ends (``None``)."""
        conn.active = False
        self._wake()  # its claim is free: a connection waiting for work looks
        if self.prober is conn:
            self.prober = None
        if self.error is not None or self.cancel.is_set():
            return None
        if self.probed and self._is_complete():  # others fetched its part
            self._complete(conn)
            return None
        source = conn.source
        source.last_error = error
        conn.last_end = conn.pos
        if isinstance(error, (FileError, IntegrityError)) and \
                not isinstance(error, _BadPieces):
            self._end(error)
            return None
        if self.planner.segmented and _is_refusal(error) and conn.job_bytes == 0 and \
                any(c is not conn and c.source is source and c.answered
                    for c in self.connections):
            # refused while other connections get bytes from the same
            # source: it allows fewer. One connection less; the others
            # take its range
            planner = self.planner
            planner.connections_wanted = max(1, planner.connections_wanted - 1)
            _log.info('%s: %s refused one more connection (%s); using at most %d',
                      self.options.url, source.url, error, planner.connections_wanted)
            return None
        several = len(self.sources) > 1
        # an answer that breaks the protocol retires its source when there
        # are others; a body cut short is a transient failure
        violation = isinstance(error, ProtocolError) and not conn.answered
        if not error.retryable or (several and violation):
            if several:
                _log.warning('%s: not using %s any more: %s', self.options.url,
                             source.url, error)
            source.retired = error
        elif conn.job_bytes == 0:
            source.streak += 1
        others = [s for s in self.sources if s is not source and s.usable]
        if others:
            conn.source = others[0]
            return 0.0  # over to another source at once
        if self.planner.segmented and source.usable:
            # its range again, from the same source: after a moment, if
            # that source gave nothing (told now: the others' bytes reset
            # its streak)
            return 0.0 if conn.job_bytes else min(_RETRY_PAUSE * source.streak, 1.0)
        if not source.usable or not any(c is not conn for c in self.connections):
            self._end(error if source.usable or not several else self._verdict())
        return None

    # -- piece hashes ------------------------------------------------------------------

    def _check_pieces(self, conn: Optional[_Connection], start: int, end: int) -> None:
        """``conn`` wrote ``[start, end)`` (``None``: they were held before):
        check each piece that is now held whole against its hash, reading
        it from the disk. A wrong piece is no longer held, so it is fetched
        again (from another source, ``_avoid_bad_source``); the source that
        wrote most of it is retired at its ``_MAX_BAD_PIECES``-th
        (``_BadPieces``, raised in its own connection's steps). A
        connection's steps, on the loop, which reads the pieces there."""
        due = self._pieces_due(conn, ((start, end),))
        if due:
            verdicts: Sequence[bool] = ()
            try:
                verdicts = self._read_pieces(due)
            finally:
                self._pieces_checked(conn, due, verdicts)

    def _pieces_due(self, conn: Optional[_Connection], spans: Sequence[Tuple[int, int]]
                    ) -> List[Tuple[int, int, int]]:
        """``conn`` wrote the ``[start, end)`` of ``spans`` (``None``: they
        were held before): the pieces now held whole and not checked yet,
        each as its index, first byte and end, marked as being checked.
        The ranges held are made once for all the spans (a file held
        before may hold many). The loop's thread."""
        pieces = self.piece_hashes
        assert pieces is not None  # called only with piece hashes
        total = self.planner.total
        found: List[Tuple[int, int, int]] = []
        if total is None:
            return found
        held = None
        for start, end in spans:
            if end <= start:
                continue
            if held is None:
                if pieces.epoch != self.store.epoch:  # the file started over
                    pieces.forget(self.store.epoch)
                held = _Ranges(self.store.snapshot)
            if conn is not None:
                pieces.wrote(conn.source, start, end)
            found += [(index,) + pieces.span(index, total)
                      for index in pieces.due(held, start, end, total)]
        return found

    def _read_pieces(self, due: Sequence[Tuple[int, int, int]]) -> List[bool]:
        """Whether each piece of ``due`` matches its hash, read from the
        disk; a bad one's bytes are no longer held, at once
        (``_FileStore.forget``, which syncs the file and saves its
        sidecar: disk work, which a big file's opening leaves to the
        worker that reads the pieces it held before, not to the loop).
        Any thread: it reads the hashes, which never change, and changes
        only the store, which has a lock of its own."""
        pieces = self.piece_hashes
        assert pieces is not None  # called only with piece hashes
        verdicts = []
        for index, first, last in due:
            good = self.store.piece_matches(first, last, pieces.algorithm,
                                            pieces.digests[index], self.cancel.is_set)
            if not good:
                self.store.forget(first, last)
            verdicts.append(good)
        return verdicts

    def _pieces_checked(self, conn: Optional[_Connection], due: Sequence[Tuple[int, int, int]],
                        verdicts: Sequence[bool]) -> None:
        """The pieces of ``due`` are checked no longer, each good or not
        as ``verdicts`` says (none, when the reads failed: checked again
        at the next write near them; a bad one read before the failure is
        fetched again, its bytes forgotten). The loop's thread."""
        pieces = self.piece_hashes
        assert pieces is not None  # called only with piece hashes
        pieces.checking.difference_update(index for index, _, _ in due)
        retired = None
        for (index, first, last), good in zip(due, verdicts):
            if good:
                pieces.good.add(index)
                pieces.writers.pop(index, None)
            elif self._bad_piece(conn, index, first, last):
                assert conn is not None  # its own source was retired
                retired = conn.source.retired
        if retired is not None:
            raise retired  # the connection goes on with another source

    def _bad_piece(self, conn: Optional[_Connection], index: int, first: int, last: int
                   ) -> bool:
        """Piece ``index`` (bytes ``first`` to ``last``) failed its hash
        (its bytes forgotten as it was read, ``_read_pieces``); whether
        that retired ``conn``'s own source. The loop's thread."""
        pieces = self.piece_hashes
        assert pieces is not None
        source = pieces.culprit(index)
        _log.warning('%s: piece %d (bytes %d-%d) does not match its %s hash (%s); fetching it '
                     'again', self.options.url, index, first, last - 1, pieces.algorithm,
                     'from {}'.format(source.url) if source is not None else
                     'held before, or from several sources')
        if source is None:
            return False
        pieces.bad_from[index] = source
        source.bad_pieces += 1
        if source.bad_pieces < _MAX_BAD_PIECES or source.retired is not None:
            return False
        source.retired = _BadPieces('{} sent {} pieces that do not match their hashes'.format(
            source.url, source.bad_pieces))
        if conn is not None and conn.source is source:
            return True  # its connection's steps retire it (and say so)
        _log.warning('%s: not using %s any more: %s', self.options.url, source.url,
                     source.retired)
        for other in self.connections:
            if other.source is source and other.request is not None:
                other.request.abort()  # its bytes are not wanted any more
        return False

    def _avoid_bad_source(self, conn: _Connection, start: int) -> None:
        """A claim from ``start`` goes to another source than the one that
        sent that piece wrong, if there is one. The loop's thread."""
        pieces = self.piece_hashes
        if pieces is not None and pieces.bad_from.get(start // pieces.length) is conn.source:
            others = [s for s in self.sources if s.usable and s is not conn.source]
            if others:
                conn.source = others[0]


def _too_large(limit: int, how: str) -> Error:
    error = IntegrityError('the file is larger than max_size={} bytes: it {}'.format(limit, how))
    return error


def _unexpected(exc: BaseException) -> Error:
    _log.error('unexpected error', exc_info=exc)
    error = Error('unexpected error: {!r}'.format(exc))
    error.__cause__ = exc
    return error


def _without_locals(error: BaseException) -> None:
    """Clear the local variables of the frames that ``error``, and the
    exceptions it came from, went through (and of their callers), but of a
    frame still running:
    a download keeps its last error, whose frames would keep the attempt's
    transfer, connections and answers alive (18 KB for a 404) for as long
    as the download. The tracebacks print as before."""
    chain: List[BaseException] = [error]
    seen: Set[int] = set()
    while chain:
        exc = chain.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            # and the frames that called it, which it refers to, where they
            # ended too (steps that the loop ran)
            frame: Any = tb.tb_frame
            while frame is not None:
                try:
                    frame.clear()
                except RuntimeError:  # still running, and so are its callers
                    break
                frame = frame.f_back
            tb = tb.tb_next
        chain.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)


# ---------------------------------------------------------------------------
# documents about the file: checksum files
# ---------------------------------------------------------------------------

_MAX_DOCUMENT = 16 * 1024 * 1024   # most bytes of a checksum file or a metalink
# the hashlib algorithm a hex digest of this many characters is taken for
_ALGORITHM_BY_LENGTH = {32: 'md5', 40: 'sha1', 56: 'sha224', 64: 'sha256', 96: 'sha384',
                        128: 'sha512'}
_BSD_SUM_RE = _Pattern(r'([A-Za-z0-9-]+) ?\((.*)\) ?= ?([0-9A-Fa-f]+)')
_GNU_SUM_RE = _Pattern(r'(\\?)([0-9A-Fa-f]+) [ *](.*)')


@overload
def _fetch_document(options: _RequestOptions, url: str, what: str, *,
                    cancel: Optional[_Cancel] = None) -> Tuple[bytes, str]: ...
@overload
def _fetch_document(options: _RequestOptions, url: str, what: str,
                    types: Tuple[str, ...], *, cancel: Optional[_Cancel] = None
                    ) -> Tuple[Optional[bytes], str]: ...
def _fetch_document(options: _RequestOptions, url: str, what: str,  # noqa: E302
                    types: Optional[Tuple[str, ...]] = None, *,
                    cancel: Optional[_Cancel] = None) -> Tuple[Optional[bytes], str]:
    """``_fetch_document_steps`` run on the calling thread."""
    return _drive_here(_fetch_document_steps(options, url, what, types, cancel=cancel))


def _fetch_document_steps(options: _RequestOptions, url: str, what: str,
                          types: Optional[Tuple[str, ...]] = None, *,
                          cancel: Optional[_Cancel] = None
                          ) -> '_Steps[Tuple[Optional[bytes], str]]':
    """GET a document of at most ``_MAX_DOCUMENT`` bytes (a checksum file, a
    metalink) with the download's request options: ``(body, its media
    type)``; the body is ``None``, unread, when ``types`` are given and the
    media type is none of them. Raises the request's ``bitpit.Error``; a
    larger or an encoded body is a ``ProtocolError``. Blocks for up to
    ``options.settings.timeout`` per read; ``cancel`` ends it (``_Stopped``)."""
    request = _Request(options, _check_url(url), cancel=cancel)
    try:
        response = yield from request.send_steps()
        if response.status >= 300:
            raise _status_error(response, request.url)
        media_type = (response.getheader('Content-Type') or '').split(';')[0].strip().lower()
        if types is not None and media_type not in types:
            return None, media_type
        encoding = (response.getheader('Content-Encoding') or 'identity').strip().lower()
        if encoding != 'identity':
            raise ProtocolError('{} {} came with Content-Encoding {}'.format(what, url, encoding))
        body = yield from response.read_steps(_MAX_DOCUMENT + 1)
    except OSError as exc:
        if cancel is not None and cancel.is_set():
            raise _Stopped from exc
        raise _network_error(exc) from exc
    finally:
        request.close(False)
    if len(body) > _MAX_DOCUMENT:
        error = ProtocolError('{} {} is larger than {} bytes'.format(what, url, _MAX_DOCUMENT))
        error.retryable = False
        raise error
    return body, media_type


def _parse_checksum_file_option(checksum: Optional[str]
                                ) -> Optional[Tuple[Optional[str], str]]:
    """``'ALG:file:URL'`` as ``('alg', URL)`` and ``'file:URL'`` as
    ``(None, URL)`` (the algorithm told by the digest's length); ``None``
    for any other value. ``ValueError`` for an unknown algorithm,
    ``InvalidURLError`` for a bad URL."""
    if not isinstance(checksum, str):
        return None
    named, _, rest = checksum.partition(':')
    algorithm: Optional[str] = named.strip().lower()
    if algorithm == 'file':
        algorithm, url = None, rest
    elif rest[:5].lower() == 'file:':
        url = rest[5:]
        import hashlib
        try:
            hashlib.new(named.strip().lower())
        except (ValueError, TypeError):
            raise ValueError('unknown checksum algorithm in {!r}'.format(checksum)) from None
    else:
        return None
    _check_url(url.strip())
    return algorithm, url.strip()


def _digest_in_checksum_file(text: str, names: Iterable[str], algorithm: Optional[str],
                             url: str) -> Tuple[str, str]:
    """``(algorithm, hex)`` of the line of a ``SHA256SUMS``-style file (GNU
    ``HEX  name`` or ``HEX *name``, BSD ``SHA256 (name) = HEX``) for the
    first of ``names`` it lists; a line's name counts by its last path
    segment too. Without ``algorithm``, the digest's length tells it.
    Raises ``IntegrityError`` when no line names the file or its digest
    does not fit the algorithm."""
    import hashlib
    lines: Dict[str, List[Tuple[Optional[str], str]]] = {}
    for line in text.splitlines():
        bsd = _BSD_SUM_RE.fullmatch(line.strip())
        gnu = None if bsd else _GNU_SUM_RE.fullmatch(line.rstrip('\r'))
        if bsd:
            tag, name, digest = bsd.group(1).lower().replace('-', ''), bsd.group(2), bsd.group(3)
            if tag not in hashlib.algorithms_available:
                continue
        elif gnu:
            tag, name, digest = None, gnu.group(3), gnu.group(2)
            if gnu.group(1):  # GNU escapes a name holding a backslash or a line break
                name = re.sub(r'\\(.)', lambda m: '\n' if m.group(1) == 'n' else m.group(1), name)
        else:
            continue
        for key in dict.fromkeys((name, name.rsplit('/', 1)[-1])):
            lines.setdefault(key, []).append((tag, digest.lower()))
    for name in names:
        for tag, digest in lines.get(name, ()):
            if algorithm is not None and tag is not None and tag != algorithm:
                continue  # a line of another algorithm for the same file
            found = algorithm or tag or _ALGORITHM_BY_LENGTH.get(len(digest))
            if found is None or len(digest) != 2 * hashlib.new(found).digest_size:
                raise IntegrityError('the checksum file {} gives {} a digest that is not '
                                     '{}: {!r}'.format(url, name, found or 'of a known '
                                                       'algorithm', digest))
            return found, digest
    raise IntegrityError('the checksum file {} has no {}line for {}'.format(
        url, algorithm + ' ' if algorithm else '', ' or '.join(dict.fromkeys(names))))


# ---------------------------------------------------------------------------
# documents about the file: metalinks (RFC 5854, and Metalink 3)
# ---------------------------------------------------------------------------

_METALINK4 = '{urn:ietf:params:xml:ns:metalink}'
_METALINK3 = '{http://www.metalinker.org/}'
_METALINK_TYPES = ('application/metalink4+xml', 'application/metalink+xml')
# the hash types bitpit checks, strongest first, as hashlib names them
_METALINK_HASHES = ('sha512', 'sha384', 'sha256', 'sha224', 'sha1', 'md5')
_LOWEST_PRIORITY = 1000000   # a v4 URL without a priority comes after the others


class _MetalinkFile:
    """One file a metalink lists: its ``name`` (as the document gives it),
    ``size`` (``None`` if not given), its http(s) ``urls`` best first, its
    ``checksum`` (``(algorithm, hex)`` or ``None``) and its ``pieces``
    (``(algorithm, length, [hex, ...])`` or ``None``). Read only."""
    __slots__ = ('name', 'size', 'urls', 'checksum', 'pieces')

    def __init__(self, name: str, size: Optional[int], urls: List[str],
                 checksum: Optional[Tuple[str, str]],
                 pieces: Optional[Tuple[str, int, List[str]]]):
        self.name = name
        self.size = size
        self.urls = urls
        self.checksum = checksum
        self.pieces = pieces

    @property
    def filename(self) -> str:
        """The name a file gets in a directory: the last segment of
        ``name``, made safe."""
        return _safe_filename(self.name.replace('\\', '/').rsplit('/', 1)[-1])


def _metalink_error(message: str) -> ProtocolError:
    error = ProtocolError(message)
    error.retryable = False  # the same document says the same thing again
    return error


def _refuse_dtd(data: bytes, where: str) -> None:
    """``ProtocolError`` for a document that is not XML, or that has a
    document type declaration: a DTD may define entities, which expand
    (an XML bomb) or name other files (an external entity). The document
    is refused at the declaration, before any entity is read."""
    import xml.parsers.expat

    def refuse(*args: Any) -> NoReturn:
        raise _metalink_error('{}: a metalink may not declare a DTD or entities'.format(where))
    parser = xml.parsers.expat.ParserCreate()
    parser.StartDoctypeDeclHandler = refuse  # type: ignore[assignment]  # any handler may raise
    parser.EntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as exc:
        raise _metalink_error('{}: not XML: {}'.format(where, exc)) from None


def _parse_metalink(data: bytes, where: str) -> List[_MetalinkFile]:
    """The files a Metalink 4 (RFC 5854) or Metalink 3 document lists.
    ``ProtocolError`` (not retryable) for anything else, for a DTD or an
    entity, and for a file without a usable URL, with sizes that
    disagree or with hashes that cannot be checked."""
    import xml.etree.ElementTree as ElementTree
    _refuse_dtd(data, where)
    root = ElementTree.fromstring(data)
    if root.tag == _METALINK4 + 'metalink':
        ns, elements = _METALINK4, root.findall(_METALINK4 + 'file')
    elif root.tag == _METALINK3 + 'metalink':
        ns, elements = _METALINK3, root.findall('{0}files/{0}file'.format(_METALINK3))
    else:
        raise _metalink_error('{}: not a metalink (its root is {})'.format(where, root.tag))
    if not elements:
        raise _metalink_error('{}: the metalink lists no file'.format(where))
    files = [_metalink_file(element, ns, where) for element in elements]
    names = [entry.filename.casefold() for entry in files]
    for name in names:
        if names.count(name) > 1:
            raise _metalink_error('{}: the metalink lists {} twice'.format(where, name))
    return files


def _metalink_file(element: Any, ns: str, where: str) -> _MetalinkFile:
    """One ``<file>`` of a metalink (``ns``: its namespace)."""
    name = (element.get('name') or '').strip()
    where = '{}: file {!r}'.format(where, name)
    if not name:
        raise _metalink_error(where + ' has no name')
    sizes = {(size.text or '').strip() for size in element.findall(ns + 'size')}
    if any(not _DIGITS_RE.fullmatch(size) for size in sizes):
        raise _metalink_error('{}: a size that is not a number: {}'.format(where, sorted(sizes)))
    if len(sizes) > 1:
        raise _metalink_error('{}: sizes that disagree: {}'.format(where, sorted(sizes)))
    size = int(sizes.pop()) if sizes else None
    verification = element if ns == _METALINK4 else element.find(ns + 'verification')
    hashes = verification.findall(ns + 'hash') if verification is not None else []
    checksum = _metalink_hash(hashes, where)
    pieces = None
    for candidate in (verification.findall(ns + 'pieces') if verification is not None else ()):
        pieces = _metalink_pieces(candidate, ns, size, where)
        if pieces is not None:
            break
    return _MetalinkFile(name, size, _metalink_urls(element, ns, where), checksum, pieces)


def _metalink_algorithm(kind: Optional[str]) -> Optional[str]:
    """The hashlib name of a metalink hash type (``sha-256``, ``sha256``,
    ``SHA-1``...), if bitpit checks it."""
    name = (kind or '').strip().lower().replace('-', '')
    return name if name in _METALINK_HASHES else None


def _check_hex(algorithm: str, digest: str, where: str) -> str:
    import hashlib
    digest = digest.strip().lower()
    if not re.fullmatch(r'[0-9a-f]+', digest) or len(digest) != 2 * hashlib.new(
            algorithm).digest_size:
        raise _metalink_error('{}: a {} hash that is not {} hex digits: {!r}'.format(
            where, algorithm, 2 * hashlib.new(algorithm).digest_size, digest[:200]))
    return digest


def _metalink_hash(hashes: List[Any], where: str) -> Optional[Tuple[str, str]]:
    """The strongest whole-file hash bitpit checks. Hashes of other types
    are ignored (logged), but a file whose every hash is of another type
    cannot be verified: ``ProtocolError``."""
    found = {}
    for element in hashes:
        algorithm = _metalink_algorithm(element.get('type'))
        if algorithm is None:
            _log.warning('%s: ignoring a hash of unsupported type %r', where, element.get('type'))
            continue
        found[algorithm] = _check_hex(algorithm, element.text or '', where)
    if hashes and not found:
        raise _metalink_error('{}: no hash of a type bitpit checks ({})'.format(
            where, ', '.join(sorted({str(h.get('type')) for h in hashes}))))
    for algorithm in _METALINK_HASHES:
        if algorithm in found:
            return algorithm, found[algorithm]
    return None


def _metalink_pieces(element: Any, ns: str, size: Optional[int], where: str
                     ) -> Optional[Tuple[str, int, List[str]]]:
    """``(algorithm, length, hashes)`` of a ``<pieces>`` element; ``None``
    (logged) for a type bitpit does not check."""
    algorithm = _metalink_algorithm(element.get('type'))
    if algorithm is None:
        _log.warning('%s: ignoring piece hashes of unsupported type %r', where,
                     element.get('type'))
        return None
    length = (element.get('length') or '').strip()
    if not _DIGITS_RE.fullmatch(length) or int(length) == 0:
        raise _metalink_error('{}: pieces of length {!r}'.format(where, length))
    hashes = element.findall(ns + 'hash')
    if ns == _METALINK3:  # numbered by their attribute
        try:
            hashes.sort(key=lambda h: int(h.get('piece', '')))
        except ValueError:
            raise _metalink_error('{}: a piece hash without its number'.format(where)) from None
    digests = [_check_hex(algorithm, h.text or '', where) for h in hashes]
    if size is not None and len(digests) != -(-size // int(length)):
        raise _metalink_error('{}: {} piece hashes of {} bytes for {} bytes'.format(
            where, len(digests), length, size))
    return (algorithm, int(length), digests) if digests else None


def _metalink_urls(element: Any, ns: str, where: str) -> List[str]:
    """The file's http and https URLs, best first: by v4 ``priority``
    (lowest first; none: last) or v3 ``preference`` (highest first), in
    document order among equals. Others (``ftp://``, ``file://``, torrents)
    are skipped and logged; none left is a ``ProtocolError``."""
    ranked = []
    elements = element.findall(ns + 'url') if ns == _METALINK4 else \
        element.findall('{0}resources/{0}url'.format(ns))
    for number, url_element in enumerate(elements):
        url = (url_element.text or '').strip()
        rank = url_element.get('priority' if ns == _METALINK4 else 'preference') or ''
        rank = int(rank) if _DIGITS_RE.fullmatch(rank.strip()) else None
        if ns == _METALINK4:
            rank = rank if rank is not None else _LOWEST_PRIORITY
        else:
            rank = -(rank if rank is not None else 0)
        if (url_element.get('type') or 'http').lower() not in ('http', 'https'):
            _log.info('%s: skipping a %s URL: %s', where, url_element.get('type'), url)
            continue
        try:
            _check_url(url)
        except InvalidURLError as exc:
            _log.info('%s: skipping %s', where, exc)
            continue
        ranked.append((rank, number, url))
    urls = list(dict.fromkeys(url for _, _, url in sorted(ranked)))
    if not urls:
        raise _metalink_error('{} has no http or https URL'.format(where))
    return urls


def _metalink_entry(url: Optional[str], metalink: Any,
                    options: Callable[[str], _RequestOptions]) -> Optional[_MetalinkFile]:
    """The one file of ``Downloader(metalink=...)`` (read now), or ``None``
    without a metalink; ``TypeError``/``ValueError`` for neither or both of
    ``url`` and ``metalink``, and for a metalink of several files."""
    if metalink is None:
        if url is None:
            raise TypeError('Downloader() needs a url, or a metalink')
        return None
    if url is not None:
        raise ValueError('give Downloader() a url or a metalink, not both')
    if isinstance(metalink, _MetalinkFile):
        return metalink
    files = _read_metalink(metalink, options)
    if len(files) != 1:
        raise ValueError('the metalink {} lists {} files: Manager.add_metalink() downloads '
                         'each'.format(metalink, len(files)))
    return files[0]


def _read_metalink(source: Any, options: Callable[[str], _RequestOptions]
                   ) -> List[_MetalinkFile]:
    """The files of the metalink at ``source``: an http(s) URL (fetched with
    ``options(url)``) or a path. ``FileError`` for a file that cannot be
    read; the request's errors; ``ProtocolError`` for the document."""
    if isinstance(source, str) and re.match(r'(?i)https?://', source):
        data, _ = _fetch_document(options(source), source, 'metalink')
    else:
        try:
            with open(_as_path(source), 'rb') as file:
                data = file.read(_MAX_DOCUMENT + 1)
        except (OSError, TypeError, ValueError) as exc:
            raise FileError('cannot read the metalink {}: {}'.format(source, exc)) from exc
        if len(data) > _MAX_DOCUMENT:
            raise _metalink_error('the metalink {} is larger than {} bytes'.format(
                source, _MAX_DOCUMENT))
    return _parse_metalink(data, str(source))


# ---------------------------------------------------------------------------
# downloader
# ---------------------------------------------------------------------------

if TYPE_CHECKING:
    _PathLike = Union[str, os.PathLike[str], _BinaryFile]
_STOP_WAIT = 1.0  # seconds stop() waits for a run stuck in a call (a callback, a disk)
_IF_EXISTS = ('resume', 'skip', 'update', 'rename', 'overwrite')


def _free_name(target: pathlib.Path) -> pathlib.Path:
    """The first of ``NAME.1.EXT``, ``NAME.2.EXT``, ... that neither exists
    nor has a sidecar (wget's numbering)."""
    stem, ext = _split_extension(target.name)
    number = 0
    while True:
        number += 1
        candidate = target.with_name(_fit_name(stem, '.{}{}'.format(number, ext)))
        if not candidate.exists() and \
                not candidate.with_name(candidate.name + _SIDECAR_SUFFIX).exists():
            return candidate


# -- restarts that back off ------------------------------------------------------

_RESTART_WAIT_MAX_FACTOR = 10  # the default restart_wait_max, in restart_waits


# the draws of the waits (http.client's imports import random already); tests
# may put a seeded random.Random here
_RESTART_RANDOM = random.Random()


def _backed_off(base: float, cap: Optional[float], streak: int, draw: float) -> float:
    """The wait before the ``streak``-th restart in a row (exponential
    back-off with full jitter above ``base``): ``draw`` (in ``[0, 1)``) of
    the way from ``base`` to ``min(base * 2 ** (streak - 1), cap)``, the cap
    being ``10 * base`` when ``None`` and never below ``base``."""
    cap = _RESTART_WAIT_MAX_FACTOR * base if cap is None else max(cap, base)
    high = min(base * 2.0 ** min(max(streak - 1, 0), 64), cap)
    return base + draw * (high - base)


if TYPE_CHECKING:
    # what the attempts of a download that failed in a row leave: how many
    # failed, the restarts in a row after attempts with no byte, where the
    # wait of the next falls between its bounds (a draw in [0, 1)), and the
    # server's Retry-After (see Downloader._count_restart)
    _Failing = Tuple[int, int, float, Optional[float]]
_NOT_FAILING: '_Failing' = (0, 0, 0.0, None)  # (after an attempt that completed)


if TYPE_CHECKING:
    # what a manager gives a download it takes over: who restarts it, its
    # token buckets, its host slots (see Downloader._join_manager)
    _ManagerTerms = Tuple[Optional[Callable[[], bool]], Tuple['_TokenBucket', ...],
                          Optional['_HostSlots']]


class _Settings:
    """The options of a download that its attempts and restarts read, each
    checked (those of its requests are its ``_RequestSettings``). The
    downloads a manager makes with ``Downloader._another`` share their
    model's, as they share its ``_RequestSettings``: making one copies a
    reference, not thirteen values. Once shared (``shared``, set by
    ``_another`` and never cleared), a setter gives its download a copy of
    its own before it changes a value (``Downloader._set_setting``), so the
    change reaches that download alone; a download's own is changed in
    place. Copied under the download's ``_lock``; set and read with no
    lock, a value at a time, by whoever sets or reads an option."""
    __slots__ = ('update_period', 'retries', 'connections', 'content_disposition', 'max_size',
                 'min_speed', 'verify_digest', 'restart_wait_max', 'chunk_size', 'restart_wait',
                 'checksum_file', 'checksum', 'if_exists', 'shared')

    def __init__(self) -> None:
        # (the constructor's defaults; it sets each one it is given)
        self.update_period: float = 1
        self.retries: Optional[int] = None
        self.connections = 1
        self.content_disposition = False
        self.max_size: Optional[int] = None
        self.min_speed: float = 0
        self.verify_digest = True
        self.restart_wait_max: Optional[float] = None
        self.chunk_size = _DEFAULT_CHUNK_SIZE
        self.restart_wait: float = -1
        # a checksum file's ``(algorithm, url)``, or the checksum
        self.checksum_file: Optional[Tuple[Optional[str], str]] = None
        self.checksum: Optional[Tuple[str, str]] = None
        self.if_exists = 'resume'
        self.shared = False

    def copy(self) -> '_Settings':
        """An unshared copy."""
        copied = _Settings.__new__(_Settings)
        for name in _Settings.__slots__:
            setattr(copied, name, getattr(self, name))
        copied.shared = False
        return copied


class _Option(_Generic[_Value]):
    """A keyword option of ``Downloader``: a read/write property whose value
    ``check(name, value)`` accepts (or raises ``TypeError``/``ValueError``
    naming the option), kept in its ``_Settings``. Its docstring says when
    a change takes effect."""

    def __init__(self, check: Callable[[str, Any], _Value], doc: str):
        self.check = check
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: Optional[type] = None) -> _Option[_Value]: ...
    @overload
    def __get__(self, obj: object, owner: Optional[type] = None) -> _Value: ...
    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        return self if obj is None else getattr(obj._settings, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj._set_setting(self.name, self.check(self.name, value))


class _RequestOption(_Option[_Value]):
    """A keyword option of ``Downloader`` that its requests take: kept in
    its ``_RequestSettings`` (``_requests``), which a manager's downloads
    may share, so a change replaces them for this download alone. A dict
    (``headers``) is read as a copy: changed in place, it would change
    those of the other downloads too."""

    @overload
    def __get__(self, obj: None, owner: Optional[type] = None) -> _RequestOption[_Value]: ...
    @overload
    def __get__(self, obj: object, owner: Optional[type] = None) -> _Value: ...
    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        if obj is None:
            return self
        value = getattr(obj._requests, self.name)
        return dict(value) if isinstance(value, dict) else value

    def __set__(self, obj: Any, value: Any) -> None:
        value = self.check(self.name, value)
        with obj._lock:  # (two setters at once: each keeps the other's change)
            obj._requests = obj._requests.replaced(self.name, value)


def _check_if_exists(value: Any, path: Any) -> str:
    if value not in _IF_EXISTS:
        raise ValueError('if_exists must be one of {}, not {!r}'.format(
            ', '.join(map(repr, _IF_EXISTS)), value))
    if not isinstance(path, os.PathLike) and value not in ('resume', 'overwrite'):
        raise ValueError("if_exists={!r} needs a path: with a file object only 'resume' "
                         "and 'overwrite' apply".format(value))
    return value


def _as_bool(name: str, value: Any) -> bool:
    return bool(value)


def _as_proxy(name: str, value: Any) -> Optional[str]:
    if value:
        _parse_proxy(value)
    return value


def _as_ssl_context(name: str, value: Any) -> Optional[ssl.SSLContext]:
    if value is None:
        return None
    import ssl  # (imported already by whoever made the context, if it is one)
    if not isinstance(value, ssl.SSLContext):
        raise TypeError('ssl_context must be an ssl.SSLContext, not {!r}'.format(value))
    return value


def _as_size_limit(name: str, value: Any) -> Optional[int]:
    if value is None:
        return None
    return _check_int(name, value, 0)


def _document_options(url: str, *, headers: Optional[Dict[str, str]] = None,
                      auth: Optional[Tuple[str, str]] = None, proxy: Optional[str] = None,
                      ssl_context: Optional[ssl.SSLContext] = None, timeout: float = 10,
                      cookies: Any = None, **others: Any) -> _RequestOptions:
    """The request options, checked, of a download with these ``Downloader``
    arguments (``others`` are not about requests), for a document it
    reads first at ``url`` (a metalink)."""
    return _RequestOptions(_check_url(url), _RequestSettings(
        _check_headers(headers), _check_auth(auth), _as_proxy('proxy', proxy),
        _as_ssl_context('ssl_context', ssl_context),
        _check_number('timeout', timeout, positive=True, high=_MAX_SECONDS)),
        cookies if isinstance(cookies, _Cookies) else _Cookies(cookies))


class _Changed:
    """The condition ``Downloader.wait()`` waits on, on the downloader's
    lock, which also calls each function in ``watchers`` at every
    ``notify_all()``, with the lock held: how a waiter that must not block
    (a coroutine, see ``Downloader.events``) learns when to look at the
    download again. A watcher must be quick and never block. The
    downloader makes it at the first ``wait()`` or watcher (most downloads
    are never waited for: see ``Downloader._changes``), and it makes the
    ``threading.Condition`` at the first ``wait()``. Its callers hold the
    lock (``with downloader._lock``); ``watchers`` is read as a copy."""
    __slots__ = ('_lock', '_condition', 'watchers')

    def __init__(self, lock: Any):
        self._lock = lock
        self._condition: Optional[threading.Condition] = None
        self.watchers: List[Callable[[], None]] = []

    def wait(self, timeout: Optional[float] = None) -> bool:
        """``threading.Condition.wait``, with the lock held."""
        if self._condition is None:
            self._condition = threading.Condition(self._lock)
        return self._condition.wait(timeout)

    def notify_all(self) -> None:
        """Wake every waiter and call every watcher, with the lock held."""
        if self._condition is not None:
            self._condition.notify_all()
        for watcher in list(self.watchers):
            watcher()


def _run_ended(result: None, error: Optional[BaseException]) -> None:
    """The end of a download's run on the loop (``Downloader._run_steps``,
    whose own handlers turn any failure into its end state): an error here
    is a bug, said. The loop's thread."""
    if error is not None:
        _log.error('a download\'s run ended in error', exc_info=error)


class Downloader(Emitter):
    """Download one URL to a file in the background (see ``_Run``).

    ``path`` is a file path (``str`` or anything ``pathlib.Path`` accepts) or
    a binary file object, which is written to and never closed. With
    ``dir_path=True`` (or ``path=None``) ``path`` is a directory and the
    file name comes from the URL. A file that already holds data is resumed
    with a ``Range`` request; its sidecar ``NAME.bitpit`` says which bytes it
    holds. With ``connections > 1`` and a server that serves ranges, the file
    comes over several connections, from ``url`` and its ``mirrors``. A
    ``metalink`` (read by the constructor) gives the URLs, the size and the
    hashes instead of ``url``.

    Signals: ``state-changed (downloader, old_state)``, ``size-changed``,
    ``speed-changed``, ``url-changed``, ``path-changed``,
    ``restart-time-changed``, ``rate-limit-changed`` (each ``(downloader)``).
    What the download does by itself is signalled from its download thread
    (the signal worker that gives a run's signals, in order; see ``_Run``);
    what a caller changes, from the caller's thread.
    """
    __signals__ = ('state-changed', 'size-changed', 'speed-changed', 'url-changed',
                   'path-changed', 'restart-time-changed', 'rate-limit-changed')

    timeout = _RequestOption(lambda name, value: _check_number(name, value, positive=True,
                                                               high=_MAX_SECONDS),
                             'Seconds without a received byte before an attempt fails '
                             '(also the window of ``min_speed``); next start.')
    update_period = _Option(lambda name, value: _check_number(name, value, positive=True,
                                                              high=_MAX_SECONDS),
                            'Seconds between two ``speed-changed`` signals; next start.')
    retries = _Option(lambda name, value: None if value is None else _check_int(name, value, 0),
                      'Failed attempts in a row (without progress) after which an '
                      '``error`` becomes ``fatal-error``; ``None``: no limit.')
    connections = _Option(lambda name, value: _check_connections(value),
                          'Most connections for this one file (1 to 32); next start.')
    content_disposition = _Option(_as_bool, 'Name the file after the server\'s '
                                  '``Content-Disposition`` (with ``dir_path``); next start.')
    headers = _RequestOption(lambda name, value: _check_headers(value),
                             'Extra request headers (a dict); next start.')
    auth = _RequestOption(lambda name, value: _check_auth(value),
                          '``(user, password)`` for HTTP Basic authentication; next start.')
    proxy = _RequestOption(_as_proxy, 'An ``http://host:port`` proxy, ``\'\'`` for none, '
                                      '``None`` for the environment\'s; next start.')
    ssl_context = _RequestOption(_as_ssl_context,
                                 'The ``ssl.SSLContext`` for HTTPS; next start.')
    max_size = _Option(_as_size_limit, 'Most bytes the file may have (``None``: no '
                                       'limit); next start.')
    min_speed = _Option(lambda name, value: _check_number(name, value, low=0),
                        'Bytes per second an attempt must keep up over ``timeout`` '
                        'seconds (0: no minimum); next start.')
    verify_digest = _Option(_as_bool, 'Check the file against the sha-256 or sha-512 digest '
                                      'the server gives (``Repr-Digest``, ``Content-Digest``, '
                                      '``Digest``); next start.')
    restart_wait_max = _Option(lambda name, value: None if value is None else _check_number(
        name, value, low=0, high=_MAX_SECONDS),
        'Longest wait before a restart, restarts in a row backing off up to it '
        '(``None``: 10 times the ``restart_wait`` in use); next restart.')
    # where the options above keep their checked values: those of its
    # requests in _requests, the others (and chunk_size, restart_wait,
    # if_exists and the checksum) in _settings
    _requests: _RequestSettings
    _settings: _Settings
    # what only a run tells, set by its start (see _init_state)
    _attempt_over: bool
    _stopping: bool
    # slots, not a dict per downloader (a manager may hold thousands); what
    # only a started download needs (its store, token bucket and Digest
    # state) is made at the first need, see "made at the first need" below
    __slots__ = (
        '_metalink', '_lock', '_changed', '_url', '_address', '_state', '_size', '_downloaded',
        '_resumed_from', '_best_held', '_received', '_speed', '_last_exception', '_failing',
        '_thread',
        '_attempt_over', '_restarted_by', '_hash_with', '_digest', '_stopping', '_transfer',
        '_fetching', '_tracked_by', '_terms', '_planned_by', '_run_options',
        '_restart_timer', '_restart_time', '_bucket', '_shared_buckets', '_host_slots',
        '_rate_limit', '_requests', '_settings', '_mirrors', '_cookies', '_digest_auth',
        '_dir', '_path', '_first_attempt', '_store', '_target_read')

    def __init__(self, url: Optional[str] = None, path: Optional[_PathLike] = None,
                 dir_path: bool = False,
                 rate_limit: float = 0, timeout: float = 10, update_period: float = 1,
                 restart_wait: float = -1, chunk_size: int = _DEFAULT_CHUNK_SIZE, *,
                 connections: int = 1, mirrors: Iterable[str] = (),
                 retries: Optional[int] = None, content_disposition: bool = False,
                 checksum: Optional[str] = None, headers: Optional[Dict[str, str]] = None,
                 auth: Optional[Tuple[str, str]] = None, proxy: Optional[str] = None,
                 ssl_context: Optional[ssl.SSLContext] = None,
                 cookies: Union[None, str, os.PathLike[str], http.cookiejar.CookieJar] = None,
                 max_size: Optional[int] = None, min_speed: float = 0,
                 if_exists: str = 'resume', verify_digest: bool = True, metalink: Any = None,
                 restart_wait_max: Optional[float] = None):
        jar = cookies if isinstance(cookies, _Cookies) else _Cookies(cookies)  # one, for the
        # metalink's request too
        self._metalink = _metalink_entry(url, metalink, lambda source: _document_options(
            source, headers=headers, auth=auth, proxy=proxy, ssl_context=ssl_context,
            timeout=timeout, cookies=jar))
        if self._metalink is not None:
            url = self._metalink.urls[0]
            if not isinstance(mirrors, str):  # (the setter refuses a str)
                mirrors = (*self._metalink.urls[1:], *mirrors)
            if checksum is None and self._metalink.checksum is not None:
                checksum = '{}:{}'.format(*self._metalink.checksum)
        assert url is not None  # else _metalink_entry raised TypeError
        self._init_state(_check_url(url))
        self._settings = _Settings()
        self._rate_limit = 0.0
        self.rate_limit = rate_limit
        timeout = Downloader.timeout.check('timeout', timeout)
        self.update_period = update_period
        self.chunk_size = chunk_size
        self.restart_wait = restart_wait
        self.connections = connections
        self.mirrors = mirrors
        self.retries = retries
        self.content_disposition = content_disposition
        settings = self._settings  # (its own: changed in place)
        settings.checksum_file = _parse_checksum_file_option(checksum)
        settings.checksum = None if settings.checksum_file else _parse_checksum(checksum)
        self._requests = _RequestSettings(_check_headers(headers), _check_auth(auth),
                                          _as_proxy('proxy', proxy),
                                          _as_ssl_context('ssl_context', ssl_context), timeout)
        self._cookies = jar if jar.jar is not None else None  # see _keep_learnt()
        self.max_size = max_size
        self.min_speed = min_speed
        self._dir: Optional[pathlib.Path] = None
        # the target: a Path or a file object; in ``_dir``, the text of its
        # path until ``path`` is first read (see ``_set_path_value``)
        self._path: _StoreTarget
        self._set_path_value(path, dir_path)
        self.if_exists = if_exists
        self.verify_digest = verify_digest
        self.restart_wait_max = restart_wait_max

    def _init_state(self, address: _Address) -> None:
        """What a download of ``address`` (its URL, checked) holds before
        its first start, besides its options and its target: for the
        constructor, and for ``_another()``. What the target holds is read
        at the first need (``_forget_local_state``'s, inline: a call fewer
        a download)."""
        # guards the thread, the restart, the state (threading.RLock's own
        # lock, made without the Python call that picks it)
        self._lock = _thread.RLock()
        self._changed: Optional[_Changed] = None  # see _changes()
        self._url = address.url
        self._address = address              # what its requests and its name take of _url
        self._state = 'pause'
        self._resumed_from = 0               # bytes held when the attempt began
        self._best_held = 0                  # the most bytes an attempt ever held
        self._received = 0
        self._speed: float = 0
        self._last_exception: Optional[BaseException] = None
        # what the attempts that failed in a row leave (see _count_restart)
        self._failing: _Failing = _NOT_FAILING
        # the run under way (an attempt and its signals), until its last
        # call ends it: a run has work left while it is here
        self._thread: Optional[_Run] = None
        # what only a run tells, each set by _start before it sets _thread
        # (and read only once a run was there): the attempt is over, its
        # last signals to come (_attempt_over); the run was told to stop
        # (_stopping, under _lock). A download that waits its turn has
        # neither (two stores a download fewer)
        # who restarts it after an error or a pause, when not itself: a
        # manager's test of whether it still does (it runs)
        self._restarted_by: Optional[Callable[[], bool]] = None
        # the note of each state change of every manager it was added to
        # (seldom more than one), told before the callbacks or, for an
        # error or a pause, after them (see _set_state); replaced whole
        # under _lock, read without it
        self._tracked_by: Tuple[Callable[[Downloader, str, str], None], ...] = ()
        # what each of those managers gives it, in the same order: who
        # restarts it, its limits and its host slots; the last one's apply
        self._terms: Tuple[_ManagerTerms, ...] = ()
        # the notes of a manager that counts it running by a plan of its
        # own, which its start need not tell (see _start); that manager
        # sets it before it starts the download, and clears it once it
        # counts it no longer (under its own lock); read with no lock by
        # the run's start, after it wrote the state (see _set_state)
        self._planned_by: Optional[Tuple[Callable[[Downloader, str, str], None], ...]] = None
        # a manager's manifest: the algorithm that hashes the file as it is
        # written, and the last completed file's ``(algorithm, hex digest)``
        self._hash_with: Optional[str] = None
        self._digest: Optional[Tuple[str, str]] = None
        self._transfer: Optional[_Transfer] = None
        # the request options of the run under way (see _keep_learnt); under _lock
        self._run_options: Optional[_RequestOptions] = None
        # the cancel of a document an attempt fetches before its transfer
        # (a checksum file), which a stop cancels; under _lock
        self._fetching: Optional[_Cancel] = None
        self._restart_timer: Optional[threading.Timer] = None
        self._restart_time: Optional[datetime.datetime] = None
        self._bucket: Optional[_TokenBucket] = None  # its own rate limit's: _buckets()
        self._shared_buckets: Tuple[_TokenBucket, ...] = ()
        self._host_slots: Optional[_HostSlots] = None  # its manager's, with max_per_host
        self._digest_auth: Optional[_DigestAuth] = None  # see _keep_learnt()
        self._first_attempt = True
        self._store: Optional[_FileStore] = None  # see _local_store()
        self._target_read = False
        self._downloaded, self._size = 0, -1

    def __repr__(self) -> str:
        return '<bitpit.Downloader {} {} {}/{}>'.format(
            self._url, self._state, self.downloaded, self.size)

    # -- configuration -----------------------------------------------------

    def _set_path_value(self, path: Optional[_PathLike], dir_path: bool) -> None:
        if path is None:
            path, dir_path = os.getcwd(), True
        if hasattr(path, 'write') and not isinstance(path, (str, os.PathLike)):
            if dir_path:
                raise ValueError('dir_path=True needs a directory path, not a file object')
            _check_if_exists(self._settings.if_exists, path)
            self._dir, self._path = None, path
        else:
            path = _as_path(path)
            if dir_path:
                self._set_dir(path)
                return
            self._dir, self._path = None, path
        self._forget_local_state()

    def _set_dir(self, directory: pathlib.Path) -> None:
        """The target is the file named after the URL (or the metalink) in
        ``directory``: the text of its path (what the store takes), not its
        Path, which ``path`` makes if it is ever read: most downloads of a
        manager never are (``_child_text``)."""
        self._dir, self._path = directory, _child_text(directory, self._name_in_dir())
        self._forget_local_state()

    def _name_in_dir(self) -> str:
        """The file's name with ``dir_path``: the metalink's, else the URL's."""
        return self._metalink.filename if self._metalink is not None else \
            _filename_from_url(self._address)

    def _forget_local_state(self) -> None:
        """A new target (or URL): what is on disk is read again at the first
        need (``_local_store``), and the next attempt is the first for
        ``if_exists``. Under ``_lock``, or in the constructor."""
        self._first_attempt = True
        self._store = None
        self._target_read = False
        self._downloaded, self._size = 0, -1

    @property
    def url(self) -> str:
        """The URL to download. Setting it while running raises
        ``RuntimeError``; emits ``url-changed``."""
        return self._url

    @url.setter
    def url(self, value: str) -> None:
        address = _check_url(value)
        with self._lock:
            self._ensure_not_running('url')
            self._url, self._address = value, address
            if self._dir is not None:
                self._path = _child_text(self._dir, self._name_in_dir())
            self._forget_local_state()
        self.emit('url-changed', self)

    @property
    def if_exists(self) -> str:
        """What a start does with an existing file: ``'resume'``, ``'skip'``,
        ``'update'``, ``'rename'`` or ``'overwrite'``; next start."""
        return self._settings.if_exists

    @if_exists.setter
    def if_exists(self, value: str) -> None:
        path = self._path  # (text: a path in _dir)
        self._set_setting('if_exists', _check_if_exists(
            value, path if type(path) is not str else self._dir))

    @property
    def mirrors(self) -> Tuple[str, ...]:
        """More URLs of the same file, tried after ``url`` (a tuple). Setting
        it while running raises ``RuntimeError``."""
        return tuple(mirror.url for mirror in self._mirrors)

    @mirrors.setter
    def mirrors(self, value: Iterable[str]) -> None:
        if isinstance(value, str):
            raise TypeError('mirrors must be a list of URLs, not one str')
        addresses = [_check_url(mirror) for mirror in value]
        with self._lock:
            self._ensure_not_running('mirrors')
            # (each URL once: the same URL's addresses are alike)
            self._mirrors = tuple({a.url: a for a in addresses if a.url != self._url}.values())

    @property
    def path(self) -> _Target:
        """Where the bytes go: a ``pathlib.Path`` or the file object. Setting
        it while running raises ``RuntimeError``; emits ``path-changed``."""
        path = self._path
        if not isinstance(path, str):
            return path
        with self._lock:  # (made once: a new target is set under it)
            if isinstance(self._path, str):
                import pathlib
                self._path = pathlib.Path(self._path)
            return self._path

    @path.setter
    def path(self, value: _PathLike) -> None:
        with self._lock:
            self._ensure_not_running('path')
            self._set_path_value(value, False)
        self.emit('path-changed', self)

    def _set_setting(self, name: str, value: Any) -> None:
        """Set the option ``name`` (checked) in the download's own
        ``_Settings``: a copy of them first, under ``_lock``, if they are
        shared (see ``_Settings``). Its own are set with no lock, as an
        option was when it was an attribute of the download (the
        constructor sets a dozen): a setter that finds them shared copies
        them only if no other setter did meanwhile (``shared`` is never
        cleared, so any setter that read the shared ones takes the lock).
        Any thread."""
        settings = self._settings
        if settings.shared:
            with self._lock:
                settings = self._settings
                if settings.shared:
                    settings = self._settings = settings.copy()
        setattr(settings, name, value)

    def _ensure_not_running(self, what: str) -> None:
        if self.is_alive and not self._attempt_over:
            raise RuntimeError('cannot change {} while the download is running'.format(what))

    @property
    def chunk_size(self) -> int:
        """Most bytes per network read and file write; next start."""
        return self._settings.chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        self._set_setting('chunk_size', _check_int('chunk_size', value, 1))

    @property
    def rate_limit(self) -> float:
        """Bytes per second over all connections, ``<= 0`` for unlimited.
        Takes effect at once; emits ``rate-limit-changed``."""
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: float) -> None:
        value = _check_number('rate_limit', value)
        with self._lock:
            self._rate_limit = value if value > 0 else 0
            if self._bucket is not None:  # else the first attempt makes it with this rate
                self._bucket.rate = self._rate_limit
            elif self._rate_limit and self._transfer is not None:
                self._limit_transfer(self._transfer)
        self.emit('rate-limit-changed', self)

    @property
    def human_rate_limit(self) -> Tuple[float, str]:
        """``rate_limit`` for people, e.g. ``(100.0, 'KB/s')``."""
        return _per_second(self._rate_limit)

    @property
    def restart_wait(self) -> float:
        """Seconds before an automatic restart after ``error``; negative:
        never. Setting it while a restart is scheduled reschedules it."""
        return self._settings.restart_wait

    @restart_wait.setter
    def restart_wait(self, value: float) -> None:
        self._set_setting('restart_wait', _check_number('restart_wait', value))
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
        if not self._target_read:
            self._local_store()
        return self._size

    @property
    def downloaded(self) -> int:
        """Bytes held so far, resumed bytes included."""
        transfer = self._transfer
        if transfer is not None:
            return transfer.downloaded
        if not self._target_read:
            self._local_store()
        return self._downloaded

    @property
    def remaining(self) -> int:
        """``size - downloaded``, ``-1`` if the size is unknown."""
        size = self.size
        return -1 if size < 0 else max(size - self.downloaded, 0)

    @property
    def speed(self) -> float:
        """Bytes per second over the last ``update_period``, all connections
        together; 0 when not downloading."""
        return self._speed

    @property
    def ratio(self) -> float:
        """``downloaded / size``: 1.0 for an empty file, -1.0 if unknown."""
        size = self.size
        if size < 0:
            return -1.0
        if size == 0:
            return 1.0
        return self.downloaded / size

    @property
    def percentage(self) -> float:
        """``100 * ratio``."""
        return 100 * self.ratio

    @property
    def eta(self) -> Optional[datetime.timedelta]:
        """Time left at the current speed, ``None`` if unknown."""
        import datetime
        remaining, speed = self.remaining, self._speed
        if remaining == 0:
            return datetime.timedelta(0)
        if remaining < 0 or speed <= 0:
            return None
        return datetime.timedelta(seconds=remaining / speed)

    @property
    def human_size(self) -> Tuple[float, str]:
        """``size`` for people, e.g. ``(9.865234375, 'KB')``."""
        return human_readable(self.size)

    @property
    def human_downloaded(self) -> Tuple[float, str]:
        """``downloaded`` for people."""
        return human_readable(self.downloaded)

    @property
    def human_remaining(self) -> Tuple[float, str]:
        """``remaining`` for people."""
        return human_readable(self.remaining)

    @property
    def human_speed(self) -> Tuple[float, str]:
        """``speed`` for people, e.g. ``(2.0, 'KB/s')``."""
        return _per_second(self._speed)

    @property
    def is_alive(self) -> bool:
        """Whether a run is under way (its attempt, or its last signals)."""
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
        """Start a run (an attempt, on the loop) and return at once. No-op if it is
        running; cancels a scheduled restart. Any thread."""
        self._start(None)

    def _start(self, timer: Optional[threading.Thread]) -> None:
        """Start a run, for ``start()`` (``timer`` ``None``: a scheduled
        restart is cancelled) or for the restart ``timer``. A timer starts
        nothing once a stop (or a new schedule) has replaced it: that is
        decided under the lock, so a stop racing the timer always wins.
        The run tells the managers of its ``start`` (``_set_state``), but
        not a manager that counts it running already by its own plan
        (``_planned_by``) when the download is in that one alone (it keeps
        those very notes): the note would tell it nothing (a hop a small
        file fewer). Which to tell is read when the ``start`` is given,
        after the state is written, not here: a manager that joins (or
        leaves and joins again) between this start and that signal finds
        the download paused, and is told (see ``_set_state``)."""
        if timer is None and self._restart_timer is not None:
            self._cancel_restart()  # (its look, inline: most starts have none to cancel)
        finishing = self._thread
        if finishing is not None and self._attempt_over:
            if finishing.is_current():
                # a callback of the run's: of its last state (set on this
                # thread), start once it ends; of an earlier signal (the
                # loop ends an attempt before its signals are given), the
                # download runs, as far as the callback can tell: nothing
                if self._state not in _ACTIVE_STATES:
                    self.restart(0)
                return
            self._join_run(finishing, None)  # it is only emitting its final signals
            if timer is None:
                self._cancel_restart()  # one it scheduled meanwhile
        with self._lock:
            if timer is not None:
                if self._restart_timer is not timer:
                    return
                self._restart_timer = None
                self._restart_time = None
            finishing = self._thread  # (is_alive, inline)
            if finishing is None or not finishing.is_alive():
                self._attempt_over = False
                self._stopping = False
                run = _Run()
                try:
                    # the attempt's request options, kept while it runs: what
                    # an update_size learns meanwhile reaches them (_keep_learnt)
                    options = self._run_options = self._request_options()
                    _LOOP.spawn(self._run_steps(run, options), _run_ended)
                except BaseException:  # no loop thread to be had: nothing runs
                    self._run_options = None
                    run.done()
                    raise
                self._thread = run
        if timer is not None:
            self.emit('restart-time-changed', self)

    def stop(self) -> None:
        """Stop the download (state ``pause``) and wait for its thread to end,
        unless called from that thread or the attempt is already over (the
        thread then only emits its last signals). Every connection ends at
        once; if the thread is stuck in a call that cannot be interrupted
        (a callback, a hung disk), ``stop`` returns after about a second and
        the thread ends by itself without writing the file again. No-op if
        not running; cancels a scheduled restart, and keeps a failing attempt
        from scheduling one. Any thread."""
        thread = self._begin_stop()
        if thread is not None:
            self._end_stop(thread)

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait until the run ends (any reason), its last signal given. Any
        thread but the run's download thread (``RuntimeError``)."""
        thread = self._thread
        if thread is not None:
            self._join_run(thread, timeout)

    def _join_run(self, run: _Run, timeout: Optional[float]) -> None:
        """Wait until ``run`` ended (its last call, ``_end_run``, marks it
        done under the lock and wakes whoever waits), at most ``timeout``
        seconds. Any thread but the run's own worker (``RuntimeError``).
        A run that ended takes no lock to join: in a forked child, where
        every run of the parent's has ended, a thread of the parent's may
        have held it as the process forked, and none will release it."""
        if not run.is_alive():
            return
        if run.is_current():
            raise RuntimeError('a download thread cannot join itself')
        deadline = _deadline(timeout)
        with self._lock:
            changed = self._changes()
            while run.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                changed.wait(left)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the download is ``complete`` or ``fatal-error``,
        through any automatic restarts; or until it is stopped (or failed)
        with no restart to come; or until ``timeout`` seconds passed.
        Returns ``True`` only when it is complete. Any thread but its
        download thread (a callback of its own)."""
        deadline = _deadline(timeout)
        with self._lock:
            changed = self._changes()
            while not self._settled():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                changed.wait(left)
            return self._state == 'complete'

    def __await__(self) -> Any:
        """``await d`` in a coroutine: waits as ``wait()`` does, without
        blocking the event loop, and gives the same ``bool``. Cancelling the
        awaiting task ends only the waiting: the download goes on. The event
        loop's thread (see the asyncio layer)."""
        return _wait_settled(self).__await__()

    def events(self) -> '_Events':
        """An async iterator of ``(signal, args)``, ``args`` being what the
        signal's callbacks get after the downloader, in the order emitted,
        from the moment of the call. It ends after the state that makes
        ``wait()`` return (at once if the download is already complete or
        fatal, and not running); ``aclose()`` or dropping it ends it
        sooner. Call it in the event loop's thread (see the asyncio
        layer)."""
        return _Events(self)

    def restart(self, wait: Optional[float] = None) -> None:
        """Schedule ``start()`` in ``wait`` seconds (default
        ``restart_wait``) and return. Any thread. A wait longer than a thread
        can wait (``threading.TIMEOUT_MAX``) is shortened to that."""
        self._schedule_restart(wait, automatic=False)

    def _schedule_restart(self, wait: Optional[float], automatic: bool) -> None:
        """Install the restart timer. An ``automatic`` one (after an error)
        is not installed once a stop is under way or a restart is already
        scheduled (by a callback), decided in the same locked step."""
        wait = self._settings.restart_wait if wait is None else _check_number('wait', wait)
        wait = min(max(0.0, wait), threading.TIMEOUT_MAX)
        timer = threading.Timer(wait, self._restart_due)
        timer.daemon = False
        timer.name = 'bitpit-restart'
        with self._lock:
            if automatic and (self._stopping or self._restart_timer is not None):
                return
            old, self._restart_timer = self._restart_timer, timer
            import datetime
            self._restart_time = datetime.datetime.now() + datetime.timedelta(seconds=wait)
            self._notify_changed()
        if old is not None:
            old.cancel()
        timer.start()
        self.emit('restart-time-changed', self)

    def _restart_due(self) -> None:
        """The restart timer's thread."""
        me = threading.current_thread()
        try:
            self._start(me)
        except BaseException as exc:  # never a dead timer thread with no word
            with self._lock:
                if self._restart_timer is me:
                    self._restart_timer = self._restart_time = None
            self._fail_outside(exc)

    def _cancel_restart(self) -> None:
        """Cancel the scheduled restart, if any (else nothing changes and
        nobody is woken: a manager's add() and every start() call it)."""
        if self._restart_timer is None:
            # nothing scheduled (most calls): no lock to take. One read
            # tells it: a restart scheduled meanwhile by another thread is
            # one scheduled just after this call, as with the lock
            return
        with self._lock:
            timer, self._restart_timer = self._restart_timer, None
            if timer is None:
                return
            self._restart_time = None
            self._notify_changed()
        timer.cancel()
        self.emit('restart-time-changed', self)

    def update_size(self) -> None:
        """Refresh ``size`` with a HEAD request (blocks; raises a
        ``bitpit.Error`` on failure)."""
        request = _Request(self._request_options(), self._address, 'HEAD')
        try:
            response = request.send()
            if response.status >= 300:
                raise _status_error(response, request.url)
            length = _parse_content_length(response)
            response.close()
        finally:
            request.close(reuse=False)
        if length is not None:
            self._local_store()  # (read first: what the target holds then sets no size)
            self._set_size(length)

    # -- made at the first need ------------------------------------------------
    # A download that waits its turn (in a manager, thousands may) holds its
    # settings only: what the target holds is read, and what an attempt
    # needs is made, when first asked for, under ``_lock``.

    def _local_store(self) -> _FileStore:
        """The target's store; the first call (after the constructor, or a
        new ``url`` or ``path``) makes it and reads what the target holds
        into ``size`` and ``downloaded``. After ``_let_go`` a call makes it
        again and leaves those two as they are. Any thread."""
        store = self._store
        if store is None:
            with self._lock:
                store = self._store
                if store is None:
                    store = _FileStore(self._path, self._url)  # (what the target holds read)
                    if not self._target_read:
                        self._downloaded, self._size = store.held.total, store.size
                        self._target_read = True
                    self._store = store
        return store

    def _changes(self) -> _Changed:
        """The condition ``wait()`` waits on, with the watchers; made now
        if need be (most downloads are never waited for). Under ``_lock``."""
        if self._changed is None:
            self._changed = _Changed(self._lock)
        return self._changed

    def _notify_changed(self) -> None:
        """Wake whoever waits and call the watchers, if any. Under ``_lock``."""
        if self._changed is not None:
            self._changed.notify_all()

    def _buckets(self) -> Tuple[_TokenBucket, ...]:
        """The token buckets an attempt draws from: its own if it has a
        limit (made now at the first attempt with one; emptied, so that it
        paces from now on), then its manager's. Without a limit, it has
        none, and takes no lock (a small file's attempt would make one for
        nothing): the ``rate_limit`` setter adds one to a running transfer,
        and ``_attempt_steps`` to its new one, if a limit came meanwhile.
        The run's steps."""
        if self._bucket is None and self._rate_limit <= 0:
            return self._shared_buckets
        with self._lock:
            if self._bucket is None:
                self._bucket = _TokenBucket(self._rate_limit)
            else:
                self._bucket.drain()
            return (self._bucket,) + self._shared_buckets

    def _limit_transfer(self, transfer: _Transfer) -> None:
        """An attempt under way without a limit of its own draws from one
        now, with ``rate_limit``. Under ``_lock``."""
        self._bucket = _TokenBucket(self._rate_limit)
        transfer.add_bucket(self._bucket)

    def _request_options(self) -> _RequestOptions:
        """The options of the requests of an attempt (or of ``update_size``),
        with the cookies and the Digest state that the download keeps
        (``_keep_learnt``), if any: most downloads meet neither, and make
        none (two objects a small file fewer). They are written under the
        lock, by the requests that make them, and read here with no lock
        (one read each). Any thread."""
        return _RequestOptions(self._address, self._requests, self._cookies,
                               self._digest_auth, self._host_slots, bool(self._tracked_by),
                               self._keep_learnt)

    def _keep_learnt(self, options: _RequestOptions) -> None:
        """Keep what the requests made with ``options`` made at their first
        need (a jar of its own at a ``Set-Cookie``, the state of the hosts
        that asked for Digest) for all the download's requests from now on:
        those under way with other options (``update_size`` during a run)
        and those of its next attempts; or give ``options`` what another's
        made and the download keeps already. The run under way, if another
        made them (``update_size``'s), is given them for its next requests
        if its own made none yet (a reference written whole: its requests
        on the loop read it at each use). The thread of those requests
        (the loop's, or ``update_size``'s caller's); takes ``_lock``."""
        with self._lock:
            if self._cookies is None:
                self._cookies = options.cookies
            else:
                options.cookies = self._cookies
            if self._digest_auth is None:
                self._digest_auth = options.digest
            else:
                options.digest = self._digest_auth
            run_options = self._run_options
            if run_options is not None and run_options is not options:
                if run_options.cookies is None:
                    run_options.cookies = self._cookies
                if run_options.digest is None:
                    run_options.digest = self._digest_auth

    def _let_go(self) -> None:
        """Drop what only an attempt needs, once the download is complete
        or fatal (a manager may keep thousands of finished ones): the
        store, whose ``size`` and ``downloaded`` stay as they are, with no
        new look at the disk; the token bucket (cookies and a Digest state
        it keeps only once a server set one or asked for it: see
        ``_keep_learnt``). The next attempt makes them again as the first
        did, and its store reads the target as a kept one would have.
        A file object's store is kept: what a stream already took cannot be
        read again. No attempt under way: the run's steps at its end, or
        the caller's thread; under ``_lock`` (the run's steps take it
        once for this and for the attempt's end)."""
        if self._store is not None and self._store.is_path:
            self._store = None
        self._bucket = None

    # -- internal ---------------------------------------------------------------

    def _set_state(self, state: str,
                   notes: Optional[Tuple[Callable[['Downloader', str, str], None], ...]]
                   ) -> None:
        """Set the state; if it changed, tell the managers whose ``notes``
        are given and the callbacks. Its caller says which managers: those
        it was added to (``_tracked_by``), but none of a ``download`` (of
        the start, its run told them already that it is under way); of a
        ``start`` (``None``), those it is in but a manager whose plan counts
        it running already (see ``_start``), read after the state is
        written: a manager that joins meanwhile either is read here or
        finds the download started (it reads the state after it joins).
        A manager is told directly, not as one of the callbacks: a
        listen() per download costs a lock (a manager may add thousands).
        It learns of a start or an end before the callbacks, so that a slow
        callback of a download that ended does not hold up the next one's
        start (of a ``download`` after the start, nothing: the download is
        still under way, as it knew); of an ``error`` or a ``pause`` after
        them, as it may start this download again, and that start waits for
        this thread: a callback that stops the manager (which waits for its
        thread) would wait for ever, and one that removes the download would
        see it started again. Like a callback, a manager that fails is
        logged and the download goes on.

        The state is written by one thread at a time: a run's worker while
        the run is alive (its calls are made one at a time, and no run
        starts while another is alive), else the caller of a download that
        does not run (``_take_as_complete``, ``_fail_outside`` after its
        start failed). So it is written with no lock (three sections a
        small file), and whoever waits or watches is woken under the lock
        only when there is one: a waiter makes ``_changed`` under the lock
        before it reads the state, and this reads ``_changed`` after the
        write, so either it finds the waiter (and wakes it once it waits)
        or the waiter finds the new state."""
        old, self._state = self._state, state
        if notes is None:  # (a start: after the write, see above)
            notes = self._tracked_by
            if notes is self._planned_by:
                notes = ()
        changed = self._changed
        if changed is not None:  # (_notify_changed, inline: 3 times a file)
            with self._lock:
                changed.notify_all()
        if old != state:
            if state in _RESTARTABLE_STATES:  # (after the callbacks, see above)
                self.emit('state-changed', self, old)
                if notes:
                    self._tell_manager(notes, old, state)
            else:
                if notes:
                    self._tell_manager(notes, old, state)
                self.emit('state-changed', self, old)

    def _tell_manager(self, notes: Tuple[Callable[['Downloader', str, str], None], ...],
                      old: str, state: str) -> None:
        """Have each manager whose note is in ``notes`` note the change from
        ``old`` to ``state``; a failure is logged. The thread that changed
        it."""
        for tracked_by in notes:
            try:
                tracked_by(self, old, state)
            except Exception:
                _log.exception('the manager of %s failed to note its state %r',
                               self._url, state)

    def _set_size(self, size: int) -> None:
        """Set the size and signal it, if it changed. The target was read
        (``_local_store``): by the attempt whose worker calls, or by the
        caller."""
        if size != self._size:
            self._size = size
            self.emit('size-changed', self)

    def _set_path(self, path: _Target) -> None:
        """A name the download chose: set as its signal is given, as the
        state and the size are. The run's worker."""
        with self._lock:  # (as ``path`` may make one meanwhile)
            self._path = path
        self.emit('path-changed', self)

    # -- a run: an attempt as steps on the loop, its signals on a download thread ----

    def _run_steps(self, run: _Run, options: _RequestOptions) -> '_Steps[None]':
        """A run on the loop: one attempt, from ``start`` (told to the
        managers ``_set_state`` chooses, see ``_start``) to its end state.
        What it tells its callbacks, it posts to ``run`` (``_SIGNALS.post``), whose
        signal worker makes the calls in order; the last one, ``_end_run``,
        ends the run."""
        best_before = self._best_held
        received_before = self._received
        retry_after = failures = None  # (an error's: see _count_restart)
        final = 'pause'
        size = None
        # what the transfer told last, given with the run's end: one call
        # fewer to post (a small file's size and start of download)
        last_events: List[Tuple[str, Any]] = []
        try:
            _SIGNALS.post(run, self._set_state, 'start', None)
            size = yield from self._attempt_steps(run, options, last_events)
            final = 'complete'
        except _Stopped:
            final = 'pause'
        except BaseException as exc:
            if self._stopping and not isinstance(exc, FileError):
                final = 'pause'
            else:
                error = exc if isinstance(exc, Error) else _unexpected(exc)
                _without_locals(error)
                self._last_exception = error
                # ``retries`` counts failures in a row: progress (more bytes
                # held than ever before) breaks the row
                failures = 1 if self._best_held > best_before else self._failing[0] + 1
                final = 'error' if error.retryable else 'fatal-error'
                if final == 'error' and self.retries is not None \
                        and failures > self.retries:
                    final = 'fatal-error'
                retry_after = getattr(error, 'retry_after', None)
                _log.info('%s: %s', self._url, error)
        finally:
            try:
                with self._lock:  # (one section for the attempt's end, its transfer's too)
                    self._transfer = None
                    self._run_options = None
                    self._attempt_over = True
                    self._speed = 0
                    if final in _FINISHED_STATES:
                        self._let_go()
                if final == 'complete':  # (most: no failure in a row, no restart to count)
                    self._failing = _NOT_FAILING
                else:
                    self._count_restart(final == 'error', failures, retry_after,
                                        self._received > received_before)
            finally:  # (a bug above is said by _run_ended: the run still ends)
                _SIGNALS.post(run, self._end_run, run, final, size, last_events)

    def _end_run(self, run: _Run, final: str, size: Optional[int],
                 last_events: List[Tuple[str, Any]]) -> None:
        """The run's last call, on its signal worker: its last signals (first
        what the transfer told last, then the ``size`` a complete attempt
        ended with, if any), a restart after an error, and the run ends."""
        try:
            self._take_events(last_events)
            if size is not None:
                self._set_size(size)
            self.emit('speed-changed', self)
            self._set_state(final, self._tracked_by)
            if final == 'error' and self._restarted_by is None and \
                    self._settings.restart_wait >= 0:
                self._schedule_restart(self._restart_delay(self._settings.restart_wait),
                                       automatic=True)
        finally:
            with self._lock:  # (once: whoever it wakes sees the run done and dropped)
                run.done()
                if self._thread is run:  # a download keeps no run that ended (a
                    self._thread = None  # manager keeps thousands of downloads)
                if self._changed is not None:  # (_notify_changed, inline)
                    self._changed.notify_all()

    def _count_restart(self, failed: bool, failures: Optional[int],
                       retry_after: Optional[float], received: bool) -> None:
        """Count, in ``_failing``, what an attempt that did not complete
        leaves: the attempts that failed in a row (``failures``, of an
        error or a fatal one; a pause, ``None``, keeps the count), and the
        restart its end calls for (``failed``: an error) with its wait
        drawn: the ``n``-th in a row after failed attempts, ``n`` counted
        from 1 again after an attempt that ``received`` bytes, and from 0
        after one that completed (``_NOT_FAILING``, set by the run's
        steps), was paused or was fatal (whose wait is the base one: no
        draw to make, as ``_backed_off`` takes none below the second in a
        row); and the server's ``retry_after``. The run's steps."""
        count, streak = self._failing[0], self._failing[1]
        if failures is None:
            failures = count
        if not failed:
            self._failing = (failures, 0, 0.0, retry_after)
            return
        self._failing = (failures, 1 if received else streak + 1, _RESTART_RANDOM.random(),
                         retry_after)

    def _attempt_steps(self, run: _Run, options: _RequestOptions,
                       last_events: List[Tuple[str, Any]]) -> '_Steps[Optional[int]]':
        """One attempt: decide what to do with an existing file, run a
        transfer (its requests, and a checksum file's, made with
        ``options``), relay what it reports as signals (posted to ``run``;
        what it reports once finished, when its end waits for nothing, goes
        into ``last_events``, which the run's last call takes, also after a
        failure), and measure the speed every ``update_period``. Raises on
        failure; else the size the file ended with (``None``: signalled
        already), which the run's last call sets (one call less to post for
        every file). Its transfer
        stays in ``_transfer`` until ``_run_steps`` drops it, under the lock
        it takes for the attempt's end."""
        self._digest = None
        store = self._store
        if store is None:
            store = self._local_store()  # read just now
        else:
            store.load()  # the file may have changed since it was read
        # what if_exists makes of it: 'rename' and 'overwrite' act on the
        # first attempt of this downloader (or of its new ``path`` or
        # ``url``) only; the attempts after it, restarts and new starts,
        # resume what it began
        first, self._first_attempt = self._first_attempt, False
        settings = self._settings
        mode = settings.if_exists
        if mode == 'overwrite' and first:
            store.restart_from_zero()
        conditions: Optional[Dict[str, str]] = None
        replaces: Optional[pathlib.Path] = None
        if mode not in ('resume', 'overwrite') and store.is_path:  # (a look of one's own:
            # most resume, and make no call)
            found, conditions, replaces = self._prepare_target(run, store, mode, first)
            if found is None:  # 'skip': the file is taken as it is
                return None
            store = found
        checksum = settings.checksum if settings.checksum_file is None else \
            (yield from self._checksum_from_file_steps(options))
        store.hash_with = self._hash_with if store.is_path else None  # (a file read back)
        self._downloaded = self._resumed_from = store.held.total
        if store.size >= 0:
            _SIGNALS.post(run, self._set_size, store.size)
        metalink = self._metalink
        # by position, each argument named in its comment: a class called
        # with keywords has CPython build a dict of them for its __init__,
        # some 6,000 instructions for these 15 (0.7 % of a small file's)
        transfer = _Transfer(
            store,                                                  # store
            [self._address, *self._mirrors],                        # addresses
            options,                                                # options
            settings.connections if store.is_path else 1,           # connections
            settings.chunk_size,                                    # chunk_size
            self._buckets(),                                        # buckets
            checksum,                                               # checksum
            settings.max_size,                                      # max_size
            settings.min_speed,                                     # min_speed
            self._dir if settings.content_disposition else None,    # rename_in
            store.is_path and                                       # gzip_name
            str(self._path).lower().endswith(('.gz', '.tgz')),      # (is_path: no ABC's check)
            conditions,                                             # conditions
            settings.verify_digest,                                 # verify_digest
            metalink.size if metalink is not None else None,        # expected_size
            metalink.pieces if metalink is not None else None)      # piece_hashes
        # published with no lock (a section fewer per small file): a stop
        # sets _stopping under the lock before it reads _transfer, and this
        # reads _stopping after it wrote _transfer, so one of them at least
        # stops the transfer (both do no harm); a limit set since
        # _buckets() is added under the lock, where the rate_limit setter,
        # which sets the rate before it looks for a transfer, adds one to a
        # transfer it found
        self._transfer = transfer
        if self._stopping:
            transfer.stop()
        if self._bucket is None and self._rate_limit > 0:  # set since _buckets()
            with self._lock:
                if self._bucket is None:
                    self._limit_transfer(transfer)
        period = settings.update_period
        began = time.monotonic()
        tick_at, tick_received = began + period, 0
        due = min(tick_at, began + _TEND_PERIOD)
        try:
            transfer.start()
            while True:
                if (yield from transfer.wait_steps(due)):  # finished
                    break  # (its last events are relayed below: no look)
                # tend it: relay its events, let it look at itself, and
                # measure the speed every period
                self._relay(transfer.take_events(), run)
                now = time.monotonic()
                transfer.look(now)
                if now >= tick_at:
                    received = transfer.received
                    self._speed = (received - tick_received) / (now - tick_at + period)
                    self._received += received - tick_received
                    tick_received = received
                    tick_at = max(tick_at + period, now)
                    _SIGNALS.post(run, self.emit, 'speed-changed', self)
                due = min(tick_at, now + _TEND_PERIOD)
            joins = transfer.connections or transfer.saving  # (a small file's: none left)
            on_worker = store.held.total > _DISK_WORK_ON_LOOP or store.unsaved()
            if joins or on_worker:  # its end waits: what it told is told now
                self._relay(transfer.take_events(), run)
            else:  # (a small file's: with the run's last call)
                last_events += self._note_versions(transfer.take_events())
            if joins:  # (no generator made to find none left)
                yield from transfer.join_steps()
                on_worker = store.held.total > _DISK_WORK_ON_LOOP or store.unsaved()
            if on_worker:
                # its checks may read the whole file back, its save sync it
                yield from _on_worker_steps(transfer.result, 'bitpit-finish')
            else:
                transfer.result()
            self._digest = store.digest
        except BaseException:
            transfer.stop()  # leave no connection behind, whatever happened
            yield from transfer.join_steps()
            raise
        finally:
            self._received += transfer.received - tick_received
            # (set before the run's end drops the transfer, in the lock
            # section that marks the attempt over: a reader that finds no
            # transfer reads these; the run's steps alone use _best_held)
            self._downloaded = store.held.total
            self._best_held = max(self._best_held, self._downloaded)
        if transfer.unchanged and replaces is not None:  # 304: the file on disk is current
            self._downloaded = _local_size(replaces)
        elif replaces is not None and store.os_path is not None:
            try:
                os.replace(store.os_path, replaces)
            except OSError as exc:
                raise FileError('cannot replace {} with {}: {}'.format(
                    replaces, store.target, exc)) from exc
        return store.size if store.size >= 0 and not transfer.unchanged else self._downloaded

    def _checksum_from_file_steps(self, options: _RequestOptions
                                  ) -> '_Steps[Tuple[str, str]]':
        """The checksum the ``checksum='ALG:file:URL'`` file gives the file,
        by the name in its URL, else the name of its path. The run's
        steps."""
        assert self._settings.checksum_file is not None  # a checksum file was given
        algorithm, url = self._settings.checksum_file
        cancel = _Cancel()
        with self._lock:
            if self._stopping:
                raise _Stopped
            self._fetching = cancel
        try:
            body, _ = yield from _fetch_document_steps(
                options, url, 'checksum file', cancel=cancel)
            assert body is not None  # (no types asked for: never left unread)
        finally:
            with self._lock:
                self._fetching = None
        names = [urllib.parse.unquote(self._address.path.rsplit('/', 1)[-1])]
        path = self.path
        if isinstance(path, os.PathLike):
            names.append(path.name)
        return _digest_in_checksum_file(body.decode('utf-8', 'replace'), names, algorithm, url)

    def _prepare_target(self, run: _Run, store: _FileStore, mode: str, first: bool
                        ) -> Tuple[Optional[_FileStore], Optional[Dict[str, str]],
                                   Optional[pathlib.Path]]:
        """What ``if_exists`` ``mode`` (``'skip'``, ``'update'`` or
        ``'rename'``) makes of the target that ``store`` (of a path, just
        loaded) holds before an attempt, the ``first`` of this downloader
        for it: ``(store, conditions, replaces)``, the store to download
        into, the conditions of the first request and the file a complete
        download replaces (for ``'update'``); store ``None`` for a file
        taken as it is (``'skip'``). What it tells the callbacks, it posts
        to ``run``. The run's steps."""
        target = store.target
        if type(target) is str:  # (a path in the directory: its Path is made now)
            import pathlib
            target = pathlib.Path(target)
        assert isinstance(target, os.PathLike)  # (a path: is_path)
        taken_as_is = store.taken_as_is()  # (as the load just found it)
        if mode == 'skip' and taken_as_is:
            self._downloaded = store.held.total
            _SIGNALS.post(run, self._set_size, self._downloaded)
            return None, None, None
        if mode == 'rename' and first and store.found[0]:
            with self._lock:  # (as ``path`` may make one meanwhile)
                self._path = _free_name(target)
            self._store = store = _FileStore(self._path, self._url)
            _SIGNALS.post(run, self.emit, 'path-changed', self)
        if mode != 'update':
            return store, None, None
        newer = _FileStore(target.with_name(target.name + _NEWER_SUFFIX), self._url)
        if newer.held.total or not taken_as_is:
            return (newer if newer.held.total else store), None, \
                (target if newer.held.total else None)
        etag = _stored_etag(target)
        if etag:
            conditions = {'If-None-Match': etag}
        else:
            import email.utils
            conditions = {'If-Modified-Since': email.utils.formatdate(
                target.stat().st_mtime, usegmt=True)}
        return newer, conditions, target

    def _note_versions(self, events: List[Tuple[str, Any]]) -> List[Tuple[str, Any]]:
        """The transfer's ``events``, once the run's steps noted another
        version of the file among them: its progress counts afresh. The
        run's steps."""
        if ('restart', None) in events:  # (a look in C, not a loop: most have none)
            self._best_held = 0
        return events

    def _relay(self, events: List[Tuple[str, Any]], run: _Run) -> None:
        """Have the transfer's ``events`` turned into the download's state
        and signals, in one call posted to ``run`` for all of them (a small
        file's size and start of download come together). The run's
        steps."""
        if events:
            _SIGNALS.post(run, self._take_events, self._note_versions(events))

    def _take_events(self, events: List[Tuple[str, Any]]) -> None:
        """Set what the transfer's ``events`` tell, and signal it, in their
        order. The run's worker."""
        for kind, value in events:  # (in the order a file has them most)
            if kind == 'size':
                self._set_size(value)
            elif kind == 'download':
                self._set_state('download', ())  # (see _set_state)
            elif kind == 'path':
                self._set_path(value)
            elif kind == 'restart':
                self._set_size(-1)


    # -- the contract with bitpit's other layers --------------------------------
    # What Manager, the manifest, the command line and the asyncio layer may
    # use of a Downloader besides its public face; nothing else of it. A
    # manager makes the downloads it adds by URL with _another(), joins a
    # download with _join_manager() (one it made with _join_new()) and lets go with
    # _leave_manager(); marks one its plan starts (_planned_by, its
    # own to set and clear); stops many at once with _begin_stop() and
    # _end_stop(); restarts a failed one after _restart_delay(), and ends one
    # whose restart failed with _fail_outside(). The manifest hashes a file
    # as it is written (_hash_while_writing) and takes a recorded one as
    # complete (_take_as_complete). Whoever waits without blocking (the
    # command line, asyncio) asks _settled() and follows _watch()/_unwatch();
    # the progress display reads _held_at_start().

    def _another(self, url: str, path: Optional[_PathLike], dir_path: bool) -> 'Downloader':
        """A new download of ``url`` to ``path`` (``dir_path``), with this
        one's options: what ``Downloader(url, path, dir_path, **options)``
        makes, ``options`` being the other keyword arguments that made this
        one, without checking each of them again (they were checked when
        this one was made), ``path`` and ``dir_path`` among them. This one
        has no ``mirrors`` and no ``metalink``, and never ran: how a manager
        makes the downloads it adds by URL from its ``kwargs``, thousands of
        them. Any thread."""
        address = _check_url(url)
        d = Downloader.__new__(Downloader)
        d._metalink = None
        d._init_state(address)
        d._rate_limit = self._rate_limit
        d._requests = self._requests  # (read-only: a setter replaces a download's own)
        # shared, as the requests' are: a setter copies them first (their
        # if_exists was checked for the same kind of path)
        settings = d._settings = self._settings
        settings.shared = True
        d._mirrors = ()
        # the caller's jar is shared, as the constructor shares it; without
        # one (None), each download makes its own cookies (_keep_learnt)
        d._cookies = self._cookies
        if path is not None and self._dir is not None:
            # the directory this one's ``path`` gave (a Path, ~ expanded):
            # not made again from the same ``path`` (_set_dir's, inline: no
            # metalink; what the target holds, _init_state left unread)
            d._dir = self._dir
            d._path = _child_text(self._dir, _filename_from_url(address))
        else:  # (without a path, the current directory: now's)
            d._set_path_value(path, dir_path)
        return d

    def _join_manager(self, tracked_by: Tuple[Callable[['Downloader', str, str], None]],
                      terms: Tuple[_ManagerTerms]) -> None:
        """A manager takes the download over: ``tracked_by[0](download,
        old_state, state)`` is called at each state change (but a
        ``download`` after a ``start``, still under way), on the thread
        that made it, before the ``state-changed`` callbacks (after them for
        ``error`` and ``pause``: see ``_set_state``); in ``terms[0] =
        (restarts, buckets, host_slots)``, ``restarts()`` says whether it
        restarts the download after an error (then the download schedules
        no restart of its own, and any scheduled one is cancelled); its
        attempts draw from the manager's ``buckets`` too, and connect within
        its ``host_slots``. A manager gives each of its downloads the same
        two tuples, made once: a download in one manager (the usual case)
        keeps those very tuples (``() + t`` is ``t``), not two of its own.
        Each manager it was added to is told its state changes (bitpit
        1.2.0's managers listened to them); the last one restarts it, and
        gives it its limit and slots. The manager's caller's thread."""
        restarts, buckets, host_slots = terms[0]
        with self._lock:
            self._tracked_by += tracked_by
            self._terms += terms
        self._restarted_by = restarts
        self._cancel_restart()
        self._shared_buckets = buckets
        self._host_slots = host_slots

    def _join_new(self, tracked_by: Tuple[Callable[['Downloader', str, str], None]],
                  terms: Tuple[_ManagerTerms]) -> None:
        """``_join_manager`` for a download that the manager has just made
        (``_another``), which no other thread has yet, and which never
        started: no lock to take, no restart to cancel. The manager's
        caller's thread."""
        self._tracked_by = tracked_by
        self._terms = terms
        self._restarted_by, self._shared_buckets, self._host_slots = terms[0]

    def _leave_manager(self, tracked_by: Callable[['Downloader', str, str], None]) -> None:
        """The manager whose note is ``tracked_by`` lets the download go
        and is told no state change of it: the last of the managers it is
        still in restarts it and gives it its limit and slots; without one,
        it restarts by itself again, unlimited by any manager. Whoever waits
        looks again."""
        with self._lock:
            kept = [index for index, note in enumerate(self._tracked_by)
                    if note is not tracked_by]
            self._tracked_by = tuple(self._tracked_by[index] for index in kept)
            self._terms = tuple(self._terms[index] for index in kept)
            restarts, buckets, host_slots = self._terms[-1] if self._terms else (None, (), None)
        self._shared_buckets = buckets
        self._host_slots = host_slots
        self._restarted_by = restarts
        self._recheck_waiters()

    def _hash_while_writing(self, algorithm: str) -> None:
        """Hash the file with ``algorithm`` as it is written (a manifest
        records the digest). Before a start."""
        self._hash_with = algorithm

    def _begin_stop(self) -> Optional[_Run]:
        """The first half of ``stop()``, which never waits: tell the thread
        and its connections to stop; the thread to wait for, if any (a
        manager tells all its downloads before it waits for any)."""
        self._cancel_restart()
        with self._lock:
            thread = self._thread
            if thread is None or not thread.is_alive():
                return None
            self._stopping = True
            finishing = self._attempt_over
            transfer = self._transfer
            fetching = self._fetching
        if fetching is not None:
            fetching.cancel()
        if finishing:
            # The thread only emits its last signals: the stop need not wait
            # for it (a callback of it may be what called stop; waiting could
            # deadlock), only keep it from scheduling a restart.
            self._cancel_restart()
            return None
        if transfer is not None:
            transfer.stop()
        return thread if not thread.is_current() else None

    def _end_stop(self, thread: _Run) -> None:
        """The second half of ``stop()``: wait for ``thread`` (about a second
        at most), then seal the file if it is stuck."""
        transfer = self._transfer
        self._join_run(thread, _STOP_WAIT)
        if thread.is_alive() and transfer is not None:
            transfer.store.sealed = True
        self._cancel_restart()  # one the thread scheduled before it saw the stop
        if not _Run.live:
            # the last run stopped: the loop's thread ends as soon as its
            # last steps do, and a worker as soon as its task (a file's
            # end, renamed the while), so that no thread of bitpit's is
            # left at work
            _LOOP.join(_Signals.SPILL)
            _WORKERS.wait_quiet(_Signals.SPILL)

    def _settled(self) -> bool:
        """Nothing more will happen by itself: complete, fatal, or stopped
        (or failed) with no restart to come (a manager restarts its own)."""
        return self._thread is None and (self._state in _FINISHED_STATES or (
            not self.is_restarting and (self._restarted_by is None or
                                        not self._restarted_by())))

    def _recheck_waiters(self) -> None:
        """Make ``wait()`` look again (whoever restarts it stopped doing so)."""
        with self._lock:
            self._notify_changed()

    def _take_as_complete(self, size: int) -> None:
        """The file is already whole on disk (a manager's manifest says so):
        ``complete`` at once, without a request. The caller's thread, on a
        download that is not running."""
        self._local_store()
        self._downloaded = size
        self._set_size(size)
        with self._lock:
            self._let_go()
        self._set_state('complete', self._tracked_by)

    def _fail_outside(self, exc: BaseException) -> None:
        """An exception in a restart timer: the download ends in
        ``fatal-error`` with it, instead of a thread dying in silence."""
        self._last_exception = exc if isinstance(exc, Error) else _unexpected(exc)
        self._set_state('fatal-error', self._tracked_by)

    def _restart_delay(self, base: float) -> float:
        """Seconds before the restart after the last attempt, ``base``
        being the ``restart_wait`` in use (the download's or its
        manager's): the wait drawn for it, or the server's ``Retry-After``
        (never less than ``base``). Any thread."""
        base = max(0.0, base)
        _, streak, draw, retry_after = self._failing  # (replaced whole: one read)
        if retry_after is not None:
            return max(base, retry_after)
        return _backed_off(base, self._settings.restart_wait_max, streak, draw)

    def _watch(self, watcher: Callable[[], None]) -> None:
        """Call ``watcher()`` at every change that may settle the download,
        with the download's lock held: it must be quick and never block (it
        hands the news to an event loop). Any thread."""
        with self._lock:
            self._changes().watchers.append(watcher)

    def _unwatch(self, watcher: Callable[[], None]) -> None:
        """Stop calling ``watcher``; ``ValueError`` if it was not watching."""
        with self._lock:
            self._changes().watchers.remove(watcher)

    def _held_at_start(self) -> int:
        """Bytes the file held when the current or last attempt began."""
        return self._resumed_from


def _per_second(n: float) -> Tuple[float, str]:
    number, suffix = human_readable(n)
    return number, suffix + '/s'


# ---------------------------------------------------------------------------
# many machines: shard(), and the manifest of the downloads that ended
# ---------------------------------------------------------------------------

def shard(urls: Iterable[Any], index: int, count: int) -> List[Any]:
    """The items of ``urls`` in shard ``index`` of ``count``, in their order.

    An item is a URL (``str``), or a tuple or list whose first item is the
    URL (a file with its mirrors, say); the rest of it is not looked at. An
    item is in shard ``int.from_bytes(sha256(url.encode('utf-8'))
    .digest()[:8], 'big') % count``: the same list and count give the same
    shards on any machine, in any language, and together the shards are the
    list. ``TypeError`` for another kind of item or a non-``int`` index or
    count; ``ValueError`` unless ``0 <= index < count``. Any thread."""
    _check_int('count', count, 1)
    _check_int('index', index, 0, count - 1)
    if isinstance(urls, (str, bytes)):
        raise TypeError('urls must be a list of URLs, not one {}'.format(type(urls).__name__))
    import hashlib
    chosen = []
    for item in urls:
        url = item[0] if isinstance(item, (tuple, list)) and item else item
        if not isinstance(url, str):
            raise TypeError('shard() takes URLs (str), or tuples or lists that begin with '
                            'the URL, not {!r}'.format(item))
        digest = hashlib.sha256(url.encode('utf-8')).digest()
        if int.from_bytes(digest[:8], 'big') % count == index:
            chosen.append(item)
    return chosen


_MANIFEST_SYNC = 1.0  # least seconds between two syncs of a manifest to the disk
# how every line of a manifest begins (``url`` is written first): so does a
# torn last line
_MANIFEST_HEAD = b'{"url": '


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


_MANIFEST_FIELDS = {
    'url': lambda value: isinstance(value, str),
    'path': _is_text,
    'size': lambda value: value is None or _is_count(value),
    'sha256': lambda value: value is None or (isinstance(value, str) and
                                              re.fullmatch(r'[0-9a-f]{64}', value) is not None),
    'state': lambda value: value in _FINISHED_STATES,
    'error': _is_text,
    'seconds': lambda value: isinstance(value, (int, float)) and not isinstance(value, bool)
    and value >= 0,
}


def _json_value(line: bytes) -> Any:
    """The JSON value ``line`` holds, or ``None``."""
    import json
    try:
        return json.loads(line.decode('utf-8'))
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        return None


class _Manifest:
    """A manager's manifest: a JSON Lines file with one object per download
    that ended (``complete`` or ``fatal-error``), appended as each ends.

    Opening it reads what it holds: a file that is not a manifest raises
    ``ValueError`` (and is left as it is); a torn last line, the trace of a
    killed process, is cut off. A URL recorded ``complete`` whose file is
    still at its path with its size is taken as complete by ``adopt``,
    without a request. Each line goes to the file in one ``write`` on a
    descriptor opened for appending, so a killed process leaves at most a
    torn last line; the file is synced (``fsync``) at most once a second, and
    by ``sync`` at the end of a run.

    Download threads (from ``_set_state``) call ``note``; the manager's callers ``adopt``; any
    thread ``sync``. ``_lock`` guards the records, the start times and the
    sync's state, and the appends."""

    def __init__(self, path: Any):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError('manifest must be a path, not {!r}'.format(path))
        self.path = _as_path(path).absolute()
        self._lock = threading.Lock()
        self._complete: Dict[str, Dict[str, Any]] = {}  # URL -> its last record, if complete
        import weakref
        self._began: 'weakref.WeakKeyDictionary[Downloader, float]' = \
            weakref.WeakKeyDictionary()
        self._synced_at = -_MANIFEST_SYNC
        self._unsynced = False
        self._load()

    def _load(self) -> None:
        """Read the records; cut a torn last line off, or end a whole last
        line that lacks its line feed. ``ValueError`` before anything is
        written if the file is not a manifest, ``FileError`` if it cannot be
        opened."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, 'O_BINARY', 0), 0o666)
        except OSError as exc:
            raise FileError('cannot open the manifest {}: {}'.format(self.path, exc)) from exc
        with open(fd, 'r+b') as file:
            try:
                data = file.read()
            except OSError as exc:
                raise FileError('cannot read the manifest {}: {}'.format(self.path, exc)) from exc
            lines = data.split(b'\n')
            for number, line in enumerate(lines[:-1], 1):
                if line.strip():
                    self._take(self._parse(line, number))
            tail = lines[-1]
            if not tail:
                return
            if _json_value(tail) is None and (tail.startswith(_MANIFEST_HEAD) or
                                              _MANIFEST_HEAD.startswith(tail)):
                file.truncate(len(data) - len(tail))  # torn: the rest of it never came
                return
            self._take(self._parse(tail, len(lines)))
            file.write(b'\n')

    def _parse(self, line: bytes, number: int) -> Dict[str, Any]:
        """One line as a record; ``ValueError`` naming the file and the line
        if it is not one."""
        record = _json_value(line)
        if not isinstance(record, dict):
            raise ValueError('{} is not a bitpit manifest: line {} is not a JSON object'
                             .format(self.path, number))
        wrong = [name for name, fits in _MANIFEST_FIELDS.items()
                 if name not in record or not fits(record[name])]
        if wrong:
            raise ValueError('{} is not a bitpit manifest: line {} lacks or has a wrong {}'
                             .format(self.path, number, ', '.join(wrong)))
        return record

    def _take(self, record: Dict[str, Any]) -> None:
        """The last record of a URL says what became of it."""
        if record['state'] == 'complete':
            self._complete[record['url']] = record
        else:
            self._complete.pop(record['url'], None)

    def adopt(self, d: Downloader) -> None:
        """``d`` joins the manager: its file is hashed as it is written, and
        it is complete at once if it is recorded complete and its file is
        still at its path with its size (and no sidecar), unless its
        ``if_exists`` asks for a request even then (``'update'``,
        ``'rename'``, ``'overwrite'``). The caller's thread."""
        d._hash_while_writing('sha256')
        path = d.path
        with self._lock:
            record = self._complete.get(d.url)
        if record is None or d.is_alive or d.state != 'pause' or \
                d.if_exists not in ('resume', 'skip') or \
                not isinstance(path, os.PathLike) or os.path.abspath(path) != record['path']:
            return
        try:
            status = os.stat(path)
        except OSError:
            return
        if stat.S_ISREG(status.st_mode) and status.st_size == record['size'] and \
                not os.path.lexists(str(path) + _SIDECAR_SUFFIX):
            d._take_as_complete(status.st_size)

    def note(self, d: Downloader) -> None:
        """A state change of ``d``: its first start is remembered, its end
        appended. The download's thread."""
        now = time.monotonic()
        state = d.state
        with self._lock:
            began = self._began.setdefault(d, now)
        if state not in _FINISHED_STATES:
            return
        path = d.path
        record: Dict[str, Any] = {
            'url': d.url,
            'path': os.path.abspath(path) if isinstance(path, os.PathLike) else None,
            'size': d.downloaded if state == 'complete' else (d.size if d.size >= 0 else None),
            'sha256': self._sha256(d) if state == 'complete' else None,
            'state': state,
            'error': str(d.last_exception) if state == 'fatal-error' and
            d.last_exception is not None else None,
            'seconds': round(now - began, 3)}
        import json
        line = (json.dumps(record) + '\n').encode('utf-8')
        with self._lock:
            self._began.pop(d, None)
            self._take(record)
            self._append(line)

    @staticmethod
    def _sha256(d: Downloader) -> Optional[str]:
        """The SHA-256 of ``d``'s complete file: the one computed while it
        was written, else read from disk (a file taken as it was, a
        ``checksum`` of another algorithm)."""
        if d._digest is not None and d._digest[0] == 'sha256':
            return d._digest[1]
        if not isinstance(d.path, os.PathLike):
            return None
        try:
            return _FileStore(d.path, d.url).read_digest('sha256')
        except FileError as exc:
            _log.warning('cannot compute the SHA-256 of %s: %s', d.path, exc)
            return None

    def _append(self, line: bytes) -> None:
        """Write ``line`` at the end of the file in one ``write``, and sync
        the file if the last sync is a second old. A line that cannot be
        written whole (a full disk) is taken back. Under the lock."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT |
                         getattr(os, 'O_BINARY', 0), 0o666)
            try:
                end = os.lseek(fd, 0, os.SEEK_END)
                written = 0
                try:
                    while written < len(line):
                        written += os.write(fd, line[written:])
                except OSError:
                    os.ftruncate(fd, end)  # no torn line before the next one
                    raise
                self._unsynced = True
                if time.monotonic() - self._synced_at >= _MANIFEST_SYNC:
                    self._fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            _log.warning('cannot write to the manifest %s: %s', self.path, exc)

    def _fsync(self, fd: int) -> None:
        os.fsync(fd)
        self._synced_at = time.monotonic()
        self._unsynced = False

    def sync(self) -> None:
        """Sync what was appended since the last sync to the disk (the end
        of a run). Any thread."""
        with self._lock:
            if not self._unsynced:
                return
            try:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, 'O_BINARY', 0))
                try:
                    self._fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                _log.warning('cannot sync the manifest %s: %s', self.path, exc)


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
    ``complete`` and ``fatal-error`` downloads never are. With
    ``max_per_host``, its ``_HostSlots`` caps the connections open at once
    to each host over all its downloads. With a ``manifest``, each download
    that ends is recorded there, and one recorded complete whose file is
    still there is complete at once.

    Signals: ``add (manager, downloader)``, ``remove (manager, downloader)``,
    ``property-changed (manager, name)``.
    """
    __signals__ = ('add', 'remove', 'property-changed')

    def __init__(self, max_running: int = 0, rate_limit: float = 0,
                 restart_wait: float = 30, *, max_per_host: int = 0,
                 manifest: Optional[_PathLike] = None, **kwargs: Any):
        # _lock guards the downloads and what the manager knows of them
        # (_cond, on it, wakes the manager thread); each of these stays
        # small or is kept up to date as states change, so that a plan costs
        # the slots it fills, not the downloads added
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._downloads: Dict[Downloader, int] = {}   # each one's turn: oldest first
        self._turns = itertools.count()
        self._running: Dict[Downloader, int] = {}     # started by it, or under way
        # to start, as (turn, d): one whose turn comes after that of the
        # last in _in_turn (most: added one after another) is appended to
        # it, which stays in turn order; the others (a download to start
        # again) go into _queue, a heap. The next to start is the first of either: no heap
        # to sift through the thousands added (a pop of a heap of 3,000 costs
        # some 2,700 instructions, a deque's some 100)
        self._in_turn: 'collections.deque[Tuple[int, Downloader]]' = collections.deque()
        self._queue: List[Tuple[int, Downloader]] = []
        self._queued: Set[Downloader] = set()         # in _in_turn or _queue
        # not complete or fatal (maybe), each with when it last stopped
        # (error or pause) while the manager had it, or None: the time to
        # count its restart from, which no other table holds (one pop a
        # file fewer as it ends)
        self._open: Dict[Downloader, Optional[float]] = {}
        self._bucket = _TokenBucket(_check_number('rate_limit', rate_limit))
        # what each of its downloads holds of it, made once: not an object
        # (a tuple, a bound method) per download
        self._shared_buckets = (self._bucket,)
        self._restarts_bound: Callable[[], bool] = self._restarts
        self._on_state_bound: Callable[[Downloader, str, str], None] = self._on_state_changed
        self._max_running = _check_int('max_running', max_running)
        self._rate_limit = rate_limit
        self._restart_wait = _check_number('restart_wait', restart_wait)
        self._kwargs = _checked_kwargs(kwargs)
        # (a copy of the kwargs, a download made with them, and their path
        # and dir_path): what add(url) makes its downloads like, made at
        # the first need; read and replaced whole, so that needs no lock
        self._model: Optional[Tuple[Dict[str, Any], Downloader, Optional[_PathLike],
                                    bool]] = None
        self._max_per_host = _check_int('max_per_host', max_per_host, 0)
        self._host_slots = _HostSlots(max_per_host) if max_per_host else None
        # what Downloader._join_manager is given: each of its downloads keeps it
        self._joined = ((self._on_state_bound,),
                        ((self._restarts_bound, self._shared_buckets, self._host_slots),))
        self._thread: Optional[threading.Thread] = None
        self._started = False
        self._replan = False
        self._manifest = _Manifest(manifest) if manifest is not None else None
        # what marks a download its plan starts (Downloader._planned_by):
        # its notes, so that a download in it alone tells it nothing of a
        # start it counted already; None with a manifest, which notes each
        # download's first start (_Manifest.note)
        self._plan_notes = self._joined[0] if self._manifest is None else None

    # -- properties ------------------------------------------------------------

    def _set_property(self, name: str, value: Any) -> None:
        with self._lock:
            setattr(self, '_' + name, value)
        self.emit('property-changed', self, name)
        self.update()

    @property
    def max_running(self) -> int:
        """Most downloads running at once; ``<= 0``: no limit."""
        return self._max_running

    @max_running.setter
    def max_running(self, value: int) -> None:
        self._set_property('max_running', _check_int('max_running', value))

    @property
    def rate_limit(self) -> float:
        """Total bytes per second over all running downloads; ``<= 0``:
        none. Takes effect at once."""
        return self._rate_limit

    @rate_limit.setter
    def rate_limit(self, value: float) -> None:
        self._bucket.rate = _check_number('rate_limit', value)
        self._set_property('rate_limit', value)

    @property
    def restart_wait(self) -> float:
        """Seconds a stopped download waits before the manager starts it
        again."""
        return self._restart_wait

    @restart_wait.setter
    def restart_wait(self, value: float) -> None:
        self._set_property('restart_wait', _check_number('restart_wait', value))

    @property
    def max_per_host(self) -> int:
        """Most connections open at once to one (scheme, host, port), over
        all the downloads; ``0``: no limit."""
        return self._max_per_host

    @property
    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for the ``Downloader`` that ``add(url)`` makes."""
        return self._kwargs

    @kwargs.setter
    def kwargs(self, value: Dict[str, Any]) -> None:
        self._set_property('kwargs', _checked_kwargs(value))

    @property
    def downloads(self) -> List[Downloader]:
        """A copy of the list of added downloads, oldest first."""
        with self._lock:
            return list(self._downloads)

    @property
    def manifest(self) -> Optional[pathlib.Path]:
        """The manifest's absolute path, or ``None``."""
        return self._manifest.path if self._manifest is not None else None

    # -- control ----------------------------------------------------------------

    def add(self, d: Union[str, Downloader]) -> Downloader:
        """Add a URL (made into ``Downloader(url, **kwargs)``) or a
        ``Downloader``; return the downloader. Emits ``add``."""
        if not isinstance(d, Downloader):
            d = self._made(d)
            if self._manifest is None and 'add' not in self._emitter_callbacks:
                # made here (no other thread has it) and nobody to tell:
                # joined with no lock of its own, and added and queued in
                # one step
                d._join_new(*self._joined)
                with self._lock:
                    self._downloads[d] = turn = next(self._turns)
                    # (_track's, inline: a new download, paused, waits for
                    # its turn, the newest, which keeps _in_turn in order)
                    self._open[d] = None
                    self._queued.add(d)
                    self._in_turn.append((turn, d))
                    self._replan_now()
                return d
        with self._lock:
            if d in self._downloads:
                return d
            self._downloads[d] = turn = next(self._turns)
        if self._manifest is not None:  # first: a download it takes as complete is not
            self._manifest.adopt(d)     # one to note as ending now
        d._join_manager(*self._joined)
        self.emit('add', self, d)  # before it waits for its turn: no plan starts it sooner
        with self._lock:
            if self._downloads.get(d) == turn:  # not removed (or added again) by a callback
                self._track(d, d.state)
            self._replan_now()
        return d

    def _made(self, url: str) -> Downloader:
        """``Downloader(url, **kwargs)``, made like a model download made
        with the same ``kwargs``, whose options were checked once: only the
        URL and the path are new. The model is made again when ``kwargs``
        differs from the copy it was made with (it was set, or changed in
        place: a dict in it, ``headers``, is copied too). ``mirrors`` (rare
        in a manager's kwargs) depend on the URL: with them, each download
        is made by the constructor. Any thread."""
        kwargs = self._kwargs
        if 'mirrors' in kwargs:
            return Downloader(url, **kwargs)
        model = self._model
        if model is None or model[0] != kwargs:
            copied = {name: dict(value) if isinstance(value, dict) else value
                      for name, value in kwargs.items()}
            model = self._model = (copied, Downloader(_MODEL_URL, **kwargs),
                                   kwargs.get('path'), kwargs.get('dir_path', False))
        return model[1]._another(url, model[2], model[3])  # (with kwargs' path and dir_path)

    def add_metalink(self, source: Any, **kwargs: Any) -> List[Downloader]:
        """Add one download for each file the metalink at ``source`` (a path
        or an http(s) URL, read now) lists, made with the manager's
        ``kwargs`` updated by ``kwargs``; ``path`` is a directory (default:
        the current one) where each file is named after the metalink.
        Returns the downloaders, in the document's order. Raises what
        reading the document raises (``ProtocolError`` for a bad one)."""
        options = dict(self._kwargs, **kwargs)
        options['dir_path'] = True
        for name in ('url', 'metalink'):
            if name in options:
                raise TypeError('add_metalink() takes no {} argument'.format(name))
        files = _read_metalink(source, lambda url: _document_options(url, **options))
        return [self.add(Downloader(metalink=entry, **options)) for entry in files]

    def remove(self, d: Downloader) -> None:
        """Forget ``d`` (a running download is not stopped). Emits
        ``remove``; ``ValueError`` if it was not added."""
        with self._lock:
            if self._downloads.pop(d, None) is None:
                raise ValueError('{!r} was not added to this manager'.format(d))
            self._running.pop(d, None)
            self._open.pop(d, None)
            d._planned_by = None
            if d in self._queued:
                self._queued.discard(d)
                self._queue = [entry for entry in self._queue if entry[1] is not d]
                heapq.heapify(self._queue)
                self._in_turn = collections.deque(
                    entry for entry in self._in_turn if entry[1] is not d)
        d._leave_manager(self._on_state_bound)
        self.emit('remove', self, d)
        self.update()

    def start(self) -> None:
        """Start the manager thread. It runs while there is work: until
        ``stop()`` or until every download is complete or fatal."""
        with self._lock:
            self._started = True
        self.update()

    def stop(self) -> None:
        """Stop the manager thread (downloads keep running: see
        ``stop_all``). Waits for the thread unless called from it."""
        with self._lock:
            self._started = False
            # detached: a start() from now on gets a thread of its own, and
            # this one ends at its next look, whatever start() does meanwhile
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        # no more restarts from here: wait() may end. Not for one complete
        # or fatal, which waits for no restart: the open ones look again (a
        # download waiting for a restart is in _open: its thread tracked its
        # last state before it woke its waiters)
        with self._lock:
            unfinished = list(self._open)
        for d in unfinished:
            d._recheck_waiters()
        if self._manifest is not None:
            self._manifest.sync()

    def _restarts(self) -> bool:
        """Whether the manager restarts its downloads now (it is started).
        Any thread; a plain read."""
        return self._started

    def stop_all(self) -> None:
        """Pause every running download; the manager keeps running. Every
        download is told to stop first, then each is waited for, so that
        many stop in about the time one does."""
        stopping = [(d, d._begin_stop()) for d in self.downloads]
        for d, thread in stopping:
            if thread is not None:
                d._end_stop(thread)

    def update(self) -> None:
        """Ask the manager thread to re-plan now: which downloads to start
        or stop. Any thread; never blocks on the network."""
        with self._lock:
            self._replan_now()

    def _replan_now(self) -> None:
        """Have the manager thread re-plan, starting one if the manager is
        started and its thread ended (every download was finished). Under
        ``_lock``. Only the manager thread waits on ``_cond``: with none
        (before ``start()``, as thousands of downloads are added) there is
        nobody to wake, nor while a re-plan it was asked for is still to
        come (as downloads end one after another, and it starts the next):
        that one, under the lock, sees this change too."""
        asked_already, self._replan = self._replan, True
        if self._thread is not None:
            if not asked_already:
                self._cond.notify_all()
        elif self._started:
            self._thread = threading.Thread(target=self._run, name='bitpit-manager')
            self._thread.start()

    def _on_state_changed(self, d: Downloader, old_state: str, state: str) -> None:
        """Note when a download stopped (in the manifest when it ended) and
        re-plan if that freed a slot. The thread that changed the state
        (the download's, mostly), before the download's callbacks (after
        them for an error or a pause)."""
        if self._manifest is not None:
            self._manifest.note(d)
        if state in _ACTIVE_STATES and d in self._running:
            # under way, as the manager knows already: a start of its own
            # plan (which put it in _running before it started it; read
            # without the lock, as nothing but its removal takes it out
            # while it runs, after which there is nothing to note), told
            # only to a manager with a manifest or to one of several
            # managers (see Downloader._start). Of a 'download' after the
            # start, the download tells nothing
            return
        with self._lock:
            if d not in self._downloads:
                return  # removed meanwhile
            if state in _FINISHED_STATES:  # (_track's, inline: once a file)
                self._running.pop(d, None)
                d._planned_by = None
                self._open.pop(d, None)
            else:
                self._track(d, state)
                if state in _ACTIVE_STATES:
                    return  # a download getting under way frees no slot
                self._open[d] = time.monotonic()  # (an error or a pause: when it stopped)
            # a finished download started again (restart()) may fail: the
            # manager restarts it, with a new thread if its own ended
            self._replan_now()

    def _track(self, d: Downloader, state: str) -> None:
        """What ``state`` makes of ``d``: running, finished, or waiting in
        the queue for its turn. Under ``_lock``."""
        if state in _ACTIVE_STATES:
            self._running[d] = self._downloads[d]
            self._open[d] = None
            return
        self._running.pop(d, None)
        d._planned_by = None  # (counted running no longer)
        if state in _FINISHED_STATES:  # never started again: nothing to keep
            self._open.pop(d, None)
            return
        self._open[d] = None  # (no stop noted: _on_state_changed notes an error's, a pause's)
        if d not in self._queued:
            self._queued.add(d)
            entry = (self._downloads[d], d)
            in_turn = self._in_turn
            if not in_turn or in_turn[-1][0] < entry[0]:
                in_turn.append(entry)
            else:
                heapq.heappush(self._queue, entry)

    # -- the manager thread ----------------------------------------------------

    def _run(self) -> None:
        """Re-plan whenever notified, or when the next restart becomes due.
        Ends when stopped (or replaced by a newer thread after a stop), or
        when every download is finished. The manager thread."""
        me = threading.current_thread()
        wait: Optional[float] = None
        while True:
            with self._lock:
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
                    break
            for d in to_stop:
                d.stop()
            for d in to_start:
                try:
                    d.start()
                except BaseException as exc:  # it fails, not the manager thread
                    d._fail_outside(exc)
        if self._manifest is not None:  # every download ended
            self._manifest.sync()

    def _unfinished(self) -> bool:
        """Whether a download is neither complete nor fatal (those found
        finished leave ``_open``). Under ``_lock``."""
        while self._open:
            d = next(iter(self._open))
            if d._state not in _FINISHED_STATES:  # (not through the property)
                return True
            del self._open[d]
        return False

    def _plan(self) -> Tuple[List[Downloader], List[Downloader], Optional[float]]:
        """Decide, under the lock, which downloads to stop (the newest
        running beyond ``max_running``) and start (the oldest waiting whose
        restart is due), and how long until the next restart becomes due
        (``None``: none pending)."""
        now = time.monotonic()
        limit = self._max_running if self._max_running > 0 else len(self._downloads)
        to_stop: List[Downloader] = []
        if len(self._running) > limit:
            by_turn = sorted(self._running, key=self._running.__getitem__)
            to_stop = by_turn[limit:]
        free = limit - len(self._running)
        to_start: List[Downloader] = []
        later: List[Tuple[int, Downloader]] = []
        wait: Optional[float] = None
        in_turn, queue = self._in_turn, self._queue
        while free > 0 and (in_turn or queue):
            # the oldest: the first of either (turns are unique)
            if in_turn and (not queue or in_turn[0][0] < queue[0][0]):
                turn, d = in_turn.popleft()
            else:
                turn, d = heapq.heappop(queue)
            self._queued.discard(d)
            if self._downloads.get(d) != turn or d in self._running:
                continue  # removed (or added again), or started meanwhile
            state = d._state  # (not through the property: a call per download)
            if state not in _RESTARTABLE_STATES:  # finished, or under way
                self._track(d, state)  # (a change its signal has yet to tell)
                continue
            stopped_at = self._open.get(d)
            if stopped_at is not None:  # (none for most: added, never stopped)
                delay = d._restart_delay(self._restart_wait) - (now - stopped_at)
                if delay > 0:
                    wait = delay if wait is None else min(wait, delay)
                    later.append((turn, d))
                    continue
            to_start.append(d)
            self._running[d] = turn
            d._planned_by = self._plan_notes  # (see Downloader._start)
            free -= 1
        for turn, d in later:
            self._queued.add(d)
            heapq.heappush(self._queue, (turn, d))
        return to_stop, to_start, wait


def _checked_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``Downloader`` keyword arguments, checked now by making a downloader
    with them (``TypeError``/``ValueError`` naming the bad one). A
    ``cookies.txt`` path is loaded once, so its jar is shared."""
    kwargs = dict(kwargs)
    if isinstance(kwargs.get('cookies'), (str, os.PathLike)):
        kwargs['cookies'] = _Cookies(kwargs['cookies'])
    Downloader(_MODEL_URL, **kwargs)
    return kwargs


_MODEL_URL = 'http://localhost/'  # of the downloads that check a manager's kwargs


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

_CLI_RESTART_WAIT = 1  # then up to 2, 4, 8, 10 s: at most 25 s for 5 retries
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
    return _download_all(_assign_paths([(url, ()) for url in urls], None), rate_limit=rate,
                         max_running=max_running, restart_wait=_CLI_RESTART_WAIT,
                         downloader_kwargs={'timeout': _CLI_TIMEOUT,
                                            'retries': _CLI_RETRIES},
                         output='auto')


if TYPE_CHECKING:
    _File = TypeVar('_File', bound=_BinaryFile)


@overload
def download(url: str, path: Union[None, str, os.PathLike[str]] = None, *,
             progress: bool = False, **kwargs: Any) -> pathlib.Path: ...
@overload
def download(url: str, path: _File, *, progress: bool = False, **kwargs: Any) -> _File: ...
def download(url: str, path: Optional[_PathLike] = None, *, progress: bool = False,
             **kwargs: Any) -> _Target:
    """Download ``url`` and return its path once the file is complete: one
    call that blocks, from any thread (from asyncio:
    ``await asyncio.to_thread(bitpit.download, url)``).

    ``path`` and ``kwargs`` are ``Downloader``'s (``connections``,
    ``restart_wait``, ``retries``, ``checksum``, ``if_exists``, ...); the
    path returned is the final one (after a ``Content-Disposition`` name or
    a rename). Raises the download's ``bitpit.Error`` when it ends in
    ``fatal-error``, or in ``error`` with no restart to come. With
    ``progress=True`` a line on standard error shows the progress, when that
    is a terminal. ``KeyboardInterrupt`` stops the download, keeping the
    partial file resumable, and propagates."""
    d = Downloader(url, path, **kwargs)
    line = _ProgressLine.on_terminal(d) if progress else None
    try:
        d.start()
        # waits in slices, so that Ctrl-C gets through where a plain wait
        # cannot be interrupted, and the progress line is redrawn
        while not d.wait(_CLI_REFRESH) and not d._settled():
            if line is not None:
                line.draw()
    except BaseException:
        while True:  # even if Ctrl-C is pressed again meanwhile
            try:
                d.stop()
                break
            except KeyboardInterrupt:
                continue
        raise
    finally:
        if line is not None:
            line.close()
    return _final_path(d)


def _final_path(d: Downloader) -> _Target:
    """What ``download()`` returns once ``d`` is settled: its final path when
    it is complete; else it raises the download's error."""
    if d.state != 'complete':
        raise d.last_exception or Error('the download of {} stopped before it was '
                                        'complete'.format(d.url))
    return d.path


class _ProgressLine:
    """``download(progress=True)``: the command line's row for one download,
    redrawn in place on standard error."""

    def __init__(self, d: Downloader):
        self.d = d

    @classmethod
    def on_terminal(cls, d: Downloader) -> Optional['_ProgressLine']:
        """A line for ``d`` when standard error is a terminal, else ``None``."""
        return cls(d) if _isatty(sys.stderr) and _enable_ansi(sys.stderr) else None

    def draw(self) -> None:
        import shutil
        width = max(shutil.get_terminal_size().columns - 1, 20)
        _write(sys.stderr, '\r' + _table_row(self.d, width) + '\x1b[K')

    def close(self) -> None:
        self.draw()
        _write(sys.stderr, '\n')


# ---------------------------------------------------------------------------
# asyncio: adownload(), await d and d.events(), for coroutines
# ---------------------------------------------------------------------------
#
# A download runs in bitpit's threads; the event loop's thread must never
# wait for them. What those threads tell (a signal, or a change that wait()
# looks at, through _Changed's watchers) is handed to the loop with
# loop.call_soon_threadsafe, which never blocks; the rest happens in the
# loop's thread, which takes no lock that a bitpit thread holds for long.
# start() and stop() wait for threads (Thread.start() until the new thread
# runs: 0.4 ms typically, 2 ms and more on a busy machine; stop() joins the
# download's run, up to _STOP_WAIT), and Downloader() reads the disk
# (the file, its sidecar); each call that lets go of the GIL may wait for
# it up to sys.getswitchinterval() (5 ms) while bitpit's threads run. So
# adownload() hands the making, starting and stopping of its download to a
# thread of bitpit's (_Starter) through a queue.SimpleQueue, whose put()
# never waits, as a Manager's thread starts its downloads; the download
# tells the loop when it settles, as await d does.
# asyncio is imported only here, where a loop already runs (so it costs
# nothing).

def _hand_over(loop: Any, func: Callable[..., None], *args: Any) -> bool:
    """Have ``loop`` call ``func(*args)`` in its thread soon; ``False`` when
    the loop is closed (nobody is left to tell). Any thread; never blocks."""
    try:
        loop.call_soon_threadsafe(func, *args)
    except RuntimeError:  # 'Event loop is closed'
        return False
    return True


def _set_result(future: Any, value: Any) -> None:
    """Resolve ``future`` unless it is done already (or was cancelled). The
    loop's thread."""
    if not future.done():
        future.set_result(value)


def _set_exception(future: Any, exc: BaseException) -> None:
    """Fail ``future`` unless it is done already. The loop's thread."""
    if not future.done():
        future.set_exception(exc)


class _Settling:
    """Hands what ``d.wait()`` would return (``True`` only when complete)
    to ``future``, a future of ``loop``, once the download is settled, and
    stops watching then. Made and closed in any thread; ``_watch`` runs in
    the thread that changed the download, under the download's lock.
    ``_told`` only spares the loop more hand-overs: one that races the
    first is harmless."""

    def __init__(self, d: Downloader, loop: Any, future: Any):
        self._d, self._loop, self.future = d, loop, future
        self._told = False
        d._watch(self._watch)
        self._watch()  # wait() would return at once

    def _watch(self) -> None:
        d = self._d
        if not self._told and d._settled():
            self._told = True
            _hand_over(self._loop, _set_result, self.future, d.state == 'complete')
            self.close()

    def close(self) -> None:
        """Stop watching the download. Any thread."""
        try:
            self._d._unwatch(self._watch)
        except ValueError:  # closed already
            pass


async def _with_progress(future: Any, line: Optional[_ProgressLine]) -> bool:
    """Await a ``_Settling``'s future; with a progress ``line``, redrawn
    every ``_CLI_REFRESH`` seconds meanwhile."""
    import asyncio
    if line is None:
        return await future
    while not future.done():
        await asyncio.wait((future,), timeout=_CLI_REFRESH)
        line.draw()
    return future.result()


async def _wait_settled(d: Downloader) -> bool:
    """``await d``: ``d.wait()`` for a coroutine."""
    import asyncio
    loop = asyncio.get_running_loop()
    settling = _Settling(d, loop, loop.create_future())
    try:
        return await settling.future
    finally:
        settling.close()


class _Starter:
    """The thread that makes, starts and stops the downloads of
    ``adownload()`` for one event loop, in the order asked (``jobs``): the
    loop's thread must not wait for ``Thread.start()`` (which waits until
    the new thread runs) nor read the disk. It lives while the loop has an
    ``adownload()`` under way: the loop's thread counts them (``users``) and
    ends it with ``None`` when none is left. The thread itself is started
    in the loop's default executor (``running``). It is a daemon thread: a
    loop closed with an ``adownload()`` still pending (a task destroyed
    while pending) never ends it, and the program must not wait for it at
    exit. ``_STARTERS`` holds each loop's; only that loop's thread uses its
    entry and ``users``."""

    def __init__(self, loop: Any):
        import queue
        self.jobs: Any = queue.SimpleQueue()
        self.users = 0
        thread = threading.Thread(target=self._run, name='bitpit-asyncio', daemon=True)
        self.running = loop.run_in_executor(None, thread.start)

    @classmethod
    async def enter(cls, loop: Any) -> '_Starter':
        """The loop's starter, counted as used until ``leave()``."""
        import asyncio
        starter = _STARTERS.get(loop)
        if starter is None:
            starter = _STARTERS[loop] = cls(loop)
        starter.users += 1
        try:
            await asyncio.shield(starter.running)  # a cancel must not cancel it for all
        except BaseException:
            starter.leave(loop)
            raise
        return starter

    def leave(self, loop: Any) -> None:
        self.users -= 1
        if self.users == 0:
            del _STARTERS[loop]
            self.jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()


_STARTERS: Dict[Any, _Starter] = {}


class _Download:
    """One ``adownload()``, between the loop's thread and its starter:
    ``start`` makes ``d`` there, has ``_Settling`` watch it and starts it;
    ``settled`` (a future of the loop) gets what ``wait()`` gives, or the
    error of making or starting the download. ``stop`` stops it in a thread
    of its own (``stop()`` joins the download's run), so that many stop at
    once. ``d`` and ``settling`` are set by the starter, read by the loop's
    thread once ``settled`` is done or the stop is over; ``abandoned`` is
    set by the loop's thread when the task no longer waits, so that a start
    not begun yet is skipped (a stop follows it in the queue)."""

    def __init__(self, loop: Any, make: Callable[[], Downloader]):
        self._loop, self._make = loop, make
        self.settled = loop.create_future()
        self.d: Optional[Downloader] = None
        self.settling: Optional[_Settling] = None
        self.abandoned = False

    def start(self) -> None:
        """The starter's thread."""
        if self.abandoned:
            return
        try:
            self.d = self._make()
            self.d.start()
            self.settling = _Settling(self.d, self._loop, self.settled)
        except BaseException as exc:  # raised in the awaiting task
            _hand_over(self._loop, _set_exception, self.settled, exc)

    def stop(self, stopped: Any = None) -> None:
        """The starter's thread; ``stopped`` (a future of the loop), if
        any, is resolved once the download's run ended (at once when no
        download was made)."""
        d = self.d
        if d is None:
            if stopped is not None:
                _hand_over(self._loop, _set_result, stopped, None)
            return

        def stop() -> None:
            try:
                d.stop()
            finally:
                if self.settling is not None:
                    self.settling.close()
                if stopped is not None:
                    _hand_over(self._loop, _set_result, stopped, None)

        try:
            threading.Thread(target=stop, name='bitpit-stop').start()
        except RuntimeError:  # no thread to be had: stop it here
            stop()


@overload
async def adownload(url: str, path: Union[None, str, os.PathLike[str]] = None, *,
                    progress: bool = False, **kwargs: Any) -> pathlib.Path: ...
@overload
async def adownload(url: str, path: _File, *, progress: bool = False,
                    **kwargs: Any) -> _File: ...
async def adownload(url: str, path: Optional[_PathLike] = None, *, progress: bool = False,
                    **kwargs: Any) -> _Target:
    """``await bitpit.adownload(url)``: the coroutine twin of ``download()``,
    with its arguments, result and errors, that never blocks the event loop.

    Cancelling the awaiting task stops the download at once (its
    connections close), waits for its thread to end, and lets
    ``CancelledError`` propagate; the partial file and its sidecar stay, so
    the same call later resumes. The download is made, started and stopped
    by a thread of bitpit's (``_Starter``). The event loop's thread."""
    import asyncio
    import functools
    loop = asyncio.get_running_loop()
    starter = await _Starter.enter(loop)
    job = _Download(loop, functools.partial(Downloader, url, path, **kwargs))
    line = None
    try:
        starter.jobs.put(job.start)
        if progress:
            await asyncio.wait((job.settled,), timeout=_CLI_REFRESH)
            line = None if job.d is None else _ProgressLine.on_terminal(job.d)
        await _with_progress(job.settled, line)
    except GeneratorExit:  # the task is dropped: no await here, the stop goes on alone
        job.abandoned = True
        starter.jobs.put(job.stop)
        raise
    except BaseException:
        # a cancel also cancels job.settled, which then tells nothing of d:
        # the stop comes after the start in the queue, and finds d or not
        job.abandoned = True
        stopped = loop.create_future()
        starter.jobs.put(lambda: job.stop(stopped))
        while not stopped.done():
            try:
                await asyncio.shield(stopped)
            except asyncio.CancelledError:
                continue  # the stop takes a second at most: see it end
        raise
    finally:
        starter.leave(loop)
        if job.settling is not None:
            job.settling.close()
        if line is not None:
            line.close()
    assert job.d is not None  # settled, so made
    return _final_path(job.d)


class _SignalRelay:
    """The stream behind ``d.events()``: every signal of ``d`` and every
    change that ``wait()`` looks at, handed to the event loop in the order
    they come; there it decides when the stream ends and keeps the items
    for the consumer.

    The stream ends the first time the download settles after having been
    busy (running, or with a restart to come) since the call, or at once
    when it is settled in a final state at the call. The end comes after
    the ``state-changed`` into the settled state: a state is set (and
    ``wait()`` notified) before its signal is emitted.

    Bitpit's threads only run ``_on_signal`` and ``_on_change`` (which hand
    over) and ``close``; all the rest runs in the loop's thread, so the
    attributes need no lock."""

    def __init__(self, d: Downloader, loop: Any):
        self._d, self._loop = d, loop
        self._items: collections.deque = collections.deque()  # (signal, args) not yet taken
        self._waiter: Any = None    # the future that the consumer awaits, if it does
        self._ended = False         # no item comes after those held
        self._last_state = d.state  # the new state of the last state-changed
        self._busy = not d._settled() or self._last_state in _FINISHED_STATES
        self._end_with: Optional[str] = None  # the state whose state-changed ends it
        for signal in d.__signals__:
            d.listen(signal, self._on_signal, signal)
        d._watch(self._on_change)
        if self._busy and d._settled():  # it settled while listening began
            loop.call_soon(self._end)

    # -- bitpit's threads ----------------------------------------------------

    def _on_signal(self, d: Downloader, *args: Any) -> None:
        """Any signal of ``d``; ``args`` ends with the signal's name. The
        thread that emits it."""
        signal = args[-1]
        if not _hand_over(self._loop, self._take_signal, signal, args[:-1], d.state):
            self.close()

    def _on_change(self) -> None:
        """A change that ``wait()`` looks at; under the download's lock."""
        d = self._d
        if not _hand_over(self._loop, self._take_change, d._settled(), d.state):
            self.close()

    def close(self) -> None:
        """Stop listening to the download. Any thread; again is a no-op."""
        d = self._d
        try:
            d._unwatch(self._on_change)
        except ValueError:  # closed already
            return
        for signal in d.__signals__:
            try:
                d.unlisten(signal, self._on_signal, signal)
            except ValueError:
                pass

    # -- the loop's thread ----------------------------------------------------

    def _take_signal(self, signal: str, args: Tuple[Any, ...], state: str) -> None:
        if self._ended:
            return
        self._items.append((signal, args))
        if signal == 'state-changed':
            self._last_state = state
            if state == self._end_with:
                self._end()
        self._wake()

    def _take_change(self, settled: bool, state: str) -> None:
        if self._ended:
            return
        if not settled:
            self._busy, self._end_with = True, None
        elif self._busy:
            if state == self._last_state:
                self._end()
            else:  # its state-changed is on its way
                self._end_with = state

    def _end(self) -> None:
        self._ended = True
        self.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            _set_result(self._waiter, None)

    def abandon(self) -> None:
        """``aclose()``: end the stream now, dropping the items held."""
        self._items.clear()
        self._end()

    async def next(self) -> Tuple[str, Tuple[Any, ...]]:
        """The next item; ``StopAsyncIteration`` after the last."""
        while not self._items:
            if self._ended:
                raise StopAsyncIteration
            if self._waiter is not None:
                raise RuntimeError('another task already waits for the next event')
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class _Events:
    """What ``Downloader.events()`` returns: an async iterator over a
    ``_SignalRelay``, whose listeners it removes when it ends, when it is
    closed (``aclose()``) and when it is dropped unfinished. The event
    loop's thread."""

    def __init__(self, d: Downloader):
        import asyncio
        import weakref
        self._relay = _SignalRelay(d, asyncio.get_running_loop())
        weakref.finalize(self, self._relay.close)

    def __aiter__(self) -> '_Events':
        return self

    async def __anext__(self) -> Tuple[str, Tuple[Any, ...]]:
        return await self._relay.next()

    async def aclose(self) -> None:
        """End the iteration now and stop listening."""
        self._relay.abandon()


# ---------------------------------------------------------------------------
# command line: the bitpit command
# ---------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    """The ``bitpit`` command's argument parser: every option is declared
    here; ``_downloader_kwargs`` turns the per-download ones into
    ``Downloader`` arguments."""
    import argparse

    def rate(text: str) -> int:
        try:
            return _parse_rate(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def size(text: str) -> int:
        try:
            return _parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def shard_of(text: str) -> Tuple[int, int]:
        index, slash, count = text.strip().partition('/')
        if not (slash and _DIGITS_RE.fullmatch(index) and _DIGITS_RE.fullmatch(count)
                and int(index) < int(count)):
            raise argparse.ArgumentTypeError('must be K/N with 0 <= K < N, e.g. 0/4: '
                                             '{!r}'.format(text))
        return int(index), int(count)

    def connections(text: str) -> int:
        if not _DIGITS_RE.fullmatch(text.strip()) or \
                not 1 <= int(text) <= _MAX_CONNECTIONS:
            raise argparse.ArgumentTypeError('must be a number from 1 to {}: {!r}'.format(
                _MAX_CONNECTIONS, text))
        return int(text)

    def number(convert: Callable[[str], Any], positive: bool = False,
               high: float = float('inf')) -> Callable[[str], Any]:
        def parse(text: str) -> Any:
            try:
                value = convert(text)
            except ValueError:
                raise argparse.ArgumentTypeError('not a number: {!r}'.format(text)) from None
            if not 0 <= value < float('inf') or (positive and value == 0):
                raise argparse.ArgumentTypeError('must be {}: {!r}'.format(
                    'more than 0' if positive else '0 or more', text))
            if value > high:
                raise argparse.ArgumentTypeError('must be at most {:g}: {!r}'.format(
                    high, text))
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
    parser.add_argument('-x', '--connections', metavar='N', type=connections, default=1,
                        help='connections per file, 1 to {}: a file the server serves in '
                             'ranges comes in parts at once (default: %(default)s)'
                             .format(_MAX_CONNECTIONS))
    parser.add_argument('--mirror', metavar='URL', action='append', default=[],
                        help='another URL of the same file (one URL; repeatable); in an '
                             '-i file, put the mirrors on the URL\'s line')
    parser.add_argument('-d', '--dir', metavar='DIR',
                        help='save the files in DIR, created if missing '
                             '(default: the current directory)')
    parser.add_argument('-o', '--output', metavar='FILE',
                        help='save the one URL as FILE (inside DIR with -d)')
    parser.add_argument('-i', '--input-file', metavar='FILE', action='append', default=[],
                        help='read URLs from FILE, one file a line (more URLs on a line '
                             'are mirrors of it), - for standard input; blank lines and '
                             '# comments are skipped (repeatable)')
    parser.add_argument('--restart-wait', metavar='S', type=number(float),
                        default=_CLI_RESTART_WAIT,
                        help='seconds before retrying a failed download; each retry in '
                             'a row may wait up to twice as long, up to --restart-wait-max '
                             '(default: %(default)s)')
    parser.add_argument('--retries', metavar='N', type=number(int), default=_CLI_RETRIES,
                        help='retry a failing download at most N times in a row, '
                             'then give up (default: %(default)s)')
    parser.add_argument('--timeout', metavar='S',
                        type=number(float, positive=True, high=_MAX_SECONDS),
                        default=_CLI_TIMEOUT,
                        help='seconds without receiving a byte before an attempt '
                             'fails (default: %(default)s)')
    parser.add_argument('--max-size', metavar='SIZE', type=size,
                        help='fail a download whose file is larger than SIZE bytes '
                             '(k, m, g: KiB, MiB, GiB); nothing past it is written')
    parser.add_argument('--min-speed', metavar='RATE', type=rate, default=0,
                        help='fail an attempt that stays slower than RATE for the '
                             'time-out, then retry it (default: no minimum)')
    parser.add_argument('--checksum', metavar='ALG:HEX',
                        help='verify the download (one URL) against this digest, e.g. '
                             'sha256:9f86d0...; any hashlib algorithm; ALG:file:URL reads '
                             'it from a SHA256SUMS-style file')
    parser.add_argument('-H', '--header', metavar="'NAME: VALUE'", action='append', default=[],
                        help='send this header with every request (repeatable)')
    parser.add_argument('--user-agent', metavar='TEXT',
                        help='the User-Agent header (default: bitpit/VERSION)')
    parser.add_argument('--user', metavar='USER:PASSWORD',
                        help='HTTP credentials, Basic or, to a host that asks for it, '
                             'Digest (default: from the URL, else ~/.netrc); never sent to '
                             'another host after a redirect')
    parser.add_argument('--proxy', metavar='URL',
                        help='use this HTTP proxy, http://[user:pass@]host:port; \'\' for none '
                             '(default: http_proxy, https_proxy, no_proxy)')
    parser.add_argument('--cacert', metavar='FILE',
                        help='trust the CA certificates in this PEM file for HTTPS')
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument('--if-exists', metavar='WHAT', choices=_IF_EXISTS, default='resume',
                          help='what to do with a file that exists: resume (default), '
                               'skip, update, rename or overwrite')
    existing.add_argument('--no-clobber', dest='if_exists', action='store_const',
                          const='skip', help='leave a file that exists as it is '
                                             '(--if-exists skip)')
    existing.add_argument('-N', '--newer', dest='if_exists', action='store_const',
                          const='update', help='download a file that exists only if the '
                                               'server has a newer one (--if-exists update)')
    parser.add_argument('--cookies', metavar='FILE',
                        help='send the cookies of this Netscape cookies.txt file (as '
                             'browsers export it); it is read, never written')
    parser.add_argument('--json', action='store_true',
                        help='print one JSON object per line on standard output (state, '
                             'progress, summary) instead of the table')
    parser.add_argument('-q', '--quiet', action='store_true',
                        help='print nothing but errors (on standard error)')
    parser.add_argument('--no-verify-digest', dest='verify_digest', action='store_false',
                        help='do not check a file against the digest its server gives '
                             '(Repr-Digest, Content-Digest, Digest)')
    parser.add_argument('--checksum-file', metavar='URL',
                        help='verify the download (one URL) against its line in this '
                             'SHA256SUMS-style file (GNU or BSD format); the digest\'s '
                             'length tells the algorithm')
    parser.add_argument('--metalink', metavar='FILE|URL', action='append', default=[],
                        help='download the files a Metalink (.meta4 or .metalink) lists, '
                             'from its mirrors, checking its hashes (repeatable)')
    parser.add_argument('--follow-metalink', action='store_true',
                        help='a URL that answers with a Metalink (application/metalink4+xml) '
                             'stands for the files it lists')
    parser.add_argument('--restart-wait-max', metavar='S',
                        type=number(float, high=_MAX_SECONDS),
                        help='the longest wait before a retry (default: 10 times '
                             '--restart-wait)')
    parser.add_argument('--max-per-host', metavar='N', type=number(int), default=0,
                        help='most connections open at once to one host, over all '
                             'downloads; 0 for no limit (default: %(default)s)')
    parser.add_argument('--shard', metavar='K/N', type=shard_of,
                        help='download only shard K (from 0) of N of the URLs, split by '
                             'the SHA-256 of each URL: N runs with K = 0 ... N-1 share '
                             'the list without overlap')
    parser.add_argument('--manifest', metavar='FILE',
                        help='append a JSON line to FILE for each download that ends (its '
                             'URL, path, size, SHA-256, state); a URL recorded complete '
                             'whose file is still there is not requested again')
    parser.add_argument('--version', action='version', version='%(prog)s ' + __version__)
    return parser


def _downloader_kwargs(parser: Any, args: Any, url_count: int) -> Dict[str, Any]:
    """The ``Downloader`` keyword arguments the parsed options ask for; a
    usage error (``parser.error``) for a malformed one."""
    kwargs: Dict[str, Any] = {'timeout': args.timeout, 'retries': args.retries,
                              'connections': args.connections, 'max_size': args.max_size,
                              'min_speed': args.min_speed, 'if_exists': args.if_exists}
    if args.cookies is not None:
        try:
            kwargs['cookies'] = _Cookies(args.cookies)  # one jar for every download
        except ValueError as exc:
            parser.error('--cookies: {}'.format(exc))
    headers = {}
    for header in args.header:
        name, colon, value = header.partition(':')
        if not colon or not name.strip() or any(c in header for c in '\r\n\0'):
            parser.error("-H takes 'Name: value', not {!r}".format(header))
        headers[name.strip()] = value.strip()
    if args.user_agent is not None:
        headers['User-Agent'] = args.user_agent

    def check(option: str, parse: Callable[[Any], Any], value: Any) -> None:
        try:
            parse(value)
        except ValueError as exc:  # InvalidURLError included
            parser.error('{}: {}'.format(option, exc))

    if headers:
        check('-H', _check_headers, headers)
        kwargs['headers'] = headers

    if args.checksum is not None:
        if url_count != 1:
            parser.error('--checksum takes one URL, not {}'.format(url_count))
        check('--checksum', lambda value: _parse_checksum_file_option(value) or
              _parse_checksum(value), args.checksum)
        kwargs['checksum'] = args.checksum
    if args.checksum_file is not None:
        if url_count != 1 or args.checksum is not None:
            parser.error('--checksum-file takes one URL, and no --checksum')
        check('--checksum-file', _check_url, args.checksum_file)
        kwargs['checksum'] = 'file:' + args.checksum_file
    if args.proxy is not None:
        if args.proxy:
            check('--proxy', _parse_proxy, args.proxy)
        kwargs['proxy'] = args.proxy
    if args.user is not None:
        user, colon, password = args.user.partition(':')
        if not colon:
            parser.error('--user takes USER:PASSWORD')
        kwargs['auth'] = (user, password)
    if not args.verify_digest:
        kwargs['verify_digest'] = False
    if args.restart_wait_max is not None:
        kwargs['restart_wait_max'] = args.restart_wait_max
    if args.cacert is not None:
        import ssl
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
        urls = _cli_urls(parser, args)
        files: List[_Sources] = list(urls)
        if args.metalink or args.follow_metalink:
            files = _cli_metalinks(args, urls, _downloader_kwargs(parser, args, 1))
        jobs = _cli_jobs(parser, args, files)
        downloader_kwargs = _downloader_kwargs(parser, args, len(jobs))
        if args.shard is not None:  # after naming: each file is named as in one run
            jobs = shard(jobs, *args.shard)
    except SystemExit as exc:  # --help, --version or a usage error
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or _EXIT_OK
        return _EXIT_USAGE
    except Error as exc:  # a metalink that cannot be read
        print('bitpit: {}'.format(exc), file=sys.stderr)
        return _EXIT_FAILED
    if not jobs:
        if not args.quiet:
            print('bitpit: no URL to download', file=sys.stderr)
        return _EXIT_OK
    for directory in {path.parent for _, _, path in jobs}:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print('bitpit: cannot create directory {}: {}'.format(directory, exc),
                  file=sys.stderr)
            return _EXIT_FAILED
    output = 'json' if args.json else 'quiet' if args.quiet else 'auto'
    return _download_all(jobs, rate_limit=args.rate_limit, max_running=args.max_running,
                         restart_wait=args.restart_wait,
                         downloader_kwargs=downloader_kwargs, output=output,
                         max_per_host=args.max_per_host, manifest=args.manifest)


_INPUT_COMMENT_RE = _Pattern(r'(?:^|\s)#')


if TYPE_CHECKING:
    # a file's URL (or its metalink entry) and its mirrors
    _Sources = Tuple[Union[str, _MetalinkFile], Tuple[str, ...]]
    _Job = Tuple[Union[str, _MetalinkFile], Tuple[str, ...], pathlib.Path]  # and its path


def _cli_urls(parser: Any, args: Any) -> List[Tuple[str, Tuple[str, ...]]]:
    """The files to download: each URL of the arguments (with the
    ``--mirror`` URLs when there is one), then each line of each ``-i``
    file (several URLs on a line are mirrors of one file), each file once.
    A usage error (``parser.error``) for no URL at all, an unreadable file
    or an invalid URL."""
    if not args.urls and not args.input_file and not args.metalink:
        parser.error('no URL given: name URLs, or a file of URLs with -i FILE')
    if args.mirror and (len(args.urls) != 1 or args.input_file):
        parser.error('--mirror takes one URL (for several files, put mirrors on the '
                     'lines of an -i file)')
    found = [((url, *args.mirror), '') for url in args.urls]
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
            urls = _INPUT_COMMENT_RE.split(line, 1)[0].split()
            if urls:
                where = 'standard input' if name == '-' else name
                found.append((tuple(urls), '{} line {}'.format(where, number)))
    for urls, where in found:
        for url in urls:
            try:
                _check_url(url)
            except InvalidURLError as exc:
                parser.error('{} ({})'.format(exc, where) if where else str(exc))
    files: Dict[str, Tuple[str, ...]] = {}
    for urls, _ in found:
        files.setdefault(urls[0], urls[1:])
    return list(files.items())


def _cli_metalinks(args: Any, files: List[Tuple[str, Tuple[str, ...]]],
                   kwargs: Dict[str, Any]) -> List[_Sources]:
    """``files`` with the files of each ``--metalink`` added, and with
    ``--follow-metalink``, each URL that answers with a metalink replaced
    by the files it lists (a ``_MetalinkFile`` in the URL's place). Raises
    the ``bitpit.Error`` of a metalink that cannot be read."""
    def options(url: str) -> _RequestOptions:
        return _document_options(url, **kwargs)

    found: List[_Sources] = []
    for url, mirrors in files:
        if args.follow_metalink:
            try:
                data, _ = _fetch_document(options(url), url, 'metalink', _METALINK_TYPES)
            except Error as exc:  # the download will tell
                _log.info('%s: not followed as a metalink: %s', url, exc)
                data = None
            if data is not None:
                found += [(entry, ()) for entry in _parse_metalink(data, url)]
                continue
        found.append((url, mirrors))
    for source in args.metalink:
        found += [(entry, ()) for entry in _read_metalink(source, options)]
    return found


def _cli_jobs(parser: Any, args: Any, files: List[_Sources]) -> List[_Job]:
    """Pair each file's URLs with the path it is saved to (``-d``, ``-o``)."""
    if not files or args.output is None:
        return _assign_paths(files, args.dir)
    if len(files) != 1:
        parser.error('-o/--output takes one URL, not {}: use -d DIR for several'
                     .format(len(files)))
    output = _as_path(args.output)
    if args.dir:
        output = _as_path(args.dir) / output
    if output.is_dir():
        parser.error('-o/--output: {} is a directory: use -d DIR'.format(args.output))
    (url, mirrors), = files
    return [(url, mirrors, output)]


def _assign_paths(files: List[_Sources], directory: Optional[str]) -> List[_Job]:
    """Pair each file's URLs with a path in ``directory`` (default: the
    current one) named after its URL. A name an earlier file of the list
    already took gets a number: ``name.1.ext``, ``name.2.ext``... A file
    that exists on disk is not avoided: it is resumed."""
    base = _as_path(directory or '')
    taken = set()
    jobs = []
    for url, mirrors in files:
        name = url.filename if isinstance(url, _MetalinkFile) else \
            _filename_from_url(_check_url(url))
        stem, ext = _split_extension(name)
        number = 0
        while name.casefold() in taken:
            number += 1
            name = _fit_name(stem, '.{}{}'.format(number, ext))
        taken.add(name.casefold())
        jobs.append((url, mirrors, base / name))
    return jobs


class _Event:
    """A download as it was at a state change (or a progress report): the
    snapshot the output shows, taken on the thread that saw it."""
    __slots__ = ('downloader', 'state', 'error', 'downloaded', 'size', 'speed')

    def __init__(self, downloader: Downloader, state_change: bool = True):
        self.downloader = downloader
        self.state = downloader.state
        self.error = downloader.last_exception
        # as the bytes begin to flow, what the attempt resumes from
        self.downloaded = downloader._held_at_start() \
            if state_change and self.state == 'download' else downloader.downloaded
        self.size = downloader.size
        self.speed = downloader.speed


class _Outcome:
    """What a run of the command did: files completed and failed, bytes
    received and seconds taken, for the closing summary."""

    def __init__(self, downloads: List[Downloader], held_before: List[int], began: float):
        self.total = len(downloads)
        self.completed = sum(d.state == 'complete' for d in downloads)
        self.failed = [d for d in downloads if d.state == 'fatal-error']
        self.bytes = sum(max(0, d.downloaded - before)
                         for d, before in zip(downloads, held_before))
        self.seconds = max(time.monotonic() - began, 1e-6)

    def text(self) -> str:
        """wget's ``Downloaded: 3 files, 90M in 11s (8.0 MB/s)``, then a
        line per failed download."""
        plural = '' if self.completed == 1 else 's'
        text = 'Downloaded: {} file{} of {}, {} in {} ({})\n'.format(
            self.completed, plural, self.total, _human(self.bytes),
            _human_seconds(self.seconds), _human(self.bytes / self.seconds, per_second=True))
        if self.failed:
            text += 'Failed: {} file{}\n'.format(len(self.failed),
                                                 '' if len(self.failed) == 1 else 's')
            text += ''.join('  {}: {}\n'.format(_name(d), _error_text(d.last_exception))
                            for d in self.failed)
        return text

    def record(self) -> Dict[str, Any]:
        return {'event': 'summary', 'completed': self.completed, 'failed': len(self.failed),
                'total': self.total, 'bytes': self.bytes, 'seconds': round(self.seconds, 3)}


def _download_all(jobs: List[_Job], *, rate_limit: float,
                  max_running: int, restart_wait: float,
                  downloader_kwargs: Dict[str, Any], output: str,
                  max_per_host: int = 0, manifest: Optional[str] = None) -> int:
    """Run every ``(url, mirrors, path)`` through one ``Manager`` (with
    its ``manifest``) until each is complete or fatal, showing the progress
    (``output``: ``'auto'``, ``'quiet'`` or ``'json'``) and a closing
    summary; return the exit status. On ``KeyboardInterrupt`` pause
    everything (the partial files resume next time) and return 130."""
    cond = threading.Condition()
    events: List[_Event] = []

    def state_changed(d: Downloader, old: str) -> None:
        # On the download thread, which alone changes the state: the
        # snapshot is what this state change was.
        event = _Event(d)
        with cond:
            events.append(event)
            cond.notify_all()

    kwargs: Dict[str, Any] = {'update_period': _CLI_SPEED_PERIOD}
    kwargs.update(downloader_kwargs)
    downloads: List[Downloader] = []
    progress = _JSONLines(downloads) if output == 'json' else \
        _Progress(downloads, output == 'quiet')
    began = time.monotonic()
    try:
        manager = Manager(max_running=max_running, rate_limit=rate_limit,
                          restart_wait=restart_wait, max_per_host=max_per_host,
                          manifest=manifest)
    except (ValueError, FileError) as exc:  # not a manifest, or it cannot be opened
        _write(sys.stderr, 'bitpit: --manifest: {}\n'.format(exc))
        return _EXIT_USAGE
    try:
        for url, mirrors, path in jobs:
            source = {'metalink': url} if isinstance(url, _MetalinkFile) else {'url': url}
            d = Downloader(path=path, mirrors=mirrors, **source, **kwargs)
            d.listen('state-changed', state_changed)
            downloads.append(d)
        held_before = [d.downloaded for d in downloads]
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
        progress.close(_Outcome(downloads, held_before, began))
        failed = any(d.state != 'complete' for d in downloads)
        return _EXIT_FAILED if failed else _EXIT_OK
    except KeyboardInterrupt:
        _pause_all(manager)
        progress.close(_Outcome(downloads, held_before, began), interrupted=True)
        return _EXIT_INTERRUPTED
    except BaseException:
        _pause_all(manager)  # leave no download running behind
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

    def close(self, outcome: '_Outcome', interrupted: bool = False) -> None:
        """The last words: the final table, the summary (with a line per
        failed download), the interruption."""
        if self.live:
            self.draw()
        if not self.quiet:
            _write(sys.stdout, outcome.text())
        if interrupted:
            _write(sys.stderr, _interrupted_text(self.downloads))

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


def _interrupted_text(downloads: List[Downloader]) -> str:
    paused = sum(d.state not in _FINISHED_STATES for d in downloads)
    return ('bitpit: interrupted; {} unfinished download{} paused: run the same command '
            'again to resume\n'.format(paused, '' if paused == 1 else 's'))


class _JSONLines:
    """``--json``: one JSON object per line on standard output, for
    programs: ``state`` at each state change, ``progress`` at most once a
    second per running download, and a last ``summary``. From the main
    thread."""

    def __init__(self, downloads: List[Downloader]):
        self.downloads = downloads
        self.next_progress = time.monotonic() + 1.0

    def wait_time(self) -> float:
        return max(0.01, self.next_progress - time.monotonic())

    def report(self, batch: List[_Event]) -> None:
        for event in batch:
            self._write('state', event)
        now = time.monotonic()
        if now >= self.next_progress:
            self.next_progress = now + 1.0
            for d in self.downloads:
                if d.state in _ACTIVE_STATES:
                    self._write('progress', _Event(d, state_change=False))

    def close(self, outcome: '_Outcome', interrupted: bool = False) -> None:
        import json
        _write(sys.stdout, json.dumps(outcome.record()) + '\n')
        if interrupted:
            _write(sys.stderr, _interrupted_text(self.downloads))

    @staticmethod
    def _write(kind: str, event: _Event) -> None:
        import json
        d = event.downloader
        path = d.path
        _write(sys.stdout, json.dumps({
            'event': kind, 'url': d.url,
            'path': os.path.abspath(path) if isinstance(path, os.PathLike) else repr(path),
            'state': event.state, 'downloaded': event.downloaded, 'size': event.size,
            'speed': int(event.speed),
            'error': str(event.error) if event.state in ('error', 'fatal-error') and
            event.error is not None else None}) + '\n')

def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _enable_ansi(stream: Any) -> bool:
    """Whether the terminal understands ANSI escapes (switched on in a
    Windows console)."""
    if sys.platform != 'win32':  # (os.name != 'nt', as a type checker reads it)
        return True
    try:
        import ctypes
        import msvcrt
        kernel32 = ctypes.windll.kernel32
        handle = msvcrt.get_osfhandle(stream.fileno())
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
    return _printable(path.name if isinstance(path, os.PathLike) else repr(path))


def _human(n: float, per_second: bool = False) -> str:
    number, suffix = human_readable(n)
    text = '{} {}'.format(int(number), suffix) if suffix == 'B' else \
        '{:.1f} {}'.format(number, suffix)
    return text + '/s' if per_second else text


def _human_seconds(seconds: float) -> str:
    if seconds < 60:
        return '{:.{}f} s'.format(seconds, 2 if seconds < 10 else 1)
    import datetime
    return _human_eta(datetime.timedelta(seconds=seconds))


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
