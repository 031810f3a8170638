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


def test_memory_limit_is_the_smaller_of_the_machine_and_its_cgroup(tmp_path: Path) -> None:
    from kolite.config import memory_limit_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1918432 kB\nMemFree:          100000 kB\n")
    root = tmp_path / "cgroup"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    assert memory_limit_bytes(meminfo, root, proc) == 1918432 * 1024  # no limit files: the machine's
    (root / "kubepods" / "pod1" / "memory.max").write_text("max\n")
    (root / "kubepods" / "memory.max").write_text(f"{512 * 2**20}\n")  # a parent's limit counts
    assert memory_limit_bytes(meminfo, root, proc) == 512 * 2**20
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # unlimited
    proc.write_text("12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert memory_limit_bytes(meminfo, v1, proc) == 1918432 * 1024
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{3 * 2**30}\n")
    assert memory_limit_bytes(tmp_path / "none", v1, proc) == 3 * 2**30
    assert memory_limit_bytes(tmp_path / "none", tmp_path / "none", tmp_path / "none") is None


def test_kv_cache_auto_is_int8_on_small_machines() -> None:
    from kolite.convert.prepare import choose_kv_cache

    assert [choose_kv_cache("auto", m) for m in (2**30, 2 * 2**30, 4 * 2**30, None)] == ["int8", "int8", "float",
                                                                                         "float"]
    assert choose_kv_cache("float", 2**30) == "float" and choose_kv_cache("int8", 64 * 2**30) == "int8"
