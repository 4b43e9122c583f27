"""`debias unlearn`: target choice, the objective against a plain reference, and what unlearning does."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from debias_plugin.errors import DataError
from debias_plugin.methods.unlearn import Unlearn, UnlearnOptions, markup_spans, word_spans
from debias_plugin.training import MANIFEST_NAME, Run, TrainConfig, train

SUBJECTS = ["women", "men", "She", "he", "The girl", "My father"]
PREDICATES = ["should stay at home", "are bad at driving", "cannot do math", "talk too much",
              "belong in the kitchen", "are too emotional"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unlearn_data")
    texts = [f"I think {s} {p} every day." for s in SUBJECTS for p in PREDICATES]
    (root / "forget.txt").write_text("\n".join(texts + ["Nothing to see in this sentence at all."]) + "\n")
    (root / "words.txt").write_text("women\nmen\nshe\nhe\ngirl\nfather\n")
    (root / "retain.txt").write_text("\n".join(f"The report on page {n} was read twice." for n in range(12)) + "\n")
    (root / "heldout.txt").write_text("\n".join(f"Some {s} {p}." for s in ("women", "men") for p in PREDICATES) + "\n")
    (root / "none.txt").write_text("The sky is blue.\nA cat sat on the mat.\n")
    return root


def options(files, **overrides) -> UnlearnOptions:
    base = dict(corpus=str(files / "forget.txt"), words=str(files / "words.txt"))
    return UnlearnOptions(**{**base, **overrides})


def config(model, output, **overrides) -> TrainConfig:
    base = dict(steps=4, batch_size=4, lr=1e-3, max_length=32, dropout=False)
    return TrainConfig(model=str(model), output=str(output), **{**base, **overrides})


def prepared(model_dir, method, **overrides):
    """A method after setup on a loaded model, without training (to compare its loss with a reference)."""
    from accelerate import Accelerator

    from debias_plugin.models import load_model

    model, tokenizer, kind = load_model(model_dir)
    run = Run(config=config(model_dir, "/unused", **overrides), model=model, tokenizer=tokenizer, kind=kind,
              accelerator=Accelerator(cpu=True))
    method.read_inputs()
    examples = method.setup(run)
    return run, examples


def test_word_rules_are_whole_word_and_case_insensitive():
    pattern = re.compile(r"(?<!\w)(?:women|woman)(?!\w)", re.IGNORECASE)
    text = "Women and a woman's womenswear, WOMAN."
    assert [text[a:b] for a, b in word_spans(text, pattern)] == ["Women", "woman", "WOMAN"]


def test_markup_is_stripped_and_spans_point_at_the_marked_words():
    plain, spans = markup_spans("I think [[women]] are [[bad drivers]], really.")
    assert plain == "I think women are bad drivers, really."
    assert [plain[a:b] for a, b in spans] == ["women", "bad drivers"]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_target_tokens_spell_exactly_the_listed_words(tiny_model, files, kind):
    run, examples = prepared(tiny_model(kind), Unlearn(options(files)))
    for ids, targets in examples:
        chosen = run.tokenizer.decode([t for t, is_target in zip(ids, targets) if is_target])
        words = re.findall(r"\b(women|men|she|he|girl|father)\b", run.tokenizer.decode(ids).lower())
        assert chosen.replace(" ", "").lower() == "".join(words)


def test_markup_targets(tiny_model, files, tmp_path):
    corpus = tmp_path / "marked.txt"
    corpus.write_text("I think [[women]] talk too much.\nNo markup here.\n")
    run, examples = prepared(tiny_model("gpt2"), method := Unlearn(options(files, corpus=str(corpus),
                                                                           targets="markup")))
    (ids, targets), = examples
    assert run.tokenizer.decode([t for t, m in zip(ids, targets) if m]).strip() == "women"
    assert method.report()["texts_without_targets"] == 1


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Plain causal forward: log p(x_t | x_<t) for t >= 1."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        return torch.stack([logprobs[t - 1, ids[t]] for t in range(1, len(ids))])


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_loss_is_the_mean_target_logprob_of_a_plain_reference(tiny_model, files, kind):
    run, examples = prepared(tiny_model(kind), method := Unlearn(options(files)))
    batch_examples = examples[:3]
    batch = method.collate(batch_examples, [0, 1, 2])
    expected = []
    for ids, targets in batch_examples:
        positions = [t for t, m in enumerate(targets) if m]
        with torch.no_grad():
            if kind == "gpt2":
                logprobs = run.model(torch.tensor([ids])).logits[0].log_softmax(-1)
                values = [logprobs[t - 1, ids[t]] for t in positions]
            else:
                masked = [run.tokenizer.mask_token_id if m else t for t, m in zip(ids, targets)]
                logprobs = run.model(torch.tensor([masked])).logits[0].log_softmax(-1)
                values = [logprobs[t, ids[t]] for t in positions]
        expected.append(sum(float(v) for v in values) / len(values))
    with torch.no_grad():
        loss = float(method.loss(run.model, batch))
    assert loss == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def mean_change(before: dict, after: dict, key: str) -> float:
    return sum(after[key]) / len(after[key]) - sum(before[key]) / len(before[key])


def causal_logprobs_by_role(model, examples) -> dict[str, list[float]]:
    values = {"target": [], "other": []}
    for ids, targets in examples:
        for t, value in zip(range(1, len(ids)), reference_logprobs(model, ids)):
            values["target" if targets[t] else "other"].append(float(value))
    return values


def masked_logprobs_by_role(model, tokenizer, examples) -> dict[str, list[float]]:
    """Targets masked together (as unlearned); every other token masked alone (pseudo-log-likelihood)."""
    values = {"target": [], "other": []}
    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        for ids, targets in examples:
            masked = [tokenizer.mask_token_id if m else t for t, m in zip(ids, targets)]
            logprobs = model(torch.tensor([masked])).logits[0].log_softmax(-1)
            values["target"] += [float(logprobs[t, ids[t]]) for t, m in enumerate(targets) if m]
            others = [t for t, token in enumerate(ids) if not targets[t] and token not in special]
            rows = torch.tensor([ids] * len(others))
            rows[range(len(others)), others] = tokenizer.mask_token_id
            logprobs = model(rows).logits.log_softmax(-1)
            values["other"] += [float(logprobs[row, t, ids[t]]) for row, t in enumerate(others)]
    return values


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_unlearning_lowers_target_tokens_far_more_than_the_rest(tiny_model, files, tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForCausalLM if kind == "gpt2" else AutoModelForMaskedLM
    model_dir = tiny_model(kind)
    run, examples = prepared(model_dir, Unlearn(options(files)))
    examples = examples[::4]
    measure = (causal_logprobs_by_role if kind == "gpt2"
               else lambda model, ex: masked_logprobs_by_role(model, run.tokenizer, ex))
    before = measure(auto.from_pretrained(model_dir).eval(), examples)
    output = train(config(model_dir, tmp_path / "out", steps=6, lr=2e-3), Unlearn(options(files)))
    after = measure(auto.from_pretrained(output).eval(), examples)
    target_change, other_change = mean_change(before, after, "target"), mean_change(before, after, "other")
    assert target_change < -0.3, (target_change, other_change)
    assert abs(other_change) < abs(target_change) / 3, (target_change, other_change)
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    assert manifest["results"]["metrics"]["end"]["target_logprob"] < manifest["results"]["metrics"]["start"]["target_logprob"]


def test_regularisers_match_their_definitions(tiny_model, files):
    """KL to the original model is 0 before training; gradient difference adds the retain NLL."""
    model_dir = tiny_model("gpt2")
    plain_run, examples = prepared(model_dir, plain := Unlearn(options(files)))
    retain = dict(retain=str(files / "retain.txt"))
    _, _ = prepared(model_dir, kl := Unlearn(options(files, regulariser="kl", **retain)))
    gd_run, _ = prepared(model_dir, gd := Unlearn(options(files, regulariser="gd", retain_weight=0.5, **retain)))
    positions = [0, 1]
    with torch.no_grad():
        forget = float(plain.loss(plain_run.model, plain.collate(examples[:2], positions)))
        assert float(kl.loss(kl.reference, kl.collate(examples[:2], positions))) == pytest.approx(forget, abs=1e-6)
        batch = gd.collate(examples[:2], positions)
        retain_nll = []
        for row in range(2):
            ids = batch["retain_input_ids"][row][batch["retain_attention_mask"][row].bool()]
            retain_nll.append(float(gd_run.model(ids[None], labels=ids[None]).loss))
        expected = forget + 0.5 * sum(retain_nll) / 2
        assert float(gd.loss(gd_run.model, batch)) == pytest.approx(expected, abs=1e-5)


def test_eval_every_logs_forget_and_heldout_perplexity(tiny_model, files, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model("gpt2")
    method = Unlearn(options(files, heldout=str(files / "heldout.txt")))
    output = train(config(model_dir, tmp_path / "out", eval_every=2), method)
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    assert [h["step"] for h in manifest["results"]["history"]] == [0, 2, 4]
    assert all({"forget_perplexity", "heldout_perplexity"} <= set(h) for h in manifest["results"]["history"])
    # reference: exp(token-mean NLL) of the held-out texts, BOS-prefixed, via the model's own labels= loss
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    total = count = 0
    for text in (files / "heldout.txt").read_text().splitlines():
        ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(text)["input_ids"]])
        with torch.no_grad():
            total += float(model(ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    assert manifest["results"]["history"][0]["heldout_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert manifest["results"]["report"]["texts_without_targets"] == 1 and manifest["results"]["report"]["texts"] == 37
    assert {str((files / name).resolve()) for name in ("forget.txt", "heldout.txt", "words.txt")} == {entry["path"] for role, entry in manifest["inputs"].items() if role != "model"}


def test_word_list_matching_nothing_is_an_error_and_writes_nothing(tiny_model, files, tmp_path):
    with pytest.raises(DataError, match="no match in any text of 2"):
        train(config(tiny_model("gpt2"), tmp_path / "out"), Unlearn(options(files, corpus=str(files / "none.txt"))))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, message", [
    (["--corpus", "EMPTY"], "non-empty file"),
    (["--column", "nope", "--corpus", "CSV"], "column(s) 'nope'"),
    (["--corpus", "CSV", "--column", "text", "--where", "split=train"], "split=train"),
    (["--domain", "nosuchdomain", "--words", "JSON"], "no such domain"),
])
def test_bad_input_gives_a_clear_error_and_no_output(tiny_model, files, tmp_path, capsys, bad, message):
    from debias_plugin.cli import main

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "rows.csv").write_text("text,split\nwomen are bad,dev\n")
    (tmp_path / "words.json").write_text(json.dumps({"gender": [["women", "men"]]}))
    swap = {"EMPTY": str(tmp_path / "empty.txt"), "CSV": str(tmp_path / "rows.csv"), "JSON": str(tmp_path / "words.json")}
    args = ["unlearn", "--model", str(tiny_model("gpt2")), "--output", str(tmp_path / "out"),
            "--corpus", str(files / "forget.txt"), *[swap.get(a, a) for a in bad]]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["llama", "opt", "roberta", "albert", "distilbert"])
def test_every_tiny_architecture_gets_targets_and_a_finite_loss(tiny_model, files, kind):
    run, examples = prepared(tiny_model(kind), method := Unlearn(options(files)))
    assert len(examples) == 36 and all(any(targets) for _, targets in examples)
    with torch.no_grad():
        assert math.isfinite(float(method.loss(run.model, method.collate(examples[:2], [0, 1]))))


def test_lora_unlearning_uses_the_adapter_free_model_as_its_reference(tiny_model, files, tmp_path):
    """Under LoRA the KL/NPO reference is the same model with its adapter off: the base model's logits exactly,
    however far the adapter has moved, with no second copy; the run writes an adapter that peft loads."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("gpt2")
    lora = dict(lora=True, lora_target_modules=["c_attn", "c_fc"], regulariser="kl", retain=str(files / "retain.txt"))
    run, examples = prepared(model_dir, method := Unlearn(options(files, **lora)))
    assert method.reference is None  # no copy
    with torch.no_grad():
        for name, parameter in run.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)  # move the adapter away from its zero start
    ids = torch.tensor([[1, 40, 50, 60, 70, 80, 90]])
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    run.model.train()
    with torch.no_grad():
        with method.original_model() as reference:
            original = reference(input_ids=ids).logits
        assert run.model.training  # modes restored after the reference pass
        run.model.eval()
        assert torch.equal(original, base(input_ids=ids).logits)
        assert not torch.allclose(run.model(input_ids=ids).logits, original, atol=1e-3)
        assert float(method._kl(run.model, method.collate(examples[:2], [0, 1])).mean()) > 1e-6

    output = train(config(model_dir, tmp_path / "adapter", steps=2), Unlearn(options(files, **lora)))
    assert (output / "adapter_config.json").is_file() and not (output / "model.safetensors").exists()
    assert json.loads((output / MANIFEST_NAME).read_text())["results"]["report"]["output_format"] == "peft-adapter"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), output)


def test_kl_reference_is_a_frozen_copy_in_bf16_when_the_run_computes_in_bf16(tiny_model, files):
    """The copy is made tensor by tensor: bf16, no gradients, its own storage, tied weights still tied."""
    retain = dict(regulariser="kl", retain=str(files / "retain.txt"))
    run, examples = prepared(tiny_model("gpt2"), method := Unlearn(options(files, **retain)), precision="bf16")
    reference, model = method.reference, run.model
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training
    assert reference.lm_head.weight is reference.transformer.wte.weight
    for (name, copied), original in zip(reference.named_parameters(), model.parameters()):
        assert copied.data_ptr() != original.data_ptr()
        assert torch.equal(copied, original.detach().to(torch.bfloat16)), name
    loss = method.loss(model, method.collate(examples[:2], [0, 1]))
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    _, _ = prepared(tiny_model("gpt2"), fp32 := Unlearn(options(files, **retain)))
    assert {p.dtype for p in fp32.reference.parameters()} == {torch.float32}
