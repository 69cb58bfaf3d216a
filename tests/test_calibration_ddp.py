"""Calibration across processes: two gloo ranks, each scoring its share of the batches,
give every rank the scores and masks one process computes."""

import copy
import datetime
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxprune
from fxprune.select.branch_score import score_branches
from fxprune.select.calibration import as_calibration
from fxprune.select.distributed import all_reduce_sums, on_rank_zero
from fxprune.select.score import score_groups
from fxprune.sparsity.calibrated import apply_nm_calibrated
from gloo_ranks import launch

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


class Net(nn.Module):
    """An MLP with a residual block: channel groups, a branch, and Linear layers for N:M."""

    def __init__(self):
        super().__init__()
        self.stem, self.up, self.down, self.head = nn.Linear(16, 32), nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 8)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.down(torch.relu(self.up(x)))
        return self.head(x)


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 16, generator=generator) for _ in range(count)]


def scores(count: int) -> dict:
    """Every calibrated result this test compares, computed the same way in every process."""
    model = net()
    graph = fxprune.analyze(model, torch.randn(2, 16))
    out = {f"{method}/{count}": score_groups(graph, method, calibration=batches(count))
           for method in ("activation", "taylor")}
    out[f"output_norm/{count}"] = score_branches(graph, "output_norm", calibration=as_calibration(batches(count)))
    for method in ("activation", "sparsegpt"):
        masked = copy.deepcopy(model)
        apply_nm_calibrated(masked, 2, 4, score=method, calibration=batches(count))
        out[f"nm-{method}/{count}"] = {name: p.detach().clone() for name, p in masked.state_dict().items()}
    return out


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fail, never hang
    try:
        result = {**scores(5), **scores(1)}  # 3 + 2 batches, then one rank without a batch
        result["timed_on"] = on_rank_zero(lambda: rank)
        result["union"] = all_reduce_sums({f"only-{rank}": torch.ones(2)})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def close(a, b, atol: float = 1e-6) -> bool:
    """Equal to float tolerance (a sum over ranks adds in another order); masks exactly."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], atol) for k in a)
    a, b = (torch.as_tensor(np.asarray(v, dtype=float)) if not isinstance(v, torch.Tensor) else v for v in (a, b))
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=1e-5, atol=atol)


def test_two_ranks_score_as_one_process(tmp_path):
    (tmp_path / "errors").mkdir()
    launch(worker, (str(tmp_path),), str(tmp_path / "errors"), world=2, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    alone = {**scores(5), **scores(1)}
    for result in ranks:
        for key, expected in alone.items():
            # SparseGPT's inverse Hessian amplifies the float32 rounding of the summed Gram matrix
            assert close(result[key], expected, 1e-5 if "sparsegpt" in key else 1e-6), key
        assert result["timed_on"] == 0  # rank 0 timed, rank 1 took its result
        assert set(result["union"]) == {"only-0", "only-1"}
    # the scores are not trivially equal: the batches matter
    assert not close(alone["activation/5"], alone["activation/1"])
    masks = alone["nm-sparsegpt/5"]["up.parametrizations.weight.original"]
    assert not torch.equal(masks, net().up.weight.detach())  # sparsegpt moved the kept weights
