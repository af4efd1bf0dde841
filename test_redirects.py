"""Redirects and URLs: every redirect status, relative and to another host,
keeps Range and If-Range; up to ten hops are followed; loops, too many hops
and redirects to another scheme are fatal and read nothing. URLs and
Location headers as people and servers write them (non-ASCII, spaces, raw
UTF-8; never control characters), and the caller's secrets across
redirects (requests' rules: host, port, https to http)."""
import pytest

import bitpit
from conftest import DATA, ETAG, OFFSET, download, partial_file, raw


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


@pytest.mark.parametrize('case', ['eleven-hops', 'loop', 'loop-later', 'self'])
def test_redirect_loop_or_too_many_hops_is_fatal(server, tmp_path, case):
    """A loop is told at the first redirect back to a URL of the chain
    (the first, or one it went through later), with no request more."""
    if case == 'eleven-hops':
        url = chain(server, 11)
    elif case == 'loop':
        url = server.redirect('/a', '/b', 301)
        server.redirect('/b', server.url('/a'), 307)
    elif case == 'loop-later':
        url = server.redirect('/a', '/b', 301)
        server.redirect('/b', '/c', 302)
        server.redirect('/c', '/b', 307)
    else:
        url = server.redirect('/a', '/a', 302)
    d, rec = download(url, tmp_path / 'f.bin', restart_wait=0)
    assert d.state == 'fatal-error' and isinstance(d.last_exception, bitpit.RedirectError)
    assert not d.is_restarting and not (tmp_path / 'f.bin').exists()
    if case == 'eleven-hops':
        assert len(server.requests) == 11
    else:
        assert 'redirect loop' in str(d.last_exception)
        assert [r.path for r in server.requests] == \
            {'loop': ['/a', '/b'], 'loop-later': ['/a', '/b', '/c'], 'self': ['/a']}[case]


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


# ---------------------------------------------------------------------------
# URLs as people write them
# ---------------------------------------------------------------------------

def test_a_non_ascii_url_with_spaces_is_sent_percent_encoded(server, tmp_path):
    server.add('/d%C3%A9p%C3%B4t/r%C3%A9sum%C3%A9%20final.pdf', DATA)
    url = server.url('/dépôt/résumé final.pdf')
    d, _ = download(url, tmp_path, dir_path=True)
    assert d.state == 'complete' and d.url == url
    assert d.path == tmp_path / 'résumé final.pdf' and d.path.read_bytes() == DATA
    assert server.requests[0].path == '/d%C3%A9p%C3%B4t/r%C3%A9sum%C3%A9%20final.pdf'


def test_a_location_in_raw_utf8_is_followed(server, tmp_path):
    server.add_raw('/go', raw(b'HTTP/1.1 302 Found\r\nLocation: /caf\xc3\xa9 cr\xc3\xa8me.bin\r\n'
                              b'Content-Length: 0\r\n\r\n'))
    server.add('/caf%C3%A9%20cr%C3%A8me.bin', DATA)
    d, _ = download(server.url('/go'), tmp_path / 'f.bin')
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA
    assert server.requests[1].path == '/caf%C3%A9%20cr%C3%A8me.bin'


@pytest.mark.parametrize('url', ['http://h/a\x00b', 'http://h/a\r\nX-Evil: 1', 'http://h/\x7f',
                                 'http://h/tab\there', 'http://h/next\x85line'])
def test_a_url_with_control_characters_is_invalid(tmp_path, url):
    with pytest.raises(bitpit.InvalidURLError):
        bitpit.Downloader(url, path=tmp_path / 'f')


@pytest.mark.parametrize('location', [b'/a\x01b', b'/a\x7fb', b'http://h/\x1b[31m',
                                      b'/a\tb',           # urljoin would drop the tab
                                      b'/a\xc2\x85b',     # U+0085, a C1 control, in UTF-8
                                      b'http://[::1'])    # malformed: urljoin raises
def test_a_location_with_control_characters_is_a_fatal_redirect_error(server, tmp_path,
                                                                      location):
    server.add_raw('/go', raw(b'HTTP/1.1 302 Found\r\nLocation: ' + location +
                              b'\r\nContent-Length: 0\r\n\r\n'))
    d, _ = download(server.url('/go'), tmp_path / 'f.bin', restart_wait=0)
    assert d.state == 'fatal-error' and not d.is_restarting
    assert isinstance(d.last_exception, bitpit.RedirectError)
    assert len(server.requests) == 1


def test_international_host_names_are_sent_in_idna():
    assert bitpit._check_url('http://Bücher.example:8080/ü?q=ä').wire_url == \
        'http://xn--bcher-kva.example:8080/%C3%BC?q=%C3%A4'
    # (a plain proxy is asked for it without its credentials: RFC 9110 4.2.4)
    assert bitpit._check_url('http://u:p@bücher.example/').wire_url == \
        'http://xn--bcher-kva.example/'


# ---------------------------------------------------------------------------
# credentials across redirects
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('old, new, kept', [
    ('http://h/a', 'http://h/b', True),
    ('http://h/a', 'http://h:80/b', True),
    ('http://h/a', 'https://h/b', True),                 # http -> https, default ports
    ('http://h:80/a', 'https://h:443/b', True),
    ('https://h/a', 'http://h/b', False),                # https -> http
    ('http://h/a', 'http://h:8080/b', False),            # another port
    ('http://h:8080/a', 'https://h:8443/b', False),
    ('http://h/a', 'http://other/b', False),             # another host
    ('http://H/a', 'http://h/b', True),
])
def test_credentials_follow_requests_rules(old, new, kept):
    assert bitpit._same_trust(bitpit._check_url(old), bitpit._check_url(new)) is kept


def test_credentials_are_dropped_when_a_redirect_changes_the_port(server, make_server,
                                                                  tmp_path):
    other = make_server()                                # the same host, another port
    target = other.add('/f', DATA)
    url = server.redirect('/go', target)
    d, _ = download(url, tmp_path / 'f.bin', auth=('u', 'p'),
                    headers={'Authorization': 'Bearer t', 'Cookie': 'c=1'})
    assert d.state == 'complete'
    assert server.requests[0].headers['Authorization'] == 'Bearer t'
    (followed,) = other.requests
    assert followed.headers['Authorization'] is None and followed.headers['Cookie'] is None
