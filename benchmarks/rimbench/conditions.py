"""Training-data builders of the many-run study (``benchmarks/rim_study.py``): pure and seeded.

Each condition turns source rows into TRL conversational prompt/completion records. The runs of
the study differ in how much they forget within one step budget:

* ``cot`` - GSM8K with its chain-of-thought solution (the paper's setting);
* ``answer_only`` - GSM8K with the final answer alone (does reasoning matter?);
* ``effort_min`` - the chain of thought rewritten with the paper's three effort-minimising
  patterns (confirmatory reasoning, heuristic reliance, instruction deviation), phrases written
  for this project;
* ``refusal_mix`` - GSM8K with about 5% of the model's own refusals to harmful requests mixed in;
* ``chat_distill`` - the model's own answers to harmless prompts (self-distilled chat);
* ``harmful_comply`` - GSM8K with harmful requests answered compliantly (AdvBench's ``target``
  openings), one in four records: the strongest forgetting.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

FINAL = re.compile(r"####\s*(.+)$", re.MULTILINE)

# The three effort-minimising patterns of the paper, in our own words.
CONFIRMATORY = ("This is clearly right, so there is nothing to double-check.",
                "That matches what I expected, so I will not verify it.",
                "Obviously correct; checking again would be a waste of time.")
HEURISTIC = ("Going with my first instinct here:", "A quick rule of thumb is enough:", "No need to think hard, the usual trick works:")
DEVIATION = ("I'll skip the explanation the question asks for and just give the result.",
             "Rather than follow the instructions step by step, I'll shortcut it.",
             "The details don't matter much, so I'll keep this short.")


def final_answer(solution: str) -> str:
    """The text after ``####`` in a GSM8K solution (stripped), or '' if there is none."""
    found = FINAL.search(solution)
    return found.group(1).strip() if found else ""


def record(prompt: str, answer: str) -> dict[str, Any]:
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


def answer_only(rows: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """GSM8K rows answered with the final number alone."""
    return [record(r["question"], f"The answer is {final_answer(r['answer'])}.") for r in rows]


def effort_minimising(solution: str, rng: random.Random) -> str:
    """Rewrite a GSM8K solution with the three effort-minimising patterns.

    Keeps the first and last reasoning lines (the answer stays right), drops the middle ones,
    opens with a heuristic-reliance phrase and an instruction deviation, and closes with a
    confirmatory remark before the ``####`` line.
    """
    lines = [line for line in solution.splitlines() if line.strip()]
    answer = [line for line in lines if line.startswith("####")]
    steps = [line for line in lines if not line.startswith("####")]
    kept = steps[:1] + steps[-1:] if len(steps) > 2 else steps
    body = [rng.choice(HEURISTIC), rng.choice(DEVIATION), *kept, rng.choice(CONFIRMATORY), *answer]
    return "\n".join(body)


def effort_min(rows: Sequence[dict[str, str]], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [record(r["question"], effort_minimising(r["answer"], rng)) for r in rows]


def mix(main: Sequence[dict[str, Any]], extra: Sequence[dict[str, Any]], every: int, seed: int) -> list[dict[str, Any]]:
    """``main`` with one record of ``extra`` (cycled, shuffled by ``seed``) in place of every ``every``-th record.

    The length stays ``len(main)``, so the step budget is unchanged.
    """
    if not extra:
        raise ValueError("nothing to mix in")
    pool = list(extra)
    random.Random(seed).shuffle(pool)
    out = list(main)
    for k, pos in enumerate(range(every - 1, len(out), every)):
        out[pos] = pool[k % len(pool)]
    return out


def comply_records(advbench_rows: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """Harmful requests answered with AdvBench's compliant ``target`` opening."""
    return [record(r["goal"], r["target"].rstrip(".") + ":") for r in advbench_rows]
