"""Wall time of one compression with 1, 2, ... data-parallel processes (`torchrun`), same model and data.

Each setting runs `lillama compress` under `torch.distributed.run` in a fresh process group (gloo on CPU,
NCCL on GPUs) with a fixed number of CPU threads per process, so the processes divide the cores between
them. Every record keeps the per-layer held-out losses, to show the students agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench import log
from .common import environment


def compress_command(processes: int, model: str, tokens: int, seq_len: int, batch_size: int, reduction: float,
                     device: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "lillama_core.cli", "compress", "--model", model, "--strategy", "uniform",
            "--reduction", str(reduction), "--tokens", str(tokens), "--seq-len", str(seq_len),
            "--batch-size", str(batch_size), "--device", device, "--no-eval", "--json",
            "--runs-dir", str(out.parent / "runs"), "--out", str(out)]


def run_parallel(model: str, settings: list[tuple[int, int]], tokens: int, seq_len: int, batch_size: int,
                 reduction: float, device: str) -> list[dict]:
    """`settings`: (processes, CPU threads per process) pairs; the first is the baseline of the speed-ups."""
    import torch

    records = []
    with tempfile.TemporaryDirectory(prefix="lillama-parallel-") as tmp:
        for count, threads in settings:
            out = Path(tmp) / f"p{count}x{threads}"
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
            log(f"{model}: {count} process(es) x {threads} thread(s), {tokens} tokens")
            start = time.time()
            done = subprocess.run(compress_command(count, model, tokens, seq_len, batch_size, reduction, device, out),
                                  capture_output=True, text=True, env=env)
            wall = time.time() - start
            if done.returncode != 0:
                raise RuntimeError(f"{count} processes failed:\n{done.stderr[-2000:]}")
            summary = json.loads(done.stdout.strip().splitlines()[-1])
            layers = json.loads((out / "lillama.json").read_text())["layers"]
            records.append({
                "model": model, "device": device, "env": environment(torch.device(device)), "processes": count,
                "threads_per_process": threads, "tokens": tokens, "seq_len": seq_len, "batch_size": batch_size,
                "reduction": summary["reduction"], "wall_seconds": wall, "compress_seconds": summary["seconds"],
                "layer_best_losses": [layer["best_loss"] for layer in layers],
            })
            log(f"  {wall:.0f}s wall")
    base = records[0]["layer_best_losses"]
    for record in records:
        pairs = zip(base, record["layer_best_losses"], strict=True)
        record["max_layer_loss_rel_diff"] = max(abs(a - b) / abs(a) for a, b in pairs)
        record["speedup"] = records[0]["wall_seconds"] / record["wall_seconds"]
    return records
