"""bitpit's own body framing (the next engine, issue 24): where a body ends,
told from the bytes after its head, fed in any cut, with no socket."""

import pytest

import bitpit


def feed_in_cuts(framing, data, cut):
    """Feed ``data`` ``cut`` bytes at a time; the body's bytes."""
    body = b''
    for at in range(0, len(data), cut):
        body += b''.join(framing.feed(data[at:at + cut]))
    return body


CHUNKED = (b'5\r\nhello\r\n'
           b'1;name=value\r\n \r\n'
           b'A\r\n0123456789\r\n'
           b'0\r\nExpires: never\r\nX-Trailer: 1\r\n\r\n')


@pytest.mark.parametrize('cut', [1, 2, 3, 7, len(CHUNKED) + 5])
def test_a_chunked_body_in_any_cut_gives_its_bytes_and_what_follows(cut):
    framing = bitpit._BodyFraming(None, chunked=True)
    assert feed_in_cuts(framing, CHUNKED + b'HTTP/1.1 200 OK', cut) == b'hello 0123456789'
    assert framing.done
    assert framing.rest == b'HTTP/1.1 200 OK'
    framing.closed()  # (whole: the end of the connection is no error)


def test_a_chunked_body_with_bare_line_feeds_is_read_as_http_client_reads_it():
    framing = bitpit._BodyFraming(None, chunked=True)
    assert b''.join(framing.feed(b'3\nabc\n0\n\n')) == b'abc' and framing.done


@pytest.mark.parametrize('data, message', [
    (b'z\r\n', 'chunk size'),
    (b'-1\r\n', 'chunk size'),
    (b'\r\n', 'chunk size'),
    (b'3\r\nabcX\r\n', 'after a chunk'),
    (b'1' * 70000, 'a line of more than'),
    (b'0\r\n' + b'X: y\r\n' * 101, 'trailer lines'),
])
def test_a_chunked_body_that_is_not_one_is_refused(data, message):
    framing = bitpit._BodyFraming(None, chunked=True)
    with pytest.raises(bitpit.ProtocolError, match=message):
        feed_in_cuts(framing, data, 4096)
        framing.closed()  # (an error after some bytes comes after them)


@pytest.mark.parametrize('data', [b'', b'5\r\nhel', b'5\r\nhello', b'5\r\nhello\r\n'])
def test_a_chunked_body_cut_short_is_an_error_at_the_close(data):
    framing = bitpit._BodyFraming(None, chunked=True)
    framing.feed(data)
    with pytest.raises(bitpit.ProtocolError, match='before the end of the body'):
        framing.closed()


@pytest.mark.parametrize('cut', [1, 4, 100])
def test_a_body_of_a_length_ends_there_and_leaves_what_follows(cut):
    framing = bitpit._BodyFraming(10)
    assert feed_in_cuts(framing, b'0123456789extra', cut) == b'0123456789'
    assert framing.done and framing.rest == b'extra'


def test_a_body_of_a_length_cut_short_and_an_empty_one():
    framing = bitpit._BodyFraming(10)
    framing.feed(b'01234')
    with pytest.raises(bitpit.ProtocolError):
        framing.closed()
    empty = bitpit._BodyFraming(0)
    assert empty.done and empty.feed(b'next') == [] and empty.rest == b'next'


def test_a_body_to_the_close_ends_with_the_connection():
    framing = bitpit._BodyFraming(None)
    assert feed_in_cuts(framing, b'all of it', 2) == b'all of it'
    assert not framing.done
    framing.closed()
    assert framing.done


def test_a_framing_error_after_some_bytes_comes_after_them():
    """The bytes before a bad chunk size are handed out; the error comes
    at the next feed (or at the close): nothing received is lost."""
    framing = bitpit._BodyFraming(None, chunked=True)
    assert framing.feed(b'5\r\nhello\r\nzz\r\n') == [b'hello']
    with pytest.raises(bitpit.ProtocolError, match='chunk size'):
        framing.feed(b'more')
    with pytest.raises(bitpit.ProtocolError, match='chunk size'):
        framing.closed()
