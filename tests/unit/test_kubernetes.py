"""deploy/kubernetes: every manifest validates offline against the Kubernetes OpenAPI schemas (kubernetes-validate
ships them), and the manifests agree with each other and with the code: container commands parse with the project's
own parsers, the router discovers the workers' headless Service, probes hit the served ports, referenced Secrets,
ConfigMaps and claims exist, and the grace periods cover the drains."""

from __future__ import annotations

import argparse
import copy
import math
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFEST_DIR = ROOT / "deploy" / "kubernetes"
# Validated against the oldest version the manifests target (native gRPC probes are GA since 1.27; 1.30 is the
# oldest upstream-supported minor at the time of writing) and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "latest")
NAMESPACE = "llamagrid"
CLUSTER_DOMAIN = "svc.cluster.local"
ROUTER_ENTRY = ["python", "-m", "router"]
WORKER_ENTRY = ["llamagrid", "worker"]
METRICS_PATH = "/metrics"


def _load() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted([*MANIFEST_DIR.glob("*.yaml"), *MANIFEST_DIR.glob("secrets/*.yaml")]):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((str(path.relative_to(ROOT)), doc))
    return docs


DOCS = _load()
RESOURCES = [doc for _, doc in DOCS]


def _find(kind: str, name: str) -> dict:
    found = [r for r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _pod_spec(kind: str, name: str) -> dict:
    return _find(kind, name)["spec"]["template"]["spec"]


def _container(kind: str, name: str, container: str) -> dict:
    (c,) = [c for c in _pod_spec(kind, name)["containers"] if c["name"] == container]
    return c


def _workloads() -> list[dict]:
    return [r for r in RESOURCES if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def _opt(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} must appear exactly once in {argv}"
    return argv[argv.index(flag) + 1]


def _split_worker_command(command: list[str]) -> tuple[list[str], list[str]]:
    """`llamagrid worker --supervise [supervisor args] -- <worker args>` -> (supervisor args, worker args)."""
    assert command[:2] == WORKER_ENTRY, command
    argv = command[2:]
    assert "--" in argv, "the worker command must separate supervisor and worker args with --"
    own, worker_args = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    assert "--supervise" in own, "workers run under the supervisor (restarts, heartbeats)"
    own.remove("--supervise")
    return own, worker_args


def _mounted_file(pod: dict, container: dict, path: str) -> tuple[dict, str]:
    """The volume (and key within it) that provides the file `path` in `container`."""
    for mount in container.get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            return volume, path[len(prefix):]
    raise AssertionError(f"{path} is not under any volume mount of container {container['name']}")


def _secret_keys(name: str) -> set[str]:
    secret = _find("Secret", name)
    return set(secret.get("data", {})) | set(secret.get("stringData", {}))


def _probe_window(probe: dict) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def _prestop_sleep(container: dict) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


# --- schemas -------------------------------------------------------------------------------------------------------


def test_manifests_found() -> None:
    kinds = {r["kind"] for r in RESOURCES}
    assert {"Namespace", "Deployment", "StatefulSet", "Service", "HorizontalPodAutoscaler", "Secret",
            "ConfigMap"} <= kinds


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("path", "doc"), DOCS, ids=[f"{p}:{d['kind']}/{d['metadata']['name']}" for p, d in DOCS])
def test_schema(path: str, doc: dict, version: str) -> None:
    import kubernetes_validate as kv
    if version == "latest":
        version = kv.utils.latest_version()
    # strict: unknown fields (typos such as `readinesProbe`) fail too
    try:
        kv.validate(copy.deepcopy(doc), version, strict=True)
    except kv.ValidationError as e:
        pytest.fail(f"{path}: {doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {e}")


def test_names_unique_and_namespaced() -> None:
    seen = set()
    for r in RESOURCES:
        key = (r["kind"], r["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        if r["kind"] != "Namespace":
            assert r["metadata"].get("namespace") == NAMESPACE, key
    _find("Namespace", NAMESPACE)


# --- wiring --------------------------------------------------------------------------------------------------------


def test_selectors_match_pod_templates() -> None:
    for w in _workloads():
        selector = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), w["metadata"]["name"]
    for r in RESOURCES:
        if r["kind"] == "Service":
            selector = r["spec"]["selector"]
        elif r["kind"] == "PodDisruptionBudget":
            selector = r["spec"]["selector"]["matchLabels"]
        elif r["kind"] == "NetworkPolicy":
            selector = r["spec"]["podSelector"]["matchLabels"]
            for rule in r["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    allowed = peer["podSelector"]["matchLabels"]
                    if "namespaceSelector" in peer:  # pods of another namespace (Prometheus): not in these manifests
                        assert allowed and peer["namespaceSelector"]["matchLabels"], "a whole namespace is admitted"
                        continue
                    assert any(allowed.items() <= w["spec"]["template"]["metadata"]["labels"].items()
                               for w in _workloads()), f"NetworkPolicy/{r['metadata']['name']} admits no pods"
        else:
            continue
        matches = [w for w in _workloads() if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert matches, f"{r['kind']}/{r['metadata']['name']} selects no pods"
        if r["kind"] == "Service":
            for port in r["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                for w in matches:
                    served = {(p.get("name"), p["containerPort"]) for c in w["spec"]["template"]["spec"]["containers"]
                              for p in c.get("ports", [])}
                    assert any(target in pair for pair in served), (r["metadata"]["name"], target, served)


def test_statefulset_governing_services_are_headless() -> None:
    for r in RESOURCES:
        if r["kind"] == "StatefulSet":
            assert _find("Service", r["spec"]["serviceName"])["spec"].get("clusterIP") == "None"


def test_referenced_secrets_configmaps_and_claims_exist() -> None:
    for w in _workloads():
        pod = w["spec"]["template"]["spec"]
        for v in pod.get("volumes", []):
            if "secret" in v:
                _find("Secret", v["secret"]["secretName"])
            if "configMap" in v:
                _find("ConfigMap", v["configMap"]["name"])
            if "persistentVolumeClaim" in v:
                _find("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for c in pod["containers"]:
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])} | claims, (w["metadata"]["name"], mounts)
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    assert ref["secretKeyRef"]["key"] in _secret_keys(ref["secretKeyRef"]["name"]), e
                if "configMapKeyRef" in ref:
                    assert ref["configMapKeyRef"]["key"] in _find("ConfigMap", ref["configMapKeyRef"]["name"])["data"]


def test_probes_target_served_ports() -> None:
    for w in _workloads():
        for c in w["spec"]["template"]["spec"]["containers"]:
            ports = {p["containerPort"] for p in c.get("ports", [])} | {p["name"] for p in c.get("ports", [])}
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                for action in ("grpc", "tcpSocket", "httpGet"):
                    if action in probe:
                        assert probe[action]["port"] in ports, (w["metadata"]["name"], c["name"], kind)
            if c["command"][:3] == ROUTER_ENTRY or c["command"][:2] == WORKER_ENTRY:
                assert "readinessProbe" in c and "livenessProbe" in c, c["name"]


# --- images --------------------------------------------------------------------------------------------------------


def test_router_and_workers_run_the_images_of_their_dockerfile_targets() -> None:
    """The router pods pull the `router` target (no torch: small, quick to scale out), the workers the `worker`
    target built with a CUDA torch; both of one release."""
    def image(deployment: str, container: str) -> tuple[str, str, str]:
        repository, tag = _container("Deployment", deployment, container)["image"].rsplit(":", 1)
        registry, name = repository.rsplit("/", 1)
        return registry, name, tag

    router_registry, router_name, router_tag = image("llamagrid-router", "router")
    worker_registry, worker_name, worker_tag = image("llamagrid-worker", "worker")
    assert (router_name, worker_name) == ("llamagrid-router", "llamagrid-worker")
    assert router_registry == worker_registry and worker_tag == f"{router_tag}-cuda"
    stages = re.findall(r"^FROM \S+ AS (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert {"router", "worker"} <= set(stages)


# --- the router ----------------------------------------------------------------------------------------------------


def _router_args() -> argparse.Namespace:
    from router.config import build_parser

    command = _container("Deployment", "llamagrid-router", "router")["command"]
    assert command[:3] == ROUTER_ENTRY, command
    return build_parser().parse_args(command[3:])


def test_router_command_builds_a_config(tmp_path: Path) -> None:
    """The args parse and make a valid RouterConfig (mounted files replaced by local stand-ins)."""
    from router.config import config_from_args

    args = _router_args()
    container = _container("Deployment", "llamagrid-router", "router")
    env = {e["name"]: _env_value(container, e, "x" * 32) for e in container.get("env", [])}
    for name in ("tls_cert", "tls_key", "internal_token_file"):
        stand_in = tmp_path / name
        stand_in.write_text("t" * 32)
        setattr(args, name, stand_in)
    config = config_from_args(args, env)
    assert config.host == "0.0.0.0"
    assert config.metrics_port == args.metrics_port
    assert config.tls_cert is not None and config.internal_token is not None
    assert config.key_pepper, "the key pepper must come from a Secret"
    assert config.redis_url, "the router needs the shared Redis (no embedded one in a cluster)"


def _env_value(container: dict, entry: dict, secret: str) -> str:
    """What the kubelet puts in an env var: its value, a container resource by the Downward API (rounded up in units
    of its divisor, as the kubelet rounds), or `secret` standing in for a Secret's."""
    if "value" in entry:
        return entry["value"]
    field = entry["valueFrom"].get("resourceFieldRef")
    if field is None:
        return secret
    kind, resource = field["resource"].split(".")
    return str(math.ceil(_cpus(container["resources"][kind][resource]) / _cpus(field.get("divisor", "1"))))


def _cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_router_processes_match_the_cpu_request() -> None:
    """One router process per requested CPU (python -m router --processes, default from the environment)."""
    from router.config import PROCESSES_ENV, config_from_args

    container = _container("Deployment", "llamagrid-router", "router")
    (entry,) = [e for e in container["env"] if e["name"] == PROCESSES_ENV]
    assert entry["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"
    assert _router_args().processes is None, "--processes on the command line would override the CPU request"
    processes = int(_env_value(container, entry, ""))
    assert processes == math.ceil(_cpus(container["resources"]["requests"]["cpu"])) >= 2
    args = _router_args()
    args.internal_token_file = args.tls_cert = args.tls_key = None
    assert config_from_args(args, {PROCESSES_ENV: str(processes)}).processes == processes


def test_router_finds_the_workers_headless_service() -> None:
    name, port = _router_args().workers_dns.rsplit(":", 1)
    service = _find("Service", "llamagrid-workers")
    assert name == f"{service['metadata']['name']}.{service['metadata']['namespace']}.{CLUSTER_DOMAIN}"
    assert service["spec"]["clusterIP"] == "None", "DNS must return one record per worker pod"
    assert not service["spec"].get("publishNotReadyAddresses", False), "warming replicas must stay out of DNS"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    worker_args = _split_worker_command(_container("Deployment", "llamagrid-worker", "worker")["command"])[1]
    assert int(port) == int(_opt(worker_args, "--port"))


def test_router_reaches_redis_service() -> None:
    container = _container("Deployment", "llamagrid-router", "router")
    url = _router_args().redis_url or {e["name"]: e.get("value") for e in container["env"]}["LLAMAGRID_REDIS_URL"]
    parts = urlsplit(url)
    service = _find("Service", "llamagrid-redis")
    name = service["metadata"]["name"]
    assert parts.hostname in (name, f"{name}.{NAMESPACE}.{CLUSTER_DOMAIN}")
    assert parts.port in {p["port"] for p in service["spec"]["ports"]}


def test_router_mounted_files() -> None:
    from ratelimit.tiers import parse_tiers

    args = _router_args()
    pod = _pod_spec("Deployment", "llamagrid-router")
    container = _container("Deployment", "llamagrid-router", "router")
    volume, key = _mounted_file(pod, container, str(args.tiers))
    tiers = parse_tiers(tomllib.loads(_find("ConfigMap", volume["configMap"]["name"])["data"][key]))
    assert tiers
    for path in (args.internal_token_file, args.tls_cert, args.tls_key):
        volume, key = _mounted_file(pod, container, str(path))
        assert key in _secret_keys(volume["secret"]["secretName"]), path
    tls_volume, _ = _mounted_file(pod, container, str(args.tls_cert))
    assert _find("Secret", tls_volume["secret"]["secretName"])["type"] == "kubernetes.io/tls"


def test_router_port_probes_and_grace() -> None:
    args = _router_args()
    pod = _pod_spec("Deployment", "llamagrid-router")
    container = _container("Deployment", "llamagrid-router", "router")
    assert args.port in {p["containerPort"] for p in container["ports"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.http_port
    for kind, path in (("readinessProbe", "/health/ready"), ("livenessProbe", "/health/live")):
        probe = container[kind]
        if args.tls_cert is not None:
            assert "grpc" not in probe, "Kubernetes' gRPC probes are plaintext: they fail against a TLS port"
        # the HTTP API's own probes, over HTTPS when the router has a certificate
        assert probe["httpGet"]["path"] == path and ports[probe["httpGet"]["port"]] == args.http_port
        assert probe["httpGet"]["scheme"] == ("HTTPS" if args.tls_cert is not None else "HTTP")
    assert pod["terminationGracePeriodSeconds"] >= _prestop_sleep(container) + args.drain_grace + 5


def test_router_autoscaler() -> None:
    hpa = _find("HorizontalPodAutoscaler", "llamagrid-router")
    target = hpa["spec"]["scaleTargetRef"]
    _find(target["kind"], target["name"])
    assert target["name"] == "llamagrid-router"
    assert 1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"]["maxReplicas"]
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"}
    assert "cpu" in resources
    # utilization targets are relative to requests: every container needs a CPU request
    for c in _pod_spec("Deployment", "llamagrid-router")["containers"]:
        assert "cpu" in c["resources"]["requests"], c["name"]


# --- the workers ---------------------------------------------------------------------------------------------------


def _worker_parts() -> tuple[argparse.Namespace, argparse.Namespace, list[str]]:
    from worker.config import build_parser as build_worker_parser
    from worker.supervisor.__main__ import build_parser as build_supervisor_parser

    own, worker_args = _split_worker_command(_container("Deployment", "llamagrid-worker", "worker")["command"])
    return build_supervisor_parser().parse_args(own), build_worker_parser().parse_args(worker_args), worker_args


def test_worker_command_builds_configs(tmp_path: Path) -> None:
    """The supervisor's args make a valid SupervisorConfig; the worker's a valid WorkerConfig and WorkerCommand."""
    from worker.config import config_from_args
    from worker.supervisor.supervisor import SupervisorConfig, WorkerCommand

    sup, wargs, worker_argv = _worker_parts()
    SupervisorConfig(heartbeat_timeout_s=sup.heartbeat_timeout, startup_grace_s=sup.startup_grace,
                     stop_timeout_s=sup.stop_timeout, kill_timeout_s=sup.kill_timeout,
                     backoff_initial_s=sup.backoff_initial, backoff_max_s=sup.backoff_max,
                     metrics_port=sup.metrics_port, metrics_host=sup.metrics_host)
    command = WorkerCommand.from_args(worker_argv)
    assert command.port == wargs.port == 50061 and command.num_ranks == wargs.tp
    token = tmp_path / "token"
    token.write_text("t" * 32)
    wargs.internal_token_file = token
    config = config_from_args(wargs)
    assert config.host == "0.0.0.0" and config.internal_token
    assert config.metrics_port == wargs.metrics_port
    assert config.inject_fault is None


def test_worker_gpus_match_tensor_parallel() -> None:
    _, wargs, _ = _worker_parts()
    resources = _container("Deployment", "llamagrid-worker", "worker")["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == wargs.tp
    assert int(resources["requests"].get("nvidia.com/gpu", wargs.tp)) == wargs.tp


def test_worker_mounted_files() -> None:
    _, wargs, _ = _worker_parts()
    pod = _pod_spec("Deployment", "llamagrid-worker")
    container = _container("Deployment", "llamagrid-worker", "worker")
    volume, key = _mounted_file(pod, container, str(wargs.internal_token_file))
    assert key in _secret_keys(volume["secret"]["secretName"])
    router_pod = _pod_spec("Deployment", "llamagrid-router")
    router_volume, router_key = _mounted_file(router_pod, _container("Deployment", "llamagrid-router", "router"),
                                              str(_router_args().internal_token_file))
    assert (volume["secret"]["secretName"], key) == (router_volume["secret"]["secretName"], router_key), \
        "router and workers must share one internal token"
    volume, _ = _mounted_file(pod, container, str(wargs.model))
    assert "persistentVolumeClaim" in volume or "hostPath" in volume
    if wargs.tp > 1:
        shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm, "tensor-parallel ranks need a larger /dev/shm"


def test_worker_probes_and_grace() -> None:
    sup, wargs, _ = _worker_parts()
    pod = _pod_spec("Deployment", "llamagrid-worker")
    container = _container("Deployment", "llamagrid-worker", "worker")
    assert wargs.port in {p["containerPort"] for p in container["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        # the worker port is plaintext: the kubelet's gRPC probe checks grpc.health.v1 service "" (NOT_SERVING
        # while loading, warming up or draining; the port is closed while the supervisor restarts the group)
        assert container[kind]["grpc"] == {"port": wargs.port, "service": ""}, kind
    # the first load may take the supervisor's whole startup grace
    assert _probe_window(container["startupProbe"]) >= sup.startup_grace
    # a supervised restart (backoff, kill, reload, warm-up) must not trip liveness
    assert _probe_window(container["livenessProbe"]) >= sup.backoff_max + sup.kill_timeout + sup.startup_grace
    # preStop sleep, then SIGTERM: rank 0 drains within --stop-timeout, the rest is killed after --kill-timeout
    assert pod["terminationGracePeriodSeconds"] >= _prestop_sleep(container) + sup.stop_timeout + sup.kill_timeout
    assert sup.stop_timeout > 30.0, "rank 0 drains for up to 30 s (WorkerConfig.drain_timeout_s)"


# --- metrics -------------------------------------------------------------------------------------------------------


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def _metrics_ports() -> dict[str, dict[str, int]]:
    """Deployment -> {container port name: port} for every /metrics its processes serve, each read from a real CLI
    flag (the parsers reject unknown ones) of the process that binds it, on every interface of the pod."""
    router = _router_args()
    assert router.host == "0.0.0.0"
    sup, wargs, _ = _worker_parts()
    assert sup.metrics_host == "0.0.0.0", "the supervisor's metrics listen on loopback by default"
    assert wargs.host == "0.0.0.0"  # the worker serves /metrics on its --host
    return {"llamagrid-router": {"metrics": router.metrics_port},
            "llamagrid-worker": {"metrics": wargs.metrics_port, "metrics-sup": sup.metrics_port}}


def test_metrics_flags_exist() -> None:
    from router.config import build_parser as router_parser
    from worker.config import build_parser as worker_parser
    from worker.supervisor.__main__ import build_parser as supervisor_parser

    assert "--metrics-port" in _option_strings(router_parser())
    assert "--metrics-port" in _option_strings(worker_parser())
    assert {"--metrics-port", "--metrics-host"} <= _option_strings(supervisor_parser())
    own, worker_args = _split_worker_command(_container("Deployment", "llamagrid-worker", "worker")["command"])
    assert "--metrics-host" in own and "--metrics-host" not in worker_args  # the worker has no such flag


def test_metrics_container_ports_and_annotations() -> None:
    for name, served in _metrics_ports().items():
        assert all(p not in (None, 0) for p in served.values()), f"{name}: metrics off or on a random port"
        assert len(set(served.values())) == len(served), f"{name}: two processes on one metrics port"
        (container,) = _pod_spec("Deployment", name)["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert {n: p for n, p in ports.items() if n.startswith("metrics")} == served, name
        assert "grpc" in ports and ports["grpc"] not in served.values()
        annotations = _find("Deployment", name)["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", name
        assert annotations["prometheus.io/path"] == METRICS_PATH, name
        assert int(annotations["prometheus.io/port"]) == served["metrics"] == ports["metrics"], name
        assert all(len(n) <= 15 for n in ports), "IANA_SVC_NAME: at most 15 characters"


def _policies_for(workload: str) -> list[dict]:
    labels = _find("Deployment", workload)["spec"]["template"]["metadata"]["labels"]
    return [r for r in RESOURCES if r["kind"] == "NetworkPolicy"
            and r["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]


def test_network_policies_admit_prometheus_to_the_metrics_ports_only() -> None:
    for name, served in _metrics_ports().items():
        policies = _policies_for(name)
        assert policies, f"{name}: no NetworkPolicy, its /metrics is open to every pod"
        rules = [rule for policy in policies for rule in policy["spec"]["ingress"]]
        for port in served.values():
            admitting = [rule for rule in rules if port in {p["port"] for p in rule.get("ports", [])}]
            assert admitting, f"{name}: Prometheus cannot scrape port {port}"
            for rule in admitting:
                assert rule.get("from"), f"{name}: metrics port {port} is open to everyone"
                for peer in rule["from"]:
                    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}, peer
                    assert "namespaceSelector" in peer
        for rule in rules:
            assert all("port" in p for p in rule.get("ports", [])), f"{name}: a rule opens every port"
    # the client port stays open to everyone: the router is the public entry
    router_rules = [rule for p in _policies_for("llamagrid-router") for rule in p["spec"]["ingress"]]
    for router_port in (_router_args().port, _router_args().http_port):
        assert any(not rule.get("from") and router_port in {p["port"] for p in rule["ports"]}
                   for rule in router_rules)
    # the worker's gRPC port: routers only
    worker_port = _worker_parts()[1].port
    for rule in [r for p in _policies_for("llamagrid-worker") for r in p["spec"]["ingress"]]:
        if worker_port in {p["port"] for p in rule["ports"]}:
            assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [
                {"app.kubernetes.io/name": "llamagrid-router"}]
