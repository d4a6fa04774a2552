"""deploy/hostagent-stack.yaml: cfn-lint clean; its copies of iam/hostagent-policy.json,
cloud-init/user-data.yaml and `hostagent ecs-task-volumes` equal their sources; deployed into a
real moto server (over HTTP) to CREATE_COMPLETE; and the instance its Auto Scaling group
launched, played here (IMDSv2 stand-in, a real loop device), bootstraps the stack's volume,
found by its tag, with the config the stack's user-data writes.

What moto 5.2.5's CloudFormation does not keep, each checked from the template instead (and
said where it is): AWS::EC2::Volume Tags, VolumeType and Encrypted; AWS::IAM::Role
ManagedPolicyArns; AWS::ECS::TaskDefinition NetworkMode, RequiresCompatibilities and
PlacementConstraints; AWS::ECS::Service DeploymentConfiguration; and an instance its
AutoScalingGroup launches gets neither the launch template's MetadataOptions nor its
IamInstanceProfile (the launch template itself keeps both). describe_stack_resources lists a
resource whose Condition is false as an entry with no LogicalResourceId, and GetRolePolicy
answers an inline policy CloudFormation made as Python's repr of the document, not JSON.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.integration.test_bootstrap import hostagent, steps_by_name
from tests.support.cloud import toml_dumps
from tests.support.hosttools import need, need_root, sh

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "deploy" / "hostagent-stack.yaml"
POLICY = REPO / "iam" / "hostagent-policy.json"
USER_DATA = REPO / "cloud-init" / "user-data.yaml"
REGION = "us-east-1"
AZ = "us-east-1b"  # not moto's default zone: proves the parameter decides where things go
IMAGE = "ami-12345678"
HOSTAGENT_TOML = "/etc/hostagent/hostagent.toml"
ECS_CONFIG = "/etc/ecs/ecs.config"
ECS_AGENT_POLICY = "arn:aws:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role"
SSM_POLICY = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
PLACEMENT = [{"Type": "memberOf", "Expression": "attribute:hostagent.persistence == ready"}]

# Run with cloud-init 22.4's own code (the Debian package unpacked by tests/system/cloudinit_deb):
# its user-data processor splits a MIME multipart, and its cloud-config handler merges the parts
# (merge_how included) into the one config the modules see.
CLOUD_INIT_MERGE = """
import json, sys, tempfile
from cloudinit import handlers, helpers, user_data
from cloudinit.handlers.cloud_config import CloudConfigPartHandler

tmp = tempfile.mkdtemp()
paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
message = user_data.UserDataProcessor(paths).process(sys.stdin.buffer.read())
handler = CloudConfigPartHandler(paths)
handler.cloud_fn = None  # keep the merged config in memory, write nothing
handler.handle_part(None, handlers.CONTENT_START, None, None, None, None)
types = []
for part in message.walk():
    if part.is_multipart():
        continue
    types.append(part.get_content_type())
    if part.get_content_type() == "text/cloud-config":
        handler.handle_part(None, part.get_content_type(), part.get_filename() or "part",
                            part.get_payload(decode=True).decode(), None, dict(part.items()))
print(json.dumps({"types": types, "config": handler.cloud_buf}))
"""


def need_cfnlint():
    import importlib.util

    need(importlib.util.find_spec("cfnlint") is not None,
         "needs cfn-lint (it comes with moto[server]: scripts/setup-dev installs .[test])")


def template() -> dict:
    """The template as CloudFormation reads it (cfn-lint's decoder: !Ref, !Sub… as Fn:: keys)."""
    need_cfnlint()
    import cfnlint.decode

    doc, problems = cfnlint.decode.decode(str(STACK))
    assert not problems, problems
    return doc


def resources(doc: dict) -> dict:
    return doc["Resources"]


def embedded_user_data(doc: dict) -> tuple[str, dict]:
    """The Fn::Sub [text, variables] the launch template's user-data is built around."""
    data = resources(doc)["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
    parts = data["Fn::Base64"]["Fn::Join"][1]
    subs = [p["Fn::Sub"] for p in parts if isinstance(p, dict) and isinstance(p.get("Fn::Sub"), list)]
    assert len(subs) == 1, parts
    text, variables = subs[0]
    return text, variables


def cfn_sub(text: str, values: dict) -> str:
    """Fn::Sub's semantics: ${NAME} from values, ${!Literal} -> ${Literal}; any other ${...}
    (a parameter or resource CloudFormation would resolve) is a failure here."""
    def fill(m):
        name = m.group(1)
        if name.startswith("!"):
            return "${" + name[1:] + "}"
        assert name in values, f"Fn::Sub would resolve ${{{name}}} in the user-data"
        return values[name]

    return re.sub(r"\$\{([^}]*)\}", fill, text)


def files_written(config: dict) -> dict[str, str]:
    """What cloud-init's write_files leaves in each file, in list order (append: true appends)."""
    out: dict[str, str] = {}
    for entry in config["write_files"]:
        content = entry.get("content", "")
        out[entry["path"]] = out.get(entry["path"], "") + content if entry.get("append") else content
    return out


def cloud_init_merge(user_data: bytes) -> dict:
    from tests.system.cloudinit_deb import cloud_init_python, cloud_init_tree

    tree = cloud_init_tree()
    env = dict(os.environ, PYTHONPATH=str(tree / "usr/lib/python3/dist-packages"))
    done = subprocess.run([str(cloud_init_python()), "-c", CLOUD_INIT_MERGE], input=user_data,
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def assert_valid_cloud_config(tmp_path, config: dict) -> None:
    from tests.system.cloudinit_deb import cloud_init

    path = tmp_path / "merged-user-data"
    path.write_text("#cloud-config\n" + yaml.safe_dump(config, sort_keys=False))
    done = cloud_init("schema", "--config-file", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout


# -- the template itself -------------------------------------------------------------------------

def cfn_lint(path) -> subprocess.CompletedProcess:
    need_cfnlint()
    exe = Path(sys.executable).with_name("cfn-lint")
    need(exe.exists(), f"needs the cfn-lint command next to {sys.executable}")
    return subprocess.run([str(exe), "--", str(path)], capture_output=True, text=True, timeout=120)


def test_cfn_lint_reports_nothing():
    done = cfn_lint(STACK)
    # Exit code is a bitmask (2 errors, 4 warnings, 8 informational): nothing at all is allowed.
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_cfn_lint_as_run_here_does_catch_a_mistake(tmp_path):
    """Control: the same invocation fails on a misspelt property."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(STACK.read_text().replace("UpdateReplacePolicy: Snapshot\n    Properties:\n"
                                                "      AvailabilityZone:",
                                                "UpdateReplacePolicy: Snapshot\n    Properties:\n"
                                                "      AvailabilityZon:", 1))
    assert broken.read_text() != STACK.read_text()
    done = cfn_lint(broken)
    assert done.returncode & 2, done.stdout + done.stderr


def test_the_role_carries_exactly_the_iam_policy_file():
    doc = template()
    role = resources(doc)["InstanceRole"]["Properties"]
    [policy] = role["Policies"]
    assert policy["PolicyName"] == "hostagent"
    want = json.loads(POLICY.read_text())
    got = policy["PolicyDocument"]
    # The file uses no placeholders (wildcard regions/accounts, and the IAM policy variable
    # ${ec2:InstanceID}, which CloudFormation leaves alone outside Fn::Sub): so no CFN function
    # may appear in the copy, and it must equal the file statement for statement.
    assert "Fn::" not in json.dumps(got) and '"Ref"' not in json.dumps(got)
    assert [s.get("Sid") for s in got["Statement"]] == [s.get("Sid") for s in want["Statement"]]
    for mine, theirs in zip(got["Statement"], want["Statement"]):
        assert mine == theirs, f"statement {theirs.get('Sid')} differs from {POLICY.name}"
    assert got == want
    # The ECS and SSM agents' own permissions come from AWS's managed policies, kept apart from
    # ours (SSM: Session Manager, the no-SSH, no-open-port way to the host and Fauxton).
    assert role["ManagedPolicyArns"] == [
        {"Fn::Sub": arn.replace("arn:aws:", "arn:${AWS::Partition}:")}
        for arn in (ECS_AGENT_POLICY, SSM_POLICY)]
    # Each optional S3 object gets its own policy, only when its parameter is set.
    for name, condition in (("SecretsPolicy", "HasSecrets"),
                            ("CouchDBAdminSecretPolicy", "HasCouchDBAdminSecret")):
        extra = resources(doc)[name]
        assert extra["Condition"] == condition
        assert extra["Properties"]["Roles"] == [{"Ref": "InstanceRole"}]
    params = doc["Parameters"]
    assert params["CouchDBAdminSecretUrl"]["Default"] == ""
    assert params["CouchDBAdminSecretUrl"]["AllowedPattern"] == params["SecretsUrl"]["AllowedPattern"]


def test_the_user_data_is_the_cloud_init_file():
    doc = template()
    text, variables = embedded_user_data(doc)
    assert text == USER_DATA.read_text(), (
        "the launch template's user-data differs from cloud-init/user-data.yaml: paste the file "
        "into deploy/hostagent-stack.yaml again")
    assert variables == {"ECS_CLUSTER": {"Ref": "Cluster"}}
    from tests.system.cloudinit_deb import render_user_data

    # Fn::Sub's filling equals the one every other deployment path uses (string.Template).
    assert cfn_sub(text, {"ECS_CLUSTER": "gc-x"}) == render_user_data({"ECS_CLUSTER": "gc-x"})


def test_volume_data_survives_the_stack():
    volume = resources(template())["PersistenceVolume"]
    assert volume["Type"] == "AWS::EC2::Volume"
    assert volume["DeletionPolicy"] == "Snapshot" and volume["UpdateReplacePolicy"] == "Snapshot"
    props = volume["Properties"]
    assert props["Tags"] == [{"Key": "Name", "Value": "grand-central-persistence"}]
    assert props["AvailabilityZone"] == {"Ref": "AvailabilityZone"}
    # Deleted in reverse order: the service, then the instance (its group), then the volume,
    # which could not be deleted while still attached.
    assert resources(template())["AutoScalingGroup"]["DependsOn"] == "PersistenceVolume"
    assert resources(template())["CouchDBService"]["DependsOn"] == "AutoScalingGroup"
    params = template()["Parameters"]
    assert (params["VolumeSize"]["Default"], params["VolumeType"]["Default"]) == (16, "gp3")
    assert params["CouchDBImage"]["Default"] == "couchdb:3"
    assert params["ImageId"]["Type"] == "AWS::EC2::Image::Id"


def test_task_volumes_are_what_hostagent_prints(tmp_path):
    doc = template()
    config = tmp_path / "hostagent.toml"
    config.write_text(files_written(yaml.safe_load(USER_DATA.read_text()))[HOSTAGENT_TOML])
    done = subprocess.run([sys.executable, "-m", "hostagent", "--config", str(config),
                           "ecs-task-volumes"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    task = resources(doc)["CouchDBTaskDefinition"]["Properties"]
    [couchdb] = task["ContainerDefinitions"]
    assert [{"name": v["Name"], "host": {"sourcePath": v["Host"]["SourcePath"]}}
            for v in task["Volumes"]] == printed["volumes"]
    assert [{"sourceVolume": m["SourceVolume"], "containerPath": m["ContainerPath"],
             "readOnly": m["ReadOnly"]} for m in couchdb["MountPoints"]] == printed["mountPoints"]
    # What moto does not keep (see the module docstring), from the template:
    assert task["PlacementConstraints"] == PLACEMENT
    assert task["NetworkMode"] == "host" and task["RequiresCompatibilities"] == ["EC2"]
    # With [couchdb] admin_secret CouchDB binds 127.0.0.1: with host networking that is the
    # host's loopback (localhost.localdomain:5984 on the host). Nothing is published.
    assert "PortMappings" not in couchdb
    service = resources(doc)["CouchDBService"]["Properties"]
    assert service["DeploymentConfiguration"] == {"MaximumPercent": 100, "MinimumHealthyPercent": 0}
    assert service["LaunchType"] == "EC2" and service["DesiredCount"] == 1
    group = resources(doc)["AutoScalingGroup"]["Properties"]
    assert (group["MinSize"], group["MaxSize"]) == ("1", "1")
    assert group["AvailabilityZones"] == [{"Ref": "AvailabilityZone"}]
    options = resources(doc)["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]
    assert options["HttpTokens"] == "required" and options["HttpPutResponseHopLimit"] == 2


# -- deployed into moto --------------------------------------------------------------------------

def deploy(name="gc", **parameters) -> dict:
    """create_stack with the two required parameters (plus any given); returns the stack."""
    import boto3

    cfn = boto3.client("cloudformation", region_name=REGION)
    values = {"ImageId": IMAGE, "AvailabilityZone": AZ, **parameters}
    cfn.create_stack(StackName=name, TemplateBody=STACK.read_text(), Capabilities=["CAPABILITY_IAM"],
                     Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in values.items()])
    cfn.get_waiter("stack_create_complete").wait(StackName=name,
                                                 WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    listed = cfn.describe_stack_resources(StackName=name)["StackResources"]
    stack["resources"] = {r["LogicalResourceId"]: r for r in listed if "LogicalResourceId" in r}
    stack["outputs"] = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    return stack


def role_policy(iam, role: str, name: str) -> dict:
    """An inline policy as deployed. moto stores one that CloudFormation gave it as a dict by
    str(): GetRolePolicy answers Python's repr, not JSON; real IAM answers JSON (boto3 decodes)."""
    document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
    if isinstance(document, str):
        import ast

        document = ast.literal_eval(document)
    return document


def launched_instance(stack) -> dict:
    import boto3

    group_name = stack["resources"]["AutoScalingGroup"]["PhysicalResourceId"]
    [group] = boto3.client("autoscaling", region_name=REGION).describe_auto_scaling_groups(
        AutoScalingGroupNames=[group_name])["AutoScalingGroups"]
    [member] = group["Instances"]
    ec2 = boto3.client("ec2", region_name=REGION)
    [reservation] = ec2.describe_instances(InstanceIds=[member["InstanceId"]])["Reservations"]
    instance = reservation["Instances"][0]
    encoded = ec2.describe_instance_attribute(InstanceId=instance["InstanceId"],
                                              Attribute="userData")["UserData"]["Value"]
    instance["user_data"] = base64.b64decode(encoded)
    instance["group"] = group
    return instance


def test_stack_deploys_and_every_resource_is_there(aws, tmp_path):
    import boto3

    stack = deploy()
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    doc = template()
    unconditional = {name for name, r in resources(doc).items() if "Condition" not in r}
    assert set(stack["resources"]) == unconditional  # SecretsPolicy: HasSecrets is false
    assert {r["ResourceStatus"] for r in stack["resources"].values()} == {"CREATE_COMPLETE"}
    physical = {name: r["PhysicalResourceId"] for name, r in stack["resources"].items()}

    ec2 = boto3.client("ec2", region_name=REGION)
    [volume] = ec2.describe_volumes(VolumeIds=[physical["PersistenceVolume"]])["Volumes"]
    assert (volume["AvailabilityZone"], volume["Size"], volume["State"]) == (AZ, 16, "available")
    assert stack["outputs"]["VolumeId"] == volume["VolumeId"]
    assert stack["outputs"]["ClusterName"] == "grand-central"

    iam = boto3.client("iam", region_name=REGION)
    role = physical["InstanceRole"]
    assert iam.list_role_policies(RoleName=role)["PolicyNames"] == ["hostagent"]
    assert role_policy(iam, role, "hostagent") == json.loads(POLICY.read_text())
    profile = iam.get_instance_profile(InstanceProfileName=physical["InstanceProfile"])
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == [role]

    [version] = ec2.describe_launch_template_versions(
        LaunchTemplateId=physical["LaunchTemplate"])["LaunchTemplateVersions"]
    data = version["LaunchTemplateData"]
    assert data["ImageId"] == IMAGE
    assert data["IamInstanceProfile"]["Arn"] == profile["InstanceProfile"]["Arn"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    user_data = base64.b64decode(data["UserData"])
    assert user_data.decode() == USER_DATA.read_text().replace("${ECS_CLUSTER}", "grand-central")
    doc_ud = yaml.safe_load(user_data)
    assert user_data.startswith(b"#cloud-config\n")
    assert files_written(doc_ud)[ECS_CONFIG] == "ECS_CLUSTER=grand-central\n"
    merged = cloud_init_merge(user_data)
    assert merged["types"] == ["text/cloud-config"] and merged["config"] == doc_ud
    assert_valid_cloud_config(tmp_path, merged["config"])

    instance = launched_instance(stack)
    assert instance["Placement"]["AvailabilityZone"] == AZ
    assert instance["user_data"] == user_data
    group = instance["group"]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 1, 1)
    assert group["AvailabilityZones"] == [AZ]
    assert group["LaunchTemplate"]["LaunchTemplateId"] == physical["LaunchTemplate"]

    ecs = boto3.client("ecs", region_name=REGION)
    [cluster] = ecs.describe_clusters(clusters=["grand-central"])["clusters"]
    assert cluster["status"] == "ACTIVE"
    task = ecs.describe_task_definition(taskDefinition=physical["CouchDBTaskDefinition"])["taskDefinition"]
    [couchdb] = task["containerDefinitions"]
    assert couchdb["image"] == "couchdb:3"
    assert [v["host"]["sourcePath"] for v in task["volumes"]] == ["/opt/couchdb/data",
                                                                  "/opt/couchdb/etc/local.d"]
    assert [m["containerPath"] for m in couchdb["mountPoints"]] == ["/opt/couchdb/data",
                                                                   "/opt/couchdb/etc/local.d"]
    # moto keeps no placement constraint or network mode from CloudFormation (the template's are
    # checked in test_task_volumes_are_what_hostagent_prints); if it ever does, they must match.
    if task.get("placementConstraints"):
        assert task["placementConstraints"] == [{"type": "memberOf", "expression":
                                                 PLACEMENT[0]["Expression"]}]
    [service] = ecs.describe_services(cluster="grand-central",
                                      services=[physical["CouchDBService"]])["services"]
    assert (service["launchType"], service["desiredCount"]) == ("EC2", 1)
    assert service["taskDefinition"] == task["taskDefinitionArn"]
    if service.get("deploymentConfiguration"):
        assert service["deploymentConfiguration"]["maximumPercent"] == 100
        assert service["deploymentConfiguration"]["minimumHealthyPercent"] == 0


SECRETS_URL = "s3://gc-secrets-bucket/prod/secrets.env"
ADMIN_SECRET_URL = "s3://gc-secrets-bucket/prod/couchdb-admin"


def test_the_user_data_leaves_secrets_and_couchdb_to_the_second_part():
    """The second part appends [secrets] and [couchdb] as new tables: the file must not have
    them already (TOML allows a table header once; a second [couchdb] is a parse error)."""
    toml_text = files_written(yaml.safe_load(USER_DATA.read_text()))[HOSTAGENT_TOML]
    assert not {"secrets", "couchdb"} & set(tomllib.loads(toml_text))


@pytest.mark.parametrize("parameters", [
    {"SecretsUrl": SECRETS_URL},
    {"CouchDBAdminSecretUrl": ADMIN_SECRET_URL},
    {"SecretsUrl": SECRETS_URL, "CouchDBAdminSecretUrl": ADMIN_SECRET_URL},
], ids=["secrets", "couchdb-admin", "both"])
def test_s3_parameters_configure_the_host_and_grant_only_their_objects(aws, tmp_path, parameters):
    import boto3

    from hostagent.config import parse_config

    stack = deploy(**parameters)
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    # parameter -> (its policy resource, the inline policy's name)
    extras = {"SecretsUrl": ("SecretsPolicy", "hostagent-secrets"),
              "CouchDBAdminSecretUrl": ("CouchDBAdminSecretPolicy", "hostagent-couchdb-admin")}
    for parameter, (resource, _) in extras.items():
        assert (resource in stack["resources"]) == (parameter in parameters), resource
    iam = boto3.client("iam", region_name=REGION)
    role = stack["resources"]["InstanceRole"]["PhysicalResourceId"]
    assert sorted(iam.list_role_policies(RoleName=role)["PolicyNames"]) == sorted(
        ["hostagent", *(extras[p][1] for p in parameters)])
    assert role_policy(iam, role, "hostagent") == json.loads(POLICY.read_text())
    for parameter, url in parameters.items():
        extra = role_policy(iam, role, extras[parameter][1])
        assert [(s["Effect"], s["Action"], s["Resource"]) for s in extra["Statement"]] == [
            ("Allow", "s3:GetObject", "arn:aws:s3:::" + url.removeprefix("s3://"))]

    user_data = launched_instance(stack)["user_data"]
    merged = cloud_init_merge(user_data)
    assert merged["types"] == ["text/cloud-config", "text/cloud-config"]
    # The first part is still the repo's file, untouched.
    first = yaml.safe_load(USER_DATA.read_text().replace("${ECS_CLUSTER}", "grand-central"))
    assert merged["config"]["write_files"][:len(first["write_files"])] == first["write_files"]
    written = files_written(merged["config"])
    config = parse_config(tomllib.loads(written[HOSTAGENT_TOML]), source="user-data")
    assert config.secrets.source == parameters.get("SecretsUrl", "")
    assert config.couchdb.admin_secret == parameters.get("CouchDBAdminSecretUrl", "")
    assert dict(config.volume.tags) == {"Name": "grand-central-persistence"}
    assert written[ECS_CONFIG] == "ECS_CLUSTER=grand-central\n"
    assert_valid_cloud_config(tmp_path, merged["config"])


@pytest.mark.root
def test_the_launched_instance_bootstraps_the_stacks_volume_by_tag(aws, imds, loop_device,
                                                                  host_paths):
    import boto3

    need_root()
    stack = deploy()
    volume_id = stack["outputs"]["VolumeId"]
    instance = launched_instance(stack)
    me = instance["InstanceId"]
    imds(instance_id=me, region=REGION, availability_zone=instance["Placement"]["AvailabilityZone"])

    ec2 = boto3.client("ec2", region_name=REGION)
    tags = {t["Key"]: t["Value"]
            for t in ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0].get("Tags", [])}
    if "Name" not in tags:
        # moto's CloudFormation drops AWS::EC2::Volume Tags: put on exactly the template's.
        template_tags = resources(template())["PersistenceVolume"]["Properties"]["Tags"]
        ec2.create_tags(Resources=[volume_id], Tags=template_tags)

    # The config the instance's cloud-init writes, with only what must be local to a test
    # changed: a loop device has no NVMe serial, so volume.device names it; the mount point and
    # fstab, the lock and the state dir live under tmp.
    written = files_written(yaml.safe_load(instance["user_data"]))
    config = tomllib.loads(written[HOSTAGENT_TOML])
    local = copy.deepcopy(config)
    dev = loop_device("16G")  # sparse, the stack's default size
    local["volume"]["device"] = dev
    local["filesystem"].update(mount_point=host_paths["mount_point"], fstab=host_paths["fstab"])
    local.setdefault("host", {}).update(lock_file=host_paths["lock_file"],
                                        state_dir=host_paths["state_dir"])
    assert local["volume"]["tags"] == {"Name": "grand-central-persistence"}
    path = Path(host_paths["root"]) / "hostagent.toml"
    path.write_text(toml_dumps(local))

    first = hostagent(str(path), "bootstrap", "--json")
    assert first.returncode == 0, first.stderr
    status = steps_by_name(first)
    assert (status["attach"], status["format"], status["mount"]) == ("done", "done", "done")
    assert json.loads(first.stdout)["volume_id"] == volume_id
    [volume] = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"]
    assert [(a["InstanceId"], a["Device"]) for a in volume["Attachments"]] == [(me, "/dev/xvdf")]
    assert sh("findmnt", "-n", "-o", "SOURCE", host_paths["mount_point"]).stdout.strip() == dev
    for sub in ("data", "etc/local.d"):
        st = os.stat(os.path.join(host_paths["mount_point"], sub))
        assert (st.st_uid, st.st_gid) == (5984, 5984)
    verify = hostagent(str(path), "verify-mount", "--json")
    assert verify.returncode == 0, verify.stdout
