import importlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(2)


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


def pytest_terminal_summary(terminalreporter):
    """Print how many property-test examples ran an oracle that could fail (tests/oracle_tally.py)."""
    import oracle_tally

    lines = oracle_tally.summary()
    if lines:
        terminalreporter.section("oracle examples")
        for line in lines:
            terminalreporter.write_line(line)
