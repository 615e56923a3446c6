"""Where the converters and ``save_params`` write: refused when it would destroy data.

Rules (whatever the flags):
* the destination must not be the source, contain it, or lie inside it (real paths, symlinks
  resolved);
* a non-empty destination is replaced (``force``) only when it is a previous output of the same
  kind written by this tool: it carries ``.meditron-output.json`` (kind and the entries written)
  and holds nothing else, or, for params checkpoints written before the marker existed, a valid
  ``meditron_params.json``. Any other directory is refused, with or without ``force``;
* output is written to a sibling temp dir and renamed into place when complete; the old output
  is moved aside first and deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable

MARKER = '.meditron-output.json'
LEGACY_PARAMS_FILE = 'meditron_params.json'
LEGACY_PARAMS_ENTRIES = (LEGACY_PARAMS_FILE, 'params', 'tokenizer.model')
KINDS = {'params': 'params checkpoint', 'hf': 'HF export', 'meta': 'Meta export'}


class DestinationError(FileExistsError):
    """A destination that writing there would destroy data that is not ours to replace."""


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_overlap(dst: str, sources: Iterable[str | os.PathLike]) -> None:
    real = _real(dst)
    for src in sources:
        s = _real(src)
        if _inside(real, s) or _inside(s, real):
            how = ('is the source' if real == s else
                   'lies inside the source' if _inside(real, s) else 'contains the source')
            raise DestinationError(
                f'destination {dst} {how} {src} (real paths {real}, {s}): writing there would '
                f'destroy the input; choose a destination outside it')


def previous_output_kind(path: str) -> tuple[str | None, list[str]]:
    """(kind written there by this tool or None, entries not written by it)."""
    entries = sorted(os.listdir(path))
    marker = os.path.join(path, MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker) as f:
                info = json.load(f)
            kind, written = info['kind'], set(info['entries']) | {MARKER}
        except (ValueError, KeyError, TypeError):
            return None, entries
        return kind, [e for e in entries if e not in written]
    legacy = os.path.join(path, LEGACY_PARAMS_FILE)   # a params checkpoint from before the marker
    if os.path.isfile(legacy):
        try:
            with open(legacy) as f:
                ours = json.load(f).get('format') == 'meditron_jax.params'
        except (ValueError, OSError, AttributeError):
            ours = False
        if ours:
            return 'params', [e for e in entries if e not in LEGACY_PARAMS_ENTRIES]
    return None, entries


def check_destination(dst: str | os.PathLike, kind: str, force: bool,
                      sources: Iterable[str | os.PathLike] = ()) -> str:
    """Refuses a destination that is or overlaps a source, that is not a directory, or that is
    non-empty and not replaceable; returns its real path."""
    assert kind in KINDS, kind
    check_overlap(os.fspath(dst), sources)
    path = _real(dst)
    if not os.path.lexists(path):
        return path
    if not os.path.isdir(path):
        raise DestinationError(f'destination {dst} exists and is not a directory')
    if not os.listdir(path):
        return path
    found, foreign = previous_output_kind(path)
    what = KINDS[kind]
    if found == kind and not foreign:
        if not force:
            raise DestinationError(f'destination {dst} holds a previous {what}; pass --force '
                                   f'(force=True) to replace it')
        return path
    if found == kind:
        why = (f'holds a previous {what} plus entries this tool did not write: '
               f'{foreign[:5]}{" ..." if len(foreign) > 5 else ""}; move them away or choose '
               f'another destination')
    elif found is not None:
        why = f'holds a {KINDS.get(found, found)}, not a {what}; choose another destination'
    else:
        why = (f'is not empty and is not an output of meditron-convert (no {MARKER}); '
               f'--force replaces only a previous {what}: choose a new or empty directory')
    raise DestinationError(f'destination {dst} {why}')


def prepare_destination(dst: str | os.PathLike, force: bool, kind: str,
                        sources: Iterable[str | os.PathLike] = ()) -> tuple[str, str]:
    """Checks ``dst`` (check_destination) and returns (final path, fresh temp dir beside it)."""
    path = check_destination(dst, kind, force, sources)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent,
                       f'.{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')
    os.makedirs(tmp)
    return path, tmp


def finish_destination(tmp: str, path: str, kind: str) -> None:
    """Marks the complete temp dir as ours and moves it into place. An old output (checked
    replaceable before) is renamed aside first and deleted only once the new one is in place;
    if the swap fails the old one is put back."""
    with open(os.path.join(tmp, MARKER), 'w') as f:
        json.dump({'kind': kind, 'entries': sorted(os.listdir(tmp))}, f)
    if not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path)):
        if os.path.isdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
        return
    old = tmp + '.old'
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old)
