"""Generation: a KV-cache decoder (prefill + one token a step) compiled once per shape bucket.

The core is pure: ``prefill`` runs the prompts through the model in one pass (writing the cache)
and picks each row's first token; ``step`` feeds each row's newest token at its own position and
picks the next; ``decode`` is both inside one jitted ``lax.while_loop`` that stops as soon as
every row has finished. A ``DecodeState`` pytree is all a step carries.

Batches of unequal prompts are right-padded: row b's token at position p lives in cache slot p,
and a query at position p attends to slots 0..p of its own row, so a row computes exactly what
it would alone (pad slots past a prompt are overwritten by its own new tokens before any query
can see them). Shapes are bucketed to powers of two (batch, prompt length, new tokens; the cache
length to a multiple of the prompt bucket), so a new prompt length rarely compiles anything.

Sampling (``temperature``, ``top_k``, ``top_p``) is a chain of small pure filters over float32
logits; padding-vocabulary logits (ids >= ``true_vocab_size``) are -inf first, so those ids are
never produced. Each row draws from its own key, ``fold_in(fold_in(key(seed), row), step)``:
a seed reproduces a sample whatever the batch it is in or the mesh it runs on.

Stopping: EOS and stop token ids on device; stop strings on the host, after decoding (a stop
string that is one piece of the tokenizer also stops on device). The stopping token is part of
the returned tokens, as in Hugging Face's ``generate``; ``complete`` drops it from the text.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import model as model_lib
from meditron_jax import sharding

Array = jax.Array


class GenerationError(ValueError):
    """Prompts or sampling settings that cannot be generated from."""


# -------------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Which filters run is static (part of the compile key); their values are traced."""
    greedy: bool
    use_top_k: bool
    use_top_p: bool


def mask_padding(logits_BxV: Array, true_vocab_size: int) -> Array:
    """-inf for the padding ids (>= true_vocab_size), which no tokenizer can decode."""
    ids_V = jnp.arange(logits_BxV.shape[-1])
    return jnp.where(ids_V < true_vocab_size, logits_BxV, -jnp.inf)


def top_k_filter(logits_BxV: Array, k: Array) -> Array:
    """Keeps the k largest logits of each row (ties with the k-th kept too), -inf elsewhere."""
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
    k = jnp.clip(k, 1, logits_BxV.shape[-1])
    kth_Bx1 = jnp.take_along_axis(sorted_BxV, jnp.broadcast_to(k - 1, logits_BxV.shape[:-1])
                                  [..., None], axis=-1)
    return jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)


def top_p_filter(logits_BxV: Array, p: Array) -> Array:
    """Nucleus: keeps the most likely ids whose probabilities first sum to at least p (the
    smallest such set, never empty), -inf elsewhere."""
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[..., ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_B = jnp.maximum(jnp.sum(mass_before_BxV < p, axis=-1), 1)
    last_Bx1 = jnp.take_along_axis(sorted_BxV, keep_B[..., None] - 1, axis=-1)
    return jnp.where(logits_BxV >= last_Bx1, logits_BxV, -jnp.inf)


def choose(logits_BxV: Array, keys_B: Array, sampling: Sampling, params: dict,
           true_vocab_size: int) -> Array:
    """The next token of each row: argmax (greedy) or a draw from the filtered distribution."""
    logits = mask_padding(logits_BxV.astype(jnp.float32), true_vocab_size)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / params['temperature']
    if sampling.use_top_k:
        logits = top_k_filter(logits, params['top_k'])
    if sampling.use_top_p:
        logits = top_p_filter(logits, params['top_p'])
    return jax.vmap(jax.random.categorical)(keys_B, logits).astype(jnp.int32)


def row_keys(seed: Array, row_ids_B: Array, step: Array) -> Array:
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), step))(row_ids_B)


# ---------------------------------------------------------------------------------- decoding


class DecodeState(flax.struct.PyTreeNode):
    cache: model_lib.Cache   # {'k', 'v'}: L x B x S x K x H
    last_B: Array            # each row's newest token: the next step's input
    position_B: Array        # its position (= its cache slot)
    out_BxN: Array           # new tokens so far (0 past each row's count)
    count_B: Array           # how many new tokens each row has
    done_B: Array            # finished: a stop token, max_new_tokens, or a padding row
    step: Array              # tokens chosen so far per live row (the key's step number)


@flax.struct.dataclass
class DecodeInputs:
    """Everything a decode reads besides the params and the state."""
    row_ids_B: Array         # the rows' indices in the caller's list (their sampling keys)
    stop_ids: Array          # EOS and stop ids, padded with -1
    max_new_tokens: Array
    seed: Array
    sample: dict             # temperature, top_k, top_p


def prefill(params, cfg: model_lib.LlamaConfig, prompts_BxT: Array, lengths_B: Array,
            live_B: Array, inputs: DecodeInputs, *, cache_len: int, out_len: int,
            sampling: Sampling, true_vocab_size: int) -> DecodeState:
    """Prompts (right-padded) -> the cache of every prompt token and each row's first token."""
    b, t = prompts_BxT.shape
    cache = model_lib.init_cache(cfg, b, cache_len)
    positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits_Bx1xV, cache = model_lib.forward_cached(params, cfg, prompts_BxT, positions_BxT, cache,
                                                   logits_at_B=lengths_B - 1)
    first_B = choose(logits_Bx1xV[:, 0], row_keys(inputs.seed, inputs.row_ids_B, 0), sampling,
                     inputs.sample, true_vocab_size)
    out_BxN = jnp.zeros((b, out_len), jnp.int32).at[:, 0].set(first_B)
    done_B = ~live_B | jnp.isin(first_B, inputs.stop_ids) | (inputs.max_new_tokens <= 1)
    return DecodeState(cache=cache, last_B=first_B, position_B=lengths_B, out_BxN=out_BxN,
                       count_B=jnp.ones((b,), jnp.int32), done_B=done_B,
                       step=jnp.ones((), jnp.int32))


def step(params, cfg: model_lib.LlamaConfig, state: DecodeState, inputs: DecodeInputs, *,
         sampling: Sampling, true_vocab_size: int) -> DecodeState:
    """One token for every unfinished row, reading and extending the cache."""
    b = state.last_B.shape[0]
    logits_Bx1xV, cache = model_lib.forward_cached(
        params, cfg, state.last_B[:, None], state.position_B[:, None], state.cache)
    next_B = choose(logits_Bx1xV[:, 0], row_keys(inputs.seed, inputs.row_ids_B, state.step),
                    sampling, inputs.sample, true_vocab_size)
    live_B = ~state.done_B
    next_B = jnp.where(live_B, next_B, 0)
    slot_B = jnp.where(live_B, state.count_B, state.out_BxN.shape[1])   # out of range: dropped
    out_BxN = state.out_BxN.at[jnp.arange(b), slot_B].set(next_B, mode='drop')
    count_B = state.count_B + live_B
    done_B = (state.done_B | jnp.isin(next_B, inputs.stop_ids)
              | (count_B >= inputs.max_new_tokens))
    return DecodeState(cache=cache, last_B=jnp.where(live_B, next_B, state.last_B),
                       position_B=state.position_B + live_B, out_BxN=out_BxN, count_B=count_B,
                       done_B=done_B, step=state.step + 1)


def decode(params, prompts_BxT: Array, lengths_B: Array, live_B: Array, inputs: DecodeInputs, *,
           cfg: model_lib.LlamaConfig, cache_len: int, out_len: int, sampling: Sampling,
           true_vocab_size: int) -> tuple[Array, Array]:
    """prefill, then ``step`` in a while_loop until every row is done: (new tokens, counts).

    The prefill runs the scanned stack and writes the stacked cache; the loop runs the unscanned
    stack over the layers' weights sliced out once here (not at every step, where XLA:CPU copied
    them: 128 MB a step for the benchmark model) and carries the cache in ``step_cache``'s
    per-layer, head-major form, each layer's buffer written in place. The price is a second copy
    of the layer weights while a generate call runs."""
    state = prefill(params, cfg, prompts_BxT, lengths_B, live_B, inputs, cache_len=cache_len,
                    out_len=out_len, sampling=sampling, true_vocab_size=true_vocab_size)
    step_cfg = cfg.replace(scan_layers=False)
    step_params = model_lib.unstack_layers(params, cfg.num_layers)
    state = state.replace(cache=model_lib.step_cache(state.cache))
    state = jax.lax.while_loop(
        lambda s: ~jnp.all(s.done_B),
        lambda s: step(step_params, step_cfg, s, inputs, sampling=sampling,
                       true_vocab_size=true_vocab_size),
        state)
    return state.out_BxN, state.count_B


@functools.lru_cache(maxsize=None)
def compiled_decode(cfg: model_lib.LlamaConfig, cache_len: int, out_len: int, sampling: Sampling,
                    true_vocab_size: int):
    """One jitted decode per static setting; jit's own cache keys the array shapes."""
    return jax.jit(functools.partial(decode, cfg=cfg, cache_len=cache_len, out_len=out_len,
                                     sampling=sampling, true_vocab_size=true_vocab_size))


# ------------------------------------------------------------------------------- the host side


def bucket(n: int, minimum: int = 1) -> int:
    """The power of two at or above n (and minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def check_settings(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any) -> None:
    problems = []
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        problems.append(f'max_new_tokens={max_new_tokens!r} must be an integer >= 1')
    number = lambda x: isinstance(x, (int, float, np.integer, np.floating))
    if not number(temperature) or not temperature >= 0:
        problems.append(f'temperature={temperature!r} must be >= 0 (0 = greedy)')
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        problems.append(f'top_k={top_k!r} must be an integer >= 0 (0 = no top-k filter)')
    if not number(top_p) or not 0 < top_p <= 1:
        problems.append(f'top_p={top_p!r} must be in (0, 1] (1 = no nucleus filter)')
    if problems:
        raise GenerationError('; '.join(problems))


def check_prompts(prompts: Any, max_new_tokens: int, max_seq_len: int,
                  true_vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError(f'prompts must be a non-empty list of lists of token ids, got '
                              f'{type(prompts).__name__}')
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not isinstance(p, (Sequence, np.ndarray)):
            raise GenerationError(f'prompt {i} is a {type(p).__name__}, expected a list of token '
                                  f'ids (use complete() for text)')
        ids = [int(t) for t in p]
        if not ids:
            raise GenerationError(f'prompt {i} is empty: it needs at least one token (e.g. BOS)')
        bad = [t for t in ids if not 0 <= t < true_vocab_size]
        if bad:
            raise GenerationError(f'prompt {i} holds token ids {bad[:5]} outside the vocabulary '
                                  f'0..{true_vocab_size - 1}')
        if len(ids) + max_new_tokens > max_seq_len:
            raise GenerationError(
                f'prompt {i} has {len(ids)} tokens: with max_new_tokens={max_new_tokens} that is '
                f'{len(ids) + max_new_tokens}, more than the model\'s max_seq_len={max_seq_len}')
        out.append(ids)
    return out


def split_stop(stop: Any, tokenizer, true_vocab_size: int) -> tuple[list[int], list[str]]:
    """``stop`` (None, a string, an id, or a list of both) -> (stop ids, stop strings)."""
    if stop is None:
        return [], []
    items = [stop] if isinstance(stop, (str, int, np.integer)) else list(stop)
    ids, strings = [], []
    for s in items:
        if isinstance(s, str):
            if not s:
                raise GenerationError('stop strings must not be empty')
            if tokenizer is None:
                raise GenerationError(f'stop string {s!r} needs a tokenizer, and the model has '
                                      f'none (give stop token ids instead)')
            strings.append(s)
            piece = tokenizer.piece_to_id(s)
            if piece != tokenizer.unk_id() and tokenizer.id_to_piece(piece) == s:
                ids.append(piece)   # a one-piece stop string (e.g. <|im_end|>) stops on device
        elif isinstance(s, (int, np.integer)) and 0 <= s < true_vocab_size:
            ids.append(int(s))
        else:
            raise GenerationError(f'stop item {s!r}: expected a string or a token id in '
                                  f'0..{true_vocab_size - 1}')
    return ids, strings


def cut_at_stop_strings(tokens: list[int], strings: Sequence[str], tokenizer) -> list[int]:
    """The shortest prefix whose text holds a stop string (all of it when none occurs)."""
    if not strings or not any(s in tokenizer.decode(tokens) for s in strings):
        return tokens
    for n in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n])
        if any(s in text for s in strings):
            return tokens[:n]
    return tokens


def generate(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop=None, *, row_offset: int = 0
             ) -> list[list[int]]:
    """``Model.generate``: lists of new token ids, one per prompt (``row_offset`` numbers the
    rows for their sampling keys when a caller splits a list into batches)."""
    cfg = model.config.replace(scan_layers=True, remat='none')
    vocab = model.true_vocab_size   # ids a tokenizer can not decode are never produced either
    if model.tokenizer is not None:
        vocab = min(vocab, model.tokenizer.GetPieceSize())
    check_settings(max_new_tokens, temperature, top_k, top_p)
    prompts = check_prompts(prompts, max_new_tokens, cfg.max_seq_len, vocab)
    stop_ids, stop_strings = split_stop(stop, model.tokenizer, vocab)
    if model.eos_id is not None:
        stop_ids.append(int(model.eos_id))
    mesh = model.mesh
    dp = 1 if mesh is None else sharding.data_parallel_size(mesh)
    rows = bucket(len(prompts), dp)
    rows += -rows % dp
    longest = max(len(p) for p in prompts)
    prompt_len = bucket(longest, 8)
    out_len = bucket(max_new_tokens, 8)
    # A multiple of the prompt bucket, not a power of two: every step reads all of the cache's
    # slots (64 + 128 tokens: 192 slots, not 256; ~10% of a step in the benchmark).
    cache_len = -(-(longest + max_new_tokens) // prompt_len) * prompt_len
    tokens_BxT = np.zeros((rows, prompt_len), np.int32)
    lengths_B = np.ones((rows,), np.int32)
    for i, p in enumerate(prompts):
        tokens_BxT[i, :len(p)] = p
        lengths_B[i] = len(p)
    live_B = np.arange(rows) < len(prompts)
    stops = np.full((bucket(len(stop_ids) + 1, 4),), -1, np.int32)
    stops[:len(stop_ids)] = stop_ids
    sampling = Sampling(greedy=temperature == 0, use_top_k=top_k > 0, use_top_p=top_p < 1)
    inputs = DecodeInputs(
        row_ids_B=jnp.asarray(np.arange(rows) + row_offset, jnp.int32),
        stop_ids=jnp.asarray(stops), max_new_tokens=jnp.asarray(max_new_tokens, jnp.int32),
        seed=jnp.asarray(seed, jnp.uint32),
        sample=dict(temperature=jnp.float32(max(temperature, 1e-6)), top_k=jnp.int32(top_k),
                    top_p=jnp.float32(top_p)))
    fn = compiled_decode(cfg, cache_len, out_len, sampling, vocab)
    batch = (tokens_BxT, lengths_B, live_B)
    if mesh is None:
        out_BxN, count_B = fn(model.params, *map(jnp.asarray, batch), inputs)
    else:
        batch = [jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)) for x in batch]
        with jax.set_mesh(mesh):
            out_BxN, count_B = fn(model.params, *batch, inputs)
    out_BxN, count_B = np.asarray(out_BxN), np.asarray(count_B)
    results = [out_BxN[i, :count_B[i]].tolist() for i in range(len(prompts))]
    if stop_strings:
        results = [cut_at_stop_strings(r, stop_strings, model.tokenizer) for r in results]
    return results


def decode_completions(outs: list[list[int]], tokenizer, stop=None) -> list[str]:
    """New tokens -> text, without the stopping token and cut before the first stop string."""
    stop_ids, stop_strings = split_stop(stop, tokenizer, tokenizer.GetPieceSize())
    stop_ids.append(tokenizer.eos_id())
    texts = []
    for ids in outs:
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        text = tokenizer.decode(ids)
        cuts = [text.find(s) for s in stop_strings if s in text]
        texts.append(text[:min(cuts)] if cuts else text)
    return texts


def complete(model, texts, max_new_tokens: int, **kwargs) -> list[str]:
    """``Model.complete``: each text encoded with BOS, generated from, and its new text returned
    (without the stopping token, cut before the first stop string)."""
    tok = model.tokenizer
    if tok is None:
        raise GenerationError('this model has no tokenizer: give token ids to generate(), or '
                              'import it with meditron-convert --tokenizer PATH')
    if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
        raise GenerationError(f'texts must be a non-empty list of strings, got '
                              f'{type(texts).__name__}')
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise GenerationError(f'text {i} is {"empty" if isinstance(t, str) else "not a string"}'
                                  f': {t!r}')
    prompts = [[tok.bos_id()] + tok.encode(t, out_type=int) for t in texts]
    outs = generate(model, prompts, max_new_tokens, **kwargs)
    return decode_completions(outs, tok, kwargs.get('stop'))
