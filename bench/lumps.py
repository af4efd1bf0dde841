#!/usr/bin/env python3
"""Bytes that land smoothly: a rate-limited download's growth in its file, bitpit vs wget and curl.

A download limited to R bytes/s should put about R/4 bytes into its file
in every quarter of a second, not a second's worth at once. The benchmark
samples, every 10 ms from its own process while the client runs in a child
process, the bytes that have landed in the output file: its data extents
(``SEEK_DATA`` / ``SEEK_HOLE``), since bitpit reserves a large file at its
full size first, which makes ``st_size`` useless (a small file, or a file
that grows as it is written, has one extent up to its size: byte for
byte). The measure is the largest growth in any 250 ms window that starts
a second or more after the server sent the first byte, over a quarter
second's worth of the rate. Cases (issue 18):

    10,102 bytes at 2 KiB/s, 10,102 bytes at 4 KiB/s, 4 MiB at 2 MiB/s
        bitpit: largest 250 ms growth / (rate / 4) <= 1.3

Contenders: ``bitpit.Downloader(url, path=out, rate_limit=R)`` (and the
``--baseline`` bitpit.py), ``wget --limit-rate=R``, ``curl --limit-rate
R``, each run in a fresh process, interleaved. The file is served by the
Python server (unlimited, 16 KiB per ``sendfile``, a log of what it sent).

Example: ``python bench/lumps.py --runs 5 --bitpit ../main/bitpit.py``
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from common import BenchError, Contender, Goal, KiB, MiB, Skipped  # noqa: E402

#: The measure's window and how late it may start.
WINDOW = 0.25
SETTLE = 1.0
GOAL = 1.3


class LandedSampler(common.PeriodicSampler):
    """While active, records every ``period`` s the bytes landed in
    ``path`` (``common.landed``) as ``(monotonic time, bytes)``."""

    def __init__(self, path: Path, period: float = 0.01):
        super().__init__(period)
        self.path = path

    def sample(self) -> int:
        return common.landed(self.path)


def largest_growth(samples: Sequence[Tuple[float, int]], start: float) -> Tuple[float, float]:
    """The largest growth between two samples at most ``WINDOW`` s apart,
    the first at ``start`` or later (or the last before it, so that bytes
    that landed between it and ``start`` count), and the longest gap
    between samples (s) from there on."""
    worst, gap = 0, 0.0
    for i, (when, held) in enumerate(samples):
        if i + 1 < len(samples) and samples[i + 1][0] <= start:
            continue
        if i + 1 < len(samples):
            gap = max(gap, samples[i + 1][0] - when)
        for later, more in samples[i + 1:]:
            if later - when > WINDOW:
                break
            worst = max(worst, more - held)
    return worst, gap


def measure(result: common.RunResult, server: common.PythonFileServer, sampler: LandedSampler,
            data: bytes, rate: float) -> Dict[str, Any]:
    """Metrics of one run: the largest 250 ms growth a second or more after
    the server's first byte over ``rate / 4`` ('lumps'; ``None`` when the
    file was complete too soon for such a window), the same from the first
    byte on, the time from the first byte to the last landed, the rate the
    bytes landed at over ``rate``, and the longest gap between samples
    (ms)."""
    if result.timed_out or result.returncode != 0:
        raise BenchError(result.failure())
    if sampler.path.read_bytes() != data:
        raise BenchError('the output differs from the served file')
    log = list(server.sent_log)
    if not log:
        raise BenchError('the server sent nothing')
    first = min(entry[0] for entry in log)
    samples = sampler.samples
    full = next((when for when, held in samples if held >= len(data)), None)
    if full is None:
        raise BenchError('the sampler never saw the whole file land')
    worst, gap = largest_growth(samples, first + SETTLE)
    from_first, _ = largest_growth(samples, first)
    return {'lumps': worst / (rate * WINDOW) if full >= first + SETTLE + WINDOW else None,
            'lumps_from_first': from_first / (rate * WINDOW), 'landed_s': full - first,
            'rate_share': len(data) / (full - first) / rate if full > first else None,
            'gap_ms': gap * 1000}


def parse_case(text: str) -> Tuple[int, int]:
    """``'10102@2k'`` -> (10102, 2048): a file size and a rate limit."""
    size, at, rate = text.partition('@')
    if not at:
        raise argparse.ArgumentTypeError('not SIZE@RATE: {!r}'.format(text))
    return common.parse_size(size), common.parse_size(rate)


def run_case(args: Any, tmp: Path, server: common.PythonFileServer,
             under_tests: Sequence[Tuple[str, common.BitpitUnderTest]],
             size: int, rate: int) -> Tuple[Dict[str, common.Outcome], Dict[str, str]]:
    """Every contender on one file at one rate, interleaved."""
    name = 'file-{}.bin'.format(size)
    served = tmp / 'www' / name
    if not served.exists():
        common.make_file(served, size)
    data = served.read_bytes()
    out = tmp / 'out' / name
    url = server.url(name)
    timeout = 30 + 3 * size / rate

    def reset() -> None:
        for path in (out, out.with_name(out.name + '.bitpit')):
            common.remove(path)
        server.sent_log.clear()

    def contender(label: str, command: List[str], env: Optional[Dict[str, str]] = None
                  ) -> Contender:
        sampler = LandedSampler(out)
        return Contender(label, command, timeout, reset=reset,
                         check=functools.partial(measure, server=server, sampler=sampler,
                                                 data=data, rate=rate),
                         monitor=lambda: sampler, env=env, cwd=out.parent)

    def bitpit(label: str, under_test: common.BitpitUnderTest) -> Contender:
        under_test.require()
        return contender(label, common.python_command(common.DOWNLOADER_CODE, url, out,
                                                      timeout * 0.9,
                                                      json.dumps({'rate_limit': rate})),
                         env=under_test.env)

    def tool(label: str, package: str, argv: List[str]) -> Contender:
        path = common.find_tool(label, package=package, install=args.install)
        if not path:
            raise Skipped('{} is not installed'.format(label))
        return contender(label, [path] + argv)

    factories = [(label, functools.partial(bitpit, label, under_test))
                 for label, under_test in under_tests]
    factories += [
        ('wget', lambda: tool('wget', 'wget', ['-q', '-O', str(out),
                                               '--limit-rate={}'.format(rate), url])),
        ('curl', lambda: tool('curl', 'curl', ['-s', '-o', str(out),
                                               '--limit-rate', str(rate), url])),
    ]
    contenders, skipped = common.gather(factories)
    return common.run_interleaved(contenders, args.runs, warmup=args.warmup), skipped


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0], runs=5, warmup=0, server=False,
                                baseline=True)
    parser.add_argument('--case', type=parse_case, action='append', metavar='SIZE@RATE',
                        help='a file size and a rate limit (repeatable; default 10102@2k '
                             '10102@4k 4M@2M)')
    args = parser.parse_args(argv)
    cases = args.case or [(10102, 2 * KiB), (10102, 4 * KiB), (4 * MiB, 2 * MiB)]

    goals: List[Goal] = []
    all_outcomes: Dict[str, common.Outcome] = {}
    all_skipped: Dict[str, str] = {}
    with common.workspace(args.tmp) as tmp:
        (tmp / 'www').mkdir()
        (tmp / 'out').mkdir()
        under_tests = [('bitpit', common.load_bitpit(args.bitpit, tmp, 'Downloader'))]
        baseline = common.load_baseline(args, tmp, 'Downloader')
        if baseline is not None:
            under_tests.append(('bitpit baseline', baseline))
        for label, under_test in under_tests:
            common.note('{}: {}'.format(label, under_test.skip or under_test.description))
        with common.PythonFileServer(tmp / 'www', piece=16 * KiB, log_bytes=True) as server:
            for size, rate in cases:
                case = '{} B at {}/s'.format(size, common.fmt_size(rate))
                common.note('\n{} ...'.format(case))
                outcomes, skipped = run_case(args, tmp, server, under_tests, size, rate)
                print('\n== {}, {} runs each, interleaved'.format(case, args.runs))
                print(common.report_contenders(outcomes, skipped, [
                    ('median s', 'seconds', '{:.3f}'), ('lumps', 'lumps', '{:.3f}'),
                    ('from 0 s', 'lumps_from_first', '{:.3f}'),
                    ('landed in s', 'landed_s', '{:.3f}'), ('landed / rate', 'rate_share', '{:.3f}'),
                    ('max gap ms', 'gap_ms', '{:.0f}')]))
                for label, outcome in outcomes.items():
                    print('  {}: lumps per run {}'.format(label, ' '.join(
                        '-' if run['lumps'] is None else '{:.2f}'.format(run['lumps'])
                        for run in outcome.runs)))
                goals.append(Goal('{}: bitpit lumps'.format(case),
                                  common.median_of(outcomes, 'bitpit', 'lumps'), GOAL))
                all_outcomes.update(('{}: {}'.format(case, label), outcome)
                                    for label, outcome in outcomes.items())
                all_skipped.update(('{}: {}'.format(case, label), reason)
                                   for label, reason in skipped.items())
    print('\nlumps: the largest growth of the landed bytes (data extents) in any {:g} ms '
          'window from {:g} s after the first byte, over a quarter second of the rate ("-": '
          'complete before such a window); from 0 s: the same from the first byte; landed '
          'in s: from the first byte sent to the last landed; landed / rate: size / that / '
          'rate; max gap: the longest time between two samples (every 10 ms)'.format(
              WINDOW * 1000, SETTLE))
    for label, under_test in under_tests:
        print('{}: {}'.format(label, under_test.skip or under_test.description))
    print('\n'.join(goal.line() for goal in goals))
    return common.finish(args.json, {
        'benchmark': 'lumps', 'cases': cases, 'runs': args.runs,
        'bitpit': [under_test.skip or under_test.description for _, under_test in under_tests]},
        all_outcomes, all_skipped, goals)


if __name__ == '__main__':
    sys.exit(common.run_main(main))
