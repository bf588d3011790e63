"""Distributed two-tower training (torch DDP, 2 CPU processes on gloo, sparse id tables forced on).

- one DDP step on a global batch equals the single-process step on it (in-batch negatives
  gathered from every rank, the sparse id rows averaged across ranks);
- a run stopped after epoch 2 and started again resumes from its checkpoint and ends with the
  weights of an uninterrupted run;
- ``recsys train --nproc 2`` writes one bundle whose two-tower reaches the single-process
  validation recall on a tiny synthetic world.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cli.main import main
from tests.ddp_ranks import DETERMINISTIC, one_step, rank_main

SPARSE_CONFIG = """
[retrieval]
n_candidates = 60
history_length = 10
order_by_validation = false
sources = ["two_tower", "popular", "coldstart"]

[retrieval.index]
kind = "flat"

[retrieval.two_tower]
min_interactions = 0
sparse_embeddings = true  # the tiny world is far below the automatic threshold
embedding_dim = 8
hidden_dims = [16]
output_dim = 8
max_epochs = 3
batch_size = 256
num_threads = 1

[ranking.lightgbm]
max_rounds = 10
num_threads = 1
"""
# Validation recall@100 of the two runs on the tiny world: measured 0.901 (one process) and
# 0.889 (two); the difference is the ranks' own dropout draws. The issue's bound is 0.02.
RECALL_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(
        rank_main, args=(2, str(out / "init"), str(out)), nprocs=2, start_method="spawn"
    )
    return out


def test_a_ddp_step_is_the_single_process_step_on_the_global_batch(ranks_output: Path) -> None:
    single = one_step(DETERMINISTIC, None).state_dict()
    distributed = torch.load(ranks_output / "step.pt", weights_only=True)
    for name, value in single.items():
        torch.testing.assert_close(distributed[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(ranks_output: Path) -> None:
    straight = torch.load(ranks_output / "straight.pt", weights_only=True)
    resumed = torch.load(ranks_output / "resumed.pt", weights_only=True)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    curves = json.loads((ranks_output / "curves.json").read_text())
    for key in ("train_loss", "valid_recall", "valid_loss"):
        assert [e[key] for e in curves["resumed"]["epochs"]] == [
            e[key] for e in curves["straight"]["epochs"]
        ]
    assert len(curves["resumed"]["epochs"]) == 3


def test_train_nproc_2_matches_single_process_recall(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    data, config = tiny_bundle[0], tmp_path / "config.toml"  # the suite's tiny world
    config.write_text(SPARSE_CONFIG)
    recall = {}
    for nproc in (1, 2):
        bundle = tmp_path / f"bundle{nproc}"
        args = ["train", "--data", str(data), "--out", str(bundle), "--config", str(config)]
        assert main([*args, "--nproc", str(nproc)]) == 0
        curves = json.loads((bundle / "retrieval/two_tower/curves.json").read_text())
        best = curves["epochs"][curves["best_epoch"] - 1]
        recall[nproc] = best["valid_recall"]
        assert not (tmp_path / f"bundle{nproc}.checkpoint").exists()
    assert abs(recall[2] - recall[1]) <= RECALL_TOLERANCE, recall
    assert main(["recommend", "--bundle", str(tmp_path / "bundle2"), "--all", "--now", "0",
                 "--out", str(tmp_path / "rec.csv")]) == 0  # fmt: skip
