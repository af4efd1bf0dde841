"""The calls that block: bitpit.download(url) (returns the final path,
raises the download's error, waits through restarts, stops resumably on
Ctrl-C, draws a progress line only on a terminal) and Downloader.wait()."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import bitpit
from conftest import DATA, HERE, OFFSET, Recorder, sidecar_of


def test_download_returns_the_final_path(server, tmp_path, capsys):
    url = server.add('/get/f.bin', DATA, headers={
        'Content-Disposition': 'attachment; filename="report.pdf"'})
    path = bitpit.download(url, tmp_path, dir_path=True, content_disposition=True,
                           progress=True)
    assert path == tmp_path / 'report.pdf' and path.read_bytes() == DATA
    assert capsys.readouterr().err == ''      # progress only on a terminal


def test_download_with_the_options_of_a_downloader(server, tmp_path):
    url = server.add('/f', DATA * 3, throttle=8 * 1024 * 1024)
    digest = 'sha256:' + __import__('hashlib').sha256(DATA * 3).hexdigest()
    path = bitpit.download(url, tmp_path / 'f.bin', connections=2, checksum=digest)
    assert path.read_bytes() == DATA * 3
    assert len({r.conn for r in server.requests}) >= 2


def test_download_raises_the_error_of_a_failed_download(server, tmp_path):
    with pytest.raises(bitpit.HTTPStatusError) as info:
        bitpit.download(server.url('/missing'), tmp_path / 'f.bin')
    assert info.value.status == 404
    url = server.add('/busy', b'', status=503)
    with pytest.raises(bitpit.HTTPStatusError) as info:  # an error, no restart
        bitpit.download(url, tmp_path / 'f.bin')
    assert info.value.status == 503 and info.value.retryable


def test_download_waits_through_restarts(server, tmp_path):
    url = server.add('/f', DATA, status=503, status_times=2)
    path = bitpit.download(url, tmp_path / 'f.bin', restart_wait=0.05)
    assert path.read_bytes() == DATA
    assert [r.path for r in server.requests] == ['/f'] * 3


def test_download_from_asyncio_and_from_threads(server, tmp_path):
    urls = [server.add('/{}'.format(i), DATA) for i in range(3)]

    async def main():
        return await asyncio.gather(*(asyncio.to_thread(bitpit.download, url,
                                                        tmp_path / str(i))
                                      for i, url in enumerate(urls)))
    paths = asyncio.run(main())
    assert paths == [tmp_path / str(i) for i in range(3)]
    assert all(path.read_bytes() == DATA for path in paths)


INTERRUPTED = '''
import signal, sys, bitpit
# Ctrl-C as a terminal gives it, though a shell may start us with it ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    bitpit.download(sys.argv[1], sys.argv[2])
except KeyboardInterrupt:
    print('interrupted')
'''


@pytest.mark.skipif(sys.platform == 'win32', reason='sends SIGINT')
def test_ctrl_c_stops_a_download_that_resumes_later(server, tmp_path):
    url = server.add('/f', DATA, throttle=200000)
    target = tmp_path / 'f.bin'
    child = subprocess.Popen([sys.executable, '-c', INTERRUPTED, url, str(target)],
                             env=dict(os.environ, PYTHONPATH=str(HERE)),
                             stdout=subprocess.PIPE, text=True)
    try:
        server.wait_sent(OFFSET, '/f', timeout=20)
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 0 and out.split() == ['interrupted']
    held = json.loads(sidecar_of(target).read_text())['held']
    assert held and held[0][0] == 0 and held[0][1] >= OFFSET // 2
    server.add('/f', DATA)
    assert bitpit.download(url, target).read_bytes() == DATA
    assert server.requests[-1].headers['Range'] == 'bytes={}-'.format(held[0][1])


# ---------------------------------------------------------------------------
# Downloader.wait()
# ---------------------------------------------------------------------------

def test_wait_goes_through_two_restarts(server, tmp_path):
    url = server.add('/f', DATA, status=503, status_times=2)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', restart_wait=0.05)
    rec = Recorder(d)
    d.start()
    assert d.wait(10) is True
    assert [new for _, new in rec.states].count('error') == 2 and d.state == 'complete'


def test_wait_returns_false_after_a_fatal_error_at_once(server, tmp_path):
    d = bitpit.Downloader(server.url('/missing'), path=tmp_path / 'f', restart_wait=0)
    d.start()
    began = time.monotonic()
    assert d.wait(10) is False
    assert d.state == 'fatal-error' and time.monotonic() - began < 2


def test_wait_returns_false_on_a_stop(server, tmp_path):
    url = server.add('/f', DATA, stall_after=1000)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', timeout=30, restart_wait=0)
    d.start()
    assert server.wait_stalled(1)
    result = []
    waiter = threading.Thread(target=lambda: result.append(d.wait()))
    waiter.start()
    d.stop()
    waiter.join(5)
    assert result == [False] and d.state == 'pause'


def test_wait_with_a_timeout(server, tmp_path):
    url = server.add('/f', DATA, stall_after=1000)
    d = bitpit.Downloader(url, path=tmp_path / 'f.bin', timeout=30)
    d.start()
    began = time.monotonic()
    assert d.wait(0.3) is False
    assert 0.3 <= time.monotonic() - began < 1.0 and d.state in ('start', 'download')
    d.stop()


def test_wait_before_a_start_returns_at_once(tmp_path):
    d = bitpit.Downloader('http://127.0.0.1:1/f', path=tmp_path / 'f')
    assert d.wait() is False
