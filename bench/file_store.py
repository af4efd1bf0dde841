#!/usr/bin/env python3
"""The file layer's part of a small file, in one process: what bitpit's
store (``_FileStore``) does for a new 10 KiB file that comes in one read.

For each of N files, in a new directory of ``--tmp`` each round, the
store is made for ``DIR/fI.bin`` and loads what is there (nothing), learns
the size, opens the file, checks the room for it, writes the body in one
write, saves (nothing to save: the file is whole), finishes with the
server's date and ETag, and closes: the calls that ``_Transfer`` makes of
it, in that order, without a network. With ``--downloads``, each file's
store is the one a manager's download makes: the download is made from
a model as ``Manager.add(url)`` makes it (its name from the URL, in the
manager's directory), makes its store at the attempt's first need and
lets go of it at the end. The bitpit.py under test and
``--baseline`` alternate, round after round; the report gives each one's
median CPU time per file (``time.process_time``: user and system time,
the system calls being most of it) and the ratio of the medians.

Example: ``python bench/file_store.py --tmp /dev/shm --baseline /tmp/old/bitpit.py``
(add ``--downloads`` for the download's part too)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

BODY = memoryview(b'x' * 10240)
MODIFIED = 1796626800.0  # Mon, 07 Dec 2026 07:00:00 GMT
ETAG = '"6570e1c0-2800"'


def load_bitpit(path: Path, name: str) -> Any:
    """The bitpit.py at ``path`` as a module of its own, ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def store_files(bitpit: Any, directory: Path, files: int, downloads: bool = False) -> float:
    """CPU seconds for the store's work on ``files`` new small files in
    ``directory`` (with ``downloads``, through a manager's downloads);
    each file is checked after."""
    urls = ['http://h/f{}.bin'.format(i) for i in range(files)]
    model = bitpit.Downloader(urls[0], str(directory), dir_path=True)  # (--downloads)
    clock = time.process_time
    began = clock()
    for i, url in enumerate(urls):
        if downloads:
            download = model._another(url, str(directory), True)
            store = download._local_store()
        else:
            store = bitpit._FileStore(directory / 'f{}.bin'.format(i), url)
            store.load()
        store.set_size(len(BODY))
        store.open()
        store.reserve(len(BODY), allocate=False)
        store.write(0, BODY, store.epoch)
        store.save()
        store.finish(None, MODIFIED, ETAG)
        store.close()
        if downloads:
            download._let_go()
    spent = clock() - began
    for i in range(files):
        status = os.stat(directory / 'f{}.bin'.format(i))
        if status.st_size != len(BODY) or status.st_mtime != MODIFIED:
            raise SystemExit('{}: f{}.bin is wrong'.format(bitpit.__file__, i))
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bitpit', type=Path,
                        default=Path(__file__).resolve().parent.parent / 'bitpit.py')
    parser.add_argument('--baseline', type=Path, help='another bitpit.py, measured alternately')
    parser.add_argument('--files', type=int, default=3000)
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--tmp', help='where to make the temp dir (default: the system\'s)')
    parser.add_argument('--downloads', action='store_true',
                        help='each store made by a download, as a manager makes it')
    args = parser.parse_args()
    contenders: Dict[str, Any] = {'bitpit': load_bitpit(args.bitpit, 'bitpit_under_test')}
    if args.baseline is not None:
        contenders['bitpit baseline'] = load_bitpit(args.baseline, 'bitpit_baseline')
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory(prefix='bitpit-file-store-', dir=args.tmp) as tmp:
        for round_ in range(args.rounds + 1):  # the first is a warm-up
            order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
            for name in order:
                directory = Path(tmp) / 'round{}-{}'.format(round_, name.replace(' ', '-'))
                directory.mkdir()
                spent = store_files(contenders[name], directory, args.files, args.downloads)
                shutil.rmtree(directory)
                if round_:
                    times[name].append(spent)
    print('{} new files of {} bytes each{}, {} rounds, in {}'.format(
        args.files, len(BODY), ', through downloads' if args.downloads else '', args.rounds,
        args.tmp or tempfile.gettempdir()))
    medians = {name: statistics.median(runs) / args.files for name, runs in times.items()}
    for name, module in contenders.items():
        print('{:16} {:7.1f} us CPU per file   ({})'.format(name, medians[name] * 1e6,
                                                            module.__file__))
    if args.baseline is not None:
        print('bitpit / baseline  {:.2f}'.format(medians['bitpit'] / medians['bitpit baseline']))
    return 0


if __name__ == '__main__':
    sys.exit(main())
