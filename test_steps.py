"""Steps: connection code written as generators that yield their waits
(``bitpit._Wait``), so that the same code runs on a thread of its own
(``bitpit._drive_here``) or, in the next engine, on one loop with many
others. These tests drive steps by hand and on a thread."""

import socket
import threading
import time

import pytest

import bitpit


def get_steps(address, path, deadline):
    """A GET of ``path`` on a new connection to ``address``, as steps: the
    body, or ``None`` when ``deadline`` (monotonic) came first."""
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.connect_ex(address)
        if not (yield bitpit._Wait(sock, deadline, writing=True)):
            return None
        sock.send('GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
                  .format(path).encode())
        parser, head = bitpit._HeadParser(), None
        while head is None:
            if not (yield bitpit._Wait(sock, deadline)):
                return None
            head = parser.feed(sock.recv(65536))
        body = bytes(parser.rest)
        length = int(head.headers.get('Content-Length'))
        while len(body) < length:
            if not (yield bitpit._Wait(sock, deadline)):
                return None
            data = sock.recv(65536)
            if not data:
                raise ConnectionError('closed before the end of the body')
            body += data
        return body
    finally:
        sock.close()


def address_of(server):
    host, port = server.url('/').split('/')[2].split(':')
    return host, int(port)


def test_steps_driven_on_their_own_thread_give_their_result(server):
    data = bytes(range(256)) * 400
    server.add('/f', data)
    assert bitpit._drive_here(get_steps(address_of(server), '/f', time.monotonic() + 5)) == data


def test_steps_are_resumed_with_false_when_their_deadline_comes_first(server):
    server.add('/stalled', b'x' * 10, stall_before_headers=True)
    began = time.monotonic()
    assert bitpit._drive_here(get_steps(address_of(server), '/stalled', began + 0.2)) is None
    assert 0.2 <= time.monotonic() - began < 2
    server.release()


class Shutter:
    """Shuts a socket down when a cancel aborts it, as a connection's abort does."""

    def __init__(self, sock):
        self.abort = lambda: sock.shutdown(socket.SHUT_RDWR)


def test_a_cancel_ends_a_wait_and_the_steps_see_it(server):
    """A cancel aborts what is registered with it (here the socket, as a
    connection is) and ends the wait; the steps go on and find the end."""
    server.add('/stalled', b'x' * 10, stall_before_headers=True)
    cancel = bitpit._Cancel()
    seen = {}

    def steps():
        sock = socket.create_connection(address_of(server))
        sock.setblocking(False)
        cancel.register(Shutter(sock))
        try:
            sock.send(b'GET /stalled HTTP/1.1\r\nHost: x\r\n\r\n')
            seen['ready'] = yield bitpit._Wait(sock, None)
            seen['read'] = sock.recv(100)
            seen['cancelled'] = cancel.is_set()
            return 'ended'
        finally:
            sock.close()

    threading.Timer(0.1, cancel.cancel).start()
    began = time.monotonic()
    assert bitpit._drive_here(steps(), cancel) == 'ended'
    assert time.monotonic() - began < 1
    assert seen == {'ready': True, 'read': b'', 'cancelled': True}
    server.release()


def test_a_cancel_ends_a_wait_for_a_time_at_once():
    cancel = bitpit._Cancel()

    def steps():
        came = yield bitpit._Wait(None, time.monotonic() + 30)
        return came, cancel.is_set()

    threading.Timer(0.05, cancel.cancel).start()
    began = time.monotonic()
    assert bitpit._drive_here(steps(), cancel) == (False, True)
    assert time.monotonic() - began < 1


def test_an_event_ends_its_wait_and_its_deadline_ends_it_too():
    event = threading.Event()

    def steps(until):
        return (yield bitpit._Wait(None, until, event=event))

    assert bitpit._drive_here(steps(time.monotonic() + 0.05)) is False
    threading.Timer(0.05, event.set).start()
    assert bitpit._drive_here(steps(time.monotonic() + 30)) is True


def test_a_failure_of_a_wait_is_raised_in_the_steps_where_they_waited():
    """The download thread tends its download in its waits; what the
    tending raises comes out of the ``yield``, so the steps' own handlers
    and ``finally`` clauses run as for code that blocks."""
    class Broken(Exception):
        pass

    class FailingCancel(bitpit._Cancel):
        def wait_for(self, ready, seconds):
            raise Broken('the tending failed')

    seen = []

    def steps():
        try:
            yield bitpit._Wait(None, time.monotonic() + 5, event=threading.Event())
        except Broken as exc:
            seen.append(str(exc))
            raise
        finally:
            seen.append('cleaned up')

    with pytest.raises(Broken):
        bitpit._drive_here(steps(), FailingCancel())
    assert seen == ['the tending failed', 'cleaned up']


def test_a_wait_for_ever_with_nothing_to_end_it_is_refused():
    def steps():
        yield bitpit._Wait(None, None)

    with pytest.raises(ValueError):
        bitpit._drive_here(steps())
