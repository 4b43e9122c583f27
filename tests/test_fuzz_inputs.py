"""Fuzz: randomly corrupted bytes of every input format reach the user only as our DebiasError (seeded, bounded)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from debias_plugin.errors import DebiasError

CASES_PER_FORMAT = 40


def corrupt(data: bytes, rng: random.Random) -> bytes:
    """One random edit: flip bytes, truncate, insert junk, delete or duplicate a range."""
    data = bytearray(data)
    operation = rng.choice(["flip", "truncate", "insert", "delete", "duplicate"])
    position = rng.randrange(max(1, len(data)))
    if operation == "flip":
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif operation == "truncate":
        del data[position:]
    elif operation == "insert":
        data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
    elif operation == "delete":
        del data[position:position + rng.randint(1, 40)]
    else:
        data[position:position] = data[position:position + rng.randint(1, 40)]
    return bytes(data)


def _head(path: Path, lines: int) -> bytes:
    return b"".join(path.read_bytes().splitlines(keepends=True)[:lines])


def _formats(data_dir: Path, tiny_gpt2: Path):
    """name -> (original bytes, file name, loader(path) -> anything)."""
    from debias_plugin.data import load_attribute_words, load_crows_pairs, load_stereoset
    from debias_plugin.data.pairs import load_pair_csv
    from debias_plugin.merge import load_template, model_tensors
    from debias_plugin.models import load_config
    from debias_plugin.paths import merge_configs_dir

    def in_model_folder(name: str, read):
        def load(path: Path):
            folder = path.parent / f"model_{path.name}"
            shutil.copytree(tiny_gpt2, folder, dirs_exist_ok=True)
            shutil.copy(path, folder / name)
            return read(folder)
        return load

    return {
        "crows_csv": (_head(data_dir / "crows_pairs" / "crows_pairs_anonymized.csv", 30), "crows.csv",
                      load_crows_pairs),
        "pair_csv": (b"advantaged,disadvantaged,group\nHe runs.,She runs.,gender\nHe sat.,She sat.,gender\n",
                     "pairs.csv", load_pair_csv),
        "stereoset_jsonl": (_head(data_dir / "stereoset" / "stereoset_dev.jsonl", 20), "stereoset.jsonl",
                            load_stereoset),
        "word_list_json": ((data_dir / "bias_attribute_words.json").read_bytes()[:4000].rsplit(b"]", 1)[0] + b"]]}",
                           "words.json", load_attribute_words),
        "config_json": ((tiny_gpt2 / "config.json").read_bytes(), "config.json",
                        in_model_folder("config.json", load_config)),
        "safetensors_header": ((tiny_gpt2 / "model.safetensors").read_bytes()[:4096], "model.safetensors",
                               in_model_folder("model.safetensors", model_tensors)),
        "merge_yaml": ((merge_configs_dir() / "negate.yml").read_bytes(), "negate.yml", load_template),
    }


FORMATS = ["crows_csv", "pair_csv", "stereoset_jsonl", "word_list_json", "config_json", "safetensors_header",
           "merge_yaml"]


@pytest.mark.parametrize("name", FORMATS)
def test_corrupted_input_raises_only_our_error(name, data_dir, tiny_model, tmp_path):
    original, file_name, load = _formats(data_dir, tiny_model("gpt2"))[name]
    rng = random.Random(f"fuzz-{name}")
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES_PER_FORMAT):
        path = tmp_path / f"{case}-{file_name}"
        path.write_bytes(corrupt(original, rng))
        try:
            load(path)
            outcomes["loaded"] += 1
        except DebiasError as err:
            assert str(err).strip() and "\n" not in str(err).strip(), f"case {case}: not one paragraph: {err}"
            outcomes["refused"] += 1
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{name} case {case}: {type(err).__name__} escaped: {err}")
    assert outcomes["refused"] > 0, outcomes  # the corruption really breaks files


# ------------------------------------------------------------------------------------ hostile config files (YAML)

def _config_loader(kind: str):
    """The command's own loader, looked up when called (the modules move)."""
    if kind == "gate":
        from debias_plugin.gate.config import load_gate
        return load_gate
    if kind == "sweep":
        from debias_plugin.sweep.plan import load_sweep
        return load_sweep
    from debias_plugin.study import load_study
    return load_study


def _billion_laughs(levels: int = 9) -> str:
    names = [chr(ord("a") + level) for level in range(levels)]
    text = f"{names[0]}: &{names[0]} [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for previous, name in zip(names, names[1:]):
        text += f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
    return text


HOSTILE = {
    "billion_laughs": (_billion_laughs(), "line 9, field 'i': expected a config file within the limits (at most 1 MiB "
                       "of text, 100,000 values with aliases expanded, 64 levels deep), found 490,329,064 values"),
    "recursive_alias": ("name: &a [x, *a]\n", "line 1: expected YAML without recursive aliases"),
    "deep_nesting": ("name: " + "[" * 5000 + "]" * 5000 + "\n", "nesting deeper than 64 levels"),
    "too_large": ("name: x\n" + "# padding\n" * 110_000, "found 1,100,008 bytes"),
    "bad_float_tag": ("name: x\nseed: !!float abc\n", "line 2: expected a valid float, found 'abc'"),
    "bad_bool_tag": ("name: x\nseed: !!bool maybe\n", "line 2: expected a valid bool, found 'maybe'"),
    "bad_date": ("name: x\nseed: 2026-13-45\n", "line 2: expected a valid timestamp, found '2026-13-45'"),
    "control_character": ("name: x\nseed: 1\x08\n", "line 2: expected valid YAML, found the character '\\x08'"),
    "nan": ("name: x\nseed: .nan\n", "line 2, field 'seed': NaN and infinity are not allowed"),
    "inf_in_list": ("name: x\nfixed: {a: [1, -.inf]}\n", "line 2, field 'fixed.a[1]': NaN and infinity are not "
                    "allowed: give a finite number (found -.inf)"),
    "explicit_nan": ("name: x\nseed: !!float nan\n", "line 2, field 'seed': NaN and infinity"),
    "overflowing_float": ("name: x\nseed: 1.0e+999\n", "line 2, field 'seed': NaN and infinity"),
    "absurdly_long_key": ("name: x\n? " + "k" * 5000 + "\n: 1\n", "... (5,002 characters)'; allowed keys: "),
}


@pytest.mark.parametrize("kind", ["gate", "sweep", "study"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_yaml_is_refused_quickly_naming_file_and_line(kind, case, tmp_path):
    import re
    import time

    text, expected = HOSTILE[case]
    path = tmp_path / f"{case}.yml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(DebiasError, match=re.escape(expected)) as refused:
        _config_loader(kind)(path)
    assert time.perf_counter() - started < 1.0, case
    message = str(refused.value)
    assert message.startswith(str(path)) and "\n" not in message
