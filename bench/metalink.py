#!/usr/bin/env python3
"""A Metalink with three mirrors, one of which corrupts a byte in every
256 KiB piece: what aria2c and bitpit make of it.

The file (3 MiB + 1000 bytes) and its metalink (sha-256 of the file and of
every piece, the mirrors ranked 1, 2, 3) are served by three local fixture
servers (``conftest.FixtureServer``, 8 MiB/s per response so that the file
splits over 3 connections); the corrupt mirror is ranked first, second or
third in turn. Each tool gets ``-x 3`` and the metalink file; reported:
its exit status, whether its file is byte-identical, its wall time and the
bytes each server sent. wget 1.x has no Metalink support (wget2 has
``--metalink``, not installed here) and curl dropped it in 7.78.

Not a timing benchmark: the seconds are one run's. Example:
``python bench/metalink.py --bitpit ../main/bitpit.py``.
"""
import argparse
import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
from conftest import FixtureServer  # noqa: E402

MiB = 1 << 20
PIECE = 256 * 1024
DATA = random.Random(5854).randbytes(3 * MiB + 1000)


def corrupt(data):
    spoilt = bytearray(data)
    for position in range(100, len(data), PIECE):
        spoilt[position] ^= 0xFF
    return bytes(spoilt)


def metalink(urls):
    pieces = ''.join('<hash>{}</hash>'.format(hashlib.sha256(DATA[i:i + PIECE]).hexdigest())
                     for i in range(0, len(DATA), PIECE))
    sources = ''.join('<url priority="{}">{}</url>'.format(n, url)
                      for n, url in enumerate(urls, 1))
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            '<metalink xmlns="urn:ietf:params:xml:ns:metalink"><file name="data.bin">'
            '<size>{}</size><hash type="sha-256">{}</hash>'
            '<pieces length="{}" type="sha-256">{}</pieces>{}</file></metalink>'
            .format(len(DATA), hashlib.sha256(DATA).hexdigest(), PIECE, pieces, sources))


def run(tool, document, out, bitpit):
    if tool == 'aria2c':
        return subprocess.run(['aria2c', '-q', '-x3', '-s3', '-d', str(out),
                               '--metalink-file', str(document)]).returncode
    return subprocess.run([sys.executable, bitpit, '-q', '-x', '3',
                           '-d', str(out), '--metalink', str(document)],
                          stderr=subprocess.DEVNULL).returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bitpit', default=str(HERE / 'bitpit.py'),
                        help='the bitpit.py to run (default: this repository\'s)')
    args = parser.parse_args()
    tools = ['bitpit'] + (['aria2c'] if shutil.which('aria2c') else [])
    print('| corrupt mirror ranked | tool | exit | identical | seconds | bytes sent per server |')
    print('|---|---|---|---|---|---|')
    for rank in range(3):
        servers = [FixtureServer() for _ in range(3)]
        try:
            urls = [s.add('/f', corrupt(DATA) if n == rank else DATA, throttle=8 * MiB)
                    for n, s in enumerate(servers)]
            work = Path(tempfile.mkdtemp())
            document = work / 'data.meta4'
            document.write_text(metalink(urls))
            for tool in tools:
                before = [s.bytes_sent('/f') for s in servers]
                out = work / tool
                began = time.monotonic()
                code = run(tool, document, out, args.bitpit)
                took = time.monotonic() - began
                target = out / 'data.bin'
                identical = target.is_file() and target.read_bytes() == DATA
                sent = [s.bytes_sent('/f') - b for s, b in zip(servers, before)]
                print('| {} | {} | {} | {} | {:.2f} | {} |'.format(
                    rank + 1, tool, code, identical, took, sent))
            shutil.rmtree(work)
        finally:
            for s in servers:
                s.close()


if __name__ == '__main__':
    main()
