"""Write moelab/data/router/{chat,math,code}.jsonl: the demo's router-training data, one {"text": ...} per line.

chat: everyday requests from templates; math: arithmetic word problems with numbers drawn from a seeded generator;
code: 300-character chunks of Python standard-library modules (PSF licence).
Deterministic: re-running it rewrites the same files.

usage: python scripts/make_router_data.py [COUNT]
"""

from __future__ import annotations

import inspect
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "moelab" / "data" / "router"

CHAT_TEMPLATES = [
    "Can you recommend a good {thing} for {person}?", "What should I do this {time} if it {weather}?",
    "How do I become better at {skill}?", "Write a short {genre} about {topic}.",
    "I feel {feeling} about {event}. Any advice?", "What is the best way to {chore}?",
    "Tell me something interesting about {topic}.", "Help me plan a {event} for {person}.",
    "Why do people enjoy {hobby} so much?", "Could you explain {topic} to a child?",
    "What are three tips for {skill}?", "Describe a perfect {time} in {place}.",
    "My {person2} loves {hobby}. What {thing} could I give them?", "Is it a good idea to visit {place} in the {time}?",
    "What would you say to {person} who feels {feeling}?", "Suggest a {genre} I could read aloud at {event}.",
    "How can I enjoy {hobby} when it {weather}?", "Hi! I just started {hobby}. Where should I begin?",
]
SLOTS = {
    "thing": ["book", "movie", "board game", "podcast", "recipe", "gift", "song", "hiking trail"],
    "person": ["my grandmother", "a ten-year-old", "my best friend", "a new colleague", "my sister", "a student"],
    "person2": ["brother", "neighbour", "aunt", "roommate", "teacher", "partner"],
    "time": ["weekend", "evening", "summer", "morning", "holiday", "Sunday afternoon"],
    "weather": ["rains", "snows", "is very hot", "is windy", "is cloudy"],
    "skill": ["public speaking", "cooking", "painting", "writing letters", "gardening", "listening"],
    "genre": ["poem", "story", "song", "letter", "speech", "fairy tale"],
    "topic": ["the ocean", "friendship", "autumn leaves", "volcanoes", "honeybees", "the moon", "old castles"],
    "feeling": ["nervous", "excited", "unsure", "tired", "happy", "worried"],
    "event": ["my first day at work", "a birthday party", "a family dinner", "a wedding", "moving house"],
    "chore": ["clean a kitchen", "fold shirts", "water houseplants", "organise a closet", "wash a car"],
    "hobby": ["knitting", "fishing", "birdwatching", "dancing", "photography", "chess"],
    "place": ["Paris", "the mountains", "a small village", "the countryside", "Tokyo", "the seaside"],
}
NAMES = ["Sara", "Tom", "Aisha", "Ben", "Lena", "Omar", "Mia", "Raj"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "cookies", "pencils", "cards"]
CODE_MODULES = ["json.decoder", "textwrap", "argparse", "dataclasses", "functools", "collections",
                "pathlib", "shutil", "string", "difflib", "heapq", "bisect", "csv", "fractions", "statistics"]


def chat_lines(rng: random.Random, count: int) -> list[str]:
    lines: set[str] = set()
    for _ in range(100 * count):  # bounded: stops short rather than loop when the templates run out
        if len(lines) == count:
            break
        template = rng.choice(CHAT_TEMPLATES)
        lines.add(template.format(**{k: rng.choice(v) for k, v in SLOTS.items()}))
    return sorted(lines, key=lambda _: rng.random())


def math_line(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(3, 90), rng.randint(2, 40), rng.randint(2, 9)
    return rng.choice([
        f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        f"{name} had {a + b} {item} and gave away {b}. How many are left?",
        f"Each box holds {c} {item}. How many {item} are in {b} boxes?",
        f"What is {a}, then plus {b}, then times {c}?",
        f"Compute {a} times {c}, then subtract {b}.",
        f"{name} shares {c * b} {item} equally among {c} friends. How many does each friend get?",
        f"If {name} saves {b} dollars a week for {c} weeks, how much is saved in total?",
        f"{a} + {b} = {a + b}. {a + b} x {c} = {(a + b) * c}. The answer is {(a + b) * c}.",
    ])


def code_lines(count: int) -> list[str]:
    import importlib

    chunks = []
    for module in CODE_MODULES:
        source = inspect.getsource(importlib.import_module(module))
        chunks += [source[i:i + 300] for i in range(0, len(source) - 300, 300)]
    rng = random.Random(3)
    rng.shuffle(chunks)
    return chunks[:count]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def main(count: int = 300) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_jsonl(OUT / "chat.jsonl", chat_lines(random.Random(1), count))
    rng = random.Random(2)
    write_jsonl(OUT / "math.jsonl", [math_line(rng) for _ in range(count)])
    write_jsonl(OUT / "code.jsonl", code_lines(count))
    print(f"wrote {count} lines each to {OUT}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
