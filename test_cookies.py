"""Cookies: a Netscape cookies.txt file (session cookies with expiry 0 are
sent, expired ones and other hosts' are not), a jar of the caller's that
receives what responses set, by default an in-memory jar per download (so a
gateway's 302 with Set-Cookie works), the caller's Cookie header winning,
a jar shared through Manager kwargs, and the command line's --cookies."""
import http.cookiejar
import threading
import time

import pytest

import bitpit
from conftest import DATA, download

FUTURE = int(time.time()) + 3600


def cookies_txt(tmp_path, *lines):
    path = tmp_path / 'cookies.txt'
    path.write_text('# Netscape HTTP Cookie File\n' + ''.join(
        '\t'.join(map(str, line)) + '\n' for line in lines))
    return path


def test_a_cookies_txt_file_is_sent_by_its_rules(server, tmp_path):
    jar = cookies_txt(
        tmp_path,
        ('127.0.0.1', 'FALSE', '/', 'FALSE', FUTURE, 'token', 'abc'),
        ('127.0.0.1', 'FALSE', '/', 'FALSE', 0, 'session', 'yes'),      # expiry 0: sent
        ('127.0.0.1', 'FALSE', '/', 'FALSE', 1000, 'old', 'gone'),      # expired
        ('127.0.0.1', 'FALSE', '/other/', 'FALSE', FUTURE, 'elsewhere', 'no'),
        ('example.com', 'FALSE', '/', 'FALSE', FUTURE, 'foreign', 'no'),
        ('#HttpOnly_127.0.0.1', 'FALSE', '/', 'FALSE', FUTURE, 'http', 'only'))
    url = server.add('/f', DATA)
    d, _ = download(url, tmp_path / 'f.bin', cookies=str(jar))
    assert d.state == 'complete'
    sent = sorted(server.requests[0].headers['Cookie'].split('; '))
    assert sent == ['http=only', 'session=yes', 'token=abc']
    assert jar.read_text().count('\n') == 7                 # read, never written


def test_a_cookies_txt_line_for_a_host_name_without_a_dot(make_server, tmp_path):
    """``localhost`` and intranet names: http.cookiejar matches such a host
    as ``NAME.local``, so a line for ``localhost`` was never sent."""
    server = make_server('localhost')
    jar = cookies_txt(tmp_path, ('localhost', 'FALSE', '/', 'FALSE', FUTURE, 'token', 'abc'),
                      ('otherhost', 'FALSE', '/', 'FALSE', FUTURE, 'foreign', 'no'))
    url = server.add('/f', DATA)
    assert url.startswith('http://localhost:')
    d, _ = download(url, tmp_path / 'f.bin', cookies=str(jar))
    assert d.state == 'complete'
    assert server.requests[0].headers['Cookie'] == 'token=abc'


def test_a_gateway_that_sets_a_cookie_then_redirects(server, tmp_path):
    server.add('/gate', b'', status=302, headers={'Location': '/file',
                                                   'Set-Cookie': 'pass=42; Path=/'})
    server.add('/file', DATA)
    d, _ = download(server.url('/gate'), tmp_path / 'f.bin')
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA
    assert server.requests[0].headers['Cookie'] is None
    assert server.requests[1].headers['Cookie'] == 'pass=42'


def test_a_downloads_own_cookies_outlive_its_end_and_none_are_kept_without_one(
        server, tmp_path):
    """A finished download keeps no cookie holder of its own while no
    server set a cookie (a manager may keep thousands of them), yet the
    cookie a server did set is sent by the next start."""
    server.add('/set', DATA, headers={'Set-Cookie': 'pass=42; Path=/'})
    plain_url = server.add('/plain', DATA)
    for url, name in ((server.url('/set'), 'set.bin'), (plain_url, 'plain.bin')):
        d, _ = download(url, tmp_path / name, if_exists='overwrite')
        assert d.state == 'complete'
        assert (d._cookies is None) == (url == plain_url)
        d.start()
        assert d.wait(10)
        d.join(10)
    assert [r.headers['Cookie'] for r in server.requests_for('/set')] == [None, 'pass=42']
    assert [r.headers['Cookie'] for r in server.requests_for('/plain')] == [None, None]


def test_a_cookie_that_update_size_was_given_is_sent_by_the_next_start(server, tmp_path):
    """update_size's request makes the download's own jar at the cookie
    its answer sets, and the download keeps it for its attempts."""
    url = server.add('/f.bin', DATA, headers={'Set-Cookie': 'pass=42; Path=/'})
    d = bitpit.Downloader(url, tmp_path / 'f.bin')
    d.update_size()
    assert d.size == len(DATA)
    d.start()
    assert d.wait(10) and d.state == 'complete', d.last_exception
    d.join(10)
    assert [(r.method, r.headers['Cookie']) for r in server.requests_for('/f.bin')] == \
        [('HEAD', None), ('GET', 'pass=42')]


def test_the_cookies_of_a_run_and_of_an_update_size_during_it_are_both_kept(
        server, tmp_path):
    """An update_size while a run is under way makes a jar of its own (the
    run's had none yet); the download keeps the cookies of both for its
    next start, not those of whichever was kept first."""
    server.add('/f.bin', DATA, headers={'Set-Cookie': 'run=1; Path=/'}, stall_after=100)
    d = bitpit.Downloader(server.url('/f.bin'), tmp_path / 'f.bin', restart_wait=-1)
    downloading = threading.Event()
    d.listen('state-changed', lambda d, old: d.state == 'download' and downloading.set())
    d.start()
    try:
        assert downloading.wait(10)  # (the run's answer set its cookie)
        server.add('/f.bin', DATA, headers={'Set-Cookie': 'size=2; Path=/'})
        d.update_size()
        d.stop()
    finally:
        server.release()
    d.start()
    assert d.wait(10), d.last_exception
    d.join(10)
    get, head, again = server.requests_for('/f.bin')
    assert (get.method, head.method, get.headers['Cookie'], head.headers['Cookie']) == \
        ('GET', 'HEAD', None, 'run=1')
    assert sorted(again.headers['Cookie'].split('; ')) == ['run=1', 'size=2']


def test_a_runs_later_requests_send_the_cookies_an_update_size_during_it_got(
        server, tmp_path):
    """An update_size during a run whose answers set no cookie keeps the
    one its answer set in the download's jar: the run's requests from
    then on send it (here to the mirror that takes over the cut body), as
    those of a run sharing the download's jar did."""
    server.add('/a.bin', DATA, stall_after=100)
    server.add('/b.bin', DATA)
    d = bitpit.Downloader(server.url('/a.bin'), tmp_path / 'f.bin', restart_wait=-1,
                          mirrors=[server.url('/b.bin')])
    downloading = threading.Event()
    d.listen('state-changed', lambda d, old: d.state == 'download' and downloading.set())
    d.start()
    try:
        assert downloading.wait(10)
        server.add('/a.bin', DATA, headers={'Set-Cookie': 'size=2; Path=/'})
        d.update_size()
    finally:
        server.release()  # (the cut body goes on from the mirror)
    assert d.wait(10), d.last_exception
    d.join(10)
    assert [r.method for r in server.requests_for('/a.bin')] == ['GET', 'HEAD']
    (mirrored,) = server.requests_for('/b.bin')
    assert mirrored.headers['Cookie'] == 'size=2'


def test_a_callers_jar_receives_the_cookies_and_is_shared_by_a_manager(server, tmp_path):
    jar = http.cookiejar.CookieJar()
    server.add('/a', DATA, headers={'Set-Cookie': 'seen=a; Path=/'})
    server.add('/b', DATA)
    manager = bitpit.Manager(max_running=1, cookies=jar, path=tmp_path, dir_path=True)
    a = manager.add(server.url('/a'))
    b = manager.add(server.url('/b'))
    done = threading.Event()
    b.listen('state-changed', lambda d, old: d.state == 'complete' and done.set())
    manager.start()
    assert done.wait(10)
    manager.stop()
    assert a.state == 'complete'
    assert [c.name for c in jar] == ['seen']
    assert server.requests_for('/b')[0].headers['Cookie'] == 'seen=a'


def test_cookies_never_go_to_another_host(server, make_server, tmp_path):
    other = make_server('localhost')
    target = other.add('/f', DATA)
    server.add('/go', b'', status=302, headers={'Location': target,
                                                 'Set-Cookie': 'mine=1; Path=/'})
    d, _ = download(server.url('/go'), tmp_path / 'f.bin')
    assert d.state == 'complete'
    assert other.requests[0].headers['Cookie'] is None


def test_the_callers_cookie_header_wins(server, tmp_path):
    jar = cookies_txt(tmp_path, ('127.0.0.1', 'FALSE', '/', 'FALSE', FUTURE, 'token', 'abc'))
    url = server.add('/f', DATA)
    download(url, tmp_path / 'f.bin', cookies=str(jar), headers={'Cookie': 'mine=1'})
    assert server.requests[0].headers.get_all('Cookie') == ['mine=1']


@pytest.mark.parametrize('bad', [42, ['a=b']])
def test_cookies_must_be_a_jar_or_a_path(tmp_path, bad):
    with pytest.raises(TypeError, match='cookies'):
        bitpit.Downloader('http://127.0.0.1:1/f', path=tmp_path / 'f', cookies=bad)


def test_a_missing_cookies_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match='cookies'):
        bitpit.Downloader('http://127.0.0.1:1/f', path=tmp_path / 'f',
                          cookies=str(tmp_path / 'none.txt'))


def test_cli_cookies(server, tmp_path, capsys):
    jar = cookies_txt(tmp_path, ('127.0.0.1', 'FALSE', '/', 'FALSE', 0, 'sid', 'x1'))
    url = server.add('/f.bin', DATA)
    assert bitpit._cli(['-q', '-d', str(tmp_path), '--cookies', str(jar), url]) == 0
    assert server.requests[0].headers['Cookie'] == 'sid=x1'
    assert bitpit._cli(['-q', '--cookies', str(tmp_path / 'none.txt'), url]) == 2
