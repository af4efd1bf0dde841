"""Programs written for bitpit 1.2.0 run unchanged: every stage of the
tutorial, the quick guide and the reference's example, each in its own
interpreter against the local server, with their output checked."""
import collections
import contextlib
import os
import subprocess
import sys
import time

import pytest

from conftest import HERE, LOGO, FixtureServer, program, run_program, start_program


TUTORIAL_FINAL = '''
import bitpit
import pathlib

def on_anything_changed(downloader, old_state=None):
    state = downloader.state
    size = '{:0.2f} {}'.format(*downloader.human_size)
    downloaded = '{:0.2f} {}'.format(*downloader.human_downloaded)
    speed = '{:0.2f} {}'.format(*downloader.human_speed)
    bar = downloader.bar(width=10, char='-')
    percentage = int(downloader.percentage)
    eta = downloader.eta
    text = '\\r{} | {} | {} | {} [{}] {}% {}'.format(
            state,
            size,
            downloaded,
            speed,
            bar,
            percentage,
            eta
        )
    print(text.ljust(79), end='', flush=True)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(
        url,
        path=pathlib.Path.home() / 'Desktop' / 'logo.png',
        restart_wait=30,
        rate_limit=2048,
        timeout=60,
        chunk_size=1024
    )

#listen to everything
dl.listen('size-changed', on_anything_changed)
dl.listen('speed-changed', on_anything_changed)
dl.listen('state-changed', on_anything_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
'''


TUTORIAL_STAGE = '''
import bitpit

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

def on_state_changed(downloader, old_state):
    print('The state changed to:', downloader.state)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url, restart_wait=30)

#listen to signals
dl.listen('size-changed', on_size_changed)
dl.listen('speed-changed', on_speed_changed)
dl.listen('state-changed', on_state_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
'''


QUICK_GUIDE = '''
import bitpit

#will download this
url = URL
d = bitpit.Downloader(url) #downloader instance

d.listen(
        'state-changed',
        lambda var, old_state: print('download state:', var.state)
    )
d.listen(
        'speed-changed',
        lambda var: print('download speed:', *var.human_speed)
    )
d.listen('speed-changed', lambda var: print(int(var.percentage), '%'))
d.listen(
        'size-changed',
        lambda var: print('total file size:', *var.human_size)
    )
d.start()
d.join()
'''


REFERENCE_EXAMPLE = '''
import bitpit

#will download this
url = URL
d = bitpit.Downloader(url) #downloader instance

d.listen('state-changed', lambda var: print('download state:', var.state))
d.listen('speed-changed', lambda var: print('download speed:', *var.human_speed))
d.listen('speed-changed', lambda var: print(int(var.percentage), '%'))
d.listen('size-changed', lambda var: print('total file size:', *var.human_size))
d.start()
d.join()
'''


#: a tutorial program's run: its exit status, output, where its HOME was,
#: and the seconds from its start to its last line of output
Finished = collections.namedtuple('Finished', 'returncode stdout stderr home took')


@pytest.fixture(scope='module')
def tutorial_runs(tmp_path_factory):
    """The tutorial's final program and every stage of it, started at once
    against one server, each with a HOME (its working directory too) of
    its own: three of them download at 2048 B/s for 5 s, which they now
    spend together. ``{name: function returning its Finished}``."""
    programs = [('final', TUTORIAL_FINAL)] + [stage[:2] for stage in TUTORIAL_STAGES]
    with FixtureServer() as srv, contextlib.ExitStack() as files:
        url = srv.add('/static/img/python-logo.png', LOGO)
        started = {}
        try:
            for name, source in programs:
                home = tmp_path_factory.mktemp('home')
                (home / 'Desktop').mkdir()
                out = files.enter_context(open(home.parent / (home.name + '.out'), 'w+'))
                err = files.enter_context(open(home.parent / (home.name + '.err'), 'w+'))
                began = time.time()
                started[name] = start_program(source, url, home, home, out, err), \
                    home, out, err, began
            yield {name: (lambda name=name: finished(*started[name]))
                   for name in started}
        finally:
            for process, *_ in started.values():
                if process.poll() is None:
                    process.kill()
                process.wait()


def finished(process, home, out, err, began):
    """The :class:`Finished` of a program ``tutorial_runs`` started."""
    returncode = process.wait(30)
    took = os.fstat(out.fileno()).st_mtime - began  # wall clock, as the file's time
    out.seek(0)
    err.seek(0)
    return Finished(returncode, out.read(), err.read(), home, took)


def test_tutorial_final_program_runs_unchanged(tutorial_runs):
    result = tutorial_runs['final']()
    assert result.returncode == 0, result.stderr
    assert (result.home / 'Desktop' / 'logo.png').read_bytes() == LOGO
    out = result.stdout
    assert 'Download has started.' in out
    assert 'complete | 9.87 KB | 9.87 KB | 0.00 B/s [----------] 100%' in out
    assert 'download | 9.87 KB |' in out and 'KB/s [' in out
    assert result.took >= 4.5   # 2048 B/s for 10102 bytes
    assert result.stderr == ''


def test_a_program_runs_without_the_machines_proxy(monkeypatch, tmp_path):
    """``tutorial_runs`` starts its programs before ``_no_ambient_proxy``
    clears the proxy settings of a test: the programs drop them still."""
    monkeypatch.setenv('http_proxy', 'http://127.0.0.1:9')
    monkeypatch.setenv('HTTPS_PROXY', 'http://127.0.0.1:9')
    env = program('', 'URL', tmp_path, tmp_path)['env']
    assert 'http_proxy' not in env and 'HTTPS_PROXY' not in env


def test_tutorial_restart_program_runs_unchanged(server, tmp_path):
    server.add('/static/img/python-logo.png', LOGO)
    result = run_program(TUTORIAL_STAGE, server.url('/static/img/python-logo.png'),
                         tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'python-logo.png').read_bytes() == LOGO
    assert 'The file size is 10102' in result.stdout
    assert 'The state changed to: complete' in result.stdout
    assert 'The speed is 0 B/s' in result.stdout


def test_program_without_join_waits_for_scheduled_restart(server, tmp_path):
    """With restart_wait set, the process ends only when the download is
    complete: an error's restart timer keeps it alive (it is not a daemon)."""
    server.add('/static/img/python-logo.png', LOGO, status=503)
    source = TUTORIAL_STAGE.replace('restart_wait=30', 'restart_wait=1')
    env = dict(os.environ, HOME=str(tmp_path), PYTHONPATH=str(HERE))
    proc = subprocess.Popen([sys.executable, '-c', source.replace(
        'URL', repr(server.url('/static/img/python-logo.png')))], cwd=str(tmp_path), env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if 'The state changed to: error' in line:
                break
        server.add('/static/img/python-logo.png', LOGO)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.rstrip().endswith('The state changed to: complete')
    assert (tmp_path / 'python-logo.png').read_bytes() == LOGO


def test_quick_guide_program(server, tmp_path):
    server.add('/static/img/python-logo.png', LOGO)
    result = run_program(QUICK_GUIDE, server.url('/static/img/python-logo.png'),
                         tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert 'total file size: 9.865234375 KB' in result.stdout
    assert 'download state: complete' in result.stdout
    assert (tmp_path / 'python-logo.png').read_bytes() == LOGO


def test_reference_example_program(server, tmp_path):
    """The reference's example registers a one-argument state-changed
    callback; its TypeError is reported on stderr and the download goes on."""
    server.add('/static/img/python-logo.png', LOGO)
    result = run_program(REFERENCE_EXAMPLE, server.url('/static/img/python-logo.png'),
                         tmp_path, tmp_path)
    assert result.returncode == 0
    assert 'total file size: 9.865234375 KB' in result.stdout
    assert 'TypeError' in result.stderr
    assert (tmp_path / 'python-logo.png').read_bytes() == LOGO


# The tutorial's other stages, verbatim but for the URL. (name, program,
# where the file lands, lines the output must hold)
TUTORIAL_STAGES = [
    ('download a file', '''
import bitpit

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'python-logo.png', []),
    ('file size', '''
import bitpit

def on_size_changed(downloader):
    print('The file size is', *downloader.human_size)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url)

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'python-logo.png', ['The file size is 9.865234375 KB']),
    ('speed', '''
import bitpit

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url)

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#print speed periodically
dl.listen('speed-changed', on_speed_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'python-logo.png', ['The file size is 10102', 'The speed is 0 B/s']),
    ('state', '''
import bitpit

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

def on_state_changed(downloader, old_state):
    print('The state changed to:', downloader.state)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(url)

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#print speed periodically
dl.listen('speed-changed', on_speed_changed)

#print state
dl.listen('state-changed', on_state_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'python-logo.png', ['The state changed to: start', 'The state changed to: complete']),
    ('path and rate limit', '''
import bitpit
import pathlib

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

def on_state_changed(downloader, old_state):
    print('The state changed to:', downloader.state)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(
        url,
        path=pathlib.Path.home() / 'Desktop' / 'logo.png',
        restart_wait=30,
        rate_limit=2048
    )

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#print speed periodically
dl.listen('speed-changed', on_speed_changed)

#print state
dl.listen('state-changed', on_state_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'Desktop/logo.png', ['The speed is 1.99', 'The state changed to: complete']),
    ('additional tuning', '''
import bitpit
import pathlib

def on_size_changed(downloader):
    print('The file size is', downloader.size)

def on_speed_changed(downloader):
    print('The speed is', *downloader.human_speed)

def on_state_changed(downloader, old_state):
    print('The state changed to:', downloader.state)

#will download this
url = URL

#this is our downloader
dl = bitpit.Downloader(
        url,
        path=pathlib.Path.home() / 'Desktop' / 'logo.png',
        restart_wait=30,
        rate_limit=2048,
        timeout=60,
        chunk_size=1024
    )

#listen to signals
#print size as soon as it is known
dl.listen('size-changed', on_size_changed)

#print speed periodically
dl.listen('speed-changed', on_speed_changed)

#print state
dl.listen('state-changed', on_state_changed)

#start downloading and tell user download has started.
dl.start()
print('Download has started.')

#end of the main thread
''', 'Desktop/logo.png', ['The file size is 10102', 'The state changed to: complete']),
]


@pytest.mark.parametrize('name, landing, expected',
                         [(name, landing, expected)
                          for name, _, landing, expected in TUTORIAL_STAGES],
                         ids=[stage[0] for stage in TUTORIAL_STAGES])
def test_tutorial_stage_runs_unchanged(tutorial_runs, name, landing, expected):
    result = tutorial_runs[name]()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    assert (result.home / landing).read_bytes() == LOGO
    # the program prints on two threads at once: its own line (and its line
    # break) may land inside a callback's, as it would for any user of 1.2.0
    assert 'Download has started.' in result.stdout
    words = ' '.join(result.stdout.replace('Download has started.', '').split())
    for line in expected:
        assert line in words, (line, result.stdout)
