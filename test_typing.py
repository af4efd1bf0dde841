"""Typing and lint: with their default settings, mypy finds nothing in
bitpit.py (for Python 3.9 and 3.13, with and without --check-untyped-defs)
nor in the tests, and pyflakes nothing in any Python file of the repository.

The checkers start together, each in a process of its own with a fresh
cache of its own (no stale cache, no two writers on one), so that they
share the machine's cores; each test waits for its own."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent
TIMEOUT = 100  # seconds a checker may take (pytest-timeout ends a test at 120)
INSTALL = "the README's test command installs them: pip install 'mypy<2' pyflakes"

# mypy on bitpit.py: the oldest and the newest Python it supports, both modes
BITPIT_RUNS = {
    'py3.9': ['--python-version', '3.9'],
    'py3.9-check-untyped-defs': ['--python-version', '3.9', '--check-untyped-defs'],
    'py3.13': ['--python-version', '3.13'],
    'py3.13-check-untyped-defs': ['--python-version', '3.13', '--check-untyped-defs'],
}


def python_files():
    """Every Python file of the repository (not in a dot directory, a build
    or an installed environment)."""
    skipped = {'build', 'dist', 'site-packages'}
    return sorted(str(path.relative_to(ROOT)) for path in ROOT.rglob('*.py')
                  if not any(part.startswith('.') or part in skipped or
                             part.endswith('.egg-info')
                             for part in path.relative_to(ROOT).parts[:-1]))


def the_tests():
    return sorted(path.name for path in ROOT.glob('test_*.py')) + ['conftest.py']


@pytest.fixture(scope='module')
def checks(tmp_path_factory):
    """Start every check: ``{name: (process, output file)}``."""
    work = tmp_path_factory.mktemp('checks')
    mypy = [sys.executable, '-m', 'mypy']
    commands = {name: mypy + ['--cache-dir', str(work / name)] + flags + ['bitpit.py']
                for name, flags in BITPIT_RUNS.items()}
    # the tests under the running Python (pytest's own code needs 3.10)
    commands['tests'] = mypy + ['--cache-dir', str(work / 'tests')] + the_tests()
    commands['pyflakes'] = [sys.executable, '-m', 'pyflakes'] + python_files()
    started = {}
    try:
        for name, command in commands.items():
            output = work / (name + '.txt')
            with open(output, 'w') as file:
                started[name] = subprocess.Popen(command, cwd=ROOT, stdout=file,
                                                 stderr=subprocess.STDOUT), output
        yield started
    finally:
        for process, _ in started.values():
            if process.poll() is None:
                process.kill()
            process.wait()


def outcome(checks, name):
    """``(exit status, output)`` of the check ``name``, once it is done."""
    process, output = checks[name]
    try:
        process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail('{} took more than {} s'.format(name, TIMEOUT))
    return process.returncode, output.read_text()


@pytest.mark.parametrize('run', BITPIT_RUNS)
def test_mypy_finds_nothing_in_bitpit(checks, run):
    status, output = outcome(checks, run)
    assert status == 0 and 'Success: no issues found' in output, \
        'mypy {}:\n{}\n({})'.format(' '.join(BITPIT_RUNS[run]), output, INSTALL)


def test_mypy_finds_nothing_in_the_tests(checks):
    status, output = outcome(checks, 'tests')
    assert status == 0 and 'Success: no issues found' in output, \
        'mypy on the tests:\n{}\n({})'.format(output, INSTALL)


def test_pyflakes_finds_nothing_in_the_repository(checks):
    assert len(python_files()) > len(the_tests())  # bitpit.py, setup.py, bench/ too
    status, output = outcome(checks, 'pyflakes')
    assert status == 0 and output == '', 'pyflakes:\n{}\n({})'.format(output, INSTALL)
