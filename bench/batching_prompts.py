"""What ``bench.batching`` sends: the short story prompts of the concurrency phase, and the
coding agents' made-up project handbooks (system prompts) and user turns.

Why a module of its own: the workload's texts are data, read apart from the code that
sends them (``bench.batching_requests``) and measures the replies (``bench.batching``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

TOPICS = [
    "a lighthouse keeper", "a lost robot", "a dragon who hates fire", "a city under the sea",
    "a time-travelling cat", "the last tree on Mars", "a haunted library", "a chess prodigy",
    "a baker who bakes dreams", "a talking river", "an astronaut's first day",
    "a map that redraws itself", "a shy volcano", "a detective penguin",
    "a garden on a train", "a clock that runs backwards",
]
FORMS = ["short story", "short poem", "fable", "bedtime story"]

AREAS = ["billing", "search", "auth", "storage", "scheduler", "metrics", "importer", "CLI"]
THINGS = ["the release pipeline", "the public API", "the database schema", "the config loader",
          "the job queue", "the web dashboard", "the nightly export", "the cache layer"]
TAGS = ["flaky-test", "tech-debt", "needs-design", "security", "perf", "docs"]
RULES = [
    "Every change to the {area} module comes with a test that fails without it; agent-{a} "
    "runs the whole test suite before asking for review.",
    "Never log tokens, passwords or customer e-mail addresses from {thing}; when a value may "
    "be sensitive, log its length only.",
    "A function longer than {n} lines is split before review, and each part gets a "
    "docstring that says why it exists, not what it does.",
    "The {area} team owns {thing}; agent-{a} asks them before changing its interface and "
    "links their answer in the pull request.",
    "Releases of {thing} happen on day {day} of each month; anything not reviewed by "
    "{hour}:00 that day waits for the next release.",
    "Calls to {thing} are retried at most {n} times with exponential backoff starting at "
    "{ms} ms, and every retry is counted in the metrics.",
    "A new setting of the {area} module gets a default, a comment and a changelog line; "
    "settings nobody has read for {n} months are removed.",
    "When a test of the {area} module is flaky, agent-{a} opens an issue tagged {tag} "
    "instead of retrying it in continuous integration.",
    "Pull requests touching {thing} stay under {n}00 changed lines; larger work is split "
    "into steps that each keep the build green.",
    "Errors shown to users of {thing} say what happened and what to do next; stack traces "
    "go to the log, never to the screen.",
    "Dependencies of the {area} module are pinned; agent-{a} upgrades them in a separate "
    "pull request tagged {tag} with the changelog of each package.",
    "Before a migration of {thing}, take a backup, rehearse on a copy and write the "
    "rollback steps in the ticket; migrations never run on day {day}.",
]
TURNS = [
    "Which rule says what to do before asking for review? Answer in one sentence.",
    "Summarise the rules about retries and errors in two sentences.",
    "Write a one-line commit message for a fix to the config loader.",
    "What do you do first when a test becomes flaky?",
    "Which team should you ask before changing the public API?",
    "List three rules you would check before a release.",
]


def story_prompt(index: int) -> str:
    """Distinct prompts for the first len(TOPICS) * len(FORMS) indices."""
    topic = TOPICS[index % len(TOPICS)]
    form = FORMS[(index // len(TOPICS)) % len(FORMS)]
    return f"Write a {form} about {topic}."


def handbook(agent: int, target_tokens: int, count: Callable[[str], int]) -> str:
    """A made-up project handbook of about ``target_tokens`` tokens, distinct per agent."""
    rng = random.Random(1000 + agent)
    area = AREAS[agent % len(AREAS)]
    lines = [f"You are agent-{agent}, a coding agent on the {area} project.",
             f"Project handbook for agent-{agent}. Follow every numbered rule below; quote "
             "the rule's number when a reply depends on it. Keep answers short.", ""]
    rule = 0
    while count("\n".join(lines)) < target_tokens:
        rule += 1
        text = rng.choice(RULES).format(
            a=agent, area=rng.choice(AREAS), thing=rng.choice(THINGS), tag=rng.choice(TAGS),
            n=rng.randint(2, 9), day=rng.randint(1, 28), hour=rng.randint(9, 17),
            ms=rng.choice((50, 100, 200, 500)))
        lines.append(f"Rule {rule}. {text}")
    return "\n".join(lines)
