"""bitpit's own reader of response heads (``_HeadParser``, ``_Headers``,
``_Response``): fed bytes without a server, in any cut; its limits and the
heads it refuses; 1xx, keep-alive and body framing as http.client has them;
and through the suite's server where it shows in a download."""
import http.client
import socket
import threading

import pytest

import bitpit
from conftest import DATA, download, raw, read_head

NGINX = (b'HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 07:00:00 GMT\r\n'
         b'Content-Type: application/octet-stream\r\nContent-Length: 5\r\n'
         b'Last-Modified: Mon, 07 Dec 2026 06:00:00 GMT\r\nConnection: keep-alive\r\n'
         b'ETag: "6570e1c0-5"\r\nAccept-Ranges: bytes\r\n\r\n')


def parse(*pieces):
    """``(head, body bytes)`` from feeding ``pieces`` to a parser in turn;
    the pieces after the head are the body's."""
    parser = bitpit._HeadParser()
    head, body = None, b''
    for piece in pieces:
        if head is None:
            head = parser.feed(piece)
            body = bytes(parser.rest)
        else:
            body += piece
    return head, body


def refused(*pieces):
    """The ``ProtocolError`` that feeding ``pieces`` raises."""
    with pytest.raises(bitpit.ProtocolError) as caught:
        parse(*pieces)
    return caught.value


def status(data):
    return parse(data)[0].status


# ---------------------------------------------------------------------------
# the parser, fed bytes
# ---------------------------------------------------------------------------

def test_a_whole_head_and_the_bytes_after_it():
    head, body = parse(NGINX + b'hello')
    assert (head.version, head.status, head.reason) == (11, 200, 'OK')
    assert body == b'hello'
    assert head.headers.items()[:2] == [('Server', 'nginx/1.22.1'),
                                        ('Date', 'Mon, 07 Dec 2026 07:00:00 GMT')]
    assert head.headers.get('etag') == head.headers['ETAG'] == '"6570e1c0-5"'
    assert head.keep_alive()


@pytest.mark.parametrize('data', [
    NGINX + b'hello',
    b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n' +
    NGINX.replace(b'Server: nginx/1.22.1\r\n', b'X-Folded: a\r\n\t b\r\nx-folded: c\r\n') +
    b'hello',
], ids=['nginx', 'interim-folded-duplicates'])
def test_every_cut_gives_the_same_head(data):
    whole, body = parse(data)
    assert body == b'hello'
    for cut in range(len(data) + 1):
        head, rest = parse(data[:cut], data[cut:])
        assert rest == b'hello', cut
        assert (head.status, head.reason, head.headers.items()) == \
            (whole.status, whole.reason, whole.headers.items()), cut
    head, rest = parse(*(data[i:i + 1] for i in range(len(data))))  # a byte at a time
    assert rest == b'hello' and head.headers.items() == whole.headers.items()


def test_duplicates_order_and_case():
    head, _ = parse(b'HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-One: 1\r\n'
                    b'set-cookie: b=2\r\nSET-COOKIE: c=3\r\n\r\n')
    headers = head.headers
    assert headers.get_all('Set-Cookie') == ['a=1', 'b=2', 'c=3']
    assert headers.get('SET-cookie') == headers['set-cookie'] == 'a=1'
    assert headers.keys() == list(headers) == ['Set-Cookie', 'X-One', 'set-cookie',
                                               'SET-COOKIE']
    assert headers.values() == ['a=1', '1', 'b=2', 'c=3'] and len(headers) == 4
    assert 'x-one' in headers and 'X-Two' not in headers
    assert headers.get('X-Two') is None and headers['X-Two'] is None
    assert headers.get('X-Two', 'none') == 'none' and headers.get_all('X-Two', []) == []
    headers.get_all('set-cookie').append('d=4')  # a copy
    assert headers.get_all('set-cookie') == ['a=1', 'b=2', 'c=3']
    assert headers.by_name == {'set-cookie': 'a=1, b=2, c=3', 'x-one': '1'}  # as getheader joins


def test_folded_lines_bare_lf_and_bare_cr():
    head, body = parse(b'HTTP/1.1 200 OK\nX-Folded: one\n  two\r\n\tthree \r\n'
                       b'X-Empty:\r\n more\r\nX-CR: a\rb\n\nbody')
    assert head.headers.items() == [('X-Folded', 'one two three'), ('X-Empty', 'more'),
                                    ('X-CR', 'a b')]
    assert head.headers.get('x-folded') == head.headers.by_name['x-folded'] == 'one two three'
    assert body == b'body'


def test_values_lose_their_surrounding_spaces_and_are_latin1():
    head, _ = parse(b'HTTP/1.0 404 Not  Found \r\nX-A:  \t a b \t\r\nX-B:\r\n'
                    b'X-Caf\xe9: cr\xe8me\r\n\r\n')
    assert (head.version, head.status, head.reason) == (10, 404, 'Not  Found')
    assert head.headers.items() == [('X-A', 'a b'), ('X-B', ''), ('X-Caf\xe9', 'cr\xe8me')]


def test_only_lf_and_crlf_end_a_line():
    """What Unicode takes for a line's end (str.splitlines: VT, FF, the
    separators 0x1c to 0x1e, NEL 0x85, all Latin-1) is a value's byte, in
    a head of CRLF lines or of LF lines; a CR alone is a space."""
    odd = b'a\x0bb\x0cc\x1cd\x1de\x1ef\x85g'
    for end in (b'\r\n', b'\n'):
        head, body = parse(end.join([b'HTTP/1.1 200 OK', b'X-Odd: ' + odd, b'X-CR: a\rb',
                                     b'Content-Length: 2', b'', b'hi']))
        assert head.headers.items() == [('X-Odd', odd.decode('latin-1')), ('X-CR', 'a b'),
                                        ('Content-Length', '2')]
        assert head.by_name['content-length'] == '2' and body == b'hi'


def test_a_line_end_of_unicode_ending_the_last_line_is_a_value_byte():
    """The same where such a character ends the head's last line, the
    one str.splitlines would take for a line's end and drop (a value kept
    whole, as http.client keeps it: a length that says more than digits
    is no length; a Transfer-Encoding that says more is not chunked)."""
    for odd in '\x0b\x0c\x1c\x1d\x1e\x85':
        for end in (b'\r\n', b'\n'):
            head, body = parse(end.join([b'HTTP/1.1 200 OK', b'X-A: a',
                                         b'X-Odd: b' + odd.encode('latin-1'), b'', b'hi']))
            assert head.headers.items() == [('X-A', 'a'), ('X-Odd', 'b' + odd)]
            assert head.by_name['x-odd'] == 'b' + odd and body == b'hi'


@pytest.mark.parametrize('line, version, code, reason', [
    ('HTTP/1.1 200 OK', 11, 200, 'OK'),
    ('HTTP/1.1 200', 11, 200, ''),
    ('HTTP/1.2 299 Odd but fine', 11, 299, 'Odd but fine'),
    ('HTTP/1.0 500 Server Error', 10, 500, 'Server Error'),
    ('HTTP/0.9 200 OK', 10, 200, 'OK'),
    ('HTTP/1.1 999 X', 11, 999, 'X'),
])
def test_status_lines(line, version, code, reason):
    head, _ = parse(line.encode() + b'\r\n\r\n')
    assert (head.version, head.status, head.reason) == (version, code, reason)


@pytest.mark.parametrize('line', [
    b'garbage', b'', b' ', b'HTTP/1.1', b'ICY 200 OK', b'http/1.1 200 OK',
    b'HTTP/1.1 abc OK', b'HTTP/1.1 20 OK', b'HTTP/1.1 2000 OK', b'HTTP/1.1 099 Low',
    b'HTTP/1.1 +20 OK', b'HTTP/1.1 \xb200 OK', b'HTTP/9.9 200 OK', b'HTTP/2 200',
    b'\r\nHTTP/1.1 200 OK',
])
def test_bad_status_lines_are_protocol_errors(line):
    error = refused(line + b'\r\nContent-Length: 0\r\n\r\n')
    assert error.retryable and 'bad HTTP response head' in str(error)


@pytest.mark.parametrize('line', [
    b'no colon', b'nocolon', b': no name', b' : no name', b'Two Words: x', b'Tab\tName: x',
    b' folded first: x',
])
def test_lines_that_are_not_fields_are_protocol_errors(line):
    error = refused(b'HTTP/1.1 200 OK\r\n' + line + b'\r\nContent-Length: 0\r\n\r\n')
    assert repr(line.strip().decode())[1:-1] in str(error)


def test_space_before_the_colon_is_taken_off_the_name():
    head, _ = parse(b'HTTP/1.1 200 OK\r\nContent-Length : 5\r\nX-A\t: b\r\n\r\n')
    assert head.headers.get('content-length') == '5' and head.headers.get('X-A') == 'b'


def test_interim_answers_are_skipped_but_101_is_final():
    interim = b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n' \
        b'HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n'
    assert status(interim + b'HTTP/1.1 204 No Content\r\n\r\n') == 204
    assert status(b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n') == 101
    sixteen = b'HTTP/1.1 100 Continue\r\n\r\n' * 16
    assert status(sixteen + b'HTTP/1.1 200 OK\r\n\r\n') == 200
    assert 'more than 16 interim' in str(refused(sixteen + b'HTTP/1.1 100 Continue\r\n\r\n'))


def test_line_limit_as_http_client_has_it():
    """A line of 65,536 bytes with its CRLF passes, one more byte is refused,
    whole or unfinished (before any blank line comes)."""
    for name, filler in ((b'X-Big: ', b'a'), (b'HTTP/1.1 200 ', b'O')):
        for size, ok in ((65536, True), (65537, False)):
            line = name + filler * (size - 2 - len(name))
            data = line + b'\r\n' if name.startswith(b'HTTP') else \
                b'HTTP/1.1 200 OK\r\n' + line + b'\r\n'
            assert len(line) + 2 == size
            if ok:
                assert parse(data + b'\r\n')[0].status == 200
            else:
                assert 'more than 65536 bytes' in str(refused(data + b'\r\n'))
                unfinished = data[:-2]
                assert 'more than 65536 bytes' in str(refused(unfinished[:70000],
                                                              unfinished[70000:]))


def test_field_limit_as_http_client_has_it():
    fields = b''.join(b'X-H%d: %d\r\n' % (i, i) for i in range(101))
    head, _ = parse(b'HTTP/1.1 200 OK\r\n' + fields[:fields.index(b'X-H100')] + b'\r\n')
    assert len(head.headers) == 100
    assert 'more than 100 header lines' in str(refused(b'HTTP/1.1 200 OK\r\n' + fields +
                                                       b'\r\n'))
    # refused before its end, a line at a time
    lines = [b'HTTP/1.1 200 OK\r\n'] + fields.splitlines(keepends=True)
    parser = bitpit._HeadParser()
    with pytest.raises(bitpit.ProtocolError):
        for line in lines:
            assert parser.feed(line) is None


def test_limits_are_counted_for_each_head():
    """The lines and the line lengths of an interim head do not count for
    the head after it, nor are they left out of it."""
    sixty = b''.join(b'X-H%d: %d\r\n' % (i, i) for i in range(60))
    head, _ = parse(b'HTTP/1.1 100 Continue\r\n' + sixty, b'\r\nHTTP/1.1 200 OK\r\n' + sixty,
                    b'\r\n')
    assert head.status == 200 and len(head.headers) == 60
    interim = b'HTTP/1.1 103 Early Hints\r\nLink: ' + b'x' * 20000 + b'\r\n\r\n'
    error = refused(interim + b'HTTP/1.1 200 OK\r\nX-Big: ' + b'a' * 66000)
    assert 'more than 65536 bytes' in str(error)


@pytest.mark.parametrize('version, connection, keep_alive', [
    ('1.1', None, True),
    ('1.1', 'close', False),
    ('1.1', 'Keep-Alive, Close', False),
    ('1.1', 'keep-alive', True),
    ('1.1', 'X-Close-Notice, keep-alive', True),  # 'close' in it, but no such token
    ('1.0', None, False),
    ('1.0', 'keep-alive', True),
    ('1.0', 'Keep-Alive', True),
    ('1.0', 'close', False),
])
def test_keep_alive_by_version_and_connection(version, connection, keep_alive):
    field = '' if connection is None else 'Connection: {}\r\n'.format(connection)
    head, _ = parse('HTTP/{} 200 OK\r\n{}\r\n'.format(version, field).encode())
    assert head.keep_alive() is keep_alive


def test_http_1_0_keep_alive_and_proxy_connection():
    assert parse(b'HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\n\r\n')[0].keep_alive()
    assert parse(b'HTTP/1.0 200 OK\r\nProxy-Connection: keep-alive\r\n\r\n')[0].keep_alive()


# ---------------------------------------------------------------------------
# _Response: what http.client's begin() sets, from the same bytes
# ---------------------------------------------------------------------------

@pytest.fixture
def answer():
    """``answer(response_class, data, method='GET')``: a response of
    ``response_class`` to ``method``, its head read from ``data`` on a
    socket pair, whose other end is closed after ``data``. The test's end
    closes the socket (bitpit's response does not hold it open, as
    http.client's does: its connection keeps it)."""
    sockets = []

    def make(response_class, data, method='GET'):
        ours, theirs = socket.socketpair()
        sockets.append(ours)
        with theirs:
            theirs.sendall(data)
        response = response_class(ours, method=method)
        response.begin()
        return response
    yield make
    for sock in sockets:
        sock.close()


FRAMINGS = {
    'length': (b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello', 'GET'),
    'head': (b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n', 'HEAD'),
    'no-content': (b'HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n', 'GET'),
    'not-modified': (b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n', 'GET'),
    'chunked': (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\nContent-Length: 9\r\n\r\n'
                b'5\r\nhello\r\n0\r\n\r\n', 'GET'),
    'to-the-end': (b'HTTP/1.1 200 OK\r\n\r\nhello', 'GET'),
    'close': (b'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello', 'GET'),
    '1.0': (b'HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello', 'GET'),
    '1.0-keep-alive': (b'HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5'
                       b'\r\n\r\nhello', 'GET'),
    'bad-length': (b'HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello', 'GET'),
    'continue': (b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5'
                 b'\r\n\r\nhello', 'GET'),
    'switching': (b'HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n', 'GET'),
}


@pytest.mark.parametrize('case', sorted(FRAMINGS))
def test_response_attributes_as_http_client_sets_them(case, answer):
    data, method = FRAMINGS[case]
    theirs = answer(http.client.HTTPResponse, data, method)
    ours = answer(bitpit._Response, data, method)
    for name in ('version', 'status', 'code', 'reason', 'length', 'chunked', 'will_close'):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.getheaders() == theirs.getheaders()
    assert ours.getheader('content-length') == theirs.getheader('content-length')
    assert ours.read() == theirs.read()
    assert ours.isclosed() == theirs.isclosed()


def test_info_is_an_http_message_for_a_cookie_jar(answer):
    response = answer(bitpit._Response, b'HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\n'
                      b'Set-Cookie: b=2\r\nContent-Length: 0\r\n\r\n')
    info = response.info()
    assert isinstance(info, http.client.HTTPMessage)
    assert info.get_all('set-cookie') == ['a=1', 'b=2'] and info.items() == response.getheaders()


def test_a_closed_connection_before_or_within_the_head(answer):
    with pytest.raises(http.client.RemoteDisconnected, match='without response'):
        answer(bitpit._Response, b'')
    with pytest.raises(http.client.RemoteDisconnected, match='within the response head'):
        answer(bitpit._Response, b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n')


def test_a_response_reads_past_interim_heads_and_heads_in_pieces(answer):
    """The first receive's head read at once must be a final one; an
    interim head (with the final one in the same receive) and a head in
    two receives are read on by the parser."""
    response = answer(bitpit._Response, b'HTTP/1.1 100 Continue\r\n\r\n'
                      b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi')
    assert (response.status, response.length, response.read()) == (200, 2, b'hi')
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b'HTTP/1.1 200 OK\r\nContent-')
        response = bitpit._Response(ours)
        steps = response.begin_steps()
        next(steps)  # its wait for bytes
        assert isinstance(steps.send(True), bitpit._Wait)  # not whole: another wait
        theirs.sendall(b'Length: 2\r\n\r\nhi')
        with pytest.raises(StopIteration):
            steps.send(True)
        assert (response.status, response.length, response.read()) == (200, 2, b'hi')


# ---------------------------------------------------------------------------
# through the suite's server
# ---------------------------------------------------------------------------

def test_early_hints_before_the_answer(server, tmp_path):
    """http.client (before 3.12) took a 103 for the answer."""
    url = server.add_raw('/f', raw(b'HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n'
                                   b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello'))
    d, _ = download(url, tmp_path / 'f.bin', timeout=2)
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == b'hello'


def test_a_head_that_comes_a_few_bytes_at_a_time(server, tmp_path):
    head = b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\n' \
        b'Content-Length: %d\r\n\r\n' % len(DATA)

    def trickle(handler):
        handler.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(head), 7):
            handler.wfile.write(head[i:i + 7])
            handler.wfile.flush()
        handler.wfile.write(DATA)
    url = server.add_raw('/f', trickle)
    d, _ = download(url, tmp_path / 'f.bin', timeout=2)
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA


def test_a_folded_field_is_one_value_joined_by_a_space(server):
    """http.client left the CRLF in a folded value."""
    url = server.add_raw('/f', raw(b'HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\n'
                                   b'Content-Length: 0\r\n\r\n'))
    options = bitpit._RequestOptions(bitpit._check_url(url), bitpit._RequestSettings(
        {}, None, None, None, 2), bitpit._Cookies())
    request = bitpit._Request(options, bitpit._check_url(url))
    try:
        assert request.send().getheader('X-Folded') == 'a b'
    finally:
        request.close(reuse=False)


def test_a_line_that_is_not_a_field_is_a_protocol_error(server, tmp_path):
    """http.client dropped it and every field after it, Content-Length here."""
    url = server.add_raw('/f', raw(b'HTTP/1.1 200 OK\r\nnot a field\r\nContent-Length: 2\r\n'
                                   b'\r\nhello'))
    d, _ = download(url, tmp_path / 'f.bin', timeout=2)
    assert d.state == 'error' and isinstance(d.last_exception, bitpit.ProtocolError)
    assert "'not a field'" in str(d.last_exception)


def test_a_head_cut_by_the_server_is_a_network_error(server, tmp_path):
    """http.client took the fields before the cut for the whole head."""
    url = server.add_raw('/f', raw(b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n'))
    d, _ = download(url, tmp_path / 'f.bin', timeout=2)
    assert d.state == 'error' and isinstance(d.last_exception, bitpit.NetworkError)
    assert 'within the response head' in str(d.last_exception)


def test_bytes_beyond_a_body_read_whole_close_its_connection(answer):
    """The next answer on the connection would begin with them: bitpit's
    reader marks the connection closing (http.client's reused it)."""
    response = answer(bitpit._Response, b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n'
                      b'helloHTTP/1.1 200 OK\r\n')
    assert not response.will_close
    assert response.read() == b'hello' and response.isclosed() and response.will_close


def test_a_chunked_body_read_in_pieces_ends_at_its_last_chunk(answer):
    response = answer(bitpit._Response, b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked'
                      b'\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n')
    pieces = []
    while not response.isclosed():
        pieces.append(bitpit._drive_here(response.read1_steps(2)))
    assert b''.join(pieces) == b'abcdefg' and max(map(len, pieces)) == 2
    assert not response.will_close  # read to its end: the connection carries the next


def test_a_chunk_size_that_is_not_one_fails_the_download(server, tmp_path):
    server.add_raw('/f', lambda handler: handler.wfile.write(
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
        b'5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n'))
    d, _ = download(server.url('/f'), tmp_path / 'f', restart_wait=0, retries=0)
    assert d.state in ('error', 'fatal-error') and d.downloaded == 5
    assert isinstance(d.last_exception, bitpit.ProtocolError)
    assert "chunk size b'zz'" in str(d.last_exception)


@pytest.mark.parametrize('bad, before', [(b'zz\r\n', 5), (b'5\r\nworldXX\r\n', 10)])
def test_a_bad_chunk_on_a_connection_kept_open_fails_at_once(server, tmp_path, bad, before):
    """The framing error found after some body bytes is raised at the
    read that follows them, not after one more receive: this server keeps
    the connection open (until bitpit closes it), so a receive would wait
    for the time-out and fail the download as a stall, not a bad body."""
    def answer_and_wait(handler):
        handler.wfile.write(b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n'
                            b'5\r\nhello\r\n' + bad)
        handler.wfile.flush()
        handler.rfile.read(1)  # until bitpit closes the connection
    server.add_raw('/f', answer_and_wait)
    d, _ = download(server.url('/f'), tmp_path / 'f', restart_wait=0, retries=0, timeout=2)
    assert isinstance(d.last_exception, bitpit.ProtocolError), repr(d.last_exception)
    assert 'bad chunked body' in str(d.last_exception) and d.downloaded == before


@pytest.mark.parametrize('end', [b'0\r\n', b'0\r\nExpires: never\r\n'])
def test_a_chunked_body_cut_within_its_trailer_is_whole(server, tmp_path, end):
    """The last chunk (size 0) came: a server that closes before the end
    of the trailer has sent the whole body. http.client took it so (and
    bitpit with it, before its own framing); refused, the download could
    never complete, as every retry gets the same answer."""
    server.add_raw('/f', lambda handler: handler.wfile.write(
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n' + end))
    d, _ = download(server.url('/f'), tmp_path / 'f', restart_wait=0, retries=0)
    assert d.state == 'complete', repr(d.last_exception)
    assert (tmp_path / 'f').read_bytes() == b'hello'


def test_bytes_beyond_an_empty_body_close_its_connection(tmp_path):
    """An empty file's answer with bytes after it: the server is out of
    step, and the connection carries no other request (the next answer
    would begin with them; a _Body made for every answer said so on main)."""
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(8)
    listener.settimeout(10)
    conns = []  # the connection number of each request, by path

    def serve(sock, number):
        with sock:
            sock.settimeout(10)
            while True:  # (bitpit sends a request after the last answer)
                head = read_head(sock)
                if head is None:
                    return
                path = head.split(b' ')[1]
                conns.append((path, number))
                if path == b'/empty':
                    sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n'
                                 b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwrong')
                else:
                    sock.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nright')

    def accept():
        number = 0
        try:
            while True:
                sock, _ = listener.accept()
                number += 1
                threading.Thread(target=serve, args=(sock, number), daemon=True).start()
        except OSError:
            pass
    threading.Thread(target=accept, daemon=True).start()
    base = 'http://127.0.0.1:{}'.format(listener.getsockname()[1])
    try:
        bitpit.download(base + '/empty', str(tmp_path / 'empty'))
        bitpit.download(base + '/next', str(tmp_path / 'next'))
    finally:
        listener.close()
    assert (tmp_path / 'empty').read_bytes() == b''
    assert (tmp_path / 'next').read_bytes() == b'right'
    assert [number for _, number in conns] == [1, 2], conns
