"""`modelplane operator` leader-election flags: defaults from the Pod's environment, checks."""

from __future__ import annotations

import argparse
import os

import pytest

from modelplane_operator.ha.cli import (
    add_election_arguments,
    default_advertise_url,
    default_identity,
    replica_settings_from_args,
)


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8443)
    add_election_arguments(parser)
    return parser.parse_args(list(flags))


def test_off_unless_asked() -> None:
    assert replica_settings_from_args(parse(), None) is None


def test_a_pod_names_itself_and_advertises_its_ip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "mp-modelplane-7d9f-abcde")
    monkeypatch.setenv("POD_NAMESPACE", "mp-system")
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    settings = replica_settings_from_args(parse("--leader-election"), "mp-modelplane.mp.svc")
    assert settings is not None
    assert settings.election.identity == "mp-modelplane-7d9f-abcde"
    assert settings.election.namespace == "mp-system"
    assert settings.election.name == "modelplane-operator"
    assert settings.advertise_url == "https://10.1.2.3:8443"
    assert settings.peer_server_name == "mp-modelplane.mp.svc"
    monkeypatch.setenv("POD_IP", "fd00::17")
    assert default_advertise_url("0.0.0.0", 8443) == "https://[fd00::17]:8443"


def test_outside_a_pod_host_and_pid_and_the_listen_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("POD_NAME", "POD_NAMESPACE", "POD_IP"):
        monkeypatch.delenv(name, raising=False)
    assert default_identity().endswith(f"-{os.getpid()}")
    assert default_advertise_url("127.0.0.1", 9000) == "https://127.0.0.1:9000"
    assert default_advertise_url("0.0.0.0", 9000) == "https://127.0.0.1:9000"
    settings = replica_settings_from_args(
        parse("--leader-election", "--identity=op-a", "--lease-namespace=ops"), None
    )
    assert settings is not None
    assert (settings.election.identity, settings.election.namespace) == ("op-a", "ops")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--advertise-url=http://10.0.0.1:8443"], "must be an https:// URL"),
        (["--lease-duration=10"], "lease duration (10s) must be more than the renew deadline"),
        (["--lease-retry-period=9"], "renew deadline (10s) must be more than 1.2"),
    ],
)
def test_bad_flags_say_which(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError) as error:
        replica_settings_from_args(parse("--leader-election", *flags), None)
    assert message in str(error.value)
