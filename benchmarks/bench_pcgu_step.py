"""Time one PCGU step: our vectorized step vs the official code's per-partition loop, same BERT and batch.

The loop side follows CharlesYu2000/PCGU-UnlearningBias (src/general_similarity_retrain.py): full MLM
logits, `.sum().backward()` per side, gradients copied with `.detach().cpu()`, one cosine similarity per
partition in a Python loop, `torch.stack` + `topk`, `.item()` per index, a per-partition gradient write
and `optimizer.step()` (SGD). Both sides run interleaved in one process (shared-CPU noise hits both);
peak memory is the max RSS of a child process doing one step of each kind.

    nice -n 10 python benchmarks/bench_pcgu_step.py --json docs/results/issue5_step.json [--device cuda]

With --device cuda both steps run on the GPU (the official code's `.cpu()` gradient copies included, as it
does on a GPU); times are taken after torch.cuda.synchronize(), and peak GPU memory is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DEBIAS_DATA_DIR", str(ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "tests"))

from debias_plugin.data.pairs import load_winogender_pairs  # noqa: E402
from debias_plugin.methods.pcgu import (  # noqa: E402
    apply_masked_update, collate_pairs, encode_pair, pair_statistics, partition_layout, resolve_k, select_partitions,
)
from debias_plugin.models import load_model  # noqa: E402
from test_pcgu import loop_partition  # noqa: E402  (the same partition list the tests check against)


def official_backprop(model, ids, attention, positions, targets):
    """do_an_mlm_backprop: full logits, gather the target logit at the masked index, sum, backward."""
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attention).logits
    index = positions.unsqueeze(-1).repeat(1, logits.shape[-1]).unsqueeze(1)
    picked = logits.gather(1, index).squeeze(1).gather(1, targets.unsqueeze(-1))
    picked.sum().backward()


def official_grads(model):
    """get_all_model_grads: a CPU copy of every gradient (`.cpu()` copies from a GPU; on CPU we clone)."""
    return {name: None if p.grad is None else p.grad.detach().cpu().clone() for name, p in model.named_parameters()}


def synchronized_clock() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def official_step(model, optimizer, partition, batch, k, timings):
    started = synchronized_clock()
    official_backprop(model, *batch["dis"])
    grads_dis = official_grads(model)
    official_backprop(model, *batch["adv"])
    grads_adv = official_grads(model)
    middle = synchronized_clock()
    sims = []
    for name, index in partition:  # compute_similarities
        g1, g2 = grads_dis[name], grads_adv[name]
        if g1 is None or g2 is None:
            sims.append(torch.tensor(5.0))
            continue
        if index is not None:
            g1, g2 = g1[index], g2[index]
        sims.append(F.cosine_similarity(g1, g2, dim=-1).detach().cpu())
    top = torch.stack(sims).topk(k, largest=False, sorted=True)  # find_parameters_to_keep
    keep = [partition[i] for i in [index.item() for index in top[1]]]
    params = dict(model.named_parameters())
    optimizer.zero_grad(set_to_none=False)  # the torch 1.x behaviour the code relies on
    for name, index in keep:  # update_model_param_grads with _minimize_grads_2 (advantaged)
        if index is None:
            params[name].grad.data.copy_(grads_adv[name].data)
        else:
            params[name].grad[index] = grads_adv[name][index]
    optimizer.step()
    ended = synchronized_clock()
    timings.append((ended - started, ended - middle))
    return sorted(int(i) for i in top[1][:50])


def ours_step(model, layout, batch, k, lr, timings):
    """pcgu_step's parts: gradients with each partition scored as backward hands it over, then select + update."""
    started = synchronized_clock()
    stats = pair_statistics(model, layout, [batch], "masked", "logit")
    middle = synchronized_clock()
    selected = select_partitions(stats.scores, k)
    apply_masked_update(layout, stats.updates, selected, lr)
    ended = synchronized_clock()
    timings.append((ended - started, ended - middle))
    return sorted(selected[:50].tolist())


def prepare(model_dir, batch_size, device="cpu"):
    model, tokenizer, kind = load_model(model_dir)
    model.to(device)
    model.train()  # the official script trains in train mode; dropout off keeps both sides comparable
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pairs = load_winogender_pairs()[:batch_size]
    encoded = [encode_pair(p, tokenizer, kind) for p in pairs]
    batch = {key: value.to(device) for key, value in collate_pairs(encoded, tokenizer.pad_token_id).items()}
    official = {}
    for side, name in (("adv", "adv"), ("dis", "dis")):
        target = batch[f"{side}_target_mask"]
        assert bool((target.sum(1) == 1).all()), "the official code handles one target token per sequence"
        official[name] = (batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"],
                          target.float().argmax(1), batch[f"{side}_target_ids"][target])
    return model, batch, official


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    """One step of one kind in a fresh process; RSS sampled every 0.2 ms during the step."""
    import ctypes
    import threading

    model, batch, official = prepare(args.model_dir, args.batch_size, args.device)
    layout = partition_layout(model)
    k = resolve_k(args.k, sum(p.count for p in layout))
    partition = loop_partition(model, "input") if args.child == "loop" else None
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed arenas back, so the baseline is what is in use
    before, peak, running = _rss_mb(), [0.0], [True]

    def sample():
        while running[0]:
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    if args.child == "loop":
        official_step(model, optimizer, partition, official, k, [])
    else:
        ours_step(model, layout, batch, k, args.lr, [])
    running[0] = False
    sampler.join()
    gpu = {}
    if args.device != "cpu":
        torch.cuda.synchronize()
        gpu = {"gpu_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20}
    print(json.dumps({"rss_before_step_mb": before, "peak_rss_mb": max(peak[0], _rss_mb()),
                      "max_rss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **gpu}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--k", type=float, default=10000, help="partitions per step (official default 10000)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--child", choices=["ours", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from tiny_models import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model("bert", Path(tmp) / "bert", layers=args.layers, hidden=args.hidden)
        ours_model, batch, official = prepare(model_dir, args.batch_size, args.device)
        loop_model, _, _ = prepare(model_dir, args.batch_size, args.device)
        layout = partition_layout(ours_model)
        total = sum(p.count for p in layout)
        k = resolve_k(args.k, total)
        partition = loop_partition(loop_model, "input")
        assert len(partition) == total
        optimizer = torch.optim.SGD(loop_model.parameters(), lr=args.lr)
        ours_times, loop_times = [], []
        first_ours = ours_step(ours_model, layout, batch, k, args.lr, [])  # warm-up, and same-selection check
        first_loop = official_step(loop_model, optimizer, partition, official, k, [])
        for _ in range(args.repeats):
            ours_step(ours_model, layout, batch, k, args.lr, ours_times)
            official_step(loop_model, optimizer, partition, official, k, loop_times)
        memory = {}
        for kind in ("ours", "loop"):
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--model-dir", str(model_dir),
                                  "--batch-size", str(args.batch_size), "--k", str(args.k), "--lr", str(args.lr),
                                  "--device", args.device],
                                 capture_output=True, text=True, check=True)
            memory[kind] = json.loads(out.stdout.strip().splitlines()[-1])

    step_ours = statistics.median(t[0] for t in ours_times)
    step_loop = statistics.median(t[0] for t in loop_times)
    part_ours = statistics.median(t[1] for t in ours_times)
    part_loop = statistics.median(t[1] for t in loop_times)
    result = {
        "model": f"BERT {args.layers} layers, hidden {args.hidden}, vocab 30522 (build_tiny_model)",
        "batch_pairs": args.batch_size, "partitions": total, "k": k, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
        "first_50_selected_identical": first_ours == first_loop,
        "step_seconds": {"vectorized": step_ours, "per_partition_loop": step_loop},
        "step_speedup": step_loop / step_ours,
        "partition_phase_seconds": {"vectorized": part_ours, "per_partition_loop": part_loop},
        "partition_phase_speedup": part_loop / part_ours,
        "gradient_phase_seconds": {"vectorized": step_ours - part_ours, "per_partition_loop": step_loop - part_loop},
        "peak_rss_mb": {kind: round(m["peak_rss_mb"], 1) for kind, m in memory.items()},
        "rss_before_step_mb": {kind: round(m["rss_before_step_mb"], 1) for kind, m in memory.items()},
        "step_extra_rss_mb": {kind: round(m["peak_rss_mb"] - m["rss_before_step_mb"], 1)
                              for kind, m in memory.items()},
        "gpu_peak_allocated_mb": ({kind: round(m["gpu_peak_allocated_mb"], 1) for kind, m in memory.items()}
                                  if args.device != "cpu" else None),
    }
    print(f"{result['model']}; batch {args.batch_size} pairs; {total} partitions, k = {k}; "
          f"median of {args.repeats} interleaved steps; device {result['device']}, {torch.get_num_threads()} threads")
    print(f"  full step      : vectorized {step_ours * 1e3:8.1f} ms | loop {step_loop * 1e3:8.1f} ms | "
          f"{result['step_speedup']:.1f}x")
    print(f"  partition phase: vectorized {part_ours * 1e3:8.1f} ms | loop {part_loop * 1e3:8.1f} ms | "
          f"{result['partition_phase_speedup']:.1f}x  (loop: similarities + selection + update; vectorized: "
          "selection + update, its similarities run inside backward)")
    print(f"  gradient phase : vectorized {(step_ours - part_ours) * 1e3:8.1f} ms | "
          f"loop {(step_loop - part_loop) * 1e3:8.1f} ms")
    print(f"  peak RSS during one step (fresh process): vectorized {result['peak_rss_mb']['ours']} MB | "
          f"loop {result['peak_rss_mb']['loop']} MB; above the pre-step RSS: vectorized "
          f"{result['step_extra_rss_mb']['ours']} MB | loop {result['step_extra_rss_mb']['loop']} MB")
    if result["gpu_peak_allocated_mb"]:
        print(f"  peak GPU memory allocated in one step: vectorized {result['gpu_peak_allocated_mb']['ours']} MB | "
              f"loop {result['gpu_peak_allocated_mb']['loop']} MB")
    print(f"  same first 50 selected partitions: {result['first_50_selected_identical']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
