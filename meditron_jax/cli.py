"""One-line errors for the commands (meditron-train, meditron-plan, meditron-prepare).

An *anticipated* error is printed as ``tool: error: message`` on one line and the command exits
with status 2 (``EXIT_ERROR``): a bad config key or value, a bad path or input file, a flag out of
range. Those are the errors our own code raises with a message naming the key, file or line
(any exception class defined in meditron_jax, or a ValueError / RuntimeError / OSError raised
from a meditron_jax or configs frame), an OSError naming a file, a flag parsing error, and a
config key that configs/base.py does not declare (the base config is locked). Anything else (a
bug, a failure inside a library) keeps its traceback. ``--debug`` or ``MEDITRON_DEBUG=1`` shows
the traceback of every error.

Undeclared config keys are named with their full dotted path, where they were set (the config
file's line, or the ``--config.KEY`` flag) and the nearest declared key (difflib).
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

import absl
import ml_collections

import configs
import meditron_jax

DEBUG_ENV = 'MEDITRON_DEBUG'
EXIT_ERROR = 2
DEBUG_HELP = 'Show the traceback of anticipated errors too (also MEDITRON_DEBUG=1).'
_OWN_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                  for m in (meditron_jax, configs))
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                      for m in (ml_collections, absl))
_MESSAGE_TYPES = (ValueError, RuntimeError, OSError, ArithmeticError)


class ConfigError(ValueError):
    """A config key or value that is not what the code expects; the message names the key."""


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv if argv is None else argv
    flag = any(a in ('--debug', '--debug=true', '--debug=1', '--debug=True') for a in argv)
    return flag or os.environ.get(DEBUG_ENV, '') not in ('', '0')


def _in_own_code(filename: str) -> bool:
    return os.path.abspath(filename).startswith(_OWN_DIRS)


# ----------------------------------------------------------------------- undeclared keys


def _path_of(root, target, prefix: str = '') -> str | None:
    """Dotted path of the ConfigDict ``target`` inside ``root`` (identity), or None."""
    if root is target:
        return prefix
    if isinstance(root, ml_collections.ConfigDict):
        for key in root.keys():
            found = _path_of(root[key], target, f'{prefix}{key}.')
            if found is not None:
                return found
    return None


def nearest(key: str, candidates: Sequence[str]) -> tuple[str | None, float]:
    """The most similar candidate (difflib) and its similarity in [0, 1]."""
    scored = [(difflib.SequenceMatcher(None, key, c).ratio(), c) for c in sorted(candidates)]
    ratio, best = max(scored, default=(0.0, None), key=lambda rc: rc[0])
    return best, ratio


def undeclared_message(where: str, section: str, key: str, declared: Sequence[str]) -> str:
    guess, ratio = nearest(key, declared)
    text = f'{where}: {section}{key} is not a declared config key'
    if guess is not None and ratio >= 0.6:
        return f'{text}; did you mean {section}{guess}? (configs/base.py declares every key)'
    scope = f'section {section[:-1]}' if section else 'the config'
    nearest_text = f'; the nearest is {section}{guess}' if guess is not None else ''
    return (f'{text}{nearest_text} ({scope} declares {", ".join(sorted(declared))}; see '
            f'configs/base.py)')


def _override_error(exc: BaseException) -> str | None:
    """``--config.a.b=v`` naming a key the loaded config lacks (found while parsing flags)."""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        local = frame.f_locals
        if frame.f_code.co_name == '_parse' and 'overrides' in local and 'config' in local:
            config = local['config']
            if not isinstance(config, ml_collections.ConfigDict):
                return None
            for path in [local.get('field_path') or '', *local['overrides']]:
                node, section = config, ''
                for part in path.split('.') if path else []:
                    if not isinstance(node, ml_collections.ConfigDict):
                        break
                    if part not in node:
                        return undeclared_message(f'--config.{path}', section, part,
                                                  node.keys())
                    node, section = node[part], f'{section}{part}.'
            return None
    return None


def _config_file_error(exc: BaseException) -> str | None:
    """A config file setting (or reading) a key its locked section does not declare."""
    frames = list(traceback.walk_tb(exc.__traceback__))
    if isinstance(exc.__context__, KeyError):     # ConfigDict.__setattr__ re-raises KeyErrors
        frames += list(traceback.walk_tb(exc.__context__.__traceback__))
    for i, (frame, _) in enumerate(frames):
        local = frame.f_locals
        if frame.f_code.co_name not in ('__setitem__', '__getitem__'):
            continue
        target, key = local.get('self'), local.get('key')
        if not isinstance(target, ml_collections.ConfigDict) or not isinstance(key, str):
            continue
        if key in target or '.' in key:
            continue
        # The innermost caller outside ml_collections: the config file's line.
        callers = [(f, n) for f, n in frames[:i]
                   if not os.path.abspath(f.f_code.co_filename).startswith(_LIBRARY_DIRS)]
        if not callers:
            return None
        caller, line = callers[-1]
        section = ''
        for value in caller.f_locals.values():
            found = _path_of(value, target)
            if found:
                section = found
                break
        return undeclared_message(f'{caller.f_code.co_filename}:{line}', section, key,
                                  target.keys())
    return None


def _config_file_failure(exc: BaseException) -> str | None:
    """config_flags reports a TypeError / ValueError raised while running a config file as the
    whole traceback in one message: keep the config file's line and the original message."""
    if 'Error whilst parsing config file' not in str(exc):
        return None
    cause = exc.__context__
    while cause is not None:
        frames = [(f, n) for f, n in traceback.walk_tb(cause.__traceback__)
                  if not os.path.abspath(f.f_code.co_filename).startswith(_LIBRARY_DIRS)]
        if frames and 'Error whilst parsing config file' not in str(cause):
            frame, line = frames[-1]
            return f'{frame.f_code.co_filename}:{line}: {type(cause).__name__}: {cause}'
        cause = cause.__context__
    return None


def check_declared(config: ml_collections.ConfigDict, where: str = 'config') -> None:
    """Every key of ``config`` is one configs/base.py declares, and none is missing: catches a
    derived config that replaced a whole section (``c.data.clean = dict(...)``)."""
    from configs import base

    def walk(node, reference, prefix):
        for key in node.keys():
            if key not in reference:
                raise ConfigError(undeclared_message(where, prefix, key, reference.keys()))
        for key in reference.keys():
            if key not in node:
                raise ConfigError(f'{where}: {prefix}{key} is missing (configs/base.py declares '
                                  f'it); update a section key by key instead of replacing it')
            if isinstance(reference[key], ml_collections.ConfigDict):
                if not isinstance(node[key], ml_collections.ConfigDict):
                    raise ConfigError(f'{where}: {prefix}{key} is a section in configs/base.py, '
                                      f'got {type(node[key]).__name__}')
                walk(node[key], reference[key], f'{prefix}{key}.')

    walk(config, base.get_config(), '')


# ----------------------------------------------------------------------- reporting


def one_line(exc: BaseException) -> str | None:
    """The one-line message of an anticipated error, or None (show the traceback)."""
    from absl import app, flags
    if isinstance(exc, (KeyError, AttributeError)):
        message = _override_error(exc) or _config_file_error(exc)
        if message is not None:
            return message
    if isinstance(exc, (flags.Error, app.UsageError)):
        text = _config_file_failure(exc) or str(exc)
    elif type(exc).__module__.startswith(('meditron_jax', 'configs')):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.filename:
        text = str(exc)
    elif isinstance(exc, OSError) and 'Failed loading config file' in str(exc):
        text = '--config: ' + str(exc).strip().splitlines()[-1].strip()  # config_flags' report
    elif isinstance(exc, _MESSAGE_TYPES):
        frames = list(traceback.walk_tb(exc.__traceback__))
        if not frames or not _in_own_code(frames[-1][0].f_code.co_filename):
            return None
        text = str(exc)
    else:
        return None
    return ' '.join(part.strip() for part in text.splitlines() if part.strip())


def report(prog: str, exc: BaseException, debug: bool) -> int:
    """Prints the error (one line, or the traceback); returns the exit status, or re-raises."""
    message = None if debug else one_line(exc)
    if message is None:
        raise exc
    print(f'{prog}: error: {message}', file=sys.stderr, flush=True)
    return EXIT_ERROR


def guarded(prog: str, fn: Callable, *args, debug: bool | None = None):
    """fn(*args), turning an anticipated error into ``prog: error: ...`` and SystemExit(2)."""
    debug = debug_requested() if debug is None else debug
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- report() re-raises what it does not recognise
        sys.exit(report(prog, e, debug))


def run_absl(prog: str, main: Callable, argv: list[str] | None = None) -> None:
    """absl's app.run(main) with one-line errors from flag parsing and from main."""
    from absl import app, flags
    argv = list(sys.argv if argv is None else argv)
    debug = debug_requested(argv)
    app.run(lambda args: guarded(prog, main, args, debug=debug), argv=argv,
            flags_parser=lambda a: guarded(prog, flags.FLAGS, a, debug=debug))
