"""How answers are judged: which statuses are transient (an error and a
restart, which stop() cancels) or permanent (fatal), Retry-After, malformed answers (status line,
headers, Content-Length, chunks, Content-Range) and a body longer than
announced."""
import datetime
import hashlib
import io
import select
import threading
import time

import pytest

import bitpit
from conftest import (DATA, OFFSET, Recorder, download, fetch, http_date, partial_file, raw,
                      run_until)


# ---------------------------------------------------------------------------
# statuses
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('status', [408, 425, 429, 500, 502, 503, 504])
def test_transient_statuses_are_errors_and_restart(server, tmp_path, status):
    url = server.add('/f', b'', status=status)
    d, _ = download(url, tmp_path / 'f.bin', restart_wait=60)
    assert d.state == 'error' and d.last_exception.status == status
    assert d.last_exception.retryable and d.is_restarting
    d.stop()
    assert not d.is_restarting and d.restart_time is None


@pytest.mark.parametrize('status', [400, 401, 403, 404, 405, 410, 416, 451, 501, 505, 599])
def test_permanent_statuses_are_fatal(server, tmp_path, status):
    url = server.add('/f', b'', status=status)
    d, _ = download(url, tmp_path / 'f.bin', restart_wait=0)
    assert d.state == 'fatal-error' and d.last_exception.status == status
    assert isinstance(d.last_exception, bitpit.HTTPStatusError)
    assert not d.last_exception.retryable and not d.is_restarting
    assert d.restart_time is None
    assert not (tmp_path / 'f.bin').exists()


# ---------------------------------------------------------------------------
# Retry-After
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('status, kind', [(429, 'seconds'), (503, 'seconds'),
                                          (429, 'date'), (503, 'date')])
def test_retry_after_delays_the_restart(server, tmp_path, status, kind):
    if kind == 'seconds':
        value, not_before = '4', datetime.datetime.now() + datetime.timedelta(seconds=4)
    else:
        value, not_before = http_date(5)
    url = server.add('/f', b'', status=status, headers={'Retry-After': value})
    d, _ = download(url, tmp_path / 'f.bin', restart_wait=0.01)
    try:
        assert d.state == 'error' and d.is_restarting
        assert d.last_exception.retry_after >= 3
        assert d.restart_time >= not_before - datetime.timedelta(milliseconds=1)
        assert d.restart_time <= datetime.datetime.now() + datetime.timedelta(seconds=6)
    finally:
        d.stop()


@pytest.mark.parametrize('value', ['1', http_date(-3600)[0], 'soon', '-5'])
def test_retry_after_shorter_than_restart_wait_or_unreadable_is_ignored(server, tmp_path,
                                                                        value):
    url = server.add('/f', b'', status=503, headers={'Retry-After': value})
    began = datetime.datetime.now()
    d, _ = download(url, tmp_path / 'f.bin', restart_wait=30)
    try:
        assert d.state == 'error'
        assert d.restart_time >= began + datetime.timedelta(seconds=30)
        assert d.restart_time <= datetime.datetime.now() + datetime.timedelta(seconds=30)
    finally:
        d.stop()


@pytest.mark.parametrize('value', ['99999999999999', 'Fri, 31 Dec 9999 23:59:59 GMT'])
def test_absurd_retry_after_does_not_crash(server, tmp_path, value):
    url = server.add('/f', b'', status=429, headers={'Retry-After': value})
    d, _ = download(url, tmp_path / 'f.bin', restart_wait=0)
    try:
        assert d.state == 'error' and d.is_restarting
        # honoured up to a day: a longer wait is taken for a day
        in_a_day = datetime.datetime.now() + datetime.timedelta(days=1)
        assert in_a_day - datetime.timedelta(minutes=1) < d.restart_time <= in_a_day
    finally:
        d.stop()
    assert not d.is_restarting


# ---------------------------------------------------------------------------
# malformed responses
# ---------------------------------------------------------------------------

MALFORMED = {
    'content-length-abc': {'content_length': 'abc'},
    'content-length-negative': {'content_length': '-5'},
    'content-length-conflicting': {'content_length': '10, 20'},
    # (two fields: each value counts, not only the first one's)
    'content-length-conflicting-fields': raw('HTTP/1.1 200 OK\r\nContent-Length: 3\r\n'
                                             'Content-Length: 5\r\n\r\nabcde'),
    'content-length-huge': {'content_length': str(10 ** 30)},
    'status-line-garbage': raw('garbage\r\n\r\n'),
    'status-line-bad-code': raw('HTTP/1.1 abc OK\r\nContent-Length: 1\r\n\r\nx'),
    'status-line-bad-version': raw('HTTP/9.9 200 OK\r\nContent-Length: 1\r\n\r\nx'),
    'status-line-empty': raw(''),
    'status-line-huge': raw('HTTP/1.1 200 ' + 'O' * 2 ** 20 + '\r\n\r\n'),
    'header-line-1mb': raw('HTTP/1.1 200 OK\r\nX-Big: ' + 'a' * 2 ** 20 +
                           '\r\nContent-Length: 1\r\n\r\nx'),
    'headers-1mb-in-many-lines': raw('HTTP/1.1 200 OK\r\n' + ''.join(
        'X-H{}: {}\r\n'.format(i, 'b' * 5000) for i in range(210)) +
        'Content-Length: 1\r\n\r\nx'),
    'chunk-size-garbage': raw('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
                              'zz\r\nhello\r\n0\r\n\r\n'),
    'chunked-cut': raw('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
                       'ffff\r\nhello'),
    '206-without-content-range': raw('HTTP/1.1 206 Partial Content\r\n'
                                     'Content-Length: 5\r\n\r\nhello'),
    '206-after-offset-zero': raw('HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n'
                                 'Content-Range: bytes 5-9/10\r\n\r\nhello'),
}


@pytest.mark.parametrize('case', sorted(MALFORMED))
def test_malformed_responses_are_clear_errors(server, tmp_path, case):
    spec = MALFORMED[case]
    url = server.add_raw('/f', spec) if callable(spec) else server.add('/f', DATA, **spec)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', timeout=2)
    rec = Recorder(d)
    began = time.monotonic()
    run_until(d, rec, 'complete', 'error', 'fatal-error', timeout=5)
    assert time.monotonic() - began < 2.5
    assert d.state in ('error', 'fatal-error'), d.state
    error = d.last_exception
    assert isinstance(error, bitpit.Error) and type(error) is not bitpit.Error, repr(error)
    assert not isinstance(error, bitpit.StalledError), 'a malformed answer hung until timeout'


RESUME_MALFORMED = {
    'content-range-garbage': {'headers': {'Content-Range': 'bytes garbage'}},
    'content-range-impossible': {'headers': {'Content-Range': 'bytes 400000-300000/5'}},
    'content-range-missing': {'headers': {'Content-Range': None}},
    'content-range-beyond-total': {'headers': {'Content-Range': 'bytes 300000-2000000/2000'}},
    'content-length-disagrees': {'headers': {'Content-Length': '7'}},
}


@pytest.mark.parametrize('case', sorted(RESUME_MALFORMED))
def test_malformed_partial_answers_write_nothing(server, tmp_path, case):
    url = server.add('/f', DATA, **RESUME_MALFORMED[case])
    target = partial_file(tmp_path)
    d, _ = download(url, target, timeout=2)
    assert d.state == 'error' and isinstance(d.last_exception, bitpit.ProtocolError)
    assert target.read_bytes() == DATA[:OFFSET]


def test_partial_answers_that_never_reach_the_offset_are_errors(server, tmp_path):
    """A 206 that starts before the offset but ends before it too brings
    nothing new: an error, not an endless loop of requests."""
    url = server.add_raw('/f', raw('HTTP/1.1 206 Partial Content\r\nContent-Length: 1\r\n'
                                   'Content-Range: bytes 0-0/{}\r\n\r\n\x00'.format(len(DATA))))
    target = partial_file(tmp_path)
    d, _ = download(url, target, timeout=2)
    assert d.state == 'error' and isinstance(d.last_exception, bitpit.ProtocolError)
    assert target.read_bytes() == DATA[:OFFSET]
    assert len(server.requests) == 1


def test_body_longer_than_announced(server, tmp_path):
    """Only the announced bytes are taken, and the rest of the body never
    reaches the next download over a reused connection."""
    url = server.add('/long', DATA, content_length='1000', headers={'Connection': None})
    d, _ = download(url, tmp_path / 'long.bin')
    assert d.state == 'complete' and d.size == 1000
    assert (tmp_path / 'long.bin').read_bytes() == DATA[:1000]
    url = server.add('/next', DATA)
    d, _ = download(url, tmp_path / 'next.bin')
    assert d.state == 'complete' and (tmp_path / 'next.bin').read_bytes() == DATA


def test_stray_bytes_that_look_like_an_answer_never_reach_the_next_download(server,
                                                                            tmp_path):
    """The rest of a body longer than announced looks like an answer (from
    where http.client's first read of the head ends): the connection it
    came on carries no other request (seen as the body's end was read)."""
    head = b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n'
    forged = b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG'
    url = server.add_raw('/long', raw(head + DATA[:io.DEFAULT_BUFFER_SIZE - len(head)] + forged))
    assert fetch(url, tmp_path / 'long.bin').state == 'complete'
    d = fetch(server.add('/next', DATA[:5000]), tmp_path / 'next.bin')
    assert d.state == 'complete' and (tmp_path / 'next.bin').read_bytes() == DATA[:5000]
    assert server.connections == 2


@pytest.mark.parametrize('stray, then', [(b'junk\r\n', 'close'), (b'junk\r\n', 'answer'),
                                          (b'\r\n', 'answer'), (b'junk', 'answer')])
def test_a_reused_connection_that_answers_with_no_status_line_is_replaced(server, tmp_path,
                                                                          stray, then):
    """Bytes an answer sent after its body, too late for its own reads: the
    next request on the connection takes them for its status line, and is
    sent again on a new connection, whether the server then closes the
    connection or answers after them (as with http.client's BadStatusLine)."""
    def junk_later(handler):
        handler.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n' + DATA[:1000])
        handler.wfile.flush()
        if then == 'close':
            select.select([handler.connection], [], [], 5)  # the next request, on this connection
            handler.wfile.write(stray)
            return
        while handler.rfile.readline() not in (b'\r\n', b''):  # the next request
            pass
        handler.wfile.write(stray + b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG')
    url = server.add_raw('/first', junk_later)
    next_url = server.add('/next', DATA[:5000])
    assert fetch(url, tmp_path / 'first.bin').state == 'complete'
    d = fetch(next_url, tmp_path / 'next.bin')
    assert d.state == 'complete' and (tmp_path / 'next.bin').read_bytes() == DATA[:5000]
    assert server.connections == 2


def _close_at_next(handler):
    """An add_raw handler: a kept-alive answer, then the next request on
    the connection read, and the connection closed without an answer."""
    handler.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n' + DATA[:1000])
    handler.wfile.flush()
    while handler.rfile.readline() not in (b'\r\n', b''):  # the next request, read
        pass


def test_a_reused_connection_that_the_server_closes_at_the_next_request_is_replaced(
        server, tmp_path):
    """A kept-alive connection that the server closes once the next
    request came, with no answer (bitpit's own reader raises http.client's
    RemoteDisconnected, imported only then): the request is sent again on
    a new connection, and the download never sees the close."""
    url = server.add_raw('/first', _close_at_next)
    next_url = server.add('/next', DATA[:5000])
    assert fetch(url, tmp_path / 'first.bin').state == 'complete'
    d = fetch(next_url, tmp_path / 'next.bin')  # (its first attempt: no error before it)
    assert d.state == 'complete' and (tmp_path / 'next.bin').read_bytes() == DATA[:5000]
    assert server.connections == 2


def test_a_request_on_a_dead_reused_connection_is_sent_again_once_only(server, tmp_path):
    """A kept-alive connection that the server closes at the next request:
    the request is sent again on a fresh connection, once; when that one
    ends with no answer too, the attempt fails (a network error), not a
    loop of fresh connections."""
    url = server.add_raw('/first', _close_at_next)
    next_url = server.add_raw('/next', lambda handler: None)  # (closed, no answer)
    assert fetch(url, tmp_path / 'first.bin').state == 'complete'
    d = bitpit.Downloader(next_url, path=tmp_path / 'next.bin', restart_wait=30)
    rec = Recorder(d)
    d.start()
    try:
        rec.wait_state('error', 'fatal-error', 'complete', timeout=5)
        assert d.state == 'error' and isinstance(d.last_exception, bitpit.NetworkError)
        assert server.connections == 2 and len(server.requests_for('/next')) == 1
    finally:
        d.stop()


def test_an_answer_sent_after_a_body_is_never_taken_for_the_next(server, tmp_path):
    """A server that writes a whole answer more after a body (an error page
    after a streamed body, say), once the body was read: the connection is
    parked with it, and the next download, a moment later, must not take it
    for its own answer (then each later download on the connection would
    take the answer of the one before)."""
    body_read, forged_sent = threading.Event(), threading.Event()

    def forgery_later(handler):
        handler.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n' + DATA[:1000])
        handler.wfile.flush()
        body_read.wait(5)
        handler.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nWRONG')
        handler.wfile.flush()
        forged_sent.set()
        select.select([handler.connection], [], [], 5)  # a request on this connection
    url = server.add_raw('/first', forgery_later)
    next_url = server.add('/next', DATA[:5000])
    assert fetch(url, tmp_path / 'first.bin').state == 'complete'
    body_read.set()
    assert forged_sent.wait(5)  # (over the loopback: in the client's socket once sent)
    d = fetch(next_url, tmp_path / 'next.bin')
    assert d.state == 'complete' and (tmp_path / 'next.bin').read_bytes() == DATA[:5000]


# ---------------------------------------------------------------------------
# header values parsed strictly
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('case, header', [
    ('content-length', 'Content-Length: 1\u00b2'),
    ('content-length-fullwidth', 'Content-Length: \uff11\uff10'),
    ('content-range', 'Content-Range: bytes 0-\u00b2/10'),
])
def test_only_ascii_digits_count_in_lengths_and_ranges(server, tmp_path, case, header):
    head = 'HTTP/1.1 {} X\r\n{}\r\n'.format('206' if 'range' in case else '200', header)
    if 'range' in case:
        head += 'Content-Length: 3\r\n'
    server.add_raw('/f', raw((head + '\r\nabc').encode('utf-8')))
    d, _ = download(server.url('/f'), tmp_path / 'f.bin', timeout=2)
    assert d.state == 'error'
    error = d.last_exception
    assert isinstance(error, bitpit.ProtocolError) and error.retryable
    name, value = header.split(': ', 1)
    # the message quotes the header (as http.client read it: Latin-1)
    assert name in str(error) and repr(value.encode('utf-8').decode('latin-1')) in str(error)


def test_a_retry_after_that_is_not_ascii_digits_is_ignored(server, tmp_path):
    url = server.add('/f', b'', status=503, headers={'Retry-After': '\u00b2'})
    began = datetime.datetime.now()
    d, _ = download(url, tmp_path / 'f.bin', restart_wait=20)
    try:
        assert d.state == 'error' and d.last_exception.retry_after is None
        assert d.restart_time <= began + datetime.timedelta(seconds=21)
    finally:
        d.stop()


# ---------------------------------------------------------------------------
# guards: max_size and min_speed
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['announced', 'chunked'])
def test_a_file_larger_than_max_size_is_fatal_and_nothing_past_it_is_written(
        server, tmp_path, kind):
    url = server.add('/f', DATA, chunked=kind == 'chunked')
    limit = 100000
    d, rec = download(url, tmp_path / 'f.bin', max_size=limit, restart_wait=0)
    assert d.state == 'fatal-error' and not d.is_restarting
    assert isinstance(d.last_exception, bitpit.Error)
    assert 'max_size' in str(d.last_exception) and str(limit) in str(d.last_exception)
    written = (tmp_path / 'f.bin').read_bytes() if (tmp_path / 'f.bin').exists() else b''
    assert len(written) <= limit and DATA.startswith(written)
    if kind == 'announced':
        assert written == b'' and 'download' not in [new for _, new in rec.states]


def test_a_file_of_max_size_exactly_completes(server, tmp_path):
    url = server.add('/f', DATA, chunked=True)
    d, _ = download(url, tmp_path / 'f.bin', max_size=len(DATA))
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA


def test_min_speed_ends_a_trickle_that_never_trips_the_time_out(server, tmp_path):
    """50 bytes a second always arrive within the time-out; below min_speed
    for a whole time-out, the attempt fails (transient)."""
    url = server.add('/f', DATA, throttle=50)
    began = time.monotonic()
    d, rec = download(url, tmp_path / 'f.bin', timeout=1, min_speed=1000)
    took = time.monotonic() - began
    assert d.state == 'error' and isinstance(d.last_exception, bitpit.StalledError)
    assert 'slower than' in str(d.last_exception)
    assert 1.0 <= took < 2.5
    assert 0 < d.downloaded < 1000


# ---------------------------------------------------------------------------
# a body the server encoded anyway
# ---------------------------------------------------------------------------

def gzip_bytes(data):
    import gzip
    return gzip.compress(data, mtime=0)


def deflate_bytes(data, raw):
    import zlib
    compressor = zlib.compressobj(wbits=-15 if raw else 15)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize('encoding, encoded', [
    ('gzip', gzip_bytes(DATA)), ('x-gzip', gzip_bytes(DATA)),
    ('deflate', deflate_bytes(DATA, raw=False)), ('deflate', deflate_bytes(DATA, raw=True))],
    ids=['gzip', 'x-gzip', 'deflate-zlib', 'deflate-raw'])
@pytest.mark.parametrize('chunked', [True, False])
def test_an_encoded_body_is_decoded(server, tmp_path, encoding, encoded, chunked):
    """Like Apache's mod_deflate with force-gzip: 200, compressed, Range
    ignored. The file holds the resource's bytes, and its checksum is
    theirs."""
    url = server.add('/f', encoded, ignore_range=True, chunked=chunked,
                     headers={'Content-Encoding': encoding})
    digest = 'sha256:' + hashlib.sha256(DATA).hexdigest()
    d, _ = download(url, tmp_path / 'f.bin', checksum=digest, connections=4)
    assert d.state == 'complete', d.last_exception
    assert (tmp_path / 'f.bin').read_bytes() == DATA
    assert d.size == d.downloaded == len(DATA)


def test_a_resume_of_an_encoded_body_starts_over(server, tmp_path):
    url = server.add('/f', gzip_bytes(DATA), ignore_range=True,
                     headers={'Content-Encoding': 'gzip'})
    target = partial_file(tmp_path)                      # DATA[:OFFSET], no sidecar
    d, _ = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == DATA


@pytest.mark.parametrize('name, content_type', [('f.gz', 'application/octet-stream'),
                                                ('f.tgz', 'application/octet-stream'),
                                                ('f.bin', 'application/gzip'),
                                                ('f.bin', 'application/x-gzip')])
def test_encoded_bytes_are_kept_where_they_are_what_was_asked_for(server, tmp_path, name,
                                                                   content_type):
    encoded = gzip_bytes(DATA)
    url = server.add('/f', encoded, content_type=content_type,
                     headers={'Content-Encoding': 'gzip'})
    d, _ = download(url, tmp_path / name)
    assert d.state == 'complete' and (tmp_path / name).read_bytes() == encoded


@pytest.mark.parametrize('encoding', ['br', 'zstd', 'compress'])
def test_an_encoding_bitpit_cannot_decode_is_fatal(server, tmp_path, encoding):
    url = server.add('/f', b'\x00' * 5000, headers={'Content-Encoding': encoding})
    d, _ = download(url, tmp_path / 'f.bin', restart_wait=0)
    assert d.state == 'fatal-error' and not d.is_restarting
    assert isinstance(d.last_exception, bitpit.ProtocolError)
    assert encoding in str(d.last_exception)
    assert not (tmp_path / 'f.bin').exists() or (tmp_path / 'f.bin').read_bytes() == b''


def test_retries_run_out_when_every_attempt_starts_from_zero(server, tmp_path):
    """A server that ignores Range and cuts every body: each attempt gets
    the same first bytes again, which is not progress."""
    url = server.add('/f', DATA, ignore_range=True, truncate_at=OFFSET)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', retries=2, restart_wait=0.01)
    rec = Recorder(d)
    d.start()
    rec.wait_state('fatal-error', timeout=10)
    d.join(5)
    assert len(server.requests) == 3


def test_a_gzip_body_of_several_members_is_decoded_whole(server, tmp_path):
    url = server.add('/f', gzip_bytes(DATA[:OFFSET]) + gzip_bytes(DATA[OFFSET:]),
                     ignore_range=True, headers={'Content-Encoding': 'gzip'})
    d, _ = download(url, tmp_path / 'f.bin')
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA


def test_a_416_without_the_files_size_is_checked_against_the_size_asked_for(server, tmp_path):
    """The size comes from a request for byte 0: a whole file is complete."""
    url = server.add('/f', DATA, bare_416=True)
    target = tmp_path / 'f.bin'
    target.write_bytes(DATA)
    d, rec = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert [r.headers['Range'] for r in server.requests] == \
        ['bytes={}-'.format(len(DATA)), 'bytes=0-0']
    assert 'download' not in [new for _, new in rec.states]


@pytest.mark.parametrize('bare', [False, True])
def test_a_local_file_longer_than_the_servers_starts_over(server, tmp_path, bare):
    """A 416 telling (or, asked, giving) a size below what the file holds:
    the local file is another one, never 'complete' with extra bytes."""
    url = server.add('/f', DATA, bare_416=bare)
    target = tmp_path / 'f.bin'
    target.write_bytes(DATA + b'extra')
    d, _ = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert server.requests[-1].headers['Range'] is None


def test_a_416_without_the_files_size_does_not_complete_a_resume(server, tmp_path):
    server.add_raw('/f', raw('HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n'))
    target = partial_file(tmp_path)
    d, _ = download(server.url('/f'), target)
    assert d.state == 'error' and isinstance(d.last_exception, bitpit.ProtocolError)
    assert target.read_bytes() == DATA[:OFFSET]
