"""``checksum='ALG:file:URL'`` (and ``'file:URL'``, CLI ``--checksum-file``):
the digest comes from the line for the file's name in a ``SHA256SUMS``-style
file, GNU or BSD format, read before any byte of the file is asked for. No
line for the name, or a digest that does not fit, is a fatal
``IntegrityError``."""
import hashlib
import time

import pytest

import bitpit
from conftest import DATA, Recorder, fetch

SHA256 = hashlib.sha256(DATA).hexdigest()
SHA512 = hashlib.sha512(DATA).hexdigest()
MD5 = hashlib.md5(DATA).hexdigest()
OTHER = hashlib.sha256(b'other').hexdigest()


@pytest.mark.parametrize('listing', [
    '{other}  other.iso\n{sha256}  f.iso\n',                      # GNU, text mode
    '# made by sha256sum\r\n{sha256} *f.iso\r\n',                 # GNU, binary mode, CRLF
    '{sha256}  ./images/f.iso\n',                                 # a path: its last segment
    'MD5 (f.iso) = {md5}\nSHA256 (f.iso) = {sha256}\n',           # BSD, two algorithms
    'SHA256 (other.iso) = {other}\nSHA256 (f.iso)= {sha256}\n',   # BSD, as some tools space it
])
def test_the_line_for_the_file_gives_the_digest(server, tmp_path, listing):
    sums = server.add('/SHA256SUMS', listing.format(sha256=SHA256, other=OTHER, md5=MD5)
                      .encode())
    url = server.add('/pub/f.iso', DATA)
    d = fetch(url, tmp_path / 'f.iso', checksum='sha256:file:' + sums)
    assert d.state == 'complete' and (tmp_path / 'f.iso').read_bytes() == DATA
    # read first, once
    assert [r.path for r in server.requests][0] == '/SHA256SUMS'


def test_a_wrong_line_is_a_mismatch(server, tmp_path):
    sums = server.add('/SUMS', '{}  f.iso\n'.format(OTHER).encode())
    d = fetch(server.add('/f.iso', DATA), tmp_path / 'f.iso', checksum='SHA256:file:' + sums)
    assert isinstance(d.last_exception, bitpit.IntegrityError) and d.state == 'fatal-error'
    assert OTHER in str(d.last_exception)


@pytest.mark.parametrize('digest', [SHA512, MD5])
def test_without_an_algorithm_the_length_tells_it(server, tmp_path, digest):
    sums = server.add('/SUMS', '{}  f.iso\n'.format(digest).encode())
    d = fetch(server.add('/f.iso', DATA), tmp_path / 'f.iso', checksum='file:' + sums)
    assert d.state == 'complete'
    sums = server.add('/SUMS', '{}  f.iso\n'.format(digest[:-2] + '00').encode())
    d = fetch(server.url('/f.iso'), tmp_path / 'g.iso', checksum='file:' + sums)
    assert isinstance(d.last_exception, bitpit.IntegrityError)
    sums = server.add('/SUMS', '{}  f.iso\n'.format('0' * 50).encode())
    d = fetch(server.url('/f.iso'), tmp_path / 'h.iso', checksum='file:' + sums)
    assert 'not of a known algorithm' in str(d.last_exception)


def test_the_name_of_the_path_counts_when_the_url_names_none(server, tmp_path):
    sums = server.add('/SUMS', '{}  f.iso\n'.format(SHA256).encode())
    url = server.add('/get?id=3', DATA)
    assert fetch(url, tmp_path / 'f.iso', checksum='sha256:file:' + sums).state == 'complete'


@pytest.mark.parametrize('listing, message', [
    ('{}  other.iso\n'.format(SHA256), 'no sha256 line for f.iso'),
    ('{}  f.iso\n'.format(SHA256[:-1]), 'not sha256'),
    ('{}  f.iso\n'.format(MD5), 'not sha256'),
    ('SHA1 (f.iso) = {}\n'.format(MD5[:40].ljust(40, '0')), 'no sha256 line'),
    ('{}  f.iso\n'.format('0' * 50), 'not sha256'),
])
def test_no_usable_line_fails_before_the_file_is_asked_for(server, tmp_path, listing,
                                                           message):
    sums = server.add('/SUMS', listing.encode())
    url = server.add('/f.iso', DATA)
    d = fetch(url, tmp_path / 'f.iso', checksum='sha256:file:' + sums, restart_wait=0)
    assert d.state == 'fatal-error' and isinstance(d.last_exception, bitpit.IntegrityError)
    assert message in str(d.last_exception)
    assert server.requests_for('/f.iso') == [] and not (tmp_path / 'f.iso').exists()


def test_an_unreadable_checksum_file_fails_like_a_request(server, tmp_path):
    d = fetch(server.add('/f.iso', DATA), tmp_path / 'f.iso',
              checksum='sha256:file:' + server.url('/missing'))
    assert isinstance(d.last_exception, bitpit.HTTPStatusError)
    assert d.last_exception.status == 404 and d.state == 'fatal-error'


@pytest.mark.parametrize('bad, error', [
    ('nosuch:file:http://127.0.0.1/SUMS', ValueError),
    ('sha256:file:ftp://127.0.0.1/SUMS', bitpit.InvalidURLError),
    ('file:', bitpit.InvalidURLError),
])
def test_a_bad_option_is_refused_at_once(bad, error):
    with pytest.raises(error):
        bitpit.Downloader('http://127.0.0.1/f.iso', checksum=bad)


def test_the_command_line(server, tmp_path):
    sums = server.add('/SUMS', 'SHA256 (f.iso) = {}\n'.format(SHA256).encode())
    url = server.add('/f.iso', DATA)
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'a'), '--checksum-file', sums, url]) == 0
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'b'), '--checksum',
                        'sha256:file:' + sums, url]) == 0
    wrong = server.add('/WRONG', '{}  f.iso\n'.format(OTHER).encode())
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'c'), '--checksum-file', wrong, url]) == 1
    for usage in (['--checksum-file', 'ftp://h/S', url], ['--checksum-file', sums, url, url + '?2'],
                  ['--checksum', 'nosuch:file:' + sums, url]):
        assert bitpit._cli(['-q', '-d', str(tmp_path / 'd')] + usage) == 2


def test_a_stop_ends_the_wait_for_the_checksum_file_at_once(server, tmp_path):
    """The checksum file is fetched before the file's transfer: a stop
    while its server has not answered still ends the attempt at once."""
    sums = server.add('/SHA256SUMS', b'', stall_before_headers=True)
    d = bitpit.Downloader(server.add('/f.iso', DATA), tmp_path / 'f.iso',
                          checksum='sha256:file:' + sums)
    rec = Recorder(d)
    d.start()
    server.wait_stalled()
    began = time.monotonic()
    d.stop()
    assert time.monotonic() - began < 0.1
    assert d.state == 'pause' and not d.is_alive
    assert [new for _, new in rec.states] == ['start', 'pause']
    assert not server.requests_for('/f.iso')
    server.release()
