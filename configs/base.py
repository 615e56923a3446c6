"""The base config: declares every key, with the MEDITRON pretraining recipe as defaults.

Size and run configs (debug.py, meditron_7b.py, meditron_70b.py) import this and override a few
keys; no code reads a key that is not declared here. Any key can be overridden on the command
line, e.g. ``--config.train.steps=100 --config.mesh.fsdp=8``.

The returned config is locked (ml_collections ``lock()``): a derived config or a command-line
override that sets a key not declared here fails, naming the key and the nearest declared one
(``c.data.dedupe = ...`` -> "did you mean data.dedup?"). Declare a new key by adding it below,
with a comment; values of declared keys (lists, dicts, whole sections from ``model_config``)
can still be assigned.
"""

import dataclasses

import ml_collections

from meditron_jax import model as model_lib


def model_config(preset: str) -> ml_collections.ConfigDict:
    """The ``model`` section: every LlamaConfig field, filled from a preset in model.PRESETS."""
    return ml_collections.ConfigDict(dataclasses.asdict(model_lib.preset(preset))).lock()


def source(name: str, files: str, weight: float, val_fraction: float = 0.03,
           text_key: str = 'text') -> dict:
    """One corpus source: a glob of JSONL (or .txt) files and its share of training tokens."""
    return dict(name=name, files=files, weight=weight, val_fraction=val_fraction,
                text_key=text_key)


def gap_replay_sources(root: str) -> list[dict]:
    """MEDITRON's GAP-Replay mixture: token shares of the training tokens (MEDITRON.md)."""
    return [
        source('guidelines', f'{root}/guidelines/*.jsonl', weight=0.0022, val_fraction=0.05),
        source('pubmed_abstracts', f'{root}/abstracts/*.jsonl', weight=0.1139),
        source('pmc_papers', f'{root}/papers/*.jsonl', weight=0.8752),
        source('replay', f'{root}/replay/*.jsonl', weight=0.0087, val_fraction=0.0),
    ]


def sft_recipe(c: ml_collections.ConfigDict, files: str, data_dir: str, init_from: str,
               grad_accum_steps: int) -> ml_collections.ConfigDict:
    """MEDITRON's task-finetuning recipe on top of a pretraining config ``c``: chat data packed
    first-fit, AdamW (0.9, 0.95, eps 1e-5), lr 2e-5 with 10% warmup and cosine decay to 10%,
    weight decay 0.1, clipping 1.0, global batch 64, 3 epochs, from ``init_from``."""
    c.data.format = 'chat'
    c.data.packing = 'first_fit'
    c.data.sources = [source('sft', files, weight=1.0, val_fraction=0.05)]
    c.data.dir = data_dir
    c.data.global_batch_size = 64
    c.optim.update(dict(lr_peak=2e-5, lr_min=2e-6, warmup_steps=0, warmup_fraction=0.1,
                        decay_steps=0, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1,
                        clip_norm=1.0, grad_accum_steps=grad_accum_steps))
    c.train.epochs = 3.0
    c.train.init_from = init_from
    c.train.eval_steps = 10
    c.checkpoint.keep = 2
    return c


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Model shape and numerics: the fields of model.LlamaConfig.
    c.model = model_config('llama2_7b')

    # Device mesh: axis sizes, -1 = all remaining devices. See meditron_jax/sharding.py.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

    c.data = ml_collections.ConfigDict()
    c.data.sources = []             # list of source(...) dicts; weights are token shares
    c.data.format = 'text'          # 'text' (pretraining) or 'chat' (conversations, loss on the
                                    # assistant turns; see meditron_jax/data/chat_data.py)
    c.data.dir = ''                 # prepared shards + manifest.json; '' = <workdir>/data
    c.data.tokenizer = ''           # SentencePiece .model (Llama-2's in real runs)
    c.data.tokenizer_vocab_size = 0  # >0 and no tokenizer: train one on the corpus
    c.data.special_tokens = ['[BIB_REF]', '[/BIB_REF]', '[FIG_REF]', '[TABLE]', '[FORMULA]']
    c.data.clean = ml_collections.ConfigDict(dict(
        normalize=True,             # unicode NFKC + whitespace
        drop_urls=True,
        drop_references=True,       # reference / bibliography sections
        min_chars=200,              # documents shorter than this (after cleaning) are dropped
        prepend_title=True,         # a JSONL 'title' becomes the first paragraph (as MEDITRON)
    ))
    c.data.dedup = 'exact'          # 'exact' (normalised-text hash), 'minhash' (near dup), 'none'
    c.data.minhash_threshold = 0.8  # Jaccard similarity above which documents are duplicates
    # Benchmark decontamination (meditron_jax/data/decontaminate.py): training documents that
    # share a word n-gram with a benchmark item are dropped (or have those words cut out).
    c.data.decontaminate = ()       # dict(benchmark=NAME, data=PATH)s as meditron-eval reads them
                                    # (medqa, medqa4, medmcqa, pubmedqa, mmlu_medical); () = off
    c.data.decontaminate_ngram = 13  # words per n-gram (GPT-3 / PaLM); shorter items match whole
    c.data.decontaminate_mode = 'drop'  # 'drop' the document, or 'cut' the overlapping words
    # Built indexes are kept by content (sha256 of the n-gram size and the benchmark files) so a
    # re-run or a --shard slice skips reading and hashing the benchmarks; not an output option.
    c.data.decontaminate_cache = 'auto'  # 'auto' = $XDG_CACHE_HOME or ~/.cache/meditron_jax/...;
                                         # a directory; '' = no cache
    c.data.prepare_workers = 0      # processes for meditron-prepare; 0 = all cores
    c.data.token_dtype = 'auto'     # shard token ids: 'auto' (uint16 if the vocab fits), 'uint16', 'uint32'
    c.data.shard_max_tokens = 100_000_000  # tokens per ArrayRecord shard before starting another
    c.data.seq_len = 2048           # tokens per training row (rows hold seq_len + 1 tokens)
    c.data.global_batch_size = 1600  # sequences per optimizer step, over all hosts
    c.data.packing = 'concat'       # 'concat' (Megatron concat-then-split) or 'first_fit'
    c.data.shuffle_seed = 0
    c.data.worker_count = 0         # grain worker processes per host (0 = in the main process)

    # Optimizer: AdamW with warmup + cosine, MEDITRON 7B's pretraining values.
    c.optim = ml_collections.ConfigDict(dict(
        lr_peak=3e-4,
        lr_min=3e-5,                # cosine floor (the paper: 10% of peak)
        warmup_steps=2000,
        warmup_fraction=0.0,        # >0: warmup this share of the steps (not warmup_steps)
        decay_steps=0,              # cosine length after warmup; 0 = train.steps - warmup_steps
        b1=0.9,
        b2=0.95,
        eps=1e-5,
        weight_decay=0.1,           # on weight matrices only, never on norm scales
        clip_norm=1.0,              # global gradient norm
        grad_accum_steps=1,         # micro-batches per step (global_batch_size / this per micro)
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=10000,
        epochs=0.0,                 # >0: steps = epochs x prepared training tokens / batch tokens
        log_every=10,
        eval_every=500,
        eval_steps=20,              # validation batches per evaluation
        seed=0,
        init_from='',               # params checkpoint (meditron-convert) or training workdir
        nonfinite='error',          # 'error': stop naming the step; 'skip': skip the update, count it
        # Dense bf16 peak for MFU (H100 SXM); A100: 312e12. Not used on CPU, where MFU is
        # against the host's float32 GEMM rate, measured at the start (train.py).
        peak_flops_per_device=989e12,
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=500,                  # steps between saves (and one at the end)
        keep=3,                     # most recent checkpoints kept
    ))
    return c.lock()                 # undeclared keys are errors (see the module docstring)
