"""Bad configs and flags give one line naming the key or flag, before any long work, and leave
nothing behind: undeclared config keys (in a config file or on the command line) with the nearest
declared key, train.steps <= 0, meditron-plan's flags, train.init_from, a --workdir that is a
file. Two subprocess runs check the real console behaviour (status 2, one line, no traceback)."""

import os
import re
import subprocess
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags

import configs.debug
from configs import base
from meditron_jax import cli, init_from, model, params_checkpoint, plan, sharding, train
from tests.data_helpers import prepared_debug

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f for f in os.listdir(os.path.join(REPO, 'configs'))
                 if f.endswith('.py') and f != '__init__.py')


def load(argv):
    """Parses ``--config FILE --config.KEY=V ...`` as the commands do; returns the config or
    the exception."""
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                             sys_argv=['prog', *argv])
    try:
        values(['prog', *argv])
        cli.check_declared(holder.value)
        return holder.value
    except Exception as e:  # noqa: BLE001 -- the caller inspects it
        return e


def write_config(tmp_path, body: str) -> str:
    path = tmp_path / 'derived.py'
    path.write_text('from configs import base\n\n\ndef get_config():\n'
                    '    c = base.get_config()\n' + body + '    return c\n')
    return str(path)


@pytest.mark.parametrize('name', CONFIGS)
def test_shipped_configs_load_locked_and_declare_only_base_keys(name):
    config = load(['--config', os.path.join(REPO, 'configs', name)])
    assert not isinstance(config, Exception), config
    assert config.is_locked and config.data.is_locked and config.model.is_locked


def test_derived_config_may_assign_lists_dicts_and_whole_sections(tmp_path):
    path = write_config(tmp_path, "    c.model = base.model_config('tiny')\n"
                                  "    c.data.sources = [base.source('a', '/x/*.jsonl', 1.0)]\n"
                                  "    c.data.special_tokens = ['[X]']\n"
                                  "    c.mesh.update(dict(fsdp=2))\n")
    config = load(['--config', path])
    assert not isinstance(config, Exception), config
    assert config.model.num_layers == model.preset('tiny').num_layers
    assert config.data.sources[0]['name'] == 'a' and config.mesh.fsdp == 2


@pytest.mark.parametrize('body,line,message', [
    ("    c.data.dedupe = 'minhash'\n", 6, r'data.dedupe is not a declared config key; did you '
                                          r'mean data.dedup\?'),
    ("    c.model = base.model_config('tiny')\n    c.model.num_layer = 2\n", 7,
     r'model.num_layer is not a declared config key; did you mean model.num_layers\?'),
    ("    c.trian.steps = 2\n", 6, r'trian is not a declared config key; did you mean train\?'),
])
def test_undeclared_key_in_a_config_file_names_file_line_and_nearest_key(tmp_path, body, line,
                                                                          message):
    path = write_config(tmp_path, body)
    error = load(['--config', path])
    assert isinstance(error, (AttributeError, KeyError))
    text = cli.one_line(error)
    assert text is not None and text.startswith(f'{path}:{line}: ')
    assert __import__('re').search(message, text), text


def test_a_wrongly_typed_value_in_a_config_file_names_its_line(tmp_path):
    path = write_config(tmp_path, "    c.train.steps = 'many'\n")
    error = load(['--config', path])
    assert isinstance(error, flags.IllegalFlagValueError)
    assert cli.one_line(error).startswith(f"{path}:6: TypeError: Could not override field "
                                          f"'steps'")


def test_a_replaced_section_must_keep_every_declared_key(tmp_path):
    error = load(['--config', write_config(tmp_path, '    c.data.clean = dict(normalize=False)\n')])
    assert isinstance(error, cli.ConfigError)
    assert 'data.clean.drop_references is missing' in str(error)


@pytest.mark.parametrize('override,message', [
    ('--config.model.foo=1', '--config.model.foo: model.foo is not a declared config key; the '
                             'nearest is model.'),
    ('--config.data.dedupe=minhash', 'data.dedupe is not a declared config key; did you mean '
                                     'data.dedup?'),
    ('--config.modle.num_layers=2', '--config.modle.num_layers: modle is not a declared config '
                                    'key; did you mean model?'),
])
def test_undeclared_key_on_the_command_line_names_it_and_the_nearest(override, message):
    error = load(['--config', os.path.join(REPO, 'configs', 'debug.py'), override])
    assert isinstance(error, (AttributeError, KeyError))
    assert message in cli.one_line(error)


def test_debug_shows_the_traceback_and_unanticipated_errors_keep_it(capsys):
    error = ValueError('train.steps=0: expected >= 1')
    with pytest.raises(ValueError):       # raised outside our code: not anticipated
        cli.report('meditron-train', error, debug=False)
    ours = cli.ConfigError('train.steps=0: expected >= 1')
    assert cli.report('meditron-train', ours, debug=False) == cli.EXIT_ERROR
    assert capsys.readouterr().err == 'meditron-train: error: train.steps=0: expected >= 1\n'
    with pytest.raises(cli.ConfigError):
        cli.report('meditron-train', ours, debug=True)
    assert cli.debug_requested(['prog', '--debug']) and not cli.debug_requested(['prog'])


def tiny_config(**train_overrides):
    c = configs.debug.get_config()
    c.model = base.model_config('tiny')
    c.model.vocab_size = 2048                     # the debug corpus's tokenizer
    c.data.seq_len, c.data.global_batch_size = 32, 8
    c.mesh.update(dict(data=1, fsdp=8, tensor=1))
    c.train.update(train_overrides)
    return c


@pytest.mark.parametrize('key,value,message', [
    ('steps', 0, 'train.steps=0: expected >= 1'),
    ('steps', -5, 'train.steps=-5: expected >= 1'),
    ('peak_flops_per_device', 0.0, 'train.peak_flops_per_device=0.0: expected > 0'),
])
def test_train_refuses_nothing_to_do_before_touching_the_workdir(tmp_path, key, value, message):
    workdir = tmp_path / 'run'
    with pytest.raises(ValueError) as error:
        train.train(tiny_config(**{key: value}), str(workdir))
    assert cli.one_line(error.value).startswith(message)
    assert not workdir.exists()


def test_train_checks_the_data_config_before_writing_anything(tmp_path):
    config = tiny_config(steps=1)
    config.data.tokenizer = str(tmp_path / 'no' / 'tokenizer.model')
    with pytest.raises(ValueError) as error:
        train.train(config, str(tmp_path / 'run'))
    assert cli.one_line(error.value) == (f"data.tokenizer='{config.data.tokenizer}': no such "
                                         f"file (expected a SentencePiece .model)")
    assert os.listdir(tmp_path) == []


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / 'run'
    path.write_text('notes')
    with pytest.raises(cli.ConfigError, match=r'--workdir=.*run is a file; expected a directory'):
        train.train(tiny_config(steps=1), str(path))
    assert path.read_text() == 'notes'


@pytest.mark.parametrize('flag_values,message', [
    (dict(num_devices=-1), '--num_devices=-1: expected a positive device count'),
    (dict(num_devices=0), '--num_devices=0: expected a positive device count'),
    (dict(mfu=-0.5), '--mfu=-0.5: expected a model-FLOPs utilisation in (0, 1]'),
    (dict(mfu=0.0), '--mfu=0: expected a model-FLOPs utilisation in (0, 1]'),
    (dict(mfu=1.5), '--mfu=1.5: expected a model-FLOPs utilisation in (0, 1]'),
    (dict(device_memory_gb=0.0), '--device_memory_gb=0: expected the memory of one device'),
])
def test_plan_flags_are_checked_before_compiling(flag_values, message):
    args = {**dict(num_devices=None, device_memory_gb=80.0, mfu=0.4), **flag_values}
    with pytest.raises(cli.ConfigError) as error:
        plan.check_flags(**args)
    assert str(error.value).startswith(message)
    plan.check_flags(None, 80.0, 1.0)     # the bounds themselves are fine
    n, reason = plan.default_num_devices_and_reason(configs.debug.get_config())
    assert n == 64 and '8 nodes x 8 GPUs' in reason and '--num_devices' in reason


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
    """A params checkpoint of the tiny model (random weights)."""
    cfg = model.preset('tiny')
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    path = str(tmp_path_factory.mktemp('ckpt') / 'tiny')
    params_checkpoint.save_params(path, model.init_params(cfg, mesh, seed=0), cfg)
    return path


def test_init_from_is_checked_before_data_preparation(tmp_path, tiny_checkpoint):
    """A bad init_from fails in seconds: nothing prepared, no workdir."""
    neither = tmp_path / 'neither'
    neither.mkdir()
    cases = [(str(tmp_path / 'missing'), 'no such file or directory'),
             (str(neither), 'neither a params checkpoint'),
             (tiny_checkpoint, r'model shape differs from the config: model.num_layers: '
                               r'checkpoint \d+ vs config 3')]
    for path, message in cases:
        config = tiny_config(steps=1, init_from=path)
        config.model.num_layers = 3
        config.data.dir = str(tmp_path / 'data')
        with pytest.raises(init_from.InitFromError, match=message) as error:
            train.train(config, str(tmp_path / 'run'))
        assert cli.one_line(error.value).startswith(f'train.init_from={path}: ')
        assert not (tmp_path / 'data').exists() and not (tmp_path / 'run').exists()


def test_init_from_a_training_workdir(tmp_path, tiny_checkpoint):
    """init_from accepts a training workdir (e.g. to finetune a pretraining run): the new run
    starts from its latest step's params."""
    import meditron_jax
    config = tiny_config(steps=2, init_from=tiny_checkpoint, log_every=1, eval_every=0)
    config.data.dir = prepared_debug()
    config.checkpoint.update(dict(every=2, keep=1))
    first = str(tmp_path / 'first')
    train.train(config, first)
    cfg = train.model_config(config)
    assert init_from.check(first, cfg) == cfg
    mesh = sharding.make_mesh(config.mesh)
    loaded = jax.device_get(init_from.load(first, cfg, mesh))
    saved = jax.device_get(meditron_jax.load(first).params)      # step 2, read independently
    start = jax.device_get(init_from.load(tiny_checkpoint, cfg, mesh))
    for a, b, c in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved), jax.tree.leaves(start)):
        assert (a == b).all()
    assert any((a != c).any() for a, c in zip(jax.tree.leaves(loaded), jax.tree.leaves(start)))
    # Re-running the first command resumes: its init_from is not used, nor checked, any more.
    config.train.init_from = str(tmp_path / 'moved-away')
    assert train.train(config, first) == []


def run(module, *args, env=None):
    done = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**os.environ, **(env or {})})
    # With the plan-gpu extra installed, `import jax` loads the CUDA plugin's libraries, whose C++
    # logging prints "Could not find cuda drivers" before any of our code runs (no environment
    # variable silences it); those lines are the library's, not the command's.
    lines = done.stderr.splitlines(keepends=True)
    done.stderr = ''.join(x for x in lines if not CPP_LOG_LINE.match(x))
    return done


CPP_LOG_LINE = re.compile(r'^(WARNING: All log messages before absl::InitializeLog\(\)|'
                          r'[IWE]\d{4} [\d:.]+ +\d+ \w+\.cc:\d+\])')


@pytest.mark.slow
def test_console_train_and_plan_print_one_line_and_exit_2(tmp_path):
    workdir = tmp_path / 'run'
    done = run('meditron_jax.train', '--config', 'configs/debug.py', '--workdir', str(workdir),
               '--config.train.steps=0')
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ('meditron-train: error: train.steps=0: '
                                                    'expected >= 1')
    assert 'Traceback' not in done.stderr and not workdir.exists()
    done = run('meditron_jax.plan', '--config', 'configs/meditron_7b.py', '--num_devices', '-1',
               '--config.model.foo=1')
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if line.startswith('meditron-plan')]
    assert 'model.foo is not a declared config key' in done.stderr
    assert 'Traceback' not in done.stderr and done.stdout == ''
