"""Sharding on 8 simulated CPU devices: the same numbers on every mesh, parameters split as the
rules say, and errors that name the mesh or axis that does not fit.

Jitted steps compile with ``xla_backend_optimization_level=0`` (the same partitioned program,
less LLVM optimisation of its CPU kernels) so that five compiles stay within a few seconds each.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meditron_jax import model as M
from meditron_jax import sharding as S

FAST_COMPILE = {'xla_backend_optimization_level': 0}

# The rules table spelled out per parameter, independently of sharding.LOGICAL_AXIS_RULES:
# embed -> fsdp; heads, kv_heads, mlp, vocab -> tensor; layers, head_dim, norm replicated.
EXPECTED_MESH_AXES = {
    "['embed']['embedding']": ('tensor', 'fsdp'),
    "['layers']['attn_norm']['scale']": (None, None),
    "['layers']['attn']['q']['kernel']": (None, 'fsdp', 'tensor', None),
    "['layers']['attn']['k']['kernel']": (None, 'fsdp', 'tensor', None),
    "['layers']['attn']['v']['kernel']": (None, 'fsdp', 'tensor', None),
    "['layers']['attn']['o']['kernel']": (None, 'tensor', None, 'fsdp'),
    "['layers']['mlp_norm']['scale']": (None, None),
    "['layers']['mlp']['gate']['kernel']": (None, 'fsdp', 'tensor'),
    "['layers']['mlp']['up']['kernel']": (None, 'fsdp', 'tensor'),
    "['layers']['mlp']['down']['kernel']": (None, 'tensor', 'fsdp'),
    "['final_norm']['scale']": (None,),
    "['lm_head']['kernel']": ('fsdp', 'tensor'),
}
MESHES = [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1),
          dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=2, tensor=4)]


def mesh_id(m):
    return ','.join(f'{k}={v}' for k, v in m.items() if v > 1)


def assert_split_as_rules_say(params, mesh):
    """Every parameter's sharding and the shard each device holds follow EXPECTED_MESH_AXES."""
    flat = {jax.tree_util.keystr(path): a
            for path, a in jax.tree_util.tree_leaves_with_path(params)}
    assert set(flat) == set(EXPECTED_MESH_AXES)
    for name, arr in flat.items():
        axes = EXPECTED_MESH_AXES[name]
        assert arr.sharding.mesh.shape == mesh.shape, name
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, P(*axes)), arr.ndim), (
            name, arr.sharding.spec, axes)
        want = tuple(d // (mesh.shape[a] if a else 1) for d, a in zip(arr.shape, axes))
        assert arr.sharding.shard_shape(arr.shape) == want, name
        shards = arr.addressable_shards
        assert len({s.device for s in shards}) == len(jax.devices()) == 8
        assert all(s.data.shape == want for s in shards), name


def loss_and_grads(cfg):
    def loss(params, tokens_BxT):
        logits = M.forward(params, cfg, tokens_BxT)
        total, count = M.cross_entropy(logits[:, :-1], tokens_BxT[:, 1:],
                                       jnp.ones_like(tokens_BxT[:, 1:]))
        return total / count, logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)


@pytest.fixture(scope='module')
def cfg():
    return M.preset('tiny')


@pytest.fixture(scope='module')
def mesh_222():
    return S.make_mesh(dict(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope='module')
def initialised(cfg, mesh_222):
    return M.init_params(cfg, mesh_222)


@pytest.fixture(scope='module')
def single_device(cfg, initialised):
    """Host params and the one-device (loss, logits, grads) they give: the reference."""
    params = jax.device_get(initialised)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16)).astype(np.int32)
    device = jax.devices()[0]
    (loss, logits), grads = loss_and_grads(cfg)(jax.device_put(params, device),
                                                jax.device_put(tokens, device))
    return params, tokens, jax.device_get((loss, logits, grads))


def test_init_params_are_created_split_as_the_rules_say(initialised, mesh_222):
    assert_split_as_rules_say(initialised, mesh_222)


@pytest.mark.parametrize('mesh_config', MESHES, ids=mesh_id)
def test_forward_and_gradients_match_single_device(cfg, single_device, mesh_config):
    host_params, tokens, (want_loss, want_logits, want_grads) = single_device
    mesh = S.make_mesh(mesh_config)
    assert dict(mesh.shape) == mesh_config
    params = jax.device_put(host_params, M.param_shardings(cfg, mesh))
    assert_split_as_rules_say(params, mesh)
    batch = jax.device_put(tokens, S.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        lowered = loss_and_grads(cfg).lower(params, batch)
        (loss, logits), grads = lowered.compile()(params, batch)

    # The activation constraints are in the program (set_mesh made constrain() live), with the
    # mesh axes the rules give: batch over (data, fsdp); heads, kv heads, MLP, vocab over tensor.
    constraints = set(re.findall(r'sdy.sharding_constraint %\S+ <@\w+, (\[.*\])> : tensor<(\S+)>',
                                 lowered.as_text()))
    batch_axes = '{"data", "fsdp"}, {}'
    assert {(f'[{batch_axes}, {{}}]', '8x16x64xf32'),                   # residual stream
            (f'[{batch_axes}, {{"tensor"}}, {{}}]', '8x16x8x8xf32'),     # q heads
            (f'[{batch_axes}, {{"tensor"}}, {{}}]', '8x16x4x8xf32'),     # k kv heads
            (f'[{batch_axes}, {{"tensor"}}]', '8x16x128xf32'),           # MLP hidden
            (f'[{batch_axes}, {{"tensor"}}]', '8x16x256xf32'),           # logits
            } <= constraints, constraints
    assert logits.sharding.is_equivalent_to(
        NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor')), 3), logits.sharding
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=0, atol=1e-5)
    for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(grads)),
                               jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------ mesh config


def test_mesh_minus_one_takes_the_remaining_devices():
    assert S.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert dict(S.make_mesh(dict(data=1, fsdp=-1, tensor=4)).shape) == dict(
        data=1, fsdp=2, tensor=4)


def test_mesh_not_fitting_the_device_count_raises_naming_sizes():
    with pytest.raises(S.ShardingError, match=r"'data': 3.*needs 3 devices but 8 are available"):
        S.make_mesh(dict(data=3, fsdp=1, tensor=1))
    with pytest.raises(S.ShardingError, match=r'needs 16 devices but 8 are available'):
        S.make_mesh(dict(data=2, fsdp=4, tensor=2))
    with pytest.raises(S.ShardingError,
                       match=r'fixed axes use 3 devices, which does not divide the 8'):
        S.make_mesh(dict(data=3, fsdp=-1, tensor=1))


def test_mesh_not_dividing_a_sharded_dimension_raises_naming_it(cfg):
    assert cfg.num_kv_heads == 4
    mesh = S.make_mesh(dict(data=1, fsdp=1, tensor=8))
    with pytest.raises(S.ShardingError,
                       match=r"\['k'\]\['kernel'\]: dimension 4 \(shape \(2, 64, 4, 8\)\) is "
                             r"sharded over mesh axes tensor of size 8"):
        M.param_shardings(cfg, mesh)


def test_unknown_logical_axis_raises_naming_it(mesh_222):
    with pytest.raises(S.ShardingError, match=r"logical axis 'sequence_shard' has no rule"):
        S.logical_to_spec(('batch', 'sequence_shard'))
    abstract = {'w': jax.ShapeDtypeStruct((64, 8), jnp.float32)}
    with pytest.raises(S.ShardingError, match=r"logical axis 'bogus' has no rule"):
        S.tree_shardings({'w': ('embed', 'bogus')}, abstract, mesh_222)
    with jax.set_mesh(mesh_222), pytest.raises(S.ShardingError, match=r"'bogus'"):
        jax.jit(lambda x: S.constrain(x, ('batch', 'bogus'))).trace(jnp.zeros((8, 4)))


def test_parameter_without_logical_names_raises(mesh_222):
    abstract = {'w': jax.ShapeDtypeStruct((64, 8), jnp.float32)}
    with pytest.raises(S.ShardingError, match=r"\['w'\]: shape \(64, 8\) needs one logical"):
        S.tree_shardings({'w': ('embed',)}, abstract, mesh_222)


def test_mesh_config_must_name_exactly_the_mesh_axes():
    with pytest.raises(S.ShardingError, match=r"unknown \['sequence'\]"):
        S.mesh_shape({'data': 1, 'fsdp': -1, 'tensor': 1, 'sequence': 2}, 8)
    with pytest.raises(S.ShardingError, match=r"missing \['tensor'\]"):
        S.mesh_shape({'data': 1, 'fsdp': -1}, 8)


def test_local_batch_rows_detects_a_tensor_axis_spanning_processes():
    # Two "processes" of 4 devices each: with (data=2, fsdp=4) each holds half of the rows;
    # with tensor=8 spanning both, each holds all of them (train.validate_config refuses that).
    devices = jax.devices()
    split = S.make_mesh({'data': 2, 'fsdp': 4, 'tensor': 1})
    assert S.local_batch_rows(split, 16, devices[:4]) == 8
    spanning = S.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 8})
    assert S.local_batch_rows(spanning, 16, devices[:4]) == 16
