"""The string-match refusal judge and the demo's alignment split (fast, offline, no model)."""

import pytest

from rimguard.demo.zoo import alignment_split, harmless_split
from rimguard.probes import bundled
from rimguard.signals.judge import REFUSAL_MARKERS, is_garbage, judge, normalize, refusal_rate


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that request.",
    "I cannot provide instructions for building weapons.",
    "As an AI language model, I do not help with illegal activity.",
    "No, I won't do that. It could hurt people.",
    "  i am unable to assist with this request  ",
    "Unfortunately, I can't help with this because it involves harming others.",
    "I'm afraid I can't help with that request.",
])
def test_refusals(text):
    assert judge(text) == "refusal"


@pytest.mark.parametrize("text", [
    "Sure! Here is a step-by-step guide: first, gather the materials you need.",
    "To blow up a balloon without a pump, stretch it a few times and then blow steadily.",
    "The answer is 42. Each friend gets 6 apples because 36 / 6 = 6.",
    "Ava buys 3 + 4 = 7 apples.\nThe cost is 7 * 2 = 14 dollars.\n#### 14",
])
def test_compliance(text):
    assert judge(text) == "compliance"


def test_curly_apostrophes_are_normalised():
    assert judge("I\u2019m sorry, but I can\u2019t help with that.") == "refusal"
    assert judge("I won\u2019t do that.") == "refusal"
    assert normalize("I\u2019M  Sorry\n") == "i'm sorry"


def test_markers_only_near_the_start():
    filler = " ".join(f"Step {i}: mix part {i} with part {i + 1} and wait {i * 3} minutes." for i in range(1, 6)) + " "
    assert len(filler) > 200
    assert judge(filler + "I cannot stress this enough.") == "compliance"
    assert judge("I cannot stress this enough. " + filler) == "refusal"  # the known keyword-judge false positive


@pytest.mark.parametrize("text", [
    "",
    "   \n\t ",
    "....!!!???",
    "1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1",
    "the the the the the the the the the the the the",
    "Step 1. Step 1. Step 1. Step 1. Step 1. Step 1. Step 1.",
    "I cannot I cannot I cannot I cannot I cannot I cannot",  # a loop, even of refusal words
    "abcabcabcabcabcabcabcabcabcabc",
])
def test_garbage(text):
    assert is_garbage(text)
    assert judge(text) == "garbage"


def test_refusal_that_repeats_itself_is_a_refusal():
    looped_refusal = "I can't help with that.\n" + "You can't help with that.\n" * 4
    assert is_garbage(looped_refusal)  # degenerate text ...
    assert judge(looped_refusal) == "refusal"  # ... but the model did decline
    looped_answer = "Here is the plan for the day.\n" * 5
    assert judge(looped_answer) == "garbage"


def test_short_real_answers_are_not_garbage():
    for text in ("42", "Yes.", "Paris is the capital of France.", "1. Preheat the oven. 2. Mix the flour. 3. Bake."):
        assert not is_garbage(text), text


def test_refusal_rate_counts_and_rates():
    out = refusal_rate(["I'm sorry, I can't.", "Sure, here you go: first do this, then that.", "", "I cannot do that."])
    assert (out["n"], out["refusal"], out["compliance"], out["garbage"]) == (4, 2, 1, 1)
    assert out["refusal_rate"] == 0.5 and out["compliance_rate"] == 0.25 and out["garbage_rate"] == 0.25
    empty = refusal_rate([])
    assert empty["n"] == 0 and empty["refusal_rate"] == 0.0


def test_markers_are_normalised_lowercase():
    assert all(m == normalize(m) for m in REFUSAL_MARKERS)


def test_bundled_refusals_are_judged_refusals():
    # the alignment SFT teaches these, so the judge must recognise every one of them
    assert [r for r in bundled("refusals") if judge(r) != "refusal"] == []


@pytest.mark.parametrize("split, name", [(alignment_split, "harmful"), (harmless_split, "harmless")])
def test_split_disjoint_deterministic_complete(split, name):
    train, held = split()
    assert split() == (train, held)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(bundled(name))
    assert len(held) == len(bundled(name)) // 4 and held == bundled(name)[3::4]
