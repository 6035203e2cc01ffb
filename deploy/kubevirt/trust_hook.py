#!/usr/bin/python3
"""KubeVirt onDefineDomain hook: trustGuestRxFilters='yes' on the NICs a VMI names.

KubeVirt never sets trustGuestRxFilters, and rxfilterd acts only where libvirt holds it
as yes. Put this file in a ConfigMap and name it in the VMI's hookSidecars annotation
(docs/kubernetes.md): KubeVirt's sidecar-shim mounts it as /usr/bin/onDefineDomain and
runs it before each definition of the domain as

    onDefineDomain --vmi <the VMI as JSON> --domain <the domain XML>

taking stdout as the domain to define and logging stderr line by line. The VMI names
its NICs in an annotation, e.g. ``rxfilterd.io/trust-guest-rx-filters: "lan,storage"``:
VMI interface names, which KubeVirt gives the domain as ``<alias name='ua-NAME'/>``.

The VM's start matters more than its receive filter: whatever goes wrong (no or a
malformed annotation, a domain this hook cannot read, a name not in the domain), it
prints the domain exactly as it came and says why on stderr. It changes nothing but
the trustGuestRxFilters attribute of the <interface> elements the annotation names,
in place, byte for byte (re-serialising would rename the domain's XML namespaces),
and a value of 'no' there becomes 'yes': the annotation is the operator's intent.

Standard library only, and Python 3.9 syntax: the sidecar-shim image's python3 is
CentOS Stream's (3.9 on Stream 9).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from xml.parsers import expat

ANNOTATION = "rxfilterd.io/trust-guest-rx-filters"
# KubeVirt's prefix for aliases it derives from names in the VMI (api.UserAliasPrefix).
ALIAS_PREFIX = "ua-"
# What KubeVirt admits as an interface name (pkg/network/admitter/netiface.go); so
# a comma never occurs in one.
NAME = re.compile(r"[A-Za-z0-9_-]+\Z")
ATTRIBUTE = "trustGuestRxFilters"
# An <interface> start tag from its '<': attributes kept whole, quoted values may hold '>'.
START_TAG = re.compile(
    rb"<interface(?P<attrs>(?:\s+[^\s=/>]+\s*=\s*(?:\"[^\"]*\"|'[^']*'))*)\s*/?>"
)
TRUST_ATTR = re.compile(rb"(\s" + ATTRIBUTE.encode() + rb"\s*=\s*)(?:\"[^\"]*\"|'[^']*')")
PREFIX = "rxfilterd-trust-hook: "


class HookError(Exception):
    """The input cannot be used: the domain goes out unchanged, with this as the reason."""


@dataclass(frozen=True)
class Outcome:
    """The domain XML to print and one line of stderr per decision."""

    domain: bytes
    notes: tuple[str, ...]


@dataclass
class _Interface:
    offset: int  # byte index of the '<' of its start tag
    trust: str | None
    alias: str | None = None
    target: str | None = None


@dataclass
class _DomainReader:
    """The <interface> elements directly under <domain><devices>, from expat's events."""

    parser: expat.XMLParserType
    stack: list[str] = field(default_factory=list)
    interfaces: list[_Interface] = field(default_factory=list)

    def start(self, name: str, attrs: dict[str, str]) -> None:
        if not self.stack and name != "domain":
            raise HookError(f"the root element is <{name}>, not <domain>")
        self.stack.append(name)
        if self.stack == ["domain", "devices", "interface"]:
            offset = self.parser.CurrentByteIndex
            self.interfaces.append(_Interface(offset, attrs.get(ATTRIBUTE)))
        elif self.stack[:3] == ["domain", "devices", "interface"] and len(self.stack) == 4:
            nic = self.interfaces[-1]
            if name == "alias" and nic.alias is None:
                nic.alias = attrs.get("name")
            elif name == "target" and nic.target is None:
                nic.target = attrs.get("dev")

    def end(self, name: str) -> None:
        self.stack.pop()


def _refuse_doctype(*_: object) -> None:
    # KubeVirt's domain never has one; a DOCTYPE could declare entities.
    raise HookError("the domain XML has a DOCTYPE")


def read_interfaces(domain: bytes) -> list[_Interface]:
    """The domain's NICs with their start tags' offsets; HookError if it is not a domain."""
    parser = expat.ParserCreate()
    reader = _DomainReader(parser)
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.StartDoctypeDeclHandler = _refuse_doctype
    try:
        parser.Parse(domain, True)
    except expat.ExpatError as exc:
        raise HookError(f"the domain is not well-formed XML: {exc}") from None
    return reader.interfaces


def requested_names(vmi_json: str) -> tuple[str, ...]:
    """The interface names the VMI's annotation asks trust for; HookError if malformed."""
    try:
        vmi = json.loads(vmi_json)
    except ValueError as exc:
        raise HookError(f"the VMI is not JSON: {exc}") from None
    metadata = vmi.get("metadata") if isinstance(vmi, dict) else None
    if not isinstance(metadata, dict):
        raise HookError("the VMI has no metadata object")
    annotations = metadata.get("annotations", {})
    if not isinstance(annotations, dict):
        raise HookError("the VMI's metadata.annotations is not an object")
    value = annotations.get(ANNOTATION)
    if value is None:
        return ()
    if not isinstance(value, str):
        raise HookError(f"annotation {ANNOTATION} is not a string")
    names = [part.strip() for part in value.split(",")]
    bad = [name for name in names if not NAME.match(name)]
    if bad:
        raise HookError(
            f"annotation {ANNOTATION}={value!r}: {bad[0]!r} is not an interface name "
            "(want a comma-separated list of VMI interface names)"
        )
    return tuple(dict.fromkeys(names))


def trust(domain: bytes, names: tuple[str, ...]) -> Outcome:
    """The domain with trustGuestRxFilters='yes' on the NICs aliased ua-NAME, NAME in names."""
    interfaces = read_interfaces(domain)
    wanted = {ALIAS_PREFIX + name: name for name in names}
    notes: list[str] = []
    edits: list[tuple[int, int, bytes]] = []
    for nic in interfaces:
        if nic.alias not in wanted:
            continue
        where = f"interface {wanted[nic.alias]} (alias {nic.alias}, target {nic.target})"
        if nic.trust == "yes":
            notes.append(f"{where}: trustGuestRxFilters is yes already")
            continue
        tag = START_TAG.match(domain, nic.offset)
        if tag is None:
            raise HookError(f"{where}: cannot find its start tag at byte {nic.offset}")
        attrs_start, attrs_end = tag.span("attrs")
        attrs = domain[attrs_start:attrs_end]
        if nic.trust is None:
            new_attrs = b" " + ATTRIBUTE.encode() + b'="yes"' + attrs
            notes.append(f"{where}: trustGuestRxFilters set to yes")
        else:
            new_attrs = TRUST_ATTR.sub(lambda m: m.group(1) + b'"yes"', attrs, count=1)
            notes.append(
                f"{where}: trustGuestRxFilters was {nic.trust!r}, set to yes "
                "(the annotation is the operator's intent)"
            )
        edits.append((attrs_start, attrs_end, new_attrs))
    found = {nic.alias for nic in interfaces}
    aliases = ", ".join(sorted(a for a in found if a)) or "none"
    for alias, name in wanted.items():
        if alias not in found:
            notes.append(f"interface {name} is not in the domain (aliases: {aliases}); skipped")
    out = domain
    for start, end, new in sorted(edits, reverse=True):
        out = out[:start] + new + out[end:]
    if edits:
        _check(out, {alias for alias in wanted if alias in found})
    return Outcome(out, tuple(notes))


def _check(domain: bytes, aliases: set[str]) -> None:
    """The edited domain still parses and every named NIC in it now has trust yes."""
    untrusted = [
        str(nic.alias)
        for nic in read_interfaces(domain)
        if nic.alias in aliases and nic.trust != "yes"
    ]
    if untrusted:
        raise HookError(f"the edit did not take on {', '.join(untrusted)}")


def run(vmi_json: str, domain: bytes) -> Outcome:
    """The hook's whole decision; never raises: any failure leaves the domain as it came."""
    try:
        names = requested_names(vmi_json)
        if not names:
            return Outcome(domain, (f"no {ANNOTATION} annotation: domain unchanged",))
        return trust(domain, names)
    except HookError as exc:
        return Outcome(domain, (f"{exc}: domain unchanged",))
    except Exception as exc:  # a bug here must not stop the VM from starting
        return Outcome(domain, (f"unexpected {type(exc).__name__}: {exc}: domain unchanged",))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onDefineDomain", add_help=False, exit_on_error=False)
    parser.add_argument("--vmi")
    parser.add_argument("--domain")
    try:
        # Unknown arguments are ignored: a later shim may pass more.
        args, _ = parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        print(f"{PREFIX}{exc}", file=sys.stderr)
        return 1
    if args.domain is None:
        print(f"{PREFIX}no --domain given: nothing to print", file=sys.stderr)
        return 1
    # The argument's bytes exactly as the shim passed them, whatever the locale.
    domain = os.fsencode(args.domain)
    outcome = run(args.vmi if args.vmi is not None else "", domain)
    for note in outcome.notes:
        print(f"{PREFIX}{note}", file=sys.stderr)
    sys.stdout.buffer.write(outcome.domain)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
