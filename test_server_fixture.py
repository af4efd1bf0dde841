"""Self-tests of the test HTTP server in conftest.py (stdlib clients only)."""

import http.client
import threading
import time
import urllib.error
import urllib.request

import pytest

DATA = bytes(range(256)) * 40  # 10240 bytes
T = 5  # client time-out, seconds


_conns: list[http.client.HTTPConnection] = []  # closed after each test


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _conns:
        _conns.pop().close()


def conn(server):
    c = http.client.HTTPConnection('127.0.0.1', server.port, timeout=T)
    _conns.append(c)
    return c


def fetch(server, path, method='GET', headers=None, c=None):
    """(response, body) over a fresh or given connection."""
    c = c or conn(server)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    return r, r.read()


def test_get_head_404(server):
    server.add('/f', DATA)
    r, body = fetch(server, '/f')
    assert r.status == 200 and body == DATA
    assert r.getheader('Content-Length') == str(len(DATA))
    assert r.getheader('Accept-Ranges') == 'bytes'
    etag = r.getheader('ETag')
    assert etag.startswith('"')
    r, body = fetch(server, '/f', 'HEAD')
    assert r.status == 200 and body == b'' and r.getheader('ETag') == etag
    assert r.getheader('Content-Length') == str(len(DATA))
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(server.url('/nope'), timeout=T)
    assert e.value.code == 404
    e.value.close()
    assert [(q.method, q.path) for q in server.requests] == [
        ('GET', '/f'), ('HEAD', '/f'), ('GET', '/nope')]
    assert server.requests_for('/f', 'HEAD')[0].headers['host']


def test_ranges_and_if_range(server):
    server.add('/f', DATA, last_modified='Wed, 21 Oct 2015 07:28:00 GMT')
    etag = fetch(server, '/f', 'HEAD')[0].getheader('ETag')
    r, body = fetch(server, '/f', headers={'Range': 'bytes=100-'})
    assert r.status == 206 and body == DATA[100:]
    assert r.getheader('Content-Range') == 'bytes 100-{}/{}'.format(len(DATA) - 1, len(DATA))
    r, body = fetch(server, '/f', headers={'Range': 'bytes=10-19'})
    assert (r.status, body) == (206, DATA[10:20])
    r, body = fetch(server, '/f', headers={'Range': 'bytes=-5'})
    assert (r.status, body) == (206, DATA[-5:])
    r, body = fetch(server, '/f', headers={'Range': 'bytes=%d-' % len(DATA)})
    assert r.status == 416 and r.getheader('Content-Range') == 'bytes */%d' % len(DATA)
    r, body = fetch(server, '/f', headers={'Range': 'bytes=100-', 'If-Range': etag})
    assert (r.status, body) == (206, DATA[100:])
    r, body = fetch(server, '/f', headers={'Range': 'bytes=100-',
                                           'If-Range': 'Wed, 21 Oct 2015 07:28:00 GMT'})
    assert r.status == 206
    r, body = fetch(server, '/f', headers={'Range': 'bytes=100-', 'If-Range': '"other"'})
    assert (r.status, body) == (200, DATA)
    assert server.requests[-1].headers['if-range'] == '"other"'


def test_replace_changes_etag_and_etag_none(server):
    server.add('/f', DATA)
    old = fetch(server, '/f', 'HEAD')[0].getheader('ETag')
    server.add('/f', DATA[::-1])
    r, body = fetch(server, '/f', headers={'Range': 'bytes=5-', 'If-Range': old})
    assert r.status == 200 and body == DATA[::-1] and r.getheader('ETag') != old
    server.add('/g', DATA, etag=None, headers={'Accept-Ranges': None})
    r, _ = fetch(server, '/g', 'HEAD')
    assert r.getheader('ETag') is None and r.getheader('Accept-Ranges') is None


def test_keep_alive_and_connection_count(server):
    server.add('/f', DATA)
    c = conn(server)
    for _ in range(3):
        assert fetch(server, '/f', c=c)[1] == DATA
    assert server.connections == 1
    assert {q.conn for q in server.requests} == {1}
    fetch(server, '/f')
    assert server.connections == 2 and server.requests[-1].conn == 2


def test_concurrency_count_and_release(server):
    server.add('/s', DATA, stall_after=0)
    results = []

    def get():
        try:
            fetch(server, '/s')
        except (http.client.HTTPException, OSError) as exc:
            results.append(type(exc))

    threads = [threading.Thread(target=get) for _ in range(3)]
    for t in threads:
        t.start()
    assert server.wait_stalled(3, timeout=T)
    assert server.active == 3 and server.max_concurrent == 3
    server.release()
    for t in threads:
        t.join(T)
    assert len(results) == 3  # every body was cut short
    assert server.active == 0 and server.stalled == 0


def test_truncate_once_then_resume(server):
    server.add('/t', DATA, truncate_at=1000, truncate_once=True)
    r = conn(server)
    r.request('GET', '/t')
    resp = r.getresponse()
    with pytest.raises(http.client.IncompleteRead) as e:
        resp.read()
    assert len(e.value.partial) == 1000
    r, body = fetch(server, '/t', headers={'Range': 'bytes=1000-'})
    assert (r.status, body) == (206, DATA[1000:])


def test_chunked(server):
    server.add('/c', DATA, chunked=True)
    r, body = fetch(server, '/c')
    assert r.getheader('Transfer-Encoding') == 'chunked'
    assert r.getheader('Content-Length') is None and body == DATA


def test_range_misbehaviours(server):
    server.add('/shift', DATA, range_shift=10)
    r, body = fetch(server, '/shift', headers={'Range': 'bytes=100-'})
    assert r.status == 206 and body == DATA[90:]
    assert r.getheader('Content-Range') == 'bytes 90-{}/{}'.format(len(DATA) - 1, len(DATA))
    server.add('/total', DATA, wrong_total=5)
    r, body = fetch(server, '/total', headers={'Range': 'bytes=100-199'})
    assert r.getheader('Content-Range') == 'bytes 100-199/5' and body == DATA[100:200]
    server.add('/s200', DATA, status_200_with_range=True)
    r, body = fetch(server, '/s200', headers={'Range': 'bytes=100-'})
    assert r.status == 200 and body == DATA[100:]
    assert r.getheader('Content-Range').startswith('bytes 100-')
    server.add('/ign', DATA, ignore_range=True)
    r, body = fetch(server, '/ign', headers={'Range': 'bytes=100-'})
    assert (r.status, body) == (200, DATA) and r.getheader('Content-Range') is None


def test_status_times_and_redirect_to_other_host(server, make_server):
    server.add('/busy', DATA, status=503, status_times=1, headers={'Retry-After': '1'})
    r, body = fetch(server, '/busy')
    assert r.status == 503 and r.getheader('Retry-After') == '1' and body
    r, body = fetch(server, '/busy')
    assert (r.status, body) == (200, DATA)
    other = make_server('localhost')
    assert other.url('/x').startswith('http://localhost:')
    other.add('/x', b'moved')
    server.redirect('/r', other.url('/x'), status=301)
    with urllib.request.urlopen(server.url('/r'), timeout=T) as resp:
        assert resp.read() == b'moved'
    assert [q.path for q in other.requests] == ['/x']


def test_throttle(server):
    server.add('/slow', DATA[:3000], throttle=10000)
    t0 = time.monotonic()
    assert fetch(server, '/slow')[1] == DATA[:3000]
    assert 0.2 < time.monotonic() - t0 < 1.5


def test_content_length_override(server):
    server.add('/cl', DATA, content_length=10)
    r, body = fetch(server, '/cl')
    assert body == DATA[:10]
    server.add('/bad', DATA, content_length='abc')
    r, body = fetch(server, '/bad')  # http.client ignores it, reads to EOF
    assert r.getheader('Content-Length') == 'abc' and body == DATA


def test_add_raw(server):
    server.add_raw('/raw', lambda h: h.wfile.write(b'garbage\r\n\r\n'))
    with pytest.raises(http.client.BadStatusLine):
        fetch(server, '/raw')
    assert server.errors == []


def test_chaos_is_seeded(server):
    server.add('/x', DATA, drop_probability=1.0, seed=1)
    with pytest.raises(http.client.IncompleteRead):
        fetch(server, '/x')
    server.add('/y', DATA, drop_probability=0.0, seed=1)
    assert fetch(server, '/y')[1] == DATA


def test_content_changes_by_chance(server):
    server.add('/c', DATA, change_probability=1.0, seed=2)
    etag = fetch(server, '/c', 'HEAD')[0].getheader('ETag')
    assert server.content('/c') == DATA, 'HEAD never changes the content'
    r, body = fetch(server, '/c', headers={'Range': 'bytes=100-', 'If-Range': etag})
    assert r.status == 200 and body == server.content('/c') != DATA
    assert r.getheader('ETag') != etag
    assert 0.75 * len(DATA) <= len(body) <= 1.25 * len(DATA)
    server.add('/k', DATA, change_probability=0.0)
    assert fetch(server, '/k')[1] == DATA == server.content('/k')
    assert server.content('/nope') is None


def test_ignore_if_range(server):
    server.add('/f', DATA, ignore_if_range=True)
    r, body = fetch(server, '/f', headers={'Range': 'bytes=100-', 'If-Range': '"other"'})
    assert (r.status, body) == (206, DATA[100:])


def test_stall_after_sends_bytes_then_waits(server):
    server.add('/s', DATA, stall_after=1000)
    c = conn(server)
    c.request('GET', '/s')
    assert server.wait_requests(1, path='/s')
    r = c.getresponse()
    got = b''
    while len(got) < 1000:
        piece = r.read1(1000 - len(got))
        assert piece
        got += piece
    assert got == DATA[:1000] and server.wait_stalled(1)
    server.release()
    with pytest.raises(http.client.IncompleteRead):
        r.read()


def test_teardown_releases_stalled_handlers(make_server):
    srv = make_server()
    srv.add('/h', DATA, stall_before_headers=True)
    srv.add('/b', DATA, stall_after=500, throttle=10**6)
    socks = []
    for path in ('/h', '/b'):
        c = conn(srv)
        c.request('GET', path)
        socks.append(c)
    assert srv.wait_stalled(2, timeout=T)
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 1.0
    for c in socks:
        with pytest.raises((http.client.HTTPException, OSError)):
            c.getresponse().read()
