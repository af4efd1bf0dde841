"""Packaging for bitpit: one module, no dependencies.

bitpit.py is the one source, and the file to copy into a project. Installed,
it is the package ``bitpit`` made from it here, at build time, in
build/package/: bitpit.py as its ``__init__.py``, ``py.typed`` (PEP 561: a
type checker reads its annotations; a lone module cannot say so) and a
``__main__.py`` for ``python -m bitpit``. The ``__init__.py`` is a symbolic
link to bitpit.py where the system allows one, so that an editable install
(``pip install -e .``) runs and type-checks bitpit.py as it is edited; a wheel
holds a copy, as it would of any file.
"""
import os
import re
import shutil
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
source = here / 'bitpit.py'
version = re.search(r"^__version__ = '([^']+)'", source.read_text(encoding='utf-8'),
                    re.M).group(1)
package_root = here / 'build' / 'package'
MAIN = '''"""``python -m bitpit``: the ``bitpit`` command."""
import sys

from bitpit import _cli

sys.exit(_cli())
'''


def make_package() -> None:
    package = package_root / 'bitpit'
    package.mkdir(parents=True, exist_ok=True)
    init = package / '__init__.py'
    if init.is_symlink() or init.exists():
        init.unlink()
    try:
        init.symlink_to(os.path.relpath(source, package))
    except OSError:  # no symbolic links here: a copy (an editable install then
        shutil.copyfile(source, init)  # needs installing again after an edit)
    (package / 'py.typed').write_text('')
    (package / '__main__.py').write_text(MAIN)


make_package()
setup(
    name='bitpit',
    version=version,
    description='Event-driven HTTP(S) downloads with resume, rate limits and a '
                'download manager, in one standard-library-only file',
    long_description=(here / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    packages=['bitpit'],
    package_dir={'': os.path.relpath(package_root, here)},
    package_data={'bitpit': ['py.typed']},
    python_requires='>=3.9',
    entry_points={'console_scripts': ['bitpit = bitpit:_cli']},
    license='MIT',
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Internet :: WWW/HTTP',
        'License :: OSI Approved :: MIT License',
        'Typing :: Typed',
    ],
)
