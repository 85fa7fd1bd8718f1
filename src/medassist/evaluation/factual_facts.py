"""What counts as a checkable fact, and when a reference supports or contradicts one.

Used by :mod:`medassist.evaluation.factual`; see its docstring for why facts, not embeddings. The lexicons
are deliberately small and general (organs, sex/age groups, USAN drug stems, disease suffixes):
they were written before the labelled validation set was scored, and a word outside them still
counts through the idf-weighted content words.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

CONFLICTING = ("gene", "inheritance", "number", "anatomy", "group", "drug")
WEIGHTS = {"gene": 3.0, "inheritance": 3.0, "number": 2.0, "anatomy": 2.0, "group": 1.5, "drug": 2.0, "entity": 1.5}

STOPWORDS = frozenset("""a about above after again against all almost also although always am among an and any are as at
be because been before being below between both but by can cannot could did do does doing done down during each either
else even ever every few for from further had has have having he her here hers him his how however i if in into is it
its itself just may me might more most much must my neither no nor not now of off often on once one only or other our
out over own per perhaps rather same she should since so some such than that the their them then there these they this
those through thus to too under until up upon us usually very was we were what when where whether which while who whom
whose why will with within without would yet you your yours called known include includes including may like many
mainly mostly typically generally usually roughly approximately around nearly estimated about
""".split())

_ACRONYM_STOP = frozenset("DNA RNA US USA UK NIH NCI FDA CDC NINDS NIDDK PDQ OK II III IV".split())
_WORD_NUMS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
              "ten": 10, "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20, "thirty": 30, "forty": 40,
              "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
              "twenties": 20, "thirties": 30, "forties": 40, "fifties": 50, "sixties": 60, "seventies": 70,
              "third": 1 / 3, "quarter": 0.25}
_SCALES = {"hundred": 100, "thousand": 1e3, "million": 1e6, "billion": 1e9}
_INHERITANCE = [  # (pattern, label), most specific first
    (r"autosomal[- ]dominant", "AD"), (r"autosomal[- ]recessive", "AR"), (r"autosomal[- ]codominant", "ACD"),
    (r"\bx[- ]linked[- ]dominant", "XLD"), (r"\bx[- ]linked[- ]recessive", "XLR"), (r"\bx[- ]linked", "XL"),
    (r"\by[- ]linked", "YL"), (r"mitochondrial (?:pattern|inheritance|dna)|maternal(?:ly)? inh\w+|mtdna", "MT"),
    (r"paternal(?:ly)? inh\w+|from (?:the |their |his or her )?fathers? to", "PAT"),
    (r"(?<!autosomal )(?<!linked )dominant (?:pattern|manner|inheritance|form|type)", "D"),
    (r"(?<!autosomal )(?<!linked )recessive (?:pattern|manner|inheritance|form|type)", "R"),
]
_COMPATIBLE = {"XL": {"XLD", "XLR"}, "D": {"AD", "XLD"}, "R": {"AR", "XLR"}, "XLD": {"XL", "D"}, "XLR": {"XL", "R"},
               "AD": {"D"}, "AR": {"R"}}
_ANATOMY = {  # surface word (after light normalisation) -> canonical part
    "lung": "lung", "pulmonary": "lung", "respiratory": "lung", "airway": "lung", "liver": "liver", "hepatic": "liver",
    "kidney": "kidney", "renal": "kidney", "heart": "heart", "cardiac": "heart", "cardiovascular": "heart",
    "brain": "brain", "cerebral": "brain", "skin": "skin", "eye": "eye", "retina": "retina", "lens": "lens", "cornea": "cornea",
    "optic nerve": "optic nerve", "bone": "bone", "bone marrow": "bone marrow", "marrow": "bone marrow",
    "spleen": "spleen", "pancreas": "pancreas", "intestine": "intestine", "bowel": "intestine", "colon": "colon",
    "stomach": "stomach", "muscle": "muscle", "skeletal muscle": "muscle", "nerve": "nerve", "nerve cell": "neuron",
    "neuron": "neuron", "spinal cord": "spinal cord", "joint": "joint", "ear": "ear", "teeth": "teeth", "tooth": "teeth",
    "lymph node": "lymph node", "thyroid": "thyroid", "bladder": "urinary", "urinary": "urinary", "urinary tract": "urinary", "prostate": "prostate", "uterus": "uterus",
    "ovary": "ovary", "testicle": "testis", "breast": "breast", "blood vessel": "blood vessel", "vein": "blood vessel",
    "artery": "blood vessel", "aorta": "aorta", "red blood cell": "red blood cell", "white blood cell": "white blood cell",
    "platelet": "platelet", "lymphocyte": "lymphocyte", "sperm": "sperm", "egg cell": "egg", "egg": "egg",
    "hair": "hair", "nail": "nail", "gallbladder": "gallbladder", "esophagus": "esophagus", "throat": "throat",
    "mouth": "mouth", "tongue": "mouth", "gum": "mouth"}
_GROUPS = {"male": "male", "men": "male", "man": "male", "boy": "male", "father": "male", "female": "female",
           "women": "female", "woman": "female", "girl": "female", "mother": "female", "child": "child",
           "children": "child", "childhood": "child", "adult": "adult", "infant": "infant", "infancy": "infant",
           "newborn": "infant", "baby": "infant", "babies": "infant"}
_DRUG_STEMS = ("mab", "nib", "pril", "sartan", "olol", "statin", "vir", "azole", "cillin", "mycin", "cycline",
               "floxacin", "pam", "olam", "barbital", "dopa", "peridol", "sone", "olone", "purinol", "icine", "zide",
               "trexate", "parin", "platin", "rubicin", "taxel", "feron", "tidine", "prazole", "dronate", "triptan",
               "gliptin", "glitazone", "formin", "semide", "oxetine", "triptyline", "azepine", "zosin", "afil",
               "caine", "vudine", "profen", "coxib", "lukast", "tinib", "ximab", "zumab", "umab", "setron", "tadine", "dipine")
_DRUG_CLASSES = ("antibiotic", "antiviral", "antifungal", "steroid", "corticosteroid", "antihistamine", "statin",
                 "beta blocker", "ace inhibitor", "arb", "diuretic", "insulin", "chemotherapy", "immunosuppressant",
                 "anticoagulant", "blood thinner", "antidepressant", "anticonvulsant", "opioid", "nsaid", "vaccine",
                 "hormone", "interferon", "enzyme replacement")
_FINDINGS = frozenset("""pain redness swelling fever rash seizure headache nausea vomiting fatigue tiredness cough
bleeding itching numbness weakness paralysis jaundice blindness deafness diarrhea constipation dizziness fainting
seizures infertility miscarriage stroke smoking alcohol obesity asbestos radiation depression anxiety confusion coma
ulcer fracture infection inflammation tumor cyst""".split())
_FINDING_SYNONYMS = {"tiredness": "fatigu", "seizures": "seizur", "tumor": "tumor"}
_HEDGES = frozenset("about approximately around roughly nearly almost estimated some over under".split())
_NOT_DRUGS = frozenset("medicine medicines urine routine examine determine genuine feminine masculine".split())
_DISEASE_SUFFIX = re.compile(r"[a-z]{3,}(?:itis|oma|omas|emia|aemia|osis|pathy|plasia|trophy|algia|uria|penia|ectomy|otomy|scopy|graphy)$")
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'\-]*|\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Fact:
    """One checkable statement: a category, a canonical key and the words it came from."""
    category: str
    key: str
    text: str
    qualifiers: frozenset = frozenset()


@lru_cache(maxsize=1)
def _stemmer():
    try:
        from nltk.stem.porter import PorterStemmer
        return PorterStemmer().stem
    except ImportError:  # crude fallback: strip common English suffixes
        return lambda w: re.sub(r"(ing|ed|es|s|ly)$", "", w) if len(w) > 4 else w


@lru_cache(maxsize=100_000)
def stem(word: str) -> str:
    return _stemmer()(word.lower())


def content_words(text: str) -> list[str]:
    """Lower-cased, stemmed content words (no stopwords, no numbers, no 1-2 letter tokens)."""
    return [stem(w) for w in _WORD.findall(text) if w[0].isalpha() and len(w) > 2 and w.lower() not in STOPWORDS]


def _parse_number(tok: str) -> float | None:
    t = tok.lower().replace(",", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        return float(t)
    m = re.fullmatch(r"(one|two|three|a)-(third|thirds|quarter|quarters|half)", t)
    if m:
        num = {"one": 1, "a": 1, "two": 2, "three": 3}[m.group(1)]
        return num * {"third": 1 / 3, "thirds": 1 / 3, "quarter": 0.25, "quarters": 0.25, "half": 0.5}[m.group(2)]
    m = re.fullmatch(r"(\d+)s", t)
    if m:
        return float(m.group(1))
    return float(_WORD_NUMS[t]) if t in _WORD_NUMS else None


def split_sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;])\s+|\s+-\s+|\n+", text) if s.strip()]


def _inheritance_spans(sentence: str) -> list[tuple[int, str, str]]:
    low, out, taken = sentence.lower(), [], []
    for pattern, label in _INHERITANCE:
        for m in re.finditer(pattern, low):
            if not any(a <= m.start() < b for a, b in taken):
                taken.append((m.start(), m.end()))
                out.append((m.start(), label, sentence[m.start():m.end()]))
    return sorted(out)


def _singular(w: str) -> str:
    w = w.lower()
    if w in ("teeth", "men", "women", "children", "babies", "lens"):
        return w
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def _number_fact(toks: list[tuple[str, int]], low: list[str], i: int, inh: list) -> Fact | None:
    """The number at token ``i`` (None if it is not one), bound to the group after it and the
    inheritance pattern before it in its sentence."""
    tok, pos = toks[i]
    nxt = low[i + 1] if i + 1 < len(toks) else ""
    val = 0.5 if tok.lower() == "half" and nxt == "of" else _parse_number(tok)  # not "half as many"
    if val is None or (tok.lower() in ("third", "quarter") and (i == 0 or low[i - 1] not in ("one", "a"))):
        return None
    scale = _SCALES.get(nxt)
    val = val * scale if scale and val < 1000 else val
    quals = set()
    for t in low[i + 1:i + 4]:
        if t.split("-")[0] in _GROUPS:
            quals.add("group:" + _GROUPS[t.split("-")[0]])
            break
    before = [lab for p, lab, _ in inh if p < pos]
    if before:
        quals.add("inh:" + before[-1])
    if any(t in _HEDGES for t in low[max(0, i - 2):i]):
        quals.add("hedged")
    if i >= 2 and low[i - 1] in ("in", "out") and low[i - 2] in ("1", "one", "every"):
        quals.add("one-in")  # "1 in 5" is also 20 percent
    return Fact("number", f"{val:g}", tok, frozenset(quals))


def _word_fact(toks: list[tuple[str, int]], low: list[str], i: int) -> tuple[Fact | None, int]:
    """The lexicon/shape fact starting at token ``i`` and how many tokens it spans."""
    tok, w = toks[i][0], low[i]
    for n in (3, 2, 1):
        phrase = " ".join(low[i:i + n])
        if i + n <= len(toks) and phrase in _ANATOMY:
            return Fact("anatomy", _ANATOMY[phrase], " ".join(t for t, _ in toks[i:i + n])), n
    parts = w.split("-")
    for part in (parts if len(parts) > 1 else []):
        if part in _ANATOMY or _singular(part) in _ANATOMY:
            return Fact("anatomy", _ANATOMY.get(part) or _ANATOMY[_singular(part)], tok), 1
    if w in _GROUPS or parts[0] in _GROUPS:
        return Fact("group", _GROUPS.get(w) or _GROUPS[parts[0]], tok), 1
    two = " ".join(low[i:i + 2])
    if two in _DRUG_CLASSES:
        return Fact("drug", two, " ".join(t for t, _ in toks[i:i + 2])), 2
    if w in _DRUG_CLASSES or re.fullmatch(r"anti[a-z]{4,}(?:al|ic|ics|ant|ants)", w) or (
            len(w) > 5 and w.endswith(_DRUG_STEMS) and w not in _NOT_DRUGS):
        return Fact("drug", w, tok), 1
    sym = tok[:-1] if tok.endswith("s") and tok[:-1].isupper() else tok
    if "-" in sym and re.fullmatch(r"[A-Z][A-Z0-9]*[0-9A-Z]-[a-z]+", sym):
        sym = sym.split("-")[0]  # "SYNGAP1-related", "BRCA1-associated"
    if re.fullmatch(r"[A-Z][A-Z0-9\-]*[A-Z0-9]", sym) and (sum(c.isupper() for c in sym) >= 2 or sym[1:].isdigit()):
        if sym in _ACRONYM_STOP:
            return None, 1
        is_gene = any(c.isdigit() for c in sym) or (i + 1 < len(toks) and low[i + 1] == "gene")
        return Fact("gene" if is_gene else "symbol", sym, tok), 1
    if w in _FINDINGS or " ".join(low[i:i + 2]) in ("hearing loss", "vision loss", "weight loss", "weight gain"):
        return Fact("finding", _FINDING_SYNONYMS.get(w, stem(w)), tok), 1
    if re.fullmatch(r"[xy]-linked", w):  # already an inheritance fact
        return None, 1
    if _DISEASE_SUFFIX.match(w) or (tok[0].isupper() and i > 0 and len(tok) > 3):
        return Fact("entity", stem(w), tok), 1
    return None, 1


def extract_facts(text: str) -> list[Fact]:
    """Checkable facts of ``text`` (see the module docstring for the categories)."""
    facts: list[Fact] = []
    for sent in split_sentences(text):
        inh = _inheritance_spans(sent)
        facts += [Fact("inheritance", label, raw) for _, label, raw in inh]
        toks = [(m.group(), m.start()) for m in _WORD.finditer(sent)]
        low = [_singular(t) for t, _ in toks]
        i = 0
        while i < len(toks):
            fact = _number_fact(toks, low, i, inh)
            n = 1
            if fact is None:
                fact, n = _word_fact(toks, low, i)
            elif fact.key == "1":  # "1 in 2,500": the 1 is too common to check
                fact = None
            if fact is not None:
                facts.append(fact)
            i += n
    return facts


def _acronym_of(symbol: str, text: str) -> bool:
    """Is ``symbol`` (e.g. CML) the initials of consecutive words of ``text``?"""
    if len(symbol) < 2 or not symbol.isalpha():
        return False
    initials = "".join(w[0] for w in re.findall(r"[A-Za-z]+", text)).upper()
    if symbol in initials:
        return True
    pattern = ".*".join(symbol.lower())  # PKU <- phenylketonuria: letters in order within one word
    return any(re.fullmatch(pattern + ".*", w) for w in re.findall(r"[a-z]{6,}", text.lower()))


def _same_number(a: Fact, b: Fact) -> bool:
    """Equal values, where "1 in 5", "one-fifth"-style fractions and "20 percent" are the same
    number, and a hedged number ("about half") is allowed 10% slack."""
    def forms(f: Fact) -> set[float]:
        x = float(f.key)
        out = {x}
        if x < 1:
            out.add(x * 100)
        if "one-in" in f.qualifiers and x > 0:
            out.add(100 / x)
        return out
    tol = 0.1 if "hedged" in a.qualifiers | b.qualifiers else 0.01
    return any(math.isclose(u, v, rel_tol=tol) for u in forms(a) for v in forms(b))


def _qualifiers_agree(a: str, b: str) -> bool:
    if a == b:
        return True
    ka, _, va = a.partition(":")
    kb, _, vb = b.partition(":")
    return ka == kb == "inh" and vb in _COMPATIBLE.get(va, set())


def fact_status(fact: Fact, ref: list[Fact], ref_text: str, ref_stems: set) -> str:
    """'supported', 'contradicted' or 'unsupported': is ``fact`` stated by the text whose facts are ``ref``?"""
    same = [f for f in ref if f.category == fact.category]
    if fact.category == "number":
        matches = [f for f in same if _same_number(fact, f)]
        if not matches:
            return "contradicted" if same else "unsupported"
        for kind in ("group:", "inh:"):
            mine = {q for q in fact.qualifiers if q.startswith(kind)}
            theirs = [{q for q in f.qualifiers if q.startswith(kind)} for f in matches]
            if mine and all(t and not any(_qualifiers_agree(a, b) for a in mine for b in t) for t in theirs):
                return "contradicted"
        return "supported"
    if fact.category == "inheritance":
        keys = {f.key for f in same}
        if fact.key in keys or _COMPATIBLE.get(fact.key, set()) & keys:
            return "supported"
        return "contradicted" if keys else "unsupported"
    if fact.category in ("gene", "symbol"):
        if re.search(r"\b" + re.escape(fact.key) + r"s?\b", ref_text) or _acronym_of(fact.key, ref_text):
            return "supported"
        genes = [f for f in ref if f.category == "gene"]
        return "contradicted" if fact.category == "gene" and genes else "unsupported"
    if fact.category == "entity":
        return "supported" if fact.key in ref_stems else "unsupported"
    if any(f.key == fact.key for f in same):
        return "supported"
    return "contradicted" if same and fact.category in CONFLICTING else "unsupported"
