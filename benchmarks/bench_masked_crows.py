"""Full CrowS-Pairs with the batched masked scorer (hf-mlm's engine) vs. the one-forward-per-masked-token reference.

Same process, same seeded tiny-but-not-trivial BERT, one run: by default the shape of Google's BERT-Mini
(4 layers, hidden 256, 4 heads, feed-forward 1024, random weights); `--heads 16 --intermediate 512` is
build_tiny_model's default shape, measured in the first session. Prints the wall
times (batched timed before and after the reference, as the machine's load drifts), the speed-up,
whether every pair's rounded scores and win are identical, and each phase's peak memory.

Peak memory: a background thread samples the process RSS (psutil) every 2 ms; a phase's peak is the
highest sample during it, reported also as the rise over the RSS at the phase's start. glibc's
malloc_trim(0) runs between phases so freed memory is returned and the second phase starts from a
comparable baseline. (tracemalloc would miss torch's C++ allocations.)

    nice -n 10 python benchmarks/bench_masked_crows.py [--limit N] [--threads 1] [--batch-tokens 2048] [--device cuda]

On a GPU both phases run there (the reference as metric.py would: one forward per masked token on the
device); peak memory is then also reported as torch.cuda.max_memory_allocated per phase.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DEBIAS_DATA_DIR", str(ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models, reference_crows: the fixtures the tests use


class PeakRss:
    """Highest resident set size seen while the `with` block runs (sampled by a thread)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.process, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def release_freed_memory():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N pairs only (default: all 1508)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both phases")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="padded-token budget per forward")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: BERT-Mini's 4)")
    parser.add_argument("--intermediate", type=int, default=1024, help="feed-forward width (default: BERT-Mini's)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from debias_plugin.data import load_crows_pairs
    from debias_plugin.scoring.crows import (masked_pair_scores, pct_stereotype, prefers_stereotype,
                                             shared_token_positions)
    from debias_plugin.scoring.masked import MaskedScorer
    from reference_crows import reference_crows_pair
    from tiny_models import build_tiny_model

    torch.set_num_threads(args.threads)
    pairs = [(p.sent_more, p.sent_less) for p in load_crows_pairs()][: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model("bert", Path(tmp) / "bert", layers=4, hidden=256, seed=0, heads=args.heads,
                                  intermediate=args.intermediate)
        model = AutoModelForMaskedLM.from_pretrained(folder).eval().to(args.device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    on_gpu = model.device.type == "cuda"
    device_name = torch.cuda.get_device_name(model.device) if on_gpu else f"cpu, {torch.get_num_threads()} torch threads"
    print(f"model: BERT 4 layers, hidden 256, {args.heads} heads, feed-forward {args.intermediate}, "
          f"vocab {model.config.vocab_size}, {n_params / 1e6:.1f}M params; "
          f"{len(pairs)} pairs; device {device_name}; batch_tokens {args.batch_tokens}")

    def gpu_peak_mib(reset: bool = False) -> float:
        if not on_gpu:
            return 0.0
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak

    if on_gpu:  # warm up kernels / cuBLAS handles outside the timed phases, for both sides
        scorer_warm = MaskedScorer(model, tokenizer, token_budget=args.batch_tokens)
        masked_pair_scores(scorer_warm, pairs[:8])
        for more, less in pairs[:2]:
            reference_crows_pair(model, tokenizer, more, less, scorer_warm.uncased)

    scorer = MaskedScorer(model, tokenizer, token_budget=args.batch_tokens, progress=True)
    release_freed_memory()
    gpu_peak_mib(reset=True)
    with PeakRss() as batched_memory:
        start = time.perf_counter()
        batched = masked_pair_scores(scorer, pairs)
        batched_seconds = time.perf_counter() - start
    batched_gpu_mib = gpu_peak_mib(reset=True)

    release_freed_memory()
    with PeakRss() as reference_memory:
        start = time.perf_counter()
        reference = [reference_crows_pair(model, tokenizer, more, less, scorer.uncased)
                     for more, less in tqdm(pairs, desc="reference (one forward per masked token)")]
        reference_seconds = time.perf_counter() - start
    reference_gpu_mib = gpu_peak_mib(reset=True)

    # the machine's load drifts during the long reference phase: time the batched scorer again after it
    # and compare the reference against the mean of the two batched timings
    release_freed_memory()
    start = time.perf_counter()
    batched_again = masked_pair_scores(scorer, pairs)
    batched_seconds_after = time.perf_counter() - start
    assert batched_again == batched, "the batched scorer is not deterministic"

    max_diff = max(abs(a - b) for pair_a, pair_b in zip(batched, reference) for a, b in zip(pair_a, pair_b))
    rounded = [[(round(a, 3), round(b, 3)) for a, b in scores] for scores in (batched, reference)]
    rounded_same = sum(a == b for a, b in zip(*rounded))
    wins_same = sum(prefers_stereotype(*a) == prefers_stereotype(*b) for a, b in zip(*rounded))
    pct = pct_stereotype(rounded[0])
    mib = 1024 * 1024
    n_forwards = sum(2 * max(0, len(shared_token_positions(*(scorer.encode(s)["input_ids"] for s in pair))[0]) - 2)
                     for pair in pairs)
    print(f"masked forwards (reference): {n_forwards}")
    batched_mean = (batched_seconds + batched_seconds_after) / 2
    print(f"batched scorer:   {batched_seconds:8.1f} s before, {batched_seconds_after:.1f} s after the reference "
          f"(mean {batched_mean:.1f} s)")
    print(f"batched scorer:   {batched_seconds:8.1f} s   peak RSS {batched_memory.peak / mib:7.0f} MiB "
          f"(+{(batched_memory.peak - batched_memory.start) / mib:.0f} MiB over phase start)")
    print(f"per-token loop:   {reference_seconds:8.1f} s   peak RSS {reference_memory.peak / mib:7.0f} MiB "
          f"(+{(reference_memory.peak - reference_memory.start) / mib:.0f} MiB over phase start)")
    print(f"speed-up:         {reference_seconds / batched_mean:8.1f} x (reference / mean batched); "
          f"{reference_seconds / max(batched_seconds, batched_seconds_after):.1f} x against the slower batched run")
    print(f"max |score diff| before rounding: {max_diff:.2e}")
    print(f"pairs with identical rounded scores: {rounded_same}/{len(pairs)}; identical wins: {wins_same}/{len(pairs)}; "
          f"all identical: {rounded_same == wins_same == len(pairs)}")
    if on_gpu:
        print(f"GPU peak allocated: batched {batched_gpu_mib:.0f} MiB, per-token loop {reference_gpu_mib:.0f} MiB")
    print(f"pct_stereotype (random tiny model): {pct:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "pairs": len(pairs), "device": device_name, "batch_tokens": args.batch_tokens,
            "model": f"BERT 4 layers, hidden 256, {args.heads} heads, feed-forward {args.intermediate}",
            "masked_forwards_reference": n_forwards,
            "batched_seconds": [batched_seconds, batched_seconds_after], "reference_seconds": reference_seconds,
            "speedup_vs_mean_batched": reference_seconds / batched_mean,
            "peak_rss_mib": {"batched": batched_memory.peak / mib, "reference": reference_memory.peak / mib},
            "gpu_peak_allocated_mib": {"batched": batched_gpu_mib, "reference": reference_gpu_mib} if on_gpu else None,
            "max_abs_score_diff": max_diff, "identical_rounded_scores": rounded_same, "identical_wins": wins_same,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
