from meditron_jax.convert.cli import run

run()
