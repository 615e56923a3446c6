"""meditron-plan: its per-device parameter and optimizer bytes equal the analytic count (params x 4
bytes and Adam's 2 x params x 4 bytes over the shard count) and XLA's argument size, its gradient
bytes XLA's output size for the compiled gradient; its
extrapolated FLOP count equals XLA's count of the unrolled step; the command exits 1 when the
estimate exceeds the device memory and 0 when it fits."""

import os
import subprocess
import sys

import jax
import pytest

from configs import base
from meditron_jax import model, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data=1, fsdp=4, tensor=2, **model_overrides):
    c = base.get_config()
    c.model = base.model_config('tiny')
    c.model.update(model_overrides)
    c.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
    c.data.seq_len, c.data.global_batch_size = 64, 8
    c.optim.grad_accum_steps = 1
    return c


@pytest.mark.parametrize('data,fsdp,tensor', [(1, 4, 2), (2, 4, 1)])
def test_param_and_optimizer_bytes_match_analytic_count(data, fsdp, tensor):
    config = tiny_config(data, fsdp, tensor)
    devices = jax.devices()[:data * fsdp * tensor]
    p = plan.make_plan(config, devices, xla_flops=False)
    cfg = model.preset('tiny')
    n = cfg.num_params()
    # Every weight matrix is split over fsdp x tensor; the norm scales are replicated.
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    exact = ((n - norms) // (fsdp * tensor) + norms) * 4
    assert p.param_bytes == exact
    assert p.param_bytes == pytest.approx(n * 4 / (fsdp * tensor), rel=0.05)  # norms are tiny
    # Adam: mu and nu like the parameters, plus a step counter (a few bytes).
    assert 2 * exact <= p.opt_state_bytes <= 2 * exact + 16
    # XLA's output also holds the tuple's pointer table: 8 bytes a leaf.
    leaves = len(jax.tree.leaves(model.param_specs(cfg)[0]))
    assert 0 <= xla_gradient_bytes(config, devices) - p.grad_bytes <= 8 * leaves
    # XLA's own view of the inputs: state (params, optimizer, int32 scalars) + the batch.
    inputs = p.param_bytes + p.opt_state_bytes + p.batch_bytes
    assert inputs <= p.xla_argument_bytes <= inputs + 64
    assert p.batch_bytes == 4 * (8 // (data * fsdp)) * 65 * 4   # tokens, segments, positions, mask
    # The donated state is aliased to the output: the peak counts it once (plus scalars).
    assert p.xla_alias_bytes >= p.param_bytes + p.opt_state_bytes
    assert 0 <= p.peak_bytes - (inputs + p.xla_temp_bytes) <= 1024


def xla_gradient_bytes(config, devices):
    """XLA's own per-device output size of the compiled gradient of the training loss, laid out
    as the train step holds it (like the parameters; inside the step XLA shards it so: pinning
    it there changes no buffer size). Compiled alone with its layout left free, XLA returns it
    replicated over fsdp, which is not what the step holds."""
    from meditron_jax import sharding, train
    cfg = train.model_config(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    abstract, _ = model.param_specs(cfg)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, model.param_shardings(cfg, mesh))
    rows, length = int(config.data.global_batch_size), int(config.data.seq_len) + 1
    batch = {k: jax.ShapeDtypeStruct((rows, length), jax.numpy.int32,
                                     sharding=sharding.batch_sharding(mesh))
             for k in train.BATCH_KEYS}
    grad = jax.jit(jax.grad(lambda p, b: train.loss_terms(p, cfg, b)[0]),
                   out_shardings=model.param_shardings(cfg, mesh))
    with jax.set_mesh(mesh):
        memory = grad.lower(params, batch).compile().memory_analysis()
    return memory.output_size_in_bytes


@pytest.mark.slow
def test_extrapolated_flops_equal_xla_count_of_the_unrolled_step():
    """The scanned step with 2 micro-batches (XLA counts loop bodies once) extrapolates to the
    FLOPs XLA counts for the same model unrolled, in one batch. The scanned stack keeps its loop
    (scan_unroll=1, as on GPU and TPU; XLA:CPU's own choice would unroll it)."""
    devices = jax.devices()[:8]
    scanned = tiny_config(num_layers=4, scan_unroll=1)
    scanned.optim.grad_accum_steps = 2
    unrolled = tiny_config(num_layers=4, scan_layers=False)
    p_scanned = plan.make_plan(scanned, devices)
    p_unrolled = plan.make_plan(unrolled, devices, xla_flops=False)
    assert p_scanned.xla_flops_raw < 0.5 * p_unrolled.xla_flops_raw   # the undercount fixed
    assert p_scanned.xla_flops_per_step == pytest.approx(p_unrolled.xla_flops_raw, rel=0.03)
    # XLA also counts the softmax, norms and optimizer: more than the model's matmul FLOPs.
    assert p_unrolled.xla_flops_raw > p_unrolled.model_flops_per_step


def run_plan(*args):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    return subprocess.run(
        [sys.executable, '-m', 'meditron_jax.plan', '--config',
         os.path.join(REPO, 'configs', 'debug.py'), '--num_devices', '8', '--xla_flops=false',
         '--config.data.seq_len=64', *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_exits_nonzero_when_the_estimate_exceeds_device_memory():
    small = run_plan('--device_memory_gb', '0.001')
    assert small.returncode == 1, small.stdout + small.stderr
    assert 'DOES NOT FIT' in small.stderr and '--device_memory_gb=0.001' in small.stderr
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} = 8 devices" in small.stdout
    fits = run_plan('--device_memory_gb', '80')
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert fits.stdout.rstrip().endswith('fits')
