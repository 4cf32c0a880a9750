"""The deployment files the README shows (deploy/): valid for the tools that read them, and
consistent with each other and with what the fleet tests run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from mitmroute.config import ENV_PREFIX, parse_config
from tests.conftest import ROOT
from tests.fleet import HAPROXY_TEMPLATE, haproxy_config

DEPLOY = ROOT / "deploy"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_check(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    return subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)


def directives(text: str) -> list[str]:
    """The configuration lines of an haproxy.cfg, comments and blank lines left out."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def env_names(value: object) -> set[str]:
    """Every NAME a config refers to as `os.environ/NAME`."""
    if isinstance(value, dict):
        return set().union(*(env_names(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(env_names(v) for v in value)) if value else set()
    if isinstance(value, str) and value.startswith(ENV_PREFIX):
        return {value[len(ENV_PREFIX) :]}
    return set()


def config() -> dict:
    return yaml.safe_load((DEPLOY / "config.yaml").read_text())


def k8s(name: str) -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()))


def test_the_shipped_haproxy_cfg_and_the_fleets_version_of_it_are_valid(tmp_path):
    template = HAPROXY_TEMPLATE.read_text()
    done = haproxy_check(template, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    ours = haproxy_config(template, 18080, [18081, 18082, 18083, 18084], tmp_path / "s.sock")
    done = haproxy_check(ours, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    servers = [line for line in directives(ours) if line.startswith("server ")]
    options = "check inter 500ms fall 2 rise 2 on-marked-down shutdown-sessions"
    assert servers == [f"server mitmroute{i} 127.0.0.1:1808{i} {options}" for i in range(1, 5)]
    assert "bind 127.0.0.1:18080" in directives(ours)
    assert f"stats socket {tmp_path / 's.sock'} mode 600 level admin" in directives(ours)
    # everything else is the shipped file, line for line
    rest = [line for line in directives(ours) if not line.startswith(("server ", "bind ", "stats"))]
    assert rest == [
        line for line in directives(template) if not line.startswith(("server ", "bind ", "stats"))
    ]


def test_the_readme_shows_the_shipped_haproxy_cfg():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running many proxies", 1)[1].split("\n## ", 1)[0]
    shown = re.findall(r"```haproxy\n(.*?)```", section, re.S)
    assert shown, "the README's 'Running many proxies' shows an haproxy block"
    shipped = directives(HAPROXY_TEMPLATE.read_text())
    for line in directives("".join(shown)):
        assert line in shipped, f"README line not in deploy/haproxy.cfg: {line}"


def test_the_fleet_config_is_valid_and_shares_one_ledger():
    raw = config()
    environ = {name: f"value-of-{name}" for name in env_names(raw)}
    environ["DATABASE_URL"] = "postgresql://user:password@postgres:5432/mitmroute"
    environ["REDIS_URL"] = "redis://redis:6379/0"
    parsed = parse_config(raw, environ=environ, source="deploy/config.yaml")
    assert parsed.general.database_url == environ["DATABASE_URL"]
    assert parsed.general.spend_data_path == "/srv/mitmroute/spend-data"
    assert not Path(parsed.general.spend_db).is_absolute()  # each proxy's own directory
    assert parsed.cache.url == environ["REDIS_URL"]


def test_compose_runs_replicas_behind_haproxy_with_postgres_and_redis(tmp_path):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "ca-init", "mitmroute", "haproxy"} <= set(services)
    proxy = services["mitmroute"]
    assert proxy["deploy"]["replicas"] >= 2
    assert env_names(config()) <= set(proxy["environment"])
    assert proxy["depends_on"]["ca-init"] == {"condition": "service_completed_successfully"}
    mounts = {m.split(":")[1] for m in proxy["volumes"]}
    assert {"/etc/mitmroute/config.yaml", "/etc/mitmroute/ca", "/srv/mitmroute/spend-data"} <= (
        mounts
    )
    assert "router_config=/etc/mitmroute/config.yaml" in proxy["command"]
    assert (DEPLOY / proxy["build"]["dockerfile"].removeprefix("deploy/")).is_file()
    # its HAProxy: valid, and the shipped file's settings (replicas found by DNS instead)
    inline = compose["configs"]["haproxy"]["content"]
    done = haproxy_check(inline, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    shipped = directives(HAPROXY_TEMPLATE.read_text())
    differ = ("server ", "bind ", "stats socket ")
    assert [d for d in shipped if not d.startswith(differ)] == [
        d
        for d in directives(inline)
        if not d.startswith((*differ, "server-template ", "resolvers ", "nameserver ", "hold "))
    ]


def test_kubernetes_manifests_run_replicas_of_one_config_one_ca_one_ledger():
    (deployment,) = k8s("deployment.yaml")
    (service,) = k8s("service.yaml")
    (configmap,) = k8s("configmap.yaml")
    (secret,) = k8s("secret-ca.yaml")
    (claim,) = k8s("pvc.yaml")
    assert [deployment["kind"], service["kind"], configmap["kind"], secret["kind"]] == [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
    ]
    assert claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    (container,) = spec["template"]["spec"]["containers"]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    # the ConfigMap is deploy/config.yaml
    assert yaml.safe_load(configmap["data"]["config.yaml"]) == config()
    # every volume the container mounts exists, from the objects above
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert (
        mounts["/etc/mitmroute/config.yaml"]["configMap"]["name"] == configmap["metadata"]["name"]
    )
    assert mounts["/etc/mitmroute/ca"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert set(secret["stringData"]) == {"mitmproxy-ca.pem", "mitmproxy-dhparam.pem"}
    data = config()["general_settings"]["spend_data_path"]
    assert mounts[data]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "emptyDir" in mounts[container["workingDir"]]  # spend_db: this pod's own files
    assert "router_config=/etc/mitmroute/config.yaml" in container["args"]
    assert "confdir=/etc/mitmroute/ca" in container["args"]
    probe = container["readinessProbe"]["exec"]["command"][-1]
    assert "GET /mitmroute-health HTTP/1.0" in probe  # the check HAProxy makes
