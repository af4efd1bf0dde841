#!/usr/bin/env python3
"""Many small files: bitpit.Manager vs aria2c (vs curl --parallel).

500 files of 10 KiB (configurable) are served from one local server (nginx
when installed, else a Python ThreadingHTTPServer with HTTP/1.1 keep-alive)
and downloaded 50 at a time by each contender, interleaved, each run in a
fresh process into an emptied directory, every file checked byte for byte.
Reported: median wall time, CPU time (user + sys of the process, from
``wait4``), peak RSS, and the goals of issue 13 (against ``aria2c -j50 -i
list``):

    bitpit / aria2c:  wall <= 0.8,  CPU <= 1.2

Example: ``python bench/many_small.py --runs 7 --bitpit ../main/bitpit.py``
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from common import BenchError, Contender, Goal, Skipped  # noqa: E402

#: bitpit: one Manager, every URL added with the same kwargs, started, and
#: waited for through each download's state-changed signal (bounded).
#: The state-changed callback of every program that makes bitpit's
#: downloads (or stands for them): ``all_ended`` is set once every URL of
#: ``urls`` is complete or failed.
ON_STATE_CODE = '''
lock, ended, all_ended = threading.Lock(), set(), threading.Event()

def on_state(d, old_state):
    if d.state in ('complete', 'fatal-error'):
        with lock:
            ended.add(id(d))
            if len(ended) == len(urls):
                all_ended.set()
'''

BITPIT_CODE = '''
import json, os, sys, threading, time
import bitpit
list_file, outdir, max_running, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
urls = open(list_file).read().split()
''' + ON_STATE_CODE + '''
began = time.perf_counter()
m = bitpit.Manager(max_running=max_running, dir_path=True, path=outdir)
for url in urls:
    m.add(url).listen('state-changed', on_state)
m.start()
finished = all_ended.wait(timeout)
elapsed = time.perf_counter() - began
if not finished:
    m.stop_all()
m.stop()
states = {}
for d in m.downloads:
    states[d.state] = states.get(d.state, 0) + 1
left = sorted(t.name for t in threading.enumerate()  # a waiting worker is no work left
              if t is not threading.main_thread() and t.name != 'bitpit-idle')
print(json.dumps({'elapsed_s': elapsed, 'threads_left': len(left), 'thread_names': left[:10],
                  'states': states}), flush=True)
os._exit(0 if finished and states.get('complete') == len(urls) else 1)
'''


#: The report's columns (header, metric, format), also asyncio_many.py's.
COLUMNS = [('median s', 'seconds', '{:.3f}'), *common.CPU_COLUMNS,
           ('files/s', 'files_per_s', '{:.0f}'),
           ('peak RSS MiB', 'peak_rss_mib', '{:.1f}'), ('conns', 'conns', '{:.0f}'),
           ('requests', 'requests', '{:.0f}'), ('stray files', 'stray_files', '{:.0f}'),
           ('threads left', 'threads_left', '{:.0f}')]


def make_files(docroot: Path, count: int, size: int) -> Dict[str, bytes]:
    """``count`` files of ``size`` random bytes each; returns name -> content."""
    files = {}
    for i in range(count):
        name = 'f{:04d}.bin'.format(i)
        files[name] = os.urandom(size)
        (docroot / name).write_bytes(files[name])
    return files


def check_files(result: common.RunResult, outdir: Path, files: Dict[str, bytes], server: Any
                ) -> Dict[str, Any]:
    """A run succeeded when it exited 0 and ``outdir`` holds every file with
    the right content. Other files left there are counted, not fatal. The
    connections and requests nginx saw are counted too."""
    if result.returncode != 0 or result.timed_out:
        raise BenchError(result.failure())
    wrong = [name for name, content in files.items()
             if not (outdir / name).is_file() or (outdir / name).read_bytes() != content]
    if wrong:
        raise BenchError('{} of {} files missing or different (e.g. {})'.format(
            len(wrong), len(files), ', '.join(wrong[:3])))
    stray = [p.name for p in outdir.iterdir() if p.name not in files]
    metrics = dict(result.info, stray_files=len(stray))
    if isinstance(server, common.NginxServer):
        metrics.update(server.traffic())
    return metrics


def reset_dir(path: Path, server: Any) -> None:
    """Empty ``path`` (create it if needed) and the server's access log."""
    common.remove(path)
    path.mkdir()
    if isinstance(server, common.NginxServer):
        server.reset()


def contender(name: str, command: List[str], outdir: Path, files: Dict[str, bytes],
              timeout: float, server: Any, env: Optional[Dict[str, str]] = None) -> Contender:
    """A contender that fills ``outdir`` and is checked file by file."""
    return Contender(name, command, timeout,
                     reset=functools.partial(reset_dir, outdir, server),
                     check=functools.partial(check_files, outdir=outdir, files=files,
                                             server=server),
                     env=env, cwd=outdir.parent)


def bitpit_contender(url_list: Path, outdir: Path, files: Dict[str, bytes], parallel: int,
                     timeout: float, under_test: common.BitpitUnderTest, server: Any
                     ) -> Contender:
    """``bitpit.Manager(max_running=parallel, dir_path=True, path=outdir)``."""
    common.note('bitpit: ' + under_test.require())
    return contender('bitpit', common.python_command(BITPIT_CODE, url_list, outdir, parallel,
                                                     timeout),
                     outdir, files, timeout + 30, server, under_test.env)


def aria2c_contender(url_list: Path, outdir: Path, files: Dict[str, bytes], parallel: int,
                     timeout: float, install: bool, server: Any) -> Contender:
    """``aria2c -j50 -i list -d outdir``, quiet, no renaming or preallocation."""
    aria2c = common.find_tool('aria2c', package='aria2', install=install)
    if not aria2c:
        raise Skipped('aria2c is not installed')
    return contender('aria2c', [
        aria2c, '--no-conf', '-q', '-j{}'.format(parallel), '-i', str(url_list),
        '-d', str(outdir), '--allow-overwrite=true', '--auto-file-renaming=false',
        '--file-allocation=none'], outdir, files, timeout, server)


def curl_contender(urls: List[str], config: Path, outdir: Path, files: Dict[str, bytes],
                   parallel: int, timeout: float, install: bool, server: Any) -> Contender:
    """``curl --parallel --parallel-max 50`` with every URL in a ``-K`` file."""
    curl = common.find_tool('curl', install=install)
    if not curl:
        raise Skipped('curl is not installed')
    help_text = common.command_output(curl, '--help', 'all')
    if '--parallel-max' not in help_text or '--output-dir' not in help_text:
        raise Skipped('this curl has no --parallel-max / --output-dir (7.73+ needed)')
    config.write_text(''.join('url = "{}"\n'.format(url) for url in urls))
    return contender('curl', [
        curl, '-s', '--parallel', '--parallel-max', str(parallel), '--remote-name-all',
        '--output-dir', str(outdir), '-K', str(config)], outdir, files, timeout, server)


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0])
    common.add_file_set_options(parser, files=500, parallel=50, timeout=120)
    parser.add_argument('--no-curl', dest='curl', action='store_false', help='leave curl out')
    args = parser.parse_args(argv)

    with common.workspace(args.tmp) as tmp:
        docroot, outdir = tmp / 'www', tmp / 'out'
        docroot.mkdir()
        outdir.mkdir()
        under_test = common.load_bitpit(args.bitpit, tmp, 'Downloader', 'Manager')
        files = make_files(docroot, args.files, args.file_size)
        with common.serve_files(docroot, args.server, args.install,
                                log_requests=True) as server:
            urls = [server.url(name) for name in files]
            url_list = tmp / 'urls.txt'
            url_list.write_text(''.join(url + '\n' for url in urls))
            common.note('serving {} files of {} from {} at {}'.format(
                args.files, common.fmt_size(args.file_size), server.description,
                server.base_url))
            make = [
                ('bitpit', lambda: bitpit_contender(url_list, outdir, files, args.parallel,
                                                    args.timeout, under_test, server)),
                ('aria2c', lambda: aria2c_contender(url_list, outdir, files, args.parallel,
                                                    args.timeout, args.install, server)),
            ]
            if args.curl:
                make.append(('curl', lambda: curl_contender(
                    urls, tmp / 'curl.cfg', outdir, files, args.parallel, args.timeout,
                    args.install, server)))
            contenders, skipped = common.gather(make)
            outcomes = common.run_interleaved(contenders, args.runs, args.warmup)
            server_description = server.description

    common.derive(outcomes, 'files_per_s', lambda run: args.files / run['seconds'])
    goals = [Goal('bitpit / aria2c (wall time)', common.ratio(outcomes, 'bitpit', 'aria2c'), 0.8),
             Goal('bitpit / aria2c (CPU time)',
                  common.ratio(outcomes, 'bitpit', 'aria2c', 'cpu_seconds'), 1.2)]
    curl_ratio = common.ratio(outcomes, 'bitpit', 'curl')
    print('\nmany small files: {} x {} from {}, {} at a time, {} runs each, interleaved'.format(
        args.files, common.fmt_size(args.file_size), server_description, args.parallel,
        args.runs))
    print('bitpit under test: {}'.format(under_test.skip or under_test.description))
    print('(CPU s: user + sys of the whole process, all threads, from wait4)')
    print(common.report_contenders(outcomes, skipped, COLUMNS))
    print()
    print('\n'.join(goal.line() for goal in goals))
    if curl_ratio is not None:
        print('bitpit / curl --parallel (wall time): {:.3f} (for information)'.format(curl_ratio))
    return common.finish(args.json, {
        'benchmark': 'many_small', 'files': args.files, 'file_size': args.file_size,
        'parallel': args.parallel, 'runs': args.runs, 'server': server_description,
        'bitpit': under_test.skip or under_test.description},
        outcomes, skipped, goals)


if __name__ == '__main__':
    sys.exit(common.run_main(main))
