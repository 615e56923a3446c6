"""One loader per published file format, each yielding plain ``Item``s.

    medqa / medqa4   JSONL {"question", "options": {"A": ..}, "answer", "answer_idx", "meta_info"}
    medmcqa          JSON lines {"id", "question", "opa".."opd", "cop", "exp", "subject_name"}
    pubmedqa         a directory: ori_pqal.json (id -> QUESTION, CONTEXTS, final_decision,
                     LONG_ANSWER) + test_ground_truth.json (id -> label; selects the test items)
    mmlu_medical     the MMLU data directory: {test,dev}/<subject>_{test,dev}.csv, no header,
                     columns question, A, B, C, D, answer; restricted to MEDITRON's nine subjects

Bad input raises ``EvalInputError`` naming the file and line and what was expected.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

BENCHMARKS = ('medqa', 'medqa4', 'medmcqa', 'pubmedqa', 'mmlu_medical')
# Test-set sizes as published; a different count is warned about.
PUBLISHED_COUNTS = {'medqa': 1273, 'medqa4': 1273, 'medmcqa': 4183, 'pubmedqa': 500,
                    'mmlu_medical': 1871}
MMLU_MEDICAL_SUBJECTS = (
    'anatomy', 'clinical_knowledge', 'college_biology', 'college_medicine',
    'high_school_biology', 'medical_genetics', 'nutrition', 'professional_medicine', 'virology')
PUBMEDQA_LABELS = ('yes', 'no', 'maybe')
LETTERS = 'ABCDE'
_warned_missing: set[str] = set()     # a missing MMLU file is reported once per process


class EvalInputError(ValueError):
    """A benchmark file that cannot be evaluated; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Item:
    id: str
    question: str
    options: dict[str, str]          # label -> text, in label order ("A".."E" or yes/no/maybe)
    answer: str                      # the gold label
    context: str | None = None       # PubMedQA's abstract (CONTEXTS joined by newlines)
    subject: str | None = None       # MMLU subject / MedMCQA subject_name
    explanation: str | None = None   # MedMCQA's exp, PubMedQA's LONG_ANSWER (for SFT data)


def _read_json_lines(path: str) -> list[tuple[int, dict]]:
    if not os.path.isfile(path):
        raise EvalInputError(f'{path}: no such file')
    rows = []
    with open(path, encoding='utf-8') as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalInputError(f'{path}:{line_no}: not valid JSON ({e.msg})') from None
            if not isinstance(row, dict):
                raise EvalInputError(f'{path}:{line_no}: expected a JSON object per line')
            rows.append((line_no, row))
    if not rows:
        raise EvalInputError(f'{path}: empty file (expected one JSON object per line)')
    return rows


def _field(row: Mapping, key: str, where: str, kind=str):
    if key not in row:
        raise EvalInputError(f'{where}: missing field {key!r}')
    value = row[key]
    if kind is str and not isinstance(value, str):
        raise EvalInputError(f'{where}: field {key!r} should be a string, got {value!r:.80}')
    return value


def load_medqa(path: str, num_options: int = 5) -> list[Item]:
    """MedQA-USMLE JSONL (5 options; ``num_options=4`` for the 4-option file)."""
    labels = LETTERS[:num_options]
    items = []
    for line_no, row in _read_json_lines(path):
        where = f'{path}:{line_no}'
        question = _field(row, 'question', where)
        options = _field(row, 'options', where, kind=dict)
        if not isinstance(options, dict) or sorted(options) != list(labels):
            got = sorted(options) if isinstance(options, dict) else options
            raise EvalInputError(f'{where}: expected {num_options} options {list(labels)}, '
                                 f'got {got}')
        answer = _field(row, 'answer_idx', where)
        if answer not in options:
            raise EvalInputError(f'{where}: answer_idx {answer!r} is not among the options '
                                 f'{list(labels)}')
        if 'answer' in row and row['answer'] != options[answer]:
            log.warning('%s: answer text %r differs from option %s %r', where,
                        row['answer'], answer, options[answer])
        items.append(Item(id=str(row.get('id', line_no)), question=question,
                          options={k: str(options[k]) for k in labels}, answer=answer))
    return items


def detect_cop_base(rows: Sequence[tuple[int, dict]], path: str, cop_base: int | None) -> int:
    """0 if any cop is 0, 1 if any is 4, else ``cop_base`` (required then)."""
    cops = {row.get('cop') for _, row in rows}
    if 0 in cops and 4 in cops:
        raise EvalInputError(f'{path}: cop takes both 0 and 4; expected 0-3 or 1-4')
    detected = 0 if 0 in cops else 1 if 4 in cops else None
    if detected is not None and cop_base is not None and detected != cop_base:
        raise EvalInputError(f'{path}: --cop_base {cop_base} but the file\'s cop values are '
                             f'{detected}-based')
    if detected is None and cop_base is None:
        raise EvalInputError(f'{path}: cannot tell whether cop is 0-based or 1-based (no 0 and '
                             f'no 4 among {sorted(map(str, cops))}); pass --cop_base 0 or 1')
    return detected if detected is not None else cop_base


def load_medmcqa(path: str, cop_base: int | None = None) -> list[Item]:
    """MedMCQA JSON lines; ``cop`` 1-4 (original release) or 0-3 (Hugging Face), detected."""
    rows = _read_json_lines(path)
    for line_no, row in rows:
        where = f'{path}:{line_no}'
        cop = _field(row, 'cop', where, kind=int)
        if isinstance(cop, bool) or not isinstance(cop, int) or not 0 <= cop <= 4:
            raise EvalInputError(f'{where}: cop {cop!r} is not an option index (0-3 or 1-4)')
    base = detect_cop_base(rows, path, cop_base)
    items = []
    for line_no, row in rows:
        where = f'{path}:{line_no}'
        options = {label: str(_field(row, key, where, kind=object))
                   for label, key in zip('ABCD', ('opa', 'opb', 'opc', 'opd'))}
        index = row['cop'] - base
        if not 0 <= index < 4:
            raise EvalInputError(f'{where}: cop {row["cop"]} is not among the 4 options '
                                 f'({base}-based)')
        items.append(Item(id=str(row.get('id', line_no)), question=_field(row, 'question', where),
                          options=options, answer='ABCD'[index],
                          subject=row.get('subject_name'), explanation=row.get('exp') or None))
    return items


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise EvalInputError(f'{path}: no such file')
    with open(path, encoding='utf-8') as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise EvalInputError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None
    if not isinstance(data, dict) or not data:
        raise EvalInputError(f'{path}: expected a non-empty JSON object (id -> entry)')
    return data


def _pubmedqa_item(pqal_path: str, pmid: str, entry, answer: str) -> Item:
    where = f'{pqal_path}: entry {pmid}'
    if not isinstance(entry, dict):
        raise EvalInputError(f'{where}: expected an object')
    contexts = _field(entry, 'CONTEXTS', where, kind=list)
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise EvalInputError(f'{where}: CONTEXTS should be a list of strings')
    if answer not in PUBMEDQA_LABELS:
        raise EvalInputError(f'{where}: answer {answer!r} is not among the options '
                             f'{list(PUBMEDQA_LABELS)}')
    return Item(id=pmid, question=_field(entry, 'QUESTION', where),
                options={label: label for label in PUBMEDQA_LABELS}, answer=answer,
                context='\n'.join(contexts), explanation=entry.get('LONG_ANSWER') or None)


def load_pubmedqa(directory: str, split: str = 'test') -> list[Item]:
    """PubMedQA PQA-L. ``test``: the ids of test_ground_truth.json, labelled by it; ``train``:
    the other ori_pqal.json items, labelled by their final_decision (few-shot pool / SFT)."""
    pqal_path = os.path.join(directory, 'ori_pqal.json')
    truth_path = os.path.join(directory, 'test_ground_truth.json')
    pqal = _read_json(pqal_path)
    truth = _read_json(truth_path) if split == 'test' or os.path.isfile(truth_path) else {}
    if split == 'test':
        missing = [pmid for pmid in truth if pmid not in pqal]
        if missing:
            raise EvalInputError(f'{truth_path}: ids {missing[:5]} are not in {pqal_path}')
        return [_pubmedqa_item(pqal_path, pmid, pqal[pmid], label)
                for pmid, label in truth.items()]
    items = []
    for pmid, entry in pqal.items():
        if pmid in truth:
            continue
        where = f'{pqal_path}: entry {pmid}'
        answer = _field(entry, 'final_decision', where) if isinstance(entry, dict) else None
        items.append(_pubmedqa_item(pqal_path, pmid, entry, answer))
    if not items:
        raise EvalInputError(f'{pqal_path}: no items outside {truth_path} to draw from')
    return items


def load_mmlu(directory: str, split: str = 'test',
              subjects: Sequence[str] = MMLU_MEDICAL_SUBJECTS) -> list[Item]:
    """MMLU csvs of the given subjects; a missing subject is skipped with a warning."""
    items, found = [], []
    for subject in subjects:
        path = os.path.join(directory, split, f'{subject}_{split}.csv')
        if not os.path.isfile(path):
            if path not in _warned_missing:
                log.warning('MMLU subject %s: %s not found, skipped', subject, path)
                _warned_missing.add(path)
            continue
        found.append(subject)
        with open(path, encoding='utf-8', newline='') as f:
            rows = list(csv.reader(f))
        if not rows:
            raise EvalInputError(f'{path}: empty file (expected rows question,A,B,C,D,answer)')
        for line_no, row in enumerate(rows, 1):
            where = f'{path}:{line_no}'
            if len(row) != 6:
                raise EvalInputError(f'{where}: expected 6 columns (question, A, B, C, D, '
                                     f'answer), got {len(row)}')
            if row[5] not in 'ABCD' or len(row[5]) != 1:
                raise EvalInputError(f'{where}: answer {row[5]!r} is not among the options '
                                     f'A-D')
            items.append(Item(id=f'{subject}-{line_no}', question=row[0],
                              options=dict(zip('ABCD', row[1:5])), answer=row[5],
                              subject=subject))
    if not found:
        raise EvalInputError(f'{directory}: none of the MMLU subjects {list(subjects)} has a '
                             f'{split}/<subject>_{split}.csv')
    return items


def load(benchmark: str, path: str, split: str = 'test', cop_base: int | None = None
         ) -> list[Item]:
    """The items of one benchmark file (or directory, for pubmedqa and mmlu_medical)."""
    if benchmark in ('medqa', 'medqa4'):
        items = load_medqa(path, 5 if benchmark == 'medqa' else 4)
    elif benchmark == 'medmcqa':
        items = load_medmcqa(path, cop_base)
    elif benchmark == 'pubmedqa':
        items = load_pubmedqa(path, split)
    elif benchmark == 'mmlu_medical':
        items = load_mmlu(path, split)
    else:
        raise EvalInputError(f'unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}')
    seen = set()
    for item in items:      # predictions are matched to items by id, never by prompt text
        if item.id in seen:
            raise EvalInputError(f'{path}: id {item.id!r} appears more than once')
        seen.add(item.id)
    return items


def check_count(benchmark: str, items: Sequence[Item], limit: int | None = None) -> None:
    """Prints the item count; warns when it differs from the published test-set size."""
    expected = PUBLISHED_COUNTS.get(benchmark)
    print(f'{benchmark}: {len(items)} items' + (f' (first {limit})' if limit else ''))
    if expected is not None and len(items) != expected and not limit:
        log.warning('%s: %d items, the published test set has %d', benchmark, len(items),
                    expected)
