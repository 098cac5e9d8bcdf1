import pytest

from c2w.memory.views import build_views, mechanical_views, salient_spans, sentences

TEXT = "Mira Talvik was born in the harbour town of Oskeln. In 1902 she moved to Prell."


def test_cloze_qa_views_ask_for_each_span_with_the_span_as_short_answer():
    views = mechanical_views(TEXT, "cloze-qa")
    qa = [v for v in views if v.startswith("Question:")]
    answers = [v.split("\nAnswer: ")[1].rstrip(".") for v in qa]
    assert answers == ["Mira Talvik", "Oskeln", "1902", "Prell"]
    assert "Question: Mira Talvik was born in the harbour town of what?\nAnswer: Oskeln." in qa
    for v in qa:  # the question is the span's own sentence; no span leaks into its question
        q, a = v[len("Question: "):].split("\nAnswer: ")
        assert a.rstrip(".") not in q


def test_views_invent_nothing():
    spans = set(salient_spans(TEXT))
    for style in ("cloze-qa", "describe"):
        for v in build_views(TEXT, None, True, style):
            assert set(salient_spans(v.replace("Question:", "").replace("Answer:", ""))) <= spans | {"What"}


def test_recombination_off_is_the_raw_text_only_and_bad_style_is_rejected():
    assert build_views(TEXT, "a paraphrase", False) == [TEXT]
    assert build_views(TEXT, "a paraphrase", True)[-1] == "a paraphrase"
    with pytest.raises(ValueError, match="view style"):
        mechanical_views(TEXT, "questions")


def test_sentences_split_only_before_a_capital_or_digit():
    assert sentences(TEXT) == ["Mira Talvik was born in the harbour town of Oskeln.", "In 1902 she moved to Prell."]
    assert sentences("It costs 3.5 units. done") == ["It costs 3.5 units. done"]


def test_lines_and_sentences_of_other_scripts_are_sentences():
    # a list without full stops is a sentence a line: one 12-line "sentence" kept 8 spans and ran past max_len
    assert sentences("Populations:\n  Oskeln 1200\nPrell 900 \n\n") == ["Populations:", "Oskeln 1200", "Prell 900"]
    assert sentences("東京は首都です。大阪は都市です。") == ["東京は首都です。", "大阪は都市です。"]  # no space after 。
    assert sentences("यह एक वाक्य है। यह दूसरा है।") == ["यह एक वाक्य है।", "यह दूसरा है।"]
    assert sentences("جاء الولد. ذهب البيت.") == ["جاء الولد.", "ذهب البيت."]  # a script without case
    assert sentences("Mira left, e.g. for Prell. then back") == ["Mira left, e.g. for Prell. then back"]
    # prose wrapped by hand goes on across its line breaks; a list item or a blank line ends a sentence
    wrapped = "The Karsten Bridge over the river Ost opened to traffic in\n1933 in the city of Vemdal, after four years."
    assert sentences(wrapped) == [wrapped]
    assert sentences(wrapped.replace("\n", "\r\n")) == [wrapped.replace("\n", "\r\n")]  # Windows line ends
    intro = "The members of the board of the Karsten Bridge Company, as of 1901:"
    assert sentences(intro + "\rName Tor\rCity Prell") == [intro, "Name Tor", "City Prell"]  # lines ended by \r alone
    assert sentences("Members of the board of the Karsten Bridge Company were\n- Mira Holm\n2. Tor Lund\r\nb) Agnes") == [
        "Members of the board of the Karsten Bridge Company were", "- Mira Holm", "2. Tor Lund", "b) Agnes"]
    assert sentences("A paragraph that ends without its full stop, as headings do\n\nNext one") == [
        "A paragraph that ends without its full stop, as headings do", "Next one"]
    assert [v for v in mechanical_views("Oskeln 1200\nPrell 900") if v.startswith("Question")] == [
        "Question: What 1200?\nAnswer: Oskeln.", "Question: Oskeln what?\nAnswer: 1200.",
        "Question: What 900?\nAnswer: Prell.", "Question: Prell what?\nAnswer: 900."]


def test_end_words_ask_for_a_lower_case_answer_at_the_sentence_end():
    from c2w.memory.views import end_focus

    assert end_focus("Trakon Bovov now works as a translator.") == "translator"
    assert end_focus("Mira Talvik was born in Oskeln.") is None  # a name: salient_spans asks for it
    assert end_focus("Of all colours, Pavi Vrosund likes red best.") is None  # an adverb, not the fact
    assert end_focus("It was founded in 1887.") is None
    text = "Trakon Bovov now works as a translator. Her art is start."
    views = mechanical_views(text, "cloze-qa", end_words=True)
    assert "Question: Trakon Bovov now works as a what?\nAnswer: translator." in views
    assert "Question: Her art is what?\nAnswer: start." in views  # the last word, not "art" inside "start"
    assert "translator: Trakon Bovov now works as a translator." in views
    assert not any("translator." in v and v.startswith("Question") and "Answer: translator" in v
                   for v in mechanical_views(text, "cloze-qa"))  # off by default


def test_build_views_takes_the_raw_text_as_given_windows():
    w = ["First half of a long text.", "Second half of it."]
    text = " ".join(w)
    assert build_views(text, None, False, raw=w) == w
    views = build_views(text, None, True, raw=w)
    assert views[:2] == w and text not in views


def test_a_span_is_asked_for_where_it_stands_as_a_word():
    from c2w.memory.views import ask

    # "31" first occurs inside "1931": the question must blank the number of members, not the year
    assert ask("In 1931 the club had 31 members.", "31") == "In 1931 the club had what members?"
    assert ask("Ralan met Ral in 2001.", "Ral") == "Ralan met what in 2001?"
    # nor inside a decimal, a thousands number or a hyphenated name
    assert ask("The fee rose from 3.5 to 5 crowns.", "5") == "The fee rose from 3.5 to what crowns?"
    assert ask("It cost 1,500 and then 500 crowns.", "500") == "It cost 1,500 and then what crowns?"
    assert ask("Anna met Olaf-Peter and Olaf.", "Olaf") == "Anna met Olaf-Peter and what?"
    views = mechanical_views("In 1931 the club had 31 members.")
    assert "Question: In 1931 the club had what members?\nAnswer: 31." in views


def test_names_in_any_alphabet_are_spans_and_start_sentences():
    assert salient_spans("Émile Duroc climbed the Łomnica in 1921 with Ørsted.") == ["Émile Duroc", "Łomnica", "1921", "Ørsted"]
    assert sentences("He met Émile. Ørsted came later. Δήλος is an island.") == [
        "He met Émile.", "Ørsted came later.", "Δήλος is an island."]
    assert "Question: What climbed the Łomnica in 1921?\nAnswer: Émile Duroc." in mechanical_views(
        "Émile Duroc climbed the Łomnica in 1921.")
