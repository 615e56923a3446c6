"""What a compiled program does per step, read from its optimised HLO text: the collectives
(count and bytes of all-gather, reduce-scatter and all-reduce) and its custom calls (is the
fused attention kernel there?).

Counts are per execution of the program: an op inside a while loop (the layer scan, the
gradient-accumulation scan) counts its loop's trip count times, as XLA records it
(``known_trip_count``); loops XLA does not know the trip count of count once. Bytes are the size
of the whole buffer a collective works on, per device: the gathered result of an all-gather, the
input of a reduce-scatter, the operand of an all-reduce.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce')
# cuDNN's fused attention (forward and backward) and a Mosaic TPU kernel (Pallas, e.g. splash
# attention) as they appear as custom-call targets.
FUSED_ATTENTION_TARGETS = re.compile(r'^(__cudnn\$fmha.*|tpu_custom_call)$')

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
          'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'f8e4m3fn': 1, 'f8e5m2': 1}
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z][\w\-]*)\((.*)$')
_SHAPE = re.compile(r'\b([a-z]\w*)\[([\d,]*)\]')
_CALLEES = re.compile(r'\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP_COUNT = re.compile(r'known_trip_count"?:\{"n":"(\d+)"')
_GROUPS_IOTA = re.compile(r'replica_groups=\[(\d+),(\d+)\]')
_GROUPS_LIST = re.compile(r'replica_groups=\{\{([\d,]*)\}')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_CONDITION = re.compile(r'condition=%?([\w.\-]+)')
_SCALAR_INT = re.compile(r'^s(?:32|64)\[\]')


@dataclasses.dataclass
class Collective:
    count: int = 0
    bytes: int = 0


@dataclasses.dataclass
class HloStats:
    collectives: dict[str, Collective]        # per step, by kind
    custom_calls: dict[str, int]              # custom-call target -> calls per step
    unknown_trip_counts: int                  # while loops counted once (no trip count found)

    @property
    def fused_attention_calls(self) -> dict[str, int]:
        return {t: n for t, n in self.custom_calls.items() if FUSED_ATTENTION_TARGETS.match(t)}


def _shape_bytes(text: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(',') if d) * _BYTES.get(dtype, 4)
            for dtype, dims in _SHAPE.findall(text)]


def _group_size(rest: str) -> int:
    if m := _GROUPS_IOTA.search(rest):
        return int(m.group(2))
    if m := _GROUPS_LIST.search(rest):
        return len(m.group(1).split(','))
    return 1


def _collective_bytes(kind: str, op: str, result: str, rest: str) -> int:
    sizes = _shape_bytes(result)
    if op.endswith('-start') and kind != 'all-reduce':
        # (operands, results): the whole buffer is the larger half (gathered / pre-scatter).
        half = len(sizes) // 2
        return max(sum(sizes[:half]), sum(sizes[half:]))
    if kind == 'reduce-scatter':        # the result is one shard of the reduced buffer
        return sum(sizes) * _group_size(rest)
    return sum(sizes)


_UNKNOWN = -1


def _trip_count_from_condition(condition, calls, constants, less_than) -> int | None:
    """A scan's loop as XLA leaves it: ``i < N`` with i from 0 by 1 (the form lax.scan and
    fori_loop lower to), N the one integer constant of the condition and what it calls."""
    names, found, lt = [condition], [], False
    while names:
        name = names.pop()
        found += constants.get(name, [])
        lt |= name in less_than
        names += [c for c, _ in calls.get(name, ())]
    return found[0] if lt and len(found) == 1 and found[0] > 0 else None


def parse(hlo_text: str) -> HloStats:
    """Per-step collectives and custom calls of an optimised HLO module's text."""
    ops: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)   # computation -> ops
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)  # -> (callee, times)
    constants: dict[str, list[int]] = collections.defaultdict(list)   # scalar int constants
    less_than: set[str] = set()            # computations with a '<' compare
    unknown_whiles: list[tuple[str, str, list[str]]] = []
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            if m := _COMPUTATION.match(line):
                current = m.group(1)
                if line.startswith('ENTRY'):
                    entry = current
            continue
        if line.startswith('}'):
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        result, op, rest = m.groups()
        if op == 'constant' and _SCALAR_INT.match(result):
            constants[current].append(int(rest.split(')', 1)[0]))
        if op == 'compare' and 'direction=LT' in rest:
            less_than.add(current)
        times = 1
        if op == 'while':
            if t := _TRIP_COUNT.search(rest):
                times = int(t.group(1))
            else:   # resolved from the condition below, once every computation is read
                times = _UNKNOWN
                unknown_whiles.append((current, _CONDITION.search(rest).group(1),
                                       _CALLEES.findall(rest)))
                continue
        # A while's only callee matched is its body (its condition holds no collectives).
        calls[current].extend((callee, times) for callee in _CALLEES.findall(rest))
        for group in _BRANCHES.findall(rest):
            calls[current].extend((c.strip().lstrip('%'), 1) for c in group.split(','))
        base = op.removesuffix('-start')
        if base in COLLECTIVES and not op.endswith('-done'):
            ops[current].append((base, _collective_bytes(base, op, result, rest)))
        elif op == 'custom-call' and (t := _TARGET.search(rest)):
            ops[current].append(('custom-call:' + t.group(1), 0))
    if entry is None:
        raise ValueError('hlo_stats.parse: no ENTRY computation in the HLO text')
    unknown = 0
    for caller, condition, bodies in unknown_whiles:
        times = _trip_count_from_condition(condition, calls, constants, less_than)
        unknown += times is None
        calls[caller].extend((body, times or 1) for body in bodies)

    times_run: dict[str, int] = collections.Counter()

    def visit(name: str, times: int, depth: int = 0) -> None:
        if depth > 64:      # HLO call graphs are acyclic; a cycle means a parse error
            raise ValueError(f'hlo_stats.parse: call depth over 64 at {name}')
        times_run[name] += times
        for callee, factor in calls.get(name, ()):
            visit(callee, times * factor, depth + 1)

    visit(entry, 1)
    collectives = {kind: Collective() for kind in COLLECTIVES}
    custom_calls: dict[str, int] = collections.Counter()
    for name, times in times_run.items():
        for kind, nbytes in ops.get(name, ()):
            if kind.startswith('custom-call:'):
                custom_calls[kind.removeprefix('custom-call:')] += times
            else:
                collectives[kind].count += times
                collectives[kind].bytes += times * nbytes
    return HloStats(collectives, dict(custom_calls), unknown)
