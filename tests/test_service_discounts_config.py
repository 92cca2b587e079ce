"""The ``[discounts]`` table of the one TOML file (README "HTTP service", *Configuration*):
every ``DiscountRules`` round-trips through its TOML form, a malformed value is a
``ConfigError`` naming its full key, and ``payengine serve``'s engine and the CLI's
``--config`` use (and check) the table."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from payengine import ConfigError
from payengine.actors.service import load_settings, parse_settings
from payengine.actors.service.runner import build_channels, open_engine
from payengine.engine.checks import ID_MAX, check_id
from payengine.engine.discounts import (
    COMBINATIONS_MAX,
    PPM,
    QUOTE_TTL_MS_MAX,
    Benefits,
    DiscountRules,
    LevelCut,
    PriceCut,
)
from payengine.engine.errors import PaymentError
from payengine.engine.fuel import FuelLine, FuelSale
from payengine.sim import cli

EXAMPLE = """
[discounts]
utc_offset_minutes = 480
discount_share_max_ppm = 500000
points_share_max_ppm = 1000000
combinations_max = 16
quote_ttl_ms = 300000

[[discounts.price_cuts]]
rule_id = "noon"
cut_minor_per_l = 20
grades = ["95"]
from_minute = 660
to_minute = 840
weekdays = [0, 1, 2, 3, 4]
with_level = false

[[discounts.level_cuts]]
rule_id = "gold"
level = "gold"
cut_minor_per_l = 10
"""


# ------------------------------------------------------------------ the TOML form, dumped


def _text(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for what an id may hold)."""
    return json.dumps(value, ensure_ascii=False)


def _array(values: list[Any]) -> str:
    return "[" + ", ".join(_text(v) if isinstance(v, str) else str(v) for v in values) + "]"


def dump(rules: DiscountRules) -> str:
    """``rules`` in the ``[discounts]`` form the README documents: every field written."""
    lines = ["[discounts]"]
    for name in ("utc_offset_minutes", "discount_share_max_ppm", "points_share_max_ppm",
                 "combinations_max", "quote_ttl_ms"):
        lines.append(f"{name} = {getattr(rules, name)}")
    for cut in rules.price_cuts:
        lines += ["", "[[discounts.price_cuts]]", f"rule_id = {_text(cut.rule_id)}",
                  f"cut_minor_per_l = {cut.cut_minor_per_l}",
                  f"grades = {_array(sorted(cut.grades))}",
                  f"from_minute = {cut.from_minute}", f"to_minute = {cut.to_minute}",
                  f"weekdays = {_array(sorted(cut.weekdays))}",
                  f"with_level = {'true' if cut.with_level else 'false'}"]
    for level in rules.level_cuts:
        lines += ["", "[[discounts.level_cuts]]", f"rule_id = {_text(level.rule_id)}",
                  f"level = {_text(level.level)}",
                  f"cut_minor_per_l = {level.cut_minor_per_l}",
                  f"grades = {_array(sorted(level.grades))}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ strategies


def _is_id(value: str) -> bool:
    try:
        check_id(value, "id")
    except PaymentError:
        return False
    return True


ids = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1,
              max_size=24).filter(_is_id)
grades = st.frozensets(ids, max_size=4)
cuts = st.integers(1, 1_000_000)


@st.composite
def price_cuts(draw: st.DrawFn, rule_id: str) -> PriceCut:
    start = draw(st.integers(0, 1_439))
    end = draw(st.integers(1, 1_440).filter(lambda m: m != start))
    return PriceCut(rule_id, draw(cuts), draw(grades), start, end,
                    draw(st.frozensets(st.integers(0, 6))), draw(st.booleans()))


@st.composite
def discount_rules(draw: st.DrawFn) -> DiscountRules:
    names = draw(st.lists(ids, unique=True, max_size=6))
    split = draw(st.integers(0, len(names)))
    return DiscountRules(
        price_cuts=tuple(draw(price_cuts(n)) for n in names[:split]),
        level_cuts=tuple(LevelCut(n, draw(ids), draw(cuts), draw(grades))
                         for n in names[split:]),
        utc_offset_minutes=draw(st.integers(-720, 840)),
        discount_share_max_ppm=draw(st.integers(0, PPM)),
        points_share_max_ppm=draw(st.integers(0, PPM)),
        combinations_max=draw(st.integers(1, COMBINATIONS_MAX)),
        quote_ttl_ms=draw(st.integers(1, QUOTE_TTL_MS_MAX)))


@given(discount_rules())
@settings(max_examples=150, deadline=None)
def test_every_discount_rules_round_trips_through_its_toml_form(rules: DiscountRules) -> None:
    parsed = parse_settings(tomllib.loads(dump(rules)))
    assert parsed.engine.discounts == rules


def test_the_readme_example_builds_the_rules_it_shows() -> None:
    rules = parse_settings(tomllib.loads(EXAMPLE)).engine.discounts
    assert rules == DiscountRules(
        price_cuts=(PriceCut("noon", 20, frozenset({"95"}), 660, 840,
                             frozenset({0, 1, 2, 3, 4}), with_level=False),),
        level_cuts=(LevelCut("gold", "gold", 10),))


def test_the_readme_discounts_block_is_the_same_rules_with_every_key_written() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```toml\n")[1:]]
    block = next(b for b in blocks if b.startswith("[discounts]"))
    document = tomllib.loads(block)
    assert set(document["discounts"]) == {f.name for f in dataclasses.fields(DiscountRules)}
    assert set(document["discounts"]["price_cuts"][0]) == {
        f.name for f in dataclasses.fields(PriceCut)}
    assert parse_settings(document).engine.discounts == parse_settings(
        tomllib.loads(EXAMPLE)).engine.discounts


def test_an_absent_table_or_key_is_the_dataclass_default() -> None:
    assert parse_settings({}).engine.discounts == DiscountRules()
    assert parse_settings({"discounts": {}}).engine.discounts == DiscountRules()
    only = parse_settings({"discounts": {"price_cuts": [{"rule_id": "a",
                                                          "cut_minor_per_l": 5}]}})
    assert only.engine.discounts.price_cuts == (PriceCut("a", 5),)


# ------------------------------------------------------------------ malformed values

_TOP_BAD = {
    "utc_offset_minutes": [841, -721, "480", True, 4.5],
    "discount_share_max_ppm": [PPM + 1, -1, "1"],
    "points_share_max_ppm": [PPM + 1, -1, False],
    "combinations_max": [0, COMBINATIONS_MAX + 1, "16"],
    "quote_ttl_ms": [0, QUOTE_TTL_MS_MAX + 1, 1.0],
}
_PRICE_BAD = {
    "rule_id": ["", 7, "a\nb", "x" * (ID_MAX + 1)],
    "cut_minor_per_l": [0, 1_000_001, "20", True],
    "grades": ["95", [95], [""], ["95", "95"], {"a": 1}],
    "from_minute": [-1, 1_440, "0"],
    "to_minute": [0, 1_441, "1440"],
    "weekdays": [[7], [-1], ["mon"], [True], 3, [1, 1]],
    "with_level": ["yes", 1],
}
_LEVEL_BAD = {
    "rule_id": ["", 1],
    "level": ["", 3, "a\tb"],
    "cut_minor_per_l": [0, -5, "10"],
    "grades": [[""], "92", [1]],
}


def _table(rules: DiscountRules) -> dict[str, Any]:
    return tomllib.loads(dump(rules))


def _refused_key(document: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as refused:
        parse_settings(document)
    assert refused.value.code == "config_error"
    return refused.value.message.split(":", 1)[0]


@given(discount_rules(), st.data())
@settings(max_examples=200, deadline=None)
def test_a_malformed_value_is_a_config_error_naming_its_full_key(
        rules: DiscountRules, data: st.DataObject) -> None:
    document = _table(rules)
    table = document["discounts"]
    kinds = ["top", "unknown"] + (["price"] if rules.price_cuts else []) + (
        ["level"] if rules.level_cuts else [])
    kind = data.draw(st.sampled_from(kinds))
    if kind == "top":
        name = data.draw(st.sampled_from(sorted(_TOP_BAD)))
        table[name] = data.draw(st.sampled_from(_TOP_BAD[name]))
        expected = f"discounts.{name}"
    elif kind == "unknown":
        table["colour"] = "red"
        expected = "discounts.colour"
    else:
        listed, bad = ("price_cuts", _PRICE_BAD) if kind == "price" else ("level_cuts",
                                                                            _LEVEL_BAD)
        index = data.draw(st.integers(0, len(table[listed]) - 1))
        name = data.draw(st.sampled_from(sorted(bad)))
        value = data.draw(st.sampled_from(bad[name]))
        table[listed][index][name] = value
        expected = f"discounts.{listed}[{index}].{name}"
    key = _refused_key(document)
    assert key == expected or key.startswith(expected + "["), (key, expected)


def test_mistakes_between_values_name_the_entry_that_makes_them() -> None:
    both = {"discounts": {
        "price_cuts": [{"rule_id": "noon", "cut_minor_per_l": 5, "from_minute": 600,
                        "to_minute": 600}]}}
    assert _refused_key(both) == "discounts.price_cuts[0].to_minute"
    twice = {"discounts": {
        "price_cuts": [{"rule_id": "noon", "cut_minor_per_l": 5}],
        "level_cuts": [{"rule_id": "gold", "level": "gold", "cut_minor_per_l": 5},
                       {"rule_id": "noon", "level": "silver", "cut_minor_per_l": 3}]}}
    assert _refused_key(twice) == "discounts.level_cuts[1].rule_id"
    missing = {"discounts": {"level_cuts": [{"rule_id": "gold", "cut_minor_per_l": 5}]}}
    assert _refused_key(missing) == "discounts.level_cuts[0].level"
    not_a_list = {"discounts": {"price_cuts": {"rule_id": "noon"}}}
    assert _refused_key(not_a_list) == "discounts.price_cuts"
    too_many = {"discounts": {"level_cuts": [
        {"rule_id": f"l{i}", "level": "gold", "cut_minor_per_l": 1} for i in range(65)]}}
    assert _refused_key(too_many) == "discounts.level_cuts"
    assert _refused_key({"discounts": [1]}) == "discounts"


# ------------------------------------------------------------------ used where engines open


def test_serves_engine_quotes_with_the_files_discount_rules(tmp_path: Path) -> None:
    config = tmp_path / "payengine.toml"
    config.write_text(f'[engine]\ndb = "{tmp_path / "station.db"}"\n' + EXAMPLE)
    settings_ = load_settings(config)
    channels = build_channels(settings_)
    engine = open_engine(settings_, channels)
    try:
        sale = FuelSale("st-1", pump=3, nozzle=2, line=FuelLine.by_volume("92", 800, 10_000))
        quote = engine.quote("station-42", "alice", sale, Benefits(level="gold"))
    finally:
        engine.shutdown()
    applied = [(d.rule_id, d.amount_minor) for d in quote.combinations[0].discounts]
    assert applied == [("gold", 100)]  # 0.10 a litre on 10 litres: not the 95-only noon cut
    assert quote.expires_at_ms - quote.created_at_ms == 300_000


def test_serve_with_malformed_discounts_exits_2_naming_the_key_and_opens_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "payengine.toml"
    config.write_text(EXAMPLE.replace('grades = ["95"]', 'grades = ["95", 95]'))
    db = tmp_path / "x.db"
    assert cli.main(["serve", "--config", str(config), "--db", str(db)]) == 2
    assert "discounts.price_cuts[0].grades[1]" in capsys.readouterr().err
    assert not db.exists()


@pytest.mark.parametrize("command", [["orders"], ["attention"], ["show", "ord_x"],
                                     ["demo", "--orders", "1"]])
def test_every_command_given_the_file_refuses_malformed_discounts_by_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    config = tmp_path / "payengine.toml"
    config.write_text(EXAMPLE.replace("quote_ttl_ms = 300000", "quote_ttl_ms = 0"))
    db = tmp_path / "x.db"
    assert cli.main([*command, "--config", str(config), "--db", str(db)]) == 2
    assert "discounts.quote_ttl_ms" in capsys.readouterr().err
    assert not db.exists()
