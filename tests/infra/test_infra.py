"""infra/ and deployments/: every file parses, and the names they share agree (pools, images, flows, bucket,
versions, credentials). No Docker engine or cluster here: what runs there is checked by reading and rendering."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
COMPOSE = INFRA / "docker-compose.yml"
K8S_TEMPLATE = INFRA / "k8s" / "base-job-template.json"
DOCKERFILE = INFRA / "worker.Dockerfile"
ENV_EXAMPLE = INFRA / ".env.example"
CONSTRAINTS = REPO / "constraints.txt"


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in load_yaml(PREFECT_YAML)["deployments"]}


def pool_name() -> str:
    [name] = {d["work_pool"]["name"] for d in deployments().values()}
    return name


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def pinned() -> dict[str, str]:
    """constraints.txt: package name (normalized) -> version."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return out


def env_example() -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line.strip() and not line.startswith("#")
    )


def interpolate(node, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default} (and $$), as `docker compose config` resolves them."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} is not set: {arg}")

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, node.replace("$$", "\0")).replace("\0", "$")


def test_every_yaml_and_json_file_parses():
    files = sorted(
        [*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml"), *INFRA.rglob("*.json"), *(REPO / "deployments").glob("*.yaml")]
    )
    assert {COMPOSE, K8S_TEMPLATE, PREFECT_YAML} <= set(files)
    for f in files:
        data = json.loads(f.read_text()) if f.suffix == ".json" else load_yaml(f)
        assert isinstance(data, dict) and data, f"{f} is empty or not a mapping"


def test_deployments_share_one_pool_and_tags_through_anchors():
    def get(node, key):
        return next(v for k, v in node.value if k.value == key)

    root = yaml.compose(PREFECT_YAML.read_text())  # aliases resolve to the very node of their anchor
    definitions = get(root, "definitions")
    pools, tags = [v for _, v in get(definitions, "work_pools").value], get(definitions, "tags")
    deps = get(root, "deployments").value
    assert {get(d, "name").value for d in deps} >= {"nightly", "extract", "partition", "fanout"}
    for d in deps:
        assert get(d, "tags") is tags and any(get(d, "work_pool") is p for p in pools), get(d, "name").value
    assert len({get(p, "name").value for p in pools}) == 1  # one pool
    # GPU workers serve the partitions' queue only, so a waiting parent never holds their single slot.
    queues = {name: d["work_pool"]["work_queue_name"] for name, d in deployments().items()}
    assert queues["fanout"] != queues["partition"] == queues["extract"] == queues["nightly"]


def test_entrypoints_are_flows_in_flows_and_parameters_pass_their_signatures():
    from prefect.flows import load_flow_from_entrypoint

    deps = deployments()
    flow_names = {}
    for name, d in deps.items():
        path, func = d["entrypoint"].split(":")
        assert path.startswith("flows/") and (REPO / path).is_file(), f"{name}: {path} is not in flows/"
        flow = load_flow_from_entrypoint(f"{REPO / path}:{func}")
        flow.validate_parameters(d.get("parameters", {}))  # raises on an unknown option or a bad choice
        flow_names[name] = flow.name
    # The fan-out launches a deployment that exists and runs the extraction flow.
    child = deps["fanout"]["parameters"]["deployment"]
    flow_name, dep_name = child.split("/")
    assert flow_names[dep_name] == flow_name == "extract-activations"


def test_nightly_is_cron_scheduled_and_partitions_are_bounded_by_a_concurrency_limit():
    from prefect.client.schemas.schedules import CronSchedule

    deps = deployments()
    [sched] = deps["nightly"]["schedules"]
    CronSchedule(cron=sched["cron"], timezone=sched.get("timezone"))
    limit = deps["partition"]["concurrency_limit"]
    assert limit["limit"] >= 1 and limit["collision_strategy"] == "ENQUEUE"


def test_compose_wires_server_database_minio_and_workers():
    compose = interpolate(load_yaml(COMPOSE), env_example())
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "minio-init", "deploy", "worker"} <= set(services)

    pg = services["postgres"]["environment"]
    server = services["prefect-server"]
    db_url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url == (
        f"postgresql+asyncpg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    )
    # Server image = the Prefect version the deployments were written for.
    assert server["image"].startswith(f"prefecthq/prefect:{load_yaml(PREFECT_YAML)['prefect-version']}-")
    api_port = option(server["command"], "--port")

    worker, deploy = services["worker"], services["deploy"]
    for svc in (worker, deploy):
        assert svc["environment"]["PREFECT_API_URL"] == f"http://prefect-server:{api_port}/api"
        context = (INFRA / svc["build"]["context"]).resolve()
        assert context == REPO and (context / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert option(worker["command"], "--pool") == pool_name()
    assert f"work-pool create {pool_name()} --type process" in deploy["command"][0]
    assert "--prefect-file deployments/prefect.yaml" in deploy["command"][0]
    assert "python deployments/automations.py" in deploy["command"][0]  # lost runs are detected on this server
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"

    # The bucket created at start is the one the scheduled deployment writes to, on the MinIO the workers use.
    bucket = re.search(r"mc mb --ignore-existing local/(\S+)", services["minio-init"]["command"][0]).group(1)
    assert deployments()["nightly"]["parameters"]["config"]["store"].startswith(f"s3://{bucket}/")
    assert worker["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "9000:9000" in services["minio"]["ports"]
    assert worker["environment"]["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]


def test_the_image_installs_the_tested_versions_where_the_pull_step_looks():
    [pull] = load_yaml(PREFECT_YAML)["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $ACTCACHE_HOME }}"
    text = DOCKERFILE.read_text()
    home = re.search(r"ACTCACHE_HOME=(\S+)", text).group(1)
    assert f"COPY . {home}" in text and f"WORKDIR {home}" in text
    # Every package at constraints.txt's version, torch at the one installed first.
    assert re.search(rf"pip install -c constraints.txt -c /tmp/torch.txt {re.escape(home)}", text)
    assert (REPO / "constraints.txt").is_file()
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert option(cmd, "--pool") == pool_name()
    # The torch the tests run with (Makefile), from the CPU index by default; the CUDA image from PyPI's wheel.
    tested = re.search(r"^TORCH\s*\?=\s*torch==(\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1) == tested
    assert re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", text, re.M).group(1) == "https://download.pytorch.org/whl/cpu"
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in text
    assert "--build-arg TORCH_INDEX_URL=https://pypi.org/simple -t actcache-worker:cuda" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored  # the build context is the repository root
    assert "**/.env" in ignored  # credentials never go into an image


def third_party_images() -> list[str]:
    compose = load_yaml(COMPOSE)["services"]
    images = [svc["image"] for svc in compose.values() if "image" in svc and "build" not in svc]
    return images + re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.M)


def test_every_image_tag_is_pinned_to_a_release():
    images = third_party_images()
    assert len(images) == 5  # postgres, prefect, minio, mc, python
    for image in images:
        name, _, tag = image.partition(":")
        assert tag and "latest" not in tag, f"{image}: no pinned tag"
        # A release, not a moving major/minor tag: three version numbers or a MinIO release timestamp.
        assert re.match(r"(\d+\.\d+\.\d+|\d+\.\d+-alpine$|RELEASE\.\d{4}-\d\d-\d\dT)", tag), image
    [prefect_image] = [i for i in images if i.startswith("prefecthq/prefect:")]
    assert prefect_image.split(":")[1].startswith(pinned()["prefect"] + "-")
    python_image = next(i for i in images if i.startswith("python:"))
    assert python_image.split(":")[1].startswith("3.11.")


def test_pyproject_floors_are_what_the_pinned_stack_needs():
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        floors[req.name] = min(Version(s.version) for s in req.specifier if s.operator == ">=")
    versions = pinned()

    def needs(package: str, dependency: str) -> Version:
        [req] = [
            Requirement(r)
            for r in metadata.requires(package) or []
            if Requirement(r).name == dependency and not Requirement(r).marker
        ]
        return min(Version(s.version) for s in req.specifier if s.operator in (">=", "=="))

    # The floor is the highest floor that a pinned package puts on it, and at most the tested version.
    assert floors["torch"] == needs("transformer-lens", "torch") <= Version(metadata.version("torch").split("+")[0])
    assert floors["transformers"] == needs("transformer-lens", "transformers") <= Version(versions["transformers"])
    assert floors["prefect"] >= needs("prefect-aws", "prefect")
    assert floors["prefect"] == Version(versions["prefect"]) == Version(load_yaml(PREFECT_YAML)["prefect-version"])
    assert floors["transformer-lens"] <= Version(versions["transformer-lens"])

    python_floor = Version(project["requires-python"].removeprefix(">="))
    needed = []
    for name in versions:
        try:
            spec = metadata.metadata(name).get("Requires-Python")
        except metadata.PackageNotFoundError:
            continue
        if spec:
            needed += [Version(s.version) for s in SpecifierSet(spec) if s.operator == ">="]
    assert python_floor == max(needed)


@pytest.mark.subprocess
def test_compose_reads_credentials_from_the_env_file_and_puts_the_api_behind_auth():
    raw = COMPOSE.read_text()
    example = env_example()
    used = set(re.findall(r"\$\{(\w+)", raw))
    assert used == set(example), "infra/.env.example must define exactly what the compose file reads"
    assert ":-" not in raw, "no default credentials in the compose file"
    assert not re.search(r"(PASSWORD|SECRET|AUTH_STRING)\w*: (?!\$\{)", raw), "a credential not from the env file"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO).returncode == 0
    assert ignored, "infra/.env (the real credentials) must be ignored by git"

    services = interpolate(load_yaml(COMPOSE), example)["services"]
    auth = services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert auth == example["PREFECT_AUTH"] and ":" in auth  # basic auth, user:password
    for name in ("deploy", "worker"):  # every client of the API sends it
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == auth
    # The health check is the one request Prefect answers without auth.
    assert "/api/health" in " ".join(services["prefect-server"]["healthcheck"]["test"])


def test_kubernetes_template_renders_for_each_deployment_as_the_worker_does():
    """prefect-kubernetes builds each run's Job from the template and the deployment's job variables: partitions
    get a GPU on a GPU node; the parent a small CPU pod off GPU nodes; all share the model cache volume."""
    import asyncio
    from uuid import uuid4

    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(K8S_TEMPLATE.read_text())
    # What the server checks on `prefect work-pool create --base-job-template`: every placeholder is declared.
    WorkPoolCreate(name=pool_name(), type="kubernetes", base_job_template=template)
    # The template names no block or variable, so the client is never called (no API needed).
    unused = PrefectClient("http://127.0.0.1:9/api")

    def pod(job_variables: dict) -> dict:
        config = asyncio.run(
            KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables, client=unused)
        )
        config.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="run"))
        return config.job_manifest["spec"]["template"]["spec"]

    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for name, d in deployments().items():
        spec = pod(d["work_pool"].get("job_variables", {}))
        [c] = spec["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", name  # lost pods are detected
        assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule", name  # evicted pods come back
        assert spec["volumes"] == [{"name": "cache", "persistentVolumeClaim": {"claimName": "actcache-cache"}}]
        assert c["volumeMounts"] == [{"name": "cache", "mountPath": "/cache"}]
        if name == "fanout":
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 0 and spec["tolerations"] == []
            assert c["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"}
        else:
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and spec["tolerations"] == [gpu_toleration]
            assert c["resources"]["requests"]["memory"] == "32Gi"
    pvc = load_yaml(INFRA / "k8s" / "cache-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "actcache-cache"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on different nodes share it
    assert pod({})["containers"][0]["image"] == "actcache-worker:cuda"  # the tag infra/README.md builds


def _compose_command() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


@pytest.mark.subprocess
def test_docker_compose_config_accepts_the_file():
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here; the checks above still ran")
    res = subprocess.run(
        [*cmd, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr
