"""Packaging for bitpit: one module, no dependencies."""
import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = re.search(r"^__version__ = '([^']+)'", (here / 'bitpit.py').read_text(encoding='utf-8'),
                    re.M).group(1)

setup(
    name='bitpit',
    version=version,
    description='Event-driven HTTP(S) downloads with resume, rate limits and a '
                'download manager, in one standard-library-only file',
    long_description=(here / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    py_modules=['bitpit'],
    python_requires='>=3.9',
    entry_points={'console_scripts': ['bitpit = bitpit:_cli']},
    license='MIT',
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Internet :: WWW/HTTP',
        'License :: OSI Approved :: MIT License',
    ],
)
