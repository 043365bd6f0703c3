"""Assignment hashing against GrowthBook's public SDK test vectors, and the arm choice built on it.

Vectors copied as data from growthbook/growthbook-python tests/cases.json (specVersion 0.7.1), the
"hash", "getBucketRange" and "chooseVariation" sections, which all GrowthBook SDKs share.
"""
import collections

import pytest

from expo_serve.experiments.assign import choose_arm
from expo_serve.experiments.hashing import bucket_ranges, choose_variation, fnv1a32, gb_hash

# [seed, value, version, expected]
HASH_CASES = [
    ["", "a", 1, 0.22], ["", "b", 1, 0.077], ["b", "a", 1, 0.946], ["ef", "d", 1, 0.652],
    ["asdf", "8952klfjas09ujk", 1, 0.549], ["", "123", 1, 0.011], ["", "___)((*\":&", 1, 0.563],
    ["seed", "a", 2, 0.0505], ["seed", "b", 2, 0.2696], ["foo", "ab", 2, 0.2575], ["foo", "def", 2, 0.2019],
    ["89123klj", "8952klfjas09ujkasdf", 2, 0.124], ["90850943850283058242805", "123", 2, 0.7516],
    ["()**(%$##$%#$#", "___)((*\":&", 2, 0.0128], ["abc", "def", 99, None],
]

# [name, [numVariations, coverage, weights], expected ranges]
BUCKET_RANGE_CASES = [
    ["normal 50/50", [2, 1, None], [[0, 0.5], [0.5, 1]]],
    ["reduced coverage", [2, 0.5, None], [[0, 0.25], [0.5, 0.75]]],
    ["zero coverage", [2, 0, None], [[0, 0], [0.5, 0.5]]],
    ["4 variations", [4, 1, None], [[0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1]]],
    ["uneven weights", [2, 1, [0.4, 0.6]], [[0, 0.4], [0.4, 1]]],
    ["uneven weights, 3 variations", [3, 1, [0.2, 0.3, 0.5]], [[0, 0.2], [0.2, 0.5], [0.5, 1]]],
    ["uneven weights, reduced coverage, 3 variations", [3, 0.2, [0.2, 0.3, 0.5]], [[0, 0.04], [0.2, 0.26], [0.5, 0.6]]],
    ["negative coverage", [2, -0.2, None], [[0, 0], [0.5, 0.5]]],
    ["coverage above 1", [2, 1.5, None], [[0, 0.5], [0.5, 1]]],
    ["weights sum below 1", [2, 1, [0.4, 0.1]], [[0, 0.5], [0.5, 1]]],
    ["weights sum above 1", [2, 1, [0.7, 0.6]], [[0, 0.5], [0.5, 1]]],
    ["weights.length not equal to num variations", [4, 1, [0.4, 0.4, 0.2]], [[0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1]]],
    ["weights sum almost equals 1", [2, 1, [0.4, 0.5999]], [[0, 0.4], [0.4, 0.9999]]],
]

# [name, n, ranges, expected index]
CHOOSE_VARIATION_CASES = [
    ["even range, 0.2", 0.2, [[0, 0.5], [0.5, 1]], 0], ["even range, 0.4", 0.4, [[0, 0.5], [0.5, 1]], 0],
    ["even range, 0.6", 0.6, [[0, 0.5], [0.5, 1]], 1], ["even range, 0.8", 0.8, [[0, 0.5], [0.5, 1]], 1],
    ["even range, 0", 0, [[0, 0.5], [0.5, 1]], 0], ["even range, 0.5", 0.5, [[0, 0.5], [0.5, 1]], 1],
    ["reduced range, 0.2", 0.2, [[0, 0.25], [0.5, 0.75]], 0], ["reduced range, 0.4", 0.4, [[0, 0.25], [0.5, 0.75]], -1],
    ["reduced range, 0.6", 0.6, [[0, 0.25], [0.5, 0.75]], 1], ["reduced range, 0.8", 0.8, [[0, 0.25], [0.5, 0.75]], -1],
    ["reduced range, 0.25", 0.25, [[0, 0.25], [0.5, 0.75]], -1], ["reduced range, 0.5", 0.5, [[0, 0.25], [0.5, 0.75]], 1],
    ["zero range", 0.5, [[0, 0.5], [0.5, 0.5], [0.5, 1]], 2],
]


@pytest.mark.parametrize("seed,value,version,expected", HASH_CASES)
def test_growthbook_hash_vectors(seed, value, version, expected):
    assert gb_hash(seed, value, version) == expected


def test_fnv1a32_textbook_vectors():
    # The FNV reference suite (draft-eastlake-fnv): the building block under GrowthBook's hash.
    assert fnv1a32("") == 0x811C9DC5
    assert fnv1a32("a") == 0xE40C292C
    assert fnv1a32("foobar") == 0xBF9CF968


@pytest.mark.parametrize("name,args,expected", BUCKET_RANGE_CASES, ids=[c[0] for c in BUCKET_RANGE_CASES])
def test_bucket_range_vectors(name, args, expected):
    got = bucket_ranges(*args)
    assert len(got) == len(expected)
    for (a, b), (c, d) in zip(got, expected):
        assert a == pytest.approx(c, abs=1e-9) and b == pytest.approx(d, abs=1e-9)


@pytest.mark.parametrize("name,n,ranges,expected", CHOOSE_VARIATION_CASES, ids=[c[0] for c in CHOOSE_VARIATION_CASES])
def test_choose_variation_vectors(name, n, ranges, expected):
    assert choose_variation(n, ranges) == expected


def test_choose_arm_is_deterministic_and_follows_weights():
    names = ["control", "a03", "a10"]
    weights = {"control": 0.5, "a03": 0.25, "a10": 0.25}
    n = 6000
    picks = [choose_arm("alpha-sweep:1", f"user-{i}", names, weights) for i in range(n)]
    assert picks[:500] == [choose_arm("alpha-sweep:1", f"user-{i}", names, weights) for i in range(500)]
    counts = collections.Counter(picks)
    for name, weight in weights.items():
        assert abs(counts[name] / n - weight) < 0.025
    # Another salt (a new phase) reshuffles units independently of the old assignment.
    repicks = [choose_arm("alpha-sweep:2", f"user-{i}", names, weights) for i in range(n)]
    same = sum(a == b for a, b in zip(picks, repicks)) / n
    assert abs(same - (0.5 ** 2 + 0.25 ** 2 * 2)) < 0.03


def test_choose_arm_skips_zero_weight_arms():
    picks = {choose_arm("s", str(i), ["a", "b", "c"], {"a": 0.0, "b": 1.0, "c": 0.0}) for i in range(500)}
    assert picks == {"b"}
