"""Typing and lint: with their default settings, mypy finds nothing in
bitpit.py (for Python 3.9 and 3.13, with and without --check-untyped-defs)
nor in the tests, and pyflakes nothing in any Python file of the repository.

The checkers start together, each in a process of its own with a fresh
cache of its own (no stale cache, no two writers on one); each test waits
for its own. They start as soon as pytest has collected a run that holds
these tests (conftest's ``pytest_collection_finish`` starts ``CHECKERS``;
in an xdist worker, each starts at its test) and run niced: the test
process, one GIL, leaves a core mostly idle, and these tests, last but
one in the run, then find them done."""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading

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


def commands(work):
    """``{name: command}`` of every check, each with its cache in ``work``."""
    mypy = [sys.executable, '-m', 'mypy']
    started = {name: mypy + ['--cache-dir', str(work / name)] + flags + ['bitpit.py']
               for name, flags in BITPIT_RUNS.items()}
    # the tests under the running Python (pytest's own code needs 3.10)
    started['tests'] = mypy + ['--cache-dir', str(work / 'tests')] + the_tests()
    started['pyflakes'] = [sys.executable, '-m', 'pyflakes'] + python_files()
    return started


def _lower_priority(process):
    """Let the checker ``process``, just started, yield the cores to the
    tests: niced by 10 more than this process (where the OS can). Set from
    here, not by a ``preexec_fn``, which is unsafe in a process with threads
    (an xdist worker starts a check during its tests)."""
    if hasattr(os, 'setpriority'):
        try:
            os.setpriority(os.PRIO_PROCESS, process.pid,
                           os.getpriority(os.PRIO_PROCESS, 0) + 10)
        except OSError:
            pass  # it ended already


class Checkers:
    """The checks' processes, started once in a run; any thread may call.
    ``_lock`` guards ``_started`` and ``_work``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._started = {}   # name -> (process, output file)
        self._work = None    # the temporary directory of caches and outputs

    def start(self, names=None):
        """Start the checks ``names`` (by default every check) not started yet."""
        with self._lock:
            if self._work is None:
                self._work = pathlib.Path(tempfile.mkdtemp(prefix='bitpit-checks-'))
            for name, command in commands(self._work).items():
                if name in self._started or (names is not None and name not in names):
                    continue
                output = self._work / (name + '.txt')
                with open(output, 'w') as file:
                    process = subprocess.Popen(command, cwd=ROOT, stdout=file,
                                               stderr=subprocess.STDOUT)
                _lower_priority(process)
                self._started[name] = process, output

    def outcome(self, name):
        """``(exit status, output)`` of the check ``name``, once it is done
        (started now if it was not)."""
        self.start([name])
        with self._lock:
            process, output = self._started[name]
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail('{} took more than {} s'.format(name, TIMEOUT))
        return process.returncode, output.read_text()

    def close(self):
        """End the checks still running; remove their caches and outputs."""
        with self._lock:
            started, self._started = self._started, {}
            work, self._work = self._work, None
        for process, _ in started.values():
            if process.poll() is None:
                process.kill()
            process.wait()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


#: the run's checks (conftest starts them at collection and closes them at its end)
CHECKERS = Checkers()


@pytest.fixture(scope='module')
def checks():
    """The run's :class:`Checkers` (started early by conftest, but in an
    xdist worker, where each check starts when its test asks for it)."""
    return CHECKERS


@pytest.mark.parametrize('run', BITPIT_RUNS)
def test_mypy_finds_nothing_in_bitpit(checks, run):
    status, output = checks.outcome(run)
    assert status == 0 and 'Success: no issues found' in output, \
        'mypy {}:\n{}\n({})'.format(' '.join(BITPIT_RUNS[run]), output, INSTALL)


def test_mypy_finds_nothing_in_the_tests(checks):
    status, output = checks.outcome('tests')
    assert status == 0 and 'Success: no issues found' in output, \
        'mypy on the tests:\n{}\n({})'.format(output, INSTALL)


def test_pyflakes_finds_nothing_in_the_repository(checks):
    assert len(python_files()) > len(the_tests())  # bitpit.py, setup.py, bench/ too
    status, output = checks.outcome('pyflakes')
    assert status == 0 and output == '', 'pyflakes:\n{}\n({})'.format(output, INSTALL)


def test_a_check_not_started_yet_starts_when_its_test_asks(monkeypatch):
    """In an xdist worker conftest starts no checks: each starts at its
    test, alone (a worker runs only some of these tests)."""
    monkeypatch.setattr(sys.modules[__name__], 'commands', lambda work: {
        name: [sys.executable, '-I', '-S', '-c', 'print({!r})'.format(name)]
        for name in ('a', 'b')})
    checkers = Checkers()
    try:
        assert checkers.outcome('a') == (0, 'a\n')
        assert list(checkers._started) == ['a']
    finally:
        checkers.close()
