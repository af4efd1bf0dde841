#!/usr/bin/env python3
"""Head parsing: http.client's (email package) against bitpit's own, in
one process, on the same bytes.

N nginx-like answers (a 10 KiB body each, as many_files.py serves them)
follow each other on one stream, as on a keep-alive connection. Each
contender reads them with its response class over one buffered reader
(a ``BytesIO``: no system call, only the parsing): ``begin()``, the
look-ups bitpit makes on every answer (``getheader`` and ``get_all`` of
the fields it reads), and the body. ``http.client`` is
``http.client.HTTPResponse``; ``bitpit`` is the ``_Response`` of the
bitpit.py that ``--bitpit`` names. Rounds alternate between the two; the
report gives each one's median CPU time (``time.process_time``) per
answer and the ratio of the medians.

Example: ``python bench/head_parsing.py --answers 3000 --rounds 9``
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

BODY = b'x' * 10240
HEAD = ('HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 07:00:00 GMT\r\n'
        'Content-Type: application/octet-stream\r\nContent-Length: {}\r\n'
        'Last-Modified: Mon, 07 Dec 2026 06:00:00 GMT\r\nConnection: keep-alive\r\n'
        'ETag: "6570e1c0-2800"\r\nAccept-Ranges: bytes\r\n\r\n').format(len(BODY)).encode()

#: what bitpit reads of every answer (_Request.send, _check_answer, _Answer,
#: _Cookies.remember, _parse_content_length, _Transfer, _server_digests)
GETHEADER = ('Location', 'Content-Range', 'ETag', 'Last-Modified', 'Content-Encoding',
             'Content-Type', 'Content-Disposition')
GET_ALL = ('Set-Cookie', 'Content-Length', 'Repr-Digest', 'Content-Digest', 'Digest', 'Link')


class _KeptOpen(io.BufferedReader):
    """A reader that a response, done with its body, does not close."""

    def close(self) -> None:
        pass


class _Stream:
    """What a response class takes for a socket: ``makefile`` gives every
    response the same reader, as on a keep-alive connection
    (http.client's); ``recv`` receives at most one answer, as a socket
    does when a request waits for each (bitpit's, whose response receives
    from the socket itself)."""

    def __init__(self, reader: io.BufferedReader):
        self._reader = reader

    def makefile(self, mode: str, buffering: int = -1) -> io.BufferedReader:
        return self._reader

    def recv(self, size: int) -> bytes:
        return self._reader.read(min(size, len(HEAD) + len(BODY)))


def load_bitpit(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location('bitpit', path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules['bitpit'] = module
    spec.loader.exec_module(module)
    return module


def read_all(response_class: Callable[..., http.client.HTTPResponse], data: bytes,
             answers: int) -> Tuple[float, float]:
    """CPU seconds to read ``answers`` answers from ``data``: in all, and
    in ``begin()`` and the look-ups (the head's share)."""
    stream = _Stream(_KeptOpen(io.BytesIO(data)))
    clock = time.process_time
    in_heads = 0.0
    began = clock()
    for _ in range(answers):
        head_began = clock()
        response = response_class(stream, method='GET')
        response.begin()
        for name in GETHEADER:
            response.getheader(name)
        for name in GET_ALL:
            response.msg.get_all(name)
        in_heads += clock() - head_began
        if response.read() != BODY:
            raise SystemExit('{} read a wrong body'.format(response_class.__name__))
    return clock() - began, in_heads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--bitpit', type=Path,
                        default=Path(__file__).resolve().parent.parent / 'bitpit.py')
    parser.add_argument('--answers', type=int, default=3000)
    parser.add_argument('--rounds', type=int, default=9)
    args = parser.parse_args()
    bitpit = load_bitpit(args.bitpit)
    contenders: Dict[str, Callable[..., http.client.HTTPResponse]] = {
        'http.client': http.client.HTTPResponse, 'bitpit': bitpit._Response}
    data = (HEAD + BODY) * args.answers
    times: Dict[str, List[Tuple[float, float]]] = {name: [] for name in contenders}
    for name, response_class in contenders.items():  # warm-up
        read_all(response_class, data, args.answers)
    for round_ in range(args.rounds):
        order = list(contenders) if round_ % 2 == 0 else list(reversed(contenders))
        for name in order:
            times[name].append(read_all(contenders[name], data, args.answers))
    print('{} answers of {} head + {} body bytes, {} rounds, bitpit from {}'.format(
        args.answers, len(HEAD), len(BODY), args.rounds, args.bitpit))
    print('median CPU per answer    in all    head (begin + look-ups)')
    medians = {}
    for name, runs in times.items():
        medians[name] = [statistics.median(run[i] for run in runs) for i in (0, 1)]
        print('{:20} {:9.2f} us {:12.2f} us'.format(
            name, *(median / args.answers * 1e6 for median in medians[name])))
    print('bitpit / http.client  {:9.2f} {:15.2f}'.format(
        *(ours / theirs for ours, theirs in zip(medians['bitpit'], medians['http.client']))))
    return 0


if __name__ == '__main__':
    sys.exit(main())
