"""MX ordering (RFC 5321 5.1, RFC 7505): pure, table-driven."""

from __future__ import annotations

import random

import pytest

from harakapy.outbound.mx import MxError, order_mx


def names(records, **kwargs):
    return [h.hostname for h in order_mx(records, domain="d.test", port=25, **kwargs)]


def test_preference_order_and_random_among_equals():
    records = [(20, "c.test"), (10, "a.test"), (10, "b.test")]
    firsts = {names(records, rng=random.Random(seed))[0] for seed in range(50)}
    assert firsts == {"a.test", "b.test"}  # both equal-preference hosts come first sometimes
    for seed in range(50):
        assert names(records, rng=random.Random(seed))[2] == "c.test"  # c only after both


def test_implicit_mx_when_there_are_no_records():
    (host,) = order_mx([], domain="d.test", port=2525)
    assert (host.hostname, host.port, host.implicit) == ("d.test", 2525, True)


def test_null_mx_is_permanent():
    with pytest.raises(MxError) as error:
        order_mx([(0, "")], domain="d.test", port=25)
    assert error.value.permanent and error.value.enhanced == "5.1.10"


def test_null_mx_mixed_with_real_ones_is_ignored():
    assert names([(0, ""), (10, "a.test")]) == ["a.test"]


def test_our_own_host_and_worse_preferences_are_dropped():
    records = [(10, "a.test"), (20, "me.test"), (30, "z.test")]
    assert names(records, me=["me.test"]) == ["a.test"]


def test_our_own_host_as_best_mx_is_a_loop():
    with pytest.raises(MxError) as error:
        order_mx([(10, "me.test"), (20, "b.test")], domain="d.test", port=25,
                 me=["ME.test."])
    assert error.value.permanent and error.value.enhanced == "5.4.6"
