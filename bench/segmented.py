#!/usr/bin/env python3
"""Segmented downloads: bitpit with 4 connections (and a mirror) vs 1, aria2c, curl.

One file (10 MiB by default) is fetched over 127.0.0.1 from servers that cap
each connection, so a client that splits it into byte ranges over several
connections can finish several times sooner. Six scenarios, each a section
(or several) of the report with its own contenders, medians and goals
(issues: segmented transfers, 18):

    nginx-limit      nginx, ``limit_rate 1m`` (per request; nginx gives
                     each request about one second of credit at its start):
                     bitpit x4, bitpit x1, aria2c -x4, curl
                         bitpit x4 / aria2c -x4 (wall time) <= 1.0
    pacer            our strict pacer, 1 MiB/s per connection, no credit:
                     the same four contenders
                         speed-up bitpit x1 / bitpit x4 >= 3.8
    mirrors          two strict pacers (two ports, the same file): bitpit x4
                     with the second as a mirror, bitpit x1 on the first,
                     aria2c -x4 with both URIs
                         speed-up bitpit x1 / bitpit x4 + mirror >= 3.8
    slow-connection  a strict pacer whose first connection of each run (the
                     probe) gets 128 KiB/s, every other 1 MiB/s; the ideal is
                     size / (sum of the 4 connections' rates) = 3.2 s:
                     bitpit x4, aria2c -x4
                         bitpit x4 / ideal (wall time) <= 1.3
    small-slow       a strict pacer at 8 MiB/s per connection, one at 1 MiB/s
                     (the first: the probe; then the third), files of 4 and
                     10 MiB, one section each; ideal: size / 25 MiB/s:
                     bitpit x4, aria2c -x4
                         bitpit x4 / ideal (the transfer alone) <= 1.3
    big              1 GiB from nginx without a limit: bitpit x4, bitpit x1
                         bitpit x4 / x1 (wall time) <= 1.0,  x4 peak RSS <= 30 MB

bitpit runs as a user would write it, ``d = bitpit.Downloader(url, path=out,
connections=4, mirrors=[...]); d.start(); d.join(timeout)``, each run in a
fresh process; aria2c runs as ``aria2c -x4 -s4 -k1M``. Runs are interleaved
and every output is compared with the served file's SHA-256. With
``--baseline PATH``, the slow-connection scenarios also run "bitpit x4
baseline": the same with that bitpit.py (e.g. the engine before a change).

Example: ``python bench/segmented.py --runs 3`` (about 5 minutes);
quick: ``python bench/segmented.py --runs 1 --skip-big``; one scenario
against another bitpit.py:
``python bench/segmented.py --scenario slow-connection --bitpit ../main/bitpit.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from common import (BenchError, Contender, Goal, KiB, MiB, Outcome,  # noqa: E402
                    PacingFileServer, Skipped)

SCENARIOS = ('nginx-limit', 'pacer', 'mirrors', 'slow-connection', 'small-slow', 'big')

#: Connections of the segmented contenders (bitpit xN, aria2c -xN -sN).
CONNECTIONS = 4

#: Does this bitpit take ``connections=`` and ``mirrors=``? (Until the
#: segmented engine lands, Downloader raises TypeError for them.)
PROBE_CODE = '''
import json, sys, bitpit
try:
    bitpit.Downloader('http://127.0.0.1:9/probe.bin', path=sys.argv[1], connections=2,
                      mirrors=['http://127.0.0.1:9/mirror/probe.bin'])
except Exception as exc:
    print(json.dumps({'segmented': False, 'reason': '{}: {}'.format(type(exc).__name__, exc)}))
else:
    print(json.dumps({'segmented': True}))
'''


@dataclasses.dataclass
class Target:
    """The served file and where each contender writes its copy."""
    name: str
    size: int
    sha256: str
    out: Path

    @property
    def leftovers(self) -> List[Path]:
        """What a run may leave beside the output (aria2c's control file)."""
        return [self.out, self.out.with_name(self.out.name + '.aria2')]


@dataclasses.dataclass
class Section:
    """One scenario's results, as printed and written to JSON."""
    name: str
    heading: str
    outcomes: Dict[str, Outcome]
    skipped: Dict[str, str]
    goals: List[Goal]
    columns: List[tuple]
    notes: List[str] = dataclasses.field(default_factory=list)
    record: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def report(self, runs: int) -> str:
        lines = ['', '== {}: {}, {} runs each, interleaved'.format(self.name, self.heading, runs),
                 common.report_contenders(self.outcomes, self.skipped, self.columns)]
        lines += self.notes
        lines += [''] + [goal.line() for goal in self.goals]
        return '\n'.join(lines)


#: A server that counts what it sent: a PacingFileServer, or an NginxServer
#: with log_requests.
Server = Union[PacingFileServer, common.NginxServer]


def reset(target: Target, servers: Sequence[Server], sync: bool, warm: bool) -> None:
    """Delete the output (and any aria2c control file), forget what the
    servers counted; with ``sync``, flush dirty pages too (large files),
    and with ``warm`` warm the page cache (``common.warm_page_cache``)."""
    for path in target.leftovers:
        common.remove(path)
    if sync:
        common.remove_and_sync(target.out, common.warm_size(target.size) if warm else 0)
    for server in servers:
        server.reset()


def server_metrics(servers: Sequence[Server], size: int) -> Dict[str, Any]:
    """What the servers saw in one run: connections, GET requests, body
    bytes sent / file size, and with two servers the second one's share."""
    traffic = [server.traffic() for server in servers]
    sent = sum(t['bytes'] for t in traffic)
    metrics: Dict[str, Any] = {
        'conns': sum(t['conns'] for t in traffic),
        'requests': sum(t['requests'] for t in traffic),
        'served': sent / size}
    if len(servers) > 1:
        metrics['second_share'] = traffic[1]['bytes'] / sent if sent else None
    return metrics


def check_run(result: common.RunResult, target: Target, servers: Sequence[Server],
              measure: Optional[Callable[[], Dict[str, Any]]]) -> Dict[str, Any]:
    """A run succeeded when it exited 0 and its output is byte for byte the
    served file (size, then SHA-256). Returns the child's own metrics, what
    the servers saw, and ``measure()``."""
    if result.returncode != 0 or result.timed_out:
        raise BenchError(result.failure())
    held = target.out.stat().st_size if target.out.exists() else None
    if held != target.size:
        raise BenchError('output holds {} bytes, expected {}'.format(held, target.size))
    if common.file_sha256(target.out) != target.sha256:
        raise BenchError('output differs from the served file (SHA-256)')
    metrics = dict(result.info)
    if servers:
        metrics.update(server_metrics(servers, target.size))
    if measure is not None:
        metrics.update(measure())
    return metrics


class Bench:
    """What the scenarios share: options, workspace, served files, tools and
    the bitpit under test (a copy of ``--bitpit`` in the workspace, so that
    edits to the original during a run change nothing)."""

    def __init__(self, args: Any, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.docroot, self.outdir = tmp / 'www', tmp / 'out'
        for path in (self.docroot, self.outdir):
            path.mkdir()
        self.under_test = common.load_bitpit(args.bitpit, tmp, 'Downloader')
        self.env = self.under_test.env
        # why every bitpit contender is skipped
        self.bitpit_skip: Optional[str] = self.under_test.skip
        self.segmented_skip: Optional[str] = None  # why connections= / mirrors= are
        self.bitpit_description = self.under_test.description
        self._targets: Dict[str, Target] = {}
        if not self.bitpit_skip:
            self._probe_segmented()
        # --baseline: another bitpit.py, measured beside the one under test
        self.baseline = common.load_baseline(args, tmp, 'Downloader')

    def _probe_segmented(self) -> None:
        """Does the bitpit under test take ``connections=`` / ``mirrors=``?"""
        probe = self.tmp / 'probe.bin'
        try:
            done = subprocess.run(common.python_command(PROBE_CODE, probe), env=self.env,
                                  cwd=str(self.tmp), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            answer = json.loads(done.stdout.decode().strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            answer = {'segmented': False, 'reason': 'the probe failed: {!r}'.format(exc)}
        finally:
            common.remove(probe)
        if not answer['segmented']:
            self.segmented_skip = ('Downloader does not take connections= / mirrors= yet ({})'
                                   .format(answer['reason']))

    def target(self, name: str, size: int) -> Target:
        """The served file ``name`` of ``size`` bytes, made on first use
        (every 4 KiB unique, so that a misplaced range shows in the hash)."""
        if name not in self._targets:
            common.note('creating {} ({}) ...'.format(name, common.fmt_size(size)))
            path = common.make_file(self.docroot / name, size, unique=True)
            self._targets[name] = Target(name, size, common.file_sha256(path),
                                         self.outdir / name)
        return self._targets[name]

    def tool(self, name: str, package: Optional[str] = None) -> str:
        """The path of ``name``, installed if allowed, or ``Skipped``."""
        path = common.find_tool(name, package=package, install=self.args.install)
        if not path:
            raise Skipped('{} is not installed'.format(name))
        return path

    def contender(self, name: str, command: List[str], target: Target, timeout: float,
                  servers: Sequence[Server] = (), sync: bool = False,
                  measure: Optional[Callable[[], Dict[str, Any]]] = None,
                  env: Optional[Dict[str, str]] = None) -> Contender:
        return Contender(name, command, timeout,
                         reset=functools.partial(reset, target, servers, sync,
                                                 self.args.warm),
                         check=functools.partial(check_run, target=target, servers=servers,
                                                 measure=measure),
                         env=env, cwd=self.outdir)

    def bitpit(self, name: str, url: str, target: Target, timeout: float, connections: int,
               mirrors: Sequence[str] = (), under_test: Optional[common.BitpitUnderTest] = None,
               **kwargs: Any) -> Contender:
        """``bitpit.Downloader(url, path=out, connections=N, mirrors=[...])``.
        While bitpit has no ``connections=``, a one-connection contender
        runs with the defaults instead (that is one connection) and the
        others are skipped. ``under_test`` (the baseline) runs another
        bitpit.py, which must take the options."""
        options: Dict[str, Any] = {}
        if under_test is not None:
            under_test.require()
            env = under_test.env
            options['connections'] = connections
        else:
            if self.bitpit_skip:
                raise Skipped(self.bitpit_skip)
            env = self.env
            if self.segmented_skip is None:
                options['connections'] = connections
            elif connections != 1 or mirrors:
                raise Skipped(self.segmented_skip)
        if mirrors:
            options['mirrors'] = list(mirrors)
        command = common.python_command(common.DOWNLOADER_CODE, url, target.out, timeout * 0.9,
                                        json.dumps(options))
        return self.contender(name, command, target, timeout, env=env, **kwargs)

    def baseline_factory(self, name: str, url: str, **kwargs: Any) -> List[tuple]:
        """With ``--baseline``, the factory of contender ``name + '
        baseline'``, the same bitpit run with the baseline's bitpit.py;
        else nothing."""
        if self.baseline is None:
            return []
        label = name + ' baseline'
        return [(label, lambda: self.bitpit(label, url, under_test=self.baseline, **kwargs))]

    def aria2c(self, name: str, urls: Sequence[str], target: Target, timeout: float,
               **kwargs: Any) -> Contender:
        """``aria2c -x4 -s4 -k1M URL [URL2]``, no config file, no disk cache."""
        command = [self.tool('aria2c', package='aria2'), '--no-conf', '-q',
                   '-x{}'.format(CONNECTIONS), '-s{}'.format(CONNECTIONS), '-k1M',
                   '--disk-cache=0', '--allow-overwrite=true', '--auto-file-renaming=false',
                   '-d', str(self.outdir), '-o', target.name, *urls]
        return self.contender(name, command, target, timeout, **kwargs)

    def curl(self, name: str, url: str, target: Target, timeout: float,
             **kwargs: Any) -> Contender:
        """``curl -s -o out URL``: one connection."""
        command = [self.tool('curl'), '-s', '-o', str(target.out), url]
        return self.contender(name, command, target, timeout, **kwargs)

    def run(self, factories: Sequence[tuple]) -> tuple:
        """Build the contenders and run them interleaved."""
        contenders, skipped = common.gather(factories)
        return common.run_interleaved(contenders, self.args.runs, self.args.warmup), skipped

    def x1_note(self) -> List[str]:
        if self.segmented_skip is None or self.bitpit_skip:
            return []
        return ['bitpit x1 ran with the default settings (no connections= yet): one connection']


COLUMNS = [('median s', 'seconds', '{:.3f}'), *common.CPU_COLUMNS,
           ('MiB/s', 'mib_per_s', '{:.2f}'), ('peak RSS MiB', 'peak_rss_mib', '{:.1f}'),
           ('in-process s', 'transfer_s', '{:.3f}')]
SERVER_COLUMNS = [('conns', 'conns', '{:.0f}'), ('requests', 'requests', '{:.0f}'),
                  ('served', 'served', '{:.3f}')]


def with_speed(outcomes: Dict[str, Outcome], size: int) -> Dict[str, Outcome]:
    common.derive(outcomes, 'mib_per_s', lambda run: size / MiB / run['seconds'])
    return outcomes


def paced_timeout(bench: Bench, target: Target) -> float:
    """Seconds before one run at the per-connection rate is killed."""
    return bench.args.timeout or 30 + 3 * target.size / bench.args.rate


def limited_section(bench: Bench, name: str, server: Server, target: Target) -> Section:
    """Scenarios nginx-limit and pacer: x4, x1, aria2c -x4 and curl on one
    server that caps each request (nginx) or each connection (pacer)."""
    url, timeout = server.url(target.name), paced_timeout(bench, target)
    common.note('{}: {} from {}'.format(name, url, server.description))
    shared = dict(target=target, timeout=timeout, servers=[server])
    x4, x1 = 'bitpit x{}'.format(CONNECTIONS), 'bitpit x1'
    aria2c = 'aria2c -x{}'.format(CONNECTIONS)
    outcomes, skipped = bench.run([
        (x4, lambda: bench.bitpit(x4, url, connections=CONNECTIONS, **shared)),
        (x1, lambda: bench.bitpit(x1, url, connections=1, **shared)),
        (aria2c, lambda: bench.aria2c(aria2c, [url], **shared)),
        ('curl', lambda: bench.curl('curl', url, **shared)),
    ])
    with_speed(outcomes, target.size)
    if isinstance(server, PacingFileServer):
        goals = [Goal('pacer: speed-up x1 / x4 (wall)', common.ratio(outcomes, x1, x4), 3.8,
                      at_most=False)]
        heading = '{} from the strict pacer, {}/s per connection, no credit'.format(
            common.fmt_size(target.size), common.fmt_size(bench.args.rate))
    else:
        goals = [Goal('nginx-limit: bitpit x4 / aria2c', common.ratio(outcomes, x4, aria2c), 1.0)]
        heading = '{} from {}'.format(common.fmt_size(target.size), server.description)
    notes = bench.x1_note()
    single = common.median_of(outcomes, 'curl', 'seconds')
    if single is not None:
        notes.append('one connection at the cap would take {:.3f} s; curl took {:.3f} s'.format(
            target.size / bench.args.rate, single))
    return Section(name, heading, outcomes, skipped, goals, COLUMNS + SERVER_COLUMNS, notes,
                   {'server': server.description, 'rate': bench.args.rate})


def scenario_nginx_limit(bench: Bench) -> List[Section]:
    target = bench.target('paced.bin', bench.args.size)
    binary = bench.tool('nginx')
    with common.NginxServer(bench.docroot, binary, limit_rate=bench.args.rate,
                            log_requests=True) as server:
        return [limited_section(bench, 'nginx-limit', server, target)]


def scenario_pacer(bench: Bench) -> List[Section]:
    target = bench.target('paced.bin', bench.args.size)
    with PacingFileServer(bench.docroot, bench.args.rate) as server:
        return [limited_section(bench, 'pacer', server, target)]


def scenario_mirrors(bench: Bench) -> List[Section]:
    """Two pacers on two ports serving the same docroot (so the same ETag
    and Last-Modified); bitpit x4 with the second as a mirror vs x1."""
    target = bench.target('paced.bin', bench.args.size)
    timeout = paced_timeout(bench, target)
    with PacingFileServer(bench.docroot, bench.args.rate) as first, \
            PacingFileServer(bench.docroot, bench.args.rate) as second:
        urls = [first.url(target.name), second.url(target.name)]
        common.note('mirrors: {} and {}'.format(*urls))
        shared = dict(target=target, timeout=timeout, servers=[first, second])
        x4 = 'bitpit x{} + mirror'.format(CONNECTIONS)
        aria2c = 'aria2c -x{} 2 URIs'.format(CONNECTIONS)
        outcomes, skipped = bench.run([
            (x4, lambda: bench.bitpit(x4, urls[0], connections=CONNECTIONS, mirrors=urls[1:],
                                      **shared)),
            ('bitpit x1', lambda: bench.bitpit('bitpit x1', urls[0], connections=1, **shared)),
            (aria2c, lambda: bench.aria2c(aria2c, urls, **shared)),
        ])
    with_speed(outcomes, target.size)
    goals = [Goal('mirrors: speed-up x1 / x4+mirror', common.ratio(outcomes, 'bitpit x1', x4),
                  3.8, at_most=False)]
    heading = '{} from two strict pacers (two ports, the same file), {}/s per connection'.format(
        common.fmt_size(target.size), common.fmt_size(bench.args.rate))
    return [Section('mirrors', heading, outcomes, skipped, goals,
                   COLUMNS + SERVER_COLUMNS + [('2nd share', 'second_share', '{:.2f}')],
                   bench.x1_note() + ['2nd share: the part of the bytes the second server sent'],
                   {'rate': bench.args.rate})]


def slow_section(bench: Bench, name: str, target: Target, rate: float, slow_rate: float,
                 slow: int, judged: str) -> Section:
    """A strict pacer whose connection ``slow`` of each run (1 = the first:
    the probe, which holds the lowest range) runs at ``slow_rate``, the
    others at ``rate``: bitpit x4 (and its baseline), aria2c -x4. The goal
    is ``judged`` (``'per_ideal'``: wall time, or ``'transfer_per_ideal'``:
    bitpit's transfer alone) / ideal <= 1.3."""
    def rate_for(number: int) -> float:
        return slow_rate if number == slow else rate

    rates = [rate_for(number) for number in range(1, CONNECTIONS + 1)]
    ideal = target.size / sum(rates)
    with PacingFileServer(bench.docroot, rate_for) as server:
        url = server.url(target.name)
        common.note('{}: {}, connection {} of each run at {}/s, the others at {}/s'.format(
            name, url, slow, common.fmt_size(slow_rate), common.fmt_size(rate)))

        def measure() -> Dict[str, Any]:
            stats = server.connections.get(slow)
            return {'slow_mib': stats['bytes'] / MiB if stats else 0.0}

        shared = dict(target=target, timeout=paced_timeout(bench, target), servers=[server],
                      measure=measure)
        x4, aria2c = 'bitpit x{}'.format(CONNECTIONS), 'aria2c -x{}'.format(CONNECTIONS)
        outcomes, skipped = bench.run([
            (x4, lambda: bench.bitpit(x4, url, connections=CONNECTIONS, **shared)),
            *bench.baseline_factory(x4, url, connections=CONNECTIONS, **shared),
            (aria2c, lambda: bench.aria2c(aria2c, [url], **shared)),
        ])
    with_speed(outcomes, target.size)
    common.derive(outcomes, 'per_ideal', lambda run: run['seconds'] / ideal)
    common.derive(outcomes, 'transfer_per_ideal',
                  lambda run: run['transfer_s'] / ideal if 'transfer_s' in run else None)
    what = 'wall' if judged == 'per_ideal' else 'in-process'
    goals = [Goal('{}: bitpit x4 / ideal ({})'.format(name, what),
                  common.median_of(outcomes, x4, judged), 1.3)]
    heading = ('{} from the strict pacer, connection {} of each run at {}/s, the others at {}/s'
               .format(common.fmt_size(target.size), slow, common.fmt_size(slow_rate),
                       common.fmt_size(rate)))
    notes = ['ideal: {} / ({}) = {:.3f} s, all {} connections busy to the end'.format(
        common.fmt_size(target.size), ' + '.join(common.fmt_size(r) + '/s' for r in rates), ideal,
        CONNECTIONS),
        'slow MiB: what the slow connection sent; / ideal: wall time / ideal, '
        'in-process / ideal: the transfer alone (bitpit)']
    for contender, outcome in outcomes.items():
        carried = outcome.median('slow_mib')  # a client that races it may end it early
        if carried is not None and carried * MiB < slow_rate * ideal / 2:
            notes.append('{}: connection {} sent only {} (median), so no slow connection held a '
                         'range; make a later one the slow connection ({})'.format(
                             contender, slow, common.fmt_size(carried * MiB), slow + 1))
    return Section(name, heading, outcomes, skipped, goals,
                   [('median s', 'seconds', '{:.3f}'), ('CPU s', 'cpu_seconds', '{:.3f}'),
                    ('/ ideal', 'per_ideal', '{:.3f}'),
                    ('in-process / ideal', 'transfer_per_ideal', '{:.3f}')]
                   + SERVER_COLUMNS + [('slow MiB', 'slow_mib', '{:.2f}')], notes,
                   {'ideal_s': ideal, 'rates': rates, 'slow_connection': slow,
                    'size': target.size})


def scenario_slow_connection(bench: Bench) -> List[Section]:
    """10 MiB at 1 MiB/s per connection, one connection at 128 KiB/s."""
    args = bench.args
    return [slow_section(bench, 'slow-connection', bench.target('paced.bin', args.size),
                         args.rate, args.slow_rate, args.slow_connection, 'per_ideal')]


def scenario_small_slow(bench: Bench) -> List[Section]:
    """Issue 18: 8 MiB/s per connection, one at 1 MiB/s; files so small (4
    and 10 MiB) that the fast connections' ranges end within about 0.15 s,
    before a rate is told over a quarter of a second. One section per size
    and slow connection (the probe, and another). The ideal is so short
    (0.16 s for 4 MiB) that start-up would dominate the wall time, so the
    goal is on bitpit's transfer alone; aria2c's wall time includes its
    start-up (a few ms)."""
    args = bench.args
    return [slow_section(bench, 'small-slow {} conn {}'.format(common.fmt_size(size), slow),
                         bench.target('small-{}.bin'.format(size), size), args.small_rate,
                         args.small_slow_rate, slow, 'transfer_per_ideal')
            for size in args.small_sizes for slow in args.small_slow_connections]


def scenario_big(bench: Bench) -> List[Section]:
    """A large file from nginx without a limit: do 4 connections cost
    anything when one is already as fast as the machine?"""
    size = bench.args.big_size
    binary = bench.tool('nginx')
    target = bench.target('big.bin', size)
    timeout = bench.args.timeout or 60 + size / (20 * MiB)
    with common.NginxServer(bench.docroot, binary, log_requests=True) as server:
        url = server.url(target.name)
        common.note('big: {} from {}'.format(url, server.description))
        shared = dict(target=target, timeout=timeout, servers=[server], sync=True)
        x4 = 'bitpit x{}'.format(CONNECTIONS)
        outcomes, skipped = bench.run([
            (x4, lambda: bench.bitpit(x4, url, connections=CONNECTIONS, **shared)),
            ('bitpit x1', lambda: bench.bitpit('bitpit x1', url, connections=1, **shared)),
        ])
        description = server.description
    with_speed(outcomes, size)
    rss = common.median_of(outcomes, x4, 'peak_rss_mib')
    goals = [Goal('big: bitpit x4 / x1 (wall time)', common.ratio(outcomes, x4, 'bitpit x1'), 1.0),
             Goal('big: bitpit x4 peak RSS (MB)', None if rss is None else rss * MiB / 1e6, 30,
                  unit=' MB')]
    notes = bench.x1_note() + [
        'peak RSS: wait4 of each run; the floor of that measurement is {:.1f} MiB'.format(
            common.rss_floor_mib())]
    best = common.best_ratio(outcomes, x4, 'bitpit x1')
    if best is not None:
        notes.append('bitpit x4 / x1 (best runs): {:.3f} (for information)'.format(best))
    return [Section('big', '{} from {}'.format(common.fmt_size(size), description), outcomes,
                    skipped, goals, COLUMNS + SERVER_COLUMNS, notes, {'size': size})]


RUNNERS = {'nginx-limit': scenario_nginx_limit, 'pacer': scenario_pacer,
           'mirrors': scenario_mirrors, 'slow-connection': scenario_slow_connection,
           'small-slow': scenario_small_slow, 'big': scenario_big}


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0], runs=3, warmup=0, server=False,
                                baseline=True)
    parser.add_argument('--scenario', action='append', choices=SCENARIOS,
                        help='run only this scenario (repeatable; default: all)')
    parser.add_argument('--size', type=common.parse_size, default=10 * MiB,
                        help='size of the paced file (default 10M)')
    parser.add_argument('--rate', type=common.parse_size, default=MiB,
                        help='cap per connection (pacer) or request (nginx), bytes/s (default 1M)')
    parser.add_argument('--slow-rate', type=common.parse_size, default=128 * KiB,
                        help='rate of the slow connection (default 128k)')
    parser.add_argument('--slow-connection', type=common.positive_int, default=1, metavar='N',
                        help='which connection of a run is slow, 1 = the first (default 1)')
    parser.add_argument('--small-sizes', type=common.parse_size, nargs='+',
                        default=[4 * MiB, 10 * MiB], metavar='SIZE',
                        help='small-slow: the file sizes (default 4M 10M)')
    parser.add_argument('--small-rate', type=common.parse_size, default=8 * MiB,
                        help='small-slow: rate of every fast connection (default 8M)')
    parser.add_argument('--small-slow-rate', type=common.parse_size, default=MiB,
                        help='small-slow: rate of the slow connection (default 1M)')
    parser.add_argument('--small-slow-connections', type=common.positive_int, nargs='+',
                        default=[1, 3], metavar='N',
                        help='small-slow: which connection is slow, one section each '
                             '(default 1 3: the probe, and the third)')
    parser.add_argument('--big-size', type=common.parse_size, default=common.GiB,
                        help='size of the unlimited file of scenario big (default 1G)')
    parser.add_argument('--skip-big', action='store_true', help='leave scenario big out')
    parser.add_argument('--no-warm', dest='warm', action='store_false',
                        help='big: do not write and delete a file of the size before each run '
                             '(see common.warm_page_cache)')
    parser.add_argument('--timeout', type=float, default=0,
                        help='seconds before one run is killed (default: 30 + 3 x size / rate; '
                             'big: 60 + 1 s per 20 MiB)')
    args = parser.parse_args(argv)
    chosen = [name for name in SCENARIOS if name in (args.scenario or SCENARIOS)
              and not (name == 'big' and args.skip_big)]
    if not chosen:
        parser.error('no scenario left to run')

    sections: List[Section] = []
    skipped_scenarios: Dict[str, str] = {}
    with common.workspace(args.tmp) as tmp:
        bench = Bench(args, tmp)
        common.note('bitpit: ' + (bench.bitpit_skip or bench.bitpit_description))
        if bench.segmented_skip and not bench.bitpit_skip:
            common.note('bitpit: ' + bench.segmented_skip)
        for name in chosen:
            common.note('\n{} ...'.format(name))
            try:
                done = RUNNERS[name](bench)
            except Skipped as exc:
                skipped_scenarios[name] = str(exc)
                common.note('skipping scenario {}: {}'.format(name, exc))
                continue
            for section in done:
                sections.append(section)
                print(section.report(args.runs), flush=True)

    print('\nsegmented: {}'.format(bench.bitpit_description))
    if bench.baseline is not None:
        print('baseline: {}'.format(bench.baseline.skip or bench.baseline.description))
    for name, reason in skipped_scenarios.items():
        print('scenario {}: skipped, {}'.format(name, reason))
    outcomes, skipped, goals = common.merge_sections(sections)
    print('\n'.join(goal.line() for goal in goals))
    skipped.update(('{}: (all)'.format(name), reason) for name, reason in skipped_scenarios.items())
    return common.finish(args.json, {
        'benchmark': 'segmented', 'bitpit': bench.bitpit_description, 'runs': args.runs,
        'baseline': bench.baseline and (bench.baseline.skip or bench.baseline.description),
        'size': args.size, 'rate': args.rate, 'slow_rate': args.slow_rate,
        'connections': CONNECTIONS,
        'sections': {s.name: dict(s.record, heading=s.heading, notes=s.notes) for s in sections}},
        outcomes, skipped, goals)


if __name__ == '__main__':
    sys.exit(common.run_main(main))
