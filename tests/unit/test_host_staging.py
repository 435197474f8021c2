"""The background writer's host copy (`HostStaging`): a snapshot training cannot change, tied tensors kept
tied, and the same host memory reused from one save to the next (what keeps the stall a plain memcpy)."""

import torch

from scaletune.background_save import HostStaging


def state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def tied_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    model[1].weight = model[0].weight  # an MLM decoder tied to the word embeddings
    return model


def step(model, optimizer):
    model(torch.arange(5)).sum().backward()
    optimizer.step()


def trained_once():
    """A tied model after one AdamW update (so the optimizer has state), and an empty staging area."""
    model = tied_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    step(model, optimizer)
    return model, optimizer, HostStaging()


def test_a_snapshot_that_training_does_not_change_with_ties_kept():
    model, optimizer, staging = trained_once()
    copy = staging.copy("state", state(model, optimizer))
    before = {k: v.clone() for k, v in copy["model"].items()}
    assert copy["model"]["0.weight"] is copy["model"]["1.weight"]  # tied in the copy, stored once
    assert copy["model"]["0.weight"].data_ptr() != model[0].weight.data_ptr()
    step(model, optimizer)  # training goes on while the writer works
    for k, v in copy["model"].items():
        assert torch.equal(v, before[k])
        assert not torch.equal(v, model.state_dict()[k]), k
    assert copy["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_the_next_save_reuses_the_host_memory_and_holds_the_new_values():
    model, optimizer, staging = trained_once()
    first = staging.copy("state", state(model, optimizer))
    pointers = {k: v.data_ptr() for k, v in first["model"].items()}
    exp_avg = first["optimizer"]["state"][0]["exp_avg"].data_ptr()
    step(model, optimizer)
    second = staging.copy("state", state(model, optimizer))
    assert {k: v.data_ptr() for k, v in second["model"].items()} == pointers
    assert second["optimizer"]["state"][0]["exp_avg"].data_ptr() == exp_avg
    for k, v in model.state_dict().items():
        assert torch.equal(second["model"][k], v)
    assert int(second["optimizer"]["state"][0]["step"]) == 2


def test_a_state_of_another_shape_gets_new_memory():
    staging = HostStaging()
    first = staging.copy("w", {"a": torch.ones(3)})
    second = staging.copy("w", {"a": torch.zeros(4)})
    third = staging.copy("w", {"a": torch.ones(4), "b": torch.ones(2)})
    assert second["a"].data_ptr() != first["a"].data_ptr() and torch.equal(second["a"], torch.zeros(4))
    assert set(third) == {"a", "b"} and torch.equal(third["a"], torch.ones(4))
