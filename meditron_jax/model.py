"""Llama-2 in Flax linen: config and presets, RMSNorm, RoPE, GQA attention, SwiGLU, scanned stack.

Why linen: its ``nn.scan``, ``nn.remat`` and logical-partitioning metadata are mature, and its
parameters are plain nested dicts of arrays, which orbax, optax and the torch converters handle
with no adapter. We run it on ``AxisType.Auto`` meshes (see sharding.py), where linen works.

Parameter scheme (the one layout shared by the model, the sharding rules, checkpoints and both
converters). Shapes with L layers, D hidden, N query heads, K kv heads, H head dim, F MLP, V vocab;
logical axis names in brackets:

    embed/embedding            (V, D)        [vocab, embed]
    layers/attn_norm/scale     (L, D)        [layers, norm]
    layers/attn/q/kernel       (L, D, N, H)  [layers, embed, heads, head_dim]
    layers/attn/k/kernel       (L, D, K, H)  [layers, embed, kv_heads, head_dim]
    layers/attn/v/kernel       (L, D, K, H)  [layers, embed, kv_heads, head_dim]
    layers/attn/o/kernel       (L, N, H, D)  [layers, heads, head_dim, embed]
    layers/mlp_norm/scale      (L, D)        [layers, norm]
    layers/mlp/gate/kernel     (L, D, F)     [layers, embed, mlp]
    layers/mlp/up/kernel       (L, D, F)     [layers, embed, mlp]
    layers/mlp/down/kernel     (L, F, D)     [layers, mlp, embed]
    final_norm/scale           (D,)          [norm]
    lm_head/kernel             (D, V)        [embed, vocab]

This stacked layout is canonical (checkpoints, converters). With ``scan_layers=False`` the model
keeps one subtree per layer (``layers_0`` ... ``layers_{L-1}``, same leaves without the L axis);
``to_layout`` converts between the two. q and k use Hugging Face's rotate-half RoPE layout: a HF
``q_proj.weight`` (N*H, D) is ``kernel.reshape(D, N*H).T``; Meta's interleaved layout is permuted
by the converters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from meditron_jax import sharding
# The parameter-free functions (the einsum, RMS norm, RoPE, SwiGLU) live in layers.py.
from meditron_jax.layers import (  # noqa: F401
    contract, contract_shared, rms_norm, rope, swiglu, swiglu_down)
# Attention (implementations, the platform choice) lives in attention.py; these stay model names.
from meditron_jax.attention import (  # noqa: F401
    attention, cached_attention, compile_platform, current_platform, resolve_attention,
    resolve_config_attention, step_attention)
# The loss lives in loss.py; model.cross_entropy stays a name to use.
from meditron_jax.loss import cross_entropy  # noqa: F401
# The shape and presets live in model_config.py; model.LlamaConfig etc. stay the names to use.
from meditron_jax.model_config import (  # noqa: F401
    ATTENTION_IMPLEMENTATIONS, PRESETS, REMAT_POLICIES, LlamaConfig, preset)


Array = jax.Array
Params = dict[str, Any]

# --------------------------------------------------------------------------------- layers


def _param(module: nn.Module, name: str, shape, names, init, cfg: LlamaConfig) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, names), shape,
                        jnp.dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD: Array) -> Array:
        scale_D = _param(self, 'scale', (x_BxTxD.shape[-1],), ('norm',),
                         nn.initializers.ones, self.cfg)
        return rms_norm(x_BxTxD, scale_D, self.cfg.rms_eps, jnp.dtype(self.cfg.compute_dtype))


class Weight(nn.Module):
    """A bare weight (the embedding table, the output head, kernels applied by a layers.py
    function), normal(init_std) initialised."""
    cfg: LlamaConfig
    shape: tuple[int, ...]
    names: tuple[str, ...]
    param_name: str

    @nn.compact
    def __call__(self) -> Array:
        return _param(self, self.param_name, self.shape, self.names,
                      nn.initializers.normal(self.cfg.init_std), self.cfg)


class Einsum(nn.Module):
    """A bias-free linear map written as one einsum, computing in cfg.compute_dtype."""
    cfg: LlamaConfig
    equation: str
    shape: tuple[int, ...]
    names: tuple[str, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = _param(self, 'kernel', self.shape, self.names,
                        nn.initializers.normal(self.cfg.init_std), self.cfg)
        dtype = jnp.dtype(self.cfg.compute_dtype)
        return contract(self.equation, x.astype(dtype), kernel.astype(dtype))


# The KV cache: {'k', 'v'}, each (layers, batch, cache length, kv heads, head dim) in the compute
# dtype, K kv heads (never repeated to N). Sharded like the activations.
CACHE_AXES = ('layers', 'batch', 'length', 'act_kv_heads', None)
Cache = dict[str, Array]


def write_cache(cache_BxSxKxH: Array, new_BxTxKxH: Array, positions_BxT: Array) -> Array:
    """Row b's new entries go to the slots of their positions (per row: prompts of unequal
    lengths decode at different positions)."""
    rows_Bx1 = jnp.arange(cache_BxSxKxH.shape[0])[:, None]
    out = cache_BxSxKxH.at[rows_Bx1, positions_BxT].set(
        new_BxTxKxH.astype(cache_BxSxKxH.dtype), mode='drop')
    return sharding.constrain(out, CACHE_AXES[1:])


# The decode loop's form of the cache (``step_cache``): one {'k_BxKxSxH', 'v_BxKxSxH'} dict a
# layer, head-major, so that a decode step reads each layer's keys and values in the layout its
# attention contractions want (with the (B, S, K, H) layout XLA:CPU transposed the whole cache,
# every layer, every step) and writes one slot a row in place (no stacking across layers).
STEP_CACHE_AXES = ('batch', 'act_kv_heads', 'length', None)


def step_cache(cache: Cache) -> list[Cache]:
    """The stacked cache (``init_cache``'s layout) -> the decode loop's per-layer, head-major
    form, which ``Llama`` reads and returns when its layers are unscanned."""
    heads = lambda a: sharding.constrain(jnp.swapaxes(a, 1, 2), STEP_CACHE_AXES)
    return [dict(k_BxKxSxH=heads(cache['k'][i]), v_BxKxSxH=heads(cache['v'][i]))
            for i in range(cache['k'].shape[0])]


def write_step_cache(cache_BxKxSxH: Array, new_BxTxKxH: Array, positions_BxT: Array) -> Array:
    """write_cache for the head-major form."""
    rows_Bx1 = jnp.arange(cache_BxKxSxH.shape[0])[:, None]
    out = cache_BxKxSxH.at[rows_Bx1, :, positions_BxT].set(
        new_BxTxKxH.astype(cache_BxKxSxH.dtype), mode='drop')
    return sharding.constrain(out, STEP_CACHE_AXES)


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache: Cache | None = None):
        """-> (output, the layer's cache with this call's keys and values written, or None)."""
        c = self.cfg
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        dtype = jnp.dtype(c.compute_dtype)
        kernels = [Weight(c, (d, heads, h), ('embed', axis, 'head_dim'), 'kernel', name=name)()
                   .astype(dtype) for name, heads, axis in
                   (('q', n, 'heads'), ('k', k, 'kv_heads'), ('v', k, 'kv_heads'))]
        # q, k and v from one flattened input (on CPU one product): layers.contract_shared.
        q, kk, v = (y.reshape(*x_BxTxD.shape[:2], *y.shape[1:]) for y in contract_shared(
            x_BxTxD.reshape(-1, d).astype(dtype), kernels))
        q = sharding.constrain(rope(q, positions_BxT, c.rope_theta, c.max_seq_len),
                               ('batch', 'length', 'act_heads', None))
        kk = sharding.constrain(rope(kk, positions_BxT, c.rope_theta, c.max_seq_len),
                                ('batch', 'length', 'act_kv_heads', None))
        if cache is None:
            out_BxTxNxH = attention(q, kk, v, segment_ids_BxT, c.attention)
        elif 'k_BxKxSxH' in cache:
            cache = dict(k_BxKxSxH=write_step_cache(cache['k_BxKxSxH'], kk, positions_BxT),
                         v_BxKxSxH=write_step_cache(cache['v_BxKxSxH'], v, positions_BxT))
            out_BxTxNxH = step_attention(q, cache['k_BxKxSxH'], cache['v_BxKxSxH'],
                                         positions_BxT)
        else:
            cache = dict(k=write_cache(cache['k'], kk, positions_BxT),
                         v=write_cache(cache['v'], v, positions_BxT))
            out_BxTxNxH = cached_attention(q, cache['k'], cache['v'], positions_BxT, c.attention)
        return Einsum(c, 'btnh,nhd->btd', (n, h, d), ('heads', 'head_dim', 'embed'),
                      name='o')(out_BxTxNxH), cache


class MLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.cfg
        d, f = c.hidden_size, c.mlp_dim
        # One flattened input for both: each contract's own flattening was a residual of its own.
        x_ZxD = x_BxTxD.reshape(-1, d)
        gate, up = (Einsum(c, 'zd,df->zf', (d, f), ('embed', 'mlp'), name=name)(x_ZxD)
                    .reshape(*x_BxTxD.shape[:2], f) for name in ('gate', 'up'))
        # down(swiglu(gate, up)) as one function whose backward recomputes swiglu's output
        # (layers.swiglu_down): saved, it was a (tokens, F) residual a layer.
        down = Weight(c, (f, d), ('mlp', 'embed'), 'kernel', name='down')()
        return swiglu_down(gate, up, down.astype(jnp.dtype(c.compute_dtype)))


# XLA:CPU's loop over the scanned layers stacks every saved residual into (L, ...) buffers
# (zero-filled, each layer's copied in by a dynamic-update-slice, copied out by a dynamic-slice:
# a dot cannot write into a slice); unrolled, XLA folds the stacking's slice(concatenate) away.
# Compile time grows with the layers unrolled, so only up to this many.
CPU_UNROLL_MAX_LAYERS = 16


def scan_unroll(cfg: LlamaConfig) -> int:
    """Layers one iteration of the scanned stack's loop runs (``cfg.num_layers``: no loop).

    ``cfg.scan_unroll`` when set; else all of them on XLA:CPU for up to CPU_UNROLL_MAX_LAYERS
    layers (-3.8% of the step at the bench's small shape, -3.4% at llama_100m; what is left
    against unscanned layers is slicing the stacked parameters), else 1 (GPU and TPU programs
    keep their loop). Decided when tracing, from ``current_platform()`` as the attention choice
    is: the program's structure differs, so a platform_dependent branch would trace both."""
    if cfg.scan_unroll:
        return min(cfg.scan_unroll, cfg.num_layers)
    if current_platform() == 'cpu' and cfg.num_layers <= CPU_UNROLL_MAX_LAYERS:
        return cfg.num_layers
    return 1


class Block(nn.Module):
    """Pre-norm decoder block. Returns (x, layer cache or None) so that nn.scan carries x and
    stacks the per-layer caches on the layers axis."""
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache: Cache | None = None):
        attn_out, cache = Attention(self.cfg, name='attn')(
            RMSNorm(self.cfg, name='attn_norm')(x_BxTxD), positions_BxT, segment_ids_BxT, cache)
        x = x_BxTxD + attn_out
        x = x + MLP(self.cfg, name='mlp')(RMSNorm(self.cfg, name='mlp_norm')(x))
        return sharding.constrain(x, ('batch', 'length', 'act_embed')), cache


class Llama(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens_BxT: Array, positions_BxT: Array | None = None,
                 segment_ids_BxT: Array | None = None, cache: Cache | None = None,
                 logits_at_B: Array | None = None, hidden_only: bool = False):
        """Token ids -> float32 logits. Positions default to 0..T-1 (one document a row).

        ``hidden_only``: the final-normed hidden states (B, T, D) in the compute dtype instead of
        logits (training applies the head inside the loss, loss.head_cross_entropy).

        Decoding: with a ``cache`` (``init_cache``), each token's keys and values are written to
        the slot of its position and attention reads the cache; returns (logits, new cache).
        With unscanned layers the cache may also be ``step_cache``'s per-layer list (the decode
        loop's form), returned in that form.
        ``logits_at_B`` computes the logits of one token a row only (B, 1, V): a prefill needs
        just each prompt's last."""
        c = self.cfg
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
        embedding_VxD = Weight(c, (c.vocab_size, c.hidden_size), ('vocab', 'embed'),
                               'embedding', name='embed')()
        # All-gather the table over fsdp first (as FSDP does for every weight before use), keep
        # vocab split over tensor: the gather is then a local masked lookup plus an all-reduce,
        # where a table split on both axes made XLA rebuild the whole table on every device.
        embedding_VxD = sharding.constrain(embedding_VxD, ('vocab', None))
        x = jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(jnp.dtype(c.compute_dtype))
        x = sharding.constrain(x, ('batch', 'length', 'act_embed'))

        block = Block
        unroll = scan_unroll(c) if c.scan_layers else 1
        if c.remat != 'none':
            # Outside a loop XLA's CSE would merge the recomputed forward with the first one.
            looped = c.scan_layers and unroll < c.num_layers
            block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not looped)
        if c.scan_layers:
            stack = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                            in_axes=(nn.broadcast, nn.broadcast, 0), length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: 'layers'}, unroll=unroll)
            x, cache = stack(c, name='layers')(x, positions_BxT, segment_ids_BxT, cache)
        else:
            per_layer = isinstance(cache, (list, tuple))
            layer_caches = []
            for i in range(c.num_layers):
                layer_cache = cache[i] if per_layer else (
                    None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache))
                x, layer_cache = block(c, name=f'layers_{i}')(
                    x, positions_BxT, segment_ids_BxT, layer_cache)
                layer_caches.append(layer_cache)
            if per_layer:
                cache = layer_caches
            elif cache is not None:
                cache = jax.tree.map(lambda *xs: jnp.stack(xs), *layer_caches)

        if logits_at_B is not None:
            x = jnp.take_along_axis(x, logits_at_B[:, None, None], axis=1)
        x = RMSNorm(c, name='final_norm')(x)
        if hidden_only:
            return sharding.constrain(x, ('batch', 'length', 'act_embed'))
        head_DxV = Weight(c, (c.hidden_size, c.vocab_size), ('embed', 'vocab'), 'kernel',
                          name='lm_head')()
        dtype = jnp.dtype(c.compute_dtype)
        logits = jnp.einsum('btd,dv->btv', x.astype(dtype), head_DxV.astype(dtype),
                            preferred_element_type=jnp.float32)
        logits = sharding.constrain(logits, ('batch', 'length', 'act_vocab'))
        if cache is None:
            return logits
        axes = STEP_CACHE_AXES if isinstance(cache, list) else CACHE_AXES
        return logits, jax.tree.map(lambda a: sharding.constrain(a, axes), cache)


# ------------------------------------------------------------------- functional interface


def forward(params: Params, cfg: LlamaConfig, tokens_BxT: Array, positions_BxT=None,
            segment_ids_BxT=None) -> Array:
    """Pure forward pass: params in the layout ``cfg.scan_layers`` says -> float32 logits."""
    return Llama(cfg).apply({'params': params}, tokens_BxT, positions_BxT, segment_ids_BxT)


def forward_hidden(params: Params, cfg: LlamaConfig, tokens_BxT: Array, positions_BxT=None,
                   segment_ids_BxT=None) -> Array:
    """forward without the output head: final-normed hidden states (B, T, D)."""
    return Llama(cfg).apply({'params': params}, tokens_BxT, positions_BxT, segment_ids_BxT,
                            hidden_only=True)


def init_cache(cfg: LlamaConfig, batch: int, length: int) -> Cache:
    """An empty KV cache of ``length`` slots a row, in the compute dtype."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    zeros = lambda: sharding.constrain(jnp.zeros(shape, jnp.dtype(cfg.compute_dtype)), CACHE_AXES)
    return dict(k=zeros(), v=zeros())


def cache_bytes_per_token(cfg: LlamaConfig) -> int:
    """Bytes one token takes in the cache: 2 (k and v) x layers x kv heads x head dim x dtype."""
    return (2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
            * jnp.dtype(cfg.compute_dtype).itemsize)


def forward_cached(params: Params, cfg: LlamaConfig, tokens_BxT: Array, positions_BxT: Array,
                   cache: Cache, logits_at_B: Array | None = None) -> tuple[Array, Cache]:
    """Decode-mode forward: (float32 logits, the cache with these tokens' keys and values)."""
    return Llama(cfg).apply({'params': params}, tokens_BxT, positions_BxT, None, cache,
                            logits_at_B)


def _boxed_init(cfg: LlamaConfig, rng: Array):
    tokens = jnp.zeros((1, 8), jnp.int32)
    # The parameters do not depend on the attention kernel; splash needs 128-token blocks.
    return Llama(cfg.replace(attention='xla')).init(rng, tokens)['params']


def param_specs(cfg: LlamaConfig) -> tuple[Any, Any]:
    """(abstract params as ShapeDtypeStructs, logical axis names per leaf), with no allocation."""
    boxed = jax.eval_shape(lambda rng: _boxed_init(cfg, rng), jax.random.key(0))
    names = jax.tree.map(lambda b: tuple(b.names), boxed,
                         is_leaf=lambda b: isinstance(b, nn.Partitioned))
    return nn.meta.unbox(boxed), names


def param_shardings(cfg: LlamaConfig, mesh) -> Any:
    """NamedSharding per parameter from the logical-axis table; checks every dim divides."""
    abstract, names = param_specs(cfg)
    return sharding.tree_shardings(names, abstract, mesh)


def init_params(cfg: LlamaConfig, mesh, seed: int = 0) -> Params:
    """Random parameters, created already sharded (never whole on one device)."""
    shardings = param_shardings(cfg, mesh)
    init = jax.jit(lambda rng: nn.meta.unbox(_boxed_init(cfg, rng)), out_shardings=shardings)
    return init(jax.random.key(seed))


def stack_layers(params: Params, num_layers: int) -> Params:
    """layers_0..layers_{L-1} -> one 'layers' subtree with a leading L axis."""
    per_layer = [params[f'layers_{i}'] for i in range(num_layers)]
    out = {k: v for k, v in params.items() if not k.startswith('layers_')}
    out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return out


def unstack_layers(params: Params, num_layers: int) -> Params:
    """The inverse of stack_layers."""
    out = {k: v for k, v in params.items() if k != 'layers'}
    for i in range(num_layers):
        out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
    return out


def to_layout(params: Params, cfg: LlamaConfig) -> Params:
    """Params in either layout -> the layout ``cfg.scan_layers`` needs."""
    stacked = 'layers' in params
    if cfg.scan_layers and not stacked:
        return stack_layers(params, cfg.num_layers)
    if not cfg.scan_layers and stacked:
        return unstack_layers(params, cfg.num_layers)
    return params
