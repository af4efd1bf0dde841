"""The documents are tested against the code.

1. Every ```python block of README.md and docs/*.md runs, in a fresh
   interpreter, against a local server: the placeholder URLs
   ``https://example.com/...`` and ``https://mirror.example.com/...`` are
   pointed at it (``SERVED`` says what it serves). A block must exit with
   status 0; a block that prints must print something, and where each of
   its ``print(...)`` lines ends with a comment holding a Python literal,
   the printed lines must be those values. Shell commands and sample output
   use ```sh and ```text fences and are not run. A block fenced
   ```python elsewhere is run by another test, in the setting it needs
   (the Dask recipe of docs/scale-out.md: test_scale_out.py).
2. docs/reference.md names every public name of the module, every argument
   of the public callables, every public property and method, every signal
   and the attributes of the errors, each in backticks; and each name its
   tables list as a property, method or argument exists in the code.
3. docs/cli.md names every option of the command's parser, and each option
   its table lists exists.
4. Every link from one document to another, or to a heading, leads
   somewhere.
5. CI (.ci/run) runs the README's test command, exactly.
"""
import ast
import inspect
import os
import re
import subprocess
import sys

import pytest

import bitpit
from conftest import FENCE, HERE, FixtureServer, fenced_blocks

DOCS = [HERE / 'README.md'] + sorted((HERE / 'docs').glob('*.md'))
PLACEHOLDERS = ('https://example.com', 'https://mirror.example.com')
BLOCK_TIMEOUT = 60

KiB = 1024
MiB = 1024 * KiB
FILE = bytes(range(256)) * (12 * KiB) + b'end'         # 3 MiB + 3: splits over 4
LOGO = bytes((i * 7 + 3) % 251 for i in range(10102))  # 10102 bytes, 9.9 KB
VIDEO = bytes((i * 13) % 256 for i in range(600 * 1000))
SMALL = {name: bytes([ord(name)]) * (200 * 1000) for name in 'abcd'}
DATE = 'Wed, 21 Oct 2015 07:28:00 GMT'

# path -> FixtureServer.add() arguments; what the placeholder URLs serve
SERVED = {
    '/file.iso': dict(data=FILE, last_modified=DATE),
    '/logo.png': dict(data=LOGO, last_modified=DATE),
    '/video.mp4': dict(data=VIDEO, throttle=400 * 1000),
    '/busy.iso': dict(data=LOGO, status=503, status_times=1),
    '/private.iso': dict(data=LOGO, digest={'user': 'alice', 'password': 'secret'}),
    '/report?id=7': dict(data=LOGO, headers={
        'Content-Disposition': 'attachment; filename="report.pdf"'}),
}
SERVED.update(('/{}.iso'.format(name), dict(data=data)) for name, data in SMALL.items())


def python_blocks():
    return [(path, line, code) for path in DOCS
            for line, language, code in fenced_blocks(path) if language == 'python']


BLOCKS = python_blocks()


class DocServer(FixtureServer):
    """The server behind the placeholder URLs: ``https://example.com`` is
    ``http://127.0.0.1:PORT`` and ``https://mirror.example.com`` is
    ``http://localhost:PORT``, another host name for the same files."""

    def reset(self):
        """Serve ``SERVED`` afresh (a new copy resets each file's counters)."""
        for path, options in SERVED.items():
            options = dict(options)
            self.add(path, options.pop('data'), **options)

    def localize(self, code):
        local = 'http://localhost:{}'.format(self.port)
        return code.replace(PLACEHOLDERS[1], local).replace(PLACEHOLDERS[0], self.base_url)


@pytest.fixture(scope='module')
def doc_server():
    server = DocServer()
    yield server
    server.close()


def expected_output(code):
    """The printed lines a block announces in ``print(...)  # VALUE``
    comments, or ``None`` unless every ``print(`` line has one."""
    expected = []
    for line in code.splitlines():
        if 'print(' not in line:
            continue
        statement, _, comment = line.partition('  # ')
        try:
            ast.parse(statement.strip())
            expected.append(ast.literal_eval(comment.strip()))
        except (SyntaxError, ValueError):
            return None
    return expected or None


def run_block(code, server, cwd):
    env = {name: value for name, value in os.environ.items()
           if not name.lower().endswith('_proxy') and name not in ('NETRC', 'COLUMNS')}
    env.update(PYTHONPATH=str(HERE), HOME=str(cwd), PYTHONIOENCODING='utf-8')
    script = cwd / 'example.py'
    script.write_text(server.localize(code), encoding='utf-8')
    return subprocess.run([sys.executable, str(script)], cwd=str(cwd), env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT)


@pytest.mark.parametrize('path, line, code', BLOCKS, ids=[
    '{}:{}'.format(path.relative_to(HERE).as_posix(), line) for path, line, _ in BLOCKS])
def test_python_block_runs(path, line, code, doc_server, tmp_path):
    doc_server.reset()
    result = run_block(code, doc_server, tmp_path)
    where = '{}, the block at line {}'.format(path.relative_to(HERE), line)
    assert result.returncode == 0, '{} failed:\n{}{}'.format(where, result.stdout,
                                                               result.stderr)
    assert 'Traceback' not in result.stderr, '{}:\n{}'.format(where, result.stderr)
    if 'print(' in code:
        assert result.stdout.strip(), '{} printed nothing'.format(where)
    expected = expected_output(code)
    if expected is not None:
        printed = []
        for text in result.stdout.splitlines():
            try:
                printed.append(ast.literal_eval(text))
            except (SyntaxError, ValueError):
                printed.append(text)
        assert printed == expected, where


def test_every_document_has_tested_code_and_no_unknown_fence():
    """A typo in a fence (```pyhton) would silently leave a block untested."""
    known = {'python', 'python-elsewhere', 'sh', 'text', 'json', 'mermaid', 'yaml'}
    for path in DOCS:
        languages = [language for _, language, _ in fenced_blocks(path)]
        assert set(languages) <= known, (path.name, set(languages) - known)
    tested = {path for path, _, _ in BLOCKS}
    for name in ('README.md', 'tutorial.md', 'reference.md'):
        assert any(path.name == name for path in tested), name


# ---------------------------------------------------------------------------
# the reference and the command line's page name everything
# ---------------------------------------------------------------------------

def prose(path):
    """The text of ``path`` without its fenced blocks."""
    return FENCE.sub('', path.read_text(encoding='utf-8'))


def documented(text):
    """Every name written in backticks: a whole span (`state`), or the name
    a span starts with (`bar(width=30)`, `retries=None`, `**kwargs`)."""
    names = set()
    for span in re.findall(r'`([^`\n]+)`', text):
        span = span.strip()
        names.add(span)
        match = re.match(r'[*]{0,2}([A-Za-z_][\w-]*)', span)
        if match:
            names.add(match.group(1))
    return names


CLASSES = (bitpit.Emitter, bitpit.Downloader, bitpit.Manager)
FUNCTIONS = (bitpit.download, bitpit.main, bitpit.human_readable, bitpit.adownload)


def public_members(cls):
    return [name for name in dir(cls) if not name.startswith('_')]


def parameters(func):
    return [name for name in inspect.signature(func).parameters if name != 'self']


def names_the_reference_must_have():
    wanted = {name: 'bitpit.{}'.format(name) for name in bitpit.__all__}
    wanted['__version__'] = 'bitpit.__version__'
    for cls in CLASSES:
        for name in public_members(cls):
            wanted.setdefault(name, '{}.{}'.format(cls.__name__, name))
            member = getattr(cls, name)
            if inspect.isfunction(member):
                for parameter in parameters(member):
                    wanted.setdefault(parameter, 'an argument of {}.{}()'.format(
                        cls.__name__, name))
        for parameter in parameters(cls.__init__):
            wanted.setdefault(parameter, 'an argument of {}()'.format(cls.__name__))
        for signal in cls.__signals__:
            wanted.setdefault(signal, 'a signal of {}'.format(cls.__name__))
    for func in FUNCTIONS:
        for parameter in parameters(func):
            wanted.setdefault(parameter, 'an argument of {}()'.format(func.__name__))
    error = bitpit.HTTPStatusError(503, 'Service Unavailable', 'http://x/', 1.0)
    for name in vars(error):
        wanted.setdefault(name, 'an attribute of HTTPStatusError')
    for name in dir(bitpit):
        value = getattr(bitpit, name)
        if not name.startswith('_') and isinstance(value, type) and \
                issubclass(value, bitpit.Error):
            wanted.setdefault(name, 'an exception class')
    return wanted


def test_the_reference_names_every_public_name():
    have = documented(prose(HERE / 'docs' / 'reference.md'))
    missing = ['{} ({})'.format(name, what)
               for name, what in sorted(names_the_reference_must_have().items())
               if name not in have]
    assert not missing, 'docs/reference.md does not name: ' + ', '.join(missing)


SECTION_OBJECTS = {'Downloader': bitpit.Downloader, 'Manager': bitpit.Manager,
                   'Emitter': bitpit.Emitter, 'download': bitpit.download,
                   'main': bitpit.main, 'human_readable': bitpit.human_readable,
                   'adownload': bitpit.adownload}


def table_rows(path):
    """``(section, header, first cell)`` of every table row of ``path``,
    ``section`` being the ``## `` heading above it."""
    section, header = None, None
    for line in prose(path).splitlines():
        if line.startswith('## '):
            section, header = line[3:].strip(), None
        elif line.startswith('|'):
            cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
            if header is None:
                header = cells[0]
            elif not set(cells[0]) <= set('-: '):
                yield section, header, cells[0]
        else:
            header = None


def test_what_the_reference_lists_exists():
    """A property, method or argument that the code lost fails here."""
    wrong = []
    for section, header, cell in table_rows(HERE / 'docs' / 'reference.md'):
        owner = SECTION_OBJECTS.get(section)
        if owner is None or header not in ('property', 'method', 'argument'):
            continue
        for name in re.findall(r'`[*]{0,2}([A-Za-z_]\w*)', cell):
            if header == 'argument':
                exists = name in parameters(owner.__init__ if isinstance(owner, type)
                                            else owner)
            else:
                exists = hasattr(owner, name)
            if not exists:
                wrong.append('{} {} of {}'.format(header, name, section))
    assert not wrong, 'docs/reference.md lists what the code lacks: ' + ', '.join(wrong)


def option_strings():
    return [option for action in bitpit._build_parser()._actions
            for option in action.option_strings]


def test_the_cli_page_names_every_option():
    text = prose(HERE / 'docs' / 'cli.md')
    spans = re.findall(r'`([^`\n]+)`', text)
    missing = [option for option in option_strings()
               if not any(re.search(r'(?<![\w-]){}(?![\w-])'.format(re.escape(option)), span)
                          for span in spans)]
    assert not missing, 'docs/cli.md does not name: ' + ', '.join(missing)


def test_what_the_cli_page_lists_exists():
    known = set(option_strings())
    listed = [option for _, header, cell in table_rows(HERE / 'docs' / 'cli.md')
              if header == 'option'
              for option in re.findall(r'`(-[-\w]*)', cell)]
    assert listed, 'docs/cli.md has no table of options'
    unknown = [option for option in listed if option not in known]
    assert not unknown, 'docs/cli.md lists options the parser lacks: ' + ', '.join(unknown)


# ---------------------------------------------------------------------------
# links between the documents
# ---------------------------------------------------------------------------

def anchors(path):
    """The anchors GitHub makes of the headings of ``path``."""
    found = set()
    for line in prose(path).splitlines():
        match = re.match(r'#{1,6} (.*)', line)
        if match:
            title = match.group(1).replace('`', '').replace('\\', '').strip().lower()
            found.add(re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
    return found


def test_links_between_documents_lead_somewhere():
    broken = []
    for path in DOCS:
        for target in re.findall(r'\]\(([^)\s]+)\)', prose(path)):
            if re.match(r'[a-z]+:', target):
                continue  # an outside address
            name, _, anchor = target.partition('#')
            linked = (path.parent / name).resolve() if name else path
            if not linked.exists():
                broken.append('{}: {}'.format(path.name, target))
            elif anchor and linked.suffix == '.md' and anchor not in anchors(linked):
                broken.append('{}: {}'.format(path.name, target))
    assert not broken, 'links that lead nowhere: ' + ', '.join(broken)


# ---------------------------------------------------------------------------
# the test command
# ---------------------------------------------------------------------------

def test_ci_runs_the_readme_test_command():
    section = (HERE / 'README.md').read_text(encoding='utf-8').split('## Run the tests', 1)[1]
    command = FENCE.search(section).group(3).strip()
    ci = (HERE / '.ci' / 'run').read_text(encoding='utf-8').strip().splitlines()
    assert ci[-1] == command and 'mypy' in command and 'pyflakes' in command
