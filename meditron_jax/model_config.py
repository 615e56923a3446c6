"""The model's shape and numerics: ``LlamaConfig`` (its fields are also the ``model.*`` config
keys) and the named presets. The architecture itself is in model.py, which re-exports these."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'save_dots': jax.checkpoint_policies.dots_saveable,
    'save_dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLEMENTATIONS = ('xla', 'cudnn', 'splash')


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Model shape and numerics. Field names are also the ``model.*`` config keys."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    mlp_dim: int = 11008
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    init_std: float = 0.02
    param_dtype: str = 'float32'      # master weights
    compute_dtype: str = 'float32'    # matmuls and activations; 'bfloat16' for real runs
    scan_layers: bool = True          # one compiled block over stacked parameters
    scan_unroll: int = 0              # scanned layers a loop iteration runs; 0: model.scan_unroll
                                      # chooses (no loop on XLA:CPU up to 16 layers, else 1)
    remat: str = 'none'               # one of REMAT_POLICIES
    attention: str = 'xla'            # 'xla' everywhere, 'cudnn' fused flash attention on GPU,
                                      # 'splash' the Pallas flash kernel on TPU (splash.py)

    def __post_init__(self):
        errors = []
        for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
                     'mlp_dim', 'max_seq_len'):
            if getattr(self, name) <= 0:
                errors.append(f'{name}={getattr(self, name)} must be positive')
        if self.num_heads > 0 and self.hidden_size % self.num_heads:
            errors.append(f'num_heads={self.num_heads} does not divide '
                          f'hidden_size={self.hidden_size}')
        if self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads:
            errors.append(f'num_kv_heads={self.num_kv_heads} does not divide '
                          f'num_heads={self.num_heads}')
        if self.num_heads > 0 and (self.hidden_size // self.num_heads) % 2:
            errors.append(f'head_dim={self.hidden_size // self.num_heads} must be even for RoPE')
        if self.scan_unroll < 0:
            errors.append(f'scan_unroll={self.scan_unroll} must be >= 0 (0: chosen per platform)')
        if self.remat not in REMAT_POLICIES:
            errors.append(f'remat={self.remat!r}, expected one of {sorted(REMAT_POLICIES)}')
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            errors.append(f'attention={self.attention!r}, expected one of '
                          f'{ATTENTION_IMPLEMENTATIONS}')
        for name in ('param_dtype', 'compute_dtype'):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                errors.append(f'{name}={getattr(self, name)!r} is not a dtype')
        if errors:
            raise ValueError('invalid model config: ' + '; '.join(errors))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> 'LlamaConfig':
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Exact parameter count (untied embedding and head, as Llama-2)."""
        d, h, f = self.hidden_size, self.head_dim, self.mlp_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        return self.num_layers * per_layer + 2 * self.vocab_size * d + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul params + causal attention.

        The embedding lookup is not a matmul and is left out; attention scores and values cost
        2 * 2 * T * D per layer forward at full context, halved for causal masking (PaLM's count
        without the halving counts it twice)."""
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size
        attn = 6 * self.num_layers * seq_len * self.hidden_size  # 3 x (2 x 2 x T x D) / 2
        return 6.0 * matmul_params + attn


PRESETS: dict[str, LlamaConfig] = {
    'llama2_7b': LlamaConfig(),
    'llama2_13b': LlamaConfig(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                              mlp_dim=13824),
    'llama2_70b': LlamaConfig(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                              mlp_dim=28672),
    # ~100M parameters: the CPU benchmark size.
    'llama_100m': LlamaConfig(vocab_size=32000, hidden_size=768, num_layers=10, num_heads=12,
                              num_kv_heads=4, mlp_dim=2048, max_seq_len=1024),
    # The debug run: trains in minutes on 2 CPU cores.
    'debug': LlamaConfig(vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4,
                         num_kv_heads=2, mlp_dim=384, max_seq_len=512),
    # Unit tests: every dimension divisible by 8 devices' worth of sharding.
    'tiny': LlamaConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=8,
                        num_kv_heads=4, mlp_dim=128, max_seq_len=64),
}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise KeyError(f'unknown model preset {name!r}; known: {sorted(PRESETS)}')
    return PRESETS[name].replace(**overrides)
