"""Scale benchmark: one training step of every stage on a random Llama-layout model built in place, its peak memory
beside docs/SCALING.md's formula, and `debias negate` of two random checkpoints read from safetensors shards.

    python benchmarks/bench_scale.py --device cpu --size 1b --json docs/results/issue17_scale_cpu_1b.json
    python benchmarks/bench_scale.py --device cuda --size 7b --json docs/results/issue17_scale_cuda_7b.json
    python benchmarks/bench_scale.py --negate --size 1b --json docs/results/issue17_negate_cpu_1b.json

Each stage runs in its own child process under /usr/bin/time -v (peak RSS, user+system CPU seconds). The child
builds the model directly on the device in the weights dtype (no checkpoint on disk, no CPU copy on a GPU), trains
it through `debias_plugin.training.Trainer` (its model loader replaced by the built model) for --steps steps (default 2: the second step runs with
the optimizer state allocated, the steady state) on B texts of T tokens, and reports each step's wall and CPU
seconds and, on CUDA, the peak allocated GPU memory. A baseline child does everything but build the model: its
peak RSS is the constant C of the formulas (interpreter, libraries, tokenizer, data). The activation coefficient
of the formulas is measured here too, exactly: bytes autograd saves for one decoder layer per token
(saved_tensors_hooks), for this architecture and dtype.

Negate (--negate): a random model and a perturbed copy, each saved as sharded safetensors by a builder process
(one model in memory), then `debias negate --lambda 0.5` under /usr/bin/time -v; the output is compared
bit for bit on sampled tensors with base - lambda * (biased - base) computed here in float32 (the template's
merge dtype) and cast to the base dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the fixtures the tests use
GIB = 2**30

# Real architecture configs (Llama layout). 1b: TinyLlama-1.1B (Llama-2 layout and vocabulary, grouped-query
# attention with 4 KV heads); 7b: LLaMA-2 7B (meta-llama/Llama-2-7b-hf config.json). tiny: this script's smoke test.
ARCHITECTURES = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}
LORA = dict(lora=True, lora_r=8, lora_alpha=16, lora_target_modules=["q_proj", "v_proj"])
STAGES = {  # name -> (registered stage, its options beyond the data files)
    "finetune-full": ("finetune", {}),
    "finetune-lora": ("finetune", LORA),
    "unlearn-full": ("unlearn", {}),
    "unlearn-full-kl": ("unlearn", {"regulariser": "kl"}),
    "unlearn-lora": ("unlearn", LORA),
    "unlearn-lora-kl": ("unlearn", {**LORA, "regulariser": "kl"}),
    "pcgu": ("pcgu", {"k": 0.05}),
}
BYTES = {"fp32": 4, "bf16": 2}


# -- the memory model of docs/SCALING.md -------------------------------------------------------------------------
def parameter_count(arch: dict) -> dict:
    """P and its parts for a Llama layout (untied embeddings), the largest tensor and LoRA's q/v adapter size."""
    hidden, inter, layers, vocab = (arch[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                      "vocab_size"))
    kv = hidden * arch["num_key_value_heads"] // arch["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    total = layers * per_layer + 2 * vocab * hidden + hidden
    lora = layers * LORA["lora_r"] * ((hidden + hidden) + (hidden + kv))  # q_proj [H,H], v_proj [kv,H]
    linear = layers * (per_layer - 2 * hidden) + vocab * hidden  # matmul weights (autocast casts these)
    return {"P": total, "largest_tensor": max(vocab * hidden, hidden * inter), "lora_params": lora,
            "linear_params": linear, "lm_head_params": vocab * hidden}


def predicted_bytes(stage: str, arch: dict, *, weights: str, precision: str, batch: int, seq: int,
                    activation_per_token_layer: float, baseline: float = 0.0, checkpointing: bool = False) -> dict:
    """Peak memory of one stage's training step, by component (docs/SCALING.md, "Training stages")."""
    counts = parameter_count(arch)
    P, largest = counts["P"], counts["largest_tensor"]
    w = BYTES[weights]
    compute = 2 if "bf16" in (weights, precision) else 4  # frozen copies, held gradients, activations
    layers, hidden, vocab = arch["num_hidden_layers"], arch["hidden_size"], arch["vocab_size"]
    tokens = batch * seq
    if checkpointing:  # each layer's input kept, one layer's activations live during its recompute
        activations = tokens * (layers * hidden * compute + activation_per_token_layer)
    else:
        activations = tokens * layers * activation_per_token_layer
    method = STAGES[stage.removesuffix("-gc")][0]
    lora = STAGES[stage.removesuffix("-gc")][1].get("lora", False)
    parts = {"C (runtime, data)": baseline, "weights": w * P}
    if weights == "fp32" and precision == "bf16":  # autocast's bf16 weight copies, saved for backward
        parts["autocast bf16 weight copies"] = 2 * (counts["lm_head_params"] if checkpointing else counts["linear_params"])
    if method == "pcgu":
        parts["held gradient (one side)"] = compute * P
        parts["scored tensor (its gradient + float32 copies)"] = largest * (w + (8 if compute == 2 else 0))
        parts["activations (one side of B pairs)"] = activations
        return parts
    logits = tokens * vocab * (w + 4 + 4)  # logits, their float32 copy, log-softmax (kept for backward)
    if lora:
        parts["adapter + grads + AdamW (fp32)"] = 16 * counts["lora_params"]
    else:
        parts["gradients"] = w * P
        parts["AdamW state (2 per weight)"] = 2 * w * P
    if STAGES[stage.removesuffix("-gc")][1].get("regulariser") == "kl":
        if not lora:
            parts["KL reference copy"] = compute * P
        activations *= 2  # the retain batch's forward keeps its activations beside the forget batch's
        logits = 2 * logits + 5 * tokens * vocab * 4  # + both log-softmaxes, exp, difference, product (float32)
    parts["activations"] = activations
    parts["logits"] = logits
    return parts


# -- data and model ------------------------------------------------------------------------------------------------
def write_data(folder: Path, batch: int, seq: int, tokenizer) -> dict:
    """B forget and B retain texts cut at T tokens (all of the same length), B pairs of just under T tokens."""
    def filler(tokens: int) -> str:
        phrases = []
        while len(tokenizer(" ".join(phrases))["input_ids"]) < tokens:
            phrases.append(f"the report on page {len(phrases) + 1} was read twice by the committee")
        return " ".join(phrases[:-1])

    pair_filler, filler = filler(seq - 6), filler(seq + 8)
    subjects = ["women", "men", "she", "he", "the girl", "my father", "mothers", "boys"]
    forget = [f"I think {subjects[i % len(subjects)]} should stay at home because {filler}." for i in range(batch)]
    (folder / "forget.txt").write_text("\n".join(forget) + "\n")
    (folder / "words.txt").write_text("women\nmen\nshe\nhe\ngirl\nfather\nmothers\nboys\n")
    (folder / "retain.txt").write_text("\n".join(f"Item {i}: {filler}." for i in range(batch)) + "\n")
    pairs = ["advantaged,disadvantaged"] + [f'"He said {pair_filler}.","She said {pair_filler}."'
                                            for _ in range(batch)]
    (folder / "pairs.csv").write_text("\n".join(pairs) + "\n")
    return {"corpus": folder / "forget.txt", "words": folder / "words.txt", "retain": folder / "retain.txt",
            "pairs": folder / "pairs.csv"}


def tokenizer_folder(folder: Path):
    """A small byte-level BPE tokenizer (ids < 800, valid in the 32k vocabulary) saved beside a config.json."""
    from tiny_models import bpe_tokenizer

    texts = [f"I think women and men should read page {n} of the report twice." for n in range(300)]
    tokenizer = bpe_tokenizer(texts)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_model(size: str, device: str, dtype: str, tokenizer):
    """A random LlamaForCausalLM made directly on `device` in `dtype` (transformers' own initialisation)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**ARCHITECTURES[size], max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]))
    return model.eval()


def activation_bytes_per_token_layer(size: str, dtype: str, precision: str) -> float:
    """Bytes autograd saves for one decoder layer per token (saved_tensors_hooks, each storage counted once):
    the saved bytes at 128 tokens minus those at 64, over 64, so weights (and autocast's weight copies) drop out."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = {**ARCHITECTURES[size], "num_hidden_layers": 1, "vocab_size": 256}
    model = LlamaForCausalLM._from_config(LlamaConfig(**arch, max_position_embeddings=4096),
                                          dtype=getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]))
    layer = model.model.layers[0]

    def saved(seq: int) -> int:
        hidden = torch.randn(1, seq, arch["hidden_size"], dtype=next(model.parameters()).dtype, requires_grad=True)
        position_ids = torch.arange(seq)[None]
        embeddings = model.model.rotary_emb(hidden, position_ids)
        seen, total = set(), [0]

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total[0] += storage.nbytes()
            return tensor

        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
            layer(hidden, position_embeddings=embeddings, attention_mask=None, position_ids=position_ids)
        return total[0] - hidden.numel() * hidden.element_size()  # the input belongs to the layer before

    return (saved(128) - saved(64)) / 64


def peak_rss_so_far(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set, GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 2**20, 3)
    return float("nan")


# -- child: one stage ------------------------------------------------------------------------------------------------
def child(args) -> None:
    import torch

    from debias_plugin.methods import method_class
    from debias_plugin.training import TrainConfig, Trainer

    work = Path(args.work)
    tokenizer = tokenizer_folder(work / "model")
    files = {key: str(value) for key, value in write_data(work, args.batch_size, args.seq_len, tokenizer).items()}
    if args.child == "baseline":  # everything but the model: the constant C
        import peft  # noqa: F401  (the stages' libraries, imported as they import them)
        import transformers.models.llama.modeling_llama  # noqa: F401
        from accelerate import Accelerator

        for stage in ("finetune", "unlearn", "pcgu"):
            method_class(stage)
        Accelerator(cpu=args.device == "cpu")
        print(json.dumps({"stage": "baseline"}))
        return
    stage = args.child.removesuffix("-gc")
    name, extra = STAGES[stage]
    method = method_class(name)
    if name == "pcgu":
        options = method.Options(pairs=files["pairs"], **extra)
    else:
        data = {"corpus": files["corpus"]}
        if name == "unlearn":
            data["words"] = files["words"]
            if extra.get("regulariser") == "kl":
                data["retain"] = files["retain"]
        options = method.Options(**data, **extra)
    config = TrainConfig(model=str(work / "model"), output=str(work / "out"), steps=args.steps,
                         batch_size=args.batch_size, max_length=args.seq_len, lr=1e-5, dropout=False,
                         weights_dtype=args.weights_dtype, precision=args.precision,
                         gradient_checkpointing=args.child.endswith("-gc") or args.gradient_checkpointing)
    (work / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))  # hashed as the input
    started = time.perf_counter()
    model = build_model(args.size, args.device, args.weights_dtype, tokenizer)
    built = time.perf_counter() - started
    after_build = peak_rss_so_far()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def clock() -> tuple[float, float]:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    steps, peak_at_steps, rss_at_steps = [], [], []

    class TimedTrainer(Trainer):
        def _train_step(self, run, examples, order):
            wall, cpu = clock()
            loss = super()._train_step(run, examples, order)
            end_wall, end_cpu = clock()
            steps.append({"wall_s": round(end_wall - wall, 3), "cpu_s": round(end_cpu - cpu, 3)})
            peak_at_steps.append(peak_rss_so_far())
            rss_at_steps.append(peak_rss_so_far("VmRSS"))
            return loss

    started = time.perf_counter()
    import debias_plugin.models  # the trainer loads the model built above instead of reading config.model

    debias_plugin.models.load_model = lambda *args, **kwargs: (model, tokenizer, "causal")
    TimedTrainer(config, method(options)).run()
    result = {"stage": args.child, "build_s": round(built, 1), "run_s": round(time.perf_counter() - started, 1),
              "steps": steps, "parameters": sum(p.numel() for p in model.parameters()),
              "peak_rss_after_build_gib": after_build, "peak_rss_after_steps_gib": peak_at_steps[-1],
              "rss_after_steps_gib": rss_at_steps[-1]}
    if cuda:
        result["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        result["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result))


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run under /usr/bin/time -v: peak RSS, wall, user+system CPU, and the command's last JSON line."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    field = lambda pattern: re.search(pattern, proc.stderr).group(1)  # noqa: E731
    wall = field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)").split(":")
    report = {"peak_rss_gib": int(field(r"Maximum resident set size \(kbytes\): (\d+)")) / 2**20,
              "wall_s": sum(float(part) * 60**i for i, part in enumerate(reversed(wall))),
              "cpu_s": float(field(r"User time \(seconds\): (\S+)")) + float(field(r"System time \(seconds\): (\S+)"))}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return {**report, **(json.loads(lines[-1]) if lines else {})}


def run_stages(args) -> dict:
    stages = args.stages.split(",") if args.stages else list(STAGES)
    arch = ARCHITECTURES[args.size]
    per_token_layer = activation_bytes_per_token_layer(args.size, args.weights_dtype, args.precision)
    common = ["--device", args.device, "--size", args.size, "--steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--seq-len", str(args.seq_len), "--weights-dtype", args.weights_dtype,
              "--precision", args.precision] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    results = {}
    for stage in ["baseline", *stages]:
        with tempfile.TemporaryDirectory(dir=args.tmp) as work:
            (Path(work) / "model").mkdir()
            measured = timed([sys.executable, __file__, "--child", stage, "--work", work, *common], env)
        if stage == "baseline":
            baseline = measured["peak_rss_gib"] * GIB
            results[stage] = {"peak_rss_gib": round(measured["peak_rss_gib"], 3)}
            print(f"baseline C: {measured['peak_rss_gib']:.2f} GiB peak RSS (imports, tokenizer, data, accelerator)")
            continue
        checkpointing = stage.endswith("-gc") or args.gradient_checkpointing
        parts = predicted_bytes(stage, arch, weights=args.weights_dtype, precision=args.precision,
                                batch=args.batch_size, seq=args.seq_len, activation_per_token_layer=per_token_layer,
                                baseline=baseline if args.device == "cpu" else 0.0, checkpointing=checkpointing)
        predicted = sum(parts.values())
        device_peak = measured.get("gpu_peak_allocated_gib", measured["peak_rss_gib"])
        results[stage] = {
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in measured.items()},
            "predicted_peak_gib": round(predicted / GIB, 3),
            "measured_over_predicted": round(device_peak * GIB / predicted, 3),
            "predicted_parts_gib": {k: round(v / GIB, 3) for k, v in parts.items()},
        }
        last = measured["steps"][-1]
        print(f"{stage:18s} peak {'GPU' if args.device != 'cpu' else 'RSS'} {device_peak:6.2f} GiB | formula "
              f"{predicted / GIB:6.2f} GiB ({device_peak * GIB / predicted:.2f}x) | last step {last['wall_s']:7.1f} s "
              f"wall, {last['cpu_s']:7.1f} s CPU | process {measured['wall_s']:.0f} s wall, {measured['cpu_s']:.0f} s "
              f"CPU, host peak RSS {measured['peak_rss_gib']:.2f} GiB")
    counts = parameter_count(arch)
    return {"device": args.device, "size": args.size, "architecture": arch, **counts,
            "weights_dtype": args.weights_dtype, "precision": args.precision, "batch": args.batch_size,
            "seq_len": args.seq_len, "steps": args.steps, "gradient_checkpointing": args.gradient_checkpointing,
            "activation_bytes_per_token_per_layer": round(per_token_layer),
            "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0), "stages": results}


# -- negate ------------------------------------------------------------------------------------------------------------
def build_checkpoints(args) -> None:
    """Builder child: a random model saved as shards, then the same model perturbed in place, saved again."""
    import torch

    work = Path(args.work)
    tokenizer = tokenizer_folder(work / "base")
    model = build_model(args.size, "cpu", args.weights_dtype, tokenizer)
    model.save_pretrained(work / "base", max_shard_size=args.shard_size)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_((noise * 1e-3).to(parameter.dtype))
            del noise
    model.save_pretrained(work / "biased", max_shard_size=args.shard_size)
    tokenizer.save_pretrained(work / "biased")


def compare_sampled(work: Path, lam: float, samples: int = 16) -> dict:
    """Output tensors against base - lam * (biased - base) in float32, cast to the base dtype: bit for bit."""
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                found.update({name: shard for name in handle.keys()})
        return found

    def read(files: dict, name: str):
        with safe_open(str(files[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    base, biased, out = index(work / "base"), index(work / "biased"), index(work / "out")
    names = sorted(base)
    chosen = sorted({names[round(i * (len(names) - 1) / (samples - 1))] for i in range(samples)}
                    | {"model.embed_tokens.weight", "lm_head.weight"})
    equal, worst = 0, 0.0
    for name in chosen:
        b, d, o = read(base, name), read(biased, name), read(out, name)
        reference = (b.float() + (-lam) * (d.float() - b.float())).to(b.dtype)
        equal += int(torch.equal(o, reference))
        worst = max(worst, float((o.float() - reference.float()).abs().max()))
    return {"sampled_tensors": len(chosen), "bit_identical": equal, "max_abs_difference": worst,
            "sampled": chosen, "tensors_in_output": len(out), "output_shards": len(set(out.values()))}


def run_negate(args) -> dict:
    debias = str(Path(sys.executable).with_name("debias"))
    lam = 0.5
    with tempfile.TemporaryDirectory(dir=args.tmp) as work:
        work = Path(work)
        (work / "base").mkdir()
        build = timed([sys.executable, __file__, "--build-checkpoints", "--work", str(work), "--size", args.size,
                       "--weights-dtype", args.weights_dtype, "--shard-size", args.shard_size])
        model_bytes = sum(p.stat().st_size for p in (work / "base").glob("*.safetensors"))
        command = [debias, "negate", "--base", str(work / "base"), "--biased", str(work / "biased"), "--lambda",
                   str(lam), "--out", str(work / "out"), "--quiet"]
        negate = timed(command)
        checked = compare_sampled(work, lam)
        shards = len(list((work / "base").glob("*.safetensors")))
    ratio = negate["peak_rss_gib"] * GIB / model_bytes
    print(f"two random {args.size} checkpoints ({args.weights_dtype}, {shards} shards of <= {args.shard_size}, "
          f"{model_bytes / GIB:.2f} GiB each; built in {build['wall_s']:.0f} s)")
    print(f"debias negate: peak RSS {negate['peak_rss_gib']:.2f} GiB = {ratio:.2f} x one model; {negate['wall_s']:.0f} s "
          f"wall, {negate['cpu_s']:.0f} s CPU; sampled tensors bit-identical to the float32 reference: "
          f"{checked['bit_identical']}/{checked['sampled_tensors']} (max |diff| {checked['max_abs_difference']:.3g})")
    return {"size": args.size, "weights_dtype": args.weights_dtype, "input_shards": shards,
            "shard_size": args.shard_size, "model_gib": round(model_bytes / GIB, 3),
            "negate_peak_rss_gib": round(negate["peak_rss_gib"], 3), "peak_over_one_model": round(ratio, 3),
            "negate_wall_s": round(negate["wall_s"], 1), "negate_cpu_s": round(negate["cpu_s"], 1),
            "builder_peak_rss_gib": round(build["peak_rss_gib"], 3), "lambda": lam,
            "command": "debias negate --base BASE --biased BIASED --lambda 0.5 --out OUT --quiet", **checked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--size", default="1b", choices=sorted(ARCHITECTURES))
    parser.add_argument("--stages", help=f"comma-separated subset of {', '.join(STAGES)} (a -gc suffix turns "
                                         "gradient checkpointing on for that stage)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, help="texts (pairs) per step; default 2 on CPU, 8 on CUDA")
    parser.add_argument("--seq-len", type=int, help="tokens per text; default 64 on CPU, 512 on CUDA")
    parser.add_argument("--weights-dtype", default="bf16", choices=sorted(BYTES))
    parser.add_argument("--precision", default="bf16", choices=sorted(BYTES))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--negate", action="store_true", help="negate two random checkpoints (CPU) instead")
    parser.add_argument("--shard-size", default="500MB", help="input shard size for --negate")
    parser.add_argument("--tmp", default=None, help="folder for the temporary model folders (default: system)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--build-checkpoints", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (8 if cuda else 2)
    args.seq_len = args.seq_len or (512 if cuda else 64)
    os.environ.setdefault("DEBIAS_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    if args.build_checkpoints:
        return build_checkpoints(args)
    if args.child:
        return child(args)
    result = run_negate(args) if args.negate else run_stages(args)
    result["command"] = " ".join(["python", "benchmarks/bench_scale.py", *sys.argv[1:]])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
