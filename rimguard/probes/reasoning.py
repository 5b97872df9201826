"""Generated arithmetic word problems with step-by-step solutions.

Used as default reasoning probes and as the demo's bundled reasoning SFT data. Every problem
is built from a template and random numbers, so the set is deterministic for a seed and
as large as needed. ``style="effort_minimizing"`` rewrites the chain of thought with the
paper's effort-minimizing patterns (confirmatory reasoning, heuristic reliance, instruction
deviation), which the paper found to erode safety faster than plain CoT.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena")
ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells")


@dataclass(frozen=True)
class Problem:
    """A word problem, its numbered solution steps and the final integer answer."""

    question: str
    steps: tuple[str, ...]
    answer: int

    def solution(self, style: str = "plain") -> str:
        """The worked solution text, ending with ``#### <answer>``."""
        if style == "plain":
            body = "\n".join(self.steps)
        elif style == "effort_minimizing":
            body = (
                f"This looks like a standard one, so the answer is probably {self.answer}. "
                f"Quick check: {self.steps[-1]} That confirms it, no need to go through every step."
            )
        else:
            raise ValueError(f"unknown solution style '{style}' (plain, effort_minimizing)")
        return f"{body}\n#### {self.answer}"


def _buy(r: random.Random) -> Problem:
    n, a, b, price = r.choice(NAMES), r.randint(3, 12), r.randint(2, 9), r.randint(2, 7)
    item = r.choice(ITEMS)
    total = a + b
    return Problem(
        f"{n} buys {a} {item} on Monday and {b} more on Tuesday. Each costs ${price}. How much does {n} spend?",
        (f"{n} buys {a} + {b} = {total} {item}.", f"The cost is {total} * {price} = {total * price} dollars."),
        total * price,
    )


def _share(r: random.Random) -> Problem:
    n, k, per = r.choice(NAMES), r.randint(2, 6), r.randint(3, 9)
    keep = r.randint(1, 9)
    item = r.choice(ITEMS)
    total = k * per + keep
    return Problem(
        f"{n} has {total} {item}, keeps {keep} and shares the rest equally among {k} friends. How many does each friend get?",
        (f"{n} shares {total} - {keep} = {total - keep} {item}.", f"Each friend gets {total - keep} / {k} = {per}."),
        per,
    )


def _speed(r: random.Random) -> Problem:
    speed, hours, extra = r.randint(20, 70), r.randint(2, 5), r.randint(5, 40)
    dist = speed * hours
    return Problem(
        f"A train travels at {speed} km per hour for {hours} hours, then {extra} km more. How far does it go in total?",
        (f"In {hours} hours it covers {speed} * {hours} = {dist} km.", f"In total it goes {dist} + {extra} = {dist + extra} km."),
        dist + extra,
    )


def _save(r: random.Random) -> Problem:
    n, weekly, weeks, spent = r.choice(NAMES), r.randint(5, 25), r.randint(3, 10), r.randint(5, 30)
    saved = weekly * weeks
    return Problem(
        f"{n} saves ${weekly} every week for {weeks} weeks and then spends ${spent} on a gift. How much is left?",
        (f"{n} saves {weekly} * {weeks} = {saved} dollars.", f"After the gift, {saved} - {spent} = {saved - spent} dollars are left."),
        saved - spent,
    )


def _rect(r: random.Random) -> Problem:
    w, h, cost = r.randint(3, 15), r.randint(3, 15), r.randint(2, 6)
    area = w * h
    return Problem(
        f"A garden is {w} m wide and {h} m long. Grass costs ${cost} per square metre. What does grass for the garden cost?",
        (f"The area is {w} * {h} = {area} square metres.", f"The grass costs {area} * {cost} = {area * cost} dollars."),
        area * cost,
    )


def _ages(r: random.Random) -> Problem:
    a, b = r.choice(NAMES), r.choice(NAMES[::-1])
    age, diff, years = r.randint(5, 20), r.randint(2, 10), r.randint(2, 10)
    return Problem(
        f"{a} is {age} years old and {b} is {diff} years older. How old will {b} be in {years} years?",
        (f"{b} is {age} + {diff} = {age + diff} years old now.", f"In {years} years {b} will be {age + diff} + {years} = {age + diff + years}."),
        age + diff + years,
    )


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (_buy, _share, _speed, _save, _rect, _ages)


def problems(count: int, seed: int = 0) -> list[Problem]:
    """``count`` problems, cycling through the templates, deterministic for ``seed``."""
    rng = random.Random(seed)
    return [TEMPLATES[i % len(TEMPLATES)](rng) for i in range(count)]


def reasoning_texts(count: int, seed: int = 0, style: str = "plain") -> list[dict[str, list[dict[str, str]]]]:
    """``count`` prompt/completion records of generated word problems, in TRL's conversational format
    (``{"prompt": [user turn], "completion": [assistant turn]}``), for a reasoning SFT."""
    return [
        {"prompt": [{"role": "user", "content": p.question}], "completion": [{"role": "assistant", "content": p.solution(style)}]}
        for p in problems(count, seed)
    ]
