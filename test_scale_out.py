"""docs/scale-out.md, run as it is written: the Dask recipe (its ```python
elsewhere block, which test_docs.py leaves to this file) on a LocalCluster
of two worker processes, and the command lines of the Kubernetes Indexed
Job and of the Slurm job array with the index set by hand, all against the
local server. Dask distributed is a test dependency: without it the Dask
test fails."""
import json
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest

import bitpit
from conftest import HERE, fenced_blocks

SCALE_OUT = HERE / 'docs' / 'scale-out.md'

#: a LocalCluster of two worker processes that lives until standard input closes
CLUSTER = '''
import sys
from distributed import LocalCluster

if __name__ == '__main__':
    with LocalCluster(n_workers=2, processes=True, dashboard_address=':0') as cluster:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()
'''


def block(language):
    """The one block of docs/scale-out.md in ``language``."""
    found = [code for _, lang, code in fenced_blocks(SCALE_OUT) if lang == language]
    assert len(found) == 1, language
    return found[0]


def serve_files(server, count, seed):
    """``count`` files of random bytes on the server; ``{URL: bytes}``."""
    rng = random.Random(seed)
    files = {}
    for n in range(count):
        data = rng.randbytes(2000 + n)
        files[server.add('/files/{:03d}.bin'.format(n), data)] = data
    return files


def read_records(path):
    text = path.read_text(encoding='utf-8')
    assert text.endswith('\n')
    return [json.loads(line) for line in text.splitlines()]


def check_shards(files, manifests, count):
    """Manifest ``k`` records exactly the URLs of shard ``k``, each complete
    once, with its file whole."""
    for index, manifest in enumerate(manifests):
        records = read_records(manifest)
        assert sorted(r['url'] for r in records) == sorted(bitpit.shard(list(files), index, count))
        for record in records:
            assert record['state'] == 'complete'
            with open(record['path'], 'rb') as file:
                assert file.read() == files[record['url']], record['url']


def test_the_dask_recipe_as_written(server, tmp_path):
    files = serve_files(server, 300, seed=26)
    (tmp_path / 'urls.txt').write_text(''.join(url + '\n' for url in files))
    script = tmp_path / 'recipe.py'
    script.write_text(block('python-elsewhere'), encoding='utf-8')
    env = dict(os.environ, PYTHONPATH=str(HERE))
    with open(tmp_path / 'cluster.log', 'w') as log:
        cluster = subprocess.Popen([sys.executable, '-c', CLUSTER], cwd=str(tmp_path), env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                   text=True)
    try:
        address = cluster.stdout.readline().strip()
        assert address.startswith('tcp://'), (tmp_path / 'cluster.log').read_text()
        env['DASK_SCHEDULER_ADDRESS'] = address
        runs = []
        for _ in range(2):
            runs.append(subprocess.run([sys.executable, str(script)], cwd=str(tmp_path),
                                       env=env, capture_output=True, text=True, timeout=60))
            assert runs[-1].returncode == 0, runs[-1].stderr
            assert runs[-1].stdout == '300 complete, 0 failed\n'
            if len(runs) == 1:
                assert sorted(r.path for r in server.requests) == \
                    ['/files/{:03d}.bin'.format(n) for n in range(300)]
    finally:
        cluster.stdin.close()
        cluster.wait(30)
    assert len(server.requests) == 300  # the second run sent none
    data = tmp_path / 'data'
    check_shards(files, [data / 'manifest-{}-of-4.jsonl'.format(k) for k in range(4)], 4)
    merged = read_records(data / 'manifest.jsonl')
    assert sorted(r['url'] for r in merged) == sorted(files)


def job_script():
    """The ``sh -c`` script of the Kubernetes Job, and its completions."""
    job = block('yaml')
    lines = job.splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith('- |'))
    indent = len(lines[start]) - len(lines[start].lstrip())
    script = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        script.append(line)
    completions = int(re.search(r'^\s*completions: (\d+)', job, re.M).group(1))
    return textwrap.dedent('\n'.join(script)), completions


def array_script():
    """The Slurm batch script, and the size of its array."""
    script = block('sh')
    last = int(re.search(r'^#SBATCH --array=0-(\d+)$', script, re.M).group(1))
    return script, last + 1


@pytest.mark.parametrize('recipe, variable', [(job_script, 'JOB_COMPLETION_INDEX'),
                                              (array_script, 'SLURM_ARRAY_TASK_ID')])
def test_the_command_lines_of_the_job_and_the_array(server, tmp_path, recipe, variable):
    """Each index in turn runs the recipe's commands as written, with a
    ``bitpit`` command on the PATH that runs this bitpit.py."""
    script, count = recipe()
    assert count == 4 and '/{}'.format(count) in script
    files = serve_files(server, 40, seed=4)
    (tmp_path / 'urls.txt').write_text(''.join(url + '\n' for url in files))
    tools = tmp_path / 'bin'
    tools.mkdir()
    (tools / 'bitpit').write_text('#!/bin/sh\nexec "{}" "{}" "$@"\n'.format(
        sys.executable, HERE / 'bitpit.py'))
    (tools / 'bitpit').chmod(0o755)
    env = dict(os.environ, PATH='{}{}{}'.format(tools, os.pathsep, os.environ['PATH']))
    for index in range(count):
        env[variable] = str(index)
        result = subprocess.run(['sh', '-c', script], cwd=str(tmp_path), env=env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    assert len(server.requests) == 40
    check_shards(files, [tmp_path / 'manifests' / '{}.jsonl'.format(k) for k in range(4)], 4)
