"""HTTPS: an untrusted certificate is a fatal TLS error, an ssl_context
that trusts it works, and HTTPS goes through a proxy's CONNECT tunnel. The
server and its certificate are the https_url and certificate fixtures of
conftest.py."""
import ssl

import bitpit
from conftest import HTTPS_DATA, fetch


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
