"""The loop of the next engine (issue 24): a connection's code is a
generator of steps that yields ``_Wait``s, and the same steps run on a
thread of their own (``_drive_here``) or, many at once, on the one thread
of a ``_Loop``. The steps here are a bare GET, enough to drive a socket
through its connect, its request and its answer."""

import os
import socket
import threading
import time

import pytest

import bitpit
from test_steps import address_of, get_steps


class Ends:
    """What a loop's ``done`` calls tell, and an event when ``count`` came."""

    def __init__(self, count):
        self.results, self.errors = [], []
        self.count = count
        self.all_in = threading.Event()
        self.threads = set()

    def __call__(self, result, error):
        self.threads.add(threading.current_thread().name)
        (self.results if error is None else self.errors).append(error or result)
        if len(self.results) + len(self.errors) == self.count:
            self.all_in.set()


def test_the_steps_that_run_on_a_thread_of_their_own_run_on_the_loop(server):
    data = bytes(range(256)) * 400
    server.add('/f', data)
    deadline = time.monotonic() + 5
    loop, ends = bitpit._Loop(), Ends(1)
    loop.spawn(get_steps(address_of(server), '/f', deadline), ends)
    assert ends.all_in.wait(5)
    assert ends.results == [data] and ends.threads == {'bitpit-loop'}
    loop.join(5)


COUNT = 6  # (the test server keeps 5 connections waiting to be accepted: more retry a second later)


def test_one_loop_thread_drives_many_connections_at_once(server):
    for i in range(COUNT):
        server.add('/f{}'.format(i), b'%d' % i * 1000)
    deadline = time.monotonic() + 10
    loop, ends = bitpit._Loop(), Ends(COUNT)
    for i in range(COUNT):
        loop.spawn(get_steps(address_of(server), '/f{}'.format(i), deadline), ends)
    assert ends.all_in.wait(10)
    assert sorted(ends.results) == sorted(b'%d' % i * 1000 for i in range(COUNT))
    assert ends.threads == {'bitpit-loop'}
    # every request was on a connection of its own, all served
    assert len({r.conn for r in server.requests}) == COUNT
    loop.join(5)
    assert not [t for t in threading.enumerate() if t.name == 'bitpit-loop']


def test_a_deadline_resumes_the_steps_of_a_stalled_server_and_not_the_others(server):
    server.add('/stalled', b'x' * 1000, stall_before_headers=True)
    server.add('/fine', b'y' * 1000)
    loop, ends = bitpit._Loop(), Ends(2)
    began = time.monotonic()
    loop.spawn(get_steps(address_of(server), '/stalled', began + 0.3), ends)
    loop.spawn(get_steps(address_of(server), '/fine', began + 5), ends)
    assert ends.all_in.wait(5)
    assert sorted(ends.results, key=repr) == [None, b'y' * 1000]
    assert time.monotonic() - began >= 0.3
    server.release()
    loop.join(5)


def test_steps_that_raise_end_with_their_error_and_the_loop_goes_on(server):
    server.add('/fine', b'z' * 100)

    def broken():
        yield bitpit._Wait(None, time.monotonic() + 0.05)
        raise ValueError('a bug in the steps')

    loop, ends = bitpit._Loop(), Ends(2)
    loop.spawn(broken(), ends)
    loop.spawn(get_steps(address_of(server), '/fine', time.monotonic() + 5), ends)
    assert ends.all_in.wait(5)
    assert ends.results == [b'z' * 100]
    assert [str(e) for e in ends.errors] == ['a bug in the steps']
    loop.join(5)


def test_the_loop_thread_starts_again_after_it_ended(server):
    server.add('/f', b'w' * 10)
    loop = bitpit._Loop()
    for _ in range(2):
        ends = Ends(1)
        loop.spawn(get_steps(address_of(server), '/f', time.monotonic() + 5), ends)
        assert ends.all_in.wait(5) and ends.results == [b'w' * 10]
        loop.join(5)
        assert not [t for t in threading.enumerate() if t.name == 'bitpit-loop']


def test_a_flag_set_by_another_thread_resumes_its_steps_and_its_deadline_others():
    flags = [bitpit._Flag(), bitpit._Flag(), bitpit._Flag()]
    flags[2].set()  # set before the steps wait: they go on at once

    def steps(flag, until):
        return (yield bitpit._Wait(None, until, event=flag))

    loop, ends = bitpit._Loop(), Ends(3)
    began = time.monotonic()
    loop.spawn(steps(flags[0], began + 5), ends)
    loop.spawn(steps(flags[1], began + 0.1), ends)
    loop.spawn(steps(flags[2], began + 5), ends)
    threading.Timer(0.2, flags[0].set).start()
    assert ends.all_in.wait(5)
    assert ends.results == [True, False, True]
    assert time.monotonic() - began < 2
    loop.join(5)


def test_steps_on_the_loop_wait_for_a_flag_not_a_plain_event():
    def steps():
        yield bitpit._Wait(None, time.monotonic() + 5, event=threading.Event())

    loop, ends = bitpit._Loop(), Ends(1)
    loop.spawn(steps(), ends)
    assert ends.all_in.wait(5)
    assert [type(e) for e in ends.errors] == [TypeError]
    loop.join(5)


def test_a_connection_that_waits_often_keeps_one_deadline_on_the_heap():
    """Each read of a long transfer waits with a deadline (its time-out):
    the loop keeps one entry per connection, not one per wait."""
    left, right = socket.socketpair()
    loop, ends = bitpit._Loop(), Ends(1)
    sizes = []

    def steps():
        for _ in range(1000):
            assert (yield bitpit._Wait(left, time.monotonic() + 30, writing=True))
            sizes.append(len(loop._deadlines))
        return 'done'

    try:
        loop.spawn(steps(), ends)
        assert ends.all_in.wait(5) and ends.results == ['done']
        assert max(sizes) == 1
        loop.join(5)
    finally:
        left.close()
        right.close()


def test_steps_whose_deadlines_are_equal_are_each_resumed_at_it():
    """The heap of deadlines holds (time, steps): two steps that wait
    until the very same time are ordered all the same, and each is
    resumed when it comes."""
    loop, ends = bitpit._Loop(), Ends(3)
    until = time.monotonic() + 0.05

    def steps():
        return (yield bitpit._Wait(None, until))

    for _ in range(3):
        loop.spawn(steps(), ends)
    assert ends.all_in.wait(5) and ends.results == [False] * 3
    loop.join(5)


def test_the_heap_lets_go_of_the_deadlines_of_steps_that_ended():
    """Steps that end long before their time-out (a small file's, in a
    millisecond) leave their deadline on the heap: once such stale ones
    are more than half of it, they go, so that a long run's heap holds
    about what its live steps wait for, not one entry per file."""
    left, right = socket.socketpair()
    loop, kept = bitpit._Loop(), Ends(1)
    stop, sizes = bitpit._Flag(), []

    def keeper():  # keeps the loop's thread (and its heap) from one short steps to the next
        yield bitpit._Wait(None, time.monotonic() + 30, event=stop)

    def short():
        assert (yield bitpit._Wait(left, time.monotonic() + 30, writing=True))

    try:
        loop.spawn(keeper(), kept)
        for _ in range(300):
            ended = Ends(1)
            loop.spawn(short(), ended)
            assert ended.all_in.wait(5) and ended.results == [None]
            sizes.append(len(loop._deadlines))
        assert max(sizes) <= 2 * 64 + 2 and sizes[-1] < 300
        stop.set()
        assert kept.all_in.wait(5)
        loop.join(5)
    finally:
        left.close()
        right.close()


def test_the_poller_keeps_an_ended_steps_socket_idle_and_knows_a_number_taken_again(
        monkeypatch):
    """Steps that end leave their socket watched (idle, with epoll) for the
    next steps that take it up; one that turns readable meanwhile is no
    longer watched, and nobody is resumed for it. A socket closed while
    watched leaves epoll by itself and its number may come back with
    another socket at once: that one is watched for its own steps, and a
    late end of the first steps does not stop it."""
    for epoll in (True, False):
        if not epoll:  # the selectors module's, as where there is no epoll
            monkeypatch.delattr(bitpit.select, 'epoll', raising=False)
        poller = bitpit._Poller()
        try:
            first, first_peer = socket.socketpair()
            fd = first.fileno()
            poller.register(first, fd, False, 'first')
            poller.unregister(fd, 'first')  # its steps ended: idle
            poller.register(first, fd, False, 'again')  # the next steps take it up
            first_peer.send(b'x')
            assert poller.select(5) == ['again']
            first.recv(1)
            poller.unregister(fd, 'again')
            first_peer.send(b'y')  # while idle: the server's close, say
            assert poller.select(0.2) == []
            assert poller.select(0) == []  # (forgotten: not reported round after round)
            poller.register(first, fd, False, 'idle')
            poller.unregister(fd, 'idle')
            first.close()  # idle, then closed: epoll forgot it
            second, second_peer = socket.socketpair()
            if second.fileno() != fd:  # the number comes back, with another socket
                os.dup2(second.fileno(), fd)
            poller.register(second, fd, False, 'second')
            poller.unregister(fd, 'first')  # the first steps end late: a no-op
            second_peer.send(b'x')
            assert poller.select(5) == ['second']
            poller.register(second, fd, True, 'second')  # now waits to write
            assert poller.select(5) == ['second']
            poller.unregister(fd, 'second')
            assert poller.select(0) == []
            if second.fileno() != fd:
                os.close(fd)
            for sock in (first_peer, second, second_peer):
                sock.close()
        finally:
            poller.close()


def test_a_socket_its_ended_steps_read_stays_watched_and_goes_once_it_turns_ready(
        monkeypatch):
    """Steps that end after reading a socket leave it watched for them,
    idle (the loop makes no call at their end); once it turns readable
    (the server's close, say), the loop lets it go: it does not wake
    round after round for it, and resumes nobody."""
    left, right = socket.socketpair()
    loop, kept, ended = bitpit._Loop(), Ends(1), Ends(1)
    stop = bitpit._Flag()
    rounds = []
    select = bitpit._Poller.select

    def counted(poller, timeout):
        rounds.append(timeout)
        return select(poller, timeout)
    monkeypatch.setattr(bitpit._Poller, 'select', counted)

    def keeper():  # keeps the loop's thread (and its poller) between the steps
        yield bitpit._Wait(None, time.monotonic() + 30, event=stop)

    def reader():
        assert (yield bitpit._Wait(left, time.monotonic() + 30))
        return left.recv(1)

    def idle_for(seconds):
        yield bitpit._Wait(None, time.monotonic() + seconds)

    try:
        loop.spawn(keeper(), kept)
        right.send(b'x')
        loop.spawn(reader(), ended)
        assert ended.all_in.wait(5) and ended.results == [b'x']
        watched = loop._poller._watched[left.fileno()]
        assert watched[1] is left and watched[0].wait is None  # idle, for the ended steps
        right.send(b'y')  # ready now, with nobody reading
        waited = Ends(1)
        began = len(rounds)
        loop.spawn(idle_for(0.2), waited)
        assert waited.all_in.wait(5)
        assert len(rounds) - began < 10, 'the loop woke round after round'
        assert left.fileno() not in loop._poller._watched
        stop.set()
        assert kept.all_in.wait(5) and kept.errors == []
        loop.join(5)
    finally:
        left.close()
        right.close()


@pytest.mark.skipif(not hasattr(bitpit.select, 'epoll') or not hasattr(os, 'fork'),
                    reason='epoll and fork only')
def test_sockets_closed_idle_while_a_forked_child_holds_them_wake_nobody():
    """A registration in epoll is of the socket's open file: a forked child
    holds it too, so a socket closed here while idle stays in epoll, and
    once its server closes it is ready for ever, with its number. The
    poller reports it neither round after round (the loop would spin)
    nor for the socket that has its number now."""
    poller = bitpit._Poller()
    reader, writer = os.pipe()
    pairs = [socket.socketpair() for _ in range(2)]
    for i, (sock, _) in enumerate(pairs):
        poller.register(sock, sock.fileno(), False, i)
        poller.unregister(sock.fileno(), i)  # its steps ended: idle
    pid = os.fork()
    if pid == 0:  # holds every descriptor of the parent's till told to end
        os.read(reader, 1)
        os._exit(0)
    try:
        (first, first_peer), (second, second_peer) = pairs
        first.close()  # the pool closes it, idle
        first_peer.shutdown(socket.SHUT_WR)  # its server's close: ready, in the child's hold
        first_peer.close()
        assert poller.select(0) == []
        assert poller.select(0) == []
        assert poller._epoll.poll(0) == []  # (not ready round after round)
        fd = second.fileno()
        second.close()
        second_peer.shutdown(socket.SHUT_WR)
        second_peer.close()
        third, third_peer = socket.socketpair()  # a new connection
        if third.fileno() != fd:  # the number comes back, with another socket
            os.dup2(third.fileno(), fd)
        poller.register(third, fd, False, 'third')
        assert poller.select(0) == []  # not the closed one's readiness
        third_peer.send(b'x')
        assert poller.select(5) == ['third']
        if third.fileno() != fd:
            os.close(fd)
        third.close()
        third_peer.close()
    finally:
        os.write(writer, b'x')
        os.waitpid(pid, 0)
        os.close(reader)
        os.close(writer)
        poller.close()


def test_steps_handed_by_many_threads_at_once_all_run_with_few_wake_ups(monkeypatch):
    """A hand from another thread wakes the loop only when it is the first
    since the loop took what was handed; none is left waiting for all that."""
    loop, ends = bitpit._Loop(), Ends(4 * 300)
    sent = []
    held, over = bitpit._Flag(), Ends(1)

    def holding():  # keeps the loop's thread running throughout
        while not held.is_set():
            yield bitpit._Wait(None, None, event=held)

    def steps(i):
        return i
        yield  # (steps that end at once)

    loop.spawn(holding(), over)
    wake = loop._wake_out
    monkeypatch.setattr(loop, '_wake_out', type('Counted', (), {
        'send': lambda self, data: sent.append(data) or wake.send(data)})())

    def hand_many(base):
        for i in range(300):
            loop.spawn(steps(base + i), ends)

    threads = [threading.Thread(target=hand_many, args=(k * 1000,)) for k in range(4)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert ends.all_in.wait(10)
        assert sorted(ends.results) == sorted(k * 1000 + i for k in range(4) for i in range(300))
        assert 0 < len(sent) < 4 * 300
    finally:
        held.set()
        assert over.all_in.wait(5)
        loop.join(5)
