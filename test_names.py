"""Where a download is written: the default path, names taken from the URL
or from Content-Disposition (sanitised, never outside the directory), and
local failures (unwritable paths, a full disk) that are fatal file errors."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

import bitpit
from conftest import DATA, ETAG, HERE, OFFSET, Recorder, download, partial_file, run_until


# ---------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------

def test_dir_path_and_default_path(tmp_path, monkeypatch):
    d = bitpit.Downloader('http://h/a/b/r%C3%A9sum%C3%A9.pdf?x=1', path=tmp_path, dir_path=True)
    assert d.path == tmp_path / 'résumé.pdf'
    monkeypatch.chdir(tmp_path)
    assert bitpit.Downloader('http://h/dir/').path == tmp_path / 'index.html'
    assert bitpit.Downloader('http://h/x.bin').path == tmp_path / 'x.bin'


@pytest.mark.parametrize('directory', ['.', '', '/', 'a/b/', '../up', '//two', 'a//b/./c'])
def test_a_path_in_a_directory_is_the_directory_joined_with_the_name(directory):
    """However the directory is written, ``path`` is what pathlib's ``/``
    makes of it and the name, the same object at each read, and so is the
    text of the file the store writes (the path is made only when read)."""
    for given in (directory, pathlib.Path(directory)):
        d = bitpit.Downloader('http://h/x/f.bin', path=given, dir_path=True)
        store = d._local_store()
        expected = pathlib.Path(directory) / 'f.bin'
        assert store.os_path == str(expected) and store.sidecar == str(expected) + '.bitpit'
        assert d.path == expected and str(d.path) == str(expected)
        assert type(d.path) is type(expected) and d.path is d.path
        d.url = 'http://h/x/g.bin'  # (a new URL, a new name in the same directory)
        assert d._local_store().os_path == str(pathlib.Path(directory) / 'g.bin')
        assert d.path == pathlib.Path(directory) / 'g.bin'


def test_a_home_path_is_the_home_of_the_moment(tmp_path, monkeypatch):
    """``~`` is the home directory when the downloader is made, for the same
    text given again too (as a manager gives its directory to each), and
    in a ``Path`` given as it is (a manager's directory, a file's path)."""
    for home in ('a', 'b'):
        monkeypatch.setenv('HOME', str(tmp_path / home))
        d = bitpit.Downloader('http://h/x.bin', path='~/d', dir_path=True)
        assert d.path == tmp_path / home / 'd' / 'x.bin'
        d = bitpit.Downloader('http://h/x.bin', path=pathlib.Path('~/p'), dir_path=True)
        assert d.path == tmp_path / home / 'p' / 'x.bin'
        d = bitpit.Downloader('http://h/x.bin', path=pathlib.Path('~/f.bin'))
        assert d.path == tmp_path / home / 'f.bin'
        m = bitpit.Manager(path=pathlib.Path('~/m'), dir_path=True)
        assert m.add('http://h/y.bin').path == tmp_path / home / 'm' / 'y.bin'


@pytest.mark.parametrize('segment', ['..', '.', '%2e%2e', '..%2f..%2fetc%2fpasswd',
                                     'a%5c..%5cb', '%00evil', 'x%0d%0ay', '...'])
def test_name_from_url_never_escapes(tmp_path, segment):
    d = bitpit.Downloader('http://h/base/' + segment, path=tmp_path, dir_path=True)
    assert d.path.parent == tmp_path
    assert d.path.name not in ('', '.', '..')
    assert '/' not in d.path.name and '\\' not in d.path.name and '\x00' not in d.path.name


@pytest.mark.parametrize('segment, name', [
    ('..%2F..%2Fevil.txt', '.._.._evil.txt'), ('%2e%2e', 'index.html'),
    ('a%5C..%5Cb', 'a_.._b'), ('x%00y', 'x_y'), ('%0D%0Aset', '__set'),
    ('...', 'index.html'), ('', 'index.html'), ('ok.bin', 'ok.bin'),
])
def test_names_from_the_url_stay_in_the_directory(server, tmp_path, segment, name):
    url = server.add('/dir/' + segment, DATA)
    out = tmp_path / 'out'
    out.mkdir()
    d = bitpit.Downloader(url, path=out, dir_path=True)
    assert d.path == out / name
    d, _ = download(url, out, dir_path=True)
    assert d.state == 'complete'
    assert [p.name for p in tmp_path.iterdir()] == ['out']
    assert [p.name for p in out.iterdir()] == [name]
    assert (out / name).read_bytes() == DATA


@pytest.mark.parametrize('given, name', [
    ('a<b>c:d"e|f?g*h.txt', 'a_b_c_d_e_f_g_h.txt'),      # reserved on Windows
    ('tab\there\x1bnow', 'tab_here_now'),                   # control characters
    ('CON', '_CON'), ('con.txt', '_con.txt'), ('Nul.tar.gz', '_Nul.tar.gz'),
    ('prn', '_prn'), ('AUX.log', '_AUX.log'), ('com1', '_com1'), ('LPT9.x', '_LPT9.x'),
    ('com\u00b9', '_com\u00b9'), ('CONSOLE', 'CONSOLE'), ('com10', 'com10'),
    ('xcon', 'xcon'),
    ('report. . .', 'report'), ('trailing dots...', 'trailing dots'),
    ('C:evil', 'C_evil'), ('c:\\windows\\x.exe', 'c__windows_x.exe'),
    # 233 bytes of UTF-8: 255 with the longest suffix bitpit adds
    ('\u00e9' * 200 + '.tar.gz', '\u00e9' * 113 + '.tar.gz'),
    ('x' * 300 + '.iso', 'x' * 229 + '.iso'),
    # 4 bytes a character: 232 bytes fit, 236 do not
    ('\U0001f600' * 58, '\U0001f600' * 58), ('\U0001f600' * 59, '\U0001f600' * 58),
    ('\U0001f600' * 59 + '.txt', '\U0001f600' * 57 + '.txt'),
])
def test_names_are_safe_on_every_system(given, name):
    safe = bitpit._safe_filename(given)
    assert safe == name
    assert len((safe + '.bitpit-new.bitpit.tmp').encode('utf-8')) <= 255


@pytest.mark.parametrize('segment, name', [
    ('CON', '_CON'), ('aux.txt', '_aux.txt'), ('a%3Cb%3E.txt', 'a_b_.txt'),
    ('C%3Aevil', 'C_evil'), ('name.%20.', 'name'),
])
def test_names_from_urls_and_content_disposition_are_safe(server, tmp_path, segment, name):
    d = bitpit.Downloader('http://h/x/' + segment, path=tmp_path, dir_path=True)
    assert d.path == tmp_path / name
    url = server.add('/get', DATA, headers={
        'Content-Disposition': "attachment; filename*=UTF-8''" + segment})
    d, _ = download(url, tmp_path, dir_path=True, content_disposition=True)
    assert d.state == 'complete' and d.path == tmp_path / name
    assert (tmp_path / name).read_bytes() == DATA


@pytest.mark.parametrize('header, name', [
    ('attachment; filename="report.pdf"', 'report.pdf'),
    ('attachment; filename=plain.txt', 'plain.txt'),
    ("attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf", 'résumé.pdf'),
    ('attachment; filename="fallback.txt"; filename*=UTF-8\'\'%E2%82%AC%20rates.txt',
     '€ rates.txt'),
    ('attachment; filename="../../etc/passwd"', 'passwd'),
    ("attachment; filename*=UTF-8''..%2F..%2Fevil", 'evil'),
    ('attachment; filename="..\\\\..\\\\win.ini"', 'win.ini'),
    ("attachment; filename*=UTF-8''a%00b%0Ac", 'a_b_c'),
    ('attachment; filename=".."', 'index.html'),
    ('attachment; filename=""', None),
    ('attachment', None),
    ("attachment; filename*=UTF-8''%FF%FE", None),
])
def test_content_disposition_names_are_sanitised(server, tmp_path, header, name):
    url = server.add('/get/f.bin', DATA, headers={'Content-Disposition': header})
    out = tmp_path / 'out'
    out.mkdir()
    d = bitpit.Downloader(url, path=out, dir_path=True, content_disposition=True)
    changes = []
    d.listen('path-changed', lambda d: changes.append(d.path))
    rec = Recorder(d)
    run_until(d, rec, 'complete', 'error', 'fatal-error')
    assert d.state == 'complete'
    expected = out / (name or 'f.bin')
    assert d.path == expected and expected.read_bytes() == DATA
    assert changes == ([expected] if name else [])
    assert [p.name for p in tmp_path.iterdir()] == ['out']
    assert [p.name for p in out.iterdir()] == [expected.name]


@pytest.mark.parametrize('kwargs', [{'dir_path': True}, {'content_disposition': True}])
def test_content_disposition_only_when_asked_and_for_directories(server, tmp_path, kwargs):
    url = server.add('/f.bin', DATA, headers={'Content-Disposition': 'attachment; filename=x'})
    path = tmp_path if kwargs.get('dir_path') else tmp_path / 'mine.bin'
    d, _ = download(url, path, **kwargs)
    assert d.state == 'complete'
    assert [p.name for p in tmp_path.iterdir()] == [
        'f.bin' if kwargs.get('dir_path') else 'mine.bin']


# ---------------------------------------------------------------------------
# local failures
# ---------------------------------------------------------------------------

def unwritable_path(kind, tmp_path):
    if kind == 'directory':
        (tmp_path / 'adir').mkdir()
        return tmp_path / 'adir'
    if kind == 'under-a-file':
        (tmp_path / 'file.txt').write_bytes(b'x')
        return tmp_path / 'file.txt' / 'sub'
    if kind == 'missing-parent':
        return tmp_path / 'no' / 'such' / 'f.bin'
    if kind == 'read-only':
        path = pathlib.Path('/sys/bitpit-test-{}'.format(os.getpid()))
        try:
            open(path, 'wb').close()
        except OSError:
            return path
        path.unlink()
        pytest.skip('no read-only location here')
    if not os.path.exists('/dev/full'):
        pytest.skip('no /dev/full here')
    return pathlib.Path('/dev/full')


@pytest.mark.parametrize('kind', ['directory', 'under-a-file', 'missing-parent', 'read-only',
                                  'full-disk'])
def test_local_failures_are_fatal_file_errors(server, tmp_path, kind):
    url = server.add('/f', DATA)
    path = unwritable_path(kind, tmp_path)
    d, _ = download(url, path, restart_wait=0)
    assert d.state == 'fatal-error' and not d.is_restarting
    assert isinstance(d.last_exception, bitpit.FileError)
    assert isinstance(d.last_exception.__cause__, OSError)
    assert str(path) in str(d.last_exception)


DISK_FULL_PROGRAM = '''
import json, resource, signal, sys, bitpit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), int(sys.argv[3])))
d = bitpit.Downloader(sys.argv[1], path=sys.argv[2], restart_wait=0)
d.start()
d.join(20)
e = d.last_exception
print(json.dumps([d.state, type(e).__name__, type(e.__cause__).__name__,
                  d.is_restarting, str(e), d.downloaded]))
'''


@pytest.mark.skipif(sys.platform == 'win32', reason='needs RLIMIT_FSIZE')
def test_disk_too_small_fails_at_once_and_keeps_the_bytes_on_disk(server, tmp_path):
    """A file whose size is known gets its space reserved before the body:
    a file-size limit (as a full disk) fails the download at once, naming
    the path and the space missing, and leaves the partial file as it was."""
    url = server.add('/f', DATA, etag=ETAG)
    target = partial_file(tmp_path, url, ETAG, len(DATA))
    limit = 2 * OFFSET + 1234
    result = subprocess.run([sys.executable, '-c', DISK_FULL_PROGRAM, url, str(target),
                             str(limit)], env=dict(os.environ, PYTHONPATH=str(HERE)),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    state, error, cause, restarting, message, downloaded = json.loads(result.stdout)
    assert (state, error, restarting) == ('fatal-error', 'FileError', False)
    assert cause == 'OSError'
    assert str(target) in message and str(len(DATA) - OFFSET) in message
    assert downloaded == OFFSET
    assert target.read_bytes() == DATA[:OFFSET]
    assert server.requests[0].headers['If-Range'] == ETAG


@pytest.mark.skipif(not hasattr(os, 'posix_fallocate'), reason='no reservation here')
def test_a_small_file_on_a_disk_too_small_fails_before_its_body(server, tmp_path,
                                                                 monkeypatch):
    """A body of one read gets no sidecar, so no reserved space either: the
    disk's free space is checked instead, before the body, and the error
    says how much is missing. The disk here reports 100000 bytes free."""
    size = 200000
    url = server.add('/f', DATA[:size], throttle=100000)
    real = os.statvfs

    def nearly_full(path):
        status = real(path)
        return os.statvfs_result((status.f_bsize, 1000, status.f_blocks, 100, 100,
                                  *status[5:]))
    monkeypatch.setattr(os, 'statvfs', nearly_full)
    d, _ = download(url, tmp_path / 'f.bin', restart_wait=0)
    assert d.state == 'fatal-error' and isinstance(d.last_exception, bitpit.FileError)
    message = str(d.last_exception)
    assert str(tmp_path / 'f.bin') in message
    assert '100000 bytes are missing on the disk ({} needed, 100000 free)'.format(size) \
        in message
    assert (tmp_path / 'f.bin').stat().st_size == 0 and server.bytes_sent('/f') < size


@pytest.mark.skipif(not hasattr(os, 'posix_fallocate'), reason='no reservation here')
def test_a_disk_that_tells_no_size_is_not_taken_for_a_full_one(server, tmp_path, monkeypatch):
    """Some FUSE file systems report 0 blocks in all: the room is unknown,
    and the download goes ahead."""
    real = os.statvfs
    monkeypatch.setattr(os, 'statvfs', lambda path: os.statvfs_result(
        (real(path).f_bsize, 0, 0, 0, 0, 0, 0, 0, 0, 255)))
    d, _ = download(server.add('/f', DATA[:1000]), tmp_path / 'f.bin')
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA[:1000]


@pytest.mark.skipif(sys.platform == 'win32', reason='needs RLIMIT_FSIZE')
def test_disk_full_mid_download_keeps_the_bytes_on_disk(server, tmp_path):
    """With no size to reserve (a chunked body), RLIMIT_FSIZE makes writes
    past the limit fail as a full disk does: first a short write, then an
    error. Every byte that fit stays on disk."""
    url = server.add('/f', DATA, chunked=True)
    target = tmp_path / 'f.bin'
    limit = 2 * OFFSET + 1234
    result = subprocess.run([sys.executable, '-c', DISK_FULL_PROGRAM, url, str(target),
                             str(limit)], env=dict(os.environ, PYTHONPATH=str(HERE)),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    state, error, cause, restarting, _, downloaded = json.loads(result.stdout)
    assert (state, error, restarting) == ('fatal-error', 'FileError', False)
    assert cause == 'OSError'
    assert target.read_bytes() == DATA[:limit]
