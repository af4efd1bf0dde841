#!/usr/bin/env python3
"""One list in shards: 4 processes with --shard K/4 against one process, and
what --manifest costs.

10,000 files of 10 KiB (configurable) are served from one local server
(nginx when installed, else a Python server) and fetched by the bitpit
command, ``-m 20`` downloads at a time in each process, every file checked
byte for byte after each run, each manifest line by line:

    one          bitpit -q -m 20 -d out -i list
    one+manifest the same with --manifest out/manifest.jsonl
    4 shards     4 x bitpit ... --shard K/4 --manifest out/manifest-K.jsonl,
                 started at once by a small launcher that waits for all four

Reported: median wall time, CPU time (user + sys of every process, from
``wait4``), and the manifest's CPU time per file: (CPU of one+manifest -
CPU of one) / files, from the medians. The measured processes share the
client CPUs (one on a 2-core machine, the server having the other: see
``common.pin_cpus``).

Example: ``python bench/scale_out.py --runs 3 --bitpit ../main/bitpit.py``
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from common import BenchError, Contender  # noqa: E402
from many_small import check_files, make_files  # noqa: E402

#: starts every command of argv[1] (a JSON list of argvs) at once, waits for
#: all of them, and exits with 1 if one failed
SHARDS_CODE = '''
import json, subprocess, sys
procs = [subprocess.Popen(argv) for argv in json.loads(sys.argv[1])]
sys.exit(1 if any(proc.wait() for proc in procs) else 0)
'''


def check(result: common.RunResult, outdir: Path, files: Dict[str, bytes], server: Any,
          manifests: int) -> Dict[str, Any]:
    """A run succeeded when it exited 0, ``outdir`` holds every file with the
    right content (``many_small.check_files``), and its manifests (if any)
    record each file once."""
    metrics = check_files(result, outdir, files, server)
    recorded: List[str] = []
    for manifest in sorted(outdir.glob('manifest*.jsonl')):
        recorded += [json.loads(line)['path'] for line in manifest.read_text().splitlines()]
    if manifests and sorted(Path(path).name for path in recorded) != sorted(files):
        raise BenchError('the manifests record {} lines for {} files'.format(
            len(recorded), len(files)))
    return metrics


def reset_dir(path: Path) -> None:
    common.remove(path)
    path.mkdir()


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0], runs=3)
    common.add_file_set_options(parser, files=10000, parallel=20, timeout=600,
                                parallel_help='downloads at a time in each process')
    parser.add_argument('--shards', type=int, default=4,
                        help='processes of the sharded run (default %(default)s)')
    args = parser.parse_args(argv)

    with common.workspace(args.tmp) as tmp:
        docroot, outdir = tmp / 'www', tmp / 'out'
        docroot.mkdir()
        outdir.mkdir()
        under_test = common.load_bitpit(args.bitpit, tmp, 'Manager', 'shard')
        common.note('bitpit: ' + under_test.require())
        files = make_files(docroot, args.files, args.file_size)
        with common.serve_files(docroot, args.server, args.install) as server:
            url_list = tmp / 'urls.txt'
            url_list.write_text(''.join(server.url(name) + '\n' for name in files))
            common.note('serving {} files of {} from {} at {}'.format(
                args.files, common.fmt_size(args.file_size), server.description,
                server.base_url))
            bitpit = [common.plain_python(), str(tmp / 'lib' / 'bitpit.py'), '-q',
                      '-m', str(args.parallel), '-d', str(outdir), '-i', str(url_list)]
            shards = [bitpit + ['--shard', '{}/{}'.format(k, args.shards), '--manifest',
                                str(outdir / 'manifest-{}.jsonl'.format(k))]
                      for k in range(args.shards)]

            def contender(name: str, command: List[str], manifests: int) -> Contender:
                return Contender(name, command, args.timeout,
                                 reset=functools.partial(reset_dir, outdir),
                                 check=functools.partial(check, outdir=outdir, files=files,
                                                         server=server, manifests=manifests),
                                 env=under_test.env, cwd=tmp)

            contenders = [
                contender('one', bitpit, 0),
                contender('one+manifest', bitpit + ['--manifest',
                                                    str(outdir / 'manifest.jsonl')], 1),
                contender('{} shards'.format(args.shards),
                          common.python_command(SHARDS_CODE, json.dumps(shards)), args.shards),
            ]
            outcomes = common.run_interleaved(contenders, args.runs, args.warmup)
            server_description = server.description

    sharded = '{} shards'.format(args.shards)
    cpu_one = common.median_of(outcomes, 'one', 'cpu_seconds')
    cpu_manifest = common.median_of(outcomes, 'one+manifest', 'cpu_seconds')
    per_file = None if cpu_one is None or cpu_manifest is None else \
        (cpu_manifest - cpu_one) / args.files
    print('\none list in shards: {} x {} from {}, -m {} per process, {} runs each, '
          'interleaved'.format(args.files, common.fmt_size(args.file_size), server_description,
                               args.parallel, args.runs))
    print('bitpit under test: {}'.format(under_test.description))
    print('(CPU s: user + sys of every process of a run, from wait4)')
    print(common.report_contenders(outcomes, {}, [
        ('median s', 'seconds', '{:.3f}'), *common.CPU_COLUMNS,
        ('peak RSS MiB', 'peak_rss_mib', '{:.1f}')]))
    print()
    for label, value in [
            ('{} / one (wall time)'.format(sharded), common.ratio(outcomes, sharded, 'one')),
            ('{} / one (CPU time)'.format(sharded),
             common.ratio(outcomes, sharded, 'one', 'cpu_seconds')),
            ('one+manifest / one (wall time)', common.ratio(outcomes, 'one+manifest', 'one')),
            ('one+manifest / one (CPU time)',
             common.ratio(outcomes, 'one+manifest', 'one', 'cpu_seconds'))]:
        print('{:<34} {}'.format(label, 'n/a' if value is None else '{:.3f}'.format(value)))
    print('{:<34} {}'.format('manifest CPU per file', 'n/a' if per_file is None
                             else '{:.1f} us'.format(per_file * 1e6)))
    return common.finish(args.json, {
        'benchmark': 'scale_out', 'files': args.files, 'file_size': args.file_size,
        'parallel': args.parallel, 'shards': args.shards, 'runs': args.runs,
        'server': server_description, 'bitpit': under_test.description,
        'manifest_cpu_per_file_s': per_file}, outcomes, {}, [])


if __name__ == '__main__':
    sys.exit(common.run_main(main))
