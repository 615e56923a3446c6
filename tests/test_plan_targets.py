"""meditron-plan on the real compilers, no device needed: the debug model compiled by XLA:GPU for
8 compile-only H100s and by XLA:TPU for a v5p 2x2x2 slice exits 0, its parameter and optimizer
bytes equal the analytic counts, its devices sit on the hosts of the real machines, and the
attention the target runs is in its HLO (cuDNN's fused fMHA call on H100); over memory it exits 1
naming the figures; the shipped 7B / 70B configs fit their H100 clusters. Also: the attention
choice per platform, and the HLO collective counter against a program of known collectives.

The GPU and TPU compilers come from the plan-gpu and tpu extras (the README's test command
installs them). GPU plans run in a subprocess: XLA_FLAGS must be set before JAX starts."""

import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meditron_jax import attention as attention_lib, hlo_stats, model, targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What resolve_attention picks for a 'cudnn' config on TPU: 'splash' once the model implements
# the Pallas splash kernel (model_config.ATTENTION_IMPLEMENTATIONS lists it), 'xla' before.


def needs(module: str, extra: str):
    return pytest.importorskip(module, reason=f"pip install -e '.[{extra}]' for this compiler")


# ------------------------------------------------------------------ attention per platform


def test_resolve_attention_follows_the_target_platform(caplog):
    attention_lib._warned_attention.clear()
    with caplog.at_level(logging.INFO):
        assert model.resolve_attention('cudnn', jnp.bfloat16, 'gpu') == 'cudnn'
        assert model.resolve_attention('cudnn', jnp.float16, 'gpu') == 'cudnn'
        assert model.resolve_attention('cudnn', jnp.float32, 'gpu') == 'xla'
        assert model.resolve_attention('cudnn', jnp.bfloat16, 'cpu') == 'xla'
        assert model.resolve_attention('cudnn', jnp.bfloat16, 'tpu') == 'splash'
        assert model.resolve_attention('splash', jnp.bfloat16, 'gpu') == 'xla'
        assert model.resolve_attention('splash', jnp.bfloat16, 'tpu') == 'splash'
        assert model.resolve_attention('xla', jnp.bfloat16, 'gpu') == 'xla'
        # platform=None: the default backend, unless a compile for another platform says so.
        assert model.resolve_attention('cudnn', jnp.bfloat16) == 'xla'
        with model.compile_platform('gpu'):
            assert model.resolve_attention('cudnn', jnp.bfloat16) == 'cudnn'
    text = '\n'.join(r.getMessage() for r in caplog.records)
    assert "the backend is 'cpu', not gpu" in text and 'float32' in text
    assert "attention=splash asked for but the platform is 'gpu', not tpu" in text
    assert 'tpu' in text   # cudnn on tpu: splash said in the log (or why not)


# ------------------------------------------------------------------------- HLO counter


def test_hlo_stats_counts_collectives_in_loops_times_their_trip_count():
    """A psum in a 5-step fori_loop and an all-gather outside it: 5 all-reduces and 1
    all-gather per execution, bytes the buffers' sizes."""
    mesh = jax.make_mesh((8,), ('d',), axis_types=(jax.sharding.AxisType.Explicit,))

    def body(x_8x128):
        def step(i, acc):
            return acc + jax.lax.psum(x_8x128 * i, 'd')
        total = jax.lax.fori_loop(0, 5, step, jnp.zeros_like(x_8x128))
        return jax.lax.all_gather(total, 'd', tiled=True)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P('d'), out_specs=P(),
                                check_vma=False))
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P('d')))
    stats = hlo_stats.parse(f.lower(x).compile().as_text())
    assert stats.unknown_trip_counts == 0
    assert stats.collectives['all-reduce'].count == 5
    assert stats.collectives['all-reduce'].bytes == 5 * 8 * 128 * 4
    assert stats.collectives['all-gather'].count == 1
    assert stats.collectives['all-gather'].bytes == 64 * 128 * 4
    assert stats.collectives['reduce-scatter'].count == 0
    assert stats.fused_attention_calls == {}


# ------------------------------------------------------------------ the command, by target


def plan_in_subprocess(target, num_devices, *overrides):
    """make_plan after plan.start_jax in a fresh process (XLA_FLAGS before JAX starts, as the
    command does); returns the plan's figures."""
    code = f'''
import dataclasses, json, sys
from meditron_jax import plan, targets
target = targets.get({target!r})
devices = plan.start_jax(target, {num_devices})
from configs import debug
config = debug.get_config()
for o in {list(overrides)!r}:
    key, value = o.split('=')
    section, name = key.split('.')
    config[section][name] = type(config[section][name])(value)
p = plan.make_plan(config, devices, xla_flops=False, target=target)
out = dataclasses.asdict(p)
out['peak_bytes'] = p.peak_bytes
out['fused'] = p.hlo.fused_attention_calls
out['hosts_of_devices'] = sorted({{d.process_index for d in devices}})
out['xla_flags'] = __import__('os').environ.get('XLA_FLAGS', '')
print('PLAN' + json.dumps(out, default=str))
'''
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    done = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith('PLAN')][-1]
    return json.loads(line[4:])


def exact_param_bytes(num_shards):
    cfg = model.preset('debug')
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    return ((cfg.num_params() - norms) // num_shards + norms) * 4


BF16_CUDNN = ('model.compute_dtype=bfloat16', 'model.attention=cudnn', 'data.seq_len=64')


def test_debug_model_on_8_h100s_runs_cudnn_attention_with_the_cluster_flags():
    needs('jax_plugins.xla_cuda12', 'plan-gpu')
    p = plan_in_subprocess('h100', 8, *BF16_CUDNN)
    assert p['compiler'] == 'XLA:GPU' and p['device_kind'] == 'NVIDIA H100 80GB HBM3'
    assert p['hosts'] == 1 and p['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
    assert p['param_bytes'] == exact_param_bytes(8)
    assert 2 * p['param_bytes'] <= p['opt_state_bytes'] <= 2 * p['param_bytes'] + 16
    assert p['attention'] == 'cudnn'
    assert any(t.startswith('__cudnn$fmha') and 'Backward' not in t for t in p['fused'])
    assert any(t.startswith('__cudnn$fmha') and 'Backward' in t for t in p['fused'])
    assert all(f in p['xla_flags'] for f in targets.xla_flags_gpu())
    # fsdp: parameters gathered, gradients scattered, every step.
    assert p['hlo']['collectives']['all-gather']['count'] > 0
    assert p['hlo']['collectives']['reduce-scatter']['count'] > 0
    assert 0 < p['peak_bytes'] < 1 * 2 ** 30


def test_debug_model_on_a_v5p_2x2x2_slice_spans_two_hosts():
    needs('libtpu', 'tpu')
    # A 'cudnn' config on TPU runs splash, whose blocks are 128 tokens: seq_len 128.
    p = plan_in_subprocess('tpu-v5p', 8, 'model.compute_dtype=bfloat16', 'model.attention=cudnn',
                           'data.seq_len=128')
    assert p['compiler'] == 'XLA:TPU' and p['device_kind'] == 'TPU v5'
    assert p['hosts'] == 2 and p['hosts_of_devices'] == [0, 1]   # 4 chips a host
    assert p['param_bytes'] == exact_param_bytes(8)
    assert 2 * p['param_bytes'] <= p['opt_state_bytes'] <= 2 * p['param_bytes'] + 16
    assert p['attention'] == 'splash'
    assert p['fused'] and all('tpu_custom_call' in t for t in p['fused'])   # Mosaic kernels
    assert p['xla_peak_bytes'] and p['peak_bytes'] >= p['xla_peak_bytes']


def run_plan(*args):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    return subprocess.run([sys.executable, '-m', 'meditron_jax.plan', *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def test_command_on_h100_exits_1_over_memory_naming_the_figures():
    needs('jax_plugins.xla_cuda12', 'plan-gpu')
    out = run_plan('--config', 'configs/debug.py', '--target', 'h100', '--num_devices', '8',
                   '--xla_flops=false', '--device_memory_gb', '0.001',
                   *(f'--config.{o}' for o in BF16_CUDNN))
    assert out.returncode == 1, out.stdout + out.stderr[-2000:]
    assert 'target h100 (XLA:GPU, NVIDIA H100 80GB HBM3)' in out.stdout
    assert 'fused attention kernel: __cudnn$fmha' in out.stdout
    message = [x for x in out.stderr.splitlines() if x.startswith('DOES NOT FIT')]
    assert message and all(w in message[0] for w in (
        'arguments', 'outputs', 'aliased', 'temporaries', '--device_memory_gb=0.001'))


@pytest.mark.slow
@pytest.mark.parametrize('config,devices', [('meditron_7b', 64), ('meditron_70b', 128)])
def test_shipped_configs_fit_their_h100_clusters(config, devices):
    needs('jax_plugins.xla_cuda12', 'plan-gpu')
    out = run_plan('--config', f'configs/{config}.py', '--target', 'h100', '--xla_flops=false')
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert f'= {devices} devices on {devices // 8} host(s)' in out.stdout
    assert 'attention=cudnn' in out.stdout and '__cudnn$fmha' in out.stdout
    assert out.stdout.rstrip().endswith('fits')


def test_tpu_slices_are_the_most_cubic_power_of_two():
    v5p, v5e = targets.get('tpu-v5p'), targets.get('tpu-v5e')
    assert targets.tpu_topology_shape(v5p, 8) == (2, 2, 2)
    assert targets.tpu_topology_shape(v5p, 4) == (2, 2, 1)
    assert targets.tpu_topology_shape(v5p, 128) == (4, 4, 8)
    assert targets.tpu_topology_shape(v5e, 32) == (4, 8)
    with pytest.raises(targets.TargetError, match='power of two'):
        targets.tpu_topology_shape(v5p, 24)
    assert np.prod(targets.tpu_topology_shape(v5p, 512)) == 512


@pytest.mark.slow
def test_sweep_marks_the_fewest_flops_that_fit_preferring_larger_micro_batches():
    """Same tokens a step at every point: full remat costs recompute FLOPs and saves memory;
    without remat, 2 sequences a device in 1 micro-batch beats 1 in 2 (same FLOPs)."""
    from meditron_jax import plan_sweep
    from tests.test_plan import tiny_config
    config = tiny_config(1, 8, 1)
    config.data.global_batch_size = 16
    rows = plan_sweep.sweep(config, jax.devices()[:8], targets.get('cpu'), [1, 2],
                            remats=['none', 'full'])
    by = {(r.micro_batch_per_device, r.remat): r for r in rows}
    assert set(by) == {(1, 'none'), (1, 'full'), (2, 'none'), (2, 'full')}
    assert [by[1, 'none'].grad_accum_steps, by[2, 'none'].grad_accum_steps] == [2, 1]
    for b in (1, 2):
        assert by[b, 'full'].plan.xla_flops_per_step > 1.02 * by[b, 'none'].plan.xla_flops_per_step
    assert plan_sweep.best(rows, 80, 3) is by[2, 'none']
    # A limit between the points: the fastest that still fits.
    limit_gib = by[2, 'none'].plan.peak_bytes / 2 ** 30 - 1e-6 + 3
    chosen = plan_sweep.best(rows, limit_gib, 3)
    assert chosen is not by[2, 'none'] and chosen.plan.peak_bytes <= by[2, 'none'].plan.peak_bytes
    table = plan_sweep.table(rows, 80, 3)
    assert table.count('<- fastest that fits') == 1
    assert plan_sweep.best(rows, 3.0000001, 3) is None
    assert 'no point fits' in plan_sweep.table(rows, 3.0000001, 3)


def test_gpu_env_exports_exactly_the_flags_the_plan_compiles_with():
    out = subprocess.run(['bash', '-c', 'source launch/gpu_env.sh && echo "$XLA_FLAGS"'],
                         cwd=REPO, env=dict(os.environ, XLA_FLAGS=''), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    flags = targets.xla_flags_gpu()
    assert out.stdout.split() == flags
    assert '--xla_gpu_enable_pipelined_all_gather=true' in flags and len(flags) == 10
