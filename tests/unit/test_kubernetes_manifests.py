"""deploy/kubernetes/ and deploy/kubevirt/example-vm.yaml: what the DaemonSet may do, as documented.

No cluster runs where the tests do. The manifests are YAML written as JSON, with
comments on lines of their own, so json reads exactly the values kubectl does and the
project needs no YAML parser; the first test holds every file to that form.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from rxfilterd import config
from tests.support.kubevirt_hook import load_hook

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
EXAMPLE_VM = REPO / "deploy" / "kubevirt" / "example-vm.yaml"
DOC = REPO / "docs" / "kubernetes.md"
CONFIG_FILE = "/etc/rxfilterd/rxfilterd.toml"
# The lead's [pods] table, key for key (issue 15).
PODS = {
    "enabled": True,
    "daemons": ["virtqemud", "libvirtd"],
    "sockets": [
        "/run/libvirt/virtqemud-sock",
        "/run/libvirt/libvirt-sock",
        "/var/run/libvirt/virtqemud-sock",
        "/var/run/libvirt/libvirt-sock",
    ],
    "scan_interval": 2.0,
}
HOOK_ANNOTATION = load_hook().ANNOTATION


def load(path: Path) -> Any:
    """The one document of a manifest: its lines but the comment lines, as JSON."""
    lines = path.read_text().splitlines()
    body = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    return json.loads(body)


def manifests() -> list[Path]:
    return [*sorted(KUBERNETES.glob("*.yaml")), EXAMPLE_VM]


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_every_manifest_is_json_with_comment_lines(path: Path) -> None:
    document = load(path)
    assert isinstance(document, dict) and document["kind"], path
    # YAML treats a tab or a "---" line differently from JSON: neither may appear.
    text = path.read_text()
    assert "\t" not in text and "\n---" not in text


@pytest.fixture(scope="module")
def kustomization() -> Any:
    return load(KUBERNETES / "kustomization.yaml")


@pytest.fixture(scope="module")
def daemonset() -> Any:
    return load(KUBERNETES / "daemonset.yaml")


@pytest.fixture(scope="module")
def pod(daemonset: Any) -> Any:
    return daemonset["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod: Any) -> Any:
    (only,) = pod["containers"]
    return only


def documented_capabilities() -> dict[str, str]:
    """The rows of docs/kubernetes.md's capabilities table: name -> reason."""
    text = DOC.read_text()
    section = text.split("\n## Capabilities\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.+?) \|", section, flags=re.MULTILINE)
    return dict(rows)


def test_the_kustomization_builds_every_object(kustomization: Any) -> None:
    assert kustomization["kind"] == "Kustomization"
    for name in kustomization["resources"]:
        assert (KUBERNETES / name).is_file(), name
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["rxfilterd.toml"]
    kinds = {load(KUBERNETES / name)["kind"] for name in kustomization["resources"]}
    assert kinds == {"Namespace", "ServiceAccount", "DaemonSet"}
    namespace = load(KUBERNETES / "namespace.yaml")
    assert namespace["metadata"]["name"] == kustomization["namespace"]
    # hostPID and these capabilities are refused below Pod Security's privileged level.
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"


def test_the_pod_sees_host_processes_and_nothing_more(pod: Any) -> None:
    assert pod["hostPID"] is True
    assert pod.get("hostNetwork", False) is False
    assert pod.get("hostIPC", False) is False
    assert not [v for v in pod["volumes"] if "hostPath" in v], "no host paths"
    assert pod["nodeSelector"] == {"kubevirt.io/schedulable": "true"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # Its own account, no API token: rxfilterd never talks to the API server.
    account = load(KUBERNETES / "serviceaccount.yaml")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert account["automountServiceAccountToken"] is False


def test_capabilities_are_exactly_the_documented_ones(container: Any) -> None:
    security = container["securityContext"]
    capabilities = security["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    added = capabilities["add"]
    assert len(added) == len(set(added))
    documented = documented_capabilities()
    assert set(added) == set(documented) == {"NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "DAC_OVERRIDE"}
    assert all(len(reason) > 40 for reason in documented.values()), documented
    assert security["privileged"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsUser"] == 0
    # Kubernetes refuses no_new_privs beside CAP_SYS_ADMIN (spelled so); unset, not false.
    assert "allowPrivilegeEscalation" not in security


def test_the_mqtt_host_level_is_the_node_not_the_pod(container: Any) -> None:
    [env] = [e for e in container["env"] if e["name"] == "RXFILTERD_CLIENT_ID"]
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_the_image_is_this_version_of_the_dockerfile(container: Any) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert container["image"] == f"rxfilterd:{version}"
    assert (REPO / "Dockerfile").is_file()
    assert container["args"] == ["--config", CONFIG_FILE]


def mounts(container: Any, pod: Any) -> dict[str, Any]:
    """mountPath -> the volume mounted there; every volume is mounted, every mount defined."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {m["name"] for m in container["volumeMounts"]}
    assert mounted == set(volumes), "a volume mounted nowhere, or a mount of no volume"
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


def test_the_config_file_comes_from_the_generated_configmap(
    container: Any, pod: Any, kustomization: Any
) -> None:
    mount, volume = mounts(container, pod)[str(PurePosixPath(CONFIG_FILE).parent)]
    assert mount["readOnly"] is True
    (generator,) = kustomization["configMapGenerator"]
    assert volume["configMap"]["name"] == generator["name"]
    # The generated ConfigMap's key is the file's name: the file the daemon is given.
    assert PurePosixPath(CONFIG_FILE).name in generator["files"]


def test_the_config_serves_pods_and_is_valid() -> None:
    data = tomllib.loads((KUBERNETES / "rxfilterd.toml").read_text())
    assert data["pods"] == PODS
    loaded = config.validate(data)
    assert loaded.log.format == "console"
    # No libvirt of the node's own: only the pods' are served.
    assert loaded.libvirt.uri == "" and loaded.pods.enabled


def test_what_the_daemon_writes_is_writable(container: Any, pod: Any) -> None:
    data = tomllib.loads((KUBERNETES / "rxfilterd.toml").read_text())
    socket_dir = str(PurePosixPath(data["status"]["socket"]).parent)
    by_path = mounts(container, pod)
    for path in (socket_dir, "/tmp"):
        mount, volume = by_path[path]
        assert "emptyDir" in volume and not mount.get("readOnly", False), path


def test_liveness_asks_the_running_daemon(container: Any) -> None:
    # `rxfilterd status` exits 1 when the daemon does not answer on its socket in 10 s.
    probe = container["livenessProbe"]
    assert probe["exec"]["command"] == ["rxfilterd", "status", "--config", CONFIG_FILE]
    assert probe["timeoutSeconds"] > 10
    assert "readinessProbe" not in container  # it serves nothing to route to


def test_the_example_vm_asks_the_shim_for_the_hook() -> None:
    vm = load(EXAMPLE_VM)
    template = vm["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    (sidecar,) = json.loads(annotations["hooks.kubevirt.io/hookSidecars"])
    # The shim takes its hook API version as --version; v1alpha3 lets it stop on migration.
    assert sidecar["args"] == ["--version", "v1alpha3"]
    assert "image" not in sidecar  # KubeVirt's own sidecar-shim image, which has python3
    assert sidecar["configMap"]["hookPath"] == "/usr/bin/onDefineDomain"
    key, name = sidecar["configMap"]["key"], sidecar["configMap"]["name"]
    # The docs' command makes exactly that ConfigMap from the hook script.
    command = f"create configmap {name} --from-file={key}=deploy/kubevirt/trust_hook.py"
    assert command in DOC.read_text()
    assert command in EXAMPLE_VM.read_text()
    # The trusted names are macvtap-bound interfaces of this VM.
    interfaces = {i["name"]: i for i in template["spec"]["domain"]["devices"]["interfaces"]}
    names = [n.strip() for n in annotations[HOOK_ANNOTATION].split(",")]
    assert names == ["lan"]
    assert all(interfaces[n]["binding"] == {"name": "macvtap"} for n in names)
    assert "binding" not in interfaces["default"]
