"""Resuming never corrupts a file: the sidecar and its validator, If-Range
in the same downloader, a new one and a new process, resuming without a
usable sidecar, a file already complete (416), partial answers (200 or
206, shifted, disagreeing), content that changed between attempts, and
short or chunked bodies."""
import errno
import hashlib
import json
import os
import pathlib
import random
import subprocess
import sys
import threading
import time

import pytest

import bitpit
from conftest import (DATA, ETAG, HERE, OFFSET, Recorder, download, partial_file, run_until,
                      sidecar_of)


# ---------------------------------------------------------------------------
# validated resume
# ---------------------------------------------------------------------------

def test_sidecar_exists_while_partial_and_is_removed_on_completion(server, tmp_path):
    url = server.add('/f', DATA, etag=ETAG, stall_after=OFFSET)
    target = tmp_path / 'f.bin'
    d = bitpit.Downloader(url, path=target, timeout=30, update_period=0.02)
    rec = Recorder(d)
    d.start()
    rec.wait_for(lambda: d.downloaded >= OFFSET)
    saved = json.loads(sidecar_of(target).read_text())
    held = saved.pop('held')
    assert saved == {'version': 2, 'url': url, 'validators': {url: ETAG}, 'size': len(DATA)}
    assert held == [] or (len(held) == 1 and held[0][0] == 0 and held[0][1] <= OFFSET)
    d.stop()
    # at a stop the sidecar holds every byte written, and the file is cut
    # back to them (the space reserved beyond is given back)
    assert json.loads(sidecar_of(target).read_text())['held'] == [[0, OFFSET]]
    assert target.stat().st_size == OFFSET
    server.add('/f', DATA, etag=ETAG)
    run_until(d, rec, 'complete')
    assert target.read_bytes() == DATA
    assert not sidecar_of(target).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f.bin']


def test_if_range_sent_on_resume_in_the_same_downloader(server, tmp_path):
    url = server.add('/f', DATA, etag=ETAG, truncate_at=OFFSET, truncate_once=True)
    target = tmp_path / 'f.bin'
    d, rec = download(url, target)
    assert d.state == 'error' and isinstance(d.last_exception, bitpit.ProtocolError)
    assert target.stat().st_size == OFFSET and sidecar_of(target).exists()
    run_until(d, rec, 'complete')
    assert target.read_bytes() == DATA and not sidecar_of(target).exists()
    first, second = server.requests
    assert first.headers['Range'] is None and first.headers['If-Range'] is None
    assert second.headers['Range'] == 'bytes={}-'.format(OFFSET)
    assert second.headers['If-Range'] == ETAG


@pytest.mark.parametrize('how', ['removed', 'emptied'])
def test_a_partial_file_gone_between_attempts_is_downloaded_whole(server, tmp_path, how):
    """The same downloader looks at its file again at each start: bytes it
    held of a file since removed or emptied (its sidecar left there) are
    held no more, and the next attempt asks for every byte."""
    url = server.add('/f', DATA, etag=ETAG, truncate_at=OFFSET, truncate_once=True)
    target = tmp_path / 'f.bin'
    d, rec = download(url, target)
    assert d.state == 'error' and target.stat().st_size == OFFSET
    if how == 'removed':
        target.unlink()
    else:
        target.write_bytes(b'')
    run_until(d, rec, 'complete')
    assert target.read_bytes() == DATA and not sidecar_of(target).exists()
    assert server.requests[1].headers['Range'] is None


@pytest.mark.parametrize('options, validator', [
    ({'etag': ETAG}, ETAG),
    ({'etag': 'W/"weak"', 'last_modified': 'Wed, 21 Oct 2015 07:28:00 GMT'},
     'Wed, 21 Oct 2015 07:28:00 GMT'),
    ({'etag': None, 'last_modified': 'Wed, 21 Oct 2015 07:28:00 GMT'},
     'Wed, 21 Oct 2015 07:28:00 GMT'),
    ({'etag': None}, None),
], ids=['strong-etag', 'weak-etag-uses-last-modified', 'last-modified', 'none'])
def test_new_downloader_resumes_with_the_sidecar_validator(server, tmp_path, options,
                                                            validator):
    url = server.add('/f', DATA, truncate_at=OFFSET, truncate_once=True, **options)
    target = tmp_path / 'f.bin'
    first, _ = download(url, target)
    assert first.state == 'error'
    d = bitpit.Downloader(url, path=target)
    assert (d.downloaded, d.size) == (OFFSET, len(DATA))
    d, _ = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == DATA
    resumed = server.requests[-1]
    assert resumed.headers['Range'] == 'bytes={}-'.format(OFFSET)
    assert resumed.headers['If-Range'] == validator
    assert not sidecar_of(target).exists()


RESUME_PROGRAM = '''
import sys, bitpit
d = bitpit.Downloader(sys.argv[1], path=sys.argv[2])
print(d.downloaded, d.size)
d.start()
d.join(20)
print(d.state)
'''


def test_new_process_resumes_with_if_range(server, tmp_path):
    url = server.add('/f', DATA, etag=ETAG, truncate_at=OFFSET, truncate_once=True)
    target = tmp_path / 'f.bin'
    assert download(url, target)[0].state == 'error'
    result = subprocess.run([sys.executable, '-c', RESUME_PROGRAM, url, str(target)],
                            env=dict(os.environ, PYTHONPATH=str(HERE)),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(OFFSET), str(len(DATA)), 'complete']
    assert server.requests[-1].headers['If-Range'] == ETAG
    assert target.read_bytes() == DATA and not sidecar_of(target).exists()


@pytest.mark.parametrize('sidecar', [None, 'other-url', 'garbage'])
def test_resume_without_usable_sidecar_uses_plain_range(server, tmp_path, sidecar):
    url = server.add('/f', DATA, etag=ETAG)
    target = partial_file(tmp_path)
    if sidecar == 'other-url':
        sidecar_of(target).write_text(json.dumps(
            {'url': server.url('/other'), 'validator': '"x"', 'size': 5}))
    elif sidecar == 'garbage':
        sidecar_of(target).write_bytes(b'\xff{not json')
    d = bitpit.Downloader(url, path=target)
    assert (d.downloaded, d.size) == (OFFSET, -1)
    d, _ = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == DATA
    (request,) = server.requests
    assert request.headers['Range'] == 'bytes={}-'.format(OFFSET)
    assert request.headers['If-Range'] is None
    assert not sidecar_of(target).exists()


def test_resume_of_complete_file_416_is_complete(server, tmp_path):
    """Also with a checksum, given in capitals, that the file matches."""
    server.add('/data.bin', DATA)
    target = tmp_path / 'data.bin'
    target.write_bytes(DATA)
    d, rec = download(server.url('/data.bin'), target,
                      checksum='SHA256:' + hashlib.sha256(DATA).hexdigest().upper())
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert d.size == len(DATA)
    assert 'download' not in [new for _, new in rec.states]


def test_the_sidecar_is_durable_and_never_claims_bytes_not_on_the_disk(
        server, tmp_path, monkeypatch):
    """After a power loss, a sidecar must not claim bytes that never reached
    the disk: each save syncs the file's data first, then the new sidecar,
    then replaces the old one and syncs the directory; and this happens at
    the sidecar's period (about once a second), not for every write."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(('fsync', os.path.basename(os.readlink('/proc/self/fd/{}'.format(fd)))))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(('replace', os.path.basename(str(dst))))
        real_replace(src, dst)
    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    url = server.add('/f', DATA, throttle=400000)
    target = tmp_path / 'f.bin'
    d, _ = download(url, target, connections=2)
    assert d.state == 'complete' and target.read_bytes() == DATA
    saves = [i for i, call in enumerate(calls) if call == ('replace', 'f.bin.bitpit')]
    assert 2 <= len(saves) <= 5, calls                    # about 2.6 s at a second's period
    for i in saves:
        # the new one, whole (a worker's save writes it under a name of its own)
        assert calls[i - 1] in {('fsync', 'f.bin.bitpit.tmp'), ('fsync', 'f.bin.bitpit.new')}, \
            calls
        assert calls[i + 1] == ('fsync', tmp_path.name), calls         # the rename, durable
    # every save after the first, which records nothing, syncs the data first
    for i in saves[1:]:
        assert calls[i - 2] == ('fsync', 'f.bin'), calls


def test_a_slow_sync_of_the_data_never_stops_the_download_thread_reading(
        server, tmp_path, monkeypatch):
    """The download thread moves the bytes of its first connection itself:
    a sidecar save, whose sync of the data takes long on a slow disk, runs
    on a worker meanwhile, and the bytes keep coming."""
    target = tmp_path / 'f.bin'
    during = []
    real_fsync = os.fsync

    def slow_fsync(fd):
        if os.path.samestat(os.fstat(fd), os.stat(target)):  # the data, not the sidecar
            before = d.downloaded
            time.sleep(0.25)
            during.append(d.downloaded - before)
        real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', slow_fsync)
    monkeypatch.setattr(bitpit, '_SIDECAR_PERIOD', 0.2)
    url = server.add('/f', DATA, throttle=1024 * 1024)
    d = bitpit.Downloader(url, path=target)
    rec = Recorder(d)
    d.start()
    rec.wait_state('complete', 'error', 'fatal-error', timeout=30)
    d.join(10)
    assert d.state == 'complete' and target.read_bytes() == DATA
    # (the last sync may come as the body ends)
    assert during and max(during) >= 64 * 1024, during  # of ~250 KiB


def test_the_sidecar_of_a_relative_path_is_made_durable_in_the_working_directory(
        tmp_path, monkeypatch):
    """The sidecar of ``f.bin`` is ``f.bin.bitpit`` in the working
    directory, and that directory is what is synced after the rename."""
    monkeypatch.chdir(tmp_path)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (
        synced.append(os.readlink('/proc/self/fd/{}'.format(fd))), real_fsync(fd)))
    store = bitpit._FileStore(pathlib.Path('f.bin'), 'http://h/f')
    store.load()
    store.open()
    try:
        assert store.record()
    finally:
        store.close()
    assert synced == [str(tmp_path / 'f.bin.bitpit.tmp'), str(tmp_path)]
    assert json.loads((tmp_path / 'f.bin.bitpit').read_text())['url'] == 'http://h/f'


def test_a_stop_during_a_sidecar_save_ends_as_soon_as_the_save_did(
        server, tmp_path, monkeypatch):
    """The run closes the file after a sidecar save handed to a worker, and
    the save wakes it when it is done: the run must take that wake-up as
    the save's end, even when the worker returns late (descheduled after
    it, under load), and not wait for its next look a period later."""
    monkeypatch.setattr(bitpit, '_SIDECAR_PERIOD', 0.05)
    saving, saved = threading.Event(), []
    real_save = bitpit._Transfer._save

    def save_during_the_stop(transfer):
        saving.set()
        # the download stops while its save runs
        transfer.cancel.pause(time.monotonic() + 5).event.wait(5)
        real_save(transfer)
        saved.append(time.monotonic())
        time.sleep(0.15)  # the worker returns late

    monkeypatch.setattr(bitpit._Transfer, '_save', save_during_the_stop)
    url = server.add('/f', DATA, throttle=256 * 1024)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin')
    d.start()
    assert saving.wait(5)
    d.stop()  # (it waits for the run's end)
    ended = time.monotonic()
    assert d.state == 'pause' and saved
    assert ended - saved[0] < 0.12, ended - saved[0]


def test_a_slow_sidecar_save_never_holds_up_the_other_downloads(
        server, tmp_path, monkeypatch):
    """A sidecar save on a worker syncs the new sidecar and its directory:
    long on a slow disk. Meanwhile the loop goes on writing that file's
    bytes, and every other download's: the save must not hold the file's
    lock through its syncs, or the loop waits for it at the file's next
    write, and every transfer with it."""
    monkeypatch.setattr(bitpit, '_SIDECAR_PERIOD', 0.05)
    during, measured = [], threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        path = os.readlink('/proc/self/fd/{}'.format(fd))
        if threading.current_thread().name == 'bitpit-save' and not during and \
                path.startswith(str(tmp_path / 'saved.bin.bitpit.')):  # the new sidecar
            before = other.downloaded
            time.sleep(0.2)
            during.append(other.downloaded - before)
            measured.set()
        real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', slow_fsync)
    saved = server.add('/saved', DATA, throttle=1024 * 1024)
    url = server.add('/other', DATA, throttle=512 * 1024)
    other = bitpit.Downloader(url, path=tmp_path / 'other.bin')
    d = bitpit.Downloader(saved, path=tmp_path / 'saved.bin')
    other.start()
    d.start()
    assert measured.wait(5)
    d.stop()
    other.stop()
    # ~100 KiB came at 512 KiB/s in the 0.2 s
    assert during[0] >= 32 * 1024, during


def test_a_save_never_brings_back_bytes_given_up_during_its_sync(tmp_path, monkeypatch):
    """A periodic save makes its record, then syncs the data without the
    lock; bytes given up meanwhile (a bad metalink piece, forgotten and
    saved at once) must not come back with the older record."""
    store = bitpit._FileStore(tmp_path / 'f.bin', 'http://127.0.0.1:1/f')
    store.load()
    store.set_size(1000)
    store.open()
    store.write(0, memoryview(b'x' * 100), store.epoch)      # incomplete: a sidecar first
    store.write(500, memoryview(b'y' * 100), store.epoch)
    real = os.fsync
    forgotten = []

    def sync_while_forgetting(fd):
        if not forgotten and os.readlink('/proc/self/fd/{}'.format(fd)).endswith('f.bin'):
            forgotten.append(1)
            store.forget(0, 100)  # as a connection thread would, meanwhile
        real(fd)
    monkeypatch.setattr(os, 'fsync', sync_while_forgetting)
    store.save()
    store.close()
    assert forgotten
    assert json.loads(sidecar_of(tmp_path / 'f.bin').read_text())['held'] == [[500, 600]]


def test_a_disk_that_cannot_sync_costs_the_sidecar_not_the_download(
        server, tmp_path, monkeypatch, caplog):
    """``fsync`` fails (EIO, or ENOSPC that NFS reports only then): the
    sidecar cannot be made durable, so there is none (said once on the
    logger), and the download goes on as one without a sidecar does: in
    order, to the end."""
    def failing(fd):
        raise OSError(errno.EIO, 'Input/output error')
    monkeypatch.setattr(bitpit, '_sync', failing)
    target = tmp_path / 'f.bin'
    target.write_bytes(DATA[:OFFSET])  # bytes held: the first save syncs them
    url = server.add('/f', DATA, throttle=4 * 1024 * 1024)
    d, _ = download(url, target, connections=4)
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert not sidecar_of(target).exists()
    assert [r.message for r in caplog.records if 'cannot write' in r.message]


def test_a_body_that_fits_in_the_buffer_is_written_once_without_a_sidecar(
        server, tmp_path, monkeypatch):
    """A small body that comes in pieces with pauses between them waits in
    the buffer (at most half a second) and is written in one go at its end:
    the file is never incomplete on disk, so no sidecar is written (and
    synced) for it."""
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, 'replace', lambda src, dst: (replaced.append(str(dst)),
                                                         real_replace(src, dst)))
    data = DATA[:40000]
    url = server.add('/f', data, throttle=400000, throttle_piece=8192)  # 5 pieces, 0.1 s
    target = tmp_path / 'f.bin'
    d, _ = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == data
    assert replaced == []


def test_a_body_that_fits_in_the_buffer_waits_there_no_longer_when_the_server_stalls(
        server, tmp_path):
    """The bytes of a body that fits in the buffer wait there at most half a
    second, also when the server stalls after them: a read that waits for
    more does not hold them in memory, where a killed process would lose
    them (found in review: they stayed there for as long as the stall)."""
    data = DATA[:200000]
    url = server.add('/f', data, stall_after=100000)
    target = tmp_path / 'f.bin'
    d = bitpit.Downloader(url, path=target, timeout=30, update_period=0.05)
    rec = Recorder(d)
    d.start()
    assert server.wait_stalled(1)
    rec.wait_for(lambda: d.downloaded >= 100000)
    # re-checked at each speed-changed (every 50 ms)
    rec.wait_for(lambda: target.exists() and target.stat().st_size >= 100000, timeout=1.5)
    d.stop()
    server.release()
    assert d.state == 'pause' and target.read_bytes() == data[:100000]
    assert json.loads(sidecar_of(target).read_text())['held'] == [[0, 100000]]


# ---------------------------------------------------------------------------
# partial answers: never append a whole body
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('held', [OFFSET, 2 * len(DATA)])
def test_200_to_a_range_request_restarts_from_zero(server, tmp_path, held):
    url = server.add('/f', DATA, ignore_range=True)
    target = tmp_path / 'f.bin'
    target.write_bytes(b'\xee' * held)
    sidecar_of(target).write_text(json.dumps({'url': url, 'validator': None, 'size': held}))
    d = bitpit.Downloader(url, path=target)
    assert d.size == held
    rec = Recorder(d)
    seen = []
    d.listen('size-changed', lambda d: seen.append((d.size, d.downloaded)))
    run_until(d, rec, 'complete', 'error', 'fatal-error')
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert server.requests[0].headers['Range'] == 'bytes={}-'.format(held)
    assert rec.sizes[-1] == len(DATA) and seen[-1][0] == len(DATA)
    assert (d.size, d.downloaded) == (len(DATA), len(DATA))


@pytest.mark.parametrize('shift', [4096, OFFSET])
def test_206_starting_earlier_overwrites_the_overlap(server, tmp_path, shift):
    url = server.add('/f', DATA, range_shift=shift)
    target = tmp_path / 'f.bin'
    target.write_bytes(DATA[:OFFSET - shift] + b'\0' * shift)   # the overlap is wrong
    d, _ = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert server.requests[0].headers['Range'] == 'bytes={}-'.format(OFFSET)


def test_206_starting_later_is_an_error_and_writes_nothing(server, tmp_path):
    url = server.add('/f', DATA, range_shift=-4096)
    target = partial_file(tmp_path)
    d, rec = download(url, target)
    assert d.state == 'error' and isinstance(d.last_exception, bitpit.ProtocolError)
    assert 'download' not in [new for _, new in rec.states]
    assert target.read_bytes() == DATA[:OFFSET]


def test_206_with_a_disagreeing_total_starts_over_in_the_same_attempt(server, tmp_path):
    """A total that disagrees with the one the partial file came with means
    another file: nothing of the answer is written, the file starts over
    from byte 0 with a request that is not a range request, and the one
    attempt ends complete (no error, no restart)."""
    url = server.add('/f', DATA, etag=ETAG, wrong_total=len(DATA) + 1000)
    target = partial_file(tmp_path, url, ETAG, len(DATA))
    d, rec = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']
    assert [r.headers['Range'] for r in server.requests] == ['bytes={}-'.format(OFFSET), None]


@pytest.mark.parametrize('with_sidecar', [False, True])
def test_200_with_the_exact_content_range_is_a_partial_answer(server, tmp_path,
                                                              with_sidecar):
    url = server.add('/f', DATA, etag=ETAG, status_200_with_range=True)
    target = partial_file(tmp_path, *((url, ETAG, len(DATA)) if with_sidecar else ()))
    d, _ = download(url, target)
    assert d.state == 'complete' and target.read_bytes() == DATA
    (request,) = server.requests
    assert request.headers['Range'] == 'bytes={}-'.format(OFFSET)


def test_never_asks_for_a_compressed_body(server, tmp_path):
    url = server.add('/f', DATA, truncate_at=OFFSET, truncate_once=True)
    d, rec = download(url, tmp_path / 'f.bin', restart_wait=0)
    rec.wait_state('complete')
    d.join(5)
    assert len(server.requests) == 2
    assert all(r.headers['Accept-Encoding'] == 'identity' for r in server.requests)


# ---------------------------------------------------------------------------
# content changed between attempts
# ---------------------------------------------------------------------------

NEW = random.Random(3).randbytes(len(DATA))


@pytest.mark.parametrize('new, options', [
    (NEW, {}), (NEW + b'more', {}), (NEW[:OFFSET // 3], {}),
    (NEW[:OFFSET // 3], {'etag': None}),
], ids=['same-size', 'longer', 'shorter', 'shorter-no-validator'])
def test_content_changed_between_attempts_gives_only_the_new_content(server, tmp_path,
                                                                    new, options):
    url = server.add('/f', DATA, truncate_at=OFFSET, truncate_once=True, **options)
    target = tmp_path / 'f.bin'
    d, rec = download(url, target)
    assert d.state == 'error' and target.stat().st_size == OFFSET
    server.add('/f', new, **options)
    d.restart_wait = 0.01
    run_until(d, rec, 'complete')
    assert target.read_bytes() == new
    assert d.size == d.downloaded == len(new) == rec.sizes[-1]
    assert not sidecar_of(target).exists()


@pytest.mark.parametrize('old, new', [
    ({}, {}),
    ({'etag': None, 'last_modified': 'Wed, 21 Oct 2015 07:28:00 GMT'},
     {'etag': None, 'last_modified': 'Thu, 22 Oct 2015 07:28:00 GMT'}),
], ids=['etag', 'last-modified'])
def test_content_changed_on_a_server_that_ignores_if_range(server, tmp_path, old, new):
    """The partial answer carries the new validator: it is not appended."""
    url = server.add('/f', DATA, truncate_at=OFFSET, truncate_once=True,
                     ignore_if_range=True, **old)
    target = tmp_path / 'f.bin'
    d, rec = download(url, target)
    assert d.state == 'error'
    server.add('/f', NEW, ignore_if_range=True, **new)
    d.restart_wait = 0.01
    run_until(d, rec, 'complete')
    assert target.read_bytes() == NEW
    assert [r.headers['Range'] for r in server.requests] == [None, 'bytes=300000-', None]


# ---------------------------------------------------------------------------
# short bodies, chunked bodies
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('chunked', [False, True])
def test_short_body_is_an_error_never_complete(server, tmp_path, chunked):
    url = server.add('/f', DATA, truncate_at=OFFSET, chunked=chunked)
    d, rec = download(url, tmp_path / 'f.bin')
    assert d.state == 'error' and 'complete' not in [new for _, new in rec.states]
    assert isinstance(d.last_exception, bitpit.ProtocolError)
    assert d.downloaded == OFFSET == (tmp_path / 'f.bin').stat().st_size


def test_short_bodies_are_retried_until_complete(server, tmp_path):
    """Also with retries=1: retries count only attempts that made no progress."""
    url = server.add('/f', DATA, truncate_at=OFFSET)     # every answer is cut
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', restart_wait=0.01, retries=1)
    rec = Recorder(d)
    run_until(d, rec, 'complete', 'fatal-error')
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA
    assert [r.headers['Range'] for r in server.requests] == [
        None, 'bytes=300000-', 'bytes=600000-', 'bytes=900000-']
    assert [new for _, new in rec.states].count('error') == 3


def test_chunked_body_without_length_completes_with_size_at_the_end(server, tmp_path):
    url = server.add('/f', DATA, chunked=True)
    target = tmp_path / 'f.bin'
    d = bitpit.Downloader(url, path=target)
    rec = Recorder(d)
    size_in_download = []
    d.listen('state-changed', lambda d, old: d.state == 'download'
             and size_in_download.append(d.size))
    run_until(d, rec, 'complete', 'error', 'fatal-error')
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert size_in_download == [-1] and rec.sizes == [len(DATA)]
    assert (d.size, d.ratio, d.remaining) == (len(DATA), 1.0, 0)


@pytest.mark.parametrize('server_kind', ['honours-if-range', 'ignores-if-range'])
def test_a_changed_file_starts_over_in_the_same_attempt(server, tmp_path, server_kind):
    """The resume finds a new version (a 200 for a failed If-Range, or a
    206 with a new ETag from a server that ignores If-Range): the file is
    emptied and the new version downloaded in the same attempt, which ends
    complete even without restarts, and the change is not a failure. The
    size the partial file had is dropped (-1: unknown) as it starts over,
    then the new version's is said."""
    url = server.add('/f', NEW, ignore_if_range=server_kind == 'ignores-if-range')
    target = partial_file(tmp_path, url, ETAG, len(DATA))
    d, rec = download(url, target, restart_wait=-1, retries=0)
    assert d.state == 'complete' and target.read_bytes() == NEW
    assert rec.sizes == [-1, len(NEW)]
    assert [new for _, new in rec.states] == ['start', 'download', 'complete']
    assert d.last_exception is None
    assert server.requests[0].headers['If-Range'] == ETAG
    assert not sidecar_of(target).exists()
