"""meditron_jax: continued pretraining of Llama-2 on medical text, in JAX/Flax."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

__version__ = '0.1.0'


@dataclasses.dataclass
class Model:
    """Params + config, callable on token ids [B, T] -> float32 logits [B, T, V], and a
    generator (``generate`` on token ids, ``complete`` on text; see meditron_jax/generate.py).

    ``true_vocab_size`` is the tokenizer's size; logits past it belong to padding rows.
    ``tokenizer`` is a ``sentencepiece.SentencePieceProcessor`` when the checkpoint carries one;
    ``eos_id`` stops generation (the tokenizer's, else the imported config's); ``mesh`` is
    where the params live (None: one device).
    """
    config: Any            # model.LlamaConfig
    params: Any            # canonical stacked params (jax.Arrays)
    true_vocab_size: int
    tokenizer: Any = None
    eos_id: int | None = None
    mesh: Any = None

    def __post_init__(self):
        import jax
        from meditron_jax import model as model_lib
        cfg = self.config.replace(scan_layers=True)
        self._forward = jax.jit(lambda p, t: model_lib.forward(p, cfg, t))

    def __call__(self, tokens):
        import jax.numpy as jnp
        return self._forward(self.params, jnp.asarray(tokens, jnp.int32))

    def generate(self, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                 stop=None) -> list[list[int]]:
        """Lists of token ids (unequal lengths allowed) -> lists of new token ids, one per
        prompt. ``temperature=0`` is greedy; ``stop``: token ids and/or strings (strings need a
        tokenizer). The stopping token (EOS or a stop id) ends its list."""
        from meditron_jax import generate
        return generate.generate(self, prompts, max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, stop=stop)

    def complete(self, texts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                 stop=None) -> list[str]:
        """Texts (encoded with BOS by the tokenizer) -> the generated texts, without the
        stopping token and cut before the first stop string. Needs ``tokenizer``."""
        from meditron_jax import generate
        return generate.complete(self, texts, max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, stop=stop)


def load(path: str | os.PathLike, mesh=None) -> Model:
    """A params checkpoint (meditron-convert's output) or a training workdir (its latest
    complete step) as a Model.

    ``mesh``: place params with model.param_shardings on it (default: the first device).
    """
    model = _load(os.fspath(path), mesh)
    # The attention that runs where the params live (cudnn on gpu, splash on tpu), said once.
    import jax
    from meditron_jax import model as model_lib, sharding
    platform = jax.devices()[0].platform if mesh is None else sharding.mesh_platform(mesh)
    model.config = model.config.replace(attention=model_lib.resolve_attention(
        model.config.attention, model.config.compute_dtype, platform))
    return model


def _load(path: str, mesh) -> Model:
    from meditron_jax import params_checkpoint
    if params_checkpoint.is_params_checkpoint(path):
        params, cfg = params_checkpoint.load_params(path, mesh=mesh)
        meta = params_checkpoint.read_metadata(path)
        return _with_tokenizer(Model(config=cfg, params=params, mesh=mesh,
                                     true_vocab_size=meta['true_vocab_size'],
                                     eos_id=(meta.get('token_ids') or {}).get('eos_token_id')),
                               path)
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        return _load_workdir(path, mesh)
    raise FileNotFoundError(
        f'{path}: not a params checkpoint (no {params_checkpoint.META_FILE}) nor a training '
        f'workdir (no checkpoints/ with a complete step)')


def _load_workdir(workdir: str, mesh=None) -> Model:
    import jax
    from meditron_jax import checkpoint, model as model_lib, sharding
    _, config = checkpoint.read_config(workdir)
    cfg = model_lib.LlamaConfig(**config['model'])
    mesh = mesh or sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    abstract, _ = model_lib.param_specs(cfg)
    shardings = model_lib.param_shardings(cfg, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    _, params, _ = checkpoint.restore_params(workdir, target)
    params = model_lib.to_layout(params, cfg.replace(scan_layers=True))  # Model runs stacked
    from meditron_jax import params_checkpoint
    true_vocab = params_checkpoint.workdir_meta(workdir)[0]['true_vocab_size']
    return _with_tokenizer(Model(config=cfg, params=params, true_vocab_size=true_vocab,
                                 mesh=mesh), workdir)


def _with_tokenizer(model: Model, path: str) -> Model:
    """Attaches the checkpoint's SentencePiece tokenizer (and its EOS), when it has one."""
    from meditron_jax import params_checkpoint
    tokenizer_file = params_checkpoint.find_tokenizer(path)
    if tokenizer_file is not None:
        import sentencepiece as spm
        model.tokenizer = spm.SentencePieceProcessor(model_file=tokenizer_file)
        if model.tokenizer.eos_id() >= 0:
            model.eos_id = model.tokenizer.eos_id()
    return model
