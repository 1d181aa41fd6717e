"""benchmarks/value_ranges.py's token attribution, on values built so that the answer is known."""

import torch

import value_ranges


def test_token_classes():
    cases = [("Hello", 0, "sink"), ("\n\n", 7, "newline"), (" ,", 7, "punctuation"), ("=", 9, "punctuation"),
             (" 42", 9, "digit"), (" x2", 9, "word"), (" the", 9, "word")]
    for text, position, want in cases:
        assert value_ranges.token_class(text, position) == want, (text, position)


def test_the_largest_ranges_are_attributed_to_their_class():
    """200 tokens; the newlines (every 10th) get ranges 5x the others' in every head: they are the
    whole top 1% and their lift is 1 / their share of tokens."""
    g = torch.Generator().manual_seed(0)
    classes = ["newline" if i % 10 == 5 else "word" for i in range(200)]
    layers = []
    for _ in range(3):
        v = torch.rand(2, 200, 16, generator=g)
        v[:, 5::10] *= 5
        layers.append(v)
    counts = value_ranges.top_token_classes(layers, classes)
    assert counts["all"]["newline"] == 20 and counts["top_total"] == 2 * 3 * 2
    assert counts["top"]["newline"] == counts["top_total"] and counts["top"]["word"] == 0
