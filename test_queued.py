"""A queued download costs almost nothing (issue 24): making a Downloader
and adding it to a Manager read no file, and hold little memory; what the
target holds is read when first needed, and again after a new url or
path."""
import tracemalloc

import bitpit
from conftest import DATA, OFFSET, file_looks, partial_file


def test_adding_a_url_reads_no_file_until_its_progress_is_asked(tmp_path, monkeypatch):
    url = 'http://127.0.0.1:1/f.bin'
    partial_file(tmp_path, url, size=len(DATA))  # OFFSET bytes; the sidecar knows the size
    m = bitpit.Manager(dir_path=True, path=tmp_path)
    with file_looks(monkeypatch) as calls:
        d = m.add(url)
        alone = bitpit.Downloader(url, tmp_path / 'f.bin')
    assert calls == []
    assert (d.size, d.downloaded, alone.downloaded) == (len(DATA), OFFSET, OFFSET)


def test_a_new_url_or_path_is_read_when_next_needed(tmp_path):
    (tmp_path / 'a.bin').write_bytes(b'a' * 10)
    partial_file(tmp_path, 'http://127.0.0.1:1/b.bin', size=len(DATA), name='b.bin')
    d = bitpit.Downloader('http://127.0.0.1:1/a.bin', tmp_path, dir_path=True)
    assert (d.size, d.downloaded) == (-1, 10)
    d.url = 'http://127.0.0.1:1/b.bin'
    assert d.path == tmp_path / 'b.bin' and (d.size, d.downloaded) == (len(DATA), OFFSET)
    d.path = tmp_path / 'c.bin'
    assert (d.size, d.downloaded) == (-1, 0)
    d.path = tmp_path / 'a.bin'
    (tmp_path / 'a.bin').write_bytes(b'a' * 30)  # before the first look: the look sees it
    assert d.downloaded == 30 and d.remaining == -1


def test_a_queued_download_holds_a_few_kilobytes(tmp_path):
    """Traced memory per download added to a manager, not started (8 KB
    each before the download made its store, its token bucket, its
    conditions and its signal lists at the first need)."""
    count = 400
    urls = ['http://127.0.0.1:1/files/{:04d}.bin'.format(i) for i in range(count + 1)]
    m = bitpit.Manager(max_running=50, dir_path=True, path=tmp_path)
    m.add(urls[0])  # what the manager makes once
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for url in urls[1:]:
            m.add(url)
        per_download = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        if not tracing:
            tracemalloc.stop()
    assert len(m.downloads) == count + 1
    assert per_download < 4096
