"""The SFT debug run end to end: configs/sft_debug.py finetunes the debug model on the shipped
chat set, then ``meditron_jax.load(workdir).complete(...)`` on training questions, presented with
the ChatML template they were trained with, returns their training answers (greedy decoding).

Needs generation (``Model.complete``, issue 9) on top of finetuning (issue 11)."""

import hashlib
import json

import pytest

import configs.sft_debug
import meditron_jax
from meditron_jax import train
from meditron_jax.data import chat
from meditron_jax.data import clean as clean_lib


def training_examples(val_fraction: float, count: int) -> list[tuple[str, str]]:
    """(prompt as presented to the model, answer) of single-question conversations that the
    prepared data holds in its training split (the split rule of chat_data.scan)."""
    out = []
    with open(configs.sft_debug.CHAT_SET) as f:
        for number, line in enumerate(f, start=1):
            messages = chat.parse_record(json.loads(line), f'line {number}')
            key = hashlib.blake2b(chat.render(messages).encode(), digest_size=16).digest()
            if clean_lib.validation_draw(key) < val_fraction or len(messages) > 3:
                continue
            system = messages[0]['content'] if messages[0]['role'] == 'system' else None
            out.append((chat.wrap_prompt(messages[-2]['content'], system),
                        messages[-1]['content']))
    return out[:count]


@pytest.mark.slow
def test_sft_debug_run_then_complete_returns_the_training_answers(tmp_path):
    config = configs.sft_debug.get_config()
    config.mesh.update(dict(data=1, fsdp=8, tensor=1))
    config.train.eval_every = 0
    workdir = str(tmp_path / 'sft_debug')
    rows = train.train(config, workdir)
    assert rows[-1]['loss'] < 0.2, rows[-1]

    examples = training_examples(config.data.sources[0]['val_fraction'], 4)
    assert len(examples) == 4
    model = meditron_jax.load(workdir)
    completions = model.complete([p for p, _ in examples], max_new_tokens=96, temperature=0.0)
    for (prompt, answer), completion in zip(examples, completions):
        # Whether or not generation stops at (and returns) the end marker, the text before it
        # is the answer the model was trained on.
        assert completion.split(chat.IM_END)[0].strip() == answer, (prompt, completion)
