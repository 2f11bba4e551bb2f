"""Results record what they depend on: versions, commit, CPU and threads."""

from __future__ import annotations

import torch

from bnn_tol import provenance


def test_environment_records_versions_commit_cpu_and_threads():
    env = provenance.environment(3, 2, "make results")
    assert env["torch"] == torch.__version__ and env["bnn_tol"]
    assert env["torch_threads"] == 3 and env["workers"] == 2 and env["command"] == "make results"
    assert env["cpu"] and env["cores"] >= 1
    # this test runs from a git checkout of the project: the commit is a 40-hex sha
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert provenance.environment()["torch_threads"] == torch.get_num_threads()


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch):
    monkeypatch.setattr(provenance, "cpuinfo", lambda: {"flags": "sse avx2 avx512_vnni",
                                                        "model name": "Test CPU"})
    assert provenance.has_cpu_flag("avx512_vnni", "amx_int8")
    assert not provenance.has_cpu_flag("amx_int8")
    assert provenance.cpu_model() == "Test CPU"
    assert provenance.cpu_flags_digest() == provenance.cpu_flags_digest()  # order-free digest
    monkeypatch.setattr(provenance, "cpuinfo", lambda: {"flags": "avx512_vnni avx2 sse"})
    d = provenance.cpu_flags_digest()
    monkeypatch.setattr(provenance, "cpuinfo", lambda: {"flags": "sse avx2 avx512_vnni"})
    assert provenance.cpu_flags_digest() == d


def test_describe_is_one_line_with_commit_dirty_flag_and_threads():
    env = provenance.environment(threads=3)
    line = provenance.describe(env)
    assert "\n" not in line and line.endswith("· 3 threads")
    assert f"@ {(env['git_commit'] or 'no git')[:12]}" in line
    assert ("(dirty)" in line) == bool(env["git_dirty"])
    assert provenance.describe({**env, "git_commit": None, "git_dirty": None}).count(
        "@ no git ·") == 1
