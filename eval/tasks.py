"""Offline, seeded RULER-style long-context tasks (no downloads) and their scorers.

Every generator returns a :class:`Sample`: chat messages whose user turn is ~``target`` tokens long and the
expected short answer(s). Haystacks are generated sentences; needles and facts are unique strings placed at a
seeded depth. Lengths are measured with the model's tokenizer when given, else ~4 characters per token.

    counter = TokenCounter(load_tokenizer("/tmp/models/qwen05"))
    s = make_sample("niah_single", target=8192, seed=0, index=3, counter=counter)
    score(s, model_output)   # 0..100
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words", "qa")


# -------------------------------------------------------------------------------------------- counting


class TokenCounter:
    """Token length of a text: the tokenizer's when given, else ceil(chars / 4)."""

    def __init__(self, tokenizer=None, chars_per_token: float = 4.0):
        self.tokenizer = tokenizer
        self.chars_per_token = chars_per_token

    def __call__(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text, add_special_tokens=False))
        return math.ceil(len(text) / self.chars_per_token)

    def ids(self, text: str) -> list:
        """Token ids (tokenizer) or whitespace words (fallback), for prefix-agreement measures."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        return text.split()


def load_tokenizer(model_path: str | None):
    """transformers AutoTokenizer of a model folder; None when there is none (dummy weights, no transformers)."""
    if not model_path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path)
    except Exception:  # noqa: BLE001 - fall back to the 4 chars/token estimate
        return None


# --------------------------------------------------------------------------------------------- wording

_OCCUPATIONS = ["baker", "carpenter", "teacher", "sailor", "gardener", "painter", "merchant", "doctor", "farmer",
                "librarian", "engineer", "tailor", "fisherman", "musician", "weaver", "potter", "miller", "clerk"]
_PLACES = ["the valley", "the old harbor", "the northern hills", "the river town", "the market square",
           "the mountain village", "the coastal city", "the quiet suburb", "the island", "the forest camp",
           "the border town", "the university district"]
_ADJ = ["old", "small", "bright", "heavy", "quiet", "painted", "wooden", "narrow", "broken", "famous", "simple",
        "dusty", "golden", "curious", "gentle", "sturdy", "faded", "clever", "humble", "silver"]
_THINGS = ["clock", "bridge", "boat", "lantern", "garden", "wagon", "window", "fence", "mill", "library", "well",
           "orchard", "tower", "kitchen", "workshop", "chapel", "barn", "harbor wall", "carpet", "violin"]
_PAST = ["repaired", "painted", "cleaned", "visited", "described", "measured", "admired", "rebuilt", "sold",
         "photographed", "inspected", "decorated", "moved", "guarded", "studied"]
_PRESENT = ["collect", "trade", "discuss", "carry", "plant", "mend", "sell", "share", "watch", "bake", "count"]
_THINGS_PL = ["apples", "stories", "tools", "letters", "baskets", "candles", "maps", "blankets", "seeds", "coins",
              "shells", "recipes", "ropes", "songs"]
_TIMES = ["before the harvest festival", "after a long winter", "during the spring rain", "early in the morning",
          "late one evening", "on a windy afternoon", "last summer", "at the end of the week",
          "when the river was high", "in the first days of autumn"]
_MANNER = ["with great care", "in small groups", "without much noise", "at the weekly fair", "for their neighbors",
           "as their parents did", "whenever the weather allows", "in exchange for bread"]
_NAMES = ["Marta", "Jonas", "Elena", "Tomas", "Ingrid", "Paulo", "Rosa", "Henrik", "Lucia", "Anton", "Greta",
          "Milo", "Sofia", "Viktor", "Nadia", "Oskar"]
_FEELINGS = ["calm", "hopeful", "tired", "cheerful", "thoughtful", "patient", "proud", "busy"]

_TEMPLATES = [
    lambda r: f"The {r.choice(_OCCUPATIONS)} from {r.choice(_PLACES)} {r.choice(_PAST)} the {r.choice(_ADJ)} "
              f"{r.choice(_THINGS)} {r.choice(_TIMES)}.",
    lambda r: f"In {r.choice(_PLACES)}, people often {r.choice(_PRESENT)} {r.choice(_THINGS_PL)} {r.choice(_MANNER)}.",
    lambda r: f"{r.choice(_NAMES)} said that the {r.choice(_THINGS)} near {r.choice(_PLACES)} looked "
              f"{r.choice(_ADJ)} {r.choice(_TIMES)}.",
    lambda r: f"Most evenings the {r.choice(_OCCUPATIONS)} felt {r.choice(_FEELINGS)} and talked about "
              f"{r.choice(_THINGS_PL)}.",
    lambda r: f"A {r.choice(_ADJ)} {r.choice(_THINGS)} stood beside the road, and travelers {r.choice(_PAST)} it "
              f"{r.choice(_TIMES)}.",
    lambda r: f"Nobody in {r.choice(_PLACES)} remembers who first decided to {r.choice(_PRESENT)} "
              f"{r.choice(_THINGS_PL)} {r.choice(_MANNER)}.",
]


def sentence(rng: random.Random) -> str:
    """One filler sentence (no digits, no all-caps words: needles never collide with the haystack)."""
    return rng.choice(_TEMPLATES)(rng)


class SentencePool:
    """An endless, seeded list of filler sentences: take(n) is the same first n for the same seed."""

    def __init__(self, rng: random.Random):
        self.rng, self.items = rng, []

    def take(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(sentence(self.rng))
        return self.items[:n]


_SYL = ["ka", "lo", "mi", "ren", "tor", "va", "shi", "bel", "dun", "fa", "gor", "hel", "jin", "kor", "lan", "mar",
        "nel", "or", "pra", "quin", "ros", "sel", "tam", "ul", "vek", "wen", "yor", "zan", "bri", "cal", "dre", "esk"]


def made_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    return "".join(rng.choice(_SYL) for _ in range(rng.randint(*syllables)))


def unique(rng: random.Random, make, n: int, taken: set | None = None) -> list:
    taken = set() if taken is None else taken
    out = []
    while len(out) < n:
        x = make(rng)
        if x not in taken:
            taken.add(x)
            out.append(x)
    return out


def _number(rng, digits=7):
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _key(rng):
    return f"{rng.choice(_ADJ)}-{made_word(rng, (2, 2))}"


def _var(rng):
    return "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5))


def _town(rng):
    return made_word(rng, (1, 2)).capitalize() + rng.choice(["ford", "holm", "dale", "wick", "stead", "mere"])


def _person(rng):
    return f"{made_word(rng, (2, 2)).capitalize()} {made_word(rng, (2, 3)).capitalize()}"


# ------------------------------------------------------------------------------------------------ sizing


@dataclass
class Sample:
    task: str
    context: int  # target length in tokens (nominal: 4096, 8192, ...)
    index: int
    messages: list[dict]
    answers: list[str]
    metric: str  # "all": fraction of answers found; "any": one of them suffices
    tokens: int  # measured length of the user message
    max_tokens: int = 32
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def fit(build, target: int, counter: TokenCounter, lo: int = 0) -> tuple[int, str]:
    """Largest n >= lo with counter(build(n)) <= target (build grows with n); returns (n, text).

    The bracket comes from a linear guess (one count at a small n), so a slow tokenizer is called ~10 times."""
    n0 = 16
    c0, base = counter(build(n0)), counter(build(0))
    guess = max(lo + 1, int(n0 * (target - base) / max(1, c0 - base)))
    step = max(2, guess // 50)
    hi = guess
    if counter(build(guess)) <= target:
        lo = guess
        hi = guess + step
        while counter(build(hi)) <= target:
            lo, step = hi, step * 2
            hi = lo + step
    else:
        hi = guess
        low = max(lo, guess - step)
        while low > lo and counter(build(low)) > target:
            hi, step = low, step * 2
            low = max(lo, low - step)
        lo = low
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if counter(build(mid)) <= target:
            lo = mid
        else:
            hi = mid
    return lo, build(lo)


def _insert(fill: list[str], inserts: list[tuple[float, str]]) -> list[str]:
    """Place each (depth in [0, 1], text) between filler units; equal depths keep their order."""
    out = list(fill)
    for depth, text in sorted(inserts, key=lambda x: x[0], reverse=True):
        out.insert(round(depth * len(fill)), text)
    return out


def _haystack_prompt(instruction: str, body: list[str], question: str) -> str:
    return f"{instruction}\n\n{' '.join(body)}\n\n{question}"


# ---------------------------------------------------------------------------------------------- tasks


def _niah(rng, target, counter, n_keys=1, n_values=1):
    keys = unique(rng, _key, n_keys)
    values = unique(rng, _number, n_keys * n_values)
    needles = []
    for i, k in enumerate(keys):
        for j in range(n_values):
            needles.append((rng.random(), f"One of the special magic numbers for {k} is: {values[i * n_values + j]}."))
    asked = keys[0]
    answers = values[:n_values]
    if n_values == 1:
        question = (f"What is the special magic number for {asked} mentioned in the provided text? "
                    "Answer with the number only.")
    else:
        question = (f"What are all the special magic numbers for {asked} mentioned in the provided text? "
                    "Answer with the numbers only, separated by commas.")
    instruction = ("Some special magic numbers are hidden within the following text. "
                   "Make sure to memorize them. I will quiz you about the numbers afterwards.")
    pool = SentencePool(rng)
    n, text = fit(lambda m: _haystack_prompt(instruction, _insert(pool.take(m), needles), question), target, counter)
    return text, answers, {"keys": keys, "depths": [d for d, _ in needles], "filler": n}


def gen_niah_single(rng, target, counter):
    text, answers, meta = _niah(rng, target, counter)
    return text, answers, "all", 48, meta


def gen_niah_multikey(rng, target, counter, n_keys=4):
    text, answers, meta = _niah(rng, target, counter, n_keys=n_keys)
    return text, answers, "all", 48, meta


def gen_niah_multivalue(rng, target, counter, n_values=4):
    text, answers, meta = _niah(rng, target, counter, n_values=n_values)
    return text, answers, "all", 96, meta


def gen_variable_tracking(rng, target, counter, hops=4):
    names = unique(rng, _var, hops + 1)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(hops)]
    depths = sorted(rng.random() for _ in chain)
    instruction = ("Memorize and track the chain(s) of variable assignment hidden in the following text.")
    question = (f"Question: Find all variables that are assigned the value {value} in the text above. "
                "Answer with the variable names only, separated by spaces.")
    pool = SentencePool(rng)
    n, text = fit(lambda m: _haystack_prompt(instruction, _insert(pool.take(m), list(zip(depths, chain))), question),
                  target, counter)
    return text, names, "all", 64, {"value": value, "filler": n}


def gen_common_words(rng, target, counter, n_common=5, freq_common=30, freq_rare=3):
    """A numbered word list where ``n_common`` words appear ``freq_common`` times and every other word
    ``freq_rare`` times; the answer is the common words."""
    common = unique(rng, lambda r: made_word(r, (2, 2)), n_common)
    rare_pool = []
    taken = set(common)
    seed = rng.random()

    def build(m):
        while len(rare_pool) < m:
            rare_pool.extend(unique(rng, lambda r: made_word(r, (2, 3)), max(64, m - len(rare_pool)), taken))
        words = common * freq_common + rare_pool[:m] * freq_rare
        random.Random(f"{seed}-{m}").shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return (f"Below is a numbered list of words. In these words, some appear more often than others. "
                f"Memorize the ones that appear most often.\n\n{listing}\n\n"
                f"Question: What are the {n_common} most common words in the above list? "
                "Answer with the words only, separated by commas.")

    n, text = fit(build, target, counter)
    return text, common, "all", 96, {"rare_words": n}


def gen_qa(rng, target, counter, sentences_per_doc=6):
    """Synthetic documents about invented towns; one question about one document's founder."""
    pool = SentencePool(rng)
    towns, people, years = [], [], []
    taken_towns, taken_people = set(), set()
    depth = rng.random()

    def doc_header(i):
        while len(towns) <= i:
            towns.append(unique(rng, _town, 1, taken_towns)[0])
            people.append(unique(rng, _person, 1, taken_people)[0])
            years.append(rng.randint(1100, 1899))
        return (f"Document {i + 1}: {towns[i]}. {towns[i]} is a town near {_PLACES[i % len(_PLACES)]}. "
                f"It was founded by {people[i]} in {years[i]}.")

    def build(m):
        n_docs = max(1, -(-m // sentences_per_doc))
        sents = pool.take(m)
        docs = [doc_header(i) + " " + " ".join(sents[i * sentences_per_doc:(i + 1) * sentences_per_doc])
                for i in range(n_docs)]
        t = min(n_docs - 1, int(depth * n_docs))
        build.asked = t
        return ("Answer the question based on the documents below.\n\n" + "\n\n".join(docs)
                + f"\n\nQuestion: According to the documents, who founded the town of {towns[t]}? "
                "Answer with the full name only.")

    n, text = fit(build, target, counter)
    build(n)
    t = build.asked
    return text, [people[t]], "all", 48, {"town": towns[t], "document": t + 1, "filler": n}


GENERATORS = {
    "niah_single": gen_niah_single,
    "niah_multikey": gen_niah_multikey,
    "niah_multivalue": gen_niah_multivalue,
    "variable_tracking": gen_variable_tracking,
    "common_words": gen_common_words,
    "qa": gen_qa,
}


def make_sample(task: str, target: int, seed: int = 0, index: int = 0, counter: TokenCounter | None = None) -> Sample:
    counter = counter or TokenCounter()
    rng = random.Random(f"{seed}-{task}-{target}-{index}")
    text, answers, metric, max_tokens, meta = GENERATORS[task](rng, target, counter)
    return Sample(task, target, index, [{"role": "user", "content": text}], answers, metric, counter(text),
                  max_tokens, meta)


def make_samples(tasks, contexts, n: int, seed: int = 0, counter=None, reserve: int = 0, max_context=None) -> list:
    """n samples per (task, context). A context above ``max_context - reserve`` is generated at that size
    (kept under its nominal label) so prompt + chat template + answer fit the model window."""
    out = []
    for task in tasks:
        for ctx in contexts:
            size = ctx if max_context is None else min(ctx, max_context - reserve)
            for i in range(n):
                s = make_sample(task, size, seed, i, counter)
                s.context = ctx
                out.append(s)
    return out


# ---------------------------------------------------------------------------------------------- scoring


def _found(answer: str, output: str) -> bool:
    return re.search(r"(?<![\w])" + re.escape(answer.lower()) + r"(?![\w])", output.lower()) is not None


def score_all(output: str, answers: list[str]) -> float:
    """100 x fraction of the expected answers present in the output (as whole words)."""
    return 100.0 * sum(_found(a, output) for a in answers) / len(answers) if answers else 0.0


def score_any(output: str, answers: list[str]) -> float:
    """100 if any expected answer is present in the output, else 0."""
    return 100.0 if any(_found(a, output) for a in answers) else 0.0


def score(sample: Sample, output: str) -> float:
    return (score_all if sample.metric == "all" else score_any)(output or "", sample.answers)


# ------------------------------------------------------------------------------ prefix-sharing workload


@dataclass
class Document:
    title: str
    text: str
    facts: list[tuple[str, str]]  # (question, answer), answers occur exactly once in text


_QUESTION_FORMS = [
    "Who founded {town}? Answer in one short sentence.",
    "Which person founded the town of {town}, and in what year? Answer in one short sentence.",
    "Tell me briefly about the founding of {town}.",
    "Who is named as the founder of {town} in the document? Reply with a full sentence.",
]


def make_document(target: int, seed: int = 0, index: int = 0, counter: TokenCounter | None = None) -> Document:
    """A long report of ~target tokens about invented towns, with founder facts to ask about."""
    counter = counter or TokenCounter()
    rng = random.Random(f"doc-{seed}-{index}")
    text, _, _, _, _ = gen_qa(rng, target, counter)
    body = text.split("\n\n", 1)[1].rsplit("\n\nQuestion:", 1)[0]
    facts = []
    for m in re.finditer(r"Document \d+: (\w+)\. \1 is a town near [^.]*\. It was founded by ([\w ]+) in (\d+)\.", body):
        facts.append((m.group(1), m.group(2)))
    title = f"Report {index + 1}"
    return Document(title, f"{title}\n\n{body}", [(t, p) for t, p in facts])


def document_questions(doc: Document, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct (question, answer) pairs about a document: facts x question forms, shuffled."""
    pairs = [(form.format(town=town), person) for town, person in doc.facts for form in _QUESTION_FORMS]
    random.Random(f"q-{seed}-{doc.title}").shuffle(pairs)
    if n > len(pairs):
        raise ValueError(f"{doc.title} has only {len(pairs)} distinct questions, {n} asked")
    return pairs[:n]


def document_messages(doc: Document, question: str) -> list[dict]:
    """Shared prefix first (system + document), the question last: requests about one document share it."""
    return [
        {"role": "system", "content": "You are a helpful assistant. Answer questions using only the given report."},
        {"role": "user", "content": f"{doc.text}\n\n{question}"},
    ]
