#!/usr/bin/env python3
"""Import time: ``import bitpit`` vs ``import http.client, threading``.

What a program pays for ``import bitpit`` before it downloads anything,
against the least a downloader built on the standard library imports. Each
run is a fresh ``python -S -c "import ..."`` (no ``site``), interleaved and
rotated, started from the small launcher of ``common.run_measured``, which
gives its wall time (spawn to exit), CPU time (user + sys) and peak RSS.
bitpit is imported as after ``pip install``: its copy in the temp dir was
compiled there once (``__pycache__`` beside it, timestamp-checked), the
children run with that dir as their working dir and without
``PYTHONDONTWRITEBYTECODE`` / ``PYTHONPYCACHEPREFIX``, so they read the
standard library's own cached bytecode too. ``python -S -c pass`` shows
the interpreter's own start-up. Goals (issue 13):

    import bitpit / import http.client, threading:  wall <= 1.1
    peak RSS: import bitpit - import http.client, threading <= 1.5 MiB

For information, the modules that take longest under ``python -X
importtime -c "import bitpit"`` (medians of a few untimed runs), marked
when the baseline does not import them.

Example: ``python bench/import_time.py --bitpit ../main/bitpit.py``
"""

from __future__ import annotations

import os
import py_compile
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from common import BenchError, Contender, Goal, Skipped  # noqa: E402

BITPIT = 'import bitpit'
BASELINE = 'import http.client, threading'
NOTHING = 'pass'

#: Contender names, in the report's order.
NAMES = {BITPIT: 'import bitpit', BASELINE: 'http.client, threading', NOTHING: 'python -S (pass)'}

#: The environment variables the children run without: bytecode is read
#: (and written) in the usual places, and nothing else is on sys.path.
DROPPED = ('PYTHONDONTWRITEBYTECODE', 'PYTHONPYCACHEPREFIX', 'PYTHONPATH', 'PYTHONHOME',
           'PYTHONSTARTUP', 'PYTHONPROFILEIMPORTTIME', 'PYTHONTRACEMALLOC')


def child_env() -> Dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in DROPPED}


def install_copy(source: Path, lib: Path) -> Path:
    """Copy ``source`` to ``lib/bitpit.py`` and compile it beside, as pip
    does (``__pycache__/bitpit.cpython-XY.pyc``, checked by timestamp).
    Returns the ``.pyc``; ``Skipped`` if the copy does not compile."""
    if not source.is_file():
        raise Skipped('no such file: {}'.format(source))
    lib.mkdir()
    shutil.copyfile(source, lib / 'bitpit.py')
    try:
        return Path(py_compile.compile(str(lib / 'bitpit.py'), doraise=True,
                                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP))
    except py_compile.PyCompileError as exc:
        raise Skipped('bitpit does not compile: {}'.format(exc.msg.strip().splitlines()[-1]))


def check_import(result: common.RunResult) -> Dict[str, Any]:
    if result.returncode != 0 or result.timed_out:
        raise BenchError(result.failure())
    return {}


def contender(code: str, lib: Path, timeout: float) -> Contender:
    """``python -S -c CODE`` in ``lib``."""
    return Contender(NAMES[code], [sys.executable, '-S', '-c', code], timeout,
                     check=check_import, env=child_env(), cwd=lib)


_IMPORTTIME = re.compile(r'import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)')


def importtime(code: str, lib: Path, runs: int) -> Dict[str, Tuple[float, float, int]]:
    """``python -S -X importtime -c CODE``, ``runs`` times: per module, the
    median self and cumulative microseconds and its nesting depth."""
    seen: Dict[str, List[Tuple[int, int, int]]] = {}
    for _ in range(runs):
        try:
            done = subprocess.run([sys.executable, '-S', '-X', 'importtime', '-c', code],
                                  env=child_env(), cwd=str(lib), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        except subprocess.TimeoutExpired:
            raise BenchError('python -X importtime took over 60 s')
        if done.returncode != 0:
            raise BenchError('python -X importtime -c {!r} failed: {}'.format(
                code, done.stderr.decode(errors='replace')[-500:]))
        for match in _IMPORTTIME.finditer(done.stderr.decode(errors='replace')):
            self_us, cumulative_us, indent, name = match.groups()
            seen.setdefault(name, []).append((int(self_us), int(cumulative_us), len(indent) // 2))
    return {name: (statistics.median(v[0] for v in values),
                   statistics.median(v[1] for v in values), values[0][2])
            for name, values in seen.items()}


def importtime_report(bitpit: Dict[str, Tuple[float, float, int]],
                      baseline: Dict[str, Tuple[float, float, int]], top: int) -> List[str]:
    """The ``top`` modules of ``import bitpit`` by their own time, and what
    the modules the baseline does not import cost in all."""
    extra = [name for name in bitpit if name not in baseline]
    lines = ['python -X importtime -c "import bitpit": the {} slowest modules by their own '
             'time (medians, microseconds; + = not imported by "{}")'.format(top, BASELINE)]
    rows = [['{} {}'.format('+' if name in extra else ' ', name), '{:.0f}'.format(self_us),
             '{:.0f}'.format(cumulative_us), depth]
            for name, (self_us, cumulative_us, depth) in
            sorted(bitpit.items(), key=lambda item: -item[1][0])[:top]]
    lines.append(common.format_table(['module', 'self us', 'cumulative us', 'depth'], rows))
    total = bitpit.get('bitpit', (0.0, 0.0, 0))[1]
    lines.append('bitpit cumulative: {:.0f} us; its own code: {:.0f} us; {} modules the baseline '
                 'does not import: {:.0f} us in all ({})'.format(
                     total, bitpit.get('bitpit', (0.0, 0.0, 0))[0], len(extra),
                     sum(bitpit[name][0] for name in extra), ', '.join(sorted(extra)) or '-'))
    return lines


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0], runs=30, warmup=3, server=False)
    parser.add_argument('--importtime-runs', type=int, default=5, metavar='N',
                        help='untimed runs of python -X importtime (default %(default)s, 0: none)')
    parser.add_argument('--top', type=int, default=12,
                        help='modules to list from -X importtime (default %(default)s)')
    args = parser.parse_args(argv)

    importtimes: Dict[str, Any] = {}
    with common.workspace(args.tmp) as tmp:
        lib = tmp / 'lib'
        source = Path(args.bitpit)
        skipped: Dict[str, str] = {}
        factories = [(NAMES[code], lambda code=code: contender(code, lib, 30))
                     for code in (BASELINE, NOTHING)]
        pyc: Optional[Path] = None
        identity = 'bitpit.py copied from {}'.format(source.resolve())
        try:
            pyc = install_copy(source, lib)
            identity += ', ' + common.describe_source(source, lib / 'bitpit.py')
            factories.insert(0, (NAMES[BITPIT], lambda: contender(BITPIT, lib, 30)))
        except Skipped as exc:
            lib.mkdir(exist_ok=True)
            skipped[NAMES[BITPIT]] = str(exc)
            common.note('skipping {}: {}'.format(NAMES[BITPIT], exc))
        compiled = pyc.stat().st_mtime_ns if pyc else None
        contenders, more = common.gather(factories)
        skipped.update(more)
        outcomes = common.run_interleaved(contenders, args.runs, args.warmup)
        cache = sorted(p.name for p in (lib / '__pycache__').iterdir()) \
            if (lib / '__pycache__').is_dir() else []
        recompiled = pyc is not None and pyc.stat().st_mtime_ns != compiled
        if pyc and args.importtime_runs > 0 and not outcomes[NAMES[BITPIT]].error:
            common.note('python -X importtime, {} runs each ...'.format(args.importtime_runs))
            importtimes = {'bitpit': importtime(BITPIT, lib, args.importtime_runs),
                           'baseline': importtime(BASELINE, lib, args.importtime_runs)}

    bitpit, baseline = NAMES[BITPIT], NAMES[BASELINE]
    rss_bitpit = common.median_of(outcomes, bitpit, 'peak_rss_mib')
    rss_baseline = common.median_of(outcomes, baseline, 'peak_rss_mib')
    rss_extra = rss_bitpit - rss_baseline \
        if rss_bitpit is not None and rss_baseline is not None else None
    goals = [Goal('import bitpit / baseline (wall)', common.ratio(outcomes, bitpit, baseline), 1.1),
             Goal('peak RSS: bitpit - baseline', rss_extra, 1.5, unit=' MiB')]
    floor = common.rss_floor_mib()
    common.derive(outcomes, 'ms', lambda run: run['seconds'] * 1000)
    common.derive(outcomes, 'cpu_ms', lambda run: run['cpu_seconds'] * 1000)
    print('\nimport time: python -S -c "...", {} runs each, interleaved, bytecode cached'.format(
        args.runs))
    print('bitpit under test: {}'.format(skipped.get(bitpit) or identity))
    print('(wall: spawn to exit; CPU: user + sys from wait4; peak RSS: wait4, the floor of '
          'that measurement is {:.1f} MiB)'.format(floor))
    print(common.report_contenders(outcomes, skipped, [
        ('median ms', 'ms', '{:.1f}'), ('CPU ms', 'cpu_ms', '{:.1f}'),
        ('peak RSS MiB', 'peak_rss_mib', '{:.2f}')]))
    nothing = common.median_of(outcomes, NAMES[NOTHING], 'seconds')
    for name in (bitpit, baseline):
        value = common.median_of(outcomes, name, 'seconds')
        if value is not None and nothing is not None:
            print('{}: {:.1f} ms above python -S -c pass'.format(name, (value - nothing) * 1000))
    if rss_baseline is not None and rss_baseline < floor + 0.5:
        print('NOTE: the baseline\'s peak RSS is within 0.5 MiB of the floor: the difference '
              'may be understated')
    if recompiled:
        print('NOTE: bitpit\'s bytecode was rewritten during the runs (not a cached import)')
    print('bytecode in the copy\'s __pycache__: {}'.format(', '.join(cache) or 'none'))
    print()
    print('\n'.join(goal.line() for goal in goals))
    best = common.best_ratio(outcomes, bitpit, baseline)
    if best is not None:
        print('import bitpit / baseline (best runs): {:.3f} (for information)'.format(best))
    cpu = common.ratio(outcomes, bitpit, baseline, 'cpu_seconds')
    if cpu is not None:
        print('import bitpit / baseline (CPU time): {:.3f} (for information)'.format(cpu))
    if importtimes:
        print()
        print('\n'.join(importtime_report(importtimes['bitpit'], importtimes['baseline'],
                                          args.top)))
    return common.finish(args.json, {
        'benchmark': 'import_time', 'runs': args.runs, 'bitpit': identity,
        'rss_floor_mib': floor, 'bytecode_rewritten': recompiled, 'pycache': cache,
        'importtime_us': {key: {name: {'self': v[0], 'cumulative': v[1], 'depth': v[2]}
                                for name, v in value.items()}
                          for key, value in importtimes.items()}},
        outcomes, skipped, goals)


if __name__ == '__main__':
    sys.exit(common.run_main(main))
