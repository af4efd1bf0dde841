"""``Manager(manifest=PATH)`` and the command's ``--manifest FILE``: the JSON
Lines record of every download that ended, the rerun that requests only
what is not recorded complete, a manifest that is not one, and runs killed
with SIGKILL again and again."""
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import bitpit
from conftest import DATA, HERE, OFFSET

BITPIT = str(HERE / 'bitpit.py')
FIELDS = ['url', 'path', 'size', 'sha256', 'state', 'error', 'seconds']


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def records(manifest):
    """The manifest's lines, each parsed (every line must be whole)."""
    text = manifest.read_text(encoding='utf-8')
    assert text == '' or text.endswith('\n')
    return [json.loads(line) for line in text.splitlines()]


def run_manager(urls, directory, manifest, **kwargs):
    """Add ``urls`` to a Manager with ``manifest``, saving into ``directory``,
    run them to their ends; the downloads."""
    directory.mkdir(exist_ok=True)
    m = bitpit.Manager(manifest=manifest, path=directory, dir_path=True, **kwargs)
    for url in urls:
        m.add(url)
    m.start()
    for d in m.downloads:
        d.wait(20)
    m.stop()
    for d in m.downloads:
        d.join(5)
    return m.downloads


def test_each_download_that_ended_is_one_line(server, tmp_path):
    other = os.urandom(5000)
    ok = [server.add('/a.bin', DATA), server.add('/b.bin', other)]
    missing = server.url('/missing.bin')
    manifest = tmp_path / 'manifest.jsonl'
    before = time.monotonic()
    run_manager(ok + [missing], tmp_path / 'out', manifest)
    took = time.monotonic() - before
    lines = {record['url']: record for record in records(manifest)}
    assert len(lines) == 3 and len(records(manifest)) == 3
    for record in lines.values():
        assert list(record) == FIELDS
        assert 0 <= record['seconds'] <= took
    for url, data in zip(ok, (DATA, other)):
        path = tmp_path / 'out' / url.rsplit('/', 1)[1]
        assert lines[url] == dict(lines[url], path=str(path), size=len(data),
                                  sha256=sha256(data), state='complete', error=None)
    assert lines[missing]['state'] == 'fatal-error'
    assert lines[missing]['sha256'] is None and lines[missing]['size'] is None
    assert '404' in lines[missing]['error']
    assert lines[missing]['path'] == str(tmp_path / 'out' / 'missing.bin')


def test_the_digest_is_computed_as_the_bytes_pass(server, tmp_path, monkeypatch):
    """No byte that came through bitpit is read back; of a resumed file,
    the part that was on disk is read once."""
    read = []
    original = bitpit._FileStore._hash_from_disk

    def counting(store, end, *args, **kwargs):
        start = store._hashed_to
        original(store, end, *args, **kwargs)
        read.append(store._hashed_to - start)

    monkeypatch.setattr(bitpit._FileStore, '_hash_from_disk', counting)
    fresh, resumed = server.add('/fresh.bin', DATA), server.add('/resumed.bin', DATA)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'resumed.bin').write_bytes(DATA[:OFFSET])
    run_manager([fresh], out, tmp_path / 'm.jsonl')
    assert sum(read) == 0
    run_manager([resumed], out, tmp_path / 'm.jsonl')
    assert sum(read) == OFFSET
    assert server.requests_for('/resumed.bin')[0].headers['Range'] == 'bytes={}-'.format(OFFSET)
    assert [r['sha256'] for r in records(tmp_path / 'm.jsonl')] == [sha256(DATA)] * 2


def test_the_digest_of_files_that_did_not_pass_through(server, tmp_path):
    """A file in parts over 4 connections, a whole file that a resume finds
    complete (416), a file taken as it is (if_exists='skip'), a checksum of
    another algorithm: each line holds the file's SHA-256."""
    big = bytes(range(256)) * (12 * 1024) + b'end'  # 3 MiB: shared out
    urls = [server.add('/parts.bin', big, throttle=8 * 1024 * 1024),
            server.add('/whole.bin', DATA),
            server.add('/skipped.bin', DATA), server.add('/md5.bin', DATA)]
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'whole.bin').write_bytes(DATA)
    (out / 'skipped.bin').write_bytes(DATA[:OFFSET])
    manifest = tmp_path / 'm.jsonl'
    m = bitpit.Manager(manifest=manifest)
    m.add(bitpit.Downloader(urls[0], out, dir_path=True, connections=4))
    m.add(bitpit.Downloader(urls[1], out, dir_path=True))
    m.add(bitpit.Downloader(urls[2], out, dir_path=True, if_exists='skip'))
    m.add(bitpit.Downloader(urls[3], out, dir_path=True,
                            checksum='md5:' + hashlib.md5(DATA).hexdigest()))
    m.start()
    assert all(d.wait(20) for d in m.downloads)
    m.stop()
    assert len({r.headers['Range'] for r in server.requests_for('/parts.bin')}) > 1
    assert not server.requests_for('/skipped.bin')
    digests = {r['url']: r['sha256'] for r in records(manifest)}
    assert digests == {urls[0]: sha256(big), urls[1]: sha256(DATA),
                       urls[2]: sha256(DATA[:OFFSET]), urls[3]: sha256(DATA)}


def test_a_rerun_requests_only_what_is_not_recorded_complete(server, tmp_path):
    files = {name: os.urandom(3000) for name in ('kept', 'deleted', 'changed', 'failed')}
    urls = {name: server.add('/' + name, data) for name, data in files.items()}
    server.add('/failed', files['failed'], status=404, status_times=1)
    out, manifest = tmp_path / 'out', tmp_path / 'm.jsonl'
    run_manager(urls.values(), out, manifest)
    assert [r['state'] for r in records(manifest)].count('complete') == 3
    (out / 'deleted').unlink()
    with open(out / 'changed', 'ab') as file:
        file.write(b'!')
    before = len(server.requests)
    out.mkdir(exist_ok=True)
    m = bitpit.Manager(manifest=manifest, path=out, dir_path=True)
    kept = m.add(urls['kept'])
    assert kept.state == 'complete' and kept.size == kept.downloaded == 3000
    assert kept.wait(0)  # complete at once, before any start
    for name in ('deleted', 'changed', 'failed'):
        assert m.add(urls[name]).state == 'pause'
    m.start()
    assert all(d.wait(20) for d in m.downloads)
    m.stop()
    asked = sorted(r.path for r in server.requests[before:])
    assert asked == ['/changed', '/changed', '/deleted', '/failed']  # 416, then anew
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    lines = records(manifest)
    assert [r['url'] for r in lines[4:]].count(urls['kept']) == 0
    assert sorted(r['url'] for r in lines[4:]) == sorted(
        urls[name] for name in ('deleted', 'changed', 'failed'))
    assert all(r['state'] == 'complete' for r in lines[4:])


def test_a_file_recorded_under_another_path_is_requested(server, tmp_path):
    url = server.add('/f.bin', b'x' * 100)
    manifest = tmp_path / 'm.jsonl'
    run_manager([url], tmp_path / 'one', manifest)
    run_manager([url], tmp_path / 'two', manifest)
    assert len(server.requests) == 2
    assert (tmp_path / 'two' / 'f.bin').read_bytes() == b'x' * 100


def test_if_exists_update_still_asks_the_server(server, tmp_path):
    """A download that asks for a conditional request (-N) makes it, even
    for a file recorded complete."""
    url = server.add('/f.bin', b'x' * 100, last_modified='Wed, 21 Oct 2015 07:28:00 GMT')
    run_manager([url], tmp_path / 'out', tmp_path / 'm.jsonl')
    run_manager([url], tmp_path / 'out', tmp_path / 'm.jsonl', if_exists='update')
    first, second = server.requests
    assert first.headers['If-None-Match'] is None
    assert second.headers['If-None-Match'] or second.headers['If-Modified-Since']
    assert [r['state'] for r in records(tmp_path / 'm.jsonl')] == ['complete'] * 2


def test_a_line_the_disk_cannot_take_is_taken_back(tmp_path, monkeypatch):
    manifest = bitpit._Manifest(tmp_path / 'm.jsonl')
    write = os.write

    def filling_up(fd, data):
        write(fd, bytes(data[:10]))
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(os, 'write', filling_up)
    manifest._append(b'{"url": "http://h/f"}\n')
    monkeypatch.undo()
    assert (tmp_path / 'm.jsonl').read_bytes() == b''


def test_a_torn_last_line_is_ignored_and_cut_off(server, tmp_path):
    url = server.add('/f.bin', b'y' * 100)
    run_manager([url], tmp_path / 'out', tmp_path / 'm.jsonl')
    whole = (tmp_path / 'm.jsonl').read_bytes()
    torn = json.dumps({'url': server.url('/g.bin'), 'path': '/x', 'size': 3}).encode()[:40]
    for tail in (torn, b'{"u'):
        (tmp_path / 'm.jsonl').write_bytes(whole + tail)
        run_manager([url, server.add('/g.bin', b'z')], tmp_path / 'out', tmp_path / 'm.jsonl')
        lines = records(tmp_path / 'm.jsonl')
        assert [r['url'] for r in lines] == [url, server.url('/g.bin')]
        (tmp_path / 'out' / 'g.bin').unlink()
    assert len(server.requests_for('/f.bin')) == 1


def test_a_whole_last_line_without_its_line_feed_is_kept(server, tmp_path):
    url = server.add('/f.bin', b'y' * 100)
    run_manager([url], tmp_path / 'out', tmp_path / 'm.jsonl')
    (tmp_path / 'm.jsonl').write_bytes((tmp_path / 'm.jsonl').read_bytes().rstrip(b'\n'))
    run_manager([url, server.add('/g.bin', b'z')], tmp_path / 'out', tmp_path / 'm.jsonl')
    assert [r['url'] for r in records(tmp_path / 'm.jsonl')] == [url, server.url('/g.bin')]
    assert len(server.requests_for('/f.bin')) == 1


RECORD = {'url': 'http://h/f', 'path': '/f', 'size': 1, 'sha256': None, 'state': 'complete',
          'error': None, 'seconds': 0.5}
NOT_MANIFESTS = [
    b'hello\n', b'hello', b'\xff\xfe{}\n', b'[1, 2]\n', b'{"url": "http://h/f"}\n',
    b'[' * 100000 + b'\n',
    json.dumps(RECORD).encode() + b'\n# a comment\n',
    json.dumps(dict(RECORD, state='pause')).encode() + b'\n',
    json.dumps(dict(RECORD, sha256='abc')).encode() + b'\n',
    json.dumps(dict(RECORD, size=True)).encode() + b'\n',
    json.dumps(dict(RECORD, seconds='1')).encode() + b'\n',
    json.dumps({k: v for k, v in RECORD.items() if k != 'error'}).encode(),
]


@pytest.mark.parametrize('content', NOT_MANIFESTS)
def test_a_file_that_is_not_a_manifest_is_an_error_and_left_alone(tmp_path, content):
    manifest = tmp_path / 'notes.txt'
    manifest.write_bytes(content)
    with pytest.raises(ValueError, match='not a bitpit manifest'):
        bitpit.Manager(manifest=manifest)
    assert manifest.read_bytes() == content


def test_the_command_refuses_a_file_that_is_not_a_manifest(server, tmp_path, capsys):
    url = server.add('/f.bin', b'x')
    (tmp_path / 'notes.txt').write_bytes(b'my notes\n')
    assert bitpit._cli(['-q', '-d', str(tmp_path), '--manifest', str(tmp_path / 'notes.txt'),
                        url]) == 2
    assert 'not a bitpit manifest' in capsys.readouterr().err
    assert (tmp_path / 'notes.txt').read_bytes() == b'my notes\n'
    assert bitpit._cli(['-q', '-d', str(tmp_path), '--manifest', str(tmp_path), url]) == 2
    assert 'cannot open the manifest' in capsys.readouterr().err
    assert not server.requests and not (tmp_path / 'f.bin').exists()


def test_manifest_argument_errors(tmp_path):
    with pytest.raises(TypeError):
        bitpit.Manager(manifest=3)
    with pytest.raises(bitpit.FileError):
        bitpit.Manager(manifest=tmp_path)  # a directory
    assert bitpit.Manager().manifest is None
    assert bitpit.Manager(manifest=tmp_path / 'm.jsonl').manifest == tmp_path / 'm.jsonl'


def test_synced_at_most_once_a_second_and_at_the_end(server, tmp_path, monkeypatch):
    synced, appended, at_end = [], [], threading.local()
    fsync, sync, append = os.fsync, bitpit._Manifest.sync, bitpit._Manifest._append
    monkeypatch.setattr(os, 'fsync', lambda fd: (
        fsync(fd), synced.append((time.monotonic(), getattr(at_end, 'now', False)))))

    def end_sync(manifest):
        at_end.now = True
        try:
            sync(manifest)
        finally:
            at_end.now = False
    monkeypatch.setattr(bitpit._Manifest, 'sync', end_sync)
    # when each line began to be written (a sync may follow it at once)
    monkeypatch.setattr(bitpit._Manifest, '_append', lambda manifest, line: (
        appended.append(time.monotonic()), append(manifest, line)))
    m = bitpit.Manager(max_running=10, manifest=tmp_path / 'm.jsonl')
    for n in range(30):
        url = server.add('/{}.bin'.format(n), b'x' * 2000, throttle=20000 if n < 20 else None)
        m.add(bitpit.Downloader(url, tmp_path, dir_path=True))
    m.start()
    assert all(d.wait(20) for d in m.downloads)
    m.stop()
    assert len(records(tmp_path / 'm.jsonl')) == 30 == len(appended)
    # a sync at the end of a run (the manager thread's, a stop's) may come
    # any time after the one before; those as lines are written, a second apart
    during = [when for when, end in synced if not end]
    assert all(b - a >= 1.0 for a, b in zip(during, during[1:]))
    assert synced and synced[-1][0] >= max(appended)


def test_the_command_records_and_skips(server, tmp_path):
    urls = [server.add('/{}.bin'.format(n), os.urandom(1000)) for n in range(5)]
    args = ['-q', '-d', str(tmp_path / 'out'), '--manifest', str(tmp_path / 'm.jsonl')] + urls
    assert bitpit._cli(args) == 0
    assert len(server.requests) == 5
    assert bitpit._cli(args) == 0
    assert len(server.requests) == 5
    assert sorted(r['url'] for r in records(tmp_path / 'm.jsonl')) == sorted(urls)


# ---------------------------------------------------------------------------
# kill -9, again and again
# ---------------------------------------------------------------------------

def test_runs_killed_at_random_moments_end_with_each_file_recorded_once(server, tmp_path):
    """The command, killed with SIGKILL at random moments six times and
    started again each time, then run to its end: every file is whole and
    recorded complete exactly once, and every line of the manifest is
    whole."""
    rng = random.Random(26)
    files = {'/{}.bin'.format(n): rng.randbytes(16 * 1024) for n in range(80)}
    for path, data in files.items():
        server.add(path, data, throttle=64 * 1024)  # a quarter of a second each
    listing = tmp_path / 'urls.txt'
    listing.write_text(''.join(server.url(path) + '\n' for path in files))
    out, manifest = tmp_path / 'out', tmp_path / 'm.jsonl'
    command = [sys.executable, BITPIT, '-q', '-m', '6', '--retries', '0', '-d', str(out),
               '--manifest', str(manifest), '-i', str(listing)]
    env = dict(os.environ, PYTHONPATH=str(HERE))
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.2, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        output = proc.communicate(timeout=20)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            if kills == 6:
                break
        else:
            assert proc.returncode == 0, output
    assert kills == 6
    final = subprocess.run(command, env=env, capture_output=True, timeout=60)
    assert final.returncode == 0, final.stderr
    for path, data in files.items():
        assert (out / path.lstrip('/')).read_bytes() == data, path
    lines = records(manifest)
    assert sorted(r['url'] for r in lines) == sorted(server.url(path) for path in files)
    for record in lines:
        data = files['/' + os.path.basename(record['path'])]
        assert record['state'] == 'complete' and record['sha256'] == sha256(data)
