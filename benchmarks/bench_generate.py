"""Greedy generation: Model.generate (KV cache, one jitted while_loop) vs transformers' generate.

    python benchmarks/bench_generate.py [--repeats 3] [--batch 8] [--prompt-len 64] [--new 128]

The same random ~30M-parameter Llama (float32, CPU) is built in transformers, imported with
meditron-convert import-hf and loaded with meditron_jax.load. Both generate the same batch of
prompts greedily for exactly --new tokens (EOS off), compiled/warmed up first, then timed
alternately, run by run, so both see the same machine load. Prints new tokens/s of each and the
ratio (target: >= 3x), whether the tokens agree, prefill tokens/s (the jitted prefill alone),
the KV cache's bytes per token against 2 x layers x kv heads x head_dim x bytes, and the memory
bound: the bytes a decode step must read over the machine's measured read bandwidth.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import meditron_jax  # noqa: E402
from meditron_jax import generate, model as model_lib  # noqa: E402
from meditron_jax.convert import hf  # noqa: E402

SHAPE = dict(vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, intermediate_size=1408, max_position_embeddings=256)


def build(root: str) -> tuple[transformers.LlamaForCausalLM, meditron_jax.Model]:
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SHAPE, rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
    ref.save_pretrained(os.path.join(root, 'hf'))
    hf.import_hf(os.path.join(root, 'hf'), os.path.join(root, 'ours'))
    ours = meditron_jax.load(os.path.join(root, 'ours'))
    ours.eos_id = None                       # exactly --new tokens on both sides
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    return ref, ours


def time_prefill(ours: meditron_jax.Model, prompts_BxT: np.ndarray, new: int, repeats: int
                 ) -> tuple[float, dict]:
    b, t = prompts_BxT.shape
    cfg = ours.config.replace(remat='none')
    inputs = generate.DecodeInputs(
        row_ids_B=jnp.arange(b), stop_ids=jnp.full((4,), -1, jnp.int32),
        max_new_tokens=jnp.int32(new), seed=jnp.uint32(0),
        sample=dict(temperature=jnp.float32(1), top_k=jnp.int32(0), top_p=jnp.float32(1)))
    prompt_len = generate.bucket(t, 8)
    cache_len = -(-(t + new) // prompt_len) * prompt_len     # as generate.generate sizes it
    fn = jax.jit(lambda p, x, n, live, i: generate.prefill(
        p, cfg, x, n, live, i, cache_len=cache_len, out_len=generate.bucket(new),
        sampling=generate.Sampling(True, False, False), true_vocab_size=ours.true_vocab_size))
    args = (ours.params, jnp.asarray(prompts_BxT), jnp.full((b,), t, jnp.int32),
            jnp.ones((b,), bool), inputs)
    state = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return b * t / statistics.median(times), state.cache


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--prompt-len', type=int, default=64)
    p.add_argument('--new', type=int, default=128)
    args = p.parse_args()
    b, t, new = args.batch, args.prompt_len, args.new
    with tempfile.TemporaryDirectory() as root:
        ref, ours = build(root)
    cfg = ours.config
    print(f'model: {cfg.num_params() / 1e6:.1f}M params, {cfg.num_layers} layers, hidden '
          f'{cfg.hidden_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} kv heads, vocab '
          f'{cfg.vocab_size}, float32; batch {b} x {t}-token prompts, {new} greedy new tokens; '
          f'jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} '
          f'({torch.get_num_threads()} threads), transformers {transformers.__version__}')
    prompts_BxT = np.random.default_rng(0).integers(3, SHAPE['vocab_size'], (b, t))
    prompts = prompts_BxT.tolist()

    def run_ours():
        return ours.generate(prompts, new)

    def run_hf():
        with torch.no_grad():
            out = ref.generate(torch.from_numpy(prompts_BxT), attention_mask=torch.ones(b, t),
                               do_sample=False, max_new_tokens=new, min_new_tokens=new)
        return out[:, t:].tolist()

    start = time.perf_counter()
    ours_tokens = run_ours()
    print(f'compile + first run (ours): {time.perf_counter() - start:.1f} s')
    hf_tokens = run_hf()
    times = {'ours': [], 'hf': []}
    cpu = {'ours': [], 'hf': []}
    for _ in range(args.repeats):
        for name, fn in (('ours', run_ours), ('hf', run_hf)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    rate = {k: b * new / statistics.median(v) for k, v in times.items()}
    cpu_rate = {k: b * new / statistics.median(v) for k, v in cpu.items()}
    for name in ('ours', 'hf'):
        print(f'{name:>4}: median {statistics.median(times[name]):.3f} s '
              f'(min {min(times[name]):.3f}) -> {rate[name]:,.0f} new tokens/s; '
              f'{cpu_rate[name]:,.0f} new tokens per CPU-second')
    print(f'ratio ours / hf: {rate["ours"] / rate["hf"]:.2f}x wall (target >= 3x), '
          f'{cpu_rate["ours"] / cpu_rate["hf"]:.2f}x per CPU-second')
    same = sum(a == h for a, h in zip(ours_tokens, hf_tokens))
    print(f'identical greedy rows: {same}/{b}')
    prefill_rate, cache = time_prefill(ours, prompts_BxT, new, args.repeats)
    print(f'prefill: {prefill_rate:,.0f} prompt tokens/s')
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
    slots = b * cache['k'].shape[2]
    expected = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(
        cfg.compute_dtype).itemsize
    print(f'KV cache: {cache_bytes / slots:,.0f} bytes per token (2 x {cfg.num_layers} layers x '
          f'{cfg.num_kv_heads} kv heads x {cfg.head_dim} head_dim x 4 bytes = {expected:,}); '
          f'model_lib.cache_bytes_per_token = {model_lib.cache_bytes_per_token(cfg):,}')
    assert cache_bytes / slots == expected == model_lib.cache_bytes_per_token(cfg)
    memory_floor(cfg, cache['k'].shape[2] * b * expected, b, new, b * t / prefill_rate,
                 rate['hf'])


def memory_floor(cfg: model_lib.LlamaConfig, cache_bytes: int, batch: int, new: int,
                 prefill_s: float, hf_rate: float) -> None:
    """The bandwidth bound: a decode step reads every layer's weights, the output head and the
    cache once; at the machine's measured read bandwidth (all cores reading) that takes at least
    this long, and the measured prefill comes on top."""
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    weight_bytes = (cfg.num_params() - cfg.vocab_size * cfg.hidden_size) * itemsize
    threads = os.cpu_count() or 1
    big_WxN = np.ones((threads, 2 ** 26 // threads), np.float32)     # 256 MB: past any cache
    times = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:     # numpy's sum drops the GIL
        for _ in range(5):
            start = time.perf_counter()
            list(pool.map(np.sum, big_WxN))
            times.append(time.perf_counter() - start)
    bandwidth = big_WxN.nbytes / min(times)
    step_s = (weight_bytes + cache_bytes) / bandwidth
    best = batch * new / (prefill_s + (new - 1) * step_s)
    print(f'memory bound: a decode step reads {weight_bytes / 1e6:.0f} MB of weights (all but '
          f'the embedding) + {cache_bytes / 1e6:.1f} MB of cache; read bandwidth ({threads} '
          f'threads summing 256 MB, best of 5) {bandwidth / 1e9:.1f} GB/s -> at least '
          f'{step_s * 1e3:.1f} ms a step; with the measured prefill at most {best:,.0f} new '
          f'tokens/s = {best / hf_rate:.2f}x HF')

if __name__ == '__main__':
    main()
