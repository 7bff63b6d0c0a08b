"""compose/: the stack's files checked without a Docker engine.

The compose files are validated against the Compose Specification JSON schema (the copy that check-jsonschema
vendors), then every command is parsed by the project's own argparse parsers (and turned into the real config
objects, secrets and config files mapped to their sources in compose/), and ports, hosts, volumes, health checks,
dependencies and GPU reservations are cross-checked. The health probe the image installs is run against a real
grpc.health.v1 server.
"""

from __future__ import annotations

import copy
import json
import re
import runpy
import shlex
import socket
import tomllib
from concurrent import futures
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlparse

import grpc
import jsonschema
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llamagrid.cli import EXTRA_OF_COMMAND
from llamagrid.cli import build_parser as cli_parser
from router.config import build_parser as router_parser
from router.config import config_from_args as router_config
from worker.config import build_parser as worker_parser
from worker.config import config_from_args as worker_config
from worker.supervisor.__main__ import build_parser as supervisor_parser
from worker.supervisor.__main__ import split_argv
from worker.supervisor.supervisor import SupervisorConfig, WorkerCommand

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
BASE = COMPOSE / "docker-compose.yml"
GPU = COMPOSE / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROBE = COMPOSE / "healthcheck.py"
PROBE_IN_IMAGE = "llamagrid-healthcheck"
PROMETHEUS_CONFIG = COMPOSE / "prometheus.yml"
OBSERVABILITY = "observability"
# What the shell of `docker compose` would supply; LLAMAGRID_CHECKPOINT has no default (`:?`) by design.
ENV = {"LLAMAGRID_CHECKPOINT": "/srv/models/Llama-2-7b-chat-hf"}
WORKERS = ("worker-1", "worker-2")
VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(node, env: dict[str, str]):
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` interpolation over a parsed file."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match) -> str:
        value = env.get(m["name"])
        if m["op"] and m["op"].endswith("-"):
            return value if value else m["arg"]
        if m["op"] and m["op"].endswith("?"):
            assert value, f"${{{m['name']}}} is required: {m['arg']}"
        return value or ""

    return VAR.sub(sub, node)


def load(path: Path, env: dict[str, str] = ENV) -> dict:
    return interpolate(yaml.safe_load(path.read_text()), env)


def _target(volume: str | dict) -> str:
    return volume["target"] if isinstance(volume, dict) else volume.split(":")[1]


def merge(base: dict, override: dict) -> dict:
    """`docker compose -f base -f override` for the keys these files use: mappings merge, command and
    healthcheck.test are replaced, volumes merge by container path, other sequences are replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key == "volumes" and isinstance(value, list):
            kept = [v for v in out.get(key, []) if _target(v) not in {_target(o) for o in value}]
            out[key] = kept + copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stacks() -> dict[str, dict]:
    base = load(BASE)
    return {"cpu": base, "gpu": merge(base, load(GPU))}


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())


@pytest.fixture(params=["cpu", "gpu"])
def stack(request) -> dict:
    return stacks()[request.param]


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def project_services(stack: dict) -> dict[str, dict]:
    """The services that run a llamagrid image (Redis and Prometheus run upstream ones)."""
    return {name: s for name, s in stack["services"].items() if str(s.get("image", "")).startswith("llamagrid-")}


def dockerfile_stages() -> dict[str, str]:
    """Build target -> the text of its stage (`FROM ... AS name` up to the next FROM)."""
    parts = re.split(r"^(?=FROM )", DOCKERFILE.read_text(), flags=re.M)
    return {re.match(r"FROM \S+ AS (\S+)", part)[1]: part for part in parts if part.startswith("FROM ")}


def installed_extras(stage: str) -> set[str]:
    """The extras of `pip install ".[a,b]"` in a stage, with the extras they include (llamagrid[router] in server)."""
    (spec,) = re.findall(r'^RUN pip install "\.\[([a-z,]+)\]"', stage, re.M)
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    extras = set(spec.split(","))
    while included := {e for extra in extras for dep in optional[extra]
                       for e in re.findall(r"^llamagrid\[(.+)\]$", dep)} - extras:
        extras |= included
    return extras


def extra_needed(argv: list[str]) -> str:
    """The extra a service's command needs: the router's, or the one `llamagrid` asks for that subcommand."""
    if argv[:3] == ["python", "-m", "router"]:
        return "router"
    assert argv[0] == "llamagrid", argv
    return EXTRA_OF_COMMAND[argv[1]]


def container_files(stack: dict, service: dict) -> dict[str, Path]:
    """Container path -> the file in compose/ that a secret or a bind-mounted directory of `service` puts there."""
    out = {}
    for secret in service.get("secrets", []):
        name, target = (secret, f"/run/secrets/{secret}") if isinstance(secret, str) else (
            secret["source"], secret.get("target", f"/run/secrets/{secret['source']}"))
        out[target] = COMPOSE / stack["secrets"][name]["file"]
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            for path in (COMPOSE / source).rglob("*"):
                out[f"{target}/{path.relative_to(COMPOSE / source)}"] = path
    return out


def mapped(args: list[str], paths: dict[str, Path]) -> list[str]:
    return [str(paths.get(a, a)) for a in args]


def parse_worker(argv: list[str]):
    """`llamagrid worker --supervise [supervisor options] -- <worker args>` -> (supervisor ns, worker args), checked
    the way llamagrid.cli and the supervisor check them at start-up."""
    assert argv[:3] == ["llamagrid", "worker", "--supervise"], argv
    assert "--" in argv, "supervisor options and worker args must be separated by --"
    own, worker_args = split_argv(argv[3:])
    ns = supervisor_parser().parse_args(own)
    SupervisorConfig(backoff_initial_s=ns.backoff_initial, backoff_max_s=ns.backoff_max, stable_after_s=ns.stable_after,
                     heartbeat_timeout_s=ns.heartbeat_timeout, startup_grace_s=ns.startup_grace,
                     crash_loop_max_failures=ns.crash_loop_max_failures, crash_loop_window_s=ns.crash_loop_window,
                     stop_timeout_s=ns.stop_timeout, kill_timeout_s=ns.kill_timeout, metrics_port=ns.metrics_port,
                     metrics_host=ns.metrics_host)
    command = WorkerCommand.from_args(worker_args)
    assert command.port == worker_parser().parse_args(worker_args).port != 0, "a fixed port, kept across restarts"
    return ns, worker_args


def parse_router(argv: list[str]):
    assert argv[:3] == ["python", "-m", "router"], argv
    return router_parser().parse_args(argv[3:])


def health_port(service: dict) -> int:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == PROBE_IN_IMAGE, test
    probe = runpy.run_path(str(PROBE))["build_parser"]().parse_args(test[2:])
    host, _, port = probe.address.rpartition(":")
    assert host in ("127.0.0.1", "localhost"), "the probe runs inside the service's own container"
    return int(port)


# --- the Compose Specification -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [BASE, GPU], ids=lambda p: p.name)
def test_files_match_the_compose_specification(schema, path):
    validator = jsonschema.Draft202012Validator(schema)
    for doc in (yaml.safe_load(path.read_text()), load(path)):  # as written, and interpolated as compose does
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors


def test_merged_gpu_stack_matches_the_compose_specification(schema):
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(stacks()["gpu"]))
    assert not errors, [e.message for e in errors]


def test_the_schema_check_is_not_vacuous(schema):
    bad = load(BASE)
    bad["services"]["router"]["restart"] = 3
    bad["services"]["router"]["healthchek"] = {}
    assert len(list(jsonschema.Draft202012Validator(schema).iter_errors(bad))) == 2


def test_the_gpu_variant_requires_a_checkpoint():
    with pytest.raises(AssertionError, match="LLAMAGRID_CHECKPOINT"):
        load(GPU, env={})


# --- commands and ports against the code ---------------------------------------------------------------------


def test_services_are_redis_a_router_two_supervised_workers_and_the_model_one_shot():
    services = stacks()["cpu"]["services"]
    assert set(services) == {"redis", "model-init", "router", *WORKERS, "prometheus"}
    # only Prometheus is optional: `up` without --profile starts the cluster alone
    assert {name for name, s in services.items() if "profiles" in s} == {"prometheus"}
    assert command(services["model-init"])[:2] == ["llamagrid", "make-tiny-model"]
    assert command(services["router"])[:3] == ["python", "-m", "router"]
    for name in WORKERS:
        assert command(services[name])[:3] == ["llamagrid", "worker", "--supervise"]


def test_one_dockerfile_an_image_per_kind_of_service(stack):
    """The router runs the `router` target, the workers and the model one-shot the `worker` one; one tag is one
    build (the same target and arguments wherever it is named)."""
    dockerfile = DOCKERFILE.read_text()
    stages = dockerfile_stages()
    builds: dict[str, dict] = {}
    for name, service in project_services(stack).items():
        build = service["build"]
        assert (COMPOSE / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name
        assert build["target"] in stages, f"{name}: no stage {build['target']}"
        assert build["target"] == ("router" if name == "router" else "worker"), name
        for arg in build.get("args", {}):
            assert re.search(rf"^ARG {arg}=", stages[build["target"]], re.M), f"{name}: build arg {arg} not there"
        assert builds.setdefault(service["image"], build) == build, f"{name}: {service['image']} built two ways"
    assert len(project_services(stack)) == 4
    assert stack["services"]["router"]["image"].startswith("llamagrid-router:")
    assert dockerfile.startswith("#") and set(stages) == {"base", "router", "worker"}
    assert "FROM python:3.11-slim AS base" in dockerfile
    assert list(stages)[-1] == "worker", "a plain `docker build .` builds the image that runs every command"


def test_each_image_installs_what_its_services_run(stack):
    """Including `llamagrid keys`, which compose/README.md runs inside the router's container."""
    for name, service in project_services(stack).items():
        extras = installed_extras(dockerfile_stages()[service["build"]["target"]])
        assert extra_needed(command(service)) in extras, name
    router_extras = installed_extras(dockerfile_stages()["router"])
    assert EXTRA_OF_COMMAND["keys"] in router_extras
    assert "server" not in router_extras


def test_the_router_image_has_no_torch():
    router = dockerfile_stages()["router"]
    assert "torch" not in "\n".join(line for line in router.splitlines() if not line.startswith("#"))
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not {"torch", "transformers"} & {re.match(r"[a-z-]+", dep)[0] for dep in optional["router"]}


def test_dockerfile_installs_the_health_probe_and_the_pinned_cpu_torch():
    stages = dockerfile_stages()
    for target in ("router", "worker"):
        assert f"install -m 0755 compose/healthcheck.py /usr/local/bin/{PROBE_IN_IMAGE}" in stages[target], target
        assert "COPY . ./" in stages[target], target
    worker = stages["worker"]
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pinned = re.search(r"LLAMAGRID_TORCH_VERSION:-([0-9.]+)", setup)[1]
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(pinned)}$", worker, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=\S+/cpu$", worker, re.M)
    # torch from the chosen index first, then the project: pip finds torch satisfied and pulls no other
    assert worker.index('"torch==${TORCH_VERSION}"') < worker.index("COPY . ./") < worker.index('RUN pip install ".[')
    # setup.sh installs what the worker image does, plus the test tools
    assert "'.[server,dev]'" in setup


def test_dockerignore_lets_in_every_package_and_nothing_else():
    allowed = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {f"!{p}/" for p in packages} <= set(allowed), "a package pip install . needs is kept out of the image"
    assert {"!pyproject.toml", "!README.md", "!compose/healthcheck.py"} <= set(allowed)
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "*"  # everything else stays out (.venv, .git, tests, secrets)


def test_model_init_writes_the_checkpoint_the_workers_serve():
    stack = stacks()["cpu"]
    init = stack["services"]["model-init"]
    args = cli_parser().parse_args(command(init)[1:])
    assert args.command == "make-tiny-model"
    assert init["restart"] == "no"
    assert "healthcheck" not in init  # a one-shot: the workers wait for it to complete, not to be healthy
    (init_volume,) = init["volumes"]
    volume, mount = init_volume.split(":")[:2]
    assert volume in stack["volumes"] and Path(args.dir).is_relative_to(mount)
    for name in WORKERS:
        worker = stack["services"][name]
        assert worker["depends_on"]["model-init"] == {"condition": "service_completed_successfully"}
        _, worker_args = parse_worker(command(worker))
        assert worker_parser().parse_args(worker_args).model == Path(args.dir)
        assert f"{volume}:{mount}:ro" in worker["volumes"]


def test_worker_commands_parse_and_build_a_config(stack):
    for name in WORKERS:
        service = stack["services"][name]
        supervisor, worker_args = parse_worker(command(service))
        ns = worker_parser().parse_args(worker_args)
        config = worker_config(worker_parser().parse_args(mapped(worker_args, container_files(stack, service))))
        assert config.host == "0.0.0.0", f"{name}: a worker in a container must listen on every interface"
        assert config.internal_token, f"{name}: workers must require the internal token"
        assert ns.port != 0 and health_port(service) == ns.port, name
        assert str(ns.port) in service["expose"], name
        assert "--run-dir" not in worker_args  # the supervisor gives each start its own
        assert service["restart"] == "unless-stopped" and service["init"] is True
        # the container outlives the supervisor's own drain timeout before Docker kills it
        assert float(service["stop_grace_period"].rstrip("s")) > supervisor.stop_timeout


def test_router_command_parses_and_builds_a_config(stack):
    service = stack["services"]["router"]
    ns = parse_router(command(service))
    environment = {k: str(v) for k, v in service["environment"].items()}
    config = router_config(router_parser().parse_args(mapped(command(service)[3:], container_files(stack, service))),
                           environ=environment)
    assert config.host == "0.0.0.0" and config.port == ns.port == health_port(service)
    assert any(str(p).endswith(f":{ns.port}") for p in service["ports"]), "the router is the public entry"
    assert str(ns.port) in service["expose"]
    # the HTTP API too: OpenAI- and MosaicML-compatible clients
    assert config.http_port == 8000 and any(str(p).endswith(":8000") for p in service["ports"])
    assert config.key_pepper and config.internal_token
    assert service["restart"] == "unless-stopped" and service["init"] is True
    assert float(service["stop_grace_period"].rstrip("s")) > config.drain_grace_s
    # the tier file mounted for --tiers is a valid one
    from ratelimit.tiers import load_tiers

    assert load_tiers(config.tiers_path)


def test_router_processes_come_from_the_environment():
    """Two router processes on the router's port unless LLAMAGRID_ROUTER_PROCESSES says otherwise."""
    from router.config import PROCESSES_ENV

    for env, expected in ((ENV, 2), ({**ENV, PROCESSES_ENV: "4"}, 4)):
        stack = {**stacks()["cpu"], "services": load(BASE, env)["services"]}
        service = stack["services"]["router"]
        args = router_parser().parse_args(mapped(command(service)[3:], container_files(stack, service)))
        assert args.processes is None, "--processes on the command line would override the environment"
        environment = {k: str(v) for k, v in service["environment"].items()}
        assert router_config(args, environ=environment).processes == expected


def test_router_reaches_redis_and_every_worker(stack):
    services = stack["services"]
    router = services["router"]
    ns = parse_router(command(router))
    redis_url = urlparse(ns.redis_url)
    assert redis_url.hostname == "redis" and redis_url.hostname in services
    assert router["environment"]["LLAMAGRID_REDIS_URL"] == ns.redis_url  # `llamagrid keys` inside the container
    redis = services["redis"]
    assert redis["healthcheck"]["test"][-3:] == ["-p", str(redis_url.port), "ping"]
    assert redis["expose"] == [str(redis_url.port)]
    assert router["depends_on"]["redis"] == {"condition": "service_healthy"}
    dns_name, _, dns_port = ns.workers_dns.rpartition(":")
    for name in WORKERS:
        _, worker_args = parse_worker(command(services[name]))
        assert dns_name in services[name]["networks"]["default"]["aliases"], name
        assert worker_parser().parse_args(worker_args).port == int(dns_port), name
    # nothing else answers to the workers' name
    others = [n for n, s in services.items() if n not in WORKERS and dns_name in str(s.get("networks", ""))]
    assert not others


def test_every_long_running_service_has_a_health_check_and_a_restart_policy(stack):
    for name, service in stack["services"].items():
        if name == "model-init":
            continue
        assert service["restart"] == "unless-stopped", name
        check = service["healthcheck"]
        assert check["test"][0] == "CMD" and check["retries"] >= 3 and check["start_period"], name


def test_the_dev_secrets_are_marked_and_long_enough():
    stack = stacks()["cpu"]
    token = (COMPOSE / stack["secrets"]["internal_token"]["file"]).read_text().strip()
    assert "dev" in token and "CHANGE-ME" in token and len(token) >= 16
    assert "CHANGE-ME" in stack["services"]["router"]["environment"]["LLAMAGRID_KEY_PEPPER"]
    real = load(BASE, env={**ENV, "LLAMAGRID_KEY_PEPPER": "p" * 40, "LLAMAGRID_INTERNAL_TOKEN_FILE": "/srv/token"})
    assert real["services"]["router"]["environment"]["LLAMAGRID_KEY_PEPPER"] == "p" * 40
    assert real["secrets"]["internal_token"]["file"] == "/srv/token"


def test_cpu_workers_fit_a_laptop():
    for name in WORKERS:
        _, worker_args = parse_worker(command(stacks()["cpu"]["services"][name]))
        ns = worker_parser().parse_args(worker_args)
        assert ns.device == "auto" and ns.tp == 1 and ns.kv_cache_tokens, name
        assert "deploy" not in stacks()["cpu"]["services"][name]


def test_gpu_replicas_reserve_distinct_gpus_one_per_tensor_parallel_rank():
    stack = stacks()["gpu"]
    seen: set[str] = set()
    for name in WORKERS:
        service = stack["services"][name]
        _, worker_args = parse_worker(command(service))
        ns = worker_parser().parse_args(worker_args)
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device
        ids = set(device["device_ids"])
        assert len(ids) == len(device["device_ids"]) == ns.tp == WorkerCommand.from_args(worker_args).num_ranks > 1
        assert not ids & seen, f"{name} shares GPUs with another replica"
        seen |= ids
        assert ns.device == "cuda" and ns.model == Path("/checkpoint")
        assert f"{ENV['LLAMAGRID_CHECKPOINT']}:/checkpoint:ro" in service["volumes"]
        cpu = stacks()["cpu"]["services"][name]
        assert service["image"] != cpu["image"] and service["build"]["target"] == cpu["build"]["target"]
        assert service["build"]["args"]["TORCH_INDEX_URL"] != cpu["build"]["args"]["TORCH_INDEX_URL"]


# --- metrics -------------------------------------------------------------------------------------------------


def _option_strings(parser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def metrics_endpoints(stack: dict) -> dict[str, set[int]]:
    """Service -> the /metrics ports its command serves, each read from a real CLI flag of the process that binds it
    and checked to listen on every interface of the container (Prometheus scrapes it over the compose network)."""
    out: dict[str, set[int]] = {}
    services = stack["services"]
    for name in WORKERS:
        supervisor, worker_args = parse_worker(command(services[name]))
        worker = worker_parser().parse_args(worker_args)
        assert supervisor.metrics_host == "0.0.0.0", f"{name}: the supervisor's metrics listen on loopback"
        assert worker.host == "0.0.0.0"  # the worker serves /metrics on its --host
        out[name] = {supervisor.metrics_port, worker.metrics_port}
    router = parse_router(command(services["router"]))
    assert router.host == "0.0.0.0"
    out["router"] = {router.metrics_port}
    return out


def test_metrics_flags_are_real_options_of_the_process_that_serves_them():
    assert "--metrics-port" in _option_strings(router_parser())
    assert "--metrics-port" in _option_strings(worker_parser())
    assert {"--metrics-port", "--metrics-host"} <= _option_strings(supervisor_parser())
    # where each flag sits matters: before `--` it is the supervisor's, after it the worker's
    with pytest.raises(SystemExit):
        supervisor_parser().parse_args(["--metrics-prot", "1"])
    with pytest.raises(SystemExit):
        worker_parser().parse_args(["--model", "m", "--metrics-host", "0.0.0.0"])


def test_every_process_serves_metrics_on_a_fixed_exposed_port(stack):
    services = stack["services"]
    for name, ports in metrics_endpoints(stack).items():
        assert None not in ports and 0 not in ports, f"{name}: metrics off or on a random port"
        service = services[name]
        grpc_port = health_port(service)
        assert grpc_port not in ports
        expose = {int(str(p).split("/")[0]) for p in service["expose"]}
        http = {8000} if name == "router" else set()  # the router's HTTP API (--http-port)
        assert {grpc_port, *ports, *http} == expose, f"{name}: expose exactly the gRPC, HTTP and metrics ports"
    for name in WORKERS:
        supervisor, worker_args = parse_worker(command(services[name]))
        worker = worker_parser().parse_args(worker_args)
        assert supervisor.metrics_port != worker.metrics_port, f"{name}: supervisor and worker on one port"
        config = worker_config(worker_parser().parse_args(mapped(worker_args, container_files(stack, services[name]))))
        assert config.metrics_port == worker.metrics_port
    router = services["router"]
    (metrics_port,) = metrics_endpoints(stack)["router"]
    published = [str(p) for p in router["ports"] if str(p).endswith(f":{metrics_port}")]
    assert len(published) == 1, "the router's /metrics is published on the host"
    assert published[0].startswith("127.0.0.1:"), "by default only on the host's loopback"


def _prometheus_targets() -> dict[str, set[tuple[str, int]]]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs: dict[str, set[tuple[str, int]]] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics" and job.get("scheme", "http") == "http"
        targets = jobs.setdefault(job["job_name"], set())
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.add((host, int(port)))
    return jobs


def test_prometheus_scrapes_exactly_the_served_metrics_ports(stack):
    jobs = _prometheus_targets()
    scraped = set().union(*jobs.values())
    served = {(name, port) for name, ports in metrics_endpoints(stack).items() for port in ports}
    assert scraped == served
    assert len(scraped) == sum(len(t) for t in jobs.values()), "a target scraped twice"
    supervisor_ports = {parse_worker(command(stack["services"][n]))[0].metrics_port for n in WORKERS}
    worker_ports = {worker_parser().parse_args(parse_worker(command(stack["services"][n]))[1]).metrics_port
                    for n in WORKERS}
    assert {p for _, p in jobs["llamagrid-supervisor"]} == supervisor_ports
    assert {p for _, p in jobs["llamagrid-worker"]} == worker_ports
    assert {h for h, _ in jobs["llamagrid-router"]} == {"router"}


def test_prometheus_service_is_optional_and_upstream(stack):
    service = stack["services"]["prometheus"]
    assert service["profiles"] == [OBSERVABILITY]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", service["image"]), "the official image, pinned"
    assert "build" not in service
    config_mount = [v for v in service["volumes"] if v.split(":")[1] == "/etc/prometheus/prometheus.yml"]
    assert config_mount and (COMPOSE / config_mount[0].split(":")[0]).resolve() == PROMETHEUS_CONFIG
    assert "--config.file=/etc/prometheus/prometheus.yml" in command(service)
    assert service["volumes"][1].split(":")[0] in stack["volumes"]
    assert all(str(p).startswith("127.0.0.1:") for p in service["ports"]), "published on loopback by default"


# --- the health probe ----------------------------------------------------------------------------------------


@pytest.fixture
def health_server():
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_probe_exit_status_follows_the_serving_status(health_server):
    servicer, address = health_server
    probe = runpy.run_path(str(PROBE))["main"]
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert probe([address]) == 1
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe([address]) == 0
    assert probe([address, "--service", "llamagrid.v1.Inference"]) == 1  # unknown service: NOT_FOUND
    servicer.set("llamagrid.v1.Inference", health_pb2.HealthCheckResponse.SERVING)
    assert probe([address, "--service", "llamagrid.v1.Inference"]) == 0


def test_probe_fails_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert runpy.run_path(str(PROBE))["main"]([f"127.0.0.1:{port}", "--timeout", "0.5"]) == 1
