"""Pushing to the Hub is off by default; offline it fails clearly and leaves the child intact."""

import pytest

from darwin_hydra.report.hub import HubPushError, push_child


def test_offline_push_fails_clearly_and_keeps_the_child(tmp_path, monkeypatch):
    child = tmp_path / "child"
    child.mkdir()
    (child / "model.safetensors").write_bytes(b"x" * 10)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE") as e:
        push_child(child, "me/child")
    assert str(child) in str(e.value)
    assert (child / "model.safetensors").read_bytes() == b"x" * 10


def test_push_needs_a_repo_id(tmp_path):
    with pytest.raises(HubPushError, match="hub_repo_id"):
        push_child(tmp_path, None)


def test_push_is_off_by_default():
    from darwin_hydra.config import compose

    assert compose([]).export.push_to_hub is False
