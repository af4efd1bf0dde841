#!/usr/bin/env python3
"""Single-download throughput: bitpit vs dd, a bare stdlib loop, curl (and wget).

One large file (1 GiB by default) is served over 127.0.0.1 by nginx
(``sendfile on``) when it is installed, else by a Python server using
``socket.sendfile``. Each contender downloads it into the same temp dir,
interleaved and rotated (A B C, B C A, ...), each run in a fresh process,
the output file deleted (and ``sync``) between runs. ``dd`` copies the
served file (in the page cache) to the output, as the machine's limit for
moving those bytes. Reported: median wall time, CPU time (user + sys, from
``wait4``), MiB/s, peak RSS, nginx's CPU, and the goals (issues 3 and 13):

    bitpit / dd:        wall <= 1.2,  CPU <= 1.1
    bitpit / bare loop: wall <= 1.1   bitpit / curl: wall <= 0.8
    bitpit peak RSS <= 30 MB

"bitpit (readinto)" is bitpit with ``BITPIT_NO_SPLICE=1`` in its
environment: the same download without the ``os.splice`` fast path.
"bare splice" is the floor of TCP reception from Python: a plain socket
and ``os.splice`` socket -> pipe -> file, no HTTP library (Linux only).

With ``--tls``, nginx serves HTTPS with a certificate made for the run
(``openssl req -x509``, IP:127.0.0.1), and bitpit (``ssl_context=`` that
trusts it), the bare loop over ``HTTPSConnection`` and ``curl --cacert``
download it; the protocol and cipher of every request are taken from
nginx's access log. Goals:

    bitpit / curl: wall <= 1.0    bitpit peak RSS <= 30 MB

Example: ``python bench/throughput.py --size 1G --runs 5 --bitpit ../main/bitpit.py``
(quick: ``--size 256M --runs 3``; HTTPS: add ``--tls``).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from common import BenchError, Contender, Goal, MiB, Skipped  # noqa: E402

#: The bitpit contender: default settings, as a user would write it; over
#: HTTPS with an ``ssl_context`` that trusts the bench's certificate
#: (argv[5]).
BITPIT_CODE = '''
import json, os, sys, time
began = time.perf_counter()
import bitpit
imported = time.perf_counter()
url, out, size, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
options = {}
if len(sys.argv) > 5:
    import ssl
    options['ssl_context'] = ssl.create_default_context(cafile=sys.argv[5])
d = bitpit.Downloader(url, path=out, **options)
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

#: Put before BITPIT_CODE for one untimed run: counts the calls of
#: ``os.splice`` and the bytes they moved into regular files (a splice
#: from the socket into a pipe and one from the pipe into the file move the
#: same bytes), printed as the last line.
SPLICE_COUNTER = '''
import atexit, json, os, stat
_spliced = [0, 0]
_splice = getattr(os, 'splice', None)
if _splice is not None:
    def _counting_splice(src, dst, count, *args, **kwargs):
        n = _splice(src, dst, count, *args, **kwargs)
        _spliced[0] += 1
        if stat.S_ISREG(os.fstat(dst).st_mode):
            _spliced[1] += n
        return n
    os.splice = _counting_splice
atexit.register(lambda: print(json.dumps({'splice_calls': _spliced[0], 'splice_bytes': _spliced[1],
                                          'has_splice': _splice is not None}), flush=True))
'''

#: The floor: what any Python downloader has to pay at least. Over HTTPS
#: (argv[3] the certificate), HTTPSConnection with a context that trusts it.
BARE_LOOP_CODE = '''
import http.client, json, sys, time, urllib.parse
began = time.perf_counter()
url, out = urllib.parse.urlsplit(sys.argv[1]), sys.argv[2]
if url.scheme == 'https':
    import ssl
    context = ssl.create_default_context(cafile=sys.argv[3])
    conn = http.client.HTTPSConnection(url.hostname, url.port, timeout=30, context=context)
else:
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


#: The floor of receiving over TCP into a file from Python, with no HTTP
#: library at all: one GET on a plain socket, then ``os.splice`` socket ->
#: pipe (1 MiB) -> file, blocking, as a C program would. Linux only.
BARE_SPLICE_CODE = '''
import fcntl, json, os, re, socket, sys, time, urllib.parse
began = time.perf_counter()
url, out = urllib.parse.urlsplit(sys.argv[1]), sys.argv[2]
sock = socket.create_connection((url.hostname, url.port))
sock.sendall('GET {} HTTP/1.1\\r\\nHost: {}:{}\\r\\nConnection: close\\r\\n\\r\\n'.format(
    url.path, url.hostname, url.port).encode())
head = b''
while b'\\r\\n\\r\\n' not in head:
    head += sock.recv(65536)
head, _, rest = head.partition(b'\\r\\n\\r\\n')
assert head.startswith(b'HTTP/1.1 200'), head[:40]
length = int(re.search(rb'(?i)\\r\\ncontent-length: *(\\d+)', head).group(1))
pipe_out, pipe_in = os.pipe()
fcntl.fcntl(pipe_in, 1031, 1024 * 1024)  # F_SETPIPE_SZ
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
position = os.write(fd, rest)
while position < length:
    n = os.splice(sock.fileno(), pipe_in, min(1024 * 1024, length - position))
    assert n, 'the server closed early'
    while n:
        moved = os.splice(pipe_out, fd, n)
        n -= moved
        position += moved
os.close(fd)
sock.close()
print(json.dumps({'transfer_s': time.perf_counter() - began}))
'''


class ServerWatch:
    """What the server did during one run: nginx's CPU time, and over HTTPS
    the protocol and cipher of the run's request (from its access log)."""

    def __init__(self, server: Any):
        self.server = server
        self._cpu_before: Optional[float] = None

    def reset(self) -> None:
        cpu = getattr(self.server, 'cpu_seconds', None)
        self._cpu_before = cpu() if cpu else None
        if hasattr(self.server, 'reset'):
            self.server.reset()

    def measure(self) -> Dict[str, Any]:
        metrics: Dict[str, Any] = {}
        cpu = getattr(self.server, 'cpu_seconds', None)
        now = cpu() if cpu else None
        if now is not None and self._cpu_before is not None:
            metrics['server_cpu_s'] = now - self._cpu_before
        if getattr(self.server, 'tls', None):
            metrics['tls'] = ', '.join(sorted(set(self.server.tls_sessions()))) or '?'
        return metrics


def check_output(result: common.RunResult, out: Path, size: int, watch: ServerWatch
                 ) -> Dict[str, Any]:
    """A run succeeded when it exited 0 and left ``size`` bytes in ``out``."""
    if result.returncode != 0 or result.timed_out:
        raise BenchError(result.failure())
    held = out.stat().st_size if out.exists() else None
    if held != size:
        raise BenchError('output holds {} bytes, expected {}'.format(held, size))
    return dict(result.info, **watch.measure())


def reset_run(out: Path, watch: ServerWatch, warm: int = 0) -> None:
    """Delete the output and sync, warm the page cache (``warm`` bytes, see
    ``common.warm_page_cache``); start the server's counts afresh."""
    common.remove_and_sync(out, warm)
    watch.reset()


class Setup:
    """What every contender shares: the URL, the output, the size, the
    time-out, the server watch, the certificate over HTTPS, the bitpit
    under test and whether tools may be installed."""

    def __init__(self, url: str, served: Path, out: Path, size: int, timeout: float,
                 watch: ServerWatch, cert: Optional[Path], under_test: common.BitpitUnderTest,
                 install: bool, warm: bool):
        self.url, self.served, self.out, self.size = url, served, out, size
        self.timeout, self.watch, self.cert = timeout, watch, cert
        self.under_test, self.install = under_test, install
        self.warm = common.warm_size(size) if warm else 0

    def contender(self, name: str, command: List[str],
                  env: Optional[Dict[str, str]] = None) -> Contender:
        """A contender that writes ``out`` and is checked by its size."""
        return Contender(name, command, self.timeout,
                         reset=functools.partial(reset_run, self.out, self.watch, self.warm),
                         check=functools.partial(check_output, out=self.out, size=self.size,
                                                 watch=self.watch),
                         env=env, cwd=self.out.parent)

    def tls_args(self) -> List[Path]:
        return [self.cert] if self.cert else []

    def bitpit_command(self, prelude: str = '') -> List[str]:
        return common.python_command(prelude + BITPIT_CODE, self.url, self.out, self.size,
                                     self.timeout * 0.9, *self.tls_args())

    def bitpit(self, under_test: Optional[common.BitpitUnderTest] = None,
               name: str = 'bitpit') -> Contender:
        """``bitpit.Downloader(url, path=out)`` with default settings (the
        bitpit under test, or another: ``--baseline``)."""
        under_test = under_test or self.under_test
        common.note('{}: {}'.format(name, under_test.require()))
        return self.contender(name, self.bitpit_command(), under_test.env)

    def bitpit_readinto(self) -> Contender:
        """The same with ``BITPIT_NO_SPLICE=1``: no ``os.splice`` fast path."""
        self.under_test.require()
        return self.contender('bitpit (readinto)', self.bitpit_command(),
                              self.under_test.env_with(BITPIT_NO_SPLICE='1'))

    def bare_loop(self) -> Contender:
        """http.client + readinto into one 256 KiB buffer + unbuffered writes."""
        return self.contender('bare loop', common.python_command(
            BARE_LOOP_CODE, self.url, self.out, *self.tls_args()), self.under_test.env)

    def bare_splice(self) -> Contender:
        """A plain socket and ``os.splice`` through a pipe: no HTTP library."""
        if not hasattr(os, 'splice'):
            raise Skipped('os.splice is not available here (Linux, Python 3.10+)')
        return self.contender('bare splice', common.python_command(
            BARE_SPLICE_CODE, self.url, self.out), self.under_test.env)

    def dd(self) -> Contender:
        """``dd if=SERVED of=OUT bs=1M``: no ``conv=fsync`` (nobody else
        syncs either); the served file is in the page cache, as for nginx."""
        dd = common.find_tool('dd', package='coreutils', install=self.install)
        if not dd:
            raise Skipped('dd is not installed')
        return self.contender('dd', [dd, 'if={}'.format(self.served), 'of={}'.format(self.out),
                                     'bs=1M', 'status=none'])

    def curl(self) -> Contender:
        """``curl -s -o out URL`` (with ``--cacert CERT`` over HTTPS)."""
        curl = common.find_tool('curl', install=self.install)
        if not curl:
            raise Skipped('curl is not installed')
        cacert = ['--cacert', str(self.cert)] if self.cert else []
        return self.contender('curl', [curl, '-s', *cacert, '-o', str(self.out), self.url])

    def wget(self) -> Contender:
        """``wget -q -O out URL``."""
        wget = common.find_tool('wget', install=self.install)
        if not wget:
            raise Skipped('wget is not installed')
        return self.contender('wget', [wget, '-q', '-O', str(self.out), self.url])

    def splice_probe(self, name: str, env: Dict[str, str]) -> Dict[str, Any]:
        """One untimed run of a bitpit contender that counts its
        ``os.splice`` calls: does the fast path carry the body?"""
        reset_run(self.out, self.watch, self.warm)
        try:
            done = subprocess.run(self.bitpit_command(SPLICE_COUNTER), env=env,
                                  cwd=str(self.out.parent), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=self.timeout)
            lines = done.stdout.decode(errors='replace').strip().splitlines()
            counted = json.loads(lines[-1]) if lines else {}
        except (subprocess.TimeoutExpired, ValueError) as exc:
            counted = {'error': repr(exc)}
        finally:
            reset_run(self.out, self.watch)
        if not counted.get('has_splice', True):
            text = 'this Python has no os.splice'
        elif 'splice_calls' in counted:
            text = 'os.splice called {} times, {} spliced into the file ({:.0%})'.format(
                counted['splice_calls'], common.fmt_size(counted['splice_bytes']),
                counted['splice_bytes'] / self.size)
        else:
            text = 'could not tell ({})'.format(counted.get('error') or 'no output')
        common.note('{}: {}'.format(name, text))
        return dict(counted, summary=text)


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0], baseline=True)
    parser.add_argument('--size', type=common.parse_size, default=common.GiB,
                        help='size of the served file, e.g. 1G, 256M (default 1G)')
    parser.add_argument('--tls', action='store_true',
                        help='HTTPS: bitpit, the bare loop and curl over TLS (nginx needed)')
    parser.add_argument('--no-wget', dest='wget', action='store_false', help='leave wget out')
    parser.add_argument('--no-splice-probe', dest='splice_probe', action='store_false',
                        help='do not count os.splice calls in one untimed run of each bitpit')
    parser.add_argument('--no-warm', dest='warm', action='store_false',
                        help='do not write and delete a file of the size before each run '
                             '(see common.warm_page_cache)')
    parser.add_argument('--timeout', type=float, default=0,
                        help='seconds before one run is killed (default: 60 + 1 s per 20 MiB)')
    args = parser.parse_args(argv)
    timeout = args.timeout or 60 + args.size / (20 * MiB)
    if args.tls and args.server == 'python':
        parser.error('--tls needs nginx (--server auto or nginx)')

    probes: Dict[str, Dict[str, Any]] = {}
    with common.workspace(args.tmp) as tmp:
        docroot, outdir = tmp / 'www', tmp / 'out'
        docroot.mkdir()
        outdir.mkdir()
        under_test = common.load_bitpit(args.bitpit, tmp, 'Downloader')
        common.note('bitpit: ' + (under_test.skip or under_test.description))
        baseline = common.load_baseline(args, tmp, 'Downloader')
        common.note('creating a {} file ...'.format(common.fmt_size(args.size)))
        served = common.make_file(docroot / 'big.bin', args.size)
        tls = common.make_certificate(tmp, args.install) if args.tls else None
        with common.serve_files(docroot, args.server, args.install, tls=tls) as server:
            url, out = server.url('big.bin'), outdir / 'big.bin'
            common.note('serving {} with {}'.format(url, server.description))
            setup = Setup(url, served, out, args.size, timeout, ServerWatch(server),
                          tls[0] if tls else None, under_test, args.install, args.warm)
            if args.tls:
                factories = [('bitpit', setup.bitpit), ('bare loop', setup.bare_loop),
                             ('curl', setup.curl)]
            else:
                factories = [('bitpit', setup.bitpit), ('bitpit (readinto)', setup.bitpit_readinto),
                             ('dd', setup.dd), ('bare loop', setup.bare_loop),
                             ('bare splice', setup.bare_splice),
                             ('curl', setup.curl)] + ([('wget', setup.wget)] if args.wget else [])
            if baseline is not None:
                factories.append(('bitpit baseline', functools.partial(
                    setup.bitpit, baseline, 'bitpit baseline')))
            contenders, skipped = common.gather(factories)
            if args.splice_probe and not args.tls:
                for contender in contenders:
                    if contender.name.startswith('bitpit'):
                        probes[contender.name] = setup.splice_probe(contender.name,
                                                                    contender.env)
            outcomes = common.run_interleaved(contenders, args.runs, args.warmup)
            server_description = server.description

    common.derive(outcomes, 'mib_per_s', lambda run: args.size / MiB / run['seconds'])
    bitpit_rss = common.median_of(outcomes, 'bitpit', 'peak_rss_mib')
    rss_goal = Goal('bitpit peak RSS (MB)', None if bitpit_rss is None else bitpit_rss * MiB / 1e6,
                    30, unit=' MB')
    if args.tls:
        goals = [Goal('TLS: bitpit / curl (wall time)', common.ratio(outcomes, 'bitpit', 'curl'),
                      1.0), rss_goal]
        informative = [('bitpit', 'bare loop', 'seconds'), ('bitpit', 'curl', 'cpu_seconds'),
                       ('bitpit', 'bare loop', 'cpu_seconds'),
                       ('bitpit', 'bitpit baseline', 'seconds'),
                       ('bitpit', 'bitpit baseline', 'cpu_seconds')]
    else:
        goals = [
            Goal('bitpit / dd (wall time)', common.ratio(outcomes, 'bitpit', 'dd'), 1.2),
            Goal('bitpit / dd (CPU time)', common.ratio(outcomes, 'bitpit', 'dd', 'cpu_seconds'),
                 1.1),
            Goal('bitpit / bare loop (wall time)', common.ratio(outcomes, 'bitpit', 'bare loop'),
                 1.1),
            Goal('bitpit / curl (wall time)', common.ratio(outcomes, 'bitpit', 'curl'), 0.8),
            rss_goal,
        ]
        informative = [('bitpit', 'bare splice', 'seconds'),
                       ('bitpit', 'bare splice', 'cpu_seconds'),
                       ('bare splice', 'dd', 'seconds'),
                       ('bare splice', 'dd', 'cpu_seconds'),
                       ('bitpit (readinto)', 'dd', 'seconds'),
                       ('bitpit (readinto)', 'dd', 'cpu_seconds'),
                       ('bitpit', 'bitpit (readinto)', 'seconds'),
                       ('bitpit', 'bitpit (readinto)', 'cpu_seconds'),
                       ('bitpit', 'curl', 'cpu_seconds'),
                       ('bitpit', 'bitpit baseline', 'seconds'),
                       ('bitpit', 'bitpit baseline', 'cpu_seconds')]
    print('\nthroughput: {}{} over 127.0.0.1 from {}, {} runs each, interleaved'.format(
        common.fmt_size(args.size), ' over HTTPS' if args.tls else '', server_description,
        args.runs))
    print('bitpit under test: {}'.format(under_test.skip or under_test.description))
    print('before each run: output deleted, sync, {}'.format(
        'then {} written and deleted (warm page cache)'.format(
            common.fmt_size(common.warm_size(args.size))) if args.warm else 'no warming'))
    print('(CPU s: user + sys of the child, from wait4; server CPU s: nginx, from /proc; '
          'peak RSS: wait4, the floor of that measurement is {:.1f} MiB)'.format(
              common.rss_floor_mib()))
    print(common.report_contenders(outcomes, skipped, [
        ('median s', 'seconds', '{:.3f}'), *common.CPU_COLUMNS,
        ('server CPU s', 'server_cpu_s', '{:.2f}'), ('MiB/s', 'mib_per_s', '{:.0f}'),
        ('peak RSS MiB', 'peak_rss_mib', '{:.1f}'), ('in-process s', 'transfer_s', '{:.3f}')]))
    ciphers = tls_summary(outcomes) if args.tls else {}
    for name, seen in ciphers.items():
        print('{}: {}'.format(name, seen))
    if len(set(ciphers.values())) > 1:
        print('NOTE: the contenders did not all negotiate the same protocol and cipher')
    for name, probe in probes.items():
        print('{} (one untimed run): {}'.format(name, probe['summary']))
    print()
    print('\n'.join(goal.line() for goal in goals))
    for a, b, key in informative:
        value = common.ratio(outcomes, a, b, key)
        if value is not None:
            print('{} / {} ({}): {:.3f} (for information)'.format(
                a, b, 'CPU time' if key == 'cpu_seconds' else 'wall time', value))
    for other in (['bare loop', 'curl'] if args.tls else ['dd', 'bare loop', 'curl']):
        best = common.best_ratio(outcomes, 'bitpit', other)
        if best is not None:
            print('bitpit / {} (best runs): {:.3f} (for information)'.format(other, best))
    return common.finish(args.json, {
        'benchmark': 'throughput', 'size': args.size, 'runs': args.runs, 'tls': args.tls,
        'warm': common.warm_size(args.size) if args.warm else 0,
        'server': server_description, 'bitpit': under_test.skip or under_test.description,
        'splice_probes': probes, 'tls_sessions': ciphers,
        'rss_floor_mib': common.rss_floor_mib()}, outcomes, skipped, goals)


def tls_summary(outcomes: Dict[str, common.Outcome]) -> Dict[str, str]:
    """Per contender: the protocols and ciphers nginx logged for its runs."""
    summary = {}
    for name, outcome in outcomes.items():
        seen = sorted({run.get('tls', '?') for run in outcome.runs})
        if seen:
            summary[name] = '; '.join(seen)
    return summary


if __name__ == '__main__':
    sys.exit(common.run_main(main))
