#!/usr/bin/env python3
"""A total rate limit with one slow member: bitpit.Manager vs aria2c.

Four large downloads run at once under one total limit of 4 MiB/s: three
files of 40 MiB, and one of 10 MiB that the server gives only 256 KiB/s
per request. A work-conserving limiter hands the other three what the slow
one cannot use, so the aggregate stays at the limit; an equal split (bitpit
1.2.0) reaches about 81%. For bitpit, the aggregate is the sum of its
downloads' ``downloaded``, sampled every 50 ms in the child (the issue's
own measure); for aria2c, what landed in its files. Both are judged in
every whole second of a window (by default seconds 1 to 10 after a 50th of
a second's worth was there), as a fraction of the limit. Shown beside,
over the window: what landed in each output file (its data extents,
``SEEK_DATA`` / ``SEEK_HOLE``, sampled every 50 ms by the benchmark;
``st_size`` is no use, as bitpit reserves each file at its full size),
what the client wrote (``write_bytes`` of ``/proc/PID/io``; it also counts
a 4 KiB page for each save of bitpit's sidecars, one a second per
download, +0.4 % at 4 MiB/s), and with the Python servers their own count
of bytes sent (off by a few percent, as the kernel's socket buffers hold
bytes that were sent but not yet read).

Cases (``--case``, repeatable), the slow member served by:

    python     the Python server, paced in pieces of 16 KiB (issue 5)
    nginx      nginx, a location with ``limit_rate 256k`` (issue 18)
    bursts     the Python server, in 64 KiB bursts (4 a second)
    trickle    the Python server, in 1 KiB writes (256 a second)

each with one connection per download, or ``NAME-xN`` for N connections
per download (``Manager(connections=N)``, ``aria2c -xN -sN``). Default:
python nginx bursts trickle nginx-x2 nginx-x8. Goals of issues 5 and 18:

    every whole second: aggregate / limit >= 0.99 and <= 1.01

Example: ``python bench/total_limit.py --runs 3``
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from common import BenchError, Contender, Goal, KiB, MiB, Skipped  # noqa: E402

#: bitpit: one Manager with a total limit for ``duration`` seconds, then
#: every download paused and the process ends. The options (connections=)
#: come as JSON. Meanwhile the main thread samples the sum of the
#: downloads' ``downloaded`` every 50 ms (the issue's own measure), and
#: prints the samples at the end.
BITPIT_CODE = '''
import json, sys, time
import bitpit
list_file, outdir = sys.argv[1], sys.argv[2]
rate, count, duration = float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
options = json.loads(sys.argv[6])
m = bitpit.Manager(max_running=count, rate_limit=rate, dir_path=True, path=outdir, **options)
for url in open(list_file).read().split():
    m.add(url)
m.start()
ends = time.monotonic() + duration
downloaded = []
while time.monotonic() < ends:
    downloaded.append((time.monotonic(), sum(d.downloaded for d in m.downloads)))
    time.sleep(0.05)
states = [d.state for d in m.downloads]
errors = [repr(d.last_exception) for d in m.downloads if d.last_exception is not None]
m.stop_all()
m.stop()
for d in m.downloads:
    d.stop()
    d.join(5)
print(json.dumps({'states': states, 'errors': errors, 'downloaded': downloaded}))
'''

#: How each case's server sends the slow member: (server, bytes per paced
#: write; 0: the Python server's default, a sixteenth of the rate).
SLOW_SERVERS = {'python': ('python', 0), 'nginx': ('nginx', 0),
                'bursts': ('python', 64 * KiB), 'trickle': ('python', KiB)}
DEFAULT_CASES = ('python', 'nginx', 'bursts', 'trickle', 'nginx-x2', 'nginx-x8')

#: The issue's band for every whole second.
LOW, HIGH = 0.99, 1.01

#: The slow member's URL path, under the location that nginx limits.
SLOW_PATH = 'slow/slow.bin'


def parse_case(text: str) -> Tuple[str, int]:
    """``'nginx-x8'`` -> ('nginx', 8); ``'trickle'`` -> ('trickle', 1)."""
    match = re.fullmatch(r'([a-z]+)(?:-x(\d+))?', text)
    if not match or match.group(1) not in SLOW_SERVERS or int(match.group(2) or 1) < 1:
        raise argparse.ArgumentTypeError(
            'not a case: {!r} (one of {}, optionally with -xN)'.format(
                text, ', '.join(SLOW_SERVERS)))
    return match.group(1), int(match.group(2) or 1)


class Sampler(common.PeriodicSampler):
    """While active, records every ``period`` s the bytes landed in each of
    ``files`` (``common.landed``: data extents) and, last, the bytes the
    measured child has written so far (``common.written_bytes``; ``-1``
    while unknown), as ``(monotonic time, [landed, ..., written])``."""

    def __init__(self, files: Sequence[Path], period: float = 0.05):
        super().__init__(period)
        self.files = list(files)
        self._pid: Optional[int] = None
        self._written = -1

    def started(self) -> None:
        self._pid, self._written = None, -1

    def _written_bytes(self) -> int:
        """The child's write_bytes; the last value once it has ended."""
        if self._pid is None:
            pids = common.measured_children()
            self._pid = pids[0] if pids else None
        written = common.written_bytes(self._pid) if self._pid is not None else None
        if written is not None:
            self._written = written
        return self._written

    def sample(self) -> List[int]:
        written = self._written_bytes()
        return [common.landed(path) for path in self.files] + [written]


#: (monotonic time, bytes): a count sampled over time.
Series = List[Tuple[float, int]]


def growth(series: Series, start: float, end: float) -> float:
    """Bytes per second of ``series`` between its samples nearest to
    ``start`` and ``end``, over the samples' own times."""
    first = min(series, key=lambda sample: abs(sample[0] - start))
    last = min(series, key=lambda sample: abs(sample[0] - end))
    if last[0] <= first[0]:
        raise BenchError('the run ended before the window')
    return (last[1] - first[1]) / (last[0] - first[0])


def first_reaching(series: Series, least: float) -> float:
    """The time of the first sample of ``series`` at ``least`` or more."""
    for when, count in series:
        if count >= least:
            return when
    raise BenchError('the client never had {} bytes'.format(int(least)))


#: A server of the benchmark: Python (with a byte log) or nginx.
Server = Union[common.PythonFileServer, common.NginxServer]


def measure(result: common.RunResult, server: Server, sampler: Sampler,
            names: List[str], rate: float, window: Tuple[float, float], strict_exit: bool
            ) -> Dict[str, Any]:
    """Metrics of one run, judged on bitpit's own ``downloaded`` (sampled in
    the child) or, for another client, the bytes landed in its files: in
    every whole second of the window (counted from when a 50th of a
    second's worth was there) as a fraction of ``rate`` ('per_second', with
    its 'min' and 'max'; and what landed in each file in each of those
    seconds, MiB/s, 'per_file'), and over the whole window ('fraction'). Also over
    the window: what landed in the files ('landed'; per file in MiB/s),
    what the child wrote ('written', bitpit's sidecars included) and with a
    Python server what it sent. A child that was stopped on purpose may
    exit non-zero (aria2c ``--stop``): its exit status is checked only with
    ``strict_exit``."""
    if result.timed_out or (strict_exit and result.returncode != 0):
        raise BenchError(result.failure())
    samples = sampler.samples
    landed = [(when, sum(values[:-1])) for when, values in samples]
    judged = [(when, count) for when, count in result.info.get('downloaded', [])] or landed
    began = first_reaching(judged, rate / 50)
    start, end = began + window[0], began + window[1]
    if judged[-1][0] < end:
        raise BenchError('the run ended {:.2f} s before the end of the window'.format(
            end - judged[-1][0]))
    seconds = range(int(window[0]), int(window[1]))
    per_second = [growth(judged, began + second, began + second + 1) / rate
                  for second in seconds]
    per_file = [[growth([(when, values[i]) for when, values in samples],
                        began + second, began + second + 1) / MiB for i in range(len(names))]
                for second in seconds]
    metrics: Dict[str, Any] = {
        'fraction': growth(judged, start, end) / rate, 'min': min(per_second),
        'max': max(per_second), 'per_second': per_second, 'per_file': per_file,
        'landed': growth(landed, start, end) / rate}
    written = [(when, values[-1]) for when, values in samples if values[-1] >= 0]
    if written and written[0][0] <= start:
        metrics['written'] = growth(written, start, end) / rate
    metrics.update(('MiB/s ' + name, growth([(when, values[i]) for when, values in samples],
                                            start, end) / MiB)
                   for i, name in enumerate(names))
    if isinstance(server, common.PythonFileServer):
        log = list(server.sent_log)
        metrics['server_fraction'] = common.bytes_between(log, start, end) / (end - start) / rate
    if result.info.get('errors'):
        metrics['errors'] = result.info['errors']
    return metrics


def reset(server: Server, sampler: Sampler, outdir: Path) -> None:
    """Forget the server's byte log and the samples; empty the output dir."""
    if isinstance(server, common.PythonFileServer):
        server.sent_log.clear()
    sampler.samples = []
    common.remove(outdir)
    outdir.mkdir()


def contender(name: str, command: List[str], server: Server, outdir: Path,
              names: List[str], rate: float, window: Tuple[float, float], timeout: float,
              env: Optional[Dict[str, str]] = None) -> Contender:
    """A contender whose output files and writes are sampled while it runs."""
    sampler = Sampler([outdir / Path(name).name for name in names])
    return Contender(name, command, timeout,
                     reset=functools.partial(reset, server, sampler, outdir),
                     check=functools.partial(measure, server=server, sampler=sampler,
                                             names=names, rate=rate, window=window,
                                             strict_exit=env is not None),
                     monitor=lambda: sampler,
                     env=env, cwd=outdir.parent)


def bitpit_contender(name: str, url_list: Path, count: int, duration: float,
                     connections: int, under_test: common.BitpitUnderTest,
                     **kwargs: Any) -> Contender:
    """``bitpit.Manager(max_running=4, rate_limit=4 MiB/s, dir_path=True,
    path=outdir)``, with ``connections=N`` when N > 1."""
    common.note('{}: {}'.format(name, under_test.require()))
    options = {'connections': connections} if connections > 1 else {}
    command = common.python_command(BITPIT_CODE, url_list, kwargs['outdir'], kwargs['rate'],
                                    count, duration, json.dumps(options))
    return contender(name, command, env=under_test.env, timeout=duration + 30, **kwargs)


def aria2c_contender(url_list: Path, count: int, duration: float, connections: int,
                     install: bool, **kwargs: Any) -> Contender:
    """``aria2c -j4 --max-overall-download-limit=4M --stop=SECONDS``, with
    ``-xN -sN -k1M`` when N > 1. It stops 3 s after bitpit would: with
    ``--stop`` at bitpit's duration, it wrote nothing in the window's last
    second against nginx."""
    aria2c = common.find_tool('aria2c', package='aria2', install=install)
    if not aria2c:
        raise Skipped('aria2c is not installed')
    split = (['-x{}'.format(connections), '-s{}'.format(connections), '-k1M']
             if connections > 1 else [])
    command = [aria2c, '--no-conf', '-q', '-j{}'.format(count), *split, '-i', str(url_list),
               '-d', str(kwargs['outdir']), '--max-overall-download-limit={}'.format(
                   int(kwargs['rate'])), '--stop={}'.format(math.ceil(duration) + 3),
               '--allow-overwrite=true', '--auto-file-renaming=false', '--file-allocation=none',
               '--disk-cache=0']  # write as it reads
    return contender('aria2c', command, timeout=duration + 30, **kwargs)


def serve(kind: str, docroot: Path, slow_rate: int, install: bool) -> Server:
    """The server of a case: nginx with ``limit_rate`` on the slow member's
    location, or the Python server pacing it in pieces of the case's
    size, with a log of the bytes it sent."""
    server, piece = SLOW_SERVERS[kind]
    if server == 'nginx':
        binary = common.find_tool('nginx', install=install)
        if not binary:
            raise Skipped('nginx is not installed')
        return common.NginxServer(docroot, binary, location_rates={
            '/' + SLOW_PATH.rpartition('/')[0] + '/': slow_rate})
    return common.PythonFileServer(docroot, rates={'/' + SLOW_PATH: slow_rate},
                                   piece=16 * KiB, log_bytes=True, rate_piece=piece)


def run_case(args: Any, tmp: Path, names: List[str], case: str, kind: str, connections: int,
             under_tests: Sequence[Tuple[str, common.BitpitUnderTest]]) -> Tuple[Any, Any, str]:
    """Every contender on one case, interleaved: (outcomes, skipped, the
    server's description)."""
    window = tuple(args.window)
    duration = window[1] + 3  # the first write comes a few tenths of a second after start()
    outdir = tmp / 'out'
    with serve(kind, tmp / 'www', args.slow_rate, args.install) as server:
        url_list = tmp / 'urls.txt'
        url_list.write_text(''.join(server.url(name) + '\n' for name in names))
        common.note('\n{}: {} downloads from {}, {} connection(s) each, total limit {}/s'.format(
            case, len(names), server.description, connections, common.fmt_size(args.rate)))
        shared = dict(server=server, outdir=outdir, names=names, rate=args.rate, window=window)
        factories = [(label, functools.partial(bitpit_contender, label, url_list, len(names),
                                               duration, connections, under_test, **shared))
                     for label, under_test in under_tests]
        factories.append(('aria2c', lambda: aria2c_contender(
            url_list, len(names), duration, connections, args.install, **shared)))
        contenders, skipped = common.gather(factories)
        outcomes = common.run_interleaved(contenders, args.runs, warmup=0)
        return outcomes, skipped, server.description


def report_case(case: str, description: str, outcomes: Dict[str, common.Outcome],
                skipped: Dict[str, str], names: List[str], runs: int, per_file: bool,
                first_second: int) -> None:
    """The case's table of medians, and every run's per-second aggregates
    (with ``per_file``, each second on a line of its own, counted from
    ``first_second``, with what landed in each file)."""
    print('\n== {}: {}, {} runs each, interleaved'.format(case, description, runs))
    print(common.report_contenders(outcomes, skipped, [
        ('min', 'min', '{:.3f}'), ('max', 'max', '{:.3f}'), ('window', 'fraction', '{:.3f}'),
        ('landed', 'landed', '{:.3f}'), ('written', 'written', '{:.3f}'),
        ('server-side', 'server_fraction', '{:.3f}'),
        ('CPU s', 'cpu_seconds', '{:.3f}')] + [
        (Path(name).name + ' MiB/s', 'MiB/s ' + name, '{:.2f}') for name in names]))
    for label, outcome in outcomes.items():
        for number, run in enumerate(outcome.runs, 1):
            print('  {} run {}: {}'.format(label, number, ' '.join(
                '{:.3f}'.format(share) for share in run['per_second'])))
            if per_file:
                for second, (share, files) in enumerate(zip(run['per_second'], run['per_file']),
                                                        first_second):
                    print('    second {}-{}: {:.3f}, MiB/s per file {}'.format(
                        second, second + 1, share, ' '.join('{:.2f}'.format(f) for f in files)))
        if outcome.runs:
            print('  {}: worst second of all runs {:.3f}, best {:.3f}'.format(
                label, min(run['min'] for run in outcome.runs),
                max(run['max'] for run in outcome.runs)))


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0], runs=3, warmup=None, server=False,
                                baseline=True)
    parser.add_argument('--case', type=parse_case, action='append', metavar='NAME[-xN]',
                        help='which server sends the slow member, and connections per '
                             'download (repeatable; default: {})'.format(' '.join(DEFAULT_CASES)))
    parser.add_argument('--rate', type=common.parse_size, default=4 * MiB,
                        help='total limit in bytes/s (default 4M)')
    parser.add_argument('--slow-rate', type=common.parse_size, default=256 * KiB,
                        help="the server's cap on the slow download, per request (default 256k)")
    parser.add_argument('--size', type=common.parse_size, default=40 * MiB,
                        help='size of each fast file (default 40M)')
    parser.add_argument('--slow-size', type=common.parse_size, default=10 * MiB,
                        help='size of the slow file (default 10M)')
    parser.add_argument('--downloads', type=int, default=4,
                        help='downloads at once, one of them slow (default %(default)s)')
    parser.add_argument('--window', type=int, nargs=2, default=(1, 10), metavar=('FROM', 'TO'),
                        help='whole seconds after the first write to judge (default 1 10)')
    parser.add_argument('--per-file', action='store_true',
                        help="also print every second of every run with each file's MiB/s")
    args = parser.parse_args(argv)
    cases = args.case or [parse_case(case) for case in DEFAULT_CASES]

    names = ['fast{}.bin'.format(i) for i in range(1, args.downloads)]
    names.insert(1, SLOW_PATH)
    goals: List[Goal] = []
    all_outcomes: Dict[str, common.Outcome] = {}
    all_skipped: Dict[str, str] = {}
    with common.workspace(args.tmp) as tmp:
        docroot = tmp / 'www'
        (docroot / SLOW_PATH).parent.mkdir(parents=True)
        (tmp / 'out').mkdir()
        under_tests = [('bitpit', common.load_bitpit(args.bitpit, tmp, 'Downloader', 'Manager'))]
        baseline = common.load_baseline(args, tmp, 'Downloader', 'Manager')
        if baseline is not None:
            under_tests.append(('bitpit baseline', baseline))
        for name in names:  # sparse: the same bytes for every server
            common.make_file(docroot / name, args.slow_size if name == SLOW_PATH else args.size,
                             sparse=True)
        for kind, connections in cases:
            case = kind if connections == 1 else '{}-x{}'.format(kind, connections)
            try:
                outcomes, skipped, description = run_case(args, tmp, names, case, kind,
                                                          connections, under_tests)
            except Skipped as exc:
                all_skipped[case] = str(exc)
                common.note('skipping case {}: {}'.format(case, exc))
                continue
            report_case(case, description, outcomes, skipped, names, args.runs, args.per_file,
                        args.window[0])
            low = common.median_of(outcomes, 'bitpit', 'min')
            high = common.median_of(outcomes, 'bitpit', 'max')
            goals += [Goal('{}: bitpit min second / limit'.format(case), low, LOW, at_most=False),
                      Goal('{}: bitpit max second / limit'.format(case), high, HIGH)]
            all_outcomes.update(('{}: {}'.format(case, label), outcome)
                                for label, outcome in outcomes.items())
            all_skipped.update(('{}: {}'.format(case, label), reason)
                               for label, reason in skipped.items())

    print('\ntotal limit: {} downloads ({} of {}, one of {} at {}/s per request), total {}/s, '
          'seconds {}-{} after the first write, {} runs each'.format(
              args.downloads, args.downloads - 1, common.fmt_size(args.size),
              common.fmt_size(args.slow_size), common.fmt_size(args.slow_rate),
              common.fmt_size(args.rate), args.window[0], args.window[1], args.runs))
    for label, under_test in under_tests:
        print('{}: {}'.format(label, under_test.skip or under_test.description))
    print('(min / max: the lowest and highest aggregate of a whole second, median over the '
          'runs; window: over all those seconds; for bitpit from the sum of its downloads\' '
          '`downloaded`, sampled in the child, for aria2c from what landed in its files. Over '
          'the window: landed: the data extents of the files, also per file MiB/s; written: '
          'write_bytes of /proc/PID/io, which counts a 4 KiB page for each of bitpit\'s '
          'sidecar saves, one a second per download; server-side: what the Python server '
          'sent)')
    print('\n'.join(goal.line() for goal in goals))
    return common.finish(args.json, {
        'benchmark': 'total_limit', 'rate': args.rate, 'slow_rate': args.slow_rate,
        'downloads': args.downloads, 'window': args.window, 'runs': args.runs,
        'cases': [list(case) for case in cases],
        'bitpit': [under_test.skip or under_test.description for _, under_test in under_tests]},
        all_outcomes, all_skipped, goals)


if __name__ == '__main__':
    sys.exit(common.run_main(main))
