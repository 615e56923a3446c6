"""Writes the small corpus shipped under meditron_jax/data/corpus/ (original, synthetic text).

    python scripts/make_corpus.py            # rewrites meditron_jax/data/corpus/*/*.jsonl

Every document is composed here from this file's own templates and word lists with a seeded RNG,
so the output is the same on every run and contains no third-party text. Three sources, in the
shape of MEDITRON's GAP-Replay mixture: clinical-guideline-style documents (sections marked with
``#``), abstract-style documents (background / methods / results / conclusions) and
general-knowledge "replay" documents. A few documents are planted for the cleaning and dedup
steps to find: exact duplicates (one differing only in whitespace and case), near duplicates (one
word changed), documents with URLs and a "References" section, and documents too short to keep.
The medical statements are invented for language modelling; they are not medical advice.
"""

from __future__ import annotations

import json
import os
import random

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   'meditron_jax', 'data', 'corpus')

CONDITIONS = [
    ('community-acquired pneumonia', 'respiratory'), ('type 2 diabetes', 'metabolic'),
    ('essential hypertension', 'cardiovascular'), ('heart failure with reduced ejection fraction',
                                                   'cardiovascular'),
    ('atrial fibrillation', 'cardiovascular'), ('chronic kidney disease', 'renal'),
    ('asthma', 'respiratory'), ('chronic obstructive pulmonary disease', 'respiratory'),
    ('sepsis', 'infectious'), ('urinary tract infection', 'infectious'),
    ('iron deficiency anaemia', 'haematological'), ('venous thromboembolism', 'haematological'),
    ('migraine', 'neurological'), ('acute ischaemic stroke', 'neurological'),
    ('major depressive disorder', 'psychiatric'), ('generalised anxiety disorder', 'psychiatric'),
    ('osteoporosis', 'musculoskeletal'), ('rheumatoid arthritis', 'musculoskeletal'),
    ('gout', 'musculoskeletal'), ('hypothyroidism', 'endocrine'),
    ('gestational diabetes', 'obstetric'), ('pre-eclampsia', 'obstetric'),
    ('bronchiolitis', 'paediatric'), ('acute otitis media', 'paediatric'),
    ('malaria', 'infectious'), ('tuberculosis', 'infectious'), ('hepatitis C', 'infectious'),
    ('cellulitis', 'dermatological'), ('psoriasis', 'dermatological'),
    ('acute pancreatitis', 'gastrointestinal'), ('peptic ulcer disease', 'gastrointestinal'),
    ('inflammatory bowel disease', 'gastrointestinal'), ('delirium', 'geriatric'),
    ('dementia', 'geriatric'), ('chronic low back pain', 'musculoskeletal'),
    ('acute kidney injury', 'renal'), ('diabetic ketoacidosis', 'metabolic'),
    ('obstructive sleep apnoea', 'respiratory'), ('glaucoma', 'ophthalmic'),
    ('neonatal jaundice', 'paediatric'),
]
DRUGS = [
    'amoxicillin', 'doxycycline', 'metformin', 'empagliflozin', 'lisinopril', 'amlodipine',
    'bisoprolol', 'apixaban', 'warfarin', 'furosemide', 'spironolactone', 'salbutamol',
    'budesonide', 'tiotropium', 'ceftriaxone', 'nitrofurantoin', 'ferrous sulfate',
    'enoxaparin', 'sumatriptan', 'alteplase', 'sertraline', 'escitalopram', 'alendronate',
    'methotrexate', 'allopurinol', 'colchicine', 'levothyroxine', 'insulin glargine',
    'labetalol', 'magnesium sulfate', 'artemether', 'rifampicin', 'sofosbuvir',
    'flucloxacillin', 'omeprazole', 'mesalazine', 'haloperidol', 'donepezil', 'paracetamol',
    'ibuprofen', 'atorvastatin', 'clopidogrel', 'prednisolone', 'hydroxychloroquine',
]
POPULATIONS = [
    'adults in primary care', 'older adults', 'hospitalised adults', 'children under five',
    'adolescents', 'pregnant women', 'adults with multimorbidity', 'patients in intensive care',
    'outpatients', 'residents of long-term care facilities', 'adults with obesity',
    'people living in rural areas',
]
ORGS = [
    'the Regional Clinical Standards Board', 'the Joint Committee on Therapeutics',
    'the National Primary Care Panel', 'the Hospital Medicine Working Group',
    'the Paediatric Practice Council', 'the Society for Evidence-Based Care',
    'the Northern Health Collaborative', 'the Consensus Group on Chronic Disease',
]
TESTS = [
    'full blood count', 'serum creatinine', 'estimated glomerular filtration rate',
    'glycated haemoglobin', 'C-reactive protein', 'chest radiograph', 'electrocardiogram',
    'echocardiogram', 'urine dipstick', 'blood cultures', 'serum ferritin', 'lipid profile',
    'thyroid-stimulating hormone', 'liver function tests', 'pulse oximetry', 'spirometry',
    'bone density scan', 'computed tomography of the head', 'serum lactate', 'D-dimer',
]
OUTCOMES = [
    'all-cause mortality', 'hospital readmission', 'length of stay', 'symptom control',
    'quality of life', 'treatment adherence', 'adverse drug events', 'time to recovery',
    'functional independence', 'progression to severe disease', 'emergency department visits',
    'glycaemic control', 'blood pressure control', 'exacerbation rate',
]
DESIGNS = [
    'a randomised controlled trial', 'a prospective cohort study', 'a retrospective cohort study',
    'a cross-sectional survey', 'a case-control study', 'a cluster randomised trial',
    'a systematic review and meta-analysis', 'a pragmatic multicentre trial',
    'a quality improvement study', 'a secondary analysis of registry data',
]
SETTINGS = [
    'three teaching hospitals', 'twelve general practices', 'a tertiary referral centre',
    'community health clinics', 'a national insurance database', 'two district hospitals',
    'an urban emergency department', 'rural health posts', 'a network of pharmacies',
]
STRENGTH = ['strong recommendation, high-certainty evidence',
            'strong recommendation, moderate-certainty evidence',
            'conditional recommendation, low-certainty evidence',
            'conditional recommendation, very low-certainty evidence',
            'good practice statement']
VERBS_REC = ['Offer', 'Consider', 'Do not routinely offer', 'Start', 'Review', 'Avoid',
             'Reassess', 'Discuss']


def pct(rng, lo=5, hi=95):
    return f'{rng.uniform(lo, hi):.1f}%'


def guideline(rng: random.Random, i: int) -> dict:
    cond, system = rng.choice(CONDITIONS)
    pop = rng.choice(POPULATIONS)
    org = rng.choice(ORGS)
    drugs = rng.sample(DRUGS, 4)
    tests = rng.sample(TESTS, 3)
    year = rng.randint(2009, 2023)
    title = f'Management of {cond} in {pop}: {rng.choice(["recommendations", "guideline", "consensus statement", "practice update"])} ({year})'
    parts = [f'# Scope',
             f'This document from {org} covers the assessment and treatment of {cond} in {pop}. '
             f'It replaces the {rng.choice(["previous", "interim", "earlier"])} version and applies '
             f'to {rng.choice(["all clinicians", "nurses and physicians", "prescribers", "multidisciplinary teams"])} '
             f'who care for people with {system} conditions.',
             '## Assessment']
    for t in tests:
        parts.append(rng.choice([
            f'Measure the {t} at the first visit and again after {rng.randint(2, 12)} weeks if symptoms persist.',
            f'A {t} is recommended when the diagnosis of {cond} is uncertain.',
            f'Do not request a {t} routinely unless the result would change management.',
            f'Interpret the {t} together with the clinical history, because isolated values are often misleading.',
        ]))
    parts.append('## Recommendations')
    for k in range(rng.randint(3, 6)):
        d = drugs[k % len(drugs)]
        verb = rng.choice(VERBS_REC)
        dose = f'{rng.choice([5, 10, 20, 25, 40, 50, 100, 250, 500])} mg {rng.choice(["once daily", "twice daily", "three times daily", "weekly"])}'
        line = rng.choice([
            f'{verb} {d} at {dose} for {pop} with {cond}, adjusting the dose to renal function.',
            f'{verb} {d} when first-line treatment has not controlled {cond} after {rng.randint(2, 8)} weeks.',
            f'{verb} {d} in combination with lifestyle advice; typical starting dose {dose}.',
            f'{verb} {d} if the risk of bleeding or falls is high, and record the reason in the notes.',
        ])
        parts.append(f'{k + 1}. {line} ({rng.choice(STRENGTH)}.)')
    parts.append('## Monitoring')
    parts.append(f'Follow up within {rng.randint(1, 6)} weeks. Check {tests[0]} and '
                 f'{rng.choice(OUTCOMES)} at each review. About {pct(rng)} of {pop} need a change '
                 f'of treatment in the first year.')
    if rng.random() < 0.5:
        parts.append('## Referral')
        parts.append(f'Refer to a specialist when {cond} does not respond to two treatment '
                     f'steps, when {rng.choice(OUTCOMES)} worsens, or when the person is '
                     f'{rng.choice(["pregnant", "frail", "under 16", "taking more than five medicines"])}.')
    return dict(id=f'gl-{i:04d}', title=title, text='\n\n'.join(parts))


def abstract(rng: random.Random, i: int) -> dict:
    cond, _ = rng.choice(CONDITIONS)
    drug, comp = rng.sample(DRUGS, 2)
    design = rng.choice(DESIGNS)
    pop = rng.choice(POPULATIONS)
    n = rng.randint(40, 9000)
    outcome = rng.choice(OUTCOMES)
    rr = rng.uniform(0.55, 1.35)
    lo, hi = rr * rng.uniform(0.7, 0.95), rr * rng.uniform(1.05, 1.4)
    p = rng.choice(['p<0.001', 'p=0.01', 'p=0.03', 'p=0.21', 'p=0.48', 'p=0.002'])
    better = rr < 1
    title = rng.choice([
        f'{drug.capitalize()} versus {comp} for {cond} in {pop}',
        f'Effect of {drug} on {outcome} in {cond}: {design.split(" ", 1)[1]}',
        f'{outcome.capitalize()} after {cond} among {pop}',
        f'Predictors of {outcome} in {cond}',
    ])
    background = rng.choice([
        f'The best treatment for {cond} in {pop} is uncertain.',
        f'{cond.capitalize()} is a common cause of {rng.choice(OUTCOMES)} in {pop}.',
        f'Evidence comparing {drug} with {comp} for {cond} is limited.',
        f'Few studies have examined {outcome} in {pop} with {cond}.',
    ])
    methods = (f'We conducted {design} in {rng.choice(SETTINGS)}. A total of {n} participants '
               f'with {cond} were {rng.choice(["randomly assigned to", "treated with", "followed after starting"])} '
               f'{drug} or {comp} for {rng.randint(4, 104)} weeks. The primary outcome was {outcome}.')
    results = (f'Mean age was {rng.randint(4, 82)} years and {pct(rng, 30, 70)} were women. '
               f'{outcome.capitalize()} occurred in {pct(rng, 2, 40)} of the {drug} group and '
               f'{pct(rng, 2, 40)} of the {comp} group (relative risk {rr:.2f}, 95% confidence '
               f'interval {lo:.2f} to {hi:.2f}; {p}).')
    if rng.random() < 0.6:
        results += (f' Serious adverse events were reported in {rng.randint(0, 60)} participants, '
                    f'most often {rng.choice(["nausea", "dizziness", "rash", "hypoglycaemia", "headache", "diarrhoea"])}.')
    conclusion = (f'In {pop} with {cond}, {drug} '
                  + (f'reduced {outcome} compared with {comp}.' if better and 'p=0.' not in p[:4]
                     else f'did not clearly change {outcome} compared with {comp}.')
                  + rng.choice([' Larger trials are needed.', ' These findings support current practice.',
                                ' Cost-effectiveness should be assessed.', '']))
    text = (f'Background: {background}\nMethods: {methods}\nResults: {results}\n'
            f'Conclusions: {conclusion}')
    return dict(id=f'ab-{i:05d}', title=title, text=text)


PLACES = ['a river delta', 'a mountain valley', 'a coastal city', 'a desert plateau', 'an island chain',
          'a northern forest', 'a lake basin', 'a volcanic region']
TOPICS = [
    ('bread', 'Bread is made by mixing flour, water and salt, then letting yeast ferment the dough '
              'so that it rises before baking.'),
    ('tides', 'Tides rise and fall twice a day because the gravity of the moon and the sun pulls '
              'on the oceans as the earth turns.'),
    ('bridges', 'An arch bridge carries its load outward along the curve into supports at each end, '
                'which is why stone arches can stand for centuries.'),
    ('bees', 'Honey bees live in colonies with one queen, many workers and a few drones, and they '
             'share the location of flowers through a dance.'),
    ('glass', 'Glass is made by melting sand with soda and lime and cooling the liquid quickly '
              'enough that it does not form crystals.'),
    ('maps', 'A map projection flattens the curved surface of the earth, so every flat map '
             'distorts area, shape, distance or direction.'),
    ('clocks', 'A pendulum clock keeps time because a pendulum of fixed length swings with a '
               'nearly constant period.'),
    ('rain', 'Rain forms when water vapour cools, condenses on tiny particles and grows into drops '
             'heavy enough to fall.'),
    ('libraries', 'Libraries sort books by subject so that readers can find related works on '
                  'neighbouring shelves.'),
    ('chess', 'In chess each side starts with sixteen pieces, and the game ends when one king is '
              'attacked and cannot escape.'),
    ('volcanoes', 'Volcanoes form where molten rock reaches the surface, often along the edges of '
                  'tectonic plates.'),
    ('coffee', 'Coffee beans are the roasted seeds of a shrub; roasting darkens them and creates '
               'most of their aroma.'),
]
CONNECTIVES = ['In many places', 'Historically', 'Today', 'In schools', 'For travellers',
               'In older texts', 'Among engineers', 'In everyday life']


def replay(rng: random.Random, i: int) -> dict:
    name, fact = rng.choice(TOPICS)
    other_name, other_fact = rng.choice(TOPICS)
    sents = [fact]
    for _ in range(rng.randint(4, 8)):
        sents.append(rng.choice([
            f'{rng.choice(CONNECTIVES)}, people who study {name} compare examples from {rng.choice(PLACES)}.',
            f'A simple experiment with {name} takes about {rng.randint(2, 90)} minutes and needs little equipment.',
            f'Records from {rng.randint(1450, 1990)} describe how {name} changed life in {rng.choice(PLACES)}.',
            f'The idea is related to {other_name}: {other_fact[0].lower()}{other_fact[1:]}',
            f'{rng.choice(CONNECTIVES)}, the word for {name} comes from an older word meaning "{rng.choice(["to gather", "to turn", "bright", "small", "to carry", "water"])}".',
            f'Roughly {rng.randint(2, 97)} out of a hundred visitors to {rng.choice(PLACES)} ask about {name}.',
        ]))
    return dict(id=f'rp-{i:04d}', title=f'About {name}', text=' '.join(sents))


def with_links_and_references(rng: random.Random, doc: dict) -> dict:
    """A copy with URLs in the body and a reference list, for the cleaning steps to remove."""
    refs = '\n'.join(f'{k}. Author{k} A, Writer B. A study of item {rng.randint(1, 999)}. '
                     f'Journal of Examples. {rng.randint(1990, 2023)};{rng.randint(1, 40)}:{rng.randint(1, 900)}.'
                     for k in range(1, 5))
    text = (doc['text'] + f'\n\nFurther material is available at https://example.org/'
            f'{doc["id"]}/notes and www.example.com/resources.\n\nReferences\n{refs}')
    return dict(doc, id=doc['id'] + '-linked', text=text)


def write(source: str, docs: list[dict], files: int) -> None:
    os.makedirs(os.path.join(OUT, source), exist_ok=True)
    for f in range(files):
        path = os.path.join(OUT, source, f'part-{f:03d}.jsonl')
        with open(path, 'w', encoding='utf-8') as fh:
            for doc in docs[f::files]:
                fh.write(json.dumps(doc, ensure_ascii=False) + '\n')


def main() -> None:
    rng = random.Random(20231127)
    guidelines = [guideline(rng, i) for i in range(150)]
    abstracts = [abstract(rng, i) for i in range(330)]
    replays = [replay(rng, i) for i in range(110)]

    # Planted: exact duplicates (the second differs only in case and spacing), near duplicates
    # (one word changed), documents with URLs + references, and documents below min_chars.
    guidelines.append(dict(guidelines[3], id='gl-dup-1'))
    guidelines.append(dict(guidelines[10], id='gl-dup-2',
                           text=guidelines[10]['text'].upper().replace(' ', '  ')))
    abstracts.append(dict(abstracts[7], id='ab-dup-1'))
    abstracts.append(dict(abstracts[20], id='ab-near-1',
                          text=abstracts[20]['text'].replace('Methods:', 'Methods and design:', 1)))
    guidelines.append(dict(guidelines[30], id='gl-near-1',
                           text=guidelines[30]['text'].replace('# Scope', '# Scope and purpose', 1)))
    replays.append(dict(replays[5], id='rp-near-1', text=replays[5]['text'] + ' Today it is common.'))
    guidelines.append(with_links_and_references(rng, guideline(rng, 900)))
    abstracts.append(with_links_and_references(rng, abstract(rng, 900)))
    abstracts.append(dict(id='ab-short-1', title='Note', text='Erratum: a figure label was corrected.'))
    replays.append(dict(id='rp-short-1', title='Stub', text='To be written.'))
    for docs in (guidelines, abstracts, replays):
        random.Random(len(docs)).shuffle(docs)

    write('guidelines', guidelines, 2)
    write('abstracts', abstracts, 3)
    write('replay', replays, 1)


if __name__ == '__main__':
    main()
