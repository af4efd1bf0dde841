"""The command line: ``main()``, ``_cli()`` and ``python bitpit.py``:
downloading, exit statuses, usage errors, Ctrl-C and resume, the live
table, and the request options (headers, user, checksum, proxy, CA
certificate) given on the command line.

Most tests run bitpit as a subprocess against the local server of
conftest.py, each with a time-out. Waiting for a subprocess to have made
progress polls the size of its output file against a deadline; nothing
else sleeps.
"""
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

import bitpit
from conftest import HERE, HTTPS_DATA, basic

BITPIT = str(HERE / 'bitpit.py')
DATA = bytes(range(256)) * 1024 + b'end'           # 256 KiB + 3 bytes
SHA256 = hashlib.sha256(DATA).hexdigest()
OTHER = os.urandom(50000)
CURSOR_UP = re.compile(r'\x1b\[(\d+)A')
ESCAPE = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')


def _env():
    env = {k: v for k, v in os.environ.items() if 'proxy' not in k.lower()}
    env['PYTHONPATH'] = str(HERE)
    env.pop('COLUMNS', None)
    env.pop('LINES', None)
    return env


def _default_sigint():
    # A child of a shell that ignores SIGINT would inherit that; Python only
    # turns SIGINT into KeyboardInterrupt when it starts with the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(args, cwd, input=None, timeout=20):
    """Run ``python bitpit.py ARGS`` to its end; a CompletedProcess (text)."""
    return subprocess.run([sys.executable, BITPIT] + list(args), cwd=str(cwd),
                          input=input, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def wait_size(path, minimum, proc, timeout=10):
    """Poll ``path`` until it holds ``minimum`` bytes (the child made
    progress); fail if the child ended or the deadline passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= minimum:
            return path.stat().st_size
        assert proc.poll() is None, 'bitpit ended early: {}'.format(proc.communicate())
        time.sleep(0.02)
    raise AssertionError('{} did not reach {} bytes in {} s'.format(path, minimum, timeout))


# -- downloading ---------------------------------------------------------------

SUMMARY = (r'Downloaded: {} files? of {}, [0-9.]+ [KMG]?B in [0-9.]+ s '
           r'\([0-9.]+ [KMG]?B/s\)')

def test_several_urls(server, tmp_path):
    urls = [server.add('/a.bin', DATA), server.add('/b.bin', OTHER),
            server.add('/c.txt', b'hello\n')]
    result = run(urls, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'a.bin').read_bytes() == DATA
    assert (tmp_path / 'b.bin').read_bytes() == OTHER
    assert (tmp_path / 'c.txt').read_bytes() == b'hello\n'
    assert not list(tmp_path.glob('*.bitpit'))
    assert re.fullmatch(SUMMARY.format(3, 3), result.stdout.rstrip('\n').splitlines()[-1])


def test_plain_lines_when_piped(server, tmp_path):
    url = server.add('/one.bin', DATA)
    result = run([url], tmp_path)
    assert result.returncode == 0, result.stderr
    assert '\x1b' not in result.stdout and '\r' not in result.stdout
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ['start', 'download', 'complete',
                                                   'Downloaded:']
    assert lines[0].split()[1:] == ['one.bin', url]
    assert lines[2].split() == ['complete', 'one.bin', '256.0', 'KB']
    assert re.fullmatch(SUMMARY.format(1, 1), lines[3])
    assert lines[3].startswith('Downloaded: 1 file of 1, 256.0 KB in ')


def test_input_file(server, tmp_path):
    a = server.add('/a.bin', DATA)
    b = server.add('/b.bin', OTHER)
    c = server.add('/c.bin', b'c' * 100)
    listing = tmp_path / 'urls.txt'
    listing.write_text('# my downloads\n\n{}\n   \n  {}   # the other one\n#{}\n'
                       .format(a, b, c), encoding='utf-8')
    result = run(['-i', 'urls.txt', c], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'a.bin').read_bytes() == DATA
    assert (tmp_path / 'b.bin').read_bytes() == OTHER
    assert (tmp_path / 'c.bin').read_bytes() == b'c' * 100
    assert 'Downloaded: 3 files of 3' in result.stdout
    assert len(server.requests_for('/c.bin')) == 1


def test_input_from_stdin(server, tmp_path):
    a = server.add('/a.bin', DATA)
    b = server.add('/b.bin', OTHER)
    result = run(['-i', '-'], tmp_path, input='{}\n# comment\n\n{}\n'.format(a, b))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'a.bin').read_bytes() == DATA
    assert (tmp_path / 'b.bin').read_bytes() == OTHER


def test_output_file(server, tmp_path):
    url = server.add('/download?id=7', DATA)
    result = run(['-o', 'chosen.dat', url], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'chosen.dat').read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ['chosen.dat']


def test_directory(server, tmp_path):
    a = server.add('/a.bin', DATA)
    b = server.add('/b.bin', OTHER)
    result = run(['-d', 'some/where', a, b], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'some/where/a.bin').read_bytes() == DATA
    assert (tmp_path / 'some/where/b.bin').read_bytes() == OTHER
    result = run(['-d', 'else', '-o', 'x.bin', a], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'else/x.bin').read_bytes() == DATA


def test_same_name_gets_distinct_files(server, tmp_path):
    urls = [server.add('/1/f.bin', b'one'), server.add('/2/f.bin', b'two'),
            server.add('/3/F.bin', b'three'), server.add('/4/f.bin', b'four'),
            server.add('/1/src.tar.gz', b'tar one'), server.add('/2/src.tar.gz', b'tar two')]
    urls.append(urls[0])  # the same URL twice is downloaded once
    result = run(urls, tmp_path)
    assert result.returncode == 0, result.stderr
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert files == {'f.bin': b'one', 'f.1.bin': b'two', 'F.2.bin': b'three',
                     'f.3.bin': b'four', 'src.tar.gz': b'tar one',
                     'src.1.tar.gz': b'tar two'}
    assert len(server.requests_for('/1/f.bin')) == 1


def test_existing_file_is_resumed_not_renamed(server, tmp_path):
    url = server.add('/f.bin', DATA)
    (tmp_path / 'f.bin').write_bytes(DATA[:1000])
    result = run([url], tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ['f.bin']
    assert (tmp_path / 'f.bin').read_bytes() == DATA
    assert server.requests_for('/f.bin')[0].headers['Range'] == 'bytes=1000-'


def test_max_running(server, tmp_path):
    urls = [server.add('/{}.bin'.format(i), OTHER[:20000], throttle=200000)
            for i in range(3)]
    result = run(['-m', '1'] + urls, tmp_path)
    assert result.returncode == 0, result.stderr
    assert server.max_concurrent == 1
    assert len(list(tmp_path.glob('*.bin'))) == 3


# -- exit status ------------------------------------------------------------------

def test_404_ends_with_status_1(server, tmp_path):
    good = server.add('/good.bin', DATA)
    started = time.monotonic()
    result = run([good, server.url('/missing.iso')], tmp_path)
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    assert (tmp_path / 'good.bin').read_bytes() == DATA
    assert re.search(r'^fatal-error +missing\.iso +HTTP 404', result.stdout, re.M)
    # the summary ends with a line per failed download
    assert result.stdout.splitlines()[-3].startswith('Downloaded: 1 file of 2, ')
    assert result.stdout.splitlines()[-2:] == [
        'Failed: 1 file', '  missing.iso: HTTP 404 Not Found for ' + server.url('/missing.iso')]


def test_out_of_retries_ends_with_status_1(server, tmp_path):
    url = server.add('/busy.bin', DATA, status=503)
    result = run(['--retries', '2', '--restart-wait', '0', url], tmp_path)
    assert result.returncode == 1
    assert len(server.requests_for('/busy.bin')) == 3  # one try and two retries
    assert result.stdout.count('(will retry)') == 2
    assert 'fatal-error busy.bin  HTTP 503' in result.stdout


def test_transient_error_is_retried(server, tmp_path):
    url = server.add('/flaky.bin', DATA, status=503, status_times=1)
    result = run(['--restart-wait', '0', url], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / 'flaky.bin').read_bytes() == DATA
    assert re.search(r'^error +flaky\.bin +HTTP 503.*\(will retry\)$', result.stdout, re.M)


def test_timeout_option(server, tmp_path):
    url = server.add('/silent.bin', DATA, stall_after=1000)
    started = time.monotonic()
    result = run(['--timeout', '0.3', '--retries', '0', url], tmp_path)
    assert result.returncode == 1
    assert time.monotonic() - started < 10
    assert 'fatal-error silent.bin' in result.stdout


@pytest.mark.parametrize('args', [
    ['-r', '1x', 'http://127.0.0.1:9/f'],
    ['-r', '10kb', 'http://127.0.0.1:9/f'],
    ['-r', '-5', 'http://127.0.0.1:9/f'],
    ['-m', '-1', 'http://127.0.0.1:9/f'],
    ['--timeout', '0', 'http://127.0.0.1:9/f'],
    ['--retries', 'many', 'http://127.0.0.1:9/f'],
    ['-o', 'x', 'http://127.0.0.1:9/f', 'http://127.0.0.1:9/g'],
    ['ftp://127.0.0.1/f'],
    ['not a url'],
    ['-i', 'no-such-file.txt'],
    ['--no-such-option', 'http://127.0.0.1:9/f'],
    [],
], ids=lambda args: ' '.join(args) or 'nothing')
def test_usage_errors(tmp_path, args):
    result = run(args, tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.startswith('usage: bitpit')
    assert 'bitpit: error:' in result.stderr
    assert result.stdout == ''
    assert list(tmp_path.iterdir()) == []


def test_bad_url_in_input_file_names_the_line(tmp_path):
    (tmp_path / 'urls.txt').write_text('http://127.0.0.1:9/ok\n\nftp://x/y\n')
    result = run(['-i', 'urls.txt'], tmp_path)
    assert result.returncode == 2
    assert 'urls.txt line 3' in result.stderr


@pytest.mark.parametrize('text,rate', [('2048', 2048), ('100k', 102400),
                                       ('0.5m', 524288), ('1M', 1048576), ('0', 0)])
def test_rate_forms(text, rate):
    args = bitpit._build_parser().parse_args(['-r', text, 'http://h/f'])
    assert args.rate_limit == rate
    assert bitpit._parse_rate(text) == rate


def test_option_defaults():
    args = bitpit._build_parser().parse_args(['http://h/f'])
    assert (args.max_running, args.retries, args.rate_limit) == (5, 5, 0)
    assert args.restart_wait > 0 and args.timeout > 0
    parser = bitpit._build_parser()
    assert bitpit._downloader_kwargs(parser, args, 1) == {
        'timeout': args.timeout, 'retries': 5, 'connections': 1, 'max_size': None,
        'min_speed': 0, 'if_exists': 'resume'}


def test_version_and_help(tmp_path):
    result = run(['--version'], tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == 'bitpit ' + bitpit.__version__
    result = run(['--help'], tmp_path)
    assert result.returncode == 0
    for text in ('-r RATE', '-m N', '-d DIR', '-o FILE', '-i FILE', '--restart-wait',
                 '--retries', '--timeout', '--quiet', 'examples:', 'exit status'):
        assert text in result.stdout


def test_quiet_prints_only_errors(server, tmp_path):
    good = server.add('/good.bin', DATA)
    result = run(['-q', good], tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, '', '')
    result = run(['-q', '-o', 'bad.bin', server.url('/missing')], tmp_path)
    assert result.returncode == 1
    assert result.stdout == ''
    assert re.fullmatch(r'fatal-error bad\.bin +HTTP 404 .*\n', result.stderr)


# -- Ctrl-C and resume -------------------------------------------------------------

def test_sigint_pauses_and_next_run_resumes(server, tmp_path):
    data = os.urandom(600000)
    url = server.add('/big.bin', data, throttle=100000)
    target = tmp_path / 'big.bin'
    proc = subprocess.Popen([sys.executable, BITPIT, url], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), preexec_fn=_default_sigint)
    try:
        wait_size(target, 1, proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert 'interrupted' in err and 'Traceback' not in err
    partial = target.stat().st_size
    assert 0 < partial < len(data)
    assert target.read_bytes() == data[:partial]

    server.add('/big.bin', data)  # same bytes and ETag, now at full speed
    result = run([url], tmp_path)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == data
    last = server.requests_for('/big.bin')[-1]
    assert last.headers['Range'] == 'bytes={}-'.format(partial)
    assert not list(tmp_path.glob('*.bitpit'))


# -- the live table --------------------------------------------------------------------

def run_in_pty(args, cwd, columns=60, lines=20, timeout=20):
    """Run ``python bitpit.py ARGS`` with a pseudo-terminal as its standard
    input, output and error; return (exit status, everything it wrote)."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', lines, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, BITPIT] + list(args), cwd=str(cwd),
                            stdin=slave, stdout=slave, stderr=slave, env=_env(),
                            close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, 'bitpit did not end in time'
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child and its terminal are gone
                break
            if not data:
                break
            chunks.append(data)
        status = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return status, b''.join(chunks).decode('utf-8', 'replace')


def test_live_table_on_a_terminal(server, tmp_path):
    long_name = 'a-very-long-file-name-' + 'x' * 80 + '.iso'
    urls = [server.add('/small.bin', DATA[:150000], throttle=100000),
            server.add('/' + long_name, OTHER, throttle=50000)]
    status, output = run_in_pty(urls, tmp_path, columns=60)
    assert status == 0, output
    assert (tmp_path / long_name).read_bytes() == OTHER
    # redrawn in place: the cursor goes back up over the two rows and the
    # summary, several times, instead of the output scrolling
    ups = [int(n) for n in CURSOR_UP.findall(output)]
    assert len(ups) >= 2 and set(ups) == {3}, ups
    frames = [ESCAPE.sub('', frame).replace('\r', '')
              for frame in re.split(r'\r\x1b\[\d+A', output)]
    last = [line for line in frames[-1].split('\n') if line]
    assert len(last) == 4, last
    assert re.match(r'c +146\.5 KB 100% \[=+\] +small\.bin$', last[0]), last
    assert last[1].startswith('c ') and last[1].endswith('.iso'), last
    assert '..' in last[1] and long_name not in output  # cut in its middle
    assert last[2] == 'running 0 | completed 2 / 2'
    assert re.fullmatch(SUMMARY.format(2, 2), last[3]), last  # below the table, once
    assert any(re.match(r'd .*KB/s .*\d+% \[=* *\] +\d+:\d\d:\d\d small\.bin$', line)
               for frame in frames for line in frame.split('\n')), frames
    for frame in frames:
        for line in frame.split('\n'):
            assert len(line) < 60, line


def test_live_table_many_downloads_fit_the_terminal(server, tmp_path):
    urls = [server.add('/f{}.bin'.format(i), b'x' * 100) for i in range(12)]
    status, output = run_in_pty(urls, tmp_path, columns=70, lines=8)
    assert status == 0, output
    # at most lines - 1 lines are drawn, so the table never scrolls
    assert all(int(n) <= 7 for n in CURSOR_UP.findall(output))
    assert 'more' in output and 'completed 12 / 12' in output
    assert len(list(tmp_path.glob('f*.bin'))) == 12


def test_quiet_on_a_terminal_draws_nothing(server, tmp_path):
    url = server.add('/q.bin', DATA)
    status, output = run_in_pty(['-q', url], tmp_path)
    assert (status, output) == (0, '')


# -- from Python ----------------------------------------------------------------------------

def test_main_from_python(server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a = server.add('/a.bin', DATA)
    b = server.add('/b.bin', OTHER)
    assert bitpit.main([a, b], rate_limit='10m', max_running=1) == 0
    assert (tmp_path / 'a.bin').read_bytes() == DATA
    assert (tmp_path / 'b.bin').read_bytes() == OTHER
    assert 'Downloaded: 2 files of 2' in capsys.readouterr().out
    assert bitpit.main([server.url('/missing')]) == 1
    with pytest.raises(ValueError):
        bitpit.main([a], rate_limit='fast')


def test_cli_function_returns_status(server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bitpit._cli(['--version']) == 0
    assert bitpit._cli(['-r', 'x', 'http://h/f']) == 2
    url = server.add('/c.bin', DATA)
    assert bitpit._cli(['-q', url]) == 0
    assert (tmp_path / 'c.bin').read_bytes() == DATA


def test_python_dash_m(server, tmp_path):
    url = server.add('/m.bin', DATA)
    result = subprocess.run([sys.executable, '-m', 'bitpit', '-q', url], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=20, env=_env())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'm.bin').read_bytes() == DATA
    server.add('/missing', b'', status=404)
    result = subprocess.run([sys.executable, '-m', 'bitpit', server.url('/missing')],
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=20,
                            env=_env())
    assert result.returncode != 0


# ---------------------------------------------------------------------------
# request options on the command line
# ---------------------------------------------------------------------------

def cli(tmp_path, *args):
    return bitpit._cli(['-q', '-d', str(tmp_path)] + list(args))


def test_cli_headers_user_agent_and_user(server, tmp_path):
    url = server.add('/f', DATA)
    assert cli(tmp_path, '-H', 'X-One: 1', '--header', 'X-Two:two words',
               '--user-agent', 'agent/9', '--user', 'u:p:w', url) == 0
    headers = server.requests[0].headers
    assert (headers['X-One'], headers['X-Two']) == ('1', 'two words')
    assert headers['User-Agent'] == 'agent/9'
    assert headers['Authorization'] == basic('u', 'p:w')


def test_cli_checksum(server, tmp_path, capsys):
    url = server.add('/f', DATA)
    assert cli(tmp_path, '--checksum', 'sha256:' + SHA256, url) == 0
    assert cli(tmp_path / 'other', '--checksum', 'md5:' + '0' * 32, url) == 1
    assert 'checksum' in capsys.readouterr().err
    assert (tmp_path / 'other' / 'f').read_bytes() == DATA


def test_cli_proxy(server, proxy, tmp_path):
    url = server.add('/f', DATA)
    assert cli(tmp_path, '--proxy', proxy.url, url) == 0
    assert proxy.seen == [('GET', url, None)]


def test_cli_cacert(https_url, certificate, tmp_path):
    assert cli(tmp_path, https_url) == 1
    assert cli(tmp_path, '--cacert', str(certificate[0]), https_url) == 0
    assert (tmp_path / 'secure.bin').read_bytes() == HTTPS_DATA


@pytest.mark.parametrize('args', [
    ['--checksum', 'sha256:abc', 'http://h/x'],
    ['--checksum', 'sha256:' + SHA256, 'http://h/x', 'http://h/y'],
    ['-H', 'no colon here', 'http://h/x'],
    ['-H', ': empty name', 'http://h/x'],
    ['--user', 'nopassword', 'http://h/x'],
    ['--proxy', 'socks5://h:1080', 'http://h/x'],
    ['--cacert', '/nonexistent/ca.pem', 'http://h/x'],
    ['-r', '0.5', 'http://h/x'],
    ['-r', '0.0001k', 'http://h/x'],
    ['--max-size', 'big', 'http://h/x'],
    ['--min-speed', '0.5', 'http://h/x'],
    ['-x', '0', 'http://h/x'],
    ['-x', 'four', 'http://h/x'],
    ['-H', 'Range: bytes=0-', 'http://h/x'],
    ['--timeout', '1e7', 'http://h/x'],              # more than a time-out can wait
])
def test_cli_option_usage_errors(tmp_path, args, capsys):
    assert cli(tmp_path, *args) == 2
    assert 'usage' in capsys.readouterr().err


def test_cli_max_size_and_min_speed(server, tmp_path, capsys):
    big = server.add('/big.bin', b'x' * 50000)
    assert cli(tmp_path, '--max-size', '10k', big) == 1
    assert 'max_size' in capsys.readouterr().err
    assert not (tmp_path / 'big.bin').exists() or (tmp_path / 'big.bin').stat().st_size == 0
    slow = server.add('/slow.bin', b'y' * 50000, throttle=100)
    began = time.monotonic()
    assert cli(tmp_path, '--min-speed', '10k', '--timeout', '1', '--retries', '0',
               slow) == 1
    assert time.monotonic() - began < 5
    assert 'slower than' in capsys.readouterr().err


# -- machine-readable output ------------------------------------------------------

def test_json_lines(server, tmp_path):
    good = server.add('/good.bin', DATA * 3, throttle=400000)
    result = run(['--json', good, server.url('/missing.iso')], tmp_path)
    assert result.returncode == 1, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    fields = {'event', 'url', 'path', 'state', 'downloaded', 'size', 'speed', 'error'}
    states = [r for r in records if r['event'] == 'state']
    assert all(set(r) == fields for r in states)
    assert [(r['url'], r['state']) for r in states if r['url'] == good] == [
        (good, 'start'), (good, 'download'), (good, 'complete')]
    failed = [r for r in states if r['state'] == 'fatal-error']
    assert len(failed) == 1 and 'HTTP 404' in failed[0]['error']
    assert failed[0]['path'] == str(tmp_path / 'missing.iso')
    done = [r for r in states if r['state'] == 'complete'][0]
    assert done['downloaded'] == done['size'] == len(DATA) * 3 and done['error'] is None
    progress = [r for r in records if r['event'] == 'progress']
    assert progress and all(set(r) == fields and r['state'] in ('start', 'download')
                            for r in progress)
    # at most one progress object a second per download
    assert len(progress) <= 2 + (len(DATA) * 3) // 400000
    summary = records[-1]
    assert summary['event'] == 'summary'
    assert (summary['completed'], summary['failed'], summary['total']) == (1, 1, 2)
    assert summary['bytes'] == len(DATA) * 3 and summary['seconds'] > 0
    assert result.stderr == ''
