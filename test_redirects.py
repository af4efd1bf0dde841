"""Redirects: every redirect status, relative and to another host, keeps
Range and If-Range; up to ten hops are followed; loops, too many hops and
redirects to another scheme are fatal and read nothing."""
import pytest

import bitpit
from conftest import DATA, ETAG, OFFSET, download, partial_file


@pytest.mark.parametrize('status', [301, 302, 303, 307, 308])
@pytest.mark.parametrize('where', ['absolute', 'relative', 'other-host'])
def test_redirects_are_followed_keeping_range_and_if_range(server, make_server, tmp_path,
                                                           status, where):
    host = make_server('localhost') if where == 'other-host' else server
    real = host.add('/real/f.bin', DATA, etag=ETAG)
    url = server.redirect('/go', '/real/f.bin' if where == 'relative' else real, status)
    target = partial_file(tmp_path, url, ETAG, len(DATA))
    d, _ = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert d.url == url
    (followed,) = host.requests_for('/real/f.bin')
    assert followed.headers['Range'] == 'bytes={}-'.format(OFFSET)
    assert followed.headers['If-Range'] == ETAG


def chain(server, hops):
    """``/r0`` -> ``/r1`` -> ... -> ``/r{hops}``, which holds DATA."""
    for i in range(hops):
        server.redirect('/r{}'.format(i), '/r{}'.format(i + 1), 302)
    server.add('/r{}'.format(hops), DATA)
    return server.url('/r0')


def test_ten_redirects_are_followed(server, tmp_path):
    d, _ = download(chain(server, 10), tmp_path / 'f.bin')
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA
    assert len(server.requests) == 11


@pytest.mark.parametrize('case', ['eleven-hops', 'loop', 'self'])
def test_redirect_loop_or_too_many_hops_is_fatal(server, tmp_path, case):
    if case == 'eleven-hops':
        url = chain(server, 11)
    elif case == 'loop':
        url = server.redirect('/a', '/b', 301)
        server.redirect('/b', server.url('/a'), 307)
    else:
        url = server.redirect('/a', '/a', 302)
    d, rec = download(url, tmp_path / 'f.bin', restart_wait=0)
    assert d.state == 'fatal-error' and isinstance(d.last_exception, bitpit.RedirectError)
    assert not d.is_restarting and not (tmp_path / 'f.bin').exists()
    assert len(server.requests) <= 11


@pytest.mark.parametrize('location', ['file://{secret}', 'file:///etc/passwd',
                                      'ftp://127.0.0.1/x', 'data:,hello', 'gopher://h/x',
                                      'http://', 'http://bad host/'])
def test_redirect_to_another_scheme_is_refused_and_reads_nothing(server, tmp_path,
                                                                 location):
    secret = tmp_path / 'secret.txt'
    secret.write_bytes(b'do not read me')
    url = server.redirect('/go', location.format(secret=secret), 302)
    target = tmp_path / 'out' / 'f.bin'
    target.parent.mkdir()
    d, rec = download(url, target, restart_wait=0)
    assert d.state == 'fatal-error' and isinstance(d.last_exception, bitpit.RedirectError)
    assert not d.is_restarting and list(target.parent.iterdir()) == []
    assert len(server.requests) == 1
