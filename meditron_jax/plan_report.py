"""meditron-plan's printed report of one plan (meditron_jax/plan.py measures, this says)."""

from __future__ import annotations

GiB = 2 ** 30


def report(plan, device_memory_gb: float, mfu: float) -> str:
    gib = lambda n: f'{n / GiB:8.2f} GiB' if n is not None else '     n/a    '
    tflop = lambda f: f'{f / 1e12:10.1f} TFLOP' if f is not None else '       n/a'
    fused = plan.hlo.fused_attention_calls
    lines = [
        f'target {plan.target} ({plan.compiler}, {plan.device_kind}): mesh {plan.mesh} = '
        f'{plan.num_devices} devices on {plan.hosts} host(s); '
        f'{plan.micro_batch_per_device:g} sequences per device per micro-batch; '
        f'remat={plan.remat}, attention={plan.attention}; compiled in {plan.compile_sec:.0f} s',
        '',
        'memory per device                  plan          analytic',
        f'  parameters               {gib(plan.param_bytes)}   {gib(plan.analytic_param_bytes)}',
        f'  optimizer state (Adam)   {gib(plan.opt_state_bytes)}   '
        f'{gib(plan.analytic_opt_state_bytes)}',
        f'  gradients                {gib(plan.grad_bytes)}   {gib(plan.analytic_param_bytes)}',
        f'  activations + temporaries{gib(plan.activation_bytes)}   '
        f'{gib(plan.residual_stream_bytes)}  (analytic: saved residual stream only)',
    ]
    if plan.attention == 'xla':
        lines.append(f'     of which one layer\'s XLA attention scores (b,N,T,T) f32: '
                     f'{plan.attention_scores_bytes / GiB:.2f} GiB (absent with a fused kernel)')
    lines += [
        f'  batch                    {gib(plan.batch_bytes)}',
        f'  {plan.compiler}: arguments {gib(plan.xla_argument_bytes)}, outputs '
        f'{gib(plan.xla_output_bytes)} (aliased {gib(plan.xla_alias_bytes)}), temporaries '
        f'{gib(plan.xla_temp_bytes)}' + (f', its own peak {gib(plan.xla_peak_bytes)}'
                                         if plan.xla_peak_bytes else ''),
        f'  estimated peak           {gib(plan.peak_bytes)}   of {device_memory_gb:g} GiB',
        '',
        'collectives per step per device (count, bytes of the whole buffers)',
        *(f'  {kind:15s}{c.count:8d}  {gib(c.bytes)}' for kind, c in plan.hlo.collectives.items()),
        'fused attention kernel: ' + (', '.join(f'{t} x{n}' for t, n in sorted(fused.items()))
                                       if fused else 'none in the program'),
        '',
        'FLOPs per device per step',
        f'  model (6N + attention, analytic){tflop(plan.model_flops_per_step)}',
        f'  XLA:CPU, extrapolated (incl. remat){tflop(plan.xla_flops_per_step)}',
        f'  {plan.compiler} cost_analysis raw   {tflop(plan.xla_flops_raw)}  '
        f'(loop bodies counted once)',
        '',
        f'at {mfu:.0%} MFU of {plan.peak_flops_per_device / 1e12:g} TFLOP/s per device: '
        f'{plan.step_time_sec(mfu):.2f} s a step, '
        f'{plan.tokens_per_sec(mfu):,.0f} tokens/s '
        f'({plan.tokens_per_step:,} tokens a step)',
    ]
    return '\n'.join(lines)
