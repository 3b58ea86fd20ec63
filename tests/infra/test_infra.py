"""infra/ and deployments/: every file parses, and the names they share agree (pools, images, flows, bucket)."""

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
DOCKERFILES = {"cpu": INFRA / "worker.Dockerfile", "cuda": INFRA / "worker-cuda.Dockerfile"}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def deployments() -> dict[str, dict]:
    return {d["name"]: d for d in load_yaml(PREFECT_YAML)["deployments"]}


def pool_name() -> str:
    [name] = {d["work_pool"]["name"] for d in deployments().values()}
    return name


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_every_yaml_and_json_file_parses():
    files = sorted([*INFRA.rglob("*.yml"), *INFRA.rglob("*.yaml"), *INFRA.rglob("*.json"),
                    *(REPO / "deployments").glob("*.yaml")])
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
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert {"postgres", "prefect-server", "minio", "minio-init", "deploy", "worker"} <= set(services)

    pg = services["postgres"]["environment"]
    server = services["prefect-server"]
    db_url = server["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url == (f"postgresql+asyncpg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
                      f"{pg['POSTGRES_DB']}")
    # Server image = the Prefect version the deployments were written for.
    assert server["image"].startswith(f"prefecthq/prefect:{load_yaml(PREFECT_YAML)['prefect-version']}-")
    api_port = option(server["command"], "--port")

    worker, deploy = services["worker"], services["deploy"]
    for svc in (worker, deploy):
        assert svc["environment"]["PREFECT_API_URL"] == f"http://prefect-server:{api_port}/api"
        context = (INFRA / svc["build"]["context"]).resolve()
        assert context == REPO and (context / svc["build"]["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    assert option(worker["command"], "--pool") == pool_name()
    assert f"work-pool create {pool_name()} --type process" in deploy["command"][0]
    assert "--prefect-file deployments/prefect.yaml" in deploy["command"][0]
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"

    # The bucket created at start is the one the scheduled deployment writes to, on the MinIO the workers use.
    bucket = re.search(r"mc mb --ignore-existing local/(\S+)", services["minio-init"]["command"][0]).group(1)
    assert deployments()["nightly"]["parameters"]["config"]["store"].startswith(f"s3://{bucket}/")
    assert worker["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "9000:9000" in services["minio"]["ports"]
    assert worker["environment"]["AWS_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]


def test_dockerfiles_put_the_project_where_the_pull_step_looks():
    [pull] = load_yaml(PREFECT_YAML)["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ $ACTCACHE_HOME }}"
    for path in DOCKERFILES.values():
        text = path.read_text()
        home = re.search(r"ACTCACHE_HOME=(\S+)", text).group(1)
        assert f"COPY . {home}" in text and f"WORKDIR {home}" in text, path
        assert re.search(rf"pip install -c /tmp/torch.txt {re.escape(home)}", text), f"{path}: torch is not pinned"
        cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
        assert option(cmd, "--pool") == pool_name()
    assert "--index-url https://download.pytorch.org/whl/cpu" in DOCKERFILES["cpu"].read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILES["cuda"].read_text(), re.M).group(1)
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored  # the build context is the repository root


def test_kubernetes_template_gives_each_flow_run_one_gpu_and_the_parent_none():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools.validation import validate
    from prefect.utilities.templating import apply_values

    template = json.loads(K8S_TEMPLATE.read_text())
    # What the server checks on `prefect work-pool create --base-job-template`: every placeholder is declared.
    WorkPoolCreate(name=pool_name(), type="kubernetes", base_job_template=template)
    variables = template["variables"]
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}

    def container(job_variables: dict) -> dict:
        validate(job_variables, variables, raise_on_error=True, ignore_required=True)
        job = apply_values(template["job_configuration"], {**defaults, **job_variables})
        [c] = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
        return c

    for name, d in deployments().items():
        c = container(d["work_pool"].get("job_variables", {}))
        expected = 0 if name == "fanout" else 1
        assert c["resources"]["limits"]["nvidia.com/gpu"] == expected, name
    cuda_tag = re.search(r"-t (\S+) \.", DOCKERFILES["cuda"].read_text()).group(1)
    assert container({})["image"] == cuda_tag


def _compose_command() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) and subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


def test_docker_compose_config_accepts_the_file():
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed here; the checks above still ran")
    res = subprocess.run([*cmd, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
