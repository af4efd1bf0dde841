#!/usr/bin/env python3
"""Many small files from asyncio: bitpit.adownload() vs bitpit.Manager.

1,000 files of 10 KiB (configurable) are served from one local server (nginx
when installed, else a Python ThreadingHTTPServer with HTTP/1.1 keep-alive)
and downloaded 50 at a time, each run in a fresh process into an emptied
directory, every file checked byte for byte, the two contenders
interleaved:

    asyncio   asyncio.run() of asyncio.gather() over every URL, each
              ``await bitpit.adownload(url, outdir, dir_path=True)`` behind
              an asyncio.Semaphore(50)
    manager   bitpit.Manager(max_running=50, dir_path=True, path=outdir),
              every URL added, waited for through each download's
              state-changed signal

Reported: median wall time, CPU time (user + sys of the process, from
``wait4``), peak RSS, and the goals of issue 25 (the two within 10 % of each
other):

    asyncio / manager:  wall and CPU within [1 / 1.1, 1.1]

Example: ``python bench/asyncio_many.py --runs 7 --bitpit ../main/bitpit.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
import many_small  # noqa: E402
from common import Goal  # noqa: E402

#: asyncio: one coroutine per URL, 50 at a time, gathered.
ASYNCIO_CODE = '''
import asyncio, json, os, sys, threading, time
import bitpit
list_file, outdir, parallel = sys.argv[1], sys.argv[2], int(sys.argv[3])
urls = open(list_file).read().split()

async def one(url, slots):
    async with slots:
        try:
            await bitpit.adownload(url, outdir, dir_path=True)
            return 'complete'
        except bitpit.Error:
            return 'fatal-error'

async def main():
    slots = asyncio.Semaphore(parallel)
    return await asyncio.gather(*(one(url, slots) for url in urls))

began = time.perf_counter()
results = asyncio.run(main())
elapsed = time.perf_counter() - began
states = {}
for state in results:
    states[state] = states.get(state, 0) + 1
left = sorted(t.name for t in threading.enumerate()  # a waiting worker is no work left
              if t is not threading.main_thread() and t.name != 'bitpit-idle')
print(json.dumps({'elapsed_s': elapsed, 'threads_left': len(left), 'thread_names': left[:10],
                  'states': states}), flush=True)
os._exit(0 if states.get('complete') == len(urls) else 1)
'''


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0], runs=7)
    common.add_file_set_options(parser, files=1000, parallel=50, timeout=120)
    args = parser.parse_args(argv)

    with common.workspace(args.tmp) as tmp:
        docroot, outdir = tmp / 'www', tmp / 'out'
        docroot.mkdir()
        outdir.mkdir()
        under_test = common.load_bitpit(args.bitpit, tmp, 'Downloader', 'Manager', 'adownload')
        files = many_small.make_files(docroot, args.files, args.file_size)
        with common.serve_files(docroot, args.server, args.install,
                                log_requests=True) as server:
            url_list = tmp / 'urls.txt'
            url_list.write_text(''.join(server.url(name) + '\n' for name in files))
            common.note('serving {} files of {} from {} at {}'.format(
                args.files, common.fmt_size(args.file_size), server.description,
                server.base_url))

            def asyncio_contender() -> common.Contender:
                common.note('asyncio: ' + under_test.require())
                return many_small.contender(
                    'asyncio', common.python_command(ASYNCIO_CODE, url_list, outdir,
                                                     args.parallel),
                    outdir, files, args.timeout, server, under_test.env)

            def manager_contender() -> common.Contender:
                contender = many_small.bitpit_contender(url_list, outdir, files, args.parallel,
                                                        args.timeout, under_test, server)
                contender.name = 'manager'
                return contender

            contenders, skipped = common.gather([('asyncio', asyncio_contender),
                                                 ('manager', manager_contender)])
            outcomes = common.run_interleaved(contenders, args.runs, args.warmup)
            server_description = server.description

    common.derive(outcomes, 'files_per_s', lambda run: args.files / run['seconds'])
    wall = common.ratio(outcomes, 'asyncio', 'manager')
    cpu = common.ratio(outcomes, 'asyncio', 'manager', 'cpu_seconds')
    goals = [Goal('asyncio / manager (wall time)', wall, 1.1),
             Goal('asyncio / manager (wall time)', wall, round(1 / 1.1, 3), at_most=False),
             Goal('asyncio / manager (CPU time)', cpu, 1.1),
             Goal('asyncio / manager (CPU time)', cpu, round(1 / 1.1, 3), at_most=False)]
    print('\nasyncio vs Manager: {} x {} from {}, {} at a time, {} runs each, '
          'interleaved'.format(args.files, common.fmt_size(args.file_size), server_description,
                               args.parallel, args.runs))
    print('bitpit under test: {}'.format(under_test.skip or under_test.description))
    print('(CPU s: user + sys of the whole process, all threads, from wait4)')
    print(common.report_contenders(outcomes, skipped, many_small.COLUMNS))
    print()
    print('\n'.join(goal.line() for goal in goals))
    best = common.best_ratio(outcomes, 'asyncio', 'manager')
    if best is not None:
        print('asyncio / manager, best runs (wall time): {:.3f} (for information)'.format(best))
    return common.finish(args.json, {
        'benchmark': 'asyncio_many', 'files': args.files, 'file_size': args.file_size,
        'parallel': args.parallel, 'runs': args.runs, 'server': server_description,
        'bitpit': under_test.skip or under_test.description},
        outcomes, skipped, goals)


if __name__ == '__main__':
    sys.exit(common.run_main(main))
