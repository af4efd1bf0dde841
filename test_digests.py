"""Digests the server gives: ``Repr-Digest`` and ``Content-Digest`` (RFC
9530) and the older ``Digest`` (RFC 3230), sha-256 and sha-512, checked
when the file completes. A mismatch is a fatal ``IntegrityError`` that
keeps the file with a sidecar holding none of it; a malformed field or an
unknown algorithm is ignored; ``Link: <URL>; rel=duplicate`` next to a
digest adds a source (RFC 6249). ``verify_digest=False`` and
``--no-verify-digest`` turn the check off."""
import base64
import hashlib
import json
import logging
import threading
import time

import pytest

import bitpit
from conftest import DATA, ETAG, OFFSET, download, fetch, partial_file, sidecar_of

WRONG = DATA[:-1] + b'!'


def b64(algorithm, data):
    return base64.b64encode(hashlib.new(algorithm, data).digest()).decode()


def field(kind, algorithm, data):
    """The ``kind`` field naming the digest of ``data``."""
    if kind == 'Digest':
        return {'Digest': '{}={}'.format(algorithm.upper().replace('SHA', 'SHA-'),
                                         b64(algorithm, data))}
    return {kind: '{}=:{}:'.format(algorithm.replace('sha', 'sha-'), b64(algorithm, data))}


KINDS = ['Repr-Digest', 'Content-Digest', 'Digest']
ALGORITHMS = ['sha256', 'sha512']


@pytest.mark.parametrize('algorithm', ALGORITHMS)
@pytest.mark.parametrize('kind', KINDS)
def test_a_right_digest_completes(server, tmp_path, kind, algorithm):
    url = server.add('/f', DATA, headers=field(kind, algorithm, DATA))
    d = fetch(url, tmp_path / 'f')
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == DATA
    assert not sidecar_of(tmp_path / 'f').exists()


@pytest.mark.parametrize('algorithm', ALGORITHMS)
@pytest.mark.parametrize('kind', KINDS)
def test_a_wrong_digest_is_fatal_and_keeps_the_file_incomplete(server, tmp_path, kind,
                                                               algorithm):
    url = server.add('/f', DATA, headers=field(kind, algorithm, WRONG))
    d = fetch(url, tmp_path / 'f', restart_wait=0)
    assert d.state == 'fatal-error' and not d.is_restarting
    error = d.last_exception
    assert isinstance(error, bitpit.IntegrityError) and kind in str(error)
    assert b64(algorithm, WRONG) in str(error) and b64(algorithm, DATA) in str(error)
    # the bytes stay, and the sidecar says that none of them is good
    assert (tmp_path / 'f').read_bytes() == DATA
    assert json.loads(sidecar_of(tmp_path / 'f').read_text())['held'] == []


def test_a_file_that_failed_its_digest_is_not_skipped_and_comes_again(server, tmp_path):
    url = server.add('/f', DATA, headers=field('Repr-Digest', 'sha256', WRONG))
    assert fetch(url, tmp_path / 'f').state == 'fatal-error'
    server.add('/f', DATA, headers=field('Repr-Digest', 'sha256', DATA))  # fixed
    d = fetch(url, tmp_path / 'f', if_exists='skip')
    assert d.state == 'complete' and not sidecar_of(tmp_path / 'f').exists()
    assert 'Range' not in server.requests_for('/f')[-1].headers  # all of it again


def test_checksum_mismatch_also_leaves_a_sidecar_holding_nothing(server, tmp_path):
    url = server.add('/f', DATA)
    d = fetch(url, tmp_path / 'f', checksum='sha256:' + '0' * 64)
    assert isinstance(d.last_exception, bitpit.IntegrityError)
    assert json.loads(sidecar_of(tmp_path / 'f').read_text())['held'] == []


def test_verify_digest_false_ignores_a_wrong_digest(server, tmp_path):
    url = server.add('/f', DATA, headers=field('Repr-Digest', 'sha256', WRONG))
    d = fetch(url, tmp_path / 'f', verify_digest=False)
    assert d.state == 'complete' and d.verify_digest is False


def test_the_command_line_can_turn_the_check_off(server, tmp_path):
    url = server.add('/f', DATA, headers=field('Digest', 'sha256', WRONG))
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'a'), url]) == 1
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'b'), '--no-verify-digest', url]) == 0


def test_on_a_resume_repr_digest_holds_and_content_digest_does_not(server, tmp_path):
    """A 206 for the rest of the file: its Content-Digest digests the part
    sent (here a wrong one for the file), its Repr-Digest the whole file."""
    part = DATA[OFFSET:]
    url = server.add('/f', DATA, headers={**field('Content-Digest', 'sha256', part),
                                          **field('Repr-Digest', 'sha512', DATA)})
    (tmp_path / 'f').write_bytes(DATA[:OFFSET])
    d = fetch(url, tmp_path / 'f')
    assert d.state == 'complete'
    assert server.requests_for('/f')[0].headers['Range'] == 'bytes={}-'.format(OFFSET)
    # a Repr-Digest that disagrees with the bytes held before is caught
    (tmp_path / 'g').write_bytes(b'x' * OFFSET)
    d = fetch(url, tmp_path / 'g')
    assert isinstance(d.last_exception, bitpit.IntegrityError)
    assert 'Repr-Digest' in str(d.last_exception)


@pytest.mark.parametrize('headers', [
    {'Repr-Digest': 'sha-256=:not base64!:'},
    {'Repr-Digest': 'sha-256=:{}:'.format(b64('md5', DATA))},        # too short
    {'Repr-Digest': 'sha-256="{}"'.format(b64('sha256', WRONG))},    # not a byte sequence
    {'Repr-Digest': 'sha-256=:{}:,'.format(b64('sha256', WRONG))},   # not a dictionary
    {'Repr-Digest': 'md5=:{}:, sha=:AAAA:'.format(b64('md5', WRONG))},  # unsupported
    {'Digest': 'SHA-256'},
    {'Digest': 'MD5={}, UNIXsum=30637'.format(b64('md5', WRONG))},
    {'Digest': 'SHA-256=@@@@'},
])
def test_malformed_fields_and_unknown_algorithms_are_ignored(server, tmp_path, caplog,
                                                             headers):
    url = server.add('/f', DATA, headers=headers)
    with caplog.at_level(logging.DEBUG, logger='bitpit'):
        d = fetch(url, tmp_path / 'f')
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == DATA
    assert any(r.name == 'bitpit' and 'ignor' in r.getMessage() for r in caplog.records)


def test_one_good_digest_among_malformed_ones_still_counts(server, tmp_path):
    url = server.add('/f', DATA, headers={
        'Repr-Digest': 'unknown=:AAAA:, sha-256=:{}:;p=1'.format(b64('sha256', WRONG))})
    assert isinstance(fetch(url, tmp_path / 'f').last_exception, bitpit.IntegrityError)


def test_link_duplicates_beside_a_digest_become_sources(make_server, tmp_path):
    main, other = make_server(), make_server()
    mirror = other.add('/m', DATA)
    links = ('<ftp://example.com/f>; rel=duplicate; pri=1, '
             '<{}>; rel="duplicate"; pri=2, <http://127.0.0.1:9/x>; rel=describedby'
             .format(mirror))
    # the first source breaks off after 100 kB: the rest comes from the duplicate
    url = main.add('/f', DATA, truncate_at=100000,
                   headers={'Link': links, **field('Repr-Digest', 'sha256', DATA)})
    d, _ = download(url, tmp_path / 'f')
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == DATA
    assert other.requests_for('/m', 'GET')[0].headers['Range'].startswith('bytes=100000-')
    assert d.mirrors == ()  # found by this attempt, not the caller's


def test_link_duplicates_without_a_digest_are_not_followed(make_server, tmp_path):
    main, other = make_server(), make_server()
    mirror = other.add('/m', DATA)
    url = main.add('/f', DATA, truncate_at=100000,
                   headers={'Link': '<{}>; rel=duplicate'.format(mirror)})
    d, _ = download(url, tmp_path / 'f')
    assert d.state == 'error' and other.requests_for('/m') == []


def test_a_redirector_s_digest_and_duplicates_count(make_server, tmp_path):
    """As MirrorBrain and MirrorCache send them: Digest and Link with the
    302 to a mirror; the mirror's own answer says nothing."""
    redirector, first, second = make_server(), make_server(), make_server()
    mirror = first.add('/f', DATA, truncate_at=100000)
    other = second.add('/f', DATA)
    url = redirector.add('/f', b'', status=302, headers={
        'Location': mirror, 'Link': '<{}>; rel=duplicate; pri=1'.format(other),
        **field('Digest', 'sha256', DATA)})
    d, _ = download(url, tmp_path / 'f')
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == DATA
    assert second.requests_for('/f', 'GET')[0].headers['Range'].startswith('bytes=100000-')
    redirector.add('/f', b'', status=302, headers={'Location': second.url('/f'),
                                                  **field('Digest', 'sha512', WRONG)})
    d = fetch(url, tmp_path / 'g')
    assert isinstance(d.last_exception, bitpit.IntegrityError)
    # a Repr-Digest of the redirect is the redirect's own: not the file's
    redirector.add('/f', b'', status=302, headers={'Location': second.url('/f'),
                                                  **field('Repr-Digest', 'sha512', WRONG)})
    assert fetch(url, tmp_path / 'h').state == 'complete'



@pytest.mark.parametrize('when', ['at its end', 'at its start'])
def test_reading_a_file_back_to_check_it_never_holds_up_the_other_downloads(
        server, tmp_path, monkeypatch, when):
    """A file is read back to be checked: at its end for a server's digest
    (the whole file), at its start for a checksum (the bytes a resumed file
    holds): seconds for a big one (slowed down here). The loop drives
    every other download meanwhile: that reading must not be made on it."""
    # the run looks at its transfer (and whether a sidecar save is due)
    # meanwhile
    monkeypatch.setattr(bitpit, '_TEND_PERIOD', 0.02)
    monkeypatch.setattr(bitpit, '_SIDECAR_PERIOD', 0.02)
    during, measured = [], threading.Event()
    real_read_back = bitpit._FileStore._read_back

    def slow_read_back(store, *args, **kwargs):
        if not during:
            before = other.downloaded
            time.sleep(0.2)
            during.append(other.downloaded - before)
            measured.set()
        return real_read_back(store, *args, **kwargs)
    monkeypatch.setattr(bitpit._FileStore, '_read_back', slow_read_back)
    big = DATA * 5  # (a file of 4 MiB at most is read back on the loop: a few ms)
    if when == 'at its end':
        url = server.add('/f', big, headers=field('Repr-Digest', 'sha256', big))
        d = bitpit.Downloader(url, path=tmp_path / 'f.bin')
    else:
        url = server.add('/f', big, etag=ETAG)
        d = bitpit.Downloader(url, path=partial_file(tmp_path, url, ETAG, len(big)),
                              checksum='sha256:' + hashlib.sha256(big).hexdigest())
    other = bitpit.Downloader(server.add('/other', DATA, throttle=512 * 1024),
                              path=tmp_path / 'other')
    other.start()
    d.start()
    assert measured.wait(5)
    d.join(5)
    other.stop()
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == big
    # ~100 KiB came at 512 KiB/s in the 0.2 s
    assert during[0] >= 32 * 1024, during


def test_a_start_over_forgets_the_digest_of_the_version_that_changed(server, tmp_path):
    """The file changes during an attempt, after its first answer gave a
    digest, to an empty one whose answers are 416s that give none: the
    attempt starts over and completes the new version, not checked against
    the old one's digest. (The first answer is cut short; its mirror, asked
    for the rest, already has the new version and is retired; the source
    asked again says the file changed; the new probe's answer is a 416.)"""
    answers = []

    def old_then_empty(handler):
        answers.append(handler.headers.get('Range'))
        if len(answers) == 1:  # the old version, with its digest, cut short
            head = ('HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-{0}/{1}\r\n'
                    'Content-Length: {1}\r\nETag: "old"\r\nRepr-Digest: {2}\r\n\r\n').format(
                        len(DATA) - 1, len(DATA), field('Repr-Digest', 'sha256', DATA)
                        ['Repr-Digest'])
            handler.wfile.write(head.encode('ascii') + DATA[:1000])
        else:  # the new version: empty
            handler.wfile.write(b'HTTP/1.1 416 Range Not Satisfiable\r\n'
                                b'Content-Range: bytes */0\r\nETag: "new"\r\n'
                                b'Content-Length: 0\r\n\r\n')
    url = server.add_raw('/f', old_then_empty)
    mirror = server.add('/g', b'')
    d = fetch(url, tmp_path / 'f', mirrors=[mirror], connections=2, restart_wait=0)
    assert answers == ['bytes=0-', 'bytes=1000-{}'.format(len(DATA) - 1), 'bytes=0-']
    assert d.state == 'complete', d.last_exception
    assert (tmp_path / 'f').read_bytes() == b''
