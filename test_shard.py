"""``bitpit.shard()`` and the command's ``--shard K/N``: a stable split of a
list of URLs by the SHA-256 of each URL, the same on every machine."""
import hashlib

import pytest

import bitpit

# The first 8 bytes of each URL's SHA-256, as ``printf %s URL | sha256sum``
# gives them: the split does not depend on Python.
FIRST_BYTES = {
    'https://example.com/a.iso': 0x8baffe2bd284a1e1,
    'https://example.com/b.iso': 0xb0d709477fbeb78d,
    'https://example.com/file.iso': 0x8fd99122428f003b,
    'https://example.com/données/é.bin': 0xcc046676356191e0,
}


@pytest.mark.parametrize('count', [1, 3, 5, 7])
def test_each_url_goes_to_the_shard_its_hash_names(count):
    urls = list(FIRST_BYTES)
    for index in range(count):
        assert bitpit.shard(urls, index, count) == [
            url for url in urls if FIRST_BYTES[url] % count == index]


def test_the_shards_split_the_list_in_its_order():
    urls = ['http://h/{}'.format(n) for n in range(1000)]
    shards = [bitpit.shard(urls, index, 4) for index in range(4)]
    assert sorted(sum(shards, []), key=urls.index) == urls
    for part in shards:
        assert part == sorted(part, key=urls.index)
        assert 150 < len(part) < 350  # the hash spreads them
    for url in urls:
        digest = hashlib.sha256(url.encode('utf-8')).digest()
        assert url in shards[int.from_bytes(digest[:8], 'big') % 4]


def test_a_file_with_mirrors_goes_by_its_first_url():
    items = [('https://example.com/a.iso', 'https://mirror.example.com/a.iso'),
             ['https://example.com/b.iso'],
             ('https://example.com/file.iso', ('https://mirror.example.com/file.iso',)),
             'https://example.com/données/é.bin']
    for index in range(5):
        assert bitpit.shard(items, index, 5) == [
            item for item in items
            if FIRST_BYTES[item if isinstance(item, str) else item[0]] % 5 == index]
    assert bitpit.shard(iter(items), 2, 5) == items[1:]  # any iterable


@pytest.mark.parametrize('index, count', [(4, 4), (-1, 4), (0, 0), (0, -2)])
def test_an_index_outside_the_count_is_a_value_error(index, count):
    with pytest.raises(ValueError, match='index|count'):
        bitpit.shard(['http://h/x'], index, count)


@pytest.mark.parametrize('urls, index, count', [
    (['http://h/x'], 1.0, 4), (['http://h/x'], 0, '4'), (['http://h/x'], True, 4),
    ('http://h/x', 0, 1), ([b'http://h/x'], 0, 1), ([3], 0, 1), ([()], 0, 1),
    ([('http://h/x',), None], 0, 1)])
def test_wrong_types_are_type_errors(urls, index, count):
    with pytest.raises(TypeError):
        bitpit.shard(urls, index, count)


# ---------------------------------------------------------------------------
# --shard K/N
# ---------------------------------------------------------------------------

def test_cli_shards_split_an_input_file(server, tmp_path):
    """Four runs with --shard 0/4 ... 3/4 fetch every file once between
    them, each the files shard() gives it (a line with mirrors by its first
    URL), each saved under the name one run over the whole list gives it."""
    lines = []
    for n in range(24):
        url = server.add('/{}/same.bin'.format(n), str(n).encode() * 100)
        lines.append((url, server.url('/mirror/{}'.format(n))) if n % 3 == 0 else (url,))
    listing = tmp_path / 'urls.txt'
    listing.write_text(''.join(' '.join(line) + '\n' for line in lines))
    names = ['same.bin'] + ['same.{}.bin'.format(n) for n in range(1, 24)]
    for index in range(4):
        before = len(server.requests)
        assert bitpit._cli(['-q', '-d', str(tmp_path / 'out'), '--shard',
                            '{}/4'.format(index), '-i', str(listing)]) == 0
        fetched = {r.path for r in server.requests[before:]}
        assert fetched == {'/{}/same.bin'.format(lines.index(line))
                           for line in bitpit.shard(lines, index, 4)}
    for n, name in enumerate(names):
        assert (tmp_path / 'out' / name).read_bytes() == str(n).encode() * 100
    assert len(server.requests) == 24


@pytest.mark.parametrize('value', ['4/4', '-1/4', '1', '0/0', 'a/b', '1/4/8', ' /4', '1.0/4'])
def test_cli_bad_shard_is_a_usage_error(tmp_path, value, capsys):
    assert bitpit._cli(['-q', '-d', str(tmp_path), '--shard', value, 'http://h/x']) == 2
    assert '--shard' in capsys.readouterr().err
