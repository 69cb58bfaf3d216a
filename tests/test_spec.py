"""Spec: every field's valid and invalid values, every error path, loading and round trips."""
import json
import math

import pytest
import torch

from fxprune import _util
from fxprune.errors import FxpruneError, SpecError
from fxprune.spec import LatencySpec, Spec

SCORES = ("magnitude", "bn_scale", "taylor", "group_lasso", "l0")  # built in

SHAPE = [1, 3, 8, 8]


def make(**fields):
    """A valid Spec with ``fields`` changed (None removes a default goal or input)."""
    base = {"input_shape": SHAPE, "ratio": 0.5}
    base.update(fields)
    return Spec(**base)


def assert_spec_error(path, *fragments, build=None, **fields):
    """Assert that building fails with a SpecError starting with ``path:`` and holding ``fragments``."""
    with pytest.raises(SpecError) as info:
        build() if build else make(**fields)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    for fragment in fragments:
        assert fragment in message, message
    return message


def taylor_kwargs():
    return {"calib_inputs": (torch.randn(2, 3, 8, 8),), "loss_fn": lambda out: out.sum()}


# ---------------------------------------------------------------- defaults and errors


def test_defaults():
    spec = make()
    assert (spec.score, spec.scope, spec.round_to, spec.max_ratio) == ("auto", "local", 8, 0.9)
    assert (spec.ignore, spec.fuse, spec.nm, spec.seed, spec.target) == ([], True, None, 0, None)
    assert (spec.emit, spec.attention_units, spec.score_method) == ("auto", "heads", "magnitude")
    assert spec.latency == LatencySpec()
    assert (spec.example_inputs, spec.calib_inputs, spec.loss_fn) == (None, None, None)


def test_auto_score_is_activation_given_calibration_batches():
    batches = [(torch.randn(1, 3, 8, 8),), (torch.randn(1, 3, 8, 8),)]
    assert make(input_shape=[1, 3, 8, 8], calibration=batches).score_method == "activation"
    assert make(input_shape=[1, 3, 8, 8], calibration=batches, score="taylor").score_method == "taylor"


def test_ignore_default_not_shared():
    first, second = make(), make()
    first.ignore.append("fc")
    assert second.ignore == [] and first.ignore is not second.ignore
    assert first.latency is not second.latency


def test_spec_error_is_fxprune_error():
    assert issubclass(SpecError, FxpruneError)


# ---------------------------------------------------------------- inputs


def test_example_inputs_tuple_list_and_single_tensor():
    x, y = torch.randn(1, 3), torch.randn(1, 5)
    assert make(input_shape=None, example_inputs=(x, y)).example_inputs == (x, y)
    assert make(input_shape=None, example_inputs=[x]).example_inputs == (x,)
    spec = make(input_shape=None, example_inputs=x)
    assert spec.example_inputs == (x,) and spec.make_example_inputs()[0] is x


@pytest.mark.parametrize("bad", [(), [1, 2], ("a",), 3, "x"])
def test_example_inputs_invalid(bad):
    assert_spec_error("spec.example_inputs", "tensor", "input_shape", input_shape=None, example_inputs=bad)


def test_example_inputs_nest_and_name_the_bad_leaf():
    image = torch.randn(3, 8, 8)
    assert make(input_shape=None, example_inputs=([image],)).example_inputs == ([image],)
    assert_spec_error("spec.example_inputs[0]['mask']", "expected a tensor", input_shape=None,
                      example_inputs=({"mask": {1, 2}},))


@pytest.mark.parametrize("shape, shapes", [
    ([1, 3, 8, 8], [(1, 3, 8, 8)]),
    ((2, 5), [(2, 5)]),
    ([[1, 3], [1, 4, 2]], [(1, 3), (1, 4, 2)]),
])
def test_input_shape_valid(shape, shapes):
    inputs = make(input_shape=shape).make_example_inputs()
    assert [tuple(t.shape) for t in inputs] == shapes
    assert all(t.dtype == torch.float32 for t in inputs)


def test_make_example_inputs_seeded():
    first = make(seed=3).make_example_inputs()[0]
    assert torch.equal(first, make(seed=3).make_example_inputs()[0])
    assert not torch.equal(first, make(seed=4).make_example_inputs()[0])
    assert first.std() > 0.5  # normal draws, not zeros


@pytest.mark.parametrize("bad, path, fragment", [
    ([], "spec.input_shape", "non-empty list of ints"),
    ("1,3,8,8", "spec.input_shape", "got str"),
    (224, "spec.input_shape", "got int 224"),
    ([1, 0, 8], "spec.input_shape[1]", "must be an int >= 1"),
    ([1, 2.5], "spec.input_shape[1]", "got float 2.5"),
    ([True, 3], "spec.input_shape[0]", "got bool True"),
    ([[1, 3], 3], "spec.input_shape[0]", "got list [1, 3]"),
    ([[1, 3], []], "spec.input_shape[1]", "non-empty list"),
    ([[1, 3], [1, -2]], "spec.input_shape[1][1]", ">= 1"),
])
def test_input_shape_invalid(bad, path, fragment):
    assert_spec_error(path, fragment, input_shape=bad)


def test_inputs_neither_or_both():
    assert_spec_error("spec.example_inputs, spec.input_shape", "neither", input_shape=None)
    assert_spec_error("spec.example_inputs, spec.input_shape", "both", example_inputs=(torch.randn(1, 3, 8, 8),))


# ---------------------------------------------------------------- goal: ratio / target


@pytest.mark.parametrize("ratio", [0.5, 0.01, 0.9])
def test_ratio_float(ratio):
    assert make(ratio=ratio).ratio == ratio


def test_ratio_dict_keys_become_str():
    spec = make(ratio={"layer4.*": 0.5, 3: 0.25})
    assert spec.ratio == {"layer4.*": 0.5, "3": 0.25}


@pytest.mark.parametrize("bad, fragment", [
    ("half", "got str 'half'"), (True, "got bool True"), ([0.5], "got list"),
    (0, "out of range"), (1, "out of range"), (-0.1, "(0, 1)"), (1.5, "(0, 1)"), (math.nan, "out of range"),
])
def test_ratio_invalid(bad, fragment):
    assert_spec_error("spec.ratio", fragment, ratio=bad)


def test_ratio_dict_invalid():
    assert_spec_error("spec.ratio", "empty dict", ratio={})
    assert_spec_error("spec.ratio", "got tuple", ratio={("a",): 0.5})
    assert_spec_error("spec.ratio", "got bool", ratio={True: 0.5})
    assert_spec_error("spec.ratio['conv*']", "got str 'x'", ratio={"conv*": "x"})
    assert_spec_error("spec.ratio['fc']", "(0, 1)", ratio={"conv*": 0.5, "fc": 1.0})


def test_ratio_above_max_ratio():
    assert_spec_error("spec.ratio", "exceeds spec.max_ratio=0.9", ratio=0.95)
    assert_spec_error("spec.ratio['fc']", "raise max_ratio", ratio={"fc": 0.6}, max_ratio=0.5)
    assert make(ratio=0.95, max_ratio=1.0).ratio == 0.95


@pytest.mark.parametrize("metric", ["flops", "params", "latency"])
@pytest.mark.parametrize("value", [0.5, 1, 1.0, 0.001])
def test_target_valid(metric, value):
    spec = make(ratio=None, target={metric: value})
    assert spec.target == {metric: float(value)} and isinstance(spec.target[metric], float)


def test_target_impossible_message():
    message = assert_spec_error("spec.target.flops", ratio=None, target={"flops": 1.5})
    assert "target.flops=1.5 is impossible: it must be in (0, 1], the fraction of the original FLOPs to keep" in message
    assert_spec_error("spec.target.params", "parameters to keep", ratio=None, target={"params": 0})
    assert_spec_error("spec.target.latency", "latency to keep", ratio=None, target={"latency": -0.5})


@pytest.mark.parametrize("bad, path, fragment", [
    ({}, "spec.target", "exactly one key among flops, params, latency"),
    ({"flops": 0.5, "params": 0.5}, "spec.target", "exactly one key"),
    (0.5, "spec.target", "got float 0.5"),
    ({"flop": 0.5}, "spec.target.flop", "did you mean 'flops'?"),
    ({"energy": 0.5}, "spec.target.energy", "unknown metric"),
    ({"flops": "half"}, "spec.target.flops", "got str 'half'"),
    ({"flops": True}, "spec.target.flops", "got bool"),
])
def test_target_invalid(bad, path, fragment):
    assert_spec_error(path, fragment, ratio=None, target=bad)


def test_goal_neither_or_both():
    assert_spec_error("spec.ratio, spec.target", "neither", "ratio (", "target (", ratio=None)
    assert_spec_error("spec.ratio, spec.target", "both", target={"flops": 0.5})


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("score", SCORES)
def test_score_valid(score):
    extra = taylor_kwargs() if score == "taylor" else {}
    assert make(score=score, **extra).score == score


def test_score_invalid():
    message = assert_spec_error("spec.score", "got str 'magnitud'", "did you mean 'magnitude'?", score="magnitud")
    assert all(repr(s) in message for s in SCORES)
    assert_spec_error("spec.score", "got NoneType None", score=None)


@pytest.mark.parametrize("scope", ["global", "local", "latency"])
def test_scope_valid(scope):
    assert make(scope=scope).scope == scope


@pytest.mark.parametrize("bad", ["globl", "layer", 1])
def test_scope_invalid(bad):
    assert_spec_error("spec.scope", "'global', 'local', 'latency'", scope=bad)


@pytest.mark.parametrize("value", [1, 8, 64])
def test_round_to_valid(value):
    assert make(round_to=value).round_to == value


@pytest.mark.parametrize("bad, fragment", [
    (0, "must be an int >= 1, got 0"), (-8, ">= 1"), (2.5, "got float 2.5"),
    (True, "got bool True"), ("8", "got str '8'"),
])
def test_round_to_invalid(bad, fragment):
    assert_spec_error("spec.round_to", fragment, round_to=bad)


@pytest.mark.parametrize("value", [1, 1.0, 0.5, 0.01])
def test_max_ratio_valid(value):
    spec = make(max_ratio=value, ratio=0.005)
    assert spec.max_ratio == value and isinstance(spec.max_ratio, float)


@pytest.mark.parametrize("bad, fragment", [
    (0, "(0, 1]"), (1.5, "out of range"), (-1, "(0, 1]"), ("0.9", "got str"), (True, "got bool"),
])
def test_max_ratio_invalid(bad, fragment):
    assert_spec_error("spec.max_ratio", fragment, max_ratio=bad)


def test_ignore_valid():
    assert make(ignore=["fc", "layer4.*"]).ignore == ["fc", "layer4.*"]
    spec = make(ignore=("fc",))
    assert spec.ignore == ["fc"] and isinstance(spec.ignore, list)


@pytest.mark.parametrize("bad", ["layer1.*", ["fc", 1], None, {"fc": 1}])
def test_ignore_invalid(bad):
    assert_spec_error("spec.ignore", "list of module-name patterns", ignore=bad)


def test_ignore_empty_tuple():
    assert make(ignore=()).ignore == []


@pytest.mark.parametrize("value", [True, False])
def test_fuse_valid(value):
    assert make(fuse=value).fuse is value


@pytest.mark.parametrize("bad", ["yes", 1, 0, None])
def test_fuse_invalid(bad):
    assert_spec_error("spec.fuse", "expected a bool", fuse=bad)


@pytest.mark.parametrize("value, normal, pair", [("2:4", "2:4", (2, 4)), (" 1 : 8 ", "1:8", (1, 8)), ("3:4", "3:4", (3, 4))])
def test_nm_valid(value, normal, pair):
    spec = make(nm=value)
    assert spec.nm == normal and spec.nm_pair == pair
    assert make().nm_pair is None


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "2:2", "a:b", "2:4:8", "", 2, (2, 4), True])
def test_nm_invalid(bad):
    assert_spec_error("spec.nm", "'N:M'", "0 < N < M", nm=bad)


@pytest.mark.parametrize("value", [0, 1, 12345])
def test_seed_valid(value):
    assert make(seed=value).seed == value


@pytest.mark.parametrize("bad, fragment", [(-1, ">= 0"), (True, "got bool"), (1.5, "got float"), ("0", "got str")])
def test_seed_invalid(bad, fragment):
    assert_spec_error("spec.seed", fragment, seed=bad)


# ---------------------------------------------------------------- latency


def test_latency_from_dict_and_object():
    spec = make(latency={"device": "cuda", "batch_size": 8, "threads": 4, "warmup": 0,
                         "repeats": 1, "compile": True})
    assert spec.latency == LatencySpec("cuda", 8, 4, 0, 1, True)
    given = LatencySpec(repeats=50)
    assert make(latency=given).latency is given
    assert LatencySpec() == LatencySpec("cpu", None, 2, 5, 20, False)


@pytest.mark.parametrize("field, bad, fragment", [
    ("device", "gpu", "'cpu', 'cuda'"), ("device", "cude", "did you mean 'cuda'?"), ("device", None, "got NoneType"),
    ("batch_size", 0, ">= 1"), ("batch_size", 2.0, "got float"), ("batch_size", True, "got bool"),
    ("threads", 0, ">= 1"), ("threads", "2", "got str"),
    ("warmup", -1, ">= 0"), ("warmup", False, "got bool"),
    ("repeats", 0, ">= 1"), ("repeats", 1.5, "got float"),
    ("compile", "no", "expected a bool"), ("compile", 1, "got int"),
])
def test_latency_invalid(field, bad, fragment):
    assert_spec_error(f"spec.latency.{field}", fragment, latency={field: bad})
    assert_spec_error(f"latency.{field}", fragment, build=lambda: LatencySpec(**{field: bad}))


def test_latency_spec_is_the_measuring_settings():
    """One class: the spec's section is what measure_latency, budgets and the CLI take."""
    from fxprune.budget import Budget
    from fxprune.measure import LatencySettings

    assert LatencySpec is LatencySettings
    spec = make(latency={"device": "cuda:1", "compile": True, "compile_backend": "eager"})
    assert spec.latency == LatencySettings("cuda:1", compile=True, compile_backend="eager")
    budget = Budget.from_dict({"max_latency_ms": 5, "latency": {"device": "cuda:0", "threads": 1, "compile": True}})
    assert budget.latency == LatencySettings("cuda:0", threads=1, compile=True)


@pytest.mark.parametrize("bad", ["cuda:x", "cuda:", "cpu:0", "tpu"])
def test_latency_device_rejected_everywhere_alike(bad):
    from fxprune.budget import Budget, BudgetError

    message = assert_spec_error("spec.latency.device", "'cpu', 'cuda' or 'cuda:N'", latency={"device": bad})
    with pytest.raises(BudgetError) as info:
        Budget.from_dict({"max_latency_ms": 5, "latency": {"device": bad, "threads": 1}})
    assert str(info.value) == "budget." + message.removeprefix("spec.")


def test_latency_unknown_field_and_type():
    message = assert_spec_error("spec.latency.repets", "unknown field 'repets'", "did you mean 'repeats'?", latency={"repets": 3})
    assert "device, batch_size, threads, warmup, repeats, compile" in message
    assert_spec_error("spec.latency", "got str 'cpu'", latency="cpu")


# ---------------------------------------------------------------- taylor


def test_taylor_needs_calib_inputs_and_loss_fn():
    message = assert_spec_error("spec.calib_inputs, spec.loss_fn", "score='taylor'", score="taylor")
    assert "calib_inputs=(x,)" in message and "loss_fn=fn" in message and "Spec.load(" in message
    assert_spec_error("spec.loss_fn", "score='taylor'", score="taylor", calib_inputs=(torch.randn(1, 3),))
    assert_spec_error("spec.calib_inputs", "score='taylor'", score="taylor", loss_fn=lambda out: out.sum())
    spec = make(score="taylor", **taylor_kwargs())
    assert isinstance(spec.calib_inputs, tuple) and callable(spec.loss_fn)


def test_taylor_fields_invalid():
    assert_spec_error("spec.calib_inputs", "holds no tensor", calib_inputs=[1, 2])
    assert_spec_error("spec.loss_fn", "expected a callable", loss_fn="mse")
    assert make(calib_inputs=torch.randn(1, 3)).calib_inputs[0].shape == (1, 3)  # wrapped


# ---------------------------------------------------------------- from_dict / load


def test_from_dict_valid_and_overrides():
    spec = Spec.from_dict({"input_shape": SHAPE, "target": {"params": 0.5}, "latency": {"repeats": 3}})
    assert spec.target == {"params": 0.5} and spec.latency.repeats == 3
    spec = Spec.from_dict({"input_shape": SHAPE, "score": "taylor", "ratio": 0.3}, **taylor_kwargs())
    assert spec.score == "taylor"
    assert Spec.from_dict({"input_shape": SHAPE, "ratio": 0.3}, ratio=0.1).ratio == 0.1


def test_from_dict_unknown_field():
    message = assert_spec_error("spec.rato", "unknown field 'rato'", "did you mean 'ratio'?",
                    build=lambda: Spec.from_dict({"input_shape": SHAPE, "rato": 0.5}))
    assert "input_shape, ratio, target" in message
    assert_spec_error("spec.zzz", "unknown field", build=lambda: Spec.from_dict({"input_shape": SHAPE, "ratio": 0.5}, zzz=1))
    message = assert_spec_error("spec.banana", "unknown field", build=lambda: Spec.from_dict({"banana": 1}))
    assert "did you mean" not in message


@pytest.mark.parametrize("bad", [[("ratio", 0.5)], "ratio=0.5", None])
def test_from_dict_not_a_mapping(bad):
    assert_spec_error("spec", "expected a table/dict", build=lambda: Spec.from_dict(bad))


def test_load_spec_and_dict():
    spec = make()
    assert Spec.load(spec) is spec
    changed = Spec.load(spec, round_to=16)
    assert changed.round_to == 16 and spec.round_to == 8
    assert_spec_error("spec.round_too", "did you mean 'round_to'?", build=lambda: Spec.load(spec, round_too=8))
    assert_spec_error("spec.round_to", "got float", build=lambda: Spec.load(spec, round_to=8.0))
    assert Spec.load({"input_shape": SHAPE, "ratio": 0.2}).ratio == 0.2


@pytest.mark.parametrize("bad", [3, None, b"spec.toml"])
def test_load_wrong_source_type(bad):
    assert_spec_error("spec", "expected a Spec, a dict or a .toml/.json path", build=lambda: Spec.load(bad))


TOML = """
input_shape = [1, 3, 8, 8]
score = "bn_scale"
scope = "local"
round_to = 8
max_ratio = 0.75
ignore = ["fc", "layer4.*"]
fuse = false
nm = "2:4"
seed = 7

[target]
flops = 0.5

[latency]
device = "cpu"
threads = 1
repeats = 3
"""


def check_loaded(spec):
    assert spec.input_shape == SHAPE and spec.target == {"flops": 0.5}
    assert (spec.score, spec.scope, spec.round_to, spec.max_ratio) == ("bn_scale", "local", 8, 0.75)
    assert (spec.ignore, spec.fuse, spec.nm, spec.seed) == (["fc", "layer4.*"], False, "2:4", 7)
    assert spec.latency == LatencySpec(threads=1, repeats=3)


def test_load_toml(tmp_path):
    path = tmp_path / "prune.toml"
    path.write_text(TOML)
    check_loaded(Spec.load(path))
    check_loaded(Spec.load(str(path)))


def test_load_json(tmp_path):
    path = tmp_path / "prune.json"
    path.write_text(json.dumps(make(**{"ratio": None, "target": {"flops": 0.5}, "score": "bn_scale",
                                        "scope": "local", "round_to": 8, "max_ratio": 0.75,
                                        "ignore": ["fc", "layer4.*"], "fuse": False, "nm": "2:4",
                                        "seed": 7, "latency": {"threads": 1, "repeats": 3}}).to_dict()))
    check_loaded(Spec.load(path))


def test_load_pyproject(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\n\n[tool.fxprune.compress]\ninput_shape = [1, 8]\nratio = 0.25\n'
                    "\n[tool.fxprune.compress.latency]\nrepeats = 2\n")
    spec = Spec.load(path)
    assert spec.input_shape == [1, 8] and spec.ratio == 0.25 and spec.latency.repeats == 2


@pytest.mark.parametrize("text", ['[project]\nname = "x"\n', "[tool.fxprune]\nother = 1\n", "[tool.black]\nline-length = 99\n"])
def test_load_pyproject_without_table(tmp_path, text):
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    assert_spec_error("spec", "no [tool.fxprune.compress] table", str(path), build=lambda: Spec.load(path))


def test_load_taylor_from_file_with_overrides(tmp_path):
    path = tmp_path / "prune.toml"
    path.write_text('input_shape = [1, 3, 8, 8]\nratio = 0.5\nscore = "taylor"\n')
    assert_spec_error("spec.calib_inputs, spec.loss_fn", str(path), build=lambda: Spec.load(path))
    assert Spec.load(path, **taylor_kwargs()).score == "taylor"


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    assert_spec_error("spec", "not found", str(path), build=lambda: Spec.load(path))
    assert_spec_error("spec", "not found", build=lambda: Spec.load(tmp_path / "nope.json"))
    (tmp_path / "dir.toml").mkdir()
    assert_spec_error("spec", "not found", build=lambda: Spec.load(tmp_path / "dir.toml"))


def test_load_unparsable(tmp_path):
    toml_path = tmp_path / "bad.toml"
    toml_path.write_text("ratio = = 0.5\n")
    message = assert_spec_error("spec", "cannot parse", str(toml_path), build=lambda: Spec.load(toml_path))
    assert "line 1" in message  # the parser's own message
    json_path = tmp_path / "bad.json"
    json_path.write_text('{"ratio": 0.5,}')
    message = assert_spec_error("spec", "cannot parse", str(json_path), build=lambda: Spec.load(json_path))
    assert "line 1 column" in message
    bin_path = tmp_path / "bin.json"
    bin_path.write_bytes(b"\xff\xfe\x00")
    assert_spec_error("spec", "cannot parse", build=lambda: Spec.load(bin_path))


def test_load_toml_without_tomllib(tmp_path, monkeypatch):
    monkeypatch.setattr(_util, "tomllib", None)  # Python 3.10 has no tomllib
    path = tmp_path / "prune.toml"
    path.write_text(TOML)
    assert_spec_error("spec", "Python >= 3.11", "use JSON", build=lambda: Spec.load(path))


def test_load_unsupported_suffix(tmp_path):
    path = tmp_path / "prune.yaml"
    path.write_text("ratio: 0.5\n")
    assert_spec_error("spec", "expected a .toml or .json file", build=lambda: Spec.load(path))


def test_load_json_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    assert_spec_error("spec", "expected a table/dict", build=lambda: Spec.load(path))


def test_load_invalid_value_names_field_and_file(tmp_path):
    path = tmp_path / "prune.toml"
    path.write_text("input_shape = [1, 8]\nratio = 0.5\nround_to = 2.5\n[latency]\nrepets = 1\n")
    assert_spec_error("spec.round_to", "got float 2.5", str(path), build=lambda: Spec.load(path))
    path.write_text("input_shape = [1, 8]\nratio = 0.5\n[latency]\nrepets = 1\n")
    assert_spec_error("spec.latency.repets", "did you mean 'repeats'?", str(path), build=lambda: Spec.load(path))
    path.write_text("example_inputs = [[1.0, 2.0]]\nratio = 0.5\n")
    assert_spec_error("spec.example_inputs", "give spec.input_shape instead", build=lambda: Spec.load(path))


# ---------------------------------------------------------------- to_dict round trip


@pytest.mark.parametrize("fields", [
    {},
    {"ratio": {"layer4.*": 0.5, "3": 0.2}, "ignore": ["fc"], "nm": "1:4", "seed": 9},
    {"ratio": None, "target": {"latency": 0.7}, "latency": {"device": "cuda", "batch_size": 4, "compile": True}},
    {"input_shape": [[1, 3], [1, 5, 2]], "scope": "local", "round_to": 16, "max_ratio": 1.0, "fuse": False},
])
def test_round_trip(fields):
    spec = make(**fields)
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Spec.from_dict(data) == spec
    assert Spec.from_dict(json.loads(json.dumps(data))).to_dict() == data


def test_round_trip_through_files(tmp_path):
    spec = make(ratio=None, target={"params": 0.4}, ignore=["fc"], latency={"batch_size": 2})
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert Spec.load(path) == spec


def test_to_dict_leaves_out_tensors_and_callables():
    spec = make(input_shape=None, example_inputs=(torch.randn(2, 3), torch.randn(2, 4)), **taylor_kwargs())
    data = spec.to_dict()
    assert data["input_shape"] == [[2, 3], [2, 4]]
    assert not {"example_inputs", "calib_inputs", "loss_fn"} & set(data)
    assert "nm" not in data and "target" not in data and "batch_size" not in data["latency"]
    single = make(input_shape=None, example_inputs=torch.randn(1, 6)).to_dict()
    assert Spec.from_dict(single).make_example_inputs()[0].shape == (1, 6)


def test_to_dict_is_a_copy():
    spec = make(ignore=["fc"], ratio={"a": 0.5})
    data = spec.to_dict()
    data["ignore"].append("x")
    data["ratio"]["a"] = 0.9
    data["input_shape"][0] = 5
    assert spec.ignore == ["fc"] and spec.ratio == {"a": 0.5} and spec.input_shape == SHAPE
