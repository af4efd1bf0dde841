"""Steps: connection code written as generators that yield their waits
(``bitpit._Wait``), so that the same code runs on a thread of its own
(``bitpit._drive_here``) or, in the next engine, on one loop with many
others. These tests drive steps by hand and on a thread."""

import select
import socket
import ssl
import threading
import time

import pytest

import bitpit
from conftest import HTTPS_DATA


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
    assert bitpit._drive_here(steps()) == 'ended'
    assert time.monotonic() - began < 1
    assert seen == {'ready': True, 'read': b'', 'cancelled': True}
    server.release()


def test_a_cancel_ends_a_pause_at_once_and_its_time_ends_it_too():
    cancel = bitpit._Cancel()

    def steps(seconds):
        came = yield cancel.pause(time.monotonic() + seconds)
        return came, cancel.is_set()

    assert bitpit._drive_here(steps(0.05)) == (False, False)
    threading.Timer(0.05, cancel.cancel).start()
    began = time.monotonic()
    assert bitpit._drive_here(steps(30)) == (True, True)
    assert time.monotonic() - began < 1


class Abortable:
    """What a ``_Cancel`` takes: it counts its aborts."""
    aborted = 0

    def abort(self):
        self.aborted += 1


class CancelledBetween(set):
    """The registrations of a ``_Cancel``, as another thread cancels it
    between the steps of a register (before or after its item goes into
    the set) or of an unregister (before the item goes out)."""

    def __init__(self, cancel, after_add=False, items=()):
        super().__init__(items)
        self.cancel, self.after_add = cancel, after_add

    def add(self, item):
        if not self.after_add:
            self.cancel.cancel()
        super().add(item)
        if self.after_add:
            self.cancel.cancel()

    def discard(self, item):
        self.cancel.cancel()
        super().discard(item)


def test_a_cancel_aborts_what_is_registered_and_not_let_go_even_as_it_races_a_register():
    """A cancel aborts each item registered with it and not unregistered,
    once; one registered after it raises ``_Stopped``. No lock orders a
    register or an unregister and a cancel from another thread (see
    ``_Cancel``): a cancel that comes between their steps aborts the item
    or has its register raise, and an item let go as a cancel comes is
    aborted, or the cancel is seen after (a connection then closed, not
    pooled)."""
    cancel = bitpit._Cancel()
    kept, let_go = Abortable(), Abortable()
    cancel.register(kept)
    cancel.register(let_go)
    cancel.unregister(let_go)
    cancel.cancel()
    cancel.cancel()
    assert (kept.aborted, let_go.aborted) == (1, 0)
    with pytest.raises(bitpit._Stopped):
        cancel.register(Abortable())
    for after_add in (False, True):
        cancel, item = bitpit._Cancel(), Abortable()
        cancel._live = CancelledBetween(cancel, after_add)
        with pytest.raises(bitpit._Stopped):
            cancel.register(item)
        assert item.aborted == after_add
    cancel, item = bitpit._Cancel(), Abortable()
    cancel._live = CancelledBetween(cancel, items=[item])  # (registered)
    cancel.unregister(item)
    assert item.aborted and cancel.is_set()


def test_a_pause_without_a_deadline_lasts_until_a_cancel_ends_it():
    """A wait for nothing but a cancel is the cancel's pause without a
    deadline, which the cancel ends."""
    cancel = bitpit._Cancel()

    def steps():
        wait = cancel.pause(0)
        wait.until = None
        came = yield wait
        return came, cancel.is_set()

    threading.Timer(0.05, cancel.cancel).start()
    began = time.monotonic()
    assert bitpit._drive_here(steps()) == (True, True)
    assert time.monotonic() - began < 1


def test_an_event_ends_its_wait_and_its_deadline_ends_it_too():
    event = threading.Event()

    def steps(until):
        return (yield bitpit._Wait(None, until, event=event))

    assert bitpit._drive_here(steps(time.monotonic() + 0.05)) is False
    threading.Timer(0.05, event.set).start()
    assert bitpit._drive_here(steps(time.monotonic() + 30)) is True


def test_a_failure_of_a_wait_is_raised_in_the_steps_where_they_waited():
    """What a wait on the calling thread raises (an interrupt, say) comes
    out of the ``yield``, so the steps' own handlers and ``finally``
    clauses run as for code that blocks."""
    class Broken(Exception):
        pass

    class FailingEvent(threading.Event):
        def wait(self, timeout=None):
            raise Broken('the wait failed')

    seen = []

    def steps():
        try:
            yield bitpit._Wait(None, time.monotonic() + 5, event=FailingEvent())
        except Broken as exc:
            seen.append(str(exc))
            raise
        finally:
            seen.append('cleaned up')

    with pytest.raises(Broken):
        bitpit._drive_here(steps())
    assert seen == ['the wait failed', 'cleaned up']


def test_a_wait_for_ever_with_nothing_to_end_it_is_refused():
    def steps():
        yield bitpit._Wait(None, None)

    with pytest.raises(ValueError):
        bitpit._drive_here(steps())


# -- the transfer's steps: token buckets, the pump --------------------------------

def never():
    return False


def drained(rate):
    """A bucket of ``rate`` bytes a second, empty: its tokens come from now."""
    bucket = bitpit._TokenBucket(rate)
    bucket.drain()
    return bucket


def test_a_token_bucket_waiter_yields_a_wait_for_its_event_until_its_tokens_are_due():
    """10,000 bytes a second, a grant of 500 at most (half the depth): an
    empty bucket's first waiter waits for its event until the 500 bytes are
    due, 0.05 s on; a refund that makes them sets the event, and the steps
    give the grant."""
    bucket = drained(10000)
    steps = bucket.acquire_steps(1000, never)
    asked = time.monotonic()
    wait = next(steps)
    assert isinstance(wait, bitpit._Wait) and wait.sock is None
    assert asked + 0.04 <= wait.until <= time.monotonic() + 0.05
    assert not wait.event.is_set()
    bucket.refund(600)
    assert wait.event.is_set()
    with pytest.raises(StopIteration) as end:
        steps.send(True)
    assert end.value.value == 500


def test_token_bucket_waiters_are_served_in_their_order_and_a_rate_change_wakes_them():
    bucket = drained(10000)
    first, second = bucket.acquire_steps(300, never), bucket.acquire_steps(400, never)
    first_wait, second_wait = next(first), next(second)
    assert first_wait.until is not None
    assert second_wait.until is None           # behind the first: no tokens due to it yet
    bucket.refund(1000)
    assert first_wait.event.is_set() and not second_wait.event.is_set()
    with pytest.raises(StopIteration) as end:
        first.send(True)
    assert end.value.value == 300
    assert second_wait.event.is_set()          # the head of the queue left
    # 700 tokens left: served at once now that it is the head
    with pytest.raises(StopIteration) as end:
        second.send(True)
    assert end.value.value == 400
    third = bucket.acquire_steps(10 ** 6, never)
    third_wait = next(third)
    assert third_wait.until is not None
    bucket.rate = 0
    assert third_wait.event.is_set()
    with pytest.raises(StopIteration) as end:
        third.send(True)
    assert end.value.value == 10 ** 6          # unlimited now: all it asked for


def test_a_stop_ends_a_token_bucket_wait_and_steps_dropped_at_a_wait_leave_the_queue():
    bucket = drained(10000)
    mine = bucket.acquire_steps(300, never)
    my_wait = next(mine)
    stopped = threading.Event()
    other = bucket.acquire_steps(300, stopped.is_set)
    other_wait = next(other)
    assert [turn.number for turn in bucket._waiters] == [0, 1]
    assert my_wait.until is not None           # the head: it waits for its tokens
    assert other_wait.until is None            # behind it
    stopped.set()
    bucket.wake()                              # what a stop does after its cancel
    assert other_wait.event.is_set()
    with pytest.raises(StopIteration) as end:
        other.send(True)
    assert end.value.value == 0
    mine.close()                               # steps dropped at a wait leave the queue
    assert bucket._waiters == []


def drive_by_hand(steps, before_a_read_wait):
    """Run ``steps`` to their end with a loop of the test's own (each wait
    through ``bitpit._block``, without a cancel), asserting that each thing
    they yield is a ``_Wait``; ``before_a_read_wait()`` is called before
    each wait for bytes. Their result and their waits."""
    waits, value = [], None
    while True:
        try:
            wait = steps.send(value)
        except StopIteration as end:
            return end.value, waits
        assert isinstance(wait, bitpit._Wait), wait
        waits.append(wait)
        if wait.sock is not None and not wait.writing:
            before_a_read_wait()
        value = bitpit._block(wait)


@pytest.mark.parametrize('gated_head', [False, True])
def test_a_pump_never_blocks_it_yields_each_wait(server, tmp_path, gated_head):
    """The server sends each part of the answer only once the pump's steps
    yielded a wait for bytes: steps that blocked in a read instead would
    wait for it until the time-out and fail. With ``gated_head``, the head
    too (the request's steps); without, it comes with the body's first
    part, and the gates hold the rest."""
    data = bytes(range(256)) * 12
    parts = [data[:1000], data[1000:2000], data[2000:]]
    gates = threading.Semaphore(0)

    def answer(handler):
        if gated_head and not gates.acquire(timeout=5):
            return
        handler.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n'
                            b'Connection: close\r\n\r\n' % len(data) + parts[0])
        for part in parts[1:]:
            if not gates.acquire(timeout=5):
                return
            handler.wfile.write(part)

    url = server.add_raw('/gated', answer)
    address = bitpit._check_url(url)
    store = bitpit._FileStore(tmp_path / 'f', url)
    options = bitpit._RequestOptions(address, bitpit._RequestSettings(
        {}, None, None, None, 0.5), bitpit._Cookies())
    transfer = bitpit._Transfer(store=store, addresses=[address], options=options,
                                connections=1, chunk_size=1024,  # (each read its own)
                                buckets=(bitpit._TokenBucket(),), checksum=None,
                                max_size=None, min_speed=0, rename_in=None, gzip_name=False)
    conn = transfer._add_connection()
    assert transfer._next_for(conn) is None and conn.active
    try:
        _, waits = drive_by_hand(bitpit._fetch_steps(transfer, conn), gates.release)
    finally:
        for _ in parts:
            gates.release()                    # (a handler left waiting goes)
        store.close()
    assert (tmp_path / 'f').read_bytes() == data
    assert len([w for w in waits if w.sock is not None]) >= len(parts) - 1



def unstarted_transfer(tmp_path, connections):
    """A transfer of a file in ``tmp_path`` from a URL that no server
    answers, with ``connections`` and no limit, never started: for tests
    that drive its steps' looks by hand."""
    address = bitpit._check_url('http://127.0.0.1:9/f')
    store = bitpit._FileStore(tmp_path / 'f', address.url)
    options = bitpit._RequestOptions(address, bitpit._RequestSettings(
        {}, None, None, None, 0.5), bitpit._Cookies())
    return bitpit._Transfer(store, [address], options, connections, 1024,
                            (bitpit._TokenBucket(),), None, None, 0, None, False)


def test_the_runs_wait_looks_for_work_after_a_change_even_with_events_to_take(
        tmp_path, monkeypatch):
    """The run's ``wait_steps`` skips the look for more to do
    (``_keep_going``) after a wake that brought events alone (a small
    file's size and start), but never after one that brought a change
    too, whichever came first in the round, nor after a change that woke
    it from its wait: else a change that came with an event would wait
    for the next period to be acted on."""
    looks = []
    monkeypatch.setattr(bitpit._Transfer, '_keep_going', lambda self: looks.append(1))
    transfer = unstarted_transfer(tmp_path, connections=1)

    def wait(*news):
        """Let ``news`` happen (as a connection's steps do), then one
        wait of the run: whether it looked for work."""
        del looks[:]
        transfer.take_events()
        steps = transfer.wait_steps(time.monotonic() + 60)
        for happen in news:
            happen()
        with pytest.raises(StopIteration):
            next(steps)
        return bool(looks)

    def event():
        transfer._report('size', 5)
    assert not wait(event)                          # events alone: nothing to do
    assert wait(event, transfer._wake)              # a change with them
    assert wait(transfer._wake, event)              # ... whichever came first
    for woken in (True, False):                     # by a change as it waits; by its time
        del looks[:]
        transfer.take_events()
        steps = transfer.wait_steps(time.monotonic() + 60)
        waited = next(steps)                        # nothing yet: it waits
        assert waited.event is transfer.news and not looks
        if woken:
            transfer._wake()
            assert waited.event.is_set()
        with pytest.raises(StopIteration):
            steps.send(woken)
        assert looks


def test_a_stop_as_a_connection_looks_for_work_is_not_missed(tmp_path, monkeypatch):
    """A connection with no claim waits for work when a race may be due
    soon. The transfer has no lock: a stop from another thread may come
    anywhere in that look, here after its look at the cancel and before it
    clears the flag that it waits on (as it asks when a race is due), and
    still the connection waits for nothing (else for the race's due time,
    past stop()'s 0.1 s)."""
    transfer = unstarted_transfer(tmp_path, connections=2)
    conn = transfer._add_connection()
    transfer.probed = True
    transfer.work = bitpit._Flag()  # (an earlier wait's)

    def due_as_a_stop_comes(planner, conn):
        transfer.stop()
        return time.monotonic() + 60
    monkeypatch.setattr(bitpit._Planner, 'choose', lambda planner, conn: False)
    monkeypatch.setattr(bitpit._Planner, 'rate_due', due_as_a_stop_comes)
    wait = transfer._next_for(conn)
    assert wait is None or wait.event.is_set()
    assert not conn.active


# -- the http layer's connection path as steps ----------------------------------
#
# A request's steps (name look-up, connect, request, head, body) yield a
# _Wait wherever they would block: fed here over a socket pair by hand, and
# driven against the server by a hand loop that no blocking call gets past.

HEAD = b'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n'


@pytest.fixture
def pair():
    """``(ours, theirs)``: a connected socket pair, ours not blocking, as a
    connection's socket is."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with ours, theirs:
        yield ours, theirs


def run_to_end(steps, value=None):
    """Resume ``steps`` with ``value``; what they return (they must not wait)."""
    with pytest.raises(StopIteration) as end:
        steps.send(value)
    return end.value.value


@pytest.mark.parametrize('cuts', [(1,), (9, 20), (len(HEAD) - 3,), (len(HEAD) - 1,)])
def test_an_answers_head_in_any_cut_is_read_between_waits_for_its_socket(pair, cuts):
    """Each wait for bytes is a ``_Wait`` to read the answer's socket,
    asked for before any receive: the head is read whole once its pieces
    came, whatever their cut, and the body's bytes that came with it are
    held; the rest of the body is another wait, then a read."""
    ours, theirs = pair
    data = HEAD + b'hello'
    response = bitpit._Response(ours, timeout=5)
    steps = response.begin_steps()
    wait = next(steps)
    for start, end in zip((0,) + cuts, cuts):
        assert isinstance(wait, bitpit._Wait) and wait.sock is ours and not wait.writing
        theirs.sendall(data[start:end])
        wait = steps.send(True)
    theirs.sendall(data[cuts[-1]:len(data) - 1])  # all but the body's last byte
    run_to_end(steps, True)
    assert response.status == 200 and response.length == 5
    assert len(response.rest) == len(data) - 1 - len(HEAD)
    steps = response.read_steps()
    wait = next(steps)
    assert wait.sock is ours and not wait.writing and wait.until > time.monotonic()
    theirs.sendall(b'o')
    assert run_to_end(steps, True) == b'hello' and response.isclosed()


def test_a_body_read_waits_as_a_step_and_its_wait_times_out(pair):
    """A body's read yields a wait for its socket when no byte is there,
    reads once resumed, and raises ``socket.timeout`` (a stall) when the
    wait came to its deadline instead; ``wait_steps`` waits the same way,
    and not at all for bytes held."""
    ours, theirs = pair
    theirs.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\nab')
    response = bitpit._Response(ours, timeout=5)
    bitpit._drive_here(response.begin_steps())
    body, view = response, memoryview(bytearray(100000))
    assert run_to_end(body.wait_steps(None)) is True  # the two bytes held
    assert run_to_end(body.readinto_steps(view)) == 2 and view[:2] == b'ab'
    until = time.monotonic() + 1
    steps = body.wait_steps(until)
    wait = next(steps)
    assert wait.sock is ours and wait.until == until and run_to_end(steps, False) is False
    steps = body.readinto_steps(view)
    wait = next(steps)
    assert wait.sock is ours and not wait.writing and 4 < wait.until - time.monotonic() <= 5
    theirs.sendall(b'x' * 1000)
    assert run_to_end(steps, True) == 1000 and view[:1000] == b'x' * 1000
    steps = body.readinto_steps(view)
    next(steps)
    with pytest.raises(socket.timeout):
        steps.send(False)


def test_a_request_sent_whole_waits_for_room_as_a_step(pair):
    """A request that the socket does not take at once is sent on once
    the socket has room, each wait one to write its socket."""
    ours, theirs = pair
    conn = bitpit._HTTPConnection('127.0.0.1', 1, timeout=5)
    conn.sock = ours
    data = b'x' * (8 << 20)  # more than socket buffers hold
    steps = conn.send_rest_steps(data, conn.send(data))
    wait = next(steps)
    received = bytearray()
    while True:
        assert wait.sock is ours and wait.writing
        while len(received) < len(data):
            received += theirs.recv(1 << 20)
            if not select.select([theirs], [], [], 0)[0]:
                break
        try:
            wait = steps.send(True)
        except StopIteration:
            break
    while len(received) < len(data):
        received += theirs.recv(1 << 20)
    assert received == data


def tls_ends(pair, certificate):
    """``(client, server, incoming, outgoing)``: our end of ``pair``
    wrapped in TLS (not blocking), the peer's TLS in memory and its two
    buffers; no handshake yet. The peer's end of ``pair`` does not block."""
    ours, theirs = pair
    theirs.setblocking(False)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certificate[0]), str(certificate[1]))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = context.wrap_bio(incoming, outgoing, server_side=True)
    client = ssl.create_default_context(cafile=str(certificate[0])).wrap_socket(
        ours, server_hostname='127.0.0.1', do_handshake_on_connect=False)
    return client, server, incoming, outgoing


def tls_peer_in_memory(pair, certificate):
    """``(client, server, wire)``: our end of ``pair`` wrapped in TLS (not
    blocking), the peer's TLS in memory, and ``wire()``, which gives the
    bytes the peer wrote since, to be sent on the peer's end; the
    handshake done."""
    theirs = pair[1]
    client, server, incoming, outgoing = tls_ends(pair, certificate)
    done = [False, False]
    for _ in range(20):
        for index, end in enumerate((client, server)):
            try:
                end.do_handshake()
                done[index] = True
            except ssl.SSLWantReadError:
                pass
        try:
            incoming.write(theirs.recv(1 << 16))
        except BlockingIOError:
            pass
        theirs.sendall(outgoing.read())
        if all(done):
            return client, server, outgoing.read
    raise AssertionError('no TLS handshake')


def tls_body(pair, certificate):
    """``(client, server, wire, body)``: as ``tls_peer_in_memory``, and the
    ``_Response`` of an answer of 200,000 bytes whose head was read, none
    of its body sent yet."""
    client, server, wire = tls_peer_in_memory(pair, certificate)
    server.write(b'HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n')
    pair[1].sendall(wire())
    response = bitpit._Response(client, timeout=5)
    bitpit._drive_here(response.begin_steps())
    assert response.status == 200 and len(response.rest) == 0
    return client, server, wire, response


def test_a_tls_record_not_whole_yet_is_read_at_the_next_read(pair, certificate):
    """A read over TLS goes on with the records already there; one whose
    bytes did not all come ends it (the socket does not block), and the
    next read waits for the rest: no error for a record cut on the wire."""
    theirs = pair[1]
    client, server, wire, body = tls_body(pair, certificate)
    view = memoryview(bytearray(100000))
    data = bytes(range(256)) * 160  # 40 KiB: three records
    server.write(data)
    records = wire()
    first = 5 + int.from_bytes(records[3:5], 'big')  # a record's header, then its bytes
    theirs.sendall(records[:first + 10])  # the first record, and the second's first bytes
    got = run_to_end(body.readinto_steps(view))
    assert 0 < got <= 16384 and view[:got] == data[:got]
    steps = body.readinto_steps(view[got:])
    wait = next(steps)  # the second record is not whole: a wait for its bytes
    assert wait.sock is client and not wait.writing
    theirs.sendall(records[first + 10:])
    got += run_to_end(steps, True)
    assert view[:got] == data


class NoBlocking:
    """Makes every call that blocks the calling thread fail on the test's
    thread: a wait for a socket (but a look with no wait), an event or a
    condition, a sleep, and a socket made to block again."""

    def __init__(self, monkeypatch):
        self.thread = threading.current_thread()
        ready = bitpit._ready

        def looked(sock, seconds=0.0, writing=False):
            self.check('a wait for a socket', seconds == 0)
            return ready(sock, seconds, writing)
        monkeypatch.setattr(bitpit, '_ready', looked)
        for owner, name in [(threading.Event, 'wait'), (threading.Condition, 'wait'),
                            (time, 'sleep'), (socket.socket, 'settimeout'),
                            (socket.socket, 'setblocking')]:
            monkeypatch.setattr(owner, name, self.refused(name, getattr(owner, name)))

    def check(self, what, allowed=False):
        if not allowed and threading.current_thread() is self.thread:
            raise AssertionError('the steps blocked: ' + what)

    def refused(self, name, real):
        def call(*args, **kwargs):
            # a socket made not to block is fine: setblocking(False), settimeout(0)
            self.check(name, name in ('setblocking', 'settimeout') and args[1:] == (0,))
            return real(*args, **kwargs)
        return call


def test_a_name_look_up_is_a_wait_for_its_event_which_a_cancel_ends():
    """A name is looked up on a thread of its own, which sets the event the
    steps wait for (an address needs no look-up, nor a wait); a cancel
    sets it too, and the steps stop."""
    assert run_to_end(bitpit._resolve_steps('127.0.0.1', 80, None, 5))[0][4] == ('127.0.0.1', 80)
    steps = bitpit._resolve_steps('localhost', 80, None, 5)
    wait = next(steps)
    assert wait.sock is None and wait.event is not None and wait.until <= time.monotonic() + 5
    assert wait.event.wait(5)
    assert any(address[4][1] == 80 for address in run_to_end(steps, True))
    cancel = bitpit._Cancel()
    steps = bitpit._resolve_steps('localhost', 80, cancel, 5)
    wait = next(steps)
    cancel.cancel()
    assert wait.event.is_set()
    with pytest.raises(bitpit._Stopped):
        steps.send(True)


def test_a_host_slot_is_waited_for_as_an_event_that_its_grant_or_a_cancel_sets():
    slots, host = bitpit._HostSlots(1), ('http', 'example.com', 80)
    run_to_end(slots.acquire_steps(host, None))  # a free slot: no wait
    cancel = bitpit._Cancel()
    second, third = slots.acquire_steps(host, None), slots.acquire_steps(host, cancel)
    second_wait = next(second)
    third_wait = next(third)
    assert second_wait.event is not None and second_wait.until is None
    assert not second_wait.event.is_set() and not third_wait.event.is_set()
    slots.release(host)  # to the longest waiting
    assert second_wait.event.is_set() and not third_wait.event.is_set()
    run_to_end(second, True)
    cancel.cancel()
    assert third_wait.event.is_set()
    with pytest.raises(bitpit._Stopped):
        third.send(True)
    slots.release(host)
    run_to_end(slots.acquire_steps(host, None))  # the cancelled waiter took none


def by_hand(steps, waits):
    """Drive ``steps`` by hand to their end, each wait a ``select``, which
    is appended to ``waits``; what they return."""
    value = None
    while True:
        try:
            wait = steps.send(value)
        except StopIteration as end:
            return end.value
        waits.append(wait)
        assert isinstance(wait, bitpit._Wait) and wait.sock is not None
        assert wait.sock.gettimeout() == 0.0  # (a socket that never blocks)
        assert wait.until is not None and wait.until <= time.monotonic() + 5
        readable, writable, _ = select.select([] if wait.writing else [wait.sock],
                                              [wait.sock] if wait.writing else [], [], 5)
        value = bool(readable or writable)


def request_by_hand(request, size, waits, monkeypatch):
    """Send ``request`` and read its answer's body (of ``size`` bytes at
    most) by hand, every call that would block refused; the answer and
    its body."""
    try:
        NoBlocking(monkeypatch)
        response = by_hand(request.send_steps(), waits)
        body, view, got = response, memoryview(bytearray(size)), 0
        while True:
            n = by_hand(body.readinto_steps(view[got:]), waits)
            if not n:
                break
            got += n
        monkeypatch.undo()
    finally:
        request.close(False)
    return response, view[:got]


def test_a_requests_steps_never_block_and_wait_only_for_its_socket(server, monkeypatch):
    """A request (a redirect followed on its kept-alive connection, then
    the answer's body, paced by the server) driven by a hand loop, with
    every call that would block the thread refused: the steps connect,
    send, read heads and bodies only by yielding waits, each one for the
    request's socket, which never blocks."""
    data = bytes(range(256)) * 40
    server.add('/f', data, throttle=len(data) * 5, throttle_piece=len(data) // 2)
    url = server.add('/r', b'moved', status=302, headers={'Location': '/f'})
    address = bitpit._check_url(url)
    options = bitpit._RequestOptions(address, bitpit._RequestSettings(
        {}, None, '', None, 5.0), bitpit._Cookies())
    request = bitpit._Request(options, address)
    waits = []
    response, body = request_by_hand(request, len(data), waits, monkeypatch)
    assert response.status == 200 and body == data
    assert waits and all(wait.sock is request.sock for wait in waits)
    assert [r.path for r in server.requests] == ['/r', '/f'] and server.connections == 1
    reads = [wait for wait in waits if not wait.writing]
    assert len(reads) >= 3  # the two heads, then the body's second piece at least


def test_a_tls_request_through_a_tunnel_never_blocks(https_url, certificate, proxy,
                                                     monkeypatch):
    """The proxy's CONNECT, its answer, the TLS handshake and the records
    of the answer are steps too: their waits are all for the one socket
    (raw, then wrapped), which never blocks."""
    context = ssl.create_default_context(cafile=str(certificate[0]))
    address = bitpit._check_url(https_url)
    options = bitpit._RequestOptions(address, bitpit._RequestSettings(
        {}, None, proxy.url, context, 5.0), bitpit._Cookies())
    request = bitpit._Request(options, address)
    waits = []
    response, body = request_by_hand(request, len(HTTPS_DATA), waits, monkeypatch)
    assert response.status == 200 and body == HTTPS_DATA
    assert proxy.seen[0][0] == 'CONNECT'
    assert isinstance(request.sock, ssl.SSLSocket)
    assert {wait.sock.fileno() for wait in waits} == {request.sock.fileno()}
    assert any(wait.sock is not request.sock for wait in waits)  # the raw socket's, first


# -- review of the http layer's steps: the time-out is a time with no byte ----------
#
# A TLS handshake or record whose bytes come in pieces makes one call that
# waits several times: each wait is the whole time-out again, as the
# reference has it ("no byte arrives for this long"), not what is left of
# the first wait's.

def test_a_tls_handshake_whose_bytes_come_in_pieces_waits_the_time_out_after_each(
        pair, certificate):
    """fa06dba's handshake gave each wait the time-out; a server whose
    handshake comes slowly but steadily is no stall."""
    theirs = pair[1]
    client, server, incoming, outgoing = tls_ends(pair, certificate)
    steps = bitpit._io_steps(client.do_handshake, client, 5)
    wait = next(steps)  # its first flight sent: a wait for the server's
    assert wait.sock is client and not wait.writing
    incoming.write(theirs.recv(1 << 16))
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()
    flight = outgoing.read()
    theirs.sendall(flight[:100])
    came_at = time.monotonic()
    wait = steps.send(True)  # a piece of the server's flight: a wait for the rest
    assert wait.sock is client and wait.until >= came_at + 5
    theirs.sendall(flight[100:])
    run_to_end(steps, True)


def test_a_tls_record_whose_bytes_come_in_pieces_waits_the_time_out_after_each(
        pair, certificate):
    """A slow server's 16 KiB records, each longer than the time-out in
    coming, are no stall while bytes come."""
    theirs = pair[1]
    client, server, wire, body = tls_body(pair, certificate)
    view = memoryview(bytearray(100000))
    server.write(b'x' * 16384)
    record = wire()
    steps = body.readinto_steps(view)
    next(steps)  # no byte yet: a wait
    theirs.sendall(record[:1000])
    came_at = time.monotonic()
    wait = steps.send(True)  # a piece of the record: a wait for the rest
    assert wait.sock is client and wait.until >= came_at + 5
    theirs.sendall(record[1000:])
    assert run_to_end(steps, True) == 16384 and view[:16384] == b'x' * 16384


def test_an_answers_head_waits_again_after_a_receive_that_would_block(pair):
    """A wait for the answer's socket that comes with no byte after all (a
    receive that would block) is followed by another wait for it, with the
    whole time-out: no error, and the head is read once its bytes come."""
    ours, theirs = pair
    response = bitpit._Response(ours, timeout=5)
    steps = response.begin_steps()
    next(steps)  # the wait for the answer
    told_at = time.monotonic()
    wait = steps.send(True)  # told it came, though no byte did: a wait again
    assert wait.sock is ours and not wait.writing and wait.until >= told_at + 5
    theirs.sendall(HEAD + b'hello')
    run_to_end(steps, True)
    assert response.status == 200 and len(response.rest) == 5


def test_an_answers_head_in_a_tls_record_that_comes_in_pieces_is_read_whole(
        pair, certificate):
    """Over TLS, a receive of a record not whole yet would block (TLS's
    SSLWantReadError): the answer's head is read after another wait for
    the rest of its record."""
    theirs = pair[1]
    client, server, wire = tls_peer_in_memory(pair, certificate)
    server.write(HEAD + b'hello')
    record = wire()
    response = bitpit._Response(client, timeout=5)
    steps = response.begin_steps()
    next(steps)  # the wait for the answer
    theirs.sendall(record[:10])
    wait = steps.send(True)  # a piece of the record: a wait for the rest
    assert wait.sock is client and not wait.writing
    theirs.sendall(record[10:])
    run_to_end(steps, True)
    assert response.status == 200 and len(response.rest) == 5


def test_a_name_look_ups_steps_start_its_thread_without_waiting_for_it(monkeypatch):
    """Steps never wait on an Event: a name's look-up thread is started,
    not waited for until it runs."""
    NoBlocking(monkeypatch)
    try:
        steps = bitpit._resolve_steps('localhost', 80, None, 5)
        wait = next(steps)
    finally:
        monkeypatch.undo()
    assert wait.event.wait(5)
    assert run_to_end(steps, True)
