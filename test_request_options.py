"""The request options of a Downloader: checksum, headers, authentication
(URL credentials, auth=, .netrc, never to another host) and proxies
(explicit, with credentials, from the environment)."""
import hashlib
import http.client
import ssl

import pytest

import bitpit
from conftest import Recorder, basic, fetch

DATA = bytes(range(256)) * 2048 + b'end'          # 512 KiB + 3 bytes
SHA256 = hashlib.sha256(DATA).hexdigest()


# ---------------------------------------------------------------------------
# checksum
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('algorithm', ['sha256', 'md5', 'sha1', 'sha512'])
def test_checksum_match(server, tmp_path, algorithm):
    server.add('/f', DATA)
    digest = hashlib.new(algorithm, DATA).hexdigest()
    d = fetch(server.url('/f'), tmp_path / 'f', checksum='{}:{}'.format(algorithm, digest))
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == DATA


def test_checksum_mismatch_is_fatal_and_keeps_file(server, tmp_path):
    server.add('/f', DATA)
    wrong = '0' * 64
    d = fetch(server.url('/f'), tmp_path / 'f', checksum='sha256:' + wrong, restart_wait=0)
    assert d.state == 'fatal-error' and not d.is_restarting
    assert isinstance(d.last_exception, bitpit.IntegrityError)
    assert wrong in str(d.last_exception) and SHA256 in str(d.last_exception)
    assert (tmp_path / 'f').read_bytes() == DATA


def test_checksum_covers_resumed_bytes(server, tmp_path):
    server.add('/f', DATA)
    (tmp_path / 'f').write_bytes(DATA[:100000])
    d = fetch(server.url('/f'), tmp_path / 'f', checksum='sha256:' + SHA256)
    assert d.state == 'complete'
    assert server.requests[-1].headers['Range'] == 'bytes=100000-'
    # a corrupt prefix is caught even though only the rest was downloaded
    (tmp_path / 'g').write_bytes(b'X' * 100000)
    d = fetch(server.url('/f'), tmp_path / 'g', checksum='sha256:' + SHA256)
    assert d.state == 'fatal-error' and isinstance(d.last_exception, bitpit.IntegrityError)


@pytest.mark.parametrize('bad', ['sha256', 'sha256:xyz', 'nosuchalgo:abcd', 'md5:' + 'a' * 31,
                                 ':abcd', 'sha256:' + '0' * 63])
def test_malformed_checksum_is_value_error(bad):
    with pytest.raises(ValueError):
        bitpit.Downloader('http://127.0.0.1/x', checksum=bad)


# ---------------------------------------------------------------------------
# headers
# ---------------------------------------------------------------------------

def test_default_headers(server, tmp_path):
    server.add('/f', DATA)
    fetch(server.url('/f'), tmp_path / 'f')
    headers = server.requests[0].headers
    assert headers['User-Agent'] == 'bitpit/' + bitpit.__version__
    assert headers['Accept-Encoding'] == 'identity'
    assert headers['Authorization'] is None


@pytest.mark.parametrize('given', [{'user-agent': 'mine/1'}, {'USER-AGENT': 'mine/1'},
                                   {'User-Agent': 'other', 'user-agent': 'mine/1'}])
def test_headers_merge_case_insensitively(server, tmp_path, given):
    server.add('/f', DATA)
    fetch(server.url('/f'), tmp_path / 'f', headers=given)
    assert server.requests[0].headers.get_all('User-Agent') == ['mine/1']


def test_a_header_value_may_hold_utf8_bytes_as_latin1(server, tmp_path):
    """http.client sends a str header value as Latin-1, so UTF-8 goes in as
    its bytes decoded as Latin-1; those include 0x80-0x9F, which are C1
    controls only in a URL."""
    title = 'caf\u00e9 \u20ac'.encode('utf-8').decode('latin-1')
    server.add('/f', DATA)
    fetch(server.url('/f'), tmp_path / 'f', headers={'X-Title': title})
    assert server.requests[0].headers['X-Title'].encode('latin-1').decode('utf-8') == \
        'caf\u00e9 \u20ac'


@pytest.mark.parametrize('headers, error', [
    ({'X-A': 1}, TypeError), ({1: 'x'}, TypeError), ('X-A: 1', TypeError),
    ({'X-A': 'a\r\nX-B: b'}, ValueError), ({'Bad Name': 'x'}, ValueError)])
def test_bad_headers_are_refused_when_given(tmp_path, headers, error):
    with pytest.raises(error, match='header'):
        bitpit.Downloader('http://127.0.0.1:1/f', path=tmp_path / 'f', headers=headers)


@pytest.mark.parametrize('name', ['accept-encoding', 'Range', 'IF-RANGE', 'Host',
                                  'Content-Length'])
def test_headers_bitpit_controls_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match='(?i)' + name):
        bitpit.Downloader('http://127.0.0.1:1/f', path=tmp_path / 'f', headers={name: 'x'})
    d = bitpit.Downloader('http://127.0.0.1:1/f', path=tmp_path / 'f')
    with pytest.raises(ValueError):
        d.headers = {name: 'x'}
    assert d.headers == {}


@pytest.mark.parametrize('name, value', [('X-A', 'a\r\nX-Injected: 1'), ('X-A', 'a\nX-Injected: 1'),
                                         ('X-A', 'a\rX-Injected: 1'), ('X-A\r\nX-Injected', '1')])
def test_a_line_break_in_a_field_is_refused_and_nothing_sent(server, name, value):
    """The fields of a request are written at once, not by http.client's
    putheader: a field that a line break would split (a value that came
    from a cookie jar or a sidecar) is still refused before a byte goes out."""
    url = server.add('/f', DATA)
    options = bitpit._RequestOptions(bitpit._check_url(url), bitpit._RequestSettings(
        {}, None, '', None, 5.0), bitpit._Cookies())
    request = bitpit._Request(options, bitpit._check_url(url), extra={name: value})
    try:
        with pytest.raises(ValueError, match='Invalid header'):
            request.send()
    finally:
        request.close(False)
    request = bitpit._Request(options, bitpit._check_url(url), extra={'X-A': 'a b'})
    try:
        assert request.send().status == 200
    finally:
        request.close(False)
    assert [r.headers['X-A'] for r in server.requests] == ['a b']
    assert [r.headers['User-Agent'] for r in server.requests] == ['bitpit/' + bitpit.__version__]


HOST_KEYS = [('http', '127.0.0.1', 80), ('http', '127.0.0.1', 8080), ('http', 'example.com', 443),
             ('https', 'example.com', 443), ('https', 'example.com', 80), ('http', '::1', 80),
             ('https', '::1', 8443), ('http', 'xn--caf-dma.example', 80)]


def test_the_host_field_is_the_one_http_client_makes():
    """bitpit writes ``Host`` itself, worked out once for a server: the
    value http.client's ``putrequest`` would have made, to the host or
    through a tunnel to it (a plain proxy's is still http.client's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for scheme, host, port in HOST_KEYS:
        if scheme == 'https':
            tunnel = http.client.HTTPSConnection('proxy.example', 3128, context=context)
            tunnel.set_tunnel(host, port)
            conns = [http.client.HTTPSConnection(host, port, context=context), tunnel]
        else:
            conns = [http.client.HTTPConnection(host, port)]
        for conn in conns:
            conn.putrequest('GET', '/f', skip_accept_encoding=True)
            assert conn._buffer[1].decode() == 'Host: ' + bitpit._host_field(
                (scheme, host, port)), (scheme, host, port)


def test_the_host_field_comes_first(server, tmp_path):
    url = server.add('/f', DATA)
    fetch(url, tmp_path / 'f', headers={'X-A': 'a'})
    headers = server.requests[0].headers
    assert list(headers.keys())[0] == 'Host' and headers.get_all('Host') == [url.split('/')[2]]
    assert headers['X-A'] == 'a'


def test_accept_encoding_stays_identity(server, tmp_path):
    server.add('/f', DATA)
    fetch(server.url('/f'), tmp_path / 'f')
    assert server.requests[0].headers.get_all('Accept-Encoding') == ['identity']


def test_custom_headers_also_after_same_host_redirect(server, tmp_path):
    server.add('/f', DATA)
    server.redirect('/old', '/f', status=301)
    d = fetch(server.url('/old'), tmp_path / 'f',
              headers={'X-Token': 'abc', 'User-Agent': 'mine/1.0'})
    assert d.state == 'complete'
    for record in server.requests:
        assert record.headers['X-Token'] == 'abc'
        assert record.headers['User-Agent'] == 'mine/1.0'
    assert [r.path for r in server.requests] == ['/old', '/f']


# ---------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------

def test_credentials_from_url(server, tmp_path):
    server.add('/f', DATA)
    url = server.url('/f').replace('http://', 'http://al%40ice:s%3Acret@')
    d = fetch(url, tmp_path / 'f')
    assert d.state == 'complete'
    assert server.requests[0].headers['Authorization'] == basic('al@ice', 's:cret')


def test_auth_option(server, tmp_path):
    server.add('/f', DATA)
    fetch(server.url('/f'), tmp_path / 'f', auth=('bob', 'pw'))
    assert server.requests[0].headers['Authorization'] == basic('bob', 'pw')


def test_credentials_never_sent_to_another_host(server, make_server, tmp_path):
    other = make_server('localhost')
    other.add('/f', DATA)
    server.redirect('/away', other.url('/f'))
    d = fetch(server.url('/away'), tmp_path / 'f', auth=('bob', 'pw'),
              headers={'Authorization': 'Bearer secret', 'Cookie': 'a=b'})
    assert d.state == 'complete'
    assert server.requests[0].headers['Authorization'] == 'Bearer secret'
    moved = other.requests[0].headers
    assert moved['Authorization'] is None and moved['Cookie'] is None


def use_netrc(tmp_path, monkeypatch, password):
    """``$NETRC`` names a file with ``nina``'s ``password`` for 127.0.0.1."""
    netrc_file = tmp_path / 'netrc'
    netrc_file.write_text('machine 127.0.0.1 login nina password {}\n'.format(password))
    netrc_file.chmod(0o600)
    monkeypatch.setenv('NETRC', str(netrc_file))


def test_netrc_used_when_no_credentials(server, tmp_path, monkeypatch):
    server.add('/f', DATA)
    use_netrc(tmp_path, monkeypatch, 'n3trc')
    fetch(server.url('/f'), tmp_path / 'f')
    assert server.requests[0].headers['Authorization'] == basic('nina', 'n3trc')
    fetch(server.url('/f'), tmp_path / 'g', auth=('bob', 'pw'))
    assert server.requests[1].headers['Authorization'] == basic('bob', 'pw')


def test_a_netrc_changed_between_downloads_is_read_again(server, tmp_path, monkeypatch):
    """The reference: the file is read again when it changes, also a moment
    after it was read."""
    server.add('/f', DATA)
    use_netrc(tmp_path, monkeypatch, 'n3trc')
    fetch(server.url('/f'), tmp_path / 'f')
    use_netrc(tmp_path, monkeypatch, 'changed')
    fetch(server.url('/f'), tmp_path / 'g')
    assert [r.headers['Authorization'] for r in server.requests] == [
        basic('nina', 'n3trc'), basic('nina', 'changed')]


def test_the_default_netrc_follows_a_change_of_home(server, tmp_path, monkeypatch):
    """Without ``$NETRC``, ``~/.netrc`` is the one in the ``$HOME`` of the
    moment: a download after ``$HOME`` changed reads the other file."""
    server.add('/f', DATA)
    monkeypatch.delenv('NETRC', raising=False)
    for name, password in (('one', 'first'), ('two', 'second')):
        home = tmp_path / name
        home.mkdir()
        netrc_file = home / '.netrc'
        netrc_file.write_text('machine 127.0.0.1 login nina password {}\n'.format(password))
        netrc_file.chmod(0o600)
        monkeypatch.setenv('HOME', str(home))
        fetch(server.url('/f'), tmp_path / name / 'f')
    assert [r.headers['Authorization'] for r in server.requests] == [
        basic('nina', 'first'), basic('nina', 'second')]


def test_a_managers_downloads_share_what_netrc_says_for_a_second(server, tmp_path,
                                                                 monkeypatch):
    """The reference: the downloads of managers reuse what ``.netrc`` (and
    the proxy variables) said for a host, for a second
    (``_SHARED_LOOKUP_SECONDS``, made long here, then nothing); the
    downloads started after that see a change."""
    server.add('/f', DATA)
    monkeypatch.setattr(bitpit, '_SHARED_LOOKUP_SECONDS', 3600.0)
    monkeypatch.setattr(bitpit, '_SHARED_LOOKUPS', bitpit._HostLookups(-3600.0))
    m = bitpit.Manager()
    try:
        m.start()
        for name, password in (('a', 'n3trc'), ('b', 'changed'), ('c', 'changed')):
            if name == 'c':  # the second is over
                monkeypatch.setattr(bitpit, '_SHARED_LOOKUP_SECONDS', 0.0)
            use_netrc(tmp_path, monkeypatch, password)
            d = bitpit.Downloader(server.url('/f'), path=tmp_path / name)
            rec = Recorder(d)
            m.add(d)
            rec.wait_state('complete')
    finally:
        m.stop()
    assert [r.headers['Authorization'] for r in server.requests] == [
        basic('nina', 'n3trc'), basic('nina', 'n3trc'), basic('nina', 'changed')]


def test_missing_netrc_is_fine(server, tmp_path, monkeypatch):
    server.add('/f', DATA)
    monkeypatch.setenv('NETRC', str(tmp_path / 'does-not-exist'))
    d = fetch(server.url('/f'), tmp_path / 'f')
    assert d.state == 'complete' and server.requests[0].headers['Authorization'] is None


# ---------------------------------------------------------------------------
# proxies
# ---------------------------------------------------------------------------

def test_explicit_proxy(server, proxy, tmp_path):
    server.add('/f', DATA)
    d = fetch(server.url('/f'), tmp_path / 'f', proxy=proxy.url)
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == DATA
    assert proxy.seen == [('GET', server.url('/f'), None)]
    # bitpit's Host, which the proxy passes on: the URL's host and port
    assert server.requests[0].headers.get_all('Host') == [server.url('/f').split('/')[2]]


def test_a_plain_proxy_is_asked_for_the_url_without_its_credentials_or_fragment(
        server, proxy, tmp_path):
    """RFC 9110 4.2.4: the credentials of a URL are not sent in its target;
    they go to the server as Basic, through the proxy. The fragment is
    the client's own."""
    server.add('/f', DATA)
    url = server.url('/f?x=1').replace('http://', 'http://u:p@') + '#part'
    d = fetch(url, tmp_path / 'f', proxy=proxy.url)
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == DATA
    assert proxy.seen == [('GET', server.url('/f?x=1'), None)]
    assert server.requests[0].headers['Authorization'] == basic('u', 'p')


def test_proxy_credentials(server, proxy, tmp_path):
    server.add('/f', DATA)
    d = fetch(server.url('/f'), tmp_path / 'f',
              proxy=proxy.url.replace('http://', 'http://pu:pp@'))
    assert d.state == 'complete'
    assert proxy.seen[0][2] == basic('pu', 'pp')
    assert server.requests[0].headers['Proxy-Authorization'] is None


def test_environment_proxy_and_opt_out(server, proxy, tmp_path, monkeypatch):
    server.add('/f', DATA)
    monkeypatch.setenv('http_proxy', proxy.url)
    monkeypatch.delenv('no_proxy', raising=False)
    monkeypatch.delenv('NO_PROXY', raising=False)
    assert fetch(server.url('/f'), tmp_path / 'a').state == 'complete'
    assert len(proxy.seen) == 1
    assert fetch(server.url('/f'), tmp_path / 'b', proxy='').state == 'complete'
    monkeypatch.setenv('no_proxy', '127.0.0.1')
    assert fetch(server.url('/f'), tmp_path / 'c').state == 'complete'
    assert len(proxy.seen) == 1
    assert len(server.requests) == 3


def test_upper_case_environment_proxy_but_not_in_a_cgi_script(server, proxy, tmp_path,
                                                               monkeypatch):
    """urllib's rules: ``HTTP_PROXY`` counts when ``http_proxy`` is unset,
    but not in a CGI script (``REQUEST_METHOD`` set: a client's ``Proxy:``
    header), where only ``http_proxy`` does."""
    server.add('/f', DATA)
    monkeypatch.setenv('HTTP_PROXY', proxy.url)
    assert fetch(server.url('/f'), tmp_path / 'a').state == 'complete'
    monkeypatch.setenv('REQUEST_METHOD', 'GET')
    assert fetch(server.url('/f'), tmp_path / 'b').state == 'complete'
    monkeypatch.setenv('http_proxy', proxy.url)
    assert fetch(server.url('/f'), tmp_path / 'c').state == 'complete'
    assert [path for _, path, _ in proxy.seen] == [server.url('/f')] * 2
    assert len(server.requests) == 3


def test_bad_proxy_is_value_error():
    with pytest.raises(ValueError):
        bitpit.Downloader('http://h/x', proxy='ftp://h:21')
