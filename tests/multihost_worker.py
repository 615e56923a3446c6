"""One process of the multi-host test job: meditron-train's own entry point, plus a record of the
process-local batches this process fed to the mesh.

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \\
        python tests/multihost_worker.py --config configs/debug.py --workdir DIR [--config.x=...]

``loader.to_global_batch`` (the one place where every local batch, train and eval, meets the mesh)
is wrapped to keep a copy of its input; the real function still builds the global arrays. When
train() returns (or raises) the copies go to ``DIR/local_batches.process_<i>.npz`` (arrays
``<key>_<n>`` in call order).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meditron_jax import train  # noqa: E402
from meditron_jax.data import loader  # noqa: E402

_records: list[dict] = []
_to_global_batch = loader.to_global_batch


def _recording_to_global_batch(local_batch, mesh):
    _records.append({k: np.array(v) for k, v in local_batch.items()})
    return _to_global_batch(local_batch, mesh)


def _train_and_dump(config, workdir):
    import jax
    try:
        return _train(config, workdir)
    finally:
        arrays = {f'{k}_{n}': v for n, batch in enumerate(_records) for k, v in batch.items()}
        np.savez(os.path.join(workdir, f'local_batches.process_{jax.process_index()}.npz'),
                 **arrays)


_train = train.train
train.train = _train_and_dump
loader.to_global_batch = _recording_to_global_batch

if __name__ == '__main__':
    train.run()
