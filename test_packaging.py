"""The installed distribution: the sdist builds a wheel that holds the
package made from bitpit.py and nothing else (no tests, no bench); installed
from it, or editable from the source tree, into a fresh environment, a
typed program sees bitpit's types under mypy (PEP 561: ``py.typed``), and
``python -m bitpit``, the ``bitpit`` command and the installed file run as
a script all download.

Everything is built offline from a copy of the repository, with the
setuptools and wheel already installed (the README's test command)."""
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

import bitpit
from conftest import DATA

ROOT = pathlib.Path(__file__).resolve().parent
TIMEOUT = 60  # seconds a build, an install or a check may take
TYPED_PROGRAM = '''\
import pathlib
import bitpit

path = bitpit.download('http://127.0.0.1/f.iso')
reveal_type(path)
size: int = path.stat().st_size
bitpit.download(b'http://127.0.0.1/f.iso')  # a misuse: the URL is a str
d = bitpit.Downloader('http://127.0.0.1/f.iso')
timeout: str = d.timeout  # a misuse: the options read back as what they hold
headers: str = d.headers
'''


def run(*command, cwd):
    """Run ``command``; its output, or a failure that shows it."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK='1', PYTHONDONTWRITEBYTECODE='1')
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 0, '{} failed:\n{}'.format(
        ' '.join(map(str, command)), result.stdout)
    return result.stdout


def copy_of_the_repository(target):
    """The repository's files, without what a build or a test run leaves."""
    def ignored(directory, names):
        return {name for name in names if name.startswith('.') or name in
                ('build', 'dist', '__pycache__') or name.endswith('.egg-info')}
    shutil.copytree(ROOT, target, ignore=ignored)
    return target


def environment(path):
    """A fresh virtual environment that sees this one's packages (pip,
    mypy, setuptools) under its own: its python."""
    run(sys.executable, '-m', 'venv', '--without-pip', '--system-site-packages', path,
        cwd=path.parent)
    return path / ('Scripts' if os.name == 'nt' else 'bin') / 'python'


@pytest.fixture(scope='module')
def built(tmp_path_factory):
    """``(source tree, wheel)``: an sdist made from a copy of the
    repository, and the wheel made from that sdist."""
    work = tmp_path_factory.mktemp('packaging')
    source = copy_of_the_repository(work / 'source')
    run(sys.executable, 'setup.py', '-q', 'sdist', '-d', work / 'dist', cwd=source)
    sdist, = (work / 'dist').glob('bitpit-*.tar.gz')
    run(sys.executable, '-m', 'pip', 'wheel', '-q', '--no-build-isolation', '--no-deps',
        '--no-index', '-w', work / 'dist', sdist, cwd=work)
    wheel, = (work / 'dist').glob('bitpit-*.whl')
    return source, wheel


def check_installed(python, tmp_path, server):
    """mypy sees the installed types; the three ways to run bitpit work."""
    program = tmp_path / 'program'
    program.mkdir()
    (program / 'use.py').write_text(TYPED_PROGRAM)
    checked = subprocess.run(
        [str(python), '-m', 'mypy', '--cache-dir', str(tmp_path / 'cache'), 'use.py'],
        cwd=program, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=TIMEOUT).stdout
    errors = [line for line in checked.splitlines() if ': error:' in line]
    assert 'use.py:5: note: Revealed type is "pathlib.Path"' in checked, checked
    assert [line.split(':')[1] for line in errors] == ['7', '9', '10'], checked

    installed = run(python, '-c', 'import bitpit; print(bitpit.__file__)', cwd=program)
    server.add('/f.iso', DATA)
    scripts = python.parent
    ways = {'python -m bitpit': [python, '-m', 'bitpit'],
            'bitpit': [scripts / ('bitpit.exe' if os.name == 'nt' else 'bitpit')],
            'python FILE': [python, installed.strip()]}
    for name, command in ways.items():
        target = tmp_path / (name.replace(' ', '-') + '.iso')
        run(*command, '-q', '-o', target, server.url('/f.iso'), cwd=program)
        assert target.read_bytes() == DATA, name
    return pathlib.Path(installed.strip())


def test_the_wheel_holds_the_package_made_from_bitpit_py_and_nothing_else(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if '.dist-info/' not in name]
        code = archive.read('bitpit/__init__.py')
    assert sorted(names) == ['bitpit/__init__.py', 'bitpit/__main__.py', 'bitpit/py.typed']
    assert code == (ROOT / 'bitpit.py').read_bytes()
    assert wheel.name.startswith('bitpit-{}-'.format(bitpit.__version__))


def test_installed_from_the_wheel_types_reach_mypy(built, tmp_path, server):
    _, wheel = built
    python = environment(tmp_path / 'venv')
    run(python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', wheel,
        cwd=tmp_path)
    installed = check_installed(python, tmp_path, server)
    assert installed.parent.parent.name == 'site-packages', installed
    assert installed.parent.name == 'bitpit' and installed.name == '__init__.py'


def test_installed_editable_types_reach_mypy_and_the_file_is_the_source(built, tmp_path,
                                                                       server):
    source, _ = built
    python = environment(tmp_path / 'venv')
    run(python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index',
        '--no-build-isolation', '-e', source, cwd=tmp_path)
    installed = check_installed(python, tmp_path, server)
    if os.name != 'nt':  # there, without the right to make links, a copy
        assert installed.resolve() == (source / 'bitpit.py').resolve()

