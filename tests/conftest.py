import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Under pytest-xdist (the README's `-n 2`) each worker process takes one core's share
# of threads: two workers at two threads each would oversubscribe a 2-core machine.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_configure(config):
    config.addinivalue_line("markers", "dynamic_shapes: capture with torch.export's dynamic batch and "
                                       "sequence dims (fxprune's default) instead of static shapes")


@pytest.fixture(autouse=True)
def _export_shapes(request):
    """Static export shapes except in tests marked ``dynamic_shapes``.

    Dynamic dims are fxprune's default but cost capture time (a 2-layer Llama: 1.6 s
    against 0.45 s): over the whole suite they took CI from about 6 to about 15 minutes.
    Static shapes are the fallback path of the same capture (same groups, checked by
    tests/test_dynamic_shapes.py); the files marked ``dynamic_shapes`` (the dynamic-shape
    tests, the transformers sweep families, the op rules under export) run the default."""
    if request.node.get_closest_marker("dynamic_shapes") is not None:
        yield
        return
    from fxprune.capture.dynamic import static_shapes

    with static_shapes():
        yield


@pytest.fixture
def import_benchmark(monkeypatch):
    """Import a script of ``benchmarks/`` by name, e.g. ``import_benchmark("digits")``.

    The scripts set torch's thread count and cache themselves in ``sys.modules``; both
    are undone afterwards so the next test sees neither."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
    threads = torch.get_num_threads()
    imported = []

    def load(name: str):
        imported.append(name)
        return importlib.import_module(name)

    yield load
    torch.set_num_threads(threads)
    for name in imported:
        sys.modules.pop(name, None)


def pytest_sessionfinish(session):
    """An xdist worker hands its oracle tally to the controller, which prints it."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        import oracle_tally

        workeroutput["oracle_tally"] = dict(oracle_tally.TALLY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    import oracle_tally

    for test, (nontrivial, examples) in node.workeroutput.get("oracle_tally", {}).items():
        oracle_tally.TALLY[test][0] += nontrivial
        oracle_tally.TALLY[test][1] += examples


def pytest_terminal_summary(terminalreporter):
    """Print how many property-test examples ran an oracle that could fail (tests/oracle_tally.py)."""
    import oracle_tally

    lines = oracle_tally.summary()
    if lines:
        terminalreporter.section("oracle examples")
        for line in lines:
            terminalreporter.write_line(line)
