"""Properties over generated input: any YAML reaches the user as a config or one DebiasError; NaN never passes a
config; labels stay inside their folder; the overlap rule agrees with an independent oracle for any pair of paths."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from debias_plugin.errors import DebiasError

# Bounded and derandomized: the same examples on every run, so CI is reproducible (explore with more examples and
# another seed by hand: settings(max_examples=5000, derandomize=False)).
BOUNDED = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow])

SWEEP = {"base": "default", "method": "negate", "fixed": {"biased": "/not/yet"}, "grid": {"lambda": [0.5, 1.0]},
         "evaluate": ["crows_bias", "wikitext2_ppl"], "objective": "crows_bias/pct_stereotype",
         "budget": {"wikitext2_ppl/word_perplexity": {"max_relative_increase": 10.0}}, "limit": 4, "resamples": 100}
GATE = {"model": "default", "tasks": ["crows_bias"], "alpha": 0.05, "batch_size": 4,
        "checks": [{"metric": "crows_bias/pct_stereotype", "within": [40, 60]},
                   {"metric": "crows_bias/pct_stereotype", "min": 1.0}]}
STUDY = {"name": "tiny", "models": {"gpt2": "/x/gpt2", "llama": "/x/llama"},
         "prepare": {"biased": {"method": "finetune", "options": {"steps": 2, "lr": 0.01}}},
         "sweeps": {"negate": {"file": "sweep.yml", "fixed": {"biased": "@biased"}, "models": {"gpt2": {"limit": 2}}}}}
VALID = {"gate": GATE, "sweep": SWEEP, "study": STUDY}


def _keys(document) -> set[str]:
    if isinstance(document, dict):
        return set(document) | {key for value in document.values() for key in _keys(value)}
    if isinstance(document, list):
        return {key for value in document for key in _keys(value)}
    return set()


KNOWN_KEYS = sorted(_keys(VALID) | {"search", "tolerance", "max_evaluations", "checkpoints", "screen", "target",
                                    "device", "model_args", "seed", "results", "baseline", "max", "name",
                                    "not_worse_than_baseline", "max_relative_increase", "model_class"})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), st.text(max_size=12),
                    st.sampled_from(["default", "crows_bias/pct_stereotype", "negate", "finetune", "auto", "@biased",
                                     "..", ".", "-x", "${NOT_SET_ANYWHERE}", "x.json", "sweep.yml"]))
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8), st.integers(-3, 3))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=12)


@st.composite
def edited(draw, document):
    """A valid document with a few random edits: a value replaced or deleted, or a key added, anywhere."""
    document = yaml.safe_load(yaml.safe_dump(document))
    for _ in range(draw(st.integers(1, 3))):
        node = document
        while True:
            entries = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not entries:
                break
            key = draw(st.sampled_from(entries))
            if isinstance(node[key], (dict, list)) and draw(st.booleans()):
                node = node[key]
                continue
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                node[key] = draw(values)
            elif action == "delete":
                del node[key]
            elif isinstance(node, dict):
                node[draw(keys)] = draw(values)
            else:
                node.append(draw(values))
            break
    return document


def _texts(kind: str):
    dumped = st.one_of(edited(VALID[kind]), st.dictionaries(keys, values, max_size=6), values)
    return st.one_of(dumped.map(lambda data: yaml.safe_dump(data, allow_unicode=True, sort_keys=False)).map(str.encode),
                     st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
                     st.binary(max_size=200))


def _loader(kind: str):
    """The command's own loader, looked up when called (the modules move)."""
    if kind == "gate":
        from debias_plugin.gate.config import load_gate
        return load_gate
    if kind == "sweep":
        from debias_plugin.sweep.plan import load_sweep
        return load_sweep
    from debias_plugin.study import load_study
    return load_study


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / "sweep.yml").write_text(yaml.safe_dump(SWEEP))
    return folder


@pytest.mark.parametrize("kind", ["gate", "sweep", "study"])
def test_any_yaml_gives_a_config_or_one_debias_error(kind, config_folder):
    load = _loader(kind)
    path = config_folder / f"{kind}-under-test.yml"

    @BOUNDED
    @given(_texts(kind))
    def check(content: bytes):
        path.write_bytes(content)
        try:
            load(path)
        except DebiasError as err:
            message = str(err)
            assert message.strip() and "\n" not in message.strip(), message
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{type(err).__name__} escaped the {kind} loader: {err}\n--- file ---\n{content!r}")

    check()


def test_the_valid_documents_load(config_folder):
    """The property above reaches the loaders' deep checks: its starting documents are valid."""
    for kind, document in VALID.items():
        path = config_folder / f"{kind}-valid.yml"
        path.write_text(yaml.safe_dump(document))
        _loader(kind)(path)


# ------------------------------------------------------------------------------------------- non-finite numbers

finite_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-99, 99), st.floats(allow_nan=False, allow_infinity=False),
              st.text(alphabet="abc ", max_size=5)),
    lambda inner: st.lists(inner, min_size=1, max_size=3) | st.dictionaries(st.text("xyz", min_size=1, max_size=3),
                                                                             inner, min_size=1, max_size=3),
    max_leaves=8)


@st.composite
def with_a_non_finite_leaf(draw):
    """(document, key path of the one NaN or infinity placed somewhere in it)."""
    document = draw(st.dictionaries(st.text("abc", min_size=1, max_size=3), finite_values, min_size=1, max_size=4))
    node, path = document, ()
    while True:
        key = draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
        path += (key,)
        if isinstance(node[key], (dict, list)) and node[key] and draw(st.booleans()):
            node = node[key]
            continue
        node[key] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return document, path


@BOUNDED
@given(with_a_non_finite_leaf())
def test_a_nan_or_infinity_anywhere_is_refused_naming_its_line_and_field(case):
    from debias_plugin.yamlfile import ConfigFileError, field_text, read_yaml

    document, path = case
    text = yaml.safe_dump(document)
    with pytest.raises(ConfigFileError) as refused:
        read_yaml(Path("config.yml"), text, "test")
    finite = yaml.safe_dump(_replaced(document, path, 0.5))
    _, lines = read_yaml(Path("config.yml"), finite, "test")
    assert (lines[path], field_text(path)) in [(line, field) for line, field, _ in refused.value.problems]
    assert "config.yml" in str(refused.value) and "finite number" in str(refused.value)


def _replaced(document, path, value):
    document = yaml.safe_load(yaml.safe_dump(document))
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return document


# ------------------------------------------------------------------------------------------------- number types

def _numeric_fields():
    """(model, field) for every field of the gate, sweep and study schemas that takes a number and no boolean."""
    from debias_plugin.gate.config import CheckConfig, GateConfig
    from debias_plugin.study.config import PrepareEntry, StudyConfig, SweepEntry
    from debias_plugin.sweep.schema import BudgetRule, SweepConfig

    for model in (GateConfig, CheckConfig, SweepConfig, BudgetRule, StudyConfig, PrepareEntry, SweepEntry):
        for name, field in model.model_fields.items():
            annotation = str(field.annotation)
            if ("float" in annotation or "int" in annotation) and "bool" not in annotation:
                yield model, name, field


def test_booleans_are_not_numbers_and_null_is_no_required_value():
    from pydantic import TypeAdapter, ValidationError

    fields = list(_numeric_fields())
    assert len(fields) >= 15
    for model, name, field in fields:
        adapter = TypeAdapter(field.annotation, config=model.model_config)
        for flag in (True, False):
            for written in (flag, [flag, flag], {"key": flag}, {"key": [flag, flag]}):  # bare, in a list or a map
                with pytest.raises(ValidationError):
                    adapter.validate_python(written)
        if field.is_required():
            with pytest.raises(ValidationError):
                adapter.validate_python(None)


# ------------------------------------------------------------------------------------------ labels name folders

@BOUNDED
@given(st.one_of(st.text(max_size=12), st.from_regex(r"[A-Za-z0-9_.-]{1,6}", fullmatch=True),
                 st.sampled_from([".", "..", "...", "-", "-x", ".hidden", "a/..", "", "a" * 101])))
def test_a_valid_label_joined_to_a_folder_stays_inside_it(value):
    from pydantic import TypeAdapter, ValidationError

    from debias_plugin.outputs import real_path
    from debias_plugin.yamlfile import Label

    try:
        TypeAdapter(Label).validate_python(value)
    except ValidationError:
        return
    folder = Path(tempfile.gettempdir()) / "debias-label-root"
    assert real_path(folder / value).parent == real_path(folder)
    assert value not in (".", "..") and not value.startswith(("-", "."))


@pytest.mark.parametrize("value", [".", "..", "", "-rf", ".hidden", "a/b", "a b", "x" * 101])
def test_labels_that_are_no_plain_folder_name_are_refused(value):
    from pydantic import TypeAdapter, ValidationError

    from debias_plugin.yamlfile import Label

    with pytest.raises(ValidationError):
        TypeAdapter(Label).validate_python(value)


# ------------------------------------------------------------------------------------------- the overlap rule

SEGMENTS = ["a", "b", "c", "A", "x", "new", ".", "..", "to_x", "to_b", "here", "up"]


def _tree(root: Path) -> None:
    """root/a/b/c and root/x, with links between them: a/to_x -> ../x, x/to_b -> ../a/b, x/here -> ., a/b/up -> ../.."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "x").mkdir()
    (root / "a" / "to_x").symlink_to(Path("..") / "x")
    (root / "x" / "to_b").symlink_to(Path("..") / "a" / "b")
    (root / "x" / "here").symlink_to(".")
    (root / "a" / "b" / "up").symlink_to(Path("..") / "..")


paths = st.tuples(st.lists(st.sampled_from(SEGMENTS), max_size=5), st.booleans(), st.booleans())


def _spelled(root: Path, segments: list[str], relative: bool, trailing: bool) -> str:
    text = os.path.join(str(root), *segments)
    if relative:
        text = os.path.relpath(text, os.getcwd())
    return text + os.sep if trailing else text


def _oracle(first: str, second: str) -> bool:
    a, b = os.path.realpath(first), os.path.realpath(second)
    return os.path.commonpath([a, b]) in (a, b)


@BOUNDED
@given(paths, paths)
def test_overlaps_agrees_with_common_path_of_real_paths(first, second):
    from debias_plugin.outputs import overlaps, refuse_overlap

    root = Path(tempfile.mkdtemp(prefix="debias-overlap-"))
    try:
        _tree(root)
        a, b = _spelled(root, *first), _spelled(root, *second)
        expected = _oracle(a, b)
        assert overlaps(a, b) == expected == overlaps(b, a), (a, b)
        assert overlaps(Path(a), Path(b)) == expected
        if expected:
            with pytest.raises(DebiasError, match="overlaps the input"):
                refuse_overlap(a, [None, b], "--out")
        else:
            refuse_overlap(a, [None, b], "--out")
    finally:
        shutil.rmtree(root)


def test_an_output_that_contains_or_reaches_an_input_is_refused_even_with_force(tmp_path):
    from debias_plugin.outputs import OutputFolder, refuse_overlap

    model = tmp_path / "out" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for output in (tmp_path / "out", model, model / "sub", tmp_path / "out" / "model" / ".." / "model"):
        with pytest.raises(DebiasError, match=f"overlaps the input {model}"):
            OutputFolder(output, inputs=[model], force=True)
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(DebiasError, match="overlaps the input"):
        OutputFolder(tmp_path / "link", inputs=[model], force=True)
    with pytest.raises(DebiasError, match="overlaps the input"):
        OutputFolder(tmp_path / "link" / ".." / "model" / "x", inputs=[model], force=True)  # ".." of the target
    with pytest.raises(DebiasError) as refused:
        refuse_overlap(str(tmp_path / "out") + "/", [model], "--out")
    assert str(refused.value).startswith(f"--out {tmp_path / 'out'} overlaps the input {model}: ")
    OutputFolder(tmp_path / "beside", inputs=[model, tmp_path / "out" / "mode"], force=True)  # a prefix is no parent


def test_a_run_folder_over_an_input_is_refused_before_anything_is_replaced(tmp_path):
    from debias_plugin.outputs import claim_run_folder

    sweep_file = tmp_path / "study" / "sweeps" / "negate.yml"
    sweep_file.parent.mkdir(parents=True)
    sweep_file.write_text("base: default\n")
    for out in (tmp_path / "study", tmp_path / "study" / "sweeps", tmp_path / "study" / "sweeps" / "out"):
        with pytest.raises(DebiasError, match=f"--out {out} overlaps the input {sweep_file.parent}"):
            claim_run_folder(out, resumes=False, force=True, refusal="", inputs=[None, sweep_file.parent])
    assert sweep_file.read_text() == "base: default\n"
    claim_run_folder(tmp_path / "out", resumes=False, force=True, refusal="", inputs=[sweep_file.parent])
    assert (tmp_path / "out").is_dir()
