#!/usr/bin/env python3
"""Many files: the cost per file of bitpit.Manager against aria2c and two
bare stdlib floors (issue 24).

N files of 10 KiB (``--files``, default 500 and 3,000) are served from one
local nginx (installed with apt-get when missing, else the Python server)
and downloaded K at once (``--parallel``, default 50) by each contender,
interleaved, each run in a fresh process into an emptied directory, every
file checked byte for byte. Contenders:

    aria2c     aria2c -jK -x1 -i LIST, quiet, no renaming, no preallocation
    floor      one thread, a selectors loop over K keep-alive connections,
               one GET at a time on each, headers cut at the blank line,
               Content-Length only, each body written with os.write
    essentials the floor's loop plus what every bitpit download of a small
               file must do whatever the engine's shape (bitpit's URL check,
               naming, request fields, head parser, file protocol, and
               signals emitted in order from a signal thread): the budget
               of a one-loop engine
    threads    K threads, each one http.client keep-alive connection over
               its share of the list (--no-threads leaves it out)
    bitpit     Manager(max_running=K), many_small.py's program

Reported per scenario: median wall time, CPU time (user + sys from
``wait4``), CPU and waits (voluntary context switches) per file, peak
RSS, and issue 24's goals:

    bitpit / aria2c:  wall <= 0.5,  CPU <= 1.0
    bitpit / floor:   CPU <= 2.5

``--mode add`` times ``add()`` of 10,000 URLs into one Manager (and its
peak RSS); ``--mode stop`` starts 200 downloads from a paced server and
times ``stop_all()`` and ``stop()`` (goal: <= 0.5 s, no thread left);
``--mode profile`` runs bitpit and the floor under cProfile in every
thread and under ``strace -f -c`` (not part of the default run).

Example: ``python bench/many_files.py --runs 5 --bitpit ../main/bitpit.py``;
with the outputs in tmpfs (no ext4 journal in the figures): ``--tmp
/dev/shm``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pstats
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/ is not a package)
from common import Contender, Goal, KiB, MiB, Skipped  # noqa: E402
from many_small import BITPIT_CODE, ON_STATE_CODE, contender, make_files, reset_dir  # noqa: E402

#: The selectors floor: the least a Python program does to fetch every URL
#: of the list over K keep-alive connections. All URLs are on one host.
FLOOR_CODE = r'''
import json, os, selectors, socket, sys, time
list_file, outdir, parallel = sys.argv[1], sys.argv[2], int(sys.argv[3])
urls = open(list_file).read().split()
began = time.perf_counter()
origin = urls[0][:urls[0].index('/', len('http://'))]
host, _, port = origin[len('http://'):].partition(':')
address = (host, int(port or 80))
requests = ['GET {} HTTP/1.1\r\nHost: {}\r\n\r\n'.format(url[len(origin):], origin[7:]).encode()
            for url in urls]
names = [os.path.join(outdir, url.rpartition('/')[2]) for url in urls]
pending = list(range(len(urls) - 1, -1, -1))
selector = selectors.DefaultSelector()

class Connection:
    def __init__(self):
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ, self)
        self.index = self.fd = -1

    def ask(self):
        """Send the next GET, or close when the list is done."""
        if not pending:
            selector.unregister(self.sock)
            self.sock.close()
            return
        self.index, self.head, self.fd, self.left = pending.pop(), b'', -1, 0
        if self.sock.send(requests[self.index]) != len(requests[self.index]):
            raise OSError('short send')

    def readable(self):
        data = self.sock.recv(262144)
        if not data:
            if self.fd >= 0 or self.head:
                raise OSError('connection closed in the middle of ' + urls[self.index])
            selector.unregister(self.sock)  # a keep-alive connection the server closed
            self.sock.close()
            index = self.index
            self.__init__()
            pending.append(index)
            self.ask()
            return
        if self.fd < 0:
            self.head += data
            end = self.head.find(b'\r\n\r\n')
            if end < 0:
                return
            lines = self.head[:end].split(b'\r\n')
            if lines[0].split()[1] != b'200':
                raise OSError('{}: {}'.format(urls[self.index], lines[0]))
            self.left = next(int(line.partition(b':')[2]) for line in lines[1:]
                             if line[:15].lower() == b'content-length:')
            data = self.head[end + 4:]
            self.fd = os.open(names[self.index], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.left -= len(data)
        if self.left < 0:
            raise OSError('more than Content-Length from ' + urls[self.index])
        if self.left == 0:
            os.close(self.fd)
            self.fd = -1
            self.ask()

for _ in range(min(parallel, len(urls))):
    Connection().ask()
while selector.get_map():
    for key, _ in selector.select():
        key.data.readable()
print(json.dumps({'elapsed_s': time.perf_counter() - began}), flush=True)
'''

#: The essentials: the floor's loop, plus what every bitpit download of a
#: small file must do whatever the engine's shape. The URL is checked into
#: bitpit's ``_Address`` and the file named from it as bitpit names it; the
#: request carries bitpit's fields; the head is read by bitpit's
#: ``_HeadParser``; the file is made with ``O_EXCL``, written with
#: ``pwrite``, dated from ``Last-Modified`` and given its ETag, as bitpit's
#: store does; and each download's state and size go, in order, to a
#: signal thread that sets the public values and emits ``state-changed`` and
#: ``size-changed`` (batched: one hand-over per round of the loop), with the
#: same ``state-changed`` callback as bitpit's program. No retry, resume,
#: limit or redirect: the budget of an engine with one loop, not an engine.
ESSENTIALS_CODE = r'''
import collections, json, os, selectors, socket, sys, threading, time
import bitpit
list_file, outdir, parallel = sys.argv[1], sys.argv[2], int(sys.argv[3])
urls = open(list_file).read().split()
began = time.perf_counter()
''' + ON_STATE_CODE + r'''
class Download(bitpit.Emitter):
    __signals__ = ('state-changed', 'size-changed')

    def __init__(self, url):
        self.address = bitpit._check_url(url)
        self.path = self.size = None
        self.state = 'queued'

downloads = []
for url in urls:
    d = Download(url)
    d.listen('state-changed', on_state)
    downloads.append(d)

posted, posting, changes = collections.deque(), threading.Condition(), []

def signal_thread():
    while True:
        with posting:
            while not posted:
                posting.wait()
            batch = list(posted)
            posted.clear()
        for change in batch:
            if change is None:
                return
            d, what, value = change
            if what == 'state':
                old, d.state = d.state, value
                d.emit('state-changed', d, old)
            else:
                d.size = value
                d.emit('size-changed', d)

def hand_over():
    if changes:
        with posting:
            posted.extend(changes)
            posting.notify()
        changes.clear()

signals = threading.Thread(target=signal_thread, name='signals')
signals.start()
fields = {'User-Agent': 'bitpit/' + bitpit.__version__, 'Accept-Encoding': 'identity'}
pending = list(range(len(downloads) - 1, -1, -1))
selector = selectors.DefaultSelector()
received = bytearray(65536)
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

class Connection:
    def __init__(self, address):
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ, self)

    def ask(self):
        if not pending:
            selector.unregister(self.sock)
            self.sock.close()
            return
        d = self.download = downloads[pending.pop()]
        address = d.address
        d.path = os.path.join(outdir, bitpit._safe_filename(bitpit._filename_from_url(address)))
        lines = ['GET ', address.target, ' HTTP/1.1\r\nHost: ', address.host_field, '\r\n']
        for name, value in fields.items():
            lines += (name, ': ', value, '\r\n')
        lines.append('\r\n')
        request = ''.join(lines).encode('latin-1')
        self.parser, self.fd, self.left, self.offset = bitpit._HeadParser(), -1, 0, 0
        if os.write(self.sock.fileno(), request) != len(request):
            raise OSError('short send')
        changes.append((d, 'state', 'downloading'))

    def readable(self):
        n = self.sock.recv_into(received)
        if not n:
            raise OSError('connection closed')
        data = bytes(received[:n])
        d = self.download
        if self.fd < 0:
            head = self.parser.feed(data)
            if head is None:
                return
            if head.status != 200:
                raise OSError('{}: status {}'.format(d.address.url, head.status))
            fields_ = head.headers
            self.left = int(fields_.get('Content-Length'))
            self.etag = fields_.get('ETag')
            self.modified = bitpit._parse_http_date(fields_.get('Last-Modified'))
            changes.append((d, 'size', self.left))
            data = self.parser.rest
            self.fd = os.open(d.path, NEW_FILE, 0o666)
        if data:
            os.pwrite(self.fd, data, self.offset)
            self.offset += len(data)
            self.left -= len(data)
        if self.left == 0:
            if self.modified is not None:
                os.utime(self.fd, (self.modified, self.modified))
            if self.etag:
                os.setxattr(self.fd, 'user.bitpit.etag', self.etag.encode('utf-8'))
            os.close(self.fd)
            self.fd = -1
            changes.append((d, 'state', 'complete'))
            self.ask()

host, port = downloads[0].address.host_key[1:]
for _ in range(min(parallel, len(urls))):
    Connection((host, port)).ask()
while selector.get_map():
    for key, _ in selector.select():
        key.data.readable()
    hand_over()
finished = all_ended.wait(60)
changes.append(None)
hand_over()
signals.join()
print(json.dumps({'elapsed_s': time.perf_counter() - began}), flush=True)
os._exit(0 if finished else 1)
'''

#: The threads floor: K threads, each with one http.client connection that
#: fetches its share of the list (every K-th URL) one after the other.
THREADS_CODE = r'''
import http.client, json, os, sys, threading, time
list_file, outdir, parallel = sys.argv[1], sys.argv[2], int(sys.argv[3])
urls = open(list_file).read().split()
began = time.perf_counter()
origin = urls[0][:urls[0].index('/', len('http://'))]
failures = []

def fetch(share):
    try:
        conn = http.client.HTTPConnection(origin[len('http://'):])
        for url in share:
            conn.request('GET', url[len(origin):])
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise OSError('{}: {}'.format(url, resp.status))
            with open(os.path.join(outdir, url.rpartition('/')[2]), 'wb', buffering=0) as file:
                file.write(body)
        conn.close()
    except Exception as exc:
        failures.append(repr(exc))

threads = [threading.Thread(target=fetch, args=(urls[i::parallel],))
           for i in range(min(parallel, len(urls)))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({'elapsed_s': time.perf_counter() - began, 'failures': failures[:3]}), flush=True)
sys.exit(1 if failures else 0)
'''

#: --mode add: how long add() of every URL in the list takes on one
#: Manager (not started: nothing runs), and the memory it holds after.
ADD_CODE = '''
import json, resource, sys, time
began = time.perf_counter()
import bitpit
list_file, outdir, max_running = sys.argv[1], sys.argv[2], int(sys.argv[3])
urls = open(list_file).read().split()
imported, cpu_before = time.perf_counter(), time.process_time()
m = bitpit.Manager(max_running=max_running, dir_path=True, path=outdir)
for url in urls:
    m.add(url)
added = time.perf_counter()
print(json.dumps({'import_s': imported - began, 'add_s': added - imported,
                  'add_cpu_s': time.process_time() - cpu_before,
                  'add_us_per_url': (added - imported) / len(urls) * 1e6,
                  'rss_after_add_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  'downloads': len(m.downloads)}), flush=True)
'''

#: --mode stop: start every URL of the list in one Manager (all at once),
#: wait until every download is in state 'download', then time stop_all()
#: and stop(), and list the threads left right after and 1 s later.
STOP_CODE = '''
import json, os, sys, threading, time
import bitpit
list_file, outdir, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
urls = open(list_file).read().split()
lock, downloading, all_downloading = threading.Lock(), set(), threading.Event()
failures = []

def on_state(d, old_state):
    if d.state == 'download':
        with lock:
            downloading.add(id(d))
            if len(downloading) == len(urls):
                all_downloading.set()
    elif d.state in ('complete', 'error', 'fatal-error'):  # will not be running at the stop
        failures.append('{}: {} {!r}'.format(d.url, d.state, d.last_exception))
        all_downloading.set()

m = bitpit.Manager(max_running=len(urls), dir_path=True, path=outdir)
for url in urls:
    m.add(url).listen('state-changed', on_state)
began = time.perf_counter()
m.start()
running = all_downloading.wait(timeout)
ramp = time.perf_counter() - began
states_before = {}
for d in m.downloads:
    states_before[d.state] = states_before.get(d.state, 0) + 1
t0 = time.perf_counter()
m.stop_all()
t1 = time.perf_counter()
m.stop()
t2 = time.perf_counter()
def others():  # a worker waiting for its next task is no work left
    return sorted(t.name for t in threading.enumerate()
                  if t is not threading.main_thread() and t.name != 'bitpit-idle')
left_at_once = others()
time.sleep(1.0)
left_after_1s = others()
states = {}
for d in m.downloads:
    states[d.state] = states.get(d.state, 0) + 1
print(json.dumps({'ramp_s': ramp, 'stop_all_s': t1 - t0, 'stop_s': t2 - t1,
                  'stop_total_s': t2 - t0, 'threads_left': len(left_at_once),
                  'threads_left_1s': len(left_after_1s), 'thread_names': left_at_once[:5],
                  'states_before': states_before, 'states': states,
                  'failures': failures[:3]}), flush=True)
os._exit(0 if running and not failures else 1)
'''


@dataclasses.dataclass
class Section:
    """The result of one scenario or mode: its runs, skips and goals."""
    name: str
    outcomes: Dict[str, common.Outcome]
    skipped: Dict[str, str]
    goals: List[Goal]


#: --mode profile: run the program in the file argv[2] (with argv[3:]) under
#: cProfile in every thread, on each thread's own CPU clock, and write the
#: merged stats to argv[1] when it ends (also through os._exit).
PROFILE_CODE = """
import cProfile, os, pstats, sys, threading, time, traceback
out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
profiles, lock = [cProfile.Profile(time.thread_time)], threading.Lock()

def start_in_thread(*ignored):
    profile = cProfile.Profile(time.thread_time)
    with lock:
        profiles.append(profile)
    profile.enable()

def dump_and_exit(status=0):
    # bitpit's waiting workers end within half a second: a profile still
    # inside a call at the dump would be charged with this thread's clock
    for thread in threading.enumerate():
        if thread.name == 'bitpit-idle':
            thread.join(2)
    profiles[0].disable()
    with lock:
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            try:
                stats.add(profile)
            except TypeError:  # a thread that ran no Python code
                pass
    stats.dump_stats(out)
    exit_now(status)

exit_now, os._exit = os._exit, dump_and_exit
threading.setprofile(start_in_thread)
code = compile(open(script).read(), script, 'exec')
profiles[0].enable()
try:
    exec(code, {'__name__': '__main__'})
except SystemExit as exc:
    dump_and_exit(exc.code if isinstance(exc.code, int) else int(exc.code is not None))
except BaseException:
    traceback.print_exc()
    dump_and_exit(1)
dump_and_exit(0)
"""


def url_list(tmp: Path, server: Any, names: List[str]) -> Path:
    """A file listing the URLs of ``names``, one a line."""
    path = tmp / 'urls-{}.txt'.format(len(names))
    path.write_text(''.join(server.url(name) + '\n' for name in names))
    return path


def race_contenders(urls: Path, outdir: Path, files: Dict[str, bytes], parallel: int,
                    args: Any, under_test: common.BitpitUnderTest, server: Any,
                    baseline: Optional[common.BitpitUnderTest] = None
                    ) -> Tuple[List[Contender], Dict[str, str]]:
    """aria2c, the floors and bitpit (and the ``baseline`` bitpit, if any)
    for one scenario (the files listed in ``urls``, ``parallel`` at once),
    all checked file by file."""
    def python(name: str, code: str, env: Optional[Dict[str, str]] = None,
               *extra: Any) -> Contender:
        return contender(name, common.python_command(code, urls, outdir, parallel, *extra),
                         outdir, files, args.timeout, server, env)

    def aria2c() -> Contender:
        binary = common.find_tool('aria2c', package='aria2', install=args.install)
        if not binary:
            raise Skipped('aria2c is not installed')
        return contender('aria2c', [
            binary, '--no-conf', '-q', '-j{}'.format(parallel), '-x1', '-i', str(urls),
            '-d', str(outdir), '--allow-overwrite=true', '--auto-file-renaming=false',
            '--file-allocation=none'], outdir, files, args.timeout, server)

    def bitpit() -> Contender:
        common.note('bitpit: ' + under_test.require())
        return python('bitpit', BITPIT_CODE, under_test.env, args.timeout)

    make = [('aria2c', aria2c), ('floor', lambda: python('floor', FLOOR_CODE)),
            ('essentials', lambda: python('essentials', ESSENTIALS_CODE, under_test.env))]
    if args.threads:
        make.append(('threads', lambda: python('threads', THREADS_CODE)))
    make.append(('bitpit', bitpit))
    if baseline is not None:
        make.append(('bitpit baseline', lambda: python(
            'bitpit baseline', BITPIT_CODE, baseline.env, args.timeout)))
    return common.gather(make)


def race(count: int, parallel: int, names: List[str], contents: Dict[str, bytes], tmp: Path,
         args: Any, under_test: common.BitpitUnderTest, server: Any,
         baseline: Optional[common.BitpitUnderTest] = None) -> Section:
    """One scenario: ``count`` files, ``parallel`` at once. Prints its report
    and returns it."""
    title = '{:,} x {} at {} at once'.format(count, common.fmt_size(args.file_size), parallel)
    common.note('--- {}  (load average {})'.format(title, load_average()))
    files = {name: contents[name] for name in names[:count]}
    contenders, skipped = race_contenders(url_list(tmp, server, names[:count]), tmp / 'out',
                                          files, parallel, args, under_test, server,
                                          baseline)
    outcomes = common.run_interleaved(contenders, args.runs, args.warmup)
    common.derive(outcomes, 'cpu_ms_per_file', lambda run: run['cpu_seconds'] / count * 1e3)
    common.derive(outcomes, 'files_per_s', lambda run: count / run['seconds'])
    common.derive(outcomes, 'switches_per_file', lambda run: run['voluntary_switches'] / count)
    tag = '{:,} at {}: '.format(count, parallel)
    goals = [Goal(tag + 'bitpit/aria2c wall', common.ratio(outcomes, 'bitpit', 'aria2c'), 0.5),
             Goal(tag + 'bitpit/aria2c CPU',
                  common.ratio(outcomes, 'bitpit', 'aria2c', 'cpu_seconds'), 1.0),
             Goal(tag + 'bitpit/floor CPU',
                  common.ratio(outcomes, 'bitpit', 'floor', 'cpu_seconds'), 2.5)]
    if count >= 10000:
        goals.append(Goal(tag + 'bitpit peak RSS', common.median_of(
            outcomes, 'bitpit', 'peak_rss_mib'), 60, unit=' MiB'))
    print('\n{} from {}, {} runs each, interleaved (load average {})'.format(
        title, server.description, args.runs, load_average()))
    print(common.report_contenders(outcomes, skipped, [
        ('median s', 'seconds', '{:.3f}'), *common.CPU_COLUMNS,
        ('CPU ms/file', 'cpu_ms_per_file', '{:.2f}'), ('waits/file', 'switches_per_file', '{:.1f}'),
        ('files/s', 'files_per_s', '{:.0f}'),
        ('peak RSS MiB', 'peak_rss_mib', '{:.1f}'), ('conns', 'conns', '{:.0f}'),
        ('requests', 'requests', '{:.0f}'), ('threads left', 'threads_left', '{:.0f}')]))
    info = [(label, common.ratio(outcomes, a, b, key)) for label, a, b, key in [
        ('bitpit/floor wall', 'bitpit', 'floor', 'seconds'),
        ('floor/aria2c wall', 'floor', 'aria2c', 'seconds'),
        ('floor/aria2c CPU', 'floor', 'aria2c', 'cpu_seconds'),
        ('essentials/floor CPU', 'essentials', 'floor', 'cpu_seconds'),
        ('essentials/aria2c wall', 'essentials', 'aria2c', 'seconds'),
        ('essentials/aria2c CPU', 'essentials', 'aria2c', 'cpu_seconds'),
        ('bitpit/essentials CPU', 'bitpit', 'essentials', 'cpu_seconds'),
        ('threads/floor CPU', 'threads', 'floor', 'cpu_seconds'),
        ('bitpit/threads CPU', 'bitpit', 'threads', 'cpu_seconds'),
        ('bitpit/baseline wall', 'bitpit', 'bitpit baseline', 'seconds'),
        ('bitpit/baseline CPU', 'bitpit', 'bitpit baseline', 'cpu_seconds')]]
    print('(for information: {})'.format(', '.join(
        '{} {:.2f}'.format(label, value) for label, value in info if value is not None)))
    print('\n'.join(goal.line() for goal in goals))
    return Section(title, outcomes, skipped, goals)


def manager_mode(mode: str, tmp: Path, args: Any, under_test: common.BitpitUnderTest
                 ) -> Section:
    """``add``: ``args.add_files`` URLs added to one Manager; ``stop``:
    ``args.stop_downloads`` downloads running from a paced server, then
    stopped. Each run in a fresh process; prints the report."""
    common.note('--- mode {}  (load average {})'.format(mode, load_average()))
    try:
        common.note('bitpit: ' + under_test.require())
    except Skipped as exc:
        print('\nmode {}: skipped, {}'.format(mode, exc))
        return Section('mode ' + mode, {}, {'bitpit ' + mode: str(exc)}, [])
    docroot, outdir = tmp / ('www-' + mode), tmp / 'out'
    docroot.mkdir()
    count = args.add_files if mode == 'add' else args.stop_downloads
    names = ['s{:05d}.bin'.format(i) for i in range(count)]
    if mode == 'add':  # never fetched: any server address does
        server: Any = common.PythonFileServer(docroot)
    else:  # every download lasts minutes: sparse files, paced per request
        for name in names:
            common.make_file(docroot / name, 4 * MiB, sparse=True)
        nginx = common.find_tool('nginx', install=args.install) if args.server != 'python' \
            else None
        server = common.NginxServer(docroot, nginx, limit_rate=16 * KiB) if nginx else \
            common.PacingFileServer(docroot, 16 * KiB)
    with server:
        urls = url_list(tmp, server, names)
        code = ADD_CODE if mode == 'add' else STOP_CODE
        extra = args.parallel[0] if mode == 'add' else args.timeout
        run = Contender('bitpit ' + mode, common.python_command(code, urls, outdir, extra),
                        args.timeout + 30, reset=functools.partial(reset_dir, outdir, server),
                        env=under_test.env, cwd=tmp)
        outcomes = common.run_interleaved([run], args.runs, warmup=0)
        description = server.description
    outcome = outcomes[run.name]
    if mode == 'add':
        title = 'add() of {:,} URLs to one Manager(max_running={}), not started'.format(
            count, args.parallel[0])
        columns = [('median s', 'seconds', '{:.3f}'), ('import s', 'import_s', '{:.3f}'),
                   ('add s', 'add_s', '{:.3f}'), ('add CPU s', 'add_cpu_s', '{:.3f}'),
                   ('us/URL', 'add_us_per_url', '{:.1f}'),
                   ('RSS after add MiB', 'rss_after_add_mib', '{:.1f}'),
                   ('peak RSS MiB', 'peak_rss_mib', '{:.1f}')]
        goals = [Goal('add() of {:,} URLs'.format(count), outcome.median('add_s'), 0.5,
                      unit=' s'),
                 Goal('{:,} added: peak RSS'.format(count), outcome.median('peak_rss_mib'), 60,
                      unit=' MiB')]
    else:
        title = '{} downloads running at once from {}, then stop_all() and stop()'.format(
            count, description)
        columns = [('ramp s', 'ramp_s', '{:.3f}'), ('stop_all s', 'stop_all_s', '{:.3f}'),
                   ('stop s', 'stop_s', '{:.3f}'), ('total s', 'stop_total_s', '{:.3f}'),
                   ('threads left', 'threads_left', '{:.0f}'),
                   ('left 1 s later', 'threads_left_1s', '{:.0f}'),
                   ('peak RSS MiB', 'peak_rss_mib', '{:.1f}')]
        goals = [Goal('{} running: stop_all()+stop()'.format(count),
                      outcome.median('stop_total_s'), 0.5, unit=' s'),
                 Goal('{} running: threads left after'.format(count),
                      max((r.get('threads_left', 0) for r in outcome.runs), default=None), 0)]
    print('\n{}, {} runs (load average {})'.format(title, args.runs, load_average()))
    print(common.report_contenders(outcomes, {}, columns))
    for result in outcome.runs:
        if result.get('thread_names'):
            print('  threads left in one run: {}'.format(', '.join(result['thread_names'])))
            break
    print('\n'.join(goal.line() for goal in goals))
    return Section(title, outcomes, {}, goals)


def profile(names: List[str], tmp: Path, args: Any, under_test: common.BitpitUnderTest,
            server: Any) -> None:
    """``--mode profile``: bitpit and the floor, once each on the first
    scenario, under cProfile in every thread (stats kept in
    ``--profile-dir``, the top functions printed with their calls per
    file), then under ``strace -f -c`` at N and N/5 files, whose
    difference gives the system calls per file."""
    count, parallel = args.files[0], args.parallel[0]
    keep = Path(args.profile_dir).resolve()
    keep.mkdir(parents=True, exist_ok=True)
    outdir = tmp / 'out'
    programs = [('floor', FLOOR_CODE, None, ())]
    try:
        common.note('bitpit: ' + under_test.require())
        programs.append(('bitpit', BITPIT_CODE, under_test.env, (args.timeout,)))
    except Skipped as exc:
        print('\nprofile: bitpit skipped, {}'.format(exc))
    lists = {n: url_list(tmp, server, names[:n]) for n in (count, max(1, count // 5))}
    strace = common.find_tool('strace', install=args.install)
    for name, code, env, extra in programs:
        script = tmp / ('program-{}.py'.format(name))  # not bitpit.py: it would shadow bitpit
        script.write_text(code)
        stats_file = keep / '{}-{}x{}.prof'.format(name, count, parallel)
        reset_dir(outdir, server)
        result = common.run_measured(common.python_command(
            PROFILE_CODE, stats_file, script, lists[count], outdir, parallel, *extra),
            args.timeout + 30, env=env, cwd=tmp)
        if result.returncode != 0 or not stats_file.exists():
            print('\nprofile of {} failed: {}'.format(name, result.failure()))
            continue
        stats = pstats.Stats(str(stats_file))
        print('\n{}: {:,} x {} at {} at once under cProfile in every thread (CPU time of '
              'each thread, profiler overhead included): {:.2f} s, {:.0f} us per file; '
              'stats in {}'.format(name, count, common.fmt_size(args.file_size), parallel,
                                   stats.total_tt, stats.total_tt / count * 1e6, stats_file))
        for title, index in (('own time', 2), ('cumulative time', 3)):
            rows = sorted(stats.stats.items(), key=lambda item: -item[1][index])[:args.top]
            print(common.format_table(
                ['{} (top {})'.format(title, args.top), 'share', 'calls/file'],
                [[function_label(func),
                  '{:.1%}'.format(row[index] / stats.total_tt),
                  '{:.2f}'.format(row[1] / count)] for func, row in rows]))
        if not strace:
            print('(strace is not installed: no system calls per file)')
            continue
        calls = {}
        for n, urls in lists.items():
            reset_dir(outdir, server)
            report = tmp / 'strace-{}.txt'.format(n)
            common.run_measured([strace, '-f', '-c', '-o', str(report), *common.python_command(
                code, urls, outdir, parallel, *extra)], args.timeout + 30, env=env, cwd=tmp)
            calls[n] = strace_counts(report)
        small, large = sorted(lists)
        per_file = {call: (calls[large].get(call, 0) - calls[small].get(call, 0)) / (large - small)
                    for call in calls[large]} if large > small else {}
        shown = sorted(((n, call) for call, n in per_file.items() if n >= 0.05), reverse=True)
        print('{}: system calls per file (strace -f -c at {} and {} files): {:.1f}: {}'.format(
            name, small, large, sum(n for n, _ in shown),
            ', '.join('{} {:.2f}'.format(call, n) for n, call in shown)))


def function_label(func: Tuple[str, int, str]) -> str:
    """``file.py:LINE(name)`` for a function of a pstats key, the name alone
    for a built-in."""
    path, line, name = func
    return name if path == '~' else '{}:{}({})'.format(Path(path).name, line, name)


def strace_counts(report: Path) -> Dict[str, int]:
    """The calls per system call in the summary that ``strace -c -o`` wrote."""
    counts = {}
    for line in report.read_text().splitlines() if report.exists() else []:
        fields = line.split()
        if len(fields) >= 5 and fields[-1] != 'total' and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])
    return counts


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``'1.52 1.20 0.80'``."""
    return ' '.join('{:.2f}'.format(x) for x in os.getloadavg())


def int_list(text: str) -> List[int]:
    """An argparse type: comma-separated positive integers (``1,000`` is
    not one: no thousands separators)."""
    return [common.positive_int(part) for part in text.split(',')]


def main(argv=None) -> int:
    parser = common.base_parser(__doc__.split('\n\n')[0], runs=3, baseline=True)
    parser.add_argument('--files', type=int_list, default=[500, 3000],
                        help='files per scenario, comma-separated (default 500,3000; '
                             'issue 24 also names 10000)')
    parser.add_argument('--parallel', type=int_list, default=[50],
                        help='downloads at once, comma-separated (default 50; issue 24 '
                             'also names 200)')
    parser.add_argument('--file-size', type=common.parse_size, default=10 * KiB,
                        help='size of each file (default 10k)')
    parser.add_argument('--mode', default='race,add,stop',
                        help='comma-separated: race (the scenarios), add (add() of '
                             '--add-files URLs), stop (stop of --stop-downloads running '
                             'downloads), profile (bitpit and the floor under cProfile and '
                             'strace, on the first scenario); default %(default)s')
    parser.add_argument('--add-files', type=common.positive_int, default=10000,
                        help='URLs added in --mode add (default %(default)s)')
    parser.add_argument('--stop-downloads', type=common.positive_int, default=200,
                        help='downloads running in --mode stop (default %(default)s)')
    parser.add_argument('--profile-dir', default='many_files-profile',
                        help='where --mode profile keeps its cProfile stats (default '
                             '%(default)s)')
    parser.add_argument('--top', type=common.positive_int, default=25,
                        help='functions listed by --mode profile (default %(default)s)')
    parser.add_argument('--no-threads', dest='threads', action='store_false',
                        help='leave the threads floor out')
    parser.add_argument('--timeout', type=float, default=300,
                        help='seconds before one run is killed (default %(default)s)')
    args = parser.parse_args(argv)
    modes = args.mode.split(',')
    if set(modes) - {'race', 'add', 'stop', 'profile'}:
        parser.error('--mode takes race, add, stop and profile, not {!r}'.format(args.mode))

    common.note('load average before: {}'.format(load_average()))
    sections: List[Section] = []
    with common.workspace(args.tmp) as tmp:
        under_test = common.load_bitpit(args.bitpit, tmp, 'Downloader', 'Manager')
        baseline = common.load_baseline(args, tmp, 'Downloader', 'Manager')
        if 'race' in modes or 'profile' in modes:
            docroot = tmp / 'www'
            docroot.mkdir()
            contents = make_files(docroot, max(args.files), args.file_size)
            names = sorted(contents)
            with common.serve_files(docroot, args.server, args.install,
                                    log_requests=True) as server:
                common.note('serving {:,} files of {} from {} at {}'.format(
                    len(names), common.fmt_size(args.file_size), server.description,
                    server.base_url))
                for count in args.files if 'race' in modes else []:
                    for parallel in args.parallel:
                        sections.append(race(count, parallel, names, contents, tmp, args,
                                             under_test, server, baseline))
                if 'profile' in modes:
                    profile(names, tmp, args, under_test, server)
        for mode in ('add', 'stop'):
            if mode in modes:
                sections.append(manager_mode(mode, tmp, args, under_test))

    print('\nbitpit under test: {}'.format(under_test.skip or under_test.description))
    print('(CPU s: user + sys of the whole process, all threads, from wait4; load average '
          'now {})'.format(load_average()))
    outcomes, skipped, goals = common.merge_sections(sections)
    print('\n'.join(goal.line() for goal in goals))
    return common.finish(args.json, {
        'benchmark': 'many_files', 'files': args.files, 'parallel': args.parallel,
        'file_size': args.file_size, 'runs': args.runs, 'modes': modes,
        'bitpit': under_test.skip or under_test.description}, outcomes, skipped, goals)


if __name__ == '__main__':
    sys.exit(common.run_main(main))
