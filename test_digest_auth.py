"""HTTP Digest authentication (RFC 7616): auth=(user, password) answers a
401 (or a proxy's 407) that asks for Digest, and Basic is never sent again
to a host (or proxy) that asked for Digest. The fixture server checks every
answer itself, with hashlib (conftest's _DigestGate)."""

import re

import pytest

import bitpit
from conftest import DATA, basic, fetch

ALICE = {'user': 'alice', 'password': 's3cret "quoted"'}
AUTH = (ALICE['user'], ALICE['password'])


def authorizations(server, path, header='Authorization'):
    return [r.headers.get(header) for r in server.requests_for(path)]


def assert_no_basic_after_digest(values):
    """Once a request was answered with Digest, no later one is Basic."""
    first = next(i for i, value in enumerate(values) if value and value.startswith('Digest'))
    assert not any(value and value.startswith('Basic') for value in values[first:]), values


def params(value):
    return dict(re.findall(r'(\w+)=("[^"]*"|[^\s,]*)', value))


@pytest.mark.parametrize('algorithm', ['MD5', 'SHA-256', 'MD5-sess', 'SHA-256-sess'])
def test_each_algorithm(server, tmp_path, algorithm):
    url = server.add('/f.bin', DATA, digest=dict(ALICE, algorithm=algorithm))
    d = fetch(url, tmp_path / 'f.bin', auth=AUTH)
    assert d.state == 'complete', d.last_exception
    assert (tmp_path / 'f.bin').read_bytes() == DATA
    first, second = authorizations(server, '/f.bin')
    assert first == basic(*AUTH)  # preemptive Basic, as before: the host had not asked
    assert second.startswith('Digest ')
    sent = params(second)
    assert sent['algorithm'] == algorithm and sent['qop'] == 'auth'
    assert sent['nc'] == '00000001' and sent['uri'] == '"/f.bin"'


def test_a_host_that_asked_for_digest_gets_digest_at_the_next_start(server, tmp_path):
    """The Digest state that an attempt made at the host's challenge is
    kept by the download: its next start answers with Digest at once, no
    Basic first (and a download that met none keeps none)."""
    url = server.add('/f.bin', DATA, digest=ALICE)
    d = fetch(url, tmp_path / 'f.bin', auth=AUTH, if_exists='overwrite')
    plain = fetch(server.add('/plain.bin', DATA), tmp_path / 'plain.bin', auth=AUTH)
    assert d.state == plain.state == 'complete', d.last_exception
    assert plain._digest_auth is None
    d.start()
    assert d.wait(10) and d.state == 'complete', d.last_exception
    d.join(10)
    first, second, again = authorizations(server, '/f.bin')
    assert first == basic(*AUTH) and second.startswith('Digest ')
    assert again.startswith('Digest ')


def test_rfc_2069_without_qop(server, tmp_path):
    url = server.add('/f.bin', DATA, digest=dict(ALICE, qop=None))
    d = fetch(url, tmp_path / 'f.bin', auth=AUTH)
    assert d.state == 'complete', d.last_exception
    assert 'qop' not in params(authorizations(server, '/f.bin')[-1])


def test_the_strongest_of_the_offered_challenges_is_taken(server, tmp_path):
    def offer(handler):
        if handler.headers.get('Authorization', '').startswith('Digest'):
            handler.send_response(200)
            handler.send_header('Content-Length', '2')
            handler.end_headers()
            handler.wfile.write(b'ok')
            return
        handler.send_response(401)
        for algorithm in ('MD5', 'SHA-256'):
            handler.send_header('WWW-Authenticate', 'Digest realm="r", qop="auth-int, auth", '
                                'nonce="n", algorithm=' + algorithm)
        handler.send_header('WWW-Authenticate', 'Basic realm="r"')
        handler.send_header('Content-Length', '0')
        handler.end_headers()
    url = server.add_raw('/offers', offer)
    d = fetch(url, tmp_path / 'f', auth=AUTH)
    assert d.state == 'complete', d.last_exception
    assert params(authorizations(server, '/offers')[-1])['algorithm'] == 'SHA-256'


def test_a_stale_nonce_is_answered_again_without_failing(server, tmp_path):
    url = server.add('/f.bin', DATA, digest=dict(ALICE, algorithm='SHA-256', stale_after=1))
    d = bitpit.Downloader(url, tmp_path / 'f.bin', auth=AUTH)
    d.update_size()  # Basic, 401, Digest: the nonce is then used up
    d.update_size()  # Digest with the old nonce, 401 stale=true, Digest with the new one
    assert d.size == len(DATA)
    gate = server.digest_gate('/f.bin')
    assert gate.stale_sent == 1
    values = authorizations(server, '/f.bin')
    assert values[0] == basic(*AUTH)
    sent = [params(value) for value in values[1:]]
    # the nonce-count goes on with the nonce, and starts again with a new one
    assert [(p['nonce'].strip('"'), p['nc']) for p in sent] == [
        (gate.nonces[0], '00000001'), (gate.nonces[0], '00000002'),
        (gate.nonces[1], '00000001')]
    assert_no_basic_after_digest(values)


def test_nonce_counts_grow_over_many_requests_and_connections(server, tmp_path):
    data = DATA * 4
    url = server.add('/big.bin', data, digest=dict(ALICE, stale_after=3), throttle=16 * 2 ** 20)
    d = fetch(url, tmp_path / 'big.bin', auth=AUTH, connections=4)
    assert d.state == 'complete', d.last_exception
    assert (tmp_path / 'big.bin').read_bytes() == data
    values = authorizations(server, '/big.bin')
    assert len(values) > 4
    assert_no_basic_after_digest(values)
    by_nonce = {}
    for value in values[1:]:
        sent = params(value)
        by_nonce.setdefault(sent['nonce'], []).append(int(sent['nc'], 16))
    for counts in by_nonce.values():  # each once, from 1 up
        assert sorted(counts) == list(range(1, len(counts) + 1)), by_nonce


def test_a_wrong_password_is_a_401_without_a_loop(server, tmp_path):
    url = server.add('/f.bin', DATA, digest=ALICE)
    d = fetch(url, tmp_path / 'f.bin', auth=('alice', 'wrong'), restart_wait=0)
    assert d.state == 'fatal-error'
    assert isinstance(d.last_exception, bitpit.HTTPStatusError)
    assert d.last_exception.status == 401
    assert len(server.requests_for('/f.bin')) == 2  # Basic, then one Digest answer
    assert not (tmp_path / 'f.bin').exists()


def test_without_credentials_a_digest_401_is_a_401(server, tmp_path):
    url = server.add('/f.bin', DATA, digest=ALICE)
    d = fetch(url, tmp_path / 'f.bin')
    assert d.state == 'fatal-error' and d.last_exception.status == 401
    assert authorizations(server, '/f.bin') == [None]


def test_credentials_follow_the_host_rules_after_a_redirect(make_server, tmp_path):
    first, other = make_server(), make_server('localhost')
    target = other.add('/f.bin', DATA, digest=ALICE)
    url = first.redirect('/f.bin', target)
    d = fetch(url, tmp_path / 'f.bin', auth=AUTH)
    assert d.state == 'fatal-error' and d.last_exception.status == 401
    assert authorizations(other, '/f.bin') == [None]  # another host: no credentials


def test_a_proxy_that_asks_for_digest(server, tmp_path):
    # the fixture server plays the proxy: it is asked for the absolute URL
    server.add('http://files.test/f.bin', DATA * 4, throttle=16 * 2 ** 20,
               digest=dict(user='bob', password='pw', algorithm='SHA-256', proxy=True))
    proxy = 'http://bob:pw@127.0.0.1:{}'.format(server.port)
    d = fetch('http://files.test/f.bin', tmp_path / 'f.bin', proxy=proxy, connections=3)
    assert d.state == 'complete', d.last_exception
    assert (tmp_path / 'f.bin').read_bytes() == DATA * 4
    assert len(server.requests_for('http://files.test/f.bin')) > 3
    values = authorizations(server, 'http://files.test/f.bin', 'Proxy-Authorization')
    assert values[0] == basic('bob', 'pw')
    assert values[1].startswith('Digest ')
    assert params(values[1])['uri'] == '"http://files.test/f.bin"'
    assert_no_basic_after_digest(values)
    assert all(v is None for v in authorizations(server, 'http://files.test/f.bin'))


def test_a_server_that_always_says_stale_is_not_asked_forever(server, tmp_path):
    def always_stale(handler):
        handler.send_response(401)
        handler.send_header('WWW-Authenticate', 'Digest realm="r", qop="auth", '
                            'nonce="{}", stale=true'.format(len(server.requests)))
        handler.send_header('Content-Length', '0')
        handler.end_headers()
    url = server.add_raw('/stale', always_stale)
    d = fetch(url, tmp_path / 'f', auth=AUTH)
    assert d.state == 'fatal-error' and d.last_exception.status == 401
    assert len(server.requests_for('/stale')) == 2 + bitpit._DIGEST_STALE_ROUNDS


def test_a_nonce_sent_again_to_another_connection_keeps_its_count():
    # two connections get the same new nonce: a count used twice is a replay
    auth = bitpit._DigestAuth()
    key = ('http', 'h', 80)
    challenge = ['Digest realm="r", qop="auth", nonce="n1", stale=true']
    auth.learn(key, challenge)
    first = params(auth.answer(key, AUTH, 'GET', '/f'))['nc']
    auth.learn(key, challenge)
    second = params(auth.answer(key, AUTH, 'GET', '/f'))['nc']
    assert (first, second) == ('00000001', '00000002')
    auth.learn(key, ['Digest realm="r", qop="auth", nonce="n2"'])
    assert params(auth.answer(key, AUTH, 'GET', '/f'))['nc'] == '00000001'
