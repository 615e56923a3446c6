"""Weight conversion between torch checkpoints (Meta, Hugging Face) and params checkpoints.

``import_hf`` / ``import_meta`` write a params checkpoint (see ``meditron_jax.params_checkpoint``);
``export_hf`` / ``export_meta`` read one. All four stream one tensor at a time. The command line
is ``meditron-convert`` (cli.py).
"""

from meditron_jax.convert.common import ConversionError
from meditron_jax.convert.hf import export_hf, import_hf
from meditron_jax.convert.meta import export_meta, import_meta

__all__ = ['ConversionError', 'export_hf', 'export_meta', 'import_hf', 'import_meta']
