"""The grain loader: batch format, packing, token-share mixture, exact resume, eval, sharding."""

import json

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meditron_jax import sharding
from meditron_jax.data import loader, shards, tokenizer
from tests.data_helpers import debug_data_config, prepared_debug, records

BOS, EOS = 1, 2


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def _segments(row):
    """(start, stop) of each segment of one row, in order."""
    ids = row['segment_ids']
    starts = np.flatnonzero(np.diff(ids, prepend=-1))
    return [(s, e) for s, e in zip(starts, list(starts[1:]) + [len(ids)]) if ids[s] != 0]


def test_batch_format_concat_packing():
    cfg = debug_data_config()
    it = loader.make_train_iterator(cfg, prepared_debug(), seed=0, process_index=0,
                                    process_count=1)
    documents = {tuple(r) for name in ('guidelines', 'abstracts', 'replay')
                 for r in records(prepared_debug(), name, 'train')}
    for batch in _take(it, 20):
        assert set(batch) == {'tokens', 'segment_ids', 'positions', 'loss_mask'}
        assert (batch['loss_mask'] == 1).all()   # text: every token is learned
        for v in batch.values():
            assert v.shape == (8, 257) and v.dtype == np.int32
        for r in range(8):
            row = {k: v[r] for k, v in batch.items()}
            assert row['segment_ids'].min() >= 1          # concat-then-split: no padding
            segs = _segments(row)
            assert [row['segment_ids'][s] for s, _ in segs] == list(range(1, len(segs) + 1))
            for i, (s, e) in enumerate(segs):
                assert np.array_equal(row['positions'][s:e], np.arange(e - s))
                tokens = tuple(row['tokens'][s:e])
                if i > 0:      # only a row's first segment may continue a document
                    assert tokens[0] == BOS
                if tokens[0] == BOS and tokens[-1] == EOS:
                    assert tokens in documents


def test_first_fit_packing_pads_and_never_splits():
    cfg = debug_data_config()
    cfg.packing = 'first_fit'
    it = loader.make_train_iterator(cfg, prepared_debug(), seed=0, process_index=0,
                                    process_count=1)
    padded = 0
    for batch in _take(it, 10):
        assert batch['tokens'].shape == (8, 257)
        pad = batch['segment_ids'] == 0
        padded += pad.sum()
        assert (batch['tokens'][pad] == 0).all()
        for r in range(8):
            row = {k: v[r] for k, v in batch.items()}
            for s, e in _segments(row):
                assert row['tokens'][s] == BOS
                assert row['tokens'][e - 1] == EOS or e - s == 257     # whole, or truncated
    assert padded > 0


@pytest.mark.parametrize('weights', [(0.3, 0.6, 0.1), (0.1, 0.3, 0.6)])
def test_mixture_token_shares_match_weights(weights):
    cfg = debug_data_config()
    for source, w in zip(cfg.sources, weights):
        source['weight'] = w
    ds = loader.train_dataset(cfg, prepared_debug(), seed=1, process_index=0, process_count=1,
                              with_source_ids=True)
    counts = np.zeros(3)
    for batch in _take(iter(ds), 250):      # ~500k tokens, several epochs of the small sources
        counts += np.bincount(batch['source_ids'].ravel(), minlength=3)
    shares = counts / counts.sum()
    np.testing.assert_allclose(shares, weights, atol=0.02)


def test_exact_resume_mid_epoch_from_state():
    cfg = debug_data_config()
    kwargs = dict(seed=3, process_index=0, process_count=1)
    it = loader.make_train_iterator(cfg, prepared_debug(), **kwargs)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))          # survives JSON (checkpoints)
    expected = _take(it, 6)
    resumed = loader.make_train_iterator(cfg, prepared_debug(), **kwargs)
    resumed.set_state(state)
    assert _equal(_take(resumed, 6), expected)
    fresh = loader.make_train_iterator(cfg, prepared_debug(), **kwargs)
    assert not _equal(_take(fresh, 6), expected)


def test_exact_resume_through_an_orbax_checkpoint(tmp_path):
    cfg = debug_data_config()
    kwargs = dict(seed=0, process_index=0, process_count=1)
    it = loader.make_train_iterator(cfg, prepared_debug(), **kwargs)
    _take(it, 5)
    manager = ocp.CheckpointManager(str(tmp_path / 'ckpt'))
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    expected = _take(it, 4)
    resumed = loader.make_train_iterator(cfg, prepared_debug(), **kwargs)
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    assert _equal(_take(resumed, 4), expected)
    manager.close()


def test_epochs_are_reshuffled_and_cover_every_document():
    docs = grain.MapDataset.range(50)
    shuffled = loader._ShuffleRepeat(docs, seed=7)
    epoch0, epoch1 = [shuffled[i] for i in range(50)], [shuffled[i] for i in range(50, 100)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1 and epoch0 != list(range(50))
    assert [loader._ShuffleRepeat(docs, seed=7)[i] for i in range(50)] == epoch0
    assert [loader._ShuffleRepeat(docs, seed=8)[i] for i in range(50)] != epoch0


def test_eval_iterator_is_deterministic_endless_and_held_out():
    cfg = debug_data_config()
    data_dir = prepared_debug()
    first = _take(loader.make_eval_iterator(cfg, data_dir, process_index=0, process_count=1), 4)
    again = _take(loader.make_eval_iterator(cfg, data_dir, process_index=0, process_count=1), 4)
    assert _equal(first, again)
    validation = {tuple(r) for name in ('guidelines', 'abstracts', 'replay')
                  for r in records(data_dir, name, 'validation')}
    manifest = shards.read_manifest(data_dir)
    batches = _take(loader.make_eval_iterator(cfg, data_dir, process_index=0, process_count=1),
                    40)                                     # several times the held-out set
    assert 40 * 8 * 257 > 3 * manifest['totals']['validation']['tokens']
    for batch in batches:
        for r in range(8):
            row = {k: v[r] for k, v in batch.items()}
            for s, e in _segments(row):
                tokens = tuple(row['tokens'][s:e])
                if tokens[0] == BOS and tokens[-1] == EOS:
                    assert tokens in validation


def test_to_global_batch_shards_rows_over_the_batch_axes():
    mesh = sharding.make_mesh(dict(data=2, fsdp=-1, tensor=1))
    cfg = debug_data_config()
    local = next(loader.make_train_iterator(cfg, prepared_debug(), seed=0, process_index=0,
                                            process_count=1))
    batch = loader.to_global_batch(local, mesh)
    assert set(batch) == set(local)
    for k, v in batch.items():
        assert isinstance(v, jax.Array) and v.shape == (8, 257)
        assert v.sharding == sharding.batch_sharding(mesh)
        assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape == (1, 257)
        np.testing.assert_array_equal(np.asarray(v), local[k])


def test_tokenizer_contract():
    tok = tokenizer.Tokenizer(f'{prepared_debug()}/{tokenizer.FILENAME}')
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (2048, 1, 2, 0)
    assert len(tok.sha256) == 64
    ids = tok.encode('Offer metformin 500 mg daily [BIB_REF].')
    assert ids[0] == BOS and ids[-1] == EOS and tok.piece_to_id('[BIB_REF]') in ids
    assert tok.decode(ids) == 'Offer metformin 500 mg daily [BIB_REF].'
    assert tok.encode('x', bos=False, eos=False) == tok.encode('x')[1:-1]


def test_grain_worker_processes_resume_exactly():
    cfg = debug_data_config()
    cfg.worker_count = 1
    kwargs = dict(seed=0, process_index=0, process_count=1)
    it = loader.make_train_iterator(cfg, prepared_debug(), **kwargs)
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
    assert expected[0]['tokens'].shape == (8, 257)
    resumed = loader.make_train_iterator(cfg, prepared_debug(), **kwargs)
    resumed.set_state(state)
    assert _equal(_take(resumed, 3), expected)
