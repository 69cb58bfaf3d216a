"""Scores that use data: the ``activation`` score, ``taylor`` over calibration batches,
``spec.calibration`` and ``fxprune compress --calibration``."""
from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.cli import main
from fxprune.errors import SpecError
from fxprune.select.score import score_groups
from fxprune.spec import Spec

DEAD = 3  # the hidden channel whose input activations are zero


def _mlp() -> nn.Module:
    """Linear(4, 8) -> ReLU -> Linear(8, 2); hidden channel DEAD never fires on positive
    inputs (its row is very negative) but has the largest weights of all."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        net[0].weight.abs_()  # every other channel fires on positive inputs
        net[0].bias.fill_(0.1)
        net[0].weight[DEAD] = -10.0
        net[0].bias[DEAD] = -1.0
        net[2].weight[:, DEAD] = 100.0
    return net


def _positive(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) + 0.1


def _hidden_group(graph, consumer: str):
    (group,) = [g for g in graph.prunable_groups if consumer in g.consumers]
    return group


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before, training):
    after = model.state_dict()
    return (before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
            and [m.training for m in model.modules()] == training)


@pytest.fixture(scope="module")
def llama():
    from hf_models import tiny_models
    model, inputs, _ = tiny_models()["llama"]
    return model, inputs


def _batches(inputs, n):
    """n batches shaped like ``inputs``."""
    return [{"input_ids": torch.randint(0, 100, inputs["input_ids"].shape,
                                        generator=torch.Generator().manual_seed(i))} for i in range(n)]


# ---------------------------------------------------------------- activation score


def test_activation_ignores_what_padding_tokens_hold():
    """Two batches with the same real tokens and different padding ids (attention_mask 0)
    give the same scores: padded positions say nothing about a channel."""
    from hf_models import tiny_models

    model, inputs, _ = tiny_models()["bert"]
    graph = fxprune.analyze(model, inputs)
    ids, mask = inputs["input_ids"].clone(), torch.ones_like(inputs["input_ids"])
    mask[:, 5:] = 0
    scores = []
    for pad in (0, 7):
        batch = {"input_ids": torch.where(mask.bool(), ids, pad), "attention_mask": mask}
        scores.append(score_groups(graph, "activation", calibration=[batch]))
    assert scores[0].keys() == scores[1].keys()
    for gid in scores[0]:
        np.testing.assert_allclose(scores[0][gid], scores[1][gid], rtol=1e-5)


def test_activation_ranks_a_silent_channel_lowest_despite_large_weights_fx():
    net = _mlp().train()
    before, training = _state(net), [m.training for m in net.modules()]
    graph = fxprune.analyze(net, _positive(2, 4, seed=0))
    assert graph.capture == "fx"
    group = _hidden_group(graph, "2.weight[1]")
    batches = [_positive(5, 4, seed=1), _positive(3, 4, seed=2)]
    magnitude = score_groups(graph, "magnitude")[group.id]
    scores = score_groups(graph, "activation", calibration=batches)[group.id]
    assert magnitude.argmax() == DEAD  # by weights alone it is the most important
    assert scores[DEAD] == 0 and np.argsort(scores)[0] == DEAD and (np.delete(scores, DEAD) > 0).all()
    # the definition, from the user's own model: sum_i |W2[i, j]| * ||X_j|| over every batch
    with torch.no_grad():
        hidden = torch.cat([net[1](net[0](x)) for x in batches])
    expected = net[2].weight.detach().abs().sum(0) * hidden.norm(dim=0)
    assert np.allclose(scores, expected.double().numpy(), rtol=1e-5)
    assert _unchanged(net, before, training)  # eval mode was only borrowed


def test_activation_ranks_a_silent_channel_lowest_on_an_exported_llama(llama):
    model, inputs = llama
    model = copy.deepcopy(model)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():  # up_proj row 5 is zero: down_proj's input 5 is act(gate) * 0 = 0
        mlp.up_proj.weight[5] = 0.0
        mlp.gate_proj.weight[5] = 5.0
        mlp.down_proj.weight[:, 5] = 5.0
    before, training = _state(model), [m.training for m in model.modules()]
    graph = fxprune.analyze(model, inputs, capture="export")
    assert graph.capture == "export"
    group = _hidden_group(graph, "model.layers.0.mlp.down_proj.weight[1]")
    notes = []
    scores = score_groups(graph, "activation", calibration=_batches(inputs, 2), notes=notes)
    assert score_groups(graph, "magnitude")[group.id].argmax() == 5
    assert scores[group.id][5] == 0 and (np.delete(scores[group.id], 5) > 0).all()
    heads = _hidden_group(graph, "model.layers.0.self_attn.o_proj.weight[1]")
    assert scores[heads.id].shape == (heads.size,) and (scores[heads.id] > 0).all()  # heads are observed
    assert not any("magnitude" in n for n in notes), notes  # every consumer is an aten.linear
    assert _unchanged(model, before, training)


def test_activation_falls_back_to_magnitude_with_a_note_for_unobserved_groups():
    class Mixed(nn.Module):  # the hidden channels are read by `x @ parameter`, not by a layer's input
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 6)
            self.mix = nn.Parameter(torch.randn(6, 2))

        def forward(self, x):
            return torch.relu(self.lin(x)) @ self.mix

    graph = fxprune.analyze(Mixed(), torch.randn(2, 4))
    (group,) = graph.prunable_groups
    notes = []
    scores = score_groups(graph, "activation", calibration=[torch.randn(2, 4)], notes=notes)
    assert np.array_equal(scores[group.id], score_groups(graph, "magnitude")[group.id])
    # mix consumes the hidden channels (x @ mix binds it like a linear layer's weight)
    assert notes == [f"score: group {group.id} (lin.weight[0]) has units whose consuming layers "
                     "(linear/conv inputs) were not observed; scored by magnitude instead of activation"]


def test_activation_needs_calibration_and_names_the_field():
    graph = fxprune.analyze(_mlp(), torch.randn(2, 4))
    with pytest.raises(SpecError, match=r"^spec\.calibration: score='activation' needs calibration"):
        score_groups(graph, "activation")


# ---------------------------------------------------------------- taylor


def _signed_taylor(net, batch, loss_fn):
    """Per hidden unit: sum of w * dL/dw over W1's row, b1's entry and W2's column."""
    net = copy.deepcopy(net).eval()
    loss_fn(net(batch)).backward()
    p = {k: (v * v.grad).detach() for k, v in net.named_parameters()}
    return (p["0.weight"].sum(1) + p["0.bias"] + p["2.weight"].sum(0)).double().numpy()


def test_taylor_over_batches_is_the_sum_of_single_batch_products():
    net = _mlp()
    target = torch.tensor([1.0, -2.0])

    def loss_fn(out):
        return F.mse_loss(out, target.expand_as(out))

    batches = [torch.randn(4, 4, generator=torch.Generator().manual_seed(s)) for s in (3, 4, 5)]
    graph = fxprune.analyze(net, batches[0])
    group = _hidden_group(graph, "2.weight[1]")
    notes = []
    scores = score_groups(graph, "taylor", calibration=batches, loss_fn=loss_fn, notes=notes)[group.id]
    single = [_signed_taylor(net, b, loss_fn) for b in batches]
    assert np.allclose(scores, np.abs(sum(single)), rtol=1e-5, atol=1e-12)
    assert not np.allclose(scores, sum(np.abs(s) for s in single))  # signs differ: the test can tell
    assert "on 3 calibration batch(es), loss: loss_fn" in notes[-1]
    one = score_groups(graph, "taylor", calib_inputs=(batches[0],), loss_fn=loss_fn)[group.id]
    assert np.allclose(one, np.abs(single[0]), rtol=1e-5, atol=1e-12)  # calib_inputs = one batch


def test_taylor_default_loss_is_next_token_cross_entropy_for_a_causal_lm(llama):
    model, inputs = llama
    graph = fxprune.analyze(model, inputs, capture="export")
    batches = _batches(inputs, 2)
    ids = iter([b["input_ids"] for b in batches])

    def next_token(out):
        x = next(ids)
        return F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), x[:, 1:].reshape(-1))

    notes = []
    default = score_groups(graph, "taylor", calibration=batches, notes=notes)
    explicit = score_groups(graph, "taylor", calibration=batches, loss_fn=next_token)
    assert "loss: next-token cross-entropy" in notes[-1]
    for gid, s in default.items():
        assert np.allclose(s, explicit[gid], rtol=1e-4, atol=1e-10)
    assert any(s.max() > 0 for s in default.values())


def test_taylor_default_loss_without_logits_is_half_mean_square():
    net = _mlp()
    graph = fxprune.analyze(net, torch.randn(2, 4))
    batches = [torch.randn(3, 4), torch.randn(2, 4)]
    notes = []
    default = score_groups(graph, "taylor", calibration=batches, notes=notes)
    explicit = score_groups(graph, "taylor", calibration=batches, loss_fn=lambda y: 0.5 * y.square().mean())
    assert "loss: 0.5 * mean squared output" in notes[-1]
    assert all(np.allclose(default[g], explicit[g]) for g in default)


def test_calibration_callable_and_one_shot_iterable():
    net = _mlp()
    graph = fxprune.analyze(net, torch.randn(2, 4))
    batches = [_positive(3, 4, seed=7), _positive(2, 4, seed=8)]
    listed = score_groups(graph, "activation", calibration=batches)
    for lazy in (lambda: iter(batches), (b for b in batches)):
        scores = score_groups(graph, "activation", calibration=lazy)
        assert scores.keys() == listed.keys() and all(np.allclose(listed[g], s) for g, s in scores.items())
    spec = Spec(example_inputs=(batches[0],), ratio=0.5, score="activation", calibration=iter(batches))
    assert len(list(spec.calibration.batches())) == 2
    with pytest.raises(SpecError, match=r"spec\.calibration: yielded no batch; a one-shot iterator"):
        list(spec.calibration.batches())
    with pytest.raises(SpecError, match=r"spec\.calibration: the callable must return an iterable"):
        score_groups(graph, "activation", calibration=lambda: 3)
    with pytest.raises(SpecError, match=r"spec\.calibration\[1\]: a batch is a tensor"):
        score_groups(graph, "activation", calibration=lambda: [batches[0], "text"])


# ---------------------------------------------------------------- compress end to end


@pytest.mark.parametrize("score", ["activation", "auto"])  # auto: activation, as batches are given
def test_compress_with_activation_and_calibration_fx(score):
    net = _mlp()
    before, training = _state(net), [m.training for m in net.modules()]
    x = _positive(2, 4, seed=0)
    result = fxprune.compress(net, {"example_inputs": (x,), "ratio": 0.5, "score": score,
                                    "round_to": 1, "calibration": [_positive(6, 4, seed=s) for s in (1, 2)]})
    assert (score == "auto") == any("score: auto chose activation" in n for n in result.notes)
    group = _hidden_group(result.graph, "2.weight[1]")
    assert DEAD in result.plan[group.id] and len(result.plan[group.id]) == 4
    assert result.model(x).shape == net(x).shape
    assert _unchanged(net, before, training)


@pytest.mark.parametrize("score", ["activation", "taylor"])
def test_compress_llama_with_calibration(llama, score):
    model, inputs = llama
    before = _state(model)
    result = fxprune.compress(model, {"example_inputs": inputs, "ratio": 0.5, "score": score,
                                      "capture": "export", "calibration": _batches(inputs, 2)})
    assert result.plan and result.graph.capture == "export"
    assert result.model(**inputs).logits.shape == model(**inputs).logits.shape
    if score == "taylor":
        assert any("next-token cross-entropy" in n for n in result.notes)
    assert _unchanged(model, before, [m.training for m in model.modules()])


# ---------------------------------------------------------------- spec errors


def _spec(**fields):
    base = {"example_inputs": (torch.randn(2, 4),), "ratio": 0.5, "score": "activation"}
    return Spec(**{**base, **fields})


@pytest.mark.parametrize("value, pattern", [
    ([], r"^spec\.calibration: an empty list holds no batch"),
    ([torch.randn(2, 4), 7], r"^spec\.calibration\[1\]: a batch is a tensor, a tuple of tensors or a dict"),
    (torch.randn(2, 4), r"(?s)^spec\.calibration: expected a list of batches, got Tensor.*calibration=\[batch\]"),
    ([{"x": torch.randn(2, 4)}], r"^spec\.calibration\[0\]: keyword inputs \(x\) but example_inputs are positional"),
    ([(torch.randn(2, 4), torch.randn(2, 4))], r"^spec\.calibration\[0\]: inputs .* do not match example_inputs .*count"),
    ([torch.randn(2, 3, 4)], r"^spec\.calibration\[0\]: .*number of dims"),
    (5, r"^spec\.calibration: expected a list of input batches"),
])
def test_spec_calibration_errors(value, pattern):
    with pytest.raises(SpecError, match=pattern):
        _spec(calibration=value)


def test_spec_keyword_form_must_match_keys():
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(SpecError, match=r"^spec\.calibration\[0\]: inputs input_ids=\(2, 8\) do not match .*names"):
        Spec(example_inputs={"input_ids": ids, "attention_mask": ids}, ratio=0.5, calibration=[{"input_ids": ids}])
    with pytest.raises(SpecError, match=r"^spec\.calibration\[0\]: positional inputs"):
        Spec(example_inputs={"input_ids": ids}, ratio=0.5, calibration=[ids])
    spec = Spec(example_inputs={"input_ids": ids}, ratio=0.5, calibration=[{"input_ids": ids[:1]}])
    assert [b.describe() for b in spec.calibration.batches()] == ["input_ids=(1, 8)"]


def test_spec_data_needs():
    with pytest.raises(SpecError, match=r"^spec\.calibration: score='activation' needs calibration batches"):
        _spec()
    with pytest.raises(SpecError, match=r"^spec\.calibration, spec\.calib_inputs: give one"):
        _spec(calibration=[torch.randn(2, 4)], calib_inputs=(torch.randn(2, 4),))
    with pytest.raises(SpecError, match=r"^spec\.calib_inputs, spec\.loss_fn: score='taylor' needs calibration data: calibration="):
        _spec(score="taylor")
    assert _spec(score="taylor", calibration=[torch.randn(2, 4)]).loss_fn is None  # default loss


def test_spec_calibration_file(tmp_path):
    torch.save([torch.randn(3, 4), (torch.randn(2, 4),)], tmp_path / "calib.pt")
    (tmp_path / "spec.toml").write_text('input_shape = [2, 4]\nratio = 0.5\nscore = "activation"\n'
                                        'calibration = "calib.pt"\n')
    spec = Spec.load(tmp_path / "spec.toml")  # the path is relative to the spec file
    assert [b.describe() for b in spec.calibration.batches()] == ["(3, 4)", "(2, 4)"]
    assert Spec.from_dict(spec.to_dict()).calibration.path == str(tmp_path / "calib.pt")
    with pytest.raises(SpecError, match=r"^spec\.calibration: cannot read '.*nope\.pt': no such file; save a list"):
        _spec(calibration=str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_text("not a tensor file")
    with pytest.raises(SpecError, match=r"^spec\.calibration: cannot read '.*bad\.pt' as a torch\.save file"):
        _spec(calibration=tmp_path / "bad.pt")
    torch.save({"x": torch.randn(2, 4)}, tmp_path / "dict.pt")
    with pytest.raises(SpecError, match=r"holds dict, not a list of batches"):
        _spec(calibration=tmp_path / "dict.pt")
    torch.save([torch.randn(2, 4, 4)], tmp_path / "dims.pt")
    with pytest.raises(SpecError, match=r"^spec\.calibration\[0\]: .*number of dims.*\(in .*spec\.toml\)"):
        Spec.load(tmp_path / "spec.toml", calibration=str(tmp_path / "dims.pt"), input_shape=[2, 4])


# ---------------------------------------------------------------- CLI

TINY = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
'''


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_cli_compress_with_calibration(tmp_path):
    (tmp_path / "tinynet.py").write_text(TINY)
    model = f"{tmp_path / 'tinynet.py'}:build"
    torch.save([torch.randn(2, 3, 8, 8), torch.randn(1, 3, 8, 8)], tmp_path / "calib.pt")
    out = tmp_path / "small.pt"
    code, _, err = _cli("compress", model, "--input", "1,3,8,8", "--ratio", "0.5", "--score", "activation",
                        "--round-to", "1", "--calibration", str(tmp_path / "calib.pt"), "-o", str(out), "-q")
    assert code == 0, err
    small = torch.load(out, weights_only=False)
    assert small(torch.randn(1, 3, 8, 8)).shape == (1, 4)
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)] == [8, 4]

    code, _, err = _cli("compress", model, "--input", "1,3,8,8", "--ratio", "0.5", "--score", "activation",
                        "--calibration", str(tmp_path / "missing.pt"), "-q")
    assert code == 2 and err.startswith("fxprune: error: spec.calibration: cannot read") and "torch.save" in err
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage")
    code, _, err = _cli("compress", model, "--input", "1,3,8,8", "--ratio", "0.5", "--score", "taylor",
                        "--calibration", str(tmp_path / "bad.pt"), "-q")
    assert code == 2 and "as a torch.save file" in err and len(err.strip().splitlines()) == 1
    code, _, err = _cli("compress", model, "--input", "1,3,8,8", "--ratio", "0.5", "--score", "activation", "-q")
    assert code == 2 and "--calibration FILE" in err
