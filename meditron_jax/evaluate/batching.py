"""Many scoring rows per forward pass: rows are packed first-fit into fixed (batch, seq_len)
arrays with the training model's segment ids and per-row positions (no row sees another), and run
on the model's mesh. One compile serves the whole run.

A ``Row`` is token ids plus queries ``(position, target ids)``: the log-probabilities, over the
tokenizer's true vocabulary only, of the target tokens as the next token after ``position``.
likelihood: a prompt's options share its rows (``option_rows``), each continuation token one
query target, summed; top_token: one query, the label tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meditron_jax import model as model_lib
from meditron_jax import sharding

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Row:
    tokens: list[int]
    queries: list[tuple[int, list[int]]]     # (position, target ids)


def likelihood_row(context: Sequence[int], continuation: Sequence[int]) -> Row:
    """Sum of these queries' log-probs = log p(continuation | context)."""
    whole = list(context) + list(continuation)
    start = len(context) - 1
    return Row(whole[:-1], [(start + i, [t]) for i, t in enumerate(continuation)])


def next_token_row(context: Sequence[int], targets: Sequence[int]) -> Row:
    return Row(list(context), [(len(context) - 1, list(targets))])


def truncate_left(row: Row, max_len: int) -> Row:
    """Drops the oldest tokens of a row longer than the model's context (as the harness does)."""
    drop = len(row.tokens) - max_len
    if drop <= 0:
        return row
    if min(p for p, _ in row.queries) < drop:
        raise ValueError(f'a continuation of {len(row.tokens)} tokens does not fit the model\'s '
                         f'{max_len}-token context')
    return Row(row.tokens[drop:], [(p - drop, t) for p, t in row.queries])


def pack(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """First-fit-decreasing: row indices per packed sequence of ``seq_len`` tokens."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(seq_len - lengths[i])
    return bins


def model_mesh(params) -> jax.sharding.Mesh | None:
    leaf = jax.tree.leaves(params)[0]
    mesh = getattr(leaf.sharding, 'mesh', None)
    return mesh if isinstance(mesh, jax.sharding.Mesh) else None


class Scorer:
    """Runs rows through the model in packed batches of ``batch_size`` sequences."""

    def __init__(self, model, batch_size: int = 8, seq_len: int | None = None):
        self.model = model
        self.cfg = model.config.replace(scan_layers=True)
        self.mesh = model_mesh(model.params)
        dp = sharding.data_parallel_size(self.mesh) if self.mesh is not None else 1
        self.batch_size = -(-max(batch_size, 1) // dp) * dp     # the batch axis must divide
        self.max_len = min(seq_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        vocab = int(model.true_vocab_size)
        cfg = self.cfg

        def query_logprobs(params, tokens_BxT, positions_BxT, segments_BxT, query_pos_BxQ,
                           targets_BxQxK):
            # The final hidden states, then the head at the queried positions only: the
            # model's own full-length logits are dead code that XLA drops.
            _, state = model_lib.Llama(cfg).apply(
                {'params': params}, tokens_BxT, positions_BxT, segments_BxT,
                capture_intermediates=lambda m, _: m.name == 'final_norm',
                mutable=['intermediates'])
            x_BxTxD = state['intermediates']['final_norm']['__call__'][0]
            x_BxQxD = jnp.take_along_axis(x_BxTxD, query_pos_BxQ[..., None], axis=1)
            dtype = jnp.dtype(cfg.compute_dtype)
            head_DxV = params['lm_head']['kernel'][:, :vocab]
            logits_BxQxV = jnp.einsum('bqd,dv->bqv', x_BxQxD.astype(dtype),
                                      head_DxV.astype(dtype),
                                      preferred_element_type=jnp.float32)
            logp_BxQxV = jax.nn.log_softmax(logits_BxQxV, axis=-1)
            return jnp.take_along_axis(logp_BxQxV, targets_BxQxK, axis=-1)

        self._fn = jax.jit(query_logprobs)

    def _run(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        if self.mesh is None:
            return self._fn(self.model.params, *arrays)
        with jax.set_mesh(self.mesh):
            placed = [jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim))
                      for a in arrays]
            return self._fn(self.model.params, *placed)

    def seq_len_for(self, rows: Sequence[Row]) -> int:
        """Room for about two average rows and at least the longest, in multiples of 64, at
        most the model's context: one compile per run, little padding, and attention over
        packed rows (which costs as one long row) stays near the rows' own."""
        lengths = [len(r.tokens) for r in rows]
        target = max(max(lengths), 2 * sum(lengths) // len(lengths))
        return min(self.max_len, -(-target // 64) * 64)

    def score(self, rows: Sequence[Row], progress=None, counts: Sequence[int] | None = None
              ) -> list[list[np.ndarray]]:
        """For each row, for each query, the log-probs of its targets (float32 array [K]).
        ``progress.update`` gets ``counts[i]`` (default 1) when row i is done."""
        if not rows:
            return []
        rows = [truncate_left(r, self.max_len) for r in rows]
        seq_len = self.seq_len_for(rows)
        k = max(len(t) for r in rows for _, t in r.queries)
        bins = pack([len(r.tokens) for r in rows], seq_len)
        # Queries per packed sequence, fixed for the run (one compile), in multiples of 8.
        q = -(-max(sum(len(rows[i].queries) for i in b) for b in bins) // 8) * 8
        results: list[list[np.ndarray] | None] = [None] * len(rows)
        pending = []
        for start in range(0, len(bins), self.batch_size):
            batch_bins = bins[start:start + self.batch_size]
            shape = (self.batch_size, seq_len)
            tokens, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
            segments = np.zeros(shape, np.int32)
            query_pos = np.zeros((self.batch_size, q), np.int32)
            targets = np.zeros((self.batch_size, q, k), np.int32)
            where = []     # (row index, [(b, query slot, n targets) per query])
            for b, members in enumerate(batch_bins):
                offset, slot = 0, 0
                for segment, i in enumerate(members, 1):
                    row, n = rows[i], len(rows[i].tokens)
                    tokens[b, offset:offset + n] = row.tokens
                    positions[b, offset:offset + n] = np.arange(n)
                    segments[b, offset:offset + n] = segment
                    slots = []
                    for p, t in row.queries:
                        query_pos[b, slot] = offset + p
                        targets[b, slot, :len(t)] = t
                        slots.append((b, slot, len(t)))
                        slot += 1
                    where.append((i, slots))
                    offset += n
            pending.append((self._run((tokens, positions, segments, query_pos, targets)),
                            where))
            if len(pending) > 2:       # keep the device busy while the host packs the next
                self._collect(pending.pop(0), results, progress, counts)
        for item in pending:
            self._collect(item, results, progress, counts)
        return results

    @staticmethod
    def _collect(item, results, progress, counts) -> None:
        out, where = item
        out = np.asarray(out)
        for i, queries in where:
            results[i] = [out[b, t, :n] for b, t, n in queries]
        if progress is not None:
            progress.update(sum(counts[i] for i, _ in where) if counts else len(where))


def option_rows(context: Sequence[int], continuations: Sequence[Sequence[int]]
                ) -> tuple[list[Row], list[list[tuple[int, int, int]]]]:
    """The rows that score all of one prompt's continuations, sharing the prompt: every
    continuation token is a query on the prefix before it, a prefix that another row extends is
    read from that row, and queries on one position share it. Single-token options (letters)
    thus cost one row per item, not one per option.

    Returns (rows, where): for continuation c, token j: (row, query, target) indices."""
    needs: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
    for c, cont in enumerate(continuations):
        for j, token in enumerate(cont):
            needs.setdefault(tuple(context) + tuple(cont[:j]), []).append((c, j, token))
    rows: list[Row] = []
    where = [[None] * len(cont) for cont in continuations]
    for prefix in sorted(needs, key=len, reverse=True):
        r = next((i for i, row in enumerate(rows) if len(row.tokens) >= len(prefix)
                  and tuple(row.tokens[:len(prefix)]) == prefix), None)
        if r is None:
            rows.append(Row(list(prefix), []))
            r = len(rows) - 1
        targets = sorted({token for _, _, token in needs[prefix]})
        rows[r].queries.append((len(prefix) - 1, targets))
        for c, j, token in needs[prefix]:
            where[c][j] = (r, len(rows[r].queries) - 1, targets.index(token))
    return rows, where


def option_loglikelihoods(scorer: Scorer, prompts: Sequence[tuple[Sequence[int],
                                                                  Sequence[Sequence[int]]]],
                          progress=None) -> list[list[float]]:
    """For each (context ids, [continuation ids per option]): log p(continuation | context) per
    option."""
    rows, plans, counts = [], [], []
    for context, conts in prompts:
        item_rows, where = option_rows(context, conts)
        plans.append((len(rows), where))
        rows += item_rows
        counts += [0] * (len(item_rows) - 1) + [1]      # the progress bar counts items
    out = scorer.score(rows, progress, counts)
    return [[float(sum(out[base + r][q][t] for r, q, t in cont)) for cont in where]
            for base, where in plans]


def next_token_logprobs(scorer: Scorer, contexts: Sequence[tuple[Sequence[int], Sequence[int]]],
                        progress=None) -> list[list[float]]:
    """For each (context ids, target ids): the next-token log-probs of the targets."""
    out = scorer.score([next_token_row(c, t) for c, t in contexts], progress)
    return [[float(v) for v in r[0]] for r in out]
