"""Conversion memory and speed: streaming meditron-convert next to a naive load-everything one.

    python benchmarks/bench_convert.py [--workdir /tmp/bench_convert] [--keep]

Generates a synthetic HF Llama checkpoint (random bfloat16 weights, written shard by shard,
default 1.1B parameters: TinyLlama's shape), then runs, each in its own process:
  streaming import-hf, export-hf, export-meta (4 ranks), import-meta (``python -m
  meditron_jax.convert ...``)
  naive import  (safetensors.torch.load_file everything, build the stacked tree, orbax save)
  naive export  (orbax restore everything, build the HF state dict, safetensors save_file)
  a process that only imports the same libraries (the constant every conversion pays)
and prints, per run: wall time, MB/s of weights, peak RSS (the kernel's ru_maxrss, which counts
file-backed mapped pages too) and peak anonymous RSS (polled from /proc), as multiples of the
largest tensor and of the model size. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# TinyLlama-1.1B's shape: GQA (32 query heads, 4 kv heads), 32000 vocab.
HF_CONFIG = dict(
    architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=32000, hidden_size=2048,
    intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
    max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act='silu',
    tie_word_embeddings=False, dtype='bfloat16')


# ------------------------------------------------------------------------------ generation


def generate(directory: str, shard_bytes: int = 1 << 30) -> tuple[int, int, int]:
    """Writes config.json + sharded safetensors; returns (params, bytes, largest tensor bytes)."""
    import ml_dtypes
    from meditron_jax.convert import common, hf
    cfg, true_vocab = hf.config_from_hf(HF_CONFIG, 'bench')
    plan = common.torch_tensor_plan(cfg, true_vocab)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = [(name, bf16, shape) for name, _, _, shape in plan]
    shards = hf.plan_shards(entries, shard_bytes)
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
        total += hf.write_safetensors(
            os.path.join(directory, fname), shard,
            lambda name: (0.02 * rng.standard_normal(dict((n, s) for n, _, s in shard)[name],
                                                     dtype=np.float32)).astype(bf16))
        weight_map.update({name: fname for name, _, _ in shard})
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(HF_CONFIG, f)
    largest = max(int(np.prod(s)) * 2 for _, _, s in entries)
    return cfg.num_params(), total, largest


# ------------------------------------------------------------------------- naive baselines


def naive_import(src: str, dst: str) -> None:
    """What a load-everything converter does: the whole model in host memory, then one save."""
    import orbax.checkpoint as ocp
    from safetensors.torch import load_file
    from meditron_jax import params_checkpoint as pc
    from meditron_jax.convert import common, hf
    with open(os.path.join(src, 'config.json')) as f:
        cfg, true_vocab = hf.config_from_hf(json.load(f), src)
    cfg = cfg.replace(param_dtype='bfloat16')
    state = {}
    for fname in sorted(os.listdir(src)):
        if fname.endswith('.safetensors'):
            state.update(load_file(os.path.join(src, fname)))
    flat = {}
    for rule in common.TENSORS:
        if rule.per_layer:
            flat[rule.leaf] = np.stack([
                rule.to_ours(common.torch_to_numpy(state[rule.hf_name.format(i=i)]), cfg)
                for i in range(cfg.num_layers)])
        else:
            flat[rule.leaf] = rule.to_ours(common.torch_to_numpy(state[rule.hf_name]), cfg)
    ocp.StandardCheckpointer().save(os.path.join(dst, 'params'), pc.nest(flat))
    pc.write_meta(dst, cfg, true_vocab, {}, {})   # no fingerprints: loads unchecked


def naive_export(src: str, dst: str) -> None:
    import orbax.checkpoint as ocp
    from safetensors.torch import save_file
    from meditron_jax import params_checkpoint as pc
    from meditron_jax.convert import common
    cfg = pc.read_config(src)
    tree = ocp.StandardCheckpointer().restore(os.path.join(src, 'params'))
    flat = {pc.leaf_name(p): np.asarray(x)
            for p, x in __import__('jax').tree_util.tree_flatten_with_path(tree)[0]}
    del tree
    state = {}
    for name, rule, layer, _ in common.torch_tensor_plan(cfg, cfg.vocab_size):
        x = flat[rule.leaf] if layer is None else flat[rule.leaf][layer]
        state[name] = common.numpy_to_torch(np.ascontiguousarray(rule.to_torch(x, cfg)))
    os.makedirs(dst, exist_ok=True)
    save_file(state, os.path.join(dst, 'model.safetensors'), metadata={'format': 'pt'})


def baseline() -> None:
    import jax, orbax.checkpoint, tensorstore, torch, safetensors  # noqa: F401
    from meditron_jax.convert import cli  # noqa: F401
    jax.devices()


# ------------------------------------------------------------------------------- measuring


def measure(cmd: list[str]) -> dict:
    """Runs cmd; wall time, ru_maxrss and polled peak RssAnon of that process alone."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peak_anon, done = [0], threading.Event()

    def poll():   # must not reap the child (proc.poll would): os.wait4 below does
        status = f'/proc/{proc.pid}/status'
        while not done.is_set():
            try:
                with open(status) as f:
                    for line in f:
                        if line.startswith('RssAnon:'):
                            peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    done.set()
    poller.join()
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f'{cmd} failed ({proc.returncode}):\n{err[-3000:]}')
    return dict(wall_s=wall, maxrss=usage.ru_maxrss * 1024, peak_anon=peak_anon[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--workdir', default='/tmp/bench_convert')
    p.add_argument('--keep', action='store_true', help='keep the generated files')
    p.add_argument('--stage', choices=['naive-import', 'naive-export', 'baseline'],
                   help=argparse.SUPPRESS)
    p.add_argument('args', nargs='*', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage == 'naive-import':
        return naive_import(*a.args)
    if a.stage == 'naive-export':
        return naive_export(*a.args)
    if a.stage == 'baseline':
        return baseline()

    shutil.rmtree(a.workdir, ignore_errors=True)
    w = lambda *parts: os.path.join(a.workdir, *parts)  # noqa: E731
    t = time.perf_counter()
    n_params, model_bytes, largest = generate(w('hf_src'))
    print(f'generated {n_params / 1e9:.2f}B params, {model_bytes / 1e9:.2f} GB bf16, largest '
          f'tensor {largest / 1e6:.0f} MB, in {time.perf_counter() - t:.0f} s', flush=True)
    py, me = sys.executable, os.path.abspath(__file__)
    runs = [
        ('baseline: imports only', [py, me, '--stage', 'baseline']),
        ('streaming import-hf', [py, '-m', 'meditron_jax.convert', 'import-hf', w('hf_src'),
                                 w('ours')]),
        ('streaming export-hf', [py, '-m', 'meditron_jax.convert', 'export-hf', w('ours'),
                                 w('hf_out')]),
        ('streaming export-meta (4 ranks)', [py, '-m', 'meditron_jax.convert', 'export-meta',
                                             w('ours'), w('meta_out'), '--shards', '4']),
        ('streaming import-meta (4 ranks)', [py, '-m', 'meditron_jax.convert', 'import-meta',
                                             w('meta_out'), w('ours_from_meta')]),
        ('naive import', [py, me, '--stage', 'naive-import', w('hf_src'), w('naive_ours')]),
        ('naive export', [py, me, '--stage', 'naive-export', w('ours'), w('naive_hf')]),
    ]
    rows = []
    for label, cmd in runs:
        r = measure(cmd)
        rows.append((label, r))
        print(f'{label}: {r["wall_s"]:.1f} s, maxrss {r["maxrss"] / 1e9:.2f} GB, '
              f'peak anon {r["peak_anon"] / 1e9:.2f} GB', flush=True)
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)

    base = rows[0][1]
    print(f'\nModel: {n_params / 1e9:.2f}B params, {model_bytes / 1e9:.2f} GB (bf16); largest '
          f'tensor {largest / 1e6:.0f} MB; machine: {os.cpu_count()} cores.\n')
    print('| run | wall s | MB/s | peak RSS GB | x largest | x model | peak anon GB | '
          'anon above baseline, x largest |')
    print('|---|---|---|---|---|---|---|---|')
    for label, r in rows:
        mbs = '' if r is base else f'{model_bytes / 1e6 / r["wall_s"]:.0f}'
        above = '' if r is base else f'{(r["peak_anon"] - base["peak_anon"]) / largest:.1f}'
        print(f'| {label} | {r["wall_s"]:.1f} | {mbs} | {r["maxrss"] / 1e9:.2f} | '
              f'{r["maxrss"] / largest:.1f} | {r["maxrss"] / model_bytes:.2f} | '
              f'{r["peak_anon"] / 1e9:.2f} | {above} |')


if __name__ == '__main__':
    main()
