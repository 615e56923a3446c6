"""Two JAX processes on this machine (real jax.distributed over localhost): each reads its own
documents, together all of them, the batches each yields hold only its own documents, and their
local batches form one global batch."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import numpy as np
import sentencepiece as spm

from meditron_jax.data import shards
from tests.data_helpers import prepared_debug, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r'''
import hashlib, json, sys
import jax
import numpy as np
import sentencepiece as spm
jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_num_cpu_devices', 4)
port, process_id, data_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'localhost:{port}', num_processes=2, process_id=process_id)
from jax.experimental import multihost_utils
from meditron_jax import sharding
from meditron_jax.data import loader, shards, sources
from tests.data_helpers import debug_data_config

cfg = debug_data_config()
index, count = jax.process_index(), jax.process_count()
manifest = shards.read_manifest(data_dir)
docs = {}
for source in sources.parse_sources(cfg.sources):
    ds = loader.process_documents(data_dir, manifest, source, 'train', index, count)
    docs[source.name] = [hashlib.sha1(ds[i]).hexdigest() for i in range(len(ds))]
it = loader.make_train_iterator(cfg, data_dir, seed=0, process_index=index, process_count=count)
local = next(it)
rows = [local] + [next(it) for _ in range(19)]
mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
batch = loader.to_global_batch(local, mesh)
gathered = multihost_utils.process_allgather(batch['tokens'], tiled=True)
json.dump(dict(docs=docs, local=local['tokens'].tolist(),
               batches=[{k: v.tolist() for k, v in b.items()} for b in rows], shape=list(batch['tokens'].shape),
               devices=jax.device_count(), gathered=np.asarray(gathered).tolist()),
          open(out, 'w'))
'''


def _free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_documents_covering_the_set(tmp_path):
    data_dir = prepared_debug()
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', XLA_FLAGS='')
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), data_dir,
                               str(tmp_path / f'out{i}.json')], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    outs = [json.loads((tmp_path / f'out{i}.json').read_text()) for i in range(2)]

    manifest = shards.read_manifest(data_dir)
    for name in manifest['sources']:
        every = sorted(hashlib.sha1(r.astype(manifest['dtype']).tobytes()).hexdigest()
                       for r in records(data_dir, name, 'train'))
        mine, theirs = outs[0]['docs'][name], outs[1]['docs'][name]
        assert not set(mine) & set(theirs)
        assert sorted(mine + theirs) == every
        assert abs(len(mine) - len(theirs)) <= 1

    # The batches themselves: every document that a process's rows hold whole (a segment that
    # starts with BOS and ends inside the row) is one of that process's share of the
    # documents, [process_index::process_count] of each source, and none of the other's.
    bos = spm.SentencePieceProcessor(model_file=os.path.join(data_dir, 'tokenizer.model')).bos_id()
    shares = [set(), set()]
    for name in manifest['sources']:
        docs = records(data_dir, name, 'train')
        for i in range(2):
            shares[i] |= {tuple(int(t) for t in d) for d in docs[i::2]}
    for i, out in enumerate(outs):
        whole = 0
        for batch in out['batches']:
            for tokens, segments in zip(batch['tokens'], batch['segment_ids']):
                for seg in sorted(set(segments) - {0})[:-1]:     # the last may run on
                    idx = [j for j, s in enumerate(segments) if s == seg]
                    if tokens[idx[0]] != bos:
                        continue                                  # the tail of a document
                    doc = tuple(tokens[j] for j in idx)
                    assert doc in shares[i] and doc not in shares[1 - i], (i, seg)
                    whole += 1
        assert whole >= 8, whole

    # Each process built 4 of the 8 rows; the global array holds both halves.
    local0, local1 = np.array(outs[0]['local']), np.array(outs[1]['local'])
    assert local0.shape == local1.shape == (4, 257)
    assert not np.array_equal(local0, local1)
    for out in outs:
        assert out['shape'] == [8, 257] and out['devices'] == 8
        np.testing.assert_array_equal(np.array(out['gathered']),
                                      np.concatenate([local0, local1]))
