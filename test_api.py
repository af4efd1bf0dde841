"""The public API outside downloading: human_readable() and the rate
parser, the module's public names, the Emitter (signals and callbacks), and
a Downloader's construction and properties before it runs: which URLs it
accepts, its options and the progress bar."""
import io
import logging
import threading
import urllib.parse

import pytest

import bitpit


# ---------------------------------------------------------------------------
# human_readable and helpers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('n, expected', [
    (10102, (9.865234375, 'KB')), (999, (999, 'B')), (1000, (0.9765625, 'KB')),
    (0, (0, 'B')), (None, (None, None)), (-10102, (-9.865234375, 'KB')),
    (1024 ** 3, (1.0, 'GB')), (999 * 1024 ** 2, (999.0, 'MB')), (5 * 1024 ** 4, (5.0, 'TB')),
])
def test_human_readable(n, expected):
    assert bitpit.human_readable(n) == expected


def test_human_readable_digits():
    assert bitpit.human_readable(10102, digits=5) == (10102, 'B')
    assert bitpit.human_readable(2 ** 100)[1] == 'YB'


@pytest.mark.parametrize('text', ['', 'fast', '1x', '-5', '1 k b'])
def test_parse_rate_rejects(text):
    with pytest.raises(ValueError):
        bitpit._parse_rate(text)


def test_public_surface():
    for name in ('Emitter', 'Downloader', 'Manager', 'human_readable', 'main', '__version__',
                 'Error', 'HTTPStatusError', 'NetworkError', 'IntegrityError'):
        assert hasattr(bitpit, name)
    assert issubclass(bitpit.HTTPStatusError, bitpit.Error)
    assert issubclass(bitpit.StalledError, bitpit.NetworkError)
    assert issubclass(bitpit.InvalidURLError, ValueError)


# ---------------------------------------------------------------------------
# Emitter
# ---------------------------------------------------------------------------

class Thing(bitpit.Emitter):
    __signals__ = ('ping', 'pong')


def test_emitter_calls_with_emit_then_listen_args():
    calls = []
    t = Thing()

    def record(*args, **kwargs):
        calls.append((args, kwargs))

    t.listen('ping', record, 'x', key=1)
    t.listen('ping', record)
    t.listen('ping', record, 'y')
    t.listen('ping', record, key=2)
    t.emit('ping', 'a', 'b')
    assert calls == [(('a', 'b', 'x'), {'key': 1}), (('a', 'b'), {}),
                     (('a', 'b', 'y'), {}), (('a', 'b'), {'key': 2})]


def test_emitter_twice_registered_called_twice_and_unlisten_once():
    calls = []
    t = Thing()
    f = calls.append
    t.listen('ping', f)
    t.listen('ping', f)
    t.emit('ping', 1)
    assert calls == [1, 1]
    t.unlisten('ping', f)
    t.emit('ping', 2)
    assert calls == [1, 1, 2]
    t.unlisten('ping', f)
    with pytest.raises(ValueError):
        t.unlisten('ping', f)


def test_emitter_plain_callback_then_one_with_args_in_order():
    """A signal's lone plain callback is kept as it is; one with arguments
    after it keeps the order, and each unlisten leaves the other."""
    calls = []
    t = Thing()

    def record(*args, **kwargs):
        calls.append((args, kwargs))

    t.listen('ping', record)
    t.listen('ping', record, 'x', key=1)
    t.emit('ping', 'a')
    assert calls == [(('a',), {}), (('a', 'x'), {'key': 1})]
    t.unlisten('ping', record)
    t.emit('ping', 'b')
    assert calls[2:] == [(('b', 'x'), {'key': 1})]
    t.unlisten('ping', record, 'x', key=1)
    t.emit('ping', 'c')
    assert len(calls) == 3
    with pytest.raises(ValueError):
        t.unlisten('ping', record)
    t.listen('ping', record)
    t.emit('ping', 'd')
    assert calls[3:] == [(('d',), {})]


def test_emitter_unlisten_matches_args():
    t = Thing()
    f = print
    t.listen('ping', f, 1)
    with pytest.raises(ValueError):
        t.unlisten('ping', f, 2)
    t.unlisten('ping', f, 1)


def test_emitter_unknown_signal_is_key_error():
    t = Thing()
    for call in (lambda: t.listen('nope', print), lambda: t.unlisten('nope', print),
                 lambda: t.emit('nope')):
        with pytest.raises(KeyError):
            call()


@pytest.mark.allow_error_log(r'^callback .* for signal .* raised$')
def test_emitter_callback_exception_is_logged_and_others_run(caplog):
    calls = []
    t = Thing()

    def bad(*args):
        raise RuntimeError('boom')
    t.listen('ping', bad)
    t.listen('ping', calls.append)
    with caplog.at_level(logging.ERROR, logger='bitpit'):
        t.emit('ping', 7)
    assert calls == [7]
    assert any('boom' in (r.exc_text or '') or r.exc_info for r in caplog.records)


@pytest.mark.allow_error_log(r'^callback .* for signal .* raised$')
def test_emitter_lone_callback_exception_is_logged(caplog):
    t = Thing()

    def bad(*args):
        raise RuntimeError('lone boom')
    t.listen('ping', bad)
    with caplog.at_level(logging.ERROR, logger='bitpit'):
        assert t.emit('ping', 7) is None
    assert [r.exc_info[1].args for r in caplog.records] == [('lone boom',)]


def test_emitter_listen_and_unlisten_inside_callback():
    t = Thing()
    calls = []

    def once(*args):
        calls.append('once')
        t.unlisten('ping', once)
        t.listen('ping', calls.append)
    t.listen('ping', once)
    t.emit('ping', 1)
    t.emit('ping', 2)
    assert calls == ['once', 2]


def test_emitter_thread_safety():
    t = Thing()
    count = []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        for _ in range(500):
            t.listen('pong', count.append)
            t.emit('ping')
            t.unlisten('pong', count.append)
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    t.emit('pong', 1)
    assert count == []


def test_emitter_listening_to_one_leaves_the_others_alone():
    """Emitters nobody listened to share the class's empty registry, and
    the first listen() gives an emitter its own."""
    calls = []
    one, other = Thing(), Thing()
    one.listen('ping', calls.append)
    other.emit('ping', 'other')
    one.emit('ping', 'one')
    assert calls == ['one']
    assert Thing().emit('ping', 'new') is None and calls == ['one']


def test_emitter_subclass_without_super_init():
    class Lazy(bitpit.Emitter):
        __signals__ = ('x',)

        def __init__(self):
            pass
    calls = []
    lazy = Lazy()
    lazy.listen('x', calls.append)
    lazy.emit('x', 3)
    assert calls == [3]


# ---------------------------------------------------------------------------
# Downloader: construction and properties
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('url', ['ftp://example.com/x', 'file:///etc/passwd', 'data:,hi',
                                 'http://', 'not a url', 'http://host:99999/x'])
def test_bad_url_is_value_error(url):
    with pytest.raises(ValueError):
        bitpit.Downloader(url)


@pytest.mark.parametrize('url', ['file:///etc/passwd', 'ftp://example.com/f', 'data:,x',
                                 'javascript:alert(1)', '/relative/path'])
def test_constructor_and_url_setter_refuse_other_schemes(tmp_path, url):
    with pytest.raises(ValueError) as info:
        bitpit.Downloader(url, path=tmp_path / 'f')
    assert isinstance(info.value, bitpit.InvalidURLError)
    d = bitpit.Downloader('http://127.0.0.1:1/f', path=tmp_path / 'f')
    with pytest.raises(ValueError):
        d.url = url
    assert d.url == 'http://127.0.0.1:1/f'


@pytest.mark.parametrize('origin', ['http://h', 'https://h', 'https://u:p%40@Host.example:8443',
                                    'http://[::1]:8080'])
def test_urls_of_a_known_origin_are_split_as_urlsplit_splits_them(origin):
    bitpit._check_url(origin + '/first')  # now a known origin, split without urlsplit
    for rest in ['/a', '/', '//x/y', '/a?b#c', '/a#b?c', '/?#', '/a?#b', '/a%20b?q=1&r=/x#f/g',
                 '/a b?c d', '/ü?q=ä']:
        url = origin + rest
        known = bitpit._known_address(url)
        assert (known is None) == (not url.isascii() or ' ' in url)  # (encoded: urlsplit)
        address = bitpit._check_url(url)
        expected = bitpit._address(url, urllib.parse.urlsplit(url))
        for made in (address, known or address):
            assert [getattr(made, name) for name in made.__slots__] == \
                [getattr(expected, name) for name in expected.__slots__]
    # what only begins like it is split by urlsplit, and checked
    for url in [origin + 'x/a', origin + '?a/b', origin.upper() + '/a', ' ' + origin + '/a']:
        assert bitpit._known_address(url) is None
    with pytest.raises(bitpit.InvalidURLError):
        bitpit._check_url(origin + ':99999/a')


def test_chunk_size_must_be_positive(tmp_path):
    d = bitpit.Downloader('http://127.0.0.1:1/x', path=tmp_path / 'x')
    assert d.chunk_size >= 64 * 1024
    for bad in (0, -1):
        with pytest.raises(ValueError):
            d.chunk_size = bad
    with pytest.raises(ValueError):
        bitpit.Downloader('http://127.0.0.1:1/x', path=tmp_path / 'x', chunk_size=0)


BAD_OPTIONS = [
    ('update_period', 0, ValueError), ('update_period', -1, ValueError),
    ('update_period', 'x', TypeError), ('update_period', None, TypeError),
    ('timeout', 0, ValueError), ('timeout', -2.5, ValueError), ('timeout', '10', TypeError),
    ('timeout', float('nan'), ValueError), ('timeout', float('inf'), ValueError),
    ('timeout', 1e10, ValueError), ('timeout', 3e6, ValueError),  # poll() takes 2**31 ms
    ('update_period', float('inf'), ValueError),
    ('rate_limit', float('inf'), ValueError), ('restart_wait', float('nan'), ValueError),
    ('min_speed', -5, ValueError), ('connections', '4', ValueError),
    ('restart_wait', 'soon', TypeError), ('restart_wait', None, TypeError),
    ('rate_limit', 'fast', TypeError), ('rate_limit', None, TypeError),
    ('retries', -1, ValueError), ('retries', 1.5, TypeError), ('retries', '3', TypeError),
    ('auth', 'user:password', TypeError), ('auth', ('user',), TypeError),
    ('auth', ('user', 1), TypeError),
    ('headers', 'X-A: 1', TypeError), ('headers', {'X-A': 1}, TypeError),
    ('chunk_size', 0, ValueError), ('chunk_size', '64k', TypeError),
    ('connections', 0, ValueError), ('max_size', -1, ValueError), ('max_size', '1m', TypeError),
    ('min_speed', 'slow', TypeError), ('proxy', 'ftp://p:21', ValueError),
    ('ssl_context', 'yes', TypeError),
]


@pytest.mark.parametrize('name, value, error', BAD_OPTIONS,
                         ids=['{}={!r}'.format(n, v) for n, v, _ in BAD_OPTIONS])
def test_options_are_checked_when_they_are_given(tmp_path, name, value, error):
    """In the constructor, in the property setter and in a Manager's
    kwargs: a TypeError or ValueError that names the option."""
    with pytest.raises(error, match=name):
        bitpit.Downloader('http://127.0.0.1:1/x', path=tmp_path / 'x', **{name: value})
    d = bitpit.Downloader('http://127.0.0.1:1/x', path=tmp_path / 'x')
    before = getattr(d, name)
    with pytest.raises(error, match=name):
        setattr(d, name, value)
    assert getattr(d, name) == before
    with pytest.raises(error, match=name):
        bitpit.Manager(**{name: value})
    manager = bitpit.Manager()
    with pytest.raises(error, match=name):
        manager.kwargs = {name: value}
    assert manager.kwargs == {}


@pytest.mark.parametrize('name, value, error', [
    ('max_running', '5', TypeError), ('max_running', 2.5, TypeError),
    ('rate_limit', 'fast', TypeError), ('restart_wait', None, TypeError)])
def test_manager_options_are_checked(name, value, error):
    with pytest.raises(error, match=name):
        bitpit.Manager(**{name: value})
    manager = bitpit.Manager()
    with pytest.raises(error, match=name):
        setattr(manager, name, value)


def test_unknown_manager_kwargs_are_refused():
    with pytest.raises(TypeError, match='colour'):
        bitpit.Manager(colour='red')


@pytest.mark.parametrize('text', ['0.5', '0.0005k', '.1'])
def test_a_rate_between_0_and_1_byte_per_second_is_refused(text):
    with pytest.raises(ValueError, match='at least 1'):
        bitpit._parse_rate(text)


def test_initial_properties(tmp_path):
    d = bitpit.Downloader('http://127.0.0.1:1/x', path=tmp_path / 'x')
    assert d.state == 'pause'
    assert (d.size, d.downloaded, d.remaining, d.speed) == (-1, 0, -1, 0)
    assert d.ratio == -1.0 and d.percentage == -100.0 and d.eta is None
    assert d.bar(width=8) == '????????' and d.bar(width=4, unknown='-') == '----'
    assert d.human_size == (-1, 'B') and d.human_speed == (0, 'B/s')
    assert not d.is_alive and not d.is_restarting and d.restart_time is None
    assert d.last_exception is None
    assert d.path == tmp_path / 'x'


def test_bar():
    d = bitpit.Downloader('http://127.0.0.1:1/x', path=io.BytesIO())
    assert d.size == -1  # what the target holds is read now: the progress set below stays
    d._size, d._downloaded = 100, 25
    assert d.bar(width=8) == '==      '
    assert d.bar(width=10, char='-') == '--        '
    d._downloaded = 100
    assert d.bar(width=5) == '=====' and d.ratio == 1.0
    d._size, d._downloaded = 0, 0
    assert d.ratio == 1.0 and d.percentage == 100.0 and d.remaining == 0
