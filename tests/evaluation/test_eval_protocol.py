"""Prompts and answer reading: the GRACE authors' protocol (default) and LLaVA's."""

import pytest

from grace.evaluation import EvalItem, build_prompt, extract, first_letter, is_correct, last_letter, open_match, yes_no
from grace.evaluation.protocol import get_protocol, leading_letter, llava_yes_no

OPTS = [("A", "red"), ("B", "blue"), ("C", "green"), ("D", "yellow")]


def test_choice_prompt_with_context_is_the_authors_format():
    item = EvalItem("  What color is it? ", "A", options=OPTS, hint="A plain square.", bench="mmbench")
    assert build_prompt(item) == ("Context: A plain square.\nQuestion: What color is it?\nOptions:\n(A) red\n(B) blue\n"
                                  "(C) green\n(D) yellow\nAnswer with only the option letter.")


def test_choice_prompt_without_hint_has_no_context_line():
    item = EvalItem("Which?", "B", options=OPTS[:2], bench="seed")
    assert build_prompt(item) == "Question: Which?\nOptions:\n(A) red\n(B) blue\nAnswer with only the option letter."


def test_mmstar_options_inside_the_question():
    item = EvalItem("Which?\nOptions: A: x, B: y", "A", bench="mmstar", kind="choice", pick="last")
    assert build_prompt(item) == "Which?\nOptions: A: x, B: y\n\nAnswer with only the option letter (A, B, C, or D)."
    assert item.letters == "ABCD"


def test_yes_no_and_open_prompts():
    assert build_prompt(EvalItem(" Is it red? ", "1", kind="yesno", bench="hallusionbench")) == \
        "Is it red?\nAnswer with only 'Yes' or 'No'."
    open_item = EvalItem("What is x in <image 1>? See <IMAGE 2 >.", "3", kind="open", bench="mmmu")
    assert build_prompt(open_item) == "What is x in <image>? See <image>.\nAnswer with a short phrase or number only."
    assert get_protocol("grace").max_new_tokens(open_item) == 32
    assert get_protocol("grace").max_new_tokens(EvalItem("q", "A", options=OPTS)) == 8


def test_llava_protocol_prompt_and_reading():
    item = EvalItem("What color?", "B", options=OPTS[:2], hint="Look.", bench="mmbench")
    assert build_prompt(item, "llava") == ("Look.\nWhat color?\nA. red\nB. blue\n"
                                           "Answer with the option's letter from the given choices directly.")
    assert extract(item, "B. blue", "llava") == "B" and extract(item, "Answer: B", "llava") == ""
    assert leading_letter("(A) red", "AB") == "A" and leading_letter("The answer is B.", "AB") == "B"
    assert llava_yes_no("No, it is not.") == "0" and llava_yes_no("Yes.") == "1"
    with pytest.raises(ValueError, match="unknown protocol"):
        build_prompt(item, "gpt")


@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("  c.", "C"), ("The answer is D", "A"),   # A of "ANSWER" comes first
    ("Answer: C", "A"), ("Option: C", "C"), ("I pick d", "C"),  # the C of "PICK"
    ("none", ""), ("", ""), ("E", ""), ("xyz 9", "")])
def test_first_valid_letter_anywhere(reply, letter):
    assert first_letter(reply, "ABCD") == letter


def test_first_letter_only_counts_listed_options():
    assert first_letter("Answer: C", "BC") == "C"        # A is not an option here
    assert first_letter("d", "ABC") == ""


@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("(B)", "B"), ("Answer: C", "C"), ("I think B, not a", "A"), ("b then c", "C"),
    ("ABBA", "A"), ("nothing", "")])
def test_mmstar_reads_the_last_letter(reply, letter):
    assert last_letter(reply, "ABCD") == letter


def test_mmstar_fallback_is_the_last_valid_character():
    assert last_letter("CAB", "ABCD") == "B"       # no standalone letter: last valid character
    assert last_letter("Brb", "ABCD") == "B"


@pytest.mark.parametrize("reply,answer", [
    ("Yes", "1"), ("no.", "0"), ("NO", "0"), ("It is not.", "1"), ("Not at all", "0"), ("isn't", "0"),
    ("Correct", "1"), ("maybe", ""), ("", ""), ("'Yes'", "1"), ("The lines don't match", "0")])
def test_hallusionbench_first_yes_or_no_word(reply, answer):
    assert yes_no(reply) == answer


@pytest.mark.parametrize("reply,gold,ok", [
    ("3.5", "3.5", True), ("x = 3.50000", "3.5", True), ("1,000", "1000", True), ("It is 4", "3.5", False),
    ("Monet", "monet", True), ("Claude Monet.", "Monet", True), ("Monetary", "Monet", False),
    ("", "Monet", False), ("anything", "", False), ("-2", "-2", True)])
def test_mmmu_open_answers(reply, gold, ok):
    assert open_match(reply, gold) is ok


def test_is_correct_per_kind():
    assert is_correct(EvalItem("q", "B", options=OPTS), "b")
    assert not is_correct(EvalItem("q", "B", options=OPTS), "")            # no letter: wrong, not a crash
    assert is_correct(EvalItem("q", "D", options=OPTS, pick="last", bench="mmstar"), "A or D")
    assert is_correct(EvalItem("q", "0", kind="yesno"), "No")
    assert is_correct(EvalItem("q", "red circle"), "Red circle.")
    assert not is_correct(EvalItem("q", "A", options=OPTS, error="image not found"), "A")
