"""eval/tasks.py: lengths, needle placement, determinism, scorers (CPU, tokenizer-free and a toy tokenizer)."""

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import tasks as T  # noqa: E402


def occurrences(word: str, text: str) -> int:
    return len(re.findall(r"(?<![\w])" + re.escape(word) + r"(?![\w])", text))


class WordTokenizer:
    """Toy tokenizer: one token per word or punctuation mark (a different ratio than 4 chars/token)."""

    def encode(self, text, add_special_tokens=False):
        return re.findall(r"\w+|[^\w\s]", text)


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("target", [2048, 4096, 8192])
def test_length_within_5_percent_fallback(task, target):
    counter = T.TokenCounter()
    s = T.make_sample(task, target, seed=1, index=0, counter=counter)
    assert s.tokens == counter(s.prompt)
    assert abs(s.tokens - target) <= 0.05 * target, (task, target, s.tokens)
    assert s.tokens <= target


@pytest.mark.parametrize("task", T.TASKS)
def test_length_with_a_tokenizer(task):
    counter = T.TokenCounter(WordTokenizer())
    s = T.make_sample(task, 4096, seed=2, index=1, counter=counter)
    assert abs(len(WordTokenizer().encode(s.prompt)) - 4096) <= 0.05 * 4096
    # the fallback would have measured something else: the tokenizer really was used
    assert T.TokenCounter()(s.prompt) != s.tokens


def test_fallback_is_four_chars_per_token():
    assert T.TokenCounter()("a" * 400) == 100
    assert T.TokenCounter()("a" * 401) == 101


@pytest.mark.parametrize("task", T.TASKS)
def test_deterministic_and_seeded(task):
    a = T.make_sample(task, 2048, seed=5, index=3)
    b = T.make_sample(task, 2048, seed=5, index=3)
    c = T.make_sample(task, 2048, seed=5, index=4)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert a.prompt != c.prompt


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "qa"])
@pytest.mark.parametrize("index", range(4))
def test_answers_embedded_exactly_once(task, index):
    s = T.make_sample(task, 4096, seed=0, index=index)
    for a in s.answers:
        assert occurrences(a, s.prompt) == 1, (a, task)


def test_niah_multikey_has_distractors_with_other_values():
    s = T.make_sample("niah_multikey", 4096, seed=0, index=0)
    keys = s.meta["keys"]
    assert len(set(keys)) == len(keys) == 4
    needles = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", s.prompt)
    assert len(needles) == 4
    assert dict(needles)[keys[0]] == s.answers[0]
    assert f"for {keys[0]} mentioned" in s.prompt.split("\n\n")[-1]


def test_niah_multivalue_all_values_for_the_asked_key():
    s = T.make_sample("niah_multivalue", 4096, seed=0, index=0)
    key = s.meta["keys"][0]
    found = re.findall(rf"special magic numbers for {re.escape(key)} is: (\d+)\.", s.prompt)
    assert sorted(found) == sorted(s.answers) and len(found) == 4


def test_variable_tracking_chain():
    s = T.make_sample("variable_tracking", 4096, seed=0, index=0)
    body = s.prompt.split("Question:")[0]
    names, value = s.answers, s.meta["value"]
    assert occurrences(value, body) == 1
    assert f"VAR {names[0]} = {value}." in body
    for prev, nxt in zip(names, names[1:]):
        assert f"VAR {nxt} = VAR {prev}." in body
    # statements appear in chain order
    pos = [body.index(f"VAR {n} =") for n in names]
    assert pos == sorted(pos)


def test_common_words_are_the_most_frequent():
    s = T.make_sample("common_words", 4096, seed=0, index=0)
    listing = s.prompt.split("\n\n")[1]
    words = re.findall(r"\d+\. (\w+)", listing)
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    for a in s.answers:
        assert counts[a] == 30
    assert max(c for w, c in counts.items() if w not in s.answers) <= 3


def test_needle_depth_varies():
    depths = [T.make_sample("niah_single", 2048, seed=0, index=i).meta["depths"][0] for i in range(6)]
    assert len(set(depths)) == 6


def test_contexts_clipped_to_model_window():
    samples = T.make_samples(["niah_single"], [4096, 8192], n=1, reserve=200, max_context=6000)
    assert [s.context for s in samples] == [4096, 8192]
    assert samples[1].tokens <= 5800


# ------------------------------------------------------------------------------------------------ scoring


def test_scores_right_and_wrong():
    for task in T.TASKS:
        s = T.make_sample(task, 2048, seed=0, index=0)
        assert T.score(s, " , ".join(s.answers)) == 100.0, task
        assert T.score(s, "I do not know 0000000 ZZZZZ") == 0.0, task
        assert T.score(s, "") == 0.0


def test_score_whole_words_only():
    assert T.score_all("The number is 12345678.", ["1234567"]) == 0.0
    assert T.score_all("The number is 1234567.", ["1234567"]) == 100.0
    assert T.score_all("varx VARX", ["VARX"]) == 100.0  # case-insensitive
    assert T.score_all("ABCDE", ["ABCDEF"]) == 0.0


def test_score_partial_and_any():
    assert T.score_all("1111111 and 2222222", ["1111111", "2222222", "3333333", "4444444"]) == 50.0
    assert T.score_any("2222222", ["1111111", "2222222"]) == 100.0
    assert T.score_any("5555555", ["1111111", "2222222"]) == 0.0


# ------------------------------------------------------------------------------------ prefix-sharing docs


def test_document_facts_and_questions():
    doc = T.make_document(3000, seed=0, index=0)
    assert abs(T.TokenCounter()(doc.text) - 3000) < 0.06 * 3000
    assert len(doc.facts) >= 10
    for town, person in doc.facts:
        assert occurrences(person, doc.text) == 1
        assert f"founded by {person}" in doc.text
    qs = T.document_questions(doc, 30)
    assert len(set(q for q, _ in qs)) == 30
    with pytest.raises(ValueError):
        T.document_questions(doc, 10_000)
    m1 = T.document_messages(doc, qs[0][0])
    m2 = T.document_messages(doc, qs[1][0])
    # the document precedes the question: both requests share everything up to the question
    assert m1[0] == m2[0] and m1[1]["content"].startswith(doc.text) and m2[1]["content"].startswith(doc.text)


def test_documents_differ():
    assert T.make_document(1500, 0, 0).text != T.make_document(1500, 0, 1).text


def test_bench_prompts_are_exact_length_seeded_text():
    from eval.bench_decode import PromptIds

    class IdTokenizer(WordTokenizer):
        def encode(self, text, add_special_tokens=False):
            return [hash(w) % 50000 for w in super().encode(text)]

    text = PromptIds(1000, IdTokenizer())
    assert text.kind == "text"
    a, b = text(5000, "s-0"), text(5000, "s-1")
    assert len(a) == 5000 and len(text(37, "s-0")) == 37
    assert a == text(5000, "s-0") and a[:50] != b[:50]  # same seed same text; a batch's requests share no prefix
    assert len(set(a)) > 100  # words, not one repeated token
    rand = PromptIds(1000)
    assert rand.kind == "random" and len(rand(300, "x")) == 300 and max(rand(300, "x")) < 1000
