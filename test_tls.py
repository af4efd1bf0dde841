"""HTTPS: an untrusted certificate is a fatal TLS error, an ssl_context
that trusts it works, and HTTPS goes through a proxy's CONNECT tunnel. The
server and its certificate are the https_url and certificate fixtures of
conftest.py."""
import socket
import ssl
import threading
import time

import pytest

import bitpit
from conftest import HTTPS_DATA, Recorder, basic, bitpit_threads, fetch, read_head


def test_untrusted_certificate_is_fatal(https_url, tmp_path):
    d = fetch(https_url, tmp_path / 'secure.bin', restart_wait=0)
    assert d.state == 'fatal-error' and not d.is_restarting
    assert isinstance(d.last_exception, bitpit.TLSError)
    assert isinstance(d.last_exception.__cause__, ssl.SSLCertVerificationError)
    assert 'certificate' in str(d.last_exception)


def test_ssl_context_that_trusts_the_certificate(https_url, certificate, tmp_path):
    context = ssl.create_default_context(cafile=str(certificate[0]))
    d = fetch(https_url, tmp_path / 'secure.bin', ssl_context=context)
    assert d.state == 'complete' and (tmp_path / 'secure.bin').read_bytes() == HTTPS_DATA


def test_https_through_connect_proxy(https_url, certificate, proxy, tmp_path):
    context = ssl.create_default_context(cafile=str(certificate[0]))
    d = fetch(https_url, tmp_path / 'secure.bin', ssl_context=context, proxy=proxy.url)
    assert d.state == 'complete' and (tmp_path / 'secure.bin').read_bytes() == HTTPS_DATA
    assert proxy.seen[0][0] == 'CONNECT'
    assert proxy.seen[0][1] == https_url.split('/')[2]


def test_a_tunnel_is_reused_only_with_the_proxy_credentials_it_was_opened_with(
        https_url, certificate, proxy, tmp_path):
    """A CONNECT tunnel is the proxy's leave for the credentials it was
    opened with: a later download with other proxy credentials opens its
    own, one with the same ones reuses it."""
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with_credentials = proxy.url.replace('http://', 'http://{}@')
    for n, credentials in enumerate(['pa:1', 'pb:2', 'pb:2']):
        d = fetch(https_url, tmp_path / 'secure{}.bin'.format(n), ssl_context=context,
                  proxy=with_credentials.format(credentials))
        assert d.state == 'complete'
    assert [(method, authorization) for method, _, authorization in proxy.seen] == \
        [('CONNECT', basic('pa', '1')), ('CONNECT', basic('pb', '2'))]


def trusting(certificate):
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.mark.parametrize('fault', ['handshake-eof', 'handshake-reset', 'garbage',
                                   'eof-mid-body'])
def test_a_broken_tls_connection_is_transient_and_retried(tls_peer, certificate, tmp_path,
                                                          fault):
    """An overloaded load balancer drops handshakes; a peer garbles a record
    or closes without close_notify: each is a NetworkError, retried like a
    reset, and the retry completes the file."""
    tls_peer.script(fault)
    target = tmp_path / 'secure.bin'
    d = bitpit.Downloader(tls_peer.url(), path=target, ssl_context=trusting(certificate),
                          restart_wait=0.05, timeout=5)
    rec = Recorder(d)
    d.start()
    rec.wait_state('complete', 'fatal-error', timeout=15)
    d.join(5)
    assert d.state == 'complete' and target.read_bytes() == HTTPS_DATA
    states = [new for _, new in rec.states]
    assert states.count('error') == 1 and 'fatal-error' not in states
    error = d.last_exception
    assert error.retryable and not isinstance(error, bitpit.TLSError)
    # Python takes an EOF without close_notify for the end of the data: a
    # body cut short, as over plain HTTP
    assert isinstance(error, bitpit.ProtocolError if fault == 'eof-mid-body'
                      else bitpit.NetworkError)
    assert tls_peer.handled[:2] == [fault, 'ok']
    if fault in ('garbage', 'eof-mid-body'):
        # every byte that came before the fault was kept: the retry asks
        # for the rest only
        assert tls_peer.asked == [0, len(HTTPS_DATA) // 2]


def test_a_tls_version_no_side_accepts_is_fatal(tls_peer, certificate, tmp_path):
    tls_peer.context.minimum_version = ssl.TLSVersion.TLSv1_3
    client = trusting(certificate)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    d = fetch(tls_peer.url(), tmp_path / 'secure.bin', ssl_context=client, restart_wait=0)
    assert d.state == 'fatal-error' and not d.is_restarting
    assert isinstance(d.last_exception, bitpit.TLSError)
    assert not (tmp_path / 'secure.bin').exists()


def test_speed_changed_keeps_coming_during_a_tls_handshake(tls_peer, certificate, tmp_path):
    """The download thread shakes hands itself, without blocking: a server
    that never answers the handshake still gets the speed said every
    period."""
    tls_peer.script('stall')
    d = bitpit.Downloader(tls_peer.url(), path=tmp_path / 'secure.bin',
                          ssl_context=trusting(certificate), timeout=30, update_period=0.05)
    rec = Recorder(d)
    d.start()
    assert tls_peer.wait_handled(1)
    since = time.monotonic()
    rec.wait_for(lambda: sum(1 for when, _, _ in rec.speeds if when > since) >= 4)
    d.stop()
    assert d.state == 'pause' and rec.states == [('pause', 'start'), ('start', 'pause')]


def test_stop_during_a_tls_handshake_is_prompt(tls_peer, certificate, tmp_path):
    tls_peer.script('stall')
    d = bitpit.Downloader(tls_peer.url(), path=tmp_path / 'secure.bin',
                          ssl_context=trusting(certificate), timeout=30)
    d.start()
    assert tls_peer.wait_handled(1)
    began = time.monotonic()
    d.stop()
    assert time.monotonic() - began < 0.3
    assert d.state == 'pause' and bitpit_threads(wait=0) == []


@pytest.mark.parametrize('host', ['files.example', '[::1]'])
def test_a_proxy_that_refuses_the_tunnel_fails_the_attempt(tmp_path, host):
    """bitpit writes the CONNECT (with a Host field, as HTTP/1.1 asks)
    and reads the proxy's answer itself: a refusal ends the attempt with
    the proxy's status, no byte asked of the server behind it. An IPv6
    address is in brackets in both (Python 3.12's set_tunnel adds a Host
    field of its own, without them)."""
    listener = socket.create_server(('127.0.0.1', 0))
    heads = []

    def refuse():
        client, _ = listener.accept()
        with client:
            heads.append(read_head(client))
            client.sendall(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')

    thread = threading.Thread(target=refuse)
    thread.start()
    try:
        d = fetch('https://{}:8443/f'.format(host), tmp_path / 'f', restart_wait=0,
                  retries=0, proxy='http://127.0.0.1:{}'.format(listener.getsockname()[1]))
    finally:
        thread.join(5)
        listener.close()
    authority = '{}:8443'.format(host).encode()
    assert heads == [b'CONNECT ' + authority + b' HTTP/1.1\r\nHost: ' + authority + b'\r\n\r\n']
    assert d.state in ('error', 'fatal-error')
    assert 'Tunnel connection failed: 403 Forbidden' in str(d.last_exception)


def test_a_proxy_that_never_answers_the_connect_stalls_and_a_stop_ends_its_wait_at_once(
        tmp_path):
    """The wait for the proxy's answer to CONNECT (a step now) is bounded
    by the time-out, a StalledError, and a stop ends it at once."""
    listener = socket.create_server(('127.0.0.1', 0))  # takes connections, answers none
    proxy = 'http://127.0.0.1:{}'.format(listener.getsockname()[1])
    held = []
    try:
        began = time.monotonic()
        d = fetch('https://files.example/f', tmp_path / 'f', restart_wait=0, retries=0,
                  timeout=0.3, proxy=proxy)
        assert isinstance(d.last_exception, bitpit.StalledError)
        assert time.monotonic() - began < 3
        d = bitpit.Downloader('https://files.example/f', path=tmp_path / 'g', timeout=30,
                              proxy=proxy)
        d.start()
        listener.settimeout(5)
        held += [listener.accept()[0] for _ in range(2)]  # the stalled one's, then ours
        for sock in held:
            read_head(sock)  # the CONNECT came: its answer is waited for
        began = time.monotonic()
        d.stop()
        assert time.monotonic() - began < 0.3
        assert d.state == 'pause' and bitpit_threads(wait=0) == []
    finally:
        for sock in held:
            sock.close()
        listener.close()
