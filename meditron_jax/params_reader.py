"""Reading a params checkpoint (or a training workdir's params) one leaf or one layer slice at
a time, as numpy, for the exporters: tensorstore with orbax's own specs (orbax_internals.py),
each leaf checked against the fingerprint saved with it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from meditron_jax import integrity, orbax_internals
from meditron_jax import model as model_lib
from meditron_jax.params_format import (PARAMS_DIR, ParamsCheckpointError, check_stored_shapes,
                                        config_from_json, config_to_json, is_params_checkpoint,
                                        leaf_shapes, read_json, read_metadata)


class ParamsReader:
    """Reads one leaf or one layer slice at a time, as numpy, from either writer's output.

    Every leaf read whole (or all of whose layer slices are read, each once) is checked against
    the fingerprint saved with it; a mismatch raises ParamsCheckpointError naming the leaf.
    ``step`` picks a training workdir's step (default: the latest complete one).
    """

    def __init__(self, path: str | os.PathLike, step: int | None = None):
        self.path = os.path.abspath(os.fspath(path))
        if not is_params_checkpoint(self.path) and os.path.isdir(
                os.path.join(self.path, 'checkpoints')):
            self.meta, params_dir = workdir_meta(self.path, step)
            if not self.meta['model']['scan_layers']:
                raise ParamsCheckpointError(
                    f'{self.path}: trained with model.scan_layers=False (per-layer params); '
                    f'load it with meditron_jax.load and write a params checkpoint with '
                    f'params_checkpoint.save_params first')
        else:
            self.meta, params_dir = read_metadata(self.path), os.path.join(self.path, PARAMS_DIR)
        self.config = config_from_json(self.meta['model'], self.path).replace(scan_layers=True)
        self.true_vocab_size = int(self.meta['true_vocab_size'])
        self.dtypes = check_stored_shapes(self.path, self.config, params_dir)
        self.shapes = leaf_shapes(self.config)
        tree_meta = read_json(os.path.join(params_dir, '_METADATA'), 'orbax metadata file')
        use_ocdbt = os.path.exists(os.path.join(params_dir, 'manifest.ocdbt'))
        self._specs = {
            name: orbax_internals.read_spec(params_dir, name, bool(tree_meta['use_zarr3']),
                                            use_ocdbt)
            for name in self.shapes}
        self._context = orbax_internals.ts_context(use_ocdbt)
        self._open: dict[str, Any] = {}
        self.digests = dict(self.meta.get('digests') or {})
        self._sums = integrity.Accumulator()
        self._read: dict[str, set[int]] = {}

    def _array(self, name: str):
        import tensorstore as ts
        if name not in self._specs:
            raise KeyError(f'{name!r} is not a parameter; known: {sorted(self._specs)}')
        if name not in self._open:
            self._open[name] = ts.open(self._specs[name], read=True,
                                       context=self._context).result()
        return self._open[name]

    def read(self, name: str, layer: int | None = None) -> np.ndarray:
        arr = self._array(name)
        try:
            x = np.asarray((arr if layer is None else arr[layer]).read().result())
        except ValueError as e:   # tensorstore: a missing, truncated or undecodable chunk
            where = name if layer is None else f'{name}[{layer}]'
            raise ParamsCheckpointError(f'{self.path}: array {where} could not be read: '
                                        f'{str(e).splitlines()[0][:300]}') from e
        self._check(name, layer, x)
        return x

    def _check(self, name: str, layer: int | None, x: np.ndarray) -> None:
        if name not in self.digests:
            return
        done = self._read.setdefault(name, set())
        key = -1 if layer is None else layer
        if key in done or -1 in done:
            return
        done.add(key)
        offset = 0 if layer is None else layer * x.size * integrity.words_per_element(x.dtype)
        self._sums.add(name, x, offset)
        shape = self.shapes[name]
        if key == -1 or len(done) == shape[0]:
            got = integrity.entry(x.dtype, shape, self._sums.sums[name])
            bad = integrity.mismatches({name: self.digests[name]}, {name: got})
            if bad:
                raise ParamsCheckpointError(f'{self.path}: damaged checkpoint, {bad[0]} '
                                            f'(fingerprint recorded at save time)')


def workdir_meta(workdir: str, step: int | None = None) -> tuple[dict, str]:
    """Metadata (with the step's params fingerprints) and params directory of a training
    workdir's latest (or given) complete step, so that the exporters read a trained model
    directly. The true vocabulary is the prepared data's tokenizer's when its manifest is
    there."""
    from meditron_jax import checkpoint
    step, config = checkpoint.read_config(workdir, step)
    cfg = model_lib.LlamaConfig(**config['model'])
    true_vocab = cfg.vocab_size
    manifest = os.path.join(config['data']['dir'] or os.path.join(workdir, 'data'),
                            'manifest.json')
    if os.path.isfile(manifest):
        with open(manifest) as f:
            true_vocab = int(json.load(f)['tokenizer']['vocab_size'])
    meta = dict(model=config_to_json(cfg), true_vocab_size=true_vocab,
                source=f'training workdir {workdir} step {step}', step=step,
                digests=checkpoint.read_digests(workdir, step).get('params', {}))
    return meta, os.path.join(workdir, 'checkpoints', str(step), 'params')
