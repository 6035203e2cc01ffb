"""deploy/kubevirt/trust_hook.py on a domain and a VMI shaped as KubeVirt hands them over.

The domain is what virt-launcher passes the onDefineDomain hook: its Go DomainSpec
marshalled with xml.MarshalIndent(spec, "", "\\t") (pkg/hooks/manager.go), so double
quotes, tabs and no empty-element tags, after the tap binding's generator filled in
target, MAC and MTU (pkg/network/domainspec/generators.go). NICs on KubeVirt's macvtap
binding plugin (domainAttachmentType: tap) are type="ethernet" with <target
managed="no"> naming the pod interface macvtap-cni made, "pod" + sha256(network
name)[:11]; their alias is "ua-" + the VMI interface name. The VMI is the JSON the shim
passes (json.Marshal of the VirtualMachineInstance).

The script is loaded from its file (tests/support/kubevirt_hook.py says why).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from tests.support.kubevirt_hook import HOOK, load_hook

ATTR = b' trustGuestRxFilters="yes"'


hook = load_hook()

# A non-root VMI tenant-a/web1: the pod network (masquerade, tap0) and two macvtap NICs.
# The sysinfo entry holds non-ASCII text, so byte offsets and character offsets differ.
DOMAIN = """<domain type="kvm" xmlns:qemu="http://libvirt.org/schemas/domain/qemu/1.0">
\t<name>tenant-a_web1</name>
\t<memory unit="b">2147483648</memory>
\t<os>
\t\t<type arch="x86_64" machine="q35">hvm</type>
\t\t<smbios mode="sysinfo"></smbios>
\t</os>
\t<sysinfo type="smbios">
\t\t<system>
\t\t\t<entry name="uuid">7c2a53ee-1f4c-5b53-9a4e-2f4f7d2c8b11</entry>
\t\t\t<entry name="manufacturer">Société Générale de Virtualisation</entry>
\t\t</system>
\t\t<bios></bios>
\t\t<baseBoard></baseBoard>
\t\t<chassis></chassis>
\t</sysinfo>
\t<devices>
\t\t<interface type="ethernet">
\t\t\t<source></source>
\t\t\t<target dev="tap0" managed="no"></target>
\t\t\t<model type="virtio-non-transitional"></model>
\t\t\t<mac address="02:d4:1e:00:00:01"></mac>
\t\t\t<mtu size="1480"></mtu>
\t\t\t<alias name="ua-default"></alias>
\t\t\t<rom enabled="no"></rom>
\t\t</interface>
\t\t<interface type="ethernet">
\t\t\t<source></source>
\t\t\t<target dev="pod094a367b026" managed="no"></target>
\t\t\t<model type="virtio-non-transitional"></model>
\t\t\t<mac address="02:5f:3a:9c:10:02"></mac>
\t\t\t<mtu size="1500"></mtu>
\t\t\t<alias name="ua-lan"></alias>
\t\t\t<rom enabled="no"></rom>
\t\t</interface>
\t\t<interface type="ethernet">
\t\t\t<source></source>
\t\t\t<target dev="pod49a25f9feef" managed="no"></target>
\t\t\t<model type="virtio-non-transitional"></model>
\t\t\t<mac address="02:5f:3a:9c:10:03"></mac>
\t\t\t<mtu size="9000"></mtu>
\t\t\t<alias name="ua-storage"></alias>
\t\t\t<rom enabled="no"></rom>
\t\t</interface>
\t\t<channel type="unix">
\t\t\t<target name="org.qemu.guest_agent.0" type="virtio"></target>
\t\t</channel>
\t\t<controller type="usb" index="0" model="none"></controller>
\t\t<disk device="disk" type="file" model="virtio-non-transitional">
\t\t\t<source file="/var/run/kubevirt-ephemeral-disks/disk-data/containerdisk/disk.qcow2"></source>
\t\t\t<target bus="virtio" dev="vda"></target>
\t\t\t<driver cache="none" error_policy="stop" name="qemu" type="qcow2" discard="unmap"></driver>
\t\t\t<alias name="ua-containerdisk"></alias>
\t\t</disk>
\t</devices>
\t<clock offset="utc"></clock>
\t<metadata>
\t\t<kubevirt xmlns="http://kubevirt.io">
\t\t\t<uid>3f9d1c2e-8a4b-4d6f-9c0e-1b2a3c4d5e6f</uid>
\t\t\t<graceperiod>
\t\t\t\t<deletionGracePeriodSeconds>30</deletionGracePeriodSeconds>
\t\t\t</graceperiod>
\t\t</kubevirt>
\t</metadata>
\t<features>
\t\t<acpi></acpi>
\t</features>
\t<cpu mode="host-model">
\t\t<topology sockets="1" cores="1" threads="1"></topology>
\t</cpu>
\t<vcpu placement="static">1</vcpu>
</domain>""".encode()


def vmi(annotations: dict[str, Any] | None = None) -> str:
    """The VMI as the shim passes it: json.Marshal of the VirtualMachineInstance."""
    meta: dict[str, Any] = {
        "name": "web1",
        "namespace": "tenant-a",
        "uid": "3f9d1c2e-8a4b-4d6f-9c0e-1b2a3c4d5e6f",
        "resourceVersion": "48213",
        "generation": 1,
        "creationTimestamp": "2026-12-02T12:00:00Z",
        "labels": {"kubevirt.io/nodeName": "node-1"},
        "annotations": {
            "hooks.kubevirt.io/hookSidecars": json.dumps(
                [
                    {
                        "args": ["--version", "v1alpha3"],
                        "configMap": {
                            "name": "rxfilterd-trust-hook",
                            "key": "onDefineDomain",
                            "hookPath": "/usr/bin/onDefineDomain",
                        },
                    }
                ]
            ),
            "kubevirt.io/latest-observed-api-version": "v1",
            "kubevirt.io/storage-observed-api-version": "v1",
            **(annotations or {}),
        },
        "finalizers": ["kubevirt.io/virtualMachineControllerFinalize"],
    }
    body = {
        "kind": "VirtualMachineInstance",
        "apiVersion": "kubevirt.io/v1",
        "metadata": meta,
        "spec": {
            "domain": {
                "resources": {"requests": {"memory": "2Gi"}},
                "devices": {
                    "disks": [{"name": "containerdisk", "disk": {"bus": "virtio"}}],
                    "interfaces": [
                        {"name": "default", "masquerade": {}},
                        {"name": "lan", "binding": {"name": "macvtap"}},
                        {"name": "storage", "binding": {"name": "macvtap"}},
                    ],
                },
            },
            "networks": [
                {"name": "default", "pod": {}},
                {"name": "lan", "multus": {"networkName": "macvtap-lan"}},
                {"name": "storage", "multus": {"networkName": "macvtap-storage"}},
            ],
        },
        "status": {
            "phase": "Scheduled",
            "runtimeUser": 107,
            "interfaces": [
                {
                    "name": "lan",
                    "podInterfaceName": "pod094a367b026",
                    "infoSource": "multus-status",
                },
            ],
        },
    }
    return json.dumps(body, separators=(",", ":"))


def trusted(domain: bytes) -> dict[str, str | None]:
    """alias -> trustGuestRxFilters of every NIC under <devices>."""
    found: dict[str, str | None] = {}
    for nic in ET.fromstring(domain).iterfind("devices/interface"):
        alias = nic.find("alias")
        assert alias is not None
        found[str(alias.get("name"))] = nic.get("trustGuestRxFilters")
    return found


def test_only_the_named_nic_gets_trust_and_nothing_else_changes() -> None:
    out = hook.run(vmi({hook.ANNOTATION: "lan"}), DOMAIN)
    assert trusted(out.domain) == {"ua-default": None, "ua-lan": "yes", "ua-storage": None}
    # One attribute inserted, every other byte (tabs, quotes, namespaces) as it came.
    assert out.domain.count(ATTR) == 1
    assert out.domain.replace(ATTR, b"") == DOMAIN
    assert b'<interface trustGuestRxFilters="yes" type="ethernet">' in out.domain
    assert out.notes == (
        "interface lan (alias ua-lan, target pod094a367b026): trustGuestRxFilters set to yes",
    )


def test_a_list_with_spaces_names_several_nics() -> None:
    out = hook.run(vmi({hook.ANNOTATION: " lan , storage,lan"}), DOMAIN)
    assert trusted(out.domain) == {"ua-default": None, "ua-lan": "yes", "ua-storage": "yes"}
    assert out.domain.replace(ATTR, b"") == DOMAIN
    assert len(out.notes) == 2


def test_running_it_again_changes_nothing() -> None:
    # KubeVirt may define a domain more than once (hotplug placeholders first).
    once = hook.run(vmi({hook.ANNOTATION: "lan"}), DOMAIN).domain
    twice = hook.run(vmi({hook.ANNOTATION: "lan"}), once)
    assert twice.domain == once
    assert twice.notes == (
        "interface lan (alias ua-lan, target pod094a367b026): trustGuestRxFilters is yes already",
    )


def test_an_explicit_no_becomes_yes_and_says_so() -> None:
    domain = DOMAIN.replace(
        b'<interface type="ethernet">\n\t\t\t<source></source>\n\t\t\t<target dev="pod094',
        b"<interface trustGuestRxFilters='no' type=\"ethernet\">\n\t\t\t<source></source>"
        b'\n\t\t\t<target dev="pod094',
    )
    assert trusted(domain)["ua-lan"] == "no"
    out = hook.run(vmi({hook.ANNOTATION: "lan"}), domain)
    assert trusted(out.domain) == {"ua-default": None, "ua-lan": "yes", "ua-storage": None}
    assert out.domain == domain.replace(b"trustGuestRxFilters='no'", b'trustGuestRxFilters="yes"')
    assert "was 'no', set to yes" in out.notes[0]


def test_without_the_annotation_the_domain_is_unchanged() -> None:
    out = hook.run(vmi(), DOMAIN)
    assert out.domain == DOMAIN
    assert out.notes == (f"no {hook.ANNOTATION} annotation: domain unchanged",)


@pytest.mark.parametrize(
    "value",
    ["", "lan,", "lan,,storage", "lan;storage", "lan storage", "ua-lan/x", 42, ["lan"]],
)
def test_a_malformed_annotation_changes_nothing(value: object) -> None:
    out = hook.run(vmi({hook.ANNOTATION: value}), DOMAIN)
    assert out.domain == DOMAIN
    (note,) = out.notes
    assert note.startswith(f"annotation {hook.ANNOTATION}") and note.endswith(": domain unchanged")


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[]", '{"metadata": []}', '{"metadata": {"annotations": ["x"]}}'],
)
def test_a_malformed_vmi_changes_nothing(text: str) -> None:
    out = hook.run(text, DOMAIN)
    assert out.domain == DOMAIN
    (note,) = out.notes
    assert note.endswith(": domain unchanged")


@pytest.mark.parametrize(
    ("domain", "why"),
    [
        (DOMAIN[:-20], "not well-formed"),
        (b"", "not well-formed"),
        (b"\xff\xfe<domain/>", "not well-formed"),
        (b'<network><devices><interface type="ethernet"/></devices></network>', "<network>"),
        (
            b'<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]>'
            b"<domain><devices><interface><alias name='ua-lan'/>&b;</interface></devices></domain>",
            "DOCTYPE",
        ),
    ],
)
def test_a_malformed_domain_is_printed_as_it_came(domain: bytes, why: str) -> None:
    out = hook.run(vmi({hook.ANNOTATION: "lan"}), domain)
    assert out.domain == domain
    (note,) = out.notes
    assert why in note and note.endswith(": domain unchanged")


def test_a_name_not_in_the_domain_is_reported_and_skipped() -> None:
    out = hook.run(vmi({hook.ANNOTATION: "lan,wan"}), DOMAIN)
    assert trusted(out.domain)["ua-lan"] == "yes"
    assert out.notes[-1] == (
        "interface wan is not in the domain (aliases: ua-default, ua-lan, ua-storage); skipped"
    )


def test_nics_it_was_not_asked_about_are_never_touched() -> None:
    # KubeVirt's hotplug placeholders (alias without "ua-"), a NIC libvirt named itself,
    # and an <interface> outside <devices> whose alias looks right: none is a named NIC.
    domain = DOMAIN.replace(
        b"\t\t<channel",
        b'\t\t<interface type="ethernet">\n\t\t\t<source></source>\n'
        b'\t\t\t<target dev="placeholder-0" managed="no"></target>\n'
        b'\t\t\t<model type="virtio-non-transitional"></model>\n'
        b'\t\t\t<alias name="placeholder-0"></alias>\n\t\t</interface>\n'
        b'\t\t<interface type="ethernet" data-note="a>b">\n'
        b'\t\t\t<target dev="lan" managed="no"></target>\n'
        b'\t\t\t<alias name="lan"></alias>\n\t\t</interface>\n'
        b"\t\t<channel",
    ).replace(
        b"\t<metadata>\n",
        b'\t<metadata>\n\t\t<interface type="ethernet"><alias name="ua-lan"></alias></interface>\n',
    )
    for names in ("placeholder-0", "lan"):
        out = hook.run(vmi({hook.ANNOTATION: names}), domain)
        assert out.domain.replace(ATTR, b"") == domain
        assert out.domain.count(ATTR) == (1 if names == "lan" else 0)
        assert trusted(out.domain)["lan"] is None
        assert trusted(out.domain)["placeholder-0"] is None
    assert b'<interface type="ethernet"><alias name="ua-lan">' in out.domain


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    # As the shim does: exec.Command(onDefineDomain, "--vmi", vmi, "--domain", xml).Output()
    return subprocess.run(
        [sys.executable, str(HOOK), *args], capture_output=True, check=False, timeout=60, env=env
    )


def test_the_script_prints_the_domain_on_stdout_and_notes_on_stderr() -> None:
    done = run_script("--vmi", vmi({hook.ANNOTATION: "storage"}), "--domain", DOMAIN.decode())
    assert done.returncode == 0, done.stderr
    assert trusted(done.stdout) == {"ua-default": None, "ua-lan": None, "ua-storage": "yes"}
    assert done.stdout.replace(ATTR, b"") == DOMAIN
    assert done.stderr.decode().splitlines() == [
        "rxfilterd-trust-hook: interface storage (alias ua-storage, target pod49a25f9feef): "
        "trustGuestRxFilters set to yes"
    ]


def test_the_domain_keeps_its_bytes_in_an_ascii_locale() -> None:
    # A sidecar container may have no locale: argv is decoded as ASCII with surrogates,
    # and the script prints the bytes it was given, the non-ASCII sysinfo entry too.
    ascii_only = {"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    done = run_script(
        "--vmi", vmi({hook.ANNOTATION: "lan"}), "--domain", DOMAIN.decode(), env=ascii_only
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.replace(ATTR, b"") == DOMAIN
    assert done.stdout.count(ATTR) == 1


def test_the_script_never_fails_the_start_it_can_serve() -> None:
    # No --vmi, a bad one, and arguments a later shim might add: the domain goes through.
    for args in (
        ("--domain", DOMAIN.decode()),
        ("--vmi", "{", "--domain", DOMAIN.decode()),
        ("--vmi", vmi({hook.ANNOTATION: "lan"}), "--domain", DOMAIN.decode(), "--new", "x"),
    ):
        done = run_script(*args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.replace(ATTR, b"") == DOMAIN
        assert done.stderr.startswith(b"rxfilterd-trust-hook: ")
    # Without a domain there is nothing to print: that is the shim's contract broken.
    done = run_script("--vmi", vmi())
    assert done.returncode == 1 and done.stdout == b""
    assert b"no --domain" in done.stderr


def test_the_script_runs_on_the_shims_python() -> None:
    # The sidecar-shim image's python3 is CentOS Stream 9's 3.9: its grammar, stdlib only.
    source = HOOK.read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    assert source.startswith("#!/usr/bin/python3\n")
    assert os.access(HOOK, os.X_OK)
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "xml" in imported and "json" in imported
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
