"""The scorer on real SmolLM2-135M-Instruct continuations (copied from its greedy outputs)."""

import pytest

from c2w.evaluation.scoring import first_line, format_prompts, is_correct, is_strict, normalise

# (continuation, answer, first-line correct, strict prefix)
REAL = [
    (" Paris.\n\nThe answer is: 2", "Paris", True, True),
    (" yen, which is the official currency of Japan", "yen", True, True),
    (" Oskeln.\n\nThe most recent", "Oskeln", True, True),
    ("\nThe answer is: Paris", "Paris", True, False),  # starts with a blank line
    (" The answer is: Oskeln.", "Oskeln", True, False),  # preamble
    ("<|im_end|>", "Tokyo", False, False),
    (" Parisian cafes are", "Paris", False, False),  # not a whole word
    (" located in France.\nParis", "Paris", False, False),  # only on the second line
    (" 1887, in the town", "1887", True, True),
    (" NEW  York!", "new york", True, True),
]


@pytest.mark.parametrize("cont,answer,correct,strict", REAL)
def test_rules_on_real_outputs(cont, answer, correct, strict):
    assert is_correct(cont, answer) is correct
    assert is_strict(cont, answer) is strict


def test_normalise_and_first_line():
    assert normalise("  Hello,\tWorld!! ") == "hello world"
    assert first_line("\n\n  \nsecond line\nthird") == "second line"
    assert first_line("") == ""


def test_empty_answer_is_never_correct():
    assert not is_correct("anything", "")
    assert not is_strict("anything", "...")


def test_format_prompts(tiny):
    tok = tiny.tokenizer
    assert format_prompts(tok, ["a"], "raw") == ["a"]
    chat = format_prompts(tok, ["The capital of France is"], "chat")[0]
    assert "The capital of France is" in chat and chat != "The capital of France is"
    with pytest.raises(ValueError, match="raw' or 'chat"):
        format_prompts(tok, ["a"], "xml")


@pytest.mark.parametrize("cont, answer, correct", [
    (" 李小龍。", "李小龍", True),               # CJK full stop is punctuation
    (" 上海是一个城市", "上海", True),            # no spaces between CJK words: each ideograph is a word
    (" 上海是一个城市", "海是", True),            # (lenient inside CJK runs, as per-character word splitting is)
    (" 東京", "京都", False),
    (" زارون، مدينة", "زارون", True),           # Arabic comma
    (" «Oskeln» is the town", "Oskeln", True),  # guillemets
    (" Parisian food", "Paris", False),         # Latin text unchanged: whole words
    (" Paris, France", "Paris", True),
    (" It was 20°C at noon.", "20", True),      # symbols are spaces too: degrees, currencies, math
    (" It cost €5 million.", "5 million", True),
    (" -3°C overnight", "-3 °C", True),
    (" about 200 km", "≈200 km", True),
    (" 20°C", "2", False),
])
def test_unicode_punctuation_and_cjk_words(cont, answer, correct):
    assert is_correct(cont, answer) is correct


@pytest.mark.parametrize("cont, answer, correct", [
    (" -5 degrees", "5", False),        # a sign is part of the number
    (" 5 degrees", "-5", False),
    (" −5 degrees", "-5", True),        # U+2212 minus is "-"
    (" It fell to -5.", "-5", True),    # a full stop after it still ends the sentence
    (" 3.5 million", "3", False),       # a decimal point is part of the number
    (" 3.5 million", "3.5", True),
    (" 2,500 people", "2500", True),    # thousands separators do not matter
    (" 2500 people", "2,500", True),
    (" 1,000,000 people", "1000000", True),
    (" 1,5 litres", "15", False),       # a decimal comma is not a thousands separator
    (" from 1990-1995", "1995", True),  # a range splits at its hyphen
    (" born in 1887.", "1887", True),
    (" 気温は-5度", "-5", True),          # a sign after a CJK character
    (" 気温は-5度", "5", False),
    (" the point (1,-5)", "-5", True),
    (" –5 degrees", "-5", True),         # an en dash as a minus
    (" 0.5 litres", ".5", True),         # ".5" is "0.5"
    (" .5 litres", "5", False),
    (" 1,234.5 km", "1234.5", True),
    (" The scores were 1,2,3", "2", True),  # lists, dates and versions still split
    (" In 1990,1991", "1991", True),
    (" on 12.05.2020", "2020", True),
    (" rev. 3.2.1", "3.2", False),
    (" In 2019,500 died", "500", True),  # not a thousands number: 2019 has four digits
    (" x-5", "5", True),                 # after a letter: a hyphen, not a sign
    (" It was 5%-10% of it", "10%", True),  # ranges after a symbol or bracket split
    (" between 20°-30° today", "30°", True),
    (" (2019)-2020", "2020", True),
    (" x=-5", "-5", True),
    (" 1e-5", "1e", True),
    (" at 7:30 pm", "7", False),        # a time, score or ratio is one number
    (" at 7:30 pm", "30", False),
    (" at 7:30 pm", "7:30", True),
    (" at 10:30:15", "10:30:15", True),
    (" won 3:1", "3:1", True),
    (" Answer: 5", "5", True),           # a colon after a word still splits
    (" 12.5:3", "12.5", True),           # mixed with other marks: split at the colon
])
def test_numbers_keep_their_signs_and_decimals(cont, answer, correct):
    assert is_correct(cont, answer) is correct


def test_normalise_ignores_placeholders_in_the_text():
    assert normalise("a\x00-5 b\x01") == "a -5 b"


def test_word_sets_of_gate_and_rag_split_numbers_as_before():
    """The gate's novelty and RAG's retrieval were chosen with numbers split at every mark."""
    assert normalise("It was -3.5 or 2,500.", numbers=False) == "it was 3 5 or 2 500"


@pytest.mark.parametrize("cont, answer", [
    (" STRASSE", "Straße"),               # casefold, not lower
    (" Tolkien", "Tol\u00adkien"),        # a soft hyphen in the answer
    (" Tol\u200bkien wrote it", "Tolkien"),  # a zero-width space in the output
])
def test_case_and_invisible_marks_do_not_matter(cont, answer):
    assert is_correct(cont, answer)


@pytest.mark.parametrize("cont, answer, correct", [
    (" B. Paris is the capital", "B", True),    # multiple choice: the letter first
    (" (b) Paris", "B", True),
    (" a city in France", "A", False),          # the article is no answer "A"
    (" A city in France", "A", False),
    (" B", "B", True),
    (" b) Paris", "B", True),
    (" I think it is B", "I", False),           # the pronoun
    (" The answer is B", "B", False),           # a letter later in the line is not read as the answer
    (" **B** Paris", "B", True),                # chat models bold the letter
    (" B\u0301.", "B", False),                  # a decomposed accent makes another letter
    (" A\u0301.", "Á", True),
    (" 犬です。", "犬", True),                    # an ideograph is a word of its own, not a choice letter
    (" 7 days", "7", True),                     # digits keep the whole-word rule
    (" about 7", "7", True),
])
def test_a_one_letter_answer_must_come_first(cont, answer, correct):
    assert is_correct(cont, answer) is correct


@pytest.mark.parametrize("cont, answer, correct", [
    (" United States", "the United States", True),   # a leading article may be left out
    (" the United States", "the United States", True),
    (" Hague", "The Hague", True),
    (" an apple", "An apple", True),
    (" apple pie", "an apple", True),
    (" vitamin C", "Vitamin A", False),               # only a leading one: "a" inside stays
    (" Netherlands", "the Netherlands Antilles", False),
    (" the", "the", True),                             # an article alone is the whole answer
    (" they", "The Y", False),
])
def test_a_leading_article_of_the_answer_may_be_left_out(cont, answer, correct):
    assert is_correct(cont, answer) is correct
