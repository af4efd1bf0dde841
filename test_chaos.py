"""Chaos: many concurrent downloads from a server that, at random, cuts
answers, pauses longer than the time-out, ignores Range and changes the
content; every download must end complete and byte-identical."""
import random
import threading
import time

import bitpit
from conftest import bitpit_threads, sidecar_of


def test_chaos_every_download_completes_byte_identical(server, tmp_path):
    """60 concurrent downloads from a server that, at random, cuts answers,
    pauses longer than the time-out, ignores Range and changes the content."""
    rng = random.Random(11)
    downloads = []
    done = threading.Semaphore(0)
    for i in range(60):
        path = '/chaos/{}.bin'.format(i)
        server.add(path, rng.randbytes(rng.randint(20000, 150000)), drop_probability=0.7,
                   change_probability=0.2, seed=i)
        d = bitpit.Downloader(server.url(path), path=tmp_path / '{}.bin'.format(i),
                              restart_wait=0.01, timeout=0.25, chunk_size=16384)
        d.listen('state-changed', lambda d, old: d.state in ('complete', 'fatal-error')
                 and done.release())
        downloads.append((path, d))
    began = time.monotonic()
    for _, d in downloads:
        d.start()
    for _ in downloads:
        assert done.acquire(timeout=max(0.0, began + 20 - time.monotonic())), \
            [d for _, d in downloads if d.state != 'complete']
    for _, d in downloads:
        d.join(5)
    assert bitpit_threads() == []
    for path, d in downloads:
        assert d.state == 'complete', (d, d.last_exception)
        assert d.path.read_bytes() == server.content(path), path
        assert d.size == d.downloaded == len(server.content(path))
        assert not sidecar_of(d.path).exists()
    attempts = len(server.requests)
    assert attempts > 2 * len(downloads), 'the chaos was too mild to test anything'
    assert sum(1 for r in server.requests if r.headers['If-Range']) > 10
