"""Settings defaults that depend on the machine: the thread count honours the cgroup CPU quota."""

from __future__ import annotations

from pathlib import Path

import pytest

from kolite.config import ModelSettings, cgroup_cpu_limit, default_threads


def _cgroup(tmp_path: Path, lines: str) -> Path:
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(lines, encoding="utf-8")
    return proc


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")  # --cpus 1.5 -> 2 threads
    assert cgroup_cpu_limit(root, _cgroup(tmp_path, "0::/kubepods/pod1\n")) == 2
    (root / "kubepods" / "cpu.max").write_text("100000 100000\n")  # a parent's smaller limit wins
    assert cgroup_cpu_limit(root, _cgroup(tmp_path, "0::/kubepods/pod1\n")) == 1


def test_cgroup_v2_unlimited_and_missing(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    root.mkdir()
    (root / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, _cgroup(tmp_path, "0::/\n")) is None
    assert cgroup_cpu_limit(root, tmp_path / "absent") is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    cpu = root / "cpu,cpuacct"
    cpu.mkdir(parents=True)  # inside a container the host's path is not mounted: its own group is the root
    (cpu / "cpu.cfs_quota_us").write_text("300000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    lines = "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n"
    assert cgroup_cpu_limit(root, _cgroup(tmp_path, lines)) == 3
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, _cgroup(tmp_path, lines)) is None


def test_default_threads_takes_the_smaller_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr("kolite.config.cgroup_cpu_limit", lambda: 2)
    assert default_threads() == 2 and ModelSettings().threads == 2
    monkeypatch.setattr("kolite.config.cgroup_cpu_limit", lambda: None)
    assert default_threads() == 4


def test_precision_defaults_to_auto() -> None:
    assert (ModelSettings().precision, ModelSettings().int8_weights) == ("auto", "auto")
