"""The GPU tier (issue 21, item 7): what only a CUDA device shows. Every test here is marked `slow` and skipped
without CUDA, so CPU machines and CI collect it and run nothing; `bash scripts/gpu_check.sh` runs it on a
GPU machine without network. Tiny models: the whole tier takes a few minutes there."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


# tryfirst: as tests/conftest.py, the marks are set before `-m` deselects.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    import torch

    cuda = torch.cuda.is_available()
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.slow)
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="no CUDA device: tests/gpu runs on a GPU machine "
                                                        "(bash scripts/gpu_check.sh)"))


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every attempt to open a connection to another machine is recorded and refused (the machine has no
    network; a run that tries one would otherwise wait for a timeout or, online, fetch code). This machine's
    own addresses (a process group's store) stay open."""
    import socket

    attempts = []
    connect = socket.socket.connect

    def refuse(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"tests/gpu: no network ({address})")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts
