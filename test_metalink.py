"""Metalinks: ``Downloader(metalink=PATH_OR_URL)``, ``Manager.add_metalink``
and ``--metalink``. The document's http(s) URLs, best first, become the
sources; its ``<size>`` every source must have; its ``<hash>`` the
checksum; its ``<pieces>`` are checked as they land: a bad piece comes
again from another source, and a source that sent two is retired. Hostile
documents (a DTD, an entity, no usable URL, sizes that disagree, unknown
hash types) are refused with a clear error."""
import hashlib
import logging
import random
import threading
import time

import pytest

import bitpit
from conftest import download

KiB = 1024
MiB = 1024 * KiB
PIECE = 256 * KiB
BIG = random.Random(5854).randbytes(3 * MiB + 1000)        # 13 pieces, splits over 3
SMALL = random.Random(3).randbytes(100 * KiB)
NS4 = 'urn:ietf:params:xml:ns:metalink'


def corrupt(data, every=PIECE):
    """``data`` with one byte changed in every piece."""
    spoilt = bytearray(data)
    for position in range(100, len(data), every):
        spoilt[position] ^= 0xFF
    return bytes(spoilt)


def pieces_of(data, length=PIECE, algorithm='sha256'):
    return [hashlib.new(algorithm, data[i:i + length]).hexdigest()
            for i in range(0, len(data), length)]


def meta4(files):
    """A Metalink 4 document: ``files`` is a list of dicts with ``name``,
    ``urls`` (``(url, priority)``), and optional ``size``, ``hashes``
    (``{type: hex}``), ``pieces`` (``(type, length, [hex])``)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<metalink xmlns="{}">'.format(NS4)]
    for f in files:
        out.append('<file name="{}">'.format(f['name']))
        if 'size' in f:
            out.append('<size>{}</size>'.format(f['size']))
        for kind, value in f.get('hashes', {}).items():
            out.append('<hash type="{}">{}</hash>'.format(kind, value))
        if 'pieces' in f:
            kind, length, hashes = f['pieces']
            out.append('<pieces length="{}" type="{}">'.format(length, kind))
            out += ['<hash>{}</hash>'.format(h) for h in hashes]
            out.append('</pieces>')
        for url, priority in f['urls']:
            attribute = '' if priority is None else ' priority="{}"'.format(priority)
            out.append('<url location="de"{}>{}</url>'.format(attribute, url))
        out.append('</file>')
    out.append('</metalink>')
    return '\n'.join(out).encode()


def file_entry(data, urls, name='data.bin', **extra):
    entry = {'name': name, 'size': len(data), 'urls': urls,
             'hashes': {'sha-256': hashlib.sha256(data).hexdigest(), 'md5': '0' * 32},
             'pieces': ('sha-256', PIECE, pieces_of(data))}
    entry.update(extra)
    return entry


def write(tmp_path, document, name='doc.meta4'):
    path = tmp_path / name
    path.write_bytes(document)
    return path


# ---------------------------------------------------------------------------
# the sources, the size, the hash, the name
# ---------------------------------------------------------------------------

def test_urls_by_priority_become_url_and_mirrors(server, tmp_path, caplog):
    urls = [(server.add('/c', SMALL), 3), (server.add('/a', SMALL), 1), ('ftp://h/x', 1),
            (server.add('/b', SMALL), 2), ('file:///etc/passwd', 1), (server.add('/z', SMALL), None)]
    doc = write(tmp_path, meta4([file_entry(SMALL, urls)]))
    with caplog.at_level(logging.INFO, logger='bitpit'):
        d = bitpit.Downloader(metalink=str(doc), path=tmp_path, dir_path=True)
    assert d.url == server.url('/a')
    assert d.mirrors == (server.url('/b'), server.url('/c'), server.url('/z'))
    assert d.path == tmp_path / 'data.bin'
    messages = ' '.join(r.getMessage() for r in caplog.records)
    assert 'ftp://h/x' in messages and 'file:///etc/passwd' in messages
    d.start()
    assert d.wait(10) and (tmp_path / 'data.bin').read_bytes() == SMALL
    d.join()


def test_metalink_3_by_preference(server, tmp_path):
    digest = hashlib.sha1(SMALL).hexdigest()
    doc = ('<?xml version="1.0"?><metalink version="3.0" xmlns="http://www.metalinker.org/">'
           '<files><file name="v3.bin"><size>{size}</size><verification>'
           '<hash type="sha1">{digest}</hash></verification><resources>'
           '<url type="http" preference="10">{low}</url>'
           '<url type="bittorrent" preference="100">{high}.torrent</url>'
           '<url type="http" preference="90">{high}</url>'
           '</resources></file></files></metalink>').format(
        size=len(SMALL), digest=digest, low=server.add('/low', SMALL),
        high=server.add('/high', SMALL))
    d = bitpit.Downloader(metalink=write(tmp_path, doc.encode(), 'doc.metalink'),
                          path=tmp_path, dir_path=True)
    assert (d.url, d.mirrors) == (server.url('/high'), (server.url('/low'),))
    d.start()
    assert d.wait(10) and (tmp_path / 'v3.bin').read_bytes() == SMALL
    d.join()


def test_a_metalink_by_url_and_its_hash(server, tmp_path):
    url = server.add('/f', SMALL)
    wrong = file_entry(SMALL, [(url, 1)], hashes={'sha-512': hashlib.sha512(b'x').hexdigest()})
    del wrong['pieces']
    doc = server.add('/f.meta4', meta4([wrong]), content_type='application/metalink4+xml')
    d, _ = download(None, tmp_path / 'out.bin', metalink=doc)
    assert d.state == 'fatal-error' and isinstance(d.last_exception, bitpit.IntegrityError)
    assert 'sha512' in str(d.last_exception)


def test_a_source_of_another_size_is_retired_before_writing(server, tmp_path):
    short = server.add('/short', SMALL[:-1])
    good = server.add('/good', SMALL)
    doc = write(tmp_path, meta4([file_entry(SMALL, [(short, 1), (good, 2)])]))
    d, _ = download(None, tmp_path / 'f', metalink=str(doc))
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == SMALL
    assert len(server.requests_for('/short')) == 1
    # the only source of another size: a clear, fatal error
    doc = write(tmp_path, meta4([file_entry(SMALL, [(short, 1)])]))
    d, _ = download(None, tmp_path / 'g', metalink=str(doc))
    assert d.state == 'fatal-error' and 'the metalink says' in str(d.last_exception)
    assert not (tmp_path / 'g').exists() or (tmp_path / 'g').stat().st_size == 0


@pytest.mark.parametrize('name, expected', [
    ('../../escape.bin', 'escape.bin'), ('dir/sub/ok.bin', 'ok.bin'), ('..', 'index.html'),
    ('a\\b:c.bin', 'b_c.bin')])
def test_the_name_never_leaves_the_directory(server, tmp_path, name, expected):
    doc = write(tmp_path, meta4([{'name': name, 'urls': [(server.add('/f', SMALL), 1)]}]))
    d = bitpit.Downloader(metalink=str(doc), path=tmp_path / 'out', dir_path=True)
    assert d.path == tmp_path / 'out' / expected


# ---------------------------------------------------------------------------
# piece hashes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('rank', [0, 1])
def test_a_mirror_with_corrupt_pieces_is_retired_and_the_file_is_right(make_server, tmp_path,
                                                                       caplog, rank):
    """The corrupt mirror first (it serves the probe) or second (it serves
    a share: the servers' pace makes the file split over 3 connections)."""
    servers = [make_server() for _ in range(3)]
    urls = [s.add('/f', BIG, throttle=8 * MiB) for s in servers]
    bad = servers[rank].add('/f', corrupt(BIG), throttle=8 * MiB)
    doc = write(tmp_path, meta4([file_entry(BIG, [(url, n) for n, url in enumerate(urls, 1)])]))
    with caplog.at_level(logging.WARNING, logger='bitpit'):
        d, rec = download(None, tmp_path / 'f', metalink=str(doc), connections=3)
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == BIG
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']
    messages = [r.getMessage() for r in caplog.records]
    assert sum('does not match' in m and bad in m for m in messages) >= 2, messages
    retired = [m for m in messages if 'any more' in m]
    assert len(retired) == 1 and 'sent 2 pieces' in retired[0], messages  # at its 2nd
    assert bad in retired[0]
    for good in servers[:rank] + servers[rank + 1:]:
        assert good.bytes_sent('/f') > 0


def two_mirrors(make_server, tmp_path, spoil_at):
    """Two servers of BIG, the first (ranked first) with the byte at
    ``spoil_at`` changed, and a metalink of them: ``(first, second, doc)``."""
    first, second = make_server(), make_server()
    spoilt = bytearray(BIG)
    spoilt[spoil_at] ^= 0xFF
    url, mirror = first.add('/f', bytes(spoilt)), second.add('/f', BIG)
    return first, second, write(tmp_path, meta4([file_entry(BIG, [(url, 1), (mirror, 2)])]))


def test_a_bad_piece_comes_again_from_another_source(make_server, tmp_path):
    """One bad piece: fetched again from the other mirror, not from the one
    that sent it (which, with one bad piece, stays in use)."""
    first, second, doc = two_mirrors(make_server, tmp_path, 3 * PIECE + 100)
    d, _ = download(None, tmp_path / 'f', metalink=str(doc))
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == BIG
    assert [r.headers.get('Range') for r in first.requests_for('/f')] == [None]
    assert [r.headers['Range'] for r in second.requests_for('/f')] == [
        'bytes={}-{}'.format(3 * PIECE, 4 * PIECE - 1)]


def test_a_file_is_not_complete_while_its_last_piece_is_being_checked(
        make_server, tmp_path, monkeypatch):
    """The last piece is bad, and checking it takes long (a slow disk): the
    download thread, which looks four times a second, sees every byte held
    meanwhile, but the file is complete only once the piece passed; this one
    fails, and comes again from the other mirror."""
    _, second, doc = two_mirrors(make_server, tmp_path, len(BIG) - 10)
    real = bitpit._FileStore.piece_matches

    def slowly(store, first_byte, end, *args):
        if end == len(BIG):
            time.sleep(0.6)  # a check that outlasts two of the download thread's looks
        return real(store, first_byte, end, *args)
    monkeypatch.setattr(bitpit._FileStore, 'piece_matches', slowly)
    d, _ = download(None, tmp_path / 'f', metalink=str(doc))
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == BIG
    last = len(BIG) // PIECE * PIECE
    assert [r.headers['Range'] for r in second.requests_for('/f')] == [
        'bytes={}-{}'.format(last, len(BIG) - 1)]


def test_a_file_is_not_complete_between_its_last_write_and_the_check(
        make_server, tmp_path, monkeypatch):
    """The same, with the connection that wrote the last bytes held up
    between its write and the start of the check (preempted): every byte is
    held, no piece is being checked yet, and the file is still not complete
    until its last piece passed."""
    _, second, doc = two_mirrors(make_server, tmp_path, len(BIG) - 10)
    real = bitpit._FileStore.write

    def write_then_pause(store, offset, data, epoch):
        real(store, offset, data, epoch)
        if offset + len(data) == len(BIG):
            time.sleep(0.6)  # two of the download thread's looks
    monkeypatch.setattr(bitpit._FileStore, 'write', write_then_pause)
    d, _ = download(None, tmp_path / 'f', metalink=str(doc))
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == BIG


def test_a_bad_piece_two_sources_wrote_blames_neither(make_server, tmp_path, caplog):
    """The first mirror spoils a byte of piece 2 and breaks off 1000 bytes
    into it; the second, good, writes the rest of that piece (most of it)
    and is not blamed for the byte it did not send."""
    first, second = make_server(), make_server()
    spoilt = bytearray(BIG)
    spoilt[2 * PIECE + 100] ^= 0xFF
    url = first.add('/f', bytes(spoilt), truncate_at=2 * PIECE + 1000)
    mirror = second.add('/f', BIG)
    doc = write(tmp_path, meta4([file_entry(BIG, [(url, 1), (mirror, 2)])]))
    with caplog.at_level(logging.WARNING, logger='bitpit'):
        d, _ = download(None, tmp_path / 'f', metalink=str(doc))
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == BIG
    warnings = [r.getMessage() for r in caplog.records if 'does not match' in r.getMessage()]
    assert len(warnings) == 1 and 'piece 2 ' in warnings[0], warnings
    assert 'several sources' in warnings[0] and mirror not in warnings[0]


def test_one_source_that_keeps_sending_bad_pieces_fails(server, tmp_path):
    url = server.add('/f', corrupt(BIG))
    doc = write(tmp_path, meta4([file_entry(BIG, [(url, 1)])]))
    d, _ = download(None, tmp_path / 'f', metalink=str(doc))
    assert d.state == 'fatal-error' and isinstance(d.last_exception, bitpit.IntegrityError)
    assert 'pieces that do not match' in str(d.last_exception)


def test_a_bad_piece_held_before_is_fetched_again(server, tmp_path):
    url = server.add('/f', BIG)
    (tmp_path / 'f').write_bytes(corrupt(BIG)[:PIECE * 2 + 10])  # a resumable prefix
    doc = write(tmp_path, meta4([file_entry(BIG, [(url, 1)])]))
    d, _ = download(None, tmp_path / 'f', metalink=str(doc))
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == BIG


def test_pieces_held_before_are_read_on_the_opening_worker_and_judged_on_the_loop(
        server, tmp_path, monkeypatch):
    """A file big enough to be opened on a worker (made so here by a lower
    threshold) reads the pieces it held before there, and forgets the bad
    ones' bytes there too (each forget syncs the file and its sidecar: disk
    work, which the loop leaves to the worker as it does the opening); the
    loop, which alone changes the transfer's state, takes in what they are:
    the bad one is fetched again. Which pieces to read the loop finds
    among the ranges held alone (a big file's metalink may list 200,000
    pieces, 0.2 s of the loop's time to look at each; a new file has none
    to read)."""
    monkeypatch.setattr(bitpit, '_DISK_WORK_ON_LOOP', PIECE)
    read, judged, forgotten, looked = [], [], [], []
    matches, bad_piece = bitpit._FileStore.piece_matches, bitpit._Transfer._bad_piece
    forget, due = bitpit._FileStore.forget, bitpit._PieceHashes.due

    def recorded_due(pieces, held, start, end, total):
        looked.append((start, end))
        return due(pieces, held, start, end, total)
    monkeypatch.setattr(bitpit._PieceHashes, 'due', recorded_due)

    def recorded_matches(store, *args):
        read.append(threading.current_thread().name)
        return matches(store, *args)

    def recorded_forget(store, *args):
        forgotten.append(threading.current_thread().name)
        return forget(store, *args)
    monkeypatch.setattr(bitpit._FileStore, 'forget', recorded_forget)

    def recorded_bad_piece(transfer, *args):
        judged.append(threading.current_thread().name)
        return bad_piece(transfer, *args)
    monkeypatch.setattr(bitpit._FileStore, 'piece_matches', recorded_matches)
    monkeypatch.setattr(bitpit._Transfer, '_bad_piece', recorded_bad_piece)
    url = server.add('/f', BIG)
    (tmp_path / 'f').write_bytes(corrupt(BIG)[:PIECE * 2 + 10])  # two pieces, both bad
    doc = write(tmp_path, meta4([file_entry(BIG, [(url, 1)], name='f')]))
    d, _ = download(None, tmp_path / 'f', metalink=str(doc))
    assert d.state == 'complete' and (tmp_path / 'f').read_bytes() == BIG
    assert read[:2] == ['bitpit-prepare'] * 2 and judged == ['bitpit-loop'] * 2
    assert forgotten == ['bitpit-prepare'] * 2
    assert looked[0] == (0, PIECE * 2 + 10)  # (then each write's own range)


def test_a_stop_while_the_opening_worker_reads_the_pieces_held_before_is_prompt(
        server, tmp_path, monkeypatch):
    """A stop that comes while the worker that opens a big file (made so
    here by a lower threshold) reads the pieces it held before ends that
    read at its next block, and the attempt with it, at once: the
    download pauses, and its next start checks those pieces again and
    completes."""
    monkeypatch.setattr(bitpit, '_DISK_WORK_ON_LOOP', PIECE)
    reading, reads = threading.Event(), []
    matches = bitpit._FileStore.piece_matches

    def read_once_stopped(store, first, last, algorithm, digest, cancelled):
        reads.append(first)
        if not reading.is_set():  # the first piece: tell, then wait for the stop
            reading.set()
            d._transfer.cancel.pause(time.monotonic() + 10).event.wait(10)  # (its flag)
        return matches(store, first, last, algorithm, digest, cancelled)
    monkeypatch.setattr(bitpit._FileStore, 'piece_matches', read_once_stopped)
    url = server.add('/f', BIG)
    (tmp_path / 'f').write_bytes(corrupt(BIG)[:PIECE * 2 + 10])
    doc = write(tmp_path, meta4([file_entry(BIG, [(url, 1)], name='f')]))
    d = bitpit.Downloader(metalink=str(doc), path=tmp_path / 'f')
    d.start()
    assert reading.wait(5)
    began = time.monotonic()
    d.stop()
    assert time.monotonic() - began < 0.3  # (the issue asks 0.1 s; a noisy machine)
    assert d.state == 'pause' and reads == [0]  # the second piece was never read
    d.start()
    assert d.wait(10) and d.state == 'complete'
    assert (tmp_path / 'f').read_bytes() == BIG


# ---------------------------------------------------------------------------
# the manager and the command line
# ---------------------------------------------------------------------------

def test_manager_add_metalink_adds_each_file(server, tmp_path):
    other = random.Random(4).randbytes(50 * KiB)
    doc = server.add('/all.meta4', meta4([
        file_entry(SMALL, [(server.add('/one', SMALL), 1)], name='one.bin'),
        {'name': 'two.bin', 'urls': [(server.add('/two', other), None)]}]))
    manager = bitpit.Manager(connections=2)
    downloads = manager.add_metalink(doc, path=tmp_path)
    assert [d.path.name for d in downloads] == ['one.bin', 'two.bin']
    assert manager.downloads == downloads
    manager.start()
    assert all(d.wait(10) for d in downloads)
    manager.stop()
    assert (tmp_path / 'one.bin').read_bytes() == SMALL
    assert (tmp_path / 'two.bin').read_bytes() == other
    with pytest.raises(ValueError, match='2 files'):
        bitpit.Downloader(metalink=doc)


def test_command_line_metalink_and_follow(server, tmp_path):
    document = meta4([file_entry(SMALL, [(server.add('/one', SMALL), 1)], name='one.bin')])
    doc = write(tmp_path, document)
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'a'), '--metalink', str(doc)]) == 0
    assert (tmp_path / 'a' / 'one.bin').read_bytes() == SMALL
    url = server.add('/get', document, content_type='application/metalink4+xml')
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'b'), '--follow-metalink', url]) == 0
    assert (tmp_path / 'b' / 'one.bin').read_bytes() == SMALL
    # without --follow-metalink the document is the download
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'c'), url]) == 0
    assert (tmp_path / 'c' / 'get').read_bytes() == document
    # a plain file with --follow-metalink is downloaded as usual
    plain = server.add('/plain', SMALL)
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'd'), '--follow-metalink', plain]) == 0
    assert (tmp_path / 'd' / 'plain').read_bytes() == SMALL
    bad = write(tmp_path, b'<metalink/>', 'bad.meta4')
    assert bitpit._cli(['-q', '-d', str(tmp_path / 'e'), '--metalink', str(bad)]) == 1


# ---------------------------------------------------------------------------
# hostile documents
# ---------------------------------------------------------------------------

BOMB = b'''<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<metalink xmlns="urn:ietf:params:xml:ns:metalink"><file name="&lol9;">
<url>http://127.0.0.1/x</url></file></metalink>'''

EXTERNAL = b'''<?xml version="1.0"?>
<!DOCTYPE metalink [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<metalink xmlns="urn:ietf:params:xml:ns:metalink"><file name="x">
<url>http://127.0.0.1/&secret;</url></file></metalink>'''


def url_entry(**extra):
    entry = {'name': 'x.bin', 'urls': [('http://127.0.0.1:9/x', 1)]}
    entry.update(extra)
    return meta4([entry])


@pytest.mark.parametrize('document, message', [
    (BOMB, 'DTD'),
    (EXTERNAL, 'DTD'),
    (b'<?xml version="1.0"?><!DOCTYPE metalink SYSTEM "http://127.0.0.1:9/x.dtd">'
     b'<metalink xmlns="urn:ietf:params:xml:ns:metalink"/>', 'DTD'),
    (b'not xml at all <', 'not XML'),
    (b'<html><body>hello</body></html>', 'not a metalink'),
    (meta4([]), 'no file'),
    (meta4([{'name': 'x', 'urls': [('ftp://h/x', 1), ('file:///x', 2)]}]), 'no http'),
    (url_entry(size='12abc'), 'not a number'),
    (url_entry(hashes={'sha-3000': 'ab'}), 'no hash of a type'),
    (url_entry(hashes={'sha-256': 'xyz'}), 'not 64 hex digits'),
    (url_entry(size=10 * PIECE, pieces=('sha-256', PIECE, pieces_of(SMALL))), 'piece hashes'),
    (url_entry(pieces=('sha-256', 0, [])), 'length'),
    (meta4([{'name': 'a', 'urls': [('http://h/a', 1)]}] * 2), 'twice'),
    (meta4([{'name': '', 'urls': [('http://h/a', 1)]}]), 'no name'),
])
def test_hostile_documents_are_refused(tmp_path, document, message):
    doc = write(tmp_path, document)
    with pytest.raises(bitpit.ProtocolError, match=message) as caught:
        bitpit.Downloader(metalink=str(doc), path=tmp_path / 'out')
    assert not caught.value.retryable


def test_sizes_that_disagree_are_refused(tmp_path):
    document = meta4([{'name': 'x', 'size': 10, 'urls': [('http://h/a', 1)]}])
    document = document.replace(b'<size>10</size>', b'<size>10</size><size>11</size>')
    with pytest.raises(bitpit.ProtocolError, match='disagree'):
        bitpit.Downloader(metalink=str(write(tmp_path, document)))


def test_unknown_hash_types_beside_a_known_one_are_ignored(tmp_path, caplog):
    document = url_entry(hashes={'sha-3000': 'ab', 'sha-256': '0' * 64},
                         pieces=('tiger', PIECE, ['ab']))
    with caplog.at_level(logging.WARNING, logger='bitpit'):
        d = bitpit.Downloader(metalink=str(write(tmp_path, document)), path=tmp_path / 'o')
    assert d._settings.checksum == ('sha256', '0' * 64)
    assert sum('unsupported type' in r.getMessage() for r in caplog.records) == 2


def test_a_metalink_url_is_fetched_with_the_request_options(server, tmp_path):
    doc = server.add('/f.meta4', url_entry())
    d = bitpit.Downloader(metalink=doc, path=tmp_path / 'o', headers={'X-Token': 't'},
                          timeout=5)
    assert d.url == 'http://127.0.0.1:9/x'
    assert server.requests_for('/f.meta4')[0].headers['X-Token'] == 't'
    with pytest.raises(bitpit.HTTPStatusError):
        bitpit.Downloader(metalink=server.url('/missing.meta4'))


def test_arguments(tmp_path):
    doc = write(tmp_path, url_entry())
    with pytest.raises(TypeError):
        bitpit.Downloader()
    with pytest.raises(ValueError, match='not both'):
        bitpit.Downloader('http://127.0.0.1/x', metalink=str(doc))
    with pytest.raises(bitpit.FileError):
        bitpit.Downloader(metalink=str(tmp_path / 'missing.meta4'))
