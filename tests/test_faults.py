"""The fault hook (convert/faults.py): read from the environment once, by the command line, then passed down."""

from __future__ import annotations

import errno

import pytest

from convert.faults import FAULT_ENV, from_env, no_fault


def test_unset_or_empty_is_the_no_op():
    assert from_env({}) is no_fault and from_env({FAULT_ENV: ""}) is no_fault


def test_enospc_at_the_named_point_only():
    fault = from_env({FAULT_ENV: "tensor_write:enospc"})
    fault("before_rename")  # another point: nothing
    with pytest.raises(OSError) as e:
        fault("tensor_write")
    assert e.value.errno == errno.ENOSPC


def test_the_environment_is_read_when_the_hook_is_built(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "before_fsync:enospc")
    fault = from_env()
    monkeypatch.delenv(FAULT_ENV)
    with pytest.raises(OSError):
        fault("before_fsync")  # built while it was set: later changes of the environment do not matter
    assert from_env() is no_fault


def test_sigint_at_the_named_point_only():
    """``<point>:sigint`` sends this process a SIGINT there: what a Ctrl-C at that moment delivers."""
    import signal

    got = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        fault = from_env({FAULT_ENV: "check:logits:sigint"})
        fault("check:files")
        assert got == []
        fault("check:logits")
        assert got == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_point_may_contain_a_colon_with_or_without_a_kind():
    with pytest.raises(OSError):
        from_env({FAULT_ENV: "check:files:enospc"})("check:files")
    fault = from_env({FAULT_ENV: "check:files"})  # no kind: the kill, at the point "check:files"
    fault("check")
    fault("files")  # neither is the point: nothing happens (the kill would end this test run)
