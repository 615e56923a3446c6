"""meditron_jax: continued pretraining of Llama-2 on medical text, in JAX/Flax."""

__version__ = '0.1.0'
