"""PCGU: the vectorized step against a per-partition loop written like the official code, plus DDP and the CLI."""

from __future__ import annotations

import copy
import itertools
import json
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from debias_plugin.data.pairs import BiasPair, load_winogender_pairs
from debias_plugin.errors import DebiasError
from debias_plugin.methods.pcgu import (
    collate_pairs, encode_pair, partition_layout, pcgu_step, resolve_k, sequence_objectives, target_spans,
)
from debias_plugin.models import load_model


# -- the reference: one partition at a time, CPU copies, as in CharlesYu2000/PCGU-UnlearningBias -------------
def loop_partition(model, aggregation: str) -> list[tuple[str, tuple | None]]:
    """(param name, index) per partition: rows for input aggregation (columns for Conv1D's [in, out])."""
    conv1d = {f"{name}.weight" for name, module in model.named_modules() if type(module).__name__ == "Conv1D"}
    partition = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() == 1:
            partition.append((name, None))
            continue
        along_last_axis = (aggregation == "input") != (name in conv1d)
        if along_last_axis:
            for index in itertools.product(*(range(n) for n in param.shape[:-1])):
                partition.append((name, index))
        else:
            for lead in itertools.product(*(range(n) for n in param.shape[:-2])):
                for column in range(param.shape[-1]):
                    partition.append((name, (*lead, slice(None), column)))
    return partition


def loop_gradients(model, kind: str, encoded, side: str, objective: str) -> dict:
    """Sum over sequences, one unpadded sequence at a time, of d objective / d theta (copied to CPU)."""
    total = None
    for pair in encoded:
        example = getattr(pair, side)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0]
        value = 0.0
        for position, token in zip(example.target_positions, example.target_ids):
            if kind == "causal":
                value = value + torch.log_softmax(logits[position - 1], dim=-1)[token]
            elif objective == "logprob":
                value = value + torch.log_softmax(logits[position], dim=-1)[token]
            else:
                value = value + logits[position, token]
        value.backward()
        grads = {name: None if p.grad is None else p.grad.detach().cpu().clone()
                 for name, p in model.named_parameters()}
        if total is None:
            total = grads
        else:
            for name, grad in grads.items():
                if grad is not None:
                    total[name] = grad if total[name] is None else total[name] + grad
    model.zero_grad(set_to_none=True)
    return total


def loop_step(model, kind, encoded, *, aggregation, k, lr, objective, direction, rank_by):
    """Similarities partition by partition, k lowest by (similarity, index), update partition by partition."""
    grads_adv = loop_gradients(model, kind, encoded, "advantaged", objective)
    grads_dis = loop_gradients(model, kind, encoded, "disadvantaged", objective)
    params = dict(model.named_parameters())

    def step_of(adv, dis):
        """The official code's new_grad_calc, applied to one partition's slices."""
        if direction == "advantaged":
            return adv
        return -dis if direction == "disadvantaged" else adv - dis

    partition = loop_partition(model, aggregation)
    scores, sizes = [], []
    for name, index in partition:
        adv, dis = grads_adv[name], grads_dis[name]
        if adv is None or dis is None:
            scores.append(5.0)  # the official code's "never pick" value
            sizes.append(0.0)
            continue
        weight = params[name].detach().cpu()
        if index is not None:
            adv, dis, weight = adv[index], dis[index], weight[index]
        score = F.cosine_similarity(adv, dis, dim=-1)
        sizes.append(min(float(adv.norm()), float(dis.norm())))
        if rank_by == "flexibility":
            score = score * step_of(adv, dis).norm() / (weight.norm() + 1e-3 * adv.numel() ** 0.5)
        scores.append(float(score))
    chosen = sorted(range(len(scores)), key=lambda i: (scores[i], i))[:k]
    with torch.no_grad():
        for i in chosen:
            name, index = partition[i]
            if index is None:
                params[name] -= lr * step_of(grads_adv[name], grads_dis[name])
            else:
                params[name][index] -= lr * step_of(grads_adv[name][index], grads_dis[name][index])
    return chosen, scores, sizes, partition


# -- fixtures -------------------------------------------------------------------------------------------
def _encoded(folder, kind_expected: str, count: int = 8):
    model, tokenizer, kind = load_model(folder)
    assert kind == kind_expected
    pairs = load_winogender_pairs()[:: 240 // count][:count]
    encoded = [encode_pair(p, tokenizer, kind) for p in pairs]
    assert all(e is not None for e in encoded)
    return model, tokenizer, kind, encoded


CASES = [
    ("bert", "masked", dict(aggregation="input", direction="advantaged", rank_by="similarity", objective="logit")),
    ("bert", "masked", dict(aggregation="output", direction="both", rank_by="flexibility", objective="logprob")),
    ("gpt2", "causal", dict(aggregation="input", direction="advantaged", rank_by="similarity", objective="logprob")),
    ("gpt2", "causal", dict(aggregation="output", direction="disadvantaged", rank_by="flexibility",
                            objective="logprob")),
]


@pytest.mark.parametrize("model_type, kind, options", CASES, ids=lambda c: str(c) if isinstance(c, str) else None)
def test_vectorized_step_equals_per_partition_loop(tiny_model, data_dir, model_type, kind, options):
    model, tokenizer, kind, encoded = _encoded(tiny_model(model_type), kind)
    reference_model = copy.deepcopy(model)
    layout = partition_layout(model, options["aggregation"])
    total = sum(part.count for part in layout)
    k = resolve_k(0.03, total)
    lr = 1e-3
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    batch = collate_pairs(encoded, tokenizer.pad_token_id)
    halves = [{key: value[:5] for key, value in batch.items()}, {key: value[5:] for key, value in batch.items()}]
    step_options = {key: value for key, value in options.items() if key != "aggregation"}
    result = pcgu_step(model, layout, halves, kind=kind, k=k, lr=lr, **step_options)
    chosen, scores, sizes, partition = loop_step(reference_model, kind, encoded, k=k, lr=lr, **options)

    assert len(partition) == total
    # Gradients at rounding-noise level (e.g. attention key biases, which softmax makes exactly
    # irrelevant) have arbitrary directions; every other partition's score must agree up to float32
    # reductions in another order (partitions up to 30522 long: columns of the word embeddings).
    meaningful = torch.tensor(sizes) > 1e-5
    assert meaningful.sum() > 100
    torch.testing.assert_close(result.scores[meaningful], torch.tensor(scores)[meaningful], atol=1e-3, rtol=1e-3)
    sorted_scores = sorted(scores)
    assert sorted_scores[k] - sorted_scores[k - 1] > 1e-6 or sorted_scores[k] == sorted_scores[k - 1] == 0.0
    # Noise-level partitions (and zero-gradient rows, tied at 0) may trade places at the cut: their scores' signs
    # depend on the CPU's kernels. Every meaningful partition must be chosen by both, in the same order.
    differing = set(result.selected.tolist()) ^ set(chosen)
    assert not {i for i in differing if meaningful[i]}, "a partition with a real gradient was chosen by one only"
    assert [i for i in result.selected.tolist() if meaningful[i]] == [i for i in chosen if meaningful[i]]

    moved = 0
    reference = dict(reference_model.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, reference[name], atol=1e-7, rtol=1e-5)
        moved += int(((param - before[name]).abs() > 1e-7).any())
    assert moved >= 2, "the step should have changed some tensors"


def test_partition_axes_follow_units_not_storage():
    from transformers.pytorch_utils import Conv1D

    model = torch.nn.ModuleDict({"linear": torch.nn.Linear(3, 5), "conv": Conv1D(5, 3),
                                 "emb": torch.nn.Embedding(7, 4)})
    counts = {p.name: (p.mode, p.count) for p in partition_layout(model, "input")}
    assert counts["linear.weight"] == ("rows", 5)  # [out=5, in=3]: one partition per output unit
    assert counts["conv.weight"] == ("columns", 5)  # [in=3, out=5]: the same units, stored transposed
    assert counts["emb.weight"] == ("rows", 7)
    assert counts["linear.bias"] == ("whole", 1)
    outputs = {p.name: (p.mode, p.count) for p in partition_layout(model, "output")}
    assert outputs["linear.weight"] == ("columns", 3) and outputs["conv.weight"] == ("rows", 3)


def test_target_spans_and_masking(tiny_model, data_dir):
    assert target_spans([1, 2, 3, 4], [1, 9, 9, 4]) == (range(1, 3), range(1, 3))
    assert target_spans([1, 2, 4], [1, 2, 3, 4]) == (range(2, 2), range(2, 3))
    pair = BiasPair("The nurse said she would help.", "The nurse said he would help.", "nurse", "test")
    _, tokenizer, _ = load_model(tiny_model("bert"))
    encoded = encode_pair(pair, tokenizer, "masked")
    assert encoded.advantaged.target_ids == tokenizer.convert_tokens_to_ids(["she"])
    position = encoded.advantaged.target_positions[0]
    assert encoded.advantaged.input_ids[position] == tokenizer.mask_token_id
    assert tokenizer.mask_token_id not in encoded.advantaged.input_ids[:position]
    _, gpt_tokenizer, _ = load_model(tiny_model("gpt2"))
    causal = encode_pair(pair, gpt_tokenizer, "causal")
    assert causal.advantaged.input_ids[0] == gpt_tokenizer.bos_token_id
    assert gpt_tokenizer.decode(causal.advantaged.target_ids).strip() == "she"
    assert encode_pair(BiasPair("He runs.", "He runs fast.", "", ""), gpt_tokenizer, "causal") is None


def test_step_lowers_the_advantaged_objective(tiny_model, data_dir):
    model, tokenizer, kind, encoded = _encoded(tiny_model("gpt2"), "causal")
    batch = collate_pairs(encoded, tokenizer.pad_token_id)
    layout = partition_layout(model)
    with torch.no_grad():
        before = sequence_objectives(model, batch, "adv", kind, "logprob").sum()
    pcgu_step(model, layout, [batch], kind=kind, k=resolve_k(0.2, sum(p.count for p in layout)), lr=1e-2)
    with torch.no_grad():
        after = sequence_objectives(model, batch, "adv", kind, "logprob").sum()
    assert after < before - 1e-4


def test_k_and_option_errors():
    from pydantic import ValidationError

    from debias_plugin.methods.pcgu import PCGUOptions

    assert resolve_k(0.5, 10) == 5 and resolve_k(3, 10) == 3 and resolve_k(10, 10) == 10
    for bad in (0, 1.5, -2):
        with pytest.raises(DebiasError, match="k must be"):
            resolve_k(bad, 10)
    with pytest.raises(DebiasError, match="only 10"):  # more partitions than the model has: refused, not clamped
        resolve_k(30, 10)
    with pytest.raises(ValidationError, match="direction"):
        PCGUOptions(direction="sideways")
    with pytest.raises(ValidationError, match="k must be"):
        PCGUOptions(k=2.5)


def test_cli_errors_are_one_paragraph(tmp_path, tiny_model, data_dir, capsys):
    from debias_plugin.cli import main

    bad_pairs = tmp_path / "pairs.csv"
    bad_pairs.write_text("advantaged,disadvantaged\nHe runs.,She runs.\nHe sat.,\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["pcgu", "--model", str(tiny_model("gpt2")), "--output", str(tmp_path / "out"),
              "--pairs", str(bad_pairs), "--steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pairs.csv, line 3, field 'disadvantaged'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        main(["pcgu", "--model", str(tiny_model("gpt2")), "--output", str(tmp_path / "out"), "--k", "2.5"])
    assert exit_info.value.code != 0
    with pytest.raises(SystemExit) as exit_info:
        main(["pcgu", "--model", str(tiny_model("gpt2")), "--output", str(tmp_path / "out"), "--grad-accum", "2"])
    assert exit_info.value.code == 2 and "--grad-accum" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_and_resume(tmp_path, tiny_model, data_dir):
    """2 processes (accelerate, gloo DDP on CPU) select and update exactly what one process does,
    and a killed-then-resumed single-process run ends where the uninterrupted run does.

    `accelerate launch --cpu --num_processes 2` starts a single process (its simple launcher); on a
    machine without GPUs `--multi_gpu` is what starts 2 CPU processes with a gloo process group.
    """
    from safetensors.torch import load_file

    model = tiny_model("gpt2")
    common = ["pcgu", "--model", str(model), "--steps", "2", "--batch-size", "8", "--k", "0.05", "--no-dropout",
              "--lr", "1e-3", "--seed", "3"]
    debias = str(Path(sys.executable).with_name("debias"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two_processes = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
                     "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                     "--main_process_port", str(_free_port()), debias]
    # One process, killed after step 1 (checkpoint every step), then resumed: must equal two processes.
    one_process = [debias, *common, "--output", str(tmp_path / "out1"), "--checkpoint-every", "1"]
    kill_after_step = [sys.executable, str(Path(__file__).with_name("kill_after_step.py")), "1"]
    killed = subprocess.run(kill_after_step + one_process[1:], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not (tmp_path / "out1").exists()
    resumed = subprocess.run(one_process, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming pcgu" in resumed.stdout + resumed.stderr
    out = subprocess.run(two_processes + common + ["--output", str(tmp_path / "out2")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = (load_file(tmp_path / f"out{n}" / "model.safetensors") for n in (1, 2))
    base = load_file(Path(model) / "model.safetensors")
    assert any(not torch.equal(one[name], base[name]) for name in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-7, rtol=1e-6)
    reports = [json.loads((tmp_path / f"out{n}" / "debias_manifest.json").read_text()) for n in (1, 2)]
    assert reports[1]["timings"]["processes"] == 2
    assert reports[0]["results"]["report"]["selections_by_tensor_top15"] == reports[1]["results"]["report"]["selections_by_tensor_top15"]


# -- bf16 ----------------------------------------------------------------------------------------------------
def test_bf16_statistics_match_an_autocast_reference_and_hold_one_bf16_side(tiny_model, data_dir):
    """precision bf16: both forward passes under CPU autocast; the advantaged side is held in bf16 and the
    disadvantaged side never as a full copy. Reference: torch.autograd.grad of the same objective under autocast,
    the advantaged gradient rounded to bf16, F.cosine_similarity per row in float32."""
    from debias_plugin.methods.pcgu import pair_statistics

    model, tokenizer, kind, encoded = _encoded(tiny_model("gpt2"), "causal")
    batch = collate_pairs(encoded, tokenizer.pad_token_id)
    layout = partition_layout(model)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    head_dtypes = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: head_dtypes.append(out.dtype))
    handed, alive_before = [], []  # weak references to every gradient backward hands over, in order

    def probe(param):  # registered before pair_statistics' own hooks, so it sees each gradient first
        alive_before.append(sum(ref() is not None for ref in handed[len(layout):]))
        handed.append(weakref.ref(param.grad))

    probes = [part.param.register_post_accumulate_grad_hook(probe) for part in layout]
    stats = pair_statistics(model, layout, [batch], kind, "logprob", held_dtype=torch.bfloat16, autocast=autocast)
    hook.remove()
    for handle in probes:
        handle.remove()
    assert head_dtypes == [torch.bfloat16, torch.bfloat16]  # both sides ran under autocast
    assert len(handed) == 2 * len(layout)
    assert alive_before[len(layout):] == [0] * len(layout)  # each disadvantaged gradient is gone before the next
    assert {u.dtype for u in stats.updates if u is not None} == {torch.bfloat16}
    assert all(part.param.grad is None for part in layout)  # nothing left in .grad

    params = [part.param for part in layout]
    with autocast():
        adv = sequence_objectives(model, batch, "adv", kind, "logprob")
    grads_adv = torch.autograd.grad(adv.sum(), params, allow_unused=True)
    with autocast():
        dis = sequence_objectives(model, batch, "dis", kind, "logprob")
    grads_dis = torch.autograd.grad(dis.sum(), params, allow_unused=True)
    reference, meaningful = [], []
    for part, a, d in zip(layout, grads_adv, grads_dis):
        a_rows, d_rows = part.view(a.to(torch.bfloat16).float()), part.view(d.float())
        reference.append(F.cosine_similarity(a_rows, d_rows, dim=-1))
        meaningful.append(torch.minimum(a_rows.norm(dim=-1), d_rows.norm(dim=-1)) > 1e-5)
    reference, meaningful = torch.cat(reference), torch.cat(meaningful)
    assert meaningful.sum() > 100
    torch.testing.assert_close(stats.scores[meaningful], reference[meaningful], atol=2e-3, rtol=2e-3)
    for update, a in zip(stats.updates, grads_adv):
        torch.testing.assert_close(update, a.to(torch.bfloat16), atol=0, rtol=0)


def test_bf16_pcgu_trains_through_the_cli_and_lowers_the_advantaged_side(tiny_model, data_dir, tmp_path):
    """--precision bf16 (fp32 weights, autocast) and --weights-dtype bf16 (bf16 weights written) both train."""
    from safetensors.torch import load_file

    from debias_plugin.cli import main

    common = ["pcgu", "--model", str(tiny_model("gpt2")), "--steps", "3", "--batch-size", "8", "--k", "0.2",
              "--lr", "3e-2", "--no-dropout", "--pairs", "winogender", "--max-length", "32"]
    for extra, name, dtype in ((["--precision", "bf16"], "mixed", torch.float32),
                               (["--weights-dtype", "bf16", "--precision", "bf16"], "pure", torch.bfloat16)):
        main([*common, *extra, "--output", str(tmp_path / name)])
        record = json.loads((tmp_path / name / "debias_manifest.json").read_text())
        assert record["options"]["precision"] == "bf16"
        metrics = record["results"]["metrics"]
        assert metrics["end"]["mean_objective_gap"] < metrics["start"]["mean_objective_gap"]
        assert {t.dtype for t in load_file(tmp_path / name / "model.safetensors").values()} == {dtype}


def test_gradient_checkpointing_gives_the_same_pcgu_step(tiny_model, data_dir, tmp_path):
    """PCGU's own backward passes (post-accumulate hooks) through recomputed layers: the same update."""
    from safetensors.torch import load_file

    from debias_plugin.cli import main

    common = ["pcgu", "--model", str(tiny_model("llama")), "--steps", "2", "--batch-size", "4", "--k", "0.05",
              "--lr", "1e-2", "--no-dropout", "--pairs", "winogender", "--max-length", "32"]
    main([*common, "--output", str(tmp_path / "plain")])
    main([*common, "--gradient-checkpointing", "--output", str(tmp_path / "checkpointed")])
    plain, checkpointed = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "checkpointed"))
    base = load_file(tiny_model("llama") / "model.safetensors")
    assert any(not torch.equal(plain[name], base[name]) for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
