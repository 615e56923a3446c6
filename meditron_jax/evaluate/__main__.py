from meditron_jax.evaluate.cli import run

if __name__ == '__main__':
    run()
