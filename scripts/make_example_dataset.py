"""Write examples/data/conversations.jsonl: a small, varied, deterministic chat dataset.

Every conversation is generated here from templates and a fixed seed, so the file is license-clean
and reproducible: ``python scripts/make_example_dataset.py`` rewrites it byte for byte.
Most lines use the ShareGPT form (``{"conversations": [{"from": ..., "value": ...}]}``); some use
the ``{"messages": [{"role": ..., "content": ...}]}`` form, so both parsers are exercised.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

Turns = list[tuple[str, str]]  # (role, text) with role in {"system", "user", "assistant"}

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kofi",
         "Lena", "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tomas"]
ITEMS = [("apple", "apples"), ("pencil", "pencils"), ("book", "books"), ("marble", "marbles"),
         ("sticker", "stickers"), ("cookie", "cookies"), ("stamp", "stamps"), ("shell", "shells")]
SYSTEMS = [
    "You are a concise assistant. Answer in as few words as correctness allows.",
    "You are a patient tutor. Explain each step.",
    "You are a helpful assistant for a small engineering team.",
    "You answer questions about everyday maths and science.",
]
TOPICS = {
    "photosynthesis": "Photosynthesis is how plants turn light, water and carbon dioxide into "
    "sugar and oxygen. Chlorophyll in the leaves absorbs the light that drives the reaction.",
    "a hash table": "A hash table stores key-value pairs in an array. A hash function maps each "
    "key to a slot, so lookups take constant time on average; collisions are handled by chaining "
    "or probing.",
    "inflation": "Inflation is the general rise of prices over time. When it is high, the same "
    "amount of money buys less, which is why central banks try to keep it low and stable.",
    "a binary search": "Binary search finds an item in a sorted list by comparing it with the "
    "middle element and discarding the half that cannot contain it. It needs about log2(n) steps.",
    "the water cycle": "Water evaporates from seas and lakes, condenses into clouds, falls as rain "
    "or snow, and flows back through rivers and ground water. The sun's heat drives the cycle.",
    "a compiler": "A compiler translates source code into a lower-level form such as machine "
    "code. It parses the program, checks it, optimises it and then emits the target code.",
    "gravity": "Gravity is the attraction between masses. On Earth it accelerates falling objects "
    "at about 9.8 metres per second squared, and it keeps the Moon in orbit.",
    "version control": "Version control records every change to a set of files, so you can see "
    "who changed what, go back to an earlier state, and merge work done in parallel.",
    "a vaccine": "A vaccine trains the immune system with a harmless piece or copy of a germ, so "
    "the body recognises and fights the real germ faster later.",
    "recursion": "Recursion is when a function calls itself on a smaller part of the problem. "
    "It needs a base case that stops the calls, or it never ends.",
    "an index in a database": "A database index is a sorted structure over one or more columns "
    "that lets queries find rows without scanning the whole table, at the cost of slower writes.",
    "the greenhouse effect": "Gases such as carbon dioxide let sunlight in but absorb part of the "
    "heat the Earth radiates back, which warms the surface more than it would be otherwise.",
}
CONVERSIONS = [
    ("kilometres", "miles", 0.621371), ("miles", "kilometres", 1.609344),
    ("kilograms", "pounds", 2.204623), ("pounds", "kilograms", 0.453592),
    ("litres", "gallons (US)", 0.264172), ("metres", "feet", 3.280840),
    ("inches", "centimetres", 2.54), ("hours", "minutes", 60.0), ("days", "hours", 24.0),
]
CODE_TASKS = [
    ("reverse a string", "python", "def reverse(s: str) -> str:\n    return s[::-1]"),
    ("check whether a number is prime", "python",
     "def is_prime(n: int) -> bool:\n    if n < 2:\n        return False\n"
     "    i = 2\n    while i * i <= n:\n        if n % i == 0:\n            return False\n"
     "        i += 1\n    return True"),
    ("sum a list of numbers", "python", "def total(xs: list[float]) -> float:\n    return sum(xs)"),
    ("count words in a sentence", "python",
     "def count_words(text: str) -> int:\n    return len(text.split())"),
    ("compute a factorial", "javascript",
     "function factorial(n) {\n  return n <= 1 ? 1 : n * factorial(n - 1);\n}"),
    ("find the largest element of an array", "javascript",
     "function largest(xs) {\n  return Math.max(...xs);\n}"),
    ("list the files in a directory", "bash", "ls -la /path/to/dir"),
    ("select the ten newest orders", "sql",
     "SELECT * FROM orders\nORDER BY created_at DESC\nLIMIT 10;"),
    ("swap two variables", "python", "a, b = b, a"),
    ("read a file line by line", "python",
     "with open(path) as f:\n    for line in f:\n        print(line.rstrip())"),
    ("compute the mean of a list", "go",
     "func mean(xs []float64) float64 {\n\tvar s float64\n\tfor _, x := range xs {\n"
     "\t\ts += x\n\t}\n\treturn s / float64(len(xs))\n}"),
    ("check whether a string is a palindrome", "rust",
     "fn is_palindrome(s: &str) -> bool {\n    s.chars().eq(s.chars().rev())\n}"),
]
LIST_SUBJECTS = {
    "primary colours": ["red", "yellow", "blue"],
    "planets closest to the Sun": ["Mercury", "Venus", "Earth", "Mars"],
    "days of the working week": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
    "states of matter": ["solid", "liquid", "gas", "plasma"],
    "noble gases": ["helium", "neon", "argon", "krypton", "xenon", "radon"],
    "sorting algorithms": ["bubble sort", "insertion sort", "merge sort", "quicksort", "heapsort"],
    "HTTP methods": ["GET", "POST", "PUT", "PATCH", "DELETE"],
    "seasons": ["spring", "summer", "autumn", "winter"],
}


def arithmetic(rng: random.Random) -> Turns:
    name, other = rng.sample(NAMES, 2)
    one, many = rng.choice(ITEMS)
    a, b = rng.randint(3, 60), rng.randint(2, 25)
    kind = rng.choice(["give", "buy", "share"])
    if kind == "give":
        q = f"{name} has {a + b} {many} and gives {b} to {other}. How many {many} are left?"
        ans = (f"{name} starts with {a + b} and gives away {b}, "
               f"so {a + b} - {b} = {a} {many} remain.")
    elif kind == "buy":
        price = rng.randint(2, 9)
        q = f"One {one} costs {price} dollars. How much do {a} {many} cost?"
        ans = f"{a} x {price} = {a * price}, so {a} {many} cost {a * price} dollars."
    else:
        k = rng.randint(2, 6)
        q = f"{name} shares {a * k} {many} equally among {k} friends. How many does each get?"
        ans = f"{a * k} / {k} = {a}, so each friend gets {a} {many}."
    turns: Turns = [("user", q), ("assistant", ans)]
    if rng.random() < 0.4:
        turns += [("user", "Can you check that another way?"),
                  ("assistant", "Yes: working backwards from the answer gives the starting "
                   "numbers again, so the result is consistent.")]
    return turns


def conversion(rng: random.Random) -> Turns:
    src, dst, factor = rng.choice(CONVERSIONS)
    value = rng.choice([1, 2, 3, 5, 7, 10, 12, 15, 20, 42, 100, 250])
    result = round(value * factor, 2)
    phrasing = rng.choice([f"Convert {value} {src} to {dst}.",
                           f"How many {dst} are {value} {src}?",
                           f"What is {value} {src} in {dst}?"])
    return [("user", phrasing),
            ("assistant", f"1 {src[:-1] if src.endswith('s') else src} is about {factor} {dst}, "
             f"so {value} {src} is about {result} {dst}.")]


def explanation(rng: random.Random) -> Turns:
    topic = rng.choice(sorted(TOPICS))
    q = rng.choice([f"Explain {topic} in two sentences.", f"What is {topic}?",
                    f"Can you briefly describe {topic}?"])
    turns: Turns = [("user", q), ("assistant", TOPICS[topic])]
    if rng.random() < 0.5:
        turns += [("user", "Give me a one-line summary for a child."),
                  ("assistant", f"In short: {TOPICS[topic].split('.')[0].lower()}.")]
    return turns


def code(rng: random.Random) -> Turns:
    task, lang, snippet = rng.choice(CODE_TASKS)
    turns: Turns = [("user", f"Write a {lang} snippet to {task}."),
                    ("assistant", f"Here is one way:\n\n```{lang}\n{snippet}\n```")]
    if rng.random() < 0.35:
        turns += [("user", "What is its time complexity?"),
                  ("assistant", rng.choice(["It runs in linear time in the size of the input.",
                                            "It is constant time for this operation.",
                                            "It is linear in the input length."]))]
    return turns


def listing(rng: random.Random) -> Turns:
    subject = rng.choice(sorted(LIST_SUBJECTS))
    items = LIST_SUBJECTS[subject]
    fmt = rng.choice(["bullets", "numbered", "comma", "json"])
    if fmt == "bullets":
        body = "\n".join(f"- {x}" for x in items)
    elif fmt == "numbered":
        body = "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))
    elif fmt == "comma":
        body = ", ".join(items)
    else:
        body = json.dumps({"items": items})
    label = {"bullets": "as a bulleted list", "numbered": "as a numbered list",
             "comma": "separated by commas", "json": "as a JSON object"}[fmt]
    return [("user", f"List the {subject} {label}."), ("assistant", body)]


def sorting(rng: random.Random) -> Turns:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(4, 9))]
    order = rng.choice(["ascending", "descending"])
    ys = sorted(xs, reverse=order == "descending")
    return [("user", f"Sort these numbers in {order} order: {', '.join(map(str, xs))}"),
            ("assistant", ", ".join(map(str, ys)))]


def word_play(rng: random.Random) -> Turns:
    word = rng.choice(["planet", "kitchen", "river", "garden", "window", "orange", "silver",
                       "thunder", "pencil", "market", "bridge", "forest"])
    kind = rng.choice(["reverse", "upper", "count", "vowels"])
    if kind == "reverse":
        return [("user", f"Spell '{word}' backwards."), ("assistant", word[::-1])]
    if kind == "upper":
        return [("user", f"Write '{word}' in capital letters."), ("assistant", word.upper())]
    if kind == "count":
        return [("user", f"How many letters are in '{word}'?"),
                ("assistant", f"'{word}' has {len(word)} letters.")]
    vowels = sum(c in "aeiou" for c in word)
    return [("user", f"How many vowels does '{word}' contain?"),
            ("assistant", f"It contains {vowels} vowels.")]


def date_time(rng: random.Random) -> Turns:
    start = rng.randint(6, 20)
    dur = rng.randint(1, 5)
    mins = rng.choice([0, 15, 30, 45])
    end_h, end_m = (start + dur) % 24, mins
    return [("user", f"A meeting starts at {start:02d}:{mins:02d} and lasts {dur} hours. "
             "When does it end?"),
            ("assistant", f"It ends at {end_h:02d}:{end_m:02d}.")]


def percent(rng: random.Random) -> Turns:
    p = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75])
    base = rng.choice([40, 60, 80, 120, 200, 240, 300, 500, 1000])
    return [("user", f"What is {p}% of {base}?"),
            ("assistant", f"{p}% of {base} is {base} x {p} / 100 = {base * p / 100:g}.")]


GENERATORS: list[Callable[[random.Random], Turns]] = [
    arithmetic, conversion, explanation, code, listing, sorting, word_play, date_time, percent,
]
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def conversation(rng: random.Random) -> Turns:
    turns = rng.choice(GENERATORS)(rng)
    if rng.random() < 0.3:
        turns = [("system", rng.choice(SYSTEMS)), *turns]
    if rng.random() < 0.15:
        # Two tasks in one chat: a follow-up on a different subject.
        turns = turns + [t for t in rng.choice(GENERATORS)(rng) if t[0] != "system"]
    return turns


def to_json(turns: Turns, messages_form: bool) -> str:
    if messages_form:
        return json.dumps({"messages": [{"role": r, "content": t} for r, t in turns]})
    return json.dumps({"conversations": [{"from": SHAREGPT_ROLE[r], "value": t}
                                         for r, t in turns]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent.parent
                        / "examples/data/conversations.jsonl")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=20240611)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines: list[str] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    while len(lines) < args.count:
        # Identical conversations are collapsed by run creation, whatever their JSON form.
        turns = conversation(rng)
        if tuple(turns) not in seen:
            seen.add(tuple(turns))
            lines.append(to_json(turns, messages_form=len(lines) % 5 == 4))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} conversations to {args.out}")


if __name__ == "__main__":
    main()
