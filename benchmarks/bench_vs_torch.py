"""Our compiled train step vs Hugging Face torch's eager step, on this CPU, in one process.

    python benchmarks/bench_vs_torch.py          # both shapes, both layer forms, ~8 min on 2 cores
    python benchmarks/bench_vs_torch.py --shapes small --layers unscanned --steps 8

Each shape runs the same float32 model both ways, from the same initial weights, on the same
batch (batch x seq_len tokens, one document a row): ours is the step ``meditron-train`` runs
(``step.train_step`` jitted by ``step.compile_steps`` with its shardings and donation, AdamW +
global-norm clipping 1.0 from ``optim.make_optimizer``, one device), with the layers scanned
(``model.scan_layers=True``, the default; on a CPU with no loop, see ``model.scan_unroll``) and
unscanned (``--config.model.scan_layers=false``) as two rows; torch's is
``transformers.LlamaForCausalLM`` (sdpa attention) + ``F.cross_entropy`` +
``clip_grad_norm_(1.0)`` + ``torch.optim.AdamW`` (same betas, eps and weight decay, no decay on
norm scales). The two steps alternate, one each per round, so the machine's load hits both;
figures are medians over rounds after the warm-up. Per-CPU-second figures (process CPU time)
are printed too, since other work on the machine skews wall time. Model FLOP/s counts
``LlamaConfig.flops_per_token`` (6 x matmul parameters + causal attention) and is compared with
the XLA float32 GEMM peak measured in the same run (a 2048^3 matmul).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import configs.debug  # noqa: E402
from configs import base  # noqa: E402
from meditron_jax import host_memory, model, optim, sharding, step  # noqa: E402

SHAPES = {
    # The issue's ~32M Llama.
    'small': dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                  mlp_dim=1408),
    'llama_100m': {},
}


def config_for(shape: str, batch: int, seq_len: int, scan_layers: bool = True):
    c = configs.debug.get_config()
    preset = 'debug' if shape == 'small' else shape
    c.model = base.model_config(preset)
    c.model.update(dict(SHAPES[shape], max_seq_len=max(seq_len, 1024),
                        param_dtype='float32', compute_dtype='float32',
                        scan_layers=scan_layers))
    c.mesh.update(dict(data=1, fsdp=1, tensor=1))
    c.data.seq_len, c.data.global_batch_size = seq_len, batch
    c.optim.update(dict(lr_peak=3e-4, lr_min=3e-5, warmup_steps=0, b1=0.9, b2=0.95, eps=1e-5,
                        weight_decay=0.1, clip_norm=1.0, grad_accum_steps=1))
    return c


def gemm_peak(n: int = 2048, reps: int = 8) -> tuple[float, float]:
    """(XLA, torch) float32 GEMM FLOP/s: best of reps of an n^3 matmul."""
    import torch
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    ta = torch.ones(n, n)
    ta @ ta
    xla, tor = [], []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        xla.append(time.perf_counter() - t)
        t = time.perf_counter()
        ta @ ta
        tor.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(xla), 2 * n ** 3 / min(tor)


def params_to_hf(params, cfg) -> dict:
    """Our stacked params -> a LlamaForCausalLM state dict (torch Linear weights are (out, in))."""
    import torch
    d = cfg.hidden_size
    p = jax.tree.map(np.asarray, model.to_layout(params, cfg.replace(scan_layers=True)))
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # a writable copy
    out = {'model.embed_tokens.weight': t(p['embed']['embedding']),
           'model.norm.weight': t(p['final_norm']['scale']),
           'lm_head.weight': t(p['lm_head']['kernel'].T)}
    layers = p['layers']
    for i in range(cfg.num_layers):
        pre = f'model.layers.{i}.'
        attn, mlp = layers['attn'], layers['mlp']
        out[pre + 'input_layernorm.weight'] = t(layers['attn_norm']['scale'][i])
        out[pre + 'post_attention_layernorm.weight'] = t(layers['mlp_norm']['scale'][i])
        for name in ('q', 'k', 'v'):
            out[pre + f'self_attn.{name}_proj.weight'] = t(attn[name]['kernel'][i].reshape(d, -1).T)
        out[pre + 'self_attn.o_proj.weight'] = t(attn['o']['kernel'][i].reshape(-1, d).T)
        for name in ('gate', 'up', 'down'):
            out[pre + f'mlp.{name}_proj.weight'] = t(mlp[name]['kernel'][i].T)
    return out


def torch_step_fn(cfg, params, c):
    import torch
    import torch.nn.functional as F
    import transformers
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation='sdpa',
                                                    dtype=torch.float32)
    hf.load_state_dict(params_to_hf(params, cfg), strict=True)
    hf.train()
    decay = [p for n, p in hf.named_parameters() if not n.endswith('norm.weight')]
    no_decay = [p for n, p in hf.named_parameters() if n.endswith('norm.weight')]
    o = c.optim
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=o.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)],
                            lr=o.lr_peak, betas=(o.b1, o.b2), eps=o.eps)

    def run(tokens_np):
        tokens = torch.from_numpy(tokens_np).long()
        opt.zero_grad(set_to_none=True)
        logits = hf(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), o.clip_norm)
        opt.step()
        return loss.item()
    return run


def timed(fn):
    w, cpu = time.perf_counter(), time.process_time()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return out, time.perf_counter() - w, time.process_time() - cpu, faults


def run_shape(shape: str, batch: int, seq_len: int, steps: int, warmup: int, peak: float,
              scan_layers: bool = True):
    c = config_for(shape, batch, seq_len, scan_layers)
    cfg = model.LlamaConfig(**c.model.to_dict())
    mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
    optimizer = optim.make_optimizer(c.optim, 1000)
    _, shardings = step.abstract_state(cfg, optimizer, mesh)
    params = model.init_params(cfg, mesh)
    torch_run = torch_step_fn(cfg, params, c)  # copies the initial weights before donation
    state = step.fresh_state(params, optimizer, shardings)
    step_fn, _ = step.compile_steps(c, cfg, optimizer, optim.lr_schedule(c.optim, 1000),
                                    shardings, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1), dtype=np.int32)
    batch_np = dict(tokens=tokens, segment_ids=np.ones_like(tokens),
                    positions=np.broadcast_to(np.arange(seq_len + 1, dtype=np.int32),
                                              tokens.shape).copy(),
                    loss_mask=np.ones_like(tokens))
    bs = sharding.batch_sharding(mesh)
    device_batch = {k: jax.device_put(v, bs) for k, v in batch_np.items()}

    def ours():
        nonlocal state
        with jax.set_mesh(mesh):
            state, m = step_fn(state, device_batch)
        return float(jax.block_until_ready(m)['loss'])

    t0 = time.perf_counter()
    first_ours = ours()
    compile_s = time.perf_counter() - t0
    first_torch = torch_run(tokens)
    load_start = os.getloadavg()
    rows = []
    for i in range(warmup + steps):
        _, w_j, c_j, f_j = timed(ours)
        _, w_t, c_t, f_t = timed(lambda: torch_run(tokens))
        if i >= warmup:
            rows.append((w_j, c_j, w_t, c_t, f_j, f_t))
    load_end = os.getloadavg()
    med = lambda k: statistics.median(r[k] for r in rows)
    n_tok = batch * seq_len
    flops = cfg.flops_per_token(seq_len) * n_tok
    return dict(shape=shape, layers='scanned' if scan_layers else 'unscanned',
                params_m=cfg.num_params() / 1e6, tokens=n_tok,
                ours_s=med(0), ours_cpu_s=med(1), torch_s=med(2), torch_cpu_s=med(3),
                ours_faults=med(4), torch_faults=med(5),
                first_loss_ours=first_ours, first_loss_torch=first_torch, compile_s=compile_s,
                flops=flops, peak=peak, load=(load_start, load_end))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--seq-len', type=int, default=256)
    parser.add_argument('--steps', type=int, default=6, help='timed rounds per shape')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--layers', nargs='+', default=['scanned', 'unscanned'],
                        choices=['scanned', 'unscanned'],
                        help="our model's layers: nn.scan over stacked params (the default "
                             "model.scan_layers=True) or a Python loop (scan_layers=False)")
    parser.add_argument('--torch-threads', type=int, default=os.cpu_count())
    args = parser.parse_args()
    # As meditron-train does for a CPU run, before anything starts the JAX backend; the torch
    # step shares the process and so the same malloc settings.
    kept = host_memory.configure_for_cpu_step()
    import torch
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)

    xla_peak, torch_peak = gemm_peak()
    print(f'float32 2048^3 GEMM: XLA {xla_peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f} '
          f'GFLOP/s; torch threads {torch.get_num_threads()}; XLA_FLAGS='
          f'{os.environ.get("XLA_FLAGS", "")!r}; freed host memory kept (host_memory): {kept}; '
          f'load {os.getloadavg()}')
    results = [run_shape(s, args.batch, args.seq_len, args.steps, args.warmup, xla_peak,
                         layers == 'scanned')
               for s in args.shapes for layers in args.layers]
    print('\n| shape | our layers | params | tokens/step | ours tokens/s | torch tokens/s | ratio | '
          'ours tok/CPU-s | torch tok/CPU-s | CPU ratio | ours model GFLOP/s | % of XLA GEMM '
          'peak | first loss ours / torch | load (start, end) |')
    print('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|')
    for r in results:
        n = r['tokens']
        print(f"| {r['shape']} | {r['layers']} | {r['params_m']:.1f}M | {n} | {n / r['ours_s']:,.0f} | "
              f"{n / r['torch_s']:,.0f} | **{r['torch_s'] / r['ours_s']:.2f}x** | "
              f"{n / r['ours_cpu_s']:,.0f} | {n / r['torch_cpu_s']:,.0f} | "
              f"{r['torch_cpu_s'] / r['ours_cpu_s']:.2f}x | {r['flops'] / r['ours_s'] / 1e9:.1f} | "
              f"{r['flops'] / r['ours_s'] / r['peak']:.0%} | "
              f"{r['first_loss_ours']:.5f} / {r['first_loss_torch']:.5f} | "
              f"{r['load'][0][0]:.1f}, {r['load'][1][0]:.1f} |")
    for r in results:
        print(f"{r['shape']} ({r['layers']}): median step ours {r['ours_s'] * 1e3:.0f} ms (CPU "
              f"{r['ours_cpu_s'] * 1e3:.0f} ms), torch {r['torch_s'] * 1e3:.0f} ms (CPU "
              f"{r['torch_cpu_s'] * 1e3:.0f} ms); our first call (compile + step) "
              f"{r['compile_s']:.1f} s; page faults a step ours {r['ours_faults']:,.0f}, torch "
              f"{r['torch_faults']:,.0f}")


if __name__ == '__main__':
    main()
