"""The real exporter process on the libkvm source, loading the fake libkvm (tests/fakekvm)."""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

from conftest import samples
from fakelib import SCENARIOS, fake_libkvm, fixed_passwd  # noqa: F401 (fixture)
from test_exposition import promtool_check, run, stable

GOLDEN = pathlib.Path(__file__).parent / "golden" / "freebsd-web01.prom"
GOLDEN_DUMP = pathlib.Path(__file__).parent / "golden" / "freebsd-web01-dump.prom"
WEB01 = SCENARIOS / "web01.scenario"


def libkvm_config(library: pathlib.Path, interval: str = "1h") -> str:
    return f"source: libkvm\ninterval: {interval}\nlibkvm:\n  library: {library}\n"


def test_serves_web01_as_the_golden_exposition(
    exporter: Any,
    fake_libkvm: pathlib.Path,  # noqa: F811
) -> None:
    env = {"FAKE_KVM_SCENARIO": str(WEB01), **fixed_passwd()}
    e = exporter(libkvm_config(fake_libkvm), env=env)
    text = e.get()
    promtool_check(text)
    # The exporter's own process_* metrics vary run by run: tests/test_own_usage.py.
    own = re.compile(r"^(# (HELP|TYPE) )?process_.*\n", re.M)
    assert stable(own.sub("", text)) == GOLDEN.read_text()


def test_user_names_come_from_the_password_database_the_test_gives(
    exporter: Any,
    fake_libkvm: pathlib.Path,  # noqa: F811
) -> None:
    """The golden tests do not depend on the host's accounts: the exporter's lookup answers
    from the test's table (here 1001 is alice and uid 0 has no account)."""
    env = {"FAKE_KVM_SCENARIO": str(WEB01), **fixed_passwd({1001: "alice", 33: "www"})}
    got = exporter(libkvm_config(fake_libkvm), env=env).metrics()
    users = {dict(labels).get("user") for name, labels in got if name == "kvm_processes"}
    assert users == {"alice", "www", "0", "1", "65534", "other"}


def test_a_failed_getprocs_sets_up_to_0_and_the_next_poll_recovers(
    exporter: Any,
    fake_libkvm: pathlib.Path,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    scenario = tmp_path / "flaky.scenario"
    scenario.write_text(
        WEB01.read_text() + "fail getprocs 2 kvm_getprocs: Cannot allocate memory\n"
    )
    # interval 0: the start-up poll is call 1, then every scrape polls once.
    env = {"FAKE_KVM_SCENARIO": str(scenario), **fixed_passwd()}
    e = exporter(libkvm_config(fake_libkvm, "0"), env=env)
    failed = e.metrics()
    assert failed[("kvm_up", frozenset())] == 0
    assert failed[("kvm_poll_success", frozenset({("collector", "procs")}))] == 0
    assert failed[("kvm_poll_errors_total", frozenset({("collector", "procs")}))] == 1
    assert failed[("kvm_poll_success", frozenset({("collector", "swap")}))] == 1
    assert not any(name == "kvm_processes" for name, _ in failed)
    recovered = e.metrics()
    assert recovered[("kvm_up", frozenset())] == 1
    www_running = frozenset({("user", "www-data"), ("tty", "none"), ("state", "running")})
    assert recovered[("kvm_processes", www_running)] == 2
    assert "kvm_getprocs failed: kvm_getprocs: Cannot allocate memory" in e.stderr()


def test_crash_dump_one_shot_prints_only_what_a_dump_holds(
    fake_libkvm: pathlib.Path,  # noqa: F811
) -> None:
    """The dump of web01 as libkvm reads it: sleeps without the interruptible/idle split,
    terminals as "unknown", no swap (a current kernel has no _dmmax), exit status 1."""
    # No FAKE_KVM_SCENARIO: the core file is the only way the fake can know the data.
    env = {k: v for k, v in os.environ.items() if k != "FAKE_KVM_SCENARIO"}
    result = run(
        f"--libkvm.library={fake_libkvm}",
        "--libkvm.kernel=/boot/kernel/kernel",
        f"--libkvm.core={WEB01}",
        env={**env, **fixed_passwd()},
    )
    assert result.returncode == 1, result.stderr
    assert "poll of swap failed: kvm_getswapinfo failed: unable to find dmmax" in result.stderr
    promtool_check(result.stdout)
    assert stable(result.stdout) == GOLDEN_DUMP.read_text()


def test_an_unreadable_crash_dump_exits_1_with_the_library_text(
    fake_libkvm: pathlib.Path,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    core = tmp_path / "vmcore.1"
    core.write_text(WEB01.read_text() + "fail open * vmcore.1: invalid magic\n")
    result = run(f"--libkvm.library={fake_libkvm}", "--libkvm.kernel=k", f"--libkvm.core={core}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"kvm_openfiles cannot open crash dump '{core}'" in result.stderr
    assert "vmcore.1: invalid magic" in result.stderr


def test_a_missing_library_exits_1_naming_it(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "kvm.yml"
    config.write_text(libkvm_config(tmp_path / "libkvm.so.7"))
    result = run("--once", f"--config.file={config}")
    assert result.returncode == 1
    assert f"cannot load libkvm from '{tmp_path / 'libkvm.so.7'}'" in result.stderr
    assert "cannot open shared object file" in result.stderr


def test_samples_of_db01_match_its_scenario(
    fake_libkvm: pathlib.Path,  # noqa: F811
    tmp_path: pathlib.Path,
) -> None:
    config = tmp_path / "kvm.yml"
    config.write_text(libkvm_config(fake_libkvm))
    db01 = SCENARIOS / "db01.scenario"
    env = {**os.environ, "FAKE_KVM_SCENARIO": str(db01), **fixed_passwd()}
    result = run("--once", f"--config.file={config}", env=env)
    assert result.returncode == 0, result.stderr
    got = samples(result.stdout)
    postgres = {k: v for k, v in got.items() if k[0] == "kvm_processes" and ("user", "770") in k[1]}
    by_state = {dict(labels)["state"]: value for (_, labels), value in postgres.items()}
    assert by_state == {
        "sleeping": 3,
        "uninterruptible": 1,
        "running": 3,
        "lock": 1,
        "zombie": 1,
        "stopped": 1,
    }
    for device, used in (("/dev/nvd0p3", 131072), ("/dev/nvd1p3", 129500)):
        labels = frozenset({("device", device)})
        assert got[("kvm_swap_used_bytes", labels)] == used * 4096
        assert got[("kvm_swap_size_bytes", labels)] == 4194304 * 4096
    assert got[("kvm_cpus", frozenset())] == 16
    assert got[("kvm_load1", frozenset())] == 3.15
