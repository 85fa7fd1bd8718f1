"""Retrieval for training and evaluation: which passages each example's prompt carries.

With ``retrieval.enabled`` (:class:`~medassist.config.RetrievalConfig`) a run goes through:

1. **the index** (:func:`open_index`): ``retrieval.index``, or one built from the *training split
   only* into ``RUN/retrieval/index`` (skipped when it was already built from the same rows).
   Passages of held-out questions (their question groups) and, with ``data.holdout_column``, of
   held-out values (whole collections) are blocked, so a built corpus that contains them can
   be used without leaking a held-out reference into its own prompt. With
   ``heldout_corpus: open`` they stay blocked for training prompts only: a held-out question may
   then cite the *other* rows of its unseen collection (never its own group or answer text);
2. **the passages** (:func:`retrieve`): each example's top ``k`` passages scoring at least
   ``min_score`` (fewer, or none: then the prompt carries no sources, as at serving time). With
   ``exclude_own_group`` an example's own question group and any passage of its own answer text
   are never returned (else training would teach copying the answer out of the prompt). A
   seeded ``distractor_share`` of the *training* examples carries ``k`` passages about other
   entities instead (RAFT, Zhang et al. 2024): the model learns that a source in the prompt
   is not always relevant;
3. **the cache** (:func:`cached_retrieve`): what was retrieved, per split, in
   ``RUN/retrieval/<split>.jsonl`` under a key of the index and the settings, so a resume or a
   re-run does not search (or embed a query) again.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medassist.config import DataConfig, RetrievalConfig, TrainConfig
from medassist.data import QAExample, question_key
from medassist.errors import DataError
from medassist.formatting import Passage
from medassist.retrieval.passages import SourceRow, focus_key
from medassist.retrieval.search import DEFAULT_VARIANT, Hit, Retriever

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]
CACHE_VERSION = 1
INDEX_DIR = Path("retrieval") / "index"  # inside a run directory


@dataclass(frozen=True)
class Retrieved:
    """The passages one example's prompt carries; ``distractor``: chosen to be irrelevant."""

    hits: tuple[Hit, ...] = ()
    distractor: bool = False

    def passages(self) -> list[Passage]:
        return [Passage(h.text, h.title, h.url, None if self.distractor else h.score) for h in self.hits]

    def to_json(self) -> dict:
        return {"distractor": self.distractor, "hits": [asdict(h) for h in self.hits]}

    @classmethod
    def from_json(cls, data: dict) -> "Retrieved":
        return cls(tuple(Hit(**h) for h in data["hits"]), bool(data["distractor"]))


def passages_of(retrieved: Sequence[Retrieved] | None) -> list[list[Passage]] | None:
    return None if retrieved is None else [r.passages() for r in retrieved]


def min_score_of(retriever: Retriever, rcfg: RetrievalConfig) -> float:
    return retriever.threshold if rcfg.min_score is None else rcfg.min_score


# ---------------------------------------------------------------------------------------
# 1. the index
def index_rows(examples: Sequence[QAExample]) -> list[SourceRow]:
    """Training examples as indexable rows (focus, url, source and qtype from their metadata)."""
    return [SourceRow(row=ex.row, question=ex.question, answer=ex.answer, focus=ex.meta.get("focus", ""),
                      url=ex.meta.get("url", ""), source=ex.meta.get("source", ""), qtype=ex.meta.get("qtype", ""))
            for ex in examples]


def open_index(rcfg: RetrievalConfig, run_path: Path | None, train: Sequence[QAExample],
               heldout: Sequence[QAExample] = (), data_cfg: DataConfig | None = None,
               progress: Progress | None = None, log: Log = lambda _m: None) -> Retriever:
    """The retriever of a run: ``rcfg.index``, or the training split indexed in ``RUN/retrieval/index``;
    held-out questions (and held-out collections) blocked."""
    from medassist.retrieval.index import build_index

    if rcfg.index:
        index_dir = Path(rcfg.index)
    else:
        if run_path is None:
            raise DataError("retrieval.index is null and there is no run directory to build the index in")
        index_dir = Path(run_path) / INDEX_DIR
        if train:
            log(f"retrieval index of the {len(train)} training rows in {index_dir} (built once; reused after)")
            built = build_index(index_rows(train), index_dir, progress=progress)
            if not built.skipped:
                counts, seconds = built.manifest["counts"], built.manifest["build"]["seconds"]
                log(f"indexed {counts['passages']} passages of {counts['rows']} rows in {seconds} s")
        elif not index_dir.is_dir():
            raise DataError(f"retrieval: no training rows to index and no index at {index_dir}")
    retriever = Retriever.load(index_dir)
    blocked = retriever.block(heldout_mask(retriever, heldout, data_cfg))
    if blocked:
        log(f"retrieval: {blocked} passages of held-out questions or collections are never returned")
    return retriever


def open_book(retriever: Retriever, rcfg: RetrievalConfig) -> None:
    """Held-out questions' view of the index: with ``heldout_corpus: open`` nothing is blocked
    (each query still excludes its own group and answer text: ``exclude_own_group``)."""
    if rcfg.heldout_corpus == "open":
        retriever.block(None)


def heldout_mask(retriever: Retriever, heldout: Sequence[QAExample], data_cfg: DataConfig | None) -> np.ndarray:
    """Passages of the held-out questions' groups, and of held-out ``holdout_column`` values."""
    frame = retriever.passages
    mask = np.array(frame["group"].isin({question_key(ex.question) for ex in heldout}), dtype=bool)
    column = data_cfg.holdout_column if data_cfg is not None else None
    if column and column in frame.columns:
        mask |= np.array(frame[column].isin([*data_cfg.test_values, *data_cfg.validation_values]), dtype=bool)
    return mask


# ---------------------------------------------------------------------------------------
# 2. the passages
def _squash(text: str) -> str:
    return " ".join(text.split()).casefold()


def own_text(hit: Hit, answer: str) -> bool:
    """Whether ``hit`` is a piece of ``answer`` (the same answer indexed under another question);
    ``answer`` with its whitespace collapsed and case folded (:func:`_squash`)."""
    return _squash(hit.text) in answer


def choose_distractors(n: int, share: float, seed: int) -> set[int]:
    """The positions (of ``n`` examples) whose prompts carry only distractors: round(share * n), seeded."""
    return set(random.Random(seed).sample(range(n), round(share * n))) if n else set()


def _words(text: str) -> str:
    return f" {focus_key(text)} "


def distractors_for(retriever: Retriever, example: QAExample, relevant: Sequence[Hit], k: int,
                    rng: random.Random) -> list[Hit]:
    """``k`` passages (distinct pages) about entities that are neither the question's nor the
    relevant hits': random passages of the index, skipping blocked ones and the own group."""
    avoid = {focus_key(example.meta.get("focus", ""))} | {focus_key(h.title) for h in relevant}
    avoid.discard("")
    question = _words(example.question)
    own = question_key(example.question)
    columns = retriever._columns
    chosen: list[Hit] = []
    urls: set[str] = set()
    for _ in range(50 * k):
        if len(chosen) >= k:
            break
        j = rng.randrange(len(retriever))
        title = focus_key(columns["title"][j])
        url = columns["url"][j] or f"row:{columns['row'][j]}"
        if ((retriever.blocked is not None and retriever.blocked[j]) or columns["group"][j] == own
                or title in avoid or (title and f" {title} " in question) or url in urls):
            continue
        urls.add(url)
        chosen.append(retriever.hit(j, 0.0))
    return chosen


def retrieve(retriever: Retriever, examples: Sequence[QAExample], rcfg: RetrievalConfig, seed: int = 0,
             distractors: bool = False, progress: Progress | None = None) -> list[Retrieved]:
    """Each example's passages (see the module docstring); ``distractors``: apply the share
    (training only)."""
    examples = list(examples)
    k, exclude = rcfg.k, rcfg.exclude_own_group
    depth = 3 * k + 5 if exclude else k  # room for the own-answer passages filtered out below
    found = retriever.search_many([ex.question for ex in examples], depth,
                                  [[ex.question] for ex in examples] if exclude else None,
                                  min_score_of(retriever, rcfg), DEFAULT_VARIANT, progress=progress)
    chosen = choose_distractors(len(examples), rcfg.distractor_share, seed) if distractors else set()
    return [_finish(retriever, ex, hits, rcfg, seed, i if i in chosen else None)
            for i, (ex, hits) in enumerate(zip(examples, found))]


def retrieve_one(retriever: Retriever, examples: Sequence[QAExample], i: int, rcfg: RetrievalConfig,
                 seed: int = 0, distractors: bool = False) -> Retrieved:
    """What :func:`retrieve` gives ``examples[i]`` (``medassist tokens``), searching for it alone."""
    ex = examples[i]
    exclude = rcfg.exclude_own_group
    hits = retriever.search(ex.question, 3 * rcfg.k + 5 if exclude else rcfg.k, [ex.question] if exclude else (),
                            min_score_of(retriever, rcfg), DEFAULT_VARIANT)
    chosen = choose_distractors(len(examples), rcfg.distractor_share, seed) if distractors else set()
    return _finish(retriever, ex, hits, rcfg, seed, i if i in chosen else None)


def _finish(retriever: Retriever, ex: QAExample, hits: list[Hit], rcfg: RetrievalConfig, seed: int,
            distractor_at: int | None) -> Retrieved:
    """Own answer text out, the top ``k`` kept; or, at a chosen position, ``k`` distractors."""
    if rcfg.exclude_own_group:
        answer = _squash(ex.answer)
        hits = [h for h in hits if not own_text(h, answer)]
    hits = hits[: rcfg.k]
    if distractor_at is None:
        return Retrieved(tuple(hits))
    rng = random.Random(seed * 1_000_003 + distractor_at)
    return Retrieved(tuple(distractors_for(retriever, ex, hits, rcfg.k, rng)), distractor=True)


# ---------------------------------------------------------------------------------------
# 3. the cache
def cache_key(retriever: Retriever, examples: Sequence[QAExample], rcfg: RetrievalConfig, seed: int,
              distractors: bool) -> str:
    digest = hashlib.sha256()
    blocked = np.flatnonzero(retriever.blocked) if retriever.blocked is not None else np.zeros(0, np.int64)
    settings = {
        "version": CACHE_VERSION, "index": retriever.manifest.get("key"),
        "blocked": hashlib.sha256(blocked.astype(np.int64).tobytes()).hexdigest(), "variant": DEFAULT_VARIANT,
        "k": rcfg.k, "min_score": min_score_of(retriever, rcfg), "exclude_own_group": rcfg.exclude_own_group,
        "distractor_share": rcfg.distractor_share if distractors else None, "seed": seed if distractors else None,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for ex in examples:
        digest.update(f"{ex.row}\x1f{ex.question}\x1f{ex.answer}\x1e".encode())
    return digest.hexdigest()


def cached_retrieve(path: Path | None, retriever: Retriever, examples: Sequence[QAExample],
                    rcfg: RetrievalConfig, seed: int = 0, distractors: bool = False,
                    progress: Progress | None = None) -> tuple[list[Retrieved], bool]:
    """:func:`retrieve`, read from ``path`` when it holds the same key; (retrieved, from cache?)."""
    examples = list(examples)
    key = cache_key(retriever, examples, rcfg, seed, distractors)
    if path is not None and path.is_file():
        try:
            with open(path, encoding="utf-8") as handle:
                header = json.loads(handle.readline())
                if header.get("key") == key:
                    rows = [Retrieved.from_json(json.loads(line)) for line in handle if line.strip()]
                    if len(rows) == len(examples):
                        return rows, True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: retrieve again and overwrite
    retrieved = retrieve(retriever, examples, rcfg, seed, distractors, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"key": key, "examples": len(examples)}) + "\n")
            for ex, r in zip(examples, retrieved):
                handle.write(json.dumps({"row": ex.row, **r.to_json()}, ensure_ascii=False) + "\n")
        tmp.replace(path)
    return retrieved, False


# ---------------------------------------------------------------------------------------
# a run's sources, all splits
@dataclass
class RunSources:
    """The retriever of a run and what each split's examples retrieved (``by_split``)."""

    retriever: Retriever
    rcfg: RetrievalConfig
    by_split: dict[str, list[Retrieved]] = field(default_factory=dict)
    _by_row: dict[int, Retrieved] = field(default_factory=dict)

    def passages(self, split: str) -> list[list[Passage]]:
        return passages_of(self.by_split.get(split, []))

    def info(self) -> dict:
        """Where and how the passages came from (an evaluation's ``retrieval_info``)."""
        blocked = self.retriever.blocked
        return {"index": str(self.retriever.index_dir), "k": self.rcfg.k,
                "min_score": min_score_of(self.retriever, self.rcfg), "variant": DEFAULT_VARIANT,
                "blocked_passages": 0 if blocked is None else int(blocked.sum()),
                "heldout_corpus": self.rcfg.heldout_corpus}

    def summary(self, train_tok=None) -> dict:
        """What train_summary.json records about retrieval."""
        out = {"index": str(self.retriever.index_dir), "k": self.rcfg.k,
               "min_score": min_score_of(self.retriever, self.rcfg), "distractor_share": self.rcfg.distractor_share,
               "exclude_own_group": self.rcfg.exclude_own_group}
        for split, retrieved in self.by_split.items():
            kept = train_tok.passages_kept if split == "train" and train_tok is not None else None
            out[split] = summary(retrieved, kept)
        return out

    def lookup(self, examples: Sequence[QAExample]) -> list[Retrieved]:
        """What ``examples`` (a subset of the splits, by row) retrieved; anything unseen is retrieved now."""
        missing = [ex for ex in examples if ex.row not in self._by_row]
        if missing:
            held_out = self.rcfg.model_copy(update={"exclude_own_group": True})
            for ex, r in zip(missing, retrieve(self.retriever, missing, held_out)):
                self._by_row[ex.row] = r
        return [self._by_row[ex.row] for ex in examples]


def run_sources(cfg: TrainConfig, run_path: Path, splits: dict[str, list[QAExample]], log: Log = lambda _m: None,
                progress: Progress | None = None) -> RunSources:
    """Open (or build) the run's index and retrieve for every split, through the cache.

    Training examples get the distractor share; validation and test examples never do, and
    always have their own group excluded (their rows are not indexed anyway). Training prompts
    never see held-out passages; with ``heldout_corpus: open`` held-out questions do (not their own)."""
    rcfg = cfg.retrieval
    heldout = [*splits.get("validation", []), *splits.get("test", [])]
    retriever = open_index(rcfg, run_path, splits.get("train", []), heldout, cfg.data, progress, log)
    sources = RunSources(retriever, rcfg)
    if rcfg.heldout_corpus == "open" and retriever.blocked is not None:
        log("retrieval: held-out questions may cite the other rows of the held-out collections (heldout_corpus: "
            "open), never their own; training prompts never see them")
    for split, examples in sorted(splits.items(), key=lambda item: item[0] != "train"):  # training first
        if not examples:
            sources.by_split[split] = []
            continue
        training = split == "train"
        if not training:
            open_book(retriever, rcfg)
        settings = rcfg if training else rcfg.model_copy(update={"exclude_own_group": True})
        retrieved, cached = cached_retrieve(Path(run_path) / "retrieval" / f"{split}.jsonl", retriever, examples,
                                            settings, cfg.seed, distractors=training, progress=progress)
        sources.by_split[split] = retrieved
        sources._by_row.update({ex.row: r for ex, r in zip(examples, retrieved)})
        log(f"retrieval ({split}{', cached' if cached else ''}): {describe(retrieved)}")
    return sources


def describe(retrieved: Sequence[Retrieved]) -> str:
    """One line: passages per prompt, prompts without a source, distractor-only prompts."""
    n = len(retrieved)
    if not n:
        return "no examples"
    none = sum(1 for r in retrieved if not r.hits)
    distract = sum(r.distractor for r in retrieved)
    mean = sum(len(r.hits) for r in retrieved) / n
    return (f"{mean:.2f} passages per prompt, {none} of {n} without a source above the threshold"
            + (f", {distract} distractor-only" if distract else ""))


def summary(retrieved: Sequence[Retrieved], kept: Sequence[int] | None = None) -> dict:
    """Counts for train_summary.json (``kept``: passages per prompt that fit the prompt budget)."""
    n = len(retrieved)
    out = {"examples": n, "mean_passages": sum(len(r.hits) for r in retrieved) / n if n else 0.0,
           "without_source": sum(1 for r in retrieved if not r.hits),
           "distractor_only": sum(r.distractor for r in retrieved)}
    if kept is not None:
        out["mean_passages_in_prompt"] = sum(kept) / n if n else 0.0
        out["passages_dropped_to_fit"] = sum(len(r.hits) for r in retrieved) - sum(kept)
    return out

