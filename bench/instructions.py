#!/usr/bin/env python3
"""Instructions per small file: the user-space instructions a whole bitpit
process runs (valgrind's cachegrind, ``I refs``) to fetch N1, then N2,
10 KiB files from a local server (nginx, else the Python one) with one
``Manager``, ``--parallel`` at once; (count at N2 - count at N1) / (N2 -
N1) is the count per file, free of the interpreter's start and bitpit's
import. It leaves out the kernel's time (the system calls) and the
threads' waits, which the race of ``many_files.py`` counts; but where the
CPU time of a run moves by 30 % on a loaded machine, the count moves by
about 1 % (7 Dec 2026, at load 3-15). The process runs some 50 times
slower under valgrind while bitpit's timers (a look at a transfer every
quarter second, the speed every ``update_period``, an idle worker's half
second) keep the wall clock's pace: work done on a timer may count more
here than at full speed. After a first run of each at N1 (which compiles
it), the bitpit.py under test and ``--baseline`` alternate; N1 = 200 and
N2 = 1,000 take about 25 s a run.

Example: ``python bench/instructions.py --baseline /tmp/old/bitpit.py``
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

import common
from many_small import ON_STATE_CODE

#: The program measured: argv[1] lists the URLs, argv[2] is the output
#: directory, argv[3] how many at once; it imports the bitpit its
#: environment gives (``common.load_bitpit``).
PROGRAM = r'''
import sys, threading
import bitpit
urls = open(sys.argv[1]).read().split()
''' + ON_STATE_CODE + r'''
m = bitpit.Manager(max_running=int(sys.argv[3]), dir_path=True, path=sys.argv[2])
for url in urls:
    m.add(url).listen('state-changed', on_state)
m.start()
if not all_ended.wait(600):
    raise SystemExit('not all done')
m.stop()
bitpit._WORKERS.wait_quiet(5)
if any(d.state != 'complete' for d in m.downloads):
    raise SystemExit('not all complete')
'''


def instructions(valgrind: str, under_test: common.BitpitUnderTest, urls: Path, outdir: Path,
                 parallel: int, tmp: Path) -> int:
    """The instructions of one run of ``PROGRAM`` over the URLs in ``urls``."""
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir()
    result = subprocess.run(
        [valgrind, '--tool=cachegrind', '--cache-sim=no', '--cachegrind-out-file=/dev/null',
         sys.executable, '-c', PROGRAM, str(urls), str(outdir), str(parallel)],
        env=under_test.env, cwd=tmp, capture_output=True, text=True, timeout=1800)
    found = re.search(r'I\s+refs:\s+([\d,]+)', result.stderr)
    if result.returncode != 0 or found is None:
        raise SystemExit('{} failed: {}'.format(under_test.description, result.stderr[-2000:]))
    return int(found.group(1).replace(',', ''))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bitpit', type=Path,
                        default=Path(__file__).resolve().parent.parent / 'bitpit.py')
    parser.add_argument('--baseline', type=Path, help='another bitpit.py, measured alternately')
    parser.add_argument('--files', type=int, nargs=2, default=[200, 1000], metavar=('N1', 'N2'))
    parser.add_argument('--parallel', type=int, default=50)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--tmp', help='where to make the temp dir (default: the system\'s)')
    args = parser.parse_args()
    low, high = args.files
    if not 0 < low < high:
        parser.error('--files: N1 must be more than 0 and less than N2')
    valgrind = common.find_tool('valgrind')
    if not valgrind:
        raise SystemExit('valgrind is not installed')
    tmp = Path(tempfile.mkdtemp(prefix='bitpit-instructions-', dir=args.tmp))
    try:
        contenders: Dict[str, common.BitpitUnderTest] = {
            'bitpit': common.load_bitpit(args.bitpit, tmp, 'Manager')}
        if args.baseline is not None:
            contenders['bitpit baseline'] = common.load_bitpit(args.baseline, tmp, 'Manager',
                                                               lib_name='baseline')
        for name, under_test in contenders.items():
            print('{}: {}'.format(name, under_test.require()))
        docroot = tmp / 'www'
        docroot.mkdir()
        body = os.urandom(10240)
        names = ['f{:05d}'.format(i) for i in range(high)]
        for file_name in names:
            (docroot / file_name).write_bytes(body)
        nginx = common.find_tool('nginx')
        server: Any = common.NginxServer(docroot, nginx) if nginx else \
            common.PythonFileServer(docroot)
        per_file: Dict[str, List[float]] = {name: [] for name in contenders}
        with server:
            lists = {}
            for count in (low, high):
                lists[count] = tmp / 'urls-{}.txt'.format(count)
                lists[count].write_text(''.join(server.url(n) + '\n' for n in names[:count]))
            for name, under_test in contenders.items():  # its first run writes its bytecode
                instructions(valgrind, under_test, lists[low], tmp / 'out', args.parallel, tmp)
            for run in range(args.runs):
                for name, under_test in contenders.items():
                    counts = [instructions(valgrind, under_test, lists[count], tmp / 'out',
                                           args.parallel, tmp) for count in (low, high)]
                    per_file[name].append((counts[1] - counts[0]) / (high - low))
                    print('  {:<16} run {}/{}: {:,.0f} instructions per file ({:,} at {}, '
                          '{:,} at {})'.format(name, run + 1, args.runs, per_file[name][-1],
                                               counts[0], low, counts[1], high), flush=True)
        print('\n{} - {} x 10 KiB at {} at once from {}'.format(high, low, args.parallel,
                                                               server.description))
        for name, values in per_file.items():
            print('{:<16} median {:,.0f} instructions per file'.format(
                name, statistics.median(values)))
        if 'bitpit baseline' in per_file:
            medians = [statistics.median(per_file[name]) for name in ('bitpit', 'bitpit baseline')]
            print('bitpit / baseline: {:.3f}'.format(medians[0] / medians[1]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
