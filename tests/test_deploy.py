"""deploy/ stays consistent with the Procfile: the compose file and the Kubernetes manifests parse, run the same
commands with the same environment, own every partition exactly once, and keep secrets out of plain config.

Docker and a cluster are not needed: the files are checked by parsing them."""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml

from shared.config import load_settings
from shared.partitioning import parse_partitions
from shared.queueing import task_queues
from shared.redis_client import parse_sentinel_url

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROCESS_ANNOTATION = "chatsessions/procfile-process"
WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
CODE_DIRS = ("shared", "ingress", "workers", "cli")
EXTERNAL_PREFIXES = ("FLOWER_", "POSTGRES_")  # read by Flower itself / the postgres image
VAR = re.compile(r"\$\{(\w+)[^}]*\}|\$\((\w+)\)|\$(\w+)")


def normalize(tokens: list[str]) -> list[str]:
    """`${PORT:-8000}` (shell, compose), `$(PORT)` (Kubernetes) and `$PORT` all mean "the variable PORT"."""
    return [VAR.sub(lambda m: "$" + next(g for g in m.groups() if g), t.replace("$$", "$")) for t in tokens]


def variables(tokens: list[str]) -> set[str]:
    return {next(g for g in m.groups() if g) for t in tokens for m in VAR.finditer(t.replace("$$", "$"))}


# --------------------------------------------------------------------------------------------------------------------
# The three descriptions of the deployment


def procfile() -> dict[str, list[str]]:
    out = {}
    for line in (REPO / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            out[name.strip()] = shlex.split(command)
    return out


def channels_file() -> dict:
    return tomllib.loads((DEPLOY / "channels.toml").read_text())


def partitions() -> int:
    return int(channels_file()["partitions"])


def channel_secrets() -> set[str]:
    return {var for c in channels_file()["channels"] for var in c["secrets"].values()}


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_app_services() -> dict[str, dict]:
    """Services built from our image (not redis/postgres)."""
    return {name: s for name, s in compose()["services"].items() if "build" in s}


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_examples() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s" / "examples").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_workloads() -> dict[str, dict]:
    """Procfile process -> the workload that runs it."""
    out = {}
    for d in k8s_documents():
        if d["kind"] in WORKLOADS:
            process = d["metadata"].get("annotations", {}).get(PROCESS_ANNOTATION)
            assert process, f"{d['kind']} {d['metadata']['name']} lacks the {PROCESS_ANNOTATION} annotation"
            assert process not in out, f"two workloads run the Procfile process {process}"
            out[process] = d
    return out


def container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    return containers[0]


def k8s_command(workload: dict) -> list[str]:
    c = container(workload)
    return list(c.get("command", [])) + list(c.get("args", []))


def _by_kind(kind: str, docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def k8s_env(workload: dict, docs: list[dict] | None = None, secret_docs: list[dict] | None = None) -> set[str]:
    """Every environment variable name the container gets: env entries, ConfigMap keys and Secret keys (of the base
    manifests and their example Secrets, or of `docs` and `secret_docs`)."""
    c = container(workload)
    names = {e["name"] for e in c.get("env", [])}
    docs = k8s_documents() if docs is None else docs
    maps = _by_kind("ConfigMap", docs)
    secrets = _by_kind("Secret", docs + (k8s_examples() if secret_docs is None else secret_docs))
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(maps[source["configMapRef"]["name"]]["data"])
        if "secretRef" in source:
            secret = secrets[source["secretRef"]["name"]]
            names |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
    return names


def k8s_replicas(workload: dict) -> int:
    return 1 if workload["kind"] == "Job" else int(workload["spec"].get("replicas", 1))


def compose_replicas(service: dict) -> int:
    return int(service.get("deploy", {}).get("replicas", service.get("scale", 1)))


# --------------------------------------------------------------------------------------------------------------------
# Commands


def test_every_procfile_process_has_a_compose_service_running_the_same_command():
    services = compose_app_services()
    for name, command in procfile().items():
        assert name in services, f"Procfile process {name!r} has no compose service"
        assert normalize(services[name]["command"]) == normalize(command), name
    assert set(services) == set(procfile()), "compose runs processes the Procfile does not know"


def test_every_procfile_process_has_a_kubernetes_workload_running_the_same_command():
    workloads = k8s_workloads()
    assert set(workloads) == set(procfile())
    for name, command in procfile().items():
        w = workloads[name]
        assert normalize(k8s_command(w)) == normalize(command), name
        # Kubernetes expands $(VAR) only from the container's own environment.
        missing = variables(k8s_command(w)) - k8s_env(w)
        assert not missing, f"{name}: {sorted(missing)} used in the command but not in the container's env"


def test_the_discord_gateway_serves_a_discord_channel_of_the_deployed_config():
    kinds = {c["id"]: c["platform"] for c in channels_file()["channels"]}
    gateways = [cmd for cmd in procfile().values() if cmd[:2] == ["chatsessions", "gateway"]]
    assert gateways
    for cmd in gateways:
        assert kinds.get(cmd[2]) == "discord", cmd


# --------------------------------------------------------------------------------------------------------------------
# Environment


def known_to_the_code() -> set[str]:
    text = "\n".join(p.read_text() for d in CODE_DIRS for p in (REPO / d).rglob("*.py"))
    return set(re.findall(r"[\"']([A-Z][A-Z0-9_]{2,})[\"']", text))


def compose_interpolated() -> set[str]:
    text = (DEPLOY / "docker-compose.yml").read_text()
    return set(re.findall(r"\$\{(\w+)", text))


def test_each_process_gets_the_same_environment_in_compose_and_kubernetes():
    services, workloads = compose_app_services(), k8s_workloads()
    for name, command in procfile().items():
        procfile_vars = variables(command)  # compose interpolates these, Kubernetes sets them: compare the rest
        in_compose = set(services[name]["environment"]) - procfile_vars
        in_k8s = k8s_env(workloads[name]) - procfile_vars
        assert in_compose == in_k8s, (name, sorted(in_compose ^ in_k8s))


def test_every_process_gets_the_configuration_it_needs():
    required = {"CHATSESSIONS_CONFIG", "DATABASE_URL", "BROKER_URL", "REDIS_URL", "PARTITIONS",
                "SECRET_KEY"} | channel_secrets()
    for name, service in compose_app_services().items():
        assert required <= set(service["environment"]), (name, sorted(required - set(service["environment"])))
    for name, w in k8s_workloads().items():
        assert required <= k8s_env(w), (name, sorted(required - k8s_env(w)))


def test_every_environment_variable_is_known_and_documented():
    names = set(compose_interpolated())
    for s in compose()["services"].values():
        names |= set(s.get("environment") or {})
    for w in k8s_workloads().values():
        names |= k8s_env(w)
    for command in procfile().values():
        names |= variables(command)
    known = known_to_the_code() | channel_secrets() | {v for c in procfile().values() for v in variables(c)}
    unknown = {n for n in names - known if not n.startswith(EXTERNAL_PREFIXES) and n != "CHATSESSIONS_IMAGE"}
    assert not unknown, f"set in deploy/ but read by nothing: {sorted(unknown)}"
    readme = (DEPLOY / "README.md").read_text()
    undocumented = {n for n in names if f"`{n}`" not in readme}
    assert not undocumented, f"not documented in deploy/README.md: {sorted(undocumented)}"


def test_the_configuration_documented_in_docs_is_what_deploy_sets():
    """docs/configuration.md's environment table names every variable the code reads that deploy/ sets."""
    table = "\n".join(line for line in (REPO / "docs" / "configuration.md").read_text().splitlines()
                      if line.startswith("| `"))
    for name in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "PARTITIONS", "LOG_FORMAT", "LOG_LEVEL"):
        assert f"`{name}`" in table
        assert name in compose_app_services()["web"]["environment"]
    names = set(compose_interpolated())
    for service in compose()["services"].values():
        names |= set(service.get("environment") or {})
    for w in k8s_workloads().values():
        names |= k8s_env(w)
    read = (names & known_to_the_code()) - channel_secrets()
    undocumented = sorted(n for n in read if f"`{n}`" not in table)
    assert not undocumented, f"set in deploy/, read by the code, not in docs/configuration.md's table: {undocumented}"


def test_secrets_come_from_secret_references_only():
    secret = channel_secrets() | {"DATABASE_URL", "FLOWER_BASIC_AUTH", "SECRET_KEY"}
    for name, service in compose_app_services().items():
        for var, value in service["environment"].items():
            if var in secret - {"DATABASE_URL"}:
                assert value == f"${{{var}:?set {var}}}" or value.startswith(f"${{{var}:?"), (name, var, value)
    for d in k8s_documents():
        if d["kind"] == "ConfigMap":
            leaked = secret & set(d["data"])
            assert not leaked, f"ConfigMap {d['metadata']['name']} holds secrets {sorted(leaked)}"
        if d["kind"] == "Secret":
            pytest.fail(f"a Secret with values is applied with the manifests: {d['metadata']['name']}")
    for w in k8s_workloads().values():
        for e in container(w).get("env", []):
            assert e["name"] not in secret or "secretKeyRef" in e.get("valueFrom", {}), e


def test_partitions_setting_agrees_everywhere():
    p = partitions()
    maps = _by_kind("ConfigMap", k8s_documents())
    assert int(maps["chatsessions-env"]["data"]["PARTITIONS"]) == p
    for name, s in compose_app_services().items():
        assert int(s["environment"]["PARTITIONS"]) == p, name


def test_the_kubernetes_channels_config_is_the_deployed_channels_file():
    maps = _by_kind("ConfigMap", k8s_documents())
    assert maps["chatsessions-config"]["data"]["channels.toml"] == (DEPLOY / "channels.toml").read_text()
    env = maps["chatsessions-env"]["data"]
    assert env["CHATSESSIONS_CONFIG"] == "/etc/chatsessions/channels.toml"
    for w in k8s_workloads().values():
        mounts = {m["mountPath"]: m["name"] for m in container(w).get("volumeMounts", [])}
        volumes = {v["name"]: v for v in w["spec"]["template"]["spec"]["volumes"]}
        assert volumes[mounts["/etc/chatsessions"]]["configMap"]["name"] == "chatsessions-config"
    for s in compose_app_services().values():
        assert "./channels.toml:/etc/chatsessions/channels.toml:ro" in s["volumes"]
        assert s["environment"]["CHATSESSIONS_CONFIG"] == "/etc/chatsessions/channels.toml"


# --------------------------------------------------------------------------------------------------------------------
# Partition ownership


def _owned(workers: list[tuple[list[str], int]]) -> Counter:
    count: Counter = Counter()
    for command, replicas in workers:
        spec = command[command.index("--partitions") + 1]
        for p in parse_partitions(spec, partitions()):
            count[p] += replicas
    return count


def _is_worker(command: list[str]) -> bool:
    return command[:2] == ["chatsessions", "worker"]


def _check_ownership(where: str, workers: list[tuple[list[str], int]]) -> None:
    assert len(workers) >= 2, f"{where}: expected at least two worker pools"
    owned = _owned(workers)
    assert set(owned) == set(range(partitions())), f"{where}: partitions without a pool: " \
        f"{sorted(set(range(partitions())) - set(owned))}"
    twice = sorted(p for p, n in owned.items() if n != 1)
    assert not twice, f"{where}: partitions owned more than once: {twice}"
    maintenance = sum(n for c, n in workers if "--no-maintenance" not in c)
    assert maintenance >= 1, f"{where}: nobody consumes the maintenance queue"


def test_every_partition_is_owned_exactly_once_in_the_procfile():
    _check_ownership("Procfile", [(c, 1) for c in procfile().values() if _is_worker(c)])


def test_every_partition_is_owned_exactly_once_in_compose():
    workers = [(s["command"], compose_replicas(s)) for s in compose_app_services().values() if _is_worker(s["command"])]
    _check_ownership("docker-compose.yml", workers)


def test_every_partition_is_owned_exactly_once_in_kubernetes():
    workers = [(k8s_command(w), k8s_replicas(w)) for w in k8s_workloads().values() if _is_worker(k8s_command(w))]
    _check_ownership("deploy/k8s", workers)
    pools = [w for w in k8s_workloads().values() if _is_worker(k8s_command(w))]
    assert len({w["metadata"]["name"] for w in pools}) == len(pools)  # one workload per partition set


def test_ownership_check_catches_a_gap_and_an_overlap():
    with pytest.raises(AssertionError, match="without a pool"):
        _check_ownership("x", [(["chatsessions", "worker", "--partitions", "0-6"], 1),
                               (["chatsessions", "worker", "--partitions", "8-15"], 1)])
    with pytest.raises(AssertionError, match="more than once: \\[7\\]"):
        _check_ownership("x", [(["chatsessions", "worker", "--partitions", "0-7"], 1),
                               (["chatsessions", "worker", "--partitions", "7-15"], 1)])
    with pytest.raises(AssertionError, match="more than once"):
        _check_ownership("x", [(["chatsessions", "worker", "--partitions", "0-7"], 2),
                               (["chatsessions", "worker", "--partitions", "8-15"], 1)])


# --------------------------------------------------------------------------------------------------------------------
# Probes, singletons, services, image


def test_ingress_probes_and_service():
    web = k8s_workloads()["web"]
    c = container(web)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    services = _by_kind("Service", k8s_documents())
    labels = web["spec"]["template"]["metadata"]["labels"]
    selecting = [s for s in services.values() if s["spec"]["selector"].items() <= labels.items()]
    assert len(selecting) == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert selecting[0]["spec"]["ports"][0]["targetPort"] in ports
    assert any(p["containerPort"] == int(e["value"]) for p in c["ports"] for e in c["env"] if e["name"] == "PORT")


def test_workers_have_the_liveness_probe_and_outlive_a_lease():
    lease = channels_file()["lease_seconds"]
    for w in k8s_workloads().values():
        if _is_worker(k8s_command(w)):
            c = container(w)
            assert c["livenessProbe"]["exec"]["command"][:2] == ["chatsessions", "worker-alive"]
            assert c["startupProbe"]["exec"]["command"][:2] == ["chatsessions", "worker-alive"]
            assert "WORKER_HEARTBEAT_FILE" in k8s_env(w)
            assert w["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > lease
    for s in compose_app_services().values():
        if _is_worker(s["command"]):
            assert s["healthcheck"]["test"][1:3] == ["chatsessions", "worker-alive"]
            assert "WORKER_HEARTBEAT_FILE" in s["environment"]


def test_beat_and_the_gateway_are_singletons():
    for name in ("beat", "discord"):
        w = k8s_workloads()[name]
        assert w["kind"] == "Deployment" and w["spec"]["replicas"] == 1
        assert w["spec"]["strategy"]["type"] == "Recreate"
        assert compose_replicas(compose_app_services()[name]) == 1


def test_every_workload_uses_the_config_and_runs_as_non_root():
    for name, w in k8s_workloads().items():
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0, name
        assert {"configMapRef": {"name": "chatsessions-env"}} in container(w)["envFrom"], name
        assert {"secretRef": {"name": "chatsessions-secrets"}} in container(w)["envFrom"], name


def test_flower_is_private():
    services = _by_kind("Service", k8s_documents())
    assert services["chatsessions-flower"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert "FLOWER_BASIC_AUTH" in k8s_env(k8s_workloads()["flower"])
    assert "FLOWER_BASIC_AUTH" in compose_app_services()["flower"]["environment"]
    assert all(p.startswith("127.0.0.1:") for p in compose_app_services()["flower"]["ports"])


def test_dockerfile_installs_the_package_and_drops_root():
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.strip().startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(line.startswith("RUN pip install .") for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    copied = {line.split()[1] for line in lines if line.startswith("COPY ") and "--from" not in line}
    for path in copied:
        assert (REPO / path).exists(), f"the Dockerfile copies {path}, which does not exist"
    for name, s in compose_app_services().items():
        assert s["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}, name


def test_compose_services_wait_for_the_migration():
    services = compose()["services"]
    assert services["release"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, s in compose_app_services().items():
        if name != "release":
            assert s["depends_on"]["release"]["condition"] == "service_completed_successfully", name


# --------------------------------------------------------------------------------------------------------------------
# Several hosts: deploy/k8s/examples/scaling (four pools, RabbitMQ quorum queues, Redis Sentinel, PgBouncer), applied
# over the base manifests minus their worker pools (deploy/README.md, "Several hosts"). Checked the same way.

SCALING = DEPLOY / "k8s" / "examples" / "scaling"
CONNECTIONS_PER_PROCESS = 40  # shared/db.py: POOL_CONNECTIONS
URL_VARS = ("DATABASE_URL", "BROKER_URL", "REDIS_URL")


def _load(paths) -> list[dict]:
    docs = []
    for path in sorted(paths):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def scaling_example() -> list[dict]:
    return _load(SCALING.glob("*.yaml"))


def scaling_secrets() -> list[dict]:
    return _load((SCALING / "secrets").glob("*.yaml"))


def scaling_deployment() -> list[dict]:
    """What runs: the base manifests without their worker pools and without what the example replaces (same kind and
    name, e.g. the ConfigMap chatsessions-env), plus the example's manifests."""
    example = scaling_example()
    replaced = {(d["kind"], d["metadata"]["name"]) for d in example}
    base = [d for d in k8s_documents() if (d["kind"], d["metadata"]["name"]) not in replaced
            and not (d["kind"] in WORKLOADS and _is_worker(k8s_command(d)))]
    return base + example


def scaling_workloads() -> list[dict]:
    """The chatsessions processes (our image); PgBouncer is the example's other workload."""
    return [d for d in scaling_deployment()
            if d["kind"] in WORKLOADS and container(d)["image"].split(":")[0] == "chatsessions"]


def scaling_env(workload: dict) -> set[str]:
    return k8s_env(workload, scaling_deployment(), scaling_secrets())


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def _with_options(command: list[str], **values: str) -> list[str]:
    out = list(command)
    for flag, value in values.items():
        out[out.index(f"--{flag}") + 1] = value
    return out


def test_the_scaling_example_runs_the_procfile_commands():
    procfile_commands = procfile()
    seen = set()
    for w in scaling_workloads():
        name = w["metadata"]["name"]
        process = w["metadata"].get("annotations", {}).get(PROCESS_ANNOTATION)
        assert process in procfile_commands, f"{name}: {PROCESS_ANNOTATION} must name a Procfile process"
        seen.add(process)
        command = k8s_command(w)
        expected = procfile_commands[process]
        if _is_worker(command):  # a pool: the Procfile's command with its own partition set and pool name
            expected = _with_options(expected, partitions=_option(command, "--partitions"),
                                     name=_option(command, "--name"))
        assert normalize(command) == normalize(expected), name
        missing = variables(command) - scaling_env(w)
        assert not missing, f"{name}: {sorted(missing)} used in the command but not in the container's env"
    assert seen == set(procfile_commands), f"Procfile processes without a workload: {set(procfile_commands) - seen}"


def test_every_partition_is_owned_exactly_once_in_the_scaling_example():
    workers = [(k8s_command(w), k8s_replicas(w)) for w in scaling_workloads() if _is_worker(k8s_command(w))]
    _check_ownership("deploy/k8s/examples/scaling", workers)
    assert len(workers) >= 4, "the example splits the partitions over at least four pools"
    names = [_option(c, "--name") for c, _ in workers]
    assert len(set(names)) == len(names), f"two pools with the same node name: {names}"
    p = partitions()
    assert int(_by_kind("ConfigMap", scaling_deployment())["chatsessions-env"]["data"]["PARTITIONS"]) == p


def test_pool_names_are_unique_everywhere():
    for where, commands in (("Procfile", list(procfile().values())),
                            ("compose", [s["command"] for s in compose_app_services().values()]),
                            ("k8s", [k8s_command(w) for w in k8s_workloads().values()])):
        names = [_option(c, "--name") for c in commands if _is_worker(c)]
        assert len(set(names)) == len(names), (where, names)


def test_the_scaling_example_gives_every_process_the_configuration_it_needs():
    required = {"CHATSESSIONS_CONFIG", "DATABASE_URL", "BROKER_URL", "REDIS_URL", "PARTITIONS",
                "BROKER_QUEUE_TYPE", "REDIS_SENTINEL_MASTER"} | channel_secrets()
    base_env = k8s_env(k8s_workloads()["web"]) - {"PORT"}
    for w in scaling_workloads():
        env = scaling_env(w)
        assert required <= env, (w["metadata"]["name"], sorted(required - env))
        assert base_env <= env, (w["metadata"]["name"], sorted(base_env - env))  # nothing of the base's is lost
    known = known_to_the_code() | channel_secrets() | {v for c in procfile().values() for v in variables(c)}
    readme = (DEPLOY / "README.md").read_text()
    for w in scaling_workloads():
        for name in scaling_env(w):
            assert name in known or name.startswith(EXTERNAL_PREFIXES), f"set in the example, read by nothing: {name}"
            assert f"`{name}`" in readme, f"not documented in deploy/README.md: {name}"


def test_the_scaling_example_configuration_passes_the_apps_own_validation():
    """The example's ConfigMap and Secret, as one process sees them, loaded by shared/config.py."""
    env = dict(_by_kind("ConfigMap", scaling_deployment())["chatsessions-env"]["data"])
    env |= _by_kind("Secret", scaling_secrets())["chatsessions-secrets"]["stringData"]
    env["CHATSESSIONS_CONFIG"] = str(DEPLOY / "channels.toml")
    settings = load_settings(env)
    assert settings.broker_url.startswith("amqp://") and settings.broker_queue_type == "quorum"
    target = parse_sentinel_url(settings.redis_url)
    assert len(target.sentinels) >= 3 and target.master_name == env["REDIS_SENTINEL_MASTER"]
    assert all(q.queue_arguments == {"x-queue-type": "quorum"} for q in task_queues(settings))


def test_the_scaling_example_keeps_secrets_in_secrets():
    secret = channel_secrets() | {"FLOWER_BASIC_AUTH"} | set(URL_VARS)
    for d in scaling_example():
        assert d["kind"] != "Secret", f"a Secret with values is applied with the example: {d['metadata']['name']}"
        if d["kind"] == "ConfigMap":
            leaked = secret & set(d.get("data", {}))
            assert not leaked, f"ConfigMap {d['metadata']['name']} holds {sorted(leaked)} (URLs carry passwords)"
    for w in scaling_workloads():
        for e in container(w).get("env", []):
            assert e["name"] not in secret or "secretKeyRef" in e.get("valueFrom", {}), e
    secrets = _by_kind("Secret", scaling_secrets())
    for d in scaling_deployment():
        for volume in d.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, volume


def test_the_scaling_example_pools_are_workers_like_the_base():
    lease = channels_file()["lease_seconds"]
    for w in scaling_workloads():
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, w["metadata"]["name"]
        assert {"configMapRef": {"name": "chatsessions-env"}} in container(w)["envFrom"]
        if _is_worker(k8s_command(w)):
            c = container(w)
            assert c["livenessProbe"]["exec"]["command"][:2] == ["chatsessions", "worker-alive"]
            assert "WORKER_HEARTBEAT_FILE" in scaling_env(w)
            assert pod["terminationGracePeriodSeconds"] > lease
            assert w["spec"]["replicas"] == 1


def pgbouncer_ini() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string((DEPLOY / "pgbouncer.ini").read_text())
    return parser


def test_pgbouncer_config_is_the_shipped_file_and_fits_the_example():
    example = scaling_deployment()
    assert _by_kind("ConfigMap", example)["chatsessions-pgbouncer"]["data"]["pgbouncer.ini"] == \
        (DEPLOY / "pgbouncer.ini").read_text()
    ini = pgbouncer_ini()["pgbouncer"]
    assert ini["pool_mode"] == "transaction"
    database_url = _by_kind("Secret", scaling_secrets())["chatsessions-secrets"]["stringData"]["DATABASE_URL"]
    # psycopg prepares statements (up to 100 per connection): PgBouncer must track them, or the URL turn them off.
    assert int(ini.get("max_prepared_statements", "0")) >= 100 or "prepare_threshold=none" in database_url
    service = _by_kind("Service", example)["pgbouncer"]
    host_port = database_url.split("@", 1)[1].split("/", 1)[0]
    assert host_port == f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert service["spec"]["ports"][0]["port"] == int(ini["listen_port"])
    # Every chatsessions process may hold CONNECTIONS_PER_PROCESS client connections; each PgBouncer replica must
    # accept all of them (a client may land on any replica).
    processes = 0
    for w in scaling_workloads():
        command = k8s_command(w)
        per_pod = int(_option(command, "--workers")) if "--workers" in command else 1
        processes += k8s_replicas(w) * per_pod
    assert int(ini["max_client_conn"]) >= processes * CONNECTIONS_PER_PROCESS, (ini["max_client_conn"], processes)
    assert int(ini["default_pool_size"]) <= int(ini["max_db_connections"])
