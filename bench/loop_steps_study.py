# The essentials contender of many_files.py written as steps on bitpit._Loop
# (branch loop-engine): run it as that harness runs ESSENTIALS_CODE.

import collections, json, os, socket, sys, threading, time
import bitpit
list_file, outdir, parallel = sys.argv[1], sys.argv[2], int(sys.argv[3])
urls = open(list_file).read().split()
began = time.perf_counter()
lock, ended, all_ended = threading.Lock(), set(), threading.Event()

class Download(bitpit.Emitter):
    __signals__ = ('state-changed', 'size-changed')
    __slots__ = ('address', 'path', 'state', 'size', '_emitter_callbacks')

    def __init__(self, url):
        self.address = bitpit._check_url(url)
        self.path = self.size = None
        self.state = 'queued'

def on_state(d, old_state):
    if d.state in ('complete', 'fatal-error'):
        with lock:
            ended.add(id(d))
            if len(ended) == len(urls):
                all_ended.set()

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
received = bytearray(65536)
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
Wait = bitpit._Wait

def connection_steps(address):
    """One keep-alive connection's GETs, one after another, as steps."""
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    fd_sock = sock.fileno()
    try:
        while pending:
            d = downloads[pending.pop()]
            address_ = d.address
            d.path = os.path.join(outdir, bitpit._safe_filename(bitpit._filename_from_url(address_)))
            lines = ['GET ', address_.target, ' HTTP/1.1\r\nHost: ', address_.host_field, '\r\n']
            for name, value in fields.items():
                lines += (name, ': ', value, '\r\n')
            lines.append('\r\n')
            request = ''.join(lines).encode('latin-1')
            if os.write(fd_sock, request) != len(request):
                raise OSError('short send')
            changes.append((d, 'state', 'downloading'))
            parser, head = bitpit._HeadParser(), None
            while head is None:
                if not (yield Wait(sock, None)):
                    raise OSError('time-out')
                n = sock.recv_into(received)
                if not n:
                    raise OSError('connection closed')
                head = parser.feed(bytes(received[:n]))
            if head.status != 200:
                raise OSError('{}: status {}'.format(d.address.url, head.status))
            fields_ = head.headers
            left = int(fields_.get('Content-Length'))
            etag = fields_.get('ETag')
            modified = bitpit._parse_http_date(fields_.get('Last-Modified'))
            changes.append((d, 'size', left))
            data = parser.rest
            fd = os.open(d.path, NEW_FILE, 0o666)
            offset = 0
            while True:
                if data:
                    os.pwrite(fd, data, offset)
                    offset += len(data)
                    left -= len(data)
                if not left:
                    break
                if not (yield Wait(sock, None)):
                    raise OSError('time-out')
                n = sock.recv_into(received)
                if not n:
                    raise OSError('connection closed')
                data = bytes(received[:n])
            if modified is not None:
                os.utime(fd, (modified, modified))
            if etag:
                os.setxattr(fd, 'user.bitpit.etag', etag.encode('utf-8'))
            os.close(fd)
            changes.append((d, 'state', 'complete'))
    finally:
        sock.close()

ends = []
def done(result, error):
    ends.append(error)
    hand_over()

loop = bitpit._Loop(after_round=hand_over)
host, port = downloads[0].address.host_key[1:]
for _ in range(min(parallel, len(urls))):
    loop.spawn(connection_steps((host, port)), done)
loop.join()
assert not any(ends), ends
hand_over()
finished = all_ended.wait(60)
changes.append(None)
hand_over()
signals.join()
print(json.dumps({'elapsed_s': time.perf_counter() - began}), flush=True)
os._exit(0 if finished else 1)
