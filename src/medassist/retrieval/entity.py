"""Find the entity (disease, drug, test) a question is about.

Why: a whole-question embedding is dominated by its template ("What are the treatments for
...?"), so two questions with the same template and different diseases look alike. Comparing
the *entity* with passage titles puts the disease first. Two complementary signals:

- :func:`extract_entity` strips a question's wording around the entity: MedQuAD's templates
  ("What are the symptoms of X ?", "Is X inherited ?") and, for free-form questions, leading
  question words and aspect words ("how is asthma treated in children" -> "asthma children").
- :class:`TitleMatcher` finds index titles that occur verbatim (case/punctuation-insensitive,
  on word boundaries) in the question, keeping only the longest non-overlapping ones, so in
  "Is allergic asthma inherited?" the title "allergic asthma" is matched and "asthma" is not.
  It also knows each title's *aliases* as the sources themselves define them
  (:func:`find_aliases`: "Acute respiratory distress syndrome (ARDS) is ...", "COPD (chronic
  obstructive pulmonary disease)", "Shingles (herpes zoster)"), so "treatments for ARDS" finds
  the ARDS page although no title says "ARDS". All-capital aliases (ARDS, MS, ALL) must appear
  in capitals in the question, so "all", "ms" or "as" in ordinary text match nothing.
"""

from __future__ import annotations

import re

from medassist.retrieval.passages import focus_key

_TEMPLATES = [
    r"what (?:is|are) \(are\) (?P<e>.+)",
    r"what (?:is|are) the (?:symptoms|signs(?: and symptoms)?|treatments?|causes?|complications|stages|"
    r"genetic changes related to|risk factors|outlook|prognosis|tests?|types) (?:of|for|related to|with) (?P<e>.+)",
    r"what are the genetic changes related to (?P<e>.+)",
    r"(?:is|are) (?P<e>.+?) inherited",
    r"how many people are affected by (?P<e>.+)",
    r"what causes (?P<e>.+)",
    r"who is at risk for (?P<e>.+)",
    r"how to (?:diagnose|prevent|treat) (?P<e>.+)",
    r"what to do for (?P<e>.+)",
    r"what research \(or clinical trials\) is being done for (?P<e>.+)",
    r"do you have information about (?P<e>.+)",
    r"where to find support for people with (?P<e>.+)",
    r"what is the outlook for (?P<e>.+)",
]
_TEMPLATE_RES = [re.compile(rf"^{t}$", re.IGNORECASE) for t in _TEMPLATES]

# Words that say what is asked, not what it is about; removed from free-form questions.
_ASPECT = set("""
what whats which who whom whose when where why how is are was were be been being am do does did
can could should would will shall may might must the a an of for to in on at by with about from
and or as it its this that these those there their them they i me my we our you your he she his
her ask asking tell know need want please information info anything something explain describe
symptoms symptom signs sign treatment treatments treat treated treating therapy therapies cure cured
causes cause caused causing risk risks factor factors diagnose diagnosed diagnosis diagnosing test
tests testing exam exams prevent prevented prevention preventing outlook prognosis complications
complication stages stage inherited inheritance inherit genetic genes gene changes change related
many people affected common frequency research clinical trials trial being done get gets getting
have has having mean means happen happens life expectancy long term options option help helps
deal manage managed management live living with without support find
""".split())


def template_entity(question: str) -> str | None:
    """The entity of a templated question ("What causes X ?" -> "X"), None for free-form wording."""
    core = re.sub(r"[\s?.!]+$", "", " ".join(question.split()))
    for pattern in _TEMPLATE_RES:
        match = pattern.match(core)
        if match:
            entity = re.sub(r"[\s?.!]+$", "", match.group("e")).strip()
            if entity:
                return entity
    return None


def extract_entity(question: str) -> str:
    """The part of ``question`` that names what it is about (the whole question when unsure)."""
    entity = template_entity(question)
    if entity:
        return entity
    core = re.sub(r"[\s?.!]+$", "", " ".join(question.split()))
    words = [w for w in re.findall(r"[\w'-]+", core) if w.casefold() not in _ASPECT]
    return " ".join(words) if words else question.strip()


_ALIAS_BAD_START = re.compile(r"^(?:see|e\.?g|i\.?e|which|that|for|from|or|and|also|in|on|with|about|a|an|the)\b",
                              re.IGNORECASE)


_ALIAS_PREFIX = re.compile(r"^(?:(?:also|formerly|sometimes|commonly|often|previously) )?(?:called|known as|"
                           r"referred to as) ", re.IGNORECASE)


def find_aliases(titles: list[str], title_ids: list[int], texts: list[str]) -> dict[int, set[str]]:
    """Aliases that a title's own passages define right after naming it: "Title (ALIAS)", and
    "ALIAS" when the title is an abbreviation followed by its long form ("COPD (chronic ...)").

    Only a parenthesis directly after the title itself counts, in that title's passages, so an
    incidental mention of another disease defines nothing.
    """
    by_title: dict[int, list[str]] = {}
    for t, text in zip(title_ids, texts):
        by_title.setdefault(t, []).append(text)
    aliases: dict[int, set[str]] = {}
    for t, passages in by_title.items():
        title = titles[t].strip()
        if len(title) < 2 or len(title.split()) > 8:
            continue
        pattern = re.compile(rf"(?<![\w-]){re.escape(title)}\s*\(([^()]{{2,60}})\)", re.IGNORECASE)
        for text in passages:
            for match in pattern.finditer(text):
                alias = _ALIAS_PREFIX.sub("", match.group(1).strip(" ;,."))
                words = alias.split()
                if len(words) == 1 and alias.islower():
                    continue  # "(metastatic)", "(rare)": a description, not a name
                if (1 <= len(words) <= 6 and not _ALIAS_BAD_START.match(alias) and not alias.isdigit()
                        and focus_key(alias) and focus_key(alias) != focus_key(title)):
                    aliases.setdefault(t, set()).add(alias)
    return aliases


def _is_abbreviation(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Z0-9-]{1,7}", text)) and sum(c.isupper() for c in text) >= 2


class TitleMatcher:
    """Index titles (and their aliases) that appear in a question; longest non-overlapping matches win."""

    def __init__(self, titles: list[str], aliases: dict[int, set[str]] | None = None, max_words: int = 12):
        self.keys = [tuple(focus_key(t).split()) for t in titles]
        self.by_key: dict[tuple[str, ...], list[int]] = {}  # case-insensitive names
        self.by_abbreviation: dict[str, list[int]] = {}  # case-sensitive, one word: ARDS, MS
        names = [(i, t) for i, t in enumerate(titles)] + [(i, a) for i, s in (aliases or {}).items() for a in s]
        for i, name in names:
            if _is_abbreviation(name.strip()):
                self.by_abbreviation.setdefault(name.strip(), []).append(i)
                continue
            words = tuple(focus_key(name).split())
            if not words or len(words) > max_words or (len(words) == 1 and len(words[0]) < 3):
                continue
            if all(w in _ASPECT for w in words):
                continue
            self.by_key.setdefault(words, []).append(i)
        self.max_words = max(map(len, self.by_key), default=0)

    def match_spans(self, question: str) -> list[tuple[tuple[str, ...], list[int]]]:
        """(matched words, title ids) for each longest, non-overlapping name found in ``question``."""
        cased = re.sub(r"(?<=\w)['\u2019]s\b", "", question)
        cased_words = re.sub(r"[^\w]+", " ", cased).split()
        words = [w.casefold() for w in cased_words]
        found: list[tuple[int, int, tuple[str, ...], list[int]]] = []
        for n in range(min(self.max_words, len(words)), 0, -1):
            for start in range(0, len(words) - n + 1):
                key = tuple(words[start : start + n])
                ids = list(self.by_key.get(key, ()))
                if n == 1:  # "ARDS", and the plural "UTIs" of "UTI"
                    w = cased_words[start]
                    ids += self.by_abbreviation.get(w, []) or self.by_abbreviation.get(w[:-1] if w.endswith("s") else "", [])
                if ids and not any(s < start + n and start < e for s, e, _, _ in found):
                    found.append((start, start + n, key, ids))
        return [(key, ids) for _, _, key, ids in found]

    def match(self, question: str) -> list[int]:
        """Title ids of the longest titles or aliases found in ``question`` (empty when none is)."""
        return sorted({i for _, ids in self.match_spans(question) for i in ids})
