"""Every training-time tool under DDP and FSDP2 (two gloo processes on CPU) gives what the
same training gives in one process; where a combination cannot work, a clear error.

One launch runs every recipe of ``distributed_training.RECIPES`` in every mode on two
forked ranks; the one-process results are computed here. The MLP's hidden channels own a
row of the first weight and a column of the second, which FSDP2 splits across the two
ranks, so their norms only come out right when summed over the ranks.
"""
import pytest
import torch
import torch.distributed as dist

import distributed_training as D

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TOOLS = [n for n in D.RECIPES if not n.startswith("plain")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ranks = D.run_ranks([(n, m) for n in D.RECIPES for m in D.MODES], str(tmp_path_factory.mktemp("ranks")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits (20x slower on a busy CI)
    try:
        single = {n: D.train(n, "single") for n in D.RECIPES}
    finally:
        torch.set_num_threads(threads)
    return single, ranks


def assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, w in want.items():
        g = got[key]
        assert g.shape == w.shape, f"{what} {key}"
        # float64 models: only the order of the sums differs; the L0 gates are float32
        tol = 1e-6 if w.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
        assert torch.allclose(g.double(), w.double(), rtol=tol, atol=tol), \
            f"{what} {key}: max difference {(g.double() - w.double()).abs().max():.3g}"


@pytest.mark.parametrize("mode", D.MODES)
@pytest.mark.parametrize("name", TOOLS)
def test_tool_equals_one_process(runs, name, mode):
    single, ranks = runs
    recipe = D.RECIPES[name]
    must_fail = (mode == "fsdp_after" and (recipe.structural or recipe.unsharded_build)) or \
        (mode == "fsdp_before" and recipe.stale_before)
    for rank, results in enumerate(ranks):
        got = results[(name, mode)]
        assert "failure" not in got, got.get("failure")
        if must_fail:  # raised before the first step, naming fully_shard and the way out
            assert "error" in got, f"rank {rank}: {name} should refuse {mode}"
            assert "fully_shard" in got["error"] and ("before" in got["error"] or "unsharded" in got["error"]
                                                      or "after fully_shard" in got["error"]), got["error"]
            continue
        assert "error" not in got, got.get("error")
        assert_close(got["state"], single[name]["state"], f"rank {rank} {mode} state")
        assert_close(got["report"], single[name]["report"], f"rank {rank} {mode} report")
        if mode.startswith("fsdp") and got["finish_error"] is not None:  # finishing needs the whole model
            assert "full_state_dict" in got["finish_error"], got["finish_error"]
        else:
            assert got["finish_error"] is None, got["finish_error"]


@pytest.mark.parametrize("name", TOOLS)
def test_tool_changes_training(runs, name):
    """Equal results prove something only if the tool did something."""
    single, _ = runs
    plain = single["plain_convnet" if D.RECIPES[name].model is D.convnet else "plain_mlp"]["state"]
    state = single[name]["state"]
    if state.keys() != plain.keys():  # parametrized or gated: the structure changed
        return
    assert max(float((state[k] - plain[k]).abs().max()) for k in plain) > 1e-3
