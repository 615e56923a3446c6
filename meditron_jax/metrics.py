"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard event files,
and progress lines with rate and ETA. Only the primary process writes."""

from __future__ import annotations

import json
import logging
import os
import time

from tensorboardX import SummaryWriter

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends rows to ``<workdir>/metrics.jsonl`` and scalars to ``<workdir>/tensorboard``.

    On resume from step N, rows for steps after N (written by a run that was killed before its
    next checkpoint) are dropped first, so the file reads as one uninterrupted run.
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        self.path = os.path.join(workdir, 'metrics.jsonl')
        if os.path.exists(self.path):
            with open(self.path) as f:
                rows = [line for line in f if line.strip()]
            kept = [r for r in rows if _step(r, self.path) <= resume_step]
            if len(kept) != len(rows):
                tmp = self.path + '.tmp'
                with open(tmp, 'w') as f:
                    f.writelines(kept)
                os.replace(tmp, self.path)
        self._file = open(self.path, 'a')
        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1
                                 if resume_step else None)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(row) + '\n')
        self._file.flush()
        step = int(row['step'])
        for key, value in row.items():
            if key != 'step' and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _step(line: str, path: str) -> float:
    """A row's step; a line cut short by a crash mid-write counts as past any resume point."""
    try:
        return json.loads(line)['step']
    except (json.JSONDecodeError, KeyError):
        log.warning('%s: dropping an unreadable line %r', path, line[:80])
        return float('inf')


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
    """Log lines: step/total, the row's figures, steps/s since the start, and the ETA."""

    def __init__(self, start_step: int, total_steps: int):
        self.start_step, self.total = start_step, total_steps
        self.start_time = time.perf_counter()

    def log(self, row: dict) -> None:
        step = row['step']
        elapsed = time.perf_counter() - self.start_time
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        figures = ' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
                           for k, v in row.items() if k != 'step')
        log.info('step %d/%d | %s | %.2f steps/s, eta %s', step, self.total, figures, rate,
                 _duration(eta))
