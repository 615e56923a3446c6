"""meditron-convert never destroys data: a destination that is, contains or lies inside the source
is refused whatever the flags; --force replaces only a previous output of the same kind, and only
once the new one is complete; bad JSON, a lying safetensors header and a bad --tokenizer are
refused naming the file before any weight is written. Each case runs the command line."""

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from meditron_jax.convert import cli, hf

import convert_fixtures as fx


def run(monkeypatch, capsys, *argv):
    """meditron-convert argv in process: (exit status, stderr)."""
    monkeypatch.setattr(sys, 'argv', ['meditron-convert', *map(str, argv)])
    try:
        cli.run()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def snapshot(root):
    """{relative path: sha256} of every file under root (to prove nothing changed)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, 'rb') as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    """A HF dir, a Meta dir, a params checkpoint and a SentencePiece model."""
    import sentencepiece as spm
    root = tmp_path_factory.mktemp('src')
    model = fx.hf_model(torch.float32, seed=4)
    model.save_pretrained(root / 'hf')
    fx.write_meta(model, str(root / 'meta'), 1)
    hf.import_hf(str(root / 'hf'), str(root / 'ckpt'))
    text = root / 'text.txt'
    text.write_text('\n'.join(f'word{i} medical text {i * 7}' for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(root / 'tok'),
                                   vocab_size=100, model_type='bpe', minloglevel=2)
    return {k: str(root / v) for k, v in
            dict(hf='hf', meta='meta', ckpt='ckpt', tok='tok.model').items()}


COMMANDS = {'import-hf': 'hf', 'import-meta': 'meta', 'export-hf': 'ckpt', 'export-meta': 'ckpt'}


@pytest.mark.parametrize('command', ['import-hf', 'export-hf'])
def test_destination_equal_to_source_is_refused_even_with_force(command, sources, tmp_path,
                                                                monkeypatch, capsys):
    import shutil
    src = tmp_path / 'src'
    shutil.copytree(sources[COMMANDS[command]], src)
    before = snapshot(src)
    code, err = run(monkeypatch, capsys, command, src, src, '--force')
    assert code == 2 and f'destination {src} is the source' in err and 'pass --force' not in err
    assert snapshot(src) == before


def test_destination_containing_the_source_is_refused(sources, tmp_path, monkeypatch, capsys):
    import shutil
    anc = tmp_path / 'anc'
    shutil.copytree(sources['ckpt'], anc / 'project' / 'ckpt')
    (anc / 'notes.txt').write_text('unrelated')
    before = snapshot(anc)
    code, err = run(monkeypatch, capsys, 'export-hf', anc / 'project' / 'ckpt', anc, '--force')
    assert code == 2 and 'contains the source' in err and str(anc) in err
    assert snapshot(anc) == before
    assert [f for f in os.listdir(tmp_path) if f != 'anc'] == []


def test_destination_inside_the_source_or_a_symlink_to_it_is_refused(sources, tmp_path,
                                                                     monkeypatch, capsys):
    import shutil
    src = tmp_path / 'hf'
    shutil.copytree(sources['hf'], src)
    before = snapshot(src)
    code, err = run(monkeypatch, capsys, 'import-hf', src, src / 'sub', '--force')
    assert code == 2 and 'lies inside the source' in err
    (tmp_path / 'link').symlink_to(src)
    code, err = run(monkeypatch, capsys, 'import-hf', src, tmp_path / 'link', '--force')
    assert code == 2 and 'is the source' in err and str(tmp_path / 'link') in err
    assert snapshot(src) == before and not (src / 'sub').exists()


@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_force_over_an_arbitrary_directory_is_refused(command, sources, tmp_path, monkeypatch,
                                                      capsys):
    dst = tmp_path / 'mine'
    dst.mkdir()
    (dst / 'thesis.tex').write_text('years of work')
    for flags in ([], ['--force']):
        code, err = run(monkeypatch, capsys, command, sources[COMMANDS[command]], dst, *flags)
        assert code == 2 and f'destination {dst}' in err, err
        assert 'is not an output of meditron-convert' in err and 'pass --force' not in err
    assert os.listdir(dst) == ['thesis.tex'] and sorted(os.listdir(tmp_path)) == ['mine']


@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_force_replaces_a_previous_output_of_the_same_kind(command, sources, tmp_path,
                                                           monkeypatch, capsys):
    src, dst = sources[COMMANDS[command]], tmp_path / 'out'
    assert run(monkeypatch, capsys, command, src, dst)[0] == 0
    first = snapshot(dst)
    code, err = run(monkeypatch, capsys, command, src, dst)
    assert code == 2 and 'holds a previous' in err and 'pass --force' in err
    assert snapshot(dst) == first
    assert run(monkeypatch, capsys, command, src, dst, '--force')[0] == 0
    assert set(snapshot(dst)) == set(first)            # a complete new output, nothing else
    assert sorted(os.listdir(tmp_path)) == ['out']     # no temp or old dir left behind
    # Something the tool did not write, put into the output, is not deleted by --force.
    (dst / 'README.md').write_text('my notes')
    code, err = run(monkeypatch, capsys, command, src, dst, '--force')
    assert code == 2 and "entries this tool did not write: ['README.md']" in err
    assert (dst / 'README.md').read_text() == 'my notes'


def test_force_over_an_output_of_another_kind_is_refused(sources, tmp_path, monkeypatch, capsys):
    dst = tmp_path / 'out'
    assert run(monkeypatch, capsys, 'export-hf', sources['ckpt'], dst)[0] == 0
    before = snapshot(dst)
    code, err = run(monkeypatch, capsys, 'import-hf', sources['hf'], dst, '--force')
    assert code == 2 and 'holds a HF export, not a params checkpoint' in err
    assert snapshot(dst) == before


@pytest.mark.parametrize('command,name', [('import-hf', 'config.json'),
                                          ('import-meta', 'params.json')])
def test_invalid_json_config_names_the_file_and_line(command, name, sources, tmp_path,
                                                     monkeypatch, capsys):
    import shutil
    src = tmp_path / 'src'
    shutil.copytree(sources[COMMANDS[command]], src)
    (src / name).write_text('{\n  "dim": 64,\n  "n_layers": 2,,\n}\n')
    code, err = run(monkeypatch, capsys, command, src, tmp_path / 'dst')
    assert code == 2 and f'{src / name}: not a valid' in err and 'line 3' in err
    assert not (tmp_path / 'dst').exists()


def test_safetensors_header_claiming_2_62_bytes_is_refused_naming_the_sizes(
        sources, tmp_path, monkeypatch, capsys):
    import shutil
    src = tmp_path / 'src'
    shutil.copytree(sources['hf'], src)
    path = src / 'model.safetensors'
    with open(path, 'r+b') as f:
        f.write(struct.pack('<Q', 2**62))
    size = os.path.getsize(path)
    code, err = run(monkeypatch, capsys, 'import-hf', src, tmp_path / 'dst')
    assert code == 2 and f'{path}: not a valid safetensors file' in err
    assert f'claims {2**62} bytes' in err and f'the file has {size} bytes' in err
    assert sorted(os.listdir(tmp_path)) == ['src']


def test_safetensors_offsets_past_the_end_are_refused(sources, tmp_path, monkeypatch, capsys):
    src = tmp_path / 'src'
    src.mkdir()
    (src / 'config.json').write_text((Path(sources['hf']) / 'config.json').read_text())
    safetensors.torch.save_file({'model.norm.weight': torch.ones(64)}, src / 'model.safetensors')
    blob = (src / 'model.safetensors').read_bytes()
    n = struct.unpack('<Q', blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header['model.norm.weight']['data_offsets'] = [0, 2**40]
    new = json.dumps(header).encode()
    (src / 'model.safetensors').write_bytes(struct.pack('<Q', len(new)) + new + blob[8 + n:])
    code, err = run(monkeypatch, capsys, 'import-hf', src, tmp_path / 'dst')
    assert code == 2 and 'tensor model.norm.weight claims bytes 0..1099511627776' in err


@pytest.mark.parametrize('command', ['export-hf', 'export-meta'])
@pytest.mark.parametrize('tokenizer,message', [
    ('missing.model', 'does not exist'),
    ('config.json', 'is not a SentencePiece model'),
    ('emptydir', 'is a directory; expected'),
])
def test_bad_tokenizer_is_refused_before_any_weight_is_written(
        command, tokenizer, message, sources, tmp_path, monkeypatch, capsys):
    from meditron_jax.convert import meta
    (tmp_path / 'emptydir').mkdir()
    (tmp_path / 'config.json').write_text('{}')

    def no_weights(*a, **k):
        raise AssertionError('a weight file was written before the tokenizer was checked')
    monkeypatch.setattr(hf, 'write_safetensors', no_weights)
    monkeypatch.setattr(meta, '_storage_offsets', no_weights)
    code, err = run(monkeypatch, capsys, command, sources['ckpt'], tmp_path / 'out',
                    '--tokenizer', tmp_path / tokenizer)
    assert code == 2 and f'--tokenizer {tmp_path / tokenizer} {message}' in err, err
    assert not (tmp_path / 'out').exists()


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(sources, tmp_path, monkeypatch,
                                                               capsys):
    import sentencepiece as spm
    text = tmp_path / 'text.txt'
    text.write_text('\n'.join(f'term{i} w{i * 13} x{i * 31}' for i in range(2000)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / 'big'),
                                   vocab_size=400, model_type='bpe', minloglevel=2)
    code, err = run(monkeypatch, capsys, 'export-hf', sources['ckpt'], tmp_path / 'out',
                    '--tokenizer', tmp_path / 'big.model')
    assert code == 2 and 'has 400 pieces but the model has 250 vocabulary entries' in err
    assert not (tmp_path / 'out').exists()
    assert run(monkeypatch, capsys, 'export-hf', sources['ckpt'], tmp_path / 'out',
               '--tokenizer', sources['tok'])[0] == 0
    assert (tmp_path / 'out' / 'tokenizer.model').exists()
