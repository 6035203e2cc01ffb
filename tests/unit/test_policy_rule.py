"""[[policy]] tables: parsing, errors naming the key, first match wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from rxfilterd import config
from rxfilterd.config import ConfigError
from rxfilterd.policy import ALL_FIELDS

RULES = """
[sync]
mac_allow = ["52:54:00"]

[[policy]]
name = "kubevirt"
domain = "virt-launcher-*"
fields = ["multicast"]

[[policy]]
network = "lan"
portgroup = "ipv6-only"
fields = ["multicast", "mac"]
mac_allow = ["02:00:00:00:00:01"]

[[policy]]
name = "lab"
network = "lab"
vlan = "ignore"
"""


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "rxfilterd.toml"
    path.write_text(text)
    return config.load(path)


def test_first_matching_rule_wins_and_inherits_sync(tmp_path: Path) -> None:
    cfg = load(tmp_path, RULES)
    policy, source = cfg.policy_for("virt-launcher-web1", "lan", "ipv6-only")
    assert source == "kubevirt" and policy.fields == {"multicast"}
    assert policy.mac_allow == ("52:54:00",)  # from [sync]
    policy, source = cfg.policy_for("web1", "lan", "ipv6-only")
    assert source == "policy[1]" and policy.fields == {"multicast", "mac"}
    assert policy.mac_allow == ("02:00:00:00:00:01",)
    assert cfg.policy_for("web1", "lan", "other")[1] == "sync"  # every criterion must match
    policy, source = cfg.policy_for("web1", "lab", None)
    assert source == "lab" and policy.vlan == "ignore" and policy.fields == ALL_FIELDS
    assert cfg.policy_for("web1", None, None) == (cfg.sync, "sync")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[policy]]\ndomain = 'x'\n", "policy[0]: sets none of fields, mac_allow, vlan"),
        ("[[policy]]\nfields = ['mac', 'ipv4']\n", "policy[0].fields[1]: 'ipv4' is not one of"),
        ("[[policy]]\nfields = ['mac']\nzone = 'a'\n", "policy[0].zone: unknown key"),
        ("[[policy]]\nmac_allow = ['nope']\n", "policy[0].mac_allow[0]: 'nope' is not a MAC"),
        ("[[policy]]\nvlan = 'trunk'\n", "policy[0].vlan: 'trunk' is not one of"),
        ("policy = 3\n", "policy must be an array of tables"),
        (
            "[[policy]]\nname='a'\nvlan='ignore'\n[[policy]]\nname='a'\nvlan='ignore'\n",
            "policy[1].name: 'a' is used twice",
        ),
        ("[sync]\nmac_allow = ['52:54:00:zz']\n", "sync.mac_allow[0]"),
        ("[sync]\nfields = ['mac', 'mac']\n", "sync.fields: lists 'mac' twice"),
    ],
)
def test_bad_rules_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    assert str(err.value).startswith(str(tmp_path / "rxfilterd.toml"))
    assert message in str(err.value)
