"""deploy/ stays consistent with the Procfile: the compose file and the Kubernetes manifests parse, run the same
commands with the same environment, own every partition exactly once, and keep secrets out of plain config.

Docker and a cluster are not needed: the files are checked by parsing them."""

from __future__ import annotations

import re
import shlex
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import yaml

from shared.partitioning import parse_partitions

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


def k8s_env(workload: dict) -> set[str]:
    """Every environment variable name the container gets: env entries, ConfigMap keys and Secret keys."""
    c = container(workload)
    names = {e["name"] for e in c.get("env", [])}
    maps = _by_kind("ConfigMap", k8s_documents())
    secrets = _by_kind("Secret", k8s_documents() + k8s_examples())
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
    required = {"CHATSESSIONS_CONFIG", "DATABASE_URL", "BROKER_URL", "REDIS_URL", "PARTITIONS"} | channel_secrets()
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


def test_the_configuration_documented_in_the_readme_is_what_deploy_sets():
    """The README's environment table names every variable the code reads that deploy/ sets."""
    readme = (REPO / "README.md").read_text()
    for name in ("DATABASE_URL", "BROKER_URL", "REDIS_URL", "PARTITIONS", "LOG_FORMAT", "LOG_LEVEL"):
        assert f"`{name}`" in readme
        assert name in compose_app_services()["web"]["environment"]


def test_secrets_come_from_secret_references_only():
    secret = channel_secrets() | {"DATABASE_URL", "FLOWER_BASIC_AUTH"}
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
