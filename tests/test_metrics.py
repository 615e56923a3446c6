"""metrics.jsonl on resume: rows past the resume step and a line cut short by a crash go."""

import json

from meditron_jax import metrics


def test_resume_drops_rows_after_the_step_and_a_truncated_line(tmp_path):
    path = tmp_path / 'metrics.jsonl'
    rows = [json.dumps({'step': s, 'loss': 1.0}) for s in (10, 20, 30)]
    path.write_text('\n'.join(rows) + '\n{"step": 40, "lo')
    writer = metrics.MetricsWriter(str(tmp_path), resume_step=20)
    writer.write({'step': 30, 'loss': 0.5})
    writer.close()
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r['step'] for r in got] == [10, 20, 30] and got[-1]['loss'] == 0.5
    assert list((tmp_path / 'tensorboard').iterdir())
