from setuptools import find_packages, setup

setup(
    name='meditron_jax',
    version='0.1.0',
    description='Continued pretraining of Llama-2 on medical text, in JAX/Flax',
    python_requires='>=3.11',
    packages=find_packages(include=['meditron_jax', 'meditron_jax.*', 'configs']),
    package_data={'meditron_jax': ['xla_flags_gpu.txt', 'data/corpus/*/*.jsonl', 'data/sft/*.jsonl',
                                  'evaluate/samples/*/*', 'evaluate/samples/*/*/*']},
    install_requires=[
        # Ranges are the versions this code is tested with (see ../shared/STACK.md).
        'jax>=0.10.2,<0.11',
        'flax>=0.12.8,<0.13',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'grain>=0.2.18,<0.3',
        'array-record>=0.8.6,<0.9',
        'tensorstore>=0.1.86,<0.2',
        'sentencepiece>=0.2.0,<0.3',
        'ml-collections>=1.1.0,<2',
        'numpy>=2.0,<3',
        'absl-py>=2.1,<3',
        'tqdm>=4.66,<5',             # progress bars
        'tensorboardX>=2.6,<3',      # TensorBoard event files without TensorFlow
        'datasketch>=2.0,<3',        # MinHash LSH near-duplicate detection (MinHash scheme= is 2.0+)
    ],
    extras_require={
        # Weight conversion and the parity tests. CI pins torch==2.13.0 (a CPU build).
        'torch': ['torch>=2.5', 'safetensors>=0.4', 'transformers>=4.45'],  # skip_data: 2.5+
        'dev': ['pytest>=8', 'pytest-xdist>=3.5'],
        'gpu': ['jax[cuda12]>=0.10.2,<0.11'],
        # meditron-plan --target h100/a100 on a machine without a GPU: XLA:GPU (the CUDA PJRT
        # plugin) and cuDNN, which jax needs to emit fused attention (it brings cuBLAS and
        # NVRTC as its own dependencies). ~1.4 GB of wheels, +2.1 GB installed; the full
        # jax[cuda12] is ~5.5 GB.
        'plan-gpu': ['jax-cuda12-plugin==0.10.2', 'nvidia-cudnn-cu12>=9.8,<10'],
        # TPU VMs (meditron-train) and meditron-plan --target tpu-*: libtpu (+0.7 GB).
        'tpu': ['jax[tpu]==0.10.2'],
    },
    entry_points={
        'console_scripts': [
            'meditron-train=meditron_jax.train:run',
            'meditron-prepare=meditron_jax.data.prepare:run',
            'meditron-convert=meditron_jax.convert.cli:run',
            'meditron-plan=meditron_jax.plan:run',
            'meditron-generate=meditron_jax.generate_cli:run',
            'meditron-eval=meditron_jax.evaluate.cli:run',
            'meditron-prepare-sft=meditron_jax.evaluate.to_sft:run',
        ],
    },
)
