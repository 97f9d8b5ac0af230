"""The Kubernetes manifests (k8s/), checked without a cluster: every overlay renders with
``kubectl kustomize``, validates against the Kubernetes API schema offline (kubernetes-validate
--strict) and passes yamllint; the grace period covers the drain the ConfigMap configures; every
setting, port and path the manifests use exists in the node; the balancer's nginx.conf is the
project template's rendering. The kubelet rehearsal is tests/test_k8s_rehearsal.py, the image
tests/test_k8s_image.py; both use the helpers here.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from roomcast import config as config_module
from roomcast.service.auth import KeyFile, parse_secrets
from roomcast.service.server import ApiKeys
from roomcast.tools.balancer import find_nginx
from tests.harness import ROOT, NodeProcess

K8S = ROOT / "k8s"
#: The oldest Kubernetes release the manifests are meant for (matchLabelKeys and
#: nodeTaintsPolicy in topology spread are on by default from 1.27) and the newest whose schema
#: kubernetes-validate ships: both are checked.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
#: Resources of API groups whose schema Kubernetes does not ship (CRDs): checked by hand below.
CRD_GROUPS = ("monitoring.coreos.com/",)
#: Overlays as committed, and the production variant with the optional components swapped in
#: (the Ingress instead of the balancer, and the ServiceMonitor), as a team would enable them.
OVERLAYS = ("dev", "production", "production-ingress")
#: The grace period must cover: the drain delay, the window, the closing handshakes (close
#: timeout), then shutdown's own bounded waits (listener close, and the backends twice the close
#: timeout: app.Node.shutdown), plus this for the hook's start and a loaded machine.
GRACE_SLACK = 5.0
#: Secrets the tests put where an operator puts the production ones.
TEST_SECRETS = {
    "admin-token": "test-admin-token-0123456789abcdef0123",
    "api-keys": "test-api-key-0123456789abcdef0123456789",
    "jwt-secrets": "test-only-hmac-secret-0123456789abcdef",
    "redis-url": "rediss://:password@redis.example.com:6380/0",
}


# --- rendering ------------------------------------------------------------------------------

def kubectl() -> str:
    """The kubectl binary; a clear failure when it is missing."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not installed: the k8s tests render the overlays with "
                    "`kubectl kustomize` (offline); install kubectl (e.g. apt-get install "
                    "kubectl from the Kubernetes apt repository)")
    return found


def prepare_tree(dest: Path, secrets: Mapping[str, str] = TEST_SECRETS) -> Path:
    """A copy of k8s/ in ``dest`` with production secret files written and the variant overlay
    ``production-ingress`` added; returns the copy's root."""
    tree = dest / "k8s"
    shutil.copytree(K8S, tree)
    secret_dir = tree / "overlays" / "production" / "secrets"
    for name in ("admin-token", "api-keys", "jwt-secrets"):
        (secret_dir / name).write_text(secrets[name] + "\n")
    (secret_dir / "redis.env").write_text(f"redis-url={secrets['redis-url']}\n")
    variant = tree / "overlays" / "production-ingress"
    shutil.copytree(tree / "overlays" / "production", variant)
    kustomization = variant / "kustomization.yaml"
    text = kustomization.read_text()
    swapped = text.replace("  - ../../components/balancer\n",
                           "  - ../../components/ingress\n  - ../../components/servicemonitor\n")
    assert swapped != text, "the production overlay no longer lists the balancer component"
    kustomization.write_text(swapped)
    return tree


def render(overlay: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize overlay`` as a list of documents."""
    result = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tree(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: render(tree / "overlays" / name) for name in OVERLAYS}


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one document of ``kind`` (and ``name``; a generated name matches its prefix)."""
    matches = [d for d in docs if d["kind"] == kind and (
        name is None or d["metadata"]["name"] == name
        or re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", d["metadata"]["name"]))]
    assert len(matches) == 1, f"{len(matches)} {kind} named {name}"
    return matches[0]


def find_all(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def node_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == "node"]
    return dict(container)


def secret_data(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}


def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The environment the container starts with: its envFrom ConfigMaps, then its env
    (values, and secretKeyRef values from the rendered Secret)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secret_data(find(docs, "Secret", ref["name"]))[ref["key"]]
    return env


def mount_volumes(docs: list[dict[str, Any]], deployment: dict[str, Any], root: Path,
                  container: dict[str, Any] | None = None) -> dict[str, Path]:
    """What the kubelet mounts, under ``root``: each volumeMount's ConfigMap or Secret written
    as files (emptyDirs as empty directories). Returns mountPath -> the directory standing in."""
    container = container or node_container(deployment)
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mapped: dict[str, Path] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        where = root / mount["mountPath"].lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            files = find(docs, "ConfigMap", volume["configMap"]["name"])["data"]
        elif "secret" in volume:
            files = secret_data(find(docs, "Secret", volume["secret"]["secretName"]))
        else:
            files = {}
        for name, text in files.items():
            (where / name).write_text(text)
        mapped[mount["mountPath"]] = where
    return mapped


def map_paths(value: str, mapped: Mapping[str, Path | str]) -> str:
    """``value`` with a leading container path replaced by the local one standing in for it."""
    for container_path, local in sorted(mapped.items(), key=lambda item: -len(item[0])):
        if value == container_path or value.startswith(container_path.rstrip("/") + "/"):
            return str(local) + value[len(container_path.rstrip("/")):]
    return value


def pod_settings(docs: list[dict[str, Any]], root: Path) -> tuple[dict[str, str], Any]:
    """(environment, Config) of the node container of ``docs``' Deployment, its volumes
    mounted under ``root``: the settings the node would run with."""
    deployment = find(docs, "Deployment", "roomcast")
    mapped = mount_volumes(docs, deployment, root)
    env = {k: map_paths(v, mapped) for k, v in container_env(
        docs, node_container(deployment)).items()}
    return env, config_module.load_config(None, env)


def drain_bound(cfg: config_module.Config) -> float:
    """The longest a node with these settings takes from the start of a drain to its exit."""
    return cfg.drain_delay + cfg.drain_window + 4 * cfg.close_timeout + GRACE_SLACK


def port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a name or a number) as the container port number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs (from /proc), deepest first."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found = [*descendants(int(child)), int(child), *found]
    return found


# --- schema, lint -----------------------------------------------------------------------------

def test_every_overlay_validates_against_the_kubernetes_schema(
        tree: Path, rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Every overlay renders and every resource passes kubernetes-validate --strict for each
    stated Kubernetes version; CRDs are left to the hand checks (the only ones are listed)."""
    validator = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert validator, "kubernetes-validate is not installed (pip install -e '.[test]')"
    for overlay, docs in rendered.items():
        plain = [d for d in docs if not d["apiVersion"].startswith(CRD_GROUPS)]
        crds = [d["kind"] for d in docs if d["apiVersion"].startswith(CRD_GROUPS)]
        assert crds == (["ServiceMonitor"] if overlay == "production-ingress" else []), crds
        target = tmp_path / f"{overlay}.yaml"
        target.write_text(yaml.safe_dump_all(plain))
        for version in KUBERNETES_VERSIONS:
            result = subprocess.run(
                [validator, "--strict", "--quiet", "-k", version, str(target)],
                capture_output=True, text=True, timeout=120, check=False)
            assert result.returncode == 0 and "WARN" not in result.stdout + result.stderr, (
                f"{overlay} against Kubernetes {version}:\n{result.stdout}{result.stderr}")
    # The validator is strict indeed: an unknown field fails.
    bogus = tmp_path / "bogus.yaml"
    bogus.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Service",
                                     "metadata": {"name": "x"}, "spec": {"portz": []}}))
    result = subprocess.run([validator, "--strict", "--quiet", "-k", KUBERNETES_VERSIONS[0],
                             str(bogus)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode != 0, result.stdout


def test_the_servicemonitor_scrapes_the_internal_service(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The ServiceMonitor (a CRD, so not in kubernetes-validate's schemas) selects the internal
    Service by its labels and scrapes its port by name at the node's /metrics."""
    docs = rendered["production-ingress"]
    monitor = find(docs, "ServiceMonitor", "roomcast")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    internal = find(docs, "Service", "roomcast-internal")
    labels = internal["metadata"]["labels"]
    selected = [s for s in find_all(docs, "Service") if all(
        s["metadata"].get("labels", {}).get(k) == v
        for k, v in monitor["spec"]["selector"]["matchLabels"].items())]
    assert selected == [internal]
    assert labels["roomcast/service"] == "internal"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert endpoint["port"] in [p["name"] for p in internal["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"


def test_yamllint_passes_on_every_manifest() -> None:
    """yamllint (k8s/.yamllint) finds nothing in k8s/."""
    result = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c",
                             str(K8S / ".yamllint"), str(K8S)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_passes_on_the_python_in_k8s() -> None:
    """The hook and the nginx renderer under k8s/ are linted like the rest (./dev test's ruff
    covers node, tests and loadtest only)."""
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed (pip install -e '.[test]')"
    result = subprocess.run([ruff, "check", str(K8S)], capture_output=True, text=True,
                            timeout=60, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the drain and the grace period ---------------------------------------------------------

def test_the_grace_period_covers_the_drain_the_configmap_sets(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """In every overlay terminationGracePeriodSeconds >= drain delay + drain window +
    4 x close timeout + slack, from the ConfigMap values the Deployment really uses."""
    for overlay, docs in rendered.items():
        deployment = find(docs, "Deployment", "roomcast")
        _, cfg = pod_settings(docs, tmp_path / overlay)
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        bound = drain_bound(cfg)
        assert grace >= bound, f"{overlay}: grace {grace} s < drain bound {bound} s"
    production = container_env(rendered["production"], node_container(
        find(rendered["production"], "Deployment", "roomcast")))
    # The production values are the node's defaults: the README's timeline holds.
    assert (production["ROOMCAST_DRAIN_DELAY"], production["ROOMCAST_DRAIN_WINDOW"],
            production["ROOMCAST_CLOSE_TIMEOUT"]) == ("5", "10", "5")


def test_the_prestop_hook_starts_the_drain_on_the_internal_port(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """preStop runs the hook from the mounted ConfigMap with the image's Python; the hook's
    file is the one in k8s/base/hooks; the admin token it needs is in the mounted Secret."""
    for overlay, docs in rendered.items():
        deployment = find(docs, "Deployment", "roomcast")
        container = node_container(deployment)
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["/opt/roomcast/bin/python", "/etc/roomcast/hooks/prestop.py"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        hooks = find(docs, "ConfigMap", volumes["hooks"]["configMap"]["name"])
        assert mounts["hooks"] == "/etc/roomcast/hooks"
        assert hooks["data"]["prestop.py"] == (K8S / "base/hooks/prestop.py").read_text()
        env = container_env(docs, container)
        token_file = Path(env["ROOMCAST_ADMIN_TOKEN_FILE"])
        assert str(token_file.parent) == mounts["secrets"]
        secret = find(docs, "Secret", volumes["secrets"]["secret"]["secretName"])
        assert token_file.name in secret_data(secret), overlay


# --- the node has what the manifests use ------------------------------------------------------

def test_every_setting_the_manifests_use_exists_in_the_node(
        rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Every ROOMCAST_* variable is a Config field and a `roomcast node` flag, the values
    (secret files included, mounted as the kubelet would) are valid for the node, and the ports
    it binds are the container ports."""
    help_text = " ".join(subprocess.run(
        [sys.executable, "-m", "roomcast", "node", "--help"], capture_output=True, text=True,
        timeout=30, check=True, cwd=ROOT).stdout.split())
    fields = {f.name for f in dataclasses.fields(config_module.Config)}
    for overlay, docs in rendered.items():
        container = node_container(find(docs, "Deployment", "roomcast"))
        env = container_env(docs, container)
        for name in env:
            assert name.startswith(config_module.ENV_PREFIX), name
            field = name.removeprefix(config_module.ENV_PREFIX).lower()
            assert field in fields, f"{overlay}: {name} is not a node setting"
            assert f"--{field.replace('_', '-')} " in help_text, name
            assert f"env {name}," in help_text, name
        _, cfg = pod_settings(docs, tmp_path / overlay)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"client": cfg.port, "internal": cfg.api_port}, overlay
        assert cfg.host == cfg.api_host == "0.0.0.0"
        assert cfg.log_format == "json"
        assert cfg.clustered, f"{overlay}: no Redis URL"
        assert cfg.admin_token, f"{overlay}: no admin token for the preStop hook"
        if overlay != "dev":
            assert cfg.auth == "jwt" and cfg.jwt_secret_file and cfg.api_key_file
        # The key files as the node reads them at start (each secret 32 characters or more).
        ApiKeys(cfg).load()
        assert cfg.jwt_secret_file
        KeyFile(cfg.jwt_secret_file, "--jwt-secret-file", parse_secrets, time.monotonic).load()


@pytest.fixture(scope="module")
def live_node() -> Iterator[NodeProcess]:
    node = NodeProcess(None, "--admin-token", "t")
    node.start()
    try:
        yield node
    finally:
        node.kill()


def http_status(url: str, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def handshake_status(url: str) -> int:
    """The status of a WebSocket opening handshake (RFC 6455 section 4.1) to ``url``."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=5)
    try:
        connection.request("GET", f"{parts.path}?user_id=probe", headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        return connection.getresponse().status
    finally:
        connection.close()


def test_every_path_the_manifests_use_is_served_on_its_port(
        rendered: dict[str, list[dict[str, Any]]], live_node: NodeProcess) -> None:
    """The probes' paths answer 200 on the port they name (a real node), the Services route
    to the container's ports by name, the Ingress sends only client-port routes, and the
    ServiceMonitor's path is served on the internal port."""
    base = {8000: live_node.http, 9000: live_node.api}
    for overlay, docs in rendered.items():
        deployment = find(docs, "Deployment", "roomcast")
        container = node_container(deployment)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            port = port_number(container, get["port"])
            assert port == 9000, f"{overlay}: {probe} is not on the internal port"
            assert http_status(base[port] + get["path"]) == 200, (overlay, probe)
        names = {p["name"] for p in container["ports"]}
        for service in find_all(docs, "Service"):
            if service["spec"]["selector"].get("app.kubernetes.io/component") == "node":
                for port in service["spec"]["ports"]:
                    assert port["targetPort"] in names, (service["metadata"]["name"], port)
        for ingress in find_all(docs, "Ingress"):
            for rule in ingress["spec"]["rules"]:
                for path in rule["http"]["paths"]:
                    backend = path["backend"]["service"]
                    assert (backend["name"], backend["port"]["name"]) == ("roomcast", "client")
                    served = {"/": 200, "/healthz": 200, "/api": 200, "/ws": 101,
                              "/ws/chat": 101}[path["path"]]
                    probe_path = {"/api": "/api/stats", "/ws/chat": "/ws/chat/lobby"}.get(
                        path["path"], path["path"])
                    assert handshake_status(live_node.http + probe_path) == 101 if (
                        served == 101) else http_status(live_node.http + probe_path) == 200
        for monitor in find_all(docs, "ServiceMonitor"):
            for endpoint in monitor["spec"]["endpoints"]:
                assert http_status(live_node.api + endpoint["path"]) == 200
    # What must never be reachable through the client port.
    assert http_status(live_node.http + "/metrics") == 404
    assert http_status(live_node.http + "/admin/drain", "POST") == 405


# --- the shape the issue asks for ---------------------------------------------------------------

def test_the_node_deployment_rolls_one_pod_at_a_time_and_runs_locked_down(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Surge 1 / unavailable 0, a non-root read-only container without capabilities, spread
    over zones and hosts, with requests and limits, and an HPA of at least 3 in production."""
    for docs in rendered.values():
        deployment = find(docs, "Deployment", "roomcast")
        spec = deployment["spec"]
        assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {
            "maxUnavailable": 0, "maxSurge": 1}}
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["automountServiceAccountToken"] is False
        container = node_container(deployment)
        assert "command" not in container and "args" not in container  # the image's ENTRYPOINT
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
        pdb = find(docs, "PodDisruptionBudget", "roomcast")
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    production = rendered["production"]
    assert "replicas" not in find(production, "Deployment", "roomcast")["spec"]  # HPA-owned
    hpa = find(production, "HorizontalPodAutoscaler", "roomcast")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] >= 3
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 1800
    assert find(rendered["dev"], "Deployment", "roomcast")["spec"]["replicas"] == 2


def test_a_changed_setting_or_secret_rolls_the_pods(tree: Path, tmp_path: Path) -> None:
    """The ConfigMaps and the Secret have hashed names that the pod template refers to: a
    changed value changes the template, so `kubectl apply` rolls the pods."""
    before = find(render(tree / "overlays" / "production"), "Deployment", "roomcast")
    changed = prepare_tree(tmp_path, {**TEST_SECRETS, "admin-token": "another-token-12345"})
    after = find(render(changed / "overlays" / "production"), "Deployment", "roomcast")
    assert before["spec"]["template"] != after["spec"]["template"]
    env_file = changed / "base" / "config.env"
    env_file.write_text(env_file.read_text().replace("ROOMCAST_LOG_LEVEL=info",
                                                     "ROOMCAST_LOG_LEVEL=warning"))
    again = find(render(changed / "overlays" / "production"), "Deployment", "roomcast")
    assert again["spec"]["template"] != after["spec"]["template"]


def test_redis_runs_in_the_cluster_for_dev_only(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """dev: one Redis StatefulSet with a PVC, persistence off, reachable from node pods only;
    production: no Redis pod at all, the URL is the operator's, from the Secret."""
    dev = rendered["dev"]
    redis = find(dev, "StatefulSet", "roomcast-redis")
    assert redis["spec"]["volumeClaimTemplates"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    policy = find(dev, "NetworkPolicy", "roomcast-redis")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "roomcast", "app.kubernetes.io/component": "node"}}}]
    dev_env = container_env(dev, node_container(find(dev, "Deployment", "roomcast")))
    assert dev_env["ROOMCAST_REDIS_URL"] == "redis://roomcast-redis:6379/0"
    for overlay in ("production", "production-ingress"):
        docs = rendered[overlay]
        assert not find_all(docs, "StatefulSet")
        assert not any("redis" in d["metadata"]["name"] for d in docs)
        env = container_env(docs, node_container(find(docs, "Deployment", "roomcast")))
        assert env["ROOMCAST_REDIS_URL"] == TEST_SECRETS["redis-url"]


def test_network_policies_open_the_client_port_and_guard_the_internal_one(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Node pods: the client port from anywhere, the internal port only from pods labelled
    roomcast/api-client: "true" (and, with the ServiceMonitor, Prometheus)."""
    for docs in rendered.values():
        policy = find(docs, "NetworkPolicy", "roomcast-node")
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        client, internal = policy["spec"]["ingress"]
        assert client == {"ports": [{"port": "client", "protocol": "TCP"}]}
        assert internal["ports"] == [{"port": "internal", "protocol": "TCP"}]
        assert internal["from"] == [{"namespaceSelector": {}, "podSelector": {
            "matchLabels": {"roomcast/api-client": "true"}}}]
        others = [p for p in find_all(docs, "NetworkPolicy")
                  if p["spec"]["podSelector"] == policy["spec"]["podSelector"] and p is not policy]
        for other in others:  # Only the ServiceMonitor's, for Prometheus on the internal port.
            assert other["metadata"]["name"] == "roomcast-metrics"
            assert [p["port"] for r in other["spec"]["ingress"] for p in r["ports"]] == [
                "internal"]


def test_the_ingress_keeps_websockets_open_and_terminates_tls(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """ingress-nginx: read and send timeouts of an hour or more, a draining pod's 503 retried,
    TLS from a Secret (cert-manager), and only the client Service behind it."""
    ingress = find(rendered["production-ingress"], "Ingress", "roomcast")
    notes = ingress["metadata"]["annotations"]
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{name}"]) >= 3600
    assert "http_503" in notes["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    assert "non_idempotent" not in notes["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    assert "cert-manager.io/cluster-issuer" in notes
    assert ingress["spec"]["tls"][0]["secretName"] == "roomcast-tls"
    assert ingress["spec"]["ingressClassName"] == "nginx"


# --- the balancer -------------------------------------------------------------------------------

def load_renderer() -> Callable[..., str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("k8s_render_nginx", K8S / "render_nginx.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    renderer: Callable[..., str] = module.render
    return renderer


def test_the_balancer_config_is_the_template_rendered_for_kubernetes(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    """k8s/components/balancer/nginx.conf is exactly what k8s/render_nginx.py makes from
    roomcast.tools.balancer.render() today, and the ConfigMap the balancer mounts holds it."""
    committed = (K8S / "components/balancer/nginx.conf").read_text()
    assert committed == load_renderer()(), (
        "k8s/components/balancer/nginx.conf is stale: run python k8s/render_nginx.py")
    for overlay in ("dev", "production"):
        docs = rendered[overlay]
        balancer = find(docs, "Deployment", "roomcast-balancer")
        volumes = {v["name"]: v for v in balancer["spec"]["template"]["spec"]["volumes"]}
        conf = find(docs, "ConfigMap", volumes["config"]["configMap"]["name"])
        assert conf["data"]["nginx.conf"] == committed
        namespace = balancer["metadata"]["namespace"]
        assert f"roomcast-pods.{namespace}.svc.cluster.local:8000 resolve" in committed
        find(docs, "Service", "roomcast-pods")
    for overlay in ("production-ingress",):
        assert not [d for d in rendered[overlay] if "balancer" in d["metadata"]["name"]]


def test_nginx_accepts_the_balancer_config(tmp_path: Path) -> None:
    """nginx -t passes on the Kubernetes nginx.conf with its DNS upstream and paths pointed at
    loopback and a temp directory (the local nginx may predate `server ... resolve`, which
    nginx 1.27.3 brought to the open-source build; the image has 1.28)."""
    from roomcast.tools.balancer import ensure_dev_certificate

    nginx = find_nginx()
    conf = (K8S / "components/balancer/nginx.conf").read_text()
    _, cert, key = ensure_dev_certificate(tmp_path / "certs")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr
    found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    supports_resolve = found is not None and tuple(map(int, found.groups())) >= (1, 27, 3)
    if supports_resolve:
        conf = re.sub(r"resolver \S+ ", "resolver 127.0.0.1 ", conf)
    else:
        conf = re.sub(r"^ *(zone|resolver|resolver_timeout) .*;\n", "", conf, flags=re.M)
        conf = re.sub(r"server \S+ resolve", "server 127.0.0.1:1", conf)
    run = tmp_path / "run"
    run.mkdir()
    conf = conf.replace("/tmp/nginx", str(run))
    conf = conf.replace("/etc/roomcast-balancer/tls/tls.crt", str(cert))
    conf = conf.replace("/etc/roomcast-balancer/tls/tls.key", str(key))
    target = tmp_path / "nginx.conf"
    target.write_text(conf)
    result = subprocess.run([nginx, "-t", "-q", "-c", str(target), "-p", f"{run}/"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr


# --- the image (shared with tests/test_k8s_image.py and tests/test_k8s_rehearsal.py) ------------

DOCKERFILE = ROOT / "Dockerfile"


@dataclasses.dataclass
class Instruction:
    stage: int  # 0 for the first FROM's stage
    name: str  # upper case: FROM, RUN, COPY, ...
    args: str


def dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        name, _, args = line.partition(" ")
        if name.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, name.upper(), " ".join(args.split())))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def image_command(instructions: list[Instruction]) -> list[str]:
    """What the container runs with no command or args in the pod: ENTRYPOINT + CMD (exec
    form JSON, as the runtime reads them)."""
    import json

    stage = final_stage(instructions)
    (entrypoint,) = [json.loads(i.args) for i in stage if i.name == "ENTRYPOINT"]
    cmds = [json.loads(i.args) for i in stage if i.name == "CMD"]
    return [*entrypoint, *(cmds[-1] if cmds else [])]


def image_env(instructions: list[Instruction], base_path: str) -> dict[str, str]:
    """The final stage's ENV (``KEY=VALUE`` pairs; ``$PATH`` expands to ``base_path``)."""
    env: dict[str, str] = {}
    for instruction in final_stage(instructions):
        if instruction.name == "ENV":
            for pair in instruction.args.split():
                key, _, value = pair.partition("=")
                env[key] = value.replace("$PATH", base_path)
    return env
