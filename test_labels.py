"""Tests of the class lists (assets/classes/*.txt) and Chinese label dictionaries (assets/chinese_labels/*.json):
the official counts and order of HMDB51, UCF101, Kinetics-400 and Something-Something V1, and dictionaries that
cover each official list exactly, with distinct, purely Chinese translations. Uses only json and pathlib."""
import json
import pathlib
import re

import pytest

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
COUNTS = {"hmdb51": 51, "ucf101": 101, "kinetics400": 400, "ssv1": 174}
CJK = re.compile(r"[\u4e00-\u9fff]")
ASCII_LETTER = re.compile(r"[A-Za-z]")


def read_classes(name):
    raw = (ASSETS / "classes" / f"{name}.txt").read_bytes()
    text = raw.decode("utf-8")  # raises on anything that is not UTF-8
    assert not text.startswith("\ufeff"), f"{name}.txt starts with a byte-order mark"
    assert text.endswith("\n") and not text.endswith("\n\n"), f"{name}.txt must end with exactly one newline"
    assert "\r" not in text, f"{name}.txt has Windows line endings"
    return text[:-1].split("\n")


def read_dictionary(name):
    with open(ASSETS / "chinese_labels" / f"{name}.json", encoding="utf-8") as f:
        pairs = json.load(f, object_pairs_hook=lambda items: items)  # keep duplicates and order visible
    keys = [k for k, _ in pairs]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicated, f"{name}.json repeats keys {duplicated}"
    return dict(pairs)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_labels_class_list_count_unique_clean(name):
    names = read_classes(name)
    assert len(names) == COUNTS[name], f"{name}: {len(names)} classes, expected {COUNTS[name]}"
    duplicated = sorted({n for n in names if names.count(n) > 1})
    assert not duplicated, f"{name}: duplicated classes {duplicated}"
    bad = [n for n in names if not n or n != n.strip() or "  " in n or "\t" in n]
    assert not bad, f"{name}: empty or badly spaced names {bad}"


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_labels_official_order(name):
    # HMDB51 folders, the K400 CSV and the SSv1 labels CSV are in plain alphabetical order; UCF101's classInd.txt
    # sorts case-insensitively ('Hammering' before 'HammerThrow').
    names = read_classes(name)
    key = str.lower if name == "ucf101" else None
    assert names == sorted(names, key=key), f"{name}: not in the official (alphabetical) order"


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_labels_dictionary_covers_class_list_exactly(name):
    names = read_classes(name)
    table = read_dictionary(name)
    missing = [n for n in names if n not in table]
    extra = [k for k in table if k not in set(names)]
    assert not missing and not extra, f"{name}.json: missing {missing}, extra {extra}"
    assert list(table) == names, f"{name}.json: keys are not in class-list order"


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_labels_values_are_distinct_chinese(name):
    table = read_dictionary(name)
    empty = [k for k, v in table.items() if not isinstance(v, str) or not v.strip()]
    assert not empty, f"{name}.json: empty translations for {empty}"
    no_cjk = {k: v for k, v in table.items() if not CJK.search(v)}
    assert not no_cjk, f"{name}.json: translations without Chinese characters {no_cjk}"
    latin = {k: v for k, v in table.items() if ASCII_LETTER.search(v)}
    assert not latin, f"{name}.json: translations with ASCII letters {latin}"
    spaced = {k: v for k, v in table.items() if v != v.strip()}
    assert not spaced, f"{name}.json: translations with surrounding whitespace {spaced}"
    values = list(table.values())
    shared = {v: [k for k in table if table[k] == v] for v in values if values.count(v) > 1}
    assert not shared, f"{name}.json: one translation for several classes {shared}"


def test_labels_spot_checks_known_names():
    hmdb, ucf = read_classes("hmdb51"), read_classes("ucf101")
    k400, ssv1 = read_classes("kinetics400"), read_classes("ssv1")
    assert hmdb[0] == "brush_hair" and hmdb[-1] == "wave"
    assert {"climb_stairs", "fall_floor", "flic_flac", "sword_exercise", "shoot_bow"} <= set(hmdb)
    assert ucf[0] == "ApplyEyeMakeup" and ucf[-1] == "YoYo"
    assert ucf.index("HandstandPushups") == 36 and ucf.index("WritingOnBoard") == 99  # classInd ids 37 and 100
    assert k400[0] == "abseiling" and k400[-1] == "zumba"
    exact = {"dying hair", "tossing coin", "balloon blowing", "hurling (sport)", "punching person (boxing)",
             "petting animal (not cat)", "tying knot (not on a tie)", "skiing (not slalom or crosscountry)",
             "passing American football (in game)", "passing American football (not in game)",
             "using remote controller (not gaming)", "shooting goal (soccer)", "massaging person's head"}
    assert exact <= set(k400), f"missing exact K400 spellings {sorted(exact - set(k400))}"
    assert ssv1[0] == "Approaching something with your camera" and ssv1[-1] == "Wiping something off of something"
    assert ssv1.index("Pushing something from left to right") == 93
    assert "Putting something, something and something on the table" in ssv1  # commas kept, as in the CSV


def test_labels_known_translations():
    assert read_dictionary("hmdb51")["brush_hair"] == "梳头"
    assert read_dictionary("ucf101")["ApplyEyeMakeup"] == "画眼妆"
    assert read_dictionary("kinetics400")["abseiling"] == "绕绳下降"
    assert read_dictionary("ssv1")["Approaching something with your camera"] == "用相机靠近某物"


def test_labels_ssv1_keeps_placeholders_and_directions():
    table = read_dictionary("ssv1")
    no_placeholder = [k for k, v in table.items() if "something" in k.lower() and "某物" not in v]
    assert not no_placeholder, f"ssv1.json: 'something' not rendered as 某物 in {no_placeholder}"
    # A flipped clip changes these classes, so the direction words must be right in Chinese too.
    directions = {"from left to right": "从左往右", "from right to left": "从右往左", "camera left": "向左转",
                  "camera right": "向右转", "camera upwards": "向上转", "camera downwards": "向下转",
                  "something up": "向上", "something down": "向下"}
    checked = 0
    for key, value in table.items():
        for english, chinese in directions.items():
            if key.endswith(english) or f"{english} " in key:
                if english in ("something up", "something down") and not key.startswith("Moving something"):
                    continue
                checked += 1
                assert chinese in value, f"ssv1.json: {key!r} -> {value!r} lacks {chinese!r}"
    assert checked == 10, f"expected 10 direction classes, checked {checked}"
