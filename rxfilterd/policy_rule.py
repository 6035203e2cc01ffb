"""Policy rules: `[[policy]]` tables that give some NICs another sync policy.

A rule matches a NIC when every criterion it names matches (network and portgroup
by name, domain by shell-style pattern). The first matching rule in file order
wins; keys it leaves out come from `[sync]`. No rule matching means `[sync]`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from rxfilterd.policy import Field, MacPrefix, SyncPolicy, VlanPolicy


@dataclass(frozen=True)
class PolicyRule:
    """One [[policy]] table, as the config validator builds it (name defaults to policy[N])."""

    name: str
    # Criteria.
    domain: str | None = None
    network: str | None = None
    portgroup: str | None = None
    # Settings; None takes [sync]'s.
    fields: frozenset[Field] | None = None
    mac_allow: tuple[MacPrefix, ...] | None = None
    vlan: VlanPolicy | None = None

    def matches(self, domain: str, network: str | None, portgroup: str | None) -> bool:
        if self.domain is not None and not fnmatch.fnmatchcase(domain, self.domain):
            return False
        if self.network is not None and self.network != network:
            return False
        return self.portgroup is None or self.portgroup == portgroup

    def apply_to(self, base: SyncPolicy) -> SyncPolicy:
        return SyncPolicy(
            fields=base.fields if self.fields is None else self.fields,
            vlan=base.vlan if self.vlan is None else self.vlan,
            mac_allow=base.mac_allow if self.mac_allow is None else self.mac_allow,
        )


def select_policy(
    rules: tuple[PolicyRule, ...],
    base: SyncPolicy,
    domain: str,
    network: str | None,
    portgroup: str | None,
) -> tuple[SyncPolicy, str]:
    """The policy for one NIC and where it came from ("sync" or the rule's name)."""
    for rule in rules:
        if rule.matches(domain, network, portgroup):
            return rule.apply_to(base), rule.name
    return base, "sync"
