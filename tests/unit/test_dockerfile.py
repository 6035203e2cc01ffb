"""A small lint of the Dockerfile (no Docker engine runs where the tests do)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    comments: list[str] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with '\\' continuations joined and the comment block just above each."""
    out: list[Instruction] = []
    comments: list[str] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf:
            if not line:
                comments = []
                continue
            if line.startswith("#"):
                comments.append(line.lstrip("#").strip())
                continue
            start = number
        elif line.startswith("#"):
            continue  # comments inside a continued instruction are dropped by Docker too
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        keyword, _, args = " ".join(b for b in buf if b).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start, comments))
        buf, comments = [], []
    assert not buf, "Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def by(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def test_base_images_pinned(instructions: list[Instruction]) -> None:
    froms = by(instructions, "FROM")
    assert froms
    stages: set[str] = set()
    for ins in froms:
        image = next(w for w in ins.args.split() if not w.startswith("--"))
        if image in stages:
            continue  # FROM <earlier stage>
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag, f"line {ins.line}: {image} has no tag"
        assert tag != "latest", f"line {ins.line}: {image} uses latest"
        assert "bookworm" in tag or tag == "digest", f"line {ins.line}: not bookworm"
        words = ins.args.split()
        if len(words) >= 3 and words[-2].upper() == "AS":
            stages.add(words[-1])


def test_entrypoint_and_cmd_exec_form(instructions: list[Instruction]) -> None:
    (entry,) = by(instructions, "ENTRYPOINT")
    assert json.loads(entry.args) == ["rxfilterd"]
    (cmd,) = by(instructions, "CMD")
    assert json.loads(cmd.args) == ["--config", "/etc/rxfilterd/rxfilterd.toml"]


def test_no_add_of_urls(instructions: list[Instruction]) -> None:
    for ins in by(instructions, "ADD"):
        assert not re.search(r"\b(https?|ftp)://|git@", ins.args), f"line {ins.line}"


def test_apt_lists_cleaned_in_same_run(instructions: list[Instruction]) -> None:
    apt_runs = [
        i for i in by(instructions, "RUN") if re.search(r"apt-get (install|build-dep)", i.args)
    ]
    assert apt_runs, "expected apt-get for the build dependencies and the package"
    for ins in apt_runs:
        assert "apt-get update" in ins.args, f"line {ins.line}: stale lists"
        assert "--no-install-recommends" in ins.args, f"line {ins.line}"
        assert "rm -rf /var/lib/apt/lists/*" in ins.args, f"line {ins.line}: lists kept"


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The instructions of each stage, FROM first."""
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            out.append([])
        assert out, f"line {ins.line}: {ins.keyword} before FROM"
        out[-1].append(ins)
    return out


def build_deb_sources() -> list[str]:
    """What scripts/build-deb packs into the source tree it builds from."""
    script = (REPO / "scripts" / "build-deb").read_text()
    match = re.search(r'tar -C "\$REPO"[^\n]*-c \\\n\s*([^|]+)\|', script)
    assert match, "scripts/build-deb no longer packs its sources with tar -c"
    return match.group(1).split()


def test_built_by_build_deb_from_every_source_it_packs(instructions: list[Instruction]) -> None:
    build = stages(instructions)[0]
    runs = [i.args for i in build if i.keyword == "RUN"]
    assert any(re.search(r"(^|\s)scripts/build-deb \S+", r) for r in runs), runs
    assert any("apt-get build-dep" in r and "./" in r.split() for r in runs), runs
    copied = {
        Path(source).as_posix()
        for i in build
        if i.keyword == "COPY"
        for source in [w for w in i.args.split() if not w.startswith("--")][:-1]
    }
    for source in [*build_deb_sources(), "scripts/build-deb"]:
        assert source in copied, f"the build stage lacks {source}, which build-deb packs"


def test_final_stage_installs_the_package_with_apt(instructions: list[Instruction]) -> None:
    final = stages(instructions)[-1]
    copies = [i.args.split() for i in final if i.keyword == "COPY"]
    assert [c[0] for c in copies] == ["--from=build"], copies
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert re.search(r"apt-get install [^&]*\./rxfilterd_\*\.deb", runs), runs
    # Everything comes from the package: no pip, nothing built here.
    assert not re.search(r"\bpip3?\b|build-deb|build-dep", runs), runs


def test_build_deps_not_in_final_stage(instructions: list[Instruction]) -> None:
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    final = " ".join(ins.args for ins in instructions[last_from:] if ins.keyword == "RUN")
    for pkg in ("libvirt-dev", "gcc", "pkg-config"):
        assert not re.search(rf"install[^&]*\b{re.escape(pkg)}\b", final), pkg


def test_healthcheck_or_reason(instructions: list[Instruction]) -> None:
    checks = by(instructions, "HEALTHCHECK")
    assert len(checks) == 1
    if checks[0].args.upper() == "NONE":
        assert " ".join(checks[0].comments), "HEALTHCHECK NONE needs a comment saying why"
    else:
        assert checks[0].args.upper().startswith(("CMD ", "--"))
