"""Data-parallel compression: `torchrun` with 2 gloo processes on CPU gives the single-process student."""

import json
import os
import subprocess
import sys

import torch
from tiny import SAMPLE_TEXT

from lillama_core.cli import main
from lillama_core.export import load_compressed, read_record
from lillama_core.runtime.distributed import Parallel


def compress_args(model_dir, calibration, out):
    # 30 training sequences in batches of 4: the last batch has 2 rows, one per process.
    return ["compress", "--runs-dir", str(out.parent / f"runs-{out.name}"), "--model", str(model_dir),
            "--calibration", str(calibration), "--tokens", "1024", "--seq-len", "32", "--batch-size", "4",
            "--strategy", "uniform", "--rank", "12", "--init", "whitened", "--lr", "3e-3", "--device", "cpu",
            "--no-eval", "--json", "--out", str(out)]


def test_every_rank_gets_its_share_of_every_batch():
    batches = [slice(0, 4), slice(4, 8), slice(8, 10), slice(10, 11)]
    shares = [Parallel(rank, 2).shard(batches) for rank in (0, 1)]
    (index0, local0, totals), (index1, local1, _) = shares
    assert sorted(index0.tolist() + index1.tolist()) == list(range(11))
    assert index0.tolist() == [0, 1, 4, 5, 8] and index1.tolist() == [2, 3, 6, 7, 9, 10]
    assert [s.stop - s.start for s in local0] == [2, 2, 1, 0]  # an empty share still joins every step
    assert totals == [4, 4, 2, 1]


def test_two_gloo_processes_match_one_process(tiny_model_dir, tmp_path, capsys):
    calibration = tmp_path / "calib.txt"
    calibration.write_text(SAMPLE_TEXT * 20)
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(compress_args(tiny_model_dir, calibration, single)) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "lillama_core.cli", *compress_args(tiny_model_dir, calibration, double)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["out"] == str(double)  # only rank 0 reports and exports
    assert len(list((tmp_path / "runs-double").iterdir())) == 1

    one, two = read_record(single), read_record(double)
    assert one["rank_map"] == two["rank_map"]
    steps = [layer["best_step"] for layer in one["layers"]]
    assert steps == [layer["best_step"] for layer in two["layers"]] and max(steps) > 0  # training moved
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert abs(a["best_loss"] - b["best_loss"]) <= 1e-3 * a["best_loss"]
        assert a["best_loss"] < a["init_loss"]
    ids = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    (model_one, _), (model_two, _) = load_compressed(single), load_compressed(double)
    with torch.no_grad():
        torch.testing.assert_close(model_two(input_ids=ids).logits, model_one(input_ids=ids).logits,
                                   rtol=2e-3, atol=2e-3)
