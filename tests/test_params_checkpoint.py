"""Params checkpoints: the streaming writer's output restores with plain orbax onto any mesh,
orbax-saved params read back through the same API, and incomplete or mismatched writes fail
naming the leaf and leave nothing."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meditron_jax import model as model_lib
from meditron_jax import params_checkpoint as pc
from meditron_jax import sharding

CFG = model_lib.preset('tiny', param_dtype='bfloat16')


@pytest.fixture(scope='module')
def params():
    """Random params placed fsdp-sharded over 8 devices (device_put: no compile needed)."""
    mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
    abstract, _ = model_lib.param_specs(CFG)
    rng = np.random.default_rng(3)
    return jax.tree.map(
        lambda a, s: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), s),
        abstract, model_lib.param_shardings(CFG, mesh))


def stream(path, params, **kw):
    with pc.ParamsWriter(path, CFG, **kw) as w:
        for name, layer, value in pc.iter_leaf_slices(params):
            w.write(name, np.asarray(value), layer)
    return w.path


def assert_equal_trees(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize('mesh_shape', [(1, 2, 4), (1, 4, 2)])
def test_streamed_checkpoint_restores_with_plain_orbax_onto_a_mesh(params, mesh_shape, tmp_path):
    path = stream(str(tmp_path / 'ckpt'), params, true_vocab_size=250)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
    shardings = model_lib.param_shardings(CFG, mesh)
    abstract, _ = model_lib.param_specs(CFG)
    targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abstract, shardings)
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, 'params'), targets)
    assert_equal_trees(restored, params)
    jax.tree.map(lambda x, s: x.sharding == s or pytest.fail(f'{x.sharding} != {s}'),
                 restored, shardings)
    loaded, cfg = pc.load_params(path, mesh=mesh)
    assert cfg == CFG and pc.read_metadata(path)['true_vocab_size'] == 250
    assert_equal_trees(loaded, params)
    assert loaded['layers']['mlp']['gate']['kernel'].sharding == \
        shardings['layers']['mlp']['gate']['kernel']


def test_orbax_saved_params_read_back_through_the_same_api(params, tmp_path):
    path = pc.save_params(str(tmp_path / 'saved'), params, CFG)
    assert os.path.exists(os.path.join(path, 'params', 'manifest.ocdbt'))
    loaded, cfg = pc.load_params(path, dtype='float32')
    assert cfg.param_dtype == 'float32'
    assert loaded['lm_head']['kernel'].dtype == np.float32
    assert_equal_trees(loaded, jax.tree.map(lambda x: x.astype(np.float32), params))
    reader = pc.ParamsReader(path)
    np.testing.assert_array_equal(reader.read('layers.attn.q.kernel', 1),
                                  np.asarray(params['layers']['attn']['q']['kernel'][1]))


def test_incomplete_stream_names_the_missing_layers_and_leaves_nothing(params, tmp_path):
    with pytest.raises(pc.ParamsCheckpointError, match=r'layers\.mlp\.up\.kernel layers \[1\]'):
        with pc.ParamsWriter(str(tmp_path / 'ckpt'), CFG) as w:
            for name, layer, value in pc.iter_leaf_slices(params):
                if not (name == 'layers.mlp.up.kernel' and layer == 1):
                    w.write(name, np.asarray(value), layer)
    assert os.listdir(tmp_path) == []


def test_wrong_slice_shape_names_the_leaf_and_layer(tmp_path):
    with pytest.raises(pc.ParamsCheckpointError,
                       match=r'layers\.attn\.q\.kernel\[0\]: shape \(64, 8, 4\), '
                             r'expected \(64, 8, 8\)'):
        with pc.ParamsWriter(str(tmp_path / 'ckpt'), CFG) as w:
            w.write('layers.attn.q.kernel', np.zeros((64, 8, 4)), layer=0)
    assert os.listdir(tmp_path) == []


def test_config_that_does_not_match_the_stored_arrays_is_refused(params, tmp_path):
    path = stream(str(tmp_path / 'ckpt'), params)
    meta_file = os.path.join(path, pc.META_FILE)
    text = open(meta_file).read().replace('"mlp_dim": 128', '"mlp_dim": 256')
    open(meta_file, 'w').write(text)
    with pytest.raises(pc.ParamsCheckpointError,
                       match=r'layers\.mlp\.gate\.kernel: stored \(2, 64, 128\), '
                             r'config needs \(2, 64, 256\)'):
        pc.load_params(path)


def flip_middle(directory, nbytes=64):
    """XORs nbytes in the middle of the largest data file under directory; returns its path."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs
             if not f.startswith('_') and not f.endswith('.json') and 'manifest' not in f]
    path = max(files, key=os.path.getsize)
    with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 2)
        data = bytearray(f.read(nbytes))
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0x5A for b in data))
    return path


def test_fingerprints_match_across_writers_meshes_and_slices(params, tmp_path):
    streamed = stream(str(tmp_path / 'streamed'), params)
    saved = pc.save_params(str(tmp_path / 'saved'), params, CFG)
    a, b = (pc.read_metadata(p)['digests'] for p in (streamed, saved))
    assert a == b and set(a) == set(pc.leaf_shapes(CFG))
    reader = pc.ParamsReader(saved)        # slice by slice, out of order: same sums
    for layer in (1, 0):
        reader.read('layers.attn.q.kernel', layer)
    one, _ = pc.load_params(streamed)      # on one device: verified on load
    assert_equal_trees(one, params)


@pytest.mark.parametrize('writer', ['streamed', 'saved'])
def test_flipped_bytes_are_refused_naming_the_array(params, writer, tmp_path):
    if writer == 'streamed':   # uncompressed: the flip decodes to wrong values, silently
        path = stream(str(tmp_path / 'ckpt'), params, compression=False)
    else:                      # orbax's own save: OCDBT, zstd
        path = pc.save_params(str(tmp_path / 'ckpt'), params, CFG)
    flipped = flip_middle(os.path.join(path, 'params'))
    with pytest.raises(pc.ParamsCheckpointError, match=rf'{path}: .*damaged|could not be read'):
        pc.load_params(path)
    if writer == 'streamed':   # zarr3 without OCDBT: params/<leaf>/c/... names the leaf
        leaf = os.path.relpath(flipped, os.path.join(path, 'params')).split(os.sep)[0]
        assert leaf in pc.leaf_shapes(CFG)
        with pytest.raises(pc.ParamsCheckpointError,
                           match=rf'damaged checkpoint, .*{leaf}: contents differ'):
            pc.load_params(path)
        reader = pc.ParamsReader(path)
        with pytest.raises(pc.ParamsCheckpointError, match=rf'damaged checkpoint, {leaf}:'):
            for name, shape in pc.leaf_shapes(CFG).items():
                for layer in range(shape[0]) if pc.is_stacked(name) else [None]:
                    reader.read(name, layer)


def test_save_params_refuses_to_replace_a_directory_it_did_not_write(params, tmp_path):
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'data.bin').write_bytes(b'x')
    with pytest.raises(FileExistsError, match=r'not an output of meditron-convert'):
        pc.save_params(str(tmp_path / 'mine'), params, CFG, force=True)
    assert os.listdir(tmp_path / 'mine') == ['data.bin']
    first = pc.save_params(str(tmp_path / 'out'), params, CFG)
    assert pc.save_params(first, params, CFG, force=True) == first
    assert sorted(os.listdir(tmp_path)) == ['mine', 'out']
