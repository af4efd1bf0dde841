#!/usr/bin/env python3
"""Single-download throughput: bitpit vs a bare stdlib loop vs curl (vs wget).

One large file (1 GiB by default) is served over 127.0.0.1 by nginx
(``sendfile on``) when it is installed, else by a Python server using
``socket.sendfile``. Each contender downloads it into the same temp dir,
interleaved (A B C A B C ...), each run in a fresh process, the output file
deleted between runs. Reported: median wall time, MiB/s, peak RSS, and the
ratios against the goals of issue 3:

    bitpit / bare loop <= 1.1    bitpit / curl <= 0.8    bitpit peak RSS <= 30 MB

Example: ``python bench/throughput.py --size 1G --runs 5``
(quick: ``--size 256M --runs 3``).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from common import BenchError, Contender, Goal, MiB, Skipped  # noqa: E402

#: The bitpit contender: default settings, as a user would write it.
BITPIT_CODE = '''
import json, os, sys, time
began = time.perf_counter()
import bitpit
imported = time.perf_counter()
url, out, size, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
d = bitpit.Downloader(url, path=out)
d.start()
d.join(timeout)
if d.is_alive:
    d.stop()
    sys.exit('bitpit: still running after {} s ({} of {} bytes)'.format(timeout, d.downloaded, size))
assert d.state == 'complete', 'state {!r}, last_exception {!r}'.format(d.state, d.last_exception)
assert os.path.getsize(out) == size, 'file holds {} of {} bytes'.format(os.path.getsize(out), size)
done = time.perf_counter()
print(json.dumps({'import_s': imported - began, 'transfer_s': done - imported}))
'''

#: The floor: what any Python downloader has to pay at least.
BARE_LOOP_CODE = '''
import http.client, json, sys, time, urllib.parse
began = time.perf_counter()
url, out = urllib.parse.urlsplit(sys.argv[1]), sys.argv[2]
conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
conn.request('GET', url.path)
resp = conn.getresponse()
assert resp.status == 200, resp.status
view = memoryview(bytearray(256 * 1024))
with open(out, 'wb', buffering=0) as file:
    while True:
        n = resp.readinto(view)
        if not n:
            break
        file.write(view[:n])
conn.close()
print(json.dumps({'transfer_s': time.perf_counter() - began}))
'''


def check_output(result: common.RunResult, out: Path, size: int) -> Dict[str, Any]:
    """A run succeeded when it exited 0 and left ``size`` bytes in ``out``."""
    if result.returncode != 0 or result.timed_out:
        raise BenchError(result.failure())
    held = out.stat().st_size if out.exists() else None
    if held != size:
        raise BenchError('output holds {} bytes, expected {}'.format(held, size))
    return result.info


def contender(name: str, command: List[str], out: Path, size: int, timeout: float,
              env: Optional[Dict[str, str]] = None) -> Contender:
    """A contender that writes ``out`` and is checked by its size."""
    return Contender(name, command, timeout, reset=functools.partial(common.remove_and_sync, out),
                     check=functools.partial(check_output, out=out, size=size),
                     env=env, cwd=out.parent)


def bitpit_contender(url: str, out: Path, size: int, timeout: float,
                     env: Dict[str, str]) -> Contender:
    """``bitpit.Downloader(url, path=out)`` with default settings."""
    common.note('bitpit: ' + common.bitpit_available('Downloader'))
    return contender('bitpit', common.python_command(BITPIT_CODE, url, out, size, timeout),
                     out, size, timeout, env)


def bare_loop_contender(url: str, out: Path, size: int, timeout: float,
                        env: Dict[str, str]) -> Contender:
    """http.client + readinto into one 256 KiB buffer + unbuffered writes."""
    return contender('bare loop', common.python_command(BARE_LOOP_CODE, url, out),
                     out, size, timeout, env)


def curl_contender(url: str, out: Path, size: int, timeout: float, install: bool) -> Contender:
    """``curl -s -o out URL``."""
    curl = common.find_tool('curl', install=install)
    if not curl:
        raise Skipped('curl is not installed')
    return contender('curl', [curl, '-s', '-o', str(out), url], out, size, timeout)


def wget_contender(url: str, out: Path, size: int, timeout: float, install: bool) -> Contender:
    """``wget -q -O out URL``."""
    wget = common.find_tool('wget', install=install)
    if not wget:
        raise Skipped('wget is not installed')
    return contender('wget', [wget, '-q', '-O', str(out), url], out, size, timeout)


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=common.parse_size, default=common.GiB,
                        help='size of the served file, e.g. 1G, 256M (default 1G)')
    parser.add_argument('--no-wget', dest='wget', action='store_false', help='leave wget out')
    parser.add_argument('--timeout', type=float, default=0,
                        help='seconds before one run is killed (default: 60 + 1 s per 20 MiB)')
    args = parser.parse_args(argv)
    timeout = args.timeout or 60 + args.size / (20 * MiB)

    with common.workspace(args.tmp) as tmp:
        docroot, outdir = tmp / 'www', tmp / 'out'
        docroot.mkdir()
        outdir.mkdir()
        common.note('creating a {} file ...'.format(common.fmt_size(args.size)))
        common.make_file(docroot / 'big.bin', args.size)
        with common.serve_files(docroot, args.server, args.install) as server:
            url, out = server.url('big.bin'), outdir / 'big.bin'
            common.note('serving {} with {}'.format(url, server.description))
            env = common.python_env(pycache=tmp / 'pycache')
            contenders, skipped = common.gather([
                ('bitpit', lambda: bitpit_contender(url, out, args.size, timeout, env)),
                ('bare loop', lambda: bare_loop_contender(url, out, args.size, timeout, env)),
                ('curl', lambda: curl_contender(url, out, args.size, timeout, args.install)),
            ] + ([('wget', lambda: wget_contender(url, out, args.size, timeout, args.install))]
                 if args.wget else []))
            outcomes = common.run_interleaved(contenders, args.runs, args.warmup)
            server_description = server.description

    common.derive(outcomes, 'mib_per_s', lambda run: args.size / MiB / run['seconds'])
    bitpit_rss = common.median_of(outcomes, 'bitpit', 'peak_rss_mib')
    goals = [
        Goal('bitpit / bare loop (wall time)', common.ratio(outcomes, 'bitpit', 'bare loop'), 1.1),
        Goal('bitpit / curl (wall time)', common.ratio(outcomes, 'bitpit', 'curl'), 0.8),
        Goal('bitpit peak RSS (MB)', None if bitpit_rss is None else bitpit_rss * MiB / 1e6, 30,
             unit=' MB'),
    ]
    print('\nthroughput: {} over 127.0.0.1 from {}, {} runs each, interleaved'.format(
        common.fmt_size(args.size), server_description, args.runs))
    print('(peak RSS: wait4 of each run; the floor of that measurement is {:.1f} MiB)'.format(
        common.rss_floor_mib()))
    print(common.report_contenders(outcomes, skipped, [
        ('median s', 'seconds', '{:.3f}'), ('MiB/s', 'mib_per_s', '{:.0f}'),
        ('peak RSS MiB', 'peak_rss_mib', '{:.1f}'), ('in-process s', 'transfer_s', '{:.3f}')]))
    print()
    print('\n'.join(goal.line() for goal in goals))
    for other in ('bare loop', 'curl'):
        best = common.best_ratio(outcomes, 'bitpit', other)
        if best is not None:
            print('bitpit / {} (best runs): {:.3f} (for information)'.format(other, best))
    return common.finish(args.json, {
        'benchmark': 'throughput', 'size': args.size, 'runs': args.runs,
        'server': server_description,
        'rss_floor_mib': common.rss_floor_mib()}, outcomes, skipped, goals)


if __name__ == '__main__':
    sys.exit(common.run_main(main))
