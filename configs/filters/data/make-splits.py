#!/usr/bin/env python3
"""Makes train.jsonl and val.jsonl from parts*/*.jsonl, and test.jsonl and test2.jsonl from test-parts*/.

Deterministic: the same files give the same splits. Within each (category, label, style) group the
examples are shuffled with a fixed seed and 15 % go to validation. The test split is written by other
hands (see README.md) and is only concatenated, never sampled from the training parts.
"""
import json
import pathlib
import random

HERE = pathlib.Path(__file__).parent
VAL_SHARE = 0.15
SEED = 20261207


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path, rows):
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def key(r):
    return " ".join(r["text"].lower().split())


# Training parts by round, each with its group-key prefix. Round 1's groups keep their original keys, so
# that a later round leaves round 1's splits exactly as they were. public/ holds published sets (see
# README.md).
ROUNDS = [("parts", ()), ("parts-2", ("r2",)), ("public", ("public",))]
# Frozen test splits: each written by writers who saw no training data, nor the other test split.
TESTS = [("test-parts", "test.jsonl"), ("test-parts-2", "test2.jsonl")]


def main():
    groups = {}
    for folder, prefix in ROUNDS:
        for part in sorted((HERE / folder).glob("*.jsonl")):
            for r in read(part):
                group = prefix + (r["category"], r["label"], r.get("style", ""))
                groups.setdefault(group, []).append(r)
    train, val = [], []
    for group in sorted(groups):
        rows = groups[group]
        # One generator per group, so that adding a group leaves the others' splits as they were.
        random.Random(f"{SEED}/{'/'.join(group)}").shuffle(rows)
        cut = round(len(rows) * VAL_SHARE)
        val += rows[:cut]
        train += rows[cut:]
    tests = {name: [r for part in sorted((HERE / folder).glob("*.jsonl")) for r in read(part)] for folder, name in TESTS}
    test = [r for rows in tests.values() for r in rows]
    # Decontamination: a training text that is also a test text (the same common phrasing, written twice by
    # different hands) leaves training, so the test split stays whole and unseen.
    tested = {key(r) for r in test}
    dropped = [r for r in train + val if key(r) in tested]
    train = [r for r in train if key(r) not in tested]
    val = [r for r in val if key(r) not in tested]
    print(f"{len(dropped)} training texts dropped because the test split has them")
    write(HERE / "train.jsonl", train)
    write(HERE / "val.jsonl", val)
    for name, rows in tests.items():
        write(HERE / name, rows)
    print(f"train {len(train)}  val {len(val)}  " + "  ".join(f"{n} {len(r)}" for n, r in tests.items()))


if __name__ == "__main__":
    main()
