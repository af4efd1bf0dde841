"""Mirrors: several URLs of one file. Connections are spread over the
sources; a source that answers with another size, a permanent status or a
broken answer is retired; a transient failure moves its range to another
source at once; the download fails only when no source is left. Each source
keeps its own validator, and the caller's secrets go only to ``url``'s
origin. Also the command line's ``--mirror`` and mirror lines in ``-i``.
"""
import json
import re
import logging
import random
import socket

import pytest

import bitpit
from conftest import DATA, OFFSET, Recorder, basic, bitpit_threads, download, sidecar_of

MiB = 1024 * 1024
BIG = random.Random(21).randbytes(4 * MiB + 77)


def closed_port_url():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return 'http://127.0.0.1:{}/f'.format(sock.getsockname()[1])


def gets(server, path='/f'):
    return server.requests_for(path, 'GET')


def test_ranges_are_spread_over_the_sources(make_server, tmp_path):
    first, second = make_server(), make_server()
    url = first.add('/f', BIG, throttle=4 * MiB)
    mirror = second.add('/f', BIG, throttle=4 * MiB)
    d, rec = download(url, tmp_path / 'f.bin', connections=4, mirrors=[mirror])
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == BIG
    assert d.mirrors == (mirror,)
    assert first.bytes_sent('/f') >= MiB and second.bytes_sent('/f') >= MiB
    assert first.bytes_sent('/f') + second.bytes_sent('/f') <= len(BIG) + MiB


@pytest.mark.parametrize('bad', ['404', 'other-size', 'broken-answer'])
def test_a_bad_mirror_is_retired_with_a_warning(make_server, tmp_path, caplog, bad):
    first, second = make_server(), make_server()
    url = first.add('/f', BIG, throttle=8 * MiB)
    if bad == '404':
        mirror = second.url('/f')
    elif bad == 'other-size':
        mirror = second.add('/f', BIG[:-5])
    else:
        mirror = second.add('/f', BIG, headers={'Content-Range': 'bytes garbage'})
    with caplog.at_level(logging.WARNING, logger='bitpit'):
        d, rec = download(url, tmp_path / 'f.bin', connections=4, mirrors=[mirror])
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == BIG
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(mirror in message for message in warnings), warnings
    # retired at its first answer: never asked again
    assert 1 <= len(gets(second)) <= 2


@pytest.mark.parametrize('change', ['other-size', 'same-size'])
def test_a_mirror_whose_file_changes_is_retired_and_url_s_file_completes(
        make_server, tmp_path, caplog, change):
    """The file at ``url`` defines the download: a mirror whose file changes
    while the download runs is retired with a warning (it used to start the
    file over from the mirror's new version, while ``url`` still served
    the old one)."""
    first, second = make_server(), make_server()
    url = first.add('/f', BIG, throttle=2 * MiB)
    mirror = second.add('/f', BIG, throttle=2 * MiB)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', connections=4, mirrors=[mirror],
                          update_period=0.02)
    rec = Recorder(d)
    with caplog.at_level(logging.WARNING, logger='bitpit'):
        d.start()
        rec.wait_for(lambda: d.downloaded >= len(BIG) // 4)
        newer = random.Random(22).randbytes(len(BIG) + (1000 if change == 'other-size' else 0))
        second.add('/f', newer, throttle=8 * MiB)
        rec.wait_state('complete', 'error', 'fatal-error', timeout=20)
        d.join(5)
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == BIG
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(mirror in message for message in warnings), warnings


def test_two_mirrors_that_each_allow_one_connection(make_server, tmp_path):
    """A connection refused by one source ends, rather than going to the
    other source, which refuses it in turn (that went back and forth, about
    500 requests a second to each)."""
    first, second = make_server(), make_server()
    url = first.add('/f', BIG, throttle=8 * MiB, max_concurrent=1)
    mirror = second.add('/f', BIG, throttle=8 * MiB, max_concurrent=1)
    d, _ = download(url, tmp_path / 'f.bin', connections=4, mirrors=[mirror])
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == BIG
    # a few (each surplus connection, and a request sent while the server
    # still answered an abandoned one), not a storm
    assert first.refused('/f') + second.refused('/f') <= 12


def test_a_primary_that_refuses_connections_fails_over(server, tmp_path):
    mirror = server.add('/f', DATA)
    d, rec = download(closed_port_url(), tmp_path / 'f.bin', mirrors=[mirror])
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']
    assert len(gets(server)) == 1


def test_one_connection_continues_from_the_same_offset_on_the_next_source(
        make_server, tmp_path):
    first, second = make_server(), make_server()
    url = first.add('/f', DATA, truncate_at=OFFSET)
    mirror = second.add('/f', DATA)
    d, rec = download(url, tmp_path / 'f.bin', mirrors=[mirror])
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']
    (failover,) = gets(second)
    assert failover.headers['Range'] in ('bytes={}-'.format(OFFSET),
                                         'bytes={}-{}'.format(OFFSET, len(DATA) - 1))


@pytest.mark.parametrize('case, state', [('all-404', 'fatal-error'),
                                         ('503-and-refused', 'error')])
def test_only_when_no_source_is_left_does_the_download_fail(server, tmp_path, case, state):
    if case == 'all-404':
        urls = [server.url('/a'), server.url('/b'), server.url('/c')]
    else:
        urls = [server.add('/f', b'', status=503), closed_port_url()]
    d, _ = download(urls[0], tmp_path / 'f.bin', mirrors=urls[1:], connections=2,
                    restart_wait=-1)
    assert d.state == state and not d.is_restarting
    error = d.last_exception
    if case == 'all-404':
        assert isinstance(error, bitpit.HTTPStatusError) and error.status == 404
        assert sorted(r.path for r in server.requests) == ['/a', '/b', '/c']
    else:
        assert error.retryable
    assert bitpit_threads() == []
    assert not (tmp_path / 'f.bin').exists()


def test_each_source_keeps_its_own_validator(make_server, tmp_path):
    first, second = make_server(), make_server()
    url = first.add('/f', BIG, etag='"first"', throttle=2 * MiB)
    mirror = second.add('/f', BIG, etag='"second"', throttle=2 * MiB)
    target = tmp_path / 'f.bin'
    d = bitpit.Downloader(url, path=target, connections=4, mirrors=[mirror],
                          update_period=0.02)
    rec = Recorder(d)
    d.start()
    rec.wait_for(lambda: d.downloaded >= len(BIG) // 3)
    d.stop()
    saved = json.loads(sidecar_of(target).read_text())
    assert saved['validators'] == {url: '"first"', mirror: '"second"'}
    before = len(first.requests), len(second.requests)
    d.start()
    rec.wait_state('complete', timeout=20)
    d.join(5)
    assert target.read_bytes() == BIG
    resumed = first.requests[before[0]:] + second.requests[before[1]:]
    assert resumed
    for r in first.requests[before[0]:]:
        assert r.headers['If-Range'] == '"first"'
    for r in second.requests[before[1]:]:
        assert r.headers['If-Range'] == '"second"'


def test_secrets_go_to_the_origin_of_url_only(server, make_server, tmp_path):
    other = make_server('localhost')
    url = server.add('/f', BIG, throttle=8 * MiB)
    plain = other.add('/f', BIG, throttle=8 * MiB)
    port = other.url('/f').split(':')[2].split('/')[0]
    with_credentials = 'http://m:pw@localhost:{}/f'.format(port)
    d, _ = download(url, tmp_path / 'f.bin', connections=4, auth=('u', 'p'),
                    headers={'Cookie': 'secret=1', 'X-Trace': 'ok'},
                    mirrors=[plain, with_credentials])
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == BIG
    assert all(r.headers['Authorization'] == basic('u', 'p') and
               r.headers['Cookie'] == 'secret=1' for r in server.requests)
    assert other.requests, 'the mirrors were not used'
    for r in other.requests:
        assert r.headers['Cookie'] is None and r.headers['X-Trace'] == 'ok'
        assert r.headers['Authorization'] in (None, basic('m', 'pw'))
    assert any(r.headers['Authorization'] == basic('m', 'pw') for r in other.requests)


def test_mirrors_option(server, tmp_path):
    url = server.url('/f')
    d = bitpit.Downloader(url, path=tmp_path / 'f', mirrors=[server.url('/g'), url,
                                                              server.url('/g')])
    assert d.mirrors == (server.url('/g'),)
    with pytest.raises(bitpit.InvalidURLError):
        bitpit.Downloader(url, path=tmp_path / 'f', mirrors=['ftp://example.com/f'])
    with pytest.raises(TypeError):
        d.mirrors = server.url('/h')
    with pytest.raises(bitpit.InvalidURLError):
        d.mirrors = ['not a url']
    assert d.mirrors == (server.url('/g'),)
    server.add('/f', DATA, stall_after=1000)
    d.start()
    assert server.wait_stalled(1)
    with pytest.raises(RuntimeError):
        d.mirrors = [server.url('/h')]
    d.stop()
    d.mirrors = [server.url('/h')]
    assert d.mirrors == (server.url('/h'),)


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------

def test_cli_mirror_option(make_server, tmp_path, capsys):
    first, second = make_server(), make_server()
    url = first.add('/f.bin', BIG, throttle=4 * MiB)
    mirror = second.add('/f.bin', BIG, throttle=4 * MiB)
    status = bitpit._cli(['-q', '-x', '4', '--mirror', mirror, '-d', str(tmp_path), url])
    assert status == 0
    assert (tmp_path / 'f.bin').read_bytes() == BIG
    assert first.requests and second.requests


def test_cli_input_file_lines_with_mirrors(make_server, tmp_path):
    first, second = make_server(), make_server()
    a, a_mirror = first.add('/a.bin', BIG, throttle=4 * MiB), second.add('/a.bin', BIG,
                                                                         throttle=4 * MiB)
    b = first.add('/b.bin', DATA)
    listing = tmp_path / 'urls.txt'
    listing.write_text('{}\t{}   # a and its mirror\n\n{}\n'.format(a, a_mirror, b))
    out = tmp_path / 'out'
    status = bitpit._cli(['-q', '-x', '4', '-i', str(listing), '-d', str(out)])
    assert status == 0
    assert (out / 'a.bin').read_bytes() == BIG and (out / 'b.bin').read_bytes() == DATA
    assert sorted(p.name for p in out.iterdir()) == ['a.bin', 'b.bin']
    assert second.requests_for('/a.bin') and not second.requests_for('/b.bin')


@pytest.mark.parametrize('args', [['--mirror', 'http://127.0.0.1:1/m', 'http://127.0.0.1:1/a',
                                   'http://127.0.0.1:1/b'],
                                  ['--mirror', 'ftp://x/m', 'http://127.0.0.1:1/a'],
                                  ['-x', '0', 'http://127.0.0.1:1/a'],
                                  ['-x', '33', 'http://127.0.0.1:1/a']])
def test_cli_mirror_and_connections_usage_errors(tmp_path, args, capsys):
    assert bitpit._cli(args) == 2
    assert capsys.readouterr().err


def test_a_mirror_with_an_older_shorter_file_never_takes_over(make_server, tmp_path):
    first, second = make_server(), make_server()
    url = first.add('/f', BIG * 2, throttle=8 * MiB)
    mirror = second.add('/f', BIG[:MiB])
    d, _ = download(url, tmp_path / 'f.bin', connections=4, mirrors=[mirror])
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == BIG * 2


def test_a_dropped_request_does_not_retire_a_source(make_server, tmp_path):
    """A server that closes a connection without answering (as one under
    load does) is a transient failure, not a broken answer."""
    first, second = make_server(), make_server()
    dropped = []

    def serve(handler):
        if not dropped:
            dropped.append(1)
            return                       # closed without a word
        match = re.match(r'bytes=(\d+)-(\d*)', handler.headers.get('Range') or '')
        start = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else len(BIG) - 1
        body = BIG[start:last + 1]
        handler.wfile.write(('HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n'
                             'Content-Range: bytes {}-{}/{}\r\nETag: "v1"\r\n\r\n'.format(
                                 len(body), start, last, len(BIG))).encode() + body)
    url = first.add_raw('/f', serve)
    mirror = second.add('/f', BIG, etag='"v1"', throttle=2 * MiB)
    d, _ = download(url, tmp_path / 'f.bin', connections=4, mirrors=[mirror])
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == BIG
    assert len(first.requests) >= 2             # the first source kept serving
