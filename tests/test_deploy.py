"""Static checks of deploy/: Docker cannot run on these machines, so the compose file, the Dockerfile
and the Kubernetes manifests are checked for the mistakes that would only show at `docker compose up`:
a missing build file, a port Prometheus scrapes that no service serves, an MFLI_ variable that no
setting reads (Settings ignores unknown keys, so a typo would silently fall back to a default), a
dashboard out of sync with its generator, and rules or config promtool rejects.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from mfli.config import Settings

from prometheus_harness import require_prometheus

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROM_DIR = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mfli.json"
TOPICS = {"mfli.events", "mfli.items", "mfli.events.dlq", "mfli.item-updates", "mfli.index-changes",
          "mfli.user-state"}
# The port each mfli command listens on, as a function of its settings.
COMMAND_PORT = {
    "learn": lambda s: s.learner.metrics_port,
    "index": lambda s: s.index.metrics_port,
    "serve": lambda s: s.serve.port,
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and "services" in data
    return data


def mfli_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services running the project image, by name."""
    return {n: s for n, s in compose["services"].items() if s.get("image") == "mfli:local" or "build" in s}


# --- settings paths ---------------------------------------------------------------------------------
def setting_path_error(env_key: str) -> str | None:
    """Why ``env_key`` names no field of Settings (None when it does).

    Walks the pydantic model by the ``__``-separated path, because Settings has ``extra="ignore"``: a
    misspelt variable loads without error and the process silently runs on the default.
    """
    if not env_key.startswith("MFLI_"):
        return f"{env_key}: not an MFLI_ variable"
    model: type[BaseModel] = Settings
    parts = env_key.removeprefix("MFLI_").lower().split("__")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return f"{env_key}: {model.__name__} has no field {part!r} (fields: {sorted(model.model_fields)})"
        annotation = field.annotation
        last = depth == len(parts) - 1
        is_model = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if last and is_model:
            return f"{env_key}: {part!r} is a section, not a value"
        if not last:
            if not is_model:
                return f"{env_key}: {part!r} is a value and has no sub-fields"
            model = annotation
    return None


def test_setting_path_check_catches_typos() -> None:
    assert setting_path_error("MFLI_KAFKA__BOOTSTRAP_SERVERS") is None
    assert setting_path_error("MFLI_SERVE__PORT") is None
    assert setting_path_error("MFLI_LOG_LEVEL") is None
    assert setting_path_error("MFLI_KAFKA__BOOTSTRAP_SERVER") is not None  # missing S
    assert setting_path_error("MFLI_KAFKA") is not None  # a section
    assert setting_path_error("MFLI_LOG_LEVEL__X") is not None
    assert setting_path_error("MFLI_SERVER__PORT") is not None  # the section is "serve"


def settings_from_env(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the process in that container would load them (validation included)."""
    for key in [k for k in os.environ if k.startswith("MFLI_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    return Settings()


# --- compose ----------------------------------------------------------------------------------------
def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "kafka-init", "learner", "indexer", "server", "producer", "prometheus", "grafana"} <= set(
        services
    )
    assert services["kafka"]["image"].startswith("apache/kafka:")
    commands = {name: s["command"][0] for name, s in mfli_services(compose).items()}
    assert commands == {"learner": "learn", "indexer": "index", "server": "serve", "replica": "serve",
                        "producer": "produce"}
    assert services["producer"]["profiles"] == ["producer"]
    assert services["learner"]["command"][1:] == ["--workers", "2"]  # the data-parallel group (issue 14)
    assert "--synthetic" in services["producer"]["command"]


def test_every_service_has_an_image_or_an_existing_build(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"
        if "build" in service:
            context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
            dockerfile = context / service["build"].get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            assert (context / "pyproject.toml").is_file(), f"{name}: build context is not the repository root"
        else:
            assert re.fullmatch(r"[a-z0-9./_-]+:[A-Za-z0-9._-]+", service["image"]), (
                f"{name}: pin an image tag, not {service['image']!r}"
            )


def test_kafka_is_kraft_single_node_with_valid_cluster_id(compose: dict[str, Any]) -> None:
    env = compose["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    # kafka-storage format rejects anything but a base64url-encoded 16-byte UUID.
    raw = base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")
    assert len(raw) == 16 and len(env["CLUSTER_ID"]) == 22
    # Processes dial the internal listener that Kafka advertises for the compose network.
    bootstrap = compose["x-mfli-env"]["MFLI_KAFKA__BOOTSTRAP_SERVERS"]
    assert f"PLAINTEXT://{bootstrap}" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")


def test_topic_init_creates_the_topics_matching_settings(compose: dict[str, Any]) -> None:
    script = compose["services"]["kafka-init"]["command"][0]
    created = dict(re.findall(r"--topic (\S+)\s+--partitions (\d+)", script))
    assert set(created) == TOPICS
    defaults = Settings().kafka
    assert {defaults.events_topic, defaults.items_topic, defaults.dlq_topic, defaults.item_updates_topic,
            defaults.index_changes_topic, defaults.user_state_topic} == TOPICS
    # Replication topics: compacted with the configs mfli uses when it creates them itself; the index
    # changes need one partition (a commit is a contiguous run of records, markers keep the order).
    from mfli.storage.index.changes import INDEX_CHANGES_TOPIC_CONFIGS
    from mfli.storage.users_lmdb import USER_STATE_TOPIC_CONFIGS

    assert created["mfli.index-changes"] == "1"
    for topic, configs in (("mfli.index-changes", INDEX_CHANGES_TOPIC_CONFIGS),
                           ("mfli.user-state", USER_STATE_TOPIC_CONFIGS)):
        line = next(x for x in script.splitlines() if f"--topic {topic} " in x)
        assert dict(re.findall(r"--config (\S+)=(\S+)", line)) == configs, topic
    # The events topic is keyed by user and sets the learner's scale-out ceiling; the settings'
    # partition count (used when mfli creates a topic itself) must agree with it.
    assert int(created["mfli.events"]) == int(compose["x-mfli-env"]["MFLI_KAFKA__PARTITIONS"])
    assert all("--if-not-exists" in line for line in script.splitlines() if "--create" in line)
    depends = {n: s.get("depends_on", {}) for n, s in mfli_services(compose).items()}
    for name in ("learner", "indexer", "producer"):
        assert depends[name]["kafka-init"]["condition"] == "service_completed_successfully"


def test_compose_env_names_real_settings(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in mfli_services(compose).items():
        env = service.get("environment", {})
        mfli_keys = [k for k in env if k.startswith("MFLI_")]
        assert "MFLI_KAFKA__BOOTSTRAP_SERVERS" in mfli_keys, f"{name}: no broker address"
        errors = [e for k in mfli_keys if (e := setting_path_error(k))]
        assert errors == [], f"{name}: {errors}"
        settings = settings_from_env(env, monkeypatch)  # raises on an invalid value
        assert settings.kafka.bootstrap_servers == "kafka:19092"
        assert str(settings.index.path).startswith("/var/lib/mfli/")


def test_prometheus_targets_match_service_ports(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each scrape target host:port is a compose service that listens (per its settings) on that port."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    targets = [(job["job_name"], target) for job in config["scrape_configs"]
               for static in job.get("static_configs", []) for target in static["targets"]]
    targets += [(job["job_name"], f"{name}:{dns['port']}") for job in config["scrape_configs"]
                for dns in job.get("dns_sd_configs", []) for name in dns["names"]]
    mfli_jobs = [(job, t) for job, t in targets if job.startswith("mfli-")]
    assert {job for job, _ in mfli_jobs} == {"mfli-learner", "mfli-indexer", "mfli-server", "mfli-replica"}
    assert ("mfli-server", "replica:8000") in mfli_jobs  # replicas serve the same HTTP metrics
    services = mfli_services(compose)
    for job, target in mfli_jobs:
        host, port = target.rsplit(":", 1)
        assert host in services, f"{job}: scrapes {host}, not a compose service"
        service = services[host]
        settings = settings_from_env(service["environment"], monkeypatch)
        base = settings.replication.metrics_port if job == "mfli-replica" else \
            COMMAND_PORT[service["command"][0]](settings)
        # a learner group's rank r listens on metrics_port + r
        listening = {base + r for r in range(settings.learner.workers)} if job == "mfli-learner" else {base}
        assert int(port) in listening, f"{job}: scrapes :{port} but {host} listens on {sorted(listening)}"
        published = {str(p).split(":")[-1] for p in service.get("ports", [])} | {
            str(p) for p in service.get("expose", [])
        }
        assert port in published, f"{job}: {host} neither exposes nor publishes :{port}"


def test_server_healthcheck_uses_readyz_on_its_port(compose: dict[str, Any]) -> None:
    server = compose["services"]["server"]
    check = " ".join(server["healthcheck"]["test"])
    assert "/readyz" in check and f":{server['environment']['MFLI_SERVE__PORT']}/" in check
    assert server["environment"]["MFLI_SERVE__HOST"] == "0.0.0.0"  # 127.0.0.1 is unreachable from outside
    assert server["ports"] == ["8000:8000"]
    for name in ("learner", "indexer", "server", "kafka", "prometheus", "grafana"):
        assert "healthcheck" in compose["services"][name], f"{name}: no healthcheck"


def test_lmdb_volume_is_shared_by_learner_indexer_and_server(compose: dict[str, Any]) -> None:
    mounts = {
        name: {v.split(":")[0]: v.split(":")[1] for v in compose["services"][name]["volumes"]}
        for name in ("learner", "indexer", "server")
    }
    for name, vols in mounts.items():
        assert vols.get("mfli-state") == "/var/lib/mfli", f"{name}: does not mount the shared state volume"
    assert "mfli-state" in compose["volumes"]
    # Read-only would break LMDB readers: they register in lock.mdb.
    assert not any(v.endswith(":ro") for v in compose["services"]["server"]["volumes"])


def test_monitoring_mounts_point_at_files_that_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: mounts missing {source}"
    grafana_env = compose["services"]["grafana"]["environment"]
    home = grafana_env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/mfli.yml").read_text())
    assert home.startswith(provider["providers"][0]["options"]["path"])
    assert "./grafana/dashboards:/etc/grafana/dashboards:ro" in compose["services"]["grafana"]["volumes"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


# --- Dockerfile -------------------------------------------------------------------------------------
def test_dockerfile_builds_every_package_as_non_root_with_cpu_torch() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    copied = set(re.findall(r"^COPY (\S+) \./", text, re.M))
    missing = sorted(set(package_dirs.values()) - copied)
    assert missing == [], f"Dockerfile does not COPY package folders {missing}: `pip install .` would fail"
    for source in copied | {"pyproject.toml", "README.md"}:
        assert (ROOT / source).exists(), f"COPY source {source} does not exist"
    # setuptools refuses to build when a file named in `license-files` is missing from the context
    license_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("license-files", [])
    for name in license_files:
        assert re.search(rf"^COPY .*\b{re.escape(name)}\b.* \./$", text, re.M), f"Dockerfile does not COPY {name}"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert re.search(r"--index-url \"\$\{TORCH_INDEX_URL\}\"", text) and "whl/cpu" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert 'ENTRYPOINT ["mfli"]' in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for source in set(package_dirs.values()):
        assert f"!{source}/**" in ignore, f"Dockerfile.dockerignore excludes {source}/"
    for name in license_files:
        assert f"!{name}" in ignore, f"Dockerfile.dockerignore excludes {name}"


# --- Kubernetes -------------------------------------------------------------------------------------
def k8s_objects() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":  # kustomize's own file, not an API object
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_k8s_manifests_are_coherent_with_compose(compose: dict[str, Any]) -> None:
    objects = k8s_objects()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        assert {"apiVersion", "kind", "metadata"} <= set(obj), obj
        by_kind.setdefault(obj["kind"], []).append(obj)
    config_map = by_kind["ConfigMap"][0]["data"]
    errors = [e for k in config_map if k.startswith("MFLI_") and (e := setting_path_error(k))]
    assert errors == []
    # Same settings keys as compose's shared block (values differ only where Kubernetes differs).
    assert set(compose["x-mfli-env"]) <= set(config_map)

    containers = {
        c["name"]: c
        for kind in ("StatefulSet", "Deployment")
        for obj in by_kind[kind]
        for c in obj["spec"]["template"]["spec"]["containers"]
    }
    assert {c: containers[c]["args"][0] for c in ("learner", "indexer", "server")} == {
        "learner": "learn", "indexer": "index", "server": "serve"
    }
    ports = {name: {p["name"]: p["containerPort"] for p in c["ports"]} for name, c in containers.items()}
    assert ports["learner"]["learner-metrics"] == int(config_map["MFLI_LEARNER__METRICS_PORT"]) == 9101
    assert ports["indexer"]["indexer-metrics"] == int(config_map["MFLI_INDEX__METRICS_PORT"]) == 9104
    assert ports["server"]["http"] == int(config_map["MFLI_SERVE__PORT"]) == 8000

    server = containers["server"]
    assert server["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Every named targetPort of a Service is a port some container declares.
    declared = {name for p in ports.values() for name in p}
    for service in by_kind["Service"]:
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, f"{service['metadata']['name']}: {port['targetPort']}"
    # The writer pod is a single replica; all three mount the one claim that exists.
    assert by_kind["StatefulSet"][0]["spec"]["replicas"] == 1
    claims = {p["metadata"]["name"] for p in by_kind["PersistentVolumeClaim"]}
    for kind in ("StatefulSet", "Deployment"):
        for obj in by_kind[kind]:
            volumes = obj["spec"]["template"]["spec"]["volumes"]
            used = {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}
            assert used <= claims
    # The server Deployment runs replicas: no shared volume, no node affinity to the pipeline, its own
    # copy in an emptyDir at replication.data_dir, applier metrics on the configured port.
    server_pod = by_kind["Deployment"][0]["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in server_pod["volumes"])
    assert "affinity" not in server_pod or "podAffinity" not in server_pod["affinity"]
    assert server["args"] == ["serve", "--replica"]
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert config_map["MFLI_REPLICATION__DATA_DIR"] in mounts
    assert ports["server"]["replica-metrics"] == int(config_map["MFLI_REPLICATION__METRICS_PORT"]) == 9103


def test_k8s_topic_job_matches_compose_partitions(compose: dict[str, Any]) -> None:
    job = next(o for o in k8s_objects() if o["kind"] == "Job")
    k8s_script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    compose_script = compose["services"]["kafka-init"]["command"][0]
    pattern = r"--topic (\S+)\s+--partitions (\d+)"
    assert dict(re.findall(pattern, k8s_script)) == dict(re.findall(pattern, compose_script))


# --- Grafana ----------------------------------------------------------------------------------------
def _build_dashboard_module() -> Any:
    spec = importlib.util.spec_from_file_location("build_dashboard", DEPLOY / "grafana" / "build_dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_generated_and_has_the_panels() -> None:
    text = DASHBOARD.read_text()
    assert text == _build_dashboard_module().render(), (
        "mfli.json differs from build_dashboard.py: run `python deploy/grafana/build_dashboard.py`"
    )
    dashboard = json.loads(text)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for wanted in ("events consumed", "learner events", "requests / s", "consumer lag", "freshness",
                   "embedding drift", "code churn", "user interest", "codebook utilisation", "perplexity",
                   "dead codewords", "cluster size", "index recall", "prequential", "latency", "errors by status"):
        assert wanted in titles, f"no panel for {wanted!r}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "prometheus" and panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    # Freshness shows p50 and p95; latency p50 and p99 per route.
    freshness = next(p for p in panels if p["title"].lower().startswith("freshness"))
    assert [t["legendFormat"] for t in freshness["targets"]] == ["p50", "p95"]
    latency = next(p for p in panels if p["title"].lower().startswith("latency"))
    assert all("route" in t["expr"] for t in latency["targets"])


def test_grafana_datasource_uid_matches_dashboard() -> None:
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in datasource["datasources"]}
    used = {p["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] if "datasource" in p}
    assert used <= uids


# --- promtool ---------------------------------------------------------------------------------------
def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = require_prometheus("promtool")
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=PROM_DIR, timeout=120)


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sum(len(g["rules"]) for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"])
    assert f"SUCCESS: {rules} rules found" in result.stdout


def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid prometheus config file syntax" in result.stdout


def test_promtool_unit_tests_of_alert_rules() -> None:
    """alerts_test.yml feeds synthetic series through the rules: each alert fires on a fault and stays
    quiet on a healthy or recovering series."""
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    assert sorted(alerts - tested) == [], "every alert rule needs a firing and a quiet case in alerts_test.yml"


def test_install_script_is_idempotent_and_guards_services() -> None:
    script = (DEPLOY / "scripts" / "install-prometheus.sh").read_text()
    assert "command -v promtool" in script and "policy-rc.d" in script and "exit 101" in script
    run = (ROOT / ".ci" / "run").read_text()
    assert "deploy/scripts/install-prometheus.sh" in run
    assert run.index("install-prometheus.sh") < run.index("make test")
    syntax = subprocess.run(["bash", "-n", str(DEPLOY / "scripts" / "install-prometheus.sh")])
    assert syntax.returncode == 0


def test_k8s_learner_group_overlay_runs_torchrun_with_one_rank_per_pod() -> None:
    """deploy/k8s/learner-group: the N-rank StatefulSet replaces the pipeline pod's single learner."""
    base = K8S / "learner-group"
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    assert "../" in kustomization["resources"]
    assert all((base / r).exists() for r in kustomization["resources"] if r != "../")
    docs = [d for f in base.glob("*.yaml") if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if d]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == service["metadata"]["name"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    args = " ".join(container["command"] + container["args"])
    replicas = sts["spec"]["replicas"]
    assert f"--nnodes={replicas}" in args and "--nproc-per-node=1" in args and "--no-python mfli learn" in args
    assert f"{sts['metadata']['name']}-0.{service['metadata']['name']}" in args  # rendezvous on rank 0's pod
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env["MFLI_LEARNER__WORKERS"] == str(replicas)
    patch = yaml.safe_load((base / "drop-pipeline-learner.yaml").read_text())
    dropped = patch["spec"]["template"]["spec"]["containers"]
    assert dropped == [{"name": "learner", "$patch": "delete"}]
