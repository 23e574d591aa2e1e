"""deploy/k8s (issue 7): the manifests parse and agree with the code, so they cannot drift.

No cluster: every YAML document is parsed and checked against `topics.specs`, the config
schema, the CLI and each other (images, Secrets, the Ray head Service, the Dockerfile).
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.frontdoor import frontdoor_topic_specs
from topics.config import Config, parse_config
from topics.specs import topic_specs

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
ROOT = K8S.parents[1]
CONFIG_KEY = "config.yaml"
PROVIDER_SECRET = "quotaflow-provider-keys"
TENANT_SECRET = "quotaflow-tenant-keys"
PLACEHOLDER = "REPLACE_ME"

# file -> the (apiVersion, kind) of its documents, in order.
KINDS: dict[str, list[tuple[str, str]]] = {
    "raycluster.yaml": [("ray.io/v1", "RayCluster")],
    "gateway.yaml": [("apps/v1", "Deployment")],
    "frontdoor.yaml": [("apps/v1", "Deployment"), ("v1", "Service")],
    "configmap.yaml": [("v1", "ConfigMap")],
    "secret.example.yaml": [("v1", "Secret")] * 3,
}
TOPIC_KIND = ("kafka.strimzi.io/v1beta2", "KafkaTopic")
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _docs(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert docs, f"{name}: no YAML documents"
    return docs


def _one(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def _config_map() -> dict[str, Any]:
    return _one("configmap.yaml", "ConfigMap")


def _config() -> Config:
    return parse_config(_config_map()["data"][CONFIG_KEY], source="deploy/k8s/configmap.yaml")


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = _pod(deployment)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def _env_secrets(container: dict[str, Any]) -> set[str]:
    return {ref["secretRef"]["name"] for ref in container.get("envFrom", []) if "secretRef" in ref}


def _secrets() -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["stringData"] for d in _docs("secret.example.yaml")}


def _ray_containers() -> list[dict[str, Any]]:
    spec = _one("raycluster.yaml", "RayCluster")["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def _command(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _config_path(deployment: dict[str, Any]) -> str:
    """Where the pod sees configmap.yaml's config file."""
    cm_name = _config_map()["metadata"]["name"]
    volumes = [
        v["name"]
        for v in _pod(deployment)["volumes"]
        if v.get("configMap", {}).get("name") == cm_name
    ]
    assert len(volumes) == 1, "the pod must mount the quotaflow ConfigMap once"
    mounts = [m for m in _container(deployment)["volumeMounts"] if m["name"] == volumes[0]]
    assert len(mounts) == 1
    return f"{mounts[0]['mountPath'].rstrip('/')}/{CONFIG_KEY}"


def _option(argv: list[str], option: str) -> str:
    assert option in argv, f"{option} missing from {argv}"
    return argv[argv.index(option) + 1]


# -- every file --------------------------------------------------------------------------


def test_every_manifest_parses_with_the_expected_kinds() -> None:
    files = {p.name for p in K8S.glob("*.yaml")}
    assert files == {*KINDS, "kafka-topics.yaml"}, "a manifest without a check (or a lost one)"
    for name, kinds in KINDS.items():
        docs = _docs(name)
        assert [(d["apiVersion"], d["kind"]) for d in docs] == kinds, name
    topics = _docs("kafka-topics.yaml")
    assert {(d["apiVersion"], d["kind"]) for d in topics} == {TOPIC_KIND}
    for d in [doc for name in KINDS for doc in _docs(name)] + topics:
        assert DNS_1123.match(d["metadata"]["name"]), d["metadata"]["name"]


def test_quotaflow_resources_share_one_namespace() -> None:
    namespaces = {d["metadata"].get("namespace") for name in KINDS for d in _docs(name)}
    assert len(namespaces) == 1, namespaces
    assert None not in namespaces


def test_the_configmaps_config_parses() -> None:
    config = _config()
    assert not config.topics.create_missing, "Strimzi owns the topics: create_missing: false"


# -- topics --------------------------------------------------------------------------------


def test_kafka_topics_are_exactly_the_topic_specs() -> None:
    config = _config()
    reply_topic = _option(
        _command(_container(_one("frontdoor.yaml", "Deployment"))), "--reply-topic"
    )
    wanted = {s.name: s for s in topic_specs(config) + frontdoor_topic_specs(config, reply_topic)}
    assert reply_topic in wanted
    manifests = {d["spec"]["topicName"]: d for d in _docs("kafka-topics.yaml")}
    assert sorted(manifests) == sorted(wanted), "KafkaTopic names differ from topic_specs()"
    assert len(manifests) == len(_docs("kafka-topics.yaml")), "a topic is declared twice"
    for name, spec in wanted.items():
        got = manifests[name]["spec"]
        assert got["partitions"] == spec.partitions, name
        assert got["replicas"] == spec.replication_factor, name
        assert {k: str(v) for k, v in got.get("config", {}).items()} == spec.configs(), name
        internal = name.startswith(config.topics.internal_prefix)
        assert (got["config"]["cleanup.policy"] == "compact") == internal, name


def test_kafka_topics_belong_to_the_cluster_the_config_reaches() -> None:
    topics = _docs("kafka-topics.yaml")
    clusters = {d["metadata"]["labels"]["strimzi.io/cluster"] for d in topics}
    namespaces = {d["metadata"]["namespace"] for d in topics}
    assert len(clusters) == 1
    assert len(namespaces) == 1
    # Strimzi's bootstrap Service is <cluster>-kafka-bootstrap in the cluster's namespace.
    bootstrap = f"{clusters.pop()}-kafka-bootstrap.{namespaces.pop()}."
    assert _config().kafka.bootstrap_servers.startswith(bootstrap)


# -- the gateway and the Ray cluster ----------------------------------------------------------


def test_gateway_runs_quotaflow_run_against_the_ray_head_service() -> None:
    gateway = _one("gateway.yaml", "Deployment")
    container = _container(gateway)
    script = " ".join(_command(container))
    assert f"quotaflow run --config {_config_path(gateway)}" in script
    # `ray.init(address=...)` needs a local raylet: the pod joins as a node first.
    assert script.index('ray start --address="$RAY_ADDRESS"') < script.index("quotaflow run")
    rc = _one("raycluster.yaml", "RayCluster")
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    gcs_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "gcs-server")
    service = f"{rc['metadata']['name']}-head-svc.{rc['metadata']['namespace']}.svc.cluster.local"
    assert _env(container)["RAY_ADDRESS"]["value"] == f"{service}:{gcs_port}"


def test_gateway_never_overlaps_and_has_time_to_drain() -> None:
    gateway = _one("gateway.yaml", "Deployment")
    assert gateway["spec"]["replicas"] == 1
    assert gateway["spec"]["strategy"]["type"] == "Recreate"
    grace = _pod(gateway)["terminationGracePeriodSeconds"]
    assert grace > _config().gateway.drain_timeout_s


def test_every_pod_runs_the_same_image_with_the_pinned_ray() -> None:
    deployments = [_one(n, "Deployment") for n in ("gateway.yaml", "frontdoor.yaml")]
    containers = _ray_containers() + [_container(d) for d in deployments]
    images = {c["image"] for c in containers}
    assert len(images) == 1, images
    pins = re.findall(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert len(pins) == 1
    dockerfile = (K8S / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_VERSION={re.escape(pins[0])}$", dockerfile, re.MULTILINE)
    assert _one("raycluster.yaml", "RayCluster")["spec"]["rayVersion"] == pins[0]


def test_the_dockerfile_copies_every_packaged_source() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    sources = [*wheel["packages"], *wheel["force-include"], project["project"]["readme"]]
    copied: set[str] = set()
    for line in (K8S / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            args = [a for a in shlex.split(line)[1:] if not a.startswith("--")]
            copied.update(a.rstrip("/") for a in args[:-1])
    assert set(sources) <= copied, set(sources) - copied


# -- the front door ----------------------------------------------------------------------------


def test_frontdoor_serves_the_config_behind_its_service() -> None:
    door = _one("frontdoor.yaml", "Deployment")
    container = _container(door)
    argv = _command(container)
    assert argv[:2] == ["quotaflow", "serve"]
    assert _option(argv, "--config") == _config_path(door)
    port = int(_option(argv, "--port"))
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = _one("frontdoor.yaml", "Service")
    assert all(named[p["targetPort"]] == port for p in service["spec"]["ports"])
    assert service["spec"]["selector"] == door["spec"]["selector"]["matchLabels"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert _pod(door)["terminationGracePeriodSeconds"] > float(_option(argv, "--drain-timeout"))


# -- secrets ------------------------------------------------------------------------------------


def test_the_secret_example_provides_every_key_the_config_names() -> None:
    config, secrets = _config(), _secrets()
    assert {d.api_key_env for d in config.deployments} <= set(secrets[PROVIDER_SECRET])
    assert {t.api_key_env for t in config.tenants if t.api_key_env} <= set(secrets[TENANT_SECRET])
    for name, values in secrets.items():
        for key, value in values.items():
            assert value.startswith(PLACEHOLDER), f"{name}.{key} must be a placeholder"


@pytest.mark.parametrize(
    ("who", "needs", "never"),
    [
        ("ray", {PROVIDER_SECRET}, {TENANT_SECRET}),
        ("gateway", {PROVIDER_SECRET, TENANT_SECRET}, set()),
        ("frontdoor", {TENANT_SECRET}, {PROVIDER_SECRET}),
    ],
)
def test_each_pod_gets_the_keys_it_needs_and_no_others(
    who: str, needs: set[str], never: set[str]
) -> None:
    if who == "ray":
        containers = _ray_containers()
    else:
        containers = [_container(_one(f"{who}.yaml", "Deployment"))]
    secrets = _secrets()
    for container in containers:
        got = _env_secrets(container)
        assert needs <= got, (container["name"], got)
        assert not (never & got), (container["name"], got)
        for var in _env(container).values():
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:  # a single key: it must be in the example too
                assert ref["key"] in secrets[ref["name"]], (container["name"], ref)
