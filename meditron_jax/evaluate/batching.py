"""Many scoring rows per forward pass: rows are packed first-fit into fixed (batch, seq_len)
arrays with the training model's segment ids and per-row positions (no row sees another), and run
on the model's mesh. One compile serves the whole run.

A ``Row`` is token ids plus queries ``(position, target ids)``: the log-probabilities, over the
tokenizer's true vocabulary only, of the target tokens as the next token after ``position``.
likelihood: one query per continuation token (summed); top_token: one query, the label tokens.
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

        def query_logprobs(params, tokens_BxT, positions_BxT, segments_BxT, targets_BxTxK):
            logits_BxTxV = model_lib.forward(params, cfg, tokens_BxT, positions_BxT,
                                             segments_BxT)[..., :vocab]
            logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
            return jnp.take_along_axis(logp_BxTxV, targets_BxTxK, axis=-1)

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

    def score(self, rows: Sequence[Row], progress=None) -> list[list[np.ndarray]]:
        """For each row, for each query, the log-probs of its targets (float32 array [K])."""
        if not rows:
            return []
        rows = [truncate_left(r, self.max_len) for r in rows]
        seq_len = self.seq_len_for(rows)
        k = max(len(t) for r in rows for _, t in r.queries)
        bins = pack([len(r.tokens) for r in rows], seq_len)
        results: list[list[np.ndarray] | None] = [None] * len(rows)
        pending = []
        for start in range(0, len(bins), self.batch_size):
            batch_bins = bins[start:start + self.batch_size]
            shape = (self.batch_size, seq_len)
            tokens, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
            segments = np.zeros(shape, np.int32)
            targets = np.zeros(shape + (k,), np.int32)
            where = []     # (row index, [(b, t) per query])
            for b, members in enumerate(batch_bins):
                offset = 0
                for segment, i in enumerate(members, 1):
                    row, n = rows[i], len(rows[i].tokens)
                    tokens[b, offset:offset + n] = row.tokens
                    positions[b, offset:offset + n] = np.arange(n)
                    segments[b, offset:offset + n] = segment
                    for p, t in row.queries:
                        targets[b, offset + p, :len(t)] = t
                    where.append((i, [(b, offset + p, len(t)) for p, t in row.queries]))
                    offset += n
            pending.append((self._run((tokens, positions, segments, targets)), where))
            if len(pending) > 2:       # keep the device busy while the host packs the next
                self._collect(pending.pop(0), results, progress)
        for item in pending:
            self._collect(item, results, progress)
        return results

    @staticmethod
    def _collect(item, results, progress) -> None:
        out, where = item
        out = np.asarray(out)
        for i, queries in where:
            results[i] = [out[b, t, :n] for b, t, n in queries]
        if progress is not None:
            progress.update(len(where))


def likelihoods(scorer: Scorer, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                progress=None) -> list[float]:
    """log p(continuation | context) for each (context ids, continuation ids) pair."""
    out = scorer.score([likelihood_row(c, x) for c, x in pairs], progress)
    return [float(sum(q[0] for q in r)) for r in out]


def next_token_logprobs(scorer: Scorer, contexts: Sequence[tuple[Sequence[int], Sequence[int]]],
                        progress=None) -> list[list[float]]:
    """For each (context ids, target ids): the next-token log-probs of the targets."""
    out = scorer.score([next_token_row(c, t) for c, t in contexts], progress)
    return [[float(v) for v in r[0]] for r in out]
