"""What a start does with a file that already exists (if_exists: resume,
skip, update, rename, overwrite) and what a completed file keeps from the
server: its Last-Modified as the modification time, its ETag (in an
extended attribute, where the file system has them) for later updates."""
import email.utils
import io
import os
import threading

import pytest

import bitpit
from conftest import DATA, ETAG, OFFSET, Recorder, download, partial_file, sidecar_of

OLD = b'old version\n' * 1000
DATE = 'Wed, 21 Oct 2015 07:28:00 GMT'
NEWER_DATE = 'Thu, 22 Oct 2015 07:28:00 GMT'


def epoch(date):
    return email.utils.parsedate_to_datetime(date).timestamp()


def xattrs_here(path):
    try:
        os.setxattr(path, 'user.bitpit.probe', b'1')
        os.removexattr(path, 'user.bitpit.probe')
        return True
    except (AttributeError, OSError):
        return False


def test_each_file_gets_its_own_date_when_dates_alternate(server, tmp_path):
    """One file's Last-Modified, another's, the first again: each file has
    the date its server sent (the date read last is kept for the next)."""
    dates = [DATE, NEWER_DATE, DATE, 'Thu, 22 Oct 2015 07:28:01 GMT']
    for n, date in enumerate(dates):
        url = server.add('/f{}'.format(n), DATA, last_modified=date)
        assert download(url, tmp_path / str(n))[0].state == 'complete'
    assert [(tmp_path / str(n)).stat().st_mtime for n in range(len(dates))] == [
        epoch(date) for date in dates]


@pytest.mark.parametrize('date', [
    DATE, 'Tue, 29 Feb 2000 23:59:59 GMT', 'Sun, 29 Feb 2032 00:00:00 GMT',
    'Fri, 31 Dec 9999 23:59:59 GMT',
    'Thu, 01 Jan 1970 00:00:00 GMT', 'Wed, 31 Dec 1969 23:59:59 GMT'])
def test_an_http_date_is_the_timestamp_datetime_makes(date):
    """bitpit reads the usual form of an HTTP date without datetime (not
    imported for it): the same timestamp, leap days and centuries too."""
    assert bitpit._parse_http_date(date) == epoch(date)


@pytest.mark.parametrize('date', [
    'Thu, 29 Feb 1900 00:00:00 GMT', 'Mon, 29 Feb 2100 00:00:00 GMT', 'Mon, 31 Apr 2023 00:00:00 GMT',
    'Sat, 00 Jan 2000 00:00:00 GMT', 'Sat, 01 Jan 0000 00:00:00 GMT', 'Sat, 01 Jan 2000 24:00:00 GMT',
    'Sat, 01 Jan 2000 00:60:00 GMT', 'Sat, 01 Jan 2000 00:00:60 GMT'])
def test_an_http_date_that_is_no_time_is_none(date):
    """A date that datetime refuses (a day not in its month, an hour past
    23) gives no timestamp: the file keeps the time it was written."""
    assert bitpit._parse_http_date(date) is None


def test_a_completed_file_gets_the_servers_date_and_etag(server, tmp_path):
    url = server.add('/f', DATA, etag=ETAG, last_modified=DATE)
    d, _ = download(url, tmp_path / 'f.bin')
    assert d.state == 'complete'
    assert (tmp_path / 'f.bin').stat().st_mtime == epoch(DATE)
    if xattrs_here(tmp_path / 'f.bin'):
        assert os.getxattr(tmp_path / 'f.bin', 'user.bitpit.etag') == ETAG.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f.bin']   # nothing beside it


def test_resume_is_the_default(server, tmp_path):
    url = server.add('/f', DATA, etag=ETAG)
    target = partial_file(tmp_path, url, ETAG, len(DATA))
    d, _ = download(url, target)
    assert d.if_exists == 'resume' and target.read_bytes() == DATA
    assert server.requests[0].headers['Range'] == 'bytes={}-'.format(OFFSET)


def test_skip_takes_a_file_as_it_is_without_a_request(server, tmp_path):
    url = server.add('/f', DATA)
    target = tmp_path / 'f.bin'
    target.write_bytes(OLD)
    d, rec = download(url, target, if_exists='skip')
    assert d.state == 'complete' and (d.size, d.downloaded) == (len(OLD), len(OLD))
    assert [new for _, new in rec.states] == ['start', 'complete']
    assert server.requests == [] and target.read_bytes() == OLD


def test_skip_resumes_a_partial_file(server, tmp_path):
    url = server.add('/f', DATA, etag=ETAG)
    target = partial_file(tmp_path, url, ETAG, len(DATA))
    d, _ = download(url, target, if_exists='skip')
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert server.requests[0].headers['Range'] == 'bytes={}-'.format(OFFSET)


def test_update_answered_304_leaves_the_file_untouched(server, tmp_path):
    url = server.add('/f', DATA, etag=ETAG, last_modified=DATE)
    target = tmp_path / 'f.bin'
    assert download(url, target)[0].state == 'complete'
    before = target.stat()
    count = len(server.requests)
    d, rec = download(url, target, if_exists='update')
    assert d.state == 'complete' and (d.size, d.downloaded) == (len(DATA), len(DATA))
    assert 'download' not in [new for _, new in rec.states]
    (conditional,) = server.requests[count:]
    if xattrs_here(target):
        assert conditional.headers['If-None-Match'] == ETAG
    else:
        assert conditional.headers['If-Modified-Since'] == DATE
    assert target.read_bytes() == DATA and target.stat().st_mtime == before.st_mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f.bin']


def test_update_without_an_etag_asks_with_the_files_date(server, tmp_path):
    url = server.add('/f', DATA, etag=None, last_modified=DATE)
    target = tmp_path / 'f.bin'
    assert download(url, target)[0].state == 'complete'
    d, _ = download(url, target, if_exists='update')
    assert d.state == 'complete'
    assert server.requests[-1].headers['If-Modified-Since'] == DATE
    assert server.requests[-1].headers['If-None-Match'] is None


def test_update_asks_with_its_own_condition_in_place_of_the_callers_field(server, tmp_path):
    """A caller's field of the same name as the condition (in any case) is
    left out of the conditional request: the server gets one value."""
    url = server.add('/f', DATA, etag=None, last_modified=DATE)
    target = tmp_path / 'f.bin'
    assert download(url, target)[0].state == 'complete'
    d, _ = download(url, target, if_exists='update',
                    headers={'if-modified-since': 'Thu, 01 Jan 1970 00:00:00 GMT',
                             'X-Kept': 'yes'})
    assert d.state == 'complete'
    fields = server.requests[-1].headers
    assert fields.get_all('If-Modified-Since') == [DATE] and fields['X-Kept'] == 'yes'


def test_update_replaces_the_file_atomically_once_the_new_one_is_complete(server,
                                                                          tmp_path):
    target = tmp_path / 'f.bin'
    target.write_bytes(OLD)
    os.utime(target, (epoch(DATE), epoch(DATE)))
    url = server.add('/f', DATA, etag='"new"', last_modified=NEWER_DATE, throttle=1000000)
    d = bitpit.Downloader(url, path=target, if_exists='update', update_period=0.05)
    rec = Recorder(d)
    seen = []
    d.listen('speed-changed', lambda d: d.downloaded and seen.append(
        (target.read_bytes(), (tmp_path / 'f.bin.bitpit-new').exists())))
    d.start()
    rec.wait_state('complete', 'error', 'fatal-error')
    d.join(5)
    assert d.state == 'complete' and d.path == target
    assert len(seen) > 1 and all(old == OLD and newer for old, newer in seen[:-1])  # the old one stays
    assert target.read_bytes() == DATA and target.stat().st_mtime == epoch(NEWER_DATE)
    assert server.requests[0].headers['If-Modified-Since'] == DATE
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f.bin']


def test_update_of_a_missing_file_downloads_it(server, tmp_path):
    url = server.add('/f', DATA)
    d, _ = download(url, tmp_path / 'f.bin', if_exists='update')
    assert d.state == 'complete' and (tmp_path / 'f.bin').read_bytes() == DATA
    assert server.requests[0].headers['If-None-Match'] is None


def test_rename_downloads_to_the_first_free_name(server, tmp_path):
    url = server.add('/f', DATA)
    (tmp_path / 'f.tar.gz').write_bytes(OLD)
    (tmp_path / 'f.1.tar.gz').write_bytes(OLD)
    d = bitpit.Downloader(url, path=tmp_path / 'f.tar.gz', if_exists='rename')
    changed = []
    d.listen('path-changed', lambda d: changed.append((d.path, threading.current_thread().name)))
    d.start()
    d.join(10)
    assert d.state == 'complete' and d.path == tmp_path / 'f.2.tar.gz'
    assert changed == [(tmp_path / 'f.2.tar.gz', 'bitpit-download')]
    assert (tmp_path / 'f.2.tar.gz').read_bytes() == DATA
    assert (tmp_path / 'f.tar.gz').read_bytes() == OLD == (tmp_path / 'f.1.tar.gz').read_bytes()


def test_rename_resumes_its_own_file_after_an_error(server, tmp_path):
    url = server.add('/f', DATA, truncate_at=OFFSET, truncate_once=True)
    (tmp_path / 'f.bin').write_bytes(OLD)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', if_exists='rename', restart_wait=0.05)
    rec = Recorder(d)
    d.start()
    rec.wait_state('complete', 'fatal-error')
    d.join(5)
    assert d.state == 'complete' and d.path == tmp_path / 'f.1.bin'
    assert (tmp_path / 'f.1.bin').read_bytes() == DATA
    assert server.requests[1].headers['Range'] == 'bytes={}-'.format(OFFSET)


def test_overwrite_downloads_the_whole_file_again(server, tmp_path):
    url = server.add('/f', DATA, etag=ETAG)
    target = partial_file(tmp_path, url, ETAG, len(DATA))
    target.write_bytes(OLD * 200)                       # longer than the new one
    d, _ = download(url, target, if_exists='overwrite')
    assert d.state == 'complete' and target.read_bytes() == DATA
    assert server.requests[0].headers['Range'] is None
    assert not sidecar_of(target).exists()


def test_overwrite_into_a_file_object(server):
    url = server.add('/f', DATA)
    buffer = io.BytesIO(b'x' * 5000)
    d, _ = download(url, buffer, if_exists='overwrite')
    assert d.state == 'complete' and buffer.getvalue() == DATA


@pytest.mark.parametrize('value', ['never', '', None, 'Skip'])
def test_if_exists_takes_only_its_five_values(tmp_path, value):
    with pytest.raises(ValueError, match='if_exists'):
        bitpit.Downloader('http://127.0.0.1:1/f', path=tmp_path / 'f', if_exists=value)


@pytest.mark.parametrize('value', ['skip', 'update', 'rename'])
def test_a_file_object_takes_only_resume_and_overwrite(value):
    with pytest.raises(ValueError, match='if_exists'):
        bitpit.Downloader('http://127.0.0.1:1/f', path=io.BytesIO(), if_exists=value)
    d = bitpit.Downloader('http://127.0.0.1:1/f', path=io.BytesIO())
    with pytest.raises(ValueError, match='if_exists'):
        d.if_exists = value


def test_cli_if_exists_options(server, tmp_path):
    url = server.add('/f.bin', DATA, etag=ETAG, last_modified=DATE)
    (tmp_path / 'f.bin').write_bytes(OLD)
    assert bitpit._cli(['-q', '-d', str(tmp_path), '--no-clobber', url]) == 0
    assert (tmp_path / 'f.bin').read_bytes() == OLD and server.requests == []
    assert bitpit._cli(['-q', '-d', str(tmp_path), '--if-exists', 'rename', url]) == 0
    assert (tmp_path / 'f.1.bin').read_bytes() == DATA
    os.utime(tmp_path / 'f.bin', (epoch(DATE) - 10, epoch(DATE) - 10))
    assert bitpit._cli(['-q', '-d', str(tmp_path), '-N', url]) == 0
    assert (tmp_path / 'f.bin').read_bytes() == DATA
    assert bitpit._cli(['-q', '-d', str(tmp_path), '--if-exists', 'nope', url]) == 2
